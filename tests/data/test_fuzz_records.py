"""Fuzzing chat / JEPA JSONL records: building the SFT ChatDataset or the JEPA dataset of a mutated file either
succeeds or raises a one-line ConceptLMError naming the file and the line, never another exception.

Seeded (``random.Random``): a failure message gives the seed and case to reproduce it. Also a few end-to-end CLI
cases: exit code 2, one stderr line, and no run folder.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

from conceptlm.core.errors import ConceptLMError
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.data.chat import ChatDataset
from conceptlm.jepa.config import ViewConfig
from conceptlm.jepa.data import JepaDataset
from conceptlm.jepa.views import add_predictor_tokens
from tests.conftest import WORDS, make_chat_records, tiny_overrides, write_jsonl

CASES_PER_SEED = 40
SEEDS = range(10)  # 400 files, each built as SFT and as JEPA data
MAX_LENGTH = 96

STRICT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def toks():
    """(ChatML tokenizer, the same with a strict alternating-roles template); both with 2 predictor tokens."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(300)]
    texts += ["(a|b)* [0-9]{3,} .*dog.* \\b"] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=320)
    add_predictor_tokens(tok, None, 2)
    strict = copy.deepcopy(tok)
    strict.chat_template = STRICT_TEMPLATE
    return tok, strict


# ------------------------------------------------------------------------------------------------ mutations

ODD_STRINGS = ["", " ", "\n\t", "x" * 3000, "dog " * 60, "\ud800", "a\udfffb", "\ud83d\ude00 emoji", "\x00nul",
               "<|im_end|>", "<|im_start|>assistant\n", "<|predictor_1|>", "<|bos|>", "<|endoftext|>", "\u00a7",
               "\u00b6", "\u202eRTL", "\r\n", "{{ messages }}", "{% raw %}", "\\", '"', "caf\u00e9"]
ODD_VALUES = [None, 0, -1, 1.5, float("inf"), True, False, [], {}, [[]], [[["deep"]]], {"role": "user"},
              ["a", "b"], "x", 10 ** 30]
ROLES = ["system", "user", "assistant", "tool", "System", "", "model", "function", " user"]


def odd_value(rng: random.Random):
    return rng.choice(ODD_VALUES + ODD_STRINGS)


def mutate_message(rng: random.Random, msg: dict) -> dict:
    msg = dict(msg)
    kind = rng.randrange(7)
    if kind == 0:
        msg.pop(rng.choice(["role", "content"]), None)
    elif kind == 1:
        msg[rng.choice(["role", "content"])] = odd_value(rng)
    elif kind == 2:
        msg["role"] = rng.choice(ROLES)
    elif kind == 3:
        msg["content"] = rng.choice(ODD_STRINGS)
    elif kind == 4:
        s = msg.get("content") if isinstance(msg.get("content"), str) else "dog"
        i = rng.randint(0, len(s))
        msg["content"] = s[:i] + rng.choice(ODD_STRINGS) + s[i:]
    elif kind == 5:
        msg[rng.choice(["name", "extra", "weight", "tool_calls"])] = odd_value(rng)
    else:
        return odd_value(rng)  # the message itself is not an object
    return msg


