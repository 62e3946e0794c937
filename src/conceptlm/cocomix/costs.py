"""The CoCoMix cost model, in one place: the student's parameter counts and FLOPs per token, the FLOPs it owes to
its teacher and SAE, and the one-off costs of a run (what the report charges each arm).

Counting rule (the same for the student's matmuls, :func:`flops_per_token`, which also counts its own
attention-score products): **2 FLOPs per multiply-add of every parameter matmul**, so a forward pass costs ``2 x``
the weights of every ``nn.Linear`` / GPT-2 ``Conv1D``, the LM head included. An embedding lookup is not a matmul
and costs nothing; a head tied to the embedding still multiplies every position by the ``(V, d)`` matrix and costs
``2·V·d``. Norms, biases, softmaxes,
top-k and the teacher's attention-score products (``QKᵀ``, ``AV``, which grow with the window, not with the
weights) are not counted. A backward pass that only needs input gradients (a frozen model) costs one more forward
of the layers it traverses; one that also updates weights costs two (``3 x`` the forward in all).

Per training token of a student (charged in the report like the student's own FLOPs):

- **KD** (``cocomix.kd_weight > 0``): the teacher's forward, :func:`teacher_forward_flops`.
- **Concept labels** (arms with a concept head trained with ``cocomix.lam > 0``), :func:`label_flops_per_token`:
  attribution labels run the whole teacher forward, the input-gradient backward from the loss down to block
  ``teacher.layer`` (blocks above it and the LM head), the SAE encoder (``2·C·d``) and the scoring (``2·k·d``
  gathered decoder rows for ``mode: post``; ``2·C·d`` dense for ``mode: pre``); activation labels stop the teacher
  after block ``teacher.layer`` and run the SAE encoder only. Cached labels are computed once, but every label a
  student trains on was paid for once: the report charges the extraction per training token, as KD is charged for
  its teacher, so that arms compare at equal total cost.

One-off costs (shown in their own table; they serve every student of a run): the tiny teacher's training
(:func:`train_flops`, ``3 x`` its forward per token), the SAE's training (:func:`sae_train_flops`: the teacher's
forward up to block ``layer`` plus ``3 x`` the SAE's encoder and ``k`` decoder rows per token) and the label pass
over every cached window (``label_flops_per_token x`` the cached tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from conceptlm.cocomix.config import CocomixSection, StudentSection

__all__ = ["count_parameters", "flops_per_token", "matmul_parameters", "teacher_forward_flops",
           "teacher_flops_to_layer", "label_flops_per_token", "owed_flops_per_token", "arm_costs", "train_flops",
           "sae_train_flops"]


# ------------------------------------------------------------------------------------------------ the student
def _layer_macs(s: StudentSection) -> int:
    mlp = (2 if s.style == "gpt2" else 3) * s.d_model * s.ffn_dim
    return 4 * s.d_model * s.d_model + mlp


def count_parameters(s: StudentSection) -> dict[str, int]:
    """Parameter counts: ``base`` (LM without concept parts), ``total`` (stored) and ``active`` (the paper's count:
    only ``K`` of the ``C`` compress columns touch a token; paper App. A)."""
    d, f = s.d_model, s.ffn_dim
    gpt2 = s.style == "gpt2"
    layer = _layer_macs(s) + ((4 * d + f + d + 4 * d) if gpt2 else 2 * d)  # + biases and norms
    base = s.vocab_size * d * (1 if s.tie_embeddings else 2) + s.n_layers * layer + (2 * d if gpt2 else d)
    base += s.max_len * d if gpt2 else 0
    head_total = head_active = 0
    if s.concept_head:
        head_total = head_active = s.n_concepts * d + s.n_concepts + d  # predictor + pre_bias
        if s.compresses:
            head_total += s.n_concepts * d + d
            head_active += s.concept_k * d + d
    pause = d if s.mix == "pause" else 0
    return {"base": base, "total": base + head_total + pause, "active": base + head_active + pause}


def flops_per_token(s: StudentSection, seq_len: int, *, training: bool = True) -> dict[str, float]:
    """Analytic matmul FLOPs per token (2 per multiply-add; a training step is 3x the forward: the backward does
    one matmul for the input gradient and one for the weight gradient).

    Per token: every block slot costs ``4d² + (2|3)·d·d_ff`` MACs plus causal attention ``2·d·(S+1)/2`` over its
    ``S``-slot sequence; blocks from ``insert_layer`` on have 2 slots per token and ``S = 2T`` when doubled; the
    concept head adds ``C·d`` (predictor) and ``K·d`` (sparse compression); the LM head ``V·d``. Norms,
    softmaxes, top-K and embeddings are not counted.
    """
    d, t = s.d_model, seq_len
    split = s.insert_layer if (s.concept_head or s.doubled) else s.n_layers
    slot = lambda n_slots: _layer_macs(s) + d * (n_slots + 1)  # noqa: E731 - per-slot MACs in an S-slot sequence
    lower = split * slot(t)
    upper = (s.n_layers - split) * (2 * slot(2 * t) if s.doubled else slot(t))
    head = (s.n_concepts * d + (s.concept_k * d if s.compresses else 0)) if s.concept_head else 0
    parts = {"blocks": lower + upper, "concept_head": head, "lm_head": s.vocab_size * d}
    scale = 2 * (3 if training else 1)
    out = {k: float(v * scale) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------ teacher and SAE


def _is_matmul(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight")  # transformers' GPT-2 projection


def matmul_parameters(module: nn.Module) -> int:
    """Weights that take part in a matmul per position: every ``nn.Linear`` / ``Conv1D`` weight of ``module``,
    counted once per module (a head tied to the embedding counts: it is its own matmul). Embeddings, norms and
    biases are not matmuls."""
    return sum(m.weight.numel() for m in module.modules() if _is_matmul(m))


def _head_parameters(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:  # a head computed with the input embedding's matrix (no module): V·d all the same
        return model.get_input_embeddings().weight.numel()
    return head.weight.numel()


def _blocks(model: nn.Module) -> nn.ModuleList:
    from conceptlm.cocomix.teacher import teacher_blocks

    return teacher_blocks(model)


def _width(model: nn.Module) -> int:
    from conceptlm.cocomix.teacher import teacher_width

    return teacher_width(model)


def teacher_forward_flops(model: nn.Module) -> float:
    """Forward FLOPs per token of a causal LM: ``2 x`` its matmul weights, the LM head included (``2·V·d`` tied
    or not), embeddings excluded. This is what a KD arm pays per training token for its teacher."""
    total = matmul_parameters(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not any(m is head for m in model.modules()):
        total += _head_parameters(model)
    return 2.0 * total


def teacher_flops_to_layer(model: nn.Module, layer: int) -> float:
    """Forward FLOPs per token of blocks ``0..layer`` (what the SAE reads; the pass stops there)."""
    return 2.0 * sum(matmul_parameters(b) for b in _blocks(model)[: layer + 1])


def label_flops_per_token(model: nn.Module, layer: int, *, n_latents: int, k: int, labels: Any) -> float:
    """FLOPs to compute one token's concept labels (see the module docstring).

    Args:
        model: the teacher; layer: the block the SAE reads.
        n_latents, k: the SAE's ``C`` and ``k``; labels: the ``labels`` section (``selection``, ``mode``).
    """
    width = _width(model)
    encoder = 2.0 * n_latents * width
    if labels.selection == "activation":
        return teacher_flops_to_layer(model, layer) + encoder
    above = sum(matmul_parameters(b) for b in _blocks(model)[layer + 1:]) + _head_parameters(model)
    scoring = 2.0 * (k if labels.mode == "post" else n_latents) * width
    return teacher_forward_flops(model) + 2.0 * above + encoder + scoring


def train_flops(model: nn.Module, tokens: int) -> float:
    """FLOPs to train ``model`` on ``tokens`` tokens: ``3 x`` its forward (forward, input and weight gradients)."""
    return 3.0 * teacher_forward_flops(model) * tokens


def sae_train_flops(model: nn.Module, layer: int, *, n_latents: int, k: int, tokens: int) -> float:
    """FLOPs to train a TopK SAE on ``tokens`` tokens of the teacher's block ``layer``: the frozen teacher's
    forward up to that block, plus ``3 x`` (encoder ``2·C·d`` + ``k`` decoder rows ``2·k·d``) per token."""
    width = _width(model)
    return (teacher_flops_to_layer(model, layer) + 3.0 * 2.0 * (n_latents + k) * width) * tokens


# ------------------------------------------------------------------------------------------------ per arm
def owed_flops_per_token(student: StudentSection, cocomix: CocomixSection, *, teacher: nn.Module, layer: int,
                         labels: Any, sae: Callable[[], Any]) -> dict[str, float]:
    """FLOPs per training token a student owes to its teacher and its labels (recorded in its ``artifact.json``):
    ``teacher_flops_per_token`` (KD, ``cocomix.kd_weight > 0``: :func:`teacher_forward_flops`) and
    ``label_flops_per_token`` (a concept head trained with ``cocomix.lam > 0``: :func:`label_flops_per_token`).

    Args:
        teacher: the teacher model; layer: the block the SAE reads; labels: the ``labels`` section.
        sae: returns the SAE (its ``n_latents`` and ``k``); called only when the labels are charged.
    """
    out = {"teacher_flops_per_token": 0.0, "label_flops_per_token": 0.0}
    if cocomix.kd_weight > 0:
        out["teacher_flops_per_token"] = teacher_forward_flops(teacher)
    if student.concept_head and cocomix.lam > 0:
        module = sae()
        out["label_flops_per_token"] = label_flops_per_token(teacher, layer, n_latents=module.n_latents,
                                                             k=int(module.k), labels=labels)
    return out


def arm_costs(student: StudentSection, window: int, owed: dict[str, Any] | None) -> dict[str, Any]:
    """The report's cost columns of one student: its own training FLOPs per token at ``window``, what it owes
    (``owed``: the ``cost`` its ``artifact.json`` recorded, :func:`owed_flops_per_token`; None: not recorded, the
    teacher and label parts are then None and count 0 in the total), their sum and its active parameters."""
    student_fpt = flops_per_token(student, window)["total"]
    kd = label = None
    if isinstance(owed, dict):
        kd, label = float(owed.get("teacher_flops_per_token", 0.0)), float(owed.get("label_flops_per_token", 0.0))
    return {"student_flops_per_token": student_fpt, "teacher_flops_per_token": kd, "label_flops_per_token": label,
            "train_flops_per_token": student_fpt + (kd or 0.0) + (label or 0.0),
            "active_parameters": count_parameters(student)["active"]}
