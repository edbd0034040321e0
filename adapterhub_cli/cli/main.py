"""The root `adapters` group and the error boundary."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any, cast

import click

from adapterhub_cli._version import __version__
from adapterhub_cli.cli._errors import DEBUG_HINT, format_known_exception, usage_error
from adapterhub_cli.cli._output import out
from adapterhub_cli.errors import AdaptersError, UsageError


class AdaptersGroup(click.Group):
    """The root group and the error boundary; ADAPTERS_DEBUG=1 re-raises every error with its traceback.

    - a :class:`~adapterhub_cli.errors.UsageError` (options that contradict each other or would have no effect)
      takes click's usage path: the command's usage line, ``Error: ...``, exit status 2, as click's own errors;
    - another :class:`~adapterhub_cli.errors.AdaptersError` (bad input, a store's refusal) is one message and its
      hint, exit status 2;
    - a known error that is not ours (an OSError, an HTTP error that escaped a store) is the same plus the
      ``ADAPTERS_DEBUG`` hint; an unknown exception is a bug and keeps its traceback.

    While plugins add their commands, ``adding_for`` names the plugin: a command name already taken (by a
    built-in, or an earlier plugin) is refused with a warning rather than replaced.
    """

    adding_for: str | None = None
    refused: list[str]

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        name = name or cmd.name
        if self.adding_for is not None and name in self.commands:
            self.refused.append(f"plugin {self.adding_for!r}: command {name!r} already exists; ignored")
            return
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if e.ctx is None:  # raised outside a command's own context: show that command's usage all the same
                e.ctx = self._command_context(ctx)
            raise
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except UsageError as e:
            if os.environ.get("ADAPTERS_DEBUG"):
                raise
            raise usage_error(e, self._command_context(ctx)) from None
        except Exception as e:
            message = format_known_exception(e)
            if message is None or os.environ.get("ADAPTERS_DEBUG"):
                raise
            out.error(message if isinstance(e, AdaptersError) else message + DEBUG_HINT)
            ctx.exit(2)

    def _command_context(self, ctx: click.Context) -> click.Context:
        """A context naming the subcommand that ran (for its usage line), or the group's own."""
        name = ctx.invoked_subcommand
        cmd = self.get_command(ctx, name) if name else None
        return click.Context(cmd, info_name=name, parent=ctx) if cmd is not None else ctx

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence, wrapped rather than cut with "..."."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.short_help or cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def build_cli() -> click.Group:
    """A fresh root group with the built-in and plugin commands attached.

    The built-in commands (:mod:`adapterhub_cli.cli.commands`) are a plugin registered here, through the
    same ``adapters_register_commands`` hook third parties use; built-ins add their commands first.
    """
    from adapterhub_cli.cli import commands
    from adapterhub_cli.plugins.manager import (
        implementations,
        is_builtin,
        load_errors,
        load_plugins,
        register_builtin,
    )

    @click.group(cls=AdaptersGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="adapters")
    def cli() -> None:
        """Inspect, validate and transform LoRA adapters as versioned artifacts.

        Exit status: 0 success, 1 problems found (validate), 2 bad input or usage.
        """
        for message in [*load_errors, *group.refused]:
            out.warn(message)

    group = cast(AdaptersGroup, cli)
    group.refused = []
    load_plugins()
    register_builtin(commands, commands.__name__)
    for plugin_name, call in implementations("adapters_register_commands"):
        group.adding_for = plugin_name
        try:
            call(cli=group)
        except Exception as e:  # a broken third-party plugin must not take the CLI down
            if is_builtin(plugin_name):
                raise
            group.refused.append(f"plugin {plugin_name!r} failed to add its commands: {type(e).__name__}: {e}")
    group.adding_for = None
    return group


#: Signals that end a run the way Ctrl-C does: the exception they raise unwinds through every atomic output, which
#: deletes its temporary folder (a replaced output stays as it was).
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _terminate(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM / SIGHUP into ``SystemExit(128 + signum)`` (the shell's status for a signal), raised in the main
    thread; further ones are ignored so they cannot interrupt the clean-up."""
    for sig in TERMINATING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP clean up like SIGINT (only the `adapters` process does this: a library never
    installs signal handlers in its caller's process)."""
    for sig in TERMINATING_SIGNALS:
        signal.signal(sig, _terminate)


def main() -> None:
    """Run the `adapters` command on ``sys.argv``; ends with ``SystemExit`` (click's standalone mode), as a
    command run inside another Python program should."""
    install_signal_handlers()
    build_cli()(prog_name="adapters")


def console_main() -> None:
    """Entry point of the installed `adapters` command: :func:`main`, then :func:`exit_now` with its status."""
    try:
        main()
    except SystemExit as e:
        status = e.code
    else:
        status = 0
    if isinstance(status, int | None):
        exit_now(status or 0)
    raise SystemExit(status)


def exit_now(status: int) -> None:
    """End the process with ``status`` without the interpreter's teardown, which with torch loaded takes 0.1-0.4 s
    of a command's time (destroying thousands of modules and objects that the process is about to drop anyway;
    measured on the merge benchmark: 3.53 s -> 3.43 s, medians of 8 alternated runs).

    Everything an orderly exit does that has an effect outside the process still happens: the ``atexit``
    handlers run (logging flushes its handlers, finalizers registered with :mod:`weakref` run), Python's standard
    output and error are flushed (a failure to flush them gives exit status 120, as at a normal exit), and so are
    the C library's streams (what native code, e.g. MKL's verbose mode, printed). Where a thread other than
    daemons is still running (the orderly exit would wait for it), or the status is not one a process can
    return (0-255), it raises ``SystemExit(status)`` instead, for the usual exit.
    """
    import atexit
    import threading

    alive = any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate())
    if alive or not 0 <= status <= 255:
        raise SystemExit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = 120
    _flush_c_streams()
    os._exit(status)


def _flush_c_streams() -> None:
    """``fflush(NULL)``: write out what the C library still buffers for native code (skipped by ``os._exit``)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # (no C library to call here: nothing of it to flush)
        pass
