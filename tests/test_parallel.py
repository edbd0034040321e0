"""The one thread-count rule."""

from __future__ import annotations

import os

from adapterhub_cli.parallel import MAX_WORKERS, default_workers


def test_default_is_the_cores_capped(monkeypatch):
    monkeypatch.delenv("ADAPTERS_THREADS", raising=False)
    monkeypatch.delenv("ADAPTERS_MERGE_THREADS", raising=False)
    assert default_workers() == max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    assert default_workers("ADAPTERS_MERGE_THREADS") == default_workers()


def test_adapters_threads_sets_every_step_and_the_specific_variable_wins(monkeypatch):
    monkeypatch.setenv("ADAPTERS_THREADS", "3")
    monkeypatch.delenv("ADAPTERS_MERGE_THREADS", raising=False)
    assert default_workers() == 3
    assert default_workers("ADAPTERS_MERGE_THREADS") == 3
    monkeypatch.setenv("ADAPTERS_MERGE_THREADS", "5")
    assert default_workers("ADAPTERS_MERGE_THREADS") == 5
    for junk in ("0", "-2", "x", ""):
        monkeypatch.setenv("ADAPTERS_THREADS", junk)
        assert default_workers() == max(1, min(os.cpu_count() or 1, MAX_WORKERS))
