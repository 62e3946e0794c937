"""The CoCoMix cost model against values worked out by hand for tiny shapes (d = 4, 2 layers, vocabulary 10)."""

from __future__ import annotations

import pytest

from conceptlm.cocomix.config import CocomixSection, LabelSection, StudentSection
from conceptlm.cocomix.costs import (
    arm_costs,
    count_parameters,
    flops_per_token,
    label_flops_per_token,
    owed_flops_per_token,
    sae_train_flops,
    teacher_flops_to_layer,
    teacher_forward_flops,
    train_flops,
)
from conceptlm.cocomix.model import StudentLM
from conceptlm.core.hf import build_tiny_model

D, LAYERS, V, C, K = 4, 2, 10, 6, 2


def _student(**kw) -> StudentSection:
    return StudentSection(**{**dict(style="gpt2", vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=1, max_len=8,
                                    n_concepts=C, concept_k=K, insert_layer=1), **kw})


def test_student_parameters_by_hand():
    # block matmuls: q, k, v, o 4·d² = 64; MLP d -> 4d -> d: 2·4·16 = 128 -> 192; plus biases (4d + 4d + d = 16 + 16
    # + 4) and two LayerNorms (4d = 16): 244 per block. Base: tied embedding V·d = 40, 2 blocks 488, final LN 2d =
    # 8, positions max_len·d = 32 -> 568. Concept head: predictor C·d + C = 30, pre_bias d = 4 (active and total);
    # compression: all C·d = 24 columns + bias d stored, only K·d = 8 + bias 4 active.
    s = _student()
    assert count_parameters(s) == {"base": 568, "total": 568 + 34 + 28, "active": 568 + 34 + 12}
    assert count_parameters(s)["total"] == sum(p.numel() for p in StudentLM(s).parameters())
    ntp = _student(mix="none", concept_head=False)
    assert count_parameters(ntp) == {"base": 568, "total": 568, "active": 568}


def test_student_flops_by_hand():
    # T = 3, insert_layer 1, interleave: block 0 sees 3 slots: 192 MACs + attention d·(S+1) = 4·4 = 16 -> 208;
    # block 1 sees 2 slots per token in a 6-slot sequence: 2·(192 + 4·7) = 440. Head: predictor C·d = 24 +
    # compression K·d = 8; LM head V·d = 40. Training: x 2 FLOPs x 3 (forward + two backward matmuls).
    out = flops_per_token(_student(), 3)
    assert out == {"blocks": 6 * (208 + 440), "concept_head": 6 * 32, "lm_head": 6 * 40,
                   "total": 6 * (208 + 440 + 32 + 40)}
    assert flops_per_token(_student(), 3, training=False)["total"] == 2 * (208 + 440 + 32 + 40)
    # NTP: both blocks see 3 slots, no head
    ntp = flops_per_token(_student(mix="none", concept_head=False), 3, training=False)
    assert ntp == {"blocks": 2 * 2 * 208, "concept_head": 0.0, "lm_head": 2 * 40, "total": 2 * (2 * 208 + 40)}


@pytest.mark.parametrize("arch, block", [("llama", 4 * 16 + 3 * 4 * 8),  # q, k, v, o + gate, up, down
                                         ("gpt2", 3 * 16 + 16 + 2 * 4 * 8)])  # c_attn, c_proj + c_fc, mlp c_proj
def test_teacher_and_label_flops_by_hand(arch, block):
    teacher = build_tiny_model(arch, V, hidden_size=D, num_layers=LAYERS, num_heads=1, intermediate_size=8, seed=0)
    head = V * D  # the tied LM head still multiplies every position by the (V, d) matrix
    forward = 2 * (LAYERS * block + head)
    assert teacher_forward_flops(teacher) == forward
    assert teacher_flops_to_layer(teacher, 0) == 2 * block
    assert train_flops(teacher, 10) == 3 * forward * 10
    encoder = 2 * C * D
    above = 2 * (block + head)  # input-gradient backward through block 1 and the head
    assert label_flops_per_token(teacher, 0, n_latents=C, k=K, labels=LabelSection()) == \
        forward + above + encoder + 2 * K * D
    assert label_flops_per_token(teacher, 0, n_latents=C, k=K, labels=LabelSection(mode="pre")) == \
        forward + above + encoder + 2 * C * D
    assert label_flops_per_token(teacher, 0, n_latents=C, k=K, labels=LabelSection(selection="activation")) == \
        2 * block + encoder
    assert sae_train_flops(teacher, 0, n_latents=C, k=K, tokens=10) == (2 * block + 3 * 2 * (C + K) * D) * 10


def test_owed_and_arm_costs_by_hand():
    teacher = build_tiny_model("llama", V, hidden_size=D, num_layers=LAYERS, num_heads=1, intermediate_size=8, seed=0)

    class SAE:
        n_latents, k = C, K

    labels = LabelSection()
    calls = []

    def sae():
        calls.append(1)
        return SAE()

    owed = owed_flops_per_token(_student(), CocomixSection(lam=0.1, kd_weight=0.5), teacher=teacher, layer=0,
                                labels=labels, sae=sae)
    assert owed == {"teacher_flops_per_token": 720.0, "label_flops_per_token": 720.0 + 400 + 48 + 16}
    ntp = _student(mix="none", concept_head=False)
    assert owed_flops_per_token(ntp, CocomixSection(lam=0.0), teacher=teacher, layer=0, labels=labels, sae=sae) == \
        {"teacher_flops_per_token": 0.0, "label_flops_per_token": 0.0}
    assert len(calls) == 1  # the SAE is loaded only when labels are charged
    costs = arm_costs(_student(), 3, owed)
    assert costs == {"student_flops_per_token": 4320.0, "teacher_flops_per_token": 720.0,
                     "label_flops_per_token": 1184.0, "train_flops_per_token": 4320.0 + 720 + 1184,
                     "active_parameters": 614}
    assert arm_costs(_student(), 3, None)["train_flops_per_token"] == 4320.0
