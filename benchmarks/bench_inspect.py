#!/usr/bin/env python
"""Wall time of a whole `adapters inspect` process on the 1.1B-shape r=64 adapter (~200 MB), against references.

Commands, each run as a fresh process, alternated, several times; medians and per-pair ratios are printed:

- ``adapters inspect`` (warm): the sha256 of the tensor file is already in the user cache.
- ``adapters inspect`` (cold): a fresh cache folder, so the 200 MB file is hashed in the run.
- ``adapters inspect --no-hash``.
- hand-rolled PEFT: ``PeftConfig.from_pretrained`` + ``safetensors.torch.load_file`` + count parameters, what a
  script without header reading does.

Usage: python benchmarks/bench_inspect.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.make_tinyllama import ensure_fixture


PEFT_SCRIPT = """
import sys
from peft import PeftConfig
from safetensors.torch import load_file
cfg = PeftConfig.from_pretrained(sys.argv[1])
sd = load_file(sys.argv[1] + "/adapter_model.safetensors")
print(cfg.r, cfg.lora_alpha, len(sd), sum(t.numel() for t in sd.values()))
"""


def adapters_exe() -> list[str]:
    exe = shutil.which("adapters")
    return [exe] if exe else [sys.executable, "-c", "from adapterhub_cli.cli.main import console_main; console_main()"]


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    _, adapter = ensure_fixture(Path(__file__).resolve().parent / ".data" / "tinyllama")
    size = (adapter / "adapter_model.safetensors").stat().st_size
    warm_cache = tempfile.mkdtemp(prefix="adapters-cache-")
    env = {**os.environ, "ADAPTERS_CACHE": warm_cache}
    commands = {
        "adapters inspect (warm hash cache)": ([*adapters_exe(), "inspect", str(adapter)], lambda: env),
        "adapters inspect (cold: hashes 200 MB)": (
            [*adapters_exe(), "inspect", str(adapter)],
            lambda: {**os.environ, "ADAPTERS_CACHE": tempfile.mkdtemp(prefix="adapters-cold-")},
        ),
        "adapters inspect --no-hash": ([*adapters_exe(), "inspect", str(adapter), "--no-hash"], lambda: env),
        "PEFT config + load_file": ([sys.executable, "-c", PEFT_SCRIPT, str(adapter)], lambda: env),
    }
    for cmd, make_env in commands.values():  # warm-up: page cache, the warm hash cache, .pyc files
        time_once(cmd, make_env())
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, (cmd, make_env) in commands.items():
            times[name].append(time_once(cmd, make_env()))
    ref = times["PEFT config + load_file"]
    print(f"adapter: {adapter} ({size / 1e6:.0f} MB), {args.runs} runs each, alternated")
    print(f"{'command':42} {'min':>7} {'median':>7} {'max':>7}  median ratio to PEFT")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, ref, strict=True))
        print(f"{name:42} {min(ts):7.3f} {statistics.median(ts):7.3f} {max(ts):7.3f}  {ratio:.2f}x")


if __name__ == "__main__":
    main()
