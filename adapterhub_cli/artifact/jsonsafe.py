"""JSON from untrusted files (configs, indexes, safetensors headers), parsed into clean errors.

Python's ``json`` accepts some documents that break code later, and fails on others with exceptions that are not
``JSONDecodeError``. :func:`parse_json` turns each into :class:`CorruptFileError` naming the file:

- nesting deeper than the interpreter's recursion limit (``RecursionError``), or than :data:`MAX_JSON_DEPTH`
  where the document is kept (a config is written back and printed by recursive code);
- integers longer than Python's int-string conversion limit (4300 digits; a plain ``ValueError``);
- lone surrogates (``"\\ud800"``): valid JSON escapes but not Unicode, so printing or writing them fails. The
  safetensors library refuses them too.

``NaN``, ``Infinity`` and numbers too large for a float (read as ``inf``) are kept: where they scale an update,
``validate`` reports them and writers refuse them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from adapterhub_cli.errors import CorruptFileError


#: The largest JSON file read (a sharded checkpoint's index is a few megabytes).
MAX_JSON_BYTES = 100 * 1024 * 1024
#: Documents that are kept (configs, indexes) may nest at most this deep; none needs more than a few levels.
MAX_JSON_DEPTH = 64

#: A JSON escape of a UTF-16 surrogate; only a document holding one can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes, *, path: Path, what: str, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON ``raw`` read from ``path`` (``what`` names it in messages).

    Args:
        max_depth: refuse nesting deeper than this (None: only what the parser itself cannot take).

    Raises:
        CorruptFileError: not UTF-8, not JSON, nested too deeply, a number too long, or a lone surrogate.
    """
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{what} is not valid JSON (not UTF-8: {e.reason})", path=path) from None
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{what} is not valid JSON ({e})", path=path, hint="fix or regenerate the file") from e
    except RecursionError:
        raise CorruptFileError(f"{what} nests JSON arrays or objects too deeply", path=path) from None
    except ValueError:  # Python's int-string conversion limit
        limit = sys.get_int_max_str_digits()
        raise CorruptFileError(f"{what} holds a number that is too long (over {limit} digits)", path=path) from None
    check_strings = _SURROGATE_ESCAPE.search(raw) is not None
    if check_strings or max_depth is not None:
        _walk(doc, path=path, what=what, max_depth=max_depth, check_strings=check_strings)
    return doc


def _walk(doc: Any, *, path: Path, what: str, max_depth: int | None, check_strings: bool) -> None:
    """Check depth and strings iteratively (a recursive walk could itself run out of stack)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            items: list[Any] = list(node.values())
            if check_strings:
                items += list(node)
        elif isinstance(node, list):
            items = node
        else:
            if check_strings and isinstance(node, str):
                _check_unicode(node, path=path, what=what)
            continue
        if max_depth is not None and depth > max_depth:
            raise CorruptFileError(f"{what} nests JSON more than {max_depth} levels deep", path=path)
        stack.extend((item, depth + 1) for item in items)


def _check_unicode(text: str, *, path: Path, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "backslashreplace").decode("ascii")
        shown = text.encode("ascii", "backslashreplace").decode("ascii")
        raise CorruptFileError(
            f"{what} holds a string with a lone surrogate ({bad}), which is not Unicode: {shown[:80]}",
            path=path,
            hint="the file was written by a broken tool or crafted; regenerate it",
        ) from None
