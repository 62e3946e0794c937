"""BatchPlan (bucketed, deterministic, resumable, rank-sharded) and collate / padding_stats."""

from __future__ import annotations

import pytest
import torch

from conceptlm.core.errors import ConfigError
from conceptlm.core.sampling import BatchPlan
from conceptlm.data.batching import collate, padding_stats


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Log-normal lengths between 4 and 512: mostly short, a long tail."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g) * 0.9 + 3.5).clamp(4, 512).long().tolist()


LENGTHS = skewed_lengths(640)


def union_over_ranks(lengths, step, *, micro, accum, world, **kw):
    out = []
    for r in range(world):
        plan = BatchPlan(lengths, micro_batch_size=micro, grad_accum=accum, world_size=world, rank=r, **kw)
        mbs = plan.micro_batches(step)
        assert len(mbs) == accum and all(len(mb) == micro for mb in mbs)
        out.extend(i for mb in mbs for i in mb)
    return out


def test_global_batch_independent_of_split():
    splits = [dict(micro=8, accum=1, world=1), dict(micro=2, accum=4, world=1), dict(micro=2, accum=2, world=2),
              dict(micro=1, accum=1, world=8)]
    for step in (0, 3, 79, 80, 157):  # 80 steps per epoch: covers two epochs
        gbs = [BatchPlan(LENGTHS, micro_batch_size=s["micro"], grad_accum=s["accum"], world_size=s["world"],
                         seed=5).global_batch(step) for s in splits]
        assert all(g == gbs[0] for g in gbs)
        for s in splits:
            got = union_over_ranks(LENGTHS, step, seed=5, **s)
            assert sorted(got) == sorted(gbs[0]) and len(set(got)) == 8


def test_every_example_once_per_epoch_and_drop_last():
    plan = BatchPlan(LENGTHS, micro_batch_size=4, grad_accum=2, world_size=2, seed=1)
    assert plan.global_batch_size == 16 and plan.steps_per_epoch == 40
    for epoch in (0, 1):
        seen = [i for s in range(epoch * 40, (epoch + 1) * 40) for i in plan.global_batch(s)]
        assert sorted(seen) == list(range(640))
    odd = BatchPlan(LENGTHS[:650 - 10 - 3], micro_batch_size=4, grad_accum=2, world_size=2, seed=1)  # 637
    assert odd.steps_per_epoch == 39
    seen = [i for s in range(39) for i in odd.global_batch(s)]
    assert len(seen) == len(set(seen)) == 39 * 16 and max(seen) < 637


def test_deterministic_and_epochs_differ():
    kw = dict(micro_batch_size=4, grad_accum=2, world_size=1)
    a, b = BatchPlan(LENGTHS, seed=3, **kw), BatchPlan(LENGTHS, seed=3, **kw)
    c = BatchPlan(LENGTHS, seed=4, **kw)
    steps = a.steps_per_epoch
    assert [a.global_batch(s) for s in range(steps)] == [b.global_batch(s) for s in range(steps)]
    assert [a.global_batch(s) for s in range(steps)] != [c.global_batch(s) for s in range(steps)]
    ep0 = [a.global_batch(s) for s in range(steps)]
    ep1 = [a.global_batch(s) for s in range(steps, 2 * steps)]
    assert ep0 != ep1
    assert {tuple(sorted(x)) for x in ep0} != {tuple(sorted(x)) for x in ep1}  # different groupings, not just order
    # pure function of the step: a fresh plan asked out of order gives the same batches (resume needs no state)
    fresh = BatchPlan(LENGTHS, seed=3, **kw)
    assert fresh.global_batch(steps + 7) == ep1[7] and fresh.global_batch(2) == ep0[2]


def test_micro_batches_are_sorted_and_balanced_across_ranks():
    plans = [BatchPlan(LENGTHS, micro_batch_size=2, grad_accum=2, world_size=2, rank=r, seed=0) for r in (0, 1)]
    gb = sorted(plans[0].global_batch(5), key=lambda i: (LENGTHS[i], i))
    # sorted global batch cut into 4 micro-batches: j -> rank j % 2
    assert plans[0].micro_batches(5) == [gb[0:2], gb[4:6]]
    assert plans[1].micro_batches(5) == [gb[2:4], gb[6:8]]


def test_padding_lower_than_random_batching():
    lengths = skewed_lengths(4000, seed=1)
    plan = BatchPlan(lengths, micro_batch_size=8, grad_accum=2, world_size=1, seed=0)
    bucketed = [[lengths[i] for i in mb] for s in range(plan.steps_per_epoch) for mb in plan.micro_batches(s)]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    random_mbs = [[lengths[i] for i in perm[k:k + 8]] for k in range(0, len(bucketed) * 8, 8)]
    ours, rand = padding_stats(bucketed), padding_stats(random_mbs)
    assert ours["real_tokens"] == rand["real_tokens"] == sum(lengths)  # both use all 4000 examples
    assert rand["padding_ratio"] > 0.3
    assert ours["padding_ratio"] < 0.2 * rand["padding_ratio"]
    # no bucketing beyond one global batch still sorts inside the batch, so it lies in between
    mid = BatchPlan(lengths, micro_batch_size=8, grad_accum=2, seed=0, bucket_factor=1)
    mid_mbs = [[lengths[i] for i in mb] for s in range(mid.steps_per_epoch) for mb in mid.micro_batches(s)]
    assert ours["padding_ratio"] < padding_stats(mid_mbs)["padding_ratio"] < rand["padding_ratio"]


