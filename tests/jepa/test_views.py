"""Token-level tests of the LLM-JEPA views: exact renderings, Enc indices, shared prefix, template families."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from conceptlm.core.errors import DataError  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.data.chat import tokenize_chat  # noqa: E402
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.views import (  # noqa: E402
    JepaExample,
    add_predictor_tokens,
    build_views,
    common_prefix_len,
)

CORPUS = ["Convert natural language to regular expression.", "lines with words and a vowel, zero or more times",
          "lines containing the string dog", "(a|b)* [aeiou]+ dog.*", "the quick brown fox jumps over the lazy dog",
          "a cat sat on the mat", "system user assistant model"] * 30

SYSTEM = "Convert natural language to regular expression."
USER = "lines with words"
ANSWER = "(a|b)*"
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
        {"role": "assistant", "content": ANSWER}]


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(CORPUS, vocab_size=400)
    add_predictor_tokens(t, None, 3)
    return t


def _dec(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def _pid(tok, i: int) -> int:
    return tok.convert_tokens_to_ids(f"<|predictor_{i}|>")


def _check_enc_at_content_end(tok, ids, enc, content):
    """The rendering up to and including the Enc token ends exactly with ``content``."""
    assert _dec(tok, ids[: enc + 1]).endswith(content)
    assert content.endswith(_dec(tok, ids[enc: enc + 1]))


# ------------------------------------------------------------------------------------------- ChatML (ours)


def test_chatml_k0_context_exact(tok):
    ex = build_views(CHAT, tok, ViewConfig())[0]
    assert isinstance(ex, JepaExample) and ex.pred_is_text
    assert _dec(tok, ex.text_ids) == (f"<|bos|><|im_start|>system\n{SYSTEM}<|im_end|>\n"
                                      f"<|im_start|>user\n{USER}<|im_end|>\n")
    # every turn of our ChatML template, assistant turns included, ends "<|im_end|>\n"
    assert _dec(tok, ex.code_ids) == f"<|bos|><|im_start|>assistant\n{ANSWER}<|im_end|>\n"
    assert _dec(tok, ex.text_ids[ex.text_enc: ex.text_enc + 1]) == " words"
    _check_enc_at_content_end(tok, ex.code_ids, ex.code_enc, ANSWER)  # the last token of "(a|b)*"
    assert ex.code_enc == len(ex.code_ids) - 3  # then <|im_end|> and "\n"
    assert ex.text_enc == len(ex.text_ids) - 3
    # LM sequence and labels are exactly SFT's
    sft = tokenize_chat(tok, CHAT, label_mode="assistant")
    assert list(ex.lm_ids) == sft["input_ids"] and list(ex.lm_labels) == sft["labels"]
    # Text (up to Enc) is a prefix of the LM sequence: p covers it entirely, nothing to add in packed mode
    assert ex.text_prefix_len == ex.text_enc + 1 and ex.text_remainder == ()
    assert ex.lm_ids[: ex.text_prefix_len] == ex.text_ids[: ex.text_enc + 1]


def test_chatml_predictors_after_and_before(tok):
    after = build_views(CHAT, tok, ViewConfig(num_predictors=2))[0]
    assert _dec(tok, after.text_ids).endswith(f"{USER}<|predictor_2|><|predictor_1|><|im_end|>\n")
    assert after.text_ids[after.text_enc] == _pid(tok, 1)
    # shared prefix stops right before the first predictor; the remainder is exactly the 2 predictors
    assert after.text_remainder == (_pid(tok, 2), _pid(tok, 1))
    assert after.text_prefix_len == after.text_enc - 1

    before = build_views(CHAT, tok, ViewConfig(num_predictors=2, predictor_position="before"))[0]
    assert _dec(tok, before.text_ids).endswith(f"user\n<|predictor_1|><|predictor_2|>{USER}<|im_end|>\n")
    assert _dec(tok, before.text_ids[before.text_enc: before.text_enc + 1]) == " words"
    first_pred = before.text_ids.index(_pid(tok, 1))
    assert before.text_prefix_len == first_pred
    assert before.text_remainder[:2] == (_pid(tok, 1), _pid(tok, 2))


def test_chatml_user_only_prefix(tok):
    ex = build_views(CHAT, tok, ViewConfig(text_view="user_only", num_predictors=1))[0]
    assert _dec(tok, ex.text_ids) == f"<|bos|><|im_start|>user\n{USER}<|predictor_1|><|im_end|>\n"
    assert ex.text_ids[ex.text_enc] == _pid(tok, 1)
    # LM starts "<|bos|><|im_start|>system": only 2 tokens are shared with "<|bos|><|im_start|>user"
    assert ex.text_prefix_len == 2
    # without a system prompt, user_only equals the context view and is a prefix again (k = 0)
    no_sys = build_views(CHAT[1:], tok, ViewConfig(text_view="user_only"))[0]
    assert no_sys.text_prefix_len == no_sys.text_enc + 1


def test_code_to_text_puts_predictors_on_code(tok):
    ex = build_views(CHAT, tok, ViewConfig(direction="code_to_text", num_predictors=2))[0]
    assert not ex.pred_is_text
    assert _dec(tok, ex.code_ids) == f"<|bos|><|im_start|>assistant\n{ANSWER}<|predictor_2|><|predictor_1|><|im_end|>\n"
    assert ex.code_ids[ex.code_enc] == _pid(tok, 1)
    assert "predictor" not in _dec(tok, ex.text_ids)
    assert ex.text_prefix_len == ex.text_enc + 1


def test_enc_index_override_matches_reference_last_token(tok):
    derived = build_views(CHAT, tok, ViewConfig(num_predictors=1))[0]
    # both views end "<|im_end|>\n", so the reference's fixed offset -3 lands on the derived indices here
    ref = build_views(CHAT, tok, ViewConfig(num_predictors=1, enc_index_override=-3))[0]
    assert ref.text_enc == derived.text_enc and ref.code_enc == derived.code_enc
    last = build_views(CHAT, tok, ViewConfig(enc_index_override=-1))[0]
    assert last.text_enc == len(last.text_ids) - 1 and last.code_enc == len(last.code_ids) - 1
    assert _dec(tok, last.code_ids[last.code_enc:]) == "\n"


def test_explicit_text_and_code_fields(tok):
    rec = {"messages": CHAT, "text": "a cat sat", "code": "the mat"}
    ex = build_views(rec, tok, ViewConfig(num_predictors=1))[0]
    assert _dec(tok, ex.text_ids).endswith("<|im_start|>user\na cat sat<|predictor_1|><|im_end|>\n")
    assert SYSTEM in _dec(tok, ex.text_ids)  # context kept
    assert _dec(tok, ex.code_ids) == "<|bos|><|im_start|>assistant\nthe mat<|im_end|>\n"
    _check_enc_at_content_end(tok, ex.code_ids, ex.code_enc, "the mat")
    assert list(ex.lm_ids) == tokenize_chat(tok, CHAT)["input_ids"]  # the LM sequence is still the chat


def test_paraphrase_group_gives_consecutive_pairs(tok):
    views = ["a cat sat", "the cat sat on the mat", "a cat on the mat"]
    exs = build_views({"views": views}, tok, ViewConfig(num_predictors=1))
    assert len(exs) == 2
    for ex, (src, dst) in zip(exs, zip(views, views[1:])):
        assert _dec(tok, ex.lm_ids) == f"<|bos|>{src}<|endoftext|>"
        assert ex.lm_labels[0] == -100 and list(ex.lm_labels[1:]) == list(ex.lm_ids[1:])
        assert _dec(tok, ex.text_ids) == f"<|bos|>{src}<|predictor_1|>"
        assert ex.text_ids[ex.text_enc] == _pid(tok, 1) and ex.text_enc == len(ex.text_ids) - 1
        assert _dec(tok, ex.code_ids) == f"<|bos|>{dst}"
        assert ex.code_enc == len(ex.code_ids) - 1
        assert ex.text_remainder == (_pid(tok, 1),)  # Text = LM prefix + the predictor


def test_errors(tok):
    bare = train_bpe_tokenizer(CORPUS, vocab_size=400)
    with pytest.raises(ValueError, match="add_predictor_tokens"):
        build_views(CHAT, bare, ViewConfig(num_predictors=1))
    with pytest.raises(DataError) as err:
        build_views({"views": ["only one"]}, tok, path="para.jsonl", line=7)
    assert "para.jsonl:7" in str(err.value) and "views" in str(err.value)
    with pytest.raises(DataError, match="messages"):
        build_views({"msgs": []}, tok, path="x.jsonl", line=2)
    with pytest.raises(DataError, match="no user message"):
        build_views([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], tok)
    with pytest.raises(DataError, match="'text'"):
        build_views({"messages": CHAT, "text": ""}, tok)
    with pytest.raises(ValueError, match="text_view"):
        ViewConfig(text_view="both")
    with pytest.raises(ValueError, match="enc_index_override"):
        ViewConfig(enc_index_override=1)


def test_add_predictor_tokens_is_idempotent_and_mean_initialised():
    import torch

    from conceptlm.core.hf import build_tiny_model

    t = train_bpe_tokenizer(CORPUS, vocab_size=400)
    model = build_tiny_model("llama", len(t), hidden_size=32, num_layers=1, num_heads=4, seed=0)
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_predictor_tokens(t, model, 2)
    assert ids == [len(old), len(old) + 1] and len(t) == len(old) + 2
    w = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(w[ids], old.mean(0).expand(2, -1))
    assert add_predictor_tokens(t, model, 2) == ids and len(t) == len(old) + 2
    assert add_predictor_tokens(t, model, 3)[:2] == ids


# ------------------------------------------------------------------------------------ other template families
# Minimal faithful re-writes of the public Jinja chat templates (only the parts plain text chats exercise):
# Llama-3.1/3.2-Instruct (system header with a pinned date, `| trim` of contents), Gemma-2-it (no system role,
# roles must alternate starting with user, `| trim`), Qwen2.5-Instruct (ChatML with a default system prompt, no
# BOS), OLMo-2-Instruct (`<|user|>` / `<|assistant|>` markers as plain text, EOS after assistant turns).

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA2 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

FAMILIES = {
    # name: (template, special tokens to add, bos, eos, expected end of the Code view after its content)
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma2": (GEMMA2, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>\n"),
    "qwen2": (QWEN2, [], None, "<|im_end|>", "<|im_end|>\n"),
    "olmo2": (OLMO2, [], "<|bos|>", "<|endoftext|>", "<|endoftext|>"),
}


def _family_tokenizer(name: str):
    template, specials, bos, eos, _ = FAMILIES[name]
    t = train_bpe_tokenizer(CORPUS, vocab_size=400)
    extra = [s for s in specials + ([eos] if eos else []) if s not in t.get_vocab()]
    if extra:
        t.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    t.bos_token = bos
    t.eos_token = eos
    t.chat_template = template
    add_predictor_tokens(t, None, 3)
    return t


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("k", [0, 2])
def test_template_families(family, k):
    t = _family_tokenizer(family)
    code_tail = FAMILIES[family][4]
    # leading spaces: removed by the `| trim` of the Llama template (the content span still matches)
    user = "  " + USER if family == "llama3" else USER
    chat = [CHAT[0], {"role": "user", "content": user}, CHAT[2]]
    ex = build_views(chat, t, ViewConfig(num_predictors=k))[0]
    if k:
        assert ex.text_ids[ex.text_enc] == _pid(t, 1)
        assert ex.text_remainder == (_pid(t, 2), _pid(t, 1))
        assert _dec(t, ex.text_ids[: ex.text_enc + 1]).endswith(USER + "<|predictor_2|><|predictor_1|>")
    else:
        _check_enc_at_content_end(t, ex.text_ids, ex.text_enc, USER)
        # Text (context) is a prefix of the LM sequence in every family: Enc(Text) comes from the LM for free
        assert ex.text_prefix_len == ex.text_enc + 1
    assert ex.text_prefix_len == common_prefix_len(ex.text_ids[: ex.text_enc + 1], ex.lm_ids)
    _check_enc_at_content_end(t, ex.code_ids, ex.code_enc, ANSWER)
    assert _dec(t, ex.code_ids[ex.code_enc + 1:]) == code_tail
    if family == "gemma2":  # a lone assistant turn is rejected by the template: rendered as a user turn
        assert "<start_of_turn>user\n" + ANSWER in _dec(t, ex.code_ids)
        assert SYSTEM + "\n\n" + USER in _dec(t, ex.text_ids)  # system folded into the user turn, as in the LM
    if family == "llama3":
        assert "Today Date: 26 Jul 2024" in _dec(t, ex.code_ids)
    sft = tokenize_chat(t, chat)
    assert list(ex.lm_ids) == sft["input_ids"] and list(ex.lm_labels) == sft["labels"]

    only = build_views(chat, t, ViewConfig(num_predictors=k, text_view="user_only"))[0]
    rendered = _dec(t, only.text_ids)
    assert SYSTEM not in rendered and USER in rendered
    assert only.text_prefix_len == common_prefix_len(only.text_ids[: only.text_enc + 1], only.lm_ids)
    assert only.text_prefix_len < only.text_enc + 1 - k
