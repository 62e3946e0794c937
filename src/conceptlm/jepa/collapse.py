"""Collapse diagnostics for the JEPA embeddings Enc(Text) / Enc(Code) (pure functions, float32/float64).

A small JEPA distance only means something if the embeddings still tell examples apart: when every Enc vector
points the same way, d(Pred(Enc(Text_i)), Enc(Code_i)) is small for matched AND mismatched pairs. These functions
make that visible:

* :func:`mismatched` — a deterministic derangement of the targets (roll by one row): target i goes with prediction
  i + 1, so no example is paired with itself (needs B ≥ 2);
* :func:`mean_dim_variance` — (1/D) Σ_j Var_i(x_ij), the unbiased variance over the rows of each dimension,
  averaged over dimensions (0 when every row is the same vector);
* :func:`effective_rank` — exp(H(p)), p_k = σ_k / Σ σ, σ = singular values of the row-L2-normalised (uncentred)
  matrix (Roy & Vetterli 2007): 1 when all rows point the same way, N for N orthogonal rows, at most min(N, D).
  It measures *directional* collapse (what the cosine distance sees); the variance measures the spread;
* :func:`retrieval_ranks` / :func:`retrieval_accuracy` — for each query the rank of its own key among all keys
  by cosine, ties counted against the query (identical vectors never retrieve anything).

Training-time evaluation reports the per-batch values of :func:`batch_stats` as ``(value · B, B)`` pairs: the
trainer sums them over eval batches and ranks, so the logged number is the batch-size-weighted mean of the
per-batch statistic (it depends on ``train.eval_batch_size``, and the effective rank is at most that size).
``conceptlm jepa analyze`` computes the same statistics over the whole eval set at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mismatched", "mean_dim_variance", "effective_rank", "retrieval_ranks", "retrieval_accuracy",
           "cosine_matched_mismatched", "batch_stats", "BATCH_STAT_NAMES"]

BATCH_STAT_NAMES: tuple[str, ...] = ("jepa_mismatch", "cos_matched", "cos_mismatched", "enc_text_var",
                                     "enc_code_var", "enc_text_erank", "enc_code_erank")
"""Metric names :func:`batch_stats` returns (the JEPA unit's evaluation metrics)."""


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def mismatched(target: torch.Tensor) -> torch.Tensor:
    """``target`` rolled by one row, (B, D) -> (B, D): row i becomes target i − 1, a derangement for B ≥ 2.

    Raises:
        ValueError: B < 2 (no mismatched pairing exists).
    """
    if target.shape[0] < 2:
        raise ValueError(f"mismatched pairs need at least 2 rows, got {target.shape[0]}")
    return target.roll(1, dims=0)


def mean_dim_variance(x: torch.Tensor) -> torch.Tensor:
    """(1/D) Σ_j Var_i(x_ij) for (N, D) ``x``, unbiased (divides by N − 1), float32 0-d tensor.

    Raises:
        ValueError: N < 2.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"mean_dim_variance needs (N >= 2, D) rows, got {tuple(x.shape)}")
    with _no_autocast(x):
        return x.float().var(dim=0, unbiased=True).mean()


def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Effective rank exp(−Σ_k p_k log p_k), p = σ / Σσ, σ = singular values of the row-normalised ``x``.

    Args:
        x: (N, D) embeddings (rows are L2-normalised first; the matrix is not centred).
        eps: rows with norm below this stay zero; an all-zero matrix has effective rank 0.

    Returns:
        float32 0-d tensor in [1, min(N, D)] (0 for an all-zero matrix).
    """
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"effective_rank needs (N >= 1, D) rows, got {tuple(x.shape)}")
    with _no_autocast(x):
        xn = F.normalize(x.float(), dim=-1, eps=eps)
        s = torch.linalg.svdvals(xn)
        total = s.sum()
        p = s / total.clamp(min=eps)
        h = -(p * torch.log(p.clamp(min=1e-30))).sum()
        return torch.where(total > eps, torch.exp(h), torch.zeros_like(h))


