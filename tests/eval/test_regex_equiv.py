"""Regex equivalence in the NL-RX dialect: hand cases per operator, parse errors, and randomized cross-checks against
Python's ``re`` and against an independent brute-force matcher that works on expression trees (not on our parser)."""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import time
from pathlib import Path

import pytest

from conceptlm.eval.regex_equiv import (
    RegexTooComplexError,
    find_counterexample,
    regex_equivalent,
    regex_matcher,
    regex_matches,
)
from conceptlm.eval.regex_parse import (
    Boundary,
    Chars,
    Complement,
    Concat,
    Inter,
    RegexParseError,
    Repeat,
    Union,
    parse_regex,
)

SYNTH_TEST = Path("/work/shared/data/llm_jepa/synth_test.jsonl")


def lit(c: str) -> Chars:
    return Chars(((ord(c), ord(c)),))


# ------------------------------------------------------------------------------------------------- parsing
def test_parse_precedence_and_structure():
    a, b, c, d = lit("a"), lit("b"), lit("c"), lit("d")
    assert parse_regex("a|b&c") == Union((a, Inter((b, c))))  # & binds tighter than |
    assert parse_regex("ab&cd") == Inter((Concat((a, b)), Concat((c, d))))  # ... and looser than concatenation
    assert parse_regex("~a*") == Repeat(Complement(a), 0, None)  # ~ applies to the following atom
    assert parse_regex("~(ab)") == Complement(Concat((a, b)))
    assert parse_regex("a{2,5}") == Repeat(a, 2, 5)
    assert parse_regex("a{3,}") == Repeat(a, 3, None)
    assert parse_regex("a{4}") == Repeat(a, 4, 4)
    assert parse_regex("a+?") == Repeat(Repeat(a, 1, None), 0, 1)
    assert parse_regex(r"\bd\B") == Concat((Boundary(False), d, Boundary(True)))
    assert parse_regex("[a-cx]") == Chars(((97, 99), (120, 120)))
    assert parse_regex("[AEIOUaeiou]").ranges == ((65, 65), (69, 69), (73, 73), (79, 79), (85, 85), (97, 97),
                                                  (101, 101), (105, 105), (111, 111), (117, 117))
    assert parse_regex(r"\.") == lit(".")
    assert parse_regex(".") == Chars(((0, 0x10FFFF),))
    assert parse_regex("[^b]") == Chars(((0, 97), (99, 0x10FFFF)))


@pytest.mark.parametrize("bad, pos", [
    ("", 0), ("(a", 0), ("a)", 1), ("a|", 2), ("|a", 0), ("a||b", 2), ("a&", 2), ("~", 0), ("(~)", 1),
    ("*a", 0), ("a(*b)", 2), ("a{", 1), ("a{x}", 1), ("a{3,2}", 1), ("a{2", 1), ("[ab", 0), ("[]", 0),
    ("[z-a]", 1), ("a\\", 1), ("\\q", 0), ("()", 1), ("a]", 1), ("a}", 1),
])
def test_parse_errors_name_position(bad, pos):
    with pytest.raises(RegexParseError) as err:
        parse_regex(bad)
    assert err.value.pos == pos
    assert f"position {pos}" in str(err.value)


def test_deep_nesting_is_a_parse_error_not_a_crash():
    with pytest.raises(RegexParseError, match="nesting too deep"):
        parse_regex("(" * 5000 + "a" + ")" * 5000)


@pytest.mark.parametrize("junk", [
    "The regex is: .*dog.*", "((((", "[[[", ")(", "{3,}", "a**+??", "~~~~a", "dog\\", "[a-]]", "\x00\x01",
])
def test_junk_parses_or_raises_parse_error(junk):
    try:
        parse_regex(junk)
    except RegexParseError:
        pass


