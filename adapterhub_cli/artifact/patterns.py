"""Regular expressions from untrusted configs, matched as Python's ``re`` matches them, in linear time.

PEFT treats some config values as regular expressions (a string ``target_modules`` or ``exclude_modules``, the
keys of ``rank_pattern`` / ``alpha_pattern``) and matches them with Python's backtracking ``re``, where a pattern
such as ``(a+)+$`` takes exponential time on a long name. :func:`compile_pattern` reads a pattern with Python's
own parser (so it means what it means to PEFT) and rewrites the parsed tree in RE2's syntax; RE2 (google-re2)
matches in time linear in the name, whatever the pattern.

What runs, and what is refused (:class:`PatternError`, a ``ValueError``):

- Everything RE2 can run: literals, classes, ``.``, groups, alternation, greedy and lazy repeats (up to 1000),
  anchors, the ``i`` / ``s`` / ``m`` / ``a`` / ``x`` flags (``a`` and ``i`` not together). ``\\d``, ``\\w`` and
  ``\\s`` keep Python's Unicode meaning (Unicode classes in RE2; they differ from Python only where the two
  Unicode databases differ, as case-insensitive matching may for a few letters such as Turkish dotted I).
- Lookaheads at the very start of the pattern, as configs in the wild use them to leave out a vision tower
  (``^(?!.*vision).*\\.(q_proj|v_proj)$``): each is a separate RE2 match at the start of the name, so the whole
  match stays linear. A lookaround anywhere else is refused.
- ``\\b`` / ``\\B`` run as RE2's ASCII word boundaries; matched against a name that is not ASCII they raise
  :class:`PatternError` rather than give an answer Python's Unicode boundary might not.
- Refused: backreferences, conditionals, lookbehinds, lookaheads after the start, atomic groups and possessive
  repeats (none of which RE2 can run in linear time), repeats over 1000, patterns over 100,000 characters or
  beyond RE2's memory budget, and patterns Python's parser warns about (a possible nested set ``[[``).
- An invalid pattern (one Python's ``re`` rejects) is refused as invalid.

One known difference remains: without the ``m`` flag Python's ``$`` also matches before a newline that ends the
name; here ``$`` is the end of the name (a module name of a real model never ends with a newline).
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from dataclasses import dataclass
from typing import Any

import re2  # type: ignore[import-untyped]


_parser: Any = getattr(re, "_parser")  # noqa: B009  Python's own regex parser (``re._parser``, 3.11+)

#: The longest pattern accepted (characters).
MAX_PATTERN_CHARS = 100_000
#: RE2's largest repeat count.
_MAX_REPEAT = 1000

_I, _M = _parser.SRE_FLAG_IGNORECASE, _parser.SRE_FLAG_MULTILINE
_S, _A = _parser.SRE_FLAG_DOTALL, _parser.SRE_FLAG_ASCII

_MAX_CODE = 0x10FFFF


def _char(code: int) -> str:
    """One code point in RE2's escape syntax (safe inside and outside classes)."""
    return f"\\x{{{code:x}}}"


#: Python's ``\s`` in a str pattern is ``str.isspace``: these code point ranges (checked in the tests).
_UNICODE_SPACE = ((0x9, 0xD), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                  (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))  # fmt: skip
_ASCII_SPACE = ((0x9, 0xD), (0x20, 0x20))
_ASCII_DIGIT = ((0x30, 0x39),)
_ASCII_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))


def _class_body(ranges: tuple[tuple[int, int], ...], *, complement: bool = False) -> str:
    """An RE2 class body (no brackets) holding ``ranges`` of code points, or every code point outside them."""
    if complement:
        edges = [(-1, -1), *ranges, (_MAX_CODE + 1, _MAX_CODE + 1)]
        ranges = tuple((a[1] + 1, b[0] - 1) for a, b in itertools.pairwise(edges) if a[1] + 1 <= b[0] - 1)
    return "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)


#: Class bodies of Python's categories: (Unicode meaning, ASCII meaning). ``None``: the complement of Unicode
#: ``\w``, which no RE2 class body can hold (it is written as a whole class).
_CATEGORIES: dict[str, tuple[str | None, str]] = {
    "CATEGORY_DIGIT": (r"\p{Nd}", _class_body(_ASCII_DIGIT)),
    "CATEGORY_NOT_DIGIT": (r"\P{Nd}", _class_body(_ASCII_DIGIT, complement=True)),
    "CATEGORY_SPACE": (_class_body(_UNICODE_SPACE), _class_body(_ASCII_SPACE)),
    "CATEGORY_NOT_SPACE": (_class_body(_UNICODE_SPACE, complement=True), _class_body(_ASCII_SPACE, complement=True)),
    "CATEGORY_WORD": (r"\p{L}\p{N}_", _class_body(_ASCII_WORD)),
    "CATEGORY_NOT_WORD": (None, _class_body(_ASCII_WORD, complement=True)),
}
_NOT_UNICODE_WORD = r"[^\p{L}\p{N}_]"


