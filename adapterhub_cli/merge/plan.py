"""What a merge does, decided before any weight is read or any file written.

Every output tensor gets a :class:`TensorPlan` (copied byte for byte, merged from a base tensor with each adapter's
contribution, or replaced by a ``modules_to_save`` copy), the output is cut into shards, and the changes to
``config.json`` are fixed. The checks that can refuse a merge run here too (arguments, misfits such as a DoRA
unmerge, validation against the base), so a refused merge writes nothing: no output, no temporary folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import BaseView, open_base
from adapterhub_cli.artifact.preflight import require_valid
from adapterhub_cli.artifact.safetensors import COMPUTE_DTYPES, DTYPE_BITS, DTYPE_OPTIONS, TensorInfo, torch_name
from adapterhub_cli.artifact.validate import validate_against
from adapterhub_cli.errors import UsageError
from adapterhub_cli.merge import bnb


CONV1D_MODEL_TYPES = ("gpt2", "gpt_bigcode", "openai-gpt")
#: what PEFT stores trainable tokens (``trainable_token_indices``) under: ``<embedding>.token_adapter.<this>``
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class Contribution:
    """One adapter module's update to one base tensor."""

    adapter: int
    module: str
    weight: float
    #: ``"weight"``: the update ``scale * B @ A``; ``"bias"``: ``scale * lora_B.bias`` added to the layer's bias
    #: (an adapter saved with ``lora_bias=True``)
    part: str = "weight"


@dataclass
class TensorPlan:
    """How one output tensor is produced: copied, merged from ``source`` with contributions, or replaced."""

    name: str
    source: str  # base tensor key read
    dtype: str  # output dtype (safetensors name)
    shape: tuple[int, ...]
    contributions: list[Contribution] = field(default_factory=list)
    replacement: tuple[int, str] | None = None  # (adapter index, stored key) of a modules_to_save copy
    #: with bitsandbytes output: the stored tensors (key, dtype, shape) the quantized weight becomes
    quantized_entries: list[tuple[str, str, tuple[int, ...]]] | None = None

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return self.quantized_entries or [(self.name, self.dtype, self.shape)]

    @property
    def nbytes(self) -> int:
        total = 0
        for _, dtype, shape in self.entries:
            n = 1
            for d in shape:
                n *= d
            total += (n * DTYPE_BITS[dtype] + 7) // 8
        return total

    @property
    def touched(self) -> bool:
        return bool(self.contributions) or self.replacement is not None


@dataclass
class MergePlan:
    """Everything a merge does, decided up front."""

    stored: BaseView  # the base as stored (a bitsandbytes base: its packed tensors)
    view: BaseView  # the base as the adapters see it (a bitsandbytes base: its logical 16-bit weights)
    tensors: list[TensorPlan]
    shards: list[list[TensorPlan]]
    quantized_in: dict[str, list[str]]  # bitsandbytes weights of the base -> their companion tensors
    quantize: str | None  # bitsandbytes scheme of the output
    config_updates: dict[str, Any]
    config_drop: tuple[str, ...]
    untied: list[str]
    #: the warnings ``validate`` gives for each adapter against the base (``base-name-mismatch`` ...)
    warnings: list[str] = field(default_factory=list)
    #: output shard file names (those of the base when its layout is kept), None: the standard names
    shard_files: list[str] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.tensors)

    def copied(self, p: TensorPlan) -> bool:
        """Whether ``p``'s stored bytes are copied from the base unchanged (the engine still checks a floating one
        for NaN / inf as it copies them: :class:`.shards.FiniteCheck`)."""
        return (
            not p.touched
            and p.dtype == self.view.tensors[p.source].dtype
            and p.source not in self.quantized_in
            and p.quantized_entries is None
        )


