"""``--resume``: is a job's output already what the job would write?

An output is up to date when it exists, was written by this tool, and its provenance
(:mod:`adapterhub_cli.artifact.provenance`) records the job's operation, the job's parameters (with the API
function's defaults filled in, as the operation records them) and the sha256 of each input adapter's tensors as
they are now (for a merge, also the base's config and tensor-table digests). Outputs are written atomically, so an
output that exists is complete: a killed batch resumes where it stopped.

An earlier output that is not up to date (other parameters, a changed input) is replaced when the job runs again;
something this tool did not write is never replaced.
"""

from __future__ import annotations

import inspect as _pyinspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_cli import api
from adapterhub_cli.artifact.checkpoint import BaseView
from adapterhub_cli.artifact.files import is_earlier_output, sha256_file
from adapterhub_cli.artifact.provenance import Provenance, base_record, checkpoint_provenance
from adapterhub_cli.artifact.safetensors import read_header
from adapterhub_cli.batch.jobs import OPS, Job
from adapterhub_cli.errors import AdaptersError
from adapterhub_cli.ops.quantize import DEFAULT_BLOCK


#: The ops whose output records its provenance, and the keyword argument(s) naming their input adapters.
RESUMABLE = {
    "reduce": "source",
    "quantize": "source",
    "dequantize": "source",
    "convert": "source",
    "combine": "sources",
    "merge": "adapters",
    "unmerge": "adapters",
}
#: The keyword argument naming the checkpoint a merge / unmerge reads (recorded as its ``role: base`` input).
CHECKPOINT_KEY = {"merge": "base", "unmerge": "merged"}
#: Keyword arguments that are not parameters of the output: what is read and written, and how it is reached.
NOT_PARAMETERS = frozenset(
    {"source", "sources", "adapters", "merged", "out", "overwrite", "progress", "token", "api", "format", "force"}
)
#: Parameters whose None the operation records as a value: combine's and merge's weights, combine's seed.
NONE_MEANS: dict[str, Callable[[int], Any]] = {
    "weights": lambda n: [1.0] * n,
    "seed": lambda n: 0,
    "block_size": lambda n: DEFAULT_BLOCK,  # (quantize records the block size it used)
}


@dataclass(frozen=True)
class Decision:
    """What ``--resume`` does with a job: skip it (``up_to_date``), run it replacing its earlier output
    (``replace``), or run it as usual; ``reason`` says why, for the report."""

    up_to_date: bool
    replace: bool
    reason: str | None


RUN = Decision(False, False, None)


def recorded_provenance(out: str | Path) -> Provenance | None:
    """The provenance an output of this tool records: a ``.safetensors`` file's, a merged checkpoint's (its first
    shard's), or an adapter folder's (its first ``.safetensors`` file that records one); None if none does."""
    path = Path(out)
    try:
        if path.is_file():
            candidates = [path]
        else:
            doc = checkpoint_provenance(path)
            if doc is not None:
                return Provenance.from_metadata({"adapterhub.provenance": json.dumps(doc)}, source=str(path))
            candidates = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())
        for candidate in candidates:
            prov = Provenance.from_metadata(read_header(candidate).metadata, source=str(candidate))
            if prov.operation is not None:
                return prov
    except (OSError, AdaptersError):
        return None
    return None


def check(job: Job) -> Decision:
    """Whether ``job``'s output is up to date (see the module's docstring). Jobs that write no local output
    (validate, inspect, push, pull, ...) always run."""
    if job.op not in RESUMABLE or not isinstance(job.kwargs.get("out"), str | Path):
        return RUN
    out = job.kwargs["out"]
    if not os.path.lexists(out):
        return RUN
    if not is_earlier_output(out):
        return Decision(False, False, "the output exists and was not written by adapters: it is not replaced")
    prov = recorded_provenance(out)
    if prov is None:
        return Decision(False, True, "re-run: the earlier output records no provenance")
    if prov.operation != job.op:
        return Decision(False, True, f"re-run: the earlier output was made by {prov.operation}, not {job.op}")
    adapters = _input_adapters(job)
    changes = parameter_changes(job, prov.parameters, len(adapters))
    if changes:
        return Decision(False, True, "re-run: parameters changed: " + "; ".join(changes))
    try:
        changed = _input_changes(job, adapters, prov.inputs)
    except AdaptersError as e:  # an input that cannot be read now: the job says so when it runs
        return Decision(False, True, f"re-run: the inputs could not be checked ({e})")
    if changed:
        return Decision(False, True, "re-run: " + changed)
    return Decision(True, False, "up to date: the output records the same operation, parameters and inputs")


