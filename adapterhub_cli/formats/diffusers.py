"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` with ``<component>.<module>.lora_A|lora_B.weight``.

Components are ``unet``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, ``transformer``; module names
are the component's own, so no name mapping (and no base) is needed. There are no alpha tensors: r and alpha
live in the header key ``lora_adapter_metadata`` (each component's ``LoraConfig.to_dict()`` with its keys
prefixed, ``"unet.lora_alpha"``). Without it diffusers assumes alpha = r, and so do we, with a warning.
Our modules are named ``<component>.<module>``. The legacy layout (``...processor.to_q_lora.down.weight``,
``lora_linear_layer``) is refused.

To PEFT (:func:`split_components`, :func:`write_peft_components`): PEFT loads an adapter onto one model, so the
component prefix goes. A file holding one component gives one PEFT folder at ``OUT`` whose names are that
component's own (``PeftModel.from_pretrained(unet, OUT)``); a file holding several gives one PEFT folder per
component, ``OUT/unet``, ``OUT/text_encoder``, ``OUT/text_encoder_2``, ... (written together, atomically).
A kohya file read with a whole pipeline folder as base (its modules named ``unet.…``, ``text_encoder.…``) is split
the same way, each part keeping its share of the kohya names, alphas and metadata.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import TensorSource
from adapterhub_cli.artifact.config import AdapterConfig
from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.errors import InvalidAdapterError


if TYPE_CHECKING:
    import torch

    from adapterhub_cli.artifact.adapter import Adapter

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
_KEY = re.compile(
    r"^(?P<comp>unet|text_encoder|text_encoder_2|text_encoder_3|transformer)\.(?P<module>[\w.]+?)"
    r"\.(?P<part>lora_A|lora_B|lora_magnitude_vector)\.weight$"
)
_LEGACY = re.compile(r"(\.processor\.|_lora\.(down|up)\.|lora_linear_layer|\.lora\.(down|up)\.)")


def _weights_file(path: Path) -> Path | None:
    if path.is_dir():
        f = path / WEIGHTS_NAME
        return f if f.is_file() and not (path / "adapter_config.json").is_file() else None
    return path if path.is_file() and path.suffix == ".safetensors" else None


def component_of(module: str) -> tuple[str, str]:
    """(component, name inside it) for one of our module names; a bare name goes to the UNet, or to the text
    encoder when it starts with ``text_model.``."""
    first, _, rest = module.partition(".")
    if first in COMPONENTS and rest:
        return first, rest
    return ("text_encoder" if module.startswith("text_model.") else "unet"), module


