"""Run an LLM-JEPA batch in either execution mode and return the pieces of the objective.

Both modes return the same :class:`JepaForwardOutput` — LM loss sum and target count, Enc(Text) and Enc(Code) —
equal to rounding (tested to 1e-5 in fp32, gradients included):

* :class:`~conceptlm.jepa.packing.SeparateBatch`: three forwards (LM rows through
  :func:`conceptlm.core.hf.causal_lm_loss_sum`, Text rows and Code rows through
  :func:`conceptlm.core.hf.hidden_states`), 2-D padding masks.
* :class:`~conceptlm.jepa.packing.PackedBatch`: one forward over ``[F | R_T | C]`` rows with the 4-D tree mask.
  A 4-D mask replaces the model's own masking, so the model's sliding window is applied inside the tree mask
  (:func:`attention_windows`): one mask when every layer has the same window, else a ``{layer_type: mask}``
  mapping for hybrid full/sliding models (Gemma-2, Qwen2 with ``max_window_layers``). A model loaded with
  ``attn_implementation="flex_attention"`` gets the same masks as FlexAttention block masks instead: no dense
  T × T tensor, and the fused kernel skips fully masked blocks (the CUDA path for long sequences; PyTorch has no
  CPU backward for FlexAttention, so CPU training keeps the dense mask).

With ``jepa_active=False`` (JEPA-loss dropout, a skipped step) both modes run only the plain LM forward on the LM
rows with a 2-D mask — exactly the SFT computation.

Enc is the final normed hidden state (the LM head's input) at the view's Enc index (LLM-JEPA paper §3, Eq. 3; the
reference reads ``hidden_states[-1]``, which is that state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conceptlm.core.hf import causal_lm_loss_sum, hidden_states, logits_at
from conceptlm.data.chat import IGNORE_INDEX
from conceptlm.jepa.losses import jepa_distance
from conceptlm.jepa.packing import PackedBatch, PaddedSequences, SeparateBatch, tree_attention_mask, tree_block_mask

__all__ = ["JepaForwardOutput", "attention_windows", "uses_flex_attention", "run_jepa_batch", "jepa_objective"]


@dataclass
class JepaForwardOutput:
    """What one JEPA forward produces.

    Attributes:
        lm_loss_sum: fp32 scalar, summed next-token CE over the LM targets.
        n_lm_targets: int64 scalar, number of LM targets.
        enc_text: (B, D) Enc of the Text view (Pred(Enc(Text)) when Text carries the predictors); None if skipped.
        enc_code: (B, D) Enc of the Code view; None if skipped.
        pred_is_text: True for text→code.
        slots: token slots processed (B × T summed over the forwards run).
        real_tokens: non-padding tokens among them.
    """

    lm_loss_sum: torch.Tensor
    n_lm_targets: torch.Tensor
    enc_text: torch.Tensor | None
    enc_code: torch.Tensor | None
    pred_is_text: bool
    slots: int
    real_tokens: int

    @property
    def jepa_active(self) -> bool:
        return self.enc_text is not None

    @property
    def pred(self) -> torch.Tensor | None:
        """(B, D) the predicting view's embedding (Text for text→code)."""
        return self.enc_text if self.pred_is_text else self.enc_code

    @property
    def target(self) -> torch.Tensor | None:
        """(B, D) the predicted view's embedding (Code for text→code)."""
        return self.enc_code if self.pred_is_text else self.enc_text


_WINDOWED_LAYER_TYPES = {"full_attention": False, "sliding_attention": True}


def attention_windows(model) -> dict[str | None, int | None]:
    """The sliding window of each attention layer type of ``model``, as its HF implementation applies it.

    * a config with ``layer_types`` (Gemma-2, Qwen2, …): ``full_attention`` → None, ``sliding_attention`` →
      ``config.sliding_window``;
    * a config without them (Mistral, Phi-3, Starcoder2, …): every layer uses ``config.sliding_window`` when it is
      set (and ``use_sliding_window`` is not False), under the key None;
    * no window at all (Llama, GPT-2, OLMo-2): ``{None: None}``.

    Raises:
        ValueError: a layer type the tree mask cannot express (chunked or linear attention, …).
    """
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if not layer_types:
        return {None: window or None}
    unknown = sorted(set(layer_types) - set(_WINDOWED_LAYER_TYPES))
    if unknown:
        raise ValueError(f"packed mode cannot express attention layer type(s) {unknown} of "
                         f"{type(cfg).__name__} in its tree mask; use jepa.mode=separate for this model")
    return {t: (window or None) if _WINDOWED_LAYER_TYPES[t] else None for t in sorted(set(layer_types))}


