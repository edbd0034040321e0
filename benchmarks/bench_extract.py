#!/usr/bin/env python
"""LoRA extraction from a full fine-tune of the 1.1B-shape base: `adapters extract` against a dense per-module SVD.

The tuned checkpoint is the base (``make_tinyllama``: bf16, 3 shards) plus its merged r=64 adapter (scale 2) and
small seeded dense noise (std ``--noise``, default 1e-4, next to update entries of std ~3.5e-3), rounded to bf16 and
written in a different shard layout (4 shards) so the two are matched by tensor name. ``--layers N`` keeps the
first N decoder layers (with the embeddings, final norm and lm_head) of both, for a quicker run.

Both run as whole processes in the same run; wall time and peak RSS (the command's own ru_maxrss:
``_common.run``) are printed.

- ``adapters extract --base BASE --tuned TUNED --rank 64 --json``: randomized SVD (sketch k + p, 2 power
  iterations, seeded) per module, one tensor pair in memory at a time.
- dense: a bare script that loads each pair with safetensors, forms dW in float32 and runs
  ``torch.linalg.svd(dW, full_matrices=False)`` (float32), keeps the top 64 and records the optimal relative
  Frobenius error ``sqrt(sum(S[64:]²) / sum(S²))`` (what mergekit-extract-lora and kohya's script do, in memory).

Compared per module: our factors' relative error (exact, see lora_ops.extract) against the dense optimum.

Usage: python benchmarks/bench_extract.py [--layers 2] [--rank 64] [--runs 1] [--dense-runs 1] [--noise 1e-4]
       [--skip-dense]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import run
from benchmarks.make_tinyllama import ensure_fixture


DENSE_SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, tuned, out, k = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
def files(d):
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return json.loads(idx.read_text())["weight_map"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {n: "model.safetensors" for n in f.keys()}
bmap, tmap = files(base), files(tuned)
result, errors = {}, {}
for name in sorted(tmap):
    if not name.endswith("_proj.weight"):
        continue
    with safe_open(str(base / bmap[name]), "pt") as fb, safe_open(str(tuned / tmap[name]), "pt") as ft:
        delta = ft.get_tensor(name).float() - fb.get_tensor(name).float()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:k].sqrt()
    module = name[: -len(".weight")]
    result[f"base_model.model.{module}.lora_B.weight"] = (U[:, :k] * root).contiguous()
    result[f"base_model.model.{module}.lora_A.weight"] = (root[:, None] * Vh[:k]).contiguous()
    s = S.double()
    errors[module] = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
out.mkdir(parents=True, exist_ok=True)
save_file(result, str(out / "adapter_model.safetensors"))
(out / "errors.json").write_text(json.dumps(errors))
"""


def _subset(name: str, layers: int) -> bool:
    return not name.startswith("model.layers.") or int(name.split(".")[2]) < layers


