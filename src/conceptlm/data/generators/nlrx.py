"""NL-RX-style English description -> regex pairs from a synchronous grammar (offline default dataset).

The style and regex dialect follow NL-RX-SYNTH (Locascio et al. 2016, arXiv 1608.03000) as it is used by LLM-JEPA
(``synth_train.jsonl``): "lines with a number before the string 'dog'" -> ``([0-9]).*(dog).*``. Every grammar rule
produces its English phrase and its regex fragment together, so each pair is correct by construction.

An expression is a tree of :class:`Atom` leaves and :class:`Op` nodes. One rule per ``Op.kind``:

====================  ====================================  ==============================
kind                  phrase                                regex
====================  ====================================  ==============================
``and`` / ``and3``    X and Y / X, Y, and Z                 ``(X)&(Y)`` / ``(X)&(Y)&(Z)``
``or`` / ``or3``      X or Y / either X, Y, or Z            ``(X)|(Y)`` / ``(X)|(Y)|(Z)``
``before``            X before Y                            ``(X).*(Y).*``
``followed``          A followed by B (atoms)               ``A.*B.*``
``star`` / ``plus``   X, zero or more times / X at least    ``(X)*`` / ``(X)+``
                      once
``rep`` / ``exact``   X, n or more times / X, exactly n     ``(X){n,}`` / ``(X){n}``
                      times
``contain``           containing X                          ``.*X.*``
``only``              containing only X                     ``X``
``start`` / ``end``   starting with X / ending with X       ``(X)(.*)`` / ``(.*)(X)``
``words``             words with X                          ``\\bX\\b``
``not``               not X                                 ``~(X)``
====================  ====================================  ==============================

A sentence is ``"lines " + phrase``; like NL-RX, the verb of the sentence ("with", "having", "containing",
"not having", "with words that don't have", ...) is merged into the leftmost phrase, and string literals are
named 'dog', 'truck', 'ring', 'lake' in order of appearance. Where NL-RX writes a child bare (``.*X.*``,
``\\bX\\b``, ``A.*B.*``) and the child is an intersection or union, the child is parenthesised, so that a parser
with the dialect's precedence (repetition > concatenation > ``&`` > ``|``, ``~`` on the next atom/group; see
:mod:`conceptlm.eval.regex_equiv`) reads the tree the rule built. NL-RX itself leaves these bare (e.g.
``.*([0-9])|([A-Z]).*``, which that parser reads as ``(.*[0-9])|([A-Z].*)``). ``{n}`` ("exactly n times") is
rare here and absent from NL-RX-SYNTH; ``exact_nlrx=True`` writes the bare NL-RX form instead (for exact-match
comparisons with NL-RX data).

The sampling distribution was tuned on ``synth_train.jsonl``: mostly 2-3 operators per expression, each rule
family at most once (``and``/``or`` twice), a third of the atoms string literals, no character class named twice,
the same length limits; operator frequencies and length means then agree within a few percent.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from conceptlm.core.io import atomic_write_jsonl

__all__ = [
    "SYSTEM_PROMPT",
    "CHAR_CLASSES",
    "LITERALS",
    "KINDS",
    "Atom",
    "Op",
    "sample_expr",
    "render",
    "generate_pairs",
    "generate_records",
    "write_jsonl",
    "make_splits",
]

SYSTEM_PROMPT = "Convert natural language to regular expression."

#: name -> (English noun phrase, regex fragment)
CHAR_CLASSES: dict[str, tuple[str, str]] = {
    "letter": ("a letter", "[A-Za-z]"),
    "lower": ("a lower-case letter", "[a-z]"),
    "capital": ("a capital letter", "[A-Z]"),
    "vowel": ("a vowel", "[AEIOUaeiou]"),
    "number": ("a number", "[0-9]"),
    "character": ("a character", "."),
}
#: string literals, assigned in order of appearance (as in NL-RX-SYNTH)
LITERALS: tuple[str, ...] = ("dog", "truck", "ring", "lake")

# Precedence level of a regex fragment: how loosely its top operator binds.
_UNIT, _CAT, _AND, _OR = 0, 1, 2, 3


@dataclass(frozen=True)
class _Rule:
    arity: int
    phrase: str       # children as {0} {1} {2}, repetition count as {n}
    regex: str
    level: int        # precedence level of the produced fragment
    bare: bool = False  # children are written without parentheses (wrapped only when they are & or |)
    family: str = ""    # kinds of one family share a per-expression budget (see _FAMILY_LIMIT)


_RULES: dict[str, _Rule] = {
    "and": _Rule(2, "{0} and {1}", "({0})&({1})", _AND, family="and"),
    "and3": _Rule(3, "{0}, {1}, and {2}", "({0})&({1})&({2})", _AND, family="and"),
    "or": _Rule(2, "{0} or {1}", "({0})|({1})", _OR, family="or"),
    "or3": _Rule(3, "either {0}, {1}, or {2}", "({0})|({1})|({2})", _OR, family="or"),
    "before": _Rule(2, "{0} before {1}", "({0}).*({1}).*", _CAT),
    "followed": _Rule(2, "{0} followed by {1}", "{0}.*{1}.*", _CAT, bare=True),
    "star": _Rule(1, "{0}, zero or more times", "({0})*", _UNIT, family="quant"),
    "plus": _Rule(1, "{0} at least once", "({0})+", _UNIT, family="quant"),
    "rep": _Rule(1, "{0}, {n} or more times", "({0}){{{n},}}", _UNIT, family="quant"),
    "exact": _Rule(1, "{0}, exactly {n} times", "({0}){{{n}}}", _UNIT, family="quant"),
    "contain": _Rule(1, "containing {0}", ".*{0}.*", _CAT, bare=True),
    "only": _Rule(1, "containing only {0}", "{0}", -1),  # writes its operand unchanged (level of the operand)
    "start": _Rule(1, "starting with {0}", "({0})(.*)", _CAT),
    "end": _Rule(1, "ending with {0}", "(.*)({0})", _CAT),
    "words": _Rule(1, "words with {0}", "\\b{0}\\b", _CAT, bare=True),
    "not": _Rule(1, "not {0}", "~({0})", _UNIT),
}
KINDS: tuple[str, ...] = tuple(_RULES)
_ATOM_CHILDREN = {"followed", "and3", "or3"}  # rules whose children are always atoms (as in NL-RX-SYNTH)
_FAMILY_LIMIT = {"and": 2, "or": 2}  # other families: at most once per expression
_NOT_UNDER_ONLY = {"contain", "only", "start", "end", "words", "not"}  # "containing only" takes plain operands

# Sampling weights, tuned so that operator frequencies and lengths match synth_train.jsonl (see tests).
_WEIGHTS: dict[str, float] = {
    "and": 0.9, "and3": 0.7, "or": 1.6, "or3": 0.6, "before": 3.2, "followed": 1.25, "star": 0.55,
    "plus": 0.55, "rep": 1.2, "exact": 0.05, "contain": 1.0, "only": 0.15, "start": 0.5, "end": 0.7,
    "words": 1.3, "not": 1.2,
}
_P_STRING = 0.33   # share of atoms that are string literals (NL-RX-SYNTH: about 31%)
_P_LEAF_UNARY = 0.2   # chance that the operand of a unary rule is an atom although depth remains
_P_LEAF_NARY = 0.6    # same for an operand of a binary rule
_OPS_WEIGHTS = {1: 0.03, 2: 0.60, 3: 0.35, 4: 0.02}  # number of operators per expression (NL-RX-SYNTH-like)
_REP_RANGE = (2, 7)
_MAX_DESC_CHARS, _MAX_REGEX_CHARS = 125, 56  # NL-RX-SYNTH maxima: 125 and 54


@dataclass(frozen=True)
class Atom:
    """A leaf: a character class (``kind`` in :data:`CHAR_CLASSES`) or a string literal (``kind="string"``)."""

    kind: str
    word: str = ""


@dataclass(frozen=True)
class Op:
    """An operator node: ``kind`` in :data:`KINDS`, its children, and ``count`` for ``rep``/``exact``."""

    kind: str
    children: tuple = ()
    count: int | None = None


Expr = Atom | Op


# ------------------------------------------------------------------------------------------------ regex side
def _regex(e: Expr, exact_nlrx: bool) -> tuple[str, int]:
    if isinstance(e, Atom):
        if e.kind == "string":
            return e.word, (_CAT if len(e.word) > 1 else _UNIT)
        return CHAR_CLASSES[e.kind][1], _UNIT
    rule = _RULES[e.kind]
    parts = [_regex(c, exact_nlrx) for c in e.children]
    if e.kind == "only":
        return parts[0]
    wrap = rule.bare and not exact_nlrx
    texts = [f"({t})" if wrap and lvl >= _AND else t for t, lvl in parts]
    return rule.regex.format(*texts, n=e.count), rule.level


# ----------------------------------------------------------------------------------------------- phrase side
# Modes: where a phrase stands, i.e. which verb is still pending in front of it.
_LINES = "lines"      # sentence start: "lines [with] ..."
_NOT = "not"          # after sentence-level "not": "lines not [having] ..."
_WTOP = "words-top"   # after "lines with words": "... [with] / [that contain] / [that don't have] ..."
_WNEST = "words"      # after "words" elsewhere: "... [with] / [that contain] / [with not] ..."
_DONT = "dont"        # after "words that don't": "... [have] ..."
_NONE = "none"        # no pending verb


def _atom_phrase(a: Atom) -> str:
    return f"the string '{a.word}'" if a.kind == "string" else CHAR_CLASSES[a.kind][0]


def _dont_verb(first: Expr) -> str:
    # NL-RX-SYNTH: "words that don't have a vowel" but "words that don't the string 'dog'".
    return "" if isinstance(first, Atom) and first.kind == "string" else "have"


def _join(verb: str, body: str) -> str:
    return f"{verb} {body}" if verb else body


def _phrase(e: Expr, mode: str) -> str:
    if isinstance(e, Atom):
        verb = {_LINES: "with", _NOT: "having", _WTOP: "with", _WNEST: "with", _NONE: ""}.get(mode)
        return _join(_dont_verb(e) if verb is None else verb, _atom_phrase(e))
    rule, kids = _RULES[e.kind], e.children
    words_mode = mode in (_WTOP, _WNEST)
    if e.kind in ("and3", "or3"):
        verb = {_LINES: "having", _NOT: "having", _WTOP: "with", _WNEST: "with", _NONE: ""}.get(mode)
        body = rule.phrase.format(*(_phrase(c, _NONE) for c in kids))
        return _join(_dont_verb(kids[0]) if verb is None else verb, body)
    if e.kind == "contain" and isinstance(kids[0], Op) and kids[0].kind == "not":
        # NL-RX-SYNTH never says "containing not X": the negation moves in front of the verb.
        verb = {_WTOP: "that don't containing", _WNEST: "with not containing"}.get(mode, "not containing")
        return f"{verb} {_negated(kids[0].children[0], _NONE)}"
    if e.kind in ("contain", "only"):
        verb = ("that contain" if words_mode else "containing") + (" only" if e.kind == "only" else "")
        return f"{verb} {_phrase(kids[0], _NONE)}"
    if e.kind in ("start", "end"):
        return ("with " if words_mode else "") + rule.phrase.format(_phrase(kids[0], _NONE))
    if e.kind == "words":
        if mode == _LINES:
            return "with words " + _phrase(kids[0], _WTOP)
        return "words " + _phrase(kids[0], _WNEST)
    if e.kind == "not":
        if mode == _LINES:
            return "not " + _negated(kids[0], _NOT)
        if mode == _WTOP:
            return "that don't " + _negated(kids[0], _DONT)
        if mode == _WNEST:
            return "with not " + _negated(kids[0], _NONE)
        if mode == _NONE:
            return "not " + _negated(kids[0], _NONE)
        raise ValueError(f"'not' cannot stand in mode {mode!r} (double negation)")
    # Composite rules: the pending verb goes to the leftmost child.
    texts = [_phrase(c, mode if i == 0 else _NONE) for i, c in enumerate(kids)]
    return rule.phrase.format(*texts, n=e.count)


def _negated(e: Expr, mode: str) -> str:
    """Phrase of the operand of ``not``; NL-RX repeats "not" in front of every operand of an intersection."""
    if isinstance(e, Op) and e.kind == "and":
        return f"{_phrase(e.children[0], mode)} and not {_phrase(e.children[1], _NONE)}"
    if isinstance(e, Op) and e.kind in ("and3", "or3"):  # and "either" is dropped: "not having X, Y, or Z"
        first, *rest = e.children
        verb = {_NOT: "having", _NONE: ""}.get(mode)
        head = _join(_dont_verb(first) if verb is None else verb, _atom_phrase(first))
        if e.kind == "or3":
            return f"{head}, {_atom_phrase(rest[0])}, or {_atom_phrase(rest[1])}"
        return f"{head}, not {_atom_phrase(rest[0])}, and not {_atom_phrase(rest[1])}"
    return _phrase(e, mode)


def render(expr: Expr, *, exact_nlrx: bool = False) -> tuple[str, str]:
    """Render an expression tree into its ``(description, regex)`` pair.

    Args:
        expr: an :class:`Atom` or :class:`Op` tree (string atoms must carry their ``word``).
        exact_nlrx: write ``&``/``|`` operands of ``.*X.*``, ``\\bX\\b`` bare, as NL-RX-SYNTH does (for exact-match
            comparisons with it); the dialect's parser then reads a different tree there. Default: parenthesised.

    Returns:
        ``("lines ...", regex)``, e.g. ``("lines with a number before the string 'dog'", "([0-9]).*(dog).*")``.
    """
    return "lines " + _phrase(expr, _LINES), _regex(expr, exact_nlrx)[0]


# --------------------------------------------------------------------------------------------------- sampling
_FAMILY = {k: r.family or k for k, r in _RULES.items()}
_LIMIT = {k: _FAMILY_LIMIT.get(_FAMILY[k], 1) for k in KINDS}


def _sample_atom(rng: random.Random, used: dict[str, int]) -> Atom:
    # NL-RX-SYNTH never names a character class twice in one description: draw classes without replacement.
    free = [k for k in CHAR_CLASSES if not used.get("class:" + k)]
    if not free or rng.random() < _P_STRING:
        return Atom("string")
    kind = rng.choice(free)
    used["class:" + kind] = 1
    return Atom(kind)


def _sample(rng: random.Random, depth: int, used: dict[str, int], p_leaf: float, parent: str = "") -> Expr:
    """Draw a subtree; ``used`` counts rule families and character classes already in the expression."""
    if depth <= 0 or rng.random() < p_leaf:
        return _sample_atom(rng, used)
    kinds = [k for k in KINDS if used.get(_FAMILY[k], 0) < _LIMIT[k]
             and not (parent == "only" and k in _NOT_UNDER_ONLY)]
    kind = rng.choices(kinds, weights=[_WEIGHTS[k] for k in kinds])[0]
    used[_FAMILY[kind]] = used.get(_FAMILY[kind], 0) + 1
    rule = _RULES[kind]
    if kind in _ATOM_CHILDREN:
        children = tuple(_sample_atom(rng, used) for _ in range(rule.arity))
    else:
        p = _P_LEAF_UNARY if rule.arity == 1 else _P_LEAF_NARY
        children = tuple(_sample(rng, depth - 1, used, p, kind) for _ in range(rule.arity))
    count = rng.randint(*_REP_RANGE) if kind in ("rep", "exact") else None
    return Op(kind, children, count)


def _count_ops(e: Expr) -> int:
    return 0 if isinstance(e, Atom) else 1 + sum(_count_ops(c) for c in e.children)


def _name_literals(e: Expr, counter: list[int]) -> Expr:
    """Name string atoms 'dog', 'truck', ... left to right (the order is the same in phrase and regex)."""
    if isinstance(e, Atom):
        if e.kind != "string":
            return e
        counter[0] += 1
        return Atom("string", LITERALS[counter[0] - 1] if counter[0] <= len(LITERALS) else "")
    return Op(e.kind, tuple(_name_literals(c, counter) for c in e.children), e.count)


def sample_expr(rng: random.Random, max_depth: int = 3) -> Expr:
    """Draw one expression tree whose root is an operator and whose nesting is at most ``max_depth``.

    Trees with more string literals than :data:`LITERALS`, or whose rendering is longer than NL-RX-SYNTH's
    longest (125 description / 56 regex characters), are redrawn.

    Args:
        rng: the random source (consumed; the global RNG is never used).
        max_depth: maximum number of nested operators (>= 1).

    Returns:
        An :class:`Op` tree with named string literals.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    sizes = [k for k in _OPS_WEIGHTS if k <= 2 ** max_depth - 1]
    n_ops = rng.choices(sizes, weights=[_OPS_WEIGHTS[k] for k in sizes])[0]
    while True:
        counter = [0]
        expr = _name_literals(_sample(rng, max_depth, {}, 0.0), counter)
        if counter[0] > len(LITERALS) or _count_ops(expr) != n_ops:
            continue
        desc, regex = render(expr)
        if len(desc) <= _MAX_DESC_CHARS and len(regex) <= _MAX_REGEX_CHARS:
            return expr


