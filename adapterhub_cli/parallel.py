"""Threads for tensor work: how many (:func:`cores`, :func:`default_workers`, the one rule), and module-level
parallelism for factor operations (small LAPACK calls run side by side in threads)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar


T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8  # past 8 threads the pieces of work here (256-row blocks, one module's QR) are too small to share


def cores() -> int:
    """The cores this process may run on: its CPU affinity where the system says (a container or ``taskset``
    limited to 2 of 64 cores gives 2, where ``os.cpu_count()`` would say 64), else every core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(env_var: str | None = None) -> int:
    """How many threads a parallel step uses: every core this process may run on (:func:`cores`), at most
    :data:`MAX_WORKERS`.

    A positive integer in the environment variable ``env_var`` (e.g. ``ADAPTERS_MERGE_THREADS``), when given and
    set, overrides it, above the cap too; else one in ``ADAPTERS_THREADS`` (what ``adapters batch`` sets for each
    job, so a pool of N processes runs N x threads, not N x cores).
    """
    for name in (env_var, "ADAPTERS_THREADS"):
        raw = os.environ.get(name, "") if name else ""
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return max(1, min(cores(), MAX_WORKERS))


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_modules(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> list[R]:
    """``[fn(x) for x in items]``, run on a few threads with torch single-threaded inside each.

    A LoRA module's QR and SVD are too small for torch's own threads to pay off (an r x r core, a tall
    d x r panel); running modules side by side uses the cores instead. Results keep the input order;
    memory stays bounded by ``workers`` modules at a time.
    """
    items = list(items)
    n = workers or min(len(items), default_workers())
    if n <= 1 or len(items) <= 1:
        out = []
        for i, x in enumerate(items):
            out.append(fn(x))
            if progress:
                progress(i + 1, len(items))
        return out
    with single_threaded_torch(), ThreadPoolExecutor(n) as pool:
        results = []
        for i, r in enumerate(pool.map(fn, items)):
            results.append(r)
            if progress:
                progress(i + 1, len(items))
        return results
