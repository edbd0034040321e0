"""Shared by the benchmark scripts: run a command as a child process and measure it."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
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


REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("adapterhub_cli", "lora_ops")


def byte_compile(checkout: str | Path) -> None:
    """Byte-compile the packages of ``checkout`` into their ``__pycache__`` folders, as ``pip install`` does, so a
    timed run imports them as an installed tool would: where ``PYTHONDONTWRITEBYTECODE`` is set (as on the machine
    these numbers come from) a source checkout would otherwise compile ~100 modules in every run (measured:
    0.14 s of a 3.8 s merge, medians of 7). Only stale files are compiled again."""
    folders = [str(Path(checkout) / name) for name in PACKAGES if (Path(checkout) / name).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=True)


def adapters_cli(checkout: str | Path | None = None) -> list[str]:
    """The argv prefix running the ``adapters`` CLI in a fresh interpreter: this checkout's, or (``checkout``) the
    package of another checkout of the repository (a ``git worktree`` of an older commit, to compare before/after in
    one run: the editable install's import hook is set aside so that checkout's package is the one imported).
    The checkout is byte-compiled first (:func:`byte_compile`)."""
    byte_compile(checkout or REPO)
    if checkout is None:
        return [sys.executable, "-c", "from adapterhub_cli.cli.main import console_main; console_main()"]
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(Path(checkout).resolve())!r}); "
        # (an older checkout, from before the installed command's fast exit, has main only)
        "import adapterhub_cli.cli.main as m; getattr(m, 'console_main', m.main)()"
    )
    return [sys.executable, "-c", code]


def summarize(times: dict[str, list[tuple[float, float]]], width: int = 46) -> dict[str, float]:
    """Print min / median / max wall seconds and peak RSS per command; the medians."""
    print(f"{'command':{width}} {'runs':>4} {'min s':>7} {'median':>7} {'max s':>7} {'peak MiB':>9}")
    medians = {}
    for name, xs in times.items():
        if not xs:
            continue
        walls = [x[0] for x in xs]
        medians[name] = statistics.median(walls)
        print(
            f"{name:{width}} {len(xs):4d} {min(walls):7.2f} {medians[name]:7.2f} {max(walls):7.2f} "
            f"{max(x[1] for x in xs):9.0f}"
        )
    return medians


def machine() -> str:
    """One line on where the numbers were taken: cores, load average, the CPU model."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({model or 'unknown CPU'}), load average {load} at the start"
