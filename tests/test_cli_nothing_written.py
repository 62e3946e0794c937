"""Errors that used to fire after the run folder was created now come first: one line, exit 2, nothing written."""

from __future__ import annotations

import pytest

from conceptlm.cli import main
from conceptlm.eval.scorers import SCORERS
from conceptlm.lm.config import SCORER_NAMES, GenerateSection
from tests.conftest import make_chat_records, tiny_overrides, write_jsonl

CASES = {
    "context shorter than data.max_length": ({"model.max_position_embeddings": 64, "data.max_length": 128},
                                             "field 'data.max_length'"),
    "bad run.resume path": ({"run.resume": "no/such/ckpt"}, "run.resume=auto"),
    "fewer records than one global batch": ({"train.micro_batch_size": 64, "train.grad_accum": 8},
                                            "global batch"),
    "unknown scorer": ({"generate.scorer": "bleu"}, "field 'generate.scorer'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_before_anything_is_written(tmp_path, capsys, case):
    extra, expected = CASES[case]
    data = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64))
    code = main(["sft", "train", *tiny_overrides(tmp_path, data, **extra)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("conceptlm: error:") and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_scorer_choices_match_the_registry():
    assert set(SCORER_NAMES) == set(SCORERS)
    import typing
    assert set(typing.get_args(typing.get_type_hints(GenerateSection)["scorer"])) == set(SCORERS)


def test_eval_with_corrupt_or_foreign_weights_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64))
    over = tiny_overrides(tmp_path, data, **{"train.max_steps": 1, "schedule.warmup_steps": 0})
    assert main(["sft", "train", *over]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "runs" / "t" / "checkpoints" / "step_00000001"
    weights = ckpt / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated: the manifest no longer matches
    assert main(["sft", "eval", *over, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged checkpoint" in err and "model.safetensors" in err, err
    foreign = tmp_path / "foreign"  # a model folder with a config but garbage weights, no manifest
    foreign.mkdir()
    (foreign / "config.json").write_text((ckpt / "model" / "config.json").read_text())
    (foreign / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (foreign / f).write_text((ckpt / "model" / f).read_text())
    assert main(["sft", "eval", *over, "--checkpoint", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load the model" in err, err
