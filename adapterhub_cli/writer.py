"""Writing adapters in PEFT's layout, atomically, with provenance in the safetensors metadata and a model card."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.card import model_card
from adapterhub_cli.formats.peft import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from adapterhub_cli.io import atomic_dir, save_safetensors, sha256_file


if TYPE_CHECKING:
    import torch

    from adapterhub_cli.artifact import Adapter

PROVENANCE_KEY = "adapterhub.provenance"


def tool_version() -> str:
    from adapterhub_cli import __version__

    return f"adapterhub-cli {__version__}"


def input_record(adapter: Adapter) -> dict[str, str | None]:
    """What an output's provenance says about one input: where it came from and the sha256 of its tensors."""
    f = adapter.tensor_file
    return {"source": str(adapter.path), "sha256": sha256_file(f) if f is not None else None}


def provenance(operation: str, parameters: dict[str, Any], inputs: list[Adapter]) -> dict[str, Any]:
    return {
        "tool": tool_version(),
        "operation": operation,
        "parameters": parameters,
        "inputs": [input_record(a) for a in inputs],
    }


def rank_layout(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """PEFT's (r, rank_pattern) for per-module ranks: the most common rank as r, the others by full module name."""
    if not ranks:
        return 1, {}
    r = Counter(ranks.values()).most_common(1)[0][0]
    return r, {name: k for name, k in sorted(ranks.items()) if k != r}


def peft_key(module: str, part: str) -> str:
    """The stored key of one factor: ``base_model.model.<module>.lora_A.weight`` and the like."""
    suffix = "" if part == "lora_magnitude_vector" else ".weight"
    return f"{PEFT_PREFIX}{module}.{part}{suffix}"


def write_peft(
    out: str | Path,
    *,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    provenance: dict[str, Any],
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` into ``out``, atomically.

    Args:
        config: the full PEFT config (loads in ``PeftConfig.from_pretrained``).
        tensors: stored keys (``base_model.model.<module>.lora_A.weight`` ...) to tensors.
        provenance: operation, parameters, inputs; stored as JSON in the safetensors metadata.
        metadata: further safetensors metadata (e.g. the quantization description).
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        meta = {"format": "pt", PROVENANCE_KEY: json.dumps(provenance, sort_keys=True), **(metadata or {})}
        save_safetensors(tensors, tmp / WEIGHTS_NAME, meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(config, provenance))
    return out


def read_provenance(adapter: Adapter) -> dict[str, Any] | None:
    """The provenance an adapter written by this tool carries, or None."""
    raw = adapter.metadata.get(PROVENANCE_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
