"""Running one job where it lands (a pool process, a Ray worker, or the caller's own process): the API call with
its own torch thread count, the ``--resume`` check first, and every outcome turned into a :class:`JobRecord`."""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from adapterhub_cli.artifact.validate import ValidationReport
from adapterhub_cli.batch.jobs import OPS, Job
from adapterhub_cli.batch.report import JobRecord, output_digest
from adapterhub_cli.errors import AdaptersError, IncompatibleBaseError, StoreError, register_secret, scrub


#: Environment variables that size thread pools inside a job (torch's own is set with ``torch.set_num_threads``):
#: OpenMP's and MKL's (for libraries that read them late), merge's, and ``ADAPTERS_THREADS`` for module-parallel maps.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ADAPTERS_MERGE_THREADS", "ADAPTERS_THREADS")


def is_transient(error: BaseException) -> bool:
    """Whether a failure may pass on a retry: a server's 5xx or 429 answer (after the store's own retries)."""
    status = getattr(error, "status", None)
    return isinstance(error, StoreError) and isinstance(status, int) and (status >= 500 or status == 429)


@contextlib.contextmanager
def job_threads(threads: int) -> Iterator[None]:
    """Run the body with ``threads`` torch threads (and thread-pool variables), restoring the caller's after."""
    saved_env = {k: os.environ.get(k) for k in THREAD_ENV}
    for k in THREAD_ENV:
        os.environ[k] = str(threads)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class JobTimeoutError(AdaptersError):
    """A job ran past its ``timeout`` and was stopped."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[bool]:
    """Raise :class:`JobTimeoutError` in the body once ``seconds`` have passed (an interval timer and SIGALRM: the
    body stops at its next Python step, after the native call it is in returns; outputs are atomic, so nothing
    partial stays). Yields whether the limit is enforced: only in a process's main thread, where signals arrive
    (a pool process and a Ray worker run jobs there; a job run from another thread has no limit)."""
    import signal
    import threading

    if seconds is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield seconds is None
        return

    def stop(signum: int, frame: object) -> None:
        raise JobTimeoutError(
            f"stopped after its timeout of {seconds:g} s",
            hint="raise the job's timeout, or check what it waits for (a slow download, a stalled store)",
        )

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_job(job: Job, *, resume: bool = False, cwd: str | None = None, attempt: int = 1) -> JobRecord:
    """Run ``job`` here and report how it went; never raises for the job's own failure (it is in the record).

    Args:
        resume: skip the job when its output is up to date (:func:`adapterhub_cli.batch.resume.check`), and
            replace an earlier output of this tool that is not.
        cwd: the folder relative paths in the job are read from, when it exists here (a Ray worker on another
            machine may not have it: then its own current folder).
        attempt: which try this is (recorded).
    """
    from adapterhub_cli.batch.resume import check

    register_secret(job.kwargs.get("token"))  # in this process too, before anything can quote it
    if cwd is not None and Path(cwd).is_dir() and str(Path.cwd()) != cwd:
        os.chdir(cwd)
    record = job.record("ok", attempt)
    started = time.perf_counter()
    kwargs = dict(job.kwargs)
    try:
        with job_threads(job.threads), time_limit(job.timeout) as limited:
            if not limited:
                record.note = f"timeout {job.timeout:g} s not enforced: the job ran outside a main thread"
            if resume:
                decision = check(job)
                if decision.reason:  # (after a timeout note, if any)
                    record.note = "; ".join(filter(None, [record.note, scrub(decision.reason)]))
                if decision.up_to_date:
                    record.status = "skipped"
                    record.output_sha256 = output_digest(job.kwargs["out"])
                    return record
                if decision.replace:
                    kwargs["overwrite"] = True
            result = OPS[job.op](**kwargs)
            record.summary = summarize(result)
            if isinstance(result, ValidationReport) and not result.ok:
                raise IncompatibleBaseError(
                    f"{len(result.errors)} error finding(s): "
                    + "; ".join(f"{f.code}: {f.message}" for f in result.errors[:5]),
                    findings=result.findings,
                    hint="run `adapters validate` on it for every finding",
                )
            out = kwargs.get("out")
            if isinstance(out, str | Path) and job.op != "push":
                record.output_sha256 = output_digest(out)
    except Exception as e:
        record.status = "failed"
        record.error_code = type(e).__name__
        record.error_message = scrub(str(e)) or type(e).__name__
        hint = getattr(e, "hint", None)
        record.error_hint = scrub(str(hint)) if hint else None
        if not isinstance(e, AdaptersError) and os.environ.get("ADAPTERS_DEBUG"):
            record.error_message += "\n" + scrub(traceback.format_exc())
        record.transient = is_transient(e)
    finally:
        record.seconds = round(time.perf_counter() - started, 6)
    return record


def summarize(result: object) -> dict[str, Any]:
    """A short, JSON-safe account of what an API function returned: its scalar fields (numbers, strings, paths)
    and warnings; a validation's verdict and counts; a path itself."""
    if isinstance(result, ValidationReport):
        return {"ok": result.ok, "errors": len(result.errors), "warnings": len(result.warnings)}
    if isinstance(result, Path):
        return {"path": str(result)}
    if isinstance(result, list):
        return {"count": len(result)}
    if not is_dataclass(result) or isinstance(result, type):
        return {}
    summary: dict[str, Any] = {}
    for f in fields(result):
        value = getattr(result, f.name, None)
        if isinstance(value, float):
            summary[f.name] = value if math.isfinite(value) else None
        elif isinstance(value, str):  # a server's text (a push's url) too: no token in the report
            summary[f.name] = scrub(value)
        elif isinstance(value, bool | int) or value is None:
            summary[f.name] = value
        elif isinstance(value, Path):
            summary[f.name] = str(value)
        elif f.name == "warnings" and isinstance(value, list):
            summary[f.name] = [scrub(str(w)) for w in value]
    return summary
