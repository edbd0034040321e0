"""Shared by the benchmark scripts: run a command as a child process and measure it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run(cmd: list[str], stdout: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, the child's ru_maxrss) of one child process; exits on failure.

    ``stdout``: a file to write the child's standard output to (else it is dropped).
    """
    t0 = time.perf_counter()
    with Path(stdout or os.devnull).open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024