def mutate_record(rng: random.Random, rec: dict):
    """One structural mutation (possibly several) of a valid record, as a JSON-able value."""
    rec = copy.deepcopy(rec)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.randrange(12)
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if kind == 0:
            rec.pop("messages", None) if isinstance(rec, dict) else None
        elif kind == 1 and isinstance(rec, dict):
            rec["messages"] = odd_value(rng)
        elif kind in (2, 3, 4) and isinstance(msgs, list) and msgs:
            i = rng.randrange(len(msgs))
            msgs[i] = mutate_message(rng, msgs[i]) if isinstance(msgs[i], dict) else odd_value(rng)
        elif kind == 5 and isinstance(msgs, list) and msgs:
            del msgs[rng.randrange(len(msgs))]
        elif kind == 6 and isinstance(msgs, list):
            msgs.insert(rng.randint(0, len(msgs)), {"role": rng.choice(ROLES), "content": rng.choice(ODD_STRINGS)})
        elif kind == 7 and isinstance(msgs, list) and len(msgs) > 1:
            rng.shuffle(msgs)
        elif kind == 8 and isinstance(rec, dict):
            rec[rng.choice(["text", "code"])] = odd_value(rng)
        elif kind == 9 and isinstance(rec, dict):
            n = rng.randint(0, 4)
            rec["views"] = [rng.choice(ODD_STRINGS + ["a dog", "lines with a dog"]) if rng.random() < 0.5
                            else odd_value(rng) for _ in range(n)] if rng.random() < 0.8 else odd_value(rng)
        elif kind == 10 and isinstance(rec, dict):
            rec[rng.choice(["id", "meta", "source"])] = odd_value(rng)
        elif kind == 11:
            rec = rng.choice([odd_value(rng), [rec], "messages"])
    return rec


