"""Start-up hidden behind I/O: ``import torch`` (and, for a CUDA device, its initialisation) on a helper thread.

``import torch`` takes 1-4 s and CUDA's initialisation seconds more, during which a merge can already read headers,
plan, copy the side files and the untouched tensors before the first merged one (none of that needs torch: see
:func:`adapterhub_cli.merge.engine.run_merge`). A command calls :func:`start` first thing; the first ``import
torch`` of the main thread then waits only for what is left of the import (:func:`wait` before it). This module
imports nothing heavy itself.

merge and unmerge start it, and so do the other commands that load tensors (reduce, combine, quantize,
dequantize, convert, validate, diff, analyze, extract): what they do before their first tensor (importing the
API, reading headers, checking the config) is little, but it comes off a whole process of 1.5-5 s: validate
1.62 s -> 1.46 s, convert 2.11 s -> 1.97 s, reduce 2.21 s -> 2.09 s, quantize 4.75 s -> 4.65 s, combine 3.44 s ->
3.39 s (medians of 6-7 alternated runs, 2 cores; the third session had measured no gain for reduce, before the
command's own start-up shrank; diff, analyze and extract run for 10 s and more: the same 0.1 s is lost in their
noise). `inspect` does not: it reads headers only and never imports torch.
"""

from __future__ import annotations

import gc
import threading


_started: threading.Thread | None = None


def start(device: str = "cpu") -> None:
    """Import torch on a daemon thread (once per process); with ``device`` ``cuda[:N]`` also initialise CUDA there.
    Errors are left for the merge's own import to raise where it reports them."""
    global _started
    if _started is not None:
        return
    _started = threading.Thread(target=_warm, args=(device,), name="adapters-import-torch", daemon=True)
    _started.start()


def wait() -> None:
    """Wait for the import :func:`start` began (and CUDA's start), if any, unless called on the helper thread itself.

    Call it before a thread's first ``import torch``: it makes sure the helper does the import (a thread that got to
    ``import torch`` before the helper would import it itself, the helper waiting on it); and a CUDA device is
    initialised once the helper is done, not only imported.
    """
    started = _started
    if started is not None and started is not threading.current_thread():
        started.join()


def _warm(device: str) -> None:
    # the cyclic garbage collector would walk the import's hundreds of thousands of new objects again and again
    # (measured: 0.15-0.4 s of the import and more of the merge after it); it is paused for the import, and what
    # the import made is frozen (long-lived: modules, functions, classes) so later collections skip it. The
    # trade-off, chosen knowingly: garbage cycles the main thread makes meanwhile (reading headers, planning: little)
    # are frozen too and never collected in this short-lived process; collecting first would cost 0.1 s on the
    # path to the first merged tensor (170k objects walked once)
    collecting = gc.isenabled()
    gc.disable()
    try:
        _import_torch(device)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def _import_torch(device: str) -> None:
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.init()
            index = device.partition(":")[2]
            if not index or (index.isdigit() and int(index) < torch.cuda.device_count()):
                torch.empty(
                    0, device=device
                )  # the context on that device, created here rather than at the first tensor
    except BaseException:  # the merge imports torch itself and reports any failure there
        pass


__all__ = ["start", "wait"]
