"""The merge's files: base tensors read ahead of the merge, merged tensors written behind it, shards, the index
and the side files.

Base tensors are read one shard at a time (one file open) into recycled staging buffers, on a helper thread, up
to :data:`READ_AHEAD` tensors ahead of the one being merged. Each output shard's header is written from the
plans before its tensors; the tensors are appended in order by a writer thread while the next one is read and
merged, their chunks reach the disk on another thread (O_DIRECT where the filesystem allows), and each file is
fsynced and closed while the next shard is produced.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter
from adapterhub_cli.artifact.checkpoint import CONFIG_FILE, BaseView, index_file, shard_file, side_files, single_file
from adapterhub_cli.artifact.files import read_json
from adapterhub_cli.artifact.safetensors import (
    DTYPE_BITS,
    encode_header,
    file_data_start,
    read_into,
    read_tensor,
    torch_dtype,
)
from adapterhub_cli.errors import InvalidAdapterError
from adapterhub_cli.merge import bnb
from adapterhub_cli.merge.direct_io import StagedFile, placement
from adapterhub_cli.merge.plan import MergePlan, TensorPlan
from adapterhub_cli.merge.staging import BufferPool, as_tensor


if TYPE_CHECKING:
    import numpy as np
    import torch

    from adapterhub_cli.artifact.safetensors import TensorInfo

READ_AHEAD = 2  # tensors read ahead of the one being merged
WRITE_BEHIND = 2  # merged tensors waiting for (or in) the writer, beyond which reading waits

#: a tensor read from the base (or an adapter), and the staging buffer holding it (None: its own allocation)
Fetched = tuple["torch.Tensor", "torch.Tensor | np.ndarray | None"]
#: appends one planned tensor's bytes to its shard
WriteJob = Callable[[StagedFile], None]
#: what a producer makes of one planned tensor: its write job, and what to run after it whatever happens (the
#: release of its staging buffer when the job did not take it: the job was skipped after an error, or failed first)
Produced = tuple[WriteJob, "Callable[[], None] | None"]


class Handoff:
    """A staging buffer's release, run once: by the write it was handed to (:meth:`take`; a write from the buffer
    itself releases it once the disk has written it), or by :meth:`cleanup` when that write never took it."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def take(self) -> Callable[[], None] | None:
        release, self._release = self._release, None
        return release

    def cleanup(self) -> None:
        release = self.take()
        if release is not None:
            release()


class _BaseReader:
    """Reads base tensors one shard at a time (one safetensors handle open), and copies raw byte ranges."""

    def __init__(self, base: BaseView) -> None:
        self.base = base
        self._path: Path | None = None
        self._handle: Any = None
        self._data_start: dict[Path, int] = {}

    def _start(self, path: Path) -> int:
        if path not in self._data_start:
            self._data_start[path] = file_data_start(path)
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

    def read_raw(self, key: str, into: np.ndarray) -> TensorInfo:
        """Read the stored bytes of ``key`` into the start of the uint8 array ``into``, without torch; its entry."""
        path = self.base.shard_of[key]
        with path.open("rb") as f:  # (its own handle: this may run beside :meth:`tensor` on another thread)
            info = self.base.tensors[key]
            read_into(f.fileno(), info, self._start(path), into.data, path=path)
        return info

    def copy_raw(self, key: str, sink: StagedFile, check: Callable[[memoryview], None] | None = None) -> None:
        """Append the stored bytes of ``key`` to ``sink`` unchanged (``check`` sees them on the way:
        :meth:`.direct_io.StagedFile.copy_range`)."""
        path = self.base.shard_of[key]
        info = self.base.tensors[key]
        with path.open("rb") as src:
            sink.copy_range(src.fileno(), self._start(path) + info.start, info.nbytes, check)


#: the exponent bits of each floating dtype (little-endian integers of its width): all set is NaN or inf
_EXPONENT = {"BF16": ("<u2", 0x7F80), "F16": ("<u2", 0x7C00), "F32": ("<u4", 0x7F800000), "F64": ("<u8", 0x7FF << 52)}


def damaged_base(name: str) -> InvalidAdapterError:
    """The merge's refusal of base tensor ``name`` that already holds NaN or inf (nothing is written)."""
    return InvalidAdapterError(
        f"refused to write the merge: the base's tensor {name} already holds NaN or inf; nothing was written",
        module=name,
        hint="the base checkpoint is damaged: download or copy it again",
    )


