"""SAE training on the shared loop: end to end with a tiny teacher, outputs, resume == uninterrupted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conceptlm.cocomix.config import SAETrainConfig, TeacherSection
from conceptlm.cocomix.sae import SAE_CONFIG, SAE_WEIGHTS, load_sae
from conceptlm.cocomix.sae_train import SAE_DIR, train_sae
from conceptlm.cocomix.teacher import hidden_at_layer, load_teacher
from conceptlm.core.artifact import Identity, begin, read_manifest
from conceptlm.core.config import load_config

BASE = ["corpus.n_documents=120", "corpus.window=24", "teacher.steps=20", "teacher.hidden_size=32",
        "teacher.num_heads=2", "teacher.vocab_size=320", "teacher.batch_size=8", "sae.n_latents=96", "sae.k=6",
        "sae.aux_k=8", "sae.dead_after_tokens=400", "train.micro_batch_size=8", "train.progress=false",
        "train.eval_every=0", "optim.lr=3e-3", "optim.weight_decay=0", "schedule.kind=constant", "train.log_every=5"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp, name, *extra) -> SAETrainConfig:
    return load_config(SAETrainConfig, None, [f"run.out_dir={tmp}", f"run.name={name}", *BASE, *extra])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, one_torch_thread):
    """train_sae end to end: trains the tiny teacher, then 20 SAE steps (checkpoints at 10 and 20)."""
    tmp = tmp_path_factory.mktemp("sae_runs")
    cfg = _cfg(tmp, "a", "train.max_steps=20", "train.save_every=10")
    res = train_sae(cfg)
    return tmp, cfg, res


def test_train_sae_end_to_end_writes_the_sae_and_metrics(first_run):
    tmp, cfg, res = first_run
    assert res.step == 20
    sae = load_sae(cfg.run_dir / "sae")
    assert (sae.d_in, sae.n_latents, sae.k) == (32, 96, 6) and sae.meta["layer"] == 1
    assert sae.meta["teacher"]["num_layers"] == 2
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(96))
    rows = [json.loads(line) for line in (cfg.run_dir / SAE_DIR / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["l0"] <= 6 and 0 <= train[-1]["dead"] <= 1 and "tokens_per_s" in train[-1]
    assert train[-1]["fvu"] < train[0]["fvu"]  # it learns
    assert any(r["auxk"] > 0 and r["dead"] > 0 for r in train)  # latents went dead (400 tokens): AuxK ran
    ckpt = cfg.run_dir / SAE_DIR / "checkpoints" / "step_00000020"
    assert json.loads((ckpt / "artifacts" / "sae_config" / "sae.json").read_text())["n_latents"] == 96
    in_ckpt = load_sae(ckpt / "model")
    assert torch.equal(in_ckpt.W_enc, sae.W_enc) and torch.equal(in_ckpt.W_dec, sae.W_dec)
    # the SAE reads the teacher's block-1 output: exactly k kept latents per token
    teacher, tok = load_teacher(TeacherSection(path=str(cfg.run_dir / "teacher"), layer=1))
    ids = torch.tensor([tok("the soup is hot and the team wins.")["input_ids"]])
    out = sae(hidden_at_layer(teacher, ids, 1))
    assert out.indices.shape == (1, ids.shape[1], 6)
    assert ((sae.dense_activations(out.values, out.indices) != 0).sum(-1) <= 6).all()


def test_resume_after_a_stop_gives_the_same_sae(first_run):
    tmp, cfg, _ = first_run
    teacher = str(cfg.run_dir / "teacher")
    b = _cfg(tmp, "b", "train.max_steps=20", "train.save_every=10", f"teacher.path={teacher}")
    train_sae(b)
    sae_run = b.run_dir / SAE_DIR
    shutil.rmtree(sae_run / "checkpoints" / "step_00000020")  # the run stopped after step 10
    (sae_run / "checkpoints" / "latest").write_text("step_00000010\n")
    for name in (SAE_WEIGHTS, SAE_CONFIG):  # before it wrote the SAE and completed its artifact.json
        (sae_run / name).unlink()
    m = read_manifest(sae_run)
    begin(sae_run, Identity(m["kind"], m["format"], m["settings"], m["inputs"]))
    train_sae(_cfg(tmp, "b", "train.max_steps=20", "train.save_every=10", f"teacher.path={teacher}",
                   "run.resume=auto"))
    ref, got = load_sae(cfg.run_dir / "sae"), load_sae(b.run_dir / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0)