def build_plan(
    base: BaseView | str | Path,
    adapters: list[Adapter],
    *,
    weights: list[float] | None,
    dtype: str,
    max_shard_size: str | int | None,
    reverse: bool,
    quantize: str | None,
) -> MergePlan:
    """Check the request and plan it: a UsageError / IncompatibleBaseError here means nothing was written.

    ``max_shard_size`` None keeps the base's layout: the same shard files holding the same tensors, in the same
    order (what ``unmerge`` does by default, so a merged model's shards come back as they were)."""
    stored = base if isinstance(base, BaseView) else open_base(base)
    scheme_in = bnb.bnb_scheme(stored.config)
    _check_quantization(stored, scheme_in, quantize)
    view = bnb.logical_view(stored) if scheme_in else stored
    quantized_in = bnb.companions(stored) if scheme_in else {}
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    out_dtype = output_dtype(dtype)
    shard_bytes = shard_limit(max_shard_size)
    refuse_misfits(adapters, reverse=reverse)
    warnings = []
    for a in adapters:
        # headers and config only: the NaN / inf check of the factors rides on the merge's own read of each one
        # (:meth:`.compute._Merger._load`), and a refusal there still leaves nothing written
        report = validate_against(a, view, check_weights=False)
        if report.errors:
            require_valid(a, base=view, check_weights=False)  # raises, with the message every writing command gives
        prefix = f"{a.path}: " if len(adapters) > 1 else ""
        warnings += [f"{prefix}{f.code}: {f.message}" for f in report.warnings]
    plans = plan_merge(view, adapters, weights, out_dtype)
    if quantize:
        _plan_quantized(plans, view, quantize, quantized_in if scheme_in else None)
    shard_files = None
    if shard_bytes is None:
        shards, shard_files = keep_layout(plans, stored)
    else:
        shards = plan_shards(plans, shard_bytes)
    untied = sorted(p.name for p in plans if p.source != p.name)
    updates, drop = config_changes(
        view.config, plans, untied=bool(untied), out_dtype=out_dtype, quantize=quantize, dequantized=bool(scheme_in)
    )
    return MergePlan(
        stored=stored,
        view=view,
        tensors=plans,
        shards=shards,
        quantized_in=quantized_in,
        quantize=quantize,
        config_updates=updates,
        config_drop=drop,
        untied=untied,
        warnings=warnings,
        shard_files=shard_files,
    )


def shard_limit(max_shard_size: str | int | None) -> int | None:
    """The largest shard in bytes (``"5GB"``, ``"500MB"``, a number of bytes); None keeps the base's layout.

    Raises:
        UsageError: not a size, or not above zero.
    """
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int | str):
        raise UsageError(f"bad shard size {max_shard_size!r}: use e.g. 5GB, 500MB or a number of bytes")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if limit <= 0:
        raise UsageError(
            f"shard size {max_shard_size!r} is not above zero: every shard would be empty",
            hint="give a positive size, e.g. 5GB or 500MB",
        )
    return limit


def keep_layout(plans: list[TensorPlan], stored: BaseView) -> tuple[list[list[TensorPlan]], list[str] | None]:
    """The shards of ``stored`` itself: each output tensor goes to the file its source tensor is in, files in name
    order, tensors in the plan's order. The file names too (None for a single file, or where a shard would be
    left empty and the standard ``-0000i-of-0000n`` names must be renumbered)."""
    # dict.get on the map itself: the file name without fetching a store base's shard
    where = {key: dict.get(stored.shard_of, key) for key in stored.tensors}
    files: dict[str, list[TensorPlan]] = {}
    for p in plans:
        path = where.get(p.source)
        files.setdefault(path.name if path is not None else "", []).append(p)
    names = sorted({path.name for path in where.values() if path is not None})
    if len(names) <= 1 or "" in files:
        return [plans], None
    shards = [files[n] for n in names if n in files]
    return shards, (names if len(shards) == len(names) else None)


def _check_quantization(stored: BaseView, scheme_in: str | None, quantize: str | None) -> None:
    if quantize is not None and quantize not in bnb.SCHEMES:
        raise UsageError(f"unknown quantization {quantize!r}; choose one of {', '.join(bnb.SCHEMES)}")
    if (scheme_in or quantize) and stored.config.get("model_type") in CONV1D_MODEL_TYPES:
        raise UsageError(
            f"bitsandbytes checkpoints of {stored.config.get('model_type')} models (Conv1D layers) are "
            "not supported yet",
            hint="merge into the 16-bit base without --quantize",
        )


def output_dtype(dtype: str) -> str | None:
    """The safetensors dtype ``--dtype`` asks for (``bf16`` -> ``BF16``); None for ``auto`` (keep the base's)."""
    if dtype != "auto" and dtype not in DTYPE_OPTIONS:
        raise UsageError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(DTYPE_OPTIONS))}")
    return None if dtype == "auto" else DTYPE_OPTIONS[dtype]


