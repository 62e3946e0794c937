"""``benchmarks/jepa_long_seq.py`` (the GPU check of the long-sequence path) on a tiny model on CPU: its arms start
from the same weights on the same batch, and its first-step agreement check finds them equal."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("jepa_long_seq")


def test_first_step_agreement_by_hand(bench):
    arms = [SimpleNamespace(name="ntp", first={"lm": 2.0, "grad_norm": 9.0}),
            SimpleNamespace(name="separate", first={"lm": 2.5, "jepa": 0.25, "grad_norm": 3.0}),
            SimpleNamespace(name="packed_flex", first={"lm": 1.75, "jepa": 0.5, "grad_norm": 3.5})]
    # lm over all three arms (vs 2.0: 0.5, 0.25); jepa and grad_norm over the JEPA arms only (ntp's norm differs)
    assert bench.first_step_agreement(arms) == {"lm": 0.5, "jepa": 0.25, "grad_norm": 0.5}


def test_tiny_cpu_run_arms_agree_on_the_first_step(bench):
    args = argparse.Namespace(device="cpu", tiny=True, lm_len=96, code_len=24, jitter=8, batch=2, k=1, lam=1.0,
                              steps=1, warmup=0, arms="ntp,separate,packed_dense,packed_flex", bf16=False,
                              threads=None)
    res = bench.run(args)
    assert set(res["first_step"]) == {"ntp", "separate", "packed_dense"}  # no flex arm on CPU (no backward)
    diff = res["first_step_max_abs_diff"]
    assert set(diff) == {"lm", "jepa", "grad_norm"}
    assert max(diff.values()) < 1e-5, diff
    first = res["first_step"]
    assert first["packed_dense"]["jepa"] > 0 and "jepa" not in first["ntp"]
    assert first["separate"]["loss"] == pytest.approx(first["separate"]["lm"] + first["separate"]["jepa"], rel=1e-6)
    assert 1.0 < res["token_bound"]["packed"] < res["token_bound"]["separate"]
