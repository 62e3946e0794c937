"""LLM-JEPA on the one loop: off-switch equivalence with SFT, packed == separate through training, loss dropout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conceptlm.core.config import load_config
from conceptlm.jepa.config import JepaConfig
from conceptlm.jepa.recipe import train as jepa_train
from conceptlm.jepa.unit import jepa_step_active
from conceptlm.sft.config import SFTConfig
from conceptlm.sft.recipe import train as sft_train
from tests.conftest import tiny_overrides


def final(run_dir):
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model" / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def jepa_cfg(tmp_path, train_file, **kw):
    return load_config(JepaConfig, None, tiny_overrides(tmp_path, train_file, **kw))


def test_lambda_zero_is_sft_bit_for_bit(tmp_path, chat_files):
    sft = load_config(SFTConfig, None, tiny_overrides(tmp_path, chat_files[0], **{"run.name": "sft"}))
    sft_train(sft)
    jcfg = jepa_cfg(tmp_path, chat_files[0], **{"run.name": "j0", "jepa.lam": 0.0, "jepa.num_predictors": 0})
    jepa_train(jcfg)
    assert max_diff(final(sft.run_dir), final(jcfg.run_dir)) == 0.0


@pytest.mark.parametrize("text_view", ["context", "user_only"])
def test_packed_equals_separate_after_training(tmp_path, chat_files, text_view):
    runs = {}
    for mode in ("packed", "separate"):
        cfg = jepa_cfg(tmp_path, chat_files[0], **{"run.name": f"{mode}", "jepa.mode": mode, "jepa.lam": 1.0,
                                                   "jepa.num_predictors": 2, "jepa.text_view": text_view,
                                                   "train.max_steps": 3, "optim.lr": 1e-3})
        res = jepa_train(cfg)
        runs[mode] = (final(cfg.run_dir), res)
    assert max_diff(runs["packed"][0], runs["separate"][0]) <= 1e-5
    assert runs["packed"][1].last_train["jepa"] == pytest.approx(runs["separate"][1].last_train["jepa"], abs=1e-5)


def test_jepa_term_changes_training(tmp_path, chat_files):
    a = jepa_cfg(tmp_path, chat_files[0], **{"run.name": "a", "jepa.lam": 0.0})
    b = jepa_cfg(tmp_path, chat_files[0], **{"run.name": "b", "jepa.lam": 2.0})
    jepa_train(a)
    res = jepa_train(b)
    assert res.last_train["jepa"] > 0
    assert max_diff(final(a.run_dir), final(b.run_dir)) > 1e-4


def test_jepa_ratio_draws_are_seeded_and_match_the_rate():
    draws = [jepa_step_active(0, s, 0.25) for s in range(2000)]
    assert draws == [jepa_step_active(0, s, 0.25) for s in range(2000)]  # reproducible (and rank-independent)
    assert 0.22 < sum(draws) / len(draws) < 0.28
    assert draws != [jepa_step_active(1, s, 0.25) for s in range(2000)]
    assert all(jepa_step_active(0, s, 1.0) for s in range(10))
    assert not any(jepa_step_active(0, s, 0.0) for s in range(10))


def test_jepa_ratio_skips_steps_in_training(tmp_path, chat_files):
    cfg = jepa_cfg(tmp_path, chat_files[0], **{"run.name": "r", "jepa.jepa_ratio": 0.5, "train.max_steps": 8})
    jepa_train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    has_jepa = [("jepa" in r) for r in train_rows]
    assert has_jepa == [jepa_step_active(cfg.train.seed, s, 0.5) for s in range(8)]
    assert any(has_jepa) and not all(has_jepa)


def test_analysis_functions_values():
    from conceptlm.jepa.analysis import linear_map_residual, pca_2d, top_singular_values

    a = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b = torch.zeros(3, 2)
    assert top_singular_values(a, b).tolist() == pytest.approx([3.0, 1.0])
    # A = [[1],[1]], B = [[1],[3]]: best X = 2, residual sqrt((1-2)^2 + (3-2)^2)
    assert linear_map_residual(torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [3.0]])) == pytest.approx(2 ** 0.5)
    x = torch.randn(50, 4, dtype=torch.float64)
    assert linear_map_residual(x, x @ torch.randn(4, 4, dtype=torch.float64)) < 1e-9  # exactly linear -> 0
    pts = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 0.1]])
    proj = pca_2d(pts)
    assert proj[:, 0].abs().tolist() == pytest.approx([2.0, 0.0, 2.0], abs=0.01)


def test_train_eval_analyze_cli(tmp_path, chat_files, capsys):
    from conceptlm.cli import main

    ov = tiny_overrides(tmp_path, chat_files[0], chat_files[1], **{"train.max_steps": 2,
                                                                    "generate.max_new_tokens": 8})
    assert main(["jepa", "train", *ov]) == 0
    capsys.readouterr()
    assert main(["jepa", "eval", *ov]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 48
    assert main(["jepa", "analyze", *ov]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 48 and res["d"] == 32 and res["top_singular_mean"] > 0
    assert (tmp_path / "runs" / "t" / "analysis" / "projection.png").stat().st_size > 1000


@pytest.mark.parametrize("bad,field", [
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', "messages"),           # no assistant turn
    (b'{"views": ["only one"]}\n', "views"),                                         # paraphrase group too short
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "text": 3}\n',
     "text"),
    (b'not json\n', None),
])
def test_bad_jepa_records_give_one_clear_line(tmp_path, capsys, bad, field):
    from conceptlm.cli import main
    from tests.conftest import make_chat_records

    good = "".join(json.dumps(r) + "\n" for r in make_chat_records(2)).encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(good + bad + good)
    assert main(["jepa", "train", *tiny_overrides(tmp_path, path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("conceptlm: error: ") and "train.jsonl:3" in err and len(err.splitlines()) == 1
    if field:
        assert f"field '{field}" in err
    assert not (tmp_path / "runs").exists()


def test_jepa_with_lora_trains_adapters_only(tmp_path, chat_files):
    from conceptlm.core.hf import load_causal_lm

    cfg = jepa_cfg(tmp_path, chat_files[0], **{"run.name": "lora", "model.lora.enabled": "true", "model.lora.r": 4,
                                               "jepa.num_predictors": 1, "train.max_steps": 2, "optim.lr": 1e-2})
    res = jepa_train(cfg)
    assert res.last_train["jepa"] > 0
    model_dir = res.checkpoint / "model"
    assert (model_dir / "adapter_model.safetensors").is_file()
    base = load_file(str(cfg.run_dir / "base_model" / "model.safetensors"))
    adapter = load_file(str(model_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # only LoRA weights trained and saved
    model = load_causal_lm(model_dir)  # base (with the predictor tokens) + adapter
    assert model.get_input_embeddings().weight.shape[0] == base["model.embed_tokens.weight"].shape[0]


def test_eval_and_analyze_a_model_without_predictor_tokens(tmp_path, chat_files, capsys, caplog):
    """``--checkpoint`` takes any model (here an SFT run's export): analyze adds the k predictor tokens with
    mean-initialised rows, the state a JEPA run starts from, and says so; a missing .gguf is one clear line."""
    import logging

    from conceptlm.cli import main

    ov = tiny_overrides(tmp_path, chat_files[0], chat_files[1], **{"train.max_steps": 2, "run.name": "sft",
                                                                    "generate.max_new_tokens": 4})
    assert main(["sft", "train", *ov]) == 0
    model_dir = sorted((tmp_path / "runs" / "sft" / "checkpoints").glob("step_*"))[-1] / "model"
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    capsys.readouterr()
    jov = [*ov, "run.name=j", "jepa.num_predictors=2"]
    with caplog.at_level(logging.INFO, logger="conceptlm.jepa.recipe"):
        assert main(["jepa", "analyze", *jov, "--checkpoint", str(model_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 48 and res["checkpoint"] == str(model_dir)
    assert "has no predictor tokens: added 2" in caplog.text
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == vocab  # the model dir is untouched
    assert main(["jepa", "eval", *jov, "--checkpoint", str(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 48
    assert main(["jepa", "eval", *jov, "--checkpoint", str(tmp_path / "absent.Q4_0.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "absent.Q4_0.gguf" in err and "does not exist" in err and len(err.splitlines()) == 1
