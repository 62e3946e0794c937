"""Sharded checkpoints (``dist.checkpoint: sharded``, FSDP2 + torch.distributed.checkpoint) on CPU with 2 processes:
per-rank shards and the checkpoint protocol, bit-exact resume, the same values as a full checkpoint of the same run,
consolidation and whole reads on one process, resume at another world size, damaged and partial folders."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core import sharded_checkpoint as sharded_lib
from conceptlm.core.config import load_config
from conceptlm.core.errors import CheckpointError, ConfigError
from tests.core.toy_recipe import ToyConfig, ToySection, ToyUnit, train

REPO = Path(__file__).resolve().parents[2]
STEPS, K = 6, 3  # train STEPS straight; the interrupted runs stop at K (a checkpoint) and resume to STEPS
BASE = {"run.name": "s", "train.max_steps": STEPS, "train.save_every": K, "train.keep_checkpoints": 3,
        "train.eval_every": 0, "train.progress": False, "train.log_every": 1, "schedule.warmup_steps": 1,
        "toy.noise": 0.5, "run.resume": "auto"}
TWO = {"train.micro_batch_size": 2, "train.grad_accum": 2, "dist.strategy": "fsdp"}  # global batch 8


def _env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", CONCEPTLM_NO_PROGRESS="1")
    return e


def _run(out_dir: Path, nproc: int, **extra) -> None:
    args = [f"{k}={v}" for k, v in {**BASE, "run.out_dir": str(out_dir), **extra}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.core.toy_recipe", *args]
    r = subprocess.run(cmd, env=_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def _ckpt(out_dir: Path, step: int) -> Path:
    return out_dir / "s" / "checkpoints" / f"step_{step:08d}"


def _stopped_at_k(src: Path, dst: Path) -> Path:
    """A copy of run ``src`` as a run stopped after step K (its later checkpoint and metric rows gone)."""
    shutil.copytree(src / "s", dst / "s")
    shutil.rmtree(_ckpt(dst, STEPS))
    (dst / "s" / ".lock").unlink(missing_ok=True)
    return dst


def _losses(out_dir: Path) -> dict[int, float]:
    rows = map(json.loads, (out_dir / "s" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2-process FSDP run with sharded and with full checkpoints, and the sharded one stopped at step K
    then resumed to STEPS."""
    root = tmp_path_factory.mktemp("sharded")
    _run(root / "sharded", 2, **TWO, **{"dist.checkpoint": "sharded"})
    _run(root / "full", 2, **TWO)
    _run(_stopped_at_k(root / "sharded", root / "resumed"), 2, **TWO, **{"dist.checkpoint": "sharded"})
    return root


# ------------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.distributed
def test_every_rank_writes_its_own_shards_and_the_manifest_lists_them(runs):
    ckpt = _ckpt(runs / "sharded", STEPS)
    assert ckpt_lib.is_sharded(ckpt) and ckpt_lib.verify_checkpoint(ckpt) is None
    assert not (ckpt / ckpt_lib.UNIT_FILE).exists() and not (ckpt / "model").exists()
    files = json.loads((ckpt / ckpt_lib.MANIFEST).read_text())
    assert files["layout"] == "sharded" and files["world_size"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng/rank_00000.pt", "rng/rank_00001.pt",
            "trainer_state.pt", "config.yaml"} <= set(files["files"])
    # no rank wrote a whole decoder matrix: the index holds it as two half chunks, one in each rank's file
    md = sharded_lib._read_metadata(ckpt)
    key = "model.decoder.layers.0.attn.q_proj.weight"
    chunks = md.state_dict_metadata[key].chunks
    assert [c.sizes[0] for c in chunks] == [16, 16] and sorted(c.offsets[0] for c in chunks) == [0, 16]
    where = {info.relative_path for idx, info in md.storage_data.items() if idx.fqn == key}
    assert where == {"__0_0.distcp", "__1_0.distcp"}
    # trainer state: the optimizer's param_groups only (its tensors are in the shards)
    state = ckpt_lib.load_trainer_state(ckpt)
    assert "optimizer" not in state and state["step"] == STEPS and state["world_size"] == 2
    assert state["optimizer_param_groups"][0]["params"][0].startswith(("prenet", "decoder", "postnet"))
    assert not list((runs / "sharded" / "s" / "checkpoints").glob(".tmp-*"))