# ------------------------------------------------------------------------------------------------- public API
def generate_pairs(n: int, *, seed: int = 0, max_depth: int = 3, distinct: bool = True,
                   exact_nlrx: bool = False) -> list[tuple[str, str]]:
    """Draw ``n`` ``(description, regex)`` pairs.

    NL-RX-SYNTH holds (nearly) distinct descriptions although its grammar, sampled independently, repeats about
    one description in five (its short templates are few); so by default repeats are redrawn here too.

    Args:
        n: number of pairs (>= 0).
        seed: seed of a private ``random.Random``; the same arguments give the same list.
        max_depth: maximum operator nesting of each expression (>= 1); the number of operators follows
            NL-RX-SYNTH (mostly 2 or 3), so depths above 3 change little.
        distinct: redraw a pair whose description was already drawn; ``False`` gives independent draws.
        exact_nlrx: see :func:`render`.

    Returns:
        A list of ``n`` pairs such as ``("lines containing a vowel", ".*[AEIOUaeiou].*")``.

    Raises:
        ValueError: ``n < 0``, ``max_depth < 1``, or (with ``distinct``) the grammar at this depth has too few
            distinct descriptions.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    if distinct:
        return _distinct_pairs(rng, n, max_depth, set(), set(), exact_nlrx)
    return [render(sample_expr(rng, max_depth), exact_nlrx=exact_nlrx) for _ in range(n)]


def _record(desc: str, regex: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": desc},
                         {"role": "assistant", "content": regex}]}


def generate_records(n: int, *, seed: int = 0, **kw) -> list[dict]:
    """Like :func:`generate_pairs` but as chat records ``{"messages": [system, user, assistant]}``.

    Args:
        n: number of records.
        seed: random seed.
        **kw: passed to :func:`generate_pairs` (``max_depth``, ``distinct``, ``exact_nlrx``).

    Returns:
        ``n`` dicts in the chat JSONL format of ``synth_train.jsonl``.
    """
    return [_record(d, r) for d, r in generate_pairs(n, seed=seed, **kw)]


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Write records as UTF-8 JSON lines, atomically (temporary file in the same folder, then ``os.replace``).

    Raises:
        ValueError: a record is not a dict with a ``"messages"`` list (names the 0-based record index).
    """
    rows = list(records)
    for i, rec in enumerate(rows):
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise ValueError(f"record {i}: expected a dict with a 'messages' list, got {rec!r:.80}")
    atomic_write_jsonl(path, rows)