class PatternError(ValueError):
    """A pattern that is invalid, or that cannot be matched in linear time; the message says why."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own copy of every error on stderr
    return options


@dataclass(frozen=True)
class SafePattern:
    """A compiled config pattern: ``match`` and ``fullmatch`` answer as Python's ``re.match`` / ``re.fullmatch``.

    ``lookaheads`` are the pattern's leading lookaheads: (must match?, pattern matched at the start of the name).
    """

    source: str
    body: Any  # the RE2 regexp of the pattern after its leading lookaheads
    lookaheads: tuple[tuple[bool, SafePattern], ...] = ()
    ascii_boundary: bool = False  # uses \\b / \\B with Unicode meaning: exact on ASCII names only

    def match(self, text: str) -> bool:
        """Whether the pattern matches at the start of ``text`` (Python's ``re.match``)."""
        return self._ahead(text) and self.body.match(text) is not None

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches the whole of ``text`` (Python's ``re.fullmatch``)."""
        return self._ahead(text) and self.body.fullmatch(text) is not None

    def _ahead(self, text: str) -> bool:
        """Check ``text`` can be matched, and match the leading lookaheads."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                shown = text.encode("ascii", "backslashreplace").decode()
                raise PatternError(f"the name {shown!r} holds a lone surrogate: it is not Unicode") from None
        if self.ascii_boundary and not text.isascii():
            raise PatternError(
                f"pattern {self.source!r} uses \\b or \\B, which is matched only against ASCII names, "
                f"and {text!r} is not ASCII"
            )
        return all(sub.match(text) == wanted for wanted, sub in self.lookaheads)


@functools.lru_cache(maxsize=4096)
def compile_pattern(source: str) -> SafePattern:
    """Compile a regular expression from a config (Python syntax and meaning) to run in linear time.

    Raises:
        PatternError: the pattern is invalid, or uses what cannot run in linear time (see the module docstring).
    """
    if len(source) > MAX_PATTERN_CHARS:
        raise PatternError(f"the pattern is {len(source)} characters long; at most {MAX_PATTERN_CHARS} are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = _parser.parse(source)
            re.compile(source)
    except re.error as e:
        raise PatternError(f"invalid regular expression: {e}") from None
    except OverflowError as e:  # a repeat count beyond what Python's parser takes (a{99999999999})
        raise PatternError(f"invalid regular expression: {e}") from None
    except Warning as e:
        raise PatternError(f"ambiguous regular expression ({e}): escape the '[' if it is meant literally") from None
    except RecursionError:
        raise PatternError("the pattern nests groups too deeply") from None
    try:
        return _build(source, list(tree.data), tree.state.flags)
    except RecursionError:
        raise PatternError("the pattern nests groups too deeply") from None


def _build(source: str, items: list[tuple[Any, Any]], flags: int) -> SafePattern:
    """A SafePattern from parsed ``items``: leading lookaheads split off, the rest translated for RE2."""
    lookaheads = []
    while items and _zero_width_at_start(items[0]):
        op, av = items.pop(0)
        if op in (_parser.ASSERT, _parser.ASSERT_NOT):
            lookaheads.append((op is _parser.ASSERT, _build(source, list(av[1]), flags)))
    translator = _Translator()
    body = translator.sequence(items, _checked(flags))
    try:
        regexp = re2.compile(body, _options())
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(f"the pattern is too large or complex for the linear-time engine ({reason})") from None
    return SafePattern(source, regexp, tuple(lookaheads), translator.ascii_boundary)


def _checked(flags: int) -> int:
    """``flags``, unless they ask for what RE2 cannot do as Python does."""
    if flags & _A and flags & _I:
        raise PatternError("the pattern combines the a and i flags (ASCII-only case folding), which RE2 cannot do")
    return flags


def _zero_width_at_start(item: tuple[Any, Any]) -> bool:
    """Whether ``item`` is a start anchor or a lookahead, which at the start of the name can be checked apart."""
    op, av = item
    if op is _parser.AT:
        return av in (_parser.AT_BEGINNING, _parser.AT_BEGINNING_STRING)
    return op in (_parser.ASSERT, _parser.ASSERT_NOT) and av[0] == 1


_REFUSED = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group (?(1)...)",
    "ASSERT": "a lookahead or lookbehind that is not at the start of the pattern",
    "ASSERT_NOT": "a lookahead or lookbehind that is not at the start of the pattern",
    "ATOMIC_GROUP": "an atomic group (?>...)",
    "POSSESSIVE_REPEAT": "a possessive repeat (*+, ++, ?+)",
}


class _Translator:
    """Writes a parsed Python pattern in RE2's syntax with the same meaning."""

    def __init__(self) -> None:
        self.ascii_boundary = False

    def sequence(self, items: list[tuple[Any, Any]], flags: int) -> str:
        return "".join(self.item(op, av, flags) for op, av in items)

    def item(self, op: Any, av: Any, flags: int) -> str:
        name = op.name
        if name in _REFUSED:
            raise PatternError(f"the pattern uses {_REFUSED[name]}, which cannot be matched in linear time")
        if op is _parser.LITERAL:
            return self.flagged(_char(av), flags)
        if op is _parser.NOT_LITERAL:
            return self.flagged(f"[^{_char(av)}]", flags)
        if op is _parser.ANY:
            return "(?s:.)" if flags & _S else "(?-s:.)"
        if op is _parser.IN:
            return self.flagged(self.char_class(av, flags), flags)
        if op is _parser.CATEGORY:
            return self.char_class([(op, av)], flags)
        if op is _parser.BRANCH:
            return "(?:" + "|".join(self.sequence(list(alt), flags) for alt in av[1]) + ")"
        if op is _parser.SUBPATTERN:
            _group, add, remove, sub = av
            return "(?:" + self.sequence(list(sub), _checked((flags | add) & ~remove)) + ")"
        if op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT):
            return self.repeat(av, flags, lazy=op is _parser.MIN_REPEAT)
        if op is _parser.AT:
            return self.anchor(av, flags)
        raise PatternError(f"the pattern uses {name}, which this tool cannot match")

    def flagged(self, text: str, flags: int) -> str:
        return f"(?i:{text})" if flags & _I else text

    def repeat(self, av: Any, flags: int, *, lazy: bool) -> str:
        low, high, sub = av
        unbounded = high == _parser.MAXREPEAT
        if low > _MAX_REPEAT or (not unbounded and high > _MAX_REPEAT):
            raise PatternError(f"the pattern repeats something more than {_MAX_REPEAT} times")
        count = f"{{{low},}}" if unbounded else f"{{{low},{high}}}"
        return f"(?:{self.sequence(list(sub), flags)}){count}{'?' if lazy else ''}"

    def anchor(self, at: Any, flags: int) -> str:
        if at is _parser.AT_BEGINNING:
            return "(?m:^)" if flags & _M else r"\A"
        if at is _parser.AT_BEGINNING_STRING:
            return r"\A"
        if at is _parser.AT_END:
            return "(?m:$)" if flags & _M else r"\z"
        if at is _parser.AT_END_STRING:
            return r"\z"
        if at in (_parser.AT_BOUNDARY, _parser.AT_NON_BOUNDARY):
            self.ascii_boundary = self.ascii_boundary or not flags & _A
            return r"\b" if at is _parser.AT_BOUNDARY else r"\B"
        raise PatternError(f"the pattern uses the anchor {at}, which this tool cannot match")

    def char_class(self, items: list[tuple[Any, Any]], flags: int) -> str:
        negate, body, not_word = False, [], False
        for op, av in items:
            if op is _parser.NEGATE:
                negate = True
            elif op is _parser.LITERAL:
                body.append(_char(av))
            elif op is _parser.RANGE:
                body.append(f"{_char(av[0])}-{_char(av[1])}")
            elif op is _parser.CATEGORY:
                unicode_body, ascii_body = _CATEGORIES[av.name]
                if flags & _A:
                    body.append(ascii_body)
                elif unicode_body is None:
                    not_word = True
                else:
                    body.append(unicode_body)
            else:
                raise PatternError(f"the pattern uses {op} in a character class, which this tool cannot match")
        if not not_word:
            return f"[{'^' if negate else ''}{''.join(body)}]"
        if negate:
            raise PatternError(r"the pattern uses \W inside a negated class ([^\W...]); write it without \W")
        return f"(?:{_NOT_UNICODE_WORD}|[{''.join(body)}])" if body else _NOT_UNICODE_WORD
