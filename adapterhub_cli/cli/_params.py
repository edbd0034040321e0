"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click
from click.shell_completion import CompletionItem


def complete_paths(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Shell completion of a local path (an adapter, a base, an output); a store ref is typed out."""
    return [CompletionItem(incomplete, type="file")]


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document for scripts.")
token_option = click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="Hub token for Hub refs (default: HF_TOKEN or the saved login; other stores ignore it). Never printed.",
)
#: ``--base`` of the commands that read adapters (``validate`` has its own: the base it checks against)
base_option = click.option(
    "--base",
    default=None,
    metavar="BASE",
    shell_complete=complete_paths,
    help="Base checkpoint (a local folder or .safetensors file; a diffusers pipeline folder) whose tensor names map "
    "a kohya file's names to modules; needed only for kohya files not written by adapters (default: "
    "$ADAPTERS_BASE). Other formats ignore it.",
)
allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept a legacy adapter_model.bin (read with torch.load(weights_only=True), never arbitrary pickles).",
)
existing_path = click.Path(path_type=str)


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output`` (required) and ``--overwrite`` for commands that write an adapter."""
    f = click.option(
        "--overwrite",
        is_flag=True,
        help="Replace OUT if adapters wrote it (an earlier output), only once the new one is complete.",
    )(f)
    return click.option(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        shell_complete=complete_paths,
        help="Output folder (written atomically).",
    )(f)


class LazyHelpOption(click.Option):
    """A ``click.Option`` whose help text is computed when it is read (from a registry that plugins fill), not when
    the command is built."""

    def __init__(self, *args: Any, help_text: Callable[[], str], **kwargs: Any) -> None:
        self._help_text = help_text
        super().__init__(*args, **kwargs)

    @property
    def help(self) -> str:
        return self._help_text()

    @help.setter
    def help(self, value: Any) -> None:  # click's __init__ assigns the (absent) static help
        pass


def methods_taking(option: str, *, required: bool = False) -> list[str]:
    """The registered combine methods that take ``option`` (``rank``, ``density``, ``seed``), or require it."""
    from adapterhub_cli.ops.methods import methods

    return [n for n, m in methods().items() if option in (m.required if required else m.params)]


def parse_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """Click callback: ``"0.7,0.3"`` -> ``[0.7, 0.3]``."""
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


weights_option = click.option(
    "--weights",
    callback=parse_weights,
    metavar="W1,W2,...",
    help="Comma-separated weights, one per adapter (default 1 each; negative subtracts).",
)


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are read from a registry when first needed (parsing, help, completion),
    not when the command is built: plugins registered later count, and building the CLI collects nothing."""

    def __init__(self, names: Callable[[], Iterable[str]], what: str) -> None:
        super().__init__((), case_sensitive=True)
        self._names = names
        self._what = what

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value: Any) -> None:  # click's __init__ assigns the (empty) static choices
        pass

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return f"unknown {self._what} {value!r}; known: {', '.join(self.choices)}"

    def __repr__(self) -> str:
        return f"RegistryChoice({self._what})"


def method_choice() -> RegistryChoice:
    """The registered combine methods."""

    def names() -> list[str]:
        from adapterhub_cli.ops.methods import method_names

        return method_names()

    return RegistryChoice(names, "combine method")


def writable_format_choice() -> RegistryChoice:
    """The registered formats that can write."""

    def names() -> list[str]:
        from adapterhub_cli.formats import writable_formats

        return list(writable_formats())

    return RegistryChoice(names, "format to write")


def rank_rule_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The rank rules of ``reduce`` and ``extract`` (exactly one is required; the API checks it): ``--rank``,
    ``--energy``, ``--sv-ratio``, ``--sv-fro``, and ``--max-rank`` capping the dynamic three."""
    options = [
        click.option(
            "--rank",
            type=click.IntRange(min=1),
            metavar="K",
            help="Keep K singular values in every module (for reduce: below the adapter's largest rank).",
        ),
        click.option(
            "--energy",
            type=click.FloatRange(0, 1, min_open=True),
            metavar="FRACTION",
            help="Per module, keep the fewest singular values holding this fraction of ||dW||_F² (e.g. 0.99).",
        ),
        click.option(
            "--sv-ratio",
            type=click.FloatRange(min=1),
            metavar="X",
            help="Per module, keep every singular value >= sigma_1 / X.",
        ),
        click.option(
            "--sv-fro",
            type=click.FloatRange(0, 1, min_open=True),
            metavar="FRACTION",
            help="Per module, keep the fewest singular values holding this fraction of ||dW||_F "
            "(0.9 keeps 81% of the energy).",
        ),
        click.option(
            "--max-rank",
            type=click.IntRange(min=1),
            metavar="K",
            help="Cap the rank --energy, --sv-ratio or --sv-fro may choose (not with --rank).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f
