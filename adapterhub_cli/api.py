"""The public Python API: each function orchestrates formats, validation and ops and returns data (no printing).

Every function that writes (reduce, combine, quantize, dequantize, merge, unmerge, convert, pull) first checks its
output path against every local path it reads (:func:`adapterhub_cli.artifact.files.check_output`: never an input,
a folder holding one or inside one; an existing output replaced only with ``overwrite`` and only if this tool wrote
it), and checks ``weights`` are finite numbers within ``±MAX_WEIGHT``, before anything is written.

Every function that reads adapters or bases takes ``token`` (the Hub token for store refs; default ``HF_TOKEN`` or the
saved login) and, where it reads adapters, ``base`` (a local checkpoint whose tensor names map a kohya file's names
to modules; default ``$ADAPTERS_BASE``), as every CLI command has ``--token`` and ``--base``. Error messages name
options as the CLI spells them (``--overwrite``): the keyword argument is the same name with underscores
(``overwrite=True``); see :mod:`adapterhub_cli.errors`.
"""

from __future__ import annotations

import contextlib
import inspect as _pyinspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.files import check_output, sha256_file
from adapterhub_cli.artifact.ref import AdapterRef
from adapterhub_cli.artifact.report import InspectReport, build_report
from adapterhub_cli.artifact.serving import check_target
from adapterhub_cli.artifact.validate import ValidationReport, validate_against
from adapterhub_cli.errors import AdaptersError, InvalidAdapterError, UsageError
from adapterhub_cli.formats import detect_format, get_format
from adapterhub_cli.merge.each import EachResult, EachTarget, run_merge_each
from adapterhub_cli.merge.engine import MergeResult, run_merge
from adapterhub_cli.ops.analyze import AnalyzeReport, analyze_adapter, check_plot_path, write_plot
from adapterhub_cli.ops.combine import CombineResult, combine_adapters
from adapterhub_cli.ops.combine import check_options as check_combine_options
from adapterhub_cli.ops.convert import ConvertResult
from adapterhub_cli.ops.diff import DiffReport, diff_adapters
from adapterhub_cli.ops.extract import Embeddings, ExtractResult, extract_adapter
from adapterhub_cli.ops.quantize import QuantizeResult, dequantize_adapter, quantize_adapter
from adapterhub_cli.ops.reduce import Progress, ReduceResult, reduce_adapter
from adapterhub_cli.ops.reduce import check_options as check_reduce_options
from adapterhub_cli.stores import open_base, open_store_adapter


if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from adapterhub_cli.stores.base import Store
    from adapterhub_cli.stores.records import PullResult, PushResult, VersionInfo


AdapterLike = Adapter | str | Path
BaseLike = BaseView | str | Path

#: The largest ``|weight|`` combine and merge accept: beyond it a weight is a typo, not a blend.
MAX_WEIGHT = 1e6


def _store_paths(store: Store, ref: str | AdapterRef) -> dict[Path, str]:
    """The local folders ``store`` reads ``ref`` from, when known: a local registry's root, the Hub's cache."""
    parsed = store.parse(ref)
    paths = {Path(parsed.root): "local registry"} if parsed.root else {}
    if store.name == "hf":
        from huggingface_hub import constants

        paths[Path(constants.HF_HUB_CACHE)] = "Hugging Face cache"
    return paths


def _inputs(*groups: tuple[str, Sequence[object]]) -> dict[Path, str]:
    """Every local path an operation reads, and what it is (named in a refusal), from ``(what, items)`` groups: an
    :class:`Adapter` gives its folder and tensor file, a :class:`BaseView` its folder, a path itself, and a store ref
    the store's local folders (:func:`_store_paths`)."""
    from adapterhub_cli.stores import find_store

    paths: dict[Path, str] = {}
    for what, items in groups:
        for item in items:
            found: dict[Path, str] = {}
            if isinstance(item, Adapter):
                found = {p: what for p in (item.path, item.tensor_file) if p is not None}
            elif isinstance(item, BaseView):
                found = {item.path: what}
            elif isinstance(item, str | Path):
                store = find_store(str(item))
                found = {Path(item): what} if store is None else _store_paths(store, str(item))
            for path, label in found.items():
                paths.setdefault(path, label)
    return paths


def _names_base(base: object) -> str | Path | None:
    """``base`` when it is a local path (what a kohya file's names are mapped through), else None (a store ref or
    a view: adapters are then read without it, as with no ``base``)."""
    from adapterhub_cli.stores import find_store

    return base if isinstance(base, str | Path) and find_store(str(base)) is None else None


