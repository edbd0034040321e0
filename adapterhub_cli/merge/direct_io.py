"""Writing large files past the page cache: O_DIRECT through page-aligned staging chunks.

A buffered ``write`` copies every byte into the page cache, and once gigabytes are dirty the kernel throttles
the writer while it flushes: on the 2.2 GB merge benchmark that was 2-3 core-seconds of kernel time, as much
as the merge arithmetic. With ``O_DIRECT`` the disk reads the bytes straight from our memory. The bytes are
gathered into page-aligned chunks (the alignment O_DIRECT needs) that a disk thread writes while the next
chunk fills. Where a filesystem refuses O_DIRECT (tmpfs, some network filesystems) or
``ADAPTERS_DIRECT_IO=0`` is set, plain buffered writes are used.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

ALIGN = 4096  # O_DIRECT offsets, lengths and addresses are multiples of the logical block size (<= 4096)
CHUNK = 8 << 20  # bytes per direct write


def direct_io_wanted() -> bool:
    """O_DIRECT unless ``ADAPTERS_DIRECT_IO=0`` (or the platform has none)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("ADAPTERS_DIRECT_IO", "1") != "0"


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def placement(offset: int, itemsize: int = 1) -> int:
    """Where in an :data:`ALIGN`-aligned buffer to put a tensor bound for file offset ``offset`` so that the disk
    can write it from there with O_DIRECT (:meth:`StagedFile.write_placed`): ``offset`` modulo :data:`ALIGN`; 0
    where no tensor of ``itemsize``-byte elements can start (an offset after an odd-sized tensor, e.g. packed 4-bit
    weights): placed there, it is copied when written instead."""
    pad = offset % ALIGN
    return pad if pad % max(itemsize, 1) == 0 else 0


def _address(view: memoryview) -> int:
    """The memory address of a writable buffer's first byte."""
    import ctypes

    if not len(view):
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _drop_direct(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~getattr(os, "O_DIRECT", 0))


@dataclass
class _Chunk:
    """One page-aligned staging chunk (an anonymous map), as bytes and (made on first use: copying raw bytes needs
    no torch, so a merge can start before torch is imported) as a torch tensor, and its write."""

    buf: mmap.mmap
    view: memoryview
    pending: Future[None] | None = None
    _tensor: torch.Tensor | None = None

    @classmethod
    def allocate(cls, nbytes: int) -> _Chunk:
        buf = mmap.mmap(-1, nbytes)  # anonymous maps are page-aligned
        return cls(buf, memoryview(buf))

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            import torch

            self._tensor = torch.frombuffer(self.buf, dtype=torch.uint8)
        return self._tensor

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


