"""Vendored third-party code: run by tests/test_gguf.py in a subprocess, never collected as tests or doctests."""

collect_ignore = ["llama.cpp"]
