"""An adapter measured against its base: per module, how the update relates to the weight it adapts.

Each module's base weight is read once, in row blocks (a local shard by ``pread``, a store's base by one range read
per tensor), and streamed through :class:`lora_ops.analysis.BaseAccumulator` with the module's factors: cost
``O(m n r)`` per module, memory one block plus ``O((m + n) r)``, the m x n update never formed. ``base_top`` (opt-in)
holds the whole weight for a seeded randomized SVD. Definitions: :mod:`lora_ops.analysis` and ``shared/ANALYSIS.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter, LoraModule, conv1d_layer, stored_transposed
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.files import follow_umask
from adapterhub_cli.artifact.safetensors import file_data_start, torch_dtype
from adapterhub_cli.errors import CorruptFileError, IncompatibleBaseError, InvalidAdapterError, UsageError
from adapterhub_cli.parallel import map_modules


if TYPE_CHECKING:
    import torch

    from lora_ops.analysis import BaseAnalysis

Progress = Callable[[int, int], None]

#: Base dtypes analyze reads (a bitsandbytes-quantized base is not dequantized here).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: Bytes of float32 per row block of a base weight.
BLOCK_BYTES = 32 << 20


@dataclass
class ModuleAnalysis:
    """One module's row of ``adapters analyze`` (see :class:`lora_ops.analysis.BaseAnalysis` for each number).

    ``family`` is the module's last name part (``q_proj``), ``layer`` the first integer part of its name (the depth,
    None outside numbered blocks); ``rank`` is dW's numerical rank, ``rank_stored`` the factors' r; ``base_key`` the
    checkpoint tensor read. Ratios are None where undefined, ``reason`` saying why (``zero_update``, ``zero_base``).
    """

    module: str
    family: str
    layer: int | None
    kind: str
    shape: tuple[int, int]
    rank_stored: int
    rank: int
    scale: float
    dora: bool
    base_key: str
    norm_W: float
    norm_dW: float
    rel_fro: float | None
    cos_W: float | None
    proj_fro: float | None
    proj_over_W: float | None
    amplification: float | None
    random_proj: float | None
    alignment_over_random: float | None
    dM: float
    dD: float | None
    dora_eff_fro: float | None
    dora_rel_fro: float | None
    sigma: list[float]
    dir_alignment: list[float]
    base_top: dict[str, Any] | None
    reason: str | None


@dataclass
class GroupSummary:
    """The modules of one family (``q_proj``) or one layer depth, pooled.

    ``rel_fro`` is ``sqrt(sum ||dW||² / sum ||W||²)`` over the group; ``amplification``, ``alignment_over_random``
    and ``cos_W`` the medians over modules where they are defined (None when none is); ``dM`` and ``dD`` the means.
    """

    name: str
    modules: int
    zero_updates: int
    rel_fro: float | None
    amplification: float | None
    alignment_over_random: float | None
    cos_W: float | None
    dM: float
    dD: float | None


@dataclass
class AnalyzeReport:
    """Everything ``adapters analyze`` shows. ``training_state`` is ``trained``, ``init_only`` (every update zero)
    or ``partial`` (some zero)."""

    adapter: str
    base: str
    modules: list[ModuleAnalysis]
    families: list[GroupSummary]
    layers: list[GroupSummary]
    training_state: str
    base_top_k: int | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DIGITS = re.compile(r"^\d+$")


def family_of(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``: the last name part that is not a number."""
    parts = [p for p in module.split(".") if not _DIGITS.match(p)]
    return parts[-1] if parts else module


def layer_of(module: str) -> int | None:
    """``model.layers.3.self_attn.q_proj`` -> 3: the first name part that is a number (None when there is none)."""
    for p in module.split("."):
        if _DIGITS.match(p):
            return int(p)
    return None


