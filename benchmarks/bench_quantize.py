#!/usr/bin/env python
"""Quantize the 1.1B-shape r=64 all-linear fp32 adapter (~200 MB) with each scheme: size, error, time.

For every scheme: the factor bytes before / after and their ratio, the safetensors file size, the median and
largest relative error of a module's update ``||dW_q - dW||_F / ||dW||_F`` (from the factors), and the wall time
of the whole ``adapters quantize`` process.

Usage: python benchmarks/bench_quantize.py [--schemes int8,fp8,nf4,bf16,fp16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.make_tinyllama import ensure_fixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="int8,fp8,nf4,bf16,fp16")
    args = parser.parse_args()
    _, adapter = ensure_fixture(Path(__file__).resolve().parent / ".data" / "tinyllama")
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    original = (adapter / "adapter_model.safetensors").stat().st_size
    print(f"adapter: {adapter} ({original / 1e6:.1f} MB)")
    head = ("scheme", "factors MB", "ratio", "file MB", "median err", "max err", "wall s")
    print(f"{head[0]:7} {head[1]:>11} {head[2]:>6} {head[3]:>8} {head[4]:>11} {head[5]:>9} {head[6]:>7}")
    for scheme in args.schemes.split(","):
        cmd = [
            sys.executable,
            "-c",
            "from adapterhub_cli.cli.main import console_main; console_main()",
            "quantize",
            str(adapter),
            "--to",
            scheme,
            "--json",
            "-o",
            str(work / scheme),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        r = json.loads(proc.stdout)
        errors = [m["rel_error"] for m in r["modules"]]
        print(
            f"{scheme:7} {r['bytes_after'] / 1e6:11.1f} {r['ratio']:6.2f} {r['file_size'] / 1e6:8.1f} "
            f"{statistics.median(errors):11.2e} {max(errors):9.2e} {wall:7.2f}"
        )


if __name__ == "__main__":
    main()