class DiffusersFormat:
    """diffusers ``pytorch_lora_weights.safetensors`` (``save_lora_weights`` / ``load_lora_weights``)."""

    name = "diffusers"
    description = "diffusers LoRA file: pytorch_lora_weights.safetensors with unet./text_encoder. keys"

    def sniff(self, path: Path) -> bool:
        f = _weights_file(path)
        if f is None:
            return False
        try:
            keys = list(read_header(f).tensors)
        except InvalidAdapterError:
            return False
        if not keys or not all(k.split(".", 1)[0] in COMPONENTS for k in keys):
            return False
        return all(_KEY.match(k) for k in keys) or any(_LEGACY.search(k) for k in keys)

    def write(
        self, adapter: Adapter, path: Path, *, overwrite: bool = False, provenance: dict[str, Any] | None = None
    ) -> Path:
        """Write a folder with ``pytorch_lora_weights.safetensors``."""
        return write_diffusers(adapter, path, provenance=provenance, overwrite=overwrite)

    def read(self, path: Path) -> Adapter:
        from adapterhub_cli.formats.peft import assemble_adapter

        f = _weights_file(Path(path))
        if f is None:
            raise InvalidAdapterError(f"no {WEIGHTS_NAME} here", path=path)
        header = read_header(f)
        legacy = sorted(k for k in header.tensors if _LEGACY.search(k))
        if legacy:
            raise InvalidAdapterError(
                f"legacy diffusers attention-processor LoRA keys ({legacy[0]}, ...) are not supported",
                path=f,
                hint="load it in diffusers and save it again with save_lora_weights (PEFT layout)",
            )
        bad = sorted(k for k in header.tensors if not _KEY.match(k))
        if bad:
            raise InvalidAdapterError(f"keys that are not diffusers LoRA tensors: {', '.join(bad[:10])}", path=f)
        configs, warnings = _component_configs(f, header.metadata)
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        rslora: set[bool] = set()
        for key, info in header.tensors.items():
            m = _KEY.match(key)
            assert m is not None
            if m["part"] != "lora_A":
                continue
            comp, inner, name = m["comp"], m["module"], f"{m['comp']}.{m['module']}"
            rank = info.shape[0]
            ranks[name] = rank
            cfg = configs.get(comp)
            if cfg is None:
                alphas[name] = float(rank)
                rslora.add(False)
                continue
            if cfg.rank_for(inner) != rank:
                raise InvalidAdapterError(
                    f"{METADATA_KEY} gives {name} rank {cfg.rank_for(inner)} but its tensors have rank {rank}",
                    path=f,
                    module=name,
                )
            alphas[name] = float(cfg.alpha_for(inner))
            rslora.add(cfg.use_rslora)
        if len(rslora) > 1:
            raise InvalidAdapterError("components disagree on use_rslora; cannot be read as one adapter", path=f)
        missing = sorted({n.split(".", 1)[0] for n in ranks} - set(configs))
        if missing:
            warnings.append(
                f"no r / lora_alpha for {', '.join(missing)} in {METADATA_KEY}: alpha = r (scale 1) assumed, "
                "as diffusers does"
            )
        r, rank_pattern = _layout(ranks)
        lora_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
        doc: dict[str, Any] = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": lora_alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": {n: a for n, a in sorted(alphas.items()) if not _same(a, lora_alpha)},
            "target_modules": sorted(ranks),
            "use_rslora": rslora == {True},
            "use_dora": any(cfg.use_dora for cfg in configs.values()),
        }
        adapter = assemble_adapter(f, doc, header=header, format_name=self.name)
        adapter.path = Path(path)
        adapter.warnings += warnings
        for mod in adapter.modules.values():
            if not _same(mod.alpha, alphas[mod.name]):
                raise InvalidAdapterError(f"internal: alpha of {mod.name} does not resolve", path=f, module=mod.name)
        return adapter


