"""LR schedule values, hand-computed."""

import math

import pytest
import torch

from conceptlm.core.schedule import build_scheduler, lr_multiplier


def test_warmup_then_cosine_values():
    kw = dict(kind="cosine", warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_multiplier(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # decay over steps 4..13 (10 updates): p = (s - 4) / 10
    assert lr_multiplier(4, **kw) == pytest.approx(1.0)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert lr_multiplier(9, **kw) == pytest.approx(mid) == pytest.approx(0.55)
    assert lr_multiplier(13, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_multiplier(14, **kw) == pytest.approx(0.1)


def test_linear_and_constant():
    kw = dict(warmup_steps=0, max_steps=5, min_lr_ratio=0.0)
    assert [lr_multiplier(s, kind="linear", **kw) for s in range(5)] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    assert [lr_multiplier(s, kind="constant", warmup_steps=2, max_steps=5) for s in range(5)] == [0.5, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        lr_multiplier(3, kind="exp", warmup_steps=0, max_steps=5)


def test_scheduler_applies_multiplier_and_resumes():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sch = build_scheduler(opt, kind="linear", warmup_steps=2, max_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5])
    # resume from a state dict mid-way
    opt2 = torch.optim.SGD([p], lr=2.0)
    sch2 = build_scheduler(opt2, kind="linear", warmup_steps=2, max_steps=6)
    for _ in range(3):
        opt2.step()
        sch2.step()
    opt3 = torch.optim.SGD([p], lr=2.0)
    sch3 = build_scheduler(opt3, kind="linear", warmup_steps=2, max_steps=6)
    opt3.load_state_dict(opt2.state_dict())  # the trainer restores both (the LR lives in the optimizer state)
    sch3.load_state_dict(sch2.state_dict())
    assert opt3.param_groups[0]["lr"] == pytest.approx(lrs[3])
    opt3.step()
    sch3.step()
    assert opt3.param_groups[0]["lr"] == pytest.approx(lrs[4])
