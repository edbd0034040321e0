"""Fleets of adapters: run many API calls (validate, reduce, quantize, convert, merge, ...) as one batch, on a local
process pool or as Ray tasks, with a JSON Lines report and ``resume``.

    import adapterhub_cli as ah
    records = ah.batch("jobs.yaml", engine="local")      # or engine="ray", address="auto"
    failed = [r for r in records if r.status == "failed"]

This layer sits above :mod:`adapterhub_cli.api`: a job is an API function's name and its keyword arguments.
Importing it imports neither torch nor Ray.
"""

from adapterhub_cli.batch.jobs import OPS, Job, JobsFileError, load_jobs
from adapterhub_cli.batch.report import BatchStatus, JobRecord, output_digest, read_report
from adapterhub_cli.batch.runner import ENGINES, batch, default_report


__all__ = [
    "ENGINES",
    "OPS",
    "BatchStatus",
    "Job",
    "JobRecord",
    "JobsFileError",
    "batch",
    "default_report",
    "load_jobs",
    "output_digest",
    "read_report",
]