# --------------------------------------------------------------------------------------------- equivalence
EQUIVALENT = [
    ("a|b", "b|a"),  # union commutativity
    ("a|b|c", "c|(b|a)"),  # union associativity
    ("a|a", "a"),  # union idempotence
    ("a&b|a", "a"),  # a|(a&b)
    ("ab&a.", "ab"),  # & looser than concatenation
    ("a{2,}", "aa+"),
    ("a{1,3}", "a|aa|aaa"),
    ("a{0,2}", "a?a?"),
    ("a{3}", "aaa"),
    ("(ab){2}", "abab"),
    ("a{0}b", "b"),
    ("(a|b)*", "(a*b*)*"),
    ("a**", "a*"),
    ("(a*)+", "a*"),
    ("a?", "a|~(.*.)&~(.+)"),  # optional = a or the empty string
    ("~(~(x))", "x"),  # double complement
    ("~(a|b)", "~(a)&~(b)"),  # De Morgan
    ("~(a&b)", "~(a)|~(b)"),  # De Morgan
    ("~(.*)", "a&b"),  # the empty language, two ways
    ("[AEIOUaeiou]&[a-z]", "[aeiou]"),
    ("[A-Za-z]", "[a-z]|[A-Z]"),
    ("[0-9]&.", "[0-9]"),
    (".*(dog).*&.*(truck).*", ".*dog.*truck.*|.*truck.*dog.*"),
    ("~(.*dog.*)&.*dog.*", "~(.*)"),
    (r"\bdog\b", "dog"),  # string edges are non-word
    (r"\b", "~(.*)"),  # a boundary alone never matches the empty string
    (r"\B", "~(.+)"),  # a non-boundary alone matches exactly the empty string
    (r"a\bb", "~(.*)"),  # no boundary between two word characters
    (r"a\b ", "a "),  # between a word and a non-word character there is one
    (r"(\b[a-z]+\b )*", "([a-z]+ )*"),
    (r"\B[0-9]", "~(.*)"),  # first character: start counts as non-word, so \B fails before a digit
    (r".*\b\b.*", r".*\b.*"),
    (r"~(\bdog)", "~(dog)"),  # boundary inside a complement sees the string start
    (r"x~(\bdog)", "x.*"),  # ... and here the preceding word char: \bdog never matches after x
    ("(.*[0-9].*){2,}", ".*[0-9].*[0-9].*"),
    (".*\\b[A-Z].*\\b.*", ".*\\b[A-Z].*\\b.*"),
]

NOT_EQUIVALENT = [
    ("a|b", "a"),
    ("ab", "ba"),  # concatenation is not commutative
    ("a&b", "a"),
    ("a{2,}", "a+"),
    ("a{1,3}", "a|aa"),
    ("a{3}", "a{3,}"),
    ("a*", "a+"),
    ("a?", "a"),
    ("(ab)*", "a*b*"),
    ("~(a)", "b"),
    ("~(a|b)", "~(a)|~(b)"),  # a wrong De Morgan
    ("[AEIOUaeiou]&[a-z]", "[AEIOUaeiou]"),
    ("[a-z]", "[A-Za-z]"),
    (".", "[a-z]"),
    (".*dog.*", ".*dog.*dog.*"),
    (r".*\bdog\b.*", ".*dog.*"),
    (r"\B", r"\b"),
    (r"(\ba)*", "a*"),
]


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent_pairs(a, b):
    assert regex_equivalent(a, b) is True
    assert regex_equivalent(b, a) is True
    assert find_counterexample(a, b) is None


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_non_equivalent_pairs_come_with_a_witness(a, b):
    assert regex_equivalent(a, b) is False
    w = find_counterexample(a, b)
    assert isinstance(w, str)
    assert regex_matches(a, w) != regex_matches(b, w)


def test_witnesses_are_shortest():
    assert find_counterexample(".*dog.*", ".*dog.*dog.*") == "dog"
    assert find_counterexample("a{2,}", "a+") == "a"
    assert find_counterexample("a*", "a+") == ""
    w = find_counterexample(r".*\bdog\b.*", ".*dog.*")
    assert len(w) == 4 and w.endswith("dog") and re.fullmatch(r"\w", w[0])


def test_matches_by_hand():
    assert regex_matches(r".*\bdog\b.*", "a dog!")
    assert not regex_matches(r".*\bdog\b.*", "hotdog")
    assert regex_matches(r"(\b([AEIOUaeiou])&([a-z])\b)*", "")
    assert regex_matches(r"(\b([AEIOUaeiou])&([a-z])\b)*", "e")
    assert not regex_matches(r"(\b([AEIOUaeiou])&([a-z])\b)*", "ea")  # no boundary between e and a
    assert regex_matches("~((dog.*[0-9].*){3,})", "dog1dog2")
    assert not regex_matches("~((dog.*[0-9].*){3,})", "dog1dog2dog3")
    assert regex_matches(".", "\n") and regex_matches(".", "é") and not regex_matches(".", "")
    assert regex_matches("^a$", "^a$")  # anchors are literal characters in this dialect


