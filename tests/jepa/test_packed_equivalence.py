"""Packed (one forward, 4-D tree mask) vs separate (three padded forwards) LLM-JEPA: identical numbers.

Compared in fp32, eval mode, dropout 0: LM loss sum, Enc(Text), Enc(Code), the JEPA distance of every metric,
the total loss and ALL parameter gradients, to 1e-5 — for llama / qwen2 / gpt2 / gemma2 (+ olmo2), k ∈ {0, 1, 3},
left and right padding, Text views context and user_only, predictors after and before, a batch whose rows have
different lengths. Plus: λ = 0 and skipped-JEPA steps equal plain SFT; no NaN under eager attention.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conceptlm.core.hf import build_tiny_model, causal_lm_loss_sum, hidden_states  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.data.batching import collate  # noqa: E402
from conceptlm.data.chat import tokenize_chat  # noqa: E402
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.forward import jepa_objective, run_jepa_batch  # noqa: E402
from conceptlm.jepa.losses import METRICS, jepa_distance  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate, tree_attention_mask  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens, build_views  # noqa: E402

SYS = {"role": "system", "content": "Convert natural language to regular expression."}
RECORDS = [
    [SYS, {"role": "user", "content": "lines with words"}, {"role": "assistant", "content": "(a|b)*"}],
    [{"role": "user", "content": "lines containing the string dog, zero or more times"},
     {"role": "assistant", "content": "(.*dog.*)*"}],
    [SYS, {"role": "user", "content": "a vowel"}, {"role": "assistant", "content": "[aeiou]"},
     {"role": "user", "content": "now the string cat followed by a number"},
     {"role": "assistant", "content": "cat[0-9].*"}],
    {"messages": [SYS, {"role": "user", "content": "the lazy dog"}, {"role": "assistant", "content": "dog"}],
     "text": "a lazy dog sat on the mat", "code": "dog.*mat"},
]
CORPUS = ["Convert natural language to regular expression.", "lines with words and a vowel, zero or more times",
          "lines containing the string dog (a|b)* [aeiou]+ dog.* cat[0-9]", "the lazy dog sat on the mat"] * 30
TOL = dict(rtol=1e-6, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(CORPUS, vocab_size=360)
    add_predictor_tokens(t, None, 3)
    return t


@pytest.fixture(scope="module")
def models(tok):
    cache: dict[tuple[str, str | None], torch.nn.Module] = {}

    def get(arch: str, attn: str | None = None) -> torch.nn.Module:
        if (arch, attn) not in cache:
            m = build_tiny_model(arch, len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0,
                                 attn_implementation=attn, pad_token_id=tok.pad_token_id)
            m.float().eval()
            cache[(arch, attn)] = m
        return cache[(arch, attn)]

    return get


def _examples(tok, cfg: ViewConfig, records=RECORDS):
    return [ex for r in records for ex in build_views(r, tok, cfg)]


def _run(model, batch, *, lam: float = 1.0, jepa_active: bool = True) -> dict:
    model.zero_grad(set_to_none=True)
    out = run_jepa_batch(model, batch, jepa_active=jepa_active)
    obj = jepa_objective(out, gamma=1.0, lam=lam, metric="cosine")
    obj["loss"].backward()
    res = {"lm_sum": out.lm_loss_sum.detach(), "n": out.n_lm_targets, "loss": obj["loss"].detach(),
           "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
           "out": out}
    if out.jepa_active:
        res["enc_text"], res["enc_code"] = out.enc_text.detach(), out.enc_code.detach()
        for metric in METRICS:
            res[metric] = jepa_distance(out.pred.detach(), out.target.detach(), metric)
    return res


def _assert_same(ref: dict, got: dict, what: str) -> None:
    assert int(ref["n"]) == int(got["n"]), what
    for key in ["lm_sum", "loss", "enc_text", "enc_code", *METRICS]:
        if key in ref:
            torch.testing.assert_close(got[key], ref[key], **TOL, msg=lambda m: f"{what} {key}: {m}")
    assert ref["grads"].keys() == got["grads"].keys(), what
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, **TOL, msg=lambda m: f"{what} grad {name}: {m}")


def _all_modes_agree(model, exs, pad_id) -> tuple[dict, dict]:
    ref = _run(model, collate_separate(exs, pad_token_id=pad_id, padding_side="right"))
    assert torch.isfinite(ref["loss"]) and ref["grads"]
    packed = None
    for side in ("right", "left"):
        if side == "left":
            _assert_same(ref, _run(model, collate_separate(exs, pad_token_id=pad_id, padding_side=side)),
                         "separate-left")
        got = _run(model, collate_packed(exs, pad_token_id=pad_id, padding_side=side))
        _assert_same(ref, got, f"packed-{side}")
        packed = packed or got
    return ref, packed


CASES = [(k, tv, pos) for k in (0, 1, 3) for tv in ("context", "user_only")
         for pos in (("after",) if k == 0 else ("after", "before"))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
@pytest.mark.parametrize("k,text_view,position", CASES)
def test_packed_equals_separate(tok, models, arch, k, text_view, position):
    torch.manual_seed(0)
    exs = _examples(tok, ViewConfig(num_predictors=k, text_view=text_view, predictor_position=position))
    lengths = {len(ex.lm_ids) for ex in exs}
    assert len(lengths) == len(exs)  # every row has its own length: padding occurs in both modes
    _, packed = _all_modes_agree(models(arch), exs, tok.pad_token_id)
    if k == 0 and text_view == "context":
        # Text is a prefix of the LM sequence for every chat record: Enc(Text) costs no extra token
        shared = [ex for ex in exs if not ex.text_remainder]
        assert len(shared) == 3  # the record with an explicit "text" field has its own Text
        assert packed["out"].slots < _run(models(arch), collate_separate(exs, pad_token_id=tok.pad_token_id))[
            "out"].slots


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2"])
def test_code_to_text_and_paraphrase_groups(tok, models, arch):
    torch.manual_seed(0)
    cfg = ViewConfig(num_predictors=2, direction="code_to_text")
    exs = _examples(tok, cfg, RECORDS[:3])
    assert not exs[0].pred_is_text
    ref, _ = _all_modes_agree(models(arch), exs, tok.pad_token_id)
    # code→text: the predicting embedding is Enc(Code + predictors), the target Enc(Text)
    out = ref["out"]
    assert out.pred is out.enc_code and out.target is out.enc_text
    groups = [{"views": ["the lazy dog", "a lazy dog sat", "the dog sat on the mat"]},
              {"views": ["lines with words", "words in lines"]}]
    _all_modes_agree(models(arch), _examples(tok, ViewConfig(num_predictors=1), groups), tok.pad_token_id)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_lambda0_and_skipped_jepa_equal_plain_sft(tok, models, arch):
    torch.manual_seed(0)
    model = models(arch)
    chats = [r if isinstance(r, list) else r["messages"] for r in RECORDS]
    sft = collate([tokenize_chat(tok, m, label_mode="assistant") for m in chats], pad_token_id=tok.pad_token_id,
                  pad_to_multiple_of=None)
    model.zero_grad(set_to_none=True)
    loss_sum, n = causal_lm_loss_sum(model, sft["input_ids"], sft["labels"], sft["attention_mask"])
    (loss_sum / n).backward()
    ref = {"lm_sum": loss_sum.detach(), "n": n, "loss": (loss_sum / n).detach(),
           "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}}
    exs = _examples(tok, ViewConfig(num_predictors=1))
    for coll in (collate_separate, collate_packed):
        batch = coll(exs, pad_token_id=tok.pad_token_id)
        assert batch.num_lm_targets == int(n) and batch.num_examples == len(exs)
        _assert_same(ref, _run(model, batch, lam=0.0), f"{coll.__name__} lambda=0")
        skipped = _run(model, batch, jepa_active=False)
        _assert_same(ref, skipped, f"{coll.__name__} jepa_active=False")
        assert skipped["out"].enc_text is None and skipped["out"].slots == sft["input_ids"].numel()


def test_no_nan_under_eager_attention(tok, models):
    torch.manual_seed(0)
    eager, sdpa = models("llama", "eager"), models("llama", "sdpa")
    exs = _examples(tok, ViewConfig(num_predictors=3, text_view="user_only"))
    batch = collate_packed(exs, pad_token_id=tok.pad_token_id, padding_side="left")
    assert (batch.segment_ids == -1).any()  # padding rows exist
    mask = tree_attention_mask(batch.segment_ids, batch.position_ids, batch.branch_len)
    with torch.no_grad():
        hid = hidden_states(eager, batch.input_ids, mask, batch.position_ids)
    assert torch.isfinite(hid).all()  # every slot, padding included
    ref = _run(sdpa, collate_separate(exs, pad_token_id=tok.pad_token_id))
    _assert_same(ref, _run(eager, batch), "eager packed-left vs sdpa separate")


def test_tree_mask_hand_example():
    # row: F = 3 LM tokens, R_T = 2 tokens branching after p = 1, C = 2 code tokens, 1 pad
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, -1]])
    pos = torch.tensor([[0, 1, 2, 1, 2, 0, 1, 0]])
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0, 0],  # R_T[0] sees F[0:1) and itself
        [1, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],  # code: causal within itself only
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # pad: itself only
    ], dtype=torch.bool)
    m = tree_attention_mask(seg, pos, torch.tensor([1]), torch.float32)
    assert m.shape == (1, 1, 8, 8)
    expected = torch.zeros(8, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(m[0, 0], expected)
    assert torch.finfo(torch.bfloat16).min == tree_attention_mask(seg, pos, torch.tensor([1]), torch.bfloat16).min()


def test_packed_layout_and_token_accounting(tok):
    exs = _examples(tok, ViewConfig(num_predictors=1))
    for side in ("right", "left"):
        b = collate_packed(exs, pad_token_id=tok.pad_token_id, padding_side=side)
        lengths = [ex.packed_len for ex in exs]
        assert b.input_ids.shape == (len(exs), max(lengths)) and b.slots == len(exs) * max(lengths)
        assert b.real_tokens == sum(lengths)
        for i, ex in enumerate(exs):
            row = b.input_ids[i][b.segment_ids[i] >= 0].tolist()
            code = list(ex.code_ids[: ex.code_enc + 1])
            assert row == list(ex.lm_ids) + list(ex.text_remainder) + code
            assert b.input_ids[i, b.text_index[i]] == ex.text_ids[ex.text_enc]
            assert b.input_ids[i, b.code_index[i]] == ex.code_ids[ex.code_enc]
            rt = b.segment_ids[i] == 1
            assert b.position_ids[i][rt].tolist() == list(range(ex.text_prefix_len, ex.text_enc + 1))
    s = collate_separate(exs, pad_token_id=tok.pad_token_id)
    assert s.real_tokens == sum(len(ex.lm_ids) + len(ex.text_ids) + len(ex.code_ids) for ex in exs)
    assert s.to("cpu").lm.input_ids.equal(s.lm.input_ids)


def test_sliding_window_shorter_than_views_is_applied(tok, models):
    """Gemma-2's sliding layers with a window of 8 (views are longer): packed applies it, == separate.
    (Every windowed family: tests/jepa/test_sliding_window.py.)"""
    torch.manual_seed(0)
    model = models("gemma2")
    exs = _examples(tok, ViewConfig(num_predictors=1))
    assert max(ex.max_position for ex in exs) > 8
    old = model.config.sliding_window
    try:
        free = _run(model, collate_separate(exs, pad_token_id=tok.pad_token_id))
        model.config.sliding_window = 8
        ref, _ = _all_modes_agree(model, exs, tok.pad_token_id)
        assert (free["lm_sum"] - ref["lm_sum"]).abs() > 1e-3  # the window changes the numbers
    finally:
        model.config.sliding_window = old
