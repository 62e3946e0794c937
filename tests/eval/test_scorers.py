"""Task scorers: hand-checked verdicts, including the cases where the reference evaluate.py is wrong."""

from __future__ import annotations

import random
import sqlite3
import time

import pytest

from conceptlm.eval.scorers import (
    SCORERS,
    exact_match,
    gsm8k_extract,
    gsm8k_match,
    label_match,
    normalize_sql,
    nq_match,
    nq_normalize,
    regex_match,
    score,
    scorer_warning,
    sql_match,
    suggested_scorer,
)


def test_registry_and_dispatch():
    assert set(SCORERS) == {"exact", "regex", "gsm8k", "sql", "nq", "label"}
    assert score("exact", " a\n", "a") is True
    assert score("nq", "it was Vancouver", "Vancouver") is True
    assert score("sql", "select 1", "SELECT 1;") is True
    with pytest.raises(ValueError, match="unknown task 'spider'; known tasks: exact, gsm8k, label, nq, regex, sql"):
        score("spider", "a", "b")


def test_exact_match():
    assert exact_match("  .*dog.*\n", ".*dog.*")
    assert not exact_match("(.*dog.*)", ".*dog.*")
    assert not exact_match("Good", "good")


# ------------------------------------------------------------------------------------------------------ regex
def test_regex_match_is_semantic():
    assert regex_match("(.*dog.*)", ".*dog.*")  # exact match would say no
    assert regex_match(" ([a-z])&([AEIOUaeiou]) ", "[aeiou]")
    assert regex_match("~((dog.*[0-9].*){3,})", "~((dog.*[0-9].*)(dog.*[0-9].*)(dog.*[0-9].*)+)")
    assert not regex_match(".*dog.*dog.*", ".*dog.*")
    assert not regex_match(r".*dog.*", r".*\bdog\b.*")


@pytest.mark.parametrize("pred", [
    "", "(.*dog.*", ".*dog.*)", "a||b", "|", "~", "[a-z", "{3,}", "The regular expression is `.*dog.*`",
    "((((((((((", "\\", "a{5,2}", "(" * 3000 + "a" + ")" * 3000,
])
def test_regex_match_malformed_prediction_is_wrong_not_a_crash(pred):
    assert regex_match(pred, ".*dog.*") is False


def test_regex_match_fuzz_never_raises():
    rng = random.Random(7)
    tokens = ["dog", ".", ".*", "[a-z]", "[0-9]", "(", ")", "(", ")", "|", "&", "~", "*", "+", "{2,}", "\\b", "]"]
    chars = "()[]{}|&~*+?.\\^-,0123abdz AEZ\n"
    for _ in range(300):
        from_tokens = "".join(rng.choice(tokens) for _ in range(rng.randint(1, 12)))
        from_chars = "".join(rng.choice(chars) for _ in range(rng.randint(0, 25)))
        for pred in (from_tokens, from_chars):
            assert regex_match(pred, r".*\bdog\b.*", timeout=1.0) in (True, False)
    assert regex_match(r"(.*\bdog\b.*)", r".*\bdog\b.*") is True


def test_regex_match_undecided_is_wrong():
    hard = "(a|b)*a(a|b){22}"
    start = time.monotonic()
    assert regex_match(hard, hard + "b*", timeout=0.1) is False
    assert time.monotonic() - start < 5.0


def test_regex_match_bad_reference_raises():
    with pytest.raises(ValueError, match="reference regex is malformed"):
        regex_match(".*", "(.*")


# ------------------------------------------------------------------------------------------------------ GSM8K
GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("text, expected", [
    (GOLD, "72"),
    ("#### 72\n\nQuestion: Tom has 5 apples.", "72"),  # trailing text after the answer line (reference: wrong)
    ("She has $1,000.50 left.\n#### $1,000.50", "1000.5"),
    ("#### 3.0", "3"),
    ("#### -4", "-4"),
    ("pages 3-4", "4"),
    ("So she sold 72 clips in total.", "72"),  # no ####: the last number
    ("1,234,567 people", "1234567"),
    ("#### The answer is 18 eggs", "18"),
    ("#### eighteen", "eighteen"),
    ("no numbers here", None),
    ("", None),
])
def test_gsm8k_extract(text, expected):
    assert gsm8k_extract(text) == expected


