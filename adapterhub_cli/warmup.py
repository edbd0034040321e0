"""Start-up hidden behind I/O: ``import torch`` (and, for a CUDA device, its initialisation) on a helper thread.

``import torch`` takes 1-4 s and CUDA's initialisation seconds more, during which a merge can already read headers,
plan, copy the side files and the untouched tensors before the first merged one (none of that needs torch: see
:func:`adapterhub_cli.merge.engine.run_merge`). A command calls :func:`start` first thing; the first ``import
torch`` of the main thread then waits only for what is left of the import (:func:`wait` before it). This module
imports nothing heavy itself.

(reduce, combine and quantize do not use it: what they do before their first tensor is too little to hide
anything; measured for reduce, 3.12 s with it against 3.07 s without, medians of 8 alternated runs.)
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import sys
import threading
from pathlib import Path


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

    Call it before a thread's first ``import torch``: while the helper loads torch's libraries (without the GIL,
    :func:`_preload_libraries`) the import itself has not begun, so a thread importing torch then would import it
    itself, with the GIL, while the helper waits on it, and nothing else would run meanwhile.
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


def _preload_libraries() -> None:
    """Load torch's shared libraries (Linux) with the GIL released, before ``import torch`` loads them with it held.

    Python holds the GIL while an extension module is loaded, and ``torch._C`` pulls in ``libtorch_cpu.so``, whose
    relocations and static initialisers take ~0.18 s: every other thread (the merge's planning, copying and reading)
    stalls that long. ``dlopen`` called through ctypes as a foreign function runs without the GIL; torch's own
    loads then find the libraries in place. The flags are torch's: ``libtorch_global_deps.so`` global, as
    ``torch._load_global_deps`` loads it. A library that does not load is left for torch to load (and report).
    """
    if not sys.platform.startswith("linux"):
        return
    spec = importlib.util.find_spec("torch")  # (finds the package without importing it)
    if spec is None or spec.origin is None:
        return
    lib = Path(spec.origin).parent / "lib"
    try:
        dlopen = ctypes.CDLL(None).dlopen
    except (OSError, AttributeError):
        return
    dlopen.restype = ctypes.c_void_p
    dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    for name, mode in (
        ("libtorch_global_deps.so", os.RTLD_NOW | os.RTLD_GLOBAL),
        ("libtorch_cpu.so", os.RTLD_NOW),
    ):
        path = lib / name
        if not path.is_file() or not dlopen(os.fsencode(path), mode):
            return


def _import_torch(device: str) -> None:
    try:
        _preload_libraries()
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
