"""The root `adapters` group and the error boundary."""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any, cast

import click

from adapterhub_cli._version import __version__
from adapterhub_cli.cli._errors import format_known_exception
from adapterhub_cli.cli._output import out


class AdaptersGroup(click.Group):
    """The root group: known errors become one message and exit status 2; ADAPTERS_DEBUG=1 re-raises them.

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
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:
            message = format_known_exception(e)
            if message is None or os.environ.get("ADAPTERS_DEBUG"):
                raise
            out.error(message + "\n  (set ADAPTERS_DEBUG=1 to see the traceback)")
            ctx.exit(2)


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
    """Entry point of the `adapters` command."""
    install_signal_handlers()
    build_cli()(prog_name="adapters")