def cosine_matched_mismatched(query: torch.Tensor, keys: torch.Tensor, *, chunk: int = 1024) -> tuple[float, float]:
    """Mean cos(q_i, k_i) over i and mean cos(q_i, k_j) over all i ≠ j, in float64 (chunked over queries).

    Args:
        query, keys: (N, D) with N ≥ 2.
    """
    q, k = _unit_rows(query), _unit_rows(keys)
    n = q.shape[0]
    if n < 2 or k.shape != q.shape:
        raise ValueError(f"need two (N >= 2, D) matrices of one shape, got {tuple(query.shape)}, {tuple(keys.shape)}")
    diag = (q * k).sum(-1)
    total = sum(float((q[s:s + chunk] @ k.T).sum()) for s in range(0, n, chunk))
    return float(diag.mean()), (total - float(diag.sum())) / (n * (n - 1))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1, eps=1e-12)


def retrieval_ranks(query: torch.Tensor, keys: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of key i for query i among all N keys by cosine similarity (float64).

    rank_i = #{j ≠ i : cos(q_i, k_j) ≥ cos(q_i, k_i)} — ties count against the query, so a collapsed set (all keys
    equal) gives rank N − 1 for every query, never a lucky hit.

    Args:
        query, keys: (N, D).

    Returns:
        (N,) int64.
    """
    q, k = _unit_rows(query), _unit_rows(keys)
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"query and keys must both be (N, D); got {tuple(query.shape)} and {tuple(keys.shape)}")
    ranks = []
    for s in range(0, q.shape[0], chunk):
        sims = q[s:s + chunk] @ k.T                               # (c, N)
        own = sims.gather(1, torch.arange(s, s + sims.shape[0]).unsqueeze(1))  # (c, 1): the same matmul's entry
        ranks.append((sims >= own).sum(1) - 1)
    return torch.cat(ranks)


def retrieval_accuracy(query: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of queries whose own key is among the top ``k`` keys (cosine, ties against), for each ``k``."""
    ranks = retrieval_ranks(query, keys)
    return {k: float((ranks < k).double().mean()) for k in ks}


def batch_stats(pred: torch.Tensor, target: torch.Tensor, enc_text: torch.Tensor, enc_code: torch.Tensor,
                distance) -> dict[str, tuple[torch.Tensor, int]]:
    """Collapse metrics of one batch as ``{name: (value · B, B)}`` (names :data:`BATCH_STAT_NAMES`).

    * ``jepa_mismatch``: Σ_i d(pred_i, target_{i−1}) (the JEPA distance on the rolled pairing), count B;
    * ``cos_matched`` / ``cos_mismatched``: Σ_i cos(pred_i, target_i) and Σ_i cos(pred_i, target_{i−1}), count B;
    * ``enc_{text,code}_var``: B · :func:`mean_dim_variance`, count B;
    * ``enc_{text,code}_erank``: B · :func:`effective_rank`, count B.

    Everything is detached and stays on the device (no host sync). A batch of one example returns ``{}`` (no
    mismatched pair, no variance).

    Args:
        pred, target: (B, D) Pred(Enc(predicting view)) and Enc(predicted view).
        enc_text, enc_code: (B, D) Enc(Text) and Enc(Code) (the same tensors as pred/target in some order).
        distance: ``(pred, target) -> (B,)`` per-example JEPA distance (the configured metric).
    """
    b = pred.shape[0]
    if b < 2:
        return {}
    with torch.no_grad(), _no_autocast(pred):
        p, t = pred.detach().float(), target.detach().float()
        t_mis = mismatched(t)
        out = {
            "jepa_mismatch": distance(p, t_mis).sum(),
            "cos_matched": F.cosine_similarity(p, t, dim=-1, eps=1e-8).sum(),
            "cos_mismatched": F.cosine_similarity(p, t_mis, dim=-1, eps=1e-8).sum(),
            "enc_text_var": mean_dim_variance(enc_text.detach()) * b,
            "enc_code_var": mean_dim_variance(enc_code.detach()) * b,
            "enc_text_erank": effective_rank(enc_text.detach()) * b,
            "enc_code_erank": effective_rank(enc_code.detach()) * b,
        }
    return {k: (v, b) for k, v in out.items()}