@pytest.mark.distributed
def test_resume_from_a_sharded_checkpoint_is_bit_exact(runs):
    straight, resumed = runs / "sharded", runs / "resumed"
    a, b = sharded_lib.read_sharded(_ckpt(straight, STEPS)), sharded_lib.read_sharded(_ckpt(resumed, STEPS))
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in a)
    assert _max_diff(a, b) == 0.0  # weights and optimizer state
    la, lb = _losses(straight), _losses(resumed)
    assert list(lb) == list(range(1, STEPS + 1)) and la == lb  # every step logged once, the same losses
    # and the RNG of each rank came back as its own
    for r in (0, 1):
        sa = sharded_lib.load_rank_rng(_ckpt(straight, STEPS), r)["torch"]
        assert torch.equal(sa, sharded_lib.load_rank_rng(_ckpt(resumed, STEPS), r)["torch"])


@pytest.mark.distributed
def test_sharded_and_full_checkpoints_of_the_same_run_hold_the_same_values(runs, tmp_path):
    for step in (K, STEPS):
        full = _ckpt(runs / "full", step)
        out = sharded_lib.consolidate_checkpoint(_ckpt(runs / "sharded", step), tmp_path / f"step_{step:08d}")
        assert ckpt_lib.verify_checkpoint(out) is None and not ckpt_lib.is_sharded(out)
        a, b = load_file(str(full / ckpt_lib.UNIT_FILE)), load_file(str(out / ckpt_lib.UNIT_FILE))
        assert _max_diff(a, b) == 0.0
        sa, sb = ckpt_lib.load_trainer_state(full), ckpt_lib.load_trainer_state(out)
        oa, ob = sa["optimizer"], sb["optimizer"]
        assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
        for fqn in oa["state"]:
            assert oa["state"][fqn].keys() == ob["state"][fqn].keys()
            assert all(torch.equal(oa["state"][fqn][n], ob["state"][fqn][n]) for n in oa["state"][fqn])
        assert sa["scheduler"] == sb["scheduler"] and sa["data"] == sb["data"] and sa["step"] == sb["step"]
    # load_unit_state reads the shards whole on this process, into a unit that is not sharded
    unit_a, unit_b = ToyUnit(ToySection()), ToyUnit(ToySection())
    ckpt_lib.load_unit_state(unit_a, _ckpt(runs / "full", STEPS))
    ckpt_lib.load_unit_state(unit_b, _ckpt(runs / "sharded", STEPS))
    assert _max_diff(unit_a.state_dict(), unit_b.state_dict()) == 0.0


@pytest.mark.distributed
def test_resume_at_another_world_size_reshards(runs, tmp_path):
    """2 ranks -> 1 rank, under FSDP2 (DCP reshards into the 1-rank DTensors) and on a plain process (the shards
    read whole): the same weights as the 2-process run up to float summation order. The global batch stays 8, so
    grad_accum changes (accepted with run.resume_changes=apply, as for a full checkpoint)."""
    import torch.distributed as dist

    ref = sharded_lib.read_sharded(_ckpt(runs / "sharded", STEPS), "model.")
    one = _stopped_at_k(runs / "sharded", tmp_path / "fsdp1")
    same_batch = {"train.micro_batch_size": 2, "train.grad_accum": 4, "run.resume_changes": "apply"}
    # FSDP2 on one rank, in this process (the run session tears the process group down at its end)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train(load_config(ToyConfig, None, [f"{k}={v}" for k, v in {
            **BASE, "run.out_dir": str(one), **same_batch, "dist.strategy": "fsdp",
            "dist.checkpoint": "sharded"}.items()]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert ckpt_lib.load_trainer_state(_ckpt(one, STEPS))["world_size"] == 1
    assert _max_diff(ref, sharded_lib.read_sharded(_ckpt(one, STEPS), "model.")) <= 1e-5
    plain = _stopped_at_k(runs / "sharded", tmp_path / "plain")
    cfg = load_config(ToyConfig, None, [f"{k}={v}" for k, v in {**BASE, "run.out_dir": str(plain),
                                                                 **same_batch}.items()])
    train(cfg)
    got = load_file(str(_ckpt(plain, STEPS) / ckpt_lib.UNIT_FILE))  # this run writes full checkpoints
    assert _max_diff({f"model.{k}": v for k, v in got.items()}, ref) <= 1e-5


@pytest.mark.distributed
def test_a_finished_sharded_run_resumed_on_one_process_is_written_again_as_full(runs, tmp_path):
    shutil.copytree(runs / "sharded" / "s", tmp_path / "s")
    (tmp_path / "s" / ".lock").unlink(missing_ok=True)
    cfg = load_config(ToyConfig, None, [f"{k}={v}" for k, v in {**BASE, "run.out_dir": str(tmp_path),
                                                                 "train.micro_batch_size": 2,
                                                                 "train.grad_accum": 4,
                                                                 "run.resume_changes": "apply"}.items()])
    res = train(cfg)
    ckpt = _ckpt(tmp_path, STEPS)
    assert res.step == STEPS and res.checkpoint == ckpt and not ckpt_lib.is_sharded(ckpt)
    assert ckpt_lib.verify_checkpoint(ckpt) is None
    want = sharded_lib.read_sharded(_ckpt(runs / "sharded", STEPS), "model.")
    got = load_file(str(ckpt / ckpt_lib.UNIT_FILE))
    assert _max_diff({f"model.{k}": v for k, v in got.items()}, want) == 0.0
    assert len(_losses(tmp_path)) == STEPS  # nothing trained again


