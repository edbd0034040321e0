"""The adapter as an artifact: its config, its modules (read from tensor headers), its provenance.

Building an :class:`Adapter` reads only JSON and safetensors headers. Tensors load when asked for,
through :meth:`Adapter.tensor` / :meth:`Adapter.factors`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.config import AdapterConfig
from adapterhub_cli.artifact.provenance import Provenance
from adapterhub_cli.artifact.safetensors import (
    SafetensorsHeader,
    TensorInfo,
    all_finite,
    computable,
    load_safetensors,
)
from adapterhub_cli.errors import InvalidAdapterError


if TYPE_CHECKING:
    import torch

    from lora_ops import LoraFactors


@dataclass(frozen=True)
class LoraModule:
    """One adapted module, as its tensor headers describe it.

    ``A`` is (rank, d_in) and ``B`` is (d_out, rank) for linear layers; for embeddings ``A`` is
    (rank, num_embeddings) and ``B`` is (embedding_dim, rank); for convolutions ``A`` is
    (rank, in_channels, kh, kw) and ``d_in`` counts in_channels * kh * kw.
    """

    name: str
    kind: str  # "linear" | "embedding" | "conv"
    rank: int
    d_out: int
    d_in: int
    alpha: float
    scale: float
    A: TensorInfo
    B: TensorInfo
    magnitude: TensorInfo | None = None
    #: ``lora_B.bias`` (d_out,) of an adapter saved with ``lora_bias=True``: the update adds ``scale * bias`` to
    #: the base layer's bias
    bias: TensorInfo | None = None

    @property
    def dtype(self) -> str:
        return self.A.dtype if self.A.dtype == self.B.dtype else f"{self.A.dtype}/{self.B.dtype}"

    @property
    def numel(self) -> int:
        return (
            self.A.numel
            + self.B.numel
            + (self.magnitude.numel if self.magnitude else 0)
            + (self.bias.numel if self.bias else 0)
        )


def factor_shape_problem(m: LoraModule) -> str | None:
    """What is wrong with the number of dimensions of ``m``'s factors, or None. PEFT's factors of a Linear or an
    embedding LoRA are matrices (lora_A (r, d_in), lora_B (d_out, r)); of a Conv2d LoRA, lora_A is (r, in_channels,
    kh, kw) and lora_B (d_out, r, 1, 1). PEFT refuses other shapes (size mismatch on load); read as a Linear with
    its trailing dimensions multiplied, a merge would silently apply a reshaped update."""
    if m.kind == "conv":
        if len(m.B.shape) == 4 and m.B.shape[2:] == (1, 1):
            return None
        return (
            f"lora_B {m.B.name} has shape {list(m.B.shape)}, but beside a 4-D lora_A {list(m.A.shape)} (a Conv2d "
            f"LoRA) it must be [d_out, r, 1, 1]"
        )
    what = "an embedding" if m.kind == "embedding" else "a Linear"
    for part, info in (("lora_A", m.A), ("lora_B", m.B)):
        if len(info.shape) != 2:
            return (
                f"{part} {info.name} has shape {list(info.shape)} ({len(info.shape)}-D): LoRA factors are matrices "
                f"(lora_A [r, d_in], lora_B [d_out, r]), or 4-D for a Conv2d; PEFT refuses to load this one into "
                f"{what} (Conv1d and Conv3d LoRAs are not supported)"
            )
    return None


def stored_transposed(
    kind: str, flag: bool, stored: tuple[int, ...], update: tuple[int, int], conv1d: bool | None = None
) -> bool:
    """THE rule for whether a base stores the transpose of a module's (d_out, d_in) update: always for embeddings;
    from the shapes when they tell (GPT-2's Conv1D stores (d_in, d_out)); for a square weight, from the layer's
    class where it is known (``conv1d``: :func:`conv1d_layer`), as PEFT decides it (it sets ``fan_in_fan_out`` to
    False for a ``torch.nn.Linear`` and to True for a ``Conv1D``, with a warning, whatever the config says); else
    the config's ``fan_in_fan_out`` flag. Used by merge and analyze."""
    if kind == "embedding":
        return True
    if update[0] != update[1]:
        return tuple(stored) == (update[1], update[0])
    return flag if conv1d is None else conv1d


#: transformers' model types with ``Conv1D`` layers (``transformers.pytorch_utils.Conv1D``: a weight stored as
#: (d_in, d_out)), and the names those layers have there; every other layer of theirs is a Linear or an embedding
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_LAYER_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


def conv1d_layer(base_config: dict[str, Any] | None, module: str) -> bool | None:
    """Whether ``module`` of the base described by ``base_config`` (its config.json) is a ``Conv1D``: for a model
    type of transformers, from :data:`CONV1D_MODEL_TYPES` and the layer's name; None where the config does not tell
    (no config, no model type, or remote code, ``auto_map``, whose layers only its own code knows)."""
    if not base_config or not isinstance(base_config.get("model_type"), str) or base_config.get("auto_map"):
        return None
    if base_config["model_type"] not in CONV1D_MODEL_TYPES:
        return False
    return module.rsplit(".", 1)[-1] in CONV1D_LAYER_NAMES


class TensorSource:
    """Loads tensors by their stored key: from a checked safetensors file, or from an in-memory state dict.

    Every source returns 8-bit float tensors (F8_E4M3, F8_E5M2) as float32 (:func:`computable`): torch computes
    nothing in them on CPU (no isfinite, sum or matmul), and PEFT loads such factors into its float32 LoRA layers
    the same way. A subclass's own ``load`` is wrapped to do the same (:meth:`__init_subclass__`).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("load")
        if own is not None and not getattr(own, "_computable", False):
            cls.load = _computable_load(own)  # type: ignore[method-assign,assignment]

    def __init__(
        self, header: SafetensorsHeader | None = None, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.header = header
        self._tensors = tensors

    @property
    def path(self) -> Path | None:
        return self.header.path if self.header else None

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return {k: computable(self._tensors[k]) for k in keys}
        assert self.header is not None
        return {k: computable(t) for k, t in load_safetensors(self.header.path, keys, header=self.header).items()}


def _computable_load(
    load: Callable[[Any, list[str]], dict[str, torch.Tensor]],
) -> Callable[[Any, list[str]], dict[str, torch.Tensor]]:
    """A subclass's ``load`` whose 8-bit float tensors come back as float32 (see :class:`TensorSource`)."""

    @functools.wraps(load)
    def wrapped(self: Any, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: computable(t) for k, t in load(self, keys).items()}

    wrapped._computable = True  # type: ignore[attr-defined]
    return wrapped


@dataclass
class Adapter:
    """A LoRA adapter: config, modules and other saved tensors, provenance, and lazy access to weights.

    Attributes:
        path: the folder or file it was read from.
        format: name of the format plugin that read it.
        config: the (possibly inferred) PEFT config.
        modules: module name (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``) -> LoraModule.
        extra_tensors: other saved tensors (modules_to_save copies, biases) by their base-model key.
        key_prefix: what stored keys carry before the module name (``base_model.model.`` for PEFT).
        warnings: non-fatal problems found while reading (unknown config keys, inferred values).
    """

    path: Path
    format: str
    config: AdapterConfig
    modules: dict[str, LoraModule]
    extra_tensors: dict[str, TensorInfo]
    source: TensorSource
    key_prefix: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    provenance: Provenance | None = None
    config_inferred: bool = False

    def __repr__(self) -> str:
        """One line: where it came from, its format, rank, alpha, how many modules, the factors' dtypes (not
        every module, as the dataclass repr would)."""
        cfg = self.config
        ranks = sorted({m.rank for m in self.modules.values()})
        r = cfg.r if ranks in ([], [cfg.r]) else f"{cfg.r} (ranks {ranks[0]}..{ranks[-1]})"
        dtypes = sorted({t.dtype for m in self.modules.values() for t in (m.A, m.B)})
        return (
            f"<Adapter {str(self.path)!r} format={self.format} r={r} alpha={cfg.lora_alpha:g} "
            f"modules={len(self.modules)} dtype={'/'.join(dtypes) or '-'}>"
        )

    @property
    def tensor_file(self) -> Path | None:
        return self.source.path

    def tensor(self, key: str) -> torch.Tensor:
        """Load one stored tensor by its header key."""
        return self.source.load([key])[key]

    def factors(self, module: str, *, finite: bool = False) -> LoraFactors:
        """The factors of ``module`` as float tensors: A (r, d_in), B (d_out, r) and PEFT's scale; 8-bit floats come as
        float32 (as PEFT loads them). Factors of a shape PEFT refuses (:func:`factor_shape_problem`) raise
        :class:`InvalidAdapterError` naming the tensor and its shape.

        With ``finite``, an :class:`InvalidAdapterError` naming the module when A, B or the scale hold NaN / inf
        (for analyses that decompose the update: the spectrum, subspace overlaps).
        """
        import math

        from lora_ops import LoraFactors

        try:
            m = self.modules[module]
        except KeyError:
            raise InvalidAdapterError(f"no LoRA module named {module!r}", path=self.path, module=module) from None
        problem = factor_shape_problem(m)
        if problem is not None:
            raise InvalidAdapterError(
                f"module {module}: {problem}",
                path=self.path,
                module=module,
                hint="the file is damaged or was written by a broken tool; re-save the adapter with PEFT",
            )
        t = self.source.load([m.A.name, m.B.name])
        a, b = t[m.A.name], t[m.B.name]
        if finite and not (math.isfinite(m.scale) and all_finite(a) and all_finite(b)):
            raise InvalidAdapterError(
                f"module {module}: its update holds NaN or inf (factors or scale)",
                path=self.path,
                module=module,
                hint="training diverged or the file is damaged; validate lists every such module",
            )
        return LoraFactors(A=a.reshape(a.shape[0], -1), B=b.reshape(b.shape[0], -1), scale=m.scale)

    @property
    def num_parameters(self) -> int:
        return sum(m.numel for m in self.modules.values()) + sum(t.numel for t in self.extra_tensors.values())

    def all_tensor_infos(self) -> list[TensorInfo]:
        infos: list[TensorInfo] = []
        for m in self.modules.values():
            infos += [m.A, m.B] + [t for t in (m.magnitude, m.bias) if t is not None]
        return infos + list(self.extra_tensors.values())
