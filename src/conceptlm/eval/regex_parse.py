"""Parser for regular expressions in the NL-RX dialect (Locascio et al. 2016, arXiv 1608.03000).

A regex denotes the set of *whole* strings it matches (full-match semantics). The dialect is the one of the
``dk.brics.automaton`` library that NL-RX was checked with, plus ``\\b``:

- atoms: literal characters, ``.`` (any character, newline included), classes ``[a-z]``, ``[AEIOUaeiou]``,
  ``[^...]``, escapes ``\\d \\w \\s \\D \\W \\S \\n \\t``; ``\\`` + punctuation is that literal character; groups ``(
  )``;
- postfix repetition ``*``, ``+``, ``?``, ``{n}``, ``{n,}``, ``{n,m}`` (stackable, as in brics);
- prefix complement ``~`` applies to the following atom/group (``~a*`` is ``(~a)*``, as in brics);
- precedence from tight to loose: repetition, concatenation, intersection ``&``, union ``|`` (the brics grammar).
  Checked on the 2000 ``synth_test`` targets: 555 use ``&`` and 32 of those read differently if ``&`` bound tighter
  than concatenation; that reading makes 15 of them (e.g. ``.*([0-9])&([A-Z]).*``, "lines containing a number and
  a capital letter") denote the empty set, while the brics reading empties none that the other reading keeps.
  (303 targets with ``&`` denote the empty set under both readings, e.g. ``\\b(dog)&([0-9])\\b``: NL-RX quirks.)
- ``\\b`` / ``\\B``: zero-width (non-)word boundary, word characters ``[A-Za-z0-9_]``; string edges count as
  non-word. Inside ``~`` and ``&`` a boundary sees the characters around the sub-match in the whole string.
- ``^`` and ``$`` are literal characters (brics has no anchors; every match is a full match anyway).

The syntax tree built here is decided and matched by :mod:`conceptlm.eval.regex_equiv`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RegexParseError", "Chars", "Empty", "Boundary", "Concat", "Union", "Inter", "Complement", "Repeat",
           "Node", "MAX_CODEPOINT", "WORD", "parse_regex"]

MAX_CODEPOINT = 0x10FFFF
Ranges = tuple[tuple[int, int], ...]


class RegexParseError(ValueError):
    """The regex is malformed; ``pos`` is the 0-based character position of the problem."""

    def __init__(self, message: str, pattern: str, pos: int):
        self.pattern, self.pos, self.reason = pattern, pos, message
        super().__init__(f"{message} at position {pos} in regex {pattern!r}")



# ----------------------------------------------------------------------------------------------------------- AST
@dataclass(frozen=True)
class Chars:
    """One character from a set, given as sorted, disjoint, non-adjacent inclusive code-point ranges."""

    ranges: Ranges


@dataclass(frozen=True)
class Empty:
    """The empty string."""


@dataclass(frozen=True)
class Boundary:
    """Zero-width word boundary ``\\b`` (``negated``: ``\\B``)."""

    negated: bool = False


@dataclass(frozen=True)
class Concat:
    parts: tuple


@dataclass(frozen=True)
class Union:
    parts: tuple


@dataclass(frozen=True)
class Inter:
    parts: tuple


@dataclass(frozen=True)
class Complement:
    child: object


@dataclass(frozen=True)
class Repeat:
    """``child`` repeated ``lo`` to ``hi`` times (``hi=None``: unbounded)."""

    child: object
    lo: int
    hi: int | None


Node = Chars | Empty | Boundary | Concat | Union | Inter | Complement | Repeat


def _norm_ranges(ranges) -> Ranges:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _negate(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODEPOINT:
        out.append((nxt, MAX_CODEPOINT))
    return tuple(out)


WORD: Ranges = _norm_ranges([(48, 57), (65, 90), (95, 95), (97, 122)])
_DIGIT: Ranges = ((48, 57),)
_SPACE: Ranges = _norm_ranges([(9, 13), (32, 32)])
_ANY: Ranges = ((0, MAX_CODEPOINT),)
_CLASS_ESCAPES = {"d": _DIGIT, "w": WORD, "s": _SPACE, "D": _negate(_DIGIT), "W": _negate(WORD),
                  "S": _negate(_SPACE)}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


# -------------------------------------------------------------------------------------------------------- parser
class _Parser:
    """Recursive descent: union := inter ('|' inter)*; inter := concat ('&' concat)*; concat := repeat+;
    repeat := compl quantifier*; compl := '~' compl | atom."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def error(self, message: str, pos: int | None = None) -> RegexParseError:
        return RegexParseError(message, self.s, self.i if pos is None else pos)

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def parse(self) -> Node:
        if not self.s:
            raise self.error("empty regex")
        node = self.union()
        if self.i < len(self.s):  # only a ')' can stop the top-level union early
            raise self.error("unbalanced ')'")
        return node

    def union(self) -> Node:
        parts = [self.inter()]
        while self.peek() == "|":
            self.i += 1
            parts.append(self.inter())
        return parts[0] if len(parts) == 1 else Union(tuple(parts))

    def inter(self) -> Node:
        parts = [self.concat()]
        while self.peek() == "&":
            self.i += 1
            parts.append(self.concat())
        return parts[0] if len(parts) == 1 else Inter(tuple(parts))

    def concat(self) -> Node:
        parts = []
        while (c := self.peek()) is not None and c not in "|&)":
            parts.append(self.repeat())
        if not parts:
            c = self.peek()
            what = "end of regex" if c is None else repr(c)
            raise self.error(f"empty expression before {what}")
        return parts[0] if len(parts) == 1 else Concat(tuple(parts))

    def repeat(self) -> Node:
        node = self.complement()
        while (c := self.peek()) is not None and c in "*+?{":
            start = self.i
            self.i += 1
            if c == "*":
                lo, hi = 0, None
            elif c == "+":
                lo, hi = 1, None
            elif c == "?":
                lo, hi = 0, 1
            else:
                lo, hi = self.braces(start)
            node = Repeat(node, lo, hi)
        return node

    def number(self) -> int | None:
        start = self.i
        while (c := self.peek()) is not None and c.isascii() and c.isdigit():
            self.i += 1
        return int(self.s[start:self.i]) if self.i > start else None

    def braces(self, start: int) -> tuple[int, int | None]:
        lo = self.number()
        if lo is None:
            raise self.error("malformed repetition '{' (expected {n}, {n,} or {n,m})", start)
        hi: int | None = lo
        if self.peek() == ",":
            self.i += 1
            hi = self.number()
        if self.peek() != "}":
            raise self.error("malformed repetition '{' (expected {n}, {n,} or {n,m})", start)
        self.i += 1
        if hi is not None and hi < lo:
            raise self.error(f"repetition {{{lo},{hi}}} has max < min", start)
        return lo, hi

    def complement(self) -> Node:
        if self.peek() == "~":
            self.i += 1
            c = self.peek()
            if c is None or c in "|&)":
                raise self.error("'~' has no operand", self.i - 1)
            return Complement(self.complement())
        return self.atom()

    def atom(self) -> Node:
        c = self.peek()
        start = self.i
        if c == "(":
            self.i += 1
            node = self.union()
            if self.peek() != ")":
                raise self.error("unbalanced '(' (missing ')')", start)
            self.i += 1
            return node
        if c == "[":
            return self.char_class()
        if c in ("*", "+", "?", "{"):
            raise self.error(f"nothing to repeat before {c!r}")
        if c in ("]", "}"):
            raise self.error(f"unbalanced {c!r}")
        self.i += 1
        if c == ".":
            return Chars(_ANY)
        if c == "\\":
            return self.escape(start, in_class=False)
        return Chars(((ord(c), ord(c)),))

    def escape(self, start: int, *, in_class: bool) -> Node:
        c = self.peek()
        if c is None:
            raise self.error("dangling '\\' at end of regex", start)
        self.i += 1
        if c == "b" and in_class:
            return Chars(((8, 8),))  # backspace, as in Python's re
        if c in ("b", "B"):
            return Boundary(negated=c == "B")
        if c in _CLASS_ESCAPES:
            return Chars(_CLASS_ESCAPES[c])
        if c in _CHAR_ESCAPES:
            return Chars(((ord(_CHAR_ESCAPES[c]),) * 2,))
        if c.isalnum():
            raise self.error(f"unknown escape '\\{c}'", start)
        return Chars(((ord(c), ord(c)),))

    def class_item(self) -> Ranges:
        start = self.i
        c = self.s[self.i]
        self.i += 1
        if c == "\\":
            node = self.escape(start, in_class=True)
            assert isinstance(node, Chars)
            return node.ranges
        return ((ord(c), ord(c)),)

    def char_class(self) -> Chars:
        start = self.i
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character class '['", start)
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            item_pos = self.i
            lo = self.class_item()
            nxt = self.s[self.i + 1] if self.i + 1 < len(self.s) else None
            if self.peek() == "-" and nxt is not None and nxt != "]":
                self.i += 1
                hi = self.class_item()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise self.error("bad character range in class", item_pos)
                if lo[0][0] > hi[0][0]:
                    raise self.error("character range out of order in class", item_pos)
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        norm = _norm_ranges(ranges)
        return Chars(_negate(norm) if negated else norm)


def parse_regex(s: str) -> Node:
    """Parse a regex of the NL-RX dialect into an AST (groups are not kept as nodes).

    Args:
        s: the regex text, e.g. ``"(\\\\b([AEIOUaeiou])&([a-z])\\\\b)*"``.

    Returns:
        The AST root (one of ``Chars, Empty, Boundary, Concat, Union, Inter, Complement, Repeat``).

    Raises:
        RegexParseError: malformed input (unbalanced parentheses, dangling ``|``/``&``/``~``, nothing to repeat,
            bad ``{}``, unknown escape, unterminated class, nesting too deep); the message names the position.
    """
    if not isinstance(s, str):
        raise TypeError(f"regex must be a str, got {type(s).__name__}")
    parser = _Parser(s)
    try:
        return parser.parse()
    except RecursionError:
        raise RegexParseError("nesting too deep", s, parser.i) from None