def _same(a: float, b: float) -> bool:
    """Equal alphas, NaN included (a NaN alpha is kept for ``validate`` to report and writers to refuse)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def _layout(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    from adapterhub_cli.formats.peft import rank_layout

    return rank_layout(ranks)


def _component_configs(path: Path, metadata: dict[str, str]) -> tuple[dict[str, AdapterConfig], list[str]]:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}, []
    packed = parse_json(raw.encode(), path=path, what=f"{METADATA_KEY} metadata")
    if not isinstance(packed, dict):
        raise InvalidAdapterError(f"{METADATA_KEY} is not a JSON object", path=path)
    docs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        comp, _, field = str(key).partition(".")
        if comp in COMPONENTS and field:
            docs.setdefault(comp, {})[field] = value
    for d in docs.values():  # diffusers writes LoraConfig.to_dict(); a hand-made entry may leave the type out
        d.setdefault("peft_type", "LORA")
    return {c: AdapterConfig.from_dict(d, path=path) for c, d in docs.items()}, []


def write_diffusers(
    adapter: Adapter, out: str | Path, *, provenance: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write ``adapter`` as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``), atomically.

    Factors keep their bytes and dtypes; per component, r, lora_alpha, rank_pattern and alpha_pattern go to
    ``lora_adapter_metadata`` so ``load_lora_weights`` gives every module its own scale.
    """
    from adapterhub_cli.artifact.files import atomic_dir
    from adapterhub_cli.artifact.provenance import PROVENANCE_KEY
    from adapterhub_cli.artifact.safetensors import save_safetensors
    from adapterhub_cli.formats.kohya import check_convertible, diffusion_warnings
    from adapterhub_cli.formats.peft import rank_layout

    check_convertible(adapter, "diffusers")
    adapter.warnings += [w for w in diffusion_warnings(adapter, "diffusers") if w not in adapter.warnings]
    keys = [k for m in adapter.modules.values() for k in (m.A.name, m.B.name)]
    loaded = adapter.source.load(keys)
    tensors = {}
    per_comp: dict[str, dict[str, tuple[int, float]]] = {}
    for m in adapter.modules.values():
        comp, inner = component_of(m.name)
        tensors[f"{comp}.{inner}.lora_A.weight"] = loaded[m.A.name]
        tensors[f"{comp}.{inner}.lora_B.weight"] = loaded[m.B.name]
        per_comp.setdefault(comp, {})[inner] = (m.rank, m.alpha)
    packed: dict[str, Any] = {}
    for comp, mods in sorted(per_comp.items()):
        r, rank_pattern = rank_layout({n: rk for n, (rk, _) in mods.items()})
        alpha = Counter(a for _, a in mods.values()).most_common(1)[0][0]
        doc: dict[str, Any] = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": {n: a for n, (_, a) in sorted(mods.items()) if a != alpha},
            "target_modules": sorted(mods),
            "use_rslora": adapter.config.use_rslora,
            "use_dora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
        }
        check = AdapterConfig.from_dict(doc)
        for n, (rk, a) in mods.items():
            if check.rank_for(n) != rk or check.alpha_for(n) != a or not math.isfinite(a):
                raise InvalidAdapterError(f"internal: {comp}.{n} would not resolve to rank {rk}, alpha {a}")
        packed.update({f"{comp}.{k}": v for k, v in doc.items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata)
    return out


# ------------------------------------------------------------------------------------------------ to PEFT


def has_components(adapter: Adapter) -> bool:
    """True for an adapter of a whole pipeline: read from a diffusers file, or from a kohya file with a pipeline
    folder as ``--base`` (``unet/``, ``text_encoder/``); every module name starts with its component."""
    return adapter.format in (DiffusersFormat.name, "kohya") and all(
        n.partition(".")[0] in COMPONENTS and n.partition(".")[2] for n in adapter.modules
    )


def pipeline_output_warnings(adapters: list[Adapter], out: str | Path) -> list[str]:
    """What to tell the user when an operation on whole-pipeline adapters (:func:`has_components`) writes one PEFT
    folder ``out``: its modules carry their components' prefixes (``unet.``, ``text_encoder.``), so PEFT loads it on
    no single model; converting it gives a file diffusers loads, or each component's adapter can be used alone."""
    if not adapters or not all(has_components(a) for a in adapters):
        return []
    comps = sorted({component_of(n)[0] for a in adapters for n in a.modules})
    return [
        f"{out} holds the modules of the pipeline's {', '.join(comps)} under one PEFT config, named with their "
        "component: PEFT loads it on no single model; `adapters convert "
        f"{out} --to diffusers` (or `--to kohya`) gives a file diffusers loads, and `adapters "
        "convert FILE --to peft --base PIPELINE` writes one PEFT adapter per component to run this on"
    ]


def split_components(adapter: Adapter) -> dict[str, Adapter]:
    """One adapter per component (``unet``, ``text_encoder``, ...), its modules named as in that component alone
    (``unet.down_blocks.0...`` -> ``down_blocks.0...``), so that PEFT matches them on that model. Factors are
    the same tensors (renamed on load); each module keeps its rank and alpha."""
    from adapterhub_cli.artifact.adapter import Adapter
    from adapterhub_cli.formats.peft import rank_layout

    groups: dict[str, dict[str, Any]] = {}
    for name, m in adapter.modules.items():
        comp, inner = component_of(name)
        groups.setdefault(comp, {})[inner] = m
    parts: dict[str, Adapter] = {}
    for comp, mods in sorted(groups.items()):
        rename: dict[str, str] = {}
        modules = {}
        for inner, m in sorted(mods.items()):
            fields = {}
            for attr, part in (("A", "lora_A"), ("B", "lora_B"), ("magnitude", "lora_magnitude_vector")):
                info = getattr(m, attr)
                if info is not None:
                    key = f"{inner}.{part}.weight"
                    rename[key] = info.name
                    fields[attr] = replace(info, name=key)
            modules[inner] = replace(m, name=inner, **fields)
        r, rank_pattern = rank_layout({n: m.rank for n, m in modules.items()})
        alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
        doc: dict[str, Any] = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": {n: m.alpha for n, m in modules.items() if not _same(m.alpha, alpha)},
            "target_modules": sorted(modules),
            "use_rslora": adapter.config.use_rslora,
            "use_dora": any(m.magnitude is not None for m in modules.values()),
            "lora_dropout": 0.0,
            "bias": "none",
        }
        config = AdapterConfig.from_dict(doc, path=adapter.path)
        for n, m in modules.items():
            if config.rank_for(n) != m.rank or not _same(float(config.alpha_for(n)), m.alpha):
                raise InvalidAdapterError(f"internal: {comp}.{n} would not resolve to its rank and alpha")
        parts[comp] = Adapter(
            path=adapter.path,
            format=adapter.format,
            config=config,
            modules=modules,
            extra_tensors={},
            source=_RenamedSource(adapter.source, rename),
            warnings=list(adapter.warnings),
            provenance=adapter.provenance,
        )
    _split_kohya_stash(adapter, parts)
    return parts