class FiniteCheck:
    """Checks the bytes of one stored floating tensor for NaN / inf as they are copied (:meth:`_BaseReader.copy_raw`),
    without torch: every value whose exponent bits are all set is NaN or inf (numpy, which releases the GIL, so
    this runs beside torch's import). Pieces may split a value: the bytes of a split one are carried over.

    Raises (from the call): :class:`InvalidAdapterError` naming the tensor, as the merge's other refusals of a
    damaged base do.
    """

    def __init__(self, key: str, dtype: str) -> None:
        self.key = key
        self.kind, self.mask = _EXPONENT[dtype]
        self.width = int(self.kind[-1])
        self._carry = b""

    def __call__(self, piece: memoryview) -> None:
        import numpy as np

        data: memoryview | bytes = piece
        if self._carry:
            head = self.width - len(self._carry)
            value = self._carry + bytes(piece[:head])
            data = piece[head:]
            if len(value) < self.width:
                self._carry = value
                return
            self._check(np.frombuffer(value, dtype=self.kind))
        whole = len(data) - len(data) % self.width
        self._carry = bytes(data[whole:])
        if whole:
            self._check(np.frombuffer(data[:whole], dtype=self.kind))

    def _check(self, values: Any) -> None:
        import numpy as np

        mask = np.array(self.mask, dtype=self.kind)
        if int(np.bitwise_and(values, mask).max()) == self.mask:
            raise damaged_base(self.key)

    @staticmethod
    def wanted(dtype: str) -> bool:
        return dtype in _EXPONENT

    @classmethod
    def whole(cls, key: str, dtype: str, data: memoryview, piece: int = 1 << 20) -> None:
        """Check a whole tensor's stored bytes ``data``, in pieces (numpy's temporaries stay small: 131 MB of bf16
        took 10 ms in 1 MiB pieces, as long as torch's sum of it)."""
        check = cls(key, dtype)
        for i in range(0, len(data), piece):
            check(data[i : i + piece])


