"""`adapters batch`: run a JOBS file of API calls on a local process pool or on Ray."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from adapterhub_cli.cli._output import live_display_wanted, out
from adapterhub_cli.cli._params import complete_paths, json_option


if TYPE_CHECKING:
    from adapterhub_cli.batch import BatchStatus


def _status_table(status: BatchStatus, elapsed: float) -> Any:
    """One row: done / running / queued / failed / skipped / retries, jobs per second and the time so far."""
    t = out.table(None, "done", "running", "queued", "failed", "skipped", "retries", "jobs/s", "elapsed")
    queued = max(0, status.total - status.done - status.running)
    t.add_row(
        f"{status.done}/{status.total}",
        str(status.running),
        str(queued),
        str(status.failed),
        str(status.skipped),
        str(status.retries),
        f"{status.done / elapsed if elapsed > 0 else 0.0:.2f}",  # (recomputed at every redraw, as time passes)
        f"{elapsed:.0f} s",
    )
    return t


@contextlib.contextmanager
def _live_progress() -> Iterator[Callable[[BatchStatus], None] | None]:
    """A live table on stderr (done / running / failed, throughput), shown only when stdout and stderr are both
    terminals (:func:`live_display_wanted`); yields the ``progress`` callback for :func:`adapterhub_cli.batch`."""
    if not live_display_wanted():
        yield None
        return
    from rich.live import Live

    latest: list[BatchStatus] = []
    started = time.perf_counter()

    def render() -> Any:
        return _status_table(latest[-1], time.perf_counter() - started) if latest else ""

    with Live(console=out.err_console, transient=True, refresh_per_second=2, get_renderable=render):

        def update(status: BatchStatus) -> None:
            latest[:] = [status]

        yield update


@click.command("batch")
@click.argument("jobs_file", metavar="JOBS", shell_complete=complete_paths)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: a process pool on this machine; ray: Ray tasks (needs pip install 'adapterhub-cli[ray]').",
)
@click.option(
    "--address",
    metavar="ADDR",
    default=None,
    help="The Ray cluster to join: auto (the one `ray start` runs here) or ray://HEAD:10001. Without it a local "
    "Ray instance is started.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Processes of the local pool, or CPUs of a local Ray instance [default: this machine's cores]. Each job "
    "runs single-threaded unless it sets threads: N.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip jobs whose output exists and records the same operation, parameters and input sha256; an earlier "
    "output that does not is replaced.",
)
@click.option(
    "--report",
    "report_path",
    metavar="PATH",
    default=None,
    help="The JSON Lines report, one line per job [default: JOBS-stem.report.jsonl beside JOBS].",
)
@json_option
def batch_cmd(
    jobs_file: str,
    engine: str,
    address: str | None,
    workers: int | None,
    resume: bool,
    report_path: str | None,
    as_json: bool,
) -> None:
    """Run the jobs of a JOBS file (YAML or JSON) on a local process pool or on Ray.

    JOBS is a list of {op: <API function>, <its keyword arguments>}, for example
    {op: reduce, source: org/a@v1, out: out/a-r16, rank: 16}; a job with for_each: [items] or {glob: PATTERN}
    repeats over them with {item} and {name} filled in; threads: N gives a job N torch threads, timeout: S stops it
    after S seconds. Every job is checked first (exit 2, naming each bad job's index); jobs then run independently.
    Exit 0 when all succeed, 1 when some failed."""
    from adapterhub_cli.batch import batch, default_report

    report = report_path or str(default_report(jobs_file))
    with _live_progress() as progress:
        records = batch(
            jobs_file,
            engine=engine,
            workers=workers,
            address=address,
            resume=resume,
            report=report,
            progress=progress,
        )
    ok = sum(r.status == "ok" for r in records)
    skipped = sum(r.status == "skipped" for r in records)
    failed = [r for r in records if r.status == "failed"]
    seconds = sum(r.seconds for r in records)
    if as_json:
        out.json(
            {
                "total": len(records),
                "ok": ok,
                "skipped": skipped,
                "failed": len(failed),
                "engine": engine,
                "report": report,
                "job_seconds": seconds,
                "failed_jobs": [r.to_json() for r in failed],
            }
        )
    else:
        if failed:
            t = out.table("failed jobs", "index", "op", "output", "error", wrap=("error",))
            for r in failed:
                error = f"{r.error_code}: {r.error_message}" + (f" (hint: {r.error_hint})" if r.error_hint else "")
                t.add_row(str(r.index), r.op, r.output or ", ".join(r.inputs), error)
            out.print(t)
        out.print(
            f"{len(records)} job(s): {ok} ok, {skipped} skipped, {len(failed)} failed ({seconds:.1f} s of job time); "
            f"report: {report}"
        )
    if failed:
        raise click.exceptions.Exit(1)
