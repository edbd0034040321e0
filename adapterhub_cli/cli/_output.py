"""The one place that writes to the terminal: rich for people, JSON for scripts, NO_COLOR honoured by rich.

Text that came from outside (module names, config values, paths, exception and server messages) is untrusted:
it may hold rich markup (``[/x]``, ``[link=...]``), ANSI escape sequences, carriage returns, NUL, bidi overrides
or lone surrogates. This sink prints every string as text, never as markup, with control characters replaced
by visible escapes (``\\x1b``, ``\\r``, ``\\udcff``), and never fails on a character the terminal cannot encode:

- ``out.print("...")``, table cells, key-value rows, warnings and errors take plain strings literally;
- tables (:meth:`Output.table`) and key-value blocks keep every module name and number whole at the terminal's
  width (they change layout rather than cut a cell, see :class:`FitTable`), and no printed line ends in spaces;
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


def live_display_wanted() -> bool:
    """Whether a live display (a progress bar, the batch table) is shown: only when stdout and stderr are both
    terminals and ``TERM`` is not ``dumb`` (never in a pipe, a file, a CI log or a captured run, whatever
    ``FORCE_COLOR`` says)."""
    return _isatty(sys.stdout) and _isatty(sys.stderr) and os.environ.get("TERM") != "dumb"


def _no_progress(done: int, total: int) -> None:
    """The progress callback where no bar is shown."""


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


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


def _width(cell: Any, console: Console, options: Any, *, wraps: bool) -> int:
    """The columns ``cell`` needs to stay whole: all of it, or its longest word where the column wraps."""
    from rich.cells import cell_len
    from rich.measure import Measurement
    from rich.text import Text

    if isinstance(cell, Text):
        lines = cell.plain.splitlines() or [""]
        if wraps:
            return max((cell_len(w) for line in lines for w in line.split()), default=0)
        return max(cell_len(line) for line in lines)
    measured = Measurement.get(console, options, cell)
    return measured.minimum if wraps else measured.maximum


class _Stripped:
    """Renders ``renderable`` with the spaces that pad each line's end removed (tables and grids pad cells)."""

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Any]:
        from rich.segment import Segment

        for line in console.render_lines(self.renderable, options, pad=False):
            segments = list(line)
            while segments and segments[-1].control is None and not segments[-1].text.rstrip(" "):
                segments.pop()
            if segments and segments[-1].control is None:
                last = segments[-1]
                segments[-1] = Segment(last.text.rstrip(" "), last.style)
            yield from segments
            yield Segment.line()


#: The column whose cells are module names: :class:`FitTable` shows their common prefix once when that makes the
#: table fit, and heads each block of its vertical layout with the name.
NAME_COLUMN = "module"


