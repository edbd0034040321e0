"""PEFT's layout: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or a bare file).

Stored keys look like ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, with
``.lora_magnitude_vector`` for DoRA and ``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings;
any other key is a saved copy of a base tensor (modules_to_save, biases).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter, LoraModule, TensorSource
from adapterhub_cli.artifact.card import model_card
from adapterhub_cli.artifact.checkpoint import CARD_FILE
from adapterhub_cli.artifact.config import AdapterConfig, check_peft_type
from adapterhub_cli.artifact.files import atomic_dir, load_pickle_safely, read_json
from adapterhub_cli.artifact.provenance import PROVENANCE_KEY, Provenance
from adapterhub_cli.artifact.safetensors import (
    FLOAT_DTYPES,
    SafetensorsHeader,
    TensorInfo,
    dtype_name,
    read_header,
    save_safetensors,
)
from adapterhub_cli.errors import AdapterNotFoundError, InvalidAdapterError


if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)(?P<adapter_name>[^.]+))?(?:\.(?P<suffix>weight|bias))?$"
)


class PeftFormat:
    """The PEFT adapter layout (the default format)."""

    name = "peft"
    description = "PEFT folder: adapter_config.json + adapter_model.safetensors (or a bare .safetensors file)"

    def sniff(self, path: Path) -> bool:
        if path.is_dir():
            return (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file()
        if path.suffix == ".safetensors" and path.is_file():
            try:
                return any(_LORA_KEY.match(k) for k in read_header(path).tensors)
            except InvalidAdapterError:
                return True  # ours to report: the error message is more useful than "unknown format"
        if path.suffix == ".bin" and path.is_file():
            return True  # a legacy pickle: read() refuses it without allow_pickle, or loads it safely
        return False

    def read(self, path: Path, *, allow_pickle: bool = False) -> Adapter:
        """Read a PEFT adapter folder or a bare adapter ``.safetensors`` file (headers only)."""
        if not path.exists():
            raise AdapterNotFoundError(path)
        if path.is_dir():
            config_path = path / CONFIG_NAME
            if not config_path.is_file():
                raise InvalidAdapterError(
                    f"no {CONFIG_NAME} in this folder",
                    path=path,
                    hint="point at a PEFT adapter folder (saved with save_pretrained)",
                )
            weights = path / WEIGHTS_NAME
            if not weights.is_file():
                legacy = path / LEGACY_WEIGHTS_NAME
                if legacy.is_file() and allow_pickle:
                    return self._assemble(path, read_json(config_path, CONFIG_NAME), None, load_pickle_safely(legacy))
                if legacy.is_file():
                    raise InvalidAdapterError(
                        f"only a legacy pickle {LEGACY_WEIGHTS_NAME} is here",
                        path=path,
                        hint="pass --allow-pickle (loaded with torch.load(weights_only=True)) or convert it",
                    )
                raise InvalidAdapterError(f"no {WEIGHTS_NAME} in this folder", path=path)
            return self._assemble(path, read_json(config_path, CONFIG_NAME), read_header(weights), None)
        sibling = path.parent / CONFIG_NAME
        doc = read_json(sibling, CONFIG_NAME) if sibling.is_file() else None
        if path.suffix == ".bin":
            if not allow_pickle:
                raise InvalidAdapterError(
                    "legacy pickle file", path=path, hint="pass --allow-pickle to load it safely"
                )
            return self._assemble(path, doc, None, load_pickle_safely(path))
        return self._assemble(path, doc, read_header(path), None)

    def _assemble(
        self, path: Path, doc: dict | None, header: SafetensorsHeader | None, tensors: dict[str, torch.Tensor] | None
    ) -> Adapter:
        if doc is not None:
            check_peft_type(doc, path)  # a config file without peft_type does not load in PEFT
        return assemble_adapter(path, doc, header=header, tensors=tensors, format_name=self.name)


def assemble_adapter(
    path: Path,
    doc: dict | None,
    *,
    header: SafetensorsHeader | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    format_name: str = "peft",
) -> Adapter:
    """Build an :class:`Adapter` from a PEFT config dict and PEFT-named tensors (a checked header or a state dict).

    Format plugins that read other layouts rename their keys to PEFT's (``<module>.lora_A.weight`` ...) and
    call this, so every format shares one notion of modules, ranks and scales. ``doc=None`` infers the config
    from the tensors (rank from the shapes, lora_alpha from the metadata or equal to r).
    """
    from adapterhub_cli.formats.quantized import QuantizedTensorSource, logical_infos, quantization_of

    quantization = quantization_of(header) if header is not None else None
    if header is not None:
        infos = logical_infos(header, quantization) if quantization else header.tensors
    else:
        infos = _infos_from_tensors(tensors or {})
    parts, extra, prefix = _split_keys(path, infos)
    warnings: list[str] = []
    inferred = doc is None
    if doc is None:
        doc = _infer_config(parts, header.metadata if header else {})
        warnings.append(
            f"no {CONFIG_NAME}: r and targets inferred from the tensors, lora_alpha "
            f"{doc['lora_alpha']} assumed (scale {doc['lora_alpha'] / doc['r']:g})"
        )
    config = AdapterConfig.from_dict(doc, path=path)
    if not inferred and "r" not in doc:
        warnings.append(
            f"{CONFIG_NAME} has no r: PEFT takes its default r=8 (and lora_alpha {config.lora_alpha:g}); validate "
            "reports modules whose tensors have another rank"
        )
    old_keys = [k for k in ("enable_lora", "merge_weights") if doc.get(k) is not None]
    if old_keys:
        warnings.append(f"{', '.join(old_keys)}: keys of an old PEFT release, ignored (as today's PEFT ignores them)")
    if doc.get("megatron_config") is not None:
        warnings.append(
            "megatron_config: trained on a Megatron-core model (tensor-parallel layers); check it against that "
            "model's module names"
        )
    if config.unknown_keys:
        warnings.append(
            "config keys unknown to this PEFT version (written by a newer PEFT?), ignored: "
            + ", ".join(config.unknown_keys)
        )
    modules = {name: _module(path, name, p, config) for name, p in sorted(parts.items())}
    if not modules:
        raise InvalidAdapterError("no LoRA tensors (lora_A / lora_B) found", path=path)
    source: TensorSource
    if quantization is not None and header is not None:
        source = QuantizedTensorSource(header, quantization)
    else:
        source = TensorSource(header=header, tensors=tensors)
    return Adapter(
        path=path,
        format=format_name,
        config=config,
        modules=modules,
        extra_tensors=extra,
        source=source,
        key_prefix=prefix,
        metadata=dict(header.metadata) if header else {},
        warnings=warnings,
        provenance=Provenance.from_metadata(dict(header.metadata) if header else {}, source=str(path)),
        config_inferred=inferred,
    )


def _infos_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {
        k: TensorInfo(
            name=k,
            dtype=dtype_name(v.dtype),
            shape=tuple(v.shape),
            start=0,
            end=v.numel() * v.element_size(),
        )
        for k, v in tensors.items()
    }


def _split_keys(
    path: Path, infos: dict[str, TensorInfo]
) -> tuple[dict[str, dict[str, TensorInfo]], dict[str, TensorInfo], str]:
    """Group stored keys into {module: {part: info}} and the other tensors; strip PEFT's key prefix."""
    prefix = PEFT_PREFIX if infos and all(k.startswith(PEFT_PREFIX) for k in infos) else ""
    parts: dict[str, dict[str, TensorInfo]] = {}
    extra: dict[str, TensorInfo] = {}
    for key, info in infos.items():
        name = key[len(prefix) :]
        m = _LORA_KEY.match(name)
        if m is None:
            extra[name] = info
            continue
        part = m["part"].replace("lora_embedding_", "lora_")
        if m["suffix"] == "bias":  # lora_bias=True: PEFT's lora_B is an nn.Linear with a bias
            if part != "lora_B":
                raise InvalidAdapterError(
                    f"module {m['module']!r} stores a bias of {m['part']}; PEFT gives only lora_B a bias "
                    "(lora_bias=True)",
                    path=path,
                    module=m["module"],
                )
            part = "lora_B_bias"
        slot = parts.setdefault(m["module"], {})
        if part in slot:
            raise InvalidAdapterError(
                f"module {m['module']!r} stores {part} twice (several adapter names?)", path=path, module=m["module"]
            )
        slot[part] = info
        if "embedding" in m["part"]:
            slot["embedding"] = info
    return parts, extra, prefix