@pytest.mark.distributed
def test_damaged_or_partial_sharded_checkpoints_are_skipped(runs, tmp_path, caplog):
    shutil.copytree(runs / "sharded" / "s", tmp_path / "s")
    newest, older = _ckpt(tmp_path, STEPS), _ckpt(tmp_path, K)
    shard = newest / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # one rank's shards truncated
    assert "__1_0.distcp" in ckpt_lib.verify_checkpoint(newest) and "truncated" in ckpt_lib.verify_checkpoint(newest)
    assert ckpt_lib.find_resumable_checkpoint(tmp_path / "s") == older
    assert "skipping damaged checkpoint" in caplog.text
    # partial: a shard file the index names but the manifest does not list (and not on disk)
    manifest = json.loads((newest / ckpt_lib.MANIFEST).read_text())
    del manifest["files"]["dcp/__1_0.distcp"]
    shard.unlink()
    (newest / ckpt_lib.MANIFEST).write_text(json.dumps(manifest))
    assert "not listed in the manifest" in ckpt_lib.verify_checkpoint(newest)
    # partial: no manifest (a folder the save did not finish)
    (newest / ckpt_lib.MANIFEST).unlink()
    assert "incomplete sharded checkpoint" in ckpt_lib.verify_checkpoint(newest)
    assert ckpt_lib.find_resumable_checkpoint(tmp_path / "s") == older
    with pytest.raises(CheckpointError, match="damaged"):
        sharded_lib.consolidate_checkpoint(newest, tmp_path / "out")
    with pytest.raises(CheckpointError, match="already full"):
        sharded_lib.consolidate_checkpoint(_ckpt(runs / "full", STEPS), tmp_path / "out")


@pytest.mark.distributed
def test_lm_verbs_refuse_a_sharded_checkpoint_saying_how_to_get_a_full_one(runs):
    from conceptlm.lm.recipe import resolve_checkpoint

    ckpt = _ckpt(runs / "sharded", STEPS)
    with pytest.raises(CheckpointError, match="sharded checkpoint.*dist.strategy=none dist.checkpoint=full") as e:
        resolve_checkpoint(None, str(ckpt))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ no processes
def test_checkpoint_index_is_unpickled_safely(tmp_path):
    """A crafted ``.metadata`` that would run code is refused by name; a real one (written here) reads."""
    ckpt = tmp_path / "step_00000001"
    (ckpt / ckpt_lib.SHARDED_DIR).mkdir(parents=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (ckpt / ckpt_lib.SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="system is not allowed"):
        sharded_lib.read_sharded(ckpt)
    assert not (tmp_path / "pwned").exists()
    # a real DCP checkpoint written by one process reads back whole, with exact values
    import torch.distributed.checkpoint as dcp

    shutil.rmtree(ckpt / ckpt_lib.SHARDED_DIR)
    want = sharded_lib.sharded_tensors({"w": torch.randn(4, 3), "h": torch.arange(5, dtype=torch.bfloat16)},
                                    {"w": {"step": torch.tensor(2.0), "exp_avg": torch.randn(4, 3)}})
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(want, storage_writer=dcp.FileSystemWriter(str(ckpt / ckpt_lib.SHARDED_DIR)), no_dist=True)
    got = sharded_lib.read_sharded(ckpt)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want)
    model, optim = sharded_lib.split_sharded(got)
    assert set(model) == {"w", "h"} and set(optim["w"]) == {"step", "exp_avg"}
    with pytest.raises(TypeError, match="tensors only"):
        sharded_lib.sharded_tensors({"w": torch.zeros(1)}, {"w": {"step": 3}})
    buf = io.BytesIO()
    pickle.dump({"not": "an index"}, buf)
    (ckpt / ckpt_lib.SHARDED_DIR / ".metadata").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="not a torch.distributed.checkpoint index"):
        sharded_lib.read_sharded(ckpt)


def test_sharded_checkpoints_need_fsdp():
    with pytest.raises(ConfigError, match="dist.strategy=fsdp"):
        load_config(ToyConfig, None, ["dist.checkpoint=sharded", "dist.strategy=ddp"])
    assert load_config(ToyConfig, None, []).dist.checkpoint == "full"
    assert load_config(ToyConfig, None, ["dist.checkpoint=sharded", "dist.strategy=fsdp"]).dist.checkpoint == "sharded"