class StagedFile:
    """Appends bytes to a new file: with O_DIRECT through ``depth`` staging chunks written on ``disk`` (a
    one-thread executor shared by the files of one merge), else with plain writes.

    Call :meth:`finish` once everything is appended: it writes what is staged, waits for the disk and returns
    the file size; the descriptor (``fd``) stays open for the caller to fsync and close.
    """

    def __init__(
        self, path: Path, disk: ThreadPoolExecutor, *, direct: bool | None = None, chunk: int = CHUNK, depth: int = 2
    ) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        want = direct_io_wanted() if direct is None else direct
        self.direct = False
        if want:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o666)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)  # less the umask
        self.size = 0
        self._disk = disk
        self._chunk = chunk - chunk % ALIGN or ALIGN
        try:
            self._chunks = [_Chunk.allocate(self._chunk) for _ in range(max(depth, 1))] if self.direct else []
        except BaseException:  # (no staging memory: the descriptor is not handed to anyone, so it is closed here)
            os.close(self.fd)
            raise
        self._current = 0  # index of the chunk being filled
        self._fill = 0
        self._offset = 0  # file offset of the current chunk
        self._failed = threading.Event()
        self._placed: list[Future[None]] = []  # writes straight from callers' buffers (write_placed)

    # ------------------------------------------------------------------ appending

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes (copied into the staging chunks by numpy, which releases the GIL: a large copy made before
        torch is imported does not hold up the import on the helper thread)."""
        import numpy as np

        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if not self.direct:
            write_all(self.fd, view)
        else:
            while view:
                n = min(len(view), self._chunk - self._fill)
                room = np.frombuffer(self._chunks[self._current].view, dtype=np.uint8, count=n, offset=self._fill)
                room[:] = np.frombuffer(view, dtype=np.uint8, count=n)
                view = view[n:]
                self._advance(n)

    def write_tensor(self, t: torch.Tensor) -> None:
        """Append a tensor's bytes (copied into the staging chunk by torch, without holding the GIL)."""
        import torch

        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if not self.direct:
            write_all(self.fd, memoryview(flat.numpy().data))
            self.size += flat.numel()
            return
        done, total = 0, flat.numel()
        while done < total:
            n = min(total - done, self._chunk - self._fill)
            self._chunks[self._current].tensor[self._fill : self._fill + n].copy_(flat[done : done + n])
            done += n
            self._advance(n)
        self.size += total

    def write_placed(self, buffer: memoryview, pad: int, nbytes: int, release: Callable[[], None] | None) -> None:
        """Append ``buffer[pad : pad + nbytes]``, placed so that with O_DIRECT the disk writes it from ``buffer``
        itself, without a copy into a staging chunk; ``release`` is called once those bytes are written (or could
        not be: it is called whatever happens).

        ``buffer`` starts on an :data:`ALIGN` boundary and ``pad`` is the file offset of the bytes modulo
        :data:`ALIGN` (:func:`placement`); ``buffer[:pad]`` is scratch, filled here with the block's bytes already
        staged, and the last partial block is carried into the next chunk. Placed any other way, or without
        O_DIRECT, the bytes are copied (:meth:`write`) and released at once.
        """
        done: Future[None] | None = None
        try:
            view = buffer.cast("B")
            if (
                not self.direct
                or pad != self.size % ALIGN
                or len(view) < pad + nbytes
                or _address(view) % ALIGN  # (raises for a read-only buffer: released all the same)
            ):
                self.write(view[pad : pad + nbytes])
                return
            chunk = self._chunks[self._current]
            start = self._offset + self._fill - pad  # file offset of the block the bytes start in
            head = start - self._offset  # whole blocks staged before it (a multiple of ALIGN)
            view[:pad] = chunk.view[head : self._fill]
            if head:
                chunk.pending = self._disk.submit(self._write_chunk, chunk.view[:head], self._offset)
                self._current = (self._current + 1) % len(self._chunks)
                self._chunks[self._current].wait()  # the chunk that receives the tail is not in flight
            whole = (pad + nbytes) // ALIGN * ALIGN
            tail = pad + nbytes - whole
            # the last partial block is staged (copied) before the buffer may be written and released
            self._chunks[self._current].view[:tail] = view[whole : whole + tail]
            self._offset, self._fill = start + whole, tail
            done = self._disk.submit(self._write_then, view[:whole], start, release)
        finally:
            if done is None and release is not None:  # (copied, or failed before the disk took the buffer)
                release()
        self.size += nbytes
        assert done is not None
        self._placed.append(done)

    def _write_then(self, data: memoryview, offset: int, release: Callable[[], None] | None) -> None:
        try:
            if data:
                self._write_chunk(data, offset)
        finally:
            if release is not None:
                release()

    def copy_range(
        self, src_fd: int, offset: int, nbytes: int, check: Callable[[memoryview], None] | None = None
    ) -> None:
        """Append ``nbytes`` of the file ``src_fd`` from ``offset``: read straight into the staging chunk with
        O_DIRECT, else copied in the kernel (``copy_file_range``, falling back to read + write).

        ``check`` sees every byte copied, in order, as it passes through memory (the kernel copy is then replaced
        by read + write), and may raise to stop the copy: one read of the source serves the copy and its check.
        """
        self.size += nbytes
        if self.direct:
            while nbytes:
                room = self._chunks[self._current].view[
                    self._fill : self._fill + min(nbytes, self._chunk - self._fill)
                ]
                n = os.preadv(src_fd, [room], offset)
                if n == 0:
                    raise OSError(errno.EIO, f"the source file ends before byte {offset + nbytes}")
                if check is not None:
                    check(room[:n])
                offset, nbytes = offset + n, nbytes - n
                self._advance(n)
            return
        if check is not None:
            while nbytes:
                chunk = os.pread(src_fd, min(nbytes, 16 << 20), offset)
                if not chunk:
                    raise OSError(errno.EIO, f"the source file ends before byte {offset + nbytes}")
                check(memoryview(chunk))
                write_all(self.fd, chunk)
                offset, nbytes = offset + len(chunk), nbytes - len(chunk)
            return
        while nbytes:
            try:
                done = os.copy_file_range(src_fd, self.fd, nbytes, offset)
            except OSError:
                done = 0
            if done == 0:  # not supported here: read + write in 64 MiB pieces
                while nbytes:
                    chunk = os.pread(src_fd, min(nbytes, 64 << 20), offset)
                    if not chunk:
                        raise OSError(errno.EIO, f"the source file ends before byte {offset + nbytes}")
                    write_all(self.fd, chunk)
                    offset, nbytes = offset + len(chunk), nbytes - len(chunk)
                return
            offset, nbytes = offset + done, nbytes - done

    # ------------------------------------------------------------------ chunks

    def _advance(self, n: int) -> None:
        self._fill += n
        if self._fill < self._chunk:
            return
        full = self._chunks[self._current]
        full.pending = self._disk.submit(self._write_chunk, full.view, self._offset)
        self._offset += self._chunk
        self._current = (self._current + 1) % len(self._chunks)
        self._fill = 0
        self._chunks[self._current].wait()  # its previous write is done before it is filled again

    def _write_chunk(self, data: memoryview, offset: int) -> None:
        if self._failed.is_set():  # an earlier chunk failed: write nothing more
            return
        try:
            try:
                _pwrite_all(self.fd, data, offset)
            except OSError as e:  # a filesystem that takes the flag but not the writes: go on buffered
                if e.errno != errno.EINVAL:
                    raise
                _drop_direct(self.fd)
                _pwrite_all(self.fd, data, offset)
        except BaseException:
            self._failed.set()
            raise

    def finish(self) -> int:
        """Write what is staged and wait until every chunk is written; the file's size."""
        if self.direct:
            last = self._chunks[self._current]
            head = self._fill - self._fill % ALIGN
            if head:
                self._write_chunk(last.view[:head], self._offset)
            for chunk in self._chunks:
                chunk.wait()
            self._wait_placed()
            if self._fill > head:  # the tail is not a whole block: written through the page cache
                _drop_direct(self.fd)
                _pwrite_all(self.fd, last.view[head : self._fill], self._offset + head)
            self._chunks.clear()  # unmapped once the last view of them (a finished write's) is gone
        return self.size

    def abort(self) -> None:
        """Stop after an error: wait for chunks in flight (their errors ignored), free the staging memory."""
        self._failed.set()
        for chunk in self._chunks:
            try:
                chunk.wait()
            except BaseException:
                pass
        try:
            self._wait_placed()
        except BaseException:
            pass
        self._chunks.clear()

    def _wait_placed(self) -> None:
        """Wait for every write from a caller's buffer (each releases its buffer); then raise the first error."""
        placed, self._placed = self._placed, []
        errors = [e for e in (done.exception() for done in placed) if e is not None]
        if errors:
            raise errors[0]


__all__ = ["ALIGN", "CHUNK", "StagedFile", "direct_io_wanted", "placement", "write_all"]