def test_timeout_returns_unknown():
    hard_a, hard_b = "(a|b)*a(a|b){22}", "(a|b)*a(a|b){22}b*"  # the DFA has 2**23 states
    start = time.monotonic()
    assert regex_equivalent(hard_a, hard_b, timeout=0.2) is None
    assert find_counterexample(hard_a, hard_b, timeout=0.2) is ...
    assert time.monotonic() - start < 5.0
    assert find_counterexample(hard_a, hard_b, timeout=10.0, max_states=1000) is ...
    assert regex_equivalent("a{100000}", "a{100000}", timeout=0.2) is None  # too large for the time budget


def test_large_counts_are_built_by_halving():
    assert regex_equivalent("a{300}", "a{150}a{150}") is True
    assert find_counterexample("a{300}", "a{299}") == "a" * 299
    assert regex_equivalent("(ab){2,400}", "ab(ab){1,399}") is True
    assert regex_matches("a{2000}", "a" * 2000) and not regex_matches("a{2000}", "a" * 1999)
    with pytest.raises(RegexTooComplexError):
        regex_matcher("a{100000000}", max_states=10_000)


# ------------------------------------------------------------------------------------ randomized checks
WORDCH = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
ATOMS = {  # regex text -> membership test, independent of our parser
    "a": lambda c: c == "a", "b": lambda c: c == "b", "1": lambda c: c == "1", " ": lambda c: c == " ",
    ".": lambda c: True, "[ab]": lambda c: c in "ab", "[a-z]": lambda c: "a" <= c <= "z",
    "[0-9]": lambda c: "0" <= c <= "9",
}


def random_tree(rng: random.Random, depth: int, extended: bool):
    if depth == 0 or rng.random() < 0.25:
        return ("b",) if rng.random() < 0.12 else ("chr", rng.choice(list(ATOMS)))
    ops = ["cat", "cat", "alt", "star", "plus", "opt", "rep"] + (["and", "and", "not", "not"] if extended else [])
    op = rng.choice(ops)
    if op in ("cat", "alt", "and"):
        return (op, random_tree(rng, depth - 1, extended), random_tree(rng, depth - 1, extended))
    sub = random_tree(rng, depth - 1, extended)
    if sub[0] == "b" and op != "not":
        sub = ("chr", "a")
    if op == "rep":
        lo = rng.randint(0, 2)
        return ("rep", sub, lo, rng.choice([None, lo, lo + 1, lo + 2]))
    return (op, sub)


def to_text(t) -> str:
    op = t[0]
    if op == "chr":
        return t[1]
    if op == "b":
        return r"\b"
    if op == "cat":
        return f"({to_text(t[1])})({to_text(t[2])})"
    if op in ("alt", "and"):
        return f"(({to_text(t[1])}){'|' if op == 'alt' else '&'}({to_text(t[2])}))"
    if op == "not":
        return f"(~({to_text(t[1])}))"
    if op == "rep":
        hi = "" if t[3] is None else t[3]
        q = f"{{{t[2]}}}" if t[3] == t[2] else f"{{{t[2]},{hi}}}"
        return f"({to_text(t[1])}){q}"
    return f"({to_text(t[1])}){ {'star': '*', 'plus': '+', 'opt': '?'}[op]}"


def reference_matches(tree, s: str) -> bool:
    """Denotational semantics on the tree: does the node match s[i:j], seeing the whole string as context."""
    n = len(s)

    def word(k: int) -> bool:
        return 0 <= k < n and s[k] in WORDCH

    @functools.cache
    def m(t, i: int, j: int) -> bool:
        op = t[0]
        if op == "chr":
            return j == i + 1 and ATOMS[t[1]](s[i])
        if op == "b":
            return i == j and word(i - 1) != word(i)
        if op == "cat":
            return any(m(t[1], i, k) and m(t[2], k, j) for k in range(i, j + 1))
        if op == "alt":
            return m(t[1], i, j) or m(t[2], i, j)
        if op == "and":
            return m(t[1], i, j) and m(t[2], i, j)
        if op == "not":
            return not m(t[1], i, j)
        if op == "opt":
            return i == j or m(t[1], i, j)
        if op == "star":
            return i == j or any(m(t[1], i, k) and m(t, k, j) for k in range(i + 1, j + 1))
        if op == "plus":
            return any(m(t[1], i, k) and m(("star", t[1]), k, j) for k in range(i, j + 1))
        if op == "rep":  # ("rep", x, lo, hi): exactly count iterations, empty ones allowed
            _, x, lo, hi = t
            if hi is None:
                return m(("cat", ("rep", x, lo, lo), ("star", x)), i, j)
            return any(exactly(x, cnt, i, j) for cnt in range(lo, hi + 1))
        raise AssertionError(op)

    @functools.cache
    def exactly(x, cnt: int, i: int, j: int) -> bool:
        if cnt == 0:
            return i == j
        return any(m(x, i, k) and exactly(x, cnt - 1, k, j) for k in range(i, j + 1))

    return m(tree, 0, n)


