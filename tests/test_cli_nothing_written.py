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
