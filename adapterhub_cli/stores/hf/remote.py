"""Range reads of files at a pinned Hub commit: safetensors headers and single tensors, no weights downloaded.

The header of a safetensors file on the Hub is read with HTTP range requests
(``HfApi.parse_safetensors_file_metadata``), so ``inspect`` and ``validate`` of ``org/name@v1.2.0`` never
download a weight file; a byte range of a file (the few small tensors read before a merge starts, such as the
quant-state blobs of a bitsandbytes base) is read by one ranged GET on the same endpoint, with the same headers
and token. Opening adapters and bases on top of these is the same for every store
(:mod:`adapterhub_cli.stores.views`).
"""

from __future__ import annotations

from pathlib import Path

from adapterhub_cli.artifact.safetensors import SafetensorsHeader, TensorInfo
from adapterhub_cli.errors import CorruptFileError
from adapterhub_cli.stores.hf.client import Client, hub_error, retrying
from adapterhub_cli.stores.records import Resolved


def remote_header(client: Client, resolved: Resolved, name: str) -> SafetensorsHeader:
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


def read_range(client: Client, resolved: Resolved, name: str, start: int, length: int) -> bytes:
    """``length`` bytes of file ``name`` at the pinned commit from ``start``, by one ranged GET (retried and
    translated like every Hub call); a server that ignores ``Range`` is answered from the full body."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    api = client.api
    url = hf_hub_url(resolved.repo_id, name, revision=resolved.commit, endpoint=api.endpoint)
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
            filename=name,
            endpoint=api.endpoint,
        ),
    )
