"""The streaming merge engine: base checkpoint in, merged checkpoint out, one tensor in memory at a time.

The base is read shard by shard through safetensors headers. Output shards are planned up front from those
headers (names, dtypes, shapes are known before any weight is read), so each output file's header is
written first and its tensors stream after it. A tensor no adapter touches is copied byte for byte
(``os.copy_file_range``); a targeted one is loaded, gets every adapter's update with PEFT's arithmetic
(:mod:`lora_ops.merge`) and is written. Everything goes into a temporary folder renamed into place only when
complete. No model class is imported: adapter module names map onto checkpoint tensor names.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import resource
import shutil
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import BaseView, open_base
from adapterhub_cli.artifact.files import atomic_dir
from adapterhub_cli.artifact.preflight import require_valid
from adapterhub_cli.artifact.safetensors import DTYPE_BITS, TensorInfo, read_tensor
from adapterhub_cli.errors import UsageError
from adapterhub_cli.merge.direct_io import StagedFile
from adapterhub_cli.merge.staging import BufferPool
from adapterhub_cli.parallel import single_threaded_torch


if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
CONV1D_MODEL_TYPES = ("gpt2", "gpt_bigcode", "openai-gpt")


@dataclass(frozen=True)
class Contribution:
    """One adapter module's update to one base tensor."""

    adapter: int
    module: str
    weight: float


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
class MergeResult:
    """Summary of a merge (the ``--json`` output)."""

    path: Path
    tensors: int
    tensors_merged: int
    tensors_replaced: int
    modules: int
    shards: int
    bytes_written: int
    seconds: float  # the merge itself, from validation to the folder in place (not Python or torch start-up)
    peak_rss_mib: float
    device: str
    untied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _tied_embedding(base: BaseView) -> str | None:
    return base.tied_embedding()


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
    tied = _tied_embedding(base)
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        for m in adapter.modules.values():
            if tied and m.name.split(".")[-1] == "lm_head":
                head = plans.setdefault(
                    "lm_head.weight",
                    TensorPlan(name="lm_head.weight", source=tied, dtype=plans[tied].dtype, shape=plans[tied].shape),
                )
                head.contributions.append(Contribution(i, m.name, w))
                continue
            key = base.find_weight(m.name)
            assert key is not None  # validation ran first
            plans[key].contributions.append(Contribution(i, m.name, w))
        for name, info in adapter.extra_tensors.items():
            # PEFT saves a targeted embedding / head as `<module>.base_layer.weight` (save_embedding_layers)
            target = name.replace(".base_layer.", ".")
            if tied and target.split(".")[-2:] == ["lm_head", "weight"]:
                plan = plans.setdefault(
                    "lm_head.weight",
                    TensorPlan(name="lm_head.weight", source=tied, dtype=plans[tied].dtype, shape=plans[tied].shape),
                )
            else:
                key = base.find_weight(target, suffix="")
                if key is None:
                    raise UsageError(f"{adapter.path}: saved tensor {name!r} has no counterpart in the base")
                plan = plans[key]
            plan.replacement = (i, info.name)
    if tied and plans[tied].touched and "lm_head.weight" not in plans:
        plans["lm_head.weight"] = TensorPlan(
            name="lm_head.weight", source=tied, dtype=plans[tied].dtype, shape=plans[tied].shape
        )
    return list(plans.values())


def _out_dtype(info: TensorInfo, out_dtype: str | None) -> str:
    if out_dtype is None or info.dtype not in ("F16", "BF16", "F32", "F64"):
        return info.dtype
    return out_dtype


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


