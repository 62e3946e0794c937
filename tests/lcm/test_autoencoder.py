"""The sentence autoencoder trained here (encoder + decoder in one folder) and the likelihood-trained LCM: loss
value tests (by hand from the pieces), the folder's identity (encoder fingerprint, decoder refusing a foreign
encoder), the cached decoder, and one short end-to-end run of ``train-autoencoder`` -> prepare -> likelihood LCM."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conceptlm.core.artifact import Identity, read_manifest
from conceptlm.core.errors import ConfigError
from conceptlm.lcm.autoencoder import (
    AUTOENCODER_KIND,
    AutoencoderEncoder,
    AutoencoderUnit,
    CachedDecoder,
    autoencoder_dir,
    build_autoencoder,
    load_autoencoder_decoder,
    write_autoencoder,
)
from conceptlm.lcm.config import AutoencoderSection, EncoderSection, LCMConfig, LCMSection
from conceptlm.lcm.decoder_train import TargetCollator
from conceptlm.lcm.decoders import load_decoder

SENTENCES = [f"The {a} {b} walked to the {c} today." for a in ("red", "small", "old", "happy")
             for b in ("dog", "cat", "man", "bird") for c in ("park", "lake", "shop")]
TINY = AutoencoderSection(dim=8, hidden_size=16, encoder_layers=1, decoder_layers=1, num_heads=2, vocab_size=300,
                          n_prefix=2, max_tokens=16, noise_std=0.0)


def _folder(path, seed: int = 0):
    """A saved (untrained) tiny autoencoder folder with its manifests."""
    enc, dec = build_autoencoder(TINY, SENTENCES, seed=seed)
    ident = Identity(kind=AUTOENCODER_KIND, settings={"seed": seed}, inputs={"sentences": "x"})
    write_autoencoder(path, enc.settings, enc.state_dict(), dec, None, manifest=(ident, {"data": {}}),
                      decoder_manifest=(Identity(kind="lcm.decoder", inputs={"a": ident.fingerprint}),
                                        {"data": {"source": "given", "split": "given"}}))
    return path


def _batch(dec, sentences, vectors=None):
    items = [{"id": i, "vector": torch.zeros(0) if vectors is None else vectors[i], "ids": t}
             for i, t in enumerate(dec.target_ids(sentences))]
    return TargetCollator(dec.pad_id)(items)


def test_autoencoder_loss_is_the_decoders_token_loss_of_the_encoded_vector_plus_alignment():
    torch.manual_seed(0)
    enc, dec = build_autoencoder(TINY, SENTENCES)
    m = F.normalize(torch.randn(4, 5), dim=-1)
    unit = AutoencoderUnit(enc, dec, align_weight=0.5, align_dim=5)
    b = _batch(dec, SENTENCES[:4], m)
    out = unit(b)
    z = enc(b["input_ids"], b["attention_mask"])
    ref, n, _ = dec.token_loss(z, b["input_ids"], b["labels"], b["attention_mask"])
    assert torch.allclose(out["ntp"], ref)
    assert int(unit.counts(b)["ntp"]) == int(n) == sum(len(t) for t in dec.target_ids(SENTENCES[:4]))
    hand = sum(1 - float(torch.dot(F.normalize(unit.align(z[i]).detach(), dim=0), m[i])) for i in range(4))
    assert float(out["align"].detach()) == pytest.approx(hand, rel=1e-5)
    assert unit.loss_weights == {"ntp": 1.0, "align": 0.5}
    out["ntp"].backward()  # the decoder's loss trains the encoder through the vector
    assert enc.embed.weight.grad is not None and float(enc.embed.weight.grad.abs().sum()) > 0


def test_noise_only_in_training_and_off_switch_equivalence():
    from conceptlm.core.rng import StepRandomness

    enc, dec = build_autoencoder(TINY, SENTENCES)
    b = _batch(dec, SENTENCES[:4])
    quiet = AutoencoderUnit(enc, dec, noise_std=0.0)
    noisy = AutoencoderUnit(enc, dec, noise_std=0.5)
    for u in (quiet, noisy):
        u.step_rng = StepRandomness(0, 3)
    assert not torch.allclose(noisy(b)["ntp"], quiet(b)["ntp"])  # training: noised vector
    noisy.eval()
    quiet.eval()
    assert torch.equal(noisy(b)["ntp"], quiet(b)["ntp"])  # evaluation: clean vector


def test_folder_is_an_encoder_with_its_fingerprint_and_a_decoder_that_refuses_other_encoders(tmp_path):
    from conceptlm.lcm.data.encoders import get_encoder, verify_identity

    a = _folder(tmp_path / "a", seed=0)
    b = _folder(tmp_path / "b", seed=1)
    enc = get_encoder(EncoderSection(name=str(a)))
    assert isinstance(enc, AutoencoderEncoder)
    ident = enc.identity()
    assert ident["autoencoder"] == read_manifest(a)["fingerprint"]
    assert ident["fingerprint"].startswith("sha256:") and ident["dim"] == 8
    x = enc.encode(SENTENCES[:5] + SENTENCES[:1])
    assert x.shape == (6, 8) and torch.allclose(x.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(x[0], x[5], atol=1e-6)  # order restored after length sorting
    verify_identity(json.loads((a / "decoder" / "decoder.json").read_text())["encoder"], enc)
    assert load_decoder(a, encoder=enc).decode(x[:2])  # decoder.path: <folder>
    other = get_encoder(EncoderSection(name=str(b)))
    with pytest.raises(ConfigError, match="another sentence encoder"):
        load_decoder(a, encoder=other)
    with pytest.raises(ConfigError, match="another sentence encoder"):
        load_autoencoder_decoder(a, encoder=other)
    minilm_like = {"name": "minilm", "dim": 8, "normalize": True, "fingerprint": "sha256:other"}
    with pytest.raises(ConfigError, match="another sentence encoder"):
        load_autoencoder_decoder(a, encoder=minilm_like)


def test_damaged_folder_and_non_autoencoder_are_one_line_errors(tmp_path):
    a = _folder(tmp_path / "a")
    (a / "encoder.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="encoder.safetensors") as e:
        AutoencoderEncoder(a)
    assert "\n" not in str(e.value)
    assert autoencoder_dir(tmp_path) is None
    with pytest.raises(ConfigError, match="not a sentence autoencoder"):
        load_autoencoder_decoder(tmp_path)


def test_cached_decoder_decodes_each_vector_once_in_order():
    calls = []

    class Inner:
        encoder_identity = {}

        def identity(self):
            return {"kind": "x"}

        def decode(self, v):
            calls.append(len(v))
            return [f"s{float(r[0]):g}" for r in v]

    dec = CachedDecoder(Inner())
    v = torch.tensor([[1.0], [2.0], [1.0]])
    assert dec.decode(v) == ["s1", "s2", "s1"] and calls == [2]
    assert dec.decode(torch.tensor([[2.0], [3.0]])) == ["s2", "s3"] and calls == [2, 1]


def test_decoder_kind_autoencoder_reads_the_encoder_folder():
    cfg = LCMConfig()
    cfg.encoder.name, cfg.decoder.kind = "/some/ae", "autoencoder"
    assert str(cfg.decoder_dir) == "/some/ae"
    cfg.decoder.path = "/other"
    assert str(cfg.decoder_dir) == "/other"


# ------------------------------------------------------------------------------------------------ likelihood LCM
def _lcm_batch(dim: int, sentences: list[list[str]]):
    from conceptlm.lcm.sequence import collate_documents

    g = torch.Generator().manual_seed(0)
    items = [{"id": i, "vectors": F.normalize(torch.randn(len(s), dim, generator=g), dim=-1), "sentences": s}
             for i, s in enumerate(sentences)]
    return collate_documents(items)


def test_likelihood_loss_is_the_frozen_decoders_loss_of_the_next_sentence_and_trains_only_the_lcm():
    from conceptlm.lcm.variants import build_unit
    from conceptlm.lcm.variants.likelihood import LikelihoodLCMUnit

    torch.manual_seed(0)
    _, dec = build_autoencoder(TINY, SENTENCES)
    dec.eval().requires_grad_(False)
    cfg = LCMSection(model="likelihood", dim=8, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                     max_sentences=8, likelihood_decoder="unused")
    unit = LikelihoodLCMUnit(cfg)
    object.__setattr__(unit, "_decoder", dec)
    unit.model.set_normalizer(torch.full((8,), 0.1), torch.full((8,), 0.5))
    docs = [SENTENCES[0:3], SENTENCES[3:5]]
    b = _lcm_batch(8, docs)
    b = unit.prepare(b)
    n = unit.counts(b)["nll"]
    out = unit(b)
    # by hand: predict every next vector, denormalize, score sentence t by the decoder, one sentence at a time
    z = unit.model.normalize(b["vectors"])
    y = unit.model.forward_normalized(z)
    total, tokens = 0.0, 0
    for d, sents in enumerate(docs):
        for t in range(1, len(sents)):
            ids = torch.tensor([dec.target_ids([sents[t]])[0]])
            loss, k, _ = dec.token_loss(unit.model.denormalize(y[d, t - 1:t]), ids, ids.clone(), torch.ones_like(ids))
            total, tokens = total + float(loss.detach()), tokens + int(k)
    assert float(out["nll"].detach()) == pytest.approx(total, rel=1e-5) and int(n) == tokens
    out["nll"].backward()
    assert all(p.grad is None for p in dec.parameters())
    assert unit.model.postnet.weight.grad is not None and float(unit.model.postnet.weight.grad.abs().sum()) > 0
    assert not any(k.startswith("decoder.") or "_decoder" in k for k in unit.state_dict())
    assert type(build_unit(cfg)) is LikelihoodLCMUnit


def test_likelihood_decoder_must_match_the_data_encoder_and_have_a_token_likelihood(tmp_path):
    from conceptlm.lcm.decoders import RetrievalDecoder
    from conceptlm.lcm.variants.likelihood import load_frozen_decoder

    a = _folder(tmp_path / "a")
    own = AutoencoderEncoder(a).identity()
    assert not any(p.requires_grad for p in load_frozen_decoder(a, encoder=own).parameters())
    with pytest.raises(ConfigError, match="another sentence encoder"):
        load_frozen_decoder(a, encoder={**own, "fingerprint": "sha256:foreign"})
    RetrievalDecoder(torch.eye(2), ["a", "b"], {"dim": 2}).save(tmp_path / "bank")
    with pytest.raises(ConfigError, match="no token likelihood"):
        load_frozen_decoder(tmp_path / "bank")
    with pytest.raises(ConfigError, match="likelihood_decoder"):
        LCMSection(model="likelihood").validate()


@pytest.mark.slow
def test_train_autoencoder_then_prepare_and_a_likelihood_lcm_end_to_end(tmp_path):
    from conceptlm.core.config import load_config
    from conceptlm.lcm import recipe

    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(" ".join(SENTENCES[i:i + 4]) for i in range(0, 48, 4)), encoding="utf-8")
    o = {"run.out_dir": str(tmp_path / "runs"), "run.name": "r", "docs.source": str(docs),
         "prepare.out_dir": str(tmp_path / "data"), "prepare.val_fraction": 0.2, "autoencoder.dim": 8,
         "autoencoder.hidden_size": 16, "autoencoder.encoder_layers": 1, "autoencoder.decoder_layers": 1,
         "autoencoder.num_heads": 2, "autoencoder.vocab_size": 300, "autoencoder.max_tokens": 16,
         "decoder_train.steps": 3, "decoder_train.batch_size": 8, "decoder_train.eval_sentences": 4,
         "decoder_train.decode_eval": 2, "train.max_steps": 3, "train.micro_batch_size": 2, "train.progress": False,
         "lcm.dim": 8, "lcm.d_model": 16, "lcm.n_layers": 1, "lcm.n_heads": 2, "lcm.d_ff": 32}
    cfg = load_config(LCMConfig, None, [f"{k}={v}" for k, v in o.items()])
    res = recipe.train_autoencoder(cfg)
    assert {"autobleu", "round_trip_cos"} <= set(res.last_eval)
    run = tmp_path / "runs" / "r" / "autoencoder"
    folder = autoencoder_dir(run)
    man = read_manifest(folder)
    assert man["kind"] == AUTOENCODER_KIND and man["data"]["split"] == "train" and man["n_held_out"] == 4
    lcm = load_config(LCMConfig, None, [f"{k}={v}" for k, v in o.items()] + [
        f"encoder.name={run}", "decoder.kind=autoencoder", "lcm.model=likelihood", f"lcm.likelihood_decoder={run}",
        "evaluate.documents=2", "evaluate.generate_documents=1"])
    recipe.prepare(lcm)
    recipe.train(lcm)
    out = recipe.evaluate(lcm)
    assert "l2" in out["teacher_forced"] and "l2_r" in out["teacher_forced"]
    foreign = load_config(LCMConfig, None, [f"{k}={v}" for k, v in o.items()] + [
        "lcm.model=likelihood", f"lcm.likelihood_decoder={_folder(tmp_path / 'b', seed=5)}", "run.name=f"])
    foreign.prepare.out_dir = str(tmp_path / "data")
    foreign.encoder.name = str(run)
    with pytest.raises(ConfigError, match="another sentence encoder"):
        recipe.train(foreign)
