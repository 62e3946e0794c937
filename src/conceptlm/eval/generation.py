"""Batched greedy generation (left padding, stop at end of turn) and generation-accuracy evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from conceptlm.core.io import atomic_write_jsonl
from conceptlm.core.progress import progress_bar
from conceptlm.data.templates import end_of_turn_ids, render_chat

__all__ = ["split_prompt", "generate_batched", "evaluate_generation"]


def split_prompt(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content = the reference)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("record has no assistant message to use as the reference")
    return list(messages[:last]), messages[last]["content"]


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: Sequence[Sequence[dict]], *, max_new_tokens: int = 64,
                     batch_size: int = 32, progress: bool = True) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding.

    Prompts are rendered with the chat template plus the generation prompt and tokenized without extra special
    tokens (the template's BOS only). Generation stops at any end-of-turn token (``end_of_turn_ids``) or after
    ``max_new_tokens``; the returned text is everything before the first end-of-turn token, special tokens removed.
    Prompts are processed longest-first so batches hold similar lengths; results come back in input order.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token for batched generation")
    device = next(model.parameters()).device
    stop = end_of_turn_ids(tokenizer)
    encoded = [tokenizer(render_chat(tokenizer, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=len(encoded), desc="generate", enabled=progress and len(encoded) >= 2 * batch_size)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(encoded[i])
            ids[r, width - n:] = torch.tensor(encoded[i])
            mask[r, width - n:] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        new = out[:, width:].tolist()
        for r, i in enumerate(idx):
            toks = new[r]
            cut = next((j for j, t in enumerate(toks) if t in stop), len(toks))
            outputs[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return outputs


def evaluate_generation(model, tokenizer, records: Sequence[Sequence[dict]], *, scorer: str = "exact",
                        batch_size: int = 32, max_new_tokens: int = 64, output: str | Path | None = None) -> dict:
    """Generate for every record's last assistant turn, score against it, write predictions JSONL atomically.

    Returns:
        ``{"n", "correct", "accuracy", "ci_low", "ci_high", "scorer", "predictions"}`` (95% Wilson interval).
    """
    from conceptlm.eval.scorers import score
    from conceptlm.eval.stats import accuracy_ci

    prompts, refs = zip(*(split_prompt(r) for r in records)) if records else ((), ())
    preds = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = [bool(score(scorer, p, r)) for p, r in zip(preds, refs)]
    acc, lo, hi = accuracy_ci(correct)
    if output is not None:
        rows = [{"index": i, "prompt": p[-1]["content"] if p else "", "reference": r, "prediction": y,
                 "correct": c} for i, (p, r, y, c) in enumerate(zip(prompts, refs, preds, correct))]
        atomic_write_jsonl(output, rows)
    return {"n": len(correct), "correct": sum(correct), "accuracy": acc, "ci_low": lo, "ci_high": hi,
            "scorer": scorer, "predictions": str(output) if output else None}
