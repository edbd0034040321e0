"""`adapters batch` / `ah.batch`: a JOBS file checked before anything runs, jobs on a local process pool and on a
local Ray instance (byte-identical outputs), failures recorded per job, transient ones retried, `--resume`."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from safetensors.torch import load_file, save_file

import adapterhub_cli as ah
from adapterhub_cli.batch import OPS, load_jobs, output_digest, read_report
from adapterhub_cli.batch.resume import recorded_provenance
from adapterhub_cli.errors import REDACTED, HubError


def manifest(lora: Path, rslora: Path, patterns: Path, base: Path, out: Path) -> list[dict]:
    """reduce over three adapters (a for_each template), quantize, validate, and a reduce that must fail (rank 16
    is not below the adapter's rank 8)."""
    return [
        {
            "op": "reduce",
            "for_each": [str(lora), str(rslora), str(patterns)],
            "source": "{item}",
            "out": f"{out}/{{name}}-r2",
            "rank": 2,
        },
        {"op": "quantize", "adapter": str(lora), "out": f"{out}/lora-int8", "scheme": "int8", "block_size": 32},
        {"op": "validate", "source": str(rslora), "base": str(base)},
        {"op": "reduce", "source": str(lora), "out": f"{out}/too-high", "rank": 16},
    ]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, llama_lora, llama_rslora, llama_patterns, llama_base):
    """The manifest run once by `adapters batch --workers 2` (a local pool of two processes)."""
    root = tmp_path_factory.mktemp("batch_local")
    jobs = root / "jobs.json"
    jobs.write_text(json.dumps(manifest(llama_lora, llama_rslora, llama_patterns, llama_base, root / "out")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_CACHE", str(root / "cache"))
        mp.setenv("TERM", "dumb")
        result = run_cli("batch", jobs, "--workers", 2, "--json")
    return root, jobs, result


def test_local_pool_runs_every_job_and_records_the_failure(local_run, llama_lora, llama_rslora, tmp_path):
    root, _, result = local_run
    assert result.exit_code == 1, result.output  # one job failed, the others ran
    summary = json.loads(result.output)
    assert (summary["total"], summary["ok"], summary["failed"], summary["skipped"]) == (6, 5, 1, 0)
    records = read_report(root / "jobs.report.jsonl")  # the default report: beside JOBS
    assert [r["index"] for r in records] == list(range(6))
    assert [r["entry"] for r in records] == [0, 0, 0, 1, 2, 3]
    assert [r["status"] for r in records] == ["ok"] * 5 + ["failed"]
    bad = records[5]
    assert bad["error_code"] == "UsageError" and "--rank 16" in bad["error_message"] and bad["output_sha256"] is None
    assert not (root / "out" / "too-high").exists()
    assert summary["failed_jobs"][0]["index"] == 5
    assert records[4]["summary"] == {"ok": True, "errors": 0, "warnings": 0}
    assert records[1]["inputs"] == [str(llama_rslora)] and records[1]["output"] == f"{root}/out/llama_rslora-r2"
    # each output is what the API writes for the same call: byte for byte
    direct = ah.reduce(llama_lora, tmp_path / "direct-r2", rank=2)
    assert records[0]["output_sha256"] == output_digest(direct.path)
    assert records[0]["summary"]["r"] == 2 == direct.r
    ah.quantize(llama_lora, tmp_path / "direct-int8", scheme="int8", block_size=32)
    assert records[3]["output_sha256"] == output_digest(tmp_path / "direct-int8")
    recorded = recorded_provenance(root / "out" / "lora-int8")
    assert recorded is not None and recorded.operation == "quantize"
    assert recorded.parameters == {"scheme": "int8", "block_size": 32}


def test_bad_jobs_file_is_refused_before_anything_runs(tmp_path, llama_lora):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        f"""
- op: reduce
  source: {llama_lora}
  out: {tmp_path}/fine
  rank: 2
- op: reduse
  source: {llama_lora}
- op: reduce
  source: {llama_lora}
  out: {tmp_path}/x
  rnk: 2
- op: quantize
  source: {llama_lora}
  out: {tmp_path}/q
- op: push
  source: {llama_lora}
  repo_id: org/name
  version: 1.2
- op: reduce
  source: {llama_lora}
  out: {tmp_path}/fine
  rank: 4
- op: validate
  for_each: {{glob: "{tmp_path}/nothing-*"}}
  source: "{{item}}"
  base: b
- op: validate
  source: {tmp_path}/fine
  base: b
- op: inspect
  source: {llama_lora}
  threads: 0
- op: inspect
  source: {llama_lora}
  timeout: 0
- op: inspect
  source: {llama_lora}
  timeout: soon
"""
    )
    result = run_cli("batch", jobs)
    assert result.exit_code == 2, result.output
    text = result.output
    assert "10 problem(s), nothing was run" in text
    assert "jobs[9] (inspect): timeout = 0; expected a number of seconds > 0" in text
    assert "jobs[10] (inspect): timeout = 'soon'; expected a number of seconds > 0" in text
    assert "jobs[1]: unknown op 'reduse' (did you mean 'reduce'?)" in text
    assert text.count("dequantize") == 1  # the known ops are listed once (in that line), not again in the hint
    assert "jobs[2] (reduce): unknown argument 'rnk' (did you mean 'rank'?)" in text
    assert "jobs[3] (quantize): missing required argument(s): scheme" in text
    assert "jobs[4] (push): version = 1.2 is a number; expected string (quote it in YAML)" in text
    assert f"jobs[5] (reduce): writes {tmp_path}/fine, as jobs[0] (reduce) does" in text
    assert "jobs[6]: for_each glob" in text and "matches nothing" in text
    assert f"jobs[7] (validate): reads {tmp_path}/fine, which jobs[0] (reduce) writes" in text
    assert "jobs[8] (inspect): threads = 0; expected a whole number >= 1" in text
    assert not (tmp_path / "fine").exists() and not (tmp_path / "jobs.report.jsonl").exists()

    jobs.write_text("op: reduce\n")  # not a list
    result = run_cli("batch", jobs)
    assert result.exit_code == 2 and "expected a list of jobs" in result.output
    jobs.write_text("- op: [unclosed\n")
    result = run_cli("batch", jobs)
    assert result.exit_code == 2 and "not valid YAML" in result.output
    result = run_cli("batch", tmp_path / "missing.yaml")
    assert result.exit_code == 2 and "JOBS file not found" in result.output
    assert "a YAML or JSON file listing the jobs is expected" in result.output


def test_for_each_expands_over_a_list_and_a_glob(tmp_path, monkeypatch):
    for name in ("b", "a", "c.txt"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    jobs = load_jobs(
        [
            {"op": "inspect", "source": "x"},
            {
                "op": "reduce",
                "for_each": {"glob": "adapters/[ab]"},
                "source": "{item}",
                "out": "out/{name}-{index}",
                "energy": 0.9,
            },
            {
                "op": "quantize",
                "for_each": ["hf://org/support-bot@v1.2.0", "file:///srv/r/org/b@^1.0"],
                "adapter": "{item}",
                "out": "q/{name}",
                "scheme": "int8",
                "threads": 2,
            },
        ]
    )
    assert [(j.index, j.entry, j.op, j.item) for j in jobs] == [
        (0, 0, "inspect", None),
        (1, 1, "reduce", "adapters/a"),
        (2, 1, "reduce", "adapters/b"),
        (3, 2, "quantize", "hf://org/support-bot@v1.2.0"),
        (4, 2, "quantize", "file:///srv/r/org/b@^1.0"),
    ]
    assert jobs[1].kwargs == {"source": "adapters/a", "out": "out/a-0", "energy": 0.9}
    assert jobs[2].kwargs["out"] == "out/b-1"
    assert jobs[3].kwargs == {"source": "hf://org/support-bot@v1.2.0", "out": "q/support-bot", "scheme": "int8"}
    assert jobs[4].kwargs["out"] == "q/b" and jobs[4].threads == 2 and jobs[0].threads == 1
    assert jobs[3].label == "jobs[2] item 'hf://org/support-bot@v1.2.0' (quantize)"


def test_for_each_name_that_is_not_a_plain_name_is_refused():
    """{name} builds paths: an item whose last part is '..' (or empty) cannot send an output up a folder."""
    with pytest.raises(ah.JobsFileError) as e:
        load_jobs([{"op": "reduce", "for_each": ["a/..", "b"], "source": "{item}", "out": "o/{name}/r", "rank": 2}])
    assert "jobs[0] item 'a/..': its {name} '..' is not a plain file name" in str(e.value)
    jobs = load_jobs([{"op": "reduce", "for_each": ["a/..", "b"], "source": "{item}", "out": "o/{index}", "rank": 2}])
    assert [j.kwargs["out"] for j in jobs] == ["o/0", "o/1"]


def test_two_analyze_jobs_writing_one_plot_are_refused():
    with pytest.raises(ah.JobsFileError) as e:
        load_jobs([{"op": "analyze", "for_each": ["a", "b"], "source": "{item}", "base": "m", "plot": "p.png"}])
    assert "jobs[0] item 'b' (analyze): writes p.png, as jobs[0] item 'a' (analyze) does" in str(e.value)
    (job,) = load_jobs([{"op": "analyze", "source": "a", "base": "m", "plot": "p.png"}])
    assert job.output == "p.png"


def test_every_op_checks_against_the_api_signature():
    """The names a job may use are the API function's keyword arguments (progress and api excepted)."""
    for op, fn in OPS.items():
        params = inspect.signature(fn).parameters
        required = {
            n: ["a", "b"] if str(p.annotation).startswith(("list", "Sequence")) else "x"
            for n, p in params.items()
            if p.default is p.empty
        }
        jobs = load_jobs([{"op": op, **required}])
        assert jobs[0].kwargs == required
    with pytest.raises(ah.JobsFileError) as e:
        load_jobs([{"op": "reduce", "source": "a", "out": "b", "progress": "x"}])
    assert "unknown argument 'progress' (a Python object, not a JOBS file value)" in str(e.value)


def test_resume_skips_up_to_date_outputs_and_reruns_changed_ones(
    tmp_path, llama_lora, llama_rslora, llama_base, copy_adapter
):
    lora = copy_adapter(llama_lora)
    out = tmp_path / "out"
    jobs = [
        {"op": "reduce", "source": str(lora), "out": f"{out}/a", "rank": 4},
        {"op": "reduce", "source": str(llama_rslora), "out": f"{out}/b", "energy": 0.9},
        {"op": "quantize", "source": str(llama_rslora), "out": f"{out}/c", "scheme": "int8"},
        {"op": "combine", "sources": [str(lora), str(llama_rslora)], "out": f"{out}/d", "method": "cat"},
        {"op": "validate", "source": str(lora), "base": str(llama_base)},  # no output: always runs
    ]
    first = ah.batch(jobs, engine="serial")
    assert [r.status for r in first] == ["ok"] * 5
    digests = {r.index: r.output_sha256 for r in first}

    again = ah.batch(jobs, engine="serial", resume=True, report=tmp_path / "r.jsonl")
    assert [r.status for r in again] == ["skipped"] * 4 + ["ok"]
    assert all("up to date" in (r.note or "") for r in again[:4])
    assert {r.index: r.output_sha256 for r in again} == digests
    assert [r["status"] for r in read_report(tmp_path / "r.jsonl")] == ["skipped"] * 4 + ["ok"]

    jobs[0]["rank"] = 2  # a changed parameter: that job runs again, replacing its earlier output
    jobs[2]["block_size"] = 32
    changed = ah.batch(jobs, engine="serial", resume=True)
    assert [r.status for r in changed[:4]] == ["ok", "skipped", "ok", "skipped"]
    assert changed[0].note == "re-run: parameters changed: rank 4 -> 2"
    assert changed[2].note == "re-run: parameters changed: block_size 64 -> 32"
    assert ah.load(out / "a").config.r == 2
    assert changed[0].output_sha256 == output_digest(ah.reduce(lora, tmp_path / "direct", rank=2).path)

    # a changed input: the jobs reading it run again, the others stay
    tensors = lora / "adapter_model.safetensors"
    state = load_file(tensors)
    save_file({k: v * 2 for k, v in state.items()}, tensors, metadata={"format": "pt"})
    rerun = ah.batch(jobs, engine="serial", resume=True)
    assert [r.status for r in rerun[:4]] == ["ok", "skipped", "skipped", "ok"]
    assert rerun[0].note is not None and f"the input {lora} changed" in rerun[0].note
    assert rerun[3].note is not None and "changed" in rerun[3].note


def test_a_killed_batch_resumes_cleanly(tmp_path, llama_lora, llama_rslora):
    """A job killed mid-write leaves only its temporary folder (outputs appear whole or not at all): --resume
    skips the finished jobs, runs the killed one, and the leftover is swept."""
    import subprocess

    out = tmp_path / "out"
    jobs = [
        {"op": "reduce", "source": str(llama_lora), "out": f"{out}/a", "rank": 2},
        {"op": "reduce", "source": str(llama_rslora), "out": f"{out}/b", "rank": 2},
    ]
    first = ah.batch(jobs, engine="serial")
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that is no longer running: the killed writer's
    shutil.rmtree(out / "b")
    leftover = out / f".b.{dead.pid}.0123abcd.incomplete"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half a file")
    resumed = ah.batch(jobs, engine="serial", resume=True)
    assert [r.status for r in resumed] == ["skipped", "ok"]
    assert [r.output_sha256 for r in resumed] == [r.output_sha256 for r in first]
    assert not leftover.exists()


def test_resume_never_replaces_what_it_did_not_write(tmp_path, llama_lora):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    [record] = ah.batch(
        [{"op": "reduce", "source": str(llama_lora), "out": str(tmp_path / "mine"), "rank": 2}],
        engine="serial",
        resume=True,
    )
    assert record.status == "failed" and record.error_code == "OutputExistsError"
    assert record.note == "the output exists and was not written by adapters: it is not replaced"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_transient_failures_are_retried_a_bounded_number_of_times(monkeypatch):
    calls: list[str] = []

    def flaky(source: str, *, fails: int = 0) -> Path:
        calls.append(source)
        if calls.count(source) <= fails:
            raise HubError("the Hub answered 503", status=503)
        return Path(source)

    def broken(source: str) -> Path:
        calls.append(source)
        raise HubError("the Hub answered 404", status=404)

    monkeypatch.setitem(OPS, "flaky", flaky)
    monkeypatch.setitem(OPS, "broken", broken)
    records = ah.batch(
        [
            {"op": "flaky", "source": "once", "fails": 1},
            {"op": "flaky", "source": "always", "fails": 99},
            {"op": "broken", "source": "gone"},
        ],
        engine="serial",
    )
    assert [(r.status, r.attempts) for r in records] == [("ok", 2), ("failed", 3), ("failed", 1)]
    assert records[1].error_code == "HubError" and records[1].error_message == "the Hub answered 503"
    assert calls.count("always") == 3 and calls.count("gone") == 1


@dataclasses.dataclass
class _Url:
    url: str


def test_a_jobs_token_never_reaches_the_report(monkeypatch, tmp_path):
    secret = "tok-batch-" + "x7" * 12

    def leaky(source: str, *, token: str | None = None) -> Path:
        raise ValueError(f"could not open {source} with {token}")

    monkeypatch.setitem(OPS, "leaky", leaky)
    report = tmp_path / "r.jsonl"
    records = ah.batch(
        [{"op": "leaky", "source": "a", "token": secret}, {"op": "leaky", "source": f"hf://u:{secret}@h/o/n"}],
        engine="serial",
        report=report,
    )
    assert records[0].status == "failed" and records[0].error_message.startswith("could not open a with ")
    assert secret not in report.read_text() and secret not in json.dumps(records[0].to_json())
    assert read_report(report)[1]["inputs"] == [f"hf://u:{REDACTED}@h/o/n"]
    monkeypatch.setitem(OPS, "url", lambda source, *, token=None: _Url(f"u/{token}"))
    (record,) = ah.batch([{"op": "url", "source": "a", "token": secret}], engine="serial")
    assert record.summary == {"url": "u/" + REDACTED}
    with pytest.raises(ah.JobsFileError) as e:
        load_jobs([{"op": "pull", "ref": "x", "out": "y", "token": 12345678901234567}])
    assert "12345678901234567" not in str(e.value) and "token = (not shown)" in str(e.value)


def _dies_on_its_first_attempt(job, *, resume, cwd, attempt):
    """Stands in for run_job in a pool process: the process dies the first time (as an out-of-memory kill would)."""
    import os

    from adapterhub_cli.batch import JobRecord

    if attempt == 1:
        os._exit(9)
    return JobRecord(job.index, job.entry, job.op, job.inputs, job.output, status="ok", attempts=attempt)


def test_a_lost_pool_process_is_replaced_and_its_job_run_again(monkeypatch, tmp_path):
    from adapterhub_cli.batch import engines

    monkeypatch.setattr(engines, "run_job", _dies_on_its_first_attempt)
    seen = []
    [record] = ah.batch(
        [{"op": "inspect", "source": str(tmp_path)}],
        engine="local",
        workers=1,
        progress=lambda s: seen.append(s.retries),
    )
    assert (record.status, record.attempts) == ("ok", 2)
    assert seen[-1] == 1


def _ok(job, *, resume, cwd, attempt):
    from adapterhub_cli.batch import JobRecord

    return JobRecord(job.index, job.entry, job.op, job.inputs, job.output, status="ok", attempts=attempt)


def test_a_pool_found_broken_when_a_job_is_sent_is_replaced_and_the_job_sent_again(monkeypatch, tmp_path):
    """A worker that dies between the wait and the next submit breaks the pool at submit time: the job not sent
    goes to a new pool (not counted as an attempt), the others are not lost."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from adapterhub_cli.batch import engines

    sent = []

    class BreaksOnce(ProcessPoolExecutor):
        broke = False

        def submit(self, fn, /, *args, **kwargs):
            if len(sent) == 1 and not BreaksOnce.broke:
                BreaksOnce.broke = True
                raise BrokenProcessPool("a child process terminated abruptly")
            sent.append(args[0].index)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(engines, "run_job", _ok)
    monkeypatch.setattr(engines, "ProcessPoolExecutor", BreaksOnce)
    records = ah.batch([{"op": "inspect", "source": str(tmp_path / n)} for n in "abc"], engine="local", workers=1)
    assert BreaksOnce.broke
    assert [(r.status, r.attempts) for r in records] == [("ok", 1)] * 3
    assert sorted(sent) == [0, 1, 2]


def test_a_ray_cluster_that_cannot_be_reached_is_one_clear_error(monkeypatch, tmp_path, llama_lora):
    """ray.init failing (no cluster at --address) is an error naming the address and what to check, exit 2, no
    traceback, no job run; credentials in the address never reach the message."""
    ray = pytest.importorskip("ray")

    def refuse(*args, **kwargs):
        raise ConnectionError(f"Could not find any running Ray instance at {kwargs.get('address')}.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"op": "inspect", "source": str(llama_lora)}]))
    result = run_cli("batch", jobs, "--engine", "ray", "--address", "ray://user:hunter2@head.example:10001")
    assert result.exit_code == 2, result.output
    assert "could not connect to the Ray cluster at ray://user:" in result.output
    assert "ConnectionError: Could not find any running Ray instance" in result.output
    assert "hunter2" not in result.output and "Traceback" not in result.output and "more detail" not in result.output


def test_whole_number_arguments_refuse_fractions_and_non_finite_numbers():
    """A fraction, a number written 16.0 or a NaN where an int is expected, or NaN / inf for a float: refused with
    the others before anything runs (they failed deep inside the job, as a TypeError)."""
    with pytest.raises(ah.JobsFileError) as e:
        load_jobs(
            [
                {"op": "reduce", "source": "a", "out": "o1", "rank": 2.5},
                {"op": "reduce", "source": "a", "out": "o2", "rank": float("nan")},
                {"op": "reduce", "source": "a", "out": "o3", "rank": 16.0},
                {"op": "reduce", "source": "a", "out": "o4", "energy": float("inf")},
                {"op": "reduce", "source": "a", "out": "o5", "energy": 1},  # a whole number is a number too
            ]
        )
    text = str(e.value)
    assert "4 problem(s)" in text
    assert "jobs[0] (reduce): rank = 2.5 is a fraction; expected null or whole number" in text
    assert "jobs[1] (reduce): rank = nan is not a finite number" in text
    assert "jobs[2] (reduce): rank = 16.0 is a number written with a decimal point" in text
    assert "jobs[3] (reduce): energy = inf is not a finite number" in text


def test_a_job_past_its_timeout_is_stopped_and_fails_alone(monkeypatch, tmp_path):
    """A job with ``timeout`` is stopped when it runs past it (its own record: JobTimeoutError, the hint); the job
    after it runs; a job run outside a main thread says its limit is not enforced."""
    import threading
    import time

    from adapterhub_cli.batch.jobs import OPS

    def slow(source: str, out: str | None = None) -> None:
        time.sleep(float(source))

    monkeypatch.setitem(OPS, "slow", slow)
    started = time.perf_counter()
    records = ah.batch(
        [{"op": "slow", "source": "30", "timeout": 0.5}, {"op": "slow", "source": "0.01", "timeout": 5}],
        engine="serial",
    )
    assert time.perf_counter() - started < 10
    assert (records[0].status, records[0].error_code) == ("failed", "JobTimeoutError")
    assert "stopped after its timeout of 0.5 s" in records[0].error_message and records[0].error_hint
    assert not records[0].transient
    assert records[1].status == "ok"
    elsewhere: list = []
    thread = threading.Thread(
        target=lambda: elsewhere.extend(ah.batch([{"op": "slow", "source": "0.01", "timeout": 5}], engine="serial"))
    )
    thread.start()
    thread.join(30)
    assert elsewhere[0].status == "ok" and "not enforced" in (elsewhere[0].note or "")
    # in a pool process too (a job there runs in its main thread): a limit far too short for any real op
    [pooled] = ah.batch([{"op": "inspect", "source": str(tmp_path), "timeout": 1e-6}], engine="local", workers=1)
    assert (pooled.status, pooled.error_code) == ("failed", "JobTimeoutError")


def test_progress_is_told_every_start_and_finish(monkeypatch):
    monkeypatch.setitem(OPS, "nothing", lambda source: None)
    monkeypatch.setitem(OPS, "fails", lambda source: 1 / 0)
    seen = []
    records = ah.batch(
        [{"op": "nothing", "source": "a"}, {"op": "fails", "source": "b"}, {"op": "nothing", "source": "c"}],
        engine="serial",
        progress=lambda s: seen.append((s.done, s.ok, s.failed, s.running, s.total)),
    )
    assert seen == [
        (0, 0, 0, 1, 3),
        (1, 1, 0, 0, 3),
        (1, 1, 0, 1, 3),
        (2, 1, 1, 0, 3),
        (2, 1, 1, 1, 3),
        (3, 2, 1, 0, 3),
    ]
    assert records[1].error_code == "ZeroDivisionError" and records[1].error_message == "division by zero"


def test_each_job_runs_with_its_own_thread_count(monkeypatch):
    seen: list[int] = []

    def probe(source: str) -> None:
        seen.append(torch.get_num_threads())

    monkeypatch.setitem(OPS, "probe", probe)
    before = torch.get_num_threads()
    ah.batch([{"op": "probe", "source": "a"}, {"op": "probe", "source": "b", "threads": 3}], engine="serial")
    assert seen == [1, 3]
    assert torch.get_num_threads() == before  # the caller's setting is given back


def test_usage_errors_and_a_missing_ray(tmp_path, monkeypatch, llama_lora):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"op": "inspect", "source": str(llama_lora)}]))
    result = run_cli("batch", jobs, "--address", "auto")
    assert result.exit_code == 2 and "--address applies to --engine ray only" in result.output
    result = run_cli("batch", jobs, "--engine", "ray", "--address", "auto", "--workers", 2)
    assert result.exit_code == 2 and "--workers sizes the Ray instance started here" in result.output
    result = run_cli("batch", jobs, "--report", jobs)
    assert result.exit_code == 2 and "is the JOBS file itself" in result.output
    link = tmp_path / "jobs-link.json"  # the JOBS file reached through a link is still the JOBS file
    link.symlink_to(jobs)
    result = run_cli("batch", jobs, "--report", link)
    assert result.exit_code == 2 and "is the JOBS file itself" in result.output
    secret = tmp_path / "secret.txt"
    secret.write_text("keep me\n")
    planted = tmp_path / "planted.jsonl"  # a report path that is a link elsewhere is refused, never written through
    planted.symlink_to(secret)
    result = run_cli("batch", jobs, "--report", planted)
    assert result.exit_code == 2 and "is a link" in result.output
    assert secret.read_text() == "keep me\n" and json.loads(jobs.read_text())[0]["op"] == "inspect"
    weights = llama_lora / "adapter_model.safetensors"  # nor an input, or a path inside one
    before = weights.read_bytes()
    for report in (weights, llama_lora / "report.jsonl"):
        result = run_cli("batch", jobs, "--report", report)
        assert result.exit_code == 2 and "which jobs[0] (inspect) reads or writes" in result.output, result.output
    assert weights.read_bytes() == before and not (llama_lora / "report.jsonl").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = run_cli("batch", jobs, "--engine", "ray")
    assert result.exit_code == 2, result.output
    assert "--engine ray needs Ray" in result.output and "pip install 'adapterhub-cli[ray]'" in result.output
    assert not (tmp_path / "jobs.report.jsonl").exists()


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance of two CPUs (its workers keep the environment it starts with: a private cache)."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTERS_CACHE", str(tmp_path_factory.mktemp("ray_cache")))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_writes_the_same_outputs_as_the_local_pool(
    local_ray, local_run, tmp_path, llama_lora, llama_rslora, llama_patterns, llama_base
):
    jobs = manifest(llama_lora, llama_rslora, llama_patterns, llama_base, tmp_path / "out")
    records = ah.batch(jobs, engine="ray", report=tmp_path / "ray.jsonl")
    assert local_ray.is_initialized()  # the instance the caller started is used, and left running
    local = read_report(local_run[0] / "jobs.report.jsonl")
    assert [r.status for r in records] == [r["status"] for r in local] == ["ok"] * 5 + ["failed"]
    assert [r.output_sha256 for r in records] == [r["output_sha256"] for r in local]
    assert all(r.output_sha256 for r in records[:4])
    assert records[5].error_code == "UsageError"
    assert [r["index"] for r in read_report(tmp_path / "ray.jsonl")] == list(range(6))
    for name in ("llama_lora-r2", "lora-int8"):  # file by file
        for f in sorted((tmp_path / "out" / name).iterdir()):
            assert f.read_bytes() == (local_run[0] / "out" / name / f.name).read_bytes()
    shutil.rmtree(tmp_path / "out")
