#!/usr/bin/env python
"""Merging the r=64 all-linear adapter into the 1.1B-shape bf16 base: `adapters merge` beside `cp -r` and PEFT.

Whole processes in one run, alternated, with wall time and peak RSS (the child's ru_maxrss):

- ``cp -r BASE OUT && sync``: the floor for reading and writing 2.2 GB.
- ``adapters merge ADAPTER --into BASE -o OUT`` (its own fsync included).
- PEFT: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained`` (+ sync).

Then every tensor of our output is compared with PEFT's (bit for bit). ``--shards 500MB`` first re-shards the
base into pieces of that size (the same merge engine, with no adapter) and measures on that copy.

``--device cuda`` runs both merges on the GPU (PEFT's model moved there with ``device_map``).

Usage: python benchmarks/bench_merge.py [--runs 3] [--peft-runs 1] [--shards 500MB] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import run
from benchmarks.make_tinyllama import ensure_fixture


PEFT_SCRIPT = r"""
import sys, warnings, torch
warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, device = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def compare(ours: Path, theirs: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ) between two checkpoints, one tensor at a time."""
    import torch

    from adapterhub_cli.artifact.checkpoint import open_base
    from adapterhub_cli.merge.shards import _BaseReader

    a, b = open_base(ours), open_base(theirs)
    ra, rb = _BaseReader(a), _BaseReader(b)
    shared = sorted(set(a.tensors) & set(b.tensors))
    differ = sum(not torch.equal(ra.tensor(k), rb.tensor(k)) for k in shared)
    return len(shared), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peft-runs", type=int, default=1)
    parser.add_argument("--shards", default=None, help="re-shard the base into pieces of this size first")
    parser.add_argument("--device", default="cpu", help="where both merges compute (cpu, cuda, cuda:N)")
    args = parser.parse_args()
    base, adapter = ensure_fixture(Path(__file__).resolve().parent / ".data" / "tinyllama")
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=base.parent))
    if args.shards:
        import adapterhub_cli as ah

        resharded = base.parent / f"base-{args.shards}"
        if not resharded.exists():
            ah.merge([], base=base, out=resharded, max_shard_size=args.shards)
        base = resharded
    n_shards = len(list(base.glob("*.safetensors")))
    adapters = [sys.executable, "-c", "from adapterhub_cli.cli.main import main; main()"]
    commands = {
        "cp -r + sync": ["sh", "-c", f"cp -r {base} {work}/cp && sync"],
        "adapters merge": [
            *adapters,
            *("merge", str(adapter), "--into", str(base), "-o", str(work / "ours"), "--device", args.device, "--json"),
        ],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    phase: list[float] = []  # the merge's own seconds (its --json), without starting Python and importing torch
    report = work / "report.json"
    for i in range(args.runs + 1):  # the first round warms the page cache and is not counted
        for name, cmd in commands.items():
            shutil.rmtree(work / "cp", ignore_errors=True)
            shutil.rmtree(work / "ours", ignore_errors=True)
            result = run(cmd, stdout=str(report) if name == "adapters merge" else None)
            if i:
                times[name].append(result)
                if name == "adapters merge":
                    phase.append(json.loads(report.read_text())["seconds"])
    peft = []
    for _ in range(args.peft_runs):
        shutil.rmtree(work / "peft", ignore_errors=True)
        peft.append(
            run(
                [
                    sys.executable,
                    "-c",
                    PEFT_SCRIPT + "\nimport os; os.sync()",
                    str(base),
                    str(adapter),
                    str(work / "peft"),
                    args.device,
                ]
            )
        )
    if peft:
        times["PEFT merge_and_unload + save_pretrained"] = peft
    print(f"base: {base} ({n_shards} shards), adapter: {adapter}, device: {args.device}")
    print(f"{'command':42} {'min s':>7} {'median':>7} {'max s':>7} {'peak MiB':>9}")
    for name, xs in times.items():
        walls = [x[0] for x in xs]
        print(
            f"{name:42} {min(walls):7.2f} {statistics.median(walls):7.2f} {max(walls):7.2f} "
            f"{max(x[1] for x in xs):9.0f}"
        )
    print(
        f"{'    of which the merge (--json seconds)':42} {min(phase):7.2f} {statistics.median(phase):7.2f} "
        f"{max(phase):7.2f}"
    )
    med = {name: statistics.median(x[0] for x in xs) for name, xs in times.items()}
    print(f"merge itself / cp: {statistics.median(phase) / med['cp -r + sync']:.2f}x; ", end="")
    print(f"adapters merge / cp: {med['adapters merge'] / med['cp -r + sync']:.2f}x", end="")
    if peft:
        print(
            f"; PEFT / adapters merge: {med['PEFT merge_and_unload + save_pretrained'] / med['adapters merge']:.1f}x"
        )
        shutil.rmtree(work / "ours", ignore_errors=True)
        run(commands["adapters merge"])
        n, differ = compare(work / "ours", work / "peft")
        print(f"tensors compared with PEFT's output: {n}, bit-identical: {n - differ}, different: {differ}")
    else:
        print()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
