"""File access: JSON, hashing, safe pickles, and outputs (checked against the inputs, written atomically).

Outputs: :func:`check_output` keeps ``-o`` away from the inputs and from anything this tool did not write;
:func:`atomic_dir` and :func:`atomic_file` make an output appear complete or not at all (see "outputs" below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli._version import __version__
from adapterhub_cli.artifact.jsonsafe import MAX_JSON_BYTES, parse_json
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.errors import (
    AdapterNotFoundError,
    AdaptersError,
    CorruptFileError,
    OutputExistsError,
    UnsafeFileError,
    UsageError,
)


if TYPE_CHECKING:
    import torch


def read_json(path: str | Path, what: str = "JSON file") -> dict[str, Any]:
    """Read a JSON object from ``path``, checked as :func:`~adapterhub_cli.artifact.jsonsafe.parse_json` checks
    untrusted JSON.

    Raises:
        AdapterNotFoundError: no such file.
        CorruptFileError: larger than :data:`~adapterhub_cli.artifact.jsonsafe.MAX_JSON_BYTES`, not JSON (or
            nested too deeply, a number too long, a lone surrogate), or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(path, what)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CorruptFileError(f"{what} is {size} bytes; JSON over {MAX_JSON_BYTES} bytes is refused", path=path)
    doc = parse_json(path.read_bytes(), path=path, what=what)
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{what} must hold a JSON object", path=path)
    return doc


