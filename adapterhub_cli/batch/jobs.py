"""The JOBS file: a YAML or JSON list of jobs, each ``{"op": <API function>, <its keyword arguments>...}``.

A job names an API function of :mod:`adapterhub_cli.api` (``op``) and passes it keyword arguments exactly as the
Python API names them (``source``, ``out``, ``rank``, ...; ``adapter`` is accepted for ``source``). Three more keys
belong to the batch itself: ``threads`` (torch threads for this job, default 1), ``timeout`` (seconds after which
the job is stopped and fails, default none) and ``for_each`` (a template: the
job is repeated once per item of a list, or per path a ``{"glob": PATTERN}`` matches, with ``{item}``, ``{name}``
and ``{index}`` in its string values replaced by the item, its short name and its position).

Every job is checked before anything runs: a known ``op``, known keyword arguments, the required ones present,
values of the right JSON type, distinct outputs, and no job reading another job's output (jobs are independent).
Every problem is reported together, each with its job's index (``jobs[3]``): :class:`JobsFileError`.
"""

from __future__ import annotations

import difflib
import glob
import inspect as _pyinspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_cli import api
from adapterhub_cli.artifact.checkpoint import is_plain_name
from adapterhub_cli.batch.report import JobRecord, Status
from adapterhub_cli.errors import AdapterNotFoundError, UsageError


#: The API functions a job may name (``op``). ``load`` and ``open_base`` return objects, not files: nothing to batch.
OPS: dict[str, Callable[..., Any]] = {
    name: getattr(api, name)
    for name in (
        "validate",
        "inspect",
        "diff",
        "analyze",
        "reduce",
        "combine",
        "quantize",
        "dequantize",
        "convert",
        "extract",
        "merge",
        "unmerge",
        "push",
        "pull",
        "versions",
    )
    if callable(getattr(api, name, None))
}

#: Keys of a job that belong to the batch, not to the API function.
BATCH_KEYS = ("op", "threads", "timeout", "for_each")
#: Keyword arguments a JOBS file cannot give: Python objects, not JSON values.
NOT_FROM_FILE = ("progress", "api")
#: Other spellings accepted for an argument: the issue's and the CLI's ``adapter`` for the API's ``source``.
ALIASES = {"adapter": "source"}
#: The keyword arguments that name what a job reads, and what it writes (``out``; analyze's ``plot``): the report's
#: inputs / output, and what the distinct-outputs check compares.
INPUT_KEYS = ("source", "sources", "adapters", "a", "b", "base", "tuned", "merged", "ref")
OUTPUT_KEYS = ("out", "plot")
#: The largest JOBS file read (a list of 100,000 jobs is far below it).
MAX_JOBS_BYTES = 64 * 1024 * 1024
_PLACEHOLDER = re.compile(r"\{(item|name|index)\}")


