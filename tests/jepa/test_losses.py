"""Value tests of the LLM-JEPA distances (hand-computed numbers) and of the cross-rank InfoNCE gather."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conceptlm.jepa.losses import METRICS, gather_with_grad, jepa_distance


def test_cosine_hand_values():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-3.0, 0.0]])
    # cos = 0, 1/sqrt(2), -1  ->  d = 1, 1 - 1/sqrt(2), 2
    expected = torch.tensor([1.0, 1.0 - 1.0 / math.sqrt(2.0), 2.0])
    torch.testing.assert_close(jepa_distance(pred, target, "cosine"), expected, rtol=0, atol=1e-6)


def test_l2_hand_values_and_zero_gradient_is_finite():
    pred = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    d = jepa_distance(pred, target, "l2")
    torch.testing.assert_close(d, torch.tensor([5.0, 0.0]), rtol=0, atol=1e-6)
    d.sum().backward()
    # d/du ||u - a|| = (u - a)/||u - a|| = (0.6, 0.8); at u == a the subgradient 0 (no NaN)
    torch.testing.assert_close(pred.grad, torch.tensor([[0.6, 0.8], [0.0, 0.0]]), rtol=0, atol=1e-6)


def test_mse_hand_values_are_per_example_means_over_dims():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # ((-2)^2 + 2^2)/2 = 4 ; (1 + 1)/2 = 1 ; batch mean 2.5 = mean over i and j (the reference's F.mse_loss)
    d = jepa_distance(pred, target, "mse")
    torch.testing.assert_close(d, torch.tensor([4.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(d.mean(), torch.nn.functional.mse_loss(pred, target))


def test_infonce_hand_values():
    pred = torch.tensor([[1.0, 0.0], [5.0, 0.0]])  # both normalise to e1
    target = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # e1, e2
    # tau = 1: logits row 0 = [1, 0] (label 0), row 1 = [1, 0] (label 1)
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.e)])
    torch.testing.assert_close(jepa_distance(pred, target, "infonce", temperature=1.0), expected, rtol=0,
                               atol=1e-6)
    # tau = 0.5 with aligned pairs: logits [[2, 0], [0, 2]] -> log(1 + e^-2) per row
    eye = torch.eye(2)
    torch.testing.assert_close(jepa_distance(eye, 4 * eye, "infonce", temperature=0.5),
                               torch.full((2,), math.log(1 + math.exp(-2))), rtol=0, atol=1e-6)


def test_low_precision_inputs_are_computed_in_fp32():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 16), torch.randn(4, 16)
    for metric in METRICS:
        d16 = jepa_distance(pred.bfloat16(), target.bfloat16(), metric)
        d32 = jepa_distance(pred.bfloat16().float(), target.bfloat16().float(), metric)
        assert d16.dtype == torch.float32
        torch.testing.assert_close(d16, d32, rtol=0, atol=0)


def test_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown JEPA metric"):
        jepa_distance(x, x, "dot")
    with pytest.raises(ValueError, match="must both be"):
        jepa_distance(x, torch.zeros(2, 4), "cosine")
    with pytest.raises(ValueError, match="temperature"):
        jepa_distance(x, x, "infonce", temperature=0.0)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    torch.testing.assert_close(jepa_distance(x, x * 2, "infonce", gather_negatives=True),
                               jepa_distance(x, x * 2, "infonce"))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        pred_all, target_all = torch.randn(5, 4), torch.randn(5, 4)
        rows = [slice(0, 2), slice(2, 5)][rank]  # unequal shards: 2 and 3 rows
        pred = pred_all[rows].clone().requires_grad_(True)
        target = target_all[rows].clone().requires_grad_(True)
        d = jepa_distance(pred, target, "infonce", temperature=0.3, gather_negatives=True)
        d.sum().backward()
        gathered = gather_with_grad(target.detach())
        torch.save({"d": d.detach(), "gp": pred.grad, "gt": target.grad, "gathered": gathered},
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_infonce_gathered_negatives_match_one_big_batch(tmp_path):
    """2 gloo ranks (2 + 3 rows): per-example values and gradients equal one process with all 5 rows."""
    # spawn, not fork: forking after torch used its OpenMP pool in this process can deadlock the children
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    pred_all = torch.randn(5, 4).requires_grad_(True)
    target_all = torch.randn(5, 4).requires_grad_(True)
    d_all = jepa_distance(pred_all, target_all, "infonce", temperature=0.3)
    d_all.sum().backward()
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(torch.cat([r0["d"], r1["d"]]), d_all.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["gp"], r1["gp"]]), pred_all.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["gt"], r1["gt"]]), target_all.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(r0["gathered"], target_all.detach(), rtol=0, atol=0)
