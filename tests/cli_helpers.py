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


def assert_one_error(result: Result, exit_code: int = 2) -> None:
    """The command failed cleanly: ``exit_code``, no traceback, and stderr starting with its one ``Error:`` line."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("Error: ") and sum("Error:" in line for line in lines) == 1, result.stderr
