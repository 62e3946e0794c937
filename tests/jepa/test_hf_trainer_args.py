"""JepaTrainer view settings vs the data, and the runnable transformers.Trainer example.

View settings given to the trainer (k, predictor position, text view, Code view, direction) that contradict how the
examples were built are a clear ValueError — in training and evaluation, for JepaExample items (which record their
ViewConfig) and for dict rows without that record (k checked by counting predictor tokens) — never silently
ignored. Settings the caller did not give are not checked. ``examples/jepa_hf_trainer.py`` runs end to end offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from conceptlm.core.hf import build_tiny_model  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.jepa.config import JepaSection, ViewConfig  # noqa: E402
from conceptlm.jepa.hf_collate import BATCH_KEY, JepaDataCollator, check_view_settings  # noqa: E402
from conceptlm.jepa.hf_trainer import JepaTrainer  # noqa: E402
from conceptlm.jepa.packing import collate_packed, collate_separate  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens, build_views  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECORDS = [[{"role": "system", "content": "Convert."}, {"role": "user", "content": u},
            {"role": "assistant", "content": a}]
           for u, a in [("lines with words", "(a|b)*"), ("a vowel", "[aeiou]"), ("the string dog", "dog.*"),
                        ("a number then a letter", "[0-9][a-z]"), ("zero or more dogs", "(dog)*"),
                        ("lines ending with cat", ".*cat")]]
LEGACY = ("lm_ids", "lm_labels", "text_ids", "text_enc", "code_ids", "code_enc", "text_prefix_len")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer([m["content"] for r in RECORDS for m in r] * 10, vocab_size=300)
    add_predictor_tokens(t, None, 3)
    return t


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model("llama", len(tok), hidden_size=32, num_layers=1, num_heads=4, seed=0,
                            pad_token_id=tok.pad_token_id).float()


def _examples(tok, **kw):
    return [ex for r in RECORDS for ex in build_views(r, tok, ViewConfig(**kw))]


def _trainer(model, tok, tmp_path, jepa_args, **kw) -> JepaTrainer:
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                          per_device_train_batch_size=3, max_steps=1, save_strategy="no",
                                          disable_tqdm=True, remove_unused_columns=False)
    return JepaTrainer(model, args, jepa_args=jepa_args, processing_class=tok, **kw)


@pytest.mark.parametrize("given,built,message", [
    ({"num_predictors": 2}, {"num_predictors": 1}, "num_predictors=2 but the batch was built with 1"),
    ({"text_view": "user_only"}, {}, "text_view='user_only' but the batch was built with 'context'"),
    ({"direction": "code_to_text"}, {}, "direction='code_to_text' but the batch was built with 'text_to_code'"),
    ({"direction": "text_to_code"}, {"direction": "code_to_text", "num_predictors": 1}, "built with 'code_to_text'"),
    ({"predictor_position": "before"}, {"num_predictors": 1}, "predictor_position='before'"),
    ({"code_view": "alone"}, {}, "code_view='alone' but the batch was built with 'with_system'"),
])
@pytest.mark.parametrize("mode", ["packed", "separate"])
def test_contradicting_view_settings_are_an_error(tok, model, tmp_path, given, built, message, mode):
    trainer = _trainer(model, tok, tmp_path, {"mode": mode, **given})
    batch = JepaDataCollator(tok.pad_token_id, mode=mode)(_examples(tok, **built)[:3])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        trainer.compute_loss(model, batch)
    # the same settings for the data: no error
    matching = dict(built, **{k: v for k, v in given.items()})
    ok = JepaDataCollator(tok.pad_token_id, mode=mode)(_examples(tok, **matching)[:3])
    assert torch.isfinite(trainer.compute_loss(model, ok))


def test_training_and_evaluation_stop_on_a_contradiction(tok, model, tmp_path):
    exs = _examples(tok, num_predictors=1)
    with pytest.raises(ValueError, match="jepa_args contradict the data: num_predictors=3"):
        _trainer(model, tok, tmp_path / "a", {"num_predictors": 3}, train_dataset=exs).train()
    with pytest.raises(ValueError, match="text_view='user_only'"):
        _trainer(model, tok, tmp_path / "b", JepaSection(text_view="user_only"), eval_dataset=exs).evaluate()
    # a full JepaSection is checked field by field: its defaults (k = 1, context, ...) match these examples
    trainer = _trainer(model, tok, tmp_path / "c", JepaSection(), train_dataset=exs)
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="num_predictors=1 but the batch was built with 0"):
        _trainer(model, tok, tmp_path / "d", JepaSection(), train_dataset=_examples(tok)).train()


def test_settings_not_given_are_not_checked(tok, model, tmp_path):
    batch = JepaDataCollator(tok.pad_token_id)(_examples(tok, num_predictors=2, text_view="user_only")[:3])
    for jepa_args in (None, {"lam": 0.5}, {"mode": "packed", "metric": "l2"}):
        assert torch.isfinite(_trainer(model, tok, tmp_path, jepa_args).compute_loss(model, batch))


@pytest.mark.parametrize("collate", [collate_packed, collate_separate])
def test_dict_rows_without_settings_are_checked_by_counting_predictors(tok, collate):
    exs = _examples(tok, num_predictors=2)
    rows = [{f: getattr(e, f) for f in LEGACY} for e in exs[:3]]  # what an earlier version stored
    batch = JepaDataCollator(tok.pad_token_id, mode="packed" if collate is collate_packed else "separate")(rows)
    assert batch[BATCH_KEY].view_settings == {}
    ids = [tok.convert_tokens_to_ids(f"<|predictor_{i}|>") for i in (1, 2, 3)]
    check_view_settings(JepaSection(num_predictors=2), batch[BATCH_KEY], ("num_predictors",), ids)
    with pytest.raises(ValueError, match="num_predictors=1 but the predicting views of the batch hold 2"):
        check_view_settings(JepaSection(num_predictors=1), batch[BATCH_KEY], ("num_predictors",), ids)
    # code→text: the predictors are on the Code view
    c2t = collate(_examples(tok, num_predictors=3, direction="code_to_text")[:3], pad_token_id=tok.pad_token_id)
    c2t = dataclasses.replace(c2t, view_settings={})
    check_view_settings(JepaSection(num_predictors=3, direction="code_to_text"), c2t, predictor_ids=ids)
    with pytest.raises(ValueError, match="hold 3 predictor"):
        check_view_settings(JepaSection(num_predictors=0, direction="code_to_text"), c2t, predictor_ids=ids)


def test_batch_records_the_view_settings_and_refuses_mixtures(tok):
    exs = _examples(tok, num_predictors=1, predictor_position="before")
    b = collate_packed(exs, pad_token_id=tok.pad_token_id)
    assert b.view_settings == {"num_predictors": 1, "predictor_position": "before", "text_view": "context",
                               "code_view": "with_system"}
    assert b.to("cpu").view_settings == b.view_settings
    rows = [dataclasses.asdict(e) for e in exs[:2]]  # e.g. a datasets.Dataset of asdict rows keeps them
    assert JepaDataCollator(tok.pad_token_id)(rows)[BATCH_KEY].view_settings == b.view_settings
    mixed = exs[:2] + _examples(tok, num_predictors=2)[:1]
    with pytest.raises(ValueError, match="different num_predictors"):
        collate_separate(mixed, pad_token_id=tok.pad_token_id)


def test_example_script_runs_offline(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, str(REPO / "examples" / "jepa_hf_trainer.py"), "--out", str(out), "--limit", "48",
           "--eval-records", "8", "--steps", "4", "--batch-size", "4", "--k", "2"]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_examples"] == 40 and summary["eval_examples"] == 8
    assert summary["first"]["jepa"] > 0 and summary["last"]["loss"] < summary["first"]["loss"]
    assert summary["eval_loss"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert "<|predictor_2|>" in tokenizer.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