def _distinct_pairs(rng: random.Random, n: int, max_depth: int, banned_desc: set[str],
                    banned_regex: set[str], exact_nlrx: bool) -> list[tuple[str, str]]:
    """Draw pairs until ``n`` have distinct descriptions outside ``banned_desc`` and regexes outside
    ``banned_regex``."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    tries, max_tries = 0, 50 * n + 1000
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"found only {len(out)} of {n} distinct pairs in {max_tries} draws "
                             f"(max_depth={max_depth} is too small for this many)")
        desc, regex = render(sample_expr(rng, max_depth), exact_nlrx=exact_nlrx)
        if desc in seen or desc in banned_desc or regex in banned_regex:
            continue
        seen.add(desc)
        out.append((desc, regex))
    return out


def make_splits(n_train: int, n_test: int, *, seed: int = 0, max_depth: int = 3,
                exact_nlrx: bool = False) -> tuple[list[dict], list[dict]]:
    """Train and test chat records with distinct descriptions; no test description or test regex is in train.

    The test split is drawn first, so it does not change with ``n_train``.

    Args:
        n_train: number of training records.
        n_test: number of test records.
        seed: random seed.
        max_depth: maximum operator nesting.
        exact_nlrx: see :func:`render`.

    Returns:
        ``(train_records, test_records)``.

    Raises:
        ValueError: negative sizes, or the grammar cannot supply that many distinct pairs.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_test={n_test}")
    rng = random.Random(seed)
    test = _distinct_pairs(rng, n_test, max_depth, set(), set(), exact_nlrx)
    train = _distinct_pairs(rng, n_train, max_depth, {d for d, _ in test}, {r for _, r in test}, exact_nlrx)
    return [_record(*p) for p in train], [_record(*p) for p in test]
