"""The one place that writes to the terminal: rich for people, JSON for scripts, NO_COLOR honoured by rich.

Text that came from outside (module names, config values, paths, exception and server messages) is untrusted:
it may hold rich markup (``[/x]``, ``[link=...]``), ANSI escape sequences, carriage returns, NUL, bidi overrides
or lone surrogates. This sink prints every string as text, never as markup, with control characters replaced
by visible escapes (``\\x1b``, ``\\r``, ``\\udcff``), and never fails on a character the terminal cannot encode:

- ``out.print("...")``, table cells, key-value rows, warnings and errors take plain strings literally;
- styled pieces are built with :func:`styled` (the only way a command adds style), never with markup strings;
- ``out.json`` writes strict ASCII JSON (``NaN`` and ``Infinity`` become the strings ``"nan"``, ``"inf"``);
- every string, printed or in JSON, is :func:`~adapterhub_cli.errors.scrub`-bed of Hub tokens first (a last line
  of defence: the code that handles a token already keeps it out of what it returns and raises);
- a reader that went away (``adapters reduce ... | head -1``) silences the output instead of failing the command:
  the exit status stays what the work earned, since an output may already be written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

import click

from adapterhub_cli.errors import scrub


if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


# Unicode "format" characters that reorder or hide text (Trojan Source): shown escaped, like control characters.
_BIDI = frozenset([0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xFEFF])


def _escape_char(c: str) -> str:
    n = ord(c)
    if n <= 0xFF:
        return f"\\x{n:02x}"
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def visible(text: str, *, newlines: bool = False) -> str:
    """``text`` scrubbed of tokens, with every control character, bidi override and lone surrogate replaced by a
    visible escape.

    ``newlines=True`` keeps ``\\n`` (messages span lines; a name or a table cell never does).
    """
    text = scrub(text)
    if text.isprintable():
        return text
    chars = []
    for c in text:
        if c == "\n" and newlines:
            chars.append(c)
        elif c.isprintable() or (unicodedata.category(c) in ("Cf", "Co", "Cn") and ord(c) not in _BIDI):
            chars.append(c)
        else:  # Cc (C0, DEL, C1), Cs (lone surrogates), Zl / Zp, bidi controls, other separators than space
            chars.append(_escape_char(c))
    return "".join(chars)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line of literal text: each part a string, or ``(string, style)``; nothing is read as markup."""
    from rich.text import Text

    return Text.assemble(
        *((visible(p[0], newlines=True), p[1]) if isinstance(p, tuple) else visible(p, newlines=True) for p in parts)
    )


def _literal(obj: Any, *, newlines: bool) -> Any:
    """A string as literal text; a Text with its control characters made visible; other renderables as they are."""
    from rich.text import Text

    if isinstance(obj, Text):
        clean = visible(obj.plain, newlines=newlines)
        return obj if clean == obj.plain else Text(clean, style=obj.style)
    if isinstance(obj, str):
        return Text(visible(obj, newlines=newlines))
    return obj


def _plain_json(obj: Any) -> Any:
    """``obj`` as plain JSON data: dataclasses as dicts, non-finite floats as strings, unknown objects as str."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain_json(asdict(obj))
    if isinstance(obj, Mapping):
        return {
            (scrub(k) if isinstance(k, str) else k if isinstance(k, int) else str(k)): _plain_json(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain_json(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, str):
        return scrub(obj)
    if obj is None or isinstance(obj, (int, bool)):
        return obj
    return str(obj)


def _fit(text: str, stream: Any) -> str:
    """``text`` with what ``stream``'s encoding cannot hold written as backslash escapes."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        try:
            return text.encode(encoding, "backslashreplace").decode(encoding)
        except LookupError:
            return text.encode("ascii", "backslashreplace").decode("ascii")
    return text


