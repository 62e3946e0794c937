"""Collation of LLM-JEPA examples for the two execution modes, and the 4-D tree-attention mask.

``separate`` mode (reference layout, dynamic padding): three independent padded batches — LM sequences, Text views,
Code views — each padded to its own longest row.

``packed`` mode: ONE row per example, ``[LM sequence F | Text remainder R_T | Code block C]`` (a tree-attention
layout of ours; the paper's reference code runs the views as extra padded batch rows):

* F (segment 0): plain causal attention, positions 0 … n−1.
* R_T (segment 1) = ``text_ids[p : text_enc + 1]``, the Text tokens after the prefix of p tokens it shares with F
  (e.g. just the k predictors when Text is a prefix of F): attends to F[0:p) and causally to itself, positions
  p … p+|R_T|−1. When R_T is empty (k = 0 and Text a prefix of F), Enc(Text) is read from F's own hidden state.
* C (segment 2) = ``code_ids[q : code_enc + 1]``, the Code tokens after the prefix of q tokens it shares with F
  (q = ``code_prefix_len``: 0 unless the Code view starts with the LM sequence's system turn, see
  :mod:`conceptlm.jepa.views`): attends to F[0:q) and causally to itself, positions q … q+|C|−1. When C is empty,
  Enc(Code) is read from F's own hidden state.
* No F token attends to a branch; padding (segment −1) attends only to itself, so no query row is fully masked
  (no NaN under eager attention).
* Sliding-window attention (Mistral, Phi-3, Qwen2 with ``use_sliding_window``, Gemma-2's sliding layers): a key
  is also dropped when its position is ``window`` or more below the query's, which is exactly the window the model
  applies to each separate sequence (positions there are token indices).

By causality, every hidden state equals the one of the separate passes (same tokens, same key sets, same
positions), so the LM loss, both Enc vectors and all gradients match to rounding. Tokens after a view's Enc index are
dropped in packed mode (they cannot influence it).

Collation produces compact per-token tensors (segment ids, positions); :func:`tree_attention_mask` expands them
into the (B, 1, T, T) additive mask on the device, vectorised; :func:`tree_block_mask` gives the same mask as a
FlexAttention ``BlockMask`` (no dense T × T tensor; fully masked blocks skipped) for ``flex_attention`` models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from conceptlm.data.chat import IGNORE_INDEX
from conceptlm.jepa.views import JepaExample

__all__ = [
    "PAD_SEGMENT",
    "LM_SEGMENT",
    "TEXT_SEGMENT",
    "CODE_SEGMENT",
    "PaddedSequences",
    "SeparateBatch",
    "PackedBatch",
    "pad_sequences",
    "collate_separate",
    "collate_packed",
    "tree_attention_mask",
    "tree_block_mask",
    "VIEW_SETTINGS",
]

PAD_SEGMENT, LM_SEGMENT, TEXT_SEGMENT, CODE_SEGMENT = -1, 0, 1, 2

VIEW_SETTINGS = ("num_predictors", "predictor_position", "text_view", "code_view")
"""The :class:`~conceptlm.jepa.config.ViewConfig` fields a batch records in ``view_settings`` (with ``pred_is_text``
for the direction), so that a trainer can check them against its own settings."""


class _ToDevice:
    """Mixin: ``.to(device)`` moves every tensor field (recursively) and returns a new object."""

    def to(self, device: torch.device | str):
        values = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            values[f.name] = v.to(device) if isinstance(v, (torch.Tensor, _ToDevice)) else v
        return type(self)(**values)


@dataclass
class PaddedSequences(_ToDevice):
    """A padded batch of independent sequences.

    Attributes:
        input_ids: (B, T) long, padded with the pad id.
        attention_mask: (B, T) long, 1 on real tokens.
        position_ids: (B, T) long, 0 … len−1 on real tokens (whatever the padding side), 0 on padding.
        labels: (B, T) long unshifted labels, -100 on padding and non-targets (all -100 for views).
        enc_index: (B,) long column of each row's Enc token (-1 when not a view batch).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    enc_index: torch.Tensor

    @property
    def slots(self) -> int:
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_targets(self) -> int:
        """Shifted LM targets (labels[:, 1:] != -100)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class SeparateBatch(_ToDevice):
    """Separate-mode batch: LM, Text and Code as three padded batches (same example order).

    Attributes:
        lm, text, code: :class:`PaddedSequences`; ``text.enc_index`` / ``code.enc_index`` are padded columns.
        pred_is_text: True for text→code (Text carries the predictors).
        view_settings: the view settings the examples were built with (``VIEW_SETTINGS`` keys; those unknown —
            examples built by hand — are absent).
    """

    lm: PaddedSequences
    text: PaddedSequences
    code: PaddedSequences
    pred_is_text: bool = True
    view_settings: dict = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return self.lm.input_ids.shape[0]

    @property
    def num_lm_targets(self) -> int:
        return self.lm.num_targets

    @property
    def slots(self) -> int:
        """Token slots processed by a JEPA step (all three forwards)."""
        return self.lm.slots + self.text.slots + self.code.slots

    @property
    def real_tokens(self) -> int:
        return self.lm.real_tokens + self.text.real_tokens + self.code.real_tokens


@dataclass
class PackedBatch(_ToDevice):
    """Packed-mode batch: one row per example ``[F | R_T | C]`` plus the LM-only batch for skipped-JEPA steps.

    Attributes:
        input_ids: (B, T) long.
        position_ids: (B, T) long (per-segment positions, see module doc).
        segment_ids: (B, T) long: -1 pad, 0 LM, 1 Text remainder, 2 Code.
        branch_len: (B,) long, p = LM tokens the Text remainder attends to (``text_prefix_len``).
        code_branch_len: (B,) long, q = LM tokens the Code block attends to (``code_prefix_len``).
        targets: (B, T) long SHIFTED LM targets: at an LM slot holding token t, the label of token t+1
            (-100 elsewhere and at the last LM token).
        text_index, code_index: (B,) long columns of Enc(Text) and Enc(Code).
        lm: the LM sequences alone (2-D mask), used when the JEPA branch is skipped.
        pred_is_text: True for text→code.
        view_settings: as in :class:`SeparateBatch`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    branch_len: torch.Tensor
    code_branch_len: torch.Tensor
    targets: torch.Tensor
    text_index: torch.Tensor
    code_index: torch.Tensor
    lm: PaddedSequences
    pred_is_text: bool = True
    view_settings: dict = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_lm_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def slots(self) -> int:
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids != PAD_SEGMENT).sum())


