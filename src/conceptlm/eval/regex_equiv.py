"""Exact semantic equivalence of regular expressions in the NL-RX dialect (Locascio et al. 2016, arXiv 1608.03000).

The dialect (its parser and syntax tree) lives in :mod:`conceptlm.eval.regex_parse`.

Decision procedure: the alphabet is split into finitely many classes that every character set of both regexes
(and the word-character set) respects; each sub-expression compiles to a minimal DFA over the classes whose start
state depends on whether the character before the sub-match is a word character and whose acceptance depends on
whether the character after it is one. Union and intersection are products, complement flips acceptance,
concatenation and star carry sets of thread states (subset construction). Equivalence is a BFS over the product
of the two top-level DFAs, which yields a shortest distinguishing string. A deadline and a state budget turn hard
instances into an explicit "unknown".
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from types import EllipsisType

from conceptlm.eval.regex_parse import (
    MAX_CODEPOINT,
    WORD,
    Boundary,
    Chars,
    Complement,
    Concat,
    Empty,
    Inter,
    Repeat,
    Union,
    parse_regex,
)

__all__ = ["RegexTooComplexError", "Partition", "regex_matcher", "regex_matches", "find_counterexample",
           "regex_equivalent"]


class RegexTooComplexError(ValueError):
    """The regex is well formed but too large to compile within the node budget."""


# ----------------------------------------------------------------------------------------- alphabet partition
def _collect_sets(node, out: set) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Chars):
            out.add(n.ranges)
        elif isinstance(n, (Concat, Union, Inter)):
            stack.extend(n.parts)
        elif isinstance(n, (Complement, Repeat)):
            stack.append(n.child)


class Partition:
    """Split of all code points into classes such that every given character set is a union of classes.

    Class membership is decided per elementary interval between consecutive range boundaries; intervals with the
    same membership signature share a class. ``word[c]`` says whether class ``c`` holds word characters and
    ``rep[c]`` is one representative character (printable ASCII when the class has one).
    """

    def __init__(self, sets):
        sets = sorted(set(sets) | {WORD})
        bounds = {0, MAX_CODEPOINT + 1}
        for ranges in sets:
            for lo, hi in ranges:
                bounds.update((lo, hi + 1))
        self.bounds = sorted(bounds)[:-1]  # start of each elementary interval
        starts = [[lo for lo, _ in r] for r in sets]

        def member(k: int, x: int) -> bool:
            j = bisect.bisect_right(starts[k], x) - 1
            return j >= 0 and sets[k][j][1] >= x

        sig_to_class: dict[tuple, int] = {}
        self.elem_class: list[int] = []
        first_elem: list[list[int]] = []
        for e, x in enumerate(self.bounds):
            sig = tuple(member(k, x) for k in range(len(sets)))
            cls = sig_to_class.setdefault(sig, len(sig_to_class))
            if cls == len(first_elem):
                first_elem.append([])
            first_elem[cls].append(e)
            self.elem_class.append(cls)
        self.n = len(sig_to_class)
        self.members = {r: frozenset(c for sig, c in sig_to_class.items() if sig[k]) for k, r in enumerate(sets)}
        self.word = [c in self.members[WORD] for c in range(self.n)]
        self.rep = [self._representative(elems) for elems in first_elem]

    def _representative(self, elems: list[int]) -> str:
        visible, space, lowest = [], False, MAX_CODEPOINT
        for e in elems:
            lo = self.bounds[e]
            hi = self.bounds[e + 1] - 1 if e + 1 < len(self.bounds) else MAX_CODEPOINT
            lowest = min(lowest, lo)
            if lo <= 126 and hi >= 33:
                visible.append(max(lo, 33))
            space = space or lo <= 32 <= hi
        return chr(min(visible) if visible else 32 if space else lowest)

    def classify(self, ch: str) -> int:
        """Class index of one character."""
        return self.elem_class[bisect.bisect_right(self.bounds, ord(ch)) - 1]


# ---------------------------------------------------------------------------------------------------- automata
# Every sub-expression compiles to an explicit minimal DFA over class indices whose start state depends on p (is
# the character before the sub-match a word character; False at the string start) and whose acceptance depends on
# n (is the character after it a word character; False at the string end). A DFA is thus a Moore machine with two
# start states and a pair of outputs per state; ``\\b`` is the two-state machine that accepts the empty string
# iff p != n. Composite machines are explored from hashable keys, then minimized, so sub-automata stay canonical.
_DEAD, _FULL = "<dead>", "<full>"  # sink keys: reject / accept every continuation


class _DFA:
    """Explicit minimal automaton: ``trans[s][c]``, ``out[s] = (accepts before non-word or end, before word)``,
    ``starts[p]``; ``dead``/``full`` are the unique reject-all / accept-all states, or -1 if absent."""

    def __init__(self, trans: list[list[int]], out: list[tuple[bool, bool]], starts: tuple[int, int]):
        self.trans, self.out, self.starts = trans, out, starts
        self.dead = self.full = -1
        for s, row in enumerate(trans):
            if all(t == s for t in row) and out[s][0] == out[s][1]:
                if out[s][0]:
                    self.full = s
                else:
                    self.dead = s


def _minimize(ctx: _Context, trans, out, starts) -> _DFA:
    """Hopcroft's partition refinement, O(k·n·log n): start from blocks of equal outputs and split blocks by the
    pre-images of splitter blocks until no block has states that lead to different blocks."""
    n_states, n_cls = len(trans), len(trans[0])
    inverse = [[[] for _ in range(n_states)] for _ in range(n_cls)]
    for s, row in enumerate(trans):
        for c, t in enumerate(row):
            inverse[c][t].append(s)
    groups: dict = {}
    for s, o in enumerate(out):
        groups.setdefault(o, set()).add(s)
    blocks = list(groups.values())
    block_of = [0] * n_states
    for b, members in enumerate(blocks):
        for s in members:
            block_of[s] = b
    pending = set(range(len(blocks)))
    while pending:
        splitter = list(blocks[pending.pop()])
        ctx.tick()
        for c in range(n_cls):
            hit: dict[int, list[int]] = {}
            for t in splitter:
                for s in inverse[c][t]:
                    hit.setdefault(block_of[s], []).append(s)
            for b, members in hit.items():
                if len(members) == len(blocks[b]):
                    continue
                new = len(blocks)
                blocks[b].difference_update(members)
                blocks.append(set(members))
                for s in members:
                    block_of[s] = new
                if b in pending or len(members) <= len(blocks[b]):
                    pending.add(new)
                else:
                    pending.add(b)
    rep = [next(iter(members)) for members in blocks]
    return _DFA([[block_of[t] for t in trans[r]] for r in rep], [out[r] for r in rep],
                (block_of[starts[0]], block_of[starts[1]]))


def _explore(ctx: _Context, start, step, accepts) -> _DFA:
    """Build the DFA reachable from ``start(p)`` for both p, over hashable keys, then minimize it."""
    index: dict = {}
    keys: list = []

    def idx(key) -> int:
        i = index.get(key)
        if i is None:
            ctx.charge()
            i = index[key] = len(keys)
            keys.append(key)
        return i

    starts = (idx(start(False)), idx(start(True)))
    trans = []
    for key in keys:  # the list grows while we walk it: a BFS
        sink = key is _DEAD or key is _FULL
        trans.append([idx(key if sink else step(key, c)) for c in range(ctx.partition.n)])
        if len(trans) & 127 == 0:
            ctx.tick()
    out = [(k is _FULL, k is _FULL) if k is _DEAD or k is _FULL else (accepts(k, False), accepts(k, True))
           for k in keys]
    return _minimize(ctx, trans, out, starts)


def _leaf(ctx: _Context, members: frozenset | None = None, boundary_negated: bool | None = None) -> _DFA:
    """A character set (states: 0 start, 1 read one char, 2 dead), the empty string (``members=None``), or a
    word boundary (``boundary_negated`` False: ``\\b``, True: ``\\B``)."""
    n = ctx.partition.n
    if boundary_negated is not None:  # states 0/1: previous char non-word/word; 2 dead. \b accepts iff p != n
        neg = boundary_negated
        return _minimize(ctx, [[2] * n] * 3, [(neg, not neg), (not neg, neg), (False, False)], (0, 1))
    if members is None:
        return _minimize(ctx, [[1] * n, [1] * n], [(True, True), (False, False)], (0, 0))
    return _minimize(ctx, [[1 if c in members else 2 for c in range(n)], [2] * n, [2] * n],
                     [(False, False), (True, True), (False, False)], (0, 0))


def _complement(ctx: _Context, a: _DFA) -> _DFA:
    """Flip acceptance; a minimal DFA stays minimal (dead and full swap)."""
    return _DFA(a.trans, [(not x, not y) for x, y in a.out], a.starts)


def _boolean(ctx: _Context, parts: list[_DFA], conj: bool) -> _DFA:
    """Intersection (``conj``) or union of several DFAs: the product automaton."""
    quantifier = all if conj else any

    def norm(states):
        if (any if conj else all)(s == a.dead for a, s in zip(parts, states)):
            return _DEAD
        if quantifier(s == a.full for a, s in zip(parts, states)):
            return _FULL
        return states

    return _explore(ctx, lambda p: norm(tuple(a.starts[p] for a in parts)),
                    lambda key, c: norm(tuple(a.trans[s][c] for a, s in zip(parts, key))),
                    lambda key, n: quantifier(a.out[s][n] for a, s in zip(parts, key)))


def _concat(ctx: _Context, a: _DFA, b: _DFA) -> _DFA:
    """A·B. Key (state of A, previous char is word, B threads). A B thread starts at a split where A accepts given
    the next character; it starts in B's start state for the previous character."""
    word = ctx.word

    def norm(sa, prev, bs):
        bs = frozenset(bs)
        if b.full in bs:
            return _FULL
        bs = bs - {b.dead}
        if sa == a.dead:
            return (sa, None, bs) if bs else _DEAD
        return (sa, prev, bs)

    def step(key, c):
        sa, prev, bs = key
        nb = {b.trans[s][c] for s in bs}
        if a.out[sa][word[c]]:
            nb.add(b.trans[b.starts[prev]][c])
        return norm(a.trans[sa][c], word[c], nb)

    def accepts(key, n):
        sa, prev, bs = key
        return any(b.out[s][n] for s in bs) or (a.out[sa][n] and b.out[b.starts[prev]][n])

    return _explore(ctx, lambda p: norm(a.starts[p], p, ()), step, accepts)