def uses_flex_attention(model) -> bool:
    """True when ``model`` (or the model a PEFT wrapper holds) runs HF's ``flex_attention`` implementation."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "flex_attention"


def _packed_mask(model, batch: PackedBatch):
    """The tree mask with the model's sliding window(s): one mask, or one per layer type. A (B, 1, T, T) additive
    tensor, or a FlexAttention ``BlockMask`` for a ``flex_attention`` model (same predicate, nothing dense)."""
    longest = int(batch.position_ids.max()) + 1
    windows = {t: (w if w is not None and w < longest else None)  # a window no view reaches changes nothing
               for t, w in attention_windows(model).items()}
    dtype = _model_dtype(model)
    flex = uses_flex_attention(model)
    if flex and torch.is_grad_enabled() and batch.segment_ids.device.type == "cpu":
        raise ValueError("flex_attention has no CPU backward in PyTorch: train packed mode on CPU with "
                         "model.attn_implementation sdpa or eager (flex_attention runs CPU inference only)")

    def build(window: int | None):
        if flex:
            return tree_block_mask(batch.segment_ids, batch.position_ids, batch.branch_len,
                                   code_branch_len=batch.code_branch_len, sliding_window=window)
        return tree_attention_mask(batch.segment_ids, batch.position_ids, batch.branch_len, dtype,
                                   code_branch_len=batch.code_branch_len, sliding_window=window)

    distinct = set(windows.values())
    if len(distinct) == 1:
        return build(distinct.pop())
    masks = {w: build(w) for w in distinct}
    return {t: masks[w] for t, w in windows.items()}


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _lm_only(model, lm: PaddedSequences, pred_is_text: bool) -> JepaForwardOutput:
    loss, n = causal_lm_loss_sum(model, lm.input_ids, lm.labels, lm.attention_mask, lm.position_ids)
    return JepaForwardOutput(loss, n, None, None, pred_is_text, lm.slots, lm.real_tokens)


def _enc(model, view: PaddedSequences) -> torch.Tensor:
    hid = hidden_states(model, view.input_ids, view.attention_mask, view.position_ids)
    return hid[torch.arange(hid.shape[0], device=hid.device), view.enc_index.to(hid.device)]


def _run_separate(model, batch: SeparateBatch) -> JepaForwardOutput:
    loss, n = causal_lm_loss_sum(model, batch.lm.input_ids, batch.lm.labels, batch.lm.attention_mask,
                                 batch.lm.position_ids)
    return JepaForwardOutput(loss, n, _enc(model, batch.text), _enc(model, batch.code), batch.pred_is_text,
                             batch.slots, batch.real_tokens)


def _run_packed(model, batch: PackedBatch) -> JepaForwardOutput:
    hid = hidden_states(model, batch.input_ids, _packed_mask(model, batch), batch.position_ids)
    targets = batch.targets.to(hid.device)
    keep = targets != IGNORE_INDEX
    logits = logits_at(model, hid[keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    rows = torch.arange(hid.shape[0], device=hid.device)
    enc_text = hid[rows, batch.text_index.to(hid.device)]
    enc_code = hid[rows, batch.code_index.to(hid.device)]
    return JepaForwardOutput(loss, keep.sum(), enc_text, enc_code, batch.pred_is_text, batch.slots,
                             batch.real_tokens)


def run_jepa_batch(model, batch: SeparateBatch | PackedBatch, *, jepa_active: bool = True) -> JepaForwardOutput:
    """Forward a collated batch in its mode.

    Args:
        model: HF causal LM or PeftModel (in any train/eval mode; dropout makes the modes differ only by RNG).
        batch: from :func:`~conceptlm.jepa.packing.collate_separate` (separate mode) or
            :func:`~conceptlm.jepa.packing.collate_packed` (packed mode), already on the model's device.
        jepa_active: False = skip the JEPA views and run the plain LM forward only (2-D mask).

    Returns:
        :class:`JepaForwardOutput`; ``enc_text``/``enc_code`` are (B, D) in the model's dtype, or None when
        ``jepa_active`` is False.
    """
    if not jepa_active:
        return _lm_only(model, batch.lm, batch.pred_is_text)
    if isinstance(batch, SeparateBatch):
        return _run_separate(model, batch)
    if isinstance(batch, PackedBatch):
        return _run_packed(model, batch)
    raise TypeError(f"expected a SeparateBatch or PackedBatch, got {type(batch).__name__}")


def jepa_objective(out: JepaForwardOutput, *, gamma: float = 1.0, lam: float = 1.0, metric: str = "cosine",
                   temperature: float = 0.07, gather_negatives: bool = False) -> dict[str, torch.Tensor]:
    """The LLM-JEPA objective of ONE batch, L = γ·L_LM + λ·mean_i d(Pred(Enc(Text_i)), Enc(Code_i)) (eq. 3).

    The trainer normalises over micro-batches and ranks itself (sum parts, divide by global counts); this helper is
    for single-batch use (tests, evaluation).

    Args:
        out: from :func:`run_jepa_batch`.
        gamma, lam: weights γ and λ.
        metric, temperature, gather_negatives: see :func:`conceptlm.jepa.losses.jepa_distance`.

    Returns:
        ``{"loss": total, "lm": L_LM (token mean), "jepa": mean distance (0 when skipped), "jepa_sum": sum of
        per-example distances (0 when skipped)}``.
    """
    lm = out.lm_loss_sum / out.n_lm_targets.clamp(min=1)
    if out.jepa_active:
        d = jepa_distance(out.pred, out.target, metric, temperature=temperature, gather_negatives=gather_negatives)
        jepa_sum, jepa = d.sum(), d.mean()
    else:
        jepa_sum = jepa = torch.zeros((), device=lm.device)
    return {"loss": gamma * lm + lam * jepa, "lm": lm, "jepa": jepa, "jepa_sum": jepa_sum}
