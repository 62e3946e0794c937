"""LLM-JEPA outside the CLI: ``jepa_loss`` values and the Hugging Face ``JepaTrainer``.

Checks: jepa_loss equals an independent per-example assembly from plain HF forwards (and run_jepa_batch +
jepa_distance); λ = 0 is the SFT token-mean loss; the loss runs through a DDP wrapper and restores the model's
forward; JepaTrainer batch 8 × GA 1 == batch 2 × GA 4 (parameters, logged loss / grad norm / parts), while the
micro-batch-mean normalisation (what the Trainer does without our counts) is measurably different; the first logged
loss equals jepa_loss on the first batch; packed == separate; the JEPA-loss dropout follows jepa_step_active per
optimizer step; eval_loss equals jepa_loss; clear errors; and 2 DDP ranks × batch 2 × GA 2 == 1 process × batch 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402

from conceptlm.core.hf import build_tiny_model, causal_lm_loss_sum  # noqa: E402
from conceptlm.jepa.config import ViewConfig  # noqa: E402
from conceptlm.jepa.forward import run_jepa_batch  # noqa: E402
from conceptlm.jepa.hf_collate import BATCH_KEY, JepaDataCollator  # noqa: E402
from conceptlm.jepa.hf_trainer import JepaTrainer, jepa_loss  # noqa: E402
from conceptlm.jepa.losses import jepa_distance  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate  # noqa: E402
from conceptlm.jepa.unit import jepa_step_active  # noqa: E402
from conceptlm.jepa.views import JepaExample, add_predictor_tokens, build_views  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
WORDS = "dog truck ring lake lines with words number letter vowel capital before after string zero more".split()


def _records(n: int) -> list[dict]:
    """Chat records with varied lengths (so token-mean and mean-of-micro-batch-means differ)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 14, (1,), generator=g))
        user = " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))
        answer = "".join("abcxyz()[]*.|"[int(i)] for i in torch.randint(13, (int(torch.randint(2, 18, (1,),
                                                                                               generator=g)),),
                                                                          generator=g))
        out.append([{"role": "system", "content": "Convert."}, {"role": "user", "content": user},
                    {"role": "assistant", "content": answer}])
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    from conceptlm.core.tokenizer import train_bpe_tokenizer

    corpus = [m["content"] for r in _records(40) for m in r] * 3
    t = train_bpe_tokenizer(corpus, vocab_size=300)
    add_predictor_tokens(t, None, 1)
    return t


@pytest.fixture(scope="module")
def examples(tok) -> list[JepaExample]:
    exs = [ex for r in _records(24) for ex in build_views(r, tok, ViewConfig(num_predictors=1))]
    assert len(exs) == 24 and len({len(e.lm_ids) for e in exs}) > 5
    return exs


