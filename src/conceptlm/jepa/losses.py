"""LLM-JEPA embedding-space losses (pure functions).

The LLM-JEPA objective (Huang, LeCun, Balestriero, arXiv 2509.14252, eq. 2-3) is

    L = γ · L_LM(Text, Code) + λ · d(Pred(Enc(Text)), Enc(Code)),

where ``Enc`` is the final normed hidden state of the model at the view's encoder index and ``Pred`` is the same
model run over ``k`` extra predictor tokens. This module holds the distance ``d`` in its four variants, returned
PER EXAMPLE so that the trainer can sum over micro-batches/ranks and divide by the global example count (the batch
mean then equals the reference's ``mean_i``). Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["METRICS", "jepa_distance", "gather_with_grad", "vicreg_variance", "vicreg_covariance"]

METRICS: tuple[str, ...] = ("cosine", "l2", "mse", "infonce")


class _GatherRows(torch.autograd.Function):
    """All-gather of (n_r, D) row blocks of possibly different n_r, with the exact gradient.

    Backward sums the gathered tensor's gradient over ranks (every rank's loss may depend on every rank's rows)
    and returns this rank's slice, so each rank ends up with d(Σ_ranks loss_r)/d(local rows).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:  # type: ignore[override]
        n_max = max(sizes)
        padded = x.new_zeros((n_max,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Gather rows across ranks; returns (gathered rows, offset of this rank's rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    ns = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(ns, n)
    sizes = tuple(int(v.item()) for v in ns)
    return _GatherRows.apply(x, sizes, rank), sum(sizes[:rank])


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 across ranks, keeping the gradient path through the local slice.

    The gathered tensor is ordered by rank; ranks may hold different numbers of rows. The backward pass
    all-reduces (sums) the incoming gradient over ranks and returns this rank's slice, which is the exact gradient
    of the sum of all ranks' losses w.r.t. the local rows (a plain ``all_gather`` would give no gradient, and
    "local slice only" would drop the other ranks' terms). Every rank must therefore run backward, as under DDP.
    Identity when ``torch.distributed`` is not initialised or the world size is 1.

    Args:
        x: (n_local, ...) tensor.

    Returns:
        (n_total, ...) tensor, rank 0's rows first.
    """
    return _gather(x)[0]


def jepa_distance(pred: torch.Tensor, target: torch.Tensor, metric: str = "cosine", *, temperature: float = 0.07,
                  gather_negatives: bool = False) -> torch.Tensor:
    """Per-example JEPA distance between predicted and target embeddings, in float32.

    With u_i = Pred(Enc(Text_i)) (``pred``) and a_i = Enc(Code_i) (``target``):

    * ``cosine``:  d_i = 1 − cos(u_i, a_i) = 1 − u_i·a_i / max(‖u_i‖‖a_i‖, 1e-8)   (paper default, eq. 2)
    * ``l2``:      d_i = ‖u_i − a_i‖₂
    * ``mse``:     d_i = (1/D) Σ_j (u_ij − a_ij)²  (so mean_i d_i = the reference's mean over i and j)
    * ``infonce``: d_i = −log softmax_j(û_i·â_j / τ)[i],  û = u/‖u‖, â = a/‖a‖, negatives = the other rows of
      ``target`` in the batch (text→code direction only, as in the reference).

    The reference objective is ``mean_i d_i``; the trainer sums these per-example values over micro-batches and
    ranks and divides by the global example count.

    Args:
        pred: (B, D) predicted embeddings (any float dtype; cast to float32).
        target: (B, D) target embeddings.
        metric: one of ``METRICS``.
        temperature: τ for ``infonce``.
        gather_negatives: ``infonce`` only — take negatives from every rank's targets via ``gather_with_grad``
            (exact gradient; identity when not distributed).

    Returns:
        (B,) float32 tensor of per-example distances.

    Raises:
        ValueError: unknown metric, shape mismatch, or non-positive temperature.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown JEPA metric {metric!r}; choose one of {', '.join(METRICS)}")
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be (B, D); got {tuple(pred.shape)} and {tuple(target.shape)}")
    u, a = pred.float(), target.float()
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(u, a, dim=-1, eps=1e-8)
    if metric == "l2":
        return torch.linalg.vector_norm(u - a, ord=2, dim=-1)
    if metric == "mse":
        return (u - a).pow(2).mean(dim=-1)
    if temperature <= 0:
        raise ValueError(f"infonce temperature must be > 0, got {temperature}")
    u_hat = F.normalize(u, dim=-1, eps=1e-8)
    a_hat = F.normalize(a, dim=-1, eps=1e-8)
    offset = 0
    if gather_negatives:
        a_hat, offset = _gather(a_hat)
    logits = u_hat @ a_hat.T / temperature
    labels = torch.arange(u.shape[0], device=u.device) + offset
    return F.cross_entropy(logits, labels, reduction="none")


def vicreg_variance(z: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance hinge over a batch (Bardes, Ponce, LeCun, arXiv 2105.04906, eq. 1):

        v(Z) = (1/D) Σ_j max(0, γ − sqrt(Var(z^j) + ε)),

    with Var the unbiased variance over the B rows of dimension j. Zero once every dimension's standard deviation
    across the batch reaches γ; 1·γ-ish when the batch has collapsed to one vector.

    Args:
        z: (B, D) embeddings, B ≥ 2 (cast to float32, computed outside autocast).
        gamma: target standard deviation γ > 0.
        eps: ε inside the square root (keeps the gradient finite at zero variance).

    Returns:
        float32 0-d tensor (with gradient).
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"vicreg_variance needs (B >= 2, D) embeddings, got {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        std = torch.sqrt(z.float().var(dim=0, unbiased=True) + eps)
        return F.relu(gamma - std).mean()


def vicreg_covariance(z: torch.Tensor) -> torch.Tensor:
    """VICReg covariance penalty over a batch (arXiv 2105.04906, eq. 3-4):

        C(Z) = (1/(B−1)) Σ_i (z_i − z̄)(z_i − z̄)ᵀ,    c(Z) = (1/D) Σ_{i≠j} C(Z)_ij²,

    the squared off-diagonal covariances (decorrelated dimensions give 0).

    Args:
        z: (B, D) embeddings, B ≥ 2 (cast to float32, computed outside autocast).

    Returns:
        float32 0-d tensor (with gradient).
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"vicreg_covariance needs (B >= 2, D) embeddings, got {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = z.float()
        x = x - x.mean(dim=0, keepdim=True)
        cov = x.T @ x / (x.shape[0] - 1)
        off = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
        return off / x.shape[1]
