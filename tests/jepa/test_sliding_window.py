"""Sliding-window attention in packed mode: the window is applied inside the tree mask, so packed == separate.

Every tiny family the loader can build is covered: the ARCHS of ``build_tiny_model`` (Llama, GPT-2, OLMo-2 have no
window; Qwen2 with ``use_sliding_window`` on all or only the upper layers; Gemma-2's alternating sliding/full
layers) and the configs that carry a ``sliding_window`` without ``layer_types`` (Mistral, Phi-3), loaded back from
a local folder with ``load_causal_lm``. The window (4) is far shorter than the views, and the test checks that it
matters (separate mode with and without it differ) before comparing packed to separate to 1e-5, LM loss, both Enc
vectors and every gradient, with left and right padding.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from conceptlm.core.config import ARCHS  # noqa: E402
from conceptlm.core.hf import build_tiny_model, load_causal_lm  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.forward import attention_windows, jepa_objective, run_jepa_batch  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate, tree_attention_mask  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens, build_views  # noqa: E402
from tests.jepa.view_records import CORPUS, RECORDS  # noqa: E402

WINDOW = 4
TOL = dict(rtol=1e-6, atol=1e-5)
D, LAYERS, HEADS = 32, 2, 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(CORPUS, vocab_size=360)
    add_predictor_tokens(t, None, 2)
    return t


def _common(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                attention_dropout=0.0, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)


def _config(family: str, tok, window: int | None):
    """HF config of a windowed family (window None = the same model without a window)."""
    c = _common(tok)
    if family == "mistral":
        return transformers.MistralConfig(**c, sliding_window=window)
    if family == "phi3":
        return transformers.Phi3Config(**c, sliding_window=window, resid_pdrop=0.0, embd_pdrop=0.0)
    if family in ("qwen2_all", "qwen2_upper"):
        return transformers.Qwen2Config(**c, use_sliding_window=window is not None, sliding_window=window or 4096,
                                        max_window_layers=0 if family == "qwen2_all" else 1)
    if family == "gemma2":
        hd = D // HEADS
        return transformers.Gemma2Config(**c, head_dim=hd, query_pre_attn_scalar=hd, sliding_window=window or 256)
    raise ValueError(family)


_CLASSES = {"mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "qwen2_all": "Qwen2ForCausalLM",
            "qwen2_upper": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM"}
WINDOWED = tuple(_CLASSES)


def _model(family: str, tok, window: int | None, tmp_path_factory, attn: str) -> torch.nn.Module:
    """Built from config with seed 0; Mistral and Phi-3 go through a local folder and ``load_causal_lm``."""
    torch.manual_seed(0)
    cls = getattr(transformers, _CLASSES[family])
    model = cls._from_config(_config(family, tok, window), attn_implementation=attn)
    if family in ("mistral", "phi3"):
        folder = tmp_path_factory.mktemp(f"{family}_{window}")
        model.save_pretrained(folder)
        model = load_causal_lm(folder, attn_implementation=attn)
    return model.float().eval()


def _examples(tok, **kw):
    return [ex for r in RECORDS for ex in build_views(r, tok, ViewConfig(**kw))]


def _run(model, batch) -> dict:
    model.zero_grad(set_to_none=True)
    out = run_jepa_batch(model, batch)
    jepa_objective(out, metric="cosine")["loss"].backward()
    return {"lm_sum": out.lm_loss_sum.detach(), "enc_text": out.enc_text.detach(), "enc_code": out.enc_code.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}


def _assert_same(ref: dict, got: dict, what: str) -> None:
    for key in ("lm_sum", "enc_text", "enc_code"):
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=lambda m: f"{what} {key}: {m}")
    assert ref["grads"].keys() == got["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, **TOL, msg=lambda m: f"{what} grad {name}: {m}")


@pytest.mark.parametrize("family", WINDOWED)
@pytest.mark.parametrize("k,text_view", [(0, "context"), (2, "user_only")])
def test_packed_equals_separate_with_a_short_window(tok, tmp_path_factory, family, k, text_view):
    attn = "eager" if family == "gemma2" else "sdpa"
    model = _model(family, tok, WINDOW, tmp_path_factory, attn)
    windows = attention_windows(model)
    assert WINDOW in windows.values()
    exs = _examples(tok, num_predictors=k, text_view=text_view)
    assert min(ex.max_position for ex in exs) > 3 * WINDOW  # every view is far longer than the window
    pad = tok.pad_token_id
    ref = _run(model, collate_separate(exs, pad_token_id=pad))
    # the window matters: the same weights without it give other numbers
    unwindowed = _model(family, tok, None, tmp_path_factory, attn)
    assert all(w is None or w >= 256 for w in attention_windows(unwindowed).values())  # none the views reach
    free = _run(unwindowed, collate_separate(exs, pad_token_id=pad))
    assert (free["lm_sum"] - ref["lm_sum"]).abs() > 1e-3
    assert (free["enc_code"] - ref["enc_code"]).abs().max() > 1e-3
    for side in ("right", "left"):
        _assert_same(ref, _run(model, collate_packed(exs, pad_token_id=pad, padding_side=side)), f"packed-{side}")


def test_hybrid_models_get_one_mask_per_layer_type(tok, tmp_path_factory):
    gemma = _model("gemma2", tok, WINDOW, tmp_path_factory, "eager")
    assert attention_windows(gemma) == {"full_attention": None, "sliding_attention": WINDOW}
    qwen = _model("qwen2_upper", tok, WINDOW, tmp_path_factory, "sdpa")
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
    assert attention_windows(qwen) == {"full_attention": None, "sliding_attention": WINDOW}
    mistral = _model("mistral", tok, WINDOW, tmp_path_factory, "sdpa")
    assert attention_windows(mistral) == {None: WINDOW}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_arch_is_covered(tok, arch):
    """The ARCHS without a window have nothing to apply; those with one are built windowed above."""
    model = build_tiny_model(arch, len(tok), hidden_size=D, num_layers=LAYERS, num_heads=HEADS, seed=0)
    windows = attention_windows(model)
    if arch in ("qwen2", "gemma2"):
        assert any(f.startswith(arch) for f in WINDOWED)
    else:
        assert windows == {None: None} and getattr(model.config, "sliding_window", None) is None


def test_unsupported_layer_type_is_refused(tok, tmp_path_factory):
    model = _model("gemma2", tok, WINDOW, tmp_path_factory, "eager")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    batch = collate_packed(_examples(tok), pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="chunked_attention.*jepa.mode=separate"):
        run_jepa_batch(model, batch)


def test_tree_mask_hand_example_with_window_and_code_prefix():
    # F = 4 LM tokens; R_T = 2 tokens after p = 2; C = 2 tokens after q = 1; window 2
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2]])
    pos = torch.tensor([[0, 1, 2, 3, 2, 3, 1, 2]])
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],  # window 2: position 0 is 2 below position 2
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 0, 0, 1, 0, 0, 0],  # R_T[0] (pos 2) sees F pos 1 (< p, inside the window) and itself
        [0, 0, 0, 0, 1, 1, 0, 0],  # R_T[1] (pos 3): F pos 0/1 are outside the window
        [1, 0, 0, 0, 0, 0, 1, 0],  # C[0] (pos 1) sees F pos 0 (< q) and itself
        [0, 0, 0, 0, 0, 0, 1, 1],  # C[1] (pos 2): F pos 0 is outside the window
    ], dtype=torch.bool)
    m = tree_attention_mask(seg, pos, torch.tensor([2]), code_branch_len=torch.tensor([1]), sliding_window=2)
    expected = torch.zeros(8, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(m[0, 0], expected)
    # without the window, the branches see their whole shared prefix
    full = tree_attention_mask(seg, pos, torch.tensor([2]), code_branch_len=torch.tensor([1]))[0, 0] == 0
    assert full[5, :2].all() and full[7, 0] and not full[7, 1]
    with pytest.raises(ValueError, match="sliding_window"):
        tree_attention_mask(seg, pos, torch.tensor([2]), sliding_window=0)