def _silence(stream: Any) -> None:
    """After a broken pipe: send what is still written to ``stream`` (and the flush at exit) to /dev/null."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def _new_console(**kwargs: Any) -> Console:
    from rich.console import Console

    class QuietOnBrokenPipe(Console):
        """Goes quiet when its reader has gone, where rich would exit with status 1."""

        def on_broken_pipe(self) -> None:
            self.quiet = True
            _silence(self.file)

    return QuietOnBrokenPipe(**kwargs)


def _echo(text: str, *, err: bool = False) -> None:
    try:
        click.echo(text, err=err)
    except BrokenPipeError:
        _silence(sys.stderr if err else sys.stdout)


def _make_table(**kwargs: Any) -> Table:
    from rich.table import Table

    class LiteralTable(Table):
        """A table whose string cells are literal text on one line (names never turn into markup)."""

        def add_row(self, *renderables: Any, **kw: Any) -> None:
            super().add_row(*(_literal(r, newlines=False) for r in renderables), **kw)

    return LiteralTable(**kwargs)


class Output:
    """Renders results; ``json_mode`` prints one JSON document on stdout and nothing else there."""

    def __init__(self) -> None:
        self._console: Console | None = None
        self._err: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            # piped output is read by people too: do not squeeze tables into 80 columns
            wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
            self._console = _new_console(highlight=False, soft_wrap=False, width=wide, markup=False, emoji=False)
        return self._console

    @property
    def err_console(self) -> Console:
        if self._err is None:
            self._err = _new_console(stderr=True, highlight=False, markup=False, emoji=False)
        return self._err

    def json(self, data: Any) -> None:
        """One strict JSON document (ASCII, no NaN / Infinity tokens): valid whatever strings the data holds."""
        _echo(json.dumps(_plain_json(data), indent=2, allow_nan=False, ensure_ascii=True))

    def print(self, *objects: Any) -> None:
        """Print strings literally (one line or several) and rich renderables (tables from :meth:`table`)."""
        self._print(self.console, *(_literal(o, newlines=True) for o in objects))

    @staticmethod
    def _print(console: Console, *objects: Any) -> None:
        try:
            console.print(*objects)
        except UnicodeEncodeError:  # a terminal that is not UTF-8: write what it cannot show as escapes
            with console.capture() as captured:
                console.print(*objects)
            try:
                console.file.write(_fit(captured.get(), console.file))
                console.file.flush()
            except BrokenPipeError:
                console.on_broken_pipe()

    def table(self, title: str | None = None, *columns: str, wrap_last: bool = False) -> Table:
        """A table whose cells never wrap (names and numbers stay whole), except the last column if asked.

        String cells are literal text; style a cell with :func:`styled`.
        """
        t = _make_table(
            title=_literal(title, newlines=False) if title is not None else None,
            title_justify="left",
            show_header=bool(columns),
            header_style="bold",
        )
        for i, c in enumerate(columns):
            t.add_column(_literal(c, newlines=False), no_wrap=not (wrap_last and i == len(columns) - 1))
        return t

    def key_values(self, rows: list[tuple[str, Any]]) -> Table:
        t = _make_table(show_header=False, box=None, pad_edge=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(k, "" if v is None else v if isinstance(v, str) else str(v))
        return t

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar on stderr (shown on terminals only); yields ``update(done, total)``."""
        from rich.markup import escape as _markup_escape
        from rich.progress import Progress

        with Progress(console=self.err_console, transient=True, disable=not self.err_console.is_terminal) as bar:
            task = bar.add_task(_markup_escape(visible(description)), total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update

    def warn(self, message: str) -> None:
        self._print(self.err_console, styled(("warning:", "yellow"), " ", message))

    def error(self, message: str) -> None:
        """Print an error unwrapped (one line per message line), in red on a colour terminal."""
        message = _fit(visible(message, newlines=True), sys.stderr)
        if self.err_console.is_terminal and not self.err_console.no_color:
            _echo(click.style("Error:", fg="red", bold=True) + f" {message}", err=True)
        else:
            _echo(f"Error: {message}", err=True)


out = Output()