def _star(ctx: _Context, a: _DFA) -> _DFA:
    """A*. Key (previous char is word, threads, at string start). Empty iterations never add strings, so every
    iteration reads a character; a new one starts where some thread accepts given the next character."""
    word = ctx.word

    def norm(prev, threads, at_start):
        threads = frozenset(threads)
        if a.full in threads:
            return _FULL
        threads = threads - {a.dead}
        return (prev, threads, at_start) if threads or at_start else _DEAD

    def step(key, c):
        prev, threads, at_start = key
        nt = {a.trans[s][c] for s in threads}
        if at_start or any(a.out[s][word[c]] for s in threads):
            nt.add(a.trans[a.starts[prev]][c])
        return norm(word[c], nt, False)

    return _explore(ctx, lambda p: norm(p, (), True), step,
                    lambda key, n: key[2] or any(a.out[s][n] for s in key[1]))


_MAX_NODES = 20_000


class _Compiler:
    """AST -> DFAs. Identical sub-trees share one DFA; concatenations and repetitions are built as balanced trees
    (``a{n}`` by halving), so nesting depth stays logarithmic."""

    def __init__(self, ctx: _Context):
        self.ctx, self.memo, self.nodes = ctx, {}, 0

    def new(self, build, *args) -> _DFA:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise RegexTooComplexError(f"regex needs more than {_MAX_NODES} automaton nodes")
        return build(self.ctx, *args)

    def concat(self, dfas: list[_DFA]) -> _DFA:
        if len(dfas) == 1:
            return dfas[0]
        mid = len(dfas) // 2
        return self.new(_concat, self.concat(dfas[:mid]), self.concat(dfas[mid:]))

    def power(self, a: _DFA, k: int) -> _DFA:
        key = ("pow", id(a), k)
        if key not in self.memo:
            self.memo[key] = a if k == 1 else self.new(_concat, self.power(a, k // 2), self.power(a, k - k // 2))
        return self.memo[key]

    def __call__(self, node) -> _DFA:
        dfa = self.memo.get(node)
        if dfa is None:
            dfa = self.memo[node] = self._compile(node)
        return dfa

    def _compile(self, node) -> _DFA:
        if isinstance(node, Chars):
            return self.new(_leaf, self.ctx.partition.members[node.ranges])
        if isinstance(node, Empty):
            return self.new(_leaf)
        if isinstance(node, Boundary):
            return self.new(_leaf, None, node.negated)
        if isinstance(node, Concat):
            return self.concat([self(p) for p in node.parts])
        if isinstance(node, (Union, Inter)):
            return self.new(_boolean, [self(p) for p in node.parts], isinstance(node, Inter))
        if isinstance(node, Complement):
            return self.new(_complement, self(node.child))
        if not isinstance(node, Repeat):
            raise TypeError(f"not a regex AST node: {node!r}")
        if node.hi is None:
            tail = self.new(_star, self(node.child))
        elif node.hi > node.lo:  # a{lo,hi} = a^lo (a?)^(hi-lo)
            tail = self.power(self(Union((node.child, Empty()))), node.hi - node.lo)
        else:
            tail = None
        if node.lo == 0:
            return tail if tail is not None else self(Empty())
        head = self.power(self(node.child), node.lo)
        return head if tail is None else self.new(_concat, head, tail)


# ------------------------------------------------------------------------------------------------ public API
class _Budget(Exception):
    pass


class _Context:
    """Shared by all automata of one decision: the partition plus the state and time budget."""

    def __init__(self, partition: Partition, max_states: int | None, deadline: float | None):
        self.partition, self.word = partition, partition.word
        self.max_states, self.deadline, self.states = max_states, deadline, 0

    def charge(self) -> None:
        self.states += 1
        if self.max_states is not None and self.states > self.max_states:
            raise _Budget
        if self.states % 64 == 0:
            self.tick()

    def tick(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _Budget


def _build(patterns: list[str], max_states: int | None, deadline: float | None):
    nodes = [parse_regex(p) for p in patterns]
    sets: set = set()
    for node in nodes:
        _collect_sets(node, sets)
    ctx = _Context(Partition(sets), max_states, deadline)
    try:
        compiler = _Compiler(ctx)
        autos = [compiler(node) for node in nodes]
    except RecursionError:
        raise RegexTooComplexError("regex nesting too deep to compile") from None
    return ctx, autos


def regex_matcher(pattern: str, *, max_states: int | None = 200_000) -> Callable[[str], bool]:
    """Compile ``pattern`` once; the returned function tells whether it matches a whole string.

    Raises:
        RegexParseError: ``pattern`` is malformed.
        RegexTooComplexError: ``pattern`` needs more than ``max_states`` automaton states (or is nested too deep).
    """
    try:
        ctx, (dfa,) = _build([pattern], max_states, None)
    except _Budget:
        raise RegexTooComplexError(f"regex needs more than {max_states} automaton states: {pattern!r}") from None
    classify, trans, dead = ctx.partition.classify, dfa.trans, dfa.dead

    def matches(s: str) -> bool:
        state = dfa.starts[False]
        for ch in s:
            state = trans[state][classify(ch)]
            if state == dead:
                return False
        return dfa.out[state][False]

    return matches


def regex_matches(pattern: str, s: str) -> bool:
    """Whether ``pattern`` matches the whole string ``s`` (full-match semantics; see :func:`regex_matcher`)."""
    return regex_matcher(pattern)(s)


def find_counterexample(a: str, b: str, *, timeout: float = 2.0,
                        max_states: int = 200_000) -> str | None | EllipsisType:
    """A shortest string matched by exactly one of two regexes.

    Args:
        a, b: regexes of the dialect.
        timeout: seconds before giving up (checked inside the search; no signals or threads).
        max_states: budget on automaton states built, across all sub-automata.

    Returns:
        A distinguishing string, ``None`` if the regexes are equivalent, or ``...`` (Ellipsis) if the budget ran out
        or the expression is too large to compile.

    Raises:
        RegexParseError: either regex is malformed.
    """
    deadline = time.monotonic() + timeout
    try:
        ctx, (da, db) = _build([a, b], max_states, deadline)
        rep = ctx.partition.rep
        start = (da.starts[False], db.starts[False])
        parent: dict[tuple[int, int], tuple[tuple[int, int], int] | None] = {start: None}
        queue = deque([start])
        while queue:
            if time.monotonic() > deadline:
                return ...
            pair = queue.popleft()
            sa, sb = pair
            if da.out[sa][False] != db.out[sb][False]:
                chars = []
                while (link := parent[pair]) is not None:
                    pair, cls = link
                    chars.append(rep[cls])
                return "".join(reversed(chars))
            if (sa == da.dead and sb == db.dead) or (sa == da.full and sb == db.full):
                continue
            for cls in range(ctx.partition.n):
                nxt = (da.trans[sa][cls], db.trans[sb][cls])
                if nxt not in parent:
                    parent[nxt] = (pair, cls)
                    queue.append(nxt)
        return None
    except (_Budget, RegexTooComplexError, RecursionError):
        return ...


def regex_equivalent(a: str, b: str, *, timeout: float = 2.0) -> bool | None:
    """Whether two regexes denote the same set of strings (exact decision).

    Returns:
        ``True``/``False``, or ``None`` when the time/state budget ran out (unknown).

    Raises:
        RegexParseError: either regex is malformed.
    """
    witness = find_counterexample(a, b, timeout=timeout)
    if witness is ...:
        return None
    return witness is None