def encode_line(rng: random.Random, value) -> bytes:
    """JSON-encode, then maybe corrupt at the byte level."""
    raw = json.dumps(value, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
    kind = rng.randrange(8)
    if kind == 0 and raw:
        raw = raw[: rng.randrange(len(raw))]  # truncated line
    elif kind == 1:
        i = rng.randint(0, len(raw))
        raw = raw[:i] + rng.choice([b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\x80\x80"]) + raw[i:]
    elif kind == 2:
        raw = b"\xef\xbb\xbf" + raw  # BOM not at the start of the file
    elif kind == 3:
        raw = rng.choice([b"[", b"{", b"}", b"null", b"42", b'"s"', b"[]", b"{} {}", b"NaN", b"{'a': 1}"])
    elif kind == 4:
        raw = b"[" * rng.choice([10, 5000, 200_000]) + b"]" * rng.choice([0, 10])
    return raw


def make_file(rng: random.Random, path, good_records: list[dict]) -> tuple[int | None, str]:
    """Write good lines around one mutated line; return (1-based line of the mutated record or None, what)."""
    n_good = rng.randint(1, 4)
    goods = [json.dumps(rng.choice(good_records)).encode() for _ in range(n_good)]
    bad_value = mutate_record(rng, rng.choice(good_records))
    bad = encode_line(rng, bad_value)
    pos = rng.randint(0, n_good)
    lines = goods[:pos] + [bad] + goods[pos:]
    if rng.random() < 0.2:
        at = rng.randint(0, len(lines))
        lines.insert(at, b"   ")
        pos += at <= pos
    eol = b"\r\n" if rng.random() < 0.3 else b"\n"
    data = eol.join(lines) + (eol if rng.random() < 0.8 else b"")
    bom = rng.random() < 0.15
    if bom:
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)
    bad_line = pos + 1 if bad.strip() else None  # a blank line is skipped
    return bad_line, f"line {bad_line}: {bad[:200]!r}"


def good_records(rng: random.Random) -> list[dict]:
    recs = make_chat_records(6, seed=rng.randrange(10_000))
    recs.append({"messages": [{"role": "user", "content": "dog"}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": "truck"}, {"role": "assistant", "content": "b"}]})
    recs.append({"messages": [{"role": "user", "content": "lines with dog"},
                              {"role": "assistant", "content": ".*dog.*"}], "text": "dog", "code": "dog"})
    return recs


def check(build, path, bad_line, what):
    try:
        build()
    except ConceptLMError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, f"{what}: multi-line error {msg!r}"
        assert re.search(re.escape(str(path)) + r":\d+", msg), f"{what}: no file:line in {msg!r}"
        if bad_line is not None:
            assert f"{path}:{bad_line}" in msg, f"{what}: error names the wrong line: {msg!r}"
        return "error"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{what}: {type(e).__name__}: {e}")
    return "ok"


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_jsonl_gives_a_located_data_error_or_a_dataset(tmp_path, toks, seed):
    rng = random.Random(seed)
    goods = good_records(rng)
    outcomes = {"ok": 0, "error": 0}
    for case in range(CASES_PER_SEED):
        tok = toks[rng.random() < 0.25]
        path = tmp_path / f"fuzz_{seed}_{case}.jsonl"
        bad_line, what = make_file(rng, path, goods)
        what = f"seed={seed} case={case} {'strict' if tok is toks[1] else 'chatml'} {what}"
        on_too_long = rng.choice(["error", "skip", "truncate"])
        label_mode = rng.choice(["assistant", "all"])
        outcomes[check(lambda: ChatDataset(path, tok, max_length=MAX_LENGTH, on_too_long=on_too_long,
                                           label_mode=label_mode), path, bad_line, f"SFT {what}")] += 1
        view = ViewConfig(num_predictors=rng.choice([0, 1, 2]), predictor_position=rng.choice(["after", "before"]),
                          text_view=rng.choice(["context", "user_only"]),
                          direction=rng.choice(["text_to_code", "code_to_text"]),
                          enc_index_override=rng.choice([None, None, -1, -2]))
        outcomes[check(lambda: JepaDataset(path, tok, view, max_length=MAX_LENGTH,
                                           on_too_long=rng.choice(["error", "skip"])),
                       path, bad_line, f"JEPA {view} {what}")] += 1
    assert outcomes["ok"] and outcomes["error"]  # the generator exercises both outcomes


@pytest.mark.parametrize("seed", range(3))
def test_fuzzed_in_memory_records(toks, seed):
    """Lists of records (e.g. from a Hugging Face dataset): errors name ``name`` and the 1-based index."""
    rng = random.Random(100 + seed)
    goods = good_records(rng)
    tok = toks[0]
    for case in range(CASES_PER_SEED):
        recs = [copy.deepcopy(rng.choice(goods)) for _ in range(rng.randint(1, 3))]
        pos = rng.randint(0, len(recs))
        recs.insert(pos, mutate_record(rng, rng.choice(goods)))
        what = f"seed={seed} case={case} record {pos + 1}: {json.dumps(recs[pos])[:200]}"
        check(lambda: ChatDataset(recs, tok, max_length=MAX_LENGTH, name="mem"), "mem", pos + 1, f"SFT {what}")
        check(lambda: JepaDataset(recs, tok, ViewConfig(num_predictors=1), max_length=MAX_LENGTH, name="mem"),
              "mem", pos + 1, f"JEPA {what}")


# -------------------------------------------------------------------------------------------- end to end (CLI)

CLI_CASES = {
    "sft lone surrogate": ("sft", '{"messages": [{"role": "user", "content": "q"}, '
                                  '{"role": "assistant", "content": "a\\ud800"}]}', "messages[1].content"),
    "sft truncated line": ("sft", '{"messages": [{"role": "user", "content": "q"}, {"role": "assi', None),
    "jepa surrogate view": ("jepa", '{"views": ["a dog", "\\udc00 truck"]}', "views[1]"),
    "jepa no user turn": ("jepa", '{"messages": [{"role": "system", "content": "s"}, '
                                  '{"role": "assistant", "content": "a"}]}', "messages"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_data_one_line_nothing_written(tmp_path, capsys, case):
    from conceptlm.cli import main

    method, bad, field = CLI_CASES[case]
    good = "".join(json.dumps(r) + "\n" for r in make_chat_records(3)).encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(good + bad.encode() + b"\n" + good)
    ov = tiny_overrides(tmp_path, path, **{"train.max_steps": 1, "schedule.warmup_steps": 0})
    code = main([method, "train", *ov])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("conceptlm: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{path}:4" in err
    if field:
        assert f"field '{field}'" in err
    assert not (tmp_path / "runs").exists()


def test_write_jsonl_helper_roundtrip(tmp_path):
    """The fuzz generator's good records are valid (guards the generator itself)."""
    rng = random.Random(0)
    path = write_jsonl(tmp_path / "g.jsonl", good_records(rng))
    from conceptlm.data.chat import read_chat_jsonl

    assert len(read_chat_jsonl(path)) == 8
