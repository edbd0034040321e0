"""The root `adapters` group and the error boundary."""

from __future__ import annotations

import os
from typing import Any

import click

from adapterhub_cli._version import __version__
from adapterhub_cli.cli._errors import format_known_exception
from adapterhub_cli.cli._output import out


class AdaptersGroup(click.Group):
    """The root group: known errors become one message and exit status 2; ADAPTERS_DEBUG=1 re-raises them."""

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
    """A fresh root group with the built-in and plugin commands attached."""
    from adapterhub_cli.plugins.manager import load_errors, load_plugins, pm

    @click.group(cls=AdaptersGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="adapters")
    def cli() -> None:
        """Inspect, validate and transform LoRA adapters as versioned artifacts.

        Exit status: 0 success, 1 problems found (validate), 2 bad input or usage.
        """
        for message in load_errors:
            out.warn(message)

    load_plugins()
    pm.hook.adapters_register_commands(cli=cli)
    return cli


def main() -> None:
    """Entry point of the `adapters` command."""
    build_cli()(prog_name="adapters")
