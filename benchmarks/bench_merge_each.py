#!/usr/bin/env python
"""Four adapters into the 1.1B-shape bf16 base: `merge --each` (one pass) beside one merge and four separate merges.

The fixture's r=64 all-linear adapter and three more like it (other seeds; made once beside it, as
``make_tinyllama.py`` makes the first) are merged into the 2.2 GB base. Whole processes, alternated round by round
after a first, uncounted round (the page cache warm), medians of ``--runs``:

- ``cp -r BASE OUT && sync``: the floor for reading and writing 2.2 GB once;
- one ``adapters merge A --into BASE -o OUT``;
- ``adapters merge A B C D --into BASE --each -o OUTDIR``: four outputs, the base read once;
- four ``adapters merge X --into BASE -o OUT`` one after the other (one timed shell command).

Goal (issue 15): ``--each`` under 2.5x a single merge (four separate merges cost about 4x). Then each ``--each``
output is compared with the separate merge of its adapter, tensor by tensor (sha256 of the bytes).

Usage: python benchmarks/bench_merge_each.py [--runs 3] [--adapters 4] [--shards 5GB]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shlex
import shutil
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import adapters_cli, machine, run, summarize
from benchmarks.make_tinyllama import TINYLLAMA, _build, _locked, _marker, ensure_fixture, is_complete, write_adapter


CP = "cp -r + sync"
ONE = "adapters merge (1 adapter)"
EACH = "adapters merge --each ({n} adapters)"
SEPARATE = "{n} separate adapters merge"


def more_adapters(root: Path, base: Path, first: Path, count: int) -> list[Path]:
    """The fixture's adapter and ``count - 1`` more with seeds 2, 3, ... (same shapes; made once, crash-safe)."""
    out = [first]
    with _locked(root):
        for seed in range(2, count + 1):
            spec = dataclasses.replace(TINYLLAMA, adapter_seed=seed)
            folder = root / f"adapter-seed{seed}"
            marker = _marker("adapter", spec, base_model_name_or_path=str(base))
            if not is_complete(folder, marker):
                _build(folder, marker, lambda d, spec=spec: write_adapter(d, spec, base))
            out.append(folder)
    return out


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every stored tensor's bytes, by name, read one tensor at a time."""
    from adapterhub_cli.artifact.checkpoint import open_base
    from adapterhub_cli.merge.shards import _BaseReader

    view = open_base(folder)
    reader = _BaseReader(view)
    return {
        key: hashlib.sha256(
            reader.tensor(key).contiguous().view(-1).view(__import__("torch").uint8).numpy()
        ).hexdigest()
        for key in sorted(view.tensors)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="counted rounds (after one warm-up round)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--shards", default="5GB", help="--max-shard-size of the outputs")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the outputs")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent / ".data" / "tinyllama"
    base, first = ensure_fixture(root)
    adapters = more_adapters(root, base, first, args.adapters)
    names = {a: f"{a.name}" for a in adapters}
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-each-", dir=root))
    cli = shlex.join(adapters_cli())
    common = ["--into", str(base), "--max-shard-size", args.shards]
    separate = " && ".join(
        f"{cli} merge {shlex.quote(str(a))} {shlex.join(common)} -o {shlex.quote(str(work / 'sep' / names[a]))}"
        for a in adapters
    )
    n = len(adapters)
    commands = {
        CP: ["sh", "-c", f"cp -r {shlex.quote(str(base))} {shlex.quote(str(work / 'cp'))} && sync"],
        ONE: [*adapters_cli(), "merge", str(adapters[0]), *common, "-o", str(work / "one")],
        EACH.format(n=n): [*adapters_cli(), "merge", *map(str, adapters), *common, "--each", "-o", str(work / "each")],
        SEPARATE.format(n=n): ["sh", "-c", separate],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    try:
        for i in range(args.runs + 1):  # the first round warms the page cache and is not counted
            for name, cmd in commands.items():
                for leftover in ("cp", "one", "each", "sep"):
                    shutil.rmtree(work / leftover, ignore_errors=True)
                result = run(cmd)
                if i:
                    times[name].append(result)
        print(f"\nbase: {base} (output shards up to {args.shards}), adapters: {', '.join(a.name for a in adapters)}")
        med = summarize(times, width=40)
        one = med[ONE]
        print(
            f"--each / one merge: {med[EACH.format(n=n)] / one:.2f}x (goal < 2.5x); "
            f"{n} separate / one merge: {med[SEPARATE.format(n=n)] / one:.2f}x; one merge / cp: {one / med[CP]:.2f}x"
        )
        if not args.no_check:
            shutil.rmtree(work / "each", ignore_errors=True)
            shutil.rmtree(work / "sep", ignore_errors=True)
            run(commands[EACH.format(n=n)])
            run(commands[SEPARATE.format(n=n)])
            same = sum(
                tensor_hashes(work / "each" / names[a]) == tensor_hashes(work / "sep" / names[a]) for a in adapters
            )
            print(f"--each outputs bit-identical to the separate merges: {same} of {n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
