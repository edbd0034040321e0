"""LyCORIS files (LoHa, LoKr, Tucker LoCon, OFT, IA3, GLoRA, ...): detected by their keys and refused by name.

They share kohya's key naming (``lora_unet_<module>.<part>``) but store other factorizations, so reading
them as LoRA would silently give the wrong update. LoCon without ``lora_mid`` *is* plain kohya LoRA and is
read by the kohya format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.errors import CorruptFileError, InvalidAdapterError


if TYPE_CHECKING:
    from adapterhub_cli.artifact.adapter import Adapter

_PREFIX = re.compile(r"^(lora|lycoris)_\w+\.")

# (marker found in a key's part after the module name, what the file is), checked in this order
_MARKERS: tuple[tuple[str, str], ...] = (
    ("hada_t1", "LoHa with Tucker decomposition (Hadamard product of two low-rank pairs, hada_t1/hada_t2)"),
    ("hada_w1_a", "LoHa (Hadamard product of two low-rank pairs: hada_w1_a/b, hada_w2_a/b)"),
    ("lokr_", "LoKr (Kronecker product: lokr_w1, lokr_w2 and their factors)"),
    ("lora_mid", "LoCon with Tucker decomposition (an extra lora_mid core between lora_down and lora_up)"),
    ("oft_blocks", "OFT / BOFT (orthogonal fine-tuning: oft_blocks)"),
    ("oft_diag", "OFT (orthogonal fine-tuning: oft_diag)"),
    ("on_input", "(IA)³ (learned rescaling vectors: on_input)"),
    ("a1.weight", "GLoRA (generalized LoRA: a1/a2/b1/b2)"),
    ("w_norm", "norm-layer fine-tuning (w_norm / b_norm)"),
    ("b_norm", "norm-layer fine-tuning (w_norm / b_norm)"),
    ("diff_b", "a full fine-tune difference (LyCORIS 'full': diff / diff_b)"),
    ("diff", "a full fine-tune difference (LyCORIS 'full': diff / diff_b)"),
    ("dora_scale", "DoRA in LyCORIS' layout (dora_scale)"),
)
_PLAIN_ALGOS = {"lora", "locon", ""}


def detect_lycoris(keys: list[str], metadata: dict[str, str]) -> str | None:
    """What LyCORIS algorithm a kohya-style file holds (a sentence), or None for plain LoRA / LoCon."""
    for marker, what in _MARKERS:
        for key in keys:
            if not _PREFIX.match(key):
                continue
            part = key.split(".", 1)[1]
            if part.startswith(marker) or part == marker:
                return what
    if metadata.get("ss_network_module", "").startswith("lycoris"):
        try:
            args = parse_json((metadata.get("ss_network_args") or "{}").encode(), path=Path(), what="ss_network_args")
        except CorruptFileError:
            args = {}
        algo = str(args.get("algo", "")).lower() if isinstance(args, dict) else ""
        if algo not in _PLAIN_ALGOS:
            return f"LyCORIS algo {algo!r}"
    return None


def refuse_lycoris(path: Path, what: str) -> InvalidAdapterError:
    if "hada_w1_a" in what:
        hint = "it equals a LoRA of rank r1·r2 exactly: `adapters convert FILE --to peft --base BASE --fold-loha`"
    elif "lora_mid" in what:
        hint = "it equals a LoRA of the same rank exactly: `adapters convert FILE --to peft --fold-tucker` folds it"
    else:
        hint = (
            "it is not a LoRA update B@A, so reading it as one would be wrong; merge it with a LyCORIS-aware "
            "tool (sd-scripts with lycoris, ComfyUI), or bake it into the base and extract a LoRA from the difference"
        )
    return InvalidAdapterError(
        f"this is a LyCORIS file: {what}; only plain LoRA / LoCon (lora_down, lora_up, alpha) can be read",
        path=path,
        hint=hint,
    )


class LycorisFormat:
    """Recognizes LyCORIS files so they get a precise refusal instead of "unknown format"."""

    name = "lycoris"
    description = "LyCORIS file (LoHa, LoKr, Tucker, OFT, IA3, GLoRA, ...): detected and refused by name"

    def sniff(self, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        try:
            header = read_header(path)
        except InvalidAdapterError:
            return False
        return detect_lycoris(list(header.tensors), header.metadata) is not None

    def read(self, path: Path) -> Adapter:
        header = read_header(path)
        what = detect_lycoris(list(header.tensors), header.metadata) or "an unknown LyCORIS algorithm"
        raise refuse_lycoris(path, what)
