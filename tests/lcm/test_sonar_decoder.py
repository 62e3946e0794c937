"""decoder.kind=sonar: SONAR's pretrained decoder through the optional sonar-space package. Without the package, a
one-line error naming it; with a stand-in ``sonar`` module (a lookup table that inverts a stand-in encoder exactly),
the adapter's batching, order, cache, encoder check and the eval-decoder verb."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import DecoderSection, LCMConfig, decoder_run_config

SONAR_IDENTITY = {"name": "sonar", "backend": "sonar", "path": "text_sonar_basic_encoder", "dim": 1024,
                  "normalize": False, "lang": "eng_Latn", "fingerprint": "sha256:x"}


def test_missing_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sonar", None)
    monkeypatch.setitem(sys.modules, "sonar.inference_pipelines.text", None)
    from conceptlm.lcm.sonar_decoder import SonarDecoder

    with pytest.raises(ConfigError, match=r"decoder.kind.*needs the sonar-space package") as e:
        SonarDecoder(DecoderSection(kind="sonar"), SONAR_IDENTITY)
    assert "\n" not in str(e.value)


def test_non_sonar_encoder_is_refused_before_loading_anything():
    from conceptlm.lcm.sonar_decoder import SonarDecoder

    with pytest.raises(ConfigError, match="set encoder.name=sonar"):
        SonarDecoder(DecoderSection(kind="sonar"), {"name": "minilm", "backend": "sentence-transformers"})
    with pytest.raises(ConfigError, match="encoder.normalize=false"):
        SonarDecoder(DecoderSection(kind="sonar"), {**SONAR_IDENTITY, "normalize": True})


class _Table:
    """Stand-in SONAR space: sentence i <-> 1024-d vector with a 3 at coordinate hash(i) (exactly invertible)."""

    def __init__(self):
        self.sentences: list[str] = []
        self.calls: list[dict] = []

    def vector(self, s: str) -> torch.Tensor:
        if s not in self.sentences:
            self.sentences.append(s)
        v = torch.zeros(1024)
        v[self.sentences.index(s)] = 3.0
        return v


@pytest.fixture
def fake_sonar(monkeypatch):
    table = _Table()

    class Encoder(torch.nn.Module):  # TextToEmbeddingModelPipeline
        def __init__(self, encoder, tokenizer, device=None, dtype=None):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

        def predict(self, sentences, source_lang, batch_size=5, progress_bar=False):
            return torch.stack([table.vector(s) for s in sentences])

    class Decoder(torch.nn.Module):  # EmbeddingToTextModelPipeline
        def __init__(self, decoder, tokenizer, device=None, dtype=None):
            super().__init__()
            self.card = decoder
            self.model = torch.nn.Linear(2, 2)

        def predict(self, inputs, target_lang, batch_size=5, progress_bar=False, **kw):
            table.calls.append({"n": len(inputs), "target_lang": target_lang, "batch_size": batch_size, **kw})
            return [table.sentences[int(v.argmax())] for v in inputs]

    text = types.ModuleType("sonar.inference_pipelines.text")
    text.TextToEmbeddingModelPipeline, text.EmbeddingToTextModelPipeline = Encoder, Decoder
    for name, mod in (("sonar", types.ModuleType("sonar")),
                      ("sonar.inference_pipelines", types.ModuleType("sonar.inference_pipelines")),
                      ("sonar.inference_pipelines.text", text)):
        monkeypatch.setitem(sys.modules, name, mod)
    return table


def test_decode_keeps_order_passes_settings_and_caches(fake_sonar):
    from conceptlm.lcm.sonar_decoder import SonarDecoder

    section = DecoderSection(kind="sonar", num_beams=3, max_new_tokens=40, batch_size=7, sonar_lang="fra_Latn")
    dec = SonarDecoder(section, SONAR_IDENTITY, device="cpu")
    vec = torch.stack([fake_sonar.vector(s) for s in ["a b.", "c d.", "e f."]])
    assert dec.decode(vec[[2, 0, 2, 1]]) == ["e f.", "a b.", "e f.", "c d."]
    assert fake_sonar.calls == [{"n": 3, "target_lang": "fra_Latn", "batch_size": 7, "beam_size": 3,
                                 "max_seq_len": 40}]  # each distinct vector once
    assert dec.decode(vec[[1, 0]]) == ["c d.", "a b."] and len(fake_sonar.calls) == 1  # cached
    ident = dec.identity()
    assert ident["kind"] == "sonar" and ident["card"] == "text_sonar_basic_decoder" and ident["encoder"] == \
        SONAR_IDENTITY and ident["fingerprint"].startswith("sha256:")


def test_eval_decoder_verb_uses_sonar_and_train_decoder_refuses(fake_sonar, tmp_path):
    from conceptlm.lcm.decoder_train import eval_decoder, train_decoder

    cfg = decoder_run_config(load_config(LCMConfig, None, [
        f"run.out_dir={tmp_path}", "encoder.name=sonar", "decoder.kind=sonar", "decoder_train.eval_sentences=4",
        "decoder_train.decode_eval=4"]))
    sentences = [f"Sentence number {i} is here." for i in range(12)]
    res = eval_decoder(cfg, sentences=sentences)
    assert res["source"] == "sonar:text_sonar_basic_decoder" and res["decoder"]["kind"] == "sonar"
    assert res["n"] == 4 and res["autobleu"] == pytest.approx(100.0) and res["round_trip_cos"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="nothing to train"):
        train_decoder(cfg, sentences=sentences)
