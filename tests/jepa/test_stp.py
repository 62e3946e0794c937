"""Semantic Tube Prediction (``jepa.objective: stp``).

Checks: the loss, its ablations and length weights by hand on a tiny trajectory (pieces with a skipped gap, a linear
predictor); span draws respect their constraints, are uniform where promised, and are keyed by (seed, step, example)
only — not by rank, micro-batch or batch order; the LM part of an STP forward is the NTP loss bit for bit; λ = 0 is
NTP bit for bit through the CLI (same weights and losses as ``jepa.lam=0`` and as ``sft``, on chat JSONL and on a
plain .txt file); micro 8 × accum 1 == micro 2 × accum 4; CLI runs on chat JSONL and plain text report the STP
part and the collapse statistics; the collapse statistic sees a collapsed trajectory; one-line config errors;
``JepaTrainer`` with STP (accumulation equivalence, first logged loss = ``stp_loss``, the linear predictor
trains); the SmolLM2 protocol script pairs STP arms with their NTP arms.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils.data import SequentialSampler

from conceptlm.cli import main
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.hf import build_tiny_model, causal_lm_loss_sum
from conceptlm.core.rng import StepRandomness
from conceptlm.jepa.config import JepaConfig, JepaSection, StpSection
from conceptlm.jepa.hf_trainer import JepaTrainer
from conceptlm.jepa.recipe import train as jepa_train
from conceptlm.jepa.stp import (
    curvature_pairs,
    displacements,
    draw_span,
    length_weight,
    piece_coefficients,
    span_coefficients,
    stp_distance,
    trajectory_curvature,
)
from conceptlm.jepa.stp_batch import collate_stp, with_stp_targets
from conceptlm.jepa.stp_data import StpChatDataset, StpExample
from conceptlm.jepa.stp_hf import StpDataCollator, stp_loss
from conceptlm.jepa.stp_unit import StpUnit, run_stp_batch, stp_terms
from conceptlm.sft.config import SFTConfig
from conceptlm.sft.recipe import train as sft_train
from tests.conftest import load_benchmark, make_chat_records, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# h_0 … h_5 of one example; pieces (1, 3) and (4, 6): token 3 (a "template" token) is not on the trajectory
H = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [5.0, 5.0], [5.0, 7.0], [6.0, 8.0]])
PIECES = ((1, 3), (4, 6))


def final(run_dir):
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model" / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rows(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


# ----------------------------------------------------------------------------------------------- values by hand


def test_stp_loss_by_hand():
    # virtual tokens: positions 1, 2 | 4, 5 (N = 4). Span [1, 3) = positions 2 and 4:
    #   span = (h2 - h1) + (h4 - h3) = (0, 1) + (0, 2) = (0, 3)
    #   rest = (h1 - h0) + (h5 - h4) = (1, 0) + (1, 1) = (2, 1)
    coef = span_coefficients(PIECES, 1, 3, 6)
    assert coef.tolist() == [[-1, 1, 0, 0, -1, 1], [0, -1, 1, -1, 1, 0]]
    rest, span = displacements(H[None], coef[None])[0]
    assert rest.tolist() == [2.0, 1.0] and span.tolist() == [0.0, 3.0]
    d = stp_distance(rest[None], span[None])
    assert d.item() == pytest.approx(1 - 3 / (math.sqrt(5) * 3))                 # 1 - cos = 1 - 1/sqrt(5)
    assert stp_distance(rest[None], span[None], "mse").item() == pytest.approx((4 + 4) / 2)
    assert stp_distance(rest[None], span[None], "l2").item() == pytest.approx(math.sqrt(8))
    swap = torch.nn.Linear(2, 2, bias=False)
    swap.weight.data = torch.tensor([[0.0, 1.0], [1.0, 0.0]])                     # P(rest) = (1, 2)
    assert stp_distance(rest[None], span[None], predictor=swap).item() == pytest.approx(1 - 2 / math.sqrt(5))
    # two_view: user turn (h2 - h0) = (1, 1) predicts assistant turn (h5 - h3) = (1, 3)
    tv = displacements(H[None], piece_coefficients(PIECES, 6)[None])[0]
    assert tv.tolist() == [[1.0, 1.0], [1.0, 3.0]]
    # curvature: pairs (δ1, δ2) = ((1,0), (0,1)) -> π/2 and (δ4, δ5) = ((0,2), (1,1)) -> π/4; the gap pair is skipped
    pairs = curvature_pairs(PIECES, 6)
    assert pairs.tolist() == [False, False, True, False, False, True]
    angles, count = trajectory_curvature(H[None], pairs[None])
    assert count.item() == 2 and angles.item() == pytest.approx(3 * math.pi / 4, abs=1e-5)
    # length weights (N = 4): cosine_like 2ℓr/(ℓ² + r²), jaccard_like 1 - |r - ℓ|/(r + ℓ)
    assert length_weight(4, 2, "cosine_like") == 1.0 and length_weight(4, 1, "cosine_like") == pytest.approx(0.6)
    assert length_weight(4, 1, "jaccard_like") == pytest.approx(0.5) and length_weight(4, 3, "none") == 1.0


def test_stp_terms_weighted_sum_and_collapse_statistic():
    """Σ w·d over valid spans (weight 0 = dropped); on a collapsed trajectory the mismatched distance equals the
    matched one (the diagnostic's point), on a varied one it is larger."""
    batch = collate_stp([StpExample(tuple(range(6)), (-100,) * 6, PIECES, 0)] * 2, pad_token_id=0)
    coef = torch.stack([span_coefficients(PIECES, 1, 3, 6)] * 2)
    b = with_stp_targets(batch, JepaSection(objective="stp").stp, StepRandomness(0, 0))
    b.coef, b.weight = coef, torch.tensor([[0.5], [0.0]])
    out = stp_terms(torch.stack([H, H]), b)
    assert out["stp"].item() == pytest.approx(0.5 * (1 - 1 / math.sqrt(5)))
    # collapse: every example moves along the same line -> stp_mismatch == stp
    line = torch.arange(6.0)[:, None] * torch.tensor([1.0, 2.0])
    b.weight = torch.ones(2, 1)
    stats = stp_terms(torch.stack([line, 2 * line]), b, stats=True)
    assert stats["stp_mismatch"][0].item() == pytest.approx(stats["stp"].item(), abs=1e-6)
    varied = stp_terms(torch.stack([H, -H]), b, stats=True)
    assert varied["stp_mismatch"][0].item() > varied["stp"].item() + 0.1


# ------------------------------------------------------------------------------------------------- span draws


@pytest.mark.parametrize("draw", ["start_end", "uniform", "two_points"])
def test_span_draws_respect_constraints(draw):
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7):
        for _ in range(200):
            s, t = draw_span(n, g, draw=draw)
            assert 0 <= s < t <= n and t - s < n
        for _ in range(100):
            s, t = draw_span(n, g, draw=draw, zero_start=True, max_length=2)
            assert s == 0 and 1 <= t <= 2 and t < n
    counts: dict = {}
    for _ in range(4000):
        key = draw_span(4, g, draw="uniform")
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 4 * 5 // 2 - 1 and max(counts.values()) < 1.25 * min(counts.values())  # 9 spans, uniform


