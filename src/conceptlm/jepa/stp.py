"""Semantic Tube Prediction (STP; Huang, LeCun, Balestriero, arXiv 2602.22617): pure functions.

STP adds to next-token prediction a JEPA-style term in the model's hidden-state space that needs no second view: the
hidden-state trajectory of a sequence should be locally straight ("a tube around the geodesic"), so the displacement
of the hidden state over a random span of the sequence is predicted from the displacement over the rest of it.

**Trajectory.** An example's trajectory is a list of token *pieces* ``[(a_1, b_1), (a_2, b_2), …]`` (0-based,
end-exclusive ranges of its token sequence, ``1 ≤ a_k < b_k``; e.g. the user content and the assistant content of a
chat, the template tokens between them skipped, or the whole block of a plain-text stream). Concatenated they form a
virtual sequence of ``N = Σ_k (b_k − a_k)`` tokens. Token ``p`` moves the hidden state by the increment
``δ_p = h_p − h_{p−1}`` (``h`` = the hidden states of one layer, by default the final normed state, the LM head's
input), and the displacement over the virtual tokens ``[s, t)`` is the sum of their increments,

    Δ[s, t) = Σ_{virtual tokens v ∈ [s, t)} δ_{pos(v)}    (inside one piece: h_{pos(t−1)} − h_{pos(s)−1}).

**STP loss** (the reference ``stp.py``, ``--linear=random_span``; the paper's semantic-tube loss). Per example and
step, draw a span ``0 ≤ s < t ≤ N`` with ``t − s < N`` (:func:`draw_span`); with ``span_i = Δ[s, t)`` and
``rest_i = Δ[0, s) + Δ[t, N)`` (the displacement over everything else),

    L_STP = Σ_i w_i · d(P(rest_i), span_i) / Σ_i w_i,     d = 1 − cos (default; ``l2``, ``mse`` also offered),

with ``P`` the identity or a trainable linear map (``linear_predictor``) and ``w_i`` the length weight
(:func:`length_weight`, 1 by default). The training objective is ``L = γ·L_NTP + λ·L_STP`` in ONE forward pass
(default λ = 0.02, the reference driver's value). On a straight trajectory every displacement points the same way,
so cos = 1 for every span: the loss asks the trajectory to stay in a thin tube around a line.

**Ablations** (the paper's ablation table; reference flags in brackets):

* ``two_view`` [``--linear=e2e``]: no random span; ``d(P(Δ(first piece)), Δ(last piece))`` — the displacement over
  the user turn predicts the one over the assistant turn (a two-view JEPA in hidden-state differences);
* ``curvature`` [``--linear=curvature``]: ``κ_i = mean over consecutive increments inside each piece of
  arccos cos(δ_{p−1}, δ_p)`` (:func:`trajectory_curvature`), ``L = mean_i κ_i``.

Displacements are computed as ``C @ h`` with integer coefficient rows ``C`` (B, S, T) (:func:`span_coefficients`,
:func:`piece_coefficients`) in float32 outside autocast, so the STP term costs one small batched matmul on top of
the NTP forward and backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from conceptlm.jepa.losses import jepa_distance

__all__ = ["VARIANTS", "SPAN_DRAWS", "LENGTH_WEIGHTS", "STP_METRICS", "Pieces", "trajectory_length", "draw_span",
           "length_weight", "check_pieces", "span_entries", "span_coefficients", "piece_coefficients",
           "curvature_pairs", "displacements",
           "stp_distance", "trajectory_curvature"]

VARIANTS = ("random_span", "two_view", "curvature")
SPAN_DRAWS = ("start_end", "uniform", "two_points")
LENGTH_WEIGHTS = ("none", "cosine_like", "jaccard_like")
STP_METRICS = ("cosine", "l2", "mse")

Pieces = Sequence[tuple[int, int]]


def trajectory_length(pieces: Pieces) -> int:
    """N = Σ_k (b_k − a_k), the number of virtual tokens of a trajectory."""
    return sum(b - a for a, b in pieces)


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """Uniform integer in [lo, hi) from ``generator``."""
    return int(torch.randint(lo, hi, (), generator=generator))


def draw_span(n: int, generator: torch.Generator, *, draw: str = "start_end", zero_start: bool = False,
              max_length: int | None = None) -> tuple[int, int]:
    """Draw a span [s, t) of a trajectory of ``n ≥ 2`` virtual tokens: 0 ≤ s < t ≤ n and t − s < n.

    * ``start_end`` (reference default): s uniform in [0, n) (0 with ``zero_start``), then t uniform in
      (s, min(n, s + max_length)], excluding t = n when s = 0 (the whole trajectory is not a span);
    * ``uniform``: every allowed span equally likely (``--random_span_uniform``);
    * ``two_points``: two uniform points x ∈ [0, n), y ∈ [1, n], s = min, t = max (s = 0 with ``zero_start``; t cut to
      s + max_length), redrawn until s < t and t − s < n (``--random_span_draw_both``).

    Args:
        n: trajectory length N (≥ 2).
        generator: CPU ``torch.Generator`` (every draw comes from it: a pure function of its seed).
        draw, zero_start, max_length: see above; ``max_length`` None = unbounded.

    Returns:
        (s, t) as Python ints.
    """
    if n < 2:
        raise ValueError(f"a span needs a trajectory of at least 2 tokens, got {n}")
    if draw not in SPAN_DRAWS:
        raise ValueError(f"unknown span draw {draw!r}; choose one of {', '.join(SPAN_DRAWS)}")
    cap = n if max_length is None else max(1, int(max_length))
    if draw == "start_end":
        s = 0 if zero_start else _randint(0, n, generator)
        hi = min(n, s + cap) if s > 0 else min(n - 1, cap)  # t ∈ [s + 1, hi]
        return s, _randint(s + 1, hi + 1, generator)
    if draw == "two_points":
        while True:
            x, y = _randint(0, n, generator), _randint(1, n + 1, generator)
            s, t = (0 if zero_start else min(x, y)), max(x, y)
            t = min(t, s + cap)
            if s < t and t - s < n:
                return s, t
    # uniform over the allowed spans: count c(s) of ends per start, draw one of Σ c(s)
    starts = torch.arange(0, 1 if zero_start else n)
    ends_hi = torch.minimum(torch.full_like(starts, n), starts + cap)
    ends_hi = torch.where(starts == 0, torch.clamp(ends_hi, max=n - 1), ends_hi)
    counts = ends_hi - starts  # t ∈ [s + 1, ends_hi]
    r = _randint(0, int(counts.sum()), generator)
    cum = torch.cumsum(counts, 0)
    k = int(torch.searchsorted(cum, torch.tensor(r), right=True))
    before = int(cum[k - 1]) if k > 0 else 0
    s = int(starts[k])
    return s, s + 1 + (r - before)


def length_weight(n: int, span_len: int, mode: str = "none") -> float:
    """Weight of a span of ``span_len`` tokens in a trajectory of ``n`` (reference ``--length_adjustment``).

    With r = n − ℓ the rest's length: ``none`` → 1; ``cosine_like`` → 2ℓr / (ℓ² + r²); ``jaccard_like`` →
    1 − |r − ℓ| / (r + ℓ). Both equal 1 for ℓ = r and fall towards 0 for very short or very long spans.
    """
    if mode not in LENGTH_WEIGHTS:
        raise ValueError(f"unknown length weight {mode!r}; choose one of {', '.join(LENGTH_WEIGHTS)}")
    if mode == "none":
        return 1.0
    rest = n - span_len
    if mode == "cosine_like":
        return 2.0 * rest * span_len / (rest * rest + span_len * span_len)
    return 1.0 - abs(rest - span_len) / (rest + span_len)


def check_pieces(pieces: Pieces, length: int) -> None:
    """ValueError unless ``pieces`` are ordered, non-overlapping ranges with ``1 ≤ a < b ≤ length``."""
    last = 0
    for a, b in pieces:
        if not (1 <= a < b <= length) or a < last:
            raise ValueError(f"pieces must be ordered ranges 1 <= a < b <= {length}, got {list(pieces)}")
        last = b


def span_entries(pieces: Pieces, s: int, t: int) -> list[tuple[int, int, float]]:
    """The non-zero terms of :func:`span_coefficients` as ``(row, position, value)`` triples (row 0 = rest, 1 = span;
    a position may repeat: the values add up)."""
    out: list[tuple[int, int, float]] = []
    c = 0
    for a, b in pieces:
        n = b - a
        out += [(0, b - 1, 1.0), (0, a - 1, -1.0)]  # the whole piece goes to the rest ...
        lo, hi = max(s, c), min(t, c + n)
        if lo < hi:  # ... except its part inside the span
            hi_pos, lo_pos = a + hi - c - 1, a + lo - c - 1
            out += [(1, hi_pos, 1.0), (1, lo_pos, -1.0), (0, hi_pos, -1.0), (0, lo_pos, 1.0)]
        c += n
    return out


def span_coefficients(pieces: Pieces, s: int, t: int, length: int) -> torch.Tensor:
    """Coefficients of the rest and span displacements on the hidden states: (2, length) float32.

    Row 0 gives ``rest = Δ[0, s) + Δ[t, N)``, row 1 ``span = Δ[s, t)`` (module docstring): ``row @ h`` with h the
    (length, D) hidden states. Inside a piece (a, b) whose virtual tokens start at offset c, the part [lo, hi) of a
    virtual range contributes ``h[a + hi − c − 1] − h[a + lo − c − 1]``, so every entry is an integer.

    Args:
        pieces: the trajectory's token ranges (ordered, ``1 ≤ a < b ≤ length``).
        s, t: the span's virtual bounds (0 ≤ s < t ≤ N).
        length: T, the padded row length.
    """
    check_pieces(pieces, length)
    coef = torch.zeros(2, length, dtype=torch.float32)
    for row, pos, value in span_entries(pieces, s, t):
        coef[row, pos] += value
    return coef


def piece_coefficients(pieces: Pieces, length: int) -> torch.Tensor:
    """Coefficients of the first and the last piece's displacements (the ``two_view`` ablation): (2, length).

    Row 0: ``h[b_1 − 1] − h[a_1 − 1]`` (user turn), row 1: ``h[b_K − 1] − h[a_K − 1]`` (assistant turn).
    """
    check_pieces(pieces, length)
    if len(pieces) < 2:
        raise ValueError("two_view needs at least two pieces (a user and an assistant turn)")
    coef = torch.zeros(2, length, dtype=torch.float32)
    for row, (a, b) in ((0, pieces[0]), (1, pieces[-1])):
        coef[row, b - 1] += 1.0
        coef[row, a - 1] -= 1.0
    return coef


def curvature_pairs(pieces: Pieces, length: int) -> torch.Tensor:
    """(length,) bool: True at p when the increments δ_{p−1} and δ_p both belong to one piece (a + 1 ≤ p < b), i.e.
    the pairs whose turning angle :func:`trajectory_curvature` averages (``b − a − 1`` per piece)."""
    check_pieces(pieces, length)
    mask = torch.zeros(length, dtype=torch.bool)
    for a, b in pieces:
        mask[a + 1: b] = True
    return mask


def displacements(hidden: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Hidden-state displacements ``coef @ hidden`` in float32 (autocast off): (B, S, T) × (B, T, D) → (B, S, D)."""
    if hidden.dim() != 3 or coef.dim() != 3 or coef.shape[0] != hidden.shape[0] or coef.shape[2] != hidden.shape[1]:
        raise ValueError(f"need hidden (B, T, D) and coef (B, S, T); got {tuple(hidden.shape)} and "
                         f"{tuple(coef.shape)}")
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return torch.bmm(coef.to(device=hidden.device, dtype=torch.float32), hidden.float())