class _WeightReader:
    """Reads a base weight in row blocks of float32: ``pread`` of each block's byte range from a local shard, or the
    whole tensor by one range read from a store's base (``BaseView.read_raw``)."""

    def __init__(self, view: BaseView) -> None:
        self.view = view
        self._starts: dict[Path, int] = {}

    def _data_start(self, path: Path) -> int:
        if path not in self._starts:
            self._starts[path] = file_data_start(path)
        return self._starts[path]

    def blocks(self, key: str, rows: int, cols: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, W[start : start + b])`` for the stored weight ``key`` seen as (rows, cols), float32; a block is
        valid until the next is asked for (an F32 block is a view of the one buffer every block is read into)."""
        import torch

        info = self.view.tensors[key]
        dtype = torch_dtype(info.dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        step = max(1, BLOCK_BYTES // (4 * max(cols, 1)))
        if self.view.read_raw is not None:
            raw = self.view.read_raw(key)
            w = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(rows, cols)
            for start in range(0, rows, step):
                yield start, w[start : start + step].float()
            return
        path = self.view.shard_of[key]
        base = self._data_start(path) + info.start
        buf = torch.empty(min(step, rows) * cols * itemsize, dtype=torch.uint8)
        with path.open("rb") as f:
            for start in range(0, rows, step):
                b = min(step, rows - start)
                n = b * cols * itemsize
                view, offset = memoryview(buf.numpy().data).cast("B")[:n], base + start * cols * itemsize
                while view:
                    got = os.preadv(f.fileno(), [view], offset)
                    if got == 0:
                        raise CorruptFileError(f"tensor {key!r}: the file ends early", path=path, module=key)
                    view, offset = view[got:], offset + got
                yield start, buf[:n].view(dtype).reshape(b, cols).float()


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarize(name: str, rows: list[ModuleAnalysis]) -> GroupSummary:
    """Pool the modules ``rows`` (see :class:`GroupSummary`)."""
    w2 = sum(r.norm_W**2 for r in rows)
    dw2 = sum(r.norm_dW**2 for r in rows)
    dds = [r.dD for r in rows if r.dD is not None]
    return GroupSummary(
        name=name,
        modules=len(rows),
        zero_updates=sum(r.reason == "zero_update" for r in rows),
        rel_fro=math.sqrt(dw2 / w2) if w2 > 0 else None,
        amplification=_median([r.amplification for r in rows]),
        alignment_over_random=_median([r.alignment_over_random for r in rows]),
        cos_W=_median([r.cos_W for r in rows]),
        dM=sum(r.dM for r in rows) / len(rows),
        dD=sum(dds) / len(dds) if dds else None,
    )


def _base_key(adapter: Adapter, view: BaseView, m: LoraModule) -> tuple[str, bool]:
    """The checkpoint key of ``m``'s weight and whether it is stored transposed, checked against the update's shape."""
    key = view.find_weight(m.name)
    hint = "run `adapters validate ADAPTER --base BASE` to see how the adapter and the base differ"
    if key is None:
        raise IncompatibleBaseError(f"module {m.name}: the base {view.path} has no weight for it", hint=hint)
    info = view.tensors[key]
    if info.dtype not in FLOAT_DTYPES:
        raise IncompatibleBaseError(
            f"module {m.name}: the base weight {key} is stored as {info.dtype}; analyze reads floating-point bases "
            "(F32, F16, BF16, F64) only",
            hint="point --base at the unquantized checkpoint the adapter was trained on",
        )
    transposed = stored_transposed(
        m.kind,
        adapter.config.fan_in_fan_out,
        tuple(info.shape),
        (m.d_out, m.d_in),
        conv1d_layer(view.config, m.name),
    )
    rows = info.shape[0]
    cols = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
    want = (m.d_in, m.d_out) if transposed else (m.d_out, m.d_in)
    # a conv's weight is (out, in, kh, kw), flattened; any other LoRA adapts a matrix (validate's shape-mismatch)
    if (rows, cols) != want or (m.kind != "conv" and len(info.shape) != 2):
        raise IncompatibleBaseError(
            f"module {m.name}: the update is {m.d_out} x {m.d_in} but the base weight {key} is "
            f"{' x '.join(map(str, info.shape))}",
            hint=hint,
        )
    return key, transposed


def analyze_adapter(
    adapter: Adapter,
    view: BaseView,
    *,
    base_top: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    base_label: str | None = None,
) -> AnalyzeReport:
    """Measure every LoRA module of ``adapter`` against its weight in ``view`` (see the module docstring).

    Args:
        base_top: K: also the overlaps of each update's singular subspaces with W's top-K ones (a seeded randomized
            SVD of W for large weights, exact for small ones; the whole weight is then held in memory).
        seed: the randomized SVD's seed.
        progress: called with (modules done, total).
        base_label: how the report names the base (default: the view's ``_name_or_path`` or folder).

    Raises:
        IncompatibleBaseError: a module with no weight in the base, of another shape, or in a quantized dtype.
        UsageError: ``base_top`` below 1.
        InvalidAdapterError: factors or a base weight holding NaN / inf.
    """
    import torch

    from lora_ops.analysis import BaseAccumulator, top_singular

    if base_top is not None and base_top < 1:
        raise UsageError(f"--base-top must be at least 1, got {base_top}")
    names = sorted(adapter.modules)
    placed = {name: _base_key(adapter, view, adapter.modules[name]) for name in names}  # check all before reading
    reader = _WeightReader(view)

    def measure(name: str, dtype: torch.dtype) -> BaseAnalysis:
        m = adapter.modules[name]
        key, transposed = placed[name]
        f = adapter.factors(name, finite=True)
        info = view.tensors[key]
        rows, cols = info.shape[0], math.prod(info.shape[1:])
        acc = BaseAccumulator(f, transposed=transposed, dtype=dtype)
        # the whole weight, for --base-top only (a block is a view of the reader's reused buffer: copied)
        w = torch.empty(rows, cols, dtype=dtype) if base_top is not None else None
        for start, block in reader.blocks(key, rows, cols):
            acc.add(start, block)
            if w is not None:
                w[start : start + len(block)].copy_(block)
        if not math.isfinite(float(acc.row2.sum())):  # ||W||² in float64: finite exactly when every entry is
            raise InvalidAdapterError(
                f"module {name}: the base weight {key} holds NaN or inf",
                path=view.path,
                module=name,
                hint="the base checkpoint is damaged: point --base at a healthy copy",
            )
        top = None
        if w is not None and base_top is not None:
            top = top_singular(w.T if transposed else w, base_top, seed=seed, dtype=dtype)
            del w
        magnitude = adapter.tensor(m.magnitude.name) if m.magnitude is not None else None
        return acc.finish(magnitude=magnitude, top=top)

    def one(name: str) -> ModuleAnalysis:
        result = measure(name, torch.float32)
        if not _all_finite(result):  # weights so large that float32 products overflow: all over again in float64
            result = measure(name, torch.float64)
            if not _all_finite(result):
                raise InvalidAdapterError(
                    f"module {name}: its numbers overflow even in float64 (the base weight {placed[name][0]} or "
                    "the update holds values near the largest float)",
                    path=view.path,
                    module=name,
                    hint="the base checkpoint or the adapter is damaged",
                )
        return _row(name, adapter.modules[name], placed[name][0], result)

    # modules side by side, torch single-threaded in each: a module's QR and r x r SVD are too small for torch's
    # threads (on a busy machine its threads made them 30x slower), and its W @ Q_a blocks use a core each
    rows_out = map_modules(one, names, progress=progress)
    return _report(adapter, base_label or view.name_or_path, rows_out, base_top, seed)


def _row(name: str, m: LoraModule, key: str, r: BaseAnalysis) -> ModuleAnalysis:
    return ModuleAnalysis(
        module=name,
        family=family_of(name),
        layer=layer_of(name),
        kind=m.kind,
        shape=r.shape,
        rank_stored=m.rank,
        rank=r.rank,
        scale=m.scale,
        dora=m.magnitude is not None,
        base_key=key,
        norm_W=r.norm_W,
        norm_dW=r.norm_dW,
        rel_fro=r.rel_fro,
        cos_W=r.cos_W,
        proj_fro=r.proj_fro,
        proj_over_W=r.proj_over_W,
        amplification=r.amplification,
        random_proj=r.random_proj,
        alignment_over_random=r.alignment_over_random,
        dM=r.dM,
        dD=r.dD,
        dora_eff_fro=r.dora_eff_fro,
        dora_rel_fro=r.dora_rel_fro,
        sigma=r.sigma,
        dir_alignment=r.dir_alignment,
        base_top=asdict(r.base_top) if r.base_top is not None else None,
        reason=r.reason,
    )


def _report(adapter: Adapter, base: str, rows: list[ModuleAnalysis], base_top: int | None, seed: int) -> AnalyzeReport:
    families: dict[str, list[ModuleAnalysis]] = {}
    layers: dict[int, list[ModuleAnalysis]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
        if r.layer is not None:
            layers.setdefault(r.layer, []).append(r)
    zero = sum(r.reason == "zero_update" for r in rows)
    state = "init_only" if rows and zero == len(rows) else "partial" if zero else "trained"
    notes = []
    if zero:
        notes.append(
            f"{zero} of {len(rows)} module updates are zero (B = 0, as PEFT initialises them): their ratios are null"
        )
    if any(r.dora for r in rows):
        notes.append(
            "DoRA modules: rel_fro, cos_W and the projections are about the LoRA update dW; dM is the stored "
            "magnitude against ||w_i||, and dora_rel_fro the whole effective change over ||W||"
        )
    return AnalyzeReport(
        adapter=str(adapter.path),
        base=base,
        modules=rows,
        families=[summarize(k, v) for k, v in sorted(families.items())],
        layers=[summarize(str(k), v) for k, v in sorted(layers.items())],
        training_state=state,
        base_top_k=base_top,
        seed=seed,
        notes=notes,
    )


#: The PNG text key that marks a plot this tool wrote (``--overwrite`` replaces only such a file).
PLOT_KEY = "adapterhub.analyze"
PLOT_INSTALL_HINT = "pip install 'adapterhub-cli[plot]'"


def _is_our_plot(path: Path) -> bool:
    """Whether ``path`` is a regular PNG file holding :data:`PLOT_KEY` in a text chunk (a plot written here)."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and PLOT_KEY.encode() in head


def check_plot_path(path: str | Path, inputs: dict[Path, str], *, overwrite: bool = False) -> Path:
    """Refuse a ``--plot`` path that is not a ``.png`` name, would touch an input, or exists (unless ``overwrite``,
    and then only a plot this tool wrote), and refuse it when matplotlib is missing; before any weight is read.
    Returns the absolute path.

    Raises:
        UsageError, OutputExistsError: as :func:`adapterhub_cli.artifact.files.check_output`.
    """
    from adapterhub_cli.artifact.files import check_output
    from adapterhub_cli.errors import OutputExistsError

    target = Path(os.path.normpath(Path(path).absolute()))
    if target.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: the plot is a PNG image", hint="give a file name ending in .png")
    _pyplot()  # matplotlib missing: say so before any weight is read
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(path)
        if not _is_our_plot(target):
            raise UsageError(
                f"--plot {path} exists and is not a plot written by adapters analyze: --overwrite replaces only those",
                hint="choose another file name, or remove it yourself if it may go",
            )
        return target
    return check_output(target, inputs)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed", hint=f"install the plot extra: {PLOT_INSTALL_HINT}"
        ) from None
    return plt


