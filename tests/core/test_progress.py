"""``CONCEPTLM_NO_PROGRESS=1`` switches off every progress bar: the trainer's, batched generation's, the helpers',
and those of the Hugging Face libraries."""

from __future__ import annotations

import pytest

from conceptlm.core.config import load_config
from conceptlm.core.progress import progress_bar, progress_enabled
from conceptlm.sft.config import SFTConfig
from conceptlm.sft.recipe import train
from tests.conftest import make_chat_records, tiny_overrides


@pytest.mark.parametrize("env,enabled,expected", [(None, True, True), (None, False, False), ("0", True, True),
                                                  ("1", True, False), ("1", False, False)])
def test_progress_enabled(monkeypatch, env, enabled, expected):
    if env is None:
        monkeypatch.delenv("CONCEPTLM_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CONCEPTLM_NO_PROGRESS", env)
    assert progress_enabled(enabled) is expected
    bar = progress_bar(range(3), total=3, desc="x", enabled=enabled)
    assert bar.disable is (not expected) and list(bar) == [0, 1, 2]  # a disabled bar still iterates
    bar.close()


@pytest.mark.parametrize("env", [None, "1"])
def test_trainer_and_generation_bars_follow_the_variable(tmp_path, chat_files, capsys, monkeypatch, env):
    from conceptlm.core.hf import build_tiny_model
    from conceptlm.core.tokenizer import train_bpe_tokenizer
    from conceptlm.eval.generation import generate_batched

    if env is None:
        monkeypatch.delenv("CONCEPTLM_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CONCEPTLM_NO_PROGRESS", env)
    cfg = load_config(SFTConfig, None, tiny_overrides(tmp_path, chat_files[0], **{"train.max_steps": 2,
                                                                                   "train.progress": True}))
    train(cfg)
    trainer_err = capsys.readouterr().err
    recs = make_chat_records(8, seed=3)
    tok = train_bpe_tokenizer([m["content"] for r in recs for m in r["messages"]], vocab_size=320)
    model = build_tiny_model("llama", len(tok), hidden_size=32, num_layers=1, num_heads=2, seed=0,
                             pad_token_id=tok.pad_token_id)
    generate_batched(model, tok, [r["messages"][:2] for r in recs], max_new_tokens=2, batch_size=2)
    gen_err = capsys.readouterr().err
    shown = env is None
    assert ("2/2" in trainer_err) is shown, trainer_err
    assert ("generate" in gen_err and "8/8" in gen_err) is shown, gen_err


@pytest.mark.parametrize("env", [None, "1"])
def test_library_bars_follow_the_variable(monkeypatch, env):
    import transformers.utils.logging as tlog

    from conceptlm.core.progress import silence_library_bars

    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # restored afterwards, whatever silence_library_bars sets
    if env is None:
        monkeypatch.delenv("CONCEPTLM_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CONCEPTLM_NO_PROGRESS", env)
    tlog.enable_progress_bar()
    try:
        silence_library_bars()
        import os

        assert tlog.is_progress_bar_enabled() is (env is None)
        assert (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1") is (env == "1")
    finally:
        import sys

        tlog.enable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].enable_progress_bars()