def _split_kohya_stash(adapter: Adapter, parts: dict[str, Adapter]) -> None:
    """A kohya file split by component: each part carries its share of the file's names, alpha tensors and
    metadata (the kohya stash, keyed by the part's own module names), so ``convert OUT/unet --to kohya`` gives
    back that component's keys and alphas verbatim."""
    from adapterhub_cli.formats.kohya import KOHYA_STASH_KEY, adapter_digest, kohya_stash

    stash = kohya_stash(adapter)
    if stash is None:
        return
    for comp, part in parts.items():
        prefix = comp + "."
        sub = {
            "names": {m[len(prefix) :]: n for m, n in stash["names"].items() if m.startswith(prefix)},
            "alphas": {m[len(prefix) :]: a for m, a in stash["alphas"].items() if m.startswith(prefix)},
            "metadata": stash["metadata"],
            "digest": adapter_digest(part),
        }
        part.metadata = {KOHYA_STASH_KEY: json.dumps(sub, sort_keys=True)}


class _RenamedSource(TensorSource):
    """Loads factors by new keys from another source (a component's adapter over the whole file's source)."""

    def __init__(self, inner: TensorSource, rename: dict[str, str]) -> None:
        super().__init__(header=inner.header)
        self.inner = inner
        self.rename = rename

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        raw = self.inner.load([self.rename.get(k, k) for k in keys])
        return {k: raw[self.rename.get(k, k)] for k in keys}


def write_peft_components(
    adapter: Adapter,
    out: str | Path,
    write_one: Callable[..., Path],
    *,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a diffusers-read adapter as PEFT: ``out`` itself for one component, ``out/<component>`` for each of
    several (one atomic folder). ``write_one(adapter, path, overwrite=..., provenance=...)`` writes one PEFT
    folder (the PEFT format's writer)."""
    from adapterhub_cli.artifact.files import atomic_dir

    parts = split_components(adapter)
    out = Path(out)
    if len(parts) == 1:
        return write_one(next(iter(parts.values())), out, overwrite=overwrite, provenance=provenance)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for comp, part in parts.items():
            write_one(part, tmp / comp, provenance=provenance)
    return out
