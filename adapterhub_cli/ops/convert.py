"""Conversion between LoRA file layouts: any registered format that can write (PEFT folders, kohya sd-scripts
files, diffusers LoRA files, and those plugins add).

The writing is the target format's ``write`` (see :mod:`adapterhub_cli.formats.builtin` for the built-ins);
this module resolves the target, records provenance and reports what was written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter, TensorSource
from adapterhub_cli.artifact.config import AdapterConfig
from adapterhub_cli.artifact.preflight import require_no_overflow, require_valid
from adapterhub_cli.artifact.provenance import provenance
from adapterhub_cli.errors import UsageError
from adapterhub_cli.formats import get_writer, write_adapter


if TYPE_CHECKING:
    import torch


@dataclass
class ConvertResult:
    """The written adapter: where, in which format, how many modules, and what the reader warned about."""

    path: Path
    to: str
    source_format: str
    modules: int
    warnings: list[str] = field(default_factory=list)


def convert_adapter(
    adapter: Adapter,
    out: str | Path,
    *,
    to: str,
    base: str | Path | None = None,
    overwrite: bool = False,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
) -> ConvertResult:
    """Write ``adapter`` at ``out`` in the registered format ``to`` (e.g. a ``peft`` folder, a ``kohya``
    ``.safetensors`` file, a ``diffusers`` folder with ``pytorch_lora_weights.safetensors``), its module names
    rewritten first with ``strip_prefix`` / ``add_prefix`` (:func:`rename_modules`) when given.

    Raises:
        UnknownFormatError: ``to`` is not a registered format that can write; the message lists those that can.
        UsageError: a prefix that cannot be removed or added (see :func:`rename_modules`).
    """
    fmt = get_writer(to)
    require_valid(adapter, check_weights=False)  # ranks and scales (NaN alpha); writers refuse NaN tensors
    require_no_overflow(adapter)  # (validate's update-overflow: the converted file would keep it)
    out = Path(out)
    params: dict[str, Any] = {"to": to}
    if base is not None:
        params["base"] = str(base)
    if strip_prefix is not None or add_prefix is not None:
        adapter = rename_modules(adapter, strip_prefix=strip_prefix, add_prefix=add_prefix)
        params.update({k: v for k, v in (("strip_prefix", strip_prefix), ("add_prefix", add_prefix)) if v})
    prov = provenance("convert", params, [adapter])
    written = write_adapter(fmt, adapter, out, base=base, overwrite=overwrite, provenance=prov)
    return ConvertResult(
        path=written,
        to=to,
        source_format=adapter.format,
        modules=len(adapter.modules),
        warnings=list(adapter.warnings),
    )


def _dotted(prefix: str, what: str) -> str:
    """``foo`` or ``foo.`` -> ``foo.``; refuses an empty prefix or one with empty segments."""
    dotted = prefix if prefix.endswith(".") else prefix + "."
    if not prefix or any(part == "" for part in dotted[:-1].split(".")) or not dotted.isprintable():
        raise UsageError(f"{what} {prefix!r} is not a module path prefix", hint="give one like `unet.` or `model.`")
    return dotted


class _RenamedSource(TensorSource):
    """The tensors of another source, some asked for by new names."""

    def __init__(self, inner: TensorSource, renamed: dict[str, str]) -> None:
        super().__init__(inner.header)
        self.inner = inner
        self.renamed = renamed

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        old = [self.renamed.get(k, k) for k in keys]
        loaded = self.inner.load(old)
        return {k: loaded[o] for k, o in zip(keys, old, strict=True)}


def rename_modules(adapter: Adapter, *, strip_prefix: str | None = None, add_prefix: str | None = None) -> Adapter:
    """The same adapter with every module name (and saved tensor name) rewritten: ``strip_prefix`` removed from
    its start, then ``add_prefix`` put before it (``unet.down.0.to_q`` -> ``down.0.to_q`` with
    ``strip_prefix="unet."``). For an adapter whose names carry a leading path the base model does not have
    (``validate`` names it), so that PEFT matches and applies them.

    The config follows: ``target_modules`` / ``modules_to_save`` entries and ``rank_pattern`` / ``alpha_pattern``
    keys that start with the removed prefix lose it, and a ``target_modules`` that no longer selects every module
    (a regex written for the old names) becomes the list of the new names. The factors are unchanged.

    Raises:
        UsageError: no prefix given, a prefix that is not a dotted module path, a module whose name does not start
            with ``strip_prefix`` (or would be left empty), or a scale the rewritten config would change.
    """
    if strip_prefix is None and add_prefix is None:
        raise UsageError("give a prefix to remove or to add")
    strip = _dotted(strip_prefix, "--strip-prefix") if strip_prefix is not None else ""
    add = _dotted(add_prefix, "--add-prefix") if add_prefix is not None else ""

    def new_name(name: str) -> str:
        return add + name[len(strip) :]

    for name in adapter.modules:
        if not name.startswith(strip) or name == strip[:-1] or len(name) <= len(strip):
            raise UsageError(
                f"{adapter.path}: module {name} does not start with {strip!r}: nothing to remove",
                hint="`adapters validate ADAPTER --base BASE` names the prefix that makes the names match",
            )
    extra_names = {n: (new_name(n) if n.startswith(strip) else n) for n in adapter.extra_tensors}

    def entry(value: str) -> str:
        return value[len(strip) :] if strip and value.startswith(strip) else value

    raw = dict(adapter.config.raw)
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        raw["target_modules"] = sorted({entry(t) for t in targets if isinstance(t, str)})
    if isinstance(raw.get("modules_to_save"), list):
        raw["modules_to_save"] = [entry(m) if isinstance(m, str) else m for m in raw["modules_to_save"]]
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(raw.get(key), dict):
            raw[key] = {entry(k): v for k, v in raw[key].items()}
    config = AdapterConfig.from_dict(raw, path=adapter.path)
    new_names = [new_name(n) for n in adapter.modules]
    if not all(config.targets(n) for n in new_names):
        raw["target_modules"] = sorted(new_names)
        config = AdapterConfig.from_dict(raw, path=adapter.path)
    modules = {}
    for m in adapter.modules.values():
        name = new_name(m.name)
        scale = config.scale_for(name, m.rank)
        if not (scale == m.scale or (math.isnan(scale) and math.isnan(m.scale))):
            raise UsageError(
                f"{adapter.path}: module {m.name}: its rank_pattern / alpha_pattern entry would not apply to "
                f"{name} (scale {m.scale:g} would become {scale:g})",
                hint="rewrite the pattern keys in adapter_config.json by hand",
            )
        modules[name] = dataclasses.replace(m, name=name, alpha=config.alpha_for(name), scale=scale)
    metadata = {k: v for k, v in adapter.metadata.items() if k != "adapterhub.kohya"}
    return dataclasses.replace(
        adapter,
        config=config,
        modules=modules,
        extra_tensors={extra_names[n]: info for n, info in adapter.extra_tensors.items()},
        source=_RenamedSource(adapter.source, {new: old for old, new in extra_names.items() if new != old}),
        metadata=metadata,
    )
