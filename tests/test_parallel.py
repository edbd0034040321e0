"""The one thread-count rule."""

from __future__ import annotations

from adapterhub_cli.parallel import MAX_WORKERS, cores, default_workers


def test_default_is_the_cores_capped(monkeypatch):
    monkeypatch.delenv("ADAPTERS_THREADS", raising=False)
    monkeypatch.delenv("ADAPTERS_MERGE_THREADS", raising=False)
    assert default_workers() == max(1, min(cores(), MAX_WORKERS))
    assert default_workers("ADAPTERS_MERGE_THREADS") == default_workers()


def test_adapters_threads_sets_every_step_and_the_specific_variable_wins(monkeypatch):
    monkeypatch.setenv("ADAPTERS_THREADS", "3")
    monkeypatch.delenv("ADAPTERS_MERGE_THREADS", raising=False)
    assert default_workers() == 3
    assert default_workers("ADAPTERS_MERGE_THREADS") == 3
    monkeypatch.setenv("ADAPTERS_MERGE_THREADS", "5")
    assert default_workers("ADAPTERS_MERGE_THREADS") == 5
    for junk in ("0", "-2", "x", ""):
        monkeypatch.setenv("ADAPTERS_THREADS", junk)
        assert default_workers() == max(1, min(cores(), MAX_WORKERS))


def test_the_cores_are_those_this_process_may_run_on(monkeypatch):
    """A process limited to 2 of 64 cores (a container, taskset) counts 2, not 64; without affinity, every core."""
    from adapterhub_cli import parallel

    monkeypatch.delenv("ADAPTERS_THREADS", raising=False)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cores() == 2 and default_workers() == 2
    monkeypatch.delattr(parallel.os, "sched_getaffinity", raising=False)
    assert cores() == 64 and default_workers() == MAX_WORKERS
