"""Tests for conceptlm.core.hf: tiny models, HF-loss equivalence, packed 4-D masks, save/load, LoRA, vocab."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import math
from pathlib import Path

import pytest
import torch

from conceptlm.core import hf
from conceptlm.core.config import ARCHS
from conceptlm.core.errors import ConceptLMError
from conceptlm.core.tokenizer import train_bpe_tokenizer

V = 300
PAD = 0


def _model(arch: str, seed: int = 0, **kw):
    kw.setdefault("pad_token_id", PAD)
    model = hf.build_tiny_model(arch, V, hidden_size=32, num_layers=2, num_heads=4, seed=seed, **kw)
    return model.eval()


def _texts() -> list[str]:
    words = "the cat dog sat ran on a mat log red blue fast slow big small tree house".split()
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(300):
        idx = torch.randint(len(words), (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen)
        out.append(" ".join(words[i] for i in idx.tolist()))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(_texts(), vocab_size=V)


def _padded_batch(lengths, side: str, seed: int = 0):
    """Random (B, T) batch padded with PAD on ``side``; labels = ids with pads and the first 2 tokens masked."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), -100)
    for b, n in enumerate(lengths):
        seq = torch.randint(1, V, (n,), generator=gen)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, sl], mask[b, sl] = seq, 1
        lab = seq.clone()
        lab[:2] = -100
        labels[b, sl] = lab
    return ids, mask, labels


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("arch", ARCHS)
def test_build_forward_and_head(arch):
    torch.manual_seed(0)
    model = _model(arch)
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
           "gemma2": "Gemma2ForCausalLM", "olmo2": "Olmo2ForCausalLM"}[arch]
    assert type(model).__name__ == cls
    assert model.config.model_type == arch
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")
    for name in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        assert getattr(model.config, name, 0.0) == 0.0
    if arch == "gemma2":
        assert model.config.sliding_window >= model.config.max_position_embeddings
    assert hf.context_length(model) == 512
    n_params = sum(p.numel() for p in model.parameters())
    assert V * 32 < n_params < V * 32 + 2 * (12 * 32 * 32 + 16 * 32) + 512 * 32 + 64
    x = torch.randint(0, V, (2, 7))
    out = model(x, labels=x)
    assert out.logits.shape == (2, 7, V)
    assert abs(out.loss.item() - math.log(V)) < 0.5  # random init: about uniform
    # backbone + logits_at reproduce the model's own logits (incl. gemma2's final softcapping)
    h = hf.hidden_states(model, x)
    assert h.shape == (2, 7, 32)
    torch.testing.assert_close(hf.logits_at(model, h), out.logits, atol=1e-6, rtol=0)
    assert hf.output_head(model) is model.get_output_embeddings()


