#!/usr/bin/env python
"""Wall time and peak memory of a whole `adapters analyze` process: the 1.1B-shape r=64 adapter (154 modules, all
linear projections of 22 layers) against its bf16 base (2.2 GB in 3 shards), from benchmarks/make_tinyllama.py.

Commands, each a fresh process, alternated, ``--runs`` times; min / median / max and peak RSS are printed:

- ``adapters analyze ADAPTER --base BASE --json``: every number of every module (each base weight streamed once in
  row blocks against the factors, O(m n r) per module).
- a floor for context: a bare script that only reads the same 154 base weights and converts them to float32 (what
  any analysis against the base must at least do), so the ratio shows what the analysis adds to reading.
- with ``--base-top K``: ``adapters analyze ... --base-top K`` too (a seeded randomized SVD of every weight).

The output of the analyze run is checked: 154 modules, every ratio finite.

Usage: python benchmarks/bench_analyze.py [--runs 3] [--base-top 8]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import adapters_cli, machine, run, summarize
from benchmarks.make_tinyllama import ensure_fixture


READ_ONLY = """
import json, sys
from pathlib import Path
from safetensors import safe_open
base, adapter = Path(sys.argv[1]), Path(sys.argv[2])
cfg = json.loads((adapter / "adapter_config.json").read_text())
index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
    modules = sorted({k.split(".lora_A.")[0].removeprefix("base_model.model.") for k in f.keys() if ".lora_A." in k})
total = 0.0
for name in modules:
    key = name + ".weight"
    with safe_open(str(base / index[key]), "pt") as f:
        total += float(f.get_tensor(key).float().square().sum())
print(len(modules), total)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--base-top", type=int, default=None, help="also time analyze --base-top K")
    args = parser.parse_args()
    base, adapter = ensure_fixture(Path(__file__).resolve().parent / ".data" / "tinyllama")
    out = Path(tempfile.mkdtemp(prefix="bench-analyze-")) / "analyze.json"
    analyze = [*adapters_cli(), "analyze", str(adapter), "--base", str(base), "--json"]
    commands = {
        "adapters analyze --json": (analyze, str(out)),
        "read the 154 base weights as float32 (floor)": (
            [sys.executable, "-c", READ_ONLY, str(base), str(adapter)],
            None,
        ),
    }
    if args.base_top:
        commands[f"adapters analyze --json --base-top {args.base_top}"] = (
            [*analyze, "--base-top", str(args.base_top)],
            None,
        )
    print(machine())
    for cmd, sink in commands.values():  # warm-up: page cache, .pyc files
        run(cmd, sink)
    doc = json.loads(out.read_text())
    modules = doc["modules"]
    assert len(modules) == 154, len(modules)
    for m in modules:
        for key in (
            "rel_fro",
            "cos_W",
            "proj_fro",
            "amplification",
            "random_proj",
            "alignment_over_random",
            "dM",
            "dD",
        ):
            assert m[key] is not None and math.isfinite(m[key]), (m["module"], key, m[key])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, (cmd, sink) in commands.items():
            times[name].append(run(cmd, sink))
    medians = summarize(times)
    floor = medians["read the 154 base weights as float32 (floor)"]
    print(f"analyze / floor (median): {medians['adapters analyze --json'] / floor:.2f}x")
    fam = {f["name"]: f for f in doc["families"]}
    print(
        "per family (pooled rel_fro, median amplification): "
        + ", ".join(f"{k} {v['rel_fro']:.3g} / {v['amplification']:.3g}" for k, v in sorted(fam.items()))
    )


if __name__ == "__main__":
    main()
