"""A LoRA adapter from a full fine-tune: per weight, the truncated SVD of ``W_tuned - W_base`` (lora_ops.extract).

Streaming: the two checkpoints are matched by tensor name (their shard layouts may differ), and one pair of
tensors is in memory at a time (plus its float32 difference). Stored dtypes F32, F16 and BF16 are read; the
difference is taken in float32 and the factors are written in float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.patterns import PatternError, compile_pattern
from adapterhub_cli.artifact.provenance import Provenance, base_record, tool_version
from adapterhub_cli.artifact.safetensors import COMPUTE_DTYPES, data_start, read_tensor, torch_dtype
from adapterhub_cli.errors import CorruptFileError, IncompatibleBaseError, InvalidAdapterError, UsageError
from adapterhub_cli.formats.peft import PEFT_PREFIX, peft_key, rank_layout, write_peft
from adapterhub_cli.ops.reduce import check_options


if TYPE_CHECKING:
    import torch


Progress = Callable[[int, int], None]
Embeddings = Literal["lora", "save", "skip"]
EMBEDDING_CHOICES = ("lora", "save", "skip")

#: model types whose linear layers are GPT-2's Conv1D (weight stored (d_in, d_out): PEFT's fan_in_fan_out)
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt"})
#: leaf names of input embeddings (and positional / shared ones)
EMBEDDING_LEAVES = frozenset(
    {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "embed_in"}
)
#: leaf names of output heads tied to (or shaped like) the vocabulary
HEAD_LEAVES = frozenset({"lm_head", "embed_out"})
#: bytes per piece when tensors are compared or measured without loading them whole
CHUNK = 16 << 20


@dataclass(frozen=True)
class ModuleExtraction:
    """One extracted module: its layer kind (``linear``, ``conv1d``, ``conv``, ``embedding``), the update's shape
    (d_out, d_in), the rank kept, how (``exact`` / ``randomized``), ``||dW||_F / ||W_base||_F``, the relative
    Frobenius error of the factors and the optimum at that rank (exact for ``exact``, an estimate for
    ``randomized``: see :mod:`lora_ops.extract`)."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    method: str
    rel_change: float
    rel_error: float
    opt_rel_error: float


@dataclass(frozen=True)
class ChangedTensor:
    """A tensor that differs between the checkpoints but is not a low-rank module of the adapter: ``action`` is
    ``saved`` (a full ``modules_to_save`` copy), ``skipped`` (left out) or ``reported`` (left out: PEFT holds no such
    update); ``why`` says which rule decided."""

    name: str
    shape: tuple[int, ...]
    rel_change: float
    action: str
    why: str


@dataclass
class ExtractResult:
    """The written adapter, what was extracted per module and what else changed."""

    path: Path
    r: int
    rank_pattern: dict[str, int]
    target_modules: list[str]
    modules_to_save: list[str]
    modules: list[ModuleExtraction] = field(default_factory=list)
    changed: list[ChangedTensor] = field(default_factory=list)
    #: tensors equal in both checkpoints (skipped)
    unchanged: int = 0
    params: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)


class _Reader:
    """Reads tensors of one checkpoint by key, one file descriptor open at a time (no memory map)."""

    def __init__(self, view: BaseView) -> None:
        self.view = view
        self._path: Path | None = None
        self._file: Any = None
        self._start: dict[Path, int] = {}

    def _open(self, key: str) -> tuple[int, int, Path]:
        """The open file descriptor of ``key``'s shard, where its data starts, and its path."""
        path = self.view.shard_of[key]
        if path != self._path:
            self.close()
            self._file = path.open("rb")
            self._path = path
        if path not in self._start:
            fd = self._file.fileno()
            self._start[path] = data_start(os.pread(fd, 8, 0), path=path, file_size=os.fstat(fd).st_size)
        return self._file.fileno(), self._start[path], path

    def read(self, key: str) -> torch.Tensor:
        fd, start, path = self._open(key)
        return read_tensor(fd, self.view.tensors[key], start, path=path)

    def chunks(self, key: str) -> Iterator[bytes]:
        """The stored bytes of ``key`` in pieces of at most :data:`CHUNK` bytes."""
        info = self.view.tensors[key]
        offset, remaining = info.start, info.nbytes
        while remaining:
            fd, start, path = self._open(key)
            data = os.pread(fd, min(CHUNK, remaining), start + offset)
            if not data:
                raise CorruptFileError(f"tensor {key!r}: the file ends early", path=path, module=key)
            offset, remaining = offset + len(data), remaining - len(data)
            yield data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._path = None


