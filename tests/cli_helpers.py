"""Running the `adapters` command inside the test process (click's ``CliRunner``), shared by the test modules."""

from __future__ import annotations

from click.testing import CliRunner, Result

from adapterhub_cli.cli.main import build_cli


def run_cli(*args: object, env: dict[str, str] | None = None, catch_exceptions: bool = True) -> Result:
    """``adapters ARGS...`` (each argument as ``str``) on a fresh root group; ``env`` overrides the environment."""
    return CliRunner(env=env).invoke(build_cli(), [str(a) for a in args], catch_exceptions=catch_exceptions)


def status_and_output(*args: object) -> tuple[int, str]:
    """``adapters ARGS...``: its exit status and everything it printed."""
    result = run_cli(*args)
    return result.exit_code, result.output