def check_weights(weights: list[float] | None, count: int | None = None) -> None:
    """Refuse ``weights`` that are not finite numbers within ``±MAX_WEIGHT`` (zero is fine), or not ``count`` of
    them (one per adapter), before anything is read or written."""
    if weights is not None and count is not None and len(weights) != count:
        raise UsageError(
            f"--weights has {len(weights)} value(s) for {count} adapter(s): give one weight per adapter",
            hint="e.g. --weights " + ",".join(["1"] * count),
        )
    for w in weights or []:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise UsageError(
                f"weight {w!r} is not a finite number within ±{MAX_WEIGHT:g}",
                hint="give --weights as finite numbers, e.g. --weights 1,0.5",
            )


def load(
    source: AdapterLike | AdapterRef,
    *,
    format: str | None = None,
    allow_pickle: bool = False,
    strict: bool = True,
    api: HfApi | None = None,
    token: str | None = None,
    base: str | Path | None = None,
) -> Adapter:
    """Read an adapter's config and tensor headers (weights load lazily).

    Args:
        source: a PEFT adapter folder, a bare adapter ``.safetensors`` file, an :class:`Adapter` (returned as
            is), or a store ref: the Hub's (``org/name@v1.2.0``, ``org/name@latest``, ``org/name@^1.2``,
            ``hf://org/name@rev``), a local registry's (``file:///srv/adapters/org/name@^1.2``) or a plugin store's.
            Its config and the safetensors header are read by range requests, and the weight file is fetched
            (into the HF cache for the Hub; sha256-checked) only when a tensor is first needed.
        format: a registered format name; by default the format is detected.
        allow_pickle: accept a legacy ``adapter_model.bin``, loaded with ``torch.load(weights_only=True)``.
        strict: refuse an adapter whose config disagrees with its tensors (a wrong ``r`` / ``rank_pattern``
            would silently give every module the wrong scale). ``validate`` reads with ``strict=False`` and
            reports the same problem as a finding.
        api, token: the ``huggingface_hub.HfApi`` (endpoint) and token for a Hub ref; by default ``HfApi()``.
        base: for formats whose module names need the base model (kohya files): a local checkpoint folder or file
            whose tensor names map the file's names to modules (default: ``$ADAPTERS_BASE``); others ignore it, and
            so is a store ref (``validate`` and ``merge`` pass their base here whatever it is).

    Raises:
        AdapterNotFoundError, InvalidAdapterError, CorruptFileError, UnsafeFileError, UnknownFormatError,
        HubError (HubNotFoundError, HubAuthError) for a Hub ref.
    """
    if isinstance(source, Adapter):
        return source
    stored = open_store_adapter(source, allow_pickle=allow_pickle, api=api, token=token)
    if stored is not None:
        adapter = stored
        path = adapter.path
    else:
        from adapterhub_cli.stores.publish import pulled_from

        path = Path(str(source))
        fmt = get_format(format) if format else detect_format(path)
        params = _pyinspect.signature(fmt.read).parameters
        kwargs: dict[str, object] = {"allow_pickle": allow_pickle} if "allow_pickle" in params else {}
        if _names_base(base) is not None and "base" in params:
            kwargs["base"] = base
        adapter = fmt.read(path, **kwargs)
        pinned = pulled_from(path) if path.is_dir() else None
        if pinned and adapter.provenance is not None:
            adapter.provenance.source = pinned  # pulled from the Hub: keep the pinned commit
    if strict and not adapter.config_inferred:
        for m in adapter.modules.values():
            want = adapter.config.rank_for(m.name)
            if want != m.rank:
                raise InvalidAdapterError(
                    f"adapter_config.json says rank {want} for {m.name} but its tensors have rank {m.rank}",
                    path=path,
                    module=m.name,
                    hint="fix r / rank_pattern in adapter_config.json (run `adapters validate` for every finding)",
                )
    return adapter


def inspect(
    source: AdapterLike,
    *,
    modules: bool = False,
    spectrum: bool = False,
    sha256: bool = True,
    token: str | None = None,
    base: str | Path | None = None,
) -> InspectReport:
    """Summarise an adapter from its config and headers; ``spectrum`` also loads the factors.

    Args:
        modules: add one row per module (name, d_out x d_in, rank, alpha, scale, dtype).
        spectrum: add per-module singular values, Frobenius norm and 90% / 99% effective ranks of the
            update, computed from the r x r core (never the dense d_out x d_in matrix).
        sha256: hash the tensor file (cached by file identity and modification time).
        token, base: as for :func:`load`.
    """
    adapter = load(source, token=token, base=base)
    remote = getattr(adapter.source, "remote", None)  # a Hub adapter: the Hub's LFS sha256, nothing downloaded
    digest = sha256_file(adapter.tensor_file) if sha256 and adapter.tensor_file else None
    if digest is None and sha256 and remote is not None:
        digest = remote.sha256
    if adapter.provenance is not None:
        adapter.provenance.sha256 = digest
    return build_report(adapter, sha256=digest, modules=modules, spectrum=spectrum)