def _same_bytes(readers: tuple[_Reader, _Reader], key: str, digests: tuple[dict[str, str], dict[str, str]]) -> bool:
    """Whether ``key`` holds the same bytes in both checkpoints, read piece by piece (never a whole tensor); when it
    does, the sha256 of its bytes goes into ``digests`` for both."""
    digest = hashlib.sha256()  # (equal bytes: one hash serves both)
    for a, b in zip(readers[0].chunks(key), readers[1].chunks(key), strict=True):
        if a != b:
            return False
        digest.update(a)
    digests[0][key] = digests[1][key] = digest.hexdigest()
    return True


def _chunk_norms(
    readers: tuple[_Reader, _Reader], key: str, dtype: str, digests: tuple[dict[str, str], dict[str, str]]
) -> tuple[float, float]:
    """``(||W_base||_F, ||W_tuned - W_base||_F)`` of ``key`` (the same float dtype on both sides), piece by piece;
    the sha256 of each side's bytes goes into ``digests`` on the way (the record names the inputs whatever
    ``--embeddings`` says)."""
    import torch

    t = torch_dtype(dtype)
    base_sq = delta_sq = 0.0
    hashes = hashlib.sha256(), hashlib.sha256()
    for a, b in zip(readers[0].chunks(key), readers[1].chunks(key), strict=True):
        hashes[0].update(a)
        hashes[1].update(b)
        wa = torch.frombuffer(bytearray(a), dtype=t).float()
        wb = torch.frombuffer(bytearray(b), dtype=t).float()
        base_sq += float(torch.linalg.vector_norm(wa, dtype=torch.float64)) ** 2
        delta_sq += float(torch.linalg.vector_norm(wb - wa, dtype=torch.float64)) ** 2
    digests[0][key], digests[1][key] = hashes[0].hexdigest(), hashes[1].hexdigest()
    return math.sqrt(base_sq), math.sqrt(delta_sq)


def _non_finite(name: str, path: Path) -> InvalidAdapterError:
    """The refusal of a changed tensor holding NaN or inf (found by its norms, no mask formed)."""
    return InvalidAdapterError(
        f"tensor {name!r} holds NaN or inf (in --base or --tuned)",
        path=path,
        module=name,
        hint="the checkpoint is damaged, or the fine-tune diverged",
    )


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _targets_matcher(targets: str | None) -> Callable[[str], bool]:
    """``--targets``: comma-separated module names matched as PEFT matches a list (the name or its ending after a
    dot), or else a regular expression the whole module name must match (as PEFT matches a string)."""
    if targets is None:
        return lambda name: True
    names = [t.strip() for t in targets.split(",")]
    if all(n and all(c.isalnum() or c in "._-" for c in n) for n in names):
        return lambda name: any(name == t or name.endswith("." + t) for t in names)
    try:
        pattern = compile_pattern(targets)
    except PatternError as e:
        raise UsageError(f"--targets {targets!r}: {e}", hint="give module names (q_proj,v_proj) or a regex") from None
    return pattern.fullmatch


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(dtype=_u8()).numpy().data).hexdigest()


def _u8() -> Any:
    import torch

    return torch.uint8


def _record(view: BaseView, source: str | None, role: str, digests: dict[str, str]) -> dict[str, str | None]:
    """:func:`base_record` of one input, with ``sha256``: the sha256 of the canonical JSON of every tensor's name,
    dtype, shape and the sha256 of its bytes (in name order), i.e. of the weights whatever their shard layout."""
    table = {n: [view.tensors[n].dtype, list(view.tensors[n].shape), d] for n, d in sorted(digests.items())}
    sha = hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {**base_record(view, source), "role": role, "sha256": sha}


def _check_tables(base: BaseView, tuned: BaseView) -> None:
    only_base = sorted(set(base.tensors) - set(tuned.tensors))
    only_tuned = sorted(set(tuned.tensors) - set(base.tensors))
    if only_base or only_tuned:
        parts = []
        if only_base:
            parts.append(f"{len(only_base)} only in --base (e.g. {only_base[0]!r})")
        if only_tuned:
            parts.append(f"{len(only_tuned)} only in --tuned (e.g. {only_tuned[0]!r})")
        raise IncompatibleBaseError(
            f"the checkpoints do not hold the same tensors: {'; '.join(parts)}",
            hint="extract needs --tuned to be a full fine-tune of --base, saved the same way (same architecture and "
            "tensor names)",
        )


