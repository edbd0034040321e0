"""The exceptions `adapterhub_cli` raises.

Every error a user can cause derives from :class:`AdaptersError`; the CLI turns each into a one-line
message and a non-zero exit status. Errors carry the data a caller needs (path, module, ...) as
attributes, and their message says what to do.
"""

from __future__ import annotations

from pathlib import Path


class AdaptersError(Exception):
    """Root of every error raised for a user mistake or bad input."""

    #: A short hint printed after the message by the CLI.
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


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
    """Raised for arguments that do not make sense together."""


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