class FitTable:
    """A table that keeps every cell whole at any width (module names and numbers are never cut).

    Rendered at the console's width, in the first of these layouts that fits:

    1. a boxed table (a column named in ``wrap`` wraps between words), then the same without borders;
    2. the same two with the module names' common dotted prefix written once above the table
       (``(module names start with model.layers.)``) and the rest of each name in the rows;
    3. one block per row: the module name (or the first cell) on its own line, then ``column  value`` lines.

    A single word wider than the whole screen (a very long module name) is folded, in the vertical layout only.
    String cells are literal text (never markup); style a cell with :func:`styled`.
    """

    def __init__(
        self, title: str | None, columns: tuple[str, ...], *, wrap_last: bool = False, wrap: tuple[str, ...] = ()
    ) -> None:
        self.title = title
        self.columns = list(columns)
        self.wraps = [(wrap_last and i == len(columns) - 1) or c in wrap for i, c in enumerate(columns)]
        self.rows: list[list[Any]] = []
        self.name_column = self.columns.index(NAME_COLUMN) if NAME_COLUMN in self.columns else None

    def add_row(self, *cells: Any) -> None:
        """One row: a cell per column (strings, :func:`styled` text, ``None`` for empty)."""
        from rich.text import Text

        if len(cells) > len(self.columns):
            raise ValueError(f"{len(cells)} cells for a table of {len(self.columns)} columns")
        row = [Text("") if c is None else _literal(c, newlines=False) for c in cells]
        self.rows.append(row + [Text("")] * (len(self.columns) - len(row)))

    def _widths(self, console: Console, options: Any, rows: list[list[Any]]) -> list[int]:
        """Each column's narrowest whole width: its widest cell, or its longest word if it wraps."""
        from rich.text import Text

        columns = list(zip(*rows, strict=True)) if rows else [()] * len(self.columns)
        return [
            max(_width(c, console, options, wraps=wraps) for c in [Text(header), *cells])
            for header, wraps, cells in zip(self.columns, self.wraps, columns, strict=True)
        ]

    @staticmethod
    def _table_width(widths: list[int], *, compact: bool) -> int:
        """The width of the table :meth:`_table` draws with these column widths."""
        n = len(widths)
        # boxed: a space either side of each cell and n + 1 borders; compact: a space and a separator between
        return sum(widths) + (2 * (n - 1) if compact else 3 * n + 1)

    def _table(self, rows: list[list[Any]], widths: list[int], *, compact: bool) -> Table:
        """The table of ``rows``, columns ``widths`` wide (a wrapping column at least that); ``compact``: no outer
        border, columns apart by two spaces, a rule under the header."""
        from rich import box

        kw: dict[str, Any] = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False, "padding": (0, 1, 0, 0)}
        t = _make_table(show_header=True, header_style="bold", **(kw if compact else {}))
        for header, wraps, w in zip(self.columns, self.wraps, widths, strict=True):
            # a fixed width spares rich measuring every cell again; a wrapping column takes what is left
            t.add_column(
                _literal(header, newlines=False),
                no_wrap=not wraps,
                overflow="fold",
                width=None if wraps else w,
                min_width=w if wraps else None,
            )
        for row in rows:
            t.add_row(*row)
        return t

    def _prefix(self) -> str:
        """The dotted prefix all module names share (ending in ``.``, leaving something of each), or ``""``."""
        if self.name_column is None or len(self.rows) < 2:
            return ""
        from rich.text import Text

        cells = [row[self.name_column] for row in self.rows]
        if not all(isinstance(c, Text) for c in cells):
            return ""
        parts = [c.plain.split(".") for c in cells]
        shared = 0
        while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
            shared += 1
        return "".join(f"{p}." for p in parts[0][:shared])

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Any]:
        from rich.text import Text

        if self.title is not None:
            yield Text(visible(self.title), style="table.title", overflow="fold")
        if not self.columns:
            return
        prefix = self._prefix()
        candidates: list[tuple[str, list[list[Any]]]] = [("", self.rows)]
        if prefix:
            assert self.name_column is not None
            cut, at = len(prefix), self.name_column
            candidates.append((prefix, [[c[cut:] if i == at else c for i, c in enumerate(r)] for r in self.rows]))
        for shared, rows in candidates:
            widths = self._widths(console, options, rows)
            for compact in (False, True):
                if self._table_width(widths, compact=compact) <= options.max_width:
                    if shared:
                        yield Text(f"(module names start with {visible(shared)})", overflow="fold")
                    yield self._table(rows, widths, compact=compact)
                    return
        yield from self._vertical()

    def _vertical(self) -> Iterator[Any]:
        from rich.cells import cell_len
        from rich.padding import Padding
        from rich.text import Text

        def empty(cell: Any) -> bool:
            return isinstance(cell, Text) and not cell.plain.strip()

        heading = self.name_column if self.name_column is not None else 0
        key_width = max((cell_len(c) for i, c in enumerate(self.columns) if i != heading), default=0)
        for row in self.rows:
            # headed by the module name; a row without one (a finding about the whole adapter) by its first cell
            head = self.name_column if self.name_column is not None and not empty(row[self.name_column]) else 0
            name = row[head]
            if isinstance(name, Text):
                name = name.copy()
                name.stylize("bold")
                name.overflow = "fold"
            yield name
            fields = [(c, cell) for i, (c, cell) in enumerate(zip(self.columns, row, strict=True)) if i != head]
            fields = [(c, cell) for c, cell in fields if not empty(cell)]
            if fields:
                yield Padding(KeyValues(fields, key_style="", key_width=key_width), (0, 0, 0, 2))


class KeyValues:
    """``key  value`` lines, keys aligned; a value whose longest word would not fit beside its key goes on the
    next line, indented (so a hash or a path is never cut); values wrap between words."""

    def __init__(self, rows: list[tuple[str, Any]], *, key_style: str = "bold", key_width: int | None = None) -> None:
        from rich.text import Text

        self.rows = [
            (
                Text(visible(k), style=key_style),
                _literal("" if v is None else v if isinstance(v, (str, Text)) else str(v), newlines=False),
            )
            for k, v in rows
        ]
        self.key_width = key_width

    def __rich_console__(self, console: Console, options: Any) -> Iterator[Any]:
        from rich.padding import Padding
        from rich.table import Table
        from rich.text import Text

        key_width = max([k.cell_len for k, _ in self.rows] + [self.key_width or 0])
        beside = options.max_width - key_width - 2
        grid: Table | None = None
        for k, v in self.rows:
            if _width(v, console, options, wraps=True) <= beside:
                if grid is None:
                    grid = Table.grid(padding=(0, 2))
                    grid.add_column(min_width=key_width, no_wrap=True)
                    grid.add_column(overflow="fold")
                grid.add_row(k, v)
                continue
            if grid is not None:
                yield grid
                grid = None
            yield k
            if isinstance(v, Text):
                v = v.copy()
                v.overflow = "fold"
            yield Padding(v, (0, 0, 0, 2))
        if grid is not None:
            yield grid


