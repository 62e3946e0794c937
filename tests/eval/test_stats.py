"""Accuracy confidence intervals and seed statistics, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from conceptlm.eval.stats import accuracy_ci, mcnemar_exact, mean_std


def test_wilson_8_of_10_at_95():
    # z = 1.959964, z^2 = 3.841459; denom = 1 + z^2/10 = 1.384146; center = (0.8 + 0.192073)/denom = 0.716738;
    # half = z * sqrt(0.016 + 0.009604) / denom = 0.226576  ->  (0.4902, 0.9433)
    acc, low, high = accuracy_ci([True] * 8 + [False] * 2)
    assert acc == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_other_confidence():
    # 90%: z = 1.644854, z^2 = 2.705543; denom = 1.270554; center = 0.935277/denom = 0.736114;
    # half = z * sqrt(0.016 + 0.006764) / denom = 0.195322  ->  (0.5408, 0.9314)
    acc, low, high = accuracy_ci([1] * 8 + [0] * 2, confidence=0.90)
    assert (acc, round(low, 4), round(high, 4)) == (0.8, 0.5408, 0.9314)


def test_wilson_edges_do_not_crash_and_are_exact():
    # 0/10: center = half = (z^2/20)/denom = 0.192073/1.384146 = 0.138767  ->  (0, 0.2775)
    assert accuracy_ci([False] * 10) == pytest.approx((0.0, 0.0, 0.2775), abs=1e-4)
    assert accuracy_ci([False] * 10)[1] == 0.0
    assert accuracy_ci([True] * 10) == pytest.approx((1.0, 0.7225, 1.0), abs=1e-4)
    assert accuracy_ci([True] * 10)[2] == 1.0
    acc, low, high = accuracy_ci([True])
    assert acc == 1.0 and 0.0 < low < 1.0 and high == 1.0


def test_wilson_interval_shrinks_with_n_and_contains_p():
    small = accuracy_ci([1] * 3 + [0] * 1)
    large = accuracy_ci([1] * 300 + [0] * 100)
    assert small[0] == large[0] == 0.75
    assert small[1] < large[1] < 0.75 < large[2] < small[2]


def test_wald():
    # half = 1.959964 * sqrt(0.8 * 0.2 / 10) = 0.247918; the upper end is clipped at 1
    acc, low, high = accuracy_ci([1] * 8 + [0] * 2, method="wald")
    assert (acc, round(low, 4), high) == (0.8, 0.5521, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"correct": []}, "at least one"),
    ({"correct": [True, 2]}, "0/1"),
    ({"correct": [True], "confidence": 1.0}, "confidence"),
    ({"correct": [True], "confidence": 0.0}, "confidence"),
    ({"correct": [True], "method": "exact"}, "wilson"),
])
def test_accuracy_ci_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        accuracy_ci(**kwargs)


def test_mean_std_sample_std():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; 5 / (4 - 1) -> std sqrt(5/3) = 1.290994
    mean, std = mean_std([1, 2, 3, 4])
    assert mean == 2.5
    assert std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert mean_std([36.36, 36.36, 36.36]) == pytest.approx((36.36, 0.0))
    assert mean_std(x for x in (0.5, 1.5)) == pytest.approx((1.0, math.sqrt(0.5)))


def test_mean_std_edges():
    mean, std = mean_std([0.7])
    assert mean == 0.7 and math.isnan(std)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_std([1.0, float("nan")])


def test_mcnemar_exact_by_hand():
    a = [True, False, False, False, False, True, True]
    b = [False, True, True, True, True, True, False]
    # discordant: only a = 2 (records 0, 6), only b = 4 -> p = 2 * (C(6,0) + C(6,1) + C(6,2)) / 2**6 = 44/64
    assert mcnemar_exact(a, b) == {"only_a": 2, "only_b": 4, "p": pytest.approx(44 / 64)}
    assert mcnemar_exact([True, False], [True, False]) == {"only_a": 0, "only_b": 0, "p": 1.0}
    assert mcnemar_exact([True] * 5 + [False] * 3, [False] * 8)["p"] == pytest.approx(2 / 32)
    # only a = 3, only b = 1 (n = 4): p = 2 * (C(4,0) + C(4,1)) / 2**4 = 10/16; only a = 1, only b = 0: p = 2 * 1/2 = 1
    assert mcnemar_exact([1, 1, 1, 0, 1], [0, 0, 0, 1, 1]) == {"only_a": 3, "only_b": 1, "p": pytest.approx(10 / 16)}
    assert mcnemar_exact([True], [False])["p"] == 1.0
    # only a = 6, only b = 0: p = 2 / 2**6 = 1/32
    assert mcnemar_exact([True] * 6, [False] * 6)["p"] == pytest.approx(1 / 32)
