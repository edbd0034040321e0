"""kohya sd-scripts LoRA files: one ``.safetensors`` with ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

``<name>`` is ``prefix + "_" + module_path.replace(".", "_")`` (prefixes ``lora_unet``, ``lora_te``, ``lora_te1``,
``lora_te2``, ...). Underscores also occur inside module names (``to_q``, ``down_blocks``), so the dots cannot be
guessed back: module names come from a table built from the base checkpoint's own tensor names and checked by
shape (:class:`NameMap`), or from the ``{kohya name: module}`` map this tool stores in files it writes. A key
that maps to nothing, or to two modules, is an error listing the keys; nothing is skipped. A stored map that names
a module twice, or by anything but a dotted name of letters, digits and underscores, is refused like one that is
not JSON.

The base is given as ``read(path, base=...)`` (``ah.load(path, base=...)``, ``adapters convert --base``) or, for
every command, through the ``ADAPTERS_BASE`` environment variable. It may be a diffusers pipeline folder
(``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``transformer/``), one component's folder or
``.safetensors`` file, or a single-file checkpoint with ldm / sgm names (``model.diffusion_model.``,
``cond_stage_model.transformer.``, ``conditioner.embedders.0.transformer.``). SDXL's sgm names
(``input_blocks_4_1_...``) also map onto a diffusers UNet through ``layers_per_block`` in its ``config.json``.

Alpha rules: a missing alpha means alpha = rank (scale 1), as in sd-scripts, ComfyUI and diffusers; alpha 0 is
read as alpha = rank, as sd-scripts' trainer (``LoRAModule``) uses it (its merge script and ComfyUI give scale 0
instead); both are reported as warnings. Alpha keeps its exact value whatever its dtype (fp16, bf16, int64).
The alpha tensors are what counts, as for every kohya loader: the PEFT config this tool stores in files it writes
(its digest covers the factors only) is used only where each module's alpha tensor says the same; otherwise it is
ignored with a warning and the file is read and checked like one without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter, TensorSource
from adapterhub_cli.artifact.checkpoint import CONFIG_FILE, find_layout, open_base
from adapterhub_cli.artifact.files import atomic_file, read_json
from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.safetensors import (
    SafetensorsHeader,
    TensorInfo,
    dtype_name,
    load_safetensors,
    read_header,
    torch_dtype,
)
from adapterhub_cli.errors import CorruptFileError, InvalidAdapterError, UsageError
from adapterhub_cli.formats.lycoris import detect_lycoris, refuse_lycoris


if TYPE_CHECKING:
    import torch

BASE_ENV = "ADAPTERS_BASE"
NAMES_KEY = "adapterhub.kohya_names"  # {kohya name: module}, written by us so the file reads back without a base
PEFT_STASH_KEY = "adapterhub.peft_config"  # {"config": PEFT config, "digest": factor digest}
KOHYA_STASH_KEY = "adapterhub.kohya"  # in PEFT output: what a kohya file had beyond the factors

PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lora_transformer")
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_KEY = re.compile(r"^(?P<name>(?:lora|lycoris)_\w+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_TUCKER_KEY = re.compile(r"^(?P<name>(?:lora|lycoris)_\w+)\.(?P<part>lora_mid\.weight)$")
_LOHA_KEY = re.compile(r"^(?P<name>(?:lora|lycoris)_\w+)\.(?P<part>hada_w[12]_[ab])$")
_LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

# pipeline subfolder -> (kohya prefixes it answers to, is a text encoder)
PIPELINE_COMPONENTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "unet": (("lora_unet",), False),
    "transformer": (("lora_unet", "lora_transformer"), False),
    "text_encoder": (("lora_te", "lora_te1"), True),
    "text_encoder_2": (("lora_te2",), True),
    "text_encoder_3": (("lora_te3",), True),
}
# single-file (ldm / sgm) checkpoint prefixes -> kohya prefixes
SINGLE_FILE_PREFIXES: dict[str, tuple[str, ...]] = {
    "model.diffusion_model.": ("lora_unet",),
    "cond_stage_model.transformer.": ("lora_te",),
    "conditioner.embedders.0.transformer.": ("lora_te1",),
}
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def split_prefix(name: str) -> tuple[str, str] | None:
    """``lora_unet_down_blocks_0`` -> (``lora_unet``, ``down_blocks_0``); None without a known prefix."""
    for p in PREFIXES:
        if name.startswith(p + "_"):
            return p, name[len(p) + 1 :]
    return None


def flatten(module: str) -> str:
    return module.replace(".", "_")


# ------------------------------------------------------------------------------------------------ name map


@dataclass
class _Component:
    prefixes: tuple[str, ...] | None  # None: answers to every prefix
    module_prefix: str  # prepended to the base's tensor name to form our module name
    table: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)


@dataclass
class NameMap:
    """kohya names -> module names, built from a base checkpoint's tensor names and checked by shape."""

    source: str
    components: list[_Component]

    def candidates(self, name: str) -> list[tuple[str, tuple[int, ...]]]:
        split = split_prefix(name)
        if split is None:
            return []
        prefix, rest = split
        found: list[tuple[str, tuple[int, ...]]] = []
        for comp in self.components:
            if comp.prefixes is None or prefix in comp.prefixes:
                found += comp.table.get(rest, [])
        return found


def _add(comp: _Component, flat: str, module: str, shape: tuple[int, ...]) -> None:
    entries = comp.table.setdefault(flat, [])
    if (module, shape) not in entries:
        entries.append((module, shape))