def _model(tok):
    return build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id).float()


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class SeqJepaTrainer(JepaTrainer):
    """Sequential data order, so that different batch/accumulation splits see the same examples per step."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class Recording:
    """Collator wrapper that records the dataset indices of every micro-batch."""

    def __init__(self, collator, examples):
        self.collator, self.index, self.seen = collator, {id(e): i for i, e in enumerate(examples)}, []

    def __call__(self, features):
        self.seen.append([self.index[id(f)] for f in features])
        return self.collator(features)


def _args(out, *, bs: int, ga: int, steps: int, **kw) -> transformers.TrainingArguments:
    """lr 1e-2, no warmup, clip 1.0. Adam ε = 1e-4: with ε = 1e-8, g / (|g| + ε) turns fp32 rounding of
    near-zero gradient entries (~1e-10, from different padding/reduction order) into ~5e-6 weight differences;
    with 1e-4 the splits agree to ~2e-7 while weights still move by > 1e-2."""
    base = dict(output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga, max_steps=steps, learning_rate=1e-2, warmup_steps=0,
                max_grad_norm=1.0, adam_epsilon=1e-4, logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                disable_tqdm=True, remove_unused_columns=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(tok, examples, tmp, *, bs: int, ga: int, steps: int, mode: str = "packed", cls=SeqJepaTrainer,
           jepa: dict | None = None, **kw):
    torch.manual_seed(0)
    model = _model(tok)
    rec = Recording(JepaDataCollator(tok.pad_token_id, mode=mode), examples)
    trainer = cls(model, _args(tmp, bs=bs, ga=ga, steps=steps, **kw), jepa_args={"mode": mode, **(jepa or {})},
                  data_collator=rec, train_dataset=examples, processing_class=tok)
    trainer.train()
    steps_log = [h for h in trainer.state.log_history if "loss" in h]
    return _params(model), steps_log, rec.seen


@pytest.fixture(scope="module")
def runs(tok, examples, tmp_path_factory):
    """bs 8 × GA 1 and bs 2 × GA 4, 3 optimizer steps each (shared by several tests)."""
    tmp = tmp_path_factory.mktemp("runs")
    return {"8x1": _train(tok, examples, tmp / "a", bs=8, ga=1, steps=3),
            "2x4": _train(tok, examples, tmp / "b", bs=2, ga=4, steps=3)}


# ------------------------------------------------------------------------------------------------- jepa_loss


def _reference(model, exs, *, lam: float, gamma: float) -> tuple[float, float, float]:
    """Independent assembly: one plain HF forward per example and view, cosine distance by hand."""
    ce_sum, n_tok, dists = 0.0, 0, []
    with torch.no_grad():
        for ex in exs:
            ids, labels = torch.tensor([ex.lm_ids]), torch.tensor([ex.lm_labels])
            n = int((labels[:, 1:] != -100).sum())
            ce_sum += model(input_ids=ids, labels=labels).loss.item() * n
            n_tok += n
            h_t = model.model(input_ids=torch.tensor([ex.text_ids])).last_hidden_state[0, ex.text_enc]
            h_c = model.model(input_ids=torch.tensor([ex.code_ids])).last_hidden_state[0, ex.code_enc]
            dists.append(1.0 - (h_t @ h_c / (h_t.norm() * h_c.norm())).item())
    lm, jepa = ce_sum / n_tok, sum(dists) / len(dists)
    return gamma * lm + lam * jepa, lm, jepa


@pytest.mark.parametrize("mode", ["packed", "separate"])
def test_jepa_loss_value(tok, examples, mode):
    torch.manual_seed(0)
    model = _model(tok).eval()
    exs = examples[:6]
    collate = collate_packed if mode == "packed" else collate_separate
    batch = collate(exs, pad_token_id=tok.pad_token_id)
    loss, parts = jepa_loss(model, batch, lam=0.7, gamma=1.3)
    ref, ref_lm, ref_jepa = _reference(model, exs, lam=0.7, gamma=1.3)
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    assert parts["lm"].item() == pytest.approx(ref_lm, abs=1e-5)
    assert parts["jepa"].item() == pytest.approx(ref_jepa, abs=1e-5)
    assert ref_jepa > 0.05  # the JEPA term is not negligible
    assert loss.requires_grad and not parts["lm"].requires_grad
    # the same from run_jepa_batch + jepa_distance, for another metric
    out = run_jepa_batch(model, batch)
    d = jepa_distance(out.pred, out.target, "l2")
    hand = 1.3 * out.lm_loss_sum / out.n_lm_targets + 0.7 * d.mean()
    loss_l2, _ = jepa_loss(model, batch, lam=0.7, gamma=1.3, metric="l2")
    assert loss_l2.item() == pytest.approx(hand.item(), abs=1e-6)


@pytest.mark.parametrize("mode", ["packed", "separate"])
def test_lambda_zero_and_skipped_jepa_are_sft(tok, examples, mode):
    torch.manual_seed(0)
    model = _model(tok).eval()
    collate = collate_packed if mode == "packed" else collate_separate
    batch = collate(examples[:5], pad_token_id=tok.pad_token_id)
    lm = batch.lm
    s, n = causal_lm_loss_sum(model, lm.input_ids, lm.labels, lm.attention_mask, lm.position_ids)
    sft = (s / n).item()
    hf = model(input_ids=lm.input_ids, attention_mask=lm.attention_mask, labels=lm.labels).loss.item()
    assert sft == pytest.approx(hf, abs=1e-5)
    loss0, parts0 = jepa_loss(model, batch, lam=0.0)
    assert loss0.item() == pytest.approx(sft, abs=1e-6) and parts0["jepa"].item() == 0.0
    loss_off, _ = jepa_loss(model, batch, lam=1.0, gamma=2.0, jepa_active=False)
    assert loss_off.item() == pytest.approx(2.0 * sft, abs=1e-6)
    loss_on, _ = jepa_loss(model, batch, lam=1.0, gamma=2.0)
    assert loss_on.item() > loss_off.item() + 1e-3


def test_jepa_loss_runs_through_ddp_and_restores_forward(tok, examples, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = _model(tok)
    batch = collate_packed(examples[:4], pad_token_id=tok.pad_token_id)
    loss_ref, _ = jepa_loss(model, batch)
    loss_ref.backward()
    grads_ref = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert "forward" not in model.__dict__  # the temporary forward was removed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DDP(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda mod, args: calls.append(1))
        sentinel = model.forward
        model.forward = sentinel  # an instance-level forward (as accelerate installs) must come back unchanged
        loss, _ = jepa_loss(wrapped, batch)
        loss.backward()
        assert calls == [1]
        assert model.__dict__["forward"] is sentinel
        assert loss.item() == pytest.approx(loss_ref.item(), abs=1e-7)
        assert max((p.grad - grads_ref[k]).abs().max().item() for k, p in model.named_parameters()) < 1e-7
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ JepaTrainer


def test_grad_accumulation_equivalence(runs, tok, examples, tmp_path):
    (p1, log1, seen1), (p4, log4, seen4) = runs["8x1"], runs["2x4"]
    # identical data per optimizer step
    assert seen1 == [list(range(8 * i, 8 * i + 8)) for i in range(3)]
    assert [sum(seen4[4 * i:4 * i + 4], []) for i in range(3)] == seen1
    init = _params(_model(tok))
    moved = _max_diff(init, p1)
    assert moved > 500 * TOL  # the weights moved far more than the tolerance
    assert _max_diff(p1, p4) <= TOL
    assert len(log1) == len(log4) == 3
    for a, b in zip(log1, log4):
        for key in ("loss", "grad_norm", "lm", "jepa"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert a["jepa_steps"] == b["jepa_steps"] == 1.0
    assert log1[0]["jepa"] > 0.05

    # the Trainer's fallback normalisation (mean of micro-batch means, what it does without our counts) differs
    class MicroMean(SeqJepaTrainer):
        def _get_num_items_in_batch(self, batch_samples, device):
            return None

    p_mm, log_mm, _ = _train(tok, examples, tmp_path, bs=2, ga=4, steps=3, cls=MicroMean)
    assert _max_diff(p1, p_mm) > 100 * TOL
    assert abs(log_mm[0]["lm"] - log1[0]["lm"]) > 1e-3


def test_first_step_loss_equals_jepa_loss(runs, tok, examples):
    torch.manual_seed(0)
    model = _model(tok)
    batch = collate_packed(examples[:8], pad_token_id=tok.pad_token_id)
    loss, parts = jepa_loss(model, batch)
    for name in ("8x1", "2x4"):  # the accumulated run's step loss is the same global objective
        first = runs[name][1][0]
        assert first["loss"] == pytest.approx(loss.item(), abs=1e-6), name
        assert first["lm"] == pytest.approx(parts["lm"].item(), abs=1e-6)
        assert first["jepa"] == pytest.approx(parts["jepa"].item(), abs=1e-6)


def test_packed_and_separate_trainers_agree(tok, examples, tmp_path):
    pp, lp, _ = _train(tok, examples, tmp_path / "p", bs=4, ga=2, steps=2, mode="packed")
    ps, ls, _ = _train(tok, examples, tmp_path / "s", bs=4, ga=2, steps=2, mode="separate")
    assert _max_diff(pp, ps) <= TOL
    assert _max_diff(pp, _params(_model(tok))) > 1e-2
    assert [r["loss"] for r in ls] == pytest.approx([r["loss"] for r in lp], rel=1e-5)


def test_jepa_ratio_dropout_is_per_optimizer_step(tok, examples, tmp_path):
    seed = next(s for s in range(100)
                if len({jepa_step_active(s, i, 0.5) for i in range(6)}) == 2)  # a seed with mixed steps
    want = [jepa_step_active(seed, i, 0.5) for i in range(6)]
    _, log, _ = _train(tok, examples, tmp_path, bs=2, ga=2, steps=6, jepa={"jepa_ratio": 0.5}, seed=seed)
    assert [r["jepa_steps"] == 1.0 for r in log] == want
    for r, active in zip(log, want):
        if active:
            assert r["jepa"] > 0 and r["loss"] == pytest.approx(r["lm"] + r["jepa"], rel=1e-5)
        else:
            assert "jepa" not in r and r["loss"] == pytest.approx(r["lm"], rel=1e-6)


def test_evaluate_reports_the_jepa_objective(tok, examples, tmp_path):
    torch.manual_seed(0)
    model = _model(tok)
    trainer = JepaTrainer(model, _args(tmp_path, bs=2, ga=1, steps=1, per_device_eval_batch_size=8),
                          jepa_args={"lam": 0.5}, eval_dataset=examples[:8], processing_class=tok)
    metrics = trainer.evaluate()
    loss, _ = jepa_loss(model.eval(), collate_packed(examples[:8], pad_token_id=tok.pad_token_id), lam=0.5)
    assert metrics["eval_loss"] == pytest.approx(loss.item(), abs=1e-6)


def test_collator_accepts_dict_rows(tok, examples):
    fields = ("lm_ids", "lm_labels", "text_ids", "text_enc", "code_ids", "code_enc", "text_prefix_len")
    rows = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in ((f, getattr(e, f)) for f in fields)}
            for e in examples[:3]]
    for mode in ("packed", "separate"):
        c = JepaDataCollator(tok.pad_token_id, mode=mode)
        a, b = c(examples[:3])[BATCH_KEY], c(rows)[BATCH_KEY]
        assert torch.equal(a.lm.input_ids, b.lm.input_ids) and torch.equal(a.lm.labels, b.lm.labels)
    with pytest.raises(ValueError, match="lacks JepaExample field"):
        JepaDataCollator(tok.pad_token_id)([{"lm_ids": [1, 2]}])
    with pytest.raises(TypeError, match="expected a JepaExample"):
        JepaDataCollator(tok.pad_token_id)(["text"])
    with pytest.raises(ValueError, match="mode must be one of"):
        JepaDataCollator(tok.pad_token_id, mode="flat")


def test_clear_errors(tok, examples, tmp_path):
    model = _model(tok)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        JepaTrainer(model, transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                    train_dataset=examples, processing_class=tok)
    args = _args(tmp_path, bs=2, ga=1, steps=1)
    with pytest.raises(ValueError, match="differs from jepa_args.mode"):
        JepaTrainer(model, args, jepa_args={"mode": "packed"}, data_collator=JepaDataCollator(0, mode="separate"),
                    train_dataset=examples)
    with pytest.raises(ValueError, match="processing_class"):
        JepaTrainer(model, args, train_dataset=examples)
    with pytest.raises(ValueError, match="unknown jepa_args"):
        JepaTrainer(model, args, jepa_args={"lambda": 1.0}, processing_class=tok)
    from conceptlm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="jepa.jepa_ratio"):
        JepaTrainer(model, args, jepa_args={"jepa_ratio": 2.0}, processing_class=tok)
    trainer = JepaTrainer(model, args, processing_class=tok, train_dataset=examples)
    with pytest.raises(ValueError, match="JepaDataCollator"):
        trainer.compute_loss(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})
    with pytest.raises(TypeError, match="SeparateBatch or PackedBatch"):
        jepa_loss(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})


# ------------------------------------------------------------------------------------- two DDP processes


def _ddp_worker(work: str) -> None:
    """torchrun worker: 2 ranks × batch 2 × GA 2, 3 steps, on the examples and initial model saved by the test."""
    from safetensors.torch import save_file

    from conceptlm.core.hf import load_tokenizer

    work_dir = Path(work)
    tokenizer = load_tokenizer(work_dir / "tok")
    model = transformers.AutoModelForCausalLM.from_pretrained(work_dir / "model", dtype=torch.float32)
    rows = json.loads((work_dir / "examples.json").read_text())
    args = _args(work_dir / "out", bs=2, ga=2, steps=3, ddp_backend="gloo")
    trainer = SeqJepaTrainer(model, args, jepa_args={"mode": "packed"}, train_dataset=rows,
                             processing_class=tokenizer)
    trainer.train()
    if trainer.args.process_index == 0:
        save_file(_params(model), str(work_dir / "final.safetensors"))
        (work_dir / "log.json").write_text(json.dumps([h for h in trainer.state.log_history if "loss" in h]))


@pytest.mark.distributed
def test_two_ddp_processes_equal_one_process(runs, tok, examples, tmp_path):
    from safetensors.torch import load_file

    tok.save_pretrained(str(tmp_path / "tok"))
    _model(tok).save_pretrained(str(tmp_path / "model"))
    fields = ("lm_ids", "lm_labels", "text_ids", "text_enc", "code_ids", "code_enc", "text_prefix_len")
    (tmp_path / "examples.json").write_text(json.dumps([{f: getattr(e, f) for f in fields} for e in examples]))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p1, log1, _ = runs["8x1"]
    assert _max_diff(p1, load_file(str(tmp_path / "final.safetensors"))) <= TOL
    log2 = json.loads((tmp_path / "log.json").read_text())
    for a, b in zip(log1, log2, strict=True):
        for key in ("loss", "grad_norm", "lm", "jepa"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
