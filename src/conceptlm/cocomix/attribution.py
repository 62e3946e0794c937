"""Concept labels: which SAE latents a frozen teacher's continuation depends on (CoCoMix §2, paper Eq. 1).

For token windows ``x`` (B, T), a frozen causal LM teacher and a TopK SAE trained on the teacher's residual stream
after block ``layer``:

1. ``h`` (B, T, d) is the residual after block ``layer``. It is made a leaf that requires grad and spliced back
   into the forward pass (a forward hook on the block returns it), so the rest of the teacher runs on it.
2. ``L`` is the teacher's mean next-token loss over the window batch, ``L = (1/(B(T-1))) sum_{b,s<T-1}
   -log p(x[b,s+1] | x[b,<=s])``, as in the reference code, and ``g = dL/dh`` comes from ``torch.autograd.grad``
   (teacher parameters are frozen and receive no ``.grad``; the SAE runs without a graph).

   *Window-mean semantics.* Attention is causal, so ``g[b,t] = (1/(B(T-1))) sum_{s>=t} d l[b,s] / d h[b,t]``:
   the label at position t depends on every later token of its window (a look-ahead signal), not only on
   ``x[t+1]`` as the paper's Eq. 1 states. Windows do not interact, so a window's labels do not depend on the
   other windows of its batch; the global factor ``1/(B(T-1))`` scales all scores alike and changes no ranking.
   The last position influences no loss term, so ``g[:, T-1] = 0`` and its row is masked.
3. Attribution of latent j at token t, with decoder rows ``W_dec[j]`` (normalized space):

   - ``mode="post"`` (reference code): ``A_j = c_j * <g_t, W_dec[j]>`` for the k active latents only (post-TopK,
     post-ReLU values ``c``), computed by gathering the <= k active decoder rows;
   - ``mode="pre"`` (paper Eq. 1): ``A_j = c_pre_j * <g_t, W_dec[j]>`` for every latent (dense, in token chunks).

   *Decoder chain rule.* The SAE reconstructs ``h_hat = x_hat * s_t + mu_t`` with the token's normalization scale
   ``s_t``, so the exact derivative of the loss along latent j is ``s_t * <g_t, W_dec[j]>``. The reference drops
   ``s_t``; ``include_sigma=True`` keeps it. ``s_t > 0`` is one scalar per token, so per-token rankings, labels and
   masks are identical either way; only score magnitudes differ. The gradient is taken at the true ``h`` (not at
   the SAE reconstruction), as in the reference.
4. Labels are the ``k_attr`` latents with the largest signed score (reference; ``score="abs"`` ranks by ``|A|``),
   or, with ``selection="activation"`` (the paper's activation-vs-attribution ablation), the ``k_attr`` most active
   latents (no teacher backward at all). Rows whose scores are all zero are masked.

   *Deviation (post mode).* The reference ranks the dense (B, T, n_latents) tensor, so when fewer than ``k_attr``
   active latents have a positive score it fills the rest with inactive latents of score 0, picked by arbitrary
   tie-breaking. Here the labels are always active latents (ranked by score, negative ones last); with
   ``mode="pre"`` every latent competes, as in the paper.

The SAE interface used: ``normalize(h) -> (x, mu, sigma)``, ``pre_activations(x)``, ``encode(x) -> (values,
indices)``, ``W_dec`` (n_latents, d) and ``k`` (see :mod:`conceptlm.cocomix.sae`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from conceptlm.cocomix.config import LabelSection
from conceptlm.cocomix.teacher import teacher_blocks
from conceptlm.core.errors import ConfigError
from conceptlm.core.hf import backbone, causal_lm_loss_sum

__all__ = [
    "ConceptLabels", "TeacherPass", "ConceptLabeler",
    "freeze", "teacher_pass", "decoder_scale", "post_attribution", "dense_attribution",
    "select_labels", "concept_labels",
]

# Elements of the largest temporary a chunk may build (64 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class ConceptLabels:
    """Labels of a window batch.

    Attributes:
        labels: (B, T, k_attr) int64 latent indices, best first.
        mask: (B, T) bool, False where the token's score row is all zero (e.g. the last position).
        scores: (B, T, k_attr) scores of the chosen latents, float32 (float64 for a float64 SAE).
    """

    labels: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor


@dataclass
class TeacherPass:
    """Residual stream and loss gradient of one teacher pass.

    Attributes:
        hidden: (B, T, d) residual after block ``layer`` (detached).
        grad: (B, T, d) ``dL/dhidden`` of the window-mean NTP loss, or None when not requested.
        loss: scalar window-mean NTP loss (detached), or None when not requested.
    """

    hidden: torch.Tensor
    grad: torch.Tensor | None
    loss: torch.Tensor | None


# ------------------------------------------------------------------------------------------------- teacher side

def freeze(module: nn.Module) -> nn.Module:
    """Make ``module`` a frozen teacher: no parameter requires grad, eval mode (no dropout). Returns it."""
    module.requires_grad_(False)
    module.eval()
    return module


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass once the residual is stored."""