def _component(
    tensors: dict[str, TensorInfo],
    prefixes: tuple[str, ...] | None,
    module_prefix: str,
    text: bool,
    strip: str = "",
    layers_per_block: int | None = None,
) -> _Component:
    comp = _Component(prefixes=prefixes, module_prefix=module_prefix)
    up_attn = {int(k.split(".")[1]) for k in tensors if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    sgm = layers_per_block is not None and any(k.startswith("down_blocks.") for k in tensors)
    for key, info in tensors.items():
        if not key.startswith(strip) or not key.endswith(".weight") or not 2 <= len(info.shape) <= 5:
            continue
        inner = key[len(strip) : -len(".weight")]
        module = module_prefix + key[: -len(".weight")]
        _add(comp, flatten(inner), module, info.shape)
        if text and not inner.startswith("text_model."):
            # transformers 5 saves CLIPTextModel without its `text_model.` level; kohya names keep it
            _add(comp, "text_model_" + flatten(inner), module, info.shape)
        if sgm and layers_per_block is not None:
            alias = sgm_name(inner, layers_per_block, up_attn)
            if alias is not None:
                _add(comp, flatten(alias), module, info.shape)
    return comp


_RESNET_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_name(module: str, layers_per_block: int, up_attn: set[int]) -> str | None:
    """The sgm / ldm name (SDXL kohya files use them) of a diffusers UNet2DConditionModel module, from the
    block layout (as sd-scripts' ``make_unet_conversion_map`` and diffusers' sgm mapping do), or None."""
    if module in _TOP_SGM:
        return _TOP_SGM[module]
    n = layers_per_block + 1

    def res(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return _RESNET_SGM.get(head, head) + ("." + tail if tail else "")

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = f"0.{res(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"input_blocks.{n * i + j + 1}.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = f"0.{res(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"output_blocks.{n * i + j}.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        i = int(m[1])
        return f"output_blocks.{n * i + layers_per_block}.{2 if i in up_attn else 1}.conv"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"middle_block.{2 * int(m[1])}.{res(m[2])}"
    return None


def _layers_per_block(folder: Path) -> int | None:
    cfg = folder / CONFIG_FILE
    if not cfg.is_file():
        return None
    lpb = read_json(cfg, CONFIG_FILE).get("layers_per_block")
    return lpb if isinstance(lpb, int) and not isinstance(lpb, bool) else None


def _folder_tensors(folder: Path) -> dict[str, TensorInfo] | None:
    if not folder.is_dir() or find_layout({p.name for p in folder.iterdir()}) is None:
        return None
    return open_base(folder).tensors


def build_name_map(base: str | Path) -> NameMap:
    """The kohya-name table of a base: a pipeline folder, a component folder or file, or a single-file checkpoint."""
    path = Path(base)
    if not path.exists():
        raise InvalidAdapterError(f"base model not found: {path}", path=path)
    comps: list[_Component] = []
    if path.is_file():
        tensors = dict(read_header(path).tensors)
        for strip, prefixes in SINGLE_FILE_PREFIXES.items():
            if any(k.startswith(strip) for k in tensors):
                comps.append(_component(tensors, prefixes, "", "lora_te" in prefixes[0], strip=strip))
        if not comps:
            comps.append(_component(tensors, None, "", text=False, layers_per_block=_layers_per_block(path.parent)))
        return NameMap(source=str(path), components=comps)
    for sub, (prefixes, text) in PIPELINE_COMPONENTS.items():
        if (path / sub).is_dir():
            found = _folder_tensors(path / sub)
            if found is not None:
                lpb = _layers_per_block(path / sub) if sub == "unet" else None
                comps.append(_component(found, prefixes, f"{sub}.", text, layers_per_block=lpb))
    if not comps:
        found = _folder_tensors(path)
        if found is None:
            raise InvalidAdapterError(
                "no safetensors weights here (model.safetensors, diffusion_pytorch_model.safetensors, or a "
                "pipeline's unet/ text_encoder/ subfolders)",
                path=path,
            )
        text = any(k.startswith(("text_model.", "encoder.layers.")) for k in found)
        comps.append(_component(found, None, "", text, layers_per_block=_layers_per_block(path)))
    return NameMap(source=str(path), components=comps)


def _effective_down(g: dict[str, TensorInfo]) -> tuple[int, ...]:
    """lora_down's shape, or with a Tucker core the folded lora_A's: (r, in, kh, kw)."""
    down, mid = g["lora_down.weight"], g.get("lora_mid.weight")
    if mid is None:
        return down.shape
    return (mid.shape[0], down.shape[1], *mid.shape[2:])


def _fits(shape: tuple[int, ...], down: tuple[int, ...], up: tuple[int, ...]) -> bool:
    r = down[0]
    if len(shape) == 2:
        return down == (r, shape[1]) and up == (shape[0], r)
    return len(down) == len(shape) and down[1:] == shape[1:] and up == (shape[0], r) + (1,) * (len(shape) - 2)


# ------------------------------------------------------------------------------------------------ reading


class KohyaTensorSource(TensorSource):
    """Loads factors by their PEFT-style keys from a kohya file (renamed on the fly; tensors stay lazy)."""

    def __init__(
        self,
        header: SafetensorsHeader,
        rename: dict[str, str],
        folds: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(header=header)
        self.rename = rename  # PEFT-style key -> kohya key
        # PEFT-style key -> (kind, stored keys, shape) of a factor computed on load: "tucker" (lora_mid, lora_down),
        # "loha_A" (hada_w1_b, hada_w2_b), "loha_B" (hada_w1_a, hada_w2_a)
        self.folds = folds or {}

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from lora_ops.lycoris import fold_loha, fold_tucker

        assert self.header is not None
        plain = [k for k in keys if k not in self.folds]
        wanted = [self.rename.get(k, k) for k in plain] + [
            x for k in keys if k in self.folds for x in self.folds[k][1]
        ]
        raw = load_safetensors(self.header.path, list(dict.fromkeys(wanted)), header=self.header)
        out = {k: raw[self.rename.get(k, k)] for k in plain}
        for k in keys:
            if k in self.folds:
                kind, (x, y), shape = self.folds[k]
                if kind == "tucker":
                    out[k] = fold_tucker(raw[x], raw[y])
                else:
                    out[k] = fold_loha(raw[x], raw[y], transpose=kind == "loha_A").reshape(shape)
        return {k: out[k] for k in keys}


@dataclass
class KohyaModule:
    name: str  # kohya name (``lora_unet_...``)
    module: str
    down: TensorInfo
    up: TensorInfo
    alpha: TensorInfo | None
    mid: TensorInfo | None = None  # LoCon-Tucker core, folded into lora_A when asked
    loha: dict[str, TensorInfo] | None = None  # LoHa factors (hada_w1_a ...), folded when asked
    shape: tuple[int, ...] = ()  # the base weight's shape, when mapped through a base


def factor_digest(items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> str:
    """sha256 over (module, A, B) with dtypes and shapes: equal digests mean the very same factors."""
    h = hashlib.sha256()
    for name, a, b in sorted(items, key=lambda x: x[0]):
        h.update(name.encode() + b"\0")
        for t in (a, b):
            t = t.detach().contiguous().cpu()
            h.update(f"{t.dtype}{list(t.shape)}".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _scalar(t: torch.Tensor) -> float:
    v = t.reshape(-1)[0].item()
    return float(v)


_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def _checked_names(stored: dict[str, str], path: Path) -> dict[str, str]:
    """The stored ``{kohya name: module}`` map, refused (as any other bad map) unless every module name is a dotted
    name of letters, digits and underscores and no two keys name the same module (a module is never dropped)."""
    bad = sorted(f"{k} -> {v!r}" for k, v in stored.items() if not _MODULE_NAME.fullmatch(v))
    if bad:
        raise InvalidAdapterError(
            f"bad {NAMES_KEY} metadata (module names must be dotted names of letters, digits and underscores): "
            + _fmt_keys(bad, 5),
            path=path,
        )
    by_module: dict[str, list[str]] = {}
    for k, v in stored.items():
        by_module.setdefault(v, []).append(k)
    shared = sorted(f"{' and '.join(sorted(ks))} -> {v}" for v, ks in by_module.items() if len(ks) > 1)
    if shared:
        raise InvalidAdapterError(
            f"bad {NAMES_KEY} metadata (several keys name the same module): {_fmt_keys(shared, 5)}", path=path
        )
    return stored


def _alpha_disagreements(
    adapter: Adapter, modules: list[KohyaModule], alphas: dict[str, float], stored: dict[str, float]
) -> list[str]:
    """The modules whose alpha tensor (or its absence) says otherwise than ``adapter``'s config, as
    ``"<alpha key>: <tensor value> vs <config value>"``: the config's alpha as :func:`write_kohya` stores it
    (alpha, or alpha·√r with rsLoRA) must equal the tensor's value, exactly or to float32 rounding, and the
    config's scale the one kohya loaders apply (alpha tensor / rank), to float32 rounding."""
    import torch

    out = []
    for k in modules:
        m = adapter.modules.get(k.module)
        tensor = stored.get(k.module)
        have = {alphas[k.module]} | ({tensor} if tensor is not None and k.loha is None else set())
        if m is None:
            out.append(f"{k.name} (no such module in the config)")
            continue
        rank = k.mid.shape[0] if k.mid is not None else k.down.shape[0]
        if m.rank != rank:
            out.append(f"{k.name}: rank {rank} vs {m.rank}")
            continue
        try:
            want = float(m.alpha * math.sqrt(m.rank) if adapter.config.use_rslora else m.alpha)
        except (OverflowError, TypeError, ValueError):
            want = math.nan
        key = k.alpha.name if k.alpha is not None else f"{k.name}.alpha"
        if want not in have and float(torch.tensor(want, dtype=torch.float32)) not in have:
            shown = "missing (alpha = rank)" if tensor is None else f"{tensor:g}"
            out.append(f"{key}: {shown} vs {want:g}")
        elif not math.isclose(m.scale, alphas[k.module] / rank, rel_tol=2**-24):
            out.append(f"{key}: scale {alphas[k.module] / rank:g} vs {m.scale:g}")
    return out


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


class KohyaFormat:
    """kohya sd-scripts LoRA (``lora_unet_...lora_down.weight`` / ``lora_up.weight`` / ``alpha``)."""

    name = "kohya"
    description = "kohya sd-scripts LoRA file (lora_unet_* / lora_te*_* with lora_down, lora_up, alpha)"

    def sniff(self, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        try:
            keys = list(read_header(path).tensors)
        except InvalidAdapterError:
            return False
        return bool(keys) and all(_KEY.match(k) for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)

    def read(
        self, path: Path, *, base: str | Path | None = None, fold_tucker: bool = False, fold_loha: bool = False
    ) -> Adapter:
        """Read a kohya file; module names come from ``base`` (or ``$ADAPTERS_BASE``) or the map we stored.

        ``fold_tucker``: read LyCORIS LoCon-Tucker modules (``lora_mid``) as the LoRA they equal exactly, at the
        same rank (lora_A becomes the mid core applied to lora_down; new float32 tensors). ``fold_loha``: read
        LyCORIS LoHa modules (``hada_w1_a`` ...; not the Tucker variant) as the LoRA of rank r1·r2 they equal
        exactly (new float32 factors; needs the base for conv shapes). Both off by default.
        """
        path = Path(path)
        header = read_header(path)
        keys = list(header.tensors)

        def folded(k: str) -> bool:
            return bool((fold_tucker and _TUCKER_KEY.match(k)) or (fold_loha and _LOHA_KEY.match(k)))

        what = detect_lycoris([k for k in keys if not folded(k)], header.metadata)
        if what is not None:
            raise refuse_lycoris(path, what)
        groups: dict[str, dict[str, TensorInfo]] = {}
        strange = []
        for key, info in header.tensors.items():
            m = _KEY.match(key) or (
                (_TUCKER_KEY.match(key) if fold_tucker else None) or (_LOHA_KEY.match(key) if fold_loha else None)
            )
            if m is None:
                strange.append(key)
                continue
            groups.setdefault(m["name"], {})[m["part"]] = info
        if strange:
            raise InvalidAdapterError(
                f"keys that are not kohya LoRA tensors: {_fmt_keys(sorted(strange))}",
                path=path,
                hint="only <name>.lora_down.weight, <name>.lora_up.weight and <name>.alpha are expected",
            )
        for n, g in groups.items():
            if any(p in g for p in _LOHA_PARTS):
                if not all(p in g for p in _LOHA_PARTS):
                    raise InvalidAdapterError(f"LoHa module {n} lacks some of {', '.join(_LOHA_PARTS)}", path=path)
                if "lora_down.weight" in g or "lora_up.weight" in g:
                    raise InvalidAdapterError(f"module {n} mixes LoHa and LoRA tensors", path=path)
                w1a, w1b, w2a, w2b = (g[p] for p in _LOHA_PARTS)
                rank = w1b.shape[0] * w2b.shape[0]
                if (
                    len(w1a.shape) != 2
                    or w1a.shape != (w2a.shape[0], w1b.shape[0])
                    or len(w2a.shape) != 2
                    or w2a.shape[1] != w2b.shape[0]
                    or w1b.shape[1:] != w2b.shape[1:]
                ):
                    raise InvalidAdapterError(f"LoHa module {n}: factor shapes do not fit together", path=path)
                # stand-ins with the folded factors' flat shapes, for the name table's shape check
                g["lora_down.weight"] = replace(w1b, shape=(rank, math.prod(w1b.shape[1:])))
                g["lora_up.weight"] = replace(w1a, shape=(w1a.shape[0], rank))
        incomplete = sorted(n for n, g in groups.items() if "lora_down.weight" not in g or "lora_up.weight" not in g)
        if incomplete:
            raise InvalidAdapterError(
                f"modules without both lora_down and lora_up: {_fmt_keys(incomplete)}", path=path
            )
        modules = self._resolve(path, header, groups, base)
        return self._assemble(path, header, modules)

    def _resolve(
        self, path: Path, header: SafetensorsHeader, groups: dict[str, dict[str, TensorInfo]], base: str | Path | None
    ) -> list[KohyaModule]:
        base = base if base is not None else os.environ.get(BASE_ENV) or None
        stored: dict[str, str] | None = None
        if NAMES_KEY in header.metadata:
            doc = parse_json(header.metadata[NAMES_KEY].encode(), path=path, what=f"{NAMES_KEY} metadata")
            if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
                raise InvalidAdapterError(f"bad {NAMES_KEY} metadata (not an object of names)", path=path)
            stored = _checked_names(dict(doc), path)
        if base is None and stored is None:
            raise InvalidAdapterError(
                "kohya LoRA file: its module names cannot be read back without the base model (underscores in "
                "kohya names stand for dots and for themselves)",
                path=path,
                hint=f"pass --base BASE, or set {BASE_ENV}=BASE (a "
                "diffusers pipeline folder, a component folder, or a single-file checkpoint)",
            )
        out: list[KohyaModule] = []
        if base is None:
            assert stored is not None
            missing = sorted(n for n in groups if n not in stored)
            if missing:
                raise InvalidAdapterError(
                    f"the stored name map does not cover: {_fmt_keys(missing)}",
                    path=path,
                    hint="pass the base model so the names can be mapped from it",
                )
            loha_names = sorted(n for n, g in groups.items() if "hada_w1_a" in g)
            if loha_names:
                raise InvalidAdapterError(
                    f"LoHa modules need the base to be folded: {_fmt_keys(loha_names)}", path=path
                )
            for n, g in sorted(groups.items()):
                out.append(
                    KohyaModule(
                        n,
                        stored[n],
                        g["lora_down.weight"],
                        g["lora_up.weight"],
                        g.get("alpha"),
                        g.get("lora_mid.weight"),
                    )
                )
            return out
        name_map = build_name_map(base)
        unmapped: list[str] = []
        misfit: list[str] = []
        ambiguous: list[str] = []
        for n, g in sorted(groups.items()):
            down, up = g["lora_down.weight"], g["lora_up.weight"]
            cands = name_map.candidates(n)
            is_loha = "hada_w1_a" in g
            fits = [
                (mod, shape)
                for mod, shape in cands
                if (
                    shape[0] == up.shape[0] and math.prod(shape[1:]) == down.shape[1]
                    if is_loha
                    else _fits(shape, _effective_down(g), up.shape)
                )
            ]
            fitting = [mod for mod, _ in fits]
            if not cands:
                unmapped.append(n)
            elif not fitting:
                shapes = ", ".join(f"{mod} {list(shape)}" for mod, shape in cands)
                misfit.append(f"{n} (lora_down {list(down.shape)}, lora_up {list(up.shape)} vs {shapes})")
            elif len(fitting) > 1:
                ambiguous.append(f"{n} -> {' | '.join(fitting)}")
            else:
                loha = {p: g[p] for p in _LOHA_PARTS} if is_loha else None
                out.append(
                    KohyaModule(n, fitting[0], down, up, g.get("alpha"), g.get("lora_mid.weight"), loha, fits[0][1])
                )
        problems = []
        if unmapped:
            problems.append(f"{len(unmapped)} key(s) name no module of the base: {_fmt_keys(unmapped)}")
        if misfit:
            problems.append(f"{len(misfit)} key(s) do not fit their module's shape: {_fmt_keys(misfit)}")
        if ambiguous:
            problems.append(f"{len(ambiguous)} key(s) match two modules of the base: {_fmt_keys(ambiguous)}")
        if problems:
            raise InvalidAdapterError(
                "; ".join(problems),
                path=path,
                hint=f"is {name_map.source} the base this LoRA was trained on (same architecture and naming)? "
                "nothing is skipped silently",
            )
        dup = [m for m, c in Counter(k.module for k in out).items() if c > 1]
        if dup:
            raise InvalidAdapterError(f"several keys map to the same module: {_fmt_keys(sorted(dup))}", path=path)
        return out

    def _assemble(self, path: Path, header: SafetensorsHeader, modules: list[KohyaModule]) -> Adapter:
        from adapterhub_cli.formats.peft import assemble_adapter, rank_layout

        warnings: list[str] = []
        alphas: dict[str, float] = {}  # the alpha each kohya loader applies (missing or 0: rank)
        stored: dict[str, float] = {}  # the alpha tensors' values as stored
        missing, zero = [], []
        if any(k.alpha is not None for k in modules):
            raw = load_safetensors(path, [k.alpha.name for k in modules if k.alpha is not None], header=header)
        else:
            raw = {}
        for k in modules:
            rank = k.loha["hada_w1_b"].shape[0] if k.loha is not None else k.down.shape[0]
            if k.alpha is None:
                missing.append(k.name)
                alphas[k.module] = float(rank)
                continue
            if k.alpha.numel != 1:
                raise InvalidAdapterError(
                    f"{k.alpha.name} has shape {list(k.alpha.shape)}; a single number is expected", path=path
                )
            value = _scalar(raw[k.alpha.name])
            if not math.isfinite(value):
                raise InvalidAdapterError(f"{k.alpha.name} is {value}", path=path, module=k.module)
            stored[k.module] = value
            if value == 0:
                zero.append(k.name)
                value = float(rank)
            alphas[k.module] = value
        if missing:
            warnings.append(
                f"{len(missing)} module(s) store no alpha; alpha = rank (scale 1) assumed, as sd-scripts, ComfyUI "
                f"and diffusers do: {_fmt_keys(missing, 5)}"
            )
        if zero:
            warnings.append(
                f"{len(zero)} module(s) store alpha 0; read as alpha = rank (scale 1), as sd-scripts' trainer uses "
                f"it (its merge_lora.py and ComfyUI would apply scale 0): {_fmt_keys(zero, 5)}"
            )
        for k in modules:
            if k.loha is not None:  # same scale at rank r1·r2: alpha' / (r1·r2) = alpha / r1
                alphas[k.module] = alphas[k.module] * k.loha["hada_w2_b"].shape[0]
        ranks = {k.module: (k.mid.shape[0] if k.mid is not None else k.down.shape[0]) for k in modules}
        r, rank_pattern = rank_layout(ranks)
        lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
        alpha_pattern = {m: a for m, a in sorted(alphas.items()) if a != lora_alpha}
        doc: dict[str, Any] = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": lora_alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": sorted(ranks),
            "use_rslora": False,
            "use_dora": False,
        }
        rename: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        folds: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}

        def computed(key: str, kind: str, parts: tuple[TensorInfo, ...], shape: tuple[int, ...]) -> None:
            wide = any(p.dtype == "F64" for p in parts)
            folds[key] = (kind, tuple(p.name for p in parts), shape)
            infos[key] = TensorInfo(key, "F64" if wide else "F32", shape, 0, math.prod(shape) * (8 if wide else 4))

        n_tucker = n_loha = 0
        for k in modules:
            a_key, b_key = f"{k.module}.lora_A.weight", f"{k.module}.lora_B.weight"
            if k.loha is not None:
                n_loha += 1
                rank, tail = k.down.shape[0], k.shape[1:]
                computed(a_key, "loha_A", (k.loha["hada_w1_b"], k.loha["hada_w2_b"]), (rank, *tail))
                computed(
                    b_key,
                    "loha_B",
                    (k.loha["hada_w1_a"], k.loha["hada_w2_a"]),
                    (k.up.shape[0], rank) + (1,) * (len(tail) - 1),
                )
                continue
            for key, info in ((a_key, k.down), (b_key, k.up)):
                rename[key] = info.name
                infos[key] = replace(info, name=key)
            if k.mid is not None:
                n_tucker += 1
                computed(a_key, "tucker", (k.mid, k.down), (k.mid.shape[0], k.down.shape[1], *k.mid.shape[2:]))
        if n_tucker:
            warnings.append(f"{n_tucker} LoCon-Tucker module(s) folded exactly into LoRA factors (lora_A is new)")
        if n_loha:
            warnings.append(
                f"{n_loha} LoHa module(s) folded exactly into LoRA factors of rank r1·r2 (new tensors; "
                "`adapters reduce` can shrink them)"
            )
        source = KohyaTensorSource(header, rename, folds)
        renamed = SafetensorsHeader(
            path=path,
            tensors=infos,
            metadata=dict(header.metadata),
            header_size=header.header_size,
            file_size=header.file_size,
        )
        adapter: Adapter | None = None
        stash = header.metadata.get(PEFT_STASH_KEY)
        if stash is not None:
            try:
                sdoc = parse_json(stash.encode(), path=path, what=f"{PEFT_STASH_KEY} metadata")
            except CorruptFileError:
                sdoc = None
            if isinstance(sdoc, dict):
                loaded = source.load(list(infos))
                items = [
                    (k.module, loaded[f"{k.module}.lora_A.weight"], loaded[f"{k.module}.lora_B.weight"])
                    for k in modules
                ]
                if sdoc.get("digest") == factor_digest(items) and isinstance(sdoc.get("config"), dict):
                    # written by us from a PEFT adapter, factors unchanged: its exact config, as long as every
                    # module's alpha tensor (which is what kohya loaders apply; the digest does not cover it)
                    # says the same
                    exact = assemble_adapter(path, sdoc["config"], header=renamed, format_name=self.name)
                    differ = _alpha_disagreements(exact, modules, alphas, stored)
                    if differ:
                        warnings.append(
                            f"ignored the stored PEFT config ({PEFT_STASH_KEY}): its alphas differ from the file's "
                            f"alpha tensors, which are used, as kohya loaders do: {_fmt_keys(differ, 5)}"
                        )
                    else:
                        adapter = exact
            else:
                warnings.append(f"ignored unreadable {PEFT_STASH_KEY} metadata")
        trusted = adapter is not None
        if adapter is None:
            adapter = assemble_adapter(path, doc, header=renamed, format_name=self.name)
        adapter.source = source
        adapter.warnings += warnings
        for m in adapter.modules.values():  # a PEFT pattern key could, in theory, match a longer name first
            if not trusted and m.scale != alphas[m.name] / m.rank:
                raise InvalidAdapterError(f"internal: alpha of {m.name} does not resolve", path=path, module=m.name)
        return adapter

    def write(
        self,
        adapter: Adapter,
        path: Path,
        *,
        base: str | Path | None = None,
        overwrite: bool = False,
        provenance: dict[str, Any] | None = None,
    ) -> Path:
        """Write one ``.safetensors`` file (names checked against ``base`` when given)."""
        if Path(path).suffix != ".safetensors":
            raise UsageError(f"a kohya LoRA is one .safetensors file; got -o {path}")
        return write_kohya(adapter, path, base=base, overwrite=overwrite, provenance=provenance)


# ------------------------------------------------------------------------------------------------ writing


def kohya_name(module: str, *, sdxl: bool = False) -> str:
    """The kohya name this tool gives a module (component from its leading name part; with ``sdxl`` the first
    text encoder is ``lora_te1``, as sd-scripts names it when there is a second one)."""
    for sub, (prefixes, _text) in PIPELINE_COMPONENTS.items():
        if module.startswith(sub + "."):
            prefix = "lora_te1" if sdxl and sub == "text_encoder" else prefixes[0]
            rest = module[len(sub) + 1 :]
            if sub in ("text_encoder", "text_encoder_2") and rest.startswith(("encoder.layers.", "embeddings.")):
                rest = "text_model." + rest  # transformers 5 saves CLIP without `text_model.`; kohya names keep it
            return prefix + "_" + flatten(rest)
    for strip, prefixes in SINGLE_FILE_PREFIXES.items():
        if module.startswith(strip):
            return prefixes[0] + "_" + flatten(module[len(strip) :])
    if module.startswith("text_model."):
        return "lora_te_" + flatten(module)
    return "lora_unet_" + flatten(module)


def kohya_stash(adapter: Adapter) -> dict[str, Any] | None:
    """What a kohya-read adapter holds beyond its factors (names, alphas as stored, metadata), for a PEFT copy."""
    if not isinstance(adapter.source, KohyaTensorSource) or adapter.source.header is None or adapter.source.folds:
        return None  # folded LyCORIS modules have new factors and ranks: the stored alphas no longer apply
    header = adapter.source.header
    names: dict[str, str] = {}
    alphas: dict[str, Any] = {}
    alpha_keys = []
    for m in adapter.modules.values():
        up_key = adapter.source.rename[m.B.name]
        name = up_key[: -len(".lora_up.weight")]
        names[m.name] = name
        if f"{name}.alpha" in header.tensors:
            alpha_keys.append((m.name, f"{name}.alpha"))
    loaded = load_safetensors(header.path, [k for _, k in alpha_keys], header=header) if alpha_keys else {}
    for module, key in alpha_keys:
        t = loaded[key]
        value: float | int = int(t.reshape(-1)[0].item()) if not t.dtype.is_floating_point else _scalar(t)
        alphas[module] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "value": value}
    return {"names": names, "alphas": alphas, "metadata": dict(header.metadata), "digest": adapter_digest(adapter)}


def _raw_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    keys = [k for m in adapter.modules.values() for k in (m.A.name, m.B.name)]
    loaded = adapter.source.load(keys)
    return {m.name: (loaded[m.A.name], loaded[m.B.name]) for m in adapter.modules.values()}


def adapter_digest(adapter: Adapter, raw: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> str:
    """The digest a kohya stash records of the factors it belongs to (module names, A and B bytes); ``raw``: the
    factors when already read."""
    raw = raw if raw is not None else _raw_factors(adapter)
    return factor_digest([(n, a, b) for n, (a, b) in raw.items()])


def check_convertible(adapter: Adapter, to: str) -> None:
    """Refuse what kohya / diffusion LoRA files cannot hold (nothing is dropped silently)."""
    from adapterhub_cli.formats.quantized import QuantizedTensorSource

    problems = []
    if isinstance(adapter.source, QuantizedTensorSource):
        problems.append("its factors are quantized (run `adapters dequantize` first)")
    if adapter.config.use_dora or any(m.magnitude is not None for m in adapter.modules.values()):
        problems.append("it uses DoRA (magnitude vectors)")
    biased = [m.name for m in adapter.modules.values() if m.bias is not None]
    if biased or adapter.config.raw.get("lora_bias") is True:
        # kohya's lora_down / lora_up and diffusers' lora_A / lora_B keys carry no bias: it would be lost
        where = f" ({_fmt_keys(biased, 5)})" if biased else ""
        problems.append(
            f"it uses lora_bias (a bias on lora_B{where}), which kohya and diffusers LoRA files cannot hold; keep it "
            "as a PEFT adapter, or merge it into the base"
        )
    if adapter.extra_tensors:
        problems.append(
            f"it saves other tensors ({_fmt_keys(sorted(adapter.extra_tensors), 5)}: modules_to_save, bias)"
        )
    emb = [m.name for m in adapter.modules.values() if m.kind == "embedding"]
    if emb:
        problems.append(f"it adapts embeddings ({_fmt_keys(emb, 5)})")
    if adapter.config.fan_in_fan_out:
        problems.append("it uses fan_in_fan_out (transposed Conv1D factors)")
    if problems:
        raise InvalidAdapterError(f"cannot write this adapter as {to}: " + "; ".join(problems), path=adapter.path)


# names a diffusion pipeline's parts use: pipeline components, single-file prefixes, CLIP, UNet and DiT top levels
_DIFFUSION_NAME = re.compile(
    r"^(unet|text_encoder(_[23])?|transformer|prior|decoder)\.|^(model\.diffusion_model|cond_stage_model|"
    r"conditioner\.embedders)\.|^(text_model|encoder\.layers|down_blocks|up_blocks|mid_block|"
    r"(single_)?transformer_blocks|time_embedding|add_embedding|time_text_embed|context_embedder|x_embedder|"
    r"pos_embed|norm_out|proj_out|conv_in|conv_out|conv_norm_out|input_blocks|middle_block|output_blocks|"
    r"double_blocks|single_blocks|joint_blocks)(\.|$)"
)
_LLM_TASKS = {"CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def diffusion_warnings(adapter: Adapter, to: str) -> list[str]:
    """What a diffusion loader would do wrong with ``adapter`` written as ``to`` (kohya or diffusers).

    Decided by the target loaders: diffusers' ``load_lora_weights`` (and its kohya converter) apply these files
    only to a pipeline's UNet / transformer / text encoders, so a language model's modules (``model.layers.0...``,
    a ``CAUSAL_LM`` task) would be applied to nothing. The file itself is valid and reads back exactly here, so
    this is a warning, not a refusal. For kohya: diffusers' kohya loader (0.42.1) reads the UNet's per-module alphas
    right (its alpha_pattern keys are module names) but builds a text encoder's alpha_pattern keys without the
    module's last name part (``...self_attn`` for ``...self_attn.q_proj``), which PEFT then ignores; so differing
    alphas among text-encoder modules (``alpha_pattern``, ``reduce --energy``) get one alpha there. diffusers' own
    layout keeps them (``lora_adapter_metadata``)."""
    warnings = []
    foreign = sorted(n for n in adapter.modules if not _DIFFUSION_NAME.search(n))
    task = adapter.config.task_type
    if foreign or task in _LLM_TASKS:
        what = f"modules such as {_fmt_keys(foreign, 3)}" if foreign else f"task_type {task}"
        warnings.append(
            f"this looks like a language-model adapter ({what}), not a diffusion one: diffusers' loaders apply "
            f"{to} files only to a pipeline's unet / transformer / text encoders, so it would change nothing "
            "there (keep it as PEFT for transformers, or --to gguf for llama.cpp)"
        )
    if to == "kohya":
        te = [m for m in adapter.modules.values() if kohya_name(m.name).startswith("lora_te")]
        alphas = sorted({m.alpha * (math.sqrt(m.rank) if adapter.config.use_rslora else 1) for m in te})
        if len(alphas) > 1:
            shown = ", ".join(f"{a:g}" for a in alphas[:5]) + (", ..." if len(alphas) > 5 else "")
            warnings.append(
                f"text-encoder modules have different alphas ({shown}): diffusers' kohya loader (load_lora_weights, "
                "0.42) builds their alpha_pattern keys without the module's own name, so PEFT ignores them and one "
                "alpha scales every text-encoder module (sd-scripts and ComfyUI read each module's alpha); "
                "`--to diffusers` keeps every module's alpha for diffusers"
            )
    return warnings


def _alpha_tensor(value: float) -> torch.Tensor:
    import torch

    t32 = torch.tensor(value, dtype=torch.float32)
    return t32 if float(t32) == value else torch.tensor(value, dtype=torch.float64)


def write_kohya(
    adapter: Adapter,
    out: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter`` as one kohya ``.safetensors`` file, atomically.

    Factors keep their bytes and dtypes; alpha is its own scalar (never baked into the factors). A kohya-read
    adapter, or a PEFT copy of one with unchanged factors, gets back its key names, alpha tensors (dtype and value)
    and metadata verbatim. Otherwise names are derived (``lora_unet_`` / ``lora_te_`` + the flattened module
    name), checked against ``base`` when given, and stored with the PEFT config so the file reads back exactly.
    """
    import torch

    from adapterhub_cli.artifact.safetensors import save_safetensors

    check_convertible(adapter, "kohya")
    adapter.warnings += [w for w in diffusion_warnings(adapter, "kohya") if w not in adapter.warnings]
    out = Path(out)
    raw = _raw_factors(adapter)
    digest = adapter_digest(adapter, raw)
    stash = kohya_stash(adapter)
    if stash is None and KOHYA_STASH_KEY in adapter.metadata:
        try:
            doc = parse_json(adapter.metadata[KOHYA_STASH_KEY].encode(), path=adapter.path, what=KOHYA_STASH_KEY)
        except (CorruptFileError, UnicodeEncodeError):
            doc = None
        stash = doc if isinstance(doc, dict) else None
    restore = stash is not None and stash.get("digest") == digest and set(stash.get("names", {})) == set(raw)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str]
    if restore:
        assert stash is not None
        metadata = dict(stash.get("metadata") or {})
        for module, (a, b) in raw.items():
            name = stash["names"][module]
            tensors[f"{name}.lora_down.weight"] = a
            tensors[f"{name}.lora_up.weight"] = b
            spec = stash["alphas"].get(module)
            if spec is not None:
                tensors[f"{name}.alpha"] = torch.tensor(
                    spec["value"], dtype=torch_dtype(dtype_name(spec["dtype"]))
                ).reshape(spec["shape"])
    else:
        sdxl = any(m.startswith("text_encoder_2.") for m in raw)
        names = {m: kohya_name(m, sdxl=sdxl) for m in raw}
        if stash is not None:  # factors changed: keep names and the training metadata, drop hashes
            names.update({m: n for m, n in stash.get("names", {}).items() if m in names})
        dup = [n for n, c in Counter(names.values()).items() if c > 1]
        if dup:
            raise InvalidAdapterError(
                f"two modules flatten to the same kohya name: {_fmt_keys(dup)}", path=adapter.path
            )
        if base is not None:
            _check_names_against_base(adapter, names, base)
        for module, (a, b) in raw.items():
            m = adapter.modules[module]
            alpha = m.alpha * math.sqrt(m.rank) if adapter.config.use_rslora else m.alpha
            tensors[f"{names[module]}.lora_down.weight"] = a
            tensors[f"{names[module]}.lora_up.weight"] = b
            tensors[f"{names[module]}.alpha"] = _alpha_tensor(float(alpha))
        ranks = {m.rank for m in adapter.modules.values()}
        alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
        metadata = {}
        if stash is not None:
            metadata.update({k: v for k, v in (stash.get("metadata") or {}).items() if k not in _HASH_KEYS})
        metadata.setdefault("ss_network_module", "networks.lora")
        metadata["ss_network_dim"] = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        metadata["ss_network_alpha"] = f"{next(iter(alphas)):g}" if len(alphas) == 1 else "Dynamic"
        metadata[NAMES_KEY] = json.dumps({n: m for m, n in sorted(names.items())}, sort_keys=True)
        metadata[PEFT_STASH_KEY] = json.dumps({"config": adapter.config.raw, "digest": digest}, sort_keys=True)
        if provenance is not None:
            from adapterhub_cli.artifact.provenance import PROVENANCE_KEY

            metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    with atomic_file(out, overwrite=overwrite) as tmp:  # checked, swept, restored and umask'd like every output
        save_safetensors(tensors, tmp, metadata)
    return out


def _check_names_against_base(adapter: Adapter, names: dict[str, str], base: str | Path) -> None:
    """Each written name must map back to its module through the base's table (as kohya tools will read it)."""
    name_map = build_name_map(base)
    bad = []
    for module, name in sorted(names.items()):
        m = adapter.modules[module]
        fitting = [mod for mod, shape in name_map.candidates(name) if _fits(shape, m.A.shape, m.B.shape)]
        if len(fitting) != 1 or (fitting[0] != module and not fitting[0].endswith("." + module)):
            bad.append(f"{module} -> {name} -> {fitting or 'nothing'}")
    if bad:
        raise UsageError(
            f"these modules would not read back through {name_map.source}: {_fmt_keys(bad)}",
            hint="check that the adapter was trained on this base",
        )
