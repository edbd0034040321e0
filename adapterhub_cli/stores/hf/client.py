"""Calls to the Hugging Face Hub: retries with backoff for transient failures, and Hub errors translated.

Every call goes through :class:`Client`: an injected ``huggingface_hub.HfApi`` (or the default one) and a
token bound to one repo. 5xx / 408 / 429 answers and network failures (a dropped connection, a timeout) are
retried with exponential backoff; what still fails becomes a :class:`HubError` naming the repo and revision
(401 / 403 -> :class:`HubAuthError`, 404 -> :class:`HubNotFoundError`). The token is handed to
``huggingface_hub`` and nowhere else: every token a client may send (``--token``, ``HF_TOKEN``, the saved login) is
registered with :func:`adapterhub_cli.errors.register_secret`, so no error message holds it, and server text
in a message is :func:`~adapterhub_cli.errors.server_line` (one line, no token, no escape sequences). A
translated error does not chain the ``huggingface_hub`` exception (whose text may echo the request's headers).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from adapterhub_cli.errors import (
    AdaptersError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubResponseError,
    register_secret,
    server_line,
)


if TYPE_CHECKING:
    from huggingface_hub import HfApi

T = TypeVar("T")

#: Attempts after the first for a transient failure, and the first pause (doubled each time, at most 8 s).
RETRIES = 4
BACKOFF_SECONDS = 0.5
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
#: what huggingface_hub raises when an answer is not shaped as the Hub's are (a missing key, a wrong type, no JSON)
_UNREADABLE = (KeyError, TypeError, AttributeError, IndexError, ValueError)


def get_api(api: HfApi | None = None) -> HfApi:
    """``api``, or a default ``HfApi()`` (endpoint from HF_ENDPOINT, token from HF_TOKEN or the saved login)."""
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi()


def _saved_token() -> str | None:
    """The token huggingface_hub would send by default (HF_TOKEN or the saved login), None if none or unreadable."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # an OIDC exchange that failed: no token to hide, the call itself will say what is wrong
        return None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack += [cur.__cause__, cur.__context__]