class Output:
    """Renders results; ``json_mode`` prints one JSON document on stdout and nothing else there."""

    def __init__(self) -> None:
        self._console: Console | None = None
        self._console_key: tuple[bool, str | None] | None = None
        self._err: Console | None = None

    @property
    def console(self) -> Console:
        # piped output is read by people too: do not squeeze tables into 80 columns
        key = (_isatty(sys.stdout), os.environ.get("COLUMNS"))
        if self._console is None or self._console_key != key:
            wide = None if key[0] or key[1] else 160
            self._console = _new_console(highlight=False, soft_wrap=False, width=wide, markup=False, emoji=False)
            self._console_key = key
        return self._console

    @property
    def err_console(self) -> Console:
        if self._err is None:
            self._err = _new_console(stderr=True, highlight=False, markup=False, emoji=False)
        return self._err

    def json(self, data: Any) -> None:
        """One strict JSON document (ASCII, no NaN / Infinity tokens): valid whatever strings the data holds."""
        _echo(json.dumps(_plain_json(data), indent=2, allow_nan=False, ensure_ascii=True))

    def print(self, *objects: Any, wrap: bool = True) -> None:
        """Print strings literally (one line or several) and rich renderables (tables from :meth:`table`).

        Lines carry no trailing spaces. ``wrap=False`` prints each line whole, however wide (a command line to
        copy): the terminal may fold it for display, but a pipe or a file gets it on one line.
        """
        from rich.text import Text

        items = [_literal(o, newlines=True) for o in objects]
        if len(items) > 1 and all(isinstance(i, Text) for i in items):
            items = [Text(" ").join(items)]
        if not wrap:
            self._print(self.console, *items, soft_wrap=True)
        else:
            self._print(self.console, *(_Stripped(i) for i in items))

    @staticmethod
    def _print(console: Console, *objects: Any, soft_wrap: bool | None = None) -> None:
        try:
            console.print(*objects, soft_wrap=soft_wrap)
        except UnicodeEncodeError:  # a terminal that is not UTF-8: write what it cannot show as escapes
            with console.capture() as captured:
                console.print(*objects, soft_wrap=soft_wrap)
            try:
                console.file.write(_fit(captured.get(), console.file))
                console.file.flush()
            except BrokenPipeError:
                console.on_broken_pipe()

    def table(
        self, title: str | None = None, *columns: str, wrap_last: bool = False, wrap: tuple[str, ...] = ()
    ) -> FitTable:
        """A table that keeps names and numbers whole at any width (see :class:`FitTable`); only the columns
        named in ``wrap`` (and the last one with ``wrap_last``) wrap, between words: prose, never names or numbers.

        String cells are literal text; style a cell with :func:`styled`. A column headed ``module`` holds module
        names.
        """
        return FitTable(title, columns, wrap_last=wrap_last, wrap=wrap)

    def key_values(self, rows: list[tuple[str, Any]]) -> KeyValues:
        """``key  value`` lines (see :class:`KeyValues`); print it with :meth:`print`."""
        return KeyValues(rows)

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar on stderr where :func:`live_display_wanted`; yields ``update(done, total)`` (which does
        nothing where no bar is shown)."""
        if not live_display_wanted():
            yield _no_progress
            return
        from rich.markup import escape as _markup_escape
        from rich.progress import Progress

        with Progress(console=self.err_console, transient=True) as bar:
            task = bar.add_task(_markup_escape(visible(description)), total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update

    def warn(self, message: str) -> None:
        """Print a warning unwrapped (one line per message line, as :meth:`error` does), yellow on a terminal."""
        self._print(self.err_console, styled(("warning:", "yellow"), " ", message), soft_wrap=True)

    def error(self, message: str) -> None:
        """Print an error unwrapped (one line per message line), in red on a colour terminal."""
        message = _fit(visible(message, newlines=True), sys.stderr)
        if self.err_console.is_terminal and not self.err_console.no_color:
            _echo(click.style("Error:", fg="red", bold=True) + f" {message}", err=True)
        else:
            _echo(f"Error: {message}", err=True)


out = Output()