def all_strings(alphabet: str, max_len: int):
    for length in range(max_len + 1):
        for chars in itertools.product(alphabet, repeat=length):
            yield "".join(chars)


def test_random_regexes_agree_with_python_re():
    rng = random.Random(1234)
    strings = list(all_strings("ab1 ", 4))
    for _ in range(150):
        tree = random_tree(rng, 4, extended=False)
        text = to_text(tree)
        ours = regex_matcher(text)
        theirs = re.compile(text, re.ASCII | re.DOTALL)
        for s in strings:
            assert ours(s) == (theirs.fullmatch(s) is not None), (text, s)


def test_reference_matcher_is_sound_on_hand_cases():
    assert reference_matches(("cat", ("b",), ("chr", "a")), "a")
    assert not reference_matches(("cat", ("chr", "a"), ("cat", ("b",), ("chr", "b"))), "ab")
    assert reference_matches(("not", ("chr", "a")), "aa") and not reference_matches(("not", ("chr", "a")), "a")
    assert reference_matches(("rep", ("opt", ("chr", "a")), 3, 3), "a")


def rewrite(rng: random.Random, t):
    """A semantics-preserving rewrite (or, rarely, a mutation) somewhere in the tree."""
    if t[0] in ("chr", "b") or rng.random() < 0.4:
        options = [("not", ("not", t)), ("alt", t, t), ("and", t, t)]
        if t[0] in ("alt", "and"):
            dual = "and" if t[0] == "alt" else "alt"
            options += [(t[0], t[2], t[1]), ("not", (dual, ("not", t[1]), ("not", t[2])))]
        if t[0] == "star":
            options += [("star", t), ("opt", ("plus", t[1]))]
        if t[0] == "plus":
            options += [("cat", t[1], ("star", t[1]))]
        if rng.random() < 0.25:
            options = [("chr", rng.choice(list(ATOMS))), ("alt", t, ("chr", "b")), ("cat", t, ("opt", ("b",)))]
        return rng.choice(options)
    k = rng.randrange(1, len(t)) if t[0] != "rep" else 1
    if not isinstance(t[k], tuple):
        return t
    return t[:k] + (rewrite(rng, t[k]),) + t[k + 1:]


def test_random_extended_regexes_agree_with_brute_force():
    rng = random.Random(99)
    strings = list(all_strings("a1 ", 5))
    verdicts = {True: 0, False: 0}
    for _ in range(120):
        t1 = random_tree(rng, 3, extended=True)
        t2 = rewrite(rng, t1) if rng.random() < 0.7 else random_tree(rng, 3, extended=True)
        a, b = to_text(t1), to_text(t2)
        # the compiled automaton agrees with the tree semantics on every short string
        match_a = regex_matcher(a)
        for s in strings:
            assert match_a(s) == reference_matches(t1, s), (a, s)
        w = find_counterexample(a, b, timeout=10.0)
        assert w is not ..., (a, b)
        if w is None:
            assert all(reference_matches(t1, s) == reference_matches(t2, s) for s in strings), (a, b)
        else:
            assert reference_matches(t1, w) != reference_matches(t2, w), (a, b, w)
        verdicts[w is None] += 1
    assert verdicts[True] >= 30 and verdicts[False] >= 20, verdicts  # both outcomes are exercised


# ------------------------------------------------------------------------------------------ NL-RX targets
@pytest.mark.skipif(not SYNTH_TEST.exists(), reason=f"{SYNTH_TEST} not present (shared data is not mounted)")
def test_all_synth_test_targets_parse_and_are_self_equivalent():
    targets = [json.loads(line)["messages"][-1]["content"] for line in SYNTH_TEST.open()]
    assert len(targets) == 2000
    start = time.monotonic()
    for t in targets:
        parse_regex(t)
        assert regex_equivalent(t, f"({t})") is True, t
    assert time.monotonic() - start < 20.0
