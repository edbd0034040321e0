"""File access: safetensors headers (read and checked without torch), JSON, hashing, safe pickles, atomic output.

Reading a safetensors header is pure Python: 8 bytes of little-endian header length, then that many
bytes of JSON mapping tensor names to ``{"dtype", "shape", "data_offsets"}``. We check every entry
against the file before any tensor is read, so a truncated or crafted file fails with a message that
names the file and the tensor, not with a crash deep inside a loader.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.errors import AdapterNotFoundError, CorruptFileError, UnsafeFileError


if TYPE_CHECKING:
    import torch

#: Bits per element of each safetensors dtype.


def read_json(path: str | Path, what: str = "JSON file") -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing file, bad JSON or a non-object raise typed errors."""
    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(path, what)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{what} is not valid JSON ({e})", path=path, hint="fix or regenerate the file") from e
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{what} must hold a JSON object", path=path)
    return doc


def _hash_cache_path() -> Path:
    root = os.environ.get("ADAPTERS_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adapterhub_cli" / "sha256.json"


def sha256_file(path: str | Path, *, use_cache: bool = True) -> str:
    """SHA-256 of a file's bytes, as hex.

    The digest is cached in the user's cache folder keyed by the file's device, inode, size and
    modification time (as git's index does), so inspecting an unchanged adapter again does not rehash it.
    """
    path = Path(path)
    st = path.stat()
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{path.resolve()}"
    cache_file = _hash_cache_path()
    cache: dict[str, str] = {}
    if use_cache:
        with contextlib.suppress(OSError, ValueError):
            cache = json.loads(cache_file.read_text())
        if key in cache:
            return cache[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        if st.st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    digest = h.hexdigest()
    # "racy" files, modified within the last seconds, could change again without a visible mtime change
    # (as git's index knows): hash them, but do not cache the result
    if use_cache and time.time() - st.st_mtime > 2.0:
        cache[key] = digest
        if len(cache) > 4096:  # keep the cache small: drop the oldest half
            cache = dict(list(cache.items())[2048:])
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            tmp.replace(cache_file)
    return digest


def load_pickle_safely(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a legacy PyTorch ``.bin`` state dict with ``torch.load(weights_only=True)``.

    Only plain tensors and containers are allowed: a pickle that references any other global (the way
    code-execution payloads do) is refused with :class:`UnsafeFileError`.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(path, "weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            "refused to load: the pickle needs more than tensors (it may try to run code)",
            path=path,
            hint="convert the adapter to safetensors with a trusted tool, or get it from a trusted source",
        ) from e
    except Exception as e:  # a damaged file makes torch raise RuntimeError, EOFError, KeyError, ...
        raise CorruptFileError(f"cannot read the pickle ({type(e).__name__}: {e})", path=path) from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CorruptFileError("the pickle does not hold a {name: tensor} state dict", path=path)
    return obj


def _sweep_stale(target: Path) -> None:
    """Remove temporary folders that earlier runs killed mid-way (SIGKILL, power loss) left beside ``target``.

    They are named ``.<target>.<pid>.<random>.incomplete``; one whose process no longer runs is garbage.
    """
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.incomplete"):
        parts = leftover.name[len(target.name) + 2 :].split(".")
        try:
            pid = int(parts[0])
        except (ValueError, IndexError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:  # a live process of another user
            continue


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success move it into place, on error delete it.

    The temporary folder lives in the same parent so the final ``os.replace`` is a rename on one file
    system. With ``overwrite`` an existing target is replaced only once the new output is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".incomplete", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.replace(old)
            tmp.replace(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
