"""LCM metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from conceptlm.lcm import metrics as M

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_l2_and_round_trip_l2():
    pred = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert M.l2_distance(pred, target).tolist() == [5.0, 1.0]
    snap = lambda v: v.round()  # a "decode then encode" that snaps to the integer grid  # noqa: E731
    assert M.round_trip_l2(pred + 0.3, target, snap).tolist() == [5.0, 1.0]
    assert M.as_sum_count(torch.tensor([1.0, math.nan, 2.0])) == (pytest.approx(3.0), 2)


def test_contrastive_accuracy_both_negative_sets_by_hand():
    # documents: 0 -> rows 0, 1, 2 (positions 1, 2, 3); 1 -> row 3 (position 1). 1-D embeddings.
    target = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    pred = torch.tensor([[0.4], [1.9], [2.0], [1.0]])
    doc = torch.tensor([0, 0, 0, 1])
    pos = torch.tensor([1, 2, 3, 1])
    # reference: negatives = the other document's targets.
    #   row0: d(0.4, 10)^2 = 92.16 > d(0.4, 0)^2 = .16 -> 1;  row1, row2 likewise 1;
    #   row3: pred 1 vs its target 10 (81): negatives 0 (1), 1 (0), 2 (1) -> none farther -> 0/3
    ca = M.contrastive_accuracy(pred, target, doc)
    assert ca.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    # paper: all targets but itself and its +-1 neighbours in the same document
    #   row0 (pos 1): negatives rows 2 (pos 3), 3: d to 2 = 2.56 > .16 yes; d to 10 yes -> 1
    #   row1 (pos 2): neighbours are rows 0 and 2 -> negatives row 3 only -> 1
    #   row2 (pos 3): negatives rows 0, 3 -> d(2,0)=4 > 0 yes, d(2,10) yes -> 1
    #   row3: negatives rows 0, 1, 2 -> 0
    ca2 = M.contrastive_accuracy(pred, target, doc, pos, exclude="neighbours")
    assert ca2.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    pred[1] = torch.tensor([6.5])  # now row 3 (10 -> 12.25) is closer than its own target 1 (30.25)
    assert M.contrastive_accuracy(pred, target, doc, pos, exclude="neighbours")[1].item() == 0.0
    assert M.contrastive_accuracy(pred, target, doc)[1].item() == 0.0
    single = M.contrastive_accuracy(pred[:3], target[:3], doc[:3])
    assert torch.isnan(single).all()  # one document: no negatives


def test_paraphrasing_score_by_hand():
    e = torch.eye(3)
    vectors = torch.stack([e[0], e[1], (e[0] + e[2]) / math.sqrt(2)]).unsqueeze(0)  # x0, x1, x2
    pred = torch.stack([torch.zeros(3), e[0], (e[0] + e[1])]).unsqueeze(0)
    mask = torch.tensor([[True, True, True]])
    par = M.paraphrasing_score(pred, vectors, mask)
    # n=1: max cos(pred1=e0, x0) = 1 over max cos(x1=e1, x0) = 0 -> undefined (NaN)
    # n=2: pred2 = (e0+e1)/sqrt2: cos with x0 = .7071, x1 = .7071 -> .7071; ref: cos(x2, x0) = .7071 -> ratio 1
    assert math.isnan(par[0].item()) and par[1].item() == pytest.approx(1.0, abs=1e-6)
    pred2 = pred.clone()
    pred2[0, 2] = e[0]  # copies x0: 1 / .7071
    assert M.paraphrasing_score(pred2, vectors, mask)[1].item() == pytest.approx(math.sqrt(2), abs=1e-5)


def test_mutual_information_weights_by_tokens():
    table = {(None, "a"): (-6.0, 3), ("c1 c2", "a"): (-3.0, 3), (None, "b"): (-2.0, 1), ("c3", "b"): (-4.0, 1)}
    s, n = M.mutual_information(["a", "b"], [["c0", "c1", "c2"], ["c3"]], lambda p, t: table[(p, t)], k=2)
    assert (s, n) == (pytest.approx(3.0 - 2.0), 4)  # (+3) + (-2) over 3 + 1 tokens -> MI = 0.25


def test_causal_lm_scorer_against_a_manual_computation():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conceptlm.core.hf import build_tiny_model

    vocab = {c: i for i, c in enumerate(["<s>", "\n", " ", "a", "b", "c", "d"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")
    torch.manual_seed(0)
    lm = build_tiny_model("gpt2", len(vocab), hidden_size=32, num_layers=1, num_heads=2)
    scorer = M.CausalLMScorer(lm, tok)
    lp, n = scorer("a b", "cd")
    ids = [0, 3, 2, 4, 1, 5, 6, 1]  # <s> "a b" "\ncd\n"
    with torch.no_grad():
        logp = lm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    want = sum(logp[i - 1, ids[i]].item() for i in range(4, 8))
    assert n == 4 and lp == pytest.approx(want, abs=1e-5)
    lp0, n0 = scorer(None, "cd")
    ids0 = [0, 1, 5, 6, 1]
    with torch.no_grad():
        logp0 = lm(input_ids=torch.tensor([ids0])).logits[0].log_softmax(-1)
    assert n0 == 4 and lp0 == pytest.approx(sum(logp0[i - 1, ids0[i]].item() for i in range(1, 5)), abs=1e-5)


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat ate the mat") = "the cat the mat" = 4; P = 4/5, R = 4/6
    p, r = 4 / 5, 4 / 6
    assert M.rouge_l("the cat ate the mat", "the cat sat on the mat") == pytest.approx(2 * p * r / (p + r))
    assert M.rouge_l("a b\nc d", "c d\na b", summary_level=True) == pytest.approx(1.0)
    assert M.rouge_l("a b c d", "c d a b") == pytest.approx(0.5)


def test_word_ovl3_and_rep4_by_hand():
    src = "The cat sat on the mat."
    # source 3-grams: the cat sat / cat sat on / sat on the / on the mat; output has "the cat sat", "on the mat"
    assert M.ovl3("the cat sat, then on the mat", src) == pytest.approx(2 / 4)
    assert M.ovl3("anything", "too short") == 0.0
    # 4-grams of "a b c d a b c d": abcd bcda cdab dabc abcd -> 5 total, 4 distinct -> 1 - 4/5
    assert M.rep4("a b c d a b c d") == pytest.approx(0.2)
    assert M.rep4("a b c") == 0.0


def test_char_level_reference_variants_by_hand():
    # "aa": 1-grams a, a; 2-gram aa -> 3 total, 2 distinct -> 3/2 - 1
    assert M.char_ngrams_1_4("aa") == ["a", "a", "aa"]
    assert M.repetition_char14("aa") == pytest.approx(0.5)
    # source "ab": {a, b, ab}; output "a": {a} -> 1/3
    assert M.ngram_overlap_char14("a", "ab") == pytest.approx(1 / 3)
    assert M.repetition_char14("") == -1.0  # the reference's formula on an empty output: 0 / 1 - 1


def test_auto_bleu_by_hand():
    # precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): BLEU = (1/12)^(1/4)
    bleu = M.auto_bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert bleu == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-3)
    assert M.auto_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="1 originals but 2"):
        M.auto_bleu(["a"], ["a", "b"])


def test_fragility_noise_formula_and_value():
    words = ["alpha", "beta"]
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    center, scale = torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0])
    seen = []

    def encode(texts):
        return torch.stack([bank[words.index(t)] for t in texts])

    def decode(v):
        seen.append(v.clone())
        return [words[i] for i in (v @ bank.T).argmax(-1).tolist()]

    g = torch.Generator().manual_seed(0)
    frag = M.fragility(words, encode=encode, decode=decode, score=lambda a, b: float(a == b),
                       normalize=lambda v: (v - center) / scale, denormalize=lambda z: z * scale + center,
                       n_samples=3, generator=torch.Generator().manual_seed(0))
    # the same draws by hand: alpha ~ U[0,1] (N,), eps ~ N(0, I) (N, D) per sample, in that order
    hits = torch.zeros(2)
    for s in range(3):
        a, eps = torch.rand(2, generator=g), torch.randn(2, 2, generator=g)
        want = ((1 - a).sqrt().unsqueeze(1) * (bank - center) / scale + a.sqrt().unsqueeze(1) * eps) * scale + center
        assert torch.allclose(seen[s], want, atol=1e-6)
        hits += ((want @ bank.T).argmax(-1) == torch.arange(2)).float()
    assert torch.allclose(frag, -(hits / 3).double())
    # alpha = 0: no noise -> a perfect round trip, fragility = -max score
    assert M.fragility(words, encode=encode, decode=decode, score=lambda a, b: float(a == b),
                       alphas=[0.0]).tolist() == [-1.0, -1.0]


def test_cosine_score():
    enc = lambda texts: torch.tensor([[1.0, 0.0] if t == "x" else [1.0, 1.0] for t in texts])  # noqa: E731
    assert M.cosine_score(enc)("x", "y") == pytest.approx(1 / math.sqrt(2))
