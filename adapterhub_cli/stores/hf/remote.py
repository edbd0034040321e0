"""Hub adapters and Hub base models, read from their config files and safetensors headers only.

The header of a safetensors file on the Hub is read with HTTP range requests
(``HfApi.parse_safetensors_file_metadata``), so ``inspect`` and ``validate`` of ``org/name@v1.2.0`` never
download a weight file. Weights are fetched into the HF cache (hash-checked, at the pinned commit) the first
time an operation needs them: a Hub adapter on its first tensor read, a Hub base one shard at a time as a
merge reaches it. The few small tensors read before a merge starts (the quant-state blobs of a bitsandbytes
base) are range-read too. In offline mode (``HF_HUB_OFFLINE=1``) both are served from the cache.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub_cli.artifact.adapter import Adapter, TensorSource
from adapterhub_cli.artifact.checkpoint import INDEX_FILE, SINGLE_FILE, BaseView, open_base
from adapterhub_cli.artifact.files import read_json
from adapterhub_cli.artifact.provenance import Provenance
from adapterhub_cli.artifact.ref import AdapterRef
from adapterhub_cli.artifact.safetensors import SafetensorsHeader, TensorInfo
from adapterhub_cli.errors import CorruptFileError, HubNotFoundError, InvalidAdapterError
from adapterhub_cli.formats.peft import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, PeftFormat, assemble_adapter
from adapterhub_cli.stores.hf import hub
from adapterhub_cli.stores.hf.client import hub_error, retrying


if TYPE_CHECKING:
    import torch
    from huggingface_hub import HfApi

_SIDE_SKIP = {"README.md", ".gitattributes", INDEX_FILE}


def _ref(source: AdapterRef | str) -> AdapterRef:
    ref = source if isinstance(source, AdapterRef) else AdapterRef.parse(source)
    if not ref.is_hub:
        ref = AdapterRef.parse("hf://" + str(source))
    return ref


def remote_header(client: hub.Client, resolved: hub.Resolved, name: str) -> SafetensorsHeader:
    """The header of a safetensors file at the pinned commit, read by range requests (no tensor data)."""
    meta = client.call(
        "reading the safetensors header of",
        "parse_safetensors_file_metadata",
        resolved.repo_id,
        name,
        revision=resolved.commit,
        shown=resolved.requested,
        filename=name,
    )
    where = Path(resolved.label) / name
    tensors = {}
    for key, t in meta.tensors.items():
        start, end = (int(x) for x in t.data_offsets)
        tensors[key] = TensorInfo(
            name=key, dtype=str(t.dtype), shape=tuple(int(d) for d in t.shape), start=start, end=end
        )
    size = resolved.files[name].size if name in resolved.files else None
    data = max((t.end for t in tensors.values()), default=0)
    if any(not isinstance(v, str) for v in (meta.metadata or {}).values()):
        raise CorruptFileError("__metadata__ must map strings to strings", path=where)
    return SafetensorsHeader(
        path=where,
        tensors=tensors,
        metadata=dict(meta.metadata or {}),
        header_size=(size - 8 - data) if size else 0,
        file_size=size or 0,
    )


class RemoteTensorSource(TensorSource):
    """Tensors of a Hub adapter: nothing is downloaded until a tensor is asked for; then the weight file is
    fetched once into the HF cache (at the pinned commit, hash-checked) and read from there."""

    def __init__(
        self,
        header: SafetensorsHeader,
        fetch: Callable[[], Adapter],
        quantization: Any = None,
        remote: hub.RemoteFile | None = None,
    ) -> None:
        super().__init__(header=header)
        self._fetch = fetch
        #: the weight file as the Hub lists it (size, LFS sha256): what inspect reports without downloading
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


def open_remote_adapter(
    source: AdapterRef | str, *, api: HfApi | None = None, token: str | None = None, allow_pickle: bool = False
) -> Adapter:
    """A Hub adapter from its ``adapter_config.json`` and the range-read header of ``adapter_model.safetensors``.

    ``adapter.path`` reads ``org/name@v1.2.0`` (or ``@<commit>`` when not found through a tag) and
    ``adapter.provenance.source`` is ``hf://org/name@<commit>``.
    """
    ref = _ref(source)
    resolved = hub.resolve(ref, api=api, token=token)
    client = hub.Client(hub.get_api(api), token, resolved.repo_id)
    files = resolved.files
    if hub.offline() or (WEIGHTS_NAME not in files and LEGACY_WEIGHTS_NAME in files):
        return _pulled(ref, resolved, api=api, token=token, allow_pickle=allow_pickle)
    if WEIGHTS_NAME not in files:
        raise HubNotFoundError(
            f"{resolved.label} holds no {WEIGHTS_NAME}",
            repo_id=resolved.repo_id,
            revision=ref.revision,
            hint="point at a repo holding a PEFT adapter",
        )
    doc = (
        read_json(hub.fetch_file(resolved, CONFIG_NAME, api=api, token=token), CONFIG_NAME)
        if CONFIG_NAME in files
        else None
    )
    header = remote_header(client, resolved, WEIGHTS_NAME)
    adapter = assemble_adapter(Path(resolved.label), doc, header=header, format_name="peft")

    def fetch() -> Adapter:
        names = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n in files]
        local = {n: hub.fetch_file(resolved, n, api=api, token=token) for n in names}
        return PeftFormat().read(local[WEIGHTS_NAME].parent)

    adapter.source = RemoteTensorSource(
        header, fetch, getattr(adapter.source, "quantization", None), remote=files.get(WEIGHTS_NAME)
    )
    adapter.provenance = Provenance(source=f"hf://{resolved.pinned}")
    return adapter


def _pulled(
    ref: AdapterRef, resolved: hub.Resolved, *, api: HfApi | None, token: str | None, allow_pickle: bool
) -> Adapter:
    """The adapter read from its files in the HF cache (offline mode, or a legacy ``.bin`` that has no header)."""
    if WEIGHTS_NAME not in resolved.files and LEGACY_WEIGHTS_NAME in resolved.files and not allow_pickle:
        raise InvalidAdapterError(
            f"{resolved.label} holds only a legacy pickle {LEGACY_WEIGHTS_NAME}",
            hint="pass --allow-pickle (loaded with torch.load(weights_only=True))",
        )
    names = hub.select_files(resolved, allow_pickle=allow_pickle)
    local = {n: hub.fetch_file(resolved, n, api=api, token=token) for n in names}
    adapter = PeftFormat().read(next(iter(local.values())).parent, allow_pickle=allow_pickle)
    adapter.path = Path(resolved.label)  # as online; the tensors are read from the cached files
    adapter.provenance = Provenance(source=f"hf://{resolved.pinned}")
    return adapter


@dataclass
class _Fetched:
    """The shards of one Hub base fetched so far. The merge's reader and writer threads may ask for the same
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
    """Tensor key -> local shard file; a shard is downloaded when a path in it is first handed out.

    ``dict.get(shards, key)`` (the plain dict's lookup) answers the placeholder ``org/name@rev/<shard>``
    without downloading: what error messages name.
    """

    def __init__(
        self, placeholders: dict[str, Path], fetch: Callable[[str], Path], fetched: _Fetched | None = None
    ) -> None:
        super().__init__(placeholders)
        self._fetch = fetch
        self._fetched = fetched or _Fetched()

    def subset(self, keys: Iterable[str]) -> _LazyShards:
        """The entries of ``keys`` (downloading nothing), sharing this map's fetched shards."""
        return _LazyShards({k: dict.__getitem__(self, k) for k in keys if k in self}, self._fetch, self._fetched)

    def __getitem__(self, key: str) -> Path:
        return self._fetched.get(super().__getitem__(key).name, self._fetch)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self) -> Any:
        return {k: self[k] for k in self}.values()

    def items(self) -> Any:
        return {k: self[k] for k in self}.items()


