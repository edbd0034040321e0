"""Turn known exceptions into a message a user can act on. Unknown exceptions are bugs and keep their traceback.

Every message is :func:`~adapterhub_cli.errors.scrub`-bed (no token, by value or by shape), and text a server
sent is :func:`~adapterhub_cli.errors.server_line` (one line, no escape sequences either).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from adapterhub_cli.cli._output import visible
from adapterhub_cli.errors import AdapterNotFoundError, AdaptersError, UsageError, scrub, server_line


#: what follows the message of an error that is not one of ours (an OSError, an HTTP error that escaped a store)
DEBUG_HINT = "\n  (set ADAPTERS_DEBUG=1 to see the traceback)"


def _adapters_error(e: BaseException) -> str:
    msg = str(e)
    hint = getattr(e, "hint", None)
    return f"{msg}\n  hint: {hint}" if hint else msg


def _file_exists(e: BaseException) -> str:
    return f"{e}\n  hint: choose another output path or pass --overwrite"


def _os_error(e: BaseException) -> str:
    assert isinstance(e, OSError)
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


#: Ordered: the first matching type wins, so subclasses come before their bases.
ERROR_FORMATTERS: list[tuple[type[BaseException], Callable[[BaseException], str]]] = [
    (AdapterNotFoundError, _adapters_error),
    (AdaptersError, _adapters_error),
    (FileExistsError, _file_exists),
    (OSError, _os_error),
]


def _hf_http_error(e: BaseException) -> str | None:
    """A huggingface_hub HTTP error that escaped the Hub store (it translates the ones it makes)."""
    hf_errors = sys.modules.get("huggingface_hub.errors")  # loaded only if the Hub was used
    if hf_errors is None or not isinstance(e, hf_errors.HfHubHTTPError):
        return None
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    repo = getattr(e, "repo_id", None)
    where = f" for {repo}" if repo else ""
    detail = server_line(getattr(e, "server_message", None) or str(e))
    if status == 401:
        return f"the Hub refused the credentials (401){where}: {detail}\n  hint: check HF_TOKEN / --token"
    if status == 403:
        return f"forbidden (403){where}: {detail}\n  hint: use a token with the needed permission"
    if status == 404:
        return f"not found on the Hub (404){where}: {detail}\n  hint: check the repo id and revision"
    return f"the Hub answered {status}{where}: {detail}"


def format_known_exception(e: BaseException) -> str | None:
    """The user-facing message for ``e`` without secrets, or None when ``e`` is not a known user-facing error."""
    message = _known_message(e)
    return scrub(message) if message is not None else None


def _known_message(e: BaseException) -> str | None:
    hf_message = _hf_http_error(e)
    if hf_message is not None:
        return hf_message
    for exc_type, formatter in ERROR_FORMATTERS:
        if isinstance(e, exc_type):
            return formatter(e)
    lora_ops = sys.modules.get("lora_ops")  # never imported here just to check: it imports torch
    if lora_ops is not None and isinstance(e, lora_ops.LoraOpsError):
        return str(e)
    return None


def usage_error(e: UsageError, ctx: click.Context) -> click.UsageError:
    """``e`` as click's usage error for the command of ``ctx`` (usage line, ``Error: ...``, exit status 2): its
    message and hint scrubbed, control characters shown as escapes, and what the terminal cannot encode escaped."""
    message = visible(format_known_exception(e) or str(e), newlines=True)
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    try:
        message.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        message = message.encode("ascii", "backslashreplace").decode("ascii")
    return click.UsageError(message, ctx=ctx)