def test_span_draw_keyed_by_seed_step_and_example_only():
    exs = [StpExample(tuple(range(12)), (-100,) * 12, ((1, 5), (7, 12)), i) for i in range(4)]
    cfg = StpSection(spans_per_example=2)
    whole = with_stp_targets(collate_stp(exs, pad_token_id=0), cfg, StepRandomness(3, 5, rank=0, micro=0))
    # another split (rank 1, micro 2), another order: each example keeps its own spans
    part = with_stp_targets(collate_stp(exs[::-1][:2], pad_token_id=0), cfg, StepRandomness(3, 5, rank=1, micro=2))
    assert torch.equal(part.coef[0], whole.coef[3]) and torch.equal(part.coef[1], whole.coef[2])
    again = with_stp_targets(collate_stp(exs, pad_token_id=0), cfg, StepRandomness(3, 5))
    assert torch.equal(again.coef, whole.coef)                                   # a resumed step draws the same
    later = [with_stp_targets(collate_stp(exs, pad_token_id=0), cfg, StepRandomness(3, s)).coef for s in range(6, 10)]
    assert any(not torch.equal(c, whole.coef) for c in later)                    # other steps, other spans
    other_seed = with_stp_targets(collate_stp(exs, pad_token_id=0), cfg, StepRandomness(4, 5)).coef
    assert not torch.equal(other_seed, whole.coef)
    assert whole.stp_count().item() == 8.0 and whole.coef.shape == (4, 4, 12)


