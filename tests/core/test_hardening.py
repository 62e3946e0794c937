"""Hardening of the run foundation (issue 19): a refused resume changes nothing, damaged checkpoints are not silently
ignored, tokenizer training stays linear on text without whitespace, config and data errors name their real source,
the GGUF conversion bar obeys CONCEPTLM_NO_PROGRESS, and a full disk is one line with the last checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import time
from pathlib import Path

import pytest

from conceptlm.cli import main
from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core import tokenizer as tokmod
from conceptlm.core.config import load_config
from conceptlm.core.errors import CheckpointError, ConfigError, DataError
from tests.conftest import make_chat_records, tiny_overrides, write_jsonl
from tests.core.toy_recipe import ToyConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
LCM_TINY = REPO / "configs" / "lcm" / "tiny_cpu.yaml"
SFT_TINY = REPO / "configs" / "sft" / "tiny_cpu.yaml"


def toy_cfg(tmp_path: Path, name: str, **extra) -> ToyConfig:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.max_steps": 2,
            "train.micro_batch_size": 8, "train.eval_every": 0, "train.log_every": 1, "train.progress": False,
            "optim.lr": 3e-3, "schedule.warmup_steps": 1, "toy.n_eval": 0}
    base.update(extra)
    return load_config(ToyConfig, None, [f"{k}={v}" for k, v in base.items()])


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock" and "tb" not in p.relative_to(run_dir).parts}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conceptlm: error:"), err
    return err


# ------------------------------------------------------------------------------------------------ resume
def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path):
    train(toy_cfg(tmp_path, "r"), command="first command")
    run_dir = tmp_path / "runs" / "r"
    before = run_files(run_dir)
    assert b"first command" in before["config.yaml"] and b"0.003" in before["config.yaml"]
    # refused by the config check: optim.lr differs from the checkpoint's
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.001"):
        train(toy_cfg(tmp_path, "r", **{"train.max_steps": 4, "run.resume": "auto", "optim.lr": 1e-3}),
              command="second command")
    assert run_files(run_dir) == before
    # accepted by the config check (run.resume_changes=apply) but refused by the trainer: the data order differs
    with pytest.raises(ConfigError, match="data order differs"):
        train(toy_cfg(tmp_path, "r", **{"train.max_steps": 4, "run.resume": "auto", "toy.n_examples": 48,
                                        "run.resume_changes": "apply"}), command="third command")
    assert run_files(run_dir) == before
    # an accepted resume does write the new config
    res = train(toy_cfg(tmp_path, "r", **{"train.max_steps": 3, "run.resume": "auto"}), command="fourth command")
    assert res.step == 3
    text = (run_dir / "config.yaml").read_text()
    assert text.startswith("# fourth command\n") and "max_steps: 3" in text


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(tmp_path):
    train(toy_cfg(tmp_path, "dmg", **{"train.max_steps": 4, "train.save_every": 2}))
    run_dir = tmp_path / "runs" / "dmg"
    ckpts = ckpt_lib.list_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    for c in ckpts:
        f = c / ckpt_lib.UNIT_FILE
        f.write_bytes(f.read_bytes()[:50])
    before = run_files(run_dir)
    with pytest.raises(CheckpointError) as err:
        train(toy_cfg(tmp_path, "dmg", **{"train.max_steps": 6, "train.save_every": 2, "run.resume": "auto"}))
    msg = str(err.value)
    assert "\n" not in msg and "every checkpoint" in msg
    assert "step_00000002" in msg and "step_00000004" in msg and "truncated" in msg
    assert run_files(run_dir) == before  # nothing started over, nothing overwritten


# ------------------------------------------------------------------------------------------------ tokenizer
def _cjk(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(chr(0x4E00 + rng.randrange(300)) for _ in range(n))


def _words(n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(_cjk(rng.randint(1, 9), rng.randrange(10**6)) for _ in range(n // 5))[:n]


def test_the_trainer_never_sees_a_run_without_whitespace_longer_than_the_bound():
    bound = tokmod.MAX_TRAINING_RUN
    assert 64 <= bound <= 1024
    long_text = "start " + "x" * (5 * bound + 7) + " middle\n" + _cjk(3 * bound) + "\tend" + " " * (2 * bound + 1)
    texts = ["plain short text", long_text, "y" * (bound + 1), "a" + " \n" * bound + "b"]
    pieces = list(tokmod._encodable(texts))
    assert max(len(run) for p in pieces for run in re.findall(r"\S+|\s+", p)) <= bound
    assert "".join(pieces) == "".join(texts)  # nothing lost or added, only cut
    assert pieces[0] == "plain short text"


def test_text_with_whitespace_trains_the_same_tokenizer_as_before(monkeypatch):
    texts = [r["messages"][1]["content"] + " " + r["messages"][2]["content"] for r in make_chat_records(200)]
    new = tokmod.train_bpe_tokenizer(texts, vocab_size=400)
    monkeypatch.setattr(tokmod, "_bounded_runs", lambda text: iter([text]))  # the behaviour before the bound
    old = tokmod.train_bpe_tokenizer(texts, vocab_size=400)
    assert new.get_vocab() == old.get_vocab()
    assert json.loads(new.backend_tokenizer.to_str())["model"]["merges"] == \
        json.loads(old.backend_tokenizer.to_str())["model"]["merges"]


def test_training_on_a_long_line_without_whitespace_is_linear():
    """100k CJK characters in one line took ~25-40 s (quadratic), as did 100k blanks; text of the same size with
    spaces ~0.3 s. Measured side by side."""
    n = 100_000
    normal, line, blanks = _words(n), _cjk(n), "a" + " " * n + "b"
    t0 = time.perf_counter()
    tokmod.train_bpe_tokenizer([normal], vocab_size=2048)
    t_normal = time.perf_counter() - t0
    for text in (line, blanks):
        t0 = time.perf_counter()
        tok = tokmod.train_bpe_tokenizer([text], vocab_size=2048)
        t_text = time.perf_counter() - t0
        assert t_text < 5 * t_normal + 2.0, (t_text, t_normal)
        assert tok.decode(tok(text[:1000])["input_ids"]) == text[:1000]


# ------------------------------------------------------------------------------------------------ config errors
def test_an_unknown_key_from_an_override_is_blamed_on_the_override():
    for override in ("nosuch.key=1", "nosuch=1"):
        with pytest.raises(ConfigError) as err:
            load_config(ToyConfig, None, [override])
        assert str(err.value).startswith("command-line override: field 'nosuch'"), err.value
    from conceptlm.lcm.config import LCMConfig

    with pytest.raises(ConfigError) as err:
        load_config(LCMConfig, LCM_TINY, ["nosuch.key=1"])
    assert str(err.value).startswith("command-line override: field 'nosuch': unknown key"), err.value


@pytest.mark.parametrize("text, line, field", [
    ("run:\n  name: a\ntrain:\n  max_steps: 3\nrun:\n  name: b\n", 5, "run"),
    ("train:\n  max_steps: 3\n  seed: 1\n  max_steps: 4\n", 4, "train.max_steps"),
])
def test_duplicate_keys_in_a_yaml_file_are_an_error(tmp_path, text, line, field):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, path)
    assert str(err.value).startswith(f"{path}:{line}: field '{field}': duplicate key"), err.value


def test_a_bad_model_size_names_the_field_and_the_override(capsys):
    from conceptlm.sft.config import SFTConfig

    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, SFT_TINY, ["model.hidden_size=-64"])
    assert str(err.value) == "command-line override: field 'model.hidden_size': must be > 0"
    assert main(["sft", "eval", "--config", str(SFT_TINY), "model.hidden_size=-64"]) == 2
    assert "field 'model.hidden_size'" in one_line_error(capsys)


def test_a_nested_generate_field_is_named_with_its_source(tmp_path, capsys):
    from conceptlm.lcm.config import LCMConfig

    with pytest.raises(ConfigError) as err:
        load_config(LCMConfig, LCM_TINY, ["generate.diffusion.inference_steps=0"])
    assert str(err.value) == "command-line override: field 'generate.diffusion.inference_steps': must be >= 1"
    assert main(["lcm", "cost", "--config", str(LCM_TINY), "generate.diffusion.inference_steps=0"]) == 2
    assert "field 'generate.diffusion.inference_steps'" in one_line_error(capsys)
    # the same mistake in a file names the file and line; a GenerationOptions field of its own is named too
    path = tmp_path / "gen.yaml"
    path.write_text("generate:\n  max_new_sentences: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(LCMConfig, path)
    assert str(err.value) == f"{path}:2: field 'generate.max_new_sentences': must be >= 1"
    path.write_text("generate:\n  diffusion:\n    inference_steps: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(LCMConfig, path)
    assert str(err.value) == f"{path}:3: field 'generate.diffusion.inference_steps': must be >= 1"


@pytest.mark.parametrize("name", ["..", ".", "a/..", "..\\x"])
def test_run_names_that_escape_the_output_folder_are_refused(tmp_path, capsys, name):
    with pytest.raises(ConfigError, match="field 'run.name'"):
        load_config(ToyConfig, None, [f"run.name={name}", f"run.out_dir={tmp_path}"])
    assert main(["lcm", "cost", "--config", str(LCM_TINY), f"run.name={name}",
                 f"run.out_dir={tmp_path / 'out'}"]) == 2
    assert "field 'run.name'" in one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cost").exists()


@pytest.mark.parametrize("line, key", [
    ('{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "assistant", "content": "b"}]}',
     "messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "role": "user"}]}',
     "role"),
])
def test_duplicate_keys_in_a_json_record_are_an_error(tmp_path, line, key):
    from conceptlm.data.chat import read_chat_jsonl

    path = tmp_path / "d.jsonl"
    good = json.dumps(make_chat_records(1)[0])
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_chat_jsonl(path)
    assert str(err.value) == f"{path}:2: duplicate key {key!r} in a JSON object (which value is meant?)"


# ------------------------------------------------------------------------------------------------ GGUF bar
@pytest.mark.parametrize("env, shown", [("1", False), ("0", True)])
def test_the_gguf_conversion_bar_obeys_the_variable(monkeypatch, tmp_path, capsys, env, shown):
    pytest.importorskip("gguf")
    import transformers
    from transformers import modeling_gguf_pytorch_utils as reader

    from conceptlm.core import gguf
    from conceptlm.core.hf import ModelPathError

    monkeypatch.setenv("CONCEPTLM_NO_PROGRESS", env)
    original = reader.tqdm

    def fake_from_pretrained(*args, **kwargs):  # what transformers' GGUF reader does: a tqdm over the tensors
        for _ in reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        raise OSError("stop after the bar")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelPathError, match="stop after the bar"):
        gguf.resolve_model_path(f, cache=tmp_path / "cache")
    assert ("de-quantizing GGUF tensors" in capsys.readouterr().err) == shown
    assert reader.tqdm is original  # put back after the conversion


# ------------------------------------------------------------------------------------------------ full disk
def _full_disk_on_call(n: int, real):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))
        return real(*args, **kwargs)
    return fail


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64))
    over = tiny_overrides(tmp_path, data, **{"train.save_every": 2, "train.max_steps": 4})
    monkeypatch.setattr(ckpt_lib, "save_file", _full_disk_on_call(2, ckpt_lib.save_file))
    assert main(["sft", "train", *over]) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "cannot write checkpoint" in err and "step_00000004" in err
    run_dir = tmp_path / "runs" / "t"
    assert [c.name for c in ckpt_lib.list_checkpoints(run_dir)] == ["step_00000002"]
    assert ckpt_lib.verify_checkpoint(run_dir / "checkpoints" / "step_00000002") is None
    assert "the newest complete checkpoint is" in err and err.rstrip().endswith("step_00000002")
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_torch_save_running_out_of_space_is_a_checkpoint_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ckpt_lib.torch, "save", fail)
    with pytest.raises(CheckpointError, match="file write failed.*no checkpoint was written"):
        train(toy_cfg(tmp_path, "ts"))
    assert not ckpt_lib.list_checkpoints(tmp_path / "runs" / "ts")


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    from conceptlm.core import metrics

    data = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64))
    over = tiny_overrides(tmp_path, data, **{"train.save_every": 2, "train.max_steps": 4})
    real = metrics.MetricLogger.log
    calls = []

    def log(self, step, split, values):
        calls.append(step)
        if step == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real(self, step, split, values)

    monkeypatch.setattr(metrics.MetricLogger, "log", log)
    assert main(["sft", "train", *over]) == 2
    err = one_line_error(capsys)
    assert "metrics.jsonl: No space left on device" in err
    run_dir = tmp_path / "runs" / "t"
    assert ckpt_lib.verify_checkpoint(run_dir / "checkpoints" / "step_00000002") is None
