"""Small statistics for evaluation tables: accuracy with a confidence interval, mean ± sample std over seeds, the
exact McNemar test of two models on the same records."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist

__all__ = ["accuracy_ci", "mean_std", "mcnemar_exact"]

_METHODS = ("wilson", "wald")


def accuracy_ci(correct: Sequence[bool], *, confidence: float = 0.95,
                method: str = "wilson") -> tuple[float, float, float]:
    """Accuracy of a list of per-example outcomes with a two-sided binomial confidence interval.

    Wilson score interval, with p = k/n and z the (1 + confidence)/2 normal quantile:
    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; it stays inside [0, 1] and is not degenerate at
    k = 0 or k = n. ``method="wald"`` gives the normal approximation ``p ± z·sqrt(p(1-p)/n)`` clipped to [0, 1].

    Args:
        correct: outcomes, shape (n,): bools or 0/1 values.
        confidence: coverage of the interval, in (0, 1).
        method: ``"wilson"`` or ``"wald"``.

    Returns:
        ``(accuracy, low, high)``, e.g. 8 of 10 at 95%: ``(0.8, 0.4902, 0.9433)`` (rounded).

    Raises:
        ValueError: empty input, a value other than 0/1/True/False, confidence outside (0, 1), unknown method.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(_METHODS)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = list(correct)
    n = len(values)
    if n == 0:
        raise ValueError("accuracy_ci needs at least one outcome, got an empty sequence")
    bad = [v for v in values if v not in (0, 1)]
    if bad:
        raise ValueError(f"outcomes must be booleans or 0/1, got {bad[0]!r}")
    k = sum(1 for v in values if v)
    p = k / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    if method == "wald":
        half = z * math.sqrt(p * (1.0 - p) / n)
        return p, max(0.0, p - half), min(1.0, p + half)
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, center - half)  # exact 0 / 1 at the edges, free of rounding noise
    high = 1.0 if k == n else min(1.0, center + half)
    return p, low, high


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1), as in "mean ± std over seeds" tables.

    Args:
        values: one number per seed, shape (n,).

    Returns:
        ``(mean, std)``; ``std`` is NaN for a single value (a sample std needs two).

    Raises:
        ValueError: no values, or a non-finite value.
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std needs at least one value, got none")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"mean_std got a non-finite value: {xs}")
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Two-sided exact McNemar test on paired outcomes (model A and model B on the same records).

    Only the discordant records count: ``only_a`` (A right, B wrong) and ``only_b``; under the null hypothesis each
    is Binomial(n = only_a + only_b, 1/2), so ``p = min(1, 2 · Σ_{i ≤ min(only_a, only_b)} C(n, i) / 2^n)`` (1 when
    there is no discordant record).

    Args:
        a, b: per-record outcomes of the two models, same length, in the same record order.

    Returns:
        ``{"only_a", "only_b", "p"}``, e.g. ``only_a = 2, only_b = 4``: p = 2 · (1 + 6 + 15) / 64 = 44/64.
    """
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return {"only_a": 0, "only_b": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}
