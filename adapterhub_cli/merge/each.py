"""Many adapters, one base, one pass (``merge --each``): one merged model per adapter, each base tensor read once.

Every adapter gets its own plan (:func:`.plan.build_plan`: a misfit fails that output only), its own output folder
(written into a temporary folder and renamed into place when complete, with its own provenance and card) and its
own writer threads. One driver walks the union of the outputs' tensor orders: each base tensor is read once (on a
reader thread, ahead of the merge, into a recycled staging buffer shared by the outputs) and handed to every
output: an untouched one is written from that buffer to each output; a targeted one is merged for each adapter
from the shared buffer into that output's own buffer (the first LoRA update reads the base and writes the output,
no copy first; the last output to take the tensor merges it in place). Each output's tensors are therefore computed
exactly as a merge of that adapter alone computes them, bit for bit.

As in a single merge, torch is first needed at the first tensor merged (on the CPU): the reads start at once and
the untouched tensors ahead of it (the embeddings) are checked for NaN / inf and written to every output as stored
bytes while torch imports on the helper thread. On the 2-core machine, where the pass is bound by the cores, this
changed nothing (8.19 s against 8.17 s for 4 outputs: those writes ran behind the compute before); with the disk
held to 400 MB/s, where the pass waits on the disk, it saved 0.77 s (21.65 s against 22.42 s).

A failure in one output (an adapter that does not fit the base, a NaN its update creates, a write error) removes
that output's temporary folder and is reported in its :class:`EachResult`; the other outputs go on. Anything else
(Ctrl-C, a bug) stops every output: those not yet complete leave nothing behind; those already moved into place
(complete, as their own merge would have written them) stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from adapterhub_cli import warmup
from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.card import hub_id, merged_card
from adapterhub_cli.artifact.checkpoint import CARD_FILE, BaseView
from adapterhub_cli.artifact.files import atomic_dir
from adapterhub_cli.artifact.safetensors import COMPUTE_DTYPES, DTYPE_BITS, encode_header, torch_dtype
from adapterhub_cli.errors import AdaptersError, InvalidAdapterError
from adapterhub_cli.merge import bnb
from adapterhub_cli.merge.compute import _Merger, check_device, check_device_name, require_finite
from adapterhub_cli.merge.direct_io import StagedFile, placement
from adapterhub_cli.merge.engine import (
    MergeResult,
    Progress,
    _dtype_of,
    _placed,
    _result,
    merge_record,
    shard_metadata,
)
from adapterhub_cli.merge.plan import MergePlan, TensorPlan, build_plan
from adapterhub_cli.merge.shards import (
    READ_AHEAD,
    WRITE_BEHIND,
    FiniteCheck,
    Handoff,
    RawTensor,
    _BaseReader,
    _ReadAhead,
    _sync_and_close,
    copy_side_files,
    damaged_base,
    output_offsets,
    shard_names,
    write_index,
    write_placed,
)
from adapterhub_cli.merge.staging import BufferPool, as_tensor
from adapterhub_cli.parallel import default_workers, single_threaded_torch


if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["EachResult", "EachTarget", "run_merge_each"]

#: errors that fail one output and let the others go on (anything else stops them all)
OUTPUT_ERRORS = (AdaptersError, OSError)


@dataclass
class EachTarget:
    """One output of :func:`run_merge_each`: the adapter (None when it could not be read: ``error`` says why), its
    name (the output folder's name) and where its output goes."""

    name: str
    source: str  # the adapter as given (a path or a store ref)
    out: Path
    adapter: Adapter | None = None
    error: BaseException | None = None


@dataclass
class EachResult:
    """One output of ``merge --each``: ``ok`` with the merge's summary, or ``error`` (its message and hint)."""

    name: str
    adapter: str
    path: Path
    ok: bool
    error: str | None = None
    hint: str | None = None
    merge: MergeResult | None = None


def run_merge_each(
    base: BaseView,
    targets: list[EachTarget],
    *,
    device: str = "cpu",
    dtype: str = "auto",
    max_shard_size: str | int | None = "5GB",
    overwrite: bool = False,
    quantize: str | None = None,
    progress: Progress | None = None,
    base_source: str | None = None,
    base_model: str | None = None,
) -> list[EachResult]:
    """Merge each target's adapter alone into ``base``, reading the base once, into the target's folder (atomically,
    with provenance and a card as :func:`.engine.run_merge` writes them); one result per target, in order.

    Options are those of :func:`.engine.run_merge`, the same for every output. A target whose adapter does not fit
    the base, or whose merge or writing fails, gets ``ok=False`` and no folder; the others are written.
    """
    started = time.perf_counter()
    check_device_name(device)  # (whether such a GPU is present: once torch is in, before the first update)
    results: dict[int, EachResult] = {}
    streams: list[_Stream] = []
    for i, target in enumerate(targets):
        if target.adapter is None:
            results[i] = _failed(target, target.error or InvalidAdapterError("the adapter could not be read"))
            continue
        try:
            plan = build_plan(
                base,
                [target.adapter],
                weights=None,
                dtype=dtype,
                max_shard_size=max_shard_size,
                reverse=False,
                quantize=quantize,
            )
        except OUTPUT_ERRORS as e:
            results[i] = _failed(target, e)
            continue
        record = merge_record(
            plan,
            [target.adapter],
            reverse=False,
            weights=None,
            dtype=dtype,
            max_shard_size=max_shard_size,
            device=device,
            quantize=quantize,
            base_source=base_source,
        )
        streams.append(_Stream(i, target, plan, record, device))
    try:
        live = [s for s in streams if s.open(overwrite)]
        if live:
            _drive(live, device, progress)
        for s in live:
            s.finish(base_model)
    except BaseException as e:  # Ctrl-C, a bug: no unfinished output stays behind (finished ones are in place)
        for s in streams:
            s.fail(e)
        raise
    finally:
        for s in streams:
            s.close()
    seconds = time.perf_counter() - started
    for s in streams:
        if s.error is not None:
            results[s.index] = _failed(s.target, s.error)
        else:
            merged = _result(s.plan, s.target.out, s.written, seconds, device)
            merged.warnings += s.merger.untrained() if s.merger is not None else []
            results[s.index] = EachResult(s.target.name, s.target.source, s.target.out, True, merge=merged)
    return [results[i] for i in range(len(targets))]


def _failed(target: EachTarget, error: BaseException) -> EachResult:
    hint = getattr(error, "hint", None)
    message = str(error) if isinstance(error, AdaptersError) else f"{type(error).__name__}: {error}"
    return EachResult(target.name, target.source, target.out, False, error=message, hint=hint)


# ---------------------------------------------------------------------------------------------------- outputs


class _Stream:
    """One output: its plan, temporary folder, merger, staging buffers and writer thread.

    The driver appends jobs in the output's own tensor order (:meth:`put`); the writer thread runs them against the
    shard file being written (O_DIRECT through :class:`.direct_io.StagedFile`, its own disk thread), finishes each
    shard and hands it to the fsync thread. After a failure the jobs still queued only run their cleanups (their
    staging buffers go back), so one failed output never holds buffers the others wait for.
    """

    def __init__(self, index: int, target: EachTarget, plan: MergePlan, record: dict[str, Any], device: str) -> None:
        self.index = index
        self.target = target
        self.plan = plan
        self.record = record
        self.device = device
        self.metadata = shard_metadata(record)
        self.offsets = output_offsets(plan.shards, self.metadata)  # where each tensor starts in its shard
        self.names = plan.shard_files or shard_names(plan.view.weights_stem, len(plan.shards))
        self.where = {p.name: (i, j) for i, shard in enumerate(plan.shards) for j, p in enumerate(shard)}
        self.order = [p for shard in plan.shards for p in shard]
        self.error: BaseException | None = None
        self.written = 0
        self.merger: _Merger | None = None
        self.buffers: BufferPool | None = None
        self._atomic: AbstractContextManager[Path] | None = None
        self.folder: Path | None = None
        self._queue: queue.Queue[tuple[Callable[[], None] | None, Callable[[], None] | None] | None] = queue.Queue(
            maxsize=WRITE_BEHIND + 2
        )
        self._thread: threading.Thread | None = None
        self._disk: ThreadPoolExecutor | None = None
        self._closer: ThreadPoolExecutor | None = None
        self._synced: list[Future[None]] = []
        self._open: list[StagedFile] = []  # shards being written, until their fds go to the fsync thread
        self._expected = 0
        self._done = False

    @property
    def adapter(self) -> Adapter:
        assert self.target.adapter is not None
        return self.target.adapter

    # -------------------------------------------------------------- life cycle

    def open(self, overwrite: bool) -> bool:
        """Make the temporary folder and start the threads; False (and :attr:`error`) if the folder cannot be made."""
        try:
            self._atomic = atomic_dir(self.target.out, overwrite=overwrite)
            self.folder = self._atomic.__enter__()
        except OUTPUT_ERRORS as e:
            self._atomic = None
            self.error = e
            return False
        self._disk = ThreadPoolExecutor(1, thread_name_prefix=f"adapters-disk-{self.index}")
        self._closer = ThreadPoolExecutor(1, thread_name_prefix=f"adapters-fsync-{self.index}")
        self._thread = threading.Thread(target=self._run, name=f"adapters-writer-{self.index}", daemon=True)
        self._thread.start()
        return True

    @property
    def failed(self) -> bool:
        return self.error is not None

    def finish(self, base_model: str | None) -> None:
        """Wait for every shard, write the index, side files and card, and move the folder into place; after a
        failure (the writer thread may have recorded one that no :meth:`fail` has cleaned up yet), clean up."""
        if self._atomic is None or self.folder is None:
            return
        if self.error is not None:
            self.fail(self.error)
            return
        try:
            self._drain()
            if self.error is not None:
                raise self.error
            for sync in self._synced:
                sync.result()
            plan, folder = self.plan, self.folder
            if len(plan.shards) > 1:
                write_index(folder, plan.view.weights_stem, self.names, plan.shards, plan.total_bytes)
            copy_side_files(plan.view.path, folder, plan.config_updates, plan.config_drop)
            config = {**plan.view.config, **plan.config_updates}
            model = base_model if base_model is not None else hub_id(plan.view.config.get("_name_or_path"))
            (folder / CARD_FILE).write_text(merged_card(config, self.record, base_model=model))
            self._stop_threads()
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(None, None, None)
            self._done = True
        except OUTPUT_ERRORS as e:
            self.fail(e)

    def fail(self, error: BaseException) -> None:
        """Stop this output after ``error``: skip its queued jobs (running their cleanups), close its file, remove
        its temporary folder."""
        if self._done:
            return
        if self.error is None:
            self.error = error
        if self._thread is not None:
            self._drain()
        for sink in self._open:
            sink.abort()
            os.close(sink.fd)
        self._open.clear()
        self._stop_threads()
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            try:
                atomic.__exit__(type(self.error), self.error, self.error.__traceback__)
            except BaseException:  # (the context manager re-raises what it is given: that is reported already)
                pass

    def close(self) -> None:
        self._stop_threads()
        if self.merger is not None:
            self.merger.close()
        if self.buffers is not None:
            self.buffers.close()

    def _stop_threads(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._closer is not None:
            self._closer.shutdown(wait=True)  # every finished shard closed
            self._closer = None
        if self._disk is not None:
            self._disk.shutdown(wait=True)
            self._disk = None

    # -------------------------------------------------------------- writing

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                job, cleanup = item
                try:
                    if job is not None and self.error is None:
                        job()
                except BaseException as e:  # reported at the next put or at finish
                    if self.error is None:
                        self.error = e
                finally:
                    if cleanup is not None:
                        try:
                            cleanup()
                        except BaseException as e:  # (the thread must live on: later puts and the drain wait on it)
                            if self.error is None:
                                self.error = e
            finally:
                self._queue.task_done()

    def _drain(self) -> None:
        self._queue.join()

    def put(self, p: TensorPlan, job: Callable[[StagedFile], None], cleanup: Callable[[], None] | None) -> None:
        """Queue ``job`` (appending ``p``'s bytes to its shard) behind the jobs before it; ``cleanup`` runs after it
        whatever happens. Opens the shard (its header written first) at its first tensor, finishes it after its
        last. Raises the writer's error, if it had one (``cleanup`` has then run)."""
        if self.error is not None:
            if cleanup is not None:
                cleanup()
            raise self.error
        i, j = self.where[p.name]
        shard = self.plan.shards[i]
        try:
            if j == 0:
                assert self.folder is not None and self._disk is not None
                head, size = encode_header((e for q in shard for e in q.entries), self.metadata)
                self._open.append(StagedFile(self.folder / self.names[i], self._disk))
                self._open[-1].write(head)
                self._expected = len(head) + size
            sink = self._open[-1]
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
        self._queue.put((functools.partial(job, sink), cleanup))
        if j == len(shard) - 1:
            self._queue.put((functools.partial(self._finish_shard, sink, self._expected), None))
            self.written += self._expected

    def _finish_shard(self, sink: StagedFile, expected: int) -> None:
        """On the writer thread: write what is staged, check the size, fsync and close on the fsync thread."""
        sink.finish()
        size = os.fstat(sink.fd).st_size
        if size != expected:
            raise OSError(f"{sink.path.name} has {size} bytes, expected {expected}")
        assert self._closer is not None
        self._open.remove(sink)
        self._synced.append(self._closer.submit(_sync_and_close, sink.fd))


# ---------------------------------------------------------------------------------------------------- the pass


@dataclass
class _Shared:
    """A base tensor read once for every output, and the references to its staging buffer still held (the
    driver's own, and one per write job that reads it); the buffer goes back to the pool at the last release.

    Read into an unpinned buffer it comes as its stored bytes (:class:`.shards.RawTensor`): untouched, it is checked
    and written to every output without torch (so the first ones are, while torch imports); :attr:`tensor` views it
    as a tensor for the outputs that merge it.
    """

    source: torch.Tensor | RawTensor
    buffer: torch.Tensor | np.ndarray | None
    pool: BufferPool
    refs: int = 1
    finite: bool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _tensor: torch.Tensor | None = field(default=None, init=False)

    @property
    def raw(self) -> RawTensor | None:
        """The stored bytes, when read into an unpinned buffer (also once :attr:`tensor` has viewed them)."""
        return self.source if isinstance(self.source, RawTensor) else None

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor (viewed once from the stored bytes, without a copy: every caller gets the same object)."""
        if not isinstance(self.source, RawTensor):
            return self.source
        if self._tensor is None:
            self._tensor = self.source.tensor()
        return self._tensor

    def take(self) -> Callable[[], None]:
        with self.lock:
            self.refs += 1
        return self.release

    def release(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last and self.buffer is not None:
            self.pool.release(self.buffer)

    def require_finite(self, name: str) -> None:
        """Refuse (InvalidAdapterError naming ``name``) a base tensor holding NaN or inf; checked once for every
        output (by numpy on the stored bytes: :class:`.shards.FiniteCheck`; by torch on a pinned buffer's tensor)."""
        if self.finite is None:
            self.finite = self._finite(name)
        if not self.finite:
            raise damaged_base(name)

    def _finite(self, name: str) -> bool:
        raw = self.raw
        if raw is not None:
            if not FiniteCheck.wanted(raw.info.dtype):  # (integers, 8-bit floats: copied unchecked)
                return True
            try:
                FiniteCheck.whole(name, raw.info.dtype, raw.data.data)
            except InvalidAdapterError:
                return False
            return True
        import math

        import torch

        t = self.tensor
        return (
            not t.dtype.is_floating_point
            or t.numel() == 0
            or math.isfinite(float(t.sum()))
            or bool(torch.isfinite(t).all())
        )


@dataclass
class _Step:
    """One output tensor name (and its source) in the union order, and the outputs writing it."""

    name: str
    source: str
    consumers: list[tuple[_Stream, TensorPlan]] = field(default_factory=list)

    @property
    def reads_base(self) -> bool:
        return any(p.replacement is None for _, p in self.consumers)


def _union(streams: list[_Stream]) -> list[_Step]:
    """The steps of the pass: every output's tensors in one order that keeps each output's own order."""
    keys: list[tuple[str, str]] = []
    for s in streams:
        last = -1
        for p in s.order:
            key = (p.name, p.source)
            if key in keys:
                last = keys.index(key)
            else:
                last += 1
                keys.insert(last, key)
    steps = {key: _Step(*key) for key in keys}
    for s in streams:
        positions = [keys.index((p.name, p.source)) for p in s.order]
        if positions != sorted(positions):  # (plans of one base share its order: this does not happen)
            raise RuntimeError(f"the tensor order of {s.target.name} cannot be merged with the others'")
        for p in s.order:
            steps[(p.name, p.source)].consumers.append((s, p))
    return [steps[key] for key in keys]


def _drive(streams: list[_Stream], device: str, progress: Progress | None) -> None:
    """Read each base tensor once and give it to every output that writes it, in the union order.

    On the CPU torch is first needed at the first step that merges: the reads start at once, and the untouched
    tensors before that step (the embeddings) are checked and written to every output while torch imports on the
    helper thread (:mod:`adapterhub_cli.warmup`). Page-locked buffers (CUDA) need torch from the start.
    """
    first = streams[0].plan
    stored, quantized_in = first.stored, first.quantized_in
    reader = _BaseReader(stored)
    pin = device.startswith("cuda")
    shared_pool = BufferPool(READ_AHEAD + 1 + WRITE_BEHIND + 2, pin=pin)
    workers = default_workers()
    compute: ThreadPoolExecutor | None = None
    for s in streams:
        s.buffers = BufferPool(WRITE_BEHIND + 2, pin=pin)
    steps = _union(streams)
    reps = {id(step): dataclasses.replace(step.consumers[0][1], name=str(k)) for k, step in enumerate(steps)}
    reading = [reps[id(step)] for step in steps if step.reads_base]

    last_of = {str(k): step.consumers[-1] for k, step in enumerate(steps)}  # (keyed as the reps are named)

    def fetch(p: TensorPlan) -> tuple[torch.Tensor | RawTensor, torch.Tensor | np.ndarray | None]:
        if p.source in quantized_in:
            warmup.wait()  # (dequantizing needs torch: imported by the helper, not on this thread)
            return bnb.dequantize_weight(reader.tensor, p.source, stored), None
        info = stored.tensors[p.source]
        if pin:
            buffer = shared_pool.acquire(info.nbytes)
            try:
                return reader.tensor(p.source, into=buffer), buffer
            except BaseException:
                shared_pool.release(buffer)
                raise
        # placed for the last output that writes it (it may then write from this buffer: :func:`_produce`)
        s, q = last_of[p.name]
        pad = _pad(s, q, info.dtype)
        raw = shared_pool.acquire_raw(pad + info.nbytes)
        try:
            return RawTensor(reader.read_raw(p.source, raw[pad:]), raw, pad), raw
        except BaseException:
            shared_pool.release(raw)
            raise

    read_ahead = _ReadAhead(reading, fetch)
    total = sum(s.plan.total_bytes for s in streams)
    done = 0
    with contextlib.ExitStack() as torch_mode:

        def start_torch() -> None:
            nonlocal compute
            warmup.wait()  # torch imported (and CUDA started) on the helper thread
            check_device(device)
            compute = ThreadPoolExecutor(workers, thread_name_prefix="adapters-merge") if workers > 1 else None
            for s in streams:
                s.merger = _Merger([s.adapter], device, workers=workers, pool=compute, base_config=s.plan.view.config)
            torch_mode.enter_context(single_threaded_torch())

        try:
            if pin:
                start_torch()
            else:
                read_ahead.start()  # the first reads run while torch imports
            for step in steps:
                live = [(s, p) for s, p in step.consumers if not s.failed]
                if streams[0].merger is None and any(not s.plan.copied(p) for s, p in live):  # the first to merge
                    start_torch()
                shared = None
                if step.reads_base:
                    source, buffer = read_ahead.take(reps[id(step)])
                    shared = _Shared(source, buffer, shared_pool)
                try:
                    for k, (s, p) in enumerate(live):
                        try:
                            _produce(s, p, shared, last=k == len(live) - 1)
                        except OUTPUT_ERRORS as e:
                            s.fail(e)
                finally:
                    if shared is not None:
                        shared.release()  # the driver's own reference
                done += sum(p.nbytes for _, p in step.consumers)
                if progress:
                    progress(done, total)
                if not any(not s.failed for s in streams):
                    break
        finally:
            shared_pool.close()  # a read waiting for a buffer after an error gives up
            read_ahead.close()
            if compute is not None:
                compute.shutdown()


def _produce(s: _Stream, p: TensorPlan, shared: _Shared | None, *, last: bool) -> None:
    """Produce output ``s``'s tensor ``p`` (from the shared base tensor, or its adapter's saved copy) and queue
    its write."""
    plan = s.plan
    if plan.copied(p):
        assert shared is not None
        if p.dtype in COMPUTE_DTYPES:
            shared.require_finite(p.name)
        pad = _pad(s, p, plan.stored.tensors[p.source].dtype)
        stored = shared.raw
        if stored is None:  # a page-locked buffer (CUDA): torch is in
            s.put(p, functools.partial(_write_tensor, shared.tensor), shared.take())
        elif last and stored.pad == pad:  # read where this output writes it from: the disk writes it from there
            handoff = Handoff(shared.take())
            write = functools.partial(_write_placed, stored.buffer, pad, stored.info.nbytes, handoff)
            s.put(p, write, handoff.cleanup)
        else:  # copied into the output's staging chunks (without torch, the GIL released)
            s.put(p, functools.partial(_write_bytes, stored.data), shared.take())
        return
    assert s.merger is not None and s.buffers is not None
    cleanups: list[Callable[[], None]] = []
    placed: tuple[np.ndarray, int, int, Handoff] | None = None
    try:
        t = s.adapter.tensor(p.replacement[1]) if p.replacement else _source(shared)
        if p.dtype in COMPUTE_DTYPES:
            t = t.to(torch_dtype(p.dtype))  # as if the base were loaded in the output dtype, then merged
        base_view = shared.tensor if shared is not None and not p.replacement else None
        sums: list[float] = []  # the merge's block sums (the NaN / inf check)
        if p.contributions:
            if base_view is not None and t is base_view:
                if last and shared is not None and shared.refs == 1:  # no one else reads it any more: in place
                    handoff = Handoff(shared.take())
                    cleanups.append(handoff.cleanup)
                    t = s.merger.apply(p, t, sums=sums)
                    pad = _pad(s, p, plan.stored.tensors[p.source].dtype)
                    if _placed(t, shared.buffer, pad):
                        placed = (cast("np.ndarray", shared.buffer), pad, t.numel() * t.element_size(), handoff)
                elif not s.buffers.pin:  # into this output's buffer, placed for the disk to write from it
                    nbytes = t.numel() * t.element_size()
                    pad = _pad(s, p, p.dtype)
                    raw = s.buffers.acquire_raw(pad + nbytes)
                    handoff = Handoff(functools.partial(s.buffers.release, raw))
                    cleanups.append(handoff.cleanup)
                    out = as_tensor(raw)[pad : pad + nbytes].view(t.dtype).view(t.shape)
                    t = s.merger.apply(p, t, out=out, sums=sums)
                    if _placed(t, raw, pad):
                        placed = (raw, pad, nbytes, handoff)
                else:
                    buffer = s.buffers.acquire(t.numel() * t.element_size())
                    cleanups.append(functools.partial(s.buffers.release, buffer))
                    out = buffer[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                    t = s.merger.apply(p, t, out=out, sums=sums)
            else:
                t = s.merger.apply(p, t, sums=sums)
        elif base_view is not None and t is base_view and shared is not None:
            cleanups.append(shared.take())  # written straight from the shared buffer
        require_finite(t, p, s.merger.adapters, base_dtype=_dtype_of(plan.view, p.source), sums=sums)
        if plan.quantize and p.quantized_entries:
            parts = bnb.quantize_weight(t, p.name, plan.quantize, compute_dtype=t.dtype)
            for c in cleanups:
                c()
            cleanups = []
            order = [key for key, _, _ in p.entries]
            s.put(p, functools.partial(_write_parts, parts, order), None)
            return
    except BaseException:
        for c in cleanups:
            c()
        raise
    if placed is not None:
        s.put(p, functools.partial(_write_placed, *placed), _all(cleanups))
        return
    s.put(p, functools.partial(_write_tensor, t), _all(cleanups))


def _pad(s: _Stream, p: TensorPlan, dtype: str) -> int:
    """Where a buffer holds ``p`` (of ``dtype``) for output ``s`` to write it from there
    (:func:`.direct_io.placement` of its offset in its shard)."""
    return placement(s.offsets[p.name], DTYPE_BITS[dtype] // 8)


def _write_placed(buffer: np.ndarray, pad: int, nbytes: int, handoff: Handoff, sink: StagedFile) -> None:
    """:func:`.shards.write_placed` (one function here, so a test can fail one output's placed writes)."""
    write_placed(buffer, pad, nbytes, handoff, sink)


def _source(shared: _Shared | None) -> torch.Tensor:
    assert shared is not None
    return shared.tensor


def _all(cleanups: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not cleanups:
        return None
    if len(cleanups) == 1:
        return cleanups[0]

    def run() -> None:
        for c in cleanups:
            c()

    return run


def _write_bytes(data: np.ndarray, sink: StagedFile) -> None:
    """Append the bytes of the uint8 array ``data`` to ``sink``."""
    sink.write(data.data)


def _write_tensor(t: torch.Tensor, sink: StagedFile) -> None:
    """Append ``t`` to ``sink`` (one function, so a test can fail one output's writes)."""
    sink.write_tensor(t)


def _write_parts(parts: dict[str, torch.Tensor], order: list[str], sink: StagedFile) -> None:
    for key in order:
        _write_tensor(parts[key], sink)
