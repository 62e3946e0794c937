"""The foundation serves a unit that is not an HF model: native checkpoints, strict resume, frozen teachers,
per-example randomness across processes, metrics, run locks, checkpoint verification and config changes on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.config import load_config
from conceptlm.core.errors import CheckpointError, ConfigError, RunLockedError
from conceptlm.core.lock import RunLock
from tests.core.toy_recipe import ToyConfig, ToySection, ToyUnit, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]


def cfg_for(tmp_path: Path, name: str, **extra) -> ToyConfig:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.max_steps": 6,
            "train.micro_batch_size": 8, "train.eval_every": 0, "train.log_every": 1, "train.progress": False,
            "optim.lr": 3e-3, "schedule.warmup_steps": 1}
    base.update(extra)
    return load_config(ToyConfig, None, [f"{k}={v}" for k, v in base.items()])


def unit_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / ckpt_lib.UNIT_FILE))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


# ------------------------------------------------------------------------------------------------ training
def test_plain_module_unit_trains_with_metrics_and_native_checkpoint(tmp_path):
    calls = []
    res = train(cfg_for(tmp_path, "toy", **{"train.max_steps": 30, "train.eval_every": 10, "optim.lr": 1e-2}),
                on_eval=lambda step: calls.append(step) or {"extra": float(step)})
    ckpt = res.checkpoint
    assert (ckpt / ckpt_lib.UNIT_FILE).is_file() and (ckpt / ckpt_lib.MANIFEST).is_file()
    assert not (ckpt / "model").exists()  # no export for a plain unit
    assert ckpt_lib.verify_checkpoint(ckpt) is None
    train_rows, eval_rows = rows(res.run_dir, "train"), rows(res.run_dir, "eval")
    assert {"mse", "cos", "vectors_per_s", "loss", "grad_norm", "lr"} <= set(train_rows[0])
    assert "tokens_per_s" not in train_rows[0]
    assert [r["step"] for r in eval_rows] == [10, 20, 30] and calls == [10, 20, 30]  # eval + on_eval at cadence
    assert all({"mse", "cos", "loss", "extra"} <= set(r) for r in eval_rows)
    assert eval_rows[-1]["mse"] < eval_rows[0]["mse"] and -1.0 <= eval_rows[-1]["cos"] <= 1.0
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_eval_randomness_is_the_same_at_every_evaluation(tmp_path):
    """With lr tiny (weights ~fixed) and per-example noise on, two evaluations give the same numbers."""
    res = train(cfg_for(tmp_path, "evalrng", **{"train.max_steps": 2, "train.eval_every": 1, "optim.lr": 1e-12,
                                                  "toy.noise": 1.0}))
    a, b = rows(res.run_dir, "eval")
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-6)


def test_frozen_teacher_is_not_checkpointed_nor_optimised_and_resume_is_exact(tmp_path):
    c = {"toy.teacher": True, "schedule.kind": "constant"}  # a schedule that does not depend on max_steps
    straight = train(cfg_for(tmp_path, "straight", **c, **{"train.max_steps": 4}))
    train(cfg_for(tmp_path, "split", **c, **{"train.max_steps": 2}))
    split = train(cfg_for(tmp_path, "split", **c, **{"train.max_steps": 4, "run.resume": "auto"}))
    a, b = unit_weights(straight.run_dir, 4), unit_weights(split.run_dir, 4)
    assert not any(k.startswith("teacher.") for k in a)
    assert max_diff(a, b) == 0.0
    unit = ToyUnit(ToySection(teacher=True))
    keys = ckpt_lib.checkpoint_keys(unit)
    assert set(keys) == set(a) and "teacher.weight" not in keys
    # items seen (vectors: batch 8 x seq 8 per step) are logged and continue across the resume
    seen = [(r["step"], r["vectors_seen"]) for r in rows(split.run_dir, "train")]
    assert seen == [(s, 64.0 * s) for s in range(1, 5)]
    assert rows(split.run_dir, "eval")[-1]["vectors_seen"] == 256.0
    opt_state = torch.load(split.checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    n_trainable = sum(1 for n, p in unit.named_parameters() if p.requires_grad)
    assert len(opt_state) == n_trainable and n_trainable == len(a)


def test_frozen_module_with_trainable_params_is_refused(tmp_path):
    class Bad(ToyUnit):
        def frozen_modules(self):
            return ["prenet"]

    from conceptlm.core.distributed import DistInfo
    from conceptlm.core.trainer import Trainer

    cfg = cfg_for(tmp_path, "bad")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="frozen module 'prenet' has trainable parameter"):
        Trainer(Bad(ToySection()), cfg, info, train_batches=lambda s: []).fit()


def test_fsdp_units_cover_every_stack_but_not_frozen_ones():
    class TwoTowers(ToyUnit):
        def __init__(self):
            super().__init__(ToySection(teacher=True))
            from conceptlm.core.modules import Decoder, DecoderConfig
            self.denoiser = Decoder(DecoderConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64))
            self.frozen_stack = Decoder(DecoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64))
            self.frozen_stack.requires_grad_(False)

        def frozen_modules(self):
            return ["teacher", "frozen_stack"]

    unit = TwoTowers()
    got = unit.fsdp_units()
    assert len(got) == 2 + 3
    assert {id(m) for m in got} == {id(m) for m in [*unit.decoder.layers, *unit.denoiser.layers]}


# ------------------------------------------------------------------------------------------------ strict loading
def _saved_unit(tmp_path: Path) -> tuple[ToyUnit, Path, dict]:
    unit = ToyUnit(ToySection())
    path = tmp_path / "ckpt"
    path.mkdir()
    sd = {k: v.detach().clone() for k, v in unit.state_dict().items() if k in ckpt_lib.checkpoint_keys(unit)}
    return unit, path, sd


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_strict_load_names_the_bad_tensor(tmp_path, case):
    unit, path, sd = _saved_unit(tmp_path)
    if case == "missing":
        sd.pop("postnet.bias")
        match = "tensor 'postnet.bias' is missing"
    elif case == "unexpected":
        sd["extra.weight"] = torch.zeros(2)
        match = "unexpected tensor 'extra.weight'"
    else:
        sd["prenet.weight"] = torch.zeros(3, 3)
        match = r"tensor 'prenet.weight' has shape \(3, 3\), the model expects \(32, 8\)"
    save_file(sd, str(path / ckpt_lib.UNIT_FILE))
    with pytest.raises(CheckpointError, match=match):
        ckpt_lib.load_unit_state(unit, path)


def test_strict_load_round_trip_and_foreign_file(tmp_path):
    unit, path, sd = _saved_unit(tmp_path)
    save_file(sd, str(path / ckpt_lib.UNIT_FILE))
    other = ToyUnit(ToySection())
    ckpt_lib.load_unit_state(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    (path / ckpt_lib.UNIT_FILE).write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt_lib.load_unit_state(other, path)


def test_resume_through_trainer_with_a_tampered_tensor_names_it(tmp_path):
    res = train(cfg_for(tmp_path, "tamper", **{"train.max_steps": 2}))
    ckpt = res.checkpoint
    sd = load_file(str(ckpt / ckpt_lib.UNIT_FILE))
    sd.pop("decoder.layers.1.mlp.w_down.weight" if "decoder.layers.1.mlp.w_down.weight" in sd else sorted(sd)[-1])
    save_file(sd, str(ckpt / ckpt_lib.UNIT_FILE))
    (ckpt / ckpt_lib.MANIFEST).unlink()  # not detected as damaged: the strict load must catch it
    with pytest.raises(CheckpointError, match="is missing from the checkpoint"):
        train(cfg_for(tmp_path, "tamper", **{"train.max_steps": 4, "run.resume": str(ckpt)}))


# ------------------------------------------------------------------------------------------------ hardening
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    c = {"schedule.kind": "constant"}
    ref = train(cfg_for(tmp_path, "ref", **c, **{"train.max_steps": 8}))
    train(cfg_for(tmp_path, "trunc", **c, **{"train.max_steps": 6, "train.save_every": 2,
                                              "train.keep_checkpoints": 3}))
    run_dir = tmp_path / "runs" / "trunc"
    newest = run_dir / "checkpoints" / "step_00000006" / ckpt_lib.UNIT_FILE
    newest.write_bytes(newest.read_bytes()[:100])
    (run_dir / "checkpoints" / ".tmp-step_00000008.abc").mkdir()  # what a killed save leaves behind
    assert "truncated" in ckpt_lib.verify_checkpoint(newest.parent)
    with caplog.at_level("WARNING"):
        res = train(cfg_for(tmp_path, "trunc", **c, **{"train.max_steps": 8, "train.save_every": 2,
                                                   "train.keep_checkpoints": 3, "run.resume": "auto"}))
    assert "skipping damaged checkpoint" in caplog.text and "step_00000006" in caplog.text
    assert max_diff(unit_weights(ref.run_dir, 8), unit_weights(res.run_dir, 8)) == 0.0
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_a_second_run_on_a_locked_folder_is_refused_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("# the first run's config\n")
    with RunLock(run_dir):  # a live run holds it
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            train(cfg_for(tmp_path, "busy"))
    assert (run_dir / "config.yaml").read_text() == "# the first run's config\n"
    assert not (run_dir / "checkpoints").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "runs" / "stale"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with caplog.at_level("WARNING"):
        res = train(cfg_for(tmp_path, "stale", **{"train.max_steps": 1}))
    assert res.step == 1 and "taking over the lock left by pid 999999" in caplog.text
    assert (run_dir / ".lock").read_text() == ""  # released cleanly


def test_changed_hyperparameter_on_resume_is_refused_or_applied(tmp_path):
    train(cfg_for(tmp_path, "chg", **{"train.max_steps": 2, "schedule.kind": "constant"}))
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.001.*run.resume_changes=apply"):
        train(cfg_for(tmp_path, "chg", **{"train.max_steps": 4, "run.resume": "auto", "optim.lr": 1e-3,
                                          "schedule.kind": "constant"}))
    res = train(cfg_for(tmp_path, "chg", **{"train.max_steps": 4, "run.resume": "auto", "optim.lr": 1e-3,
                                            "schedule.kind": "constant", "run.resume_changes": "apply"}))
    lrs = [r["lr"] for r in rows(res.run_dir, "train")]
    assert lrs[:2] == pytest.approx([3e-3, 3e-3]) and lrs[2:] == pytest.approx([1e-3, 1e-3])


def test_bad_resume_path_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="run.resume=auto"):
        train(cfg_for(tmp_path, "badpath", **{"run.resume": str(tmp_path / "nowhere")}))
    assert not (tmp_path / "runs" / "badpath").exists()


# ------------------------------------------------------------------------------------------------ processes
def _env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", CONCEPTLM_NO_PROGRESS="1")
    return e


def _cmd(tmp_path: Path, name: str, nproc: int = 1, **extra) -> list[str]:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.eval_every": 0, "train.progress": False,
            "train.log_every": 1, "schedule.warmup_steps": 1, "toy.noise": 0.5}
    base.update(extra)
    args = [f"{k}={v}" for k, v in base.items()]
    if nproc == 1:
        return [sys.executable, "-m", "tests.core.toy_recipe", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tests.core.toy_recipe", *args]


@pytest.mark.distributed
@pytest.mark.parametrize("strategy,teacher", [("ddp", False), ("fsdp", True)])
def test_two_processes_with_per_example_noise_equal_one_process(tmp_path, strategy, teacher):
    steps = 4
    subprocess.run(_cmd(tmp_path, "one", **{"train.max_steps": steps, "train.micro_batch_size": 8,
                                            "toy.teacher": teacher}),
                   check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)
    r = subprocess.run(_cmd(tmp_path, "two", nproc=2, **{"train.max_steps": steps, "train.micro_batch_size": 2,
                                                         "train.grad_accum": 2, "dist.strategy": strategy,
                                                         "toy.teacher": teacher}),
                       env=_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = unit_weights(tmp_path / "runs" / "one", steps), unit_weights(tmp_path / "runs" / "two", steps)
    assert max_diff(a, b) <= 1e-5
    if teacher:
        assert not any(k.startswith("teacher.") for k in b)
        return
    # and the noise matters: without it the weights differ
    subprocess.run(_cmd(tmp_path, "clean", **{"train.max_steps": steps, "train.micro_batch_size": 8,
                                              "toy.noise": 0.0, "toy.teacher": teacher}),
                   check=True, env=_env(), cwd=REPO, timeout=300, capture_output=True)
    assert max_diff(a, unit_weights(tmp_path / "runs" / "clean", steps)) > 1e-4


@pytest.mark.distributed
def test_sigkill_then_resume_auto_gives_identical_weights(tmp_path):
    steps = 60
    extra = {"train.max_steps": steps, "train.save_every": 2, "run.resume": "auto", "train.micro_batch_size": 4}
    subprocess.run(_cmd(tmp_path, "ref", **extra), check=True, env=_env(), cwd=REPO, timeout=300,
                   capture_output=True)
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen(_cmd(tmp_path, "killed", **extra), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_00000010").exists():
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert done and done[-1] < f"step_{steps:08d}", done
    subprocess.run(_cmd(tmp_path, "killed", **extra), check=True, env=_env(), cwd=REPO, timeout=300,
                   capture_output=True)
    assert max_diff(unit_weights(tmp_path / "runs" / "ref", steps), unit_weights(run_dir, steps)) == 0.0
    assert len(rows(run_dir, "train")) == steps
