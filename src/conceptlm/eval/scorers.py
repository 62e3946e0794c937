"""Task scorers for generation evaluation: one ``(prediction, reference, ...) -> bool`` function per task.

Where the LLM-JEPA reference ``evaluate.py`` has known bugs we deliberately do what the paper describes
(``docs/paper_index.md`` lists these deviations):

- NL-RX (``regex``): the reference scores exact string match; we decide *semantic* equivalence of the regexes
  (:mod:`conceptlm.eval.regex_equiv`), which is what NL-RX (Locascio et al. 2016) reports as DFA accuracy. Use
  ``exact`` for the reference's number.
- GSM8K: the reference requires ``\\n#### N`` at the very end of the text (no MULTILINE), so any trailing text
  fails; we take the first ``#### N`` line anywhere, else the last number, and compare numbers, not strings.
- Spider (``sql``): the reference compares raw ``sqlite3`` CLI stdout with no timeout, order-sensitively, and an
  erroring prediction "matches" a gold query with no rows; we execute read-only with a timeout, compare result
  multisets (lists when the reference has ORDER BY), and an error is always wrong.
- NQ-Open (``nq``): the reference checks ``prediction piece in gold`` (so an empty answer is correct); we check the
  paper's direction, a normalized gold answer contained in the normalized prediction.
"""

from __future__ import annotations

import re
import sqlite3
import string
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

from conceptlm.eval.regex_equiv import RegexTooComplexError, regex_equivalent
from conceptlm.eval.regex_parse import RegexParseError, parse_regex

__all__ = [
    "SCORERS",
    "KNOWN_DATA_SCORERS",
    "suggested_scorer",
    "scorer_warning",
    "exact_match",
    "regex_match",
    "gsm8k_extract",
    "gsm8k_match",
    "normalize_sql",
    "sql_match",
    "nq_normalize",
    "nq_match",
    "label_match",
    "score",
]


def exact_match(pred: str, ref: str) -> bool:
    """Exact string match after stripping surrounding whitespace (the reference's rule for synth/turk)."""
    return pred.strip() == ref.strip()


def regex_match(pred: str, ref: str, *, timeout: float = 2.0) -> bool:
    """Semantic equivalence of a predicted and a reference regex (NL-RX dialect, full-match semantics).

    A malformed or too-complex prediction, or an undecided comparison (timeout), scores ``False``.

    Raises:
        ValueError: the *reference* regex is malformed (a data problem, not a model error).
    """
    pred, ref = pred.strip(), ref.strip()
    try:
        parse_regex(ref)
    except RegexParseError as err:
        raise ValueError(f"reference regex is malformed: {err}") from None
    try:
        return regex_equivalent(pred, ref, timeout=timeout) is True
    except (RegexParseError, RegexTooComplexError):
        return False


# ------------------------------------------------------------------------------------------------------ GSM8K
# a minus sign counts only when it does not join two tokens ("3-4" is 3 and 4, not 3 and -4)
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+")
_FINAL = re.compile(r"^[ \t]*####[ \t]*(.*)$", re.MULTILINE)


def _normalize_number(text: str) -> str:
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_extract(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution.

    The first line that starts with ``####`` wins (text after it, e.g. a new question the model went on to
    generate, is ignored); otherwise the last number in the text. ``$``, thousands separators and trailing
    zeros are dropped: ``"#### $1,000.50"`` -> ``"1000.5"``, ``"3.0"`` -> ``"3"``.

    Returns:
        The normalized number as a string, the stripped ``####`` text if it holds no number, or ``None`` if there
        is no answer at all.
    """
    final = _FINAL.search(text)
    if final is not None:
        numbers = _NUMBER.findall(final.group(1))
        if numbers:
            return _normalize_number(numbers[0])
        return final.group(1).strip() or None
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def gsm8k_match(pred: str, ref: str) -> bool:
    """Whether the prediction's final answer equals the reference's (both through :func:`gsm8k_extract`).

    Raises:
        ValueError: the reference holds no answer.
    """
    gold = gsm8k_extract(ref)
    if gold is None:
        raise ValueError(f"reference has no GSM8K answer: {ref[-80:]!r}")
    return gsm8k_extract(pred) == gold


# ------------------------------------------------------------------------------------------------------ SQL
_SQL_TOKEN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\w+(?:\.\w+)*|<=|>=|!=|<>|==|\|\||\S""")
_SQL_ALIASES = {"<>": "!=", "==": "="}