class _BaseReader:
    """Reads base tensors one shard at a time (one safetensors handle open), and copies raw byte ranges."""

    def __init__(self, base: BaseView) -> None:
        self.base = base
        self._path: Path | None = None
        self._handle: Any = None
        self._data_start: dict[Path, int] = {}

    def _start(self, path: Path) -> int:
        if path not in self._data_start:
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            self._data_start[path] = 8 + n
        return self._data_start[path]

    def tensor(self, key: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into its own buffer, or into the uint8 buffer ``into`` (no memory map, so only this
        tensor is resident)."""
        path = self.base.shard_of[key]
        if path != self._path:
            if self._handle is not None:
                self._handle.close()
            self._handle = path.open("rb")
            self._path = path
        return read_tensor(self._handle.fileno(), self.base.tensors[key], self._start(path), path=path, into=into)

    def copy_raw(self, key: str, sink: StagedFile) -> None:
        """Append the stored bytes of ``key`` to ``sink`` unchanged."""
        path = self.base.shard_of[key]
        info = self.base.tensors[key]
        with path.open("rb") as src:
            sink.copy_range(src.fileno(), self._start(path) + info.start, info.nbytes)


def check_device(device: str) -> str:
    """``device`` if the merge can compute there (``cpu``, ``cuda``, ``cuda:N`` with such a GPU), else UsageError."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise UsageError(f"device {device!r}: merges compute on cpu or cuda only")
    if not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: no CUDA device is available here", hint="use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[name]


def _fan_in_fan_out(kind: str, flag: bool, stored: tuple[int, ...], update: tuple[int, int]) -> bool:
    """Whether the stored weight is the transpose of the (d_out, d_in) update: always for embeddings; from the
    shapes when they tell (PEFT corrects a wrong flag for Conv1D / Linear the same way); else the config flag."""
    if kind == "embedding":
        return True
    if update[0] != update[1]:
        return stored == (update[1], update[0])
    return flag


class _Merger:
    """Produces merged tensors: loads factors once per module and applies each adapter's update in order."""

    def __init__(self, adapters: list[Adapter], device: str, reverse: bool = False, workers: int = 0) -> None:
        import torch

        self.adapters = adapters
        self.device = device
        self.reverse = reverse
        self.default_threads = torch.get_num_threads()
        # every core computes: with O_DIRECT writes and recycled buffers the reader, writer and disk threads
        # mostly wait on the kernel (measured on 2 cores: 3.2-3.7 s for the merge with two threads, 3.6-4.3 s
        # with one); past 8 threads the 256-row blocks are too small to share (16 threads were slower than 8)
        env = os.environ.get("ADAPTERS_MERGE_THREADS", "")
        self.workers = workers or (int(env) if env.isdigit() and int(env) > 0 else 0)
        self.workers = self.workers or max(1, min(os.cpu_count() or 1, 8))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="adapters-merge") if self.workers > 1 else None

    def _with_default_threads(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Run ``fn`` with torch's usual thread count: a convolution's result depends on it, and PEFT uses it."""
        import torch

        current = torch.get_num_threads()
        torch.set_num_threads(self.default_threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(current)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _merge_lora(
        self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool, fn: Any
    ) -> torch.Tensor:
        """``merge_lora`` with the weight's rows split between threads at block boundaries (same blocks, same
        arithmetic: the result is identical to one call)."""
        n = weight.shape[0]
        if self.pool is None or n < 4 * ROWS or weight.device.type != "cpu":
            return fn(weight, a, b, scale, fan_in_fan_out=fan_in_fan_out, subtract=self.reverse, rows=ROWS, out=weight)
        from lora_ops.merge import row_blocks

        out = weight  # each block reads its rows before writing them: in place is safe
        blocks = row_blocks(n, ROWS)  # whole blocks per thread: each call splits its span into the same blocks
        per = -(-len(blocks) // self.workers)
        spans = [(blocks[k][0], blocks[min(k + per, len(blocks)) - 1][1]) for k in range(0, len(blocks), per)]

        def part(span: tuple[int, int]) -> None:
            lo, hi = span
            a_part, b_part = (a[:, lo:hi], b) if fan_in_fan_out else (a, b[lo:hi])
            fn(
                weight[lo:hi],
                a_part,
                b_part,
                scale,
                fan_in_fan_out=fan_in_fan_out,
                subtract=self.reverse,
                rows=ROWS,
                out=out[lo:hi],
            )

        list(self.pool.map(part, spans))
        return out

    def apply(self, plan: TensorPlan, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with every contribution of ``plan`` added, in the order of the adapters.

        On the CPU the LoRA updates are added in place (``weight``'s buffer holds the result) in row blocks. On
        a CUDA device the weight is copied over (asynchronously from a pinned buffer), each update is computed
        whole the way PEFT computes it there (``W += (B @ A) * scale``), and the result is copied back into
        ``weight``.
        """
        import torch

        from lora_ops import conv_lora_delta, lora_delta, merge_delta, merge_dora, merge_lora, unmerge_delta

        dora = any(self.adapters[c.adapter].modules[c.module].magnitude is not None for c in plan.contributions)
        on_device = torch.device(self.device).type != "cpu"
        base_weight = weight.clone() if dora and not on_device else weight  # DoRA needs the unmerged weight
        stored = weight
        weight = weight.to(self.device, non_blocking=True) if on_device else weight
        for c in plan.contributions:
            adapter = self.adapters[c.adapter]
            m = adapter.modules[c.module]
            loaded = adapter.source.load([m.A.name, m.B.name] + ([m.magnitude.name] if m.magnitude else []))
            a, b = loaded[m.A.name].to(self.device), loaded[m.B.name].to(self.device)
            fan_in_fan_out = _fan_in_fan_out(
                m.kind, adapter.config.fan_in_fan_out, tuple(weight.shape), (m.d_out, m.d_in)
            )
            scale = m.scale * c.weight
            if m.kind == "conv" and m.magnitude is not None:
                raise UsageError(f"{adapter.path}: module {m.name}: DoRA on convolutions cannot be merged yet")
            if m.magnitude is None and m.kind != "conv" and not on_device:
                weight = self._merge_lora(weight, a, b, scale, fan_in_fan_out, merge_lora)
            elif m.magnitude is None:  # a convolution, or any LoRA on the GPU: the whole update at once
                if m.kind == "conv":
                    delta = self._with_default_threads(conv_lora_delta, a, b, scale)
                else:
                    delta = lora_delta(a, b, scale, fan_in_fan_out=fan_in_fan_out)
                weight = unmerge_delta(weight, delta) if self.reverse else merge_delta(weight, delta)
            elif self.reverse:
                raise UsageError(
                    f"{adapter.path}: DoRA merges cannot be undone from the merged weights alone "
                    "(the norm of the original weight is lost)"
                )
            else:
                delta = lora_delta(a, b, scale, fan_in_fan_out=fan_in_fan_out)
                magnitude = loaded[m.magnitude.name].to(self.device)
                weight = merge_dora(
                    weight, base_weight.to(self.device), delta, magnitude, fan_in_fan_out=fan_in_fan_out
                )
        if not on_device:
            return weight
        stored.copy_(weight, non_blocking=True)
        torch.cuda.current_stream(weight.device).synchronize()
        return stored