class _Inputs:
    """The tensor each planned output starts from: a ``modules_to_save`` copy from its adapter, a bitsandbytes
    weight dequantized, or the base tensor read into a staging buffer from ``buffers``."""

    def __init__(
        self,
        plan: MergePlan,
        adapters: list[Adapter],
        reader: _BaseReader,
        buffers: BufferPool,
        offsets: dict[str, int] | None = None,
    ) -> None:
        self.plan = plan
        self.adapters = adapters
        self.reader = reader
        self.buffers = buffers
        #: each output tensor's file offset (:func:`output_offsets`): a base tensor is read into its buffer at that
        #: offset modulo the page, so the disk can write it from there (:meth:`.direct_io.StagedFile.write_placed`)
        self.offsets = offsets or {}

    def pad(self, p: TensorPlan) -> int:
        """Where in its staging buffer ``p``'s bytes start (:func:`.direct_io.placement` of its output offset; 0
        when that is unknown)."""
        info = self.plan.stored.tensors.get(p.source)
        if p.name not in self.offsets or info is None:
            return 0
        return placement(self.offsets[p.name], DTYPE_BITS[info.dtype] // 8)

    def fetch(self, p: TensorPlan) -> Fetched | RawTensor:
        """What ``p`` starts from; a plain base tensor of an unpinned pool is read without torch (:class:`RawTensor`,
        made a tensor by :meth:`tensor`), so the first reads can run while torch imports."""
        if p.replacement:
            return self.adapters[p.replacement[0]].tensor(p.replacement[1]), None
        if p.source in self.plan.quantized_in:
            return bnb.dequantize_weight(self.reader.tensor, p.source, self.plan.stored), None
        nbytes = self.plan.stored.tensors[p.source].nbytes
        if not self.buffers.pin:
            pad = self.pad(p)
            raw = self.buffers.acquire_raw(pad + nbytes)
            try:
                return RawTensor(self.reader.read_raw(p.source, raw[pad:]), raw, pad)
            except BaseException:
                self.buffers.release(raw)
                raise
        buffer = self.buffers.acquire(nbytes)
        try:
            return self.reader.tensor(p.source, into=buffer), buffer
        except BaseException:
            self.buffers.release(buffer)
            raise

    @staticmethod
    def tensor(fetched: Fetched | RawTensor) -> Fetched:
        """``fetched`` as a tensor and its buffer (a :class:`RawTensor` viewed as its dtype and shape, no copy)."""
        if not isinstance(fetched, RawTensor):
            return fetched
        return fetched.tensor(), fetched.buffer


@dataclass
class RawTensor:
    """A base tensor's stored bytes (``info``) read into a staging ``buffer`` from byte ``pad`` on, without torch."""

    info: TensorInfo
    buffer: np.ndarray
    pad: int = 0

    @property
    def data(self) -> np.ndarray:
        """The stored bytes (uint8, a view of the buffer)."""
        return self.buffer[self.pad : self.pad + self.info.nbytes]

    def tensor(self) -> torch.Tensor:
        """The bytes viewed as the tensor's dtype and shape (no copy; imports torch)."""
        t = as_tensor(self.buffer)[self.pad : self.pad + self.info.nbytes]
        return t.view(torch_dtype(self.info.dtype)).reshape(self.info.shape)


def output_offsets(shards: list[list[TensorPlan]], metadata: dict[str, str] | None) -> dict[str, int]:
    """Each planned tensor's byte offset in its output shard (the header as :func:`_write_shard` writes it, with
    ``metadata``, included)."""
    offsets: dict[str, int] = {}
    for shard in shards:
        head, _ = encode_header((e for p in shard for e in p.entries), metadata or {"format": "pt"})
        at = len(head)
        for p in shard:
            offsets[p.name] = at
            at += p.nbytes
    return offsets


def write_placed(buffer: np.ndarray, pad: int, nbytes: int, handoff: Handoff, sink: StagedFile) -> None:
    """Append ``nbytes`` of ``buffer`` from byte ``pad`` to ``sink``, written from ``buffer`` itself where O_DIRECT
    allows (:meth:`.direct_io.StagedFile.write_placed`), which releases it once written."""
    sink.write_placed(buffer.data, pad, nbytes, handoff.take())


class _ReadAhead:
    """Runs ``fetch`` on a helper thread for the tensors of ``order``, up to ``ahead`` beyond the one taken;
    ``finish`` turns what was fetched into what :meth:`take` returns, on the taking thread."""

    def __init__(
        self,
        order: list[TensorPlan],
        fetch: Callable[[TensorPlan], Any],
        ahead: int = READ_AHEAD,
        finish: Callable[[Any], Fetched] | None = None,
    ) -> None:
        self.order = order
        self.fetch = fetch
        self.finish = finish
        self.ahead = ahead
        self._position = {p.name: i for i, p in enumerate(order)}
        self._pending: dict[str, Future[Any]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapters-reader")

    def start(self) -> None:
        """Start reading the first tensors (the one to be taken first and ``ahead`` more) before any is taken."""
        for q in self.order[: 1 + self.ahead]:
            if q.name not in self._pending:
                self._pending[q.name] = self._pool.submit(self.fetch, q)

    def take(self, p: TensorPlan) -> Fetched:
        """``fetch(p)``, read ahead if it was, after starting the reads of the next ones."""
        future = self._pending.pop(p.name, None) or self._pool.submit(self.fetch, p)
        i = self._position[p.name]
        for q in self.order[i + 1 : i + 1 + self.ahead]:
            if q.name not in self._pending:
                self._pending[q.name] = self._pool.submit(self.fetch, q)
        fetched = future.result()
        return fetched if self.finish is None else self.finish(fetched)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class _AbandonedError(Exception):
    """The writer's remaining jobs were dropped because the merge failed elsewhere."""


class _AsyncWriter:
    """Writes to a file descriptor on a background thread, in submission order, so disk writes overlap the
    next tensor's read and merge. At most ``depth`` tensors wait in memory."""

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[tuple[Callable[[], None], Callable[[], None] | None] | None] = queue.Queue(
            maxsize=depth
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="adapters-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                job, cleanup = item
                try:
                    if self._error is None:
                        job()
                finally:
                    if cleanup is not None:  # (a skipped job's buffer goes back: the reader may be waiting for it)
                        cleanup()
            except BaseException as e:  # handed to the caller at the next submit or at close
                if self._error is None or isinstance(self._error, _AbandonedError):
                    self._error = e
            finally:
                self._queue.task_done()

    def submit(self, job: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
        """Queue ``job``; ``cleanup`` runs after it whatever happens, also when it is skipped after an error (and
        at once when this raises the error of an earlier job)."""
        if self._error is not None:
            if cleanup is not None:
                cleanup()
            raise self._error
        self._queue.put((job, cleanup))

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


class _ShardWriter:
    """Writes shards one after the other: the writer thread appends tensors, the disk thread writes staged chunks,
    the closer thread fsyncs and closes each finished file while the next one is produced."""

    def __init__(self, depth: int = WRITE_BEHIND + 2) -> None:
        self.writer = _AsyncWriter(depth=depth)
        self.closer = ThreadPoolExecutor(1, thread_name_prefix="adapters-fsync")
        self.disk = ThreadPoolExecutor(1, thread_name_prefix="adapters-disk")
        self.synced: list[Future[None]] = []

    def write(
        self,
        path: Path,
        shard: list[TensorPlan],
        produce: Callable[[TensorPlan], Produced],
        metadata: dict[str, str] | None = None,
    ) -> int:
        """Write one shard (see :func:`_write_shard`); its size in bytes."""
        return _write_shard(path, shard, produce, self.writer, self.disk, self.closer, self.synced, metadata)

    def sync(self) -> None:
        """Wait until every shard written is on disk."""
        for sync in self.synced:
            sync.result()

    def close(self) -> None:
        """Stop the threads: the closer first (every file closed), then the writer and the disk thread."""
        self.closer.shutdown(wait=True)
        self.writer.close()
        self.disk.shutdown(wait=True)


def _write_shard(
    path: Path,
    shard: list[TensorPlan],
    produce: Callable[[TensorPlan], Produced],
    writer: _AsyncWriter,
    disk: ThreadPoolExecutor,
    closer: ThreadPoolExecutor,
    synced: list[Future[None]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file: header from the plans (with ``metadata``, default ``{"format": "pt"}``), then
    each tensor's bytes.

    ``produce(plan)`` does the reading and merging here and returns the job that appends the bytes to the
    file; the writer thread runs those jobs in order while the next tensor is produced, and the ``disk``
    thread writes the staged chunks (O_DIRECT where the filesystem allows).
    """
    head, offset = encode_header((e for p in shard for e in p.entries), metadata or {"format": "pt"})
    sink = StagedFile(path, disk)
    try:
        sink.write(head)
        for p in shard:
            job, cleanup = produce(p)
            writer.submit(functools.partial(job, sink), cleanup)
        writer.drain()
        sink.finish()
        size = os.fstat(sink.fd).st_size
        if size != len(head) + offset:
            raise OSError(f"{path.name} has {size} bytes, expected {len(head) + offset}")
    except BaseException:
        writer.abandon()  # the writer thread stops touching this file before it is closed
        sink.abort()
        os.close(sink.fd)
        raise
    synced.append(closer.submit(_sync_and_close, sink.fd))  # reaches the disk while the next shard is produced
    return len(head) + offset


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensor(sink: StagedFile, t: torch.Tensor) -> None:
    """Append ``t`` to ``sink`` (one function, so a test can stall a merge right at its first write)."""
    sink.write_tensor(t)


def write_then_release(t: torch.Tensor, handoff: Handoff | None, sink: StagedFile) -> None:
    """Append ``t`` to ``sink``, then give ``t``'s staging buffer back (``handoff``), even on error."""
    release = handoff.take() if handoff is not None else None
    try:
        _write_tensor(sink, t)
    finally:
        if release is not None:
            release()


def write_parts(parts: dict[str, torch.Tensor], order: list[str], sink: StagedFile) -> None:
    """Append the tensors ``parts[key]`` for each key of ``order`` to ``sink`` (a quantized weight's entries)."""
    for key in order:
        _write_tensor(sink, parts[key])


def shard_names(stem: str, count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-00003.safetensors``... (``stem`` = model)."""
    if count == 1:
        return [single_file(stem)]
    return [shard_file(stem, i + 1, count) for i in range(count)]


def write_index(folder: Path, stem: str, names: list[str], shards: list[list[TensorPlan]], total: int) -> None:
    """Write ``{stem}.safetensors.index.json``: the total size and which shard holds each tensor."""
    index = {
        "metadata": {"total_size": total},
        "weight_map": {p.name: name for name, shard in zip(names, shards, strict=True) for p in shard},
    }
    (folder / index_file(stem)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: Path, out: Path, config_updates: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    """Copy the checkpoint's side files (config, tokenizer...; regular files only: see :func:`side_files`) from
    ``base`` into ``out``; ``config.json`` gets ``config_updates`` and loses the keys ``drop``."""
    for f in side_files(base):
        if f.name == CONFIG_FILE and (config_updates or drop):
            cfg = read_json(f, CONFIG_FILE)
            cfg.update(config_updates)
            for key in drop:
                cfg.pop(key, None)
            (out / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, out / f.name)  # the bytes only: the copy's mode follows the umask