# ------------------------------------------------------------------------------------------- forward / off-switch


@pytest.fixture(scope="module")
def tok():
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    corpus = [m["content"] for r in make_chat_records(60, seed=4) for m in r["messages"]] * 2
    return train_bpe_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="module")
def stp_examples(tok):
    ds = StpChatDataset([r["messages"] for r in make_chat_records(24, seed=5)], tok, max_length=256)
    assert len(ds) == 24 and all(len(ex.pieces) == 2 for ex in ds.examples)
    return ds


def _model(tok):
    return build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id).float()


def test_chat_pieces_are_the_user_and_assistant_contents(tok, stp_examples):
    rec = make_chat_records(24, seed=5)[0]["messages"]
    ex = stp_examples[0]
    (us, ue), (as_, ae) = ex.pieces
    assert tok.decode(ex.lm_ids[us:ue]).strip() == rec[1]["content"]
    assert tok.decode(ex.lm_ids[as_:ae]).strip() == rec[2]["content"]
    e2e = StpChatDataset([rec], tok, max_length=256, span_scope="e2e")[0]
    assert e2e.pieces == ((us, ae),) and e2e.lm_ids == ex.lm_ids
    assert StpChatDataset([rec], tok, max_length=256, span_scope="all")[0].pieces == ((1, ue), (as_, ae))


def test_lm_part_of_the_stp_forward_is_ntp_bit_for_bit(tok, stp_examples):
    torch.manual_seed(0)
    model = _model(tok)
    collated = collate_stp(stp_examples.examples[:8], pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)
    batch = with_stp_targets(collated, JepaSection(objective="stp").stp, StepRandomness(0, 0))
    lm = batch.lm
    ntp, n = causal_lm_loss_sum(model, lm.input_ids, lm.labels, lm.attention_mask, lm.position_ids)
    for layer in (-1, 1):
        out = run_stp_batch(model, batch, layer=layer)
        assert torch.equal(out.lm_loss_sum, ntp) and int(out.n_lm_targets) == int(n)
    unit = StpUnit(model, JepaSection(objective="stp", lam=0.5), seed=0).train()
    parts = unit(unit.prepare(batch))
    assert torch.equal(parts["lm"], ntp) and parts["stp"].item() > 0


def test_two_view_variant_on_a_model_equals_the_turn_displacements(tok, stp_examples):
    """variant two_view: Σ_i 1 − cos(h[ue−1] − h[us−1], h[ae−1] − h[as−1]) from one plain forward of the model."""
    from conceptlm.core.hf import hidden_states

    torch.manual_seed(0)
    model = _model(tok)
    exs = stp_examples.examples[:4]
    unit = StpUnit(model, JepaSection(objective="stp", lam=1.0, stp=StpSection(variant="two_view")), seed=0).train()
    batch = unit.prepare(collate_stp(exs, pad_token_id=tok.pad_token_id))
    got = unit(batch)["stp"]
    want = 0.0
    for ex in exs:
        h = hidden_states(model, torch.tensor([ex.lm_ids]))[0]
        (us, ue), (as_, ae) = ex.pieces
        want += 1 - torch.nn.functional.cosine_similarity(h[ue - 1] - h[us - 1], h[ae - 1] - h[as_ - 1], dim=0)
    assert got.item() == pytest.approx(want.item(), abs=1e-5) and unit.counts(batch)["stp"].item() == 4.0


