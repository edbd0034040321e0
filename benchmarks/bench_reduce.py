#!/usr/bin/env python
"""Rank reduction of the 1.1B-shape r=64 all-linear adapter to r=16: `adapters reduce` against the dense path.

Both run as whole processes in the same run; wall time and peak RSS (the command's own ru_maxrss:
``_common.run``) are printed.

- ``adapters reduce A -o OUT --rank 16``: thin QR of B and Aᵀ + SVD of the 64 x 64 core, per module.
- dense: what PEFT's ``add_weighted_adapter(..., combination_type="svd", svd_rank=16)`` does per module, forming
  the d_out x d_in update and running ``torch.linalg.svd`` on it (``full_matrices=False``, cheaper than PEFT's
  default ``svd_full_matrices=True``). PEFT itself turns "svd" into "linear" for a single adapter, hence this.

The two results are compared: the relative Frobenius errors of every module agree (both are the optimum).

Usage: python benchmarks/bench_reduce.py [--runs 5] [--dense-runs 1] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import run
from benchmarks.make_tinyllama import ensure_fixture


DENSE_SCRIPT = r"""
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
adapter, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = json.load(open(adapter + "/adapter_config.json"))
scale = cfg["lora_alpha"] / cfg["r"]
result, errors = {}, {}
with safe_open(adapter + "/adapter_model.safetensors", "pt") as f:
    names = sorted({key.rsplit(".lora_", 1)[0] for key in f.keys()})
    for name in names:
        A = f.get_tensor(name + ".lora_A.weight").float()
        B = f.get_tensor(name + ".lora_B.weight").float()
        delta = scale * (B @ A)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        result[name + ".lora_B.weight"] = (U[:, :k] * S[:k]).contiguous()
        result[name + ".lora_A.weight"] = Vh[:k].contiguous()
        errors[name] = float(S[k:].double().square().sum().sqrt() / S.double().square().sum().sqrt())
save_file(result, out + "/adapter_model.safetensors")
json.dump(errors, open(out + "/errors.json", "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dense-runs", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    _, adapter = ensure_fixture(Path(__file__).resolve().parent / ".data" / "tinyllama")
    work = Path(tempfile.mkdtemp(prefix="bench-reduce-"))
    ours_cmd = [
        sys.executable,
        "-c",
        "from adapterhub_cli.cli.main import console_main; console_main()",
        "reduce",
        str(adapter),
        "--rank",
        str(args.rank),
        "--json",
        "--overwrite",
        "-o",
        str(work / "ours"),
    ]
    run(ours_cmd)  # warm-up: page cache, .pyc files
    ours = [run(ours_cmd) for _ in range(args.runs)]
    dense = []
    for _ in range(args.dense_runs):
        (work / "dense").mkdir(exist_ok=True)
        dense.append(run([sys.executable, "-c", DENSE_SCRIPT, str(adapter), str(work / "dense"), str(args.rank)]))
    errors_file = work / "dense" / "errors.json"
    dense_errors = json.loads(errors_file.read_text()) if errors_file.exists() else {}
    reports = [
        json.loads(subprocess.run(ours_cmd, capture_output=True, text=True, check=True).stdout)
        for _ in range(args.runs)
    ]
    op_seconds = statistics.median(r["seconds"] for r in reports)
    report = json.dumps(reports[-1])
    ours_errors = {"base_model.model." + m["name"]: m["rel_error"] for m in json.loads(report)["modules"]}
    worst = max((abs(ours_errors[n] - e) / e for n, e in dense_errors.items()), default=float("nan"))

    def row(name: str, xs: list[tuple[float, float]]) -> str:
        walls, rss = [x[0] for x in xs], [x[1] for x in xs]
        return f"{name:34} {min(walls):8.2f} {statistics.median(walls):8.2f} {max(walls):8.2f} {max(rss):9.0f}"

    print(f"adapter: {adapter}, r=64 -> {args.rank}, whole processes")
    print(f"{'command':34} {'min s':>8} {'median':>8} {'max s':>8} {'peak MiB':>9}")
    print(row(f"adapters reduce ({args.runs} runs)", ours))
    if dense:
        print(row(f"dense torch.linalg.svd ({args.dense_runs} run)", dense))
    ratio = statistics.median(x[0] for x in dense) / statistics.median(x[0] for x in ours) if dense else float("nan")
    print(f"inside the process, the reduce operation itself (load, check, compute, write): median {op_seconds:.2f} s")
    print(f"speed-up (median wall): {ratio:.0f}x; largest relative difference of the per-module errors: {worst:.1e}")


if __name__ == "__main__":
    main()