def _input_adapters(job: Job) -> list[Any]:
    value = job.kwargs.get(RESUMABLE[job.op])
    return list(value) if isinstance(value, list) else [value]


def _comparable(value: Any) -> Any:
    """JSON values as the provenance stores them (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def parameter_changes(job: Job, recorded: dict[str, Any], count: int) -> list[str]:
    """How the job's parameters differ from those an output records: ``"rank 16 -> 8"`` per difference.

    Compared: every recorded parameter, and every parameter the job sets to other than its default (an
    operation records what changes its output; one that it does not record counts as a change, to be safe).
    ``base`` is a parameter of ``convert`` only (elsewhere it maps kohya names, or is a merge's input)."""
    params = _pyinspect.signature(OPS[job.op]).parameters
    skip = NOT_PARAMETERS | ({"base", "merged"} if job.op != "convert" else set())
    effective = {name: job.kwargs.get(name, p.default) for name, p in params.items() if name not in skip}
    keys = set(recorded) | {k for k, v in effective.items() if v != params[k].default}
    changes = []
    for key in sorted(keys):
        want = effective.get(key)
        if want is None and key in NONE_MEANS:
            want = NONE_MEANS[key](count)
        have = recorded.get(key)
        if _comparable(want) != _comparable(have):
            changes.append(f"{key} {have!r} -> {want!r}")
    return changes


def _local_base(value: object) -> str | Path | None:
    """A merge's base as the names of kohya adapters are mapped through: a local path, else None."""
    return value if isinstance(value, str | Path) and "://" not in str(value) and Path(value).exists() else None


def _input_changes(job: Job, adapters: list[Any], recorded: list[dict[str, Any]]) -> str | None:
    """What differs between the inputs as they are now and as the output records them, or None."""
    token = job.kwargs.get("token")
    checkpoint = job.kwargs.get(CHECKPOINT_KEY.get(job.op, ""))
    recorded_bases = [r for r in recorded if r.get("role") == "base"]
    recorded_adapters = [r for r in recorded if r.get("role") != "base"]
    if checkpoint is not None:
        view = checkpoint if isinstance(checkpoint, BaseView) else api.open_base(checkpoint, token=token)
        now = base_record(view)
        if not recorded_bases or any(recorded_bases[0].get(k) != now[k] for k in ("config_sha256", "tensors_sha256")):
            return f"the checkpoint {checkpoint} is not the one the output records"
        names_base = _local_base(checkpoint)
    else:
        names_base = job.kwargs.get("base")
    if len(recorded_adapters) != len(adapters):
        return f"the output records {len(recorded_adapters)} input(s), the job reads {len(adapters)}"
    for source, record in zip(adapters, recorded_adapters, strict=True):
        options: dict[str, Any] = {"token": token, "base": names_base}
        if job.op == "convert" and job.kwargs.get("format") is not None:
            options["format"] = job.kwargs["format"]
        adapter = api.load(source, **options)
        digest = sha256_file(adapter.tensor_file) if adapter.tensor_file is not None else None
        remote = getattr(adapter.source, "remote", None)
        if digest is None and remote is not None:
            digest = getattr(remote, "sha256", None)
        if digest is None or digest != record.get("sha256"):
            return f"the input {source} changed (its tensors' sha256 is not the one the output records)"
    return None