def test_no_shuffle_is_sequential_with_bucket_factor_one():
    plan = BatchPlan(list(range(10, 0, -1)), micro_batch_size=2, grad_accum=1, shuffle=False, bucket_factor=1)
    assert [plan.global_batch(s) for s in range(5)] == [[1, 0], [3, 2], [5, 4], [7, 6], [9, 8]]
    assert plan.global_batch(5) == plan.global_batch(0)


def test_state_dict_round_trip_and_mismatch():
    kw = dict(micro_batch_size=4, grad_accum=2, world_size=1, seed=7)
    plan = BatchPlan(LENGTHS, **kw)
    state = plan.state_dict()
    BatchPlan(LENGTHS, **kw).load_state_dict(state)
    # same global batch split differently: allowed (resume on another number of ranks)
    BatchPlan(LENGTHS, micro_batch_size=2, grad_accum=2, world_size=2, rank=1, seed=7).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed: checkpoint 7, now 8"):
        BatchPlan(LENGTHS, **{**kw, "seed": 8}).load_state_dict(state)
    with pytest.raises(ConfigError, match="global_batch_size: checkpoint 8, now 16"):
        BatchPlan(LENGTHS, **{**kw, "grad_accum": 4}).load_state_dict(state)
    with pytest.raises(ConfigError, match="lengths_fingerprint"):
        BatchPlan(LENGTHS[:-1] + [LENGTHS[-1] + 1], **kw).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ConfigError, match=r"10 examples, fewer than one global batch of 16 \(micro_batch_size 4 "
                                          r"x grad_accum 2 x world_size 2\)"):
        BatchPlan([3] * 10, micro_batch_size=4, grad_accum=2, world_size=2)
    with pytest.raises(ConfigError, match="field 'rank'"):
        BatchPlan([3] * 10, micro_batch_size=1, grad_accum=1, world_size=2, rank=2)
    with pytest.raises(ConfigError, match="field 'micro_batch_size'"):
        BatchPlan([3] * 10, micro_batch_size=0, grad_accum=1)
    with pytest.raises(ValueError, match="step"):
        BatchPlan([3] * 10, micro_batch_size=1, grad_accum=1).global_batch(-1)


# ----------------------------------------------------------------------------------------------- collate

EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}]


def test_collate_right_padding():
    out = collate(EXAMPLES, pad_token_id=0, pad_to_multiple_of=None)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_left_padding_and_multiple():
    out = collate(EXAMPLES, pad_token_id=1, padding_side="left", pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 1, 1, 9]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 9]]
    # pads to the longest in the batch (rounded), never to a fixed length
    assert collate(EXAMPLES, pad_token_id=1, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    assert collate([{"input_ids": [1] * 9, "labels": [1] * 9}], pad_token_id=0)["input_ids"].shape == (1, 16)
    stats = padding_stats([out])
    assert stats == {"real_tokens": 4, "total_slots": 8, "pad_tokens": 4, "padding_ratio": 0.5}
    assert padding_stats([[3, 1]], pad_to_multiple_of=4)["padding_ratio"] == 0.5


def test_collate_errors():
    with pytest.raises(ValueError, match="example 0: input_ids has 2 tokens, labels 1"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        collate(EXAMPLES, pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad token"):
        collate(EXAMPLES, pad_token_id=None)


def _reference_order(lengths: list[int], gbs: int, seed: int, epoch: int, shuffle: bool,
                     bucket: int) -> list[list[int]]:
    """The batch plan's epoch written with Python lists (how it was computed before it kept tensors)."""
    from conceptlm.core.sampling import _epoch_seed

    n, steps = len(lengths), len(lengths) // gbs
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    order = order[: steps * gbs]
    out: list[list[int]] = []
    for c in range(0, len(order), gbs * bucket):
        part = sorted(order[c:c + gbs * bucket], key=lambda i: lengths[i])
        out.extend(part[b:b + gbs] for b in range(0, len(part), gbs))
    if shuffle:
        out = [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]
    return out


@pytest.mark.parametrize("shuffle,bucket", [(True, 50), (True, 1), (True, 3), (False, 2)])
def test_tensor_plan_gives_exactly_the_list_reference_order(shuffle, bucket):
    """The plan keeps its per-example state in tensors (8 bytes per example); its batches are the reference
    algorithm's, ties included (many equal lengths), for several epochs, from a list, a tensor or a numpy array."""
    import numpy as np

    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 6, (997,), generator=g).tolist()  # few distinct values: many ties
    for given in (lengths, torch.tensor(lengths), np.array(lengths, dtype=np.int32)):
        plan = BatchPlan(given, micro_batch_size=4, grad_accum=2, world_size=2, seed=3, shuffle=shuffle,
                         bucket_factor=bucket)
        for epoch in (0, 1, 4):
            ref = _reference_order(lengths, 16, 3, epoch, shuffle, bucket)
            assert [plan.global_batch(epoch * plan.steps_per_epoch + k) for k in range(plan.steps_per_epoch)] == ref
    assert isinstance(plan.lengths, torch.Tensor) and plan.lengths.dtype == torch.int64