class _RemoteBaseView(BaseView):
    """A Hub base (:func:`open_remote_base`). The views derived from it (:meth:`derive`, e.g. the dequantized view
    of a bitsandbytes base) share its lazy shards and follow it to the local snapshot folder."""

    #: this view and those derived from it: their ``path`` moves to the snapshot folder together
    family: list[BaseView]

    def derive(self, tensors: dict[str, TensorInfo]) -> BaseView:
        """The same Hub checkpoint through other tensor entries; nothing is downloaded."""
        shards = self.shard_of
        assert isinstance(shards, _LazyShards)
        out = _RemoteBaseView(
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


def _range_reader(
    client: hub.Client, resolved: hub.Resolved, shard_names: dict[str, str], tensors: dict[str, TensorInfo]
) -> Callable[[str], bytes]:
    """Reads a stored tensor's raw bytes by HTTP range requests at the pinned commit, downloading no shard: the
    shard's 8-byte header length once, then the tensor's byte range (as ``parse_safetensors_file_metadata`` reads
    headers: same endpoint, headers and token; retried and translated like every Hub call)."""
    data_start: dict[str, int] = {}

    def get(shard: str, start: int, length: int) -> bytes:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        api = client.api
        url = hf_hub_url(resolved.repo_id, shard, revision=resolved.commit, endpoint=api.endpoint)
        headers = build_hf_headers(
            token=client.token if client.token is not None else api.token,
            library_name=api.library_name,
            library_version=api.library_version,
            user_agent=api.user_agent,
            headers=api.headers,
        )
        headers["range"] = f"bytes={start}-{start + length - 1}"

        def call() -> bytes:
            response = get_session().get(url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(response)
            data = response.content
            return data[start : start + length] if response.status_code == 200 else data  # 200: Range ignored

        return retrying(
            call,
            lambda e: hub_error(
                e,
                repo_id=resolved.repo_id,
                revision=resolved.requested,
                action="reading a tensor of",
                filename=shard,
                endpoint=api.endpoint,
            ),
        )

    def read(key: str) -> bytes:
        shard = shard_names[key]
        info = tensors[key]
        where = Path(resolved.label) / shard
        if shard not in data_start:
            prefix = get(shard, 0, 8)
            if len(prefix) != 8:
                raise CorruptFileError("the file is shorter than a safetensors header", path=where)
            data_start[shard] = 8 + struct.unpack("<Q", prefix)[0]
        data = get(shard, data_start[shard] + info.start, info.nbytes) if info.nbytes else b""
        if len(data) != info.nbytes:
            raise CorruptFileError(f"tensor {key!r} is truncated", path=where, module=key)
        return data

    return read


def open_remote_base(source: AdapterRef | str, *, api: HfApi | None = None, token: str | None = None) -> BaseView:
    """A Hub checkpoint's ``config.json`` and tensor headers (single file or sharded), read by range requests.

    ``path`` reads ``org/name@rev`` until the first shard is fetched; from then on it is the local snapshot
    folder, which by then also holds the small side files (config, tokenizer) a merge copies. ``read_raw``
    reads one tensor's bytes by a range request (no shard downloaded), for the few small tensors needed before
    a merge starts.
    """
    ref = _ref(source)
    if hub.offline():
        return open_base(hub.pull(ref, api=api, token=token).path)
    resolved = hub.resolve(ref, api=api, token=token)
    client = hub.Client(hub.get_api(api), token, resolved.repo_id)
    files = resolved.files
    config: dict[str, Any] = {}
    if "config.json" in files:
        config = read_json(hub.fetch_file(resolved, "config.json", api=api, token=token), "config.json")
    if INDEX_FILE in files:
        index = read_json(hub.fetch_file(resolved, INDEX_FILE, api=api, token=token), INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptFileError("index has no weight_map", path=Path(resolved.label) / INDEX_FILE)
        shards = sorted(set(weight_map.values()))
    elif SINGLE_FILE in files:
        shards = [SINGLE_FILE]
    else:
        raise HubNotFoundError(
            f"{resolved.label} holds no {SINGLE_FILE} or {INDEX_FILE}",
            repo_id=resolved.repo_id,
            revision=ref.revision,
            hint="point --base at a checkpoint saved with save_pretrained (safetensors)",
        )
    tensors: dict[str, TensorInfo] = {}
    shard_names: dict[str, str] = {}
    for shard in shards:
        if shard not in files:
            raise CorruptFileError(
                f"the index names {shard}, which is missing", path=Path(resolved.label) / INDEX_FILE
            )
        for key, info in remote_header(client, resolved, shard).tensors.items():
            tensors[key] = info
            shard_names[key] = shard
    config["_name_or_path"] = resolved.repo_id  # what the adapter's declared base is compared with
    view = _RemoteBaseView(
        path=Path(resolved.label),
        config=config,
        tensors=tensors,
        read_raw=_range_reader(client, resolved, shard_names, tensors),
    )
    view.family = [view]
    side_files = threading.Lock()

    def fetch(shard: str) -> Path:
        local = hub.fetch_file(resolved, shard, api=api, token=token)
        with side_files:
            if view.path != local.parent:
                for name in files:
                    if "/" not in name and name not in _SIDE_SKIP and not name.endswith(hub.WEIGHT_SUFFIXES):
                        hub.fetch_file(resolved, name, api=api, token=token)
                for member in view.family:
                    member.path = local.parent
        return local

    view.shard_of = _LazyShards({k: Path(resolved.label) / n for k, n in shard_names.items()}, fetch)
    return view
