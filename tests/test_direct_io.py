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


def _placed_buffer(data: bytes, pad: int, *, misalign: bool = False):
    """A page-aligned (or, with ``misalign``, deliberately not) buffer holding ``data`` from byte ``pad``."""
    from adapterhub_cli.merge.staging import aligned_bytes

    raw = aligned_bytes(pad + len(data) + 64)
    buf = raw[1:] if misalign else raw
    buf[pad : pad + len(data)] = memoryview(data)
    return buf


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("chunk", [4096, 8192, 1 << 20])
@pytest.mark.parametrize("seed", range(4))
def test_placed_writes_mixed_with_the_others_give_exactly_the_appended_bytes(tmp_path, direct, chunk, seed):
    """write_placed (the disk writes a tensor from its own buffer) between plain, tensor and raw-range appends,
    sizes from 0 to several chunks, a wrong pad or a misaligned buffer (both copied instead): the file holds
    exactly the bytes in order, and each buffer is released once, only after its bytes are written (each is
    scribbled over when released: the file stays right)."""
    import random

    from adapterhub_cli.merge.direct_io import placement

    rng = random.Random(seed)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(70000))
    want = bytearray()
    released: list[int] = []
    placed = 0
    with ThreadPoolExecutor(1) as disk:
        sink = StagedFile(tmp_path / "out", disk, direct=direct, chunk=chunk)
        for step in range(40):
            kind = rng.choice(["bytes", "tensor", "range", "placed", "placed", "placed"])
            n = rng.choice([0, 1, 7, 4095, 4096, 4097, rng.randrange(1, 30000)])
            if kind == "bytes":
                data = os.urandom(n)
                sink.write(data)
            elif kind == "tensor":
                t = torch.randint(0, 255, (n,), dtype=torch.uint8)
                data = t.numpy().tobytes()
                sink.write_tensor(t)
            elif kind == "range":
                start = rng.randrange(0, 70000 - n) if n < 70000 else 0
                data = source.read_bytes()[start : start + n]
                with source.open("rb") as f:
                    sink.copy_range(f.fileno(), start, len(data))
            else:
                data = os.urandom(n)
                pad = placement(sink.size)
                odd = rng.random() < 0.2
                if odd and rng.random() < 0.5:
                    pad = (pad + 2) % 4096  # not where the bytes are bound: copied
                buf = _placed_buffer(data, pad, misalign=odd)

                def release(buf=buf, step=step) -> None:
                    released.append(step)
                    buf[:] = 0xAB  # the buffer goes back to the pool and is reused

                sink.write_placed(buf.data, pad, len(data), release)
                placed += 1
            want += data
        size = sink.finish()
        os.close(sink.fd)
    assert (tmp_path / "out").read_bytes() == bytes(want) and size == len(want)
    assert len(released) == len(set(released)) == placed


def test_a_placed_buffer_is_released_even_when_its_write_fails(tmp_path, monkeypatch):
    from adapterhub_cli.merge.direct_io import placement

    def pwrite(fd, data, offset):
        raise OSError(errno.EIO, "disk on fire")

    released = []
    with ThreadPoolExecutor(1) as disk:
        sink = StagedFile(tmp_path / "out", disk, direct=True, chunk=8192)
        if not sink.direct:
            pytest.skip("this filesystem refuses O_DIRECT")
        sink.write(b"x" * 5000)
        monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
        data = os.urandom(20000)
        pad = placement(sink.size)
        sink.write_placed(_placed_buffer(data, pad).data, pad, len(data), lambda: released.append(True))
        with pytest.raises(OSError, match="disk on fire"):
            sink.finish()
        sink.abort()
        os.close(sink.fd)
    assert released == [True]


def test_a_placed_write_that_cannot_start_still_releases_its_buffer(tmp_path):
    """A buffer the disk cannot take (read-only here) raises, and its release runs all the same."""
    from adapterhub_cli.merge.direct_io import placement

    released = []
    with ThreadPoolExecutor(1) as disk:
        sink = StagedFile(tmp_path / "out", disk, direct=True, chunk=8192)
        if not sink.direct:
            pytest.skip("this filesystem refuses O_DIRECT")
        sink.write(b"y" * 100)
        pad = placement(sink.size)
        frozen = memoryview(bytes(pad + 5000))  # read-only
        with pytest.raises(TypeError):
            sink.write_placed(frozen, pad, 5000, lambda: released.append(True))
        sink.abort()
        os.close(sink.fd)
    assert released == [True]
