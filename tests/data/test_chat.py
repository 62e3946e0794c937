"""Chat JSONL reading/validation, label masks of tokenize_chat, ChatDataset and HF `messages` datasets."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from conceptlm.core.errors import ConceptLMError, DataError
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.data.chat import (
    IGNORE_INDEX,
    ChatDataset,
    _content_spans,
    field_value,
    read_chat_jsonl,
    tokenize_chat,
)
from conceptlm.data.templates import render_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SYNTH = SHARED / "data" / "llm_jepa" / "synth_train.jsonl"

WORDS = ("lines with words containing a vowel number string dog truck letter lower upper case before after zero "
         "or more times convert natural language to regular expression answer the question good bad").split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    texts += ["\\b([a-z])*\\b (dog.*truck) [0-9]{3,} ~(x) SELECT name FROM t;"] * 20
    return train_bpe_tokenizer(texts, vocab_size=400)


def chat(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def target_runs(enc):
    """Contiguous runs of target tokens, as lists of ids."""
    runs, cur = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ----------------------------------------------------------------------------------------------- tokenize_chat

def test_assistant_labels_hand_checked(tok):
    msgs = chat(("system", "Convert natural language to regular expression."),
                ("user", "lines with the string dog"), ("assistant", ".*dog.*"))
    enc = tokenize_chat(tok, msgs)
    ids, labels = enc["input_ids"], enc["labels"]
    text = render_chat(tok, msgs)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # exactly one BOS
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    last = max(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    # everything before the target is the prompt, ending with the assistant header
    assert tok.decode(ids[:first]) == render_chat(tok, msgs[:2], add_generation_prompt=True)
    assert tok.decode(ids[first:last + 1]) == ".*dog.*<|im_end|>"
    assert ids[last] == tok.convert_tokens_to_ids("<|im_end|>")
    assert all(lab == IGNORE_INDEX for lab in labels[last + 1:])
    assert all(labels[k] == ids[k] for k in range(first, last + 1))


def test_multi_turn_two_assistant_turns(tok):
    msgs = chat(("system", "Answer the question."), ("user", "a dog"), ("assistant", "good dog"),
                ("user", "a truck"), ("assistant", "bad truck"))
    enc = tokenize_chat(tok, msgs)
    runs = target_runs(enc)
    assert [tok.decode(r) for r in runs] == ["good dog<|im_end|>", "bad truck<|im_end|>"]
    n_targets = sum(lab != IGNORE_INDEX for lab in enc["labels"])
    assert n_targets == sum(len(r) for r in runs)


def test_label_mode_all(tok):
    msgs = chat(("user", "a dog"), ("assistant", "good dog"))
    enc = tokenize_chat(tok, msgs, label_mode="all")
    assert enc["labels"][0] == IGNORE_INDEX and enc["input_ids"][0] == tok.bos_token_id
    assert enc["labels"][1:] == enc["input_ids"][1:]
    with pytest.raises(ValueError, match="label_mode"):
        tokenize_chat(tok, msgs, label_mode="prompt")


def test_prefix_path_is_used_for_chatml(tok):
    msgs = chat(("user", "good dog"), ("assistant", "good dog"))
    text = render_chat(tok, msgs)
    spans = _content_spans(tok, msgs, text)
    prompt = render_chat(tok, msgs[:1], add_generation_prompt=True)
    assert spans[1] == (len(prompt), len(prompt) + len("good dog"), "prefix")
    # the identical user content is not mistaken for the assistant turn
    assert [tok.decode(r) for r in target_runs(tokenize_chat(tok, msgs))] == ["good dog<|im_end|>"]


@pytest.fixture()
def counting_tok(tok):
    """A template that writes the number of messages in a header: the prefix property does not hold."""
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{{ bos_token }}[turns={{ messages|length }}]\n"
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    return other


def test_fallback_search_path(counting_tok):
    # The assistant content also occurs in the user message and in the system message: the search must start
    # after the previous message, so neither occurrence is taken.
    msgs = chat(("system", "say dog"), ("user", "dog"), ("assistant", "dog"), ("user", "dog truck"),
                ("assistant", "truck"))
    text = render_chat(counting_tok, msgs)
    assert not text.startswith(render_chat(counting_tok, msgs[:2], add_generation_prompt=True))
    spans = _content_spans(counting_tok, msgs, text)
    assert [s[2] for s in spans] == ["search"] * 5
    a_start = text.index("### assistant: dog") + len("### assistant: ")
    assert spans[2][:2] == (a_start, a_start + 3)
    enc = tokenize_chat(counting_tok, msgs)
    # End of turn here is the tokenizer's EOS (end_of_turn_ids includes it). The byte-level BPE merges the space
    # of the header with the content (" dog" is one token); a token that overlaps the content is a target.
    runs = target_runs(enc)
    assert counting_tok.convert_ids_to_tokens(runs[0]) == ["\u0120dog", "<|endoftext|>"]
    assert [counting_tok.decode(r) for r in runs] == [" dog<|endoftext|>", " truck<|endoftext|>"]


def test_template_without_system_role(tok):
    """Gemma-style: the template rejects 'system'; render_chat folds it into the first user turn."""
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
    )
    msgs = chat(("system", "answer"), ("user", "a dog"), ("assistant", "good dog"), ("user", "truck"),
                ("assistant", "bad"))
    enc = tokenize_chat(other, msgs)
    assert tok.decode(enc["input_ids"]).startswith("<|bos|><|im_start|>user\nanswer\n\na dog<|endoftext|>")
    spans = _content_spans(other, msgs, render_chat(other, msgs))
    assert spans[2][2] == spans[4][2] == "prefix"
    assert [other.decode(r) for r in target_runs(enc)] == ["good dog<|endoftext|>", "bad<|endoftext|>"]


def test_unlocatable_assistant_raises(tok):
    other = copy.deepcopy(tok)
    other.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content']|upper }}"
                           "<|im_end|>{% endfor %}")
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content'.*cannot locate"):
        tokenize_chat(other, chat(("user", "Dog"), ("assistant", "dog")))
    no_eot = copy.deepcopy(tok)
    no_eot.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="no end-of-turn token"):
        tokenize_chat(no_eot, chat(("user", "a"), ("assistant", "dog")))


# ----------------------------------------------------------------------------------------------- read_chat_jsonl

GOOD = {"messages": chat(("system", "s"), ("user", "u"), ("assistant", "a"))}


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    out = []
    for x in lines:
        if isinstance(x, dict):
            x = json.dumps(x)
        out.append(x.encode() if isinstance(x, str) else x)
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def test_read_valid_file_with_blank_lines_and_extra_keys(tmp_path):
    rec2 = {"id": 7, "messages": [{"role": "user", "content": "u2", "name": "x"},
                                  {"role": "assistant", "content": "a2"}]}
    p = write_lines(tmp_path / "ok.jsonl", [GOOD, "", "   ", rec2])
    recs = read_chat_jsonl(p)
    assert recs == [GOOD["messages"], chat(("user", "u2"), ("assistant", "a2"))]
    assert read_chat_jsonl(p, limit=1) == [GOOD["messages"]]


def _msgs(*ms):
    return {"messages": list(ms)}


BAD_CASES = [
    ("invalid_json", b'{"messages": [', None, "invalid JSON"),
    ("not_object", b"[1, 2]", None, "expected a JSON object per line, got list"),
    ("missing_messages", {"msgs": []}, "messages", "missing 'messages'"),
    ("messages_not_list", {"messages": "hi"}, "messages", "non-empty list"),
    ("messages_empty", {"messages": []}, "messages", "non-empty list of messages, got an empty list"),
    ("message_not_object", _msgs({"role": "user", "content": "u"}, "oops"), "messages[1]", "expected an object"),
    ("missing_role", _msgs({"content": "u"}), "messages[0].role", "missing 'role'"),
    ("missing_content", _msgs({"role": "user", "content": "u"}, {"role": "assistant"}), "messages[1].content",
     "missing 'content'"),
    ("role_unknown", _msgs({"role": "bot", "content": "u"}), "messages[0].role", "unknown role 'bot'"),
    ("role_not_string", _msgs({"role": 3, "content": "u"}), "messages[0].role", "expected a string, got integer"),
    ("content_not_string", _msgs({"role": "user", "content": ["u"]}), "messages[0].content",
     "expected a string, got list"),
    ("content_empty", _msgs({"role": "user", "content": "u"}, {"role": "assistant", "content": ""}),
     "messages[1].content", "empty content"),
    ("content_whitespace", _msgs({"role": "user", "content": " \n\t"}, {"role": "assistant", "content": "a"}),
     "messages[0].content", "empty content"),
    ("non_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None, "not valid UTF-8"),
    ("no_assistant", _msgs({"role": "system", "content": "s"}, {"role": "user", "content": "u"}), "messages",
     "no assistant message"),
    ("system_not_first", _msgs({"role": "user", "content": "u"}, {"role": "system", "content": "s"},
                               {"role": "assistant", "content": "a"}), "messages[1].role",
     "only allowed as the first"),
]


@pytest.mark.parametrize("name,bad,field,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_names_path_line_field(tmp_path, tok, name, bad, field, reason):
    # good record on line 1, blank line 2, bad record on line 3, good record on line 4
    p = write_lines(tmp_path / f"{name}.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as info:
        read_chat_jsonl(p)
    err = info.value
    msg = str(err)
    assert msg.startswith(f"{p}:3: ")
    assert (err.path, err.line, err.field) == (p, 3, field)
    if field is None:
        assert "field" not in msg
    else:
        assert f"field '{field}'" in msg
    assert reason in msg
    # nothing partial: the dataset refuses the whole file too
    with pytest.raises(DataError, match=":3: "):
        ChatDataset(p, tok, max_length=64)


def test_bad_utf8_reports_offset(tmp_path):
    p = write_lines(tmp_path / "u.jsonl", [b'{"messages": "\xff"}'])
    with pytest.raises(DataError, match=r"u\.jsonl:1: not valid UTF-8 \(bad byte at offset 14 of the line\)"):
        read_chat_jsonl(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------- ChatDataset

def test_dataset_from_path_and_records(tmp_path, tok):
    recs = [chat(("user", "a dog"), ("assistant", "good dog")), chat(("user", "truck"), ("assistant", "bad"))]
    p = write_lines(tmp_path / "d.jsonl", [{"messages": r} for r in recs])
    a = ChatDataset(p, tok, max_length=64)
    b = ChatDataset([{"messages": recs[0]}, recs[1]], tok, max_length=64)
    assert len(a) == len(b) == 2 and a.skipped == 0
    for i in range(2):
        assert a[i] == b[i] == tokenize_chat(tok, recs[i])
        assert a.lengths[i] == len(a[i]["input_ids"])
    assert a.records == recs and a.source_lines == [1, 2]
    with pytest.raises(DataError, match=r"<records>:2: field 'messages\[1\]\.role'"):
        ChatDataset([recs[0], chat(("user", "x"), ("robot", "y"))], tok, max_length=64)
    with pytest.raises(DataError, match=r"^nlrx\[train\]:1: field 'messages': missing"):
        ChatDataset([{"msgs": []}], tok, max_length=64, name="nlrx[train]")


def _long_records():
    short = chat(("user", "dog"), ("assistant", "good"))
    long = chat(("user", " ".join(["lines with words"] * 30)), ("assistant", "regular expression"))
    return [short, long, short]


def test_too_long_error(tmp_path, tok):
    p = write_lines(tmp_path / "long.jsonl", [{"messages": r} for r in _long_records()])
    n = len(tokenize_chat(tok, _long_records()[1])["input_ids"])
    with pytest.raises(DataError) as info:
        ChatDataset(p, tok, max_length=32)
    assert str(info.value).startswith(f"{p}:2: field 'messages': sequence has {n} tokens, model context is 32")


def test_too_long_skip(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="conceptlm.data.chat"):
        ds = ChatDataset(_long_records(), tok, max_length=32, on_too_long="skip")
    assert len(ds) == 2 and ds.skipped == 1 and ds.source_lines == [1, 3]
    assert "skipped 1 of 3 records" in caplog.text


def test_too_long_truncate(tok, caplog):
    recs = _long_records()
    full = tokenize_chat(tok, recs[1])
    # the long record's assistant turn is entirely past position 32: nothing left to learn, so it is dropped
    assert all(lab == IGNORE_INDEX for lab in full["labels"][:32])
    with caplog.at_level(logging.WARNING, logger="conceptlm.data.chat"):
        ds = ChatDataset(recs, tok, max_length=32, on_too_long="truncate")
    assert len(ds) == 2 and ds.skipped == 1 and "1 with no target token" in caplog.text
    # a budget that keeps part of the answer keeps a right-truncated example
    first_target = next(k for k, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX)
    cut = first_target + 2
    ds = ChatDataset(recs, tok, max_length=cut, on_too_long="truncate")
    assert ds.skipped == 0 and ds.lengths[1] == cut
    assert ds[1]["input_ids"] == full["input_ids"][:cut] and ds[1]["labels"] == full["labels"][:cut]


def test_progress_bar_only_for_long_work(tok, capsys, monkeypatch):
    import conceptlm.data.chat as chat_mod

    assert chat_mod.PROGRESS_MIN_RECORDS == 2000
    monkeypatch.setattr(chat_mod, "PROGRESS_MIN_RECORDS", 10)  # same rule, smaller numbers (fast test)
    recs = [chat(("user", "d"), ("assistant", "g"))] * 11
    monkeypatch.delenv("CONCEPTLM_NO_PROGRESS", raising=False)
    ChatDataset(recs, tok, max_length=32)
    assert "tokenizing" in capsys.readouterr().err
    monkeypatch.setenv("CONCEPTLM_NO_PROGRESS", "1")
    ChatDataset(recs, tok, max_length=32)
    monkeypatch.delenv("CONCEPTLM_NO_PROGRESS")
    ChatDataset(recs[:10], tok, max_length=32)
    assert "tokenizing" not in capsys.readouterr().err


@pytest.mark.skipif(not SYNTH.is_file(), reason=f"shared data not present ({SYNTH})")
def test_shared_synth_first_200(tok):
    torch.manual_seed(0)
    ds = ChatDataset(SYNTH, tok, max_length=512, limit=200)
    assert len(ds) == 200 and ds.skipped == 0
    for i in (0, 57, 199):
        runs = target_runs(ds[i])
        assert len(runs) == 1
        assert tok.decode(runs[0]) == ds.records[i][-1]["content"] + "<|im_end|>"


# ----------------------------------------------------------------------------------------------- HF datasets

def test_hf_messages_column(tmp_path):
    pytest.importorskip("datasets")
    from conceptlm.data.hf_datasets import load_hf_records

    recs = [chat(("system", "s"), ("user", "u"), ("assistant", "a")), chat(("user", "u2"), ("assistant", "a2"))]
    p = write_lines(tmp_path / "m.jsonl", [{"messages": r, "id": i} for i, r in enumerate(recs)])
    assert load_hf_records(str(p), cache_dir=str(tmp_path / "c")) == read_chat_jsonl(p) == recs
    assert load_hf_records(str(p), limit=1, cache_dir=str(tmp_path / "c")) == recs[:1]
    bad = write_lines(tmp_path / "bad.jsonl", [{"messages": recs[0]},
                                               {"messages": chat(("user", "u"), ("assistant", "  "))}])
    with pytest.raises(DataError, match=rf"{bad}:2: field 'messages\[1\]\.content': empty content"):
        load_hf_records(str(bad), cache_dir=str(tmp_path / "c"))
    missing = write_lines(tmp_path / "miss.jsonl", [{"messages": recs[0]},
                                                    {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=rf"{missing}:2: field 'messages\[0\]\.content': missing"):
        load_hf_records(str(missing), cache_dir=str(tmp_path / "c"))


def test_hf_errors(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from conceptlm.data.hf_datasets import load_hf_records

    p = write_lines(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="no 'messages' or 'text' column \\(columns: question, answer\\)"):
        load_hf_records(str(p), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="could not load"):
        load_hf_records(str(tmp_path / "no_such_dir"), cache_dir=str(tmp_path / "c"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ConceptLMError, match="pip install datasets"):
        load_hf_records(str(p))


def test_field_value_walks_a_dotted_path():
    obj = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "n": {"a": 1}}
    assert field_value(obj, "messages.1.content") == "yo"
    assert field_value(obj, "messages.-2.role") == "user"
    assert field_value(obj, "n.a") == 1
    for missing, part in [("messages.2.content", "2"), ("messages.--1", "--1"), ("n.b", "b"), ("messages.x", "x"),
                          ("n.a.b", "b")]:
        with pytest.raises(KeyError) as err:
            field_value(obj, missing)
        assert err.value.args == (part,)