def write_plot(report: AnalyzeReport, path: str | Path) -> Path:
    """Write ``report``'s per-layer relative update (``||dW|| / ||W||``, log scale) and amplification
    (``||dW|| / ||Uᵀ W V||``), one line per module family, as a PNG at ``path`` (atomically: a temporary file
    renamed into place). Modules outside numbered layers are left out; zero updates have no amplification.

    Raises:
        UsageError: matplotlib is not installed (hint: the ``plot`` extra).
    """
    plt = _pyplot()
    target = Path(path)
    by_family: dict[str, list[ModuleAnalysis]] = {}
    for r in report.modules:
        if r.layer is not None:
            by_family.setdefault(r.family, []).append(r)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, constrained_layout=True)
    markers = "osD^v<>ph*"
    for i, (family, rows) in enumerate(sorted(by_family.items())):
        rows = sorted(rows, key=lambda r: (r.layer, r.module))
        style = {"marker": markers[i % len(markers)], "markersize": 4, "linewidth": 1.2, "label": family}
        rel = [(r.layer, r.rel_fro) for r in rows if r.rel_fro is not None and r.rel_fro > 0]
        amp = [(r.layer, r.amplification) for r in rows if r.amplification is not None]
        if rel:
            top.plot(*zip(*rel, strict=True), **style)
        if amp:
            bottom.plot(*zip(*amp, strict=True), **style)
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    values = [r.rel_fro for r in report.modules if r.layer is not None and r.rel_fro]
    if values and max(values) > 10 * min(values):  # a log scale only where the updates span a decade
        top.set_yscale("log")
    top.yaxis.set_major_formatter(ScalarFormatter())
    top.set_ylabel(r"relative update $\|\Delta W\|_F \,/\, \|W\|_F$")
    top.set_title(f"{Path(report.adapter).name} against {Path(report.base).name or report.base}", fontsize=10)
    bottom.set_ylabel(r"amplification $\|\Delta W\|_F \,/\, \|U^\top W V\|_F$")
    bottom.set_xlabel("layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
    if by_family:
        top.legend(fontsize=8, ncol=min(4, len(by_family)), title="module family", title_fontsize=8)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a fresh, unguessable temporary file created exclusively beside the target (never a planted link), given the
    # umask's mode, then renamed into place
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".incomplete")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110, metadata={PLOT_KEY: "per-layer rel_fro and amplification"})
        follow_umask(tmp)
        tmp.replace(target)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return target


__all__ = [
    "PLOT_INSTALL_HINT",
    "AnalyzeReport",
    "GroupSummary",
    "ModuleAnalysis",
    "analyze_adapter",
    "check_plot_path",
    "family_of",
    "layer_of",
    "summarize",
    "write_plot",
]


def _all_finite(result: object) -> bool:
    """Whether every number of an analysis (``None`` marks an undefined ratio, with its reason) is finite."""
    for f in dataclasses.fields(result):  # type: ignore[arg-type]
        value = getattr(result, f.name)
        for x in value if isinstance(value, list | tuple) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                return False
    return True