def stp_distance(rest: torch.Tensor, span: torch.Tensor, metric: str = "cosine", *,
                 predictor: torch.nn.Module | None = None) -> torch.Tensor:
    """Per-span STP distance ``d(P(rest_i), span_i)``: (M, D), (M, D) → (M,) float32.

    ``cosine``: 1 − cos (the paper); ``l2``: ‖P(rest) − span‖₂; ``mse``: mean_j (P(rest)_j − span_j)² (see
    :func:`conceptlm.jepa.losses.jepa_distance`). ``predictor`` (e.g. a bias-free ``nn.Linear(D, D)``) is applied in
    float32; None = identity. The STP loss of a batch is ``Σ_i w_i · d_i / Σ_i w_i``.
    """
    if metric not in STP_METRICS:
        raise ValueError(f"STP metric must be one of {', '.join(STP_METRICS)}, got {metric!r}")
    with torch.autocast(device_type=rest.device.type, enabled=False):
        pred = rest.float()
        if predictor is not None:
            pred = F.linear(pred, predictor.weight.float(),
                            None if predictor.bias is None else predictor.bias.float())
        return jepa_distance(pred, span.float(), metric)


def trajectory_curvature(hidden: torch.Tensor, pairs: torch.Tensor, *, eps: float = 1e-6
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed turning angles of the hidden-state trajectory and their number, per row (the ``curvature`` ablation).

    For every p with ``pairs[b, p]``: θ_p = arccos(clamp(cos(δ_{p−1}, δ_p), −1 + eps, 1 − eps)), δ_p = h_p − h_{p−1}
    (the clamp keeps arccos's gradient finite at 0 and π). The example's curvature is ``angles / count``.

    Args:
        hidden: (B, T, D) hidden states.
        pairs: (B, T) bool from :func:`curvature_pairs` (False at p < 2).

    Returns:
        (angle sums (B,) float32 with gradient, pair counts (B,) int64).
    """
    if pairs.shape != hidden.shape[:2]:
        raise ValueError(f"pairs {tuple(pairs.shape)} must be hidden's (B, T) {tuple(hidden.shape[:2])}")
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        h = hidden.float()
        inc = h[:, 1:] - h[:, :-1]                                    # δ_p at column p − 1
        cos = F.cosine_similarity(inc[:, :-1], inc[:, 1:], dim=-1, eps=1e-8)  # pair (δ_{p−1}, δ_p) at column p − 2
        angles = torch.arccos(cos.clamp(-1.0 + eps, 1.0 - eps))
        sel = pairs[:, 2:].to(angles.device)
        return (angles * sel).sum(-1), sel.sum(-1)