def test_llama_param_count_exact():
    model = hf.build_tiny_model("llama", V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=48)
    d, kv_d, inter = 32, 16, 48
    per_layer = d * d * 2 + d * kv_d * 2 + 3 * d * inter + 2 * d  # q,o + k,v + mlp + 2 norms
    assert sum(p.numel() for p in model.parameters()) == V * d + 2 * per_layer + d  # tied head, final norm


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_reproducible(arch):
    a, b, c = _model(arch, seed=3), _model(arch, seed=3), _model(arch, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_arch_and_bad_shapes():
    with pytest.raises(ValueError, match="llama, qwen2, gpt2, gemma2, olmo2"):
        hf.build_tiny_model("mamba", V)
    with pytest.raises(ValueError, match="multiple"):
        hf.build_tiny_model("llama", V, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        hf.build_tiny_model("gpt2", V, num_kv_heads=2)


# ------------------------------------------------------------------------------------------ loss equivalence


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_sum_matches_hf(arch, side):
    ids, mask, labels = _padded_batch([9, 5, 7], side)
    n_ref = (labels[:, 1:] != -100).sum()
    assert int(n_ref) == 7 + 3 + 5  # labels: every real token but the first two of each row
    model = _model(arch)
    loss_sum, n = hf.causal_lm_loss_sum(model, ids, labels, attention_mask=mask)
    ref = model(ids, attention_mask=mask, labels=labels).loss
    assert int(n) == int(n_ref) and n.dtype == torch.int64 and loss_sum.dtype == torch.float32
    # fp32: a sum of ~85 carries a rounding error of ~1e-5 by itself; compare per token (HF's own quantity)
    assert abs(loss_sum.item() / int(n) - ref.item()) <= 3e-6  # a few fp32 ulps of ~5.7
    # fp64: the summed loss equals the sum over HF's full logits to 1e-9. (Not for gemma2 + left padding: HF's
    # gemma2 eager attention casts fp64 scores to fp32 in softmax, finfo(fp64).min becomes -inf, and fully padded
    # query rows turn NaN in HF's own forward -- an fp64-only quirk; fp32/bf16 are fine, checked above.)
    if arch == "gemma2" and side == "left":
        return
    model = model.double()
    loss_sum, n = hf.causal_lm_loss_sum(model, ids, labels, attention_mask=mask)
    logits = model(ids, attention_mask=mask).logits[:, :-1]
    ref_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    assert loss_sum.dtype == torch.float64
    assert abs(loss_sum.item() - ref_sum.item()) <= 1e-9


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_loss_sum_gradients_match_hf(arch):
    ids, mask, labels = _padded_batch([8, 6], "right", seed=1)
    model = _model(arch)
    loss_sum, n = hf.causal_lm_loss_sum(model, ids, labels, attention_mask=mask)
    (loss_sum / n).backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, atol=1e-6, rtol=1e-5, msg=k)


def test_loss_sum_no_targets_is_zero_with_graph():
    model = _model("llama")
    ids = torch.randint(1, V, (2, 5))
    loss_sum, n = hf.causal_lm_loss_sum(model, ids, torch.full_like(ids, -100))
    assert int(n) == 0 and loss_sum.item() == 0.0
    loss_sum.backward()  # no error: still attached to the graph


def test_loss_sum_hand_value():
    # Single target: the loss is -log softmax(logits at position 0)[label at position 1].
    model = _model("qwen2")
    ids = torch.tensor([[5, 17, 9]])
    labels = torch.tensor([[-100, 17, -100]])
    loss_sum, n = hf.causal_lm_loss_sum(model, ids, labels)
    logits = model(ids).logits[0, 0]
    assert int(n) == 1
    torch.testing.assert_close(loss_sum, -torch.log_softmax(logits, -1)[17], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- packed 4-D mask


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_4d_mask_equals_separate(arch):
    model = _model(arch)
    torch.manual_seed(1)
    a, b = torch.randint(1, V, (1, 5)), torch.randint(1, V, (1, 4))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([0] * 5 + [1] * 4)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    mask = torch.zeros(9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        h_packed = hf.hidden_states(model, packed, attention_mask=mask, position_ids=pos)
        h_sep = torch.cat([hf.hidden_states(model, a), hf.hidden_states(model, b)], 1)
        h_plain = hf.hidden_states(model, packed)  # without the mask, B would attend to A
    torch.testing.assert_close(h_packed, h_sep, atol=1e-5, rtol=0)
    assert (h_plain[:, 5:] - h_sep[:, 5:]).abs().max() > 1e-3
    assert torch.equal(mask, torch.zeros(9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None])


def test_bool_4d_mask_rejected():
    model = _model("llama")
    with pytest.raises(ValueError, match="float additive"):
        hf.hidden_states(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 1, 3, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- save / load


def _no_tmp(parent: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in parent.iterdir())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tokenizer, tmp_path):
    model = _model(arch)
    target = tmp_path / "out" / "model"
    hf.save_model(model, target, tokenizer=tokenizer)
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert _no_tmp(target.parent)
    loaded = hf.load_causal_lm(target).eval()
    assert type(loaded) is type(model)
    if arch == "gemma2":
        assert loaded.config._attn_implementation == "eager"
    x = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=0)
    tok = hf.load_tokenizer(target)
    msgs = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}]
    assert tok.chat_template == tokenizer.chat_template
    assert tok.apply_chat_template(msgs, tokenize=False) == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tok("the red dog")["input_ids"] == tokenizer("the red dog")["input_ids"]


def test_save_overwrites_atomically(tmp_path):
    target = tmp_path / "m"
    hf.save_model(_model("llama", seed=1), target)
    (target / "stale.txt").write_text("old run")
    second = _model("llama", seed=2)
    hf.save_model(second, target)
    assert not (target / "stale.txt").exists()  # old directory fully replaced
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    loaded = hf.load_causal_lm(target)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())


def test_save_failure_keeps_old_dir(tmp_path):
    target = tmp_path / "m"
    hf.save_model(_model("llama", seed=1), target)
    before = (target / "model.safetensors").read_bytes()

    class Broken:
        def save_pretrained(self, directory):
            Path(directory, "partial.bin").write_bytes(b"x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_model(Broken(), target)
    assert (target / "model.safetensors").read_bytes() == before
    assert _no_tmp(tmp_path)


def test_load_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConceptLMError, match="nope.*does not exist"):
        hf.load_causal_lm(missing)
    with pytest.raises(ValueError, match="nope"):
        hf.load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptLMError, match="empty.*no config.json"):
        hf.load_causal_lm(tmp_path / "empty")
    with pytest.raises(ConceptLMError, match="empty"):
        hf.load_tokenizer(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConceptLMError, match="is a file"):
        hf.load_causal_lm(tmp_path / "file")
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"base_model_name_or_path": "no/such/base"}')
    with pytest.raises(ConceptLMError, match="base_model_name_or_path.*no/such/base"):
        hf.load_causal_lm(ad)