def cache_root() -> Path:
    """THE folder for this tool's own caches: ``$ADAPTERS_CACHE``, else ``$XDG_CACHE_HOME``, else ``~/.cache``,
    then ``adapterhub_cli/``."""
    root = os.environ.get("ADAPTERS_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adapterhub_cli"


def _hash_cache_path() -> Path:
    return cache_root() / "sha256.json"


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


def _torch_version(text: str) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``."""
    major, minor = [*text.split("+")[0].split("."), "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def load_pickle_safely(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a legacy PyTorch ``.bin`` state dict with ``torch.load(weights_only=True)``.

    Only plain tensors and containers are allowed: a pickle that references any other global (the way
    code-execution payloads do) is refused with :class:`UnsafeFileError`. torch before 2.6 is refused outright:
    its ``weights_only`` loader could be made to run code (CVE-2025-32434).
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(path, "weights file")
    if _torch_version(torch.__version__) < (2, 6):
        raise UnsafeFileError(
            f"refused to unpickle with torch {torch.__version__}: torch.load(weights_only=True) could run code "
            "before torch 2.6 (CVE-2025-32434)",
            path=path,
            hint="upgrade torch to 2.6 or newer, or convert the adapter to safetensors with a trusted tool",
        )
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
    for key in obj:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise CorruptFileError(
                f"a tensor name in the pickle is not valid text ({key.encode('utf-8', 'backslashreplace')!r})",
                path=path,
            ) from None
    return obj


# ------------------------------------------------------------------------------------------------- outputs
#
# Every command that writes (reduce, combine, quantize, dequantize, merge, unmerge, convert, pull) keeps four
# promises, all kept here:
#
# - ``check_output``: ``-o`` is never an input, a folder holding an input, a folder inside an input folder, or a
#   symbolic link; an existing ``-o`` is replaced only with ``overwrite`` and only if this tool wrote it.
# - ``atomic_dir`` / ``atomic_file``: an output appears complete or not at all. It is written under a temporary
#   name beside the target and renamed into place; a replaced output is moved aside first and moved back if the
#   final rename fails. Temporary names stay within the file-system limit on names.
# - Temporary folders and moved-aside outputs of runs that died (SIGKILL, power loss) are swept by the next run
#   writing into the same parent folder; a moved-aside output whose target is missing is put back, never deleted.
# - Outputs follow the umask: folders are made with mode 0o777 and files opened with 0o666, both less the umask.

#: The file :func:`atomic_dir` writes into every output folder. ``overwrite`` replaces a folder only if it holds
#: this file (an earlier output of this tool). Hidden: PEFT, transformers and diffusers ignore it, and push leaves
#: it out.
OUTPUT_MARKER = ".adapters-output"
#: The safetensors metadata keys this tool writes (``adapterhub.provenance``, the kohya name table, ...) start with
#: this. A single-file output (a kohya ``.safetensors``) is recognised as an earlier output by such a key.
METADATA_PREFIX = "adapterhub."
#: The longest file name (in bytes) assumed where the file system does not say.
NAME_MAX = 255
#: Target names longer than this (in bytes) are shortened in temporary names (plus a hash of the full name), so
#: ``.<name>.<pid>.<tag>.incomplete`` stays within :data:`NAME_MAX`.
_STEM_MAX = 200
_TEMP_KINDS = ("incomplete", "replaced")
_TEMP_NAME = re.compile(r"\.(?P<stem>.+)\.(?P<pid>[0-9]+)\.(?P<tag>\w+)\.(?P<kind>incomplete|replaced)", re.S | re.A)


def _inside(path: Path, folder: Path) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies below it."""
    return path == folder or folder in path.parents


def _name_max(folder: Path) -> int:
    """The longest file name the file system of ``folder`` (or its nearest existing ancestor) allows, in bytes."""
    for candidate in [folder, *folder.parents]:
        if candidate.is_dir():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return int(os.pathconf(candidate, "PC_NAME_MAX"))
            break
    return NAME_MAX


def _cwd() -> Path:
    """The real current folder (the root when it was deleted: then nothing can contain it but the root)."""
    try:
        return Path.cwd().resolve()
    except FileNotFoundError:
        return Path("/")


def is_earlier_output(path: str | Path) -> bool:
    """Whether ``path`` was written by this tool: a folder holding :data:`OUTPUT_MARKER` (a regular file), or a
    ``.safetensors`` or ``.gguf`` file whose metadata has a key starting with :data:`METADATA_PREFIX`."""
    path = Path(path)
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            return stat.S_ISREG(os.lstat(path / OUTPUT_MARKER).st_mode)
        if stat.S_ISREG(st.st_mode) and path.suffix == ".safetensors":
            return any(k.startswith(METADATA_PREFIX) for k in read_header(path).metadata)
        if stat.S_ISREG(st.st_mode) and path.suffix == ".gguf":
            return _gguf_has_our_metadata(path)
    except (OSError, AdaptersError):
        return False
    return False


def _gguf_has_our_metadata(path: Path) -> bool:
    try:
        import gguf

        return any(k.startswith(METADATA_PREFIX) for k in gguf.GGUFReader(str(path)).fields)
    except Exception:  # no gguf package, or a file it cannot read: not recognisably ours
        return False


def check_output(
    out: str | Path, inputs: Mapping[str | Path, str] | Iterable[str | Path] = (), *, overwrite: bool = False
) -> Path:
    """Refuse an output path that could destroy an input, or anything this tool did not write; the absolute path.

    Judged on real paths (symbolic links resolved): ``out`` may not be an input, a folder containing an input, a
    folder inside an input folder, or the current folder (or one containing it); ``out`` itself may not be a
    symbolic link. ``inputs`` are paths, or a mapping of paths to what they are (``"base folder"``, named in the
    message); those that do not exist locally (a store ref's label) are ignored. An existing ``out`` needs
    ``overwrite``, and then must be an earlier output of this tool (:func:`is_earlier_output`).

    Raises:
        UsageError: any of the above (nothing was written).
        OutputExistsError: ``out`` exists and ``overwrite`` is not given (a ``FileExistsError``).
    """
    target = Path(os.path.normpath(Path(out).absolute()))  # '..' folded as the shell does
    if target.name in ("", ".", ".."):
        raise UsageError(f"output {out}: not a path an output can be written to", hint="give a folder or file name")
    limit = _name_max(target.parent)
    if len(os.fsencode(target.name)) > limit:
        raise UsageError(
            f"output {out}: the name is longer than the file system allows ({limit} bytes)",
            hint="choose a shorter name",
        )
    if target.is_symlink():
        raise UsageError(
            f"output {out} is a symbolic link (to {target.readlink()}): outputs are never written through links",
            hint="give the real path, or another output path (-o)",
        )
    real = Path(os.path.realpath(target))
    named = inputs if isinstance(inputs, Mapping) else dict.fromkeys(inputs, "input")
    for given, what in named.items():
        if not os.path.lexists(given):
            continue
        source = Path(os.path.realpath(given))
        if _inside(real, source) or _inside(source, real):
            where = "is" if real == source else "contains" if _inside(source, real) else "is inside"
            raise UsageError(
                f"output {out} {where} the {what} {given}: inputs are never modified",
                hint="choose another output path (-o)",
            )
    if _inside(_cwd(), real):
        raise UsageError(
            f"output {out} is (or contains) the current folder, which cannot be replaced",
            hint="choose another output path (-o)",
        )
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(out)
        if not is_earlier_output(target):
            raise UsageError(
                f"output {out} exists and was not written by adapters: --overwrite replaces only an earlier output "
                f"(a folder holding {OUTPUT_MARKER}, or a .safetensors file with adapterhub metadata)",
                hint="choose another output path (-o), or remove it yourself if it may go",
            )
    return target


def _temp_stem(name: str) -> str:
    """``name`` as it appears in temporary names: shortened, with a hash of the whole, when it is long."""
    raw = os.fsencode(name)
    if len(raw) <= _STEM_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return os.fsdecode(raw[: _STEM_MAX - 9]) + "~" + digest


def _temp_path(target: Path, kind: str) -> Path:
    """A fresh name ``.<stem>.<pid>.<tag>.<kind>`` beside ``target`` (nothing is created)."""
    assert kind in _TEMP_KINDS
    return target.with_name(f".{_temp_stem(target.name)}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _remove(path: Path) -> None:
    """Delete a file or a folder tree (a link itself, never what it points to); missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def _rename(src: Path, dst: Path) -> None:
    """``rename(2)`` (one function, so a test can make the final rename fail)."""
    src.rename(dst)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's live process; a nonsense pid
        return True
    return True


def sweep_stale(parent: str | Path) -> None:
    """Clean up after runs that died mid-write in ``parent`` (SIGKILL, power loss): their temporary
    ``.<name>.<pid>.<tag>.incomplete`` folders and files are deleted; an output one had moved aside to replace it
    (``.<name>.<pid>.<tag>.replaced``) is deleted if ``<name>`` holds its replacement, else moved back to ``<name>``
    (a shortened long name cannot be moved back: it is kept). Entries of live processes are left alone."""
    parent = Path(parent)
    try:
        names = [entry.name for entry in os.scandir(parent)]
    except OSError:
        return
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m is None or _process_alive(int(m["pid"])):
            continue
        if m["kind"] == "incomplete":
            _remove(parent / name)
        elif _temp_stem(m["stem"]) == m["stem"]:  # the full name of the output it replaced
            _restore_or_remove(parent / name, parent / m["stem"])


def _restore_or_remove(old: Path, target: Path) -> None:
    """An output moved aside by a run that died: back to ``target`` if that is free, else deleted."""
    if os.path.lexists(target):
        _remove(old)
        return
    with contextlib.suppress(OSError):
        _rename(old, target)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_tree(tmp: Path) -> None:
    """fsync every regular file and folder under ``tmp`` (folders after what they hold; links are not followed),
    so that what is renamed into place next is on disk whole, not only its name (a power loss right after the
    rename could otherwise leave empty files behind a complete-looking output). Files already synced (merged
    shards) cost a system call each. Best effort where a file system refuses to sync a folder."""
    if not tmp.is_dir() or tmp.is_symlink():
        _sync_file(tmp)
        return
    for root, dirs, files in os.walk(tmp, topdown=False, followlinks=False):
        for name in files:
            _sync_file(Path(root) / name)
        for name in dirs:
            if not (Path(root) / name).is_symlink():
                _fsync_dir(Path(root) / name)
    _fsync_dir(tmp)


def _sync_file(path: Path) -> None:
    """fsync the regular file ``path`` (not a link, not a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return  # a link, or gone: nothing of ours to sync
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target`` once everything in it is on disk (:func:`_sync_tree`); an existing ``target``
    is moved aside first and moved back if that fails."""
    _sync_tree(tmp)
    if not os.path.lexists(target):
        _rename(tmp, target)
    else:
        old = _temp_path(target, "replaced")
        try:
            _rename(target, old)
            _rename(tmp, target)
        except BaseException:  # (also a signal landing between the two renames)
            if os.path.lexists(old) and not os.path.lexists(target):
                with contextlib.suppress(OSError):
                    _rename(old, target)  # the previous output back in place
            raise
        _remove(old)
    _fsync_dir(target.parent)


def current_umask() -> int:
    """The process's umask: read from ``/proc/self/status`` where the kernel shows it, else set and put back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give ``path`` the mode the user's own folders (0o777) or files (0o666) get, less the umask.

    For what :mod:`tempfile` makes private (``mkdtemp``: 0o700, ``mkstemp``: 0o600) before it is renamed into
    place as an output; a symbolic link is left alone.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    Path(path).chmod((0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~current_umask())


def _prepare(target: str | Path, overwrite: bool) -> Path:
    """The checked absolute target, its parent folder made, stale temporaries there swept."""
    path = check_output(target, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success move it into place, on any error (an exception,
    Ctrl-C, or SIGTERM / SIGHUP turned into an exception by the CLI) delete it.

    The folder lives in the same parent, so the final move is a rename on one file system; it gets
    :data:`OUTPUT_MARKER` just before. ``target`` is checked by :func:`check_output` (with ``overwrite`` an existing
    earlier output is replaced only once the new one is complete, and restored if the rename fails).
    """
    path = _prepare(target, overwrite)
    while True:
        tmp = _temp_path(path, "incomplete")
        try:
            tmp.mkdir(0o777)  # less the umask, like any folder the user makes
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "adapterhub-cli", "version": __version__}) + "\n")
        _move_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path (not created) beside ``target`` for a single-file output; on success move it
    into place, on any error delete it. Checked and replaced as :func:`atomic_dir` does; the writer opens the path
    itself, so the file follows the umask. A single-file output is recognised as this tool's by its metadata
    (:func:`is_earlier_output`), so write a :data:`METADATA_PREFIX` key into it."""
    path = _prepare(target, overwrite)
    tmp = _temp_path(path, "incomplete")
    try:
        yield tmp
        _move_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
