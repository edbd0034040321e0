#!/usr/bin/env python
"""Merging the r=64 all-linear adapter into the 1.1B-shape bf16 base: `adapters merge` beside `cp -r` and PEFT.

Whole processes in one run, alternated round by round (a first, uncounted round warms the page cache), with wall
time and peak RSS (the command's own ru_maxrss: ``_common.run``), on the base as generated (3 shards) and on the
same base split into shards of 500 MB (5 shards):

- ``cp -r BASE OUT && sync``: the floor for reading and writing 2.2 GB.
- ``adapters merge ADAPTER --into BASE -o OUT --json`` (its own fsync included); its ``seconds`` is the merge from
  the plan to the folder in place, which now starts while torch imports.
- with ``--compare-with CHECKOUT``: the same command run from another checkout of the repository (e.g. a
  ``git worktree`` of an older commit), alternated with ours, for before / after numbers from one run.
- PEFT: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained`` (+ sync),
  ``--peft-runs`` times (1 by default: it is slow and steady).

Then every tensor of our output is compared with PEFT's, bit for bit. The goals (issue 15): the whole process within
1.7x of ``cp -r`` + ``sync``, at least 7x faster than PEFT, peak RSS under 600 MiB.

Usage: python benchmarks/bench_merge.py [--runs 3] [--peft-runs 1] [--shards keep,500MB] [--device cpu|cuda]
                                        [--compare-with CHECKOUT] [--no-peft]
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
from benchmarks._common import adapters_cli, machine, run, summarize
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

CP = "cp -r + sync"
OURS = "adapters merge"
BEFORE = "adapters merge (--compare-with)"
PEFT = "PEFT merge_and_unload + save_pretrained"


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


def variant(base: Path, shards: str) -> Path:
    """The base as generated (``keep``), or a copy cut into shards of at most ``shards`` (made once)."""
    if shards == "keep":
        return base
    resharded = base.parent / f"base-{shards}"
    if not resharded.exists():
        import adapterhub_cli as ah

        ah.merge([], base=base, out=resharded, max_shard_size=shards)
    return resharded


def bench(base: Path, adapter: Path, work: Path, args: argparse.Namespace) -> None:
    n_shards = len(list(base.glob("*.safetensors")))
    ours = [*("merge", str(adapter), "--into", str(base), "--device", args.device, "--json")]
    commands = {
        CP: ["sh", "-c", f"cp -r {base} {work}/cp && sync"],
        OURS: [*adapters_cli(), *ours, "-o", str(work / "ours")],
    }
    if args.compare_with:
        commands[BEFORE] = [*adapters_cli(args.compare_with), *ours, "-o", str(work / "before")]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    phase: dict[str, list[float]] = {OURS: [], BEFORE: []}  # the --json seconds
    report = work / "report.json"
    for i in range(args.runs + 1):  # the first round warms the page cache and is not counted
        for name, cmd in commands.items():
            for leftover in ("cp", "ours", "before"):
                shutil.rmtree(work / leftover, ignore_errors=True)
            result = run(cmd, stdout=str(report) if name != CP else None)
            if i:
                times[name].append(result)
                if name != CP:
                    phase[name].append(json.loads(report.read_text())["seconds"])
    peft = []
    for _ in range(0 if args.no_peft else args.peft_runs):
        shutil.rmtree(work / "peft", ignore_errors=True)
        script = PEFT_SCRIPT + "\nimport os; os.sync()"
        peft.append(run([sys.executable, "-c", script, str(base), str(adapter), str(work / "peft"), args.device]))
    if peft:
        times[PEFT] = peft
    print(f"\nbase: {base} ({n_shards} shards), adapter: {adapter}, device: {args.device}")
    med = summarize(times)
    for name, xs in phase.items():
        if xs:
            label = f"    {'(before) ' if name == BEFORE else ''}of which the merge (--json s)"
            print(f"{label:46} {len(xs):4d} {min(xs):7.2f} {statistics.median(xs):7.2f} {max(xs):7.2f}")
    rss = max(x[1] for x in times[OURS])
    line = f"adapters merge / cp: {med[OURS] / med[CP]:.2f}x (goal <= 1.7x); peak RSS {rss:.0f} MiB (goal < 600)"
    if BEFORE in med:
        line += f"; before / after: {med[BEFORE] / med[OURS]:.2f}x"
    if PEFT in med:
        line += f"; PEFT / adapters merge: {med[PEFT] / med[OURS]:.1f}x (goal >= 7x)"
    print(line)
    if peft:
        shutil.rmtree(work / "ours", ignore_errors=True)
        run(commands[OURS])
        n, differ = compare(work / "ours", work / "peft")
        print(f"tensors compared with PEFT's output: {n}, bit-identical: {n - differ}, different: {differ}")
    for leftover in ("cp", "ours", "before", "peft"):
        shutil.rmtree(work / leftover, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="counted rounds (after one warm-up round)")
    parser.add_argument("--peft-runs", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT (and the bit-identity check)")
    parser.add_argument("--shards", default="keep,500MB", help="base layouts: keep (as generated) and/or sizes")
    parser.add_argument("--device", default="cpu", help="where both merges compute (cpu, cuda, cuda:N)")
    parser.add_argument("--compare-with", default=None, help="another checkout whose `adapters merge` is timed too")
    args = parser.parse_args()
    base, adapter = ensure_fixture(Path(__file__).resolve().parent / ".data" / "tinyllama")
    print(machine())
    for shards in args.shards.split(","):
        work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=base.parent))
        try:
            bench(variant(base, shards.strip()), adapter, work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
