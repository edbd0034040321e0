"""What a batch reports: one :class:`JobRecord` per job, written as JSON Lines (one object a line) as jobs finish."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from adapterhub_cli.artifact.files import follow_umask, sha256_file
from adapterhub_cli.errors import UsageError, scrub


Status = Literal["ok", "failed", "skipped"]


@dataclass
class JobRecord:
    """The outcome of one job (a line of the JSON Lines report; what :func:`adapterhub_cli.batch` returns).

    Attributes:
        index: the job's position in the expanded list; ``entry`` its position in the JOBS file.
        op, inputs, output: the API function, what it read (as given) and what it wrote (None: it only reads).
        status: ``ok``, ``failed`` or ``skipped`` (``--resume`` found its output up to date).
        seconds: wall time of the last attempt, in the worker.
        attempts: how many times it ran (transient failures are retried).
        error_code, error_message, error_hint: the exception's class name, its message and hint (no secrets).
        output_sha256: the output's digest (:func:`output_digest`), when it wrote a local file or folder.
        note: why a job was skipped or re-run by ``--resume``.
        summary: what the API function returned, in short (scalars of its result; a validation's counts).
        transient: the failure may pass on a retry (a lost worker, a server's 5xx answer).
    """

    index: int
    entry: int
    op: str
    inputs: list[str]
    output: str | None
    status: Status
    seconds: float = 0.0
    attempts: int = 1
    error_code: str | None = None
    error_message: str | None = None
    error_hint: str | None = None
    output_sha256: str | None = None
    note: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    transient: bool = False

    def to_json(self) -> dict[str, Any]:
        """The report line's object (``transient`` is the engines' business, not the report's)."""
        doc = asdict(self)
        doc.pop("transient")
        return doc


def output_digest(path: str | Path) -> str | None:
    """The sha256 of an output: of the file, or for a folder of its listing ``<sha256>  <relative path>`` of every
    regular file in path order (what ``sha256sum`` prints), so two outputs with equal digests are byte-identical
    file by file. None when there is nothing there."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    lines = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            if f.is_file() and not f.is_symlink():
                lines.append(f"{sha256_file(f)}  {f.relative_to(path).as_posix()}\n")
    return hashlib.sha256("".join(sorted(lines, key=lambda s: s.split("  ", 1)[1])).encode()).hexdigest()


class ReportWriter:
    """Writes records to a JSON Lines file as they come (so ``tail -f`` follows a batch), then, on
    :meth:`close`, replaces it with every record in index order."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        self._records: list[JobRecord] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
                raise UsageError(
                    f"--report {self.path} is a link or not a regular file",
                    hint="give a plain file path for the report",
                )
            # O_NOFOLLOW: a link planted between the check and the open is refused, never written through
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            self._file = os.fdopen(fd, "w", encoding="utf-8")

    def add(self, record: JobRecord) -> None:
        self._records.append(record)
        if self._file is not None:
            self._file.write(_line(record))
            self._file.flush()

    def close(self) -> None:
        """Rewrite the report in index order (through a temporary file renamed into place)."""
        if self._file is None or self.path is None:
            return
        self._file.close()
        self._file = None
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for record in sorted(self._records, key=lambda r: r.index):
                    f.write(_line(record))
            follow_umask(tmp)
            tmp.replace(self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _line(record: JobRecord) -> str:
    """The record's JSON line, scrubbed as a whole: a token that a job's input or output names is not written."""
    return scrub(json.dumps(record.to_json(), ensure_ascii=True, allow_nan=False, default=str)) + "\n"


def read_report(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines report, as objects."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class BatchStatus:
    """Where a batch stands (what the CLI's live table shows; handed to ``progress`` on every change).

    Attributes:
        total: jobs in the batch; ``ok``, ``failed``, ``skipped`` those finished so far.
        in_flight: jobs handed to the engine and not finished (running, or queued in Ray); ``slots`` how many can
            run at once (the pool's workers, the Ray cluster's CPUs).
        retries: attempts made again after a transient failure.
        elapsed: seconds since the batch started.
        last: the record of the job that finished last.
    """

    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    in_flight: int = 0
    slots: int = 1
    retries: int = 0
    elapsed: float = 0.0
    last: JobRecord | None = None

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def running(self) -> int:
        return min(self.in_flight, self.slots)

    @property
    def throughput(self) -> float:
        """Jobs finished per second so far (skipped ones included)."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0
