"""Reusable staging buffers for the streaming merge: a few byte buffers, allocated once and recycled.

Reading each base tensor into a fresh allocation costs a page fault and a page of zeroing per 4 KiB: on a
2.2 GB checkpoint that was ~680k faults and seconds of kernel time, more than the copies themselves. The
merge instead reads every tensor into one of a few recycled buffers, merges it in place and hands the buffer
back once the writer has written it. With ``pin=True`` the buffers
are page-locked, so copies to and from a CUDA device run asynchronously at full bus speed.

Unpinned buffers are page-aligned numpy arrays: they can be filled before torch is imported
(:meth:`BufferPool.acquire_raw`: the merge's first reads run while torch imports), become tensors without a copy
(:meth:`BufferPool.acquire`, :func:`as_tensor`), and the disk can write from them with O_DIRECT.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

from adapterhub_cli.errors import AdaptersError


if TYPE_CHECKING:
    import numpy as np
    import torch

#: bytes: buffers start on a page, so the disk can write a merged tensor from its buffer with O_DIRECT (where it
#: starts at the tensor's file offset modulo the page: :func:`adapterhub_cli.merge.direct_io.placement`)
ALIGN = 4096


def aligned_bytes(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 numpy array of ``nbytes`` (at least 1) whose data starts on an :data:`ALIGN` boundary."""
    import numpy as np

    raw = np.empty(max(nbytes, 1) + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + max(nbytes, 1)]


def as_tensor(buffer: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The uint8 tensor over ``buffer``'s memory (no copy)."""
    import torch

    return buffer if isinstance(buffer, torch.Tensor) else torch.from_numpy(buffer)


class PoolClosedError(AdaptersError):
    """The pool was closed while a buffer was awaited (the merge is being torn down after an error)."""


class BufferPool:
    """At most ``count`` uint8 buffers; :meth:`acquire` blocks until one may be handed out.

    A request gets the smallest free buffer it fits in; when none is large enough, a buffer of the requested
    size is allocated (dropping the largest free one if ``count`` are out or free). Memory is so bounded by
    ``count`` buffers, each the size of some tensor that was in flight (one large embedding among layer-sized
    tensors costs one large buffer, not ``count`` of them), whatever the model size. Nothing is allocated
    before it is asked for.
    """

    def __init__(self, count: int, *, pin: bool = False) -> None:
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.count = count
        self.pin = pin
        self._free: list[Any] = []  # numpy arrays (unpinned) or page-locked tensors (pinned)
        self._out = 0  # buffers handed out and not released
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` uint8 (its contents are whatever the last user left), as a tensor."""
        return as_tensor(self._acquire(nbytes))

    def acquire_raw(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` as a numpy uint8 array, without importing torch (unpinned pools only:
        page-locking needs torch)."""
        if self.pin:
            raise ValueError("a pinned pool hands out tensors only")
        buffer: np.ndarray = self._acquire(nbytes)
        return buffer

    def _acquire(self, nbytes: int) -> Any:
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosedError("the merge is stopping")
                # (indices, not list.remove: tensors compare element-wise)
                fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
                if fits:
                    buffer = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
                    self._out += 1
                    return buffer
                if self._out + len(self._free) < self.count:
                    break
                if self._free:  # none fits: make room for one that does
                    self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].nbytes))
                    break
                self._cond.wait()
            self._out += 1
        try:
            if self.pin:
                import torch

                return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
            return aligned_bytes(nbytes)
        except BaseException:
            self.release(None)
            raise

    def release(self, buffer: np.ndarray | torch.Tensor | None) -> None:
        """Hand a buffer back, as a tensor or an array (None: one that was never allocated)."""
        if buffer is not None and not self.pin and not _is_array(buffer):
            buffer = cast("torch.Tensor", buffer).numpy()  # (the same memory: a tensor made by as_tensor)
        with self._cond:
            self._out -= 1
            if buffer is not None and not self._closed:
                self._free.append(buffer)
            self._cond.notify()

    def close(self) -> None:
        """Wake every waiting :meth:`acquire` with :class:`PoolClosedError` and drop the buffers."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()


def _is_array(buffer: object) -> bool:
    return type(buffer).__module__ == "numpy"


__all__ = ["BufferPool", "PoolClosedError", "aligned_bytes", "as_tensor"]