def test_gsm8k_match():
    assert gsm8k_match("48/2 = 24, 48+24 = 72.\n#### 72\nQuestion: next one? #### 5", GOLD)
    assert gsm8k_match("The total is 72.0 clips.", GOLD)
    assert gsm8k_match("#### 72", "work\n#### 72")
    assert not gsm8k_match("#### 71", GOLD)
    assert not gsm8k_match("#### 720", GOLD)
    assert not gsm8k_match("", GOLD)
    assert gsm8k_match("#### 1,000", "#### 1000")
    with pytest.raises(ValueError, match="no GSM8K answer"):
        gsm8k_match("#### 1", "no answer")


# ------------------------------------------------------------------------------------------------------ SQL
def test_normalize_sql():
    assert normalize_sql("SELECT count(*) FROM Singer WHERE a <> 'X' ;") == \
        "select count ( * ) from singer where a != 'X'"
    assert normalize_sql('SELECT T2.name FROM Friend AS T1 JOIN Highschooler AS T2 ON T1.student_id  =  T2.id;') \
        == normalize_sql("select t2.name from friend as t1 join highschooler as t2 on t1.student_id = t2.id")
    assert normalize_sql('select * from t where name = "Joe"') == "select * from t where name = 'Joe'"
    assert normalize_sql("select * from t where name = 'Joe'") != normalize_sql("select * from t where name = 'joe'")


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "concert_singer.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE singer (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, country TEXT)")
    conn.executemany("INSERT INTO singer VALUES (?, ?, ?, ?)", [
        (1, "Joe", 52, "France"), (2, "Ann", 29, "Netherlands"), (3, "Tribal", 43, "France"),
        (4, "Rose", 41, "United States"),
    ])
    conn.commit()
    conn.close()
    return path


def test_sql_match_without_db_is_normalized_exact():
    assert sql_match("select name from singer;", "SELECT name  FROM singer")
    assert not sql_match("select name from singer where age > 30", "select name from singer where age > 40")


def test_sql_match_executes(db):
    ref = "SELECT name FROM singer WHERE age > 42"  # Joe (52), Tribal (43)
    assert sql_match("select NAME from SINGER where age > 42;", ref, db_path=db)
    assert sql_match("SELECT name FROM singer WHERE NOT age <= 42", ref, db_path=db)  # different text, same rows
    assert sql_match("SELECT name FROM singer WHERE age >= 43", ref, db_path=db)
    assert sql_match("SELECT name FROM singer WHERE age > 42 ORDER BY name DESC", ref, db_path=db)  # order-free
    assert not sql_match("SELECT name FROM singer WHERE age > 40", ref, db_path=db)  # + Rose (41)
    assert not sql_match("SELECT name FROM singer WHERE age > 50", ref, db_path=db)  # Joe only
    assert not sql_match("SELECT name, age FROM singer WHERE age > 42", ref, db_path=db)


def test_sql_match_order_by_and_multisets(db):
    ref = "SELECT name FROM singer ORDER BY age"
    assert sql_match("SELECT name FROM singer ORDER BY age ASC", ref, db_path=db)
    assert not sql_match("SELECT name FROM singer ORDER BY age DESC", ref, db_path=db)
    assert not sql_match("SELECT name FROM singer", ref, db_path=db)
    # duplicates count: France appears twice
    assert not sql_match("SELECT DISTINCT country FROM singer", "SELECT country FROM singer", db_path=db)
    assert sql_match("SELECT country FROM singer ORDER BY id DESC", "SELECT country FROM singer", db_path=db)
    assert sql_match("SELECT count(*) FROM singer", "SELECT COUNT(id) FROM singer", db_path=db)
    assert sql_match("SELECT 4.0", "SELECT count(*) FROM singer", db_path=db)  # numeric values compare by value


def test_sql_error_never_matches_empty_result(db):
    empty_ref = "SELECT name FROM singer WHERE age > 100"
    assert sql_match("SELECT name FROM singer WHERE age > 99", empty_ref, db_path=db)  # empty vs empty, both ran
    assert not sql_match("SELECT nme FROM singer", empty_ref, db_path=db)  # reference code: "match"
    assert not sql_match("SELEC name FROM singer", empty_ref, db_path=db)
    assert not sql_match("", empty_ref, db_path=db)
    assert not sql_match("-- nothing", empty_ref, db_path=db)
    assert not sql_match("SELECT 1; SELECT 2", "SELECT 1", db_path=db)