class JobsFileError(UsageError):
    """A JOBS file that cannot run: every problem found, each naming its job (``jobs[3]``). Nothing has run.

    Attributes:
        problems: one line per problem, each starting with the job's index.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(
            f"{source}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(shown) + more,
            hint="each job is an object with 'op' (an API function, e.g. merge or reduce) and that function's "
            "keyword arguments, as the Python API names them",
        )


@dataclass(frozen=True)
class Job:
    """One checked job: ``OPS[op](**kwargs)``, run with ``threads`` torch threads.

    Attributes:
        index: its position in the expanded list (the report's ``index``).
        entry: its position in the JOBS file (a ``for_each`` template gives several jobs the same entry).
        item: the ``for_each`` item it was expanded from, if any.
    """

    index: int
    entry: int
    op: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    item: str | None = None
    #: seconds after which the job is stopped and fails (None: no limit)
    timeout: float | None = None

    @property
    def label(self) -> str:
        """``jobs[3] (reduce)``, or ``jobs[3] item 'x' (reduce)`` for an expanded template: how messages name it."""
        return f"jobs[{self.entry}]" + (f" item {self.item!r}" if self.item is not None else "") + f" ({self.op})"

    @property
    def inputs(self) -> list[str]:
        """What the job reads, as given: adapters, bases, refs (for the report)."""
        found: list[str] = []
        for key in INPUT_KEYS:
            value = self.kwargs.get(key)
            if isinstance(value, list):
                found.extend(str(v) for v in value)
            elif value is not None:
                found.append(str(value))
        return found

    def record(self, status: Status, attempts: int, **outcome: Any) -> JobRecord:
        """The report's record of this job (its index, entry, op, inputs and output) with ``status``, the number of
        ``attempts`` and the ``outcome`` fields (:class:`~adapterhub_cli.batch.report.JobRecord`)."""
        return JobRecord(
            index=self.index,
            entry=self.entry,
            op=self.op,
            inputs=self.inputs,
            output=self.output,
            status=status,
            attempts=attempts,
            **outcome,
        )

    @property
    def output(self) -> str | None:
        """What the job writes: its ``out``, or ``repo_id@version`` for a push; None for a job that only reads."""
        if self.op == "push":
            return f"{self.kwargs.get('repo_id')}@{self.kwargs.get('version')}"
        value = next((self.kwargs[k] for k in OUTPUT_KEYS if self.kwargs.get(k) is not None), None)
        return str(value) if value is not None else None

    @property
    def device(self) -> str:
        """Where the job computes (``cpu``, ``cuda``, ``cuda:1``): a ``device`` argument, else ``cpu``."""
        return str(self.kwargs.get("device") or "cpu")


def read_jobs_file(path: str | Path) -> Any:
    """The parsed content of a JOBS file: JSON for ``.json``, else YAML (``yaml.safe_load``: no Python objects).

    Raises:
        AdapterNotFoundError: no such file.
        JobsFileError: too large, or not YAML / JSON.
    """
    path = Path(path)
    if not path.is_file():
        missing = AdapterNotFoundError(path, "JOBS file")
        missing.hint = "check the path; a YAML or JSON file listing the jobs is expected"
        raise missing
    size = path.stat().st_size
    if size > MAX_JOBS_BYTES:
        raise JobsFileError(str(path), [f"the file is {size} bytes; at most {MAX_JOBS_BYTES} are read"])
    text = path.read_bytes().decode("utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml  # type: ignore[import-untyped]

        return yaml.safe_load(text)
    except (ValueError, RecursionError) as e:
        raise JobsFileError(str(path), [f"not valid JSON: {e}"]) from None
    except Exception as e:  # yaml.YAMLError and its subclasses
        raise JobsFileError(str(path), [f"not valid YAML: {e}"]) from None


def load_jobs(jobs: str | Path | Sequence[Mapping[str, Any]], *, root: str | Path | None = None) -> list[Job]:
    """Read (a path) or take (a list of job objects) the jobs, expand ``for_each`` templates and check every job.

    Args:
        jobs: a JOBS file, or its content: a list of job objects (or ``{"jobs": [...]}``).
        root: where relative ``for_each`` globs are matched (default: the current folder).

    Raises:
        JobsFileError: every problem found, each with its job's index; nothing has run.
    """
    source = str(jobs) if isinstance(jobs, str | Path) else "jobs"
    doc = read_jobs_file(jobs) if isinstance(jobs, str | Path) else jobs
    if isinstance(doc, Mapping) and set(doc) == {"jobs"}:
        doc = doc["jobs"]
    if not isinstance(doc, list):
        raise JobsFileError(source, [f"expected a list of jobs (or {{jobs: [...]}}), got {_kind(doc)}"])
    problems: list[str] = []
    expanded: list[Job] = []
    for entry, raw in enumerate(doc):
        label = f"jobs[{entry}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{label}: expected an object with 'op', got {_kind(raw)}")
            continue
        items, item_problems = _items(raw.get("for_each"), label, root)
        problems.extend(item_problems)
        for position, item in enumerate(items):
            if item is not None and not is_plain_name(short_name(item)) and _uses_name(raw):
                problems.append(
                    f"{label} item {item!r}: its {{name}} {short_name(item)!r} is not a plain file name; "
                    "use {index} or list the items"
                )
                continue
            body = _substitute(raw, item, position) if item is not None else dict(raw)
            job, job_problems = _check(len(expanded), entry, body, item)
            problems.extend(job_problems)
            if job is not None:
                expanded.append(job)
    if not doc:
        problems.append("the file holds no jobs")
    problems.extend(_cross_check(expanded))
    if problems:
        raise JobsFileError(source, problems)
    return expanded


def _kind(value: object, expected: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """What a JSON / YAML value is, in a message's words (for a number where a whole one is ``expected``: why not)."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "nothing"}
    if type(value) in kinds:
        return kinds[type(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    if isinstance(value, float) and "whole number" in expected:
        return "a fraction" if not value.is_integer() else "a number written with a decimal point"
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _items(spec: object, label: str, root: str | Path | None) -> tuple[list[str | None], list[str]]:
    """The items a ``for_each`` names (``[None]`` without one: the job once), and problems."""
    if spec is None:
        return [None], []
    if isinstance(spec, list):
        bad = [v for v in spec if not isinstance(v, str | int | float) or isinstance(v, bool)]
        if bad:
            return [], [f"{label}: for_each items must be strings (adapter refs or paths), got {bad[0]!r}"]
        if not spec:
            return [], [f"{label}: for_each is an empty list"]
        return [str(v) for v in spec], []
    if isinstance(spec, Mapping) and set(spec) == {"glob"} and isinstance(spec["glob"], str):
        pattern = spec["glob"]
        base = Path(root) if root is not None else Path.cwd()
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        matches = sorted(glob.glob(full))  # noqa: PTH207 (absolute and relative patterns alike)
        if not matches:
            return [], [f"{label}: for_each glob {pattern!r} matches nothing (in {base})"]
        # keep the matches as relative as the pattern was
        return [m if Path(pattern).is_absolute() else os.path.relpath(m, base) for m in matches], []
    return [], [f"{label}: for_each must be a list of strings or {{glob: PATTERN}}, got {_kind(spec)}"]


def short_name(item: str) -> str:
    """``{name}`` of a ``for_each`` item: the last part of a path or ref, without revision or suffix.

    >>> short_name("hf://org/support-bot@v1.2.0"), short_name("adapters/a.safetensors"), short_name("out/b/")
    ('support-bot', 'a', 'b')
    """
    text = item.split("://", 1)[-1].split("@", 1)[0].rstrip("/")
    name = text.rsplit("/", 1)[-1]
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def _uses_name(raw: Mapping[str, Any]) -> bool:
    """Whether a template's string values (or lists of them) say ``{name}``: a path built from it must stay put."""
    values = [v for k, v in raw.items() if k != "for_each"]
    strings = [s for v in values for s in (v if isinstance(v, list) else [v]) if isinstance(s, str)]
    return any("{name}" in s for s in strings)


def _substitute(raw: Mapping[str, Any], item: str, position: int) -> dict[str, Any]:
    values = {"item": item, "name": short_name(item), "index": str(position)}

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return {k: sub(v) for k, v in raw.items() if k != "for_each"}


def _check(index: int, entry: int, raw: Mapping[str, Any], item: str | None) -> tuple[Job | None, list[str]]:
    label = f"jobs[{entry}]" + (f" item {item!r}" if item is not None else "")
    op = raw.get("op")
    if op is None:
        return None, [f"{label}: no 'op' (one of {', '.join(OPS)})"]
    if not isinstance(op, str) or op not in OPS:
        close = difflib.get_close_matches(str(op), OPS, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        return None, [f"{label}: unknown op {op!r}{guess}; known: {', '.join(OPS)}"]
    label = f"{label} ({op})"
    params = _pyinspect.signature(OPS[op]).parameters
    accepted = [p for p in params if p not in NOT_FROM_FILE]
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in BATCH_KEYS:
            continue
        name = ALIASES.get(key, key) if key not in params else key
        if name in kwargs:
            problems.append(f"{label}: {key!r} given twice (as {key!r} and as {name!r})")
        elif name not in params or name in NOT_FROM_FILE:
            close = difflib.get_close_matches(key, accepted, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            why = " (a Python object, not a JOBS file value)" if name in NOT_FROM_FILE else ""
            problems.append(f"{label}: unknown argument {key!r}{why}{guess}; {op} takes: {', '.join(accepted)}")
        else:
            expected = _json_types(str(params[name].annotation))
            if expected and not _fits(value, expected):
                shown = "(not shown)" if name == "token" else repr(value)
                problems.append(
                    f"{label}: {key} = {shown} is {_kind(value, expected)}; expected {' or '.join(sorted(expected))}"
                    + (" (quote it in YAML)" if "string" in expected and isinstance(value, int | float) else "")
                )
            kwargs[name] = value
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in kwargs]
    if missing:
        problems.append(f"{label}: missing required argument(s): {', '.join(missing)}")
    threads = raw.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        problems.append(f"{label}: threads = {threads!r}; expected a whole number >= 1")
        threads = 1
    timeout = raw.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf")
    ):
        problems.append(f"{label}: timeout = {timeout!r}; expected a number of seconds > 0")
    if problems:
        return None, problems
    limit = float(timeout) if timeout is not None else None
    return Job(index=index, entry=entry, op=op, kwargs=kwargs, threads=threads, item=item, timeout=limit), []


#: annotation words -> the JSON types that may give them (a word not listed accepts anything)
_TYPE_WORDS = {
    "str": "string",
    "Path": "string",
    "AdapterLike": "string",
    "BaseLike": "string",
    "AdapterRef": "string",
    "int": "whole number",
    "float": "number",
    "bool": "true/false",
    "None": "null",
    "list": "list",
    "Sequence": "list",
}


def _json_types(annotation: str) -> set[str]:
    """The JSON types an annotation (as written: ``str | Path | None``, ``list[float] | None``) accepts; empty
    when it names something this check does not know (then anything passes here, and the function decides)."""
    accepted: set[str] = set()
    for part in annotation.split("|"):
        word = part.strip().split("[", 1)[0]
        if word not in _TYPE_WORDS:
            return set()
        accepted.add(_TYPE_WORDS[word])
    return accepted


def _fits(value: object, expected: set[str]) -> bool:
    if value is None:
        return "null" in expected
    if isinstance(value, bool):
        return "true/false" in expected
    if isinstance(value, int):  # (a whole number is a number too)
        return "whole number" in expected or "number" in expected
    if isinstance(value, float):  # finite only: NaN and infinities are no argument's value
        return "number" in expected and math.isfinite(value)
    if isinstance(value, str):
        return "string" in expected
    if isinstance(value, list):
        return "list" in expected
    return False


def _local_key(value: str) -> str | None:
    """The normalised absolute path a value names, for comparing jobs' outputs and inputs; None for a URL-like ref
    (``hf://...``, ``file://...``). A bare ``org/name`` is compared as a path: as an input it names the folder
    another job writes, once written, so it is refused either way."""
    if "://" in value:
        return None
    return os.path.normpath(Path(value.split("@", 1)[0]).absolute())


def _cross_check(jobs: list[Job]) -> list[str]:
    """Distinct outputs, and no job reading another's output: jobs run in any order, side by side."""
    problems: list[str] = []
    writers: dict[str, Job] = {}
    for job in jobs:
        for name in OUTPUT_KEYS if job.op != "push" else ():
            out = job.kwargs.get(name)
            key = _local_key(out) if isinstance(out, str) else None
            if key is None:
                continue
            if key in writers:
                problems.append(
                    f"{job.label}: writes {out}, as {writers[key].label} does; give each job its own {name}"
                )
            else:
                writers[key] = job
    for job in jobs:
        for value in job.inputs:
            key = _local_key(value)
            writer = writers.get(key) if key is not None else None
            if writer is not None and writer is not job:
                problems.append(
                    f"{job.label}: reads {value}, which {writer.label} writes; jobs in one batch are independent "
                    f"(they run in any order): run them as two batches"
                )
    return problems
