"""Built-in CLI commands, attached to the root group through the ``adapters_register_commands`` hook."""

from __future__ import annotations

from typing import Any

from adapterhub_cli.plugins.hookspecs import hookimpl


@hookimpl
def adapters_register_commands(cli: Any) -> None:
    from adapterhub_cli.cli import (
        analyze,
        batch,
        combine,
        convert,
        demo,
        diff,
        extract,
        hub,
        inspect,
        merge,
        plugins,
        quantize,
        reduce,
        validate,
    )

    for cmd in (
        inspect.inspect_cmd,
        validate.validate_cmd,
        reduce.reduce_cmd,
        diff.diff_cmd,
        analyze.analyze_cmd,
        combine.combine_cmd,
        convert.convert_cmd,
        quantize.quantize_cmd,
        quantize.dequantize_cmd,
        merge.merge_cmd,
        merge.unmerge_cmd,
        extract.extract_cmd,
        plugins.plugins_cmd,
        demo.demo_cmd,
        hub.push_cmd,
        hub.pull_cmd,
        hub.versions_cmd,
        batch.batch_cmd,
    ):
        cli.add_command(cmd)
