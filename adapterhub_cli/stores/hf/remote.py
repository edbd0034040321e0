"""Bytes of files at a pinned Hub commit, by GET requests that never take more than they asked for.

A byte range (a safetensors header, a small tensor such as a bitsandbytes quant state) is one ranged GET; a
whole file (:mod:`adapterhub_cli.stores.hf.pull`) is one GET cut off, and refused, as soon as the server sends
more than the size the Hub's listing promised. The server's answer is untrusted: a body longer than asked for is
a :class:`~adapterhub_cli.errors.HubResponseError`, and an error answer is read up to :data:`ERROR_BODY_LIMIT`
bytes. Headers read this way are checked like a local file's (:func:`adapterhub_cli.stores.views.header_by_range`).
Requests carry the same headers and token as the ``HfApi`` calls, and are retried and translated like them.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, BinaryIO

from adapterhub_cli.errors import HubResponseError
from adapterhub_cli.stores.hf.client import Client, hub_error, retrying


if TYPE_CHECKING:
    import httpx2

    from adapterhub_cli.stores.records import Resolved

#: the most bytes of an error answer that are read: its message is all that is used
ERROR_BODY_LIMIT = 1 << 20
_DROPPED = ("content-encoding", "content-length", "transfer-encoding")


def read_range(client: Client, resolved: Resolved, name: str, start: int, length: int) -> bytes:
    """``length`` bytes of file ``name`` at the pinned commit from ``start`` (fewer only at the end of the file),
    by one ranged GET; a server that ignores ``Range`` is read up to the end of the range and cut off there.

    Raises:
        HubResponseError: the server sent more than the range asked for.
        HubError: the request failed (after retries).
    """
    if length <= 0:
        return b""
    out = io.BytesIO()
    get(client, resolved.repo_id, resolved.commit, name, out, start=start, length=length, shown=resolved.requested)
    return out.getvalue()


def get(
    client: Client,
    repo_id: str,
    revision: str,
    name: str,
    out: BinaryIO,
    *,
    start: int = 0,
    length: int | None = None,
    limit: int | None = None,
    shown: str | None = None,
) -> None:
    """Write file ``name`` at ``revision`` into ``out``: bytes ``start`` to ``start + length - 1`` when ``length`` is
    given, else the whole file, which may not be longer than ``limit`` bytes. ``out`` is rewound before each try.

    Raises:
        HubResponseError: a ranged answer longer than the range, or a file longer than ``limit`` (cut off there).
        HubError: the request failed (after retries).
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    api = client.api
    url = hf_hub_url(repo_id, name, revision=revision, endpoint=api.endpoint)
    headers = build_hf_headers(
        token=client.token if client.token is not None else api.token,
        library_name=api.library_name,
        library_version=api.library_version,
        user_agent=api.user_agent,
        headers=api.headers,
    )
    if length is not None:
        headers["range"] = f"bytes={start}-{start + length - 1}"
    where = f"{name} of {repo_id}@{revision}"

    def attempt() -> None:
        out.seek(0)
        out.truncate()
        with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            if response.status_code >= 400:
                _raise_for_status(response)
            ignored_range = length is not None and response.status_code == 200
            if length is not None and response.status_code == 206:
                _check_content_range(response, start, where)
            _copy(
                response,
                out,
                skip=start if ignored_range else 0,
                keep=length,
                limit=limit,
                cut=ignored_range,
                where=where,
            )

    retrying(
        attempt,
        lambda e: hub_error(
            e,
            repo_id=repo_id,
            revision=shown or revision,
            action="downloading" if length is None else "reading a range of",
            filename=name,
            endpoint=api.endpoint,
            token_sent=client.token_sent,
        ),
    )


def _copy(
    response: httpx2.Response, out: BinaryIO, *, skip: int, keep: int | None, limit: int | None, cut: bool, where: str
) -> None:
    """The body into ``out``: ``skip`` bytes dropped, then at most ``keep`` (a range) or ``limit`` (a file) bytes.
    With ``cut`` (a server that ignored ``Range``) the rest of the body is not read; otherwise a longer body is
    refused as soon as it passes the bound."""
    bound = keep if keep is not None else limit
    declared = response.headers.get("content-length", "")
    if bound is not None and not cut and declared.isdigit() and int(declared) > bound:
        raise _too_long(where, bound, keep is not None)
    kept = 0
    for chunk in response.iter_bytes():
        if skip:
            dropped = min(skip, len(chunk))
            chunk, skip = chunk[dropped:], skip - dropped
        if bound is not None and kept + len(chunk) > bound:
            if not cut:
                raise _too_long(where, bound, keep is not None)
            chunk = chunk[: bound - kept]
        out.write(chunk)
        kept += len(chunk)
        if cut and kept == bound:
            return


def _check_content_range(response: httpx2.Response, start: int, where: str) -> None:
    """Refuse a ranged answer that says it holds another range than the one asked for."""
    content_range = response.headers.get("content-range")
    if content_range is not None and not content_range.strip().startswith(f"bytes {start}-"):
        raise HubResponseError(
            f"the server answered a range of {where} other than the one asked for (from byte {start})",
            hint="the endpoint is misbehaving or not the Hub (check HF_ENDPOINT)",
        )


def _too_long(where: str, bound: int, ranged: bool) -> HubResponseError:
    what = f"the {bound} bytes asked for" if ranged else f"the {bound} bytes the Hub's listing gives it"
    return HubResponseError(
        f"the server sent more of {where} than {what}; the download was cut off and nothing was kept",
        hint="the endpoint is misbehaving or not the Hub (check HF_ENDPOINT)",
    )


def _raise_for_status(response: httpx2.Response) -> None:
    """Raise the ``huggingface_hub`` error of an error answer, reading at most :data:`ERROR_BODY_LIMIT` bytes."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    body = b""
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= ERROR_BODY_LIMIT:
            break
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _DROPPED]
    hf_raise_for_status(
        httpx2.Response(
            response.status_code, headers=headers, content=body[:ERROR_BODY_LIMIT], request=response.request
        )
    )