def validate(
    source: AdapterLike,
    *,
    base: BaseLike,
    check_weights: bool = True,
    gguf: bool = False,
    target: str | Sequence[str] | None = None,
    max_lora_rank: int | None = None,
    lora_target_modules: Sequence[str] | None = None,
    token: str | None = None,
) -> ValidationReport:
    """Check that an adapter fits a base checkpoint (read through config and headers only).

    Args:
        base: a checkpoint folder (config.json + model.safetensors or shards with their index), a store ref
            (``org/name@rev``, ``file:///srv/adapters/org/name@1.2.0``) read by range requests, or a BaseView.
        check_weights: also load the adapter's tensors and check they are finite.
        target: serving targets to check as well (``"gguf"``, ``"vllm"``, or several): what llama.cpp's GGUF
            converter and loader, or vLLM's LoRA loader, would refuse or silently lose (``gguf-*`` / ``vllm-*``
            findings; see :mod:`adapterhub_cli.artifact.serving`).
        gguf: the same as ``target="gguf"`` (kept for compatibility).
        max_lora_rank: vLLM's ``--max-lora-rank`` for the ``vllm`` target (default 16, vLLM's default).
        token: the Hub token for a store ref (adapter or base). A local ``base`` also maps a kohya file's names.
        lora_target_modules: vLLM's ``--lora-target-modules`` for the ``vllm`` target (module names; None: vLLM
            applies every module it supports): adapter modules outside it are reported as silently dropped.

    Returns:
        a report whose ``ok`` is False when an error-level finding was made.

    Raises:
        UsageError: an unknown target; ``max_lora_rank`` or ``lora_target_modules`` without the ``vllm`` target
            (they would be ignored).
    """
    targets = [target] if isinstance(target, str) else list(target or [])
    if gguf and "gguf" not in targets:
        targets.append("gguf")
    for option, value in (("--max-lora-rank", max_lora_rank), ("--lora-target-modules", lora_target_modules)):
        if value is not None and "vllm" not in targets:
            raise UsageError(f"{option} applies to --target vllm only", hint=f"add --target vllm, or drop {option}")
    adapter = load(source, strict=False, token=token, base=_names_base(base))
    view = base if isinstance(base, BaseView) else open_base(base, token=token)
    report = validate_against(adapter, view, check_weights=check_weights)
    for name in targets:
        report.findings.extend(
            check_target(name, adapter, view, max_lora_rank=max_lora_rank, lora_target_modules=lora_target_modules)
        )
    return report


