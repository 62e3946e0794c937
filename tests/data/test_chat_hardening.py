"""Records the validator accepts but the template or the tokenizer cannot handle: one DataError naming file, line
and field (SFT chat data, JEPA views, plain text), never a traceback."""

from __future__ import annotations

import copy
import json
import random

import pytest

from conceptlm.core.errors import DataError
from conceptlm.core.tokenizer import train_bpe_tokenizer
from conceptlm.data.chat import IGNORE_INDEX, ChatDataset, read_chat_jsonl, tokenize_chat
from conceptlm.data.text import TextDataset
from conceptlm.jepa.config import ViewConfig
from conceptlm.jepa.data import JepaDataset
from conceptlm.jepa.views import add_predictor_tokens, build_views

WORDS = "lines with words containing a vowel dog truck letter before after zero or more times".split()

# Like many Hugging Face templates (Llama-2, Mistral, Gemma): roles must alternate user/assistant starting with user.
STRICT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(200)]
    t = train_bpe_tokenizer(texts, vocab_size=320)
    add_predictor_tokens(t, None, 1)
    return t


@pytest.fixture(scope="module")
def strict_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = STRICT_TEMPLATE
    return t


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


GOOD = {"messages": msgs(("user", "lines with dog"), ("assistant", "dog.*"))}


