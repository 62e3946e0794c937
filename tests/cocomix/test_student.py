"""The student unit and its baselines: off-switch equivalence with plain NTP, loss-part values, KD with a frozen
teacher, parameter/FLOP matching against the paper's table, arms, a short run, and 2 processes == 1."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conceptlm.cocomix.arms import make_arm, match_ntp
from conceptlm.cocomix.config import ARMS, CocomixSection, StudentSection, StudentTrainConfig
from conceptlm.cocomix.corpus import collate_windows
from conceptlm.cocomix.costs import count_parameters, flops_per_token
from conceptlm.cocomix.model import sae_layer_norm
from conceptlm.cocomix.student import StudentUnit, load_student, train_student
from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError, DataError
from tests.cocomix.student_recipe_worker import SyntheticWindows, fixed_teacher, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]


def tiny(**kw) -> StudentSection:
    base = dict(style="gpt2", vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_len=16, n_concepts=64,
                concept_k=4, insert_layer=1)
    base.update(kw)
    return StudentSection(**base)


def batch(n: int = 4, t: int = 16, k_attr: int = 3, seed: int = 0) -> dict:
    ds = SyntheticWindows(n, t, 48, 64, k_attr, seed=seed)
    return collate_windows([ds[i] for i in range(n)])


def trainer_loss(unit: StudentUnit, b: dict) -> tuple[torch.Tensor, dict]:
    """What the loop back-propagates for one micro-batch: sum_k w_k * part_k / count_k."""
    b = unit.prepare(dict(b))
    n = unit.counts(b)
    out = unit(b)
    return sum(unit.loss_weights[k] * out[k] / n[k] for k in unit.loss_weights), out


# ------------------------------------------------------------------------------------------------ equivalences
def test_lambda_zero_without_mixing_reproduces_ntp_loss_and_gradients_exactly():
    torch.manual_seed(0)
    ntp = StudentUnit(tiny(mix="none", concept_head=False), CocomixSection(lam=0.0, k_attr=3))
    off = StudentUnit(tiny(mix="none", concept_head=True), CocomixSection(lam=0.0, k_attr=3))
    missing, unexpected = off.load_state_dict(ntp.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("model.head.") for k in missing)
    b = batch()
    la, _ = trainer_loss(ntp, b)
    lb, out = trainer_loss(off, b)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    grads = dict(ntp.named_parameters())
    for name, p in off.named_parameters():
        if name.startswith("model.head."):
            assert p.grad is None
        else:
            assert torch.equal(p.grad, grads[name].grad), name
    assert set(out) == {"ntp", "concept_ce", "concept_acc"} and off.loss_weights == {"ntp": 1.0}
    # the switch matters: with lam > 0 the same weights get other gradients
    on = StudentUnit(tiny(mix="none", concept_head=True), CocomixSection(lam=0.5, k_attr=3))
    on.load_state_dict(off.state_dict())
    lc, _ = trainer_loss(on, b)
    lc.backward()
    emb = dict(on.named_parameters())["model.embed.weight"].grad
    assert not torch.allclose(emb, grads["model.embed.weight"].grad, atol=1e-6)


def test_concept_part_is_the_masked_mean_label_ce_by_hand():
    torch.manual_seed(1)
    unit = StudentUnit(tiny(mix="interleave"), CocomixSection(lam=0.1, k_attr=3))
    b = unit.prepare(batch())
    out = unit(b)
    m = unit.model
    ids = b["input_ids"]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    h = m.decoder(m.embed(ids) + m.pos_embed(pos), layers=slice(0, 1), final_norm=False)
    x, _, _ = sae_layer_norm(h)
    z = (x - m.head.pre_bias) @ m.head.predictor.weight.t() + m.head.predictor.bias
    logp = z.log_softmax(-1)
    per_row = -logp.gather(-1, b["concept_labels"]).mean(-1)
    mask = b["concept_mask"]
    assert torch.allclose(out["concept"], (per_row * mask).sum(), atol=1e-4)
    assert unit.counts(b)["concept"] == mask.sum()
    assert unit.counts(b)["ntp"] == ids.shape[0] * (ids.shape[1] - 1)
    hit = (z.argmax(-1, keepdim=True) == b["concept_labels"]).any(-1) & mask
    assert out["concept_acc"][0] == hit.sum() and out["concept_acc"][1] == mask.sum()
    ntp = F.cross_entropy(unit.model(ids).logits[:, :-1].reshape(-1, 48), ids[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(out["ntp"], ntp, atol=1e-4)


def test_kd_part_is_the_forward_kl_from_a_frozen_teacher():
    s = tiny(mix="none", concept_head=False)
    teacher = fixed_teacher(s)
    unit = StudentUnit(s, CocomixSection(lam=0.0, k_attr=3, kd_weight=0.1, kd_temperature=2.0), teacher=teacher)
    assert unit.frozen_modules() == ["teacher"]
    assert not any(k.startswith("teacher.") for k in ckpt_lib.checkpoint_keys(unit))
    assert not any(p.requires_grad for p in unit.teacher.parameters())
    b = unit.prepare(batch())
    out = unit(b)
    with torch.no_grad():
        p = F.log_softmax(teacher(b["input_ids"]).logits[:, :-1] / 2.0, -1)
    q = F.log_softmax(unit.model(b["input_ids"]).logits[:, :-1] / 2.0, -1)
    ref = F.kl_div(q.reshape(-1, 48), p.reshape(-1, 48), log_target=True, reduction="sum") * 4.0
    assert torch.allclose(out["kd"], ref, atol=1e-4) and out["kd"] > 0
    unit.train()
    assert not unit.teacher.training
    with pytest.raises(ConfigError, match="needs a teacher"):
        StudentUnit(s, CocomixSection(lam=0.0, kd_weight=0.1))


# ------------------------------------------------------------------------------------------------ sizes
PAPER = [  # paper App. A: (d, L, heads) -> base, CoCoMix active, CoCoMix total, NTP width, NTP params (millions)
    ((512, 8, 8), 51.5, 68.3, 85.1, 624, 69.4),  # the paper's 624 is 1.6% over; the closest width is 616
    ((1024, 24, 16), 354.8, 388.4, 422.0, 1072, 386.3),
    ((2048, 24, 16), 1313.6, 1380.8, 1447.9, 2096, 1373.4),
]


@pytest.mark.parametrize("dims,base,active,total,ntp_d,ntp_params", PAPER)
def test_parameter_counts_and_matched_ntp_width_reproduce_the_paper(dims, base, active, total, ntp_d, ntp_params):
    d, n_layers, heads = dims
    s = StudentSection(style="gpt2", vocab_size=50257, d_model=d, n_layers=n_layers, n_heads=heads, max_len=1024,
                       n_concepts=32768, concept_k=32, insert_layer=3)
    got = count_parameters(s)
    assert got["base"] / 1e6 == pytest.approx(base, abs=0.06)
    assert got["active"] / 1e6 == pytest.approx(active, abs=0.06)
    assert got["total"] / 1e6 == pytest.approx(total, abs=0.06)
    paper_ntp = dataclasses.replace(s, d_model=ntp_d, mix="none", concept_head=False)
    assert count_parameters(paper_ntp)["active"] / 1e6 == pytest.approx(ntp_params, abs=0.06)
    ntp = match_ntp(s, by="params")
    assert not ntp.concept_head and ntp.mix == "none" and ntp.n_layers == n_layers
    assert ntp.d_model == (616 if d == 512 else ntp_d)
    assert abs(count_parameters(ntp)["active"] / got["active"] - 1) < 0.01  # the stated tolerance: 1%


def test_flops_per_token_by_hand_and_flop_matched_ntp():
    s = tiny(d_model=8, n_layers=2, n_heads=2, insert_layer=1, n_concepts=10, concept_k=2, vocab_size=5)
    t = 4
    layer = 4 * 64 + 2 * 8 * 32  # qkvo + gelu MLP (d_ff = 32)
    lower = layer + 8 * (t + 1)  # attention: 2 * d * (S+1)/2 MACs per slot, S = T
    upper = 2 * (layer + 8 * (2 * t + 1))  # two slots per token, S = 2T
    macs = lower + upper + 10 * 8 + 2 * 8 + 5 * 8
    assert flops_per_token(s, t)["total"] == 6 * macs
    assert flops_per_token(s, t, training=False)["total"] == 2 * macs
    big = tiny(d_model=64, n_layers=4, n_heads=4, n_concepts=1024, concept_k=16, vocab_size=512)
    flops = match_ntp(big, by="flops", seq_len=64)
    target = flops_per_token(big, 64)["total"]
    assert abs(flops_per_token(flops, 64)["total"] / target - 1) < 0.05
    assert flops.d_model > match_ntp(big, by="params").d_model >= big.d_model
    deeper = match_ntp(big, by="flops", seq_len=64, vary="n_layers")
    assert deeper.d_model == 64 and deeper.n_layers > 4


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_builds_a_unit_that_trains(arm):
    s, c = make_arm(arm, tiny(), CocomixSection(lam=0.1, k_attr=3), seq_len=16)
    s.validate()
    c.validate()
    unit = StudentUnit(s, c, teacher=fixed_teacher(s) if c.kd_weight else None)
    loss, out = trainer_loss(unit, batch())
    loss.backward()
    expect = {"cocomix": ("interleave", True, 0.1), "add": ("add", True, 0.1), "mix_only": ("interleave", True, 0.0),
              "concept_only": ("none", True, 0.1), "pause": ("pause", False, 0.0), "kd_pause": ("pause", False, 0.0),
              "pause_pos": ("pause", False, 0.0), "cocomix_pos": ("interleave", True, 0.1),
              "ntp": ("none", False, 0.0), "kd": ("none", False, 0.0),
              "ntp_flops": ("none", False, 0.0)}[arm]
    assert (s.mix, s.concept_head, c.lam) == expect
    assert s.slot_positions == arm.endswith("_pos")
    assert ("kd" in out) == arm.startswith("kd")
    assert all(p.grad is not None for p in unit.parameters() if p.requires_grad)


@pytest.mark.parametrize("arm", ARMS)
def test_student_slot_positions_reaches_the_doubled_arms_only(arm):
    s, _ = make_arm(arm, tiny(slot_positions=True), CocomixSection(lam=0.1, k_attr=3), seq_len=16)
    s.validate()
    assert s.slot_positions == s.doubled  # every interleave / pause arm keeps it; NTP, add, concept_only drop it


# ------------------------------------------------------------------------------------------------ recipe
def overrides(tmp_path: Path, name: str, **extra) -> list[str]:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.max_steps": 4,
            "train.micro_batch_size": 8, "train.eval_every": 0, "train.log_every": 1, "train.progress": False,
            "optim.lr": 3e-3, "schedule.warmup_steps": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_short_run_learns_both_losses_and_the_checkpoint_reloads(tmp_path):
    res = main(overrides(tmp_path, "co", **{"train.max_steps": 80, "train.eval_every": 20, "optim.lr": 1e-2}))
    tr, ev = rows(res.run_dir, "train"), rows(res.run_dir, "eval")
    assert {"ntp", "concept", "concept_acc", "tokens_per_s", "loss"} <= set(tr[0])

    def late(key: str) -> float:  # the curves are noisy step to step: compare the mean of the last 5 logged steps
        return sum(r[key] for r in tr[-5:]) / 5

    assert late("ntp") < tr[0]["ntp"] - 0.5 and late("concept") < tr[0]["concept"] - 0.3
    # eval: the concept CE falls from the first evaluation to the last; train: the concept accuracy rises (the eval
    # set's arg-max accuracy is too coarse to compare across machines: it failed on one CPU kind at equal code)
    assert ev[-1]["concept"] < ev[0]["concept"] and late("concept_acc") > tr[0]["concept_acc"]
    cfg = load_config(StudentTrainConfig, None, ["student.vocab_size=48", "student.d_model=32", "student.n_layers=2",
                                                 "student.n_heads=4", "student.max_len=16", "student.n_concepts=64",
                                                 "student.concept_k=4", "cocomix.k_attr=3"])
    model = load_student(cfg, res.checkpoint)
    sd = load_file(str(res.checkpoint / ckpt_lib.UNIT_FILE))
    assert torch.equal(model.head.predictor.weight, sd["model.head.predictor.weight"])


def test_bad_batches_and_configs_are_one_line_errors(tmp_path):
    unit = StudentUnit(tiny(), CocomixSection(lam=0.1, k_attr=3))
    b = batch()
    with pytest.raises(DataError, match="no concept labels"):
        unit.prepare({k: v for k, v in b.items() if not k.startswith("concept")})
    with pytest.raises(DataError, match=r"expected \(4, 16, 4\)"):
        StudentUnit(tiny(), CocomixSection(lam=0.1, k_attr=4)).prepare(dict(b))
    with pytest.raises(DataError, match="n_concepts=64"):
        unit.prepare({**b, "concept_labels": b["concept_labels"] + 64})
    with pytest.raises(DataError, match="different lengths"):
        collate_windows([{"id": 0, "input_ids": torch.zeros(4)}, {"id": 1, "input_ids": torch.zeros(5)}])
    with pytest.raises(ConfigError, match="cocomix.lam") as e:
        load_config(StudentTrainConfig, None, ["student.concept_head=false", "student.mix=none"])
    assert "\n" not in str(e.value)
    cfg = load_config(StudentTrainConfig, None, overrides(tmp_path, "nodata"))
    with pytest.raises(ConfigError, match="train_ds"):
        train_student(cfg)
    assert not (tmp_path / "runs" / "nodata").exists()


def test_labeler_fills_missing_labels_and_is_frozen():
    class Labeler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, ids):
            labels = torch.stack([(ids * (a + 1)) % 64 for a in range(3)], -1)
            return labels, torch.ones_like(ids, dtype=torch.bool)

    unit = StudentUnit(tiny(), CocomixSection(lam=0.1, k_attr=3), labeler=Labeler())
    b = unit.prepare({k: v for k, v in batch().items() if not k.startswith("concept")})
    assert b["concept_labels"].shape == (4, 16, 3) and unit.frozen_modules() == ["labeler"]
    assert not unit.labeler.scale.requires_grad


# ------------------------------------------------------------------------------------------------ processes
def _env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", CONCEPTLM_NO_PROGRESS="1")
    return e


def _cmd(tmp_path: Path, name: str, nproc: int, **extra) -> list[str]:
    args = overrides(tmp_path, name, **extra)
    if nproc == 1:
        return [sys.executable, "-m", "tests.cocomix.student_recipe_worker", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tests.cocomix.student_recipe_worker", *args]


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [{"student.mix": "interleave"},
                                   {"student.mix": "add", "cocomix.kd_weight": 0.1, "dist.strategy": "fsdp"}],
                         ids=["ddp-interleave", "fsdp-add-kd"])
def test_two_processes_equal_one_process(tmp_path, extra):
    steps = 3
    single = {k: v for k, v in extra.items() if k != "dist.strategy"}
    one = subprocess.run(_cmd(tmp_path, "one", 1, **{"train.max_steps": steps, "train.micro_batch_size": 8}, **single),
                         env=_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_cmd(tmp_path, "two", 2, **{"train.max_steps": steps, "train.micro_batch_size": 2,
                                                     "train.grad_accum": 2}, **extra),
                         env=_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    path = lambda n: tmp_path / "runs" / n / "checkpoints" / f"step_{steps:08d}" / ckpt_lib.UNIT_FILE  # noqa: E731
    a, b = load_file(str(path("one"))), load_file(str(path("two")))
    assert a.keys() == b.keys() and not any(k.startswith("teacher.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