def normalize_sql(s: str) -> str:
    """Canonical text of a SQL query for string comparison.

    Keywords and identifiers are lower-cased (SQLite treats both case-insensitively), whitespace is collapsed to
    single spaces between tokens, trailing ``;`` are dropped, ``<>``/``==`` become ``!=``/``=``, and double-quoted
    strings become single-quoted (Spider uses both for string literals). String literal *contents* keep their
    case.
    """
    tokens = []
    for tok in _SQL_TOKEN.findall(s):
        if tok[0] == "'":
            tokens.append(tok)
        elif tok[0] == '"':
            tokens.append("'" + tok[1:-1].replace('""', '"').replace("'", "''") + "'")
        elif tok[0] == "`":
            tokens.append(tok[1:-1].lower())
        else:
            tokens.append(_SQL_ALIASES.get(tok, tok.lower()))
    while tokens and tokens[-1] == ";":
        tokens.pop()
    return " ".join(tokens)


def _has_order_by(sql: str) -> bool:
    return re.search(r"\border by\b", normalize_sql(sql)) is not None


_DENIED = {sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}


def _run_sql(conn: sqlite3.Connection, sql: str, timeout: float) -> list[tuple]:
    """Rows of one query; raises ``sqlite3.Error`` on failure, timeout, or when ``sql`` is not a query."""
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    try:
        cursor = conn.execute(sql.strip().rstrip("; \t\r\n"))
        if cursor.description is None:  # empty text, a comment, or a statement that returns no result set
            raise sqlite3.ProgrammingError("not a query (no result columns)")
        return cursor.fetchall()
    finally:
        conn.set_progress_handler(None, 0)


def _connect_read_only(db_path: str | Path) -> sqlite3.Connection:
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"sqlite database not found: {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in _DENIED else sqlite3.SQLITE_OK)
    return conn


def sql_match(pred: str, ref: str, *, db_path: str | Path | None = None, timeout: float = 5.0) -> bool:
    """Execution match of a predicted SQL query against the reference on a SQLite database.

    With ``db_path``, both queries run on a read-only connection (``mode=ro``, ``query_only``, no ATTACH), each
    with a ``timeout`` in seconds enforced by a progress handler. Results are compared as multisets of rows, or as
    ordered lists when the reference has ``ORDER BY``. A prediction that errors, times out or is not a single
    statement is wrong, even when the reference returns no rows. Without ``db_path``: :func:`normalize_sql`
    string equality.

    Raises:
        FileNotFoundError: ``db_path`` does not exist.
        ValueError: the *reference* query fails or times out (a data problem, not a model error).
    """
    if db_path is None:
        return normalize_sql(pred) == normalize_sql(ref)
    conn = _connect_read_only(db_path)
    try:
        try:
            gold = _run_sql(conn, ref, timeout)
        except (sqlite3.Error, sqlite3.Warning) as err:
            raise ValueError(f"reference SQL failed on {db_path}: {err}: {ref!r}") from None
        try:
            got = _run_sql(conn, pred, timeout)
        except (sqlite3.Error, sqlite3.Warning, OverflowError, ValueError):
            return False
    finally:
        conn.close()
    if _has_order_by(ref):
        return got == gold
    return Counter(got) == Counter(gold)


