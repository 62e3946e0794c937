"""Greedy and sampled generation from a :class:`~conceptlm.cocomix.model.StudentLM`, with or without a KV cache.

With ``mix: interleave`` each new token adds one slot to the blocks below the insert layer and two (token, concept)
slots to the blocks above it; the causal mask of a cached step is aligned bottom-right, so cached decoding equals
recomputing the whole sequence (the reference code's SDPA path does not: it aligns the mask top-left). A
:class:`Steering` amplifies one concept in every forward pass of the generation (prompt and new tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from conceptlm.cocomix.model import Steering, StudentLM

__all__ = ["generate", "sample_next", "filter_logits"]


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask ``logits`` ``(B, V)`` to the ``top_k`` largest and to the smallest set whose probability reaches
    ``top_p`` (nucleus); masked entries become ``-inf``. The arg-max always survives."""
    out = logits
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the strictly better tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``(B,)`` from last-position logits ``(B, V)``: arg-max when ``temperature == 0``, else one
    multinomial draw per row (``generator`` seeds it) from ``softmax(filtered logits / temperature)``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: StudentLM,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    steer: Steering | None = None,
    eos_token_id: int | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` ``(B, T)`` (no padding: every row is a full prompt) by ``max_new_tokens`` tokens.

    Args:
        temperature / top_k / top_p / generator: see :func:`sample_next` (greedy by default).
        use_cache: decode incrementally with a KV cache (False recomputes the whole sequence every step; both give
            the same tokens).
        steer: concept steering applied at every position.
        eos_token_id: rows that produced it keep producing it.
        stop: called with the sequence so far ``(B, T + n)`` after each new token; True ends the generation early.

    Returns:
        ``(B, T + n)`` long: the prompt followed by the ``n`` new tokens (``n = max_new_tokens`` unless ``stop``
        ended it earlier).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) with T >= 1, got {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        seq = input_ids
        cache = model.new_cache() if use_cache else None
        step_input = input_ids
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        for _ in range(max_new_tokens):
            logits = model(step_input if use_cache else seq, cache=cache, steer=steer).logits[:, -1]
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            step_input = nxt[:, None]
            if stop is not None and stop(seq):
                break
        return seq
    finally:
        model.train(was_training)
