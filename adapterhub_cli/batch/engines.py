"""Where jobs run: a local process pool (the default), Ray tasks (a local instance or a cluster), or one at a time in
this process. Each engine hands every finished job's record to a :class:`Tracker` as it arrives, and runs a job
again, up to ``retries`` more times, when its failure is transient (a lost worker, a server's 5xx answer)."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Protocol

from adapterhub_cli.batch.jobs import Job
from adapterhub_cli.batch.report import JobRecord
from adapterhub_cli.batch.run import THREAD_ENV, run_job
from adapterhub_cli.errors import AdaptersError, UsageError, scrub
from adapterhub_cli.parallel import cores


#: How many more times a job whose failure is transient runs again.
RETRIES = 2
#: What ``--engine ray`` needs, in the words of the message that says so.
RAY_INSTALL = "pip install 'adapterhub-cli[ray]'"


class Tracker(Protocol):
    """What engines tell as they go: a job started (or started again), a job finished for good."""

    def started(self, job: Job, *, retry: JobRecord | None = None) -> None: ...

    def finished(self, record: JobRecord) -> None: ...

    def slots(self, count: int) -> None: ...


def _failed(job: Job, code: str, message: str, *, attempt: int, transient: bool, hint: str | None = None) -> JobRecord:
    return job.record(
        "failed", attempt, error_code=code, error_message=scrub(message), error_hint=hint, transient=transient
    )


# ------------------------------------------------------------------------------------------------ in this process


def run_serial(jobs: Iterable[Job], *, resume: bool, tracker: Tracker, retries: int = RETRIES) -> None:
    """One job after another in this process (no pool): the baseline the benchmark compares with, and a way to
    debug a job where a debugger can reach it."""
    for job in jobs:
        attempt = 1
        tracker.started(job)
        record = run_job(job, resume=resume, attempt=attempt)
        while record.transient and attempt <= retries:
            attempt += 1
            tracker.started(job, retry=record)
            record = run_job(job, resume=resume, attempt=attempt)
        tracker.finished(record)


# ------------------------------------------------------------------------------------------------ local pool


def _init_worker() -> None:
    """A pool process starts single-threaded (thread pools sized when torch is imported stay at one thread; each
    job then sets its own count) and imports torch before its first job, so a job's seconds are its own work."""
    for key in THREAD_ENV:
        os.environ[key] = "1"
    import torch

    torch.set_num_threads(1)


def run_local(jobs: Iterable[Job], *, workers: int, resume: bool, tracker: Tracker, retries: int = RETRIES) -> None:
    """Run jobs on ``workers`` processes (started with ``spawn``: no state inherited from this one).

    A job of ``threads`` N takes N of the ``workers`` slots, so the threads running at once stay within
    ``workers`` (a job asking for more than all of them runs alone). A process that dies (killed, out of memory)
    fails the jobs it was running as ``WorkerLost``, a transient failure: the pool is started again and they
    run again, up to ``retries`` more times.
    """
    queue = deque(jobs)
    attempts: dict[int, int] = {}
    retried: dict[int, JobRecord] = {}
    in_flight: dict[Future[JobRecord], Job] = {}
    cwd = str(Path.cwd())
    context = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker)

    def cost(job: Job) -> int:
        return min(job.threads, workers)

    def collect(future: Future[JobRecord], job: Job) -> bool:
        """Hand the job's record on (or queue it again); True when its process died."""
        lost = False
        try:
            record = future.result()
        except BrokenProcessPool:
            lost = True
            record = _failed(
                job,
                "WorkerLost",
                "the worker process running this job died (killed, out of memory, or crashed)",
                attempt=attempts[job.index],
                transient=True,
                hint="see the system log (dmesg) for an out-of-memory kill; fewer --workers use less memory",
            )
        except Exception as e:  # the job or its result could not be sent between processes
            record = _failed(job, type(e).__name__, str(e), attempt=attempts[job.index], transient=False)
        if record.transient and attempts[job.index] <= retries:
            queue.append(job)
            retried[job.index] = record
        else:
            tracker.finished(record)
        return lost

    pool = new_pool()
    try:
        while queue or in_flight:
            used = sum(cost(j) for j in in_flight.values())
            broken = False
            while queue and (not in_flight or used + cost(queue[0]) <= workers):
                job = queue[0]
                attempt = attempts.get(job.index, 0) + 1
                try:
                    future = pool.submit(run_job, job, resume=resume, cwd=cwd, attempt=attempt)
                except BrokenProcessPool:  # a worker died since the last wait: this job was not sent
                    broken = True
                    break
                queue.popleft()
                attempts[job.index] = attempt
                in_flight[future] = job
                tracker.started(job, retry=retried.pop(job.index, None))
                used += cost(job)
            if in_flight and not broken:
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in done:
                    broken |= collect(future, in_flight.pop(future))
            if broken:  # the pool is unusable: the jobs still in it fail the same way; then start a new one
                for future in wait(list(in_flight)).done:
                    collect(future, in_flight.pop(future))
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ Ray


