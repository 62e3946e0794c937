"""The interleaved One-Tower / Quant-LCM layout: order, positions and the exact mask structure."""

from __future__ import annotations

import torch

from conceptlm.lcm.interleave import interleave, interleaved_attention_mask, interleaved_positions


def test_interleave_puts_queries_at_even_positions():
    q, c = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[10.0], [20.0]]])
    assert interleave(q, c).squeeze(-1).tolist() == [[1.0, 10.0, 2.0, 20.0]]
    assert interleaved_positions(torch.tensor([[0, 1, 2]])).tolist() == [[0, 0, 1, 1, 2, 2]]


def test_mask_has_exactly_the_papers_structure():
    m = interleaved_attention_mask(3)[0, 0].int().tolist()
    #         q0 x0 q1 x1 q2 x2
    assert m == [[1, 0, 0, 0, 0, 0],   # q0: itself only (first sentence is unconditional)
                 [0, 1, 0, 0, 0, 0],   # x0: itself
                 [0, 1, 1, 0, 0, 0],   # q1: x0 and itself
                 [0, 1, 0, 1, 0, 0],   # x1: x0, x1
                 [0, 1, 0, 1, 1, 0],   # q2: x0, x1, itself
                 [0, 1, 0, 1, 0, 1]]   # x2: x0, x1, x2


def test_dropped_queries_see_only_themselves_and_padding_is_never_attended():
    drop = torch.tensor([[False, False, True], [False, True, False]])
    m = interleaved_attention_mask(3, drop=drop)
    assert m[0, 0, 4].int().tolist() == [0, 0, 0, 0, 1, 0]
    assert m[0, 0, 2].int().tolist() == [0, 1, 1, 0, 0, 0]  # not dropped in document 0
    assert m[1, 0, 2].int().tolist() == [0, 0, 1, 0, 0, 0]
    assert torch.equal(m[0, 0, 5], interleaved_attention_mask(3)[0, 0, 5])  # clean rows unchanged by drops
    keep = torch.tensor([[True, True, False]])
    mk = interleaved_attention_mask(3, keep=keep)
    assert mk[0, 0, :4, 4:].sum() == 0 and mk[0, 0, 4, 4] and mk[0, 0, 5, 5] and mk[0, 0, 5, :5].sum() == 2