# ------------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_only_adapters_and_round_trips(arch, tmp_path):
    base_dir = tmp_path / "base"
    hf.save_model(_model(arch), base_dir)
    base = hf.load_causal_lm(base_dir)
    peft_model = hf.apply_lora(base, r=4, alpha=8)
    trainable = [k for k, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    targets = hf.lora_target_modules(peft_model)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trainable} == set(targets)
    x = torch.randint(1, V, (2, 6))
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(x).logits
        for k, p in peft_model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(k)))
        after = peft_model(x).logits
        # backbone/output_head go through the injected LoRA layers
        torch.testing.assert_close(hf.logits_at(peft_model, hf.hidden_states(peft_model, x)), after,
                                   atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-3  # the adapter is not a no-op
    ad_dir = tmp_path / "adapter"
    hf.save_model(peft_model, ad_dir)
    assert (ad_dir / "adapter_model.safetensors").is_file() and not (ad_dir / "model.safetensors").exists()
    assert _no_tmp(tmp_path)
    reloaded = hf.load_causal_lm(ad_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, after, atol=1e-6, rtol=0)


def test_lora_gpt2_uses_fan_in_fan_out_and_unknown_type():
    model = hf.apply_lora(_model("gpt2"))
    assert model.peft_config["default"].fan_in_fan_out is True
    assert hf.lora_target_modules(model) == ["c_attn", "c_proj"]

    class Cfg:
        model_type = "mamba"

    class Fake(torch.nn.Module):
        config = Cfg()

    with pytest.raises(ValueError, match="target_modules explicitly"):
        hf.lora_target_modules(Fake())


# ------------------------------------------------------------------------------------------------- vocabulary


def _tokenizer_without_pad():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(_texts(), trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|bos|>", "<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>")


@pytest.mark.parametrize("tied", [True, False])
def test_ensure_pad_token_adds_distinct_token_and_resizes(tied):
    tok = _tokenizer_without_pad()
    n = len(tok)
    assert tok.pad_token is None
    model = hf.build_tiny_model("llama", n, hidden_size=32, tie_word_embeddings=tied, seed=0)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    rng = torch.get_rng_state()
    hf.ensure_pad_token(tok, model)
    assert torch.equal(torch.get_rng_state(), rng)  # mean init draws nothing from the global RNG
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == n and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == n + 1 and model.config.pad_token_id == n and model.config.vocab_size == n + 1
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape == (n + 1, 32) and w_out.shape == (n + 1, 32)
    assert torch.equal(w_in[:n], old_in) and torch.equal(w_out[:n], old_out)
    torch.testing.assert_close(w_in[n], old_in.mean(0), atol=1e-7, rtol=0)
    torch.testing.assert_close(w_out[n], old_out.mean(0), atol=1e-7, rtol=0)
    assert (w_in.data_ptr() == w_out.data_ptr()) == tied
    model(torch.tensor([[1, n]]))  # the new id is usable


def test_ensure_pad_token_replaces_eos_pad_and_keeps_existing():
    tok = _tokenizer_without_pad()
    tok.pad_token = tok.eos_token
    hf.ensure_pad_token(tok)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    good = train_bpe_tokenizer(_texts(), vocab_size=V)
    n, pad = len(good), good.pad_token_id
    model = hf.build_tiny_model("gpt2", n, hidden_size=32, seed=0)
    hf.ensure_pad_token(good, model)
    assert len(good) == n and good.pad_token_id == pad and model.config.pad_token_id == pad
    assert model.get_input_embeddings().weight.shape[0] == n


def test_resize_normal_and_shrink():
    model = hf.build_tiny_model("olmo2", V, hidden_size=32, tie_word_embeddings=False, seed=0)
    old = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    hf.resize_token_embeddings(model, V + 4, init="normal")
    w = model.get_input_embeddings().weight
    assert torch.equal(w[:V], old)
    assert not torch.allclose(w[V], w[V + 1])  # random rows, not all the mean
    hf.resize_token_embeddings(model, V - 10)
    assert model.get_input_embeddings().weight.shape[0] == V - 10
    assert model.get_output_embeddings().weight.shape[0] == V - 10
    assert torch.equal(model.get_input_embeddings().weight, old[: V - 10])
    with pytest.raises(ValueError, match="init"):
        hf.resize_token_embeddings(model, V, init="zeros")