def write(tmp_path, *rows, name="d.jsonl"):
    """Rows are dicts (dumped as JSON) or raw str lines (written verbatim)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- template refuses a record

def test_leading_assistant_turn_is_allowed_with_chatml(tok):
    """Our ChatML template renders a conversation that starts with the assistant: it is trained on as is."""
    enc = tokenize_chat(tok, msgs(("assistant", "dog.*"), ("user", "lines"), ("assistant", "truck")))
    targets = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(targets) == "dog.*<|im_end|>truck<|im_end|>"
    ds = ChatDataset([msgs(("assistant", "dog.*"))], tok, max_length=64)
    assert len(ds) == 1


@pytest.mark.parametrize("bad", [msgs(("assistant", "dog.*"), ("user", "lines"), ("assistant", "x")),
                                 msgs(("user", "a"), ("user", "b"), ("assistant", "x")),
                                 msgs(("system", "s"), ("user", "a"), ("assistant", "x"), ("assistant", "y"))])
def test_strict_template_refusal_names_record_sft(tmp_path, strict_tok, bad):
    path = write(tmp_path, GOOD, {"messages": bad}, GOOD)
    with pytest.raises(DataError) as err:
        ChatDataset(path, strict_tok, max_length=128)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: field 'messages': the chat template cannot render this conversation")
    assert "Conversation roles must alternate" in msg and "\n" not in msg


def test_strict_template_refusal_names_record_jepa(tmp_path, strict_tok):
    path = write(tmp_path, GOOD, GOOD, {"messages": msgs(("user", "a"), ("user", "b"), ("assistant", "x"))})
    with pytest.raises(DataError) as err:
        JepaDataset(path, strict_tok, ViewConfig(num_predictors=1), max_length=128)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: field 'messages': the chat template cannot render")
    assert "Conversation roles must alternate" in msg
    # A valid record still builds; the lone assistant Code view falls back to a user turn under this template.
    assert len(JepaDataset(write(tmp_path, GOOD, name="ok.jsonl"), strict_tok, ViewConfig(num_predictors=1),
                           max_length=128)) == 1


def test_any_template_exception_is_a_data_error(tmp_path, tok):
    """Not only jinja TemplateErrors: whatever apply_chat_template raises names the record."""
    boom = copy.deepcopy(tok)
    boom.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ 1 // 0 }}{% endif %}"
                          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write(tmp_path, GOOD, {"messages": msgs(("user", "boom"), ("assistant", "x"))})
    for build in (lambda: ChatDataset(path, boom, max_length=128),
                  lambda: JepaDataset(path, boom, ViewConfig(num_predictors=1), max_length=128)):
        with pytest.raises(DataError) as err:
            build()
        assert str(err.value).startswith(f"{path}:2: field 'messages': the chat template cannot render")
        assert "ZeroDivisionError" in str(err.value)


def test_jepa_leading_assistant_is_a_data_error(tmp_path, tok):
    path = write(tmp_path, {"messages": msgs(("assistant", "x"), ("user", "q"))}, name="j.jsonl")
    with pytest.raises(DataError, match=r"j\.jsonl:1: field 'messages': no user message"):
        JepaDataset(path, tok, ViewConfig(num_predictors=1), max_length=128)


# ------------------------------------------------------------------------------------------ strings not encodable

LONE = '"lines \\ud800 dog"'  # a JSON escape of an unpaired high surrogate


def test_lone_surrogate_in_chat_content(tmp_path, tok):
    good = json.dumps(GOOD)
    bad = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ' + LONE + '}]}'
    path = write(tmp_path, good, good, bad)
    for build in (lambda: read_chat_jsonl(path), lambda: ChatDataset(path, tok, max_length=128),
                  lambda: JepaDataset(path, tok, ViewConfig(num_predictors=1), max_length=128)):
        with pytest.raises(DataError) as err:
            build()
        assert str(err.value).startswith(f"{path}:3: field 'messages[1].content': lone surrogate U+D800")
    # A valid escaped pair is one ordinary character (U+1F600) and is fine.
    ok = write(tmp_path, '{"messages": [{"role": "user", "content": "q \\ud83d\\ude00"}, '
                         '{"role": "assistant", "content": "x"}]}', name="ok.jsonl")
    assert len(ChatDataset(ok, tok, max_length=128)) == 1


@pytest.mark.parametrize("record,field", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "text": ' + LONE + "}",
     "text"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "code": ' + LONE + "}",
     "code"),
    ('{"views": ["a dog", ' + LONE + "]}", "views[1]"),
])
def test_lone_surrogate_in_jepa_fields(tmp_path, tok, record, field):
    path = write(tmp_path, json.dumps(GOOD), record)
    with pytest.raises(DataError) as err:
        JepaDataset(path, tok, ViewConfig(num_predictors=1), max_length=128)
    assert str(err.value).startswith(f"{path}:2: field '{field}': lone surrogate U+D800")


def test_tokenize_chat_unvalidated_surrogate_is_a_data_error(tok):
    with pytest.raises(DataError, match="field 'messages': lone surrogate"):
        tokenize_chat(tok, msgs(("user", "a\udfffb"), ("assistant", "x")))


def test_build_views_in_memory_surrogate(tok):
    with pytest.raises(DataError, match=r"mem:4: field 'messages\[0\]\.content': lone surrogate"):
        build_views(msgs(("user", "\ud800"), ("assistant", "x")), tok, ViewConfig(num_predictors=1), path="mem",
                    line=4)


def test_text_documents_surrogate_and_non_string(tok):
    with pytest.raises(DataError, match=r"^hf:x:2: field 'text': lone surrogate U\+DC00"):
        TextDataset.from_texts(["dog truck " * 20, "lines \udc00"], tok, block_size=4, name="hf:x")
    with pytest.raises(DataError, match=r"^hf:x:1: field 'text': expected a string document, got NoneType"):
        TextDataset.from_texts([None], tok, block_size=4, name="hf:x")


# ------------------------------------------------------------------------------------------- JSON edge cases

@pytest.mark.parametrize("line,what", [("[" * 100_000, "nested too deeply"),
                                       ('{"messages": ' + "1" * 5000 + "}", "invalid JSON")])
def test_json_that_python_refuses(tmp_path, line, what):
    path = write(tmp_path, json.dumps(GOOD), line)
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and what in msg and "\n" not in msg and len(msg) < 400


def test_tokenizer_training_tolerates_unencodable_strings():
    """The tokenizer is trained on the raw corpus before records are validated: a lone surrogate must not crash
    training (the dataset build then reports the record)."""
    tok = train_bpe_tokenizer(["dog \ud800 truck"] * 5 + ["lines with words"] * 5, vocab_size=300)
    assert tok("dog truck", add_special_tokens=False)["input_ids"]