def _module(path: Path, name: str, p: dict[str, TensorInfo], config: AdapterConfig) -> LoraModule:
    a, b = p.get("lora_A"), p.get("lora_B")
    if a is None or b is None:
        have, miss = ("lora_A", "lora_B") if b is None else ("lora_B", "lora_A")
        raise InvalidAdapterError(
            f"module {name!r} has {have} but no {miss}",
            path=path,
            module=name,
            hint="the file is incomplete or was written by a broken tool",
        )
    if len(a.shape) < 2 or len(b.shape) < 2 or a.shape[0] != b.shape[1]:
        raise InvalidAdapterError(
            f"module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit (A must be (r, d_in), "
            "B (d_out, r))",
            path=path,
            module=name,
        )
    _check_factors(path, name, p)
    kind = "embedding" if "embedding" in p else ("conv" if len(a.shape) == 4 else "linear")
    rank = a.shape[0]
    d_in = 1
    for d in a.shape[1:]:
        d_in *= d
    return LoraModule(
        name=name,
        kind=kind,
        rank=rank,
        d_out=b.shape[0],
        d_in=d_in,
        alpha=config.alpha_for(name),
        scale=config.scale_for(name, rank),
        A=a,
        B=b,
        magnitude=p.get("lora_magnitude_vector"),
        bias=p.get("lora_B_bias"),
    )


