"""Training FLOPs that a CoCoMix student owes to its teacher and SAE (the report's cost model).

Counting rule (the same as :func:`conceptlm.cocomix.student.flops_per_token` for the student's matmuls): **2 FLOPs
per multiply-add of every parameter matmul**, so a forward pass costs ``2 x`` the weights of every ``nn.Linear`` /
GPT-2 ``Conv1D``, the LM head included. An embedding lookup is not a matmul and costs nothing; a head tied to the
embedding still multiplies every position by the ``(V, d)`` matrix and costs ``2·V·d``. Norms, biases, softmaxes,
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

from typing import Any

from torch import nn

__all__ = ["matmul_parameters", "teacher_forward_flops", "teacher_flops_to_layer", "label_flops_per_token",
           "train_flops", "sae_train_flops"]


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
