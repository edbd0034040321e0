"""Adapters and base checkpoints of any store, opened from their config files and safetensors headers only.

What a :class:`~adapterhub_cli.stores.base.Store` gives by default on top of its primitives: the header of a
safetensors file is read with two :meth:`~Store.read_range` calls, so ``inspect`` and ``validate`` of a store
ref never fetch a weight file. Weights are fetched (and their sha256 checked) the first time an operation
needs them: an adapter's on its first tensor read, a base's one shard at a time as a merge reaches it. The few
small tensors read before a merge starts (the quant-state blobs of a bitsandbytes base) are range-read.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter, TensorSource
from adapterhub_cli.artifact.checkpoint import (
    CARD_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    REPO_FILES,
    SINGLE_FILE,
    BaseView,
    find_layout,
    index_tensors,
    is_side_file,
    is_weight_file,
    read_index,
)
from adapterhub_cli.artifact.files import read_json
from adapterhub_cli.artifact.provenance import Provenance
from adapterhub_cli.artifact.safetensors import SafetensorsHeader, TensorInfo, header_length, parse_header
from adapterhub_cli.artifact.safetensors import data_start as start_of_data
from adapterhub_cli.errors import CorruptFileError, InvalidAdapterError, StoreNotFoundError
from adapterhub_cli.formats.peft import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, PeftFormat, assemble_adapter


if TYPE_CHECKING:
    import torch

    from adapterhub_cli.stores.base import Store
    from adapterhub_cli.stores.records import Resolved, StoreFile


#: bytes read by the first range read of a header: the length and, in one request, the JSON of most headers
HEADER_PROBE = 100_000


def header_by_range(store: Store, resolved: Resolved, name: str) -> SafetensorsHeader:
    """The header of safetensors file ``name``, read by range (one read, a second for a header longer than
    :data:`HEADER_PROBE`) and checked as a local file's is (:func:`header_length`, :func:`parse_header`: its
    length, dtypes, shapes, byte ranges within the file as the store lists its size, no overlaps).

    Raises:
        CorruptFileError: the header is truncated, too long or malformed.
    """
    where = store.where(resolved) / name
    meta = resolved.files.get(name)
    size = meta.size if meta is not None else None
    want = HEADER_PROBE if size is None else min(HEADER_PROBE, size)
    head = store.read_range(resolved, name, 0, want)[:want]
    n = header_length(head[:8], file_size=size, path=where)
    if len(head) == want < 8 + n:  # the header goes on past the first read
        head += store.read_range(resolved, name, want, 8 + n - want)[: 8 + n - want]
    raw = head[8 : 8 + n]
    if len(raw) != n:
        raise CorruptFileError("the safetensors header is truncated", path=where)
    header = parse_header(raw, path=where, file_size=size if size is not None else sys.maxsize)
    return header if size is not None else dataclasses.replace(header, file_size=0)


# ----------------------------------------------------------------------------------------------- adapters


class RemoteTensorSource(TensorSource):
    """Tensors of a store's adapter: nothing is fetched until a tensor is asked for; then the weight file is
    fetched once (at the pinned version, hash-checked) and read from there."""

    def __init__(
        self,
        header: SafetensorsHeader,
        fetch: Callable[[], Adapter],
        quantization: Any = None,
        remote: StoreFile | None = None,
    ) -> None:
        super().__init__(header=header)
        self._fetch = fetch
        #: the weight file as the store lists it (size, sha256): what inspect reports without fetching
        self.remote = remote
        self._local: Adapter | None = None
        self.quantization = quantization

    @property
    def path(self) -> Path | None:
        """The local weight file once fetched, else None (nothing local to hash or size yet)."""
        return self._local.source.path if self._local is not None else None

    def local(self) -> Adapter:
        if self._local is None:
            self._local = self._fetch()
        return self._local

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return self.local().source.load(keys)


def select_files(resolved: Resolved, *, allow_pickle: bool = False) -> list[str]:
    """The files an adapter or a model needs: an adapter's config, weights and card; or a model's config, side
    files and weights (any layout of the checkpoint layout table, diffusers components included).

    safetensors are preferred; a legacy ``.bin`` is taken only with ``allow_pickle`` and no safetensors.

    Raises:
        InvalidAdapterError: only a legacy pickle and no ``allow_pickle``.
        StoreNotFoundError: neither an adapter nor a safetensors model.
    """
    names = set(resolved.files)
    top = sorted(n for n in names if "/" not in n and not n.startswith("."))
    if CONFIG_NAME in names or WEIGHTS_NAME in names:
        wanted = [n for n in (CONFIG_NAME, CARD_FILE) if n in names]
        if WEIGHTS_NAME in names:
            return [*wanted, WEIGHTS_NAME]
        if LEGACY_WEIGHTS_NAME in names and allow_pickle:
            return [*wanted, LEGACY_WEIGHTS_NAME]
        if LEGACY_WEIGHTS_NAME in names:
            raise InvalidAdapterError(
                f"{resolved.label} holds only a legacy pickle {LEGACY_WEIGHTS_NAME}",
                hint="pass --allow-pickle (loaded with torch.load(weights_only=True))",
            )
        raise StoreNotFoundError(f"{resolved.label} has {CONFIG_NAME} but no {WEIGHTS_NAME}", repo_id=resolved.repo_id)
    side = [n for n in top if not is_weight_file(n)]  # config, tokenizer, index, card...
    if find_layout(top) is not None:
        return side + [n for n in top if n.endswith(".safetensors")]
    if allow_pickle and any(n.endswith(".bin") for n in top):
        return side + [n for n in top if n.endswith(".bin")]
    raise StoreNotFoundError(
        f"{resolved.label} holds no adapter ({CONFIG_NAME} / {WEIGHTS_NAME}) and no safetensors model",
        repo_id=resolved.repo_id,
        revision=resolved.requested,
    )


def fetched_adapter(store: Store, resolved: Resolved, *, allow_pickle: bool = False) -> Adapter:
    """The adapter read from its fetched files (a legacy ``.bin`` has no header to range-read; offline mode)."""
    names = select_files(resolved, allow_pickle=allow_pickle)
    local = {n: store.fetch(resolved, n) for n in names}
    adapter = PeftFormat().read(next(iter(local.values())).parent, allow_pickle=allow_pickle)
    adapter.path = store.where(resolved)  # as when range-read; the tensors are read from the fetched files
    adapter.provenance = Provenance(source=resolved.uri)
    return adapter


def open_store_adapter(store: Store, resolved: Resolved, *, allow_pickle: bool = False) -> Adapter:
    """A store's adapter from its ``adapter_config.json`` and the range-read header of its weights.

    ``adapter.path`` is :meth:`Store.where` (``org/name@v1.2.0`` on the Hub) and ``adapter.provenance.source``
    the version's :attr:`~Resolved.uri`.
    """
    files = resolved.files
    if WEIGHTS_NAME not in files and LEGACY_WEIGHTS_NAME in files:
        return fetched_adapter(store, resolved, allow_pickle=allow_pickle)
    if WEIGHTS_NAME not in files:
        raise StoreNotFoundError(
            f"{resolved.label} holds no {WEIGHTS_NAME}",
            repo_id=resolved.repo_id,
            revision=resolved.requested,
            hint="point at a repo holding a PEFT adapter",
        )
    doc = read_json(store.fetch(resolved, CONFIG_NAME), CONFIG_NAME) if CONFIG_NAME in files else None
    header = store.read_header(resolved, WEIGHTS_NAME)
    adapter = assemble_adapter(store.where(resolved), doc, header=header, format_name="peft")

    def fetch() -> Adapter:
        local = {n: store.fetch(resolved, n) for n in (CONFIG_NAME, WEIGHTS_NAME) if n in files}
        return PeftFormat().read(local[WEIGHTS_NAME].parent)

    adapter.source = RemoteTensorSource(
        header, fetch, getattr(adapter.source, "quantization", None), remote=files.get(WEIGHTS_NAME)
    )
    adapter.provenance = Provenance(source=resolved.uri)
    return adapter


# ------------------------------------------------------------------------------------------------- bases


@dataclass
class _Fetched:
    """The shards of one store base fetched so far. The merge's reader and writer threads may ask for the same
    shard at once: a lock per shard makes it one fetch."""

    local: dict[str, Path] = field(default_factory=dict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str, fetch: Callable[[str], Path]) -> Path:
        if name not in self.local:
            with self.guard:
                lock = self.locks.setdefault(name, threading.Lock())
            with lock:
                if name not in self.local:
                    self.local[name] = fetch(name)
        return self.local[name]


class _LazyShards(dict[str, Path]):
    """Tensor key -> local shard file; a shard is fetched when a path in it is first handed out.

    ``dict.get(shards, key)`` (the plain dict's lookup) answers the placeholder ``org/name@rev/<shard>``
    without fetching: what error messages name.
    """

    def __init__(
        self, placeholders: dict[str, Path], fetch: Callable[[str], Path], fetched: _Fetched | None = None
    ) -> None:
        super().__init__(placeholders)
        self._fetch = fetch
        self._fetched = fetched or _Fetched()

    def subset(self, keys: Iterable[str]) -> _LazyShards:
        """The entries of ``keys`` (fetching nothing), sharing this map's fetched shards."""
        return _LazyShards({k: dict.__getitem__(self, k) for k in keys if k in self}, self._fetch, self._fetched)

    def __getitem__(self, key: str) -> Path:
        return self._fetched.get(super().__getitem__(key).name, self._fetch)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> Any:
        return {k: self[k] for k in self}.values()

    def items(self) -> Any:
        return {k: self[k] for k in self}.items()


class StoreBaseView(BaseView):
    """A store's base (:func:`open_store_base`). The views derived from it (:meth:`derive`, e.g. the dequantized
    view of a bitsandbytes base) share its lazy shards and follow it to the local folder of fetched files."""

    #: this view and those derived from it: their ``path`` moves to the fetched folder together
    family: list[BaseView]

    def derive(self, tensors: dict[str, TensorInfo]) -> BaseView:
        """The same checkpoint through other tensor entries; nothing is fetched."""
        shards = self.shard_of
        assert isinstance(shards, _LazyShards)
        out = StoreBaseView(
            path=self.path,
            config=self.config,
            tensors=tensors,
            shard_of=shards.subset(tensors),
            weights_stem=self.weights_stem,
            read_raw=self.read_raw,
        )
        out.family = self.family
        self.family.append(out)
        return out


def range_reader(
    store: Store, resolved: Resolved, shard_names: dict[str, str], tensors: dict[str, TensorInfo]
) -> Callable[[str], bytes]:
    """Reads a stored tensor's raw bytes by range reads at the pinned version, fetching no shard: the shard's
    8-byte header length once, then the tensor's byte range."""
    data_start: dict[str, int] = {}

    def read(key: str) -> bytes:
        shard = shard_names[key]
        info = tensors[key]
        where = store.where(resolved) / shard
        if shard not in data_start:
            size = resolved.files[shard].size if shard in resolved.files else None
            data_start[shard] = start_of_data(store.read_range(resolved, shard, 0, 8), file_size=size, path=where)
        data = store.read_range(resolved, shard, data_start[shard] + info.start, info.nbytes) if info.nbytes else b""
        if len(data) != info.nbytes:
            raise CorruptFileError(f"tensor {key!r} is truncated", path=where, module=key)
        return data

    return read


def open_store_base(store: Store, resolved: Resolved) -> BaseView:
    """A store checkpoint's ``config.json`` and tensor headers (single file or sharded, any stem of the layout
    table: transformers' ``model`` or a diffusers component's ``diffusion_pytorch_model``), by range reads.

    ``path`` is :meth:`Store.where` until the first shard is fetched; from then on it is the local folder of
    fetched files, which by then also holds the small side files (config, tokenizer) a merge copies.
    ``read_raw`` reads one tensor's bytes by range (no shard fetched).

    Raises:
        StoreNotFoundError: the version holds no safetensors checkpoint.
        CorruptFileError: the index is malformed or names a missing shard.
    """
    files = resolved.files
    where = store.where(resolved)
    layout = find_layout([n for n in files if "/" not in n])
    if layout is None:
        raise StoreNotFoundError(
            f"{resolved.label} holds no {SINGLE_FILE} or {INDEX_FILE} (nor a diffusers component's weights)",
            repo_id=resolved.repo_id,
            revision=resolved.requested,
            hint="point --base at a checkpoint saved with save_pretrained (safetensors)",
        )
    config = read_json(store.fetch(resolved, CONFIG_FILE), CONFIG_FILE) if CONFIG_FILE in files else {}
    index = where / layout.index
    weight_map = read_index(store.fetch(resolved, layout.index)) if layout.sharded else {}
    headers: dict[str, SafetensorsHeader] = {}
    for shard in sorted(set(weight_map.values())) if layout.sharded else [layout.single]:
        if shard not in files:
            raise CorruptFileError(f"the index names {shard}, which is missing", path=index)
        headers[shard] = store.read_header(resolved, shard)
    if layout.sharded:
        tensors = index_tensors(weight_map, headers, index)
        shard_names = dict(weight_map)
    else:
        tensors = dict(headers[layout.single].tensors)
        shard_names = dict.fromkeys(tensors, layout.single)
    config["_name_or_path"] = resolved.repo_id  # what the adapter's declared base is compared with
    view = StoreBaseView(
        path=where,
        config=config,
        tensors=tensors,
        weights_stem=layout.stem,
        read_raw=range_reader(store, resolved, shard_names, tensors),
    )
    view.family = [view]
    side_files = threading.Lock()

    def fetch(shard: str) -> Path:
        local = store.fetch(resolved, shard)
        with side_files:
            if view.path != local.parent:
                for name in files:
                    if is_side_file(name) and name not in REPO_FILES:
                        store.fetch(resolved, name)
                for member in view.family:
                    member.path = local.parent
        return local

    view.shard_of = _LazyShards({k: where / n for k, n in shard_names.items()}, fetch)
    return view