def _check_factors(path: Path, name: str, p: dict[str, TensorInfo]) -> None:
    """Refuse factors no LoRA has: rank 0 (PEFT refuses ``r=0``), an empty dimension, integer storage."""
    a, b = p["lora_A"], p["lora_B"]
    if a.shape[0] == 0:
        raise InvalidAdapterError(
            f"module {name!r} has rank 0 (lora_A {list(a.shape)}): PEFT refuses r=0",
            path=path,
            module=name,
            hint="the file is damaged or was written by a broken tool; drop the module or re-save the adapter",
        )
    bias = p.get("lora_B_bias")
    if bias is not None and tuple(bias.shape) != (b.shape[0],):
        raise InvalidAdapterError(
            f"module {name!r}: lora_B.bias {list(bias.shape)} does not fit lora_B {list(b.shape)} (it must be "
            f"[{b.shape[0]}])",
            path=path,
            module=name,
        )
    for part, info in (
        ("lora_A", a),
        ("lora_B", b),
        ("lora_magnitude_vector", p.get("lora_magnitude_vector")),
        ("lora_B.bias", bias),
    ):
        if info is None:
            continue
        if 0 in info.shape:
            raise InvalidAdapterError(
                f"module {name!r}: {part} {list(info.shape)} has an empty dimension", path=path, module=name
            )
        if info.dtype not in FLOAT_DTYPES:
            raise InvalidAdapterError(
                f"module {name!r}: {part} is stored as {info.dtype}; LoRA factors are floating point",
                path=path,
                module=name,
                hint="the file is damaged or was written by a broken tool; re-save the adapter with PEFT",
            )


def _infer_config(parts: dict[str, dict[str, TensorInfo]], metadata: dict[str, str]) -> dict:
    ranks = Counter(p["lora_A"].shape[0] for p in parts.values() if "lora_A" in p)
    r = ranks.most_common(1)[0][0] if ranks else 8
    rank_pattern = {
        name: p["lora_A"].shape[0] for name, p in parts.items() if "lora_A" in p and p["lora_A"].shape[0] != r
    }
    alpha: float = r
    for key in ("lora_alpha", "ss_network_alpha"):
        try:
            alpha = float(metadata[key])
            break
        except (KeyError, ValueError):
            continue
    targets = sorted({name.rsplit(".", 1)[-1] for name in parts})
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "use_dora": any("lora_magnitude_vector" in p for p in parts.values()),
    }


def rank_layout(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """PEFT's (r, rank_pattern) for per-module ranks: the most common rank as r, the others by full module name."""
    if not ranks:
        return 1, {}
    r = Counter(ranks.values()).most_common(1)[0][0]
    return r, {name: k for name, k in sorted(ranks.items()) if k != r}


def peft_key(module: str, part: str) -> str:
    """The stored key of one factor: ``base_model.model.<module>.lora_A.weight`` and the like (``lora_B.bias``:
    the bias of ``lora_bias=True``)."""
    suffix = "" if part in ("lora_magnitude_vector", "lora_B.bias") else ".weight"
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
        try:
            text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
        except ValueError:  # the last line of defence: callers check scales before writing
            raise InvalidAdapterError("refused to write a config holding NaN or inf", path=out) from None
        (tmp / CONFIG_NAME).write_text(text + "\n")
        (tmp / CARD_FILE).write_text(model_card(config, provenance))
    return out