def _status(e: BaseException) -> int | None:
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx", "requests"):  # whichever transport huggingface_hub uses
        mod = sys.modules.get(name)
        for attr in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, attr, None) if mod is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def is_transient(e: BaseException) -> bool:
    """A 5xx / 408 / 429 answer or a network failure (dropped connection, timeout), but never offline mode."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    chain = list(_chain(e))
    if any(isinstance(c, OfflineModeIsEnabled) for c in chain):
        return False
    transport = _transport_errors()
    return any(_status(c) in _TRANSIENT_STATUS or isinstance(c, transport) for c in chain)


def hub_error(
    e: BaseException,
    *,
    repo_id: str,
    revision: str | None,
    action: str,
    filename: str | None,
    endpoint: str,
    token_sent: bool = True,
) -> HubError | None:
    """The :class:`HubError` a failed Hub call means, or None when ``e`` is not a Hub failure.

    A 401 is always an authentication error, also where ``huggingface_hub`` calls it a missing repository (it does
    for a request without a token: the Hub answers so for a private or missing repo); ``token_sent`` says whether
    the request carried one, and the hint says what to do in each case. An answer ``huggingface_hub`` could not
    parse (a missing key, a wrong type, not JSON) is a :class:`HubResponseError`; arguments it refused
    (``HFValidationError``) and this package's own errors are not Hub failures.
    """
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}" if revision else repo_id
    kw: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    chain = list(_chain(e))

    def first(cls: Any) -> BaseException | None:
        return next((c for c in chain if isinstance(c, cls)), None)

    if first(hf.OfflineModeIsEnabled):
        return HubError(
            f"{where} is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1)",
            hint="unset HF_HUB_OFFLINE, or pull it once while online",
            **kw,
        )
    if (c := first(hf.GatedRepoError)) is not None:
        return HubAuthError(
            f"{repo_id} is gated: request access on its Hub page, then use a token of an account that has it",
            status=_status(c),
            **kw,
        )
    http = first(hf.HfHubHTTPError)
    if http is not None and _status(http) == 401:
        if not token_sent:
            return HubAuthError(
                f"the Hub refused the credentials (401 Unauthorized) while {action} {where}: no token was sent",
                hint="set HF_TOKEN or pass --token (or log in with `hf auth login`); without a token the Hub also "
                "answers 401 for a private or missing repo",
                status=401,
                **kw,
            )
        return HubAuthError(
            f"the Hub refused the credentials (401 Unauthorized) while {action} {where}",
            hint="check HF_TOKEN / --token or log in again with `hf auth login` (the token is never shown)",
            status=401,
            **kw,
        )
    if (c := first(hf.RepositoryNotFoundError)) is not None:
        return HubNotFoundError(
            f"repository {repo_id} not found on {endpoint}",
            hint="check the name (and that no local folder of that name was meant); if the repo is private, "
            "use a token that can read it (HF_TOKEN or --token)",
            status=_status(c),
            **kw,
        )
    if (c := first(hf.RevisionNotFoundError)) is not None:
        return HubNotFoundError(
            f"revision {revision!r} not found in {repo_id}",
            hint=f"list the published versions with `adapters versions {repo_id}`",
            status=_status(c),
            **kw,
        )
    entry_errors = tuple(getattr(hf, n) for n in ("RemoteEntryNotFoundError", "EntryNotFoundError") if hasattr(hf, n))
    if (c := first(entry_errors)) is not None and _status(c) is not None:
        return HubNotFoundError(f"{filename or 'the file'} not found in {where}", status=_status(c), **kw)
    status = _status(http) if http is not None else None
    if status == 403:
        return HubAuthError(
            f"forbidden (403) while {action} {where}: the token lacks the permission",
            hint=f"use a token with {'write' if action.startswith(('push', 'tag', 'creat')) else 'read'} access to "
            f"{repo_id.split('/')[0]}",
            status=403,
            **kw,
        )
    if status == 404:
        return HubNotFoundError(f"not found (404) while {action} {where}", status=404, **kw)
    if is_transient(e):
        cause = http if http is not None else chain[-1]
        return HubError(
            f"the Hub at {endpoint} did not answer while {action} {where} ({RETRIES + 1} attempts; last: "
            f"{type(cause).__name__}{f' {status}' if status else ''})",
            hint="check the network and HF_ENDPOINT, then try again",
            status=status,
            **kw,
        )
    if http is not None:
        detail = server_line(getattr(http, "server_message", None) or str(http))
        return HubError(f"the Hub answered {status} while {action} {where}: {detail}", status=status, **kw)
    if first(hf.LocalEntryNotFoundError):
        return HubError(
            f"{filename or 'a file'} of {where} is not in the cache and the Hub could not be reached", **kw
        )
    if isinstance(e, _UNREADABLE) and not isinstance(e, (AdaptersError, hf.HFValidationError)):
        return HubResponseError(
            f"the Hub's answer while {action} {where} could not be read ({type(e).__name__}: {server_line(e)})",
            hint="the endpoint is misbehaving or not the Hub (check HF_ENDPOINT); nothing was written",
            **kw,
        )
    return None


@dataclass
class Client:
    """An ``HfApi`` and a token, bound to one repo: every call is retried and its errors translated."""

    api: HfApi
    token: str | None
    repo_id: str

    def __post_init__(self) -> None:
        secrets = [s for s in (self.token, self.api.token, _saved_token()) if isinstance(s, str) and s]
        for secret in secrets:
            register_secret(secret)
        #: whether requests carry a token (explicit, the HfApi's, HF_TOKEN or the saved login): what a 401 means
        self.token_sent = bool(secrets) and self.token is not False and self.api.token is not False

    def call(
        self,
        action: str,
        method: str,
        *args: Any,
        shown: str | None = None,
        filename: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """``api.<method>(*args, **kwargs)`` with the token; errors name ``shown`` (else ``revision``)."""
        fn = getattr(self.api, method)
        revision = shown or kwargs.get("revision")
        if self.token is not None:
            kwargs["token"] = self.token

        def attempt() -> Any:
            with no_progress_bars():
                return fn(*args, **kwargs)

        return retrying(
            attempt,
            lambda e: hub_error(
                e,
                repo_id=self.repo_id,
                revision=revision,
                action=action,
                filename=filename,
                endpoint=self.api.endpoint,
                token_sent=self.token_sent,
            ),
        )


_bars_lock = threading.Lock()
_bars_depth = 0
_bars_saved: dict[str, bool] = {}


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """``huggingface_hub``'s tqdm progress bars off for the calls inside (the API never prints), and its settings
    as they were afterwards (a library user's own ``enable_progress_bars`` / ``disable_progress_bars`` choices
    stand). Nested and concurrent uses (a merge fetching shards on several threads) restore once, at the end of
    the last. ``HF_HUB_DISABLE_PROGRESS_BARS=0`` in the environment still wins: it is the user's explicit choice."""
    global _bars_depth, _bars_saved
    states: dict[str, bool] = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    with _bars_lock:
        if _bars_depth == 0:
            _bars_saved = dict(states)
            states.clear()
            states["_global"] = False
        _bars_depth += 1
    try:
        yield
    finally:
        with _bars_lock:
            _bars_depth -= 1
            if _bars_depth == 0:
                states.clear()
                states.update(_bars_saved)


def retrying(fn: Callable[[], T], translate: Callable[[BaseException], HubError | None]) -> T:
    """Run ``fn``, retrying transient failures with exponential backoff; raise a translated error at the end."""
    delay = BACKOFF_SECONDS
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as e:
            if attempt < RETRIES and is_transient(e):
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                continue
            err = translate(e)
            if err is None:
                raise
            raise err from None  # the client's exception may quote request headers: never chained
    raise AssertionError("unreachable")


def connect(repo_id: str, api: HfApi | None, token: str | None) -> Client:
    return Client(get_api(api), token, repo_id)
