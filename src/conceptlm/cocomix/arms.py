"""The arms of the CoCoMix comparison: the ``(student, cocomix)`` sections of each baseline and ablation, derived
from the CoCoMix ones (the paper's baselines: NTP with matched active parameters, KD and pause tokens, §3 and App.
A; and the ablations of §3.3), and the NTP baseline matched to a CoCoMix student by parameters or FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from conceptlm.cocomix.config import ARMS, CocomixSection, StudentSection
from conceptlm.cocomix.costs import count_parameters, flops_per_token
from conceptlm.core.errors import ConfigError

__all__ = ["match_ntp", "make_arm"]


def _ntp_like(s: StudentSection) -> StudentSection:
    return dataclasses.replace(s, mix="none", concept_head=False)


def _resized(s: StudentSection, d_model: int | None = None, n_layers: int | None = None) -> StudentSection:
    d = d_model or s.d_model
    d_ff = round(s.d_ff * d / s.d_model) if s.d_ff else 0
    layers = n_layers or s.n_layers
    return dataclasses.replace(s, d_model=d, d_ff=d_ff, n_layers=layers, insert_layer=min(s.insert_layer, layers - 1))


def match_ntp(s: StudentSection, *, by: Literal["params", "flops"] = "params", seq_len: int | None = None,
              vary: Literal["d_model", "n_layers"] = "d_model") -> StudentSection:
    """The NTP baseline (no concept head, no mixing) whose active parameters (``by="params"``, the paper's
    baseline) or training FLOPs per token at ``seq_len`` (``by="flops"``) are closest to those of ``s``, by changing
    ``d_model`` (multiples of ``n_heads``; even head width for llama) or ``n_layers``."""
    if by == "flops" and not seq_len:
        raise ValueError("match_ntp(by='flops') needs seq_len")
    cost = (lambda c: count_parameters(c)["active"]) if by == "params" else \
        (lambda c: flops_per_token(c, seq_len)["total"])  # type: ignore[arg-type]
    target = cost(s)
    base = _ntp_like(s)
    if vary == "d_model":
        step = s.n_heads * (2 if s.style == "llama" else 1)
        options = [_resized(base, d_model=d) for d in range(step, 8 * s.d_model + 1, step)]
    else:
        options = [_resized(base, n_layers=n) for n in range(1, 8 * s.n_layers + 1)]
    return min(options, key=lambda c: abs(cost(c) - target))


def make_arm(name: str, student: StudentSection, cocomix: CocomixSection, *, seq_len: int,
             kd_weight: float = 0.1) -> tuple[StudentSection, CocomixSection]:
    """``(student, cocomix)`` sections of one arm, derived from the CoCoMix ones.

    ``ntp``: NTP with the CoCoMix student's active parameter count (wider); ``ntp_flops``: NTP with its training
    FLOPs per token at ``seq_len``; ``kd``: the ``ntp`` model + KD (``kd_weight``, the paper's 0.1); ``pause`` /
    ``kd_pause``: the CoCoMix architecture with a learned pause vector interleaved instead of the concept (no
    concept head); ``mix_only``: lam = 0; ``concept_only``: concept loss, no mixing; ``add``: ``mix=add``;
    ``cocomix_pos`` / ``pause_pos``: ``cocomix`` / ``pause`` with token t's position embedding added to its second
    slot (``student.slot_positions``, gpt2 style; in the llama style they equal ``cocomix`` / ``pause``: RoPE
    already gives the slots positions).

    Raises:
        ConfigError: ``cocomix`` or ``mix_only`` with ``student.mix`` ``add`` / ``pause``: the arm named
            ``cocomix`` would silently be the ``add`` / ``pause`` arm (list that arm instead).
    """
    if name not in ARMS:
        raise ConfigError(f"unknown arm {name!r}; choose one of {', '.join(ARMS)}", field="arm")
    if name in ("cocomix", "mix_only") and student.mix not in ("interleave", "none"):
        raise ConfigError(f"{student.mix!r} would turn the arm {name!r} (the concept interleaved) into another arm; "
                          f"the arms set their own mixing: keep student.mix=interleave and list the "
                          f"{'add' if student.mix == 'add' else 'pause'} arm in pipeline.arms", field="student.mix")
    s = dataclasses.replace(student, mix="interleave" if student.mix == "none" else student.mix, concept_head=True)
    if s.mix == "add":
        s = dataclasses.replace(s, slot_positions=False)
    flat = dataclasses.replace(s, slot_positions=False)  # the arms without a second slot per token
    c = dataclasses.replace(cocomix, kd_weight=0.0)
    off = dataclasses.replace(c, lam=0.0)
    if name == "cocomix":
        return s, c
    if name in ("ntp", "kd"):
        return match_ntp(flat, by="params"), dataclasses.replace(off, kd_weight=kd_weight if name == "kd" else 0.0)
    if name == "ntp_flops":
        return match_ntp(flat, by="flops", seq_len=seq_len), off
    if name in ("pause", "kd_pause"):
        return (dataclasses.replace(s, mix="pause", concept_head=False),
                dataclasses.replace(off, kd_weight=kd_weight if name == "kd_pause" else 0.0))
    if name in ("cocomix_pos", "pause_pos"):
        s = dataclasses.replace(s, slot_positions=s.style == "gpt2")
        if name == "cocomix_pos":
            return dataclasses.replace(s, mix="interleave"), c
        return dataclasses.replace(s, mix="pause", concept_head=False), off
    if name == "mix_only":
        return s, off
    if name == "concept_only":
        return dataclasses.replace(flat, mix="none"), c
    return dataclasses.replace(flat, mix="add"), c
