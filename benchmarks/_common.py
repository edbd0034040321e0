"""Shared by the benchmark scripts: run a command as a child process and measure it."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path


#: runs a command as its own child and writes that child's wall seconds and ru_maxrss (KiB) to a file: a child
#: forked from this (large) process would report this process's RSS as its own peak when that is higher (Linux
#: keeps the forking process's high-water mark across exec), so the command is started from a small interpreter
_LAUNCH = r"""
import os, sys, time
result, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(result, "w") as f:
    f.write(f"{wall} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], stdout: str | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, the command's own ru_maxrss) of one child process; exits on failure.

    The command is started by a small launcher (:data:`_LAUNCH`), which times it from its fork to its exit: its
    peak RSS is its own, not this process's (about 10 MiB of the launcher's may show in a very small command).

    ``stdout``: a file to write the child's standard output to (else it is dropped).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result"
        with Path(stdout or os.devnull).open("wb") as sink:
            done = subprocess.run([sys.executable, "-c", _LAUNCH, str(result), *cmd], stdout=sink)
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
        wall, maxrss = result.read_text().split()
    return float(wall), int(maxrss) / 1024


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