ROWS = 256  # rows per block of lora_ops.merge_lora
READ_AHEAD = 2  # tensors read ahead of the one being merged
WRITE_BEHIND = 2  # merged tensors waiting for (or in) the writer, beyond which reading waits


class _AbandonedError(Exception):
    """The writer's remaining jobs were dropped because the merge failed elsewhere."""


class _AsyncWriter:
    """Writes to a file descriptor on a background thread, in submission order, so disk writes overlap the
    next tensor's read and merge. At most ``depth`` tensors wait in memory."""

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="adapters-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as e:  # handed to the caller at the next submit or at close
                self._error = e
            finally:
                self._queue.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(job)

    def abandon(self) -> None:
        """Skip every job still queued and wait for the one running (after an error elsewhere)."""
        if self._error is None:
            self._error = _AbandonedError()
        self._queue.join()

    def drain(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def _write_shard(
    path: Path,
    shard: list[TensorPlan],
    produce: Callable[[TensorPlan], Callable[[StagedFile], None]],
    writer: _AsyncWriter,
    disk: ThreadPoolExecutor,
    closer: ThreadPoolExecutor,
    synced: list[Future[None]],
) -> int:
    """Write one safetensors file: header from the plans, then each tensor's bytes.

    ``produce(plan)`` does the reading and merging here and returns the job that appends the bytes to the
    file; the writer thread runs those jobs in order while the next tensor is produced, and the ``disk``
    thread writes the staged chunks (O_DIRECT where the filesystem allows).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in shard:
        for key, dtype, shape in p.entries:
            n = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    sink = StagedFile(path, disk)
    try:
        sink.write(struct.pack("<Q", len(raw)) + raw)
        for p in shard:
            writer.submit(functools.partial(produce(p), sink))
        writer.drain()
        sink.finish()
        size = os.fstat(sink.fd).st_size
        if size != 8 + len(raw) + offset:
            raise OSError(f"{path.name} has {size} bytes, expected {8 + len(raw) + offset}")
    except BaseException:
        writer.abandon()  # the writer thread stops touching this file before it is closed
        sink.abort()
        os.close(sink.fd)
        raise
    synced.append(closer.submit(_sync_and_close, sink.fd))  # reaches the disk while the next shard is produced
    return 8 + len(raw) + offset


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensor(sink: StagedFile, t: torch.Tensor) -> None:
    """Append ``t`` to ``sink`` (one function, so a test can stall a merge right at its first write)."""
    sink.write_tensor(t)


def _copy_side_files(base: Path, out: Path, config_updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    for f in sorted(base.iterdir()):
        index = f.name.endswith(".safetensors.index.json")
        if not f.is_file() or f.name.startswith(".") or index or f.suffix in WEIGHT_SUFFIXES:
            continue
        if f.name == "config.json" and (config_updates or drop):
            cfg = json.loads(f.read_text())
            cfg.update(config_updates)
            for key in drop:
                cfg.pop(key, None)
            (out / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(f, out / f.name)


def run_merge(
    base: BaseView | str | Path,
    adapters: list[Adapter],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    reverse: bool = False,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge (or with ``reverse``, unmerge) ``adapters`` into ``base``, streaming, into ``out`` atomically.

    Every adapter is validated against the base first; a misfit raises before anything is written. A base
    saved by transformers with bitsandbytes (nf4 / fp4 / int8) is dequantized weight by weight; the output is
    16-bit unless ``quantize`` ("nf4", "fp4" or "int8") asks for the bitsandbytes layout transformers loads.
    """
    import torch  # imported before the clock starts: torch's start-up (1.5-4 s) is not the merge

    from adapterhub_cli.merge import bnb

    started = time.perf_counter()
    check_device(device)
    stored = base if isinstance(base, BaseView) else open_base(base)
    scheme_in = bnb.bnb_scheme(stored.config)
    if quantize is not None and quantize not in bnb.SCHEMES:
        raise UsageError(f"unknown quantization {quantize!r}; choose one of {', '.join(bnb.SCHEMES)}")
    if (scheme_in or quantize) and stored.config.get("model_type") in CONV1D_MODEL_TYPES:
        raise UsageError(
            f"bitsandbytes checkpoints of {stored.config.get('model_type')} models (Conv1D layers) are "
            "not supported yet",
            hint="merge into the 16-bit base without --quantize",
        )
    view = bnb.logical_view(stored) if scheme_in else stored
    quantized_in = bnb.companions(stored) if scheme_in else {}
    weights = weights if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    if Path(out).resolve() == view.path.resolve():
        raise UsageError("the output folder is the base folder: choose another -o (inputs are never modified)")
    for a in adapters:
        require_valid(a, base=view)
        if reverse and any(m.magnitude is not None for m in a.modules.values()):
            raise UsageError(
                f"{a.path}: DoRA merges cannot be undone from the merged weights alone (the norm of "
                "the original weight is lost)",
                hint="merge into the original base again instead",
            )
    plans = plan_merge(view, adapters, weights, out_dtype)
    if quantize:
        for p in plans:
            wanted = p.source in quantized_in if scheme_in else bnb.should_quantize(p.name, p.shape, view.config)
            if wanted and len(p.shape) == 2 and p.dtype in ("BF16", "F16", "F32"):
                shape = (p.shape[0], p.shape[1])
                p.quantized_entries = bnb.planned_entries(p.name, shape, quantize, compute_dtype=p.dtype)
    shards = plan_shards(plans, parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size)
    reader = _BaseReader(stored)
    merger = _Merger(adapters, device, reverse=reverse)
    total = sum(p.nbytes for p in plans)
    done = 0

    def copied(p: TensorPlan) -> bool:
        return (
            not p.touched
            and p.dtype == view.tensors[p.source].dtype
            and p.source not in quantized_in
            and p.quantized_entries is None
        )

    def fetch(p: TensorPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensor ``p`` starts from, and the staging buffer holding it (None: its own allocation)."""
        if p.replacement:
            return adapters[p.replacement[0]].tensor(p.replacement[1]), None
        if p.source in quantized_in:
            return bnb.dequantize_weight(reader.tensor, p.source, stored), None
        buffer = buffers.acquire(stored.tensors[p.source].nbytes)
        try:
            return reader.tensor(p.source, into=buffer), buffer
        except BaseException:
            buffers.release(buffer)
            raise

    # tensors to merge are read on a helper thread, up to READ_AHEAD ahead of the one being merged, into
    # recycled staging buffers (pinned for a CUDA device); a buffer goes back to the pool once written
    to_read = [p for shard in shards for p in shard if not copied(p)]
    position = {p.name: i for i, p in enumerate(to_read)}
    pending: dict[str, Future[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    # page-locked staging for a GPU: asynchronous copies to and from it
    buffers = BufferPool(READ_AHEAD + 1 + WRITE_BEHIND, pin=torch.device(device).type == "cuda")

    def produce(p: TensorPlan) -> Callable[[StagedFile], None]:
        nonlocal done
        done += p.nbytes
        if progress:
            progress(done, total)
        if copied(p):
            return lambda sink: reader.copy_raw(p.source, sink)
        future = pending.pop(p.name, None) or prefetcher.submit(fetch, p)
        for q in to_read[position[p.name] + 1 : position[p.name] + 1 + READ_AHEAD]:
            if q.name not in pending:
                pending[q.name] = prefetcher.submit(fetch, q)
        t, buffer = future.result()
        if p.dtype in ("F16", "BF16", "F32", "F64"):
            t = t.to(_torch_dtype(p.dtype))  # as if the base were loaded in the output dtype, then merged
        if p.contributions:
            t = merger.apply(p, t)
        if quantize and p.quantized_entries:
            parts = bnb.quantize_weight(t, p.name, quantize, compute_dtype=t.dtype)
            if buffer is not None:
                buffers.release(buffer)
            order = [key for key, _, _ in p.entries]

            def write_parts(sink: StagedFile) -> None:
                for key in order:
                    _write_tensor(sink, parts[key])

            return write_parts

        def write(sink: StagedFile) -> None:
            try:
                _write_tensor(sink, t)
            finally:
                if buffer is not None:
                    buffers.release(buffer)

        return write

    untied = sorted(p.name for p in plans if p.source != p.name)
    updates: dict[str, Any] = {"tie_word_embeddings": False} if untied else {}
    if out_dtype:
        # transformers >= 4.56 writes and reads "dtype", older versions "torch_dtype": update what the base has
        keys = [k for k in ("dtype", "torch_dtype") if k in view.config] or ["torch_dtype"]
        updates.update(dict.fromkeys(keys, {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[out_dtype]))
    written = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        stem = view.weights_stem  # model.safetensors, or diffusion_pytorch_model.safetensors for a diffusers part
        names = (
            [f"{stem}.safetensors"]
            if len(shards) == 1
            else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        writer = _AsyncWriter(depth=WRITE_BEHIND + 2)
        closer = ThreadPoolExecutor(1, thread_name_prefix="adapters-fsync")
        disk = ThreadPoolExecutor(1, thread_name_prefix="adapters-disk")
        synced: list[Future[None]] = []
        prefetcher = ThreadPoolExecutor(1, thread_name_prefix="adapters-reader")
        # torch runs single-threaded inside each compute thread (small blocked GEMMs lose more to torch's own
        # thread hand-offs than they gain); the rows of a weight are split between the merger's threads instead
        try:
            with single_threaded_torch():
                for name, shard in zip(names, shards, strict=True):
                    written += _write_shard(tmp / name, shard, produce, writer, disk, closer, synced)
            for sync in synced:  # every shard on disk before the folder is moved into place
                sync.result()
        finally:
            closer.shutdown(wait=True)
            writer.close()
            disk.shutdown(wait=True)
            buffers.close()  # a read waiting for a buffer after an error gives up
            prefetcher.shutdown(cancel_futures=True)
            merger.close()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {p.name: name for name, shard in zip(names, shards, strict=True) for p in shard},
            }
            (tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        drop: tuple[str, ...] = ()
        if quantize:
            dtypes = {p.dtype for p in plans if p.quantized_entries}
            compute = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtypes.pop() if dtypes else "BF16"]
            updates["quantization_config"] = bnb.quantization_config(quantize, compute)
        elif scheme_in:
            drop = ("quantization_config",)  # written in 16 bits: a plain checkpoint
        _copy_side_files(view.path, tmp, updates, drop)
    return MergeResult(
        path=Path(out),
        tensors=len(plans),
        tensors_merged=sum(bool(p.contributions) for p in plans),
        tensors_replaced=sum(p.replacement is not None for p in plans),
        modules=sum(len(p.contributions) for p in plans),
        shards=len(shards),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device=device,
        untied=untied,
        warnings=[
            f"untied {', '.join(untied)} from the input embedding: the adapter changes only one side, so "
            "the output stores both and sets tie_word_embeddings=false"
        ]
        if untied
        else [],
    )
