"""The one training loop: accumulation/normalisation equivalence, learning, non-finite stop, metrics, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError, NonFiniteLossError
from conceptlm.sft.config import SFTConfig
from conceptlm.sft.recipe import train
from tests.conftest import tiny_overrides


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_file(str(ckpts[-1] / "model" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(tmp_path, name, train_file, **kw):
    cfg = load_config(SFTConfig, None, tiny_overrides(tmp_path, train_file, **{"run.name": name, **kw}))
    return train(cfg), cfg.run_dir


def test_grad_accumulation_equivalence(tmp_path, chat_files):
    """micro-batch 8 x accum 1 == micro-batch 2 x accum 4 after 3 steps (token-weighted normalisation)."""
    _, a = run(tmp_path, "a", chat_files[0], **{"train.micro_batch_size": 8, "train.grad_accum": 1,
                                                 "train.max_steps": 3})
    _, b = run(tmp_path, "b", chat_files[0], **{"train.micro_batch_size": 2, "train.grad_accum": 4,
                                                 "train.max_steps": 3})
    wa, wb = final_weights(a), final_weights(b)
    assert max_diff(wa, wb) <= 1e-5
    # the runs did train (weights moved away from the shared init by much more than the tolerance)
    _, c = run(tmp_path, "c", chat_files[0], **{"train.max_steps": 1, "optim.lr": 1e-12, "schedule.warmup_steps": 0})
    assert max_diff(wa, final_weights(c)) > 1e-3


def test_token_weighted_normalisation_matches_full_batch_mean():
    """The loss the trainer back-propagates equals the global token mean, not a mean of micro-batch means."""
    from conceptlm.core.hf import build_tiny_model, causal_lm_loss_sum
    from conceptlm.sft.unit import SFTUnit

    torch.manual_seed(0)
    model = build_tiny_model("llama", 50, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    unit = SFTUnit(model)
    ids = torch.randint(0, 50, (4, 10))
    labels = ids.clone()
    labels[0, 3:] = -100  # very uneven target counts per example
    labels[1, 8:] = -100
    mask = torch.ones_like(ids)
    full = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    micro = [{k: v[i:i + 1] for k, v in full.items()} for i in range(4)]
    n = sum(unit.counts(b)["lm"] for b in micro)
    assert n == unit.counts(full)["lm"] == 2 + 7 + 9 + 9
    acc = sum(unit(b)["lm"] / n for b in micro)
    ref, cnt = causal_lm_loss_sum(model, ids, labels, attention_mask=mask)
    assert torch.allclose(acc, ref / cnt, atol=1e-6)
    naive = sum(unit(b)["lm"] / unit.counts(b)["lm"] for b in micro) / 4
    assert abs(naive.item() - (ref / cnt).item()) > 1e-3  # the naive mean really differs here


def test_training_lowers_eval_loss_and_writes_metrics(tmp_path, chat_files):
    res, run_dir = run(tmp_path, "learn", chat_files[0], **{"data.eval": str(chat_files[1]), "train.max_steps": 30,
                                                            "train.eval_every": 15, "optim.lr": 1e-2})
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    trains = [r for r in rows if r["split"] == "train"]
    assert len(trains) == 30 and {"loss", "lm", "lr", "grad_norm", "tokens_per_s"} <= trains[0].keys()
    assert trains[-1]["loss"] < trains[0]["loss"] - 1.0
    assert evals[-1]["loss"] < trains[0]["loss"] - 1.0
    saved = load_config(SFTConfig, run_dir / "config.yaml")  # the resolved config round-trips
    assert saved.train.max_steps == 30 and saved.optim.lr == 1e-2 and saved.data.eval is not None
    assert list((run_dir / "tb").iterdir())  # TensorBoard event file
    assert res.checkpoint is not None and (res.checkpoint / "model" / "model.safetensors").is_file()


def test_seeded_runs_are_reproducible(tmp_path, chat_files):
    _, a = run(tmp_path, "r1", chat_files[0])
    _, b = run(tmp_path, "r2", chat_files[0])
    assert max_diff(final_weights(a), final_weights(b)) == 0.0


def test_non_finite_loss_stops_cleanly_and_keeps_last_checkpoint(tmp_path, chat_files, monkeypatch):
    from conceptlm.sft.unit import SFTUnit

    original = SFTUnit.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = original(self, batch)
        if calls["n"] > 3:  # steps 0-2 fine, step 3 NaN
            out = {"lm": out["lm"] * float("nan")}
        return out

    monkeypatch.setattr(SFTUnit, "forward", poisoned)
    cfg = load_config(SFTConfig, None, tiny_overrides(tmp_path, chat_files[0], **{
        "run.name": "nan", "train.max_steps": 6, "train.save_every": 2}))
    before = None
    with pytest.raises(NonFiniteLossError, match="step 3") as e:
        train(cfg)
    assert "step_00000002" in str(e.value)
    ckpts = sorted((cfg.run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000002"]
    before = load_file(str(ckpts[0] / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in before.values())
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))


def test_resume_never_refuses_existing_run(tmp_path, chat_files):
    run(tmp_path, "x", chat_files[0], **{"train.max_steps": 1, "schedule.warmup_steps": 0})
    with pytest.raises(ConfigError, match="run.resume=auto"):
        run(tmp_path, "x", chat_files[0], **{"train.max_steps": 1, "schedule.warmup_steps": 0})


def test_lora_run_trains_only_adapters_and_round_trips(tmp_path, chat_files):
    from conceptlm.core.hf import load_causal_lm

    res, run_dir = run(tmp_path, "lora", chat_files[0], **{"model.lora.enabled": "true", "model.lora.r": 4,
                                                           "train.max_steps": 3, "optim.lr": 1e-2})
    model_dir = res.checkpoint / "model"
    assert (model_dir / "adapter_model.safetensors").is_file()
    model = load_causal_lm(model_dir)
    ids = torch.randint(5, 300, (2, 12))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        again = load_causal_lm(model_dir)(input_ids=ids).logits
    assert torch.equal(out, again)


class _TwoPartUnit(torch.nn.Module):
    """Two loss parts whose sums are read from the batch (independent of the weights): ``a`` over the ``a`` items,
    ``b`` over the ``b`` items."""

    loss_weights = {"a": 0.25, "b": 3.0}
    throughput_unit = "items"
    step_rng = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def counts(self, batch):
        return {"a": len(batch["a"]), "b": len(batch["b"])}

    def forward(self, batch):
        return {"a": batch["a"].sum() + 0 * self.w.sum(), "b": batch["b"].sum() + 0 * self.w.sum()}

    def prepare(self, batch):
        return batch

    def eval_metrics(self, batch):
        return {}

    def begin_step(self, step):
        pass

    def frozen_modules(self):
        return []

    def fsdp_units(self):
        return []

    def export(self, directory, state_dict, artifacts):
        return False


def test_logged_eval_loss_applies_the_loss_weights(tmp_path):
    """The eval row's ``loss`` = Σ_k weight_k · (mean of part k over the eval set), each part averaged over its own
    items: a = (1+2+3+5)/4 = 2.75, b = (4+6+8)/3 = 6, loss = 0.25·2.75 + 3·6 = 18.6875."""
    from conceptlm.core.config import RunConfig
    from conceptlm.core.distributed import DistInfo
    from conceptlm.core.trainer import Trainer

    cfg = load_config(RunConfig, None, [f"run.out_dir={tmp_path}", "run.name=w", "train.max_steps=1",
                                        "train.log_every=1", "train.eval_every=1", "train.progress=false",
                                        "schedule.warmup_steps=0"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    t = torch.tensor
    evals = [{"a": t([1.0, 2.0, 3.0]), "b": t([4.0])}, {"a": t([5.0]), "b": t([6.0, 8.0])}]
    trainer = Trainer(_TwoPartUnit(), cfg, info, train_batches=lambda s: [evals[0]], eval_batches=lambda: evals,
                      data_state={})
    res = trainer.fit()
    row = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l][-1]
    assert row["split"] == "eval"
    assert row["a"] == pytest.approx(2.75) and row["b"] == pytest.approx(6.0)
    assert row["loss"] == pytest.approx(0.25 * 2.75 + 3.0 * 6.0)
