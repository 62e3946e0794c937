"""Collapse diagnostics and the VICReg anti-collapse option of LLM-JEPA.

Values by hand on small tensors: effective rank (collapsed -> 1, orthogonal -> n, a 2-singular-value case),
per-dimension variance, matched/mismatched cosine, retrieval ranks with ties counted as misses, the per-batch
(sum, count) metrics, the VICReg variance hinge and covariance penalty. The unit's VICReg parts are wired to both
embeddings with the batch weight; ``anti_collapse=none`` is the paper objective and VICReg with zero weights trains
bit for bit like it. A tiny run logs the eval metrics in metrics.jsonl (eval ``jepa`` = 1 − ``cos_matched`` for the
cosine metric) and ``analyze`` reports retrieval accuracy.
"""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conceptlm.core.config import load_config  # noqa: E402
from conceptlm.core.errors import ConfigError  # noqa: E402
from conceptlm.core.hf import build_tiny_model  # noqa: E402
from conceptlm.core.metrics import read_metrics  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.jepa.analysis import collapse_report  # noqa: E402
from conceptlm.jepa.collapse import (  # noqa: E402
    BATCH_STAT_NAMES,
    batch_stats,
    cosine_matched_mismatched,
    effective_rank,
    mean_dim_variance,
    mismatched,
    retrieval_accuracy,
    retrieval_ranks,
)
from conceptlm.jepa.config import JepaConfig, JepaSection, ViewConfig  # noqa: E402
from conceptlm.jepa.forward import run_jepa_batch  # noqa: E402
from conceptlm.jepa.losses import jepa_distance, vicreg_covariance, vicreg_variance  # noqa: E402
from conceptlm.jepa.packing import collate_packed  # noqa: E402
from conceptlm.jepa.recipe import train as jepa_train  # noqa: E402
from conceptlm.jepa.unit import JepaUnit  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens, build_views  # noqa: E402
from tests.conftest import make_chat_records, tiny_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cos(p, t):
    return jepa_distance(p, t, "cosine")


# ------------------------------------------------------------------------------------------------ statistics

def test_mismatched_is_a_derangement():
    t = torch.arange(8.0).reshape(4, 2)
    m = mismatched(t)
    assert m.tolist() == [[6.0, 7.0], [0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # row i = target i-1, none in place
    with pytest.raises(ValueError, match="at least 2"):
        mismatched(t[:1])


def test_effective_rank_values():
    v = torch.tensor([0.3, -1.2, 2.0, 0.5, 0.1])
    collapsed = torch.stack([v * s for s in (1.0, 2.0, 0.5, 3.0, 1.5, 0.7)])  # same direction, different norms
    assert effective_rank(collapsed).item() == pytest.approx(1.0, abs=1e-5)
    ortho = torch.diag(torch.tensor([1.0, 5.0, 0.2, 3.0])) @ torch.eye(4, 7)  # 4 orthogonal rows in 7 dims
    assert effective_rank(ortho).item() == pytest.approx(4.0, abs=1e-5)
    # rows e1, e2, e1 -> singular values sqrt(2), 1: p = (sqrt2, 1) / (1 + sqrt2), erank = exp(H(p))
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0]])
    p = torch.tensor([math.sqrt(2.0), 1.0]) / (1 + math.sqrt(2.0))
    assert effective_rank(x).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), abs=1e-5)
    assert effective_rank(torch.zeros(3, 4)).item() == 0.0


def test_mean_dim_variance_values():
    x = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # unbiased variances 2 and 8
    assert mean_dim_variance(x).item() == pytest.approx(5.0)
    assert mean_dim_variance(torch.ones(5, 3) * 7).item() == 0.0
    with pytest.raises(ValueError):
        mean_dim_variance(x[:1])


def test_retrieval_ranks_and_accuracy():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    # q1's own key (cos .8) is beaten by k0 (cos 1) -> rank 1; the others rank 0
    assert retrieval_ranks(q, k).tolist() == [0, 1, 0]
    acc = retrieval_accuracy(q, k, ks=(1, 5))
    assert acc[1] == pytest.approx(2 / 3) and acc[5] == 1.0
    same = torch.ones(6, 3)  # collapsed: every key ties with the own key -> rank N-1, never a hit
    assert retrieval_ranks(same, same).tolist() == [5] * 6
    assert retrieval_accuracy(same, same) == {1: 0.0, 5: 0.0}
    perm = torch.eye(5)[[2, 0, 4, 1, 3]]
    assert retrieval_accuracy(perm, perm * 3.0) == {1: 1.0, 5: 1.0}


