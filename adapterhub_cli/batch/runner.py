"""``batch``: check a JOBS file, run its jobs on an engine, record each outcome.

The engines (and with them multiprocessing) are imported when a batch runs, not with the package: every `adapters`
command imports this module."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterhub_cli.batch.jobs import OUTPUT_KEYS, Job, load_jobs
from adapterhub_cli.batch.report import BatchStatus, JobRecord, ReportWriter
from adapterhub_cli.errors import UsageError, register_secret


ENGINES = ("local", "ray", "serial")


class _Tracker:
    """Keeps the :class:`BatchStatus`, writes the report as records arrive, and calls ``progress``."""

    def __init__(
        self, total: int, slots: int, writer: ReportWriter, progress: Callable[[BatchStatus], None] | None
    ) -> None:
        self.status = BatchStatus(total=total, slots=slots)
        self.records: list[JobRecord] = []
        self._writer = writer
        self._progress = progress
        self._t0 = time.perf_counter()

    def _tell(self) -> None:
        self.status.elapsed = time.perf_counter() - self._t0
        if self._progress is not None:
            self._progress(self.status)

    def started(self, job: Job, *, retry: JobRecord | None = None) -> None:
        if retry is None:
            self.status.in_flight += 1
        else:
            self.status.retries += 1
        self._tell()

    def finished(self, record: JobRecord) -> None:
        self.status.in_flight = max(0, self.status.in_flight - 1)
        if record.status == "ok":
            self.status.ok += 1
        elif record.status == "skipped":
            self.status.skipped += 1
        else:
            self.status.failed += 1
        self.status.last = record
        self.records.append(record)
        self._writer.add(record)
        self._tell()

    def slots(self, count: int) -> None:
        self.status.slots = count
        self._tell()


def _check_report_path(report: Path, jobs: list[Job]) -> None:
    """Refuse a report that would replace, or land inside, what a job reads or writes (a local path)."""
    real = report.resolve()
    for job in jobs:
        for value in [*job.inputs, *(job.kwargs.get(k) for k in OUTPUT_KEYS)]:
            if not isinstance(value, str) or "://" in value:
                continue
            path = Path(value).resolve()
            if real == path or path in real.parents:
                raise UsageError(
                    f"--report {report} is {value}, or lies inside it, which {job.label} reads or writes",
                    hint="give a report path outside the jobs' inputs and outputs",
                )


def default_report(jobs_file: str | Path) -> Path:
    """Where the CLI writes the report of a JOBS file: beside it, ``<stem>.report.jsonl``."""
    path = Path(jobs_file)
    return path.with_name(f"{path.stem}.report.jsonl")


def batch(
    jobs: str | Path | Sequence[Mapping[str, Any]],
    *,
    engine: str = "local",
    workers: int | None = None,
    address: str | None = None,
    resume: bool = False,
    report: str | Path | None = None,
    progress: Callable[[BatchStatus], None] | None = None,
) -> list[JobRecord]:
    """Run a batch of jobs, each an API function with its keyword arguments, and return one record per job.

    ``jobs`` is a JOBS file (YAML or JSON) or its content: a list of objects ``{"op": "reduce", "source": ...,
    "out": ..., "rank": 16}`` (see :mod:`adapterhub_cli.batch.jobs`, including ``for_each`` templates and
    ``threads``). Every job is checked before any runs. Jobs are independent: one's failure does not stop the
    others, and a failure is a record (``status == "failed"``, with the exception's class name and message), never
    an exception. A job whose failure is transient (a lost worker, a server's 5xx answer) runs again, twice at most.

    Args:
        engine: ``local`` (a pool of processes on this machine), ``ray`` (Ray tasks: ``pip install
            'adapterhub-cli[ray]'``) or ``serial`` (one after another in this process).
        workers: processes of the local pool, or CPUs of a Ray instance started here (default: this machine's
            cores). Each job uses one torch thread unless it sets ``threads``.
        address: the Ray cluster to join (``auto``: the one ``ray start`` runs here; ``ray://head:10001``);
            without it a local Ray instance is started (or the one this process already started is used).
        resume: skip jobs whose output is up to date (:mod:`adapterhub_cli.batch.resume`); an earlier output of
            this tool that is not up to date is replaced.
        report: a JSON Lines file to write, one record a line (written as jobs finish, then in index order).
        progress: called with the :class:`BatchStatus` whenever a job starts or finishes.

    Returns:
        the records, in job order.

    Raises:
        JobsFileError: a bad job (every problem, each with its job's index); nothing ran.
        UsageError: an unknown engine, ``address`` without the Ray engine, ``workers`` with ``address``, or the Ray
            engine without Ray installed.
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", hint="use --engine local or --engine ray")
    if address is not None and engine != "ray":
        raise UsageError("--address applies to --engine ray only", hint="add --engine ray, or drop --address")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers {workers!r}: expected a whole number >= 1")
    if workers is not None and address is not None:
        raise UsageError(
            "--workers sizes the Ray instance started here; a cluster (--address) runs as many jobs as it has CPUs",
            hint="drop --workers, or drop --address to start a local Ray instance",
        )
    if workers is not None and engine == "serial":
        raise UsageError("--workers does not apply to the serial engine (one job at a time)")
    from adapterhub_cli.batch.engines import import_ray, run_local, run_ray, run_serial  # multiprocessing
    from adapterhub_cli.parallel import cores

    checked = load_jobs(jobs)
    for job in checked:  # here too: what an engine reports of a job's failure is scrubbed in this process
        register_secret(job.kwargs.get("token"))
    if report is not None and isinstance(jobs, str | Path) and Path(report).resolve() == Path(jobs).resolve():
        raise UsageError(f"--report {report} is the JOBS file itself", hint="give another report path")
    if report is not None:
        _check_report_path(Path(report), checked)
    if engine == "ray":
        import_ray()  # before anything runs: a missing Ray is a usage error, not a failure of every job
    pool = workers or cores()
    writer = ReportWriter(report)
    tracker = _Tracker(len(checked), 1 if engine == "serial" else pool, writer, progress)
    try:
        if engine == "local":
            run_local(checked, workers=pool, resume=resume, tracker=tracker)
        elif engine == "ray":
            run_ray(checked, workers=workers, address=address, resume=resume, tracker=tracker)
        else:
            run_serial(checked, resume=resume, tracker=tracker)
    finally:
        writer.close()
    return sorted(tracker.records, key=lambda r: r.index)
