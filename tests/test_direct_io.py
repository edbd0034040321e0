"""The merge's file writer (O_DIRECT staging chunks, or plain writes) and its recycled staging buffers."""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapterhub_cli.merge import direct_io
from adapterhub_cli.merge.direct_io import StagedFile
from adapterhub_cli.merge.staging import BufferPool, PoolClosedError


def _write_everything(path, disk, *, direct, chunk, source):
    """Header bytes, two tensors and a raw range of ``source``, appended in that order; the expected bytes."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3000, generator=g)
    b = torch.randn(777, generator=g).bfloat16()
    sink = StagedFile(path, disk, direct=direct, chunk=chunk)
    sink.write(b"header!")
    sink.write_tensor(a)
    with source.open("rb") as f:
        sink.copy_range(f.fileno(), 5, 20000)
    sink.write_tensor(b)
    size = sink.finish()
    os.close(sink.fd)
    raw = source.read_bytes()[5:20005]
    want = b"header!" + a.numpy().tobytes() + raw + b.view(torch.int16).numpy().tobytes()
    return size, want, sink.direct


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("chunk", [4096, 8192, 1 << 20])
def test_staged_file_writes_exactly_the_appended_bytes(tmp_path, direct, chunk):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(30000))
    with ThreadPoolExecutor(1) as disk:
        size, want, used_direct = _write_everything(tmp_path / "out", disk, direct=direct, chunk=chunk, source=source)
    assert (tmp_path / "out").read_bytes() == want and size == len(want)
    if not direct:
        assert not used_direct


def test_a_filesystem_that_refuses_direct_writes_falls_back_to_buffered(tmp_path, monkeypatch):
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    def fcntl_direct(fd):
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(30000))
    with ThreadPoolExecutor(1) as disk:
        _, want, used_direct = _write_everything(tmp_path / "out", disk, direct=True, chunk=4096, source=source)
    assert (tmp_path / "out").read_bytes() == want
    if used_direct:  # O_DIRECT was taken at open: the first write was refused, the rest went buffered
        assert refused == [0]


def test_direct_io_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ADAPTERS_DIRECT_IO", "0")
    assert not direct_io.direct_io_wanted()


def test_buffer_pool_recycles_and_bounds_its_buffers():
    pool = BufferPool(2)
    first, second = pool.acquire(1000), pool.acquire(3000)
    assert first.numel() == 1000 and second.numel() == 3000
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(900)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # both buffers are out: the third acquire waits
    pool.release(first)
    waiter.join(5)
    assert got and got[0].data_ptr() == first.data_ptr()  # the same memory, not a new allocation


def test_buffer_pool_hands_out_the_smallest_fit_and_replaces_what_is_too_small():
    pool = BufferPool(2)
    small, big = pool.acquire(1000), pool.acquire(50 << 20)
    pool.release(small)
    pool.release(big)
    assert pool.acquire(900).data_ptr() == small.data_ptr()  # the smallest that fits
    assert pool.acquire(2000).data_ptr() == big.data_ptr()  # the only one that fits
    pool.release(small)
    # big is out, small is free but too small: it is dropped and a buffer that fits allocated (still 2 in all)
    assert pool.acquire(2000).numel() == 2000
    pool.close()


def test_closing_the_pool_wakes_a_waiting_reader():
    pool = BufferPool(1)
    pool.acquire(10)
    errors = []

    def wait() -> None:
        try:
            pool.acquire(10)
        except PoolClosedError as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    pool.close()
    waiter.join(5)
    assert len(errors) == 1