def test_cosine_matched_mismatched_values():
    assert cosine_matched_mismatched(torch.eye(3), torch.eye(3)) == pytest.approx((1.0, 0.0))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # cos: (q0,k0) 1/sqrt2, (q1,k1) 1, (q0,k1) 0, (q1,k0) 1/sqrt2
    m, mis = cosine_matched_mismatched(q, k)
    assert m == pytest.approx((1 / math.sqrt(2) + 1) / 2) and mis == pytest.approx(1 / math.sqrt(2) / 2)


def test_batch_stats_on_collapsed_and_orthogonal_batches():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g)
    collapsed = base + 1e-4 * torch.randn(8, 16, generator=g)
    s = batch_stats(collapsed, collapsed.flip(0), collapsed, collapsed.flip(0), _cos)
    assert set(s) == set(BATCH_STAT_NAMES) and all(c == 8 for _, c in s.values())
    assert s["enc_text_erank"][0].item() / 8 == pytest.approx(1.0, abs=1e-2)  # entropy: noise 1e-4 -> 1.003
    assert s["cos_mismatched"][0].item() / 8 == pytest.approx(s["cos_matched"][0].item() / 8, abs=1e-6)
    assert s["jepa_mismatch"][0].item() / 8 < 1e-6  # the distance cannot tell matched from mismatched
    assert s["enc_code_var"][0].item() / 8 < 1e-7

    e = torch.eye(4)
    s = batch_stats(e, e, e, e, _cos)
    assert s["cos_matched"][0].item() == pytest.approx(4.0) and s["cos_mismatched"][0].item() == pytest.approx(0.0)
    assert s["jepa_mismatch"][0].item() == pytest.approx(4.0)  # 1 - cos = 1 for each of the 4 rolled pairs
    assert s["enc_text_erank"][0].item() == pytest.approx(4.0 * 4)  # value * B
    # eye(4): each column has one 1 and three 0 -> unbiased variance (0.75² + 3·0.25²) / 3 = 0.25
    assert s["enc_code_var"][0].item() == pytest.approx(0.25 * 4)
    assert batch_stats(e[:1], e[:1], e[:1], e[:1], _cos) == {}


def test_collapse_report_on_hand_made_embeddings():
    ortho = torch.eye(6, 8)
    r = collapse_report(ortho, ortho * 2.0)
    assert r["enc_text_erank"] == pytest.approx(6.0, abs=1e-5) and r["retrieval_top1"] == 1.0
    assert r["cos_matched"] == pytest.approx(1.0) and r["cos_mismatched"] == pytest.approx(0.0)
    assert r["jepa_matched"] == pytest.approx(0.0, abs=1e-6) and r["jepa_mismatched"] == pytest.approx(1.0)
    same = torch.ones(6, 8)
    r = collapse_report(same, same, metric="l2")
    assert r["enc_code_erank"] == pytest.approx(1.0, abs=1e-5) and r["enc_text_var"] == 0.0
    assert r["jepa_matched"] == r["jepa_mismatched"] == 0.0 and r["retrieval_top1"] == r["retrieval_top5"] == 0.0


# ------------------------------------------------------------------------------------------------ VICReg

def test_vicreg_variance_values():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # variances 2 (std sqrt2 > 1: no hinge) and 0 (hinge 1 - sqrt(eps))
    assert vicreg_variance(z, eps=0.0).item() == pytest.approx(0.5)
    assert vicreg_variance(z).item() == pytest.approx((1 - math.sqrt(1e-4)) / 2)
    assert vicreg_variance(z, gamma=2.0, eps=0.0).item() == pytest.approx(((2 - math.sqrt(2)) + 2) / 2)
    z = z.clone().requires_grad_(True)
    vicreg_variance(z, eps=0.0).backward()
    assert z.grad[:, 0].abs().max().item() == 0.0  # no gradient where the hinge is inactive


def test_vicreg_covariance_values():
    assert vicreg_covariance(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])).item() == 0.0
    # [[1,2],[-1,-2]]: centred already, C = zᵀz / 1 = [[2,4],[4,8]] -> off-diagonal 4² + 4² = 32, / D=2 -> 16
    assert vicreg_covariance(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])).item() == pytest.approx(16.0)
    # shifting every row by the same vector changes nothing (centred)
    assert vicreg_covariance(torch.tensor([[4.0, 7.0], [2.0, 3.0]])).item() == pytest.approx(16.0)


