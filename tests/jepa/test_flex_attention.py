"""Packed mode with FlexAttention (``attn_implementation="flex_attention"``): the tree mask as a ``BlockMask``.

* The block mask's predicate equals the dense tree mask element for element (with and without a sliding window,
  with a shared Code prefix, left and right padding).
* A packed forward through HF's flex_attention path gives the LM loss and both Enc vectors of the dense packed path
  and of separate mode, for a plain family, a windowed one, a hybrid full/sliding one and Gemma-2 (soft-capping).
  PyTorch has no CPU backward for FlexAttention, so these run under ``no_grad`` (the CUDA training path is the same
  forward plus PyTorch's own backward); training on CPU is refused with a clear error.

The flex kernel runs uncompiled here (PyTorch's reference implementation): compiling it on CPU costs ~30 s per
shape and tests PyTorch, not the mask.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from conceptlm.core.hf import build_tiny_model  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.forward import run_jepa_batch, uses_flex_attention  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate, tree_attention_mask, tree_block_mask  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens, build_views  # noqa: E402
from tests.jepa.view_records import CORPUS, RECORDS  # noqa: E402

flex = pytest.importorskip("torch.nn.attention.flex_attention")

# a ChatML template with a default system turn (SmolLM2-style), so code_view="with_system" shares a prefix
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOL = dict(rtol=1e-5, atol=1e-5)
D, HEADS, WINDOW = 32, 4, 4

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(CORPUS, vocab_size=360)
    t.chat_template = CHATML
    add_predictor_tokens(t, None, 2)
    return t


@pytest.fixture
def eager_flex(monkeypatch):
    """HF compiles flex_attention on first use; hand it PyTorch's uncompiled flex_attention instead (the reference
    implementation: same mask semantics, no compile)."""
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex.flex_attention)


def _examples(tok, **kw):
    return [ex for r in RECORDS for ex in build_views(r, tok, ViewConfig(**kw))]


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("k,code_view", [(0, "alone"), (2, "with_system")])
def test_block_mask_equals_the_dense_tree_mask(tok, window, side, k, code_view):
    b = collate_packed(_examples(tok, num_predictors=k, code_view=code_view), pad_token_id=tok.pad_token_id,
                       padding_side=side, pad_to_multiple_of=8)
    if code_view == "with_system":
        assert int(b.code_branch_len.max()) > 0  # the shared-prefix branch is exercised
    dense = tree_attention_mask(b.segment_ids, b.position_ids, b.branch_len, code_branch_len=b.code_branch_len,
                                sliding_window=window) == 0
    bm = tree_block_mask(b.segment_ids, b.position_ids, b.branch_len, code_branch_len=b.code_branch_len,
                         sliding_window=window)
    n, t = b.segment_ids.shape
    assert bm.shape == (n, 1, t, t)
    got = flex.create_mask(bm.mask_mod, n, 1, t, t, device="cpu")
    assert torch.equal(got, dense)


def test_block_mask_skips_blocks_no_query_needs():
    """A row of 3 segments of 256 tokens (LM, a Text branch seeing 50 LM tokens, Code alone) in 128-token blocks:
    11 of the 36 blocks are visited (69 % skipped), against 21 (42 % skipped) for plain causal attention."""
    n = 256
    seg = torch.tensor([[0] * n + [1] * n + [2] * n])
    pos = torch.tensor([list(range(n)) + list(range(50, 50 + n)) + list(range(n))])
    bm = tree_block_mask(seg, pos, torch.tensor([50]))
    assert bm.sparsity() == pytest.approx(100 * 25 / 36)  # percent of blocks skipped
    causal = flex.create_block_mask(lambda b, h, q, k: q >= k, 1, None, 3 * n, 3 * n, device="cpu")
    assert causal.sparsity() == pytest.approx(100 * 15 / 36)
    dense = tree_attention_mask(seg, pos, torch.tensor([50])) == 0
    assert torch.equal(flex.create_mask(bm.mask_mod, 1, 1, 3 * n, 3 * n, device="cpu"), dense)


def _family(name: str, tok) -> torch.nn.Module:
    common = dict(vocab_size=len(tok), hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256,
                  attention_dropout=0.0, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    if name == "llama":
        return build_tiny_model("llama", len(tok), hidden_size=D, num_layers=2, num_heads=HEADS, num_kv_heads=2,
                                seed=0, pad_token_id=tok.pad_token_id)
    if name == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=WINDOW)
        return transformers.MistralForCausalLM(cfg)
    if name == "qwen2_upper":  # full attention in layer 0, a sliding window in layer 1
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        return transformers.Qwen2ForCausalLM(cfg)
    if name == "gemma2":
        hd = D // HEADS
        cfg = transformers.Gemma2Config(**common, head_dim=hd, query_pre_attn_scalar=hd, sliding_window=WINDOW)
        return transformers.Gemma2ForCausalLM(cfg)
    raise ValueError(name)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_upper", "gemma2"])
def test_flex_packed_forward_equals_dense_packed_and_separate(tok, eager_flex, family):
    model = _family(family, tok).float().eval()
    dense_attn = "eager" if family == "gemma2" else "sdpa"
    exs = _examples(tok, num_predictors=2, text_view="user_only", code_view="with_system")
    pad = tok.pad_token_id

    def run(batch):
        with torch.no_grad():
            out = run_jepa_batch(model, batch)
        return out.lm_loss_sum, out.enc_text, out.enc_code

    model.set_attn_implementation(dense_attn)
    ref = run(collate_separate(exs, pad_token_id=pad))
    dense = run(collate_packed(exs, pad_token_id=pad))
    model.set_attn_implementation("flex_attention")
    assert uses_flex_attention(model)
    for side in ("right", "left"):
        got = run(collate_packed(exs, pad_token_id=pad, padding_side=side))
        for name, g, d, r in zip(("lm_sum", "enc_text", "enc_code"), got, dense, ref):
            torch.testing.assert_close(g, d, **TOL, msg=lambda m: f"{family} {side} {name} vs dense packed: {m}")
            torch.testing.assert_close(g, r, **TOL, msg=lambda m: f"{family} {side} {name} vs separate: {m}")


def test_flex_training_on_cpu_is_refused(tok):
    model = _family("llama", tok).float()
    model.set_attn_implementation("flex_attention")
    batch = collate_packed(_examples(tok, num_predictors=1), pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="no CPU backward"):
        run_jepa_batch(model, batch)


def test_flex_training_on_cpu_is_refused_by_the_cli(tmp_path, chat_files, capsys):
    from conceptlm.cli import main
    from tests.conftest import tiny_overrides

    args = tiny_overrides(tmp_path, chat_files[0], **{"model.attn_implementation": "flex_attention"})
    assert main(["jepa", "train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.attn_implementation" in err and "no CPU backward" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
