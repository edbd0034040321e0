"""Options shared by several commands."""

from __future__ import annotations

import click


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept a legacy adapter_model.bin (read with torch.load(weights_only=True), never arbitrary pickles).",
)
existing_path = click.Path(path_type=str)