def test_config_checks():
    JepaSection(anti_collapse="vicreg").validate()
    for bad, field in [(dict(anti_collapse="vicreg", lam=0.0), "jepa.anti_collapse"),
                       (dict(vicreg_var_weight=-1.0), "jepa.vicreg_var_weight"),
                       (dict(vicreg_gamma=0.0), "jepa.vicreg_gamma")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            JepaSection(**bad).validate()


SYS = {"role": "system", "content": "Convert."}


@pytest.fixture(scope="module")
def tiny():
    recs = make_chat_records(6, seed=3)
    tok = train_bpe_tokenizer([m["content"] for r in recs for m in r["messages"]] * 20, vocab_size=300)
    add_predictor_tokens(tok, None, 1)
    model = build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=2, seed=0,
                             pad_token_id=tok.pad_token_id).float()
    exs = [ex for r in recs for ex in build_views(r["messages"], tok, ViewConfig(num_predictors=1))]
    return model, collate_packed(exs, pad_token_id=tok.pad_token_id)


def test_unit_parts_with_and_without_vicreg(tiny):
    model, batch = tiny
    ref = run_jepa_batch(model.eval(), batch)
    b = batch.num_examples
    off = JepaUnit(model, JepaSection()).eval()
    assert off.loss_weights == {"lm": 1.0, "jepa": 1.0}  # none = the paper objective
    parts = off(batch)
    assert set(parts) == {"lm", "jepa", *BATCH_STAT_NAMES}  # eval mode: the collapse metrics too
    assert torch.equal(parts["jepa"], _cos(ref.pred, ref.target).sum())
    assert torch.equal(parts["lm"], ref.lm_loss_sum)
    assert parts["jepa_mismatch"][1] == b

    cfg = JepaSection(anti_collapse="vicreg", vicreg_var_weight=0.5, vicreg_cov_weight=0.1, vicreg_gamma=0.8)
    on = JepaUnit(model, cfg).train()
    assert on.loss_weights == {"lm": 1.0, "jepa": 1.0, "vicreg_var": 0.5, "vicreg_cov": 0.1}
    assert on.counts(batch)["vicreg_var"] == on.counts(batch)["vicreg_cov"] == b
    model.eval()  # dropout-free forward with the unit in training mode: no collapse metrics, VICReg parts
    p = on(batch)
    assert set(p) == {"lm", "jepa", "vicreg_var", "vicreg_cov"}
    want_var = b * (vicreg_variance(ref.enc_text, gamma=0.8) + vicreg_variance(ref.enc_code, gamma=0.8))
    want_cov = b * (vicreg_covariance(ref.enc_text) + vicreg_covariance(ref.enc_code))
    torch.testing.assert_close(p["vicreg_var"], want_var, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p["vicreg_cov"], want_cov, rtol=1e-6, atol=1e-7)
    assert p["vicreg_var"].requires_grad


# ------------------------------------------------------------------------------------------------ runs

def _cfg(tmp_path, files, **kw):
    ov = tiny_overrides(tmp_path, files[0], files[1], **{"train.max_steps": 3, "train.eval_every": 3, **kw})
    return load_config(JepaConfig, None, ov)


def _final(run_dir):
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model" / "model.safetensors"))