def reduce(
    source: AdapterLike,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
    base: str | Path | None = None,
) -> ReduceResult:
    """Reduce every module of an adapter to its optimal rank-k approximation and write it to ``out``.

    Exactly one rule picks k per module: ``rank`` (fixed), ``energy`` (the fewest singular values holding that
    fraction of ``||dW||_F²``), ``sv_ratio`` (every singular value >= sigma_1 / sv_ratio) or ``sv_fro`` (the fewest
    holding that fraction of ``||dW||_F``, i.e. energy sv_fro²); ``max_rank`` caps k. The output is a PEFT folder
    (per-module ranks as rank_pattern) written atomically; inputs are checked first and never modified.

    A rule that cannot be followed or would partly be ignored is a ``UsageError`` before anything is read (not
    exactly one rule; ``max_rank`` with ``rank``), and so is a ``rank`` not below any module's rank; a dynamic rule
    that keeps every rank writes the output with a warning (``result.warnings``, ``result.unchanged``).
    ``token``, ``base``: as for :func:`load`.
    """
    check_reduce_options(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
    adapter = load(source, token=token, base=base)
    check_output(out, _inputs(("adapter", [adapter, source])), overwrite=overwrite)
    return reduce_adapter(
        adapter,
        out,
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_fro=sv_fro,
        max_rank=max_rank,
        overwrite=overwrite,
        progress=progress,
    )


def diff(a: AdapterLike, b: AdapterLike, *, token: str | None = None, base: str | Path | None = None) -> DiffReport:
    """Compare two adapters: config changes, modules only in one, and per shared module the norms, cosine,
    relative distance ``||dW_B - dW_A|| / ||dW_A||`` and top-subspace overlap, all from the factors.

    The verdict is "identical" (every update within the storage dtype's tolerance), "scaled copy" (B's
    updates are one constant times A's) or "different". ``token``, ``base``: as for :func:`load`.
    """
    return diff_adapters(load(a, token=token, base=base), load(b, token=token, base=base))


def analyze(
    source: AdapterLike,
    *,
    base: BaseLike,
    base_top: int | None = None,
    seed: int = 0,
    plot: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
) -> AnalyzeReport:
    """Measure an adapter against its base, module by module: how large each update is next to its weight
    (``rel_fro``, ``cos_W``), how much it amplifies directions W does not emphasise (``proj_fro = ||Uᵀ W V||``,
    ``amplification``, against the closed-form random-direction baseline ``random_proj``: LoRA paper, section 7),
    and DoRA's magnitude / direction change per output row (``dM``, ``dD``); pooled per module family and per layer.

    Each base weight is streamed once in row blocks against the factors (``O(m n r)`` per module; the dense update
    is never formed); DoRA adapters use their stored magnitude; a zero update gives null ratios with ``reason``
    ``zero_update``. Definitions: :mod:`lora_ops.analysis`.

    Args:
        base: a checkpoint folder, a store ref (each weight read by range requests), or a BaseView.
        base_top: K: also the overlap of each update's singular subspaces with W's top-K (seeded randomized SVD of
            W for large weights).
        seed: the randomized SVD's seed.
        plot: also write a PNG of the per-layer relative update and amplification by module family (needs the
            ``plot`` extra: matplotlib); an existing file is replaced only with ``overwrite`` and only if this tool
            wrote it.
        token: the Hub token for store refs; a local ``base`` also maps a kohya file's names.

    Raises:
        IncompatibleBaseError: a module the base has no weight for, or of another shape, or a quantized base.
        UsageError: ``base_top`` below 1; a ``plot`` path that is not a ``.png`` or touches an input; matplotlib
            missing (its hint says how to install it).
    """
    view = base if isinstance(base, BaseView) else open_base(base, token=token)
    adapter = load(source, token=token, base=_names_base(base))
    target = None
    if plot is not None:
        target = check_plot_path(
            plot, _inputs(("base folder", [view, base]), ("adapter", [adapter, source])), overwrite=overwrite
        )
    label = view.name_or_path if isinstance(base, BaseView) else str(base)
    report = analyze_adapter(adapter, view, base_top=base_top, seed=seed, progress=progress, base_label=label)
    if target is not None:
        write_plot(report, target)
    return report


def combine(
    sources: list[AdapterLike],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
    base: str | Path | None = None,
) -> CombineResult:
    """Combine adapters into one, module by module, over the union of their modules.

    ``method`` is a registered combine method (:mod:`adapterhub_cli.ops.methods`; plugins add more through
    ``adapters_register_methods``, and an unknown name raises a ``UsageError`` listing the known ones). The
    built-ins: ``cat`` (exact ``sum_i w_i dW_i``, rank = sum of ranks), ``linear`` / ``svd`` (that exact sum,
    compressed to its optimal rank ``rank``, default the largest input rank), ``ties``, ``dare_linear``,
    ``dare_ties``, ``magnitude_prune`` (element-wise on each module's update with ``density``, seeded, then
    compressed to rank ``rank``). ``weights`` default to 1 each and may be negative. Inputs must fit
    together (same shapes; same declared base unless ``force``); nothing is written otherwise.

    Options the method would ignore are a ``UsageError`` before anything is read (``rank`` or ``density`` with
    ``cat``, ``density`` with ``linear``, ``seed`` (default 0) with a method that draws nothing), as are a missing
    required one and a weight count other than one per adapter. A result whose weighted inputs cancel
    (``[A, A]``, ``weights=[1, -1]``) is written with a warning (``result.warnings``, ``result.zero_modules``).
    ``token``, ``base``: as for :func:`load`.
    """
    check_weights(weights, len(sources))
    check_combine_options(method, count=len(sources), weights=weights, rank=rank, density=density, seed=seed)
    adapters = [load(s, token=token, base=base) for s in sources]
    check_output(out, _inputs(("adapter", [*adapters, *sources])), overwrite=overwrite)
    return combine_adapters(
        adapters,
        out,
        weights=weights or [1.0] * len(adapters),
        method=method,
        rank=rank,
        density=density,
        seed=seed,
        force=force,
        overwrite=overwrite,
        progress=progress,
    )


def quantize(
    source: AdapterLike,
    out: str | Path,
    *,
    scheme: str,
    block_size: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
    base: str | Path | None = None,
) -> QuantizeResult:
    """Store an adapter's factors quantized: ``int8`` / ``fp8`` (one float32 scale per ``block_size`` values,
    default 64), ``nf4`` (bitsandbytes), or a ``bf16`` / ``fp16`` cast (no blocks: a ``block_size`` is refused).
    The result is read back by :func:`load` (and every operation) transparently; :func:`dequantize` turns it into a
    plain PEFT adapter. ``token``, ``base``: as for :func:`load`."""
    adapter = load(source, token=token, base=base)
    check_output(out, _inputs(("adapter", [adapter, source])), overwrite=overwrite)
    return quantize_adapter(adapter, out, scheme=scheme, block_size=block_size, overwrite=overwrite, progress=progress)


def dequantize(
    source: AdapterLike,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "fp32",
    token: str | None = None,
    base: str | Path | None = None,
) -> Path:
    """Write an adapter this tool quantized (int8 / fp8 / nf4) or cast (bf16 / fp16) back as a PEFT adapter that
    ``PeftModel.from_pretrained`` loads, its floating tensors in ``dtype`` (``fp32``, ``bf16`` or ``fp16``).
    ``token``, ``base``: as for :func:`load`."""
    adapter = load(source, token=token, base=base)
    check_output(out, _inputs(("adapter", [adapter, source])), overwrite=overwrite)
    return dequantize_adapter(adapter, out, overwrite=overwrite, dtype=dtype)


def merge(
    adapters: AdapterLike | list[AdapterLike],
    *,
    base: BaseLike,
    out: str | Path,
    weights: list[float] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    quantize: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
) -> MergeResult:
    """Merge one or more adapters into a base checkpoint, streaming tensor by tensor, into ``out``.

    Each merged tensor equals PEFT's ``merge_and_unload()`` bit for bit on CPU: the update
    ``transpose(B @ A) * scale * weight`` in float32, added to the weight and rounded once to its dtype (DoRA:
    rescaled by its magnitude over the unmerged weight's row norm; modules_to_save copies replace the base
    tensors). Several adapters are merged in the order given, each rounding in turn as PEFT does. The output
    records its provenance in every shard's metadata and has a model card (README.md): ``base_model`` is the
    base's Hub id when known (a Hub ref, or a repo id in its config's ``_name_or_path``), never a local path.
    ``result.warnings`` holds the warnings :func:`validate` gives for each adapter against the base.

    Args:
        base: a checkpoint folder (safetensors, single or sharded; a diffusers component too), a store ref (its
            shards fetched one at a time as the merge reaches them), or a BaseView.
        weights: one multiplier per adapter (default 1 each).
        device: where updates are computed (``cpu``, ``cuda``, ``cuda:1``).
        dtype: ``auto`` keeps the base's dtypes; ``bf16`` / ``fp16`` / ``fp32`` converts floating tensors first.
        max_shard_size: largest output shard (e.g. ``"5GB"``, ``"500MB"``).
        quantize: write the output in bitsandbytes' layout (``"nf4"``, ``"fp4"``, ``"int8"``) that transformers
            loads with its quantization config. A base saved by transformers with bitsandbytes is read
            (dequantized weight by weight) either way; without ``quantize`` its merge is written in 16 bits.
        token: the Hub token for store refs (the base and the adapters). A local ``base`` also maps the names of
            kohya adapters.
    """
    items = adapters if isinstance(adapters, list) else [adapters]
    check_weights(weights, len(items))
    view = base if isinstance(base, BaseView) else open_base(base, token=token)
    loaded = [load(a, token=token, base=_names_base(base)) for a in items]
    check_output(out, _inputs(("base folder", [view, base]), ("adapter", [*loaded, *items])), overwrite=overwrite)
    return run_merge(
        view,
        loaded,
        out,
        weights=weights,
        device=device,
        dtype=dtype,
        max_shard_size=max_shard_size,
        quantize=quantize,
        overwrite=overwrite,
        progress=progress,
        base_source=None if isinstance(base, BaseView) else str(base),
        base_model=_hub_repo_id(base),
    )


def extract(
    base: BaseLike,
    tuned: BaseLike,
    *,
    out: str | Path,
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
    token: str | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter from a full fine-tune: per weight, the truncated SVD of ``tuned - base``.

    ``base`` and ``tuned`` are checkpoint folders (safetensors, single or sharded, layouts may differ), store refs
    or BaseViews; they are read one tensor pair at a time. Exactly one rule picks the rank per module, as for
    :func:`reduce` (``rank``; ``energy`` / ``sv_ratio`` / ``sv_fro``, capped by ``max_rank``). ``targets``: module
    names (``q_proj,v_proj``) or a regex over full module names. ``embeddings``: what happens to changed input
    embeddings and vocabulary heads (``lora``, ``save`` as ``modules_to_save``, ``skip`` with a warning).
    ``method``: ``auto`` (exact float64 SVD for small matrices, seeded randomized SVD for large ones), ``exact``
    or ``randomized``. ``device``: where the SVDs run (``cpu``, ``cuda``). The output is a PEFT folder with scale 1
    everywhere (``lora_alpha = r``, ``alpha_pattern = rank_pattern``), provenance and a card; see
    :func:`adapterhub_cli.ops.extract.extract_adapter` for what is reported and refused.
    """
    from adapterhub_cli.merge.compute import check_device

    check_reduce_options(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
    if method not in ("auto", "exact", "randomized"):
        raise UsageError(f"method must be auto, exact or randomized, got {method!r}")
    check_device(device)
    base_view = base if isinstance(base, BaseView) else open_base(base, token=token)
    tuned_view = tuned if isinstance(tuned, BaseView) else open_base(tuned, token=token)
    inputs = _inputs(("base folder", [base_view, base]), ("tuned folder", [tuned_view, tuned]))
    check_output(out, inputs, overwrite=overwrite)
    return extract_adapter(
        base_view,
        tuned_view,
        out,
        rank=rank,
        energy=energy,
        sv_ratio=sv_ratio,
        sv_fro=sv_fro,
        max_rank=max_rank,
        targets=targets,
        embeddings=embeddings,
        device=device,
        method=method,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        base_source=None if isinstance(base, BaseView) else str(base),
        tuned_source=None if isinstance(tuned, BaseView) else str(tuned),
    )


def _hub_repo_id(ref: object) -> str | None:
    """The Hub repo id a Hub ref names (what a merged model's card gives as ``base_model``), else None."""
    from adapterhub_cli.stores import find_store

    if not isinstance(ref, str | AdapterRef):
        return None
    store = find_store(str(ref))
    return store.parse(str(ref)).repo_id if store is not None and store.name == "hf" else None


def merge_each(
    adapters: list[AdapterLike],
    *,
    base: BaseLike,
    out_dir: str | Path,
    device: str = "cpu",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    quantize: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
) -> list[EachResult]:
    """Merge each adapter alone into ``base``, reading the base once: one merged model per adapter, in
    ``out_dir/<name>``, each bit-identical to :func:`merge` of that adapter (with its own provenance and card).

    ``name`` is the adapter folder's name (a bare ``.safetensors`` file: its stem; a store ref: the repo's name),
    made unique with ``-2``, ``-3`` ... in the order given. One result per adapter, in order: ``ok`` with the merge's
    summary (``result.merge``), or ``error`` and ``hint``; an adapter that cannot be read or does not fit the base,
    or whose merge or write fails, leaves no folder, and the others are written. Options as for :func:`merge` (one
    weight per adapter is not an option here: each output is a merge of one adapter with weight 1).

    Raises:
        UsageError: no adapters, a name that is not a plain file name, or an output path refused (all before
            anything is written); OutputExistsError: an output exists and ``overwrite`` is not given.
    """
    if not adapters:
        raise UsageError("merge --each needs at least one adapter")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UsageError(
            f"output {out_dir} is a file: merge --each writes one folder per adapter inside a folder",
            hint="give a folder (made if missing) with -o",
        )
    view = base if isinstance(base, BaseView) else open_base(base, token=token)
    names = each_names(adapters)
    loaded: list[Adapter | None] = []
    errors: list[BaseException | None] = []
    for item in adapters:
        try:
            loaded.append(load(item, token=token, base=_names_base(base)))
            errors.append(None)
        except AdaptersError as e:  # this output fails; the others go on
            loaded.append(None)
            errors.append(e)
    inputs = _inputs(("base folder", [view, base]), ("adapter", [*[a for a in loaded if a], *adapters]))
    targets = []
    for item, name, adapter, error in zip(adapters, names, loaded, errors, strict=True):
        out = check_output(Path(out_dir) / name, inputs, overwrite=overwrite)
        targets.append(EachTarget(name, str(item.path if isinstance(item, Adapter) else item), out, adapter, error))
    # the outputs' parent is made with the first of them; where none is made, it goes again
    made = not Path(out_dir).exists() and not Path(out_dir).is_symlink()
    try:
        return run_merge_each(
            view,
            targets,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            quantize=quantize,
            overwrite=overwrite,
            progress=progress,
            base_source=None if isinstance(base, BaseView) else str(base),
            base_model=_hub_repo_id(base),
        )
    finally:
        if made:  # no output made it (all failed, or an interrupt): the empty folder would block a later -o there
            with contextlib.suppress(OSError):
                Path(out_dir).rmdir()  # (only if empty)


def each_names(adapters: Sequence[AdapterLike | AdapterRef]) -> list[str]:
    """The output folder name of each adapter for :func:`merge_each`: its folder's name (a bare ``.safetensors``
    file: its stem, or its folder's name for ``adapter_model.safetensors``), a store ref's repo name; ``-2``,
    ``-3`` ... added to repeats. Only a plain file name not starting with a dot is accepted.

    Raises:
        UsageError: a name that is not a plain file name (nothing was written).
    """
    import os

    from adapterhub_cli.artifact.checkpoint import is_plain_name
    from adapterhub_cli.stores import find_store

    names: list[str] = []
    for item in adapters:
        text = str(item.path if isinstance(item, Adapter) else item)
        store = None if isinstance(item, Adapter | Path) else find_store(text)
        if store is not None:
            name = str(store.parse(text).repo_id or "").rstrip("/").split("/")[-1]
        else:
            path = Path(os.path.normpath(Path(text).absolute()))  # '.' and '..' folded: a real name
            name = path.stem if path.suffix == ".safetensors" else path.name
            if path.suffix == ".safetensors" and name in ("adapter_model", "adapter"):
                name = path.parent.name
        if not is_plain_name(name) or name.startswith("."):
            raise UsageError(
                f"merge --each: adapter {text!r} gives the output name {name!r}, which is not a plain folder name",
                hint="merge that adapter on its own with -o, or copy it into a folder with a plain name",
            )
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}-{n}"
        names.append(unique)
    return names


def unmerge(
    adapters: AdapterLike | list[AdapterLike],
    *,
    merged: BaseLike,
    out: str | Path,
    weights: list[float] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    token: str | None = None,
) -> MergeResult:
    """Subtract adapters' updates from a merged checkpoint (PEFT's unmerge arithmetic), giving the base back.

    ``dtype`` as for :func:`merge`. ``max_shard_size`` None (the default) keeps the shard layout of ``merged``:
    the same shard files, index and tensor-to-shard assignment; a size re-cuts the output.

    Exact up to the rounding of the stored dtype (in bf16 the result differs from the original base by about
    one unit in the last place where the update was large); DoRA merges cannot be undone. ``token``: the Hub token
    for store refs; a local ``merged`` also maps the names of kohya adapters.
    """
    items = adapters if isinstance(adapters, list) else [adapters]
    check_weights(weights, len(items))
    view = merged if isinstance(merged, BaseView) else open_base(merged, token=token)
    loaded = [load(a, token=token, base=_names_base(merged)) for a in items]
    inputs = _inputs(("merged folder", [view, merged]), ("adapter", [*loaded, *items]))
    check_output(out, inputs, overwrite=overwrite)
    return run_merge(
        view,
        loaded,
        out,
        weights=weights,
        device=device,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        reverse=True,
        progress=progress,
        base_source=None if isinstance(merged, BaseView) else str(merged),
    )


def _target_store(ref: str | AdapterRef, **options: object) -> Store:
    """The store a push / pull / versions target names; a string no store claims is read as a Hub repo id (even
    where a local folder of that name exists), so the Hub reports what is wrong with it."""
    from adapterhub_cli.stores import find_store, stores

    store = find_store(ref) or stores()["hf"]
    return store.configured(**options)


def push(
    source: str | Path,
    repo_id: str,
    *,
    version: str,
    private: bool = False,
    message: str | None = None,
    force: bool = False,
    base_model: str | None = None,
    api: HfApi | None = None,
    token: str | None = None,
) -> PushResult:
    """Validate a local adapter (or merged model) and publish it as version ``version`` of ``repo_id``: a Hub repo
    (``org/name``, tagged ``v{version}``), a local registry repo (``file:///srv/adapters/org/name``) or a plugin
    store's.

    Validation runs alone and against the declared base when reachable; the model card is written or
    updated; config, safetensors and card are published together (one commit on the Hub, one atomic rename in
    a local registry). An existing version is never moved; a version lower than the latest is refused unless
    ``force``. See :meth:`adapterhub_cli.stores.base.Store.push`.
    """
    store = _target_store(repo_id, api=api, token=token, private=private)
    return store.push(source, repo_id, version=version, message=message, force=force, base_model=base_model)


def pull(
    ref: str | AdapterRef,
    *,
    out: str | Path | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    api: HfApi | None = None,
    token: str | None = None,
) -> PullResult:
    """Fetch an adapter's (or merged model's) files at the version ``ref`` resolves to (``@v1.2.0``, ``@latest``,
    ``@^1.2``, a branch or a commit on the Hub), each sha256-checked against the store's record, into the
    store's own copy (the HF cache for the Hub) or into ``out``. ``latest`` and a ref without a revision are the
    highest release, prereleases excluded (on the Hub, a repo without release tags gives its default branch); the
    result's ``tag`` / ``branch``, ``commit`` and ``note`` say what it resolved to."""
    store = _target_store(ref, api=api, token=token)
    if out is not None:
        check_output(out, _store_paths(store, ref), overwrite=overwrite)
    return store.pull(ref, out=out, allow_pickle=allow_pickle, overwrite=overwrite)


def versions(repo_id: str, *, api: HfApi | None = None, token: str | None = None) -> list[VersionInfo]:
    """The published versions (tags) of a store repo with their ids, dates and messages, newest first."""
    return _target_store(repo_id, api=api, token=token).versions(repo_id)


def convert(
    source: AdapterLike,
    out: str | Path,
    *,
    to: str,
    base: str | Path | None = None,
    format: str | None = None,
    overwrite: bool = False,
    fold_tucker: bool = False,
    fold_loha: bool = False,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
) -> ConvertResult:
    """Convert an adapter between layouts: ``to="peft"`` (a folder), ``to="kohya"`` (one ``.safetensors`` file),
    ``to="diffusers"`` (a folder with ``pytorch_lora_weights.safetensors``), or any registered format that can
    write (plugins add them through ``adapters_register_formats``; another name raises ``UnknownFormatError``
    listing those that can).

    Factors keep their bytes and dtypes and alpha stays its own scalar. Reading a kohya file needs ``base`` (or
    ``$ADAPTERS_BASE``) to map its names to modules, unless this tool wrote it. Writing kohya with ``base`` checks
    that every written name maps back to its module through the base. A round trip restores names, alpha dtypes
    and values, metadata and the PEFT config while the factors are unchanged. DoRA, modules_to_save, biases and
    embeddings cannot be written as kohya and are refused. ``fold_tucker`` reads a LyCORIS LoCon-Tucker file
    (``lora_mid``) as the LoRA it equals exactly, at the same rank; ``fold_loha`` a LyCORIS LoHa file as the LoRA
    of rank r1·r2 it equals exactly (needs ``base``). ``strip_prefix`` / ``add_prefix`` rewrite every module name
    first (e.g. ``strip_prefix="unet."``) so that PEFT matches them on the base; ``validate`` suggests them.
    ``token``: the Hub token for a store ref. ``allow_pickle``: read a legacy ``adapter_model.bin`` (as :func:`load`),
    e.g. to write it as safetensors with ``to="peft"``.
    """
    from adapterhub_cli.formats.kohya import KohyaFormat
    from adapterhub_cli.ops.convert import convert_adapter

    if (strip_prefix is not None or add_prefix is not None) and (fold_tucker or fold_loha):
        raise UsageError("--strip-prefix / --add-prefix cannot be combined with --fold-tucker / --fold-loha")
    if isinstance(source, Adapter):
        adapter = source
    elif fold_tucker or fold_loha:
        adapter = KohyaFormat().read(Path(str(source)), base=base, fold_tucker=fold_tucker, fold_loha=fold_loha)
    else:
        adapter = load(source, format=format, base=base, token=token, allow_pickle=allow_pickle)
    inputs = _inputs(("adapter", [adapter, source]), ("base folder", [base] if base is not None else []))
    check_output(out, inputs, overwrite=overwrite)
    return convert_adapter(
        adapter, out, to=to, base=base, overwrite=overwrite, strip_prefix=strip_prefix, add_prefix=add_prefix
    )


__all__ = [
    "analyze",
    "combine",
    "convert",
    "dequantize",
    "diff",
    "extract",
    "inspect",
    "load",
    "merge",
    "merge_each",
    "open_base",
    "pull",
    "push",
    "quantize",
    "reduce",
    "unmerge",
    "validate",
    "versions",
]
