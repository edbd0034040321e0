"""Safetensors: THE dtype table, header reading and checking (without torch), tensor reads, the writer.

Reading a safetensors header is pure Python: 8 bytes of little-endian header length, then that many
bytes of JSON mapping tensor names to ``{"dtype", "shape", "data_offsets"}``. We check every entry
against the file before any tensor is read, so a truncated or crafted file fails with a message that
names the file and the tensor, not with a crash deep inside a loader.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.jsonsafe import parse_json
from adapterhub_cli.errors import AdapterNotFoundError, CorruptFileError, InvalidAdapterError


if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name in headers, bits per element, torch's name (None: torch has no such
    dtype here) and the short name used by ``--dtype`` options (None: not offered there)."""

    name: str
    bits: int
    torch_name: str | None
    is_float: bool
    option: str | None = None


#: THE dtype table: every dtype a safetensors header may name. Every other table is derived from it.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, "bool", False),
        DType("U8", 8, "uint8", False),
        DType("I8", 8, "int8", False),
        DType("F8_E4M3", 8, "float8_e4m3fn", True),
        DType("F8_E5M2", 8, "float8_e5m2", True),
        DType("F8_E8M0", 8, None, True),
        DType("I16", 16, "int16", False),
        DType("U16", 16, None, False),
        DType("F16", 16, "float16", True, "fp16"),
        DType("BF16", 16, "bfloat16", True, "bf16"),
        DType("I32", 32, "int32", False),
        DType("U32", 32, None, False),
        DType("F32", 32, "float32", True, "fp32"),
        DType("I64", 64, "int64", False),
        DType("U64", 64, None, False),
        DType("F64", 64, "float64", True),
        DType("F4", 4, None, True),
        DType("F6_E2M3", 6, None, True),
        DType("F6_E3M2", 6, None, True),
    )
}
#: Bits per element of each safetensors dtype.
DTYPE_BITS: dict[str, int] = {d.name: d.bits for d in DTYPES.values()}
FLOAT_DTYPES = frozenset(d.name for d in DTYPES.values() if d.is_float)
#: The floating dtypes torch computes in (merges, SVDs): the others are storage formats.
COMPUTE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: ``--dtype`` option values -> safetensors names: ``{"bf16": "BF16", "fp16": "F16", "fp32": "F32"}``.
DTYPE_OPTIONS: dict[str, str] = {d.option: d.name for d in DTYPES.values() if d.option}
_BY_TORCH_NAME: dict[str, str] = {d.torch_name: d.name for d in DTYPES.values() if d.torch_name}


def dtype_name(dtype: object) -> str:
    """The safetensors name of a dtype given as a torch dtype, ``"torch.bfloat16"``, ``"bfloat16"``, ``"bf16"``
    or ``"BF16"``.

    Raises:
        ValueError: no safetensors dtype matches.
    """
    text = str(dtype).removeprefix("torch.")
    if text in DTYPES:
        return text
    name = _BY_TORCH_NAME.get(text) or DTYPE_OPTIONS.get(text)
    if name is None:
        raise ValueError(f"dtype {dtype} has no safetensors name")
    return name


def torch_name(name: str) -> str:
    """torch's name of a safetensors dtype (``"BF16"`` -> ``"bfloat16"``).

    Raises:
        ValueError: torch has no such dtype.
    """
    torch_name = DTYPES[name].torch_name if name in DTYPES else None
    if torch_name is None:
        raise ValueError(f"safetensors dtype {name!r} has no torch dtype")
    return torch_name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``); imports torch.

    Raises:
        ValueError: torch has no such dtype.
    """
    import torch

    dtype: torch.dtype = getattr(torch, torch_name(name))
    return dtype


def computable(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype torch computes in: an 8-bit float (F8_E4M3, F8_E5M2, which torch on CPU cannot test,
    sum or multiply) as float32, exactly, as PEFT loads such factors into its float32 LoRA layers; any other
    tensor as it is."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf, for any dtype (8-bit floats checked as float32; integers are finite)."""
    import torch

    return not t.is_floating_point() or not t.numel() or bool(torch.isfinite(computable(t)).all())


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """How many NaN and how many inf values ``t`` holds, for any dtype."""
    import torch

    if not t.is_floating_point():
        return 0, 0
    c = computable(t)
    return int(torch.isnan(c).sum()), int(torch.isinf(c).sum())


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_MAX_DIMS = 64  # no model has a tensor of more dimensions


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry: dtype name, shape, and byte range inside the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file declares, checked against its size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_size: int = 0
    file_size: int = 0