def test_lambda_zero_is_ntp_bit_for_bit(tmp_path, chat_files):
    common = {"train.max_steps": 3}
    j0 = load_config(JepaConfig, None, tiny_overrides(tmp_path, chat_files[0], **common, **{"run.name": "j0",
                                                                                            "jepa.lam": 0.0}))
    s0 = load_config(JepaConfig, None, tiny_overrides(tmp_path, chat_files[0], **common, **{
        "run.name": "s0", "jepa.objective": "stp", "jepa.lam": 0.0}))
    jepa_train(j0)
    jepa_train(s0)
    assert max_diff(final(j0.run_dir), final(s0.run_dir)) == 0.0
    assert [r["loss"] for r in rows(j0.run_dir, "train")] == [r["loss"] for r in rows(s0.run_dir, "train")]
    # and SFT itself (no predictor tokens in either vocabulary)
    sft = load_config(SFTConfig, None, tiny_overrides(tmp_path, chat_files[0], **common, **{"run.name": "sft"}))
    sk = load_config(JepaConfig, None, tiny_overrides(tmp_path, chat_files[0], **common, **{
        "run.name": "sk", "jepa.objective": "stp", "jepa.lam": 0.0, "jepa.num_predictors": 0}))
    sft_train(sft)
    jepa_train(sk)
    assert max_diff(final(sft.run_dir), final(sk.run_dir)) == 0.0
    assert [r["lm"] for r in rows(sft.run_dir, "train")] == [r["lm"] for r in rows(sk.run_dir, "train")]
    # λ > 0 does change training
    s1 = load_config(JepaConfig, None, tiny_overrides(tmp_path, chat_files[0], **common, **{
        "run.name": "s1", "jepa.objective": "stp", "jepa.lam": 1.0}))
    jepa_train(s1)
    assert max_diff(final(j0.run_dir), final(s1.run_dir)) > 1e-4


def _text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(m["content"] for r in make_chat_records(300, seed=3) for m in r["messages"]) + "\n")
    return path


def test_lambda_zero_on_plain_text_is_sft_bit_for_bit(tmp_path):
    txt = _text_file(tmp_path)
    kw = {"train.max_steps": 3, "data.max_length": 64}
    sft = load_config(SFTConfig, None, tiny_overrides(tmp_path, txt, **kw, **{"run.name": "sft"}))
    s0 = load_config(JepaConfig, None, tiny_overrides(tmp_path, txt, **kw, **{
        "run.name": "s0", "jepa.objective": "stp", "jepa.lam": 0.0, "jepa.num_predictors": 0}))
    sft_train(sft)
    jepa_train(s0)
    assert max_diff(final(sft.run_dir), final(s0.run_dir)) == 0.0


