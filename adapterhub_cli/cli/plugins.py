"""`adapters plugins`."""

from __future__ import annotations

import click

from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import json_option


@click.command("plugins")
@json_option
def plugins_cmd(as_json: bool) -> None:
    """List loaded plugins, where they come from, their hooks, and the formats they provide."""
    from adapterhub_cli.formats import get_formats
    from adapterhub_cli.plugins.manager import list_plugins, load_errors

    plugins = list_plugins()
    formats = get_formats()
    if as_json:
        out.json(
            {
                "plugins": [vars(p) for p in plugins],
                "formats": {n: f.description for n, f in formats.items()},
                "errors": load_errors,
            }
        )
        return
    t = out.table("plugins", "name", "source", "hooks")
    for p in plugins:
        t.add_row(p.name, p.source, ", ".join(p.hooks))
    out.print(t)
    f = out.table("formats", "name", "description")
    for name, fmt in formats.items():
        f.add_row(name, fmt.description)
    out.print(f)
