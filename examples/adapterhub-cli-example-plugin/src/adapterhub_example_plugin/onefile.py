"""The ``onefile`` format: a whole PEFT adapter in one ``.safetensors`` file.

The tensors keep PEFT's names (``base_model.model.<module>.lora_A.weight`` ...) and ``adapter_config.json`` rides
in the file's metadata under ``adapter_config``, so one file is the whole adapter: handy for attachments, caches
and anything that moves single files. Reading it needs only the header (tensors load lazily).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from adapterhub_cli import Adapter, InvalidAdapterError, UsageError
from adapterhub_cli.artifact.provenance import PROVENANCE_KEY
from adapterhub_cli.artifact.safetensors import read_header, save_safetensors
from adapterhub_cli.formats.peft import assemble_adapter, peft_key


CONFIG_KEY = "adapter_config"


class OneFileFormat:
    """Read and write one-file PEFT adapters."""

    name = "onefile"
    description = "one .safetensors file: PEFT tensors with adapter_config.json in its metadata (example plugin)"

    def sniff(self, path: Path) -> bool:
        if not path.is_file() or path.suffix != ".safetensors":
            return False
        try:
            return CONFIG_KEY in read_header(path).metadata
        except Exception:  # not even a safetensors header: another format's business (or error)
            return False

    def read(self, path: Path) -> Adapter:
        header = read_header(path)
        try:
            config = json.loads(header.metadata[CONFIG_KEY])
        except (KeyError, json.JSONDecodeError) as e:
            raise InvalidAdapterError(f"no readable {CONFIG_KEY!r} in the metadata ({e})", path=path) from e
        return assemble_adapter(path, config, header=header, format_name=self.name)

    def write(
        self, adapter: Adapter, path: Path, *, overwrite: bool = False, provenance: dict[str, Any] | None = None
    ) -> Path:
        """Write ``adapter`` as one file at ``path`` (which must end in ``.safetensors``), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise UsageError(f"a onefile adapter is one .safetensors file; got {path}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
        modules = list(adapter.modules.values())
        names = {m.A.name: peft_key(m.name, "lora_A") for m in modules}
        names.update({m.B.name: peft_key(m.name, "lora_B") for m in modules})
        names.update({m.magnitude.name: peft_key(m.name, "lora_magnitude_vector") for m in modules if m.magnitude})
        names.update({k: f"base_model.model.{k}" for k in adapter.extra_tensors})
        tensors = {names[k]: v for k, v in adapter.source.load(list(names)).items()}
        metadata = {"format": "pt", CONFIG_KEY: json.dumps(adapter.config.raw, sort_keys=True)}
        if provenance is not None:
            metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".incomplete", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            save_safetensors(tensors, tmp, metadata)
            tmp.replace(path)  # atomic: readers see the old file or the complete new one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
