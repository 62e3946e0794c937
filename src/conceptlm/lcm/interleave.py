"""The interleaved layout of the One-Tower diffusion LCM and the Quantized LCM (LCM paper §2.3.3, Fig. 7, and §2.3.5).

A document of ``N`` sentences becomes one sequence of ``2N`` positions: position ``2n`` holds the *query* copy of
sentence ``n`` (its noisy latent, or for Quant-LCM its partial quantization) and position ``2n + 1`` its clean
embedding::

    [q_0, x_0, q_1, x_1, ..., q_{N-1}, x_{N-1}]

Attention (:func:`interleaved_attention_mask`, True = may attend):

- query copy ``2n`` sees the clean copies of the previous sentences ``{2m + 1 : m < n}`` and itself;
- clean copy ``2n + 1`` sees the clean copies ``{2m + 1 : m <= n}`` (causal over clean sentences);
- no position sees another sentence's query copy, so all sentences are denoised in parallel in one pass and the
  prediction for sentence ``n`` is read at position ``2n``;
- a *dropped* query (classifier-free guidance training, or the unconditional branch at inference) sees only itself.

Both copies of sentence ``n`` get sentence position ``n`` (:func:`interleaved_positions`), a choice the paper leaves
open.
"""

from __future__ import annotations

import torch

__all__ = ["interleave", "interleaved_attention_mask", "interleaved_positions"]


def interleave(queries: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``queries``, ``clean`` ``(B, N, ...)`` -> ``(B, 2N, ...)`` with queries at even and clean at odd positions."""
    if queries.shape != clean.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and clean {tuple(clean.shape)} differ")
    b, n = queries.shape[:2]
    return torch.stack([queries, clean], dim=2).reshape(b, 2 * n, *queries.shape[2:])


def interleaved_positions(positions: torch.Tensor) -> torch.Tensor:
    """Sentence positions ``(B, N)`` -> ``(B, 2N)``: both copies of a sentence share its position."""
    return positions.repeat_interleave(2, dim=1)


def interleaved_attention_mask(n: int, *, drop: torch.Tensor | None = None,
                               keep: torch.Tensor | None = None, device: torch.device | str | None = None
                               ) -> torch.Tensor:
    """The keep-mask of the interleaved layout (module docstring).

    Args:
        n: sentences ``N``.
        drop: bool ``(B, N)``, True = the query copy of that sentence is unconditional (sees only itself).
        keep: bool ``(B, N)`` real sentences (False = padding): no position attends to a padded sentence's copies
            (a padded query still sees itself, so its row is never empty).

    Returns:
        bool ``(B | 1, 1, 2N, 2N)``.
    """
    if device is None:
        device = drop.device if drop is not None else (keep.device if keep is not None else None)
    idx = torch.arange(2 * n, device=device)
    sent, is_clean = idx // 2, (idx % 2) == 1
    q_sent, k_sent = sent.unsqueeze(1), sent.unsqueeze(0)
    q_clean = is_clean.unsqueeze(1)
    k_clean = is_clean.unsqueeze(0)
    # clean key of an earlier sentence (query copies) / of an earlier-or-same sentence (clean copies)
    allowed = k_clean & ((k_sent < q_sent) | (q_clean & (k_sent == q_sent)))
    allowed = allowed | torch.eye(2 * n, dtype=torch.bool, device=device)
    mask = allowed.view(1, 1, 2 * n, 2 * n)
    if drop is not None:
        query_rows = (~is_clean).view(1, 2 * n) & drop.repeat_interleave(2, dim=1)  # (B, 2N): dropped queries
        eye = torch.eye(2 * n, dtype=torch.bool, device=device).view(1, 1, 2 * n, 2 * n)
        mask = torch.where(query_rows.view(-1, 1, 2 * n, 1), eye, mask)
    if keep is not None:
        key_ok = keep.repeat_interleave(2, dim=1).view(-1, 1, 1, 2 * n)
        eye = torch.eye(2 * n, dtype=torch.bool, device=device).view(1, 1, 2 * n, 2 * n)
        mask = (mask & key_ok) | eye
    return mask
