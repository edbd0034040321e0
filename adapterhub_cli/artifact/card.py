"""Model cards for adapters this tool writes: Hub metadata (base_model, library_name: peft) and the lineage."""

from __future__ import annotations

import json
from typing import Any

from adapterhub_cli.errors import scrub


def model_card(config: dict[str, Any], provenance: dict[str, Any]) -> str:
    """README.md text: YAML front matter the Hub reads, then what produced the adapter and from what."""
    base = config.get("base_model_name_or_path")
    front = ["---", "library_name: peft"]
    if base:
        front.append(f"base_model: {json.dumps(str(base))}")
    front += ["tags:", "- lora", "- adapterhub-cli", "---", ""]
    op = provenance.get("operation", "?")
    lines = [f"# LoRA adapter ({op})", "", f"Written by {provenance.get('tool', 'adapterhub-cli')}.", ""]
    lines += ["## Lineage", "", f"Operation: `{op}`", ""]
    params = provenance.get("parameters") or {}
    if params:
        lines += ["Parameters:", ""] + [f"- `{k}`: `{json.dumps(v)}`" for k, v in params.items()] + [""]
    inputs = provenance.get("inputs") or []
    if inputs:
        lines += ["Inputs:", "", "| input | sha256 |", "| --- | --- |"]
        lines += [f"| `{i.get('source')}` | `{i.get('sha256') or '-'}` |" for i in inputs] + [""]
    targets = config.get("target_modules")
    lines += [
        "## Configuration",
        "",
        f"- r: {config.get('r')}, lora_alpha: {config.get('lora_alpha')}, rsLoRA: {bool(config.get('use_rslora'))}",
        f"- target_modules: {targets if isinstance(targets, str) else ', '.join(targets or [])}",
        f"- rank_pattern: {len(config.get('rank_pattern') or {})} entries",
        "",
    ]
    return scrub("\n".join(front + lines))  # cards get published: nothing shaped like a token goes in
