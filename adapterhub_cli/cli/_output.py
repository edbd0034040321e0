"""The one place that writes to the terminal: rich for people, JSON for scripts, NO_COLOR honoured by rich."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

import click


if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return str(obj)


class Output:
    """Renders results; ``json_mode`` prints one JSON document on stdout and nothing else there."""

    def __init__(self) -> None:
        self._console: Console | None = None
        self._err: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            # piped output is read by people too: do not squeeze tables into 80 columns
            wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
            self._console = Console(highlight=False, soft_wrap=False, width=wide)
        return self._console

    @property
    def err_console(self) -> Console:
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False)
        return self._err

    def json(self, data: Any) -> None:
        click.echo(json.dumps(data, indent=2, default=_jsonable))

    def print(self, *objects: Any) -> None:
        self.console.print(*objects)

    def table(self, title: str | None = None, *columns: str, wrap_last: bool = False) -> Table:
        """A table whose cells never wrap (names and numbers stay whole), except the last column if asked."""
        from rich.table import Table

        t = Table(title=title, title_justify="left", show_header=bool(columns), header_style="bold")
        for i, c in enumerate(columns):
            t.add_column(c, no_wrap=not (wrap_last and i == len(columns) - 1))
        return t

    def key_values(self, rows: list[tuple[str, Any]]) -> Table:
        from rich.table import Table

        t = Table(show_header=False, box=None, pad_edge=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(k, "" if v is None else str(v))
        return t

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar on stderr (shown on terminals only); yields ``update(done, total)``."""
        from rich.progress import Progress

        with Progress(console=self.err_console, transient=True, disable=not self.err_console.is_terminal) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update

    def warn(self, message: str) -> None:
        self.err_console.print(f"[yellow]warning:[/yellow] {_escape(message)}")

    def error(self, message: str) -> None:
        """Print an error unwrapped (one line per message line), in red on a colour terminal."""
        if self.err_console.is_terminal and not self.err_console.no_color:
            click.echo(click.style("Error:", fg="red", bold=True) + f" {message}", err=True)
        else:
            click.echo(f"Error: {message}", err=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


out = Output()