def test_sql_read_only_and_no_attach(db, tmp_path):
    assert not sql_match("DELETE FROM singer", "SELECT name FROM singer WHERE age > 100", db_path=db)
    assert not sql_match("DROP TABLE singer", "SELECT 1", db_path=db)
    other = tmp_path / "other.sqlite"
    assert not sql_match(f"ATTACH DATABASE '{other}' AS x", "SELECT 1", db_path=db)
    assert not other.exists()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM singer").fetchone() == (4,)
    conn.close()


def test_sql_timeout(db):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    start = time.monotonic()
    assert not sql_match(endless, "SELECT 4", db_path=db, timeout=0.2)
    assert time.monotonic() - start < 5.0


def test_sql_reference_errors_and_missing_db(db, tmp_path):
    with pytest.raises(ValueError, match="reference SQL failed"):
        sql_match("SELECT 1", "SELECT nope FROM singer", db_path=db)
    with pytest.raises(ValueError, match="not a query"):
        sql_match("SELECT 1", "  ", db_path=db)
    assert sql_match("SELECT 1 ;; \n", "SELECT 1", db_path=db)  # trailing semicolons are not extra statements
    with pytest.raises(FileNotFoundError, match="not found"):
        sql_match("SELECT 1", "SELECT 1", db_path=tmp_path / "missing.sqlite")


# ------------------------------------------------------------------------------------------------------ NQ
def test_nq_normalize():
    assert nq_normalize("The  Quick, brown fox.") == "quick brown fox"
    assert nq_normalize("An apple a day") == "apple day"
    assert nq_normalize("Gert Fröbe") == "gert fröbe"


def test_nq_match_gold_in_prediction():
    assert nq_match("It was filmed in Vancouver.", "Vancouver")
    assert nq_match("drew carey", "Bill Cullen; Drew Carey; Bob Barker")  # any of the gold answers
    assert nq_match("The Beatles!", "the Beatles")
    assert not nq_match("Toronto", "Vancouver")


def test_nq_match_fixes_the_reversed_reference_direction():
    assert not nq_match("", "Vancouver")  # reference: "" in gold -> correct
    assert not nq_match("   ", "Vancouver")
    assert not nq_match("the", "Vancouver")  # normalizes to empty
    assert not nq_match("Drew", "Drew Carey")  # reference: "Drew" in "Drew Carey" -> correct


def test_nq_match_whole_words():
    assert not nq_match("in 1990", "1")
    assert nq_match("in 1990", "1", whole_words=False)  # the paper's plain substring test
    assert nq_match("born in 1990 in Paris", "1990")


# ------------------------------------------------------------------------------------------------------ labels
def test_label_match():
    assert label_match("Good", "Good")
    assert label_match(" good.\nBecause the plot is fun.", "Good")
    assert label_match("\nVery  Good!", "Very Good")
    assert not label_match("Very Good", "Good")
    assert not label_match("Good", "Very Good")
    assert not label_match("Mediocre", "Bad")
    assert not label_match("", "Bad")
    assert not label_match("Bad movie overall", "Bad")
    with pytest.raises(ValueError, match="reference label is empty"):
        label_match("Good", "  ")


# ------------------------------------------------------------------------------------------------------ safety
@pytest.mark.parametrize("data, known", [
    ("../shared/data/llm_jepa/synth_test.jsonl", ("NL-RX-SYNTH", "regex")),
    ("generate:nlrx", ("NL-RX", "regex")),
    ("hf:openai/gsm8k", ("GSM8K", "gsm8k")),
    ("hf:gsm8k", ("GSM8K", "gsm8k")),
    ("data/Spider_dev.jsonl", ("Spider", "sql")),
    ("C:\\data\\nq_open_train.jsonl", ("Natural Questions", "nq")),
    ("hf:rotten_tomatoes", ("Rotten Tomatoes", "label")),
    ("my_answers.jsonl", None),
    ("spider/notes.jsonl", None),  # only the last path component names the data
])
def test_suggested_scorer_by_data_name(data, known):
    assert suggested_scorer(data) == known


def test_exact_on_data_with_a_known_scorer_warns_in_one_line():
    msg = scorer_warning("generate:nlrx", "exact")
    assert msg == ("generate:nlrx looks like NL-RX: generate.scorer=exact counts only character-identical answers; "
                   "its answers are scored with generate.scorer=regex")
    assert scorer_warning("generate:nlrx", "regex") is None  # the right scorer: nothing to say
    assert scorer_warning("hf:gsm8k", "sql") is None  # a deliberate other scorer is the user's choice
    assert scorer_warning("mine.jsonl", "exact") is None
    assert scorer_warning(None, "exact") is None
