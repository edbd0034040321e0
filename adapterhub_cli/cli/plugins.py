"""`adapters plugins`, and the option type whose choices come from the plugin registries."""

from __future__ import annotations

import click

from adapterhub_cli.cli._output import out
from adapterhub_cli.cli._params import json_option


@click.command("plugins")
@json_option
def plugins_cmd(as_json: bool) -> None:
    """List loaded plugins, where they come from, their hooks, and the formats, combine methods and stores they
    provide."""
    from adapterhub_cli.formats import get_formats
    from adapterhub_cli.ops.methods import methods
    from adapterhub_cli.plugins.manager import list_plugins, load_errors, registrations

    plugins = list_plugins()
    formats = get_formats()
    combine_methods = methods()
    stores = {r.name: r for r in registrations("adapters_register_stores")}
    if as_json:
        out.json(
            {
                "plugins": [vars(p) for p in plugins],
                "formats": {n: f.description for n, f in formats.items()},
                "writable_formats": [n for n, f in formats.items() if callable(getattr(f, "write", None))],
                "methods": {
                    n: {
                        "description": m.description,
                        "reference": m.reference,
                        "params": list(m.params),
                        "plugin": m.plugin,
                    }
                    for n, m in combine_methods.items()
                },
                "stores": {n: {"description": r.value.description, "plugin": r.plugin} for n, r in stores.items()},
                "errors": load_errors,
            }
        )
        return
    t = out.table("plugins", "name", "source", "hooks")
    for p in plugins:
        t.add_row(p.name, p.source, ", ".join(p.hooks))
    out.print(t)
    f = out.table("formats", "name", "writes", "description", wrap_last=True)
    for name, fmt in formats.items():
        f.add_row(name, "yes" if callable(getattr(fmt, "write", None)) else "", fmt.description)
    out.print(f)
    m = out.table("combine methods", "name", "options", "description", "reference", wrap=("description",))
    for name, method in combine_methods.items():
        m.add_row(name, ", ".join(method.params), method.description, method.reference or "")
    out.print(m)
    st = out.table("stores", "name", "plugin", "description", wrap_last=True)
    for name, reg in stores.items():
        st.add_row(name, reg.plugin, reg.value.description)
    out.print(st)
