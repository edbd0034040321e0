"""The built-in formats, registered through ``adapters_register_formats`` like any plugin's.

PEFT, kohya and diffusers read and write; LyCORIS is read (to be recognised and refused or folded). Writing
is a rename plus one scalar per module: factors keep their bytes and dtypes, alpha stays its own number.
What one layout holds and the other cannot (kohya's alpha dtypes and ``ss_*`` / ``modelspec.*`` metadata,
PEFT's full config) travels in the output's metadata, so a round trip gives back the original names,
alphas, metadata and config while the factors are unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.formats.diffusers import DiffusersFormat, has_components, write_peft_components
from adapterhub_cli.formats.gguf import GgufFormat
from adapterhub_cli.formats.kohya import KOHYA_STASH_KEY, KohyaFormat, kohya_stash
from adapterhub_cli.formats.lycoris import LycorisFormat
from adapterhub_cli.formats.peft import PEFT_PREFIX, PeftFormat, peft_key, write_peft
from adapterhub_cli.plugins.hookspecs import hookimpl


class PeftWriter(PeftFormat):
    """The PEFT format, writing any adapter as a folder that ``PeftModel.from_pretrained`` loads.

    Its writer lives here rather than in ``peft.py`` because it carries a kohya file's names, alpha dtypes and
    metadata (the kohya stash) through PEFT, and ``kohya.py`` already builds on ``peft.py``."""

    def write(
        self, adapter: Adapter, path: Path, *, overwrite: bool = False, provenance: dict[str, Any] | None = None
    ) -> Path:
        if has_components(adapter):  # a diffusers file: one PEFT adapter per component, prefixes removed
            return write_peft_components(adapter, path, self.write, overwrite=overwrite, provenance=provenance)
        keys = [k for m in adapter.modules.values() for k in (m.A.name, m.B.name)]
        keys += [m.magnitude.name for m in adapter.modules.values() if m.magnitude is not None]
        keys += [m.bias.name for m in adapter.modules.values() if m.bias is not None]
        loaded = adapter.source.load(keys)
        tensors = {}
        for m in adapter.modules.values():
            tensors[peft_key(m.name, "lora_A")] = loaded[m.A.name]
            tensors[peft_key(m.name, "lora_B")] = loaded[m.B.name]
            if m.magnitude is not None:
                tensors[peft_key(m.name, "lora_magnitude_vector")] = loaded[m.magnitude.name]
            if m.bias is not None:  # lora_bias=True: PEFT saves lora_B's bias beside its weight
                tensors[f"{PEFT_PREFIX}{m.name}.lora_B.bias"] = loaded[m.bias.name]
        if adapter.extra_tensors:  # modules_to_save copies: stored names in, PEFT's names out
            extra = adapter.source.load([info.name for info in adapter.extra_tensors.values()])
            tensors.update({f"{PEFT_PREFIX}{key}": extra[info.name] for key, info in adapter.extra_tensors.items()})
        metadata: dict[str, str] = {}
        stash = kohya_stash(adapter)
        if stash is not None:
            metadata[KOHYA_STASH_KEY] = json.dumps(stash, sort_keys=True)
        elif KOHYA_STASH_KEY in adapter.metadata:
            metadata[KOHYA_STASH_KEY] = adapter.metadata[KOHYA_STASH_KEY]
        return write_peft(
            path,
            config=dict(adapter.config.raw),
            tensors=tensors,
            provenance=provenance or {},
            overwrite=overwrite,
            metadata=metadata,
        )


@hookimpl
def adapters_register_formats(register: Callable[[Any], None]) -> None:
    register(PeftWriter())
    register(KohyaFormat())
    register(DiffusersFormat())
    register(LycorisFormat())
    register(GgufFormat())
