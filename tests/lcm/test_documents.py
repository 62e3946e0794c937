"""Documents: the structured generator (deterministic, learnable structure) and text/JSONL readers with one-line
errors or counted skips."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError, DataError
from conceptlm.lcm.config import DocsSection
from conceptlm.lcm.data.documents import SCRIPTS, generate_document, iter_documents
from conceptlm.lcm.data.segment import get_segmenter

SHARED_YELP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"


def test_generator_is_deterministic_and_prefix_stable():
    a = list(iter_documents(DocsSection(n_documents=30, seed=3)))
    b = list(iter_documents(DocsSection(n_documents=30, seed=3)))
    c = list(iter_documents(DocsSection(n_documents=10, seed=3)))
    d = list(iter_documents(DocsSection(n_documents=30, seed=4)))
    assert a == b and a[:10] == c
    assert [t for _, t in a] != [t for _, t in d]
    assert len({i for i, _ in a}) == 30 and a[0][0] == "gen-3-000000"


def test_generated_documents_have_structure():
    seg = get_segmenter()
    docs = [generate_document(0, i) for i in range(300)]
    linked = later = 0
    openers = Counter()
    for text in docs:
        sents = seg.split(text)
        assert 5 <= len(sents) <= 14 and all(s[0].isupper() or s[0].isdigit() for s in sents)
        # entities and content words of earlier sentences come back in later ones
        seen: set[str] = set()
        for k, s in enumerate(sents):
            words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", s)}
            if k:
                later += 1
                linked += bool(words & seen)
            seen |= words
        openers[" ".join(sents[0].split()[:2])] += 1
    assert linked / later > 0.75
    assert len(SCRIPTS) == 5 and len(set(docs)) > 280 and len(openers) >= 5


def test_jsonl_dotted_field_ids_and_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"messages": [{"content": "sys"}, {"content": f"Doc {i}. Second."}], "key": f"k{i}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "\n" +
                    "".join(json.dumps(r) + "\n" for r in rows[2:]), encoding="utf-8")
    docs = list(iter_documents(DocsSection(source=str(path), text_field="messages.1.content", limit=3)))
    assert docs == [("d.jsonl:1", "Doc 0. Second."), ("d.jsonl:2", "Doc 1. Second."), ("d.jsonl:4", "Doc 2. Second.")]
    by_key = list(iter_documents(DocsSection(source=str(path), text_field="messages.-1.content", id_field="key")))
    assert [i for i, _ in by_key] == [f"k{i}" for i in range(5)]


def test_txt_split_modes_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("First para.\nStill first.\n\n\nSecond para.\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "From JSONL."}) + "\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x", encoding="utf-8")
    a = tmp_path / "a.txt"
    assert list(iter_documents(DocsSection(source=str(a)))) == [
        ("a.txt:1", "First para.\nStill first."), ("a.txt:5", "Second para.")]
    assert list(iter_documents(DocsSection(source=str(a), txt_split="lines"))) == [
        ("a.txt:1", "First para."), ("a.txt:2", "Still first."), ("a.txt:5", "Second para.")]
    assert [i for i, _ in iter_documents(DocsSection(source=str(a), txt_split="file"))] == ["a.txt:1"]
    assert [i for i, _ in iter_documents(DocsSection(source=str(tmp_path)))] == ["a.txt:1", "a.txt:5", "b.jsonl:1"]


def test_unescape():
    text = list(iter_documents(DocsSection(source="generated", n_documents=1)))[0][1]
    assert "\\n" not in text
    from conceptlm.lcm.data.documents import _unescape

    assert _unescape('a\\n\\nb \\"q\\" \\t') == 'a\n\nb "q" \t'


@pytest.mark.parametrize("line,needle", [
    (b'{"text": "ok"}\n{"text": "bad \xff byte"}\n', "d.jsonl:2: not valid UTF-8"),
    (b'{"text": "ok"}\n{"text": \n', "d.jsonl:2: invalid JSON"),
    (b'{"text": "ok"}\n{"other": "x"}\n', "d.jsonl:2: field 'text': missing"),
    (b'{"text": "ok"}\n{"text": 5}\n', "d.jsonl:2: field 'text': expected a string, got int"),
    (b'{"text": "ok"}\n{"text": "   "}\n', "d.jsonl:2: field 'text': empty document"),
])
def test_bad_jsonl_is_one_line_error_or_counted_skip(tmp_path, line, needle):
    path = tmp_path / "d.jsonl"
    path.write_bytes(line)
    with pytest.raises(DataError) as e:
        list(iter_documents(DocsSection(source=str(path))))
    assert needle in str(e.value) and "\n" not in str(e.value)
    skipped = Counter()
    docs = list(iter_documents(DocsSection(source=str(path)), skip_bad=True, skipped=skipped))
    assert docs == [("d.jsonl:1", "ok")] and sum(skipped.values()) == 1


def test_bad_txt_file_error_and_skip(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good line\n\nbad \xfe\n")
    (tmp_path / "b.txt").write_text("Fine.", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.txt:3: not valid UTF-8"):
        list(iter_documents(DocsSection(source=str(tmp_path))))
    skipped = Counter()
    assert list(iter_documents(DocsSection(source=str(tmp_path)), skip_bad=True, skipped=skipped)) == [
        ("b.txt:1", "Fine.")]
    assert skipped == Counter(bad_file=1)


def test_section_validation_names_the_field(tmp_path):
    from conceptlm.lcm.config import PrepareConfig

    with pytest.raises(ConfigError, match="docs.source") as e:
        load_config(PrepareConfig, None, [f"docs.source={tmp_path / 'missing.jsonl'}"])
    assert "\n" not in str(e.value)
    (tmp_path / "x.csv").write_text("a", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a .txt or .jsonl"):
        load_config(PrepareConfig, None, [f"docs.source={tmp_path / 'x.csv'}"])


def test_yelp_reviews_read():
    if not SHARED_YELP.is_file():
        pytest.skip(f"shared data not available ({SHARED_YELP})")
    docs = list(iter_documents(DocsSection(source=str(SHARED_YELP), text_field="messages.1.content", unescape=True,
                                           limit=100)))
    assert len(docs) == 100 and all(t.strip() for _, t in docs)
    assert docs[0][0] == "yelp_test.jsonl:1" and "\\n" not in docs[0][1]


# ------------------------------------------------------------------------------------------------ instructions
def test_instruction_records_become_source_marker_answer(tmp_path):
    from conceptlm.lcm.config import PrepareSection
    from conceptlm.lcm.data.documents import split_instruction
    from conceptlm.lcm.data.prepare import segment_document

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"article": "The cat sat. It was warm.", "summary": "A warm cat."}) + "\n"
                    + json.dumps({"article": "No summary here."}) + "\n", encoding="utf-8")
    sec = DocsSection(source=str(path), text_field="article", target_field="summary")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'summary': missing"):
        list(iter_documents(sec))
    skipped = Counter()
    docs = list(iter_documents(sec, skip_bad=True, skipped=skipped))
    assert len(docs) == 1 and skipped["bad_record"] == 1
    assert split_instruction(docs[0][1], "[MODEL]:") == ("The cat sat. It was warm.", "A warm cat.")
    pieces = segment_document("d", docs[0][1], get_segmenter(), PrepareSection(), marker="[MODEL]:")
    assert pieces == [("d", ["The cat sat.", "It was warm.", "[MODEL]:", "A warm cat.", "End of text."])]
    # too long for the cap: the first source sentences go, the marker and the answer stay
    capped = segment_document("d", docs[0][1], get_segmenter(), PrepareSection(max_sentences=4), marker="[MODEL]:")
    assert capped == [("d", ["It was warm.", "[MODEL]:", "A warm cat.", "End of text."])]


def test_generated_summaries_are_the_lead_and_the_last_sentence():
    from conceptlm.lcm.data.documents import split_instruction

    text = generate_document(0, 3, task="summary")
    source, answer = split_instruction(text, "[MODEL]:")
    assert source == generate_document(0, 3)
    sentences = get_segmenter().split(source)
    assert answer == f"{sentences[0]} {sentences[-1]}"


# ------------------------------------------------------------------------------------------------ streaming
def _whole_text_docs(path, split: str) -> list[tuple[str, str]]:
    """The reference: the documents of a text file read whole (``str.splitlines`` of its text)."""
    text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    out, block, start = [], [], 0
    for no, line in enumerate(text.splitlines(), start=1):
        if split == "lines":
            if line.strip():
                out.append((f"{path.name}:{no}", line))
        elif line.strip():
            start = start if block else no
            block.append(line)
        elif block:
            out.append((f"{path.name}:{start}", "\n".join(block)))
            block = []
    return out + ([(f"{path.name}:{start}", "\n".join(block))] if block else [])


def test_text_files_are_streamed_with_the_same_documents_and_error_lines(tmp_path):
    from conceptlm.lcm.data import documents as docs_mod

    path = tmp_path / "t.txt"
    text = "\ufeffOne. Two.\r\nthree\x0bfour\n\n\u2028five\x85six\r\n\n\nlast line without newline"
    path.write_bytes(text.encode("utf-8"))
    for split in ("lines", "paragraphs"):
        got = list(iter_documents(DocsSection(source=str(path), txt_split=split)))
        assert got == _whole_text_docs(path, split) and len(got) >= 3
    # the UTF-8 check reads in chunks: a bad byte anywhere, a sequence cut by a chunk end, a truncated end
    for raw, line in ((b"a\nb\n\xfe\n", 3), ("a\nb\u00e9\n".encode() + b"\n\xc3", 4), (b"\xff", 1)):
        path.write_bytes(raw)
        assert docs_mod._first_bad_utf8_line(path) == line
        with pytest.raises(DataError, match=rf"t\.txt:{line}: not valid UTF-8"):
            list(iter_documents(DocsSection(source=str(path))))
    big = tmp_path / "big.txt"  # a 2-byte character across the 1 MiB chunk boundary, the bad byte after it
    big.write_bytes(b"x" * ((1 << 20) - 1) + "\u00e9".encode() + b"\n\n\xfe")
    assert docs_mod._first_bad_utf8_line(big) == 3
    big.write_bytes(b"x\n" * ((1 << 19) - 1) + b"y" + "\u00e9".encode() + b"\nz")
    assert docs_mod._first_bad_utf8_line(big) is None


def test_parquet_rows_are_documents_like_jsonl_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "msg": {"text": f"Document {i}. It has two sentences."}} for i in range(600)]
    rows[5]["msg"]["text"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=100)
    with (tmp_path / "d.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    sec = {"text_field": "msg.text", "id_field": "id"}
    with pytest.raises(DataError, match=r"d\.parquet:6: field 'msg.text': expected a string"):
        list(iter_documents(DocsSection(source=str(tmp_path / "d.parquet"), **sec)))
    skipped_p, skipped_j = Counter(), Counter()
    from_parquet = list(iter_documents(DocsSection(source=str(tmp_path / "d.parquet"), **sec), skip_bad=True,
                                       skipped=skipped_p))
    from_jsonl = list(iter_documents(DocsSection(source=str(tmp_path / "d.jsonl"), **sec), skip_bad=True,
                                     skipped=skipped_j))
    assert from_parquet == from_jsonl and len(from_parquet) == 599 and skipped_p == skipped_j == Counter(bad_record=1)
    no_ids = list(iter_documents(DocsSection(source=str(tmp_path / "d.parquet"), text_field="msg.text", limit=3)))
    assert [i for i, _ in no_ids] == ["d.parquet:1", "d.parquet:2", "d.parquet:3"]