def _padded_len(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _check_common(examples: Sequence[JepaExample], pad_token_id: int | None, padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; give the tokenizer a pad token")
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if len({ex.pred_is_text for ex in examples}) != 1:
        raise ValueError("all examples of a batch must have the same direction (pred_is_text)")


def _view_settings(examples: Sequence[JepaExample]) -> dict:
    """The view settings shared by the examples (unknown ones left out); mixed settings are an error."""
    out = {}
    for name in VIEW_SETTINGS:
        values = {getattr(ex, name) for ex in examples} - {None}
        if len(values) > 1:
            raise ValueError(f"the examples of one batch were built with different {name} ({sorted(values)}); "
                             "build all views with one ViewConfig")
        if values:
            out[name] = values.pop()
    return out


def pad_sequences(seqs: Sequence[Sequence[int]], *, pad_token_id: int, padding_side: str = "right",
                  labels: Sequence[Sequence[int]] | None = None, enc: Sequence[int] | None = None,
                  pad_to_multiple_of: int | None = None) -> PaddedSequences:
    """Pad token sequences to the longest one (dynamic padding).

    Args:
        seqs: B token-id sequences.
        pad_token_id: id written into padded slots.
        padding_side: "right" or "left"; position ids count real tokens from 0 either way.
        labels: optional unshifted labels per sequence (default all -100).
        enc: optional Enc index per sequence (in unpadded coordinates); returned as padded columns.
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        :class:`PaddedSequences`.
    """
    b = len(seqs)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if int(lengths.min()) == 0:
        raise ValueError("cannot pad an empty sequence")
    t = _padded_len(int(lengths.max()), pad_to_multiple_of)
    flat = torch.tensor([x for s in seqs for x in s], dtype=torch.long)
    flat_labels = (torch.tensor([x for s in labels for x in s], dtype=torch.long) if labels is not None
                   else torch.full_like(flat, IGNORE_INDEX))
    if flat_labels.shape != flat.shape:
        raise ValueError("labels must have the same lengths as the sequences")
    cols = torch.arange(t)
    start = (t - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    real = (cols[None, :] >= start[:, None]) & (cols[None, :] < (start + lengths)[:, None])  # (B, T)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    out_labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    input_ids[real] = flat  # row-major boolean assignment keeps each row's token order
    out_labels[real] = flat_labels
    position_ids = torch.where(real, cols[None, :] - start[:, None], torch.zeros_like(input_ids))
    enc_index = (torch.tensor(list(enc), dtype=torch.long) + start if enc is not None
                 else torch.full((b,), -1, dtype=torch.long))
    return PaddedSequences(input_ids=input_ids, attention_mask=real.long(), position_ids=position_ids,
                           labels=out_labels, enc_index=enc_index)


def collate_separate(examples: Sequence[JepaExample], *, pad_token_id: int, padding_side: str = "right",
                     pad_to_multiple_of: int | None = None) -> SeparateBatch:
    """Collate for separate mode: LM / Text / Code each padded to its own longest sequence.

    Args:
        examples: B :class:`JepaExample` (same direction).
        pad_token_id: pad id.
        padding_side: "right" or "left".
        pad_to_multiple_of: optional rounding of each padded length.

    Returns:
        :class:`SeparateBatch` (CPU tensors; call ``.to(device)``).
    """
    _check_common(examples, pad_token_id, padding_side)
    kw = dict(pad_token_id=pad_token_id, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of)
    lm = pad_sequences([ex.lm_ids for ex in examples], labels=[ex.lm_labels for ex in examples], **kw)
    text = pad_sequences([ex.text_ids for ex in examples], enc=[ex.text_enc for ex in examples], **kw)
    code = pad_sequences([ex.code_ids for ex in examples], enc=[ex.code_enc for ex in examples], **kw)
    return SeparateBatch(lm=lm, text=text, code=code, pred_is_text=examples[0].pred_is_text,
                         view_settings=_view_settings(examples))


def collate_packed(examples: Sequence[JepaExample], *, pad_token_id: int, padding_side: str = "right",
                   pad_to_multiple_of: int | None = None) -> PackedBatch:
    """Collate for packed mode: one ``[F | R_T | C]`` row per example, padded to the longest row.

    Args:
        examples: B :class:`JepaExample` (same direction).
        pad_token_id: pad id.
        padding_side: "right" or "left" (padding goes before F or after C; both give identical results).
        pad_to_multiple_of: optional rounding of the padded length.

    Returns:
        :class:`PackedBatch` (CPU tensors; the 4-D mask is built on the device by :func:`tree_attention_mask`).
    """
    _check_common(examples, pad_token_id, padding_side)
    rows, segs, poss, tgts, tidx, cidx, plen, qlen = [], [], [], [], [], [], [], []
    for ex in examples:
        n, p, q = len(ex.lm_ids), ex.text_prefix_len, ex.code_prefix_len
        if not (0 <= ex.text_enc < len(ex.text_ids) and 0 <= ex.code_enc < len(ex.code_ids)):
            raise ValueError("Enc index outside its view")
        if ex.text_ids[:p] != ex.lm_ids[:p] or p > ex.text_enc + 1:
            raise ValueError(f"text_prefix_len={p} is not a shared prefix of text_ids[:text_enc+1] and lm_ids")
        if q < 0 or ex.code_ids[:q] != ex.lm_ids[:q] or q > ex.code_enc + 1:
            raise ValueError(f"code_prefix_len={q} is not a shared prefix of code_ids[:code_enc+1] and lm_ids")
        r_t = ex.text_ids[p: ex.text_enc + 1]
        code = ex.code_ids[q: ex.code_enc + 1]
        r, c = len(r_t), len(code)
        rows.append(list(ex.lm_ids) + list(r_t) + list(code))
        segs.append([LM_SEGMENT] * n + [TEXT_SEGMENT] * r + [CODE_SEGMENT] * c)
        poss.append(list(range(n)) + list(range(p, p + r)) + list(range(q, q + c)))
        tgts.append(list(ex.lm_labels[1:]) + [IGNORE_INDEX] * (1 + r + c))
        tidx.append(ex.text_enc if r == 0 else n + r - 1)
        cidx.append(ex.code_enc if c == 0 else n + r + c - 1)
        plen.append(p)
        qlen.append(q)
    kw = dict(pad_token_id=pad_token_id, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of)
    packed = pad_sequences(rows, labels=tgts, enc=tidx, **kw)
    shift = packed.enc_index - torch.tensor(tidx, dtype=torch.long)  # left-padding offset per row
    real = packed.attention_mask.bool()
    segment_ids = torch.full_like(packed.input_ids, PAD_SEGMENT)
    segment_ids[real] = torch.tensor([s for row in segs for s in row], dtype=torch.long)
    position_ids = torch.zeros_like(packed.input_ids)
    position_ids[real] = torch.tensor([q for row in poss for q in row], dtype=torch.long)
    lm = pad_sequences([ex.lm_ids for ex in examples], labels=[ex.lm_labels for ex in examples], **kw)
    return PackedBatch(input_ids=packed.input_ids, position_ids=position_ids, segment_ids=segment_ids,
                       branch_len=torch.tensor(plen, dtype=torch.long),
                       code_branch_len=torch.tensor(qlen, dtype=torch.long), targets=packed.labels,
                       text_index=packed.enc_index, code_index=torch.tensor(cidx, dtype=torch.long) + shift, lm=lm,
                       pred_is_text=examples[0].pred_is_text, view_settings=_view_settings(examples))


def _tree_allowed(seg_q, seg_k, pos_q, pos_k, causal, diagonal, p, q, window: int | None):
    """The tree-mask predicate on broadcastable tensors (query side ``_q``, key side ``_k``): shared by the dense
    mask (whole (B, T, T) grids) and the FlexAttention ``mask_mod`` (one query/key pair at a time)."""
    same = (seg_q == seg_k) & (seg_q != PAD_SEGMENT) & causal
    from_lm = seg_k == LM_SEGMENT
    branch = ((seg_q == TEXT_SEGMENT) & from_lm & (pos_k < p)) | ((seg_q == CODE_SEGMENT) & from_lm & (pos_k < q))
    if window is not None:
        near = pos_q - pos_k < window
        same, branch = same & near, branch & near
    return same | branch | diagonal


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")


def tree_attention_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor, branch_len: torch.Tensor,
                        dtype: torch.dtype = torch.float32, *, code_branch_len: torch.Tensor | None = None,
                        sliding_window: int | None = None) -> torch.Tensor:
    """4-D additive attention mask of packed rows ``[F | R_T | C]`` (vectorised, no loops).

    Query i may attend key j iff
      * same non-pad segment and j ≤ i (causal within F, within R_T, within C), or
      * i ∈ R_T, j ∈ F and pos(j) < p (the shared Text prefix), or
      * i ∈ C, j ∈ F and pos(j) < q (the shared Code prefix), or
      * i = j (a padding token attends to itself only, so no row is fully masked);
    and, with a sliding window w, pos(i) − pos(j) < w (what HF's sliding-window mask keeps of each separate
    sequence, whose positions are its token indices).

    Args:
        segment_ids: (B, T) long, -1 pad / 0 LM / 1 Text remainder / 2 Code.
        position_ids: (B, T) long per-segment positions.
        branch_len: (B,) long, p per row.
        dtype: float dtype of the mask (the model's compute dtype).
        code_branch_len: (B,) long, q per row (default 0: the Code block sees no LM token).
        sliding_window: w ≥ 1, or None for full causal attention.

    Returns:
        (B, 1, T, T) tensor: 0 where attention is allowed, ``torch.finfo(dtype).min`` where blocked.
    """
    _check_window(sliding_window)
    dev = segment_ids.device
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=dev)
    q = torch.zeros_like(branch_len) if code_branch_len is None else code_branch_len.to(dev)
    allowed = _tree_allowed(segment_ids[:, :, None], segment_ids[:, None, :], position_ids[:, :, None],
                            position_ids[:, None, :], idx[:, None] >= idx[None, :], idx[:, None] == idx[None, :],
                            branch_len.to(dev)[:, None, None], q[:, None, None], sliding_window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def tree_block_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor, branch_len: torch.Tensor, *,
                    code_branch_len: torch.Tensor | None = None, sliding_window: int | None = None):
    """The tree mask of :func:`tree_attention_mask` as a FlexAttention ``BlockMask`` (for models loaded with
    ``attn_implementation="flex_attention"``): the same predicate, evaluated per (query, key) pair by a
    ``mask_mod``, so no (B, 1, T, T) tensor is materialised and fully masked blocks are skipped by the kernel.

    Same arguments as :func:`tree_attention_mask` (no dtype: a block mask is boolean). Returns a ``BlockMask`` of
    shape (B, 1, T, T) on the device of ``segment_ids``.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    _check_window(sliding_window)
    dev = segment_ids.device
    b, t = segment_ids.shape
    p = branch_len.to(dev)
    q = torch.zeros_like(p) if code_branch_len is None else code_branch_len.to(dev)

    def mask_mod(bi, _h, qi, ki):
        return _tree_allowed(segment_ids[bi, qi], segment_ids[bi, ki], position_ids[bi, qi], position_ids[bi, ki],
                             qi >= ki, qi == ki, p[bi], q[bi], sliding_window)

    return create_block_mask(mask_mod, b, None, t, t, device=dev)
