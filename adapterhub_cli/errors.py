"""The exceptions `adapterhub_cli` raises.

Every error a user can cause derives from :class:`AdaptersError`; the CLI turns each into a one-line
message and a non-zero exit status. Errors carry the data a caller needs (path, module, ...) as
attributes, and their message says what to do.

One rule for naming options: messages and hints name an option by its command-line spelling (``--overwrite``,
``--weights``, ``--force``), never by a Python argument name. In the Python API the same option is the keyword
argument of that name with the dashes dropped and the others turned into underscores (``--overwrite`` is
``overwrite=True``, ``--max-rank`` is ``max_rank=``, ``--into`` of ``merge`` is ``base=``), as each function's
docstring says. A :class:`UsageError` is the CLI's usage error (exit status 2, with the command's usage line).
"""

from __future__ import annotations

import os
import re
from pathlib import Path


# ------------------------------------------------------------------------------------ secrets and server text

#: environment variables whose value is a Hub token (huggingface_hub reads both)
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
#: what a secret is replaced with
REDACTED = "***"
_MIN_SECRET = 8  # shorter values are not scrubbed by value (they would blank ordinary words)
_SECRETS: set[str] = set()
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",;()]+")
#: the password in a URL's user info: ``scheme://user:PASSWORD@``
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^/\s@]+@")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # a Hub token: hf_ and 34 letters
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, erasing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -~]?"  # any other escape
    r"|\x9b[0-?]*[ -/]*[@-~]"  # the 8-bit CSI
)
#: C0 controls but tab and newline, DEL, C1 controls, and the bidi overrides that reorder what a terminal shows
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def register_secret(value: str | None) -> None:
    """Remember ``value`` (a token handed to a store) so :func:`scrub` removes it from every later message."""
    if isinstance(value, str) and len(value.strip()) >= _MIN_SECRET:
        _SECRETS.add(value.strip())


def scrub(text: str) -> str:
    """``text`` without secrets: the exact value of every registered token (:func:`register_secret`) and of
    ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, anything shaped like one (``Bearer ...``, ``hf_...``), and the password
    of a URL's user info (``https://user:PASSWORD@host``, e.g. an ``HF_ENDPOINT`` with credentials).

    Every :class:`AdaptersError` scrubs its message and hint; the CLI scrubs whatever it prints for an error.
    """
    secrets = set(_SECRETS)
    secrets.update(v.strip() for k in TOKEN_ENV_VARS if len((v := os.environ.get(k) or "").strip()) >= _MIN_SECRET)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)
    return _HF_TOKEN.sub(REDACTED, _BEARER.sub(rf"\g<1>{REDACTED}", text))


def server_text(text: object) -> str:
    """Text that came from a server (a commit title, a tag, an error message): :func:`scrub`-bed, with terminal
    escape sequences and control characters (but newlines and tabs) stripped, so it prints as plain text."""
    return scrub(_CONTROLS.sub("", _ESCAPES.sub("", str(text))))


def server_line(text: object, *, limit: int = 300) -> str:
    """:func:`server_text` on one line (runs of whitespace and newlines become one space), at most ``limit``
    characters: what an error message quotes of a server's answer."""
    line = " ".join(server_text(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------- errors


class AdaptersError(Exception):
    """Root of every error raised for a user mistake or bad input. Its message and hint never hold a secret
    (:func:`scrub`)."""

    #: A short hint printed after the message by the CLI.
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(scrub(str(message)))
        if hint is not None:
            self.hint = scrub(str(hint))


class AdapterNotFoundError(AdaptersError, FileNotFoundError):
    """Raised when the path given for an adapter or a base model does not exist."""

    def __init__(self, path: str | Path, what: str = "adapter") -> None:
        self.path = Path(path)
        super().__init__(
            f"{what} not found: {path}", hint="check the path; a folder or a .safetensors file is expected"
        )


class InvalidAdapterError(AdaptersError, ValueError):
    """Raised when an adapter folder or file is readable but does not describe a valid adapter."""

    def __init__(
        self, message: str, *, path: str | Path | None = None, module: str | None = None, hint: str | None = None
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.module = module
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{message}", hint=hint)


class CorruptFileError(InvalidAdapterError):
    """Raised when a safetensors (or JSON) file is truncated, malformed or internally inconsistent."""


class UnsafeFileError(InvalidAdapterError):
    """Raised when a legacy pickle file tries to do more than hold tensors (code execution, unknown globals)."""


class IncompatibleBaseError(AdaptersError, ValueError):
    """Raised when an adapter does not fit the base model it is applied to."""

    def __init__(self, message: str, *, findings: list | None = None, hint: str | None = None) -> None:
        self.findings = findings or []
        super().__init__(message, hint=hint)


class PluginError(AdaptersError):
    """Raised when a plugin cannot be loaded or registers something invalid."""


class UnknownFormatError(AdaptersError, LookupError):
    """Raised when no registered format can read a path, or a format name is unknown."""


class UsageError(AdaptersError, ValueError):
    """Raised for arguments that do not make sense together, or an option that would have no effect (rather than
    silently ignoring it). The CLI reports it as a usage error: the command's usage line, the message, exit 2."""


class OutputExistsError(AdaptersError, FileExistsError):
    """Raised when an output path exists and ``--overwrite`` was not given.

    Attributes:
        path: the output path.
    """

    def __init__(self, path: str | Path, message: str | None = None, *, hint: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(
            message or f"{path} already exists",
            hint=hint or "choose another output path, or pass --overwrite to replace it (an earlier output only)",
        )


class StoreError(AdaptersError):
    """Raised when a store (the Hugging Face Hub, a local registry, a plugin's) refuses or fails a request.

    Attributes:
        repo_id, revision: what was asked for (revision None for the default branch or the latest version).
        status: the HTTP status, when a server answered one.
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        status: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.status = status
        super().__init__(message, hint=hint)


class StoreNotFoundError(StoreError, LookupError):
    """Raised when a store has no such repo, version, revision or file."""


class VersionConflictError(StoreError, ValueError):
    """Raised when a push would move an existing version, or publish a version lower than the latest."""


class HubError(StoreError):
    """Raised when the Hugging Face Hub refuses or fails a request (after retries for transient failures)."""


class HubAuthError(HubError, PermissionError):
    """Raised for 401 / 403: the token is missing, wrong, or lacks the permission (the token is never shown)."""


class HubNotFoundError(HubError, StoreNotFoundError):
    """Raised when a Hub repo, revision, version or file does not exist (or is private to the caller)."""


class HubResponseError(HubError):
    """Raised when a Hub answer is malformed or unsafe: a commit id, hash or file name that is not what the Hub
    gives, a listing that disagrees with itself, a download larger than listed, a crafted safetensors header.
    Nothing is written from such an answer."""