def refuse_misfits(adapters: list[Adapter], *, reverse: bool) -> None:
    """Refuse what the merge cannot do exactly, before anything is written: undoing a DoRA merge, and DoRA on a
    convolution (PEFT's conv DoRA normalises per output channel over the whole kernel, which is not done yet)."""
    for a in adapters:
        refuse_unmergeable(a)
        if reverse and any(name.endswith(TOKENS_SUFFIX) for name in a.extra_tensors):
            raise UsageError(
                f"{a.path} trains token embeddings (trainable_token_indices): a merge replaced those rows, and the "
                "original rows are not in the adapter, so it cannot be undone",
                hint="merge into the original base again instead",
            )
        for m in a.modules.values():
            if m.magnitude is None:
                continue
            if reverse:
                raise UsageError(
                    f"{a.path}: DoRA merges cannot be undone from the merged weights alone (the norm of "
                    "the original weight is lost)",
                    hint="merge into the original base again instead",
                )
            if m.kind == "conv":
                raise UsageError(
                    f"{a.path}: module {m.name}: DoRA on convolutions cannot be merged yet",
                    hint="merge a LoRA without use_dora, or load the adapter with PEFT and merge_and_unload()",
                )


def refuse_unmergeable(a: Adapter) -> None:
    """Refuse, by name, the config variants PEFT itself will not merge (or that this merge cannot do exactly)."""
    cfg = a.config
    if cfg.alora_invocation_tokens is not None:
        raise UsageError(
            f"{a.path} is an aLoRA adapter (alora_invocation_tokens {cfg.alora_invocation_tokens}): it acts only "
            "on the tokens after its invocation sequence, so no merged weight equals it; PEFT refuses to merge it "
            '("aLoRA does not support merging")',
            hint="serve it unmerged (PEFT, or vLLM with aLoRA support)",
        )
    if cfg.raw.get("layer_replication"):
        raise UsageError(
            f"{a.path} uses layer_replication {cfg.raw['layer_replication']}: its replicated layers share "
            'their base weights, so no merged checkpoint equals it; PEFT means to refuse it too ("Cannot merge LORA '
            'layers when base model layers are replicated", LoraModel._check_merge_allowed)',
            hint="load it with PEFT unmerged",
        )


def plan_merge(
    base: BaseView, adapters: list[Adapter], weights: list[float], out_dtype: str | None
) -> list[TensorPlan]:
    """Decide, for every output tensor, where it comes from and which updates it receives.

    A model with tied embeddings whose head or embedding an adapter changes is untied: the output stores an
    explicit ``lm_head.weight`` (the embedding, plus the head's own updates) so neither side silently takes the
    other's update (transformers#45127).
    """
    plans = {
        key: TensorPlan(name=key, source=key, dtype=_out_dtype(info, out_dtype), shape=info.shape)
        for key, info in base.tensors.items()
    }
    tied = base.tied_embedding()
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        for m in adapter.modules.values():
            if tied and m.name.split(".")[-1] == "lm_head":
                _untied_head(plans, tied).contributions.append(Contribution(i, m.name, w))
                continue
            key = base.find_weight(m.name)
            assert key is not None  # validation ran first
            plans[key].contributions.append(Contribution(i, m.name, w))
            if m.bias is not None:
                plans[_bias_key(base, adapter, m.name, key)].contributions.append(Contribution(i, m.name, w, "bias"))
        for name, info in adapter.extra_tensors.items():
            if name.endswith(TOKENS_SUFFIX):
                _plan_tokens(plans, base, adapter, i, name, tied)
                continue
            # PEFT saves a targeted embedding / head as `<module>.base_layer.weight` (save_embedding_layers)
            target = name.replace(".base_layer.", ".")
            if tied and target.split(".")[-2:] == ["lm_head", "weight"]:
                plan = _untied_head(plans, tied)
            else:
                key = base.find_weight(target, suffix="")
                if key is None:
                    raise UsageError(f"{adapter.path}: saved tensor {name!r} has no counterpart in the base")
                plan = plans[key]
            plan.replacement = (i, info.name)
    if tied and plans[tied].touched:
        _untied_head(plans, tied)
    return list(plans.values())


def token_indices(adapter: Adapter, module: str) -> list[int]:
    """The token ids whose embedding rows ``module``'s trainable tokens replace (``trainable_token_indices``: a
    list for the input embedding, or an object mapping module names to lists), in the stored rows' order."""
    spec = adapter.config.raw.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for key, ids in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in ids]
    raise UsageError(f"{adapter.path}: module {module} stores trainable tokens but trainable_token_indices names none")


