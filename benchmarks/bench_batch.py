#!/usr/bin/env python
"""`adapters batch`: 16 adapters x (validate + reduce + quantize) on the local pool vs one at a time, and the
per-job overhead of the Ray engine against the local pool.

The fixture: a Llama-shaped base (bf16, hidden 1024, intermediate 2816, 8 layers, vocab 8000; ~106M parameters,
~210 MB) and 16 fp32 LoRA adapters (r=32 on all 7 projections of every layer, ~18 MB each, different seeds), made
from seeded random tensors by make_tinyllama.py's writers (``--size small``: hidden 256, 2 layers, r=16).

Measured (each a fresh `python` process, wall time from start to exit, imports included):
  1. the 48 jobs one at a time in one process (``ah.batch(..., engine="serial")``);
  2. the 48 jobs on the local pool (``adapters batch JOBS --workers N``, N = this machine's cores by default);
  3. the same on Ray (``adapters batch JOBS --engine ray``: a local Ray instance started and stopped by it).
Then the per-job overhead, in this process: 16 and 256 trivial jobs (``inspect`` without hashing of a small adapter)
on each engine; overhead per job = (wall(256) - wall(16)) / 240, which leaves out what a batch pays once (the local
pool's processes starting and importing torch, about as long as one process's start; Ray's instance is started once
beforehand and its workers warmed).

Usage: python benchmarks/bench_batch.py [--size small|medium] [--workers N] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.make_tinyllama import TINYLLAMA, FixtureSpec, write_adapter, write_base


SIZES = {
    "medium": dataclasses.replace(
        TINYLLAMA,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8000,
        lora_r=32,
        lora_alpha=64,
    ),
    "small": dataclasses.replace(
        TINYLLAMA,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        lora_r=16,
        lora_alpha=32,
    ),
}
ADAPTERS = 16


def make_fixture(root: Path, spec: FixtureSpec) -> tuple[Path, list[Path]]:
    """The base and 16 adapters under ``root`` (made once; a DONE file marks a complete fixture)."""
    base, adapters = root / "base", [root / f"adapter-{i:02d}" for i in range(ADAPTERS)]
    if (root / "DONE").is_file():
        return base, adapters
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    write_base(base, spec)
    for i, folder in enumerate(adapters):
        folder.mkdir()
        write_adapter(folder, dataclasses.replace(spec, adapter_seed=100 + i), base)
    (root / "DONE").write_text("ok\n")
    return base, adapters


def manifest(base: Path, adapters: list[Path], out: Path) -> list[dict]:
    items = [str(a) for a in adapters]
    return [
        {"op": "validate", "for_each": items, "source": "{item}", "base": str(base)},
        {"op": "reduce", "for_each": items, "source": "{item}", "out": f"{out}/{{name}}-r8", "rank": 8},
        {"op": "quantize", "for_each": items, "source": "{item}", "out": f"{out}/{{name}}-int8", "scheme": "int8"},
    ]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def overhead(engine: str, adapter: Path, workers: int) -> tuple[float, float, float]:
    """(wall of 16 trivial jobs, wall of 256, overhead per job), in this process."""
    import adapterhub_cli as ah

    def run(n: int) -> float:
        jobs = [{"op": "inspect", "source": str(adapter), "sha256": False} for _ in range(n)]
        t0 = time.perf_counter()
        records = ah.batch(jobs, engine=engine, workers=None if engine == "ray" else workers)
        assert all(r.status == "ok" for r in records), records
        return time.perf_counter() - t0

    run(workers)  # warm: Ray's workers started and importing; the local pool is made anew each call regardless
    few, many = run(16), run(256)
    return few, many, (many - few) / 240


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--workers", type=int, default=None, help="local pool size (default: the cores)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray measurements")
    args = parser.parse_args()
    from adapterhub_cli.batch.engines import cores

    workers = args.workers or cores()
    spec = SIZES[args.size]
    data = Path(__file__).resolve().parent / ".data" / f"batch-{args.size}"
    t0 = time.perf_counter()
    base, adapters = make_fixture(data, spec)
    size = (adapters[0] / "adapter_model.safetensors").stat().st_size
    print(f"fixture: {data} ({ADAPTERS} adapters of {size / 1e6:.1f} MB; ready in {time.perf_counter() - t0:.1f} s)")
    print(f"machine: {os.cpu_count()} cores ({cores()} usable), load average {os.getloadavg()[0]:.1f} at start")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    env = {**os.environ, "ADAPTERS_CACHE": str(work / "cache")}
    python = sys.executable
    try:
        runs: dict[str, float] = {}
        jobs_file = work / "serial.json"
        jobs_file.write_text(json.dumps(manifest(base, adapters, work / "serial")))
        code = (
            "import sys, adapterhub_cli as ah; r = ah.batch(sys.argv[1], engine='serial'); "
            "sys.exit(any(x.status != 'ok' for x in r))"
        )
        runs["one at a time (1 process)"] = timed([python, "-c", code, str(jobs_file)], env)
        cli = [python, "-c", "from adapterhub_cli.cli.main import console_main; console_main()", "batch"]
        jobs_file = work / "local.json"
        jobs_file.write_text(json.dumps(manifest(base, adapters, work / "local")))
        runs[f"local pool, {workers} workers"] = timed([*cli, str(jobs_file), "--workers", str(workers)], env)
        if not args.no_ray:
            jobs_file = work / "ray.json"
            jobs_file.write_text(json.dumps(manifest(base, adapters, work / "ray")))
            runs[f"ray, local instance of {workers} CPUs"] = timed(
                [*cli, str(jobs_file), "--engine", "ray", "--workers", str(workers)], env
            )
        jobs = 3 * ADAPTERS
        serial = runs["one at a time (1 process)"]
        print(f"\n{jobs} jobs (16 x validate + reduce --rank 8 + quantize int8), wall time of the whole process:")
        for name, wall in runs.items():
            print(f"  {name:34} {wall:7.1f} s  {jobs / wall:5.2f} jobs/s  speed-up {serial / wall:4.2f}x")

        os.environ["ADAPTERS_CACHE"] = env["ADAPTERS_CACHE"]
        print("\nper-job overhead (256 trivial inspect jobs vs 16, in this process):")
        rows = [("local", overhead("local", adapters[0], workers))]
        if not args.no_ray:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            print(f"  (ray.init of a local instance: {time.perf_counter() - t0:.1f} s)")
            try:
                rows.append(("ray", overhead("ray", adapters[0], workers)))
            finally:
                ray.shutdown()
        for name, (one, many, per_job) in rows:
            print(f"  {name:6} 16 jobs {one:6.2f} s   256 jobs {many:6.2f} s   overhead {per_job * 1000:6.1f} ms/job")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
