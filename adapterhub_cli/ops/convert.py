"""Conversion between LoRA file layouts: PEFT folders, kohya sd-scripts files and diffusers LoRA files.

Conversion is a rename plus one scalar per module: factors keep their bytes and dtypes, alpha stays its own
number (never baked into the factors). What one layout holds and the other cannot (kohya's alpha dtype and
``ss_*`` / ``modelspec.*`` metadata; PEFT's full config) travels in the output's metadata, so a round trip
gives back the original names, alphas, metadata and config while the factors are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.errors import UsageError
from adapterhub_cli.formats.kohya import KOHYA_STASH_KEY, kohya_stash, write_kohya
from adapterhub_cli.formats.peft import peft_key, write_peft


TARGETS = ("peft", "kohya", "diffusers")


@dataclass
class ConvertResult:
    """The written adapter: where, in which format, how many modules, and what the reader warned about."""

    path: Path
    to: str
    source_format: str
    modules: int
    warnings: list[str] = field(default_factory=list)


def convert_adapter(
    adapter: Adapter, out: str | Path, *, to: str, base: str | Path | None = None, overwrite: bool = False
) -> ConvertResult:
    """Write ``adapter`` in the layout ``to`` at ``out``: a ``peft`` folder, a ``kohya`` ``.safetensors`` file, or a
    ``diffusers`` folder (``pytorch_lora_weights.safetensors``)."""
    if to not in TARGETS:
        raise UsageError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    out = Path(out)
    params: dict[str, Any] = {"to": to}
    if base is not None:
        params["base"] = str(base)
    prov = provenance("convert", params, [adapter])
    if to == "diffusers":
        from adapterhub_cli.formats.diffusers import write_diffusers

        write_diffusers(adapter, out, provenance=prov, overwrite=overwrite)
    elif to == "kohya":
        if out.suffix != ".safetensors":
            raise UsageError(f"a kohya LoRA is one .safetensors file; got -o {out}")
        write_kohya(adapter, out, base=base, overwrite=overwrite, provenance=prov)
    else:
        keys = [k for m in adapter.modules.values() for k in (m.A.name, m.B.name)]
        keys += [m.magnitude.name for m in adapter.modules.values() if m.magnitude is not None]
        loaded = adapter.source.load(keys)
        tensors = {}
        for m in adapter.modules.values():
            tensors[peft_key(m.name, "lora_A")] = loaded[m.A.name]
            tensors[peft_key(m.name, "lora_B")] = loaded[m.B.name]
            if m.magnitude is not None:
                tensors[peft_key(m.name, "lora_magnitude_vector")] = loaded[m.magnitude.name]
        if adapter.extra_tensors:
            extra = adapter.source.load(list(adapter.extra_tensors))
            tensors.update({f"base_model.model.{k}": v for k, v in extra.items()})
        metadata: dict[str, str] = {}
        stash = kohya_stash(adapter)
        if stash is not None:
            metadata[KOHYA_STASH_KEY] = json.dumps(stash, sort_keys=True)
        elif KOHYA_STASH_KEY in adapter.metadata:
            metadata[KOHYA_STASH_KEY] = adapter.metadata[KOHYA_STASH_KEY]
        write_peft(
            out,
            config=dict(adapter.config.raw),
            tensors=tensors,
            provenance=prov,
            overwrite=overwrite,
            metadata=metadata,
        )
    return ConvertResult(
        path=out, to=to, source_format=adapter.format, modules=len(adapter.modules), warnings=list(adapter.warnings)
    )