def test_grad_accumulation_equivalence(tmp_path, chat_files):
    kw = {"jepa.objective": "stp", "jepa.lam": 1.0, "train.max_steps": 3, "jepa.stp.length_weight": "cosine_like",
          "jepa.stp.spans_per_example": 2}
    a = load_config(JepaConfig, None, tiny_overrides(tmp_path, chat_files[0], **kw, **{
        "run.name": "a", "train.micro_batch_size": 8, "train.grad_accum": 1}))
    b = load_config(JepaConfig, None, tiny_overrides(tmp_path, chat_files[0], **kw, **{
        "run.name": "b", "train.micro_batch_size": 2, "train.grad_accum": 4}))
    ra, rb = jepa_train(a), jepa_train(b)
    assert max_diff(final(a.run_dir), final(b.run_dir)) <= 1e-5
    assert ra.last_train["stp"] == pytest.approx(rb.last_train["stp"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("variant", ["random_span", "curvature"])
def test_cli_stp_on_chat_and_plain_text(tmp_path, chat_files, capsys, variant):
    txt = _text_file(tmp_path)
    for name, train_file, eval_file in (("chat", chat_files[0], chat_files[1]), ("text", txt, txt)):
        ov = tiny_overrides(tmp_path, train_file, eval_file, **{
            "run.name": name, "jepa.objective": "stp", "jepa.stp.variant": variant, "jepa.stp.linear_predictor": True,
            "data.max_length": 128 if name == "chat" else 64, "train.max_steps": 2, "data.limit_eval": 16})
        assert main(["jepa", "train", *ov]) == 0
        run_dir = tmp_path / "runs" / name
        train_rows, eval_rows = rows(run_dir, "train"), rows(run_dir, "eval")
        assert all(r["stp"] > 0 for r in train_rows) and eval_rows[-1]["stp"] > 0
        if variant == "random_span":
            assert {"stp_mismatch", "cos_matched", "rest_erank", "span_var"} <= set(eval_rows[-1])
        ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
        assert (ckpt / "model" / "config.json").is_file()  # the export is the plain HF model
        if name == "chat" and variant == "random_span":  # the two-view analysis of an STP model's chat data
            capsys.readouterr()
            assert main(["jepa", "analyze", *ov]) == 0
            summary = json.loads(capsys.readouterr().out)
            assert summary["n"] == 16 and "enc_text_erank" in summary
    capsys.readouterr()


def test_two_view_variant_on_plain_text_is_one_clear_line(tmp_path, capsys):
    ov = tiny_overrides(tmp_path, _text_file(tmp_path), **{"jepa.objective": "stp", "jepa.stp.variant": "two_view"})
    assert main(["jepa", "train", *ov]) != 0
    err = capsys.readouterr().err.strip()
    assert "jepa.stp.variant" in err and "plain text" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("override, field", [
    ("jepa.metric=infonce", "jepa.metric"), ("jepa.stp.spans_per_example=0", "jepa.stp.spans_per_example"),
    ("jepa.stp.span_max_length=0", "jepa.stp.span_max_length"), ("jepa.stp.variant=straight", "jepa.stp.variant"),
    ("jepa.stp.span_scope=e2e", "jepa.stp.span_scope"), ("jepa.stp.min_lam=5", "jepa.stp.min_lam"),
    ("jepa.objective=tube", "jepa.objective")])
def test_config_errors_are_one_line(override, field):
    extra = ["jepa.stp.variant=two_view"] if "span_scope" in override else []
    extra += ["jepa.stp.lam_warmup=true"] if "min_lam" in override else []
    with pytest.raises(ConfigError) as e:
        load_config(JepaConfig, None, ["jepa.objective=stp", *extra, override])
    assert field in str(e.value) and len(str(e.value).splitlines()) == 1


def test_lambda_defaults_follow_the_objective():
    assert JepaSection().lam == 1.0 and JepaSection(objective="stp").lam == 0.02
    assert load_config(JepaConfig, None, ["jepa.objective=stp"]).jepa.lam == 0.02
    assert load_config(JepaConfig, None, ["jepa.objective=stp", "jepa.lam=0.5"]).jepa.lam == 0.5


# ---------------------------------------------------------------------------------------------------- JepaTrainer


class SeqJepaTrainer(JepaTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def _hf_train(tok, examples, out, *, bs, ga, steps=2, jepa=None):
    torch.manual_seed(0)
    model = _model(tok)
    args = transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga, max_steps=steps, learning_rate=1e-2, warmup_steps=0, max_grad_norm=1.0,
        adam_epsilon=1e-4, logging_steps=1, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
        remove_unused_columns=False)
    trainer = SeqJepaTrainer(model, args, jepa_args={"objective": "stp", "lam": 1.0, **(jepa or {})},
                             train_dataset=examples, processing_class=tok)
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


def test_jepa_trainer_stp(tok, stp_examples, tmp_path):
    m1, log1 = _hf_train(tok, stp_examples, tmp_path / "a", bs=8, ga=1)
    m4, log4 = _hf_train(tok, stp_examples, tmp_path / "b", bs=2, ga=4)
    p1, p4 = m1.state_dict(), m4.state_dict()
    assert max((p1[k] - p4[k]).abs().max().item() for k in p1) <= 1e-5
    for a, b in zip(log1, log4):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["stp"] == pytest.approx(a["stp"], rel=1e-5)
    # the first logged loss is stp_loss on the first batch with the spans of step 0 (what the CLI would draw)
    torch.manual_seed(0)
    batch = StpDataCollator(tok.pad_token_id)(stp_examples.examples[:8])["jepa_batch"]
    loss, parts = stp_loss(_model(tok), batch, JepaSection(objective="stp", lam=1.0), step=0, seed=0)
    assert log1[0]["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert log1[0]["stp"] == pytest.approx(parts["stp"].item(), abs=1e-6)
    # the linear predictor is part of the model and trains
    mp, _ = _hf_train(tok, stp_examples, tmp_path / "c", bs=8, ga=1, jepa={"stp": {"linear_predictor": True}})
    section = JepaSection(objective="stp", stp=StpSection(linear_predictor=True))
    fresh = StpUnit(_model(tok), section, seed=0).stp_predictor
    assert (mp.stp_predictor.weight - fresh.weight).abs().max().item() > 1e-4


# ----------------------------------------------------------------------------------------------- protocol script


def test_protocol_pairs_stp_arms_with_ntp_arms():
    protocol = load_benchmark("jepa_smollm2_protocol")
    assert protocol.parse_arm("synth_stp") == ("synth_stp", None)
    assert protocol.parse_arm("synth_stp:500") == ("synth_stp", 500)
    pairs = protocol.comparisons(["synth_ntp", "synth_stp", "synth_ntp_n500", "synth_stp_n500", "synth_jepa"])
    assert ("synth_ntp", "synth_stp") in pairs and ("synth_ntp_n500", "synth_stp_n500") in pairs
    assert ("synth_ntp", "synth_stp_n500") in pairs          # STP on less data vs NTP on all of it
    assert ("synth_ntp", "synth_jepa") in pairs


@pytest.mark.distributed
def test_two_ddp_processes_equal_one_process(tmp_path, chat_files):
    """torchrun: 2 ranks × micro 2 × accum 2 == 1 rank × micro 8 (spans are keyed by example, not by rank)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CONCEPTLM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(repo / "src")}
    kw = {"jepa.objective": "stp", "jepa.lam": 1.0, "jepa.stp.linear_predictor": True, "train.max_steps": 3}
    one = tiny_overrides(tmp_path, chat_files[0], **kw, **{"run.name": "one", "train.micro_batch_size": 8})
    two = tiny_overrides(tmp_path, chat_files[0], **kw, **{"run.name": "two", "train.micro_batch_size": 2,
                                                           "train.grad_accum": 2})
    cmd = [sys.executable, "-m", "conceptlm", "jepa", "train"]
    subprocess.run([*cmd, *one], check=True, env=env, cwd=tmp_path, timeout=300, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "conceptlm", "jepa", "train", *two], env=env, cwd=tmp_path, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(final(tmp_path / "runs" / "one"), final(tmp_path / "runs" / "two")) <= 1e-5
    a, b = rows(tmp_path / "runs" / "one", "train"), rows(tmp_path / "runs" / "two", "train")
    assert [r["stp"] for r in b] == pytest.approx([r["stp"] for r in a], rel=1e-5)