def build_inputs(root: Path, layers: int, noise: float) -> tuple[Path, Path]:
    """``(base, tuned)`` under ``root / f"extract-L{layers}-n{noise}"``, built once (a DONE file marks them)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from benchmarks.make_tinyllama import TINYLLAMA

    src_base, adapter = ensure_fixture(root / "tinyllama")
    full = layers >= TINYLLAMA.num_hidden_layers
    folder = root / f"extract-L{layers}-n{noise:g}"
    base = src_base if full else folder / "base"
    tuned = folder / "tuned"
    if (folder / "DONE").exists():
        return base, tuned
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    index = json.loads((src_base / "model.safetensors.index.json").read_text())["weight_map"]
    names = [n for n in index if _subset(n, layers)]
    cfg = json.loads((src_base / "config.json").read_text())
    cfg["num_hidden_layers"] = min(layers, TINYLLAMA.num_hidden_layers)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    gen = torch.Generator().manual_seed(1234)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fa:

        def write(dst: Path, tuned_side: bool, shards: int) -> None:
            dst.mkdir()
            (dst / "config.json").write_text(json.dumps(cfg, indent=2))
            per = -(-len(names) // shards)
            weight_map = {}
            for i in range(shards):
                part = names[i * per : (i + 1) * per]
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                tensors = {}
                for n in part:
                    with safe_open(str(src_base / index[n]), "pt") as fb:
                        w = fb.get_tensor(n)
                    if tuned_side and n.endswith("_proj.weight"):
                        key = "base_model.model." + n[: -len(".weight")]
                        a, b = fa.get_tensor(key + ".lora_A.weight"), fa.get_tensor(key + ".lora_B.weight")
                        d = scale * (b @ a) + noise * torch.randn(w.shape, generator=gen)
                        w = (w.float() + d).to(w.dtype)
                    tensors[n] = w
                    weight_map[n] = fname
                save_file(tensors, str(dst / fname), metadata={"format": "pt"})
            (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

        if not full:
            write(base, False, 3)
        write(tuned, True, 4)
    (folder / "DONE").write_text("ok\n")
    return base, tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers kept (22: the whole model)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="runs of adapters extract")
    parser.add_argument("--dense-runs", type=int, default=1, help="runs of the dense script (alternated with ours)")
    parser.add_argument("--noise", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-dense", action="store_true")
    args = parser.parse_args()
    data = Path(__file__).resolve().parent / ".data"
    base, tuned = build_inputs(data, args.layers, args.noise)
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    ours_cmd = [
        sys.executable,
        "-c",
        "from adapterhub_cli.cli.main import console_main; console_main()",
        "extract",
        "--base",
        str(base),
        "--tuned",
        str(tuned),
        "--rank",
        str(args.rank),
        "--device",
        args.device,
        "--json",
        "--overwrite",
        "-o",
        str(work / "ours"),
    ]
    cpu: dict[str, list[float]] = {"ours": [], "dense": []}

    def timed(which: str, cmd: list[str], stdout: str | None = None) -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = run(cmd, stdout=stdout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[which].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return result

    dense_cmd = [sys.executable, "-c", DENSE_SCRIPT, str(base), str(tuned), str(work / "dense"), str(args.rank)]
    ours, dense = [], []
    for i in range(args.runs):  # alternated, so a change in the machine's load falls on both
        ours.append(timed("ours", ours_cmd, stdout=str(work / "ours.json")))
        if not args.skip_dense and i < args.dense_runs:
            dense.append(timed("dense", dense_cmd))
    report = json.loads((work / "ours.json").read_text())
    errors_file = work / "dense" / "errors.json"
    dense_errors = json.loads(errors_file.read_text()) if errors_file.exists() else {}
    ours_errors = {m["name"]: m["rel_error"] for m in report["modules"]}
    ratios = [ours_errors[n] / e for n, e in dense_errors.items() if e > 0]
    estimate = [m["rel_error"] / m["opt_rel_error"] for m in report["modules"] if m["opt_rel_error"] > 0]

    def row(name: str, xs: list[tuple[float, float]], cpus: list[float]) -> str:
        walls, rss = [x[0] for x in xs], [x[1] for x in xs]
        return (
            f"{name:38} {min(walls):8.2f} {statistics.median(walls):8.2f} {max(walls):8.2f} "
            f"{statistics.median(cpus):8.2f} {max(rss):9.0f}"
        )

    print(f"base: {base}\ntuned: {tuned}\n{len(report['modules'])} modules, rank {args.rank}, whole processes")
    print(f"{'command':38} {'min s':>8} {'median':>8} {'max s':>8} {'CPU s':>8} {'peak MiB':>9}")
    print(row(f"adapters extract ({len(ours)} runs)", ours, cpu["ours"]))
    if dense:
        print(row(f"dense torch.linalg.svd ({len(dense)} runs)", dense, cpu["dense"]))
        speedup = statistics.median(x[0] for x in dense) / statistics.median(x[0] for x in ours)
        cpu_ratio = statistics.median(cpu["dense"]) / statistics.median(cpu["ours"])
        print(f"speed-up: {speedup:.1f}x (median wall), {cpu_ratio:.1f}x (median CPU time)")
    print(f"inside the process, the extract operation itself: {report['seconds']:.2f} s")
    methods = sorted({m["method"] for m in report["modules"]})
    lo, hi = min(dense_errors.values(), default=float("nan")), max(dense_errors.values(), default=float("nan"))
    print(f"methods: {', '.join(methods)}; optimum (dense) relative error: {lo:.4e} .. {hi:.4e}")
    if ratios:
        print(f"our error / dense optimum: median {statistics.median(ratios):.6f}, worst {max(ratios):.6f}")
    print(f"our error / our estimate of the optimum: worst {max(estimate, default=float('nan')):.6f}")


if __name__ == "__main__":
    main()
