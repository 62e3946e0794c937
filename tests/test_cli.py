"""The conceptlm command: help everywhere, python -m, one-line errors for bad input that leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conceptlm.cli import main
from tests.conftest import make_chat_records, tiny_overrides, write_jsonl


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "conceptlm", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "sft" in r.stdout


@pytest.mark.parametrize("argv", [["sft", "--help"], ["sft", "train", "--help"], ["sft", "eval", "--help"],
                                  ["demo", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: conceptlm" in capsys.readouterr().out


@pytest.mark.parametrize("method, verb", [("lcm", "prepare"), ("lcm", "cost"), ("cocomix", "pipeline"),
                                          ("cocomix", "report")])
def test_verbs_that_take_no_checkpoint_do_not_offer_it(method, verb, capsys):
    from conceptlm.cli import METHODS

    assert not METHODS[method].verbs[verb].takes_checkpoint
    with pytest.raises(SystemExit) as e:
        main([method, verb, "--help"])
    assert e.value.code == 0 and "--checkpoint" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # refused by argparse, before any config is read
        main([method, verb, "--checkpoint", "x"])
    assert e.value.code == 2 and "unrecognized arguments: --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sft", "eval", "--help"])
    assert "--checkpoint" in capsys.readouterr().out


BAD_LINES = {
    "invalid json": (b'{"messages": [}\n', "train.jsonl:3", None),
    "missing role": (b'{"messages": [{"content": "x"}]}\n', "train.jsonl:3", "messages[0].role"),
    "empty content": (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}\n',
                      "train.jsonl:3", "messages[1].content"),
    "wrong type": (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}\n',
                   "train.jsonl:3", "messages[0].content"),
    "non utf-8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "train.jsonl:3", None),
    "too long": (json.dumps({"messages": [{"role": "user", "content": "dog " * 200},
                                          {"role": "assistant", "content": "x"}]}).encode() + b"\n",
                 "train.jsonl:3", "messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_data_gives_one_clear_line_and_writes_nothing(tmp_path, capsys, case):
    bad, where, field = BAD_LINES[case]
    good = "".join(json.dumps(r) + "\n" for r in make_chat_records(2)).encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(good + bad + good)
    code = main(["sft", "train", *tiny_overrides(tmp_path, path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("conceptlm: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert where in err
    if field:
        assert f"field '{field}'" in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bad_config_gives_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# conceptlm sft train --config c.yaml\ntrain:\n  max_stepz: 3\n")
    assert main(["sft", "train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:3: field 'train.max_stepz': unknown key; did you mean 'max_steps'?" in err


def test_train_then_eval_through_cli(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64, seed=3))
    evalf = write_jsonl(tmp_path / "eval.jsonl", make_chat_records(10, seed=4))
    ov = tiny_overrides(tmp_path, train, evalf, **{"train.max_steps": 2, "generate.max_new_tokens": 8})
    assert main(["sft", "train", *ov]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and out["checkpoint"].endswith("step_00000002")
    assert main(["sft", "eval", *ov]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 10 and 0.0 <= res["accuracy"] <= 1.0
    rows = [json.loads(line) for line in open(res["predictions"], encoding="utf-8")]
    assert len(rows) == 10 and {"prompt", "reference", "prediction", "correct"} <= rows[0].keys()


def test_eval_with_exact_on_a_set_whose_scorer_is_known_warns(tmp_path, capsys, caplog):
    """A forgotten generate.scorer does not score silently the wrong way: exact match on Spider data warns (log and
    result JSON) and still scores as asked."""
    train = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64, seed=3))
    evalf = write_jsonl(tmp_path / "spider_dev.jsonl", make_chat_records(4, seed=4))
    ov = tiny_overrides(tmp_path, train, evalf, **{"train.max_steps": 2, "generate.max_new_tokens": 4})
    assert main(["sft", "train", *ov]) == 0
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(["sft", "eval", *ov]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 4
    assert res["scorer_warning"].startswith(f"{evalf} looks like Spider: generate.scorer=exact")
    assert res["scorer_warning"].endswith("generate.scorer=sql")
    assert any("looks like Spider" in r.getMessage() for r in caplog.records)


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's main job, shortened to 2 steps per arm."""
    assert main(["demo", "--out-dir", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{\n"):])
    assert set(summary["jepa"]["arms"]) == {"ntp", "jepa"}
    for arm in summary["jepa"]["arms"].values():
        assert arm["n_test"] == 300 and 0.0 <= arm["semantic_regex_accuracy"]["value"] <= 1.0
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 1000
    cocomix = summary["cocomix"]
    assert set(cocomix["final_val_loss"]) == {"ntp", "cocomix"} and cocomix["tokens_fraction_of_ntp"]["ntp"] == 1.0
    assert "| cocomix |" in out and all(Path(p).stat().st_size > 1000 for p in cocomix["plots"])
    lcm = summary["lcm"]
    assert lcm["sentences"] > 0 and {"l2", "l2_prev", "ca", "l2_r"} <= set(lcm["teacher_forced"])
    assert "continuation (" in out and Path(lcm["generate"]).is_file()
    tt = lcm["two_tower"]  # the diffusion continuation
    assert "Two-Tower continuations" in out and Path(tt["generate"]).is_file()
    assert {"l2", "l2_prev", "ca", "l2_r"} <= set(tt["teacher_forced"])


def test_plot_verb(tmp_path, capsys):
    for name, losses in (("a", [3.0, 2.0, 1.5]), ("b", [3.0, 2.5, 2.0])):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": i + 1, "split": "train", "loss": v} for i, v in enumerate(losses)]
        rows.append({"step": 3, "split": "eval", "loss": losses[-1] + 0.1})
        write_jsonl(run / "metrics.jsonl", rows)
    out = tmp_path / "c.png"
    assert main(["plot", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", f"x={tmp_path / 'missing'}", "--out", str(out)]) == 2
    assert "no metrics file" in capsys.readouterr().err