class RayStartError(AdaptersError):
    """Ray could not be started or reached (a wrong ``--address``, a cluster down or of another version)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, scrubbed of secrets (an address may carry credentials)."""
    text = str(e).strip().splitlines()
    return scrub(text[0] if text else "")


def import_ray() -> Any:
    """The ``ray`` module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray, which is not installed", hint=RAY_INSTALL) from None
    return ray


def _ray_job(job: Job, resume: bool, cwd: str, attempt: int) -> JobRecord:
    """The Ray task: one job, on whichever worker Ray picks."""
    return run_job(job, resume=resume, cwd=cwd, attempt=attempt)


def run_ray(
    jobs: Iterable[Job],
    *,
    workers: int | None,
    address: str | None,
    resume: bool,
    tracker: Tracker,
    retries: int = RETRIES,
) -> None:
    """Run each job as a Ray task declaring its resources: ``num_cpus`` = its threads, ``num_gpus=1`` for a job
    whose ``device`` is ``cuda``. Records come back as tasks finish (``ray.wait``).

    Connects to the cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine; ``ray://host:10001``
    a remote one), or joins the Ray instance this process already started, or starts a local one with ``workers``
    CPUs (default: this machine's cores) and stops it at the end. Ray itself runs a task again when its worker or
    node is lost (``max_retries``); a job that fails transiently (a server's 5xx answer) is submitted again, both
    at most ``retries`` more times.
    """
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        import logging

        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address is not None:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers or cores(), include_dashboard=False, **options)
        except Exception as e:  # (Ray raises ConnectionError, RuntimeError, ValueError... by cause)
            where = f"the Ray cluster at {address}" if address is not None else "a local Ray instance"
            raise RayStartError(
                f"could not connect to {where}: {type(e).__name__}: {first_line(e)}; no job was run",
                hint=(
                    "check the address (auto: the `ray start` of this machine; ray://HOST:10001 a remote head) and "
                    "that the cluster runs the same Ray and Python versions"
                    if address is not None
                    else "start one with `ray start --head` and pass --address auto, or use --engine local"
                ),
            ) from None
        started_here = True
    try:
        tracker.slots(max(1, int(ray.cluster_resources().get("CPU", 1))))
        task = ray.remote(_ray_job)
        cwd = str(Path.cwd())
        attempts: dict[int, int] = {}
        pending: dict[Any, Job] = {}

        def submit(job: Job, retry: JobRecord | None = None) -> None:
            attempt = attempts[job.index] = attempts.get(job.index, 0) + 1
            resources: dict[str, Any] = {"num_cpus": job.threads, "max_retries": retries, "retry_exceptions": False}
            if job.device.startswith("cuda"):
                resources["num_gpus"] = 1
            pending[task.options(**resources).remote(job, resume, cwd, attempt)] = job
            tracker.started(job, retry=retry)

        for job in jobs:
            submit(job)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as e:  # the task was lost for good (Ray retried it), or could not run at all
                    cause = getattr(e, "cause", None) or e
                    record = _failed(
                        job, type(cause).__name__, str(cause), attempt=attempts[job.index], transient=False
                    )
                if record.transient and attempts[job.index] <= retries:
                    submit(job, retry=record)
                else:
                    tracker.finished(record)
    finally:
        if started_here:
            ray.shutdown()