def _kind(name: str, shape: tuple[int, ...], conv1d: bool) -> str:
    """``embedding`` (input embeddings and vocabulary heads), ``linear``, ``conv1d``, ``conv`` or ``other``."""
    if not name.endswith(".weight"):
        return "other"
    leaf = _leaf(name[: -len(".weight")])
    if len(shape) == 2 and (leaf in EMBEDDING_LEAVES or leaf in HEAD_LEAVES):
        return "head" if leaf in HEAD_LEAVES else "embedding"
    if len(shape) == 2:
        return "conv1d" if conv1d else "linear"
    if len(shape) == 4:
        return "conv"
    return "other"


def extract_adapter(
    base: BaseView,
    tuned: BaseView,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    targets: str | None = None,
    embeddings: Embeddings = "skip",
    device: str = "cpu",
    method: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    base_source: str | None = None,
    tuned_source: str | None = None,
) -> ExtractResult:
    """Write a PEFT LoRA adapter whose updates are the truncated SVDs of ``tuned - base``, weight by weight.

    Per 2-D weight (Linear; GPT-2's Conv1D, written with ``fan_in_fan_out``) and 4-D weight (Conv2d, a conv LoRA)
    that changed and matches ``targets``: ``dW = W_tuned - W_base`` in float32, k by exactly one rule (``rank``,
    ``energy``, ``sv_ratio``, ``sv_fro``; ``max_rank`` caps the dynamic ones), balanced factors ``B = U sqrt(S)``,
    ``A = sqrt(S) Vᵀ`` (:func:`lora_ops.extract.extract_lora`). The config has ``lora_alpha = r`` and an
    ``alpha_pattern`` equal to the ``rank_pattern``, so every scale is 1. ``target_modules`` lists the leaf names
    when every module of that name was extracted, else full module names.

    Changed input embeddings and vocabulary heads (``lm_head``) follow ``embeddings``: ``lora`` (a LoRA on the
    embedding / head, extracted the same way), ``save`` (a full copy in ``modules_to_save``) or ``skip`` (left out,
    with a warning). Other changed tensors (norms, biases, weights outside ``targets``) are reported and left out.
    Equal tensors are skipped. The provenance records both inputs (:func:`_record`: a sha256 of their weights
    computed while they are read, plus :func:`base_record`'s config and table digests).

    Raises:
        UsageError: a bad rule or option.
        IncompatibleBaseError: the checkpoints hold different tensor names, or a shape differs (a resized vocabulary
            is left out with ``embeddings="skip"``, else refused).
        InvalidAdapterError: a weight holds NaN or inf, or nothing changed.
    """
    import torch

    from lora_ops.errors import NonFiniteError
    from lora_ops.extract import extract_lora_like

    check_options(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
    if embeddings not in EMBEDDING_CHOICES:
        raise UsageError(f"--embeddings must be one of {', '.join(EMBEDDING_CHOICES)}, got {embeddings!r}")
    started = time.perf_counter()
    _check_tables(base, tuned)
    wanted = _targets_matcher(targets)
    conv1d = str(tuned.config.get("model_type") or base.config.get("model_type")) in CONV1D_MODEL_TYPES
    rules = {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro, "max_rank": max_rank}
    # in --tuned's table order: shard by shard (a store's shards are fetched one at a time, as they are reached)
    names = list(tuned.tensors)
    readers = _Reader(base), _Reader(tuned)
    digests: tuple[dict[str, str], dict[str, str]] = ({}, {})
    hashing: list[Future[None]] = []
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds: dict[str, str] = {}
    rows: list[ModuleExtraction] = []
    changed: list[ChangedTensor] = []
    saved: list[str] = []
    warnings: list[str] = []
    unchanged = 0
    unusable: list[str] = []  # targeted weights stored in a dtype extract cannot compute with (8-bit, integer)

    def digest_pair(name: str, b: torch.Tensor, t: torch.Tensor) -> None:
        digests[0][name] = _tensor_digest(b)
        digests[1][name] = _tensor_digest(t)

    pool = ThreadPoolExecutor(1, thread_name_prefix="adapters-extract-hash")
    try:
        for i, name in enumerate(names):
            bi, ti = base.tensors[name], tuned.tensors[name]
            shape = tuple(ti.shape)
            kind = _kind(name, shape, conv1d)
            if tuple(bi.shape) != shape:
                if kind in ("embedding", "head") and embeddings == "skip":
                    _done(hashing)
                    why = "shape differs (--embeddings skip)"
                    changed.append(ChangedTensor(name, shape, float("nan"), "skipped", why))
                    warnings.append(
                        f"{name}: the shape differs ({list(bi.shape)} in --base, {list(shape)} in --tuned: a resized "
                        "vocabulary?); left out (--embeddings skip)"
                    )
                    continue
                hint = (
                    "a PEFT adapter cannot resize a layer: resize the base's embeddings (resize_token_embeddings) and "
                    "save it, or give --embeddings skip to leave this tensor out"
                    if kind in ("embedding", "head")
                    else "extract needs --tuned to be a full fine-tune of --base (same architecture and shapes)"
                )
                raise IncompatibleBaseError(
                    f"tensor {name!r} is {list(bi.shape)} in --base but {list(shape)} in --tuned", hint=hint
                )
            if progress is not None:
                progress(i + 1, len(names))
            if bi.dtype == ti.dtype and _same_bytes(readers, name, digests):
                unchanged += 1
                continue
            floating = bi.dtype in COMPUTE_DTYPES and ti.dtype in COMPUTE_DTYPES
            module = name[: -len(".weight")] if name.endswith(".weight") else name
            if kind in ("embedding", "head") and embeddings == "skip" and floating and bi.dtype == ti.dtype:
                # left out: measured piece by piece, never loaded whole
                base_norm, delta_norm = _chunk_norms(readers, name, ti.dtype, digests)
                if not math.isfinite(delta_norm):
                    raise _non_finite(name, tuned.path)
                rel_change = delta_norm / base_norm if base_norm else float("inf")
                what = "an input embedding" if kind == "embedding" else "a vocabulary head"
                changed.append(ChangedTensor(name, shape, rel_change, "skipped", f"{what} (--embeddings skip)"))
                warnings.append(
                    f"{module} changed ({what}, ||dW||/||W|| = {rel_change:.3g}) and is left out "
                    "(--embeddings skip); --embeddings lora or save keeps it"
                )
                continue
            b_t, t_t = readers[0].read(name), readers[1].read(name)
            _done(hashing)  # at most one pair is being hashed while the next is read
            hashing.append(pool.submit(digest_pair, name, b_t, t_t))
            if not floating:
                why = f"not a float tensor ({ti.dtype})"
                targeted = kind != "other" and wanted(module)
                if targeted and not (kind in ("embedding", "head") and embeddings == "skip"):
                    stored = f"{bi.dtype} in --base, {ti.dtype} in --tuned"
                    why = f"stored as {stored}: extract computes on 16/32/64-bit float weights only"
                    unusable.append(f"{module} ({stored})")
                    warnings.append(
                        f"{module} is {why} (an 8-bit or integer checkpoint keeps scales beside its weights); left "
                        "out: dequantize the checkpoint to bf16 first"
                    )
                changed.append(ChangedTensor(name, shape, float("nan"), "reported", why))
                continue
            delta = t_t.to(device=device, dtype=torch.float32, copy=True)  # t_t is being hashed: never in place
            b32 = b_t.to(device=device, dtype=torch.float32)
            base_norm = float(torch.linalg.vector_norm(b32))
            delta.sub_(b32)
            del b32
            delta_norm = float(torch.linalg.vector_norm(delta))
            if not math.isfinite(delta_norm):  # NaN / inf anywhere in dW (no m x n mask formed for the check)
                raise _non_finite(name, tuned.path)
            rel_change = delta_norm / base_norm if base_norm else float("inf")
            if kind in ("embedding", "head") and embeddings != "lora":
                what = "an input embedding" if kind == "embedding" else "a vocabulary head"
                if embeddings == "save":
                    saved.append(module)
                    tensors[PEFT_PREFIX + name] = t_t.clone()
                    changed.append(ChangedTensor(name, shape, rel_change, "saved", f"{what} (--embeddings save)"))
                else:
                    changed.append(ChangedTensor(name, shape, rel_change, "skipped", f"{what} (--embeddings skip)"))
                    warnings.append(
                        f"{module} changed ({what}, ||dW||/||W|| = {rel_change:.3g}) and is left out "
                        "(--embeddings skip); --embeddings lora or save keeps it"
                    )
                continue
            if kind == "other" or not wanted(module):
                why = "not a 2-D or conv weight (norm, bias, ...)" if kind == "other" else "not in --targets"
                changed.append(ChangedTensor(name, shape, rel_change, "reported", why))
                continue
            op_kind = "linear" if kind == "head" else kind
            try:
                x = extract_lora_like(delta, op_kind, method=method, seed=seed, **rules)  # type: ignore[arg-type]
            except NonFiniteError as e:
                raise InvalidAdapterError(str(e), path=tuned.path, module=name) from None
            del delta
            if x is None:
                unchanged += 1
                continue
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if op_kind == "embedding" else ("lora_A", "lora_B")
            tensors[_key(module, a_key)] = x.A.cpu()
            tensors[_key(module, b_key)] = x.B.cpu()
            ranks[module] = x.rank
            kinds[module] = op_kind
            d_out, d_in = x.B.shape[0], int(x.A[0].numel())
            row = ModuleExtraction(
                module, op_kind, (d_out, d_in), x.rank, x.method, rel_change, x.rel_error, x.opt_rel_error
            )
            rows.append(row)
        _done(hashing)
    finally:
        pool.shutdown(wait=True)
        for reader in readers:
            reader.close()
    if not rows and not saved and unusable:
        raise InvalidAdapterError(
            f"nothing to extract: the targeted weights that differ are stored in dtypes extract cannot compute "
            f"with: {', '.join(unusable[:3])}" + (f" and {len(unusable) - 3} more" if len(unusable) > 3 else ""),
            path=tuned.path,
            hint="dequantize the checkpoint to bf16 (an 8-bit or integer checkpoint keeps scales beside its weights), "
            "then extract from that",
        )
    if not rows and not saved:
        raise InvalidAdapterError(
            "nothing to extract: no targeted weight differs between --base and --tuned"
            + (f" ({len(changed)} other tensors changed)" if changed else ""),
            path=tuned.path,
            hint="check --tuned is the fine-tune of --base, and --targets",
        )
    tied = base.tied_embedding()
    if tied is not None and (tied[: -len(".weight")] in saved or kinds.get(tied[: -len(".weight")]) == "embedding"):
        warnings.append(
            "the model ties its output head to the input embedding: the adapter changes the embedding's input side "
            "only (PEFT does not re-tie a copy or an embedding LoRA to the head)"
        )
    target_modules = _target_modules(list(ranks), tuned)
    r, rank_pattern = rank_layout(ranks)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(tuned.config),
        "base_model_name_or_path": base_source or base.name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": target_modules,
        "modules_to_save": sorted({_leaf(m) for m in saved}) or None,
        "fan_in_fan_out": conv1d,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    params: dict[str, Any] = {k: v for k, v in rules.items() if v is not None}
    params.update(embeddings=embeddings, method=method, seed=seed, **({"targets": targets} if targets else {}))
    prov = Provenance(
        source="",
        tool=tool_version(),
        operation="extract",
        parameters=params,
        inputs=[_record(base, base_source, "base", digests[0]), _record(tuned, tuned_source, "tuned", digests[1])],
    ).record()
    path = write_peft(out, config=config, tensors=tensors, provenance=prov, overwrite=overwrite)
    return ExtractResult(
        path=path,
        r=r,
        rank_pattern=rank_pattern,
        target_modules=target_modules,
        modules_to_save=config["modules_to_save"] or [],
        modules=rows,
        changed=changed,
        unchanged=unchanged,
        params=sum(t.numel() for t in tensors.values()),
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )


def _done(futures: list[Future[None]]) -> None:
    while futures:
        futures.pop().result()


def _key(module: str, part: str) -> str:
    """PEFT's stored key: ``lora_A`` / ``lora_B`` take ``.weight``, the embedding factors do not."""
    return f"{PEFT_PREFIX}{module}.{part}" if part.startswith("lora_embedding") else peft_key(module, part)


def _target_modules(modules: list[str], view: BaseView) -> list[str]:
    """Leaf names when every module of each leaf name in the checkpoint was extracted, else full module names."""
    chosen = set(modules)
    by_leaf: dict[str, set[str]] = {}
    for key in view.tensors:
        if key.endswith(".weight"):
            by_leaf.setdefault(_leaf(key[: -len(".weight")]), set()).add(key[: -len(".weight")])
    leaves = {_leaf(m) for m in chosen}
    if all(by_leaf.get(leaf, set()) <= chosen for leaf in leaves):
        return sorted(leaves)
    return sorted(chosen)


def _task_type(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if arch.endswith(suffix):
            return task
    return None