def data_start(prefix: bytes, *, path: Path, file_size: int | None = None) -> int:
    """THE offset where a safetensors file's tensor data begins: 8 + its :func:`header_length` (checked), from the
    file's first 8 bytes ``prefix``; a tensor's ``data_offsets`` count from there."""
    return 8 + header_length(prefix, file_size=file_size, path=path)


def file_data_start(path: Path) -> int:
    """:func:`data_start` of the safetensors file at ``path`` (its first 8 bytes read, checked against its size)."""
    with Path(path).open("rb") as f:
        return data_start(f.read(8), path=Path(path), file_size=os.fstat(f.fileno()).st_size)


def header_length(prefix: bytes, *, file_size: int | None, path: Path) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes, checked against the file size (when
    known) and the 100 MB limit; the tensor data starts at ``8 + header_length`` (:func:`data_start`).

    Raises:
        CorruptFileError: fewer than 8 bytes, or a length past the end of the file or over the limit.
    """
    if len(prefix) < 8:
        raise CorruptFileError(
            f"truncated safetensors file ({len(prefix)} bytes, no header)",
            path=path,
            hint="the file is incomplete: download or copy it again",
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if file_size is not None and n > file_size - 8:
        raise CorruptFileError(
            f"header length {n} is larger than the file ({file_size} bytes): the file is truncated or not safetensors",
            path=path,
            hint="the file is incomplete: download or copy it again",
        )
    if n > _MAX_HEADER:
        raise CorruptFileError(f"header length {n} exceeds the 100 MB limit", path=path)
    return int(n)


def parse_header(raw: bytes, *, path: Path, file_size: int) -> SafetensorsHeader:
    """Check and parse a safetensors header's JSON (``raw``: the ``header_length`` bytes after the first 8) of a
    file of ``file_size`` bytes (``sys.maxsize``: unknown): dtypes, shapes, byte ranges that cover the data exactly,
    as the safetensors library requires.

    Raises:
        CorruptFileError: header not JSON (or nested too deeply, a number too long, a lone surrogate in a name:
            the safetensors library refuses these too), a tensor name or an entry's field given twice, unknown
            dtype, a shape that is not a list of sizes (or whose elements overflow 64 bits, or whose bits do not
            fill whole bytes), a byte range that disagrees with dtype x shape, out of range, overlapping another
            tensor or leaving bytes unused (before, between or after the tensors), metadata that is not strings.

    Memory is bounded by the 100 MB header limit: a header of a million entries (70 MB) peaks at about 0.85 GB
    resident while read (the safetensors library's own reader: about 0.95 GB).
    """
    n = len(raw)
    doc = _parse_header_json(raw, path)
    if not isinstance(doc, dict):
        raise CorruptFileError("header is not a JSON object", path=path)
    if isinstance(doc, _Repeated):
        raise CorruptFileError(
            f"header names {doc.repeated!r} twice: the safetensors library refuses such a file (a reader keeping "
            "one of the entries would silently lose the other)",
            path=path,
            module=doc.repeated,
            hint="the file was written by a broken tool or crafted; re-save the adapter",
        )
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError("__metadata__ must map strings to strings", path=path)
    known_size = file_size < sys.maxsize  # a store that does not list a file's size passes sys.maxsize
    data_size = file_size - 8 - n
    tensors = {name: _parse_entry(path, name, entry, data_size) for name, entry in doc.items()}
    _check_layout(path, tensors, data_size if known_size else None)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=dict(metadata), header_size=n, file_size=file_size)


class _Repeated(dict[str, Any]):
    """A JSON object of the header that names a key more than once (``repeated``: the first such key)."""

    repeated: str = ""


#: A JSON escape of a UTF-16 surrogate: :func:`parse_json` checks the strings of a document holding one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Repeated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.repeated = key
            break
        seen.add(key)
    return marked


def _parse_header_json(raw: bytes, path: Path) -> Any:
    """The header's JSON, its objects that repeat a key marked (:class:`_Repeated`): the safetensors library refuses
    a repeated tensor name or entry field, where Python's ``json`` silently keeps the last. A document ``json``
    cannot read (or holding an escaped surrogate) goes through :func:`parse_json` for its clean error or check."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, too deep, a number too long: parse_json says which
        doc = None
    if doc is None or _SURROGATE_ESCAPE.search(raw):
        # entries are checked one by one by the caller
        plain = parse_json(raw, path=path, what="header", max_depth=None)
        return plain if doc is None else doc
    return doc


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and check the header of a safetensors file without loading any tensor.

    Raises:
        AdapterNotFoundError: the file does not exist.
        CorruptFileError: see :func:`header_length` and :func:`parse_header`.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterNotFoundError(path, "safetensors file")
    file_size = path.stat().st_size
    with path.open("rb") as f:
        n = header_length(f.read(8), file_size=file_size, path=path)
        raw = f.read(n)
    return parse_header(raw, path=path, file_size=file_size)


def _parse_entry(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CorruptFileError(f"tensor {name!r}: header entry is not an object", path=path, module=name)
    if isinstance(entry, _Repeated):
        raise CorruptFileError(
            f"tensor {name!r}: header entry names {entry.repeated!r} twice (the safetensors library refuses it)",
            path=path,
            module=name,
            hint="the file was written by a broken tool or crafted; re-save the adapter",
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CorruptFileError(
            f"tensor {name!r}: unknown dtype {_short(dtype)}",
            path=path,
            module=name,
            hint=f"known dtypes: {', '.join(sorted(DTYPE_BITS))}",
        )
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise CorruptFileError(
            f"tensor {name!r}: shape {_short(shape)} is not a list of sizes", path=path, module=name
        )
    numel = math.prod(shape)
    if len(shape) > _MAX_DIMS or (numel if numel else math.prod(d for d in shape if d)) >= 1 << 63:
        raise CorruptFileError(
            f"tensor {name!r}: shape {_short(shape)} has more than {_MAX_DIMS} dimensions or more than 2**63 elements",
            path=path,
            module=name,
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_size(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptFileError(f"tensor {name!r}: bad data_offsets {_short(offsets)}", path=path, module=name)
    start, end = offsets
    if numel * DTYPE_BITS[dtype] % 8:
        raise CorruptFileError(
            f"tensor {name!r}: {dtype} x {shape} does not end on a byte boundary ({numel * DTYPE_BITS[dtype]} bits; "
            "the safetensors library refuses it)",
            path=path,
            module=name,
        )
    expected = numel * DTYPE_BITS[dtype] // 8
    if end - start != expected:
        raise CorruptFileError(
            f"tensor {name!r}: {end - start} bytes stored but {dtype} x {shape} needs {expected}",
            path=path,
            module=name,
        )
    if end > data_size:
        raise CorruptFileError(
            f"tensor {name!r}: bytes {start}..{end} lie past the end of the data ({data_size} bytes): "
            "the file is truncated",
            path=path,
            module=name,
            hint="the file is incomplete: download or copy it again",
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def _is_size(value: object) -> bool:
    """A JSON integer that is a size or an offset (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int | None) -> None:
    """The safetensors library's rule: the tensors, ordered by ``(start, end)``, lie back to back from byte 0 of the
    data and the last one ends where the file does (``data_size``; None: unknown, not checked). So no two overlap,
    no bytes between them are unused, and nothing follows the last one."""
    spans = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    if spans and spans[0].start:
        first = spans[0]
        raise CorruptFileError(
            f"tensor {first.name!r} starts at byte {first.start} of the data: bytes 0..{first.start} belong to no "
            "tensor (the safetensors library refuses it: invalid offset)",
            path=path,
            module=first.name,
            hint=_REWRITE,
        )
    for prev, cur in itertools.pairwise(spans):
        if cur.start < prev.end:
            raise CorruptFileError(
                f"tensors {prev.name!r} and {cur.name!r} overlap in the file (the safetensors library refuses it: "
                "invalid offset)",
                path=path,
                module=cur.name,
                hint=_REWRITE,
            )
        if cur.start > prev.end:
            raise CorruptFileError(
                f"bytes {prev.end}..{cur.start} of the data, between tensors {prev.name!r} and {cur.name!r}, belong "
                "to no tensor (the safetensors library refuses it: invalid offset)",
                path=path,
                module=cur.name,
                hint=_REWRITE,
            )
    end = spans[-1].end if spans else 0
    if data_size is not None and end != data_size:
        raise CorruptFileError(
            f"{data_size - end} bytes follow the last tensor's data (bytes {end}..{data_size}): the header does not "
            "cover the file (the safetensors library refuses it: incomplete metadata, file not fully covered)",
            path=path,
            hint=_REWRITE,
        )


_REWRITE = "the file was damaged, appended to or written by a broken tool; download or save it again"


def load_safetensors(
    path: str | Path, names: list[str] | None = None, *, header: SafetensorsHeader | None = None
) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``names``) from a safetensors file whose header is checked first.

    Each tensor is read with ``pread`` into its own buffer rather than through a memory map, so reading a
    few tensors of a large file keeps only those few in memory (mapped pages would count as resident).
    Pass the ``header`` already read by :func:`read_header` to skip reading it again.
    """
    header = header or read_header(path)
    wanted = list(header.tensors) if names is None else names
    data_start = 8 + header.header_size
    out = {}
    with Path(path).open("rb") as f:
        for name in wanted:
            info = header.tensors.get(name)
            if info is None:
                raise CorruptFileError(f"no tensor named {name!r}", path=path, module=name)
            out[name] = read_tensor(f.fileno(), info, data_start, path=Path(path))
    return out


def read_tensor(
    fd: int, info: TensorInfo, data_start: int, *, path: Path | None = None, into: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor (checked header entry ``info``) read from an open safetensors file descriptor.

    ``into``: a uint8 buffer of at least ``info.nbytes`` to read into (the result is a view of it) instead
    of a new allocation.
    """
    import torch

    try:
        dtype = torch_dtype(info.dtype)
    except ValueError:
        raise CorruptFileError(
            f"tensor {info.name!r}: dtype {info.dtype} cannot be loaded", path=path, module=info.name
        ) from None
    # a torch allocation is 64-byte aligned (a bytearray is not, and unaligned tensors compute ~2x slower)
    if into is not None:
        if into.dtype != torch.uint8 or into.numel() < info.nbytes:
            raise ValueError(f"a buffer of {into.numel()} bytes cannot hold {info.name!r} ({info.nbytes} bytes)")
        buf = into[: info.nbytes]
    else:
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if not info.nbytes:
        return torch.empty(info.shape, dtype=dtype)
    read_into(fd, info, data_start, memoryview(buf.numpy().data), path=path)
    return buf.view(dtype).reshape(info.shape)


def read_into(fd: int, info: TensorInfo, data_start: int, view: memoryview, *, path: Path | None = None) -> None:
    """Read the ``info.nbytes`` stored bytes of one tensor (checked header entry ``info``) from an open safetensors
    file descriptor into the start of ``view`` (at least that long), without torch."""
    view = view.cast("B")[: info.nbytes]
    if len(view) < info.nbytes:
        raise ValueError(f"a buffer of {len(view)} bytes cannot hold {info.name!r} ({info.nbytes} bytes)")
    offset = data_start + info.start
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise CorruptFileError(f"tensor {info.name!r}: the file ends early", path=path, module=info.name)
        view, offset = view[n:], offset + n


def encode_header(
    entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, int]:
    """THE safetensors header writer: ``(8-byte length + JSON header padded to 8 bytes, data size in bytes)`` for
    tensors ``(name, dtype, shape)`` laid out back to back in the order given; ``__metadata__`` comes first.

    Raises:
        ValueError: a dtype the table does not know.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
        n = (math.prod(shape) * DTYPES[dtype].bits + 7) // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file byte-for-byte reproducibly: keys sorted, metadata sorted, header padded to 8 bytes.

    The last line of defence against non-finite outputs: a floating tensor holding NaN or inf is refused
    (:class:`InvalidAdapterError`) before a byte is written, so the caller's atomic folder is discarded.

    (The safetensors library's writer orders ``__metadata__`` by hash, so equal inputs can give different bytes;
    artifacts identified by their sha256 need the same bytes for the same content.)
    """
    import torch

    names = sorted(tensors)
    entries = []
    for name in names:
        t = tensors[name]
        if not all_finite(t):
            raise InvalidAdapterError(  # (``path`` is a temporary name the user never sees: not in the message)
                f"refused to write the output: tensor {name} holds NaN or inf values",
                module=name,
                hint="an input or a parameter produced non-finite numbers; nothing was written",
            )
        try:
            entries.append((name, dtype_name(t.dtype), tuple(t.shape)))
        except ValueError:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors") from None
    head, _ = encode_header(entries, dict(sorted(metadata.items())) if metadata else None)
    with Path(path).open("wb") as f:
        f.write(head)
        for name in names:
            t = tensors[name].detach().contiguous().cpu()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