# ------------------------------------------------------------------------------------------------------ NQ
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def nq_normalize(text: str) -> str:
    """SQuAD answer normalization: lower case, drop punctuation and articles (a/an/the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def nq_match(pred: str, ref: str, *, whole_words: bool = True) -> bool:
    """NQ-Open: correct iff some gold answer, normalized, appears in the normalized prediction.

    Gold answers are separated by ``"; "`` in ``ref``. This is the paper's direction (gold inside the
    generation); the reference code checks the reverse, so an empty generation counts as correct there. Here an
    empty prediction is always wrong. With ``whole_words`` (default) the gold must cover whole words of the
    prediction (``"1"`` is not found in ``"1990"``); ``whole_words=False`` is the paper's plain substring test.
    """
    got = nq_normalize(pred)
    if not got:
        return False
    for answer in ref.split("; "):
        gold = nq_normalize(answer)
        if gold and (f" {gold} " in f" {got} " if whole_words else gold in got):
            return True
    return False


# ------------------------------------------------------------------------------------------------------ labels
def _first_line_label(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return " ".join(first.strip().strip(string.punctuation + " ").lower().split())


def label_match(pred: str, ref: str) -> bool:
    """Classification label match: the prediction's first non-empty line equals the label after lower-casing,
    collapsing whitespace and stripping surrounding punctuation (``"Good."`` matches ``"Good"``, ``"Very Good"``
    does not match ``"Good"``).

    Raises:
        ValueError: the reference label is empty.
    """
    gold = _first_line_label(ref)
    if not gold:
        raise ValueError(f"reference label is empty: {ref!r}")
    return _first_line_label(pred) == gold


SCORERS: dict[str, Callable[..., bool]] = {
    "exact": exact_match,
    "regex": regex_match,
    "gsm8k": gsm8k_match,
    "sql": sql_match,
    "nq": nq_match,
    "label": label_match,
}


KNOWN_DATA_SCORERS: dict[str, tuple[str, str]] = {
    "gsm8k": ("GSM8K", "gsm8k"),
    "spider": ("Spider", "sql"),
    "nq_open": ("Natural Questions", "nq"),
    "natural_questions": ("Natural Questions", "nq"),
    "nlrx": ("NL-RX", "regex"),
    "nl-rx": ("NL-RX", "regex"),
    "nl_rx": ("NL-RX", "regex"),
    "synth_train": ("NL-RX-SYNTH", "regex"),
    "synth_test": ("NL-RX-SYNTH", "regex"),
    "kb13": ("KB13", "regex"),
    "rotten_tomatoes": ("Rotten Tomatoes", "label"),
}
"""Data sets whose answers have a known scorer: a name fragment of the data's path or ``hf:`` id -> (the set, the
scorer). Exact match on them counts only character-identical answers (a regex equal in meaning, a SQL query with
other spacing, a GSM8K answer with its working, an NQ alias all count as wrong)."""


def suggested_scorer(data: str) -> tuple[str, str] | None:
    """``(set name, scorer)`` when ``data`` (a path, ``hf:<id>`` or ``generate:<name>``) names a set of
    :data:`KNOWN_DATA_SCORERS` (case-insensitive, on its last path component or id), else None."""
    name = data.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    if ":" in name:
        name = name.split(":", 1)[1]
    for fragment, known in KNOWN_DATA_SCORERS.items():
        if fragment in name:
            return known
    return None


def scorer_warning(data: str | None, scorer: str) -> str | None:
    """One line when ``scorer`` is ``exact`` on data whose scorer is known to be another one, else None."""
    known = suggested_scorer(data) if data else None
    if scorer != "exact" or known is None or known[1] == "exact":
        return None
    return (f"{data} looks like {known[0]}: generate.scorer=exact counts only character-identical answers; "
            f"its answers are scored with generate.scorer={known[1]}")


def score(task: str, pred: str, ref: str, **kw) -> bool:
    """Score one prediction with the scorer registered for ``task`` (keyword options go to that scorer).

    Raises:
        ValueError: unknown task (the message lists the known ones).
    """
    try:
        scorer = SCORERS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(SCORERS))}") from None
    return scorer(pred, ref, **kw)