def _plan_tokens(
    plans: dict[str, TensorPlan], base: BaseView, adapter: Adapter, i: int, name: str, tied: str | None
) -> None:
    """Plan PEFT's trainable-tokens merge: the embedding rows of ``trainable_token_indices`` are replaced by the
    stored rows (``TrainableTokensLayer.merge``: ``weight.index_copy(0, indices, deltas)``)."""
    module = name.removesuffix(TOKENS_SUFFIX)
    key = base.find_weight(module)
    info = adapter.extra_tensors[name]
    if key is None:
        raise UsageError(f"{adapter.path}: trainable tokens of {module}: the base has no such module")
    if tied and key == tied:
        raise UsageError(
            f"{adapter.path}: trainable tokens on a base with tied embeddings cannot be merged yet",
            hint="load it with PEFT and merge_and_unload()",
        )
    ids = token_indices(adapter, module)
    rows = base.tensors[key].shape
    if len(info.shape) != 2 or info.shape != (len(ids), rows[1]) or any(not 0 <= t < rows[0] for t in ids):
        raise UsageError(
            f"{adapter.path}: trainable tokens of {module}: {list(info.shape)} rows for token ids {ids} do not fit "
            f"the base's {list(rows)} embedding"
        )
    plans[key].contributions.append(Contribution(i, name, 1.0, "tokens"))


def _bias_key(base: BaseView, adapter: Adapter, module: str, weight_key: str) -> str:
    """The base tensor holding the bias of ``module`` (whose weight is ``weight_key``), which a ``lora_bias``
    adapter's ``lora_B.bias`` is added to; refused as PEFT refuses it when the layer has none."""
    key = weight_key.removesuffix("weight") + "bias"
    if key not in base.tensors:
        raise UsageError(
            f"{adapter.path}: module {module} has a lora_B bias (lora_bias=True) but the base layer has no bias: "
            'PEFT cannot merge it either ("Impossible to merge LoRA with `lora_bias=True` because the base layer '
            'has no bias")',
            hint="merge into a base whose layers have biases, or use the adapter unmerged with PEFT",
        )
    return key


def _untied_head(plans: dict[str, TensorPlan], tied: str) -> TensorPlan:
    """The explicit ``lm_head.weight`` of an untied output (made on first use: a copy of the embedding)."""
    return plans.setdefault(
        "lm_head.weight",
        TensorPlan(name="lm_head.weight", source=tied, dtype=plans[tied].dtype, shape=plans[tied].shape),
    )


def _out_dtype(info: TensorInfo, out_dtype: str | None) -> str:
    if out_dtype is None or info.dtype not in COMPUTE_DTYPES:
        return info.dtype
    return out_dtype


def _plan_quantized(
    plans: list[TensorPlan], view: BaseView, quantize: str, quantized_in: dict[str, list[str]] | None
) -> None:
    """Give each weight the output quantizes its bitsandbytes entries: those quantized in the base when it is
    quantized (``quantized_in``), else those transformers would quantize."""
    for p in plans:
        if quantized_in is not None:
            wanted = p.source in quantized_in
        else:
            wanted = bnb.should_quantize(p.name, p.shape, view.config)
        if wanted and len(p.shape) == 2 and p.dtype in bnb.COMPUTE_DTYPES:
            shape = (p.shape[0], p.shape[1])
            p.quantized_entries = bnb.planned_entries(p.name, shape, quantize, compute_dtype=p.dtype)


def config_changes(
    config: dict[str, Any],
    plans: list[TensorPlan],
    *,
    untied: bool,
    out_dtype: str | None,
    quantize: str | None,
    dequantized: bool,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The ``config.json`` keys the output sets, and those it drops: a bitsandbytes base (``dequantized``)
    written in 16 bits becomes a plain checkpoint."""
    updates: dict[str, Any] = {"tie_word_embeddings": False} if untied else {}
    if out_dtype:
        # transformers >= 4.56 writes and reads "dtype", older versions "torch_dtype": update what the base has
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        updates.update(dict.fromkeys(keys, torch_name(out_dtype)))
    if quantize:
        dtypes = {p.dtype for p in plans if p.quantized_entries}
        compute = torch_name(dtypes.pop() if dtypes else "BF16")
        updates["quantization_config"] = bnb.quantization_config(quantize, compute)
        return updates, ()
    return updates, ("quantization_config",) if dequantized else ()


def plan_shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Cut the output into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MB"``, ``"2GiB"``, or a plain number of bytes."""
    units = {
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "B": 1,
    }
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * units[unit])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise UsageError(f"bad size {text!r}: use e.g. 5GB, 500MB or a number of bytes") from None