@contextlib.contextmanager
def _splice(block: nn.Module, store: list[torch.Tensor], *, leaf: bool, stop: bool) -> Iterator[None]:
    """Forward hook on ``block``: store its output hidden state (as a grad-requiring leaf that replaces the output
    when ``leaf``), and abort the forward pass when ``stop``."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if store:
            raise RuntimeError("the hooked decoder block ran twice in one forward pass")
        captured = hidden.detach().requires_grad_(True) if leaf else hidden.detach()
        store.append(captured)
        if stop:
            raise _StopForward
        if not leaf:
            return None
        return (captured, *output[1:]) if isinstance(output, tuple) else captured

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def teacher_pass(teacher: nn.Module, input_ids: torch.Tensor, layer: int, *, grad: bool = True) -> TeacherPass:
    """Residual after block ``layer`` and the gradient of the teacher's window-mean NTP loss with respect to it.

    The residual equals ``output_hidden_states[layer + 1]`` of the HF model for every block but the last (whose
    hidden state HF reports after the final norm; here it is the block's own output). Works under ``no_grad``
    (gradients are enabled locally) and never populates a teacher parameter's ``.grad``.

    Args:
        teacher: frozen HF causal LM (every parameter ``requires_grad=False``; see :func:`freeze`).
        input_ids: (B, T) token ids, T >= 2.
        layer: 0-based decoder block index.
        grad: compute ``g`` and the loss; False stops the forward pass at the block (activation labels).

    Returns:
        :class:`TeacherPass` with hidden (B, T, d), grad (B, T, d) or None, loss or None.
    """
    blocks = teacher_blocks(teacher)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range for a teacher with {len(blocks)} blocks")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (B, T) with T >= 2, got shape {tuple(input_ids.shape)}")
    if any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("teacher parameters require grad; freeze the teacher first (attribution.freeze)")
    ids = input_ids.to(next(teacher.parameters()).device)
    store: list[torch.Tensor] = []
    if not grad:
        with torch.no_grad(), _splice(blocks[layer], store, leaf=False, stop=True), \
                contextlib.suppress(_StopForward):
            backbone(teacher)(input_ids=ids, use_cache=False)
        return TeacherPass(hidden=store[0], grad=None, loss=None)
    with torch.enable_grad(), _splice(blocks[layer], store, leaf=True, stop=False):
        loss_sum, n = causal_lm_loss_sum(teacher, ids, ids)
        loss = loss_sum / n  # mean over B*(T-1), as the reference
        (g,) = torch.autograd.grad(loss, store[0])
    return TeacherPass(hidden=store[0].detach(), grad=g.detach(), loss=loss.detach())


# ----------------------------------------------------------------------------------------------------- SAE side

def decoder_scale(sae: nn.Module, sigma: torch.Tensor) -> torch.Tensor:
    """Per-token factor ``d h_hat / d x_hat`` from the SAE's normalized space back to the residual: ``sigma + eps``
    (the inverse of ``x = (h - mu) / (sigma + eps)``), ones when the SAE does not normalize its input.

    Args:
        sigma: (..., 1) scale returned by ``sae.normalize``.

    Returns:
        (...,) positive factors.
    """
    s = sigma.squeeze(-1)
    if not getattr(sae, "normalize_input", True):
        return torch.ones_like(s)
    return s + float(getattr(sae, "eps", 0.0))


def _compute_dtype(sae: nn.Module) -> torch.dtype:
    """Scores are computed in fp32 (fp64 for a fp64 SAE), whatever the teacher's precision."""
    return torch.promote_types(sae.W_dec.dtype, torch.float32)


def _chunk_rows(n_rows: int, per_row: int, chunk_tokens: int) -> int:
    return chunk_tokens if chunk_tokens > 0 else max(1, min(n_rows, _CHUNK_ELEMENTS // max(1, per_row)))


def post_attribution(sae: nn.Module, grad: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, *,
                     chunk_tokens: int = 0) -> torch.Tensor:
    """Reference-code attribution ``A = c * <g, W_dec[j]>`` of the active latents, from gathered decoder rows.

    Args:
        grad: (N, d) loss gradient at the residual.
        values: (N, k) post-TopK activations; indices: (N, k) their latent indices.
        chunk_tokens: rows per gather (0 = automatic, temporaries of at most 2^24 elements).

    Returns:
        (N, k) float32 scores (fp64 for a fp64 SAE), aligned with ``indices``.
    """
    dt = _compute_dtype(sae)
    w_dec = sae.W_dec.detach().to(dt)
    g = grad.to(dt)
    out = torch.empty(values.shape, dtype=dt, device=values.device)
    step = _chunk_rows(len(g), indices.shape[-1] * w_dec.shape[1], chunk_tokens)
    for s in range(0, len(g), step):
        rows = w_dec[indices[s:s + step]]  # (n, k, d)
        proj = torch.bmm(rows, g[s:s + step, :, None]).squeeze(-1)  # (n, k)
        out[s:s + step] = values[s:s + step].to(dt) * proj
    return out


def dense_attribution(sae: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Paper-Eq.-1 attribution ``A = c_pre * (g @ W_dec^T)`` over all latents for a few rows.

    Args:
        x: (n, d) normalized SAE input; grad: (n, d) loss gradient at the residual.

    Returns:
        (n, n_latents) float32 scores (fp64 for a fp64 SAE).
    """
    dt = _compute_dtype(sae)
    pre = sae.pre_activations(x).to(dt)
    return pre * (grad.to(dt) @ sae.W_dec.detach().to(dt).T)


def _top(scores: torch.Tensor, k_attr: int, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and signed values of the ``k_attr`` best entries of each row."""
    key = scores.abs() if score == "abs" else scores
    pos = key.topk(k_attr, dim=-1).indices
    return pos, scores.gather(-1, pos)


def select_labels(sae: nn.Module, hidden: torch.Tensor, grad: torch.Tensor | None, section: LabelSection
                  ) -> ConceptLabels:
    """Labels from a residual (and its loss gradient): the SAE side of :func:`concept_labels`.

    Args:
        hidden: (B, T, d) residual; grad: (B, T, d) ``dL/dhidden`` (unused, may be None, for activation labels).
        section: label settings (``k_attr``, ``mode``, ``score``, ``selection``, ``include_sigma``,
            ``chunk_tokens``).

    Returns:
        :class:`ConceptLabels` on the SAE's device.
    """
    lead = hidden.shape[:-1]
    dev = sae.W_dec.device
    dt = _compute_dtype(sae)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dev, dt)
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        x, _mu, sigma = sae.normalize(h)
        if section.selection == "activation":
            values, indices = sae.encode(x)
            pos, top = _top(values.to(dt), section.k_attr, "signed")
            labels, mask = indices.gather(-1, pos), (values != 0).any(-1)
        elif grad is None:
            raise ValueError("attribution labels need the loss gradient (grad is None)")
        else:
            g = grad.reshape(h.shape).to(dev, dt)
            if section.include_sigma:
                g = g * decoder_scale(sae, sigma)[:, None]
            if section.mode == "post":
                values, indices = sae.encode(x)
                scores = post_attribution(sae, g, values, indices, chunk_tokens=section.chunk_tokens)
                pos, top = _top(scores, section.k_attr, section.score)
                labels, mask = indices.gather(-1, pos), (scores != 0).any(-1)
            else:
                labels, top, mask = _dense_select(sae, x, g, section)
    shape = (*lead, section.k_attr)
    return ConceptLabels(labels=labels.long().reshape(shape), mask=mask.reshape(lead),
                         scores=top.reshape(shape))


def _dense_select(sae: nn.Module, x: torch.Tensor, g: torch.Tensor, section: LabelSection
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k_attr`` of the dense pre-activation attribution, computed ``chunk`` rows at a time."""
    n_latents = sae.W_dec.shape[0]
    labels = torch.empty(len(x), section.k_attr, dtype=torch.long, device=x.device)
    top = torch.empty(len(x), section.k_attr, dtype=_compute_dtype(sae), device=x.device)
    mask = torch.empty(len(x), dtype=torch.bool, device=x.device)
    step = _chunk_rows(len(x), n_latents, section.chunk_tokens)
    for s in range(0, len(x), step):
        scores = dense_attribution(sae, x[s:s + step], g[s:s + step])
        labels[s:s + step], top[s:s + step] = _top(scores, section.k_attr, section.score)
        mask[s:s + step] = (scores != 0).any(-1)
    return labels, top, mask


def concept_labels(teacher: nn.Module, sae: nn.Module, input_ids: torch.Tensor, *, layer: int,
                   section: LabelSection | None = None) -> ConceptLabels:
    """CoCoMix concept labels of token windows (see the module docstring for the formulas).

    Args:
        teacher: frozen HF causal LM (:func:`freeze`); sae: TopK SAE trained on its residual after block ``layer``.
        input_ids: (B, T) token ids (fixed windows, no padding).
        layer: 0-based teacher block whose output the SAE reads.
        section: label settings (default :class:`LabelSection`).

    Returns:
        :class:`ConceptLabels`: labels (B, T, k_attr) int64, mask (B, T) bool, scores (B, T, k_attr) float32.
    """
    section = section or LabelSection()
    _check_k_attr(sae, section)
    tp = teacher_pass(teacher, input_ids, layer, grad=section.selection == "attribution")
    return select_labels(sae, tp.hidden, tp.grad, section)


def _check_k_attr(sae: nn.Module, section: LabelSection) -> None:
    """A one-line :class:`ConfigError` (a ``ValueError``) naming ``labels.k_attr`` when a token cannot get
    ``k_attr`` labels from ``sae`` (its ``k`` active latents; all latents for dense pre-activation attribution)."""
    k = int(sae.k)
    n_latents = sae.W_dec.shape[0]
    limit = n_latents if (section.mode == "pre" and section.selection == "attribution") else k
    if section.k_attr > limit:
        raise ConfigError(f"k_attr={section.k_attr} exceeds the {limit} candidate latents (SAE k={k}, "
                          f"n_latents={n_latents}, mode={section.mode}, selection={section.selection})",
                          field="labels.k_attr")


class ConceptLabeler(nn.Module):
    """A frozen teacher + SAE + layer + settings as one frozen module (e.g. a student unit's ``labeler``).

    ``labeler(input_ids) -> (labels (B, T, k_attr) int64, mask (B, T) bool)``; :meth:`labels` also returns the
    scores. The teacher and the SAE are frozen on construction (no parameter requires grad, eval mode) and move
    with the module (``.to(device)``); gradients are enabled locally, so it works inside ``no_grad``.
    """

    def __init__(self, teacher: nn.Module, sae: nn.Module, layer: int, section: LabelSection | None = None):
        super().__init__()
        self.teacher, self.sae, self.layer = freeze(teacher), freeze(sae), layer
        self.section = section or LabelSection()
        self.section.validate()
        _check_k_attr(self.sae, self.section)

    @property
    def n_latents(self) -> int:
        return int(self.sae.W_dec.shape[0])

    def train(self, mode: bool = True) -> ConceptLabeler:
        """Stays in eval mode (a frozen teacher never runs dropout)."""
        return super().train(False)

    def labels(self, input_ids: torch.Tensor) -> ConceptLabels:
        """Labels, masks and scores of (B, T) windows; see :func:`concept_labels`."""
        return concept_labels(self.teacher, self.sae, input_ids, layer=self.layer, section=self.section)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels (B, T, k_attr) int64, mask (B, T) bool)`` of (B, T) windows."""
        out = self.labels(input_ids)
        return out.labels, out.mask

    def describe(self) -> dict[str, Any]:
        """Settings that determine the labels: the section's plus layer and latent count."""
        return {**self.section.describe(), "layer": self.layer, "n_latents": self.n_latents}