def test_vicreg_zero_weights_train_bit_for_bit_like_none(tmp_path, chat_files):
    a = _cfg(tmp_path, chat_files, **{"run.name": "r_none"})
    b = _cfg(tmp_path, chat_files, **{"run.name": "r_zero", "jepa.anti_collapse": "vicreg",
                                      "jepa.vicreg_var_weight": 0.0, "jepa.vicreg_cov_weight": 0.0})
    c = _cfg(tmp_path, chat_files, **{"run.name": "r_on", "jepa.anti_collapse": "vicreg"})
    for cfg in (a, b, c):
        jepa_train(cfg)
    wa, wb, wc = _final(a.run_dir), _final(b.run_dir), _final(c.run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # the regularizer does change training
    rows = read_metrics(c.run_dir / "metrics.jsonl", "train")
    assert all(0 < r["vicreg_var"] <= 2.0 and r["vicreg_cov"] >= 0 for r in rows)  # v <= γ per embedding
    assert all("vicreg_var" not in r for r in read_metrics(a.run_dir / "metrics.jsonl"))

    ev = read_metrics(a.run_dir / "metrics.jsonl", "eval")[-1]  # the eval collapse metrics of the tiny run
    assert set(BATCH_STAT_NAMES) <= set(ev)
    assert ev["jepa"] == pytest.approx(1 - ev["cos_matched"], abs=1e-6)  # cosine: both the same mean over examples
    assert -1 <= ev["cos_mismatched"] <= 1 and ev["jepa_mismatch"] == pytest.approx(1 - ev["cos_mismatched"],
                                                                                     abs=1e-6)
    assert 1.0 <= ev["enc_text_erank"] <= min(a.train.eval_batch_size, a.model.hidden_size) and ev["enc_code_var"] > 0


def test_analyze_reports_collapse_and_retrieval(tmp_path, chat_files, capsys):
    from conceptlm.cli import main

    ov = tiny_overrides(tmp_path, chat_files[0], chat_files[1], **{"train.max_steps": 2})
    assert main(["jepa", "train", *ov]) == 0
    capsys.readouterr()
    assert main(["jepa", "analyze", *ov]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("retrieval_top1", "retrieval_top5", "cos_matched", "cos_mismatched", "jepa_matched",
                "jepa_mismatched", "enc_text_erank", "enc_code_erank", "enc_text_var", "enc_code_var"):
        assert key in res, key
    assert 0 <= res["retrieval_top1"] <= res["retrieval_top5"] <= 1
    assert 1 <= res["enc_text_erank"] <= min(res["n"], res["d"])
    assert res["cos_matched"] == pytest.approx(res["mean_cosine_text_code"], abs=1e-9)
    assert res["jepa_matched"] == pytest.approx(1 - res["cos_matched"], abs=1e-5)
    saved = json.loads((tmp_path / "runs" / "t" / "analysis" / "analysis.json").read_text())
    assert saved["retrieval_top5"] == res["retrieval_top5"]


def test_hf_trainer_applies_the_regularizer_like_the_unit(tiny, tmp_path):
    """JepaTrainer with anti_collapse=vicreg: its first-step loss is the unit's objective on the same batch
    (γ·Σ CE/N + λ·Σ d/E + w_var·Σ B·var/E + w_cov·Σ B·cov/E), and the logs carry both VICReg parts."""
    import transformers

    from conceptlm.jepa.hf_collate import jepa_section
    from conceptlm.jepa.hf_trainer import JepaTrainer

    assert jepa_section({"anti_collapse": "vicreg"}).anti_collapse == "vicreg"
    model, batch = tiny
    cfg = JepaSection(anti_collapse="vicreg", vicreg_var_weight=0.5, vicreg_cov_weight=0.1, vicreg_gamma=0.8)
    unit = JepaUnit(model, cfg).train()
    model.eval()  # no dropout: the trainer's forward below sees the same weights
    with torch.no_grad():
        p = unit(batch)
        c = unit.counts(batch)
    want = sum(unit.loss_weights[k] * float(p[k]) / int(c[k]) for k in p)
    reg = sum(unit.loss_weights[k] * float(p[k]) / int(c[k]) for k in ("vicreg_var", "vicreg_cov"))
    assert reg > 1e-3 * want  # the regularizer is a visible part of the objective, far above the tolerance

    class One(JepaTrainer):
        def get_train_dataloader(self):
            return [{"jepa_batch": batch}] * 2

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                          per_device_train_batch_size=batch.num_examples, max_steps=1,
                                          learning_rate=0.0, logging_steps=1, save_strategy="no",
                                          disable_tqdm=True, remove_unused_columns=False)
    fields = {k: getattr(cfg, k) for k in ("anti_collapse", "vicreg_var_weight", "vicreg_cov_weight",
                                           "vicreg_gamma")}
    trainer = One(model, args, jepa_args=fields, data_collator=lambda rows: rows[0], train_dataset=[0] * 4)
    model.train()
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["loss"] == pytest.approx(want, rel=1e-5)
    assert log["vicreg_var"] == pytest.approx(float(p["vicreg_var"]) / int(c["vicreg_var"]), rel=1e-5)
    assert log["vicreg_cov"] == pytest.approx(float(p["vicreg_cov"]) / int(c["vicreg_cov"]), rel=1e-5)
