"""core/rng: the one seeding scheme (values pinned), per-rank streams differ, per-example draws do not depend on
which batch, rank or micro-batch holds an example."""

from __future__ import annotations

import hashlib

import torch

from conceptlm.core.rng import EVAL_STEP, StepRandomness, derive_seed, derived_generator
from conceptlm.core.sampling import _epoch_seed
from conceptlm.jepa.unit import jepa_step_active


def _old_scheme(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def test_derive_seed_reproduces_the_earlier_batchplan_and_jepa_seeds():
    assert derive_seed("batchplan", 3, 7) == _old_scheme("conceptlm-batchplan:3:7")
    assert derive_seed("jepa-ratio", 0, 12) == _old_scheme("conceptlm-jepa-ratio:0:12")
    assert 0 <= derive_seed("x", 1) < 2 ** 63
    # the JEPA-loss dropout draw and the data order use it
    g = torch.Generator().manual_seed(_old_scheme("conceptlm-jepa-ratio:5:3"))
    assert jepa_step_active(5, 3, 0.5) == bool(torch.rand((), generator=g).item() < 0.5)
    assert _epoch_seed(9, 4) == _old_scheme("conceptlm-batchplan:9:4")  # data order unchanged by the move


def test_streams_are_keyed_by_every_key():
    a = torch.rand(4, generator=derived_generator("noise", 0, 1, 2))
    assert torch.equal(a, torch.rand(4, generator=derived_generator("noise", 0, 1, 2)))
    for other in [("noise", 1, 1, 2), ("noise", 0, 2, 2), ("noise", 0, 1, 3), ("dropout", 0, 1, 2)]:
        assert not torch.equal(a, torch.rand(4, generator=derived_generator(*other)))


def test_per_rank_generators_differ_across_ranks_and_micro_batches():
    draws = {(r, m): torch.rand(3, generator=StepRandomness(seed=0, step=5, rank=r, micro=m).generator("d"))
             for r in range(2) for m in range(2)}
    vals = list(draws.values())
    assert all(not torch.equal(vals[i], vals[j]) for i in range(4) for j in range(i + 1, 4))


def test_per_example_draws_do_not_depend_on_rank_micro_batch_or_batch_composition():
    one = StepRandomness(seed=0, step=5, rank=0, micro=0).per_example("noise", [0, 1, 2, 3], (2, 3))
    r1 = StepRandomness(seed=0, step=5, rank=1, micro=1).per_example("noise", torch.tensor([3, 1]), (2, 3))
    assert one.shape == (4, 2, 3)
    assert torch.equal(r1[0], one[3]) and torch.equal(r1[1], one[1])
    next_step = StepRandomness(seed=0, step=6).per_example("noise", [0], (2, 3))
    assert not torch.equal(next_step[0], one[0])
    ev1 = StepRandomness(seed=0, step=EVAL_STEP, micro=0).per_example("noise", [0], (2,), sampler=torch.rand)
    ev2 = StepRandomness(seed=0, step=EVAL_STEP, micro=3).per_example("noise", [0], (2,), sampler=torch.rand)
    assert torch.equal(ev1, ev2) and (0 <= ev1).all() and (ev1 < 1).all()
