"""Base-LCM unit and recipe: chunking and padding, the MSE part and the eval metrics by hand, the normalizer fit and
artefact, training beats the repeat-the-previous-sentence baseline, exact resume, 2 processes == 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.config import load_config
from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import DiffusionSection, LCMSection, LCMTrainConfig, QuantSection
from conceptlm.lcm.data.normalizer import RobustNormalizer
from conceptlm.lcm.sequence import DocumentChunks, collate_documents
from conceptlm.lcm.train import SyntheticVectorDocuments, fit_normalizer, load_lcm, sample_vectors, train_lcm
from conceptlm.lcm.variants import build_unit
from conceptlm.lcm.variants.base import BaseLCMUnit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]


class Docs:
    def __init__(self, docs):
        self.docs = docs

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return {"id": i, "vectors": self.docs[i]}


# ------------------------------------------------------------------------------------------------ data
def test_chunks_cut_long_documents_append_the_suffix_first_and_drop_short_chunks():
    docs = Docs([torch.arange(7.0).unsqueeze(1), torch.arange(2.0).unsqueeze(1) + 10, torch.tensor([[20.0]])])
    eot = torch.tensor([[-1.0]])
    ch = DocumentChunks(docs, max_sentences=3, min_length=2, suffix=eot)
    # doc 0 + eot = 8 sentences -> 3, 3, 2; doc 1 + eot = 3 -> 3; doc 2 + eot = 2 -> 2
    assert ch.lengths == [3, 3, 2, 3, 2] and ch.dropped == 0
    assert ch[2]["vectors"].squeeze(1).tolist() == [6.0, -1.0] and ch[2]["start"] == 6
    assert ch[0]["vectors"].squeeze(1).tolist() == [0.0, 1.0, 2.0]  # only the last chunk ends with the suffix
    no_suffix = DocumentChunks(docs, max_sentences=3, min_length=2)
    assert no_suffix.lengths == [3, 3, 2] and no_suffix.dropped == 2  # [6] and [20] dropped, [10, 11] kept
    assert [no_suffix[i]["doc"] for i in range(3)] == [0, 0, 1]


def test_collate_pads_on_the_right_with_a_mask():
    b = collate_documents([{"id": 4, "vectors": torch.ones(2, 3)}, {"id": 9, "vectors": torch.full((4, 3), 2.0)}])
    assert b["vectors"].shape == (2, 4, 3) and b["ids"].tolist() == [4, 9] and b["lengths"].tolist() == [2, 4]
    assert b["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert b["vectors"][0, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"document 1: vectors of shape \(2, 5\)"):
        collate_documents([{"id": 0, "vectors": torch.ones(2, 3)}, {"id": 1, "vectors": torch.ones(2, 5)}])


# ------------------------------------------------------------------------------------------------ unit
def unit_for(dim=6, **kw) -> BaseLCMUnit:
    torch.manual_seed(0)
    c = LCMSection(dim=dim, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_sentences=16, **kw)
    u = BaseLCMUnit(c)
    u.model.set_normalizer(torch.randn(dim) * 0.1, torch.rand(dim) + 0.5)
    return u


@pytest.mark.parametrize("min_context", [1, 3])
def test_mse_part_is_the_sum_of_squared_errors_in_normalized_space(min_context):
    u = unit_for(min_context=min_context).eval()
    docs = [torch.randn(n, 6) for n in (5, 2, 4)]
    batch = collate_documents([{"id": i, "vectors": d} for i, d in enumerate(docs)])
    want, n_targets = 0.0, 0
    for d in docs:  # one document at a time, no padding
        z = u.model.normalize(d)
        y = u.model.forward_normalized(z.unsqueeze(0))[0]
        for t in range(max(1, min_context), len(d)):
            want += ((y[t - 1] - z[t]) ** 2).sum().item()
            n_targets += 1
    out = u(batch)
    assert out["mse"].item() == pytest.approx(want, rel=1e-5)
    counts = u.counts(batch)
    assert int(counts["mse"]) == n_targets and int(counts["tokens"]) == 11
    assert n_targets == ({1: 4 + 1 + 3, 3: 2 + 0 + 1}[min_context])


def test_eval_metrics_by_hand():
    u = unit_for(dim=2).eval()
    docs = [torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])]
    batch = collate_documents([{"id": i, "vectors": d} for i, d in enumerate(docs)])
    keys = set(batch)
    u(batch)  # the eval forward leaves the batch as it is: eval_metrics predicts from the batch itself
    assert set(batch) == keys
    m = u.eval_metrics(batch)
    assert set(batch) == keys
    assert m["l2_prev"][0].item() == pytest.approx(5.0 + 0.0 + 1.0) and m["l2_prev"][1] == 3
    want = sum((u.model(d.unsqueeze(0))[0, t - 1] - d[t]).norm().item() for d in docs for t in range(1, len(d)))
    assert m["l2"][0].item() == pytest.approx(want, rel=1e-5) and m["l2"][1] == 3
    assert m["ca"][1] == 3 and m["par"][1] <= 3 and m["cos"][1] == 3
    again = u.eval_metrics(batch)  # computed again: the same
    assert all(float(m[k][0]) == pytest.approx(float(again[k][0]), abs=1e-6) and m[k][1] == again[k][1] for k in m)
    assert "l2_r" not in m
    u.round_trip = lambda v: torch.zeros_like(v)  # every prediction "decodes" to the origin
    assert u.eval_metrics(batch)["l2_r"][0].item() == pytest.approx(5.0 + 1.0 + 2 ** 0.5)


# ------------------------------------------------------------------------------------------------ normalizer
def test_normalizer_sampling_and_sources():
    docs = Docs([torch.full((2, 3), float(i)) for i in range(8)])
    docs.lengths = [2] * 8
    assert sample_vectors(docs, 8)[:, 0].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]  # every 2nd document
    off = fit_normalizer(LCMSection(dim=3, normalize=False), docs)
    assert torch.equal(off.center, torch.zeros(3)) and torch.equal(off.scale, torch.ones(3))
    fitted = fit_normalizer(LCMSection(dim=3, normalizer_samples=8), docs)
    # values 0,0,2,2,4,4,6,6: median 3, quartiles 1.5 and 4.5 -> scale 3 / 1.34898
    assert fitted.center.tolist() == [3.0] * 3 and fitted.scale.tolist() == pytest.approx([3 / 1.3489795] * 3)
    own = RobustNormalizer(3)
    own.center.fill_(7.0)
    docs.normalizer = lambda: own
    assert fit_normalizer(LCMSection(dim=3), docs) is own
    with pytest.raises(ConfigError, match="normalizer has dim 3 but lcm.dim=4"):
        fit_normalizer(LCMSection(dim=4), docs)


# ------------------------------------------------------------------------------------------------ recipe
def cfg_for(tmp_path: Path, name: str, **extra) -> LCMTrainConfig:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.max_steps": 4,
            "train.micro_batch_size": 8, "train.eval_every": 0, "train.log_every": 1, "train.progress": False,
            "train.eval_batch_size": 16, "optim.lr": 3e-3, "schedule.warmup_steps": 1,
            "lcm.dim": 16, "lcm.d_model": 32, "lcm.n_layers": 2, "lcm.n_heads": 2, "lcm.d_ff": 64,
            "lcm.dropout": 0.0, "lcm.max_sentences": 16, "lcm_data.n_train": 64, "lcm_data.n_eval": 32}
    base.update(extra)
    return load_config(LCMTrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_training_beats_repeating_the_previous_sentence(tmp_path):
    res = train_lcm(cfg_for(tmp_path, "learn", **{"train.max_steps": 120, "train.eval_every": 60,
                                                  "lcm_data.n_train": 256, "optim.lr": 3e-3,
                                                  "schedule.warmup_steps": 10}))
    first, last = rows(res.run_dir, "eval")
    print(f"\nteacher-forced l2: step 60 {first['l2']:.4f}, step 120 {last['l2']:.4f}; "
          f"repeat-previous {last['l2_prev']:.4f}; CA {last['ca']:.3f}; PAR {last['par']:.3f}; mse {last['mse']:.4f}")
    assert last["l2"] < 0.6 * last["l2_prev"]
    assert last["l2"] < first["l2"] and last["ca"] > 0.9
    train_rows = rows(res.run_dir, "train")
    assert "sentences_per_s" in train_rows[0] and train_rows[-1]["mse"] < train_rows[0]["mse"]
    # the normalizer travels with the checkpoint, equals the model's buffers and was fitted on the training data
    norm = RobustNormalizer.from_pretrained(res.checkpoint / "artifacts" / "normalizer")
    weights = load_file(str(res.checkpoint / ckpt_lib.UNIT_FILE))
    assert torch.equal(norm.center, weights["model.center"]) and torch.equal(norm.scale, weights["model.scale"])
    ds = SyntheticVectorDocuments(256, 16)
    assert norm.n_fit == sum(ds.lengths)
    assert torch.allclose(norm.center, torch.cat(ds.docs).median(0).values, atol=0.02)
    # and the checkpoint alone reloads the model: it reproduces the logged teacher-forced l2 of the eval set
    model = load_lcm(res.checkpoint)
    assert not model.training and torch.equal(model.center, norm.center)
    unit = BaseLCMUnit(model.cfg)
    unit.model = model
    chunks = DocumentChunks(SyntheticVectorDocuments(32, 16, split=1), max_sentences=16)
    s, n = unit.eval_metrics(collate_documents([chunks[i] for i in range(len(chunks))]))["l2"]
    assert float(s) / n == pytest.approx(last["l2"], rel=1e-4)


def test_resume_is_exact(tmp_path):
    c = {"schedule.kind": "constant"}
    straight = train_lcm(cfg_for(tmp_path, "straight", **c))
    train_lcm(cfg_for(tmp_path, "split", **c, **{"train.max_steps": 2}))
    split = train_lcm(cfg_for(tmp_path, "split", **c, **{"run.resume": "auto"}))
    a = load_file(str(straight.checkpoint / ckpt_lib.UNIT_FILE))
    b = load_file(str(split.checkpoint / ckpt_lib.UNIT_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_of_another_width_is_refused_before_anything_is_written(tmp_path):
    docs = Docs([torch.randn(5, 8) for _ in range(16)])
    with pytest.raises(ConfigError, match="8 dimensions but lcm.dim=16; set lcm.dim=8"):
        train_lcm(cfg_for(tmp_path, "wide"), train_ds=docs)
    assert not (tmp_path / "runs" / "wide").exists()


def test_passed_datasets_are_used(tmp_path):
    docs = Docs([torch.randn(6, 16) for _ in range(16)])
    res = train_lcm(cfg_for(tmp_path, "given", **{"train.max_steps": 2}), train_ds=docs, eval_ds=Docs(docs.docs[:4]),
                    round_trip=torch.zeros_like)
    want = sum(d[1:].norm(dim=-1).sum().item() for d in docs.docs[:4]) / 20  # ||0 - x_t|| over 4 x 5 targets
    assert res.step == 2 and "l2" in res.last_eval and res.last_eval["l2_r"] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------ processes
def _env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", CONCEPTLM_NO_PROGRESS="1")
    return e


def _cmd(tmp_path: Path, name: str, nproc: int, **extra) -> list[str]:
    base = {"run.out_dir": str(tmp_path / "runs"), "run.name": name, "train.eval_every": 0, "train.progress": False,
            "train.max_steps": 3, "schedule.warmup_steps": 1, "lcm.dim": 16, "lcm.d_model": 32, "lcm.n_layers": 2,
            "lcm.n_heads": 2, "lcm.d_ff": 64, "lcm.dropout": 0.0, "lcm.max_sentences": 16,
            "lcm_data.n_train": 64, "lcm_data.n_eval": 0}
    base.update(extra)
    args = [f"{k}={v}" for k, v in base.items()]
    if nproc == 1:
        return [sys.executable, "-m", "tests.lcm.lcm_worker", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tests.lcm.lcm_worker", *args]


VARIANT_OVERRIDES = {
    "base": {},
    # per-rank noise, timesteps and CFG row drops (drawn per example, so the split of the batch does not matter)
    "two_tower": {"lcm.model": "two_tower", "lcm.n_denoiser_layers": 2, "lcm.diffusion.num_train_steps": 20,
                  "lcm.diffusion.cfg_dropout": 0.5},
    "one_tower": {"lcm.model": "one_tower", "lcm.diffusion.num_train_steps": 20, "lcm.diffusion.cfg_dropout": 0.5},
    # per-example codebook stages and CFG drops; codebooks fitted the same way in every process
    "quant_d": {"lcm.model": "quant_d", "lcm.quant.n_codebooks": 3, "lcm.quant.codebook_size": 16,
                "lcm.quant.fit_samples": 200, "lcm.quant.fit_iters": 3, "lcm.quant.cfg_dropout": 0.5},
}


@pytest.mark.distributed
@pytest.mark.parametrize("variant", sorted(VARIANT_OVERRIDES))
def test_two_processes_equal_one_process(tmp_path, variant):
    extra = VARIANT_OVERRIDES[variant]
    one = subprocess.run(_cmd(tmp_path, "one", 1, **{"train.micro_batch_size": 8}, **extra), env=_env(), cwd=REPO,
                         timeout=300, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_cmd(tmp_path, "two", 2, **{"train.micro_batch_size": 2, "train.grad_accum": 2}, **extra),
                         env=_env(), cwd=REPO, timeout=300, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    step = "step_00000003"
    a = load_file(str(tmp_path / "runs" / "one" / "checkpoints" / step / ckpt_lib.UNIT_FILE))
    b = load_file(str(tmp_path / "runs" / "two" / "checkpoints" / step / ckpt_lib.UNIT_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    diff = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff <= 1e-5
    torch.manual_seed(0)  # train.seed: the runs' initial weights
    sizes = dict(dim=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_sentences=16)
    if variant == "two_tower":
        sizes.update(model="two_tower", n_denoiser_layers=2, diffusion=DiffusionSection(num_train_steps=20))
    elif variant == "one_tower":
        sizes.update(model="one_tower", diffusion=DiffusionSection(num_train_steps=20))
    elif variant == "quant_d":
        sizes.update(model="quant_d", quant=QuantSection(n_codebooks=3, codebook_size=16, fit_samples=200))
    init = build_unit(LCMSection(**sizes))
    stats = {"model.center", "model.scale", "model.clip_min", "model.clip_max", "model.quantizer.codebooks",
             "model.quantizer.fitted"}
    moved = max((a[k] - v).abs().max().item() for k, v in init.state_dict().items() if k in a and k not in stats)
    assert moved > 1e-4  # the runs did train


# ------------------------------------------------------------------------------------------------ real embeddings
@pytest.mark.slow
def test_real_minilm_documents_train_and_generate(tmp_path):
    """Generated documents -> prepare (segment, MiniLM, "End of text.", Parquet) -> train_lcm -> generate with the
    end-of-text rule, decoded by nearest neighbour over the training sentences."""
    import torch.nn.functional as F

    from conceptlm.lcm.config import GenerationOptions, PrepareConfig
    from conceptlm.lcm.data.encoders import get_encoder
    from conceptlm.lcm.data.prepare import prepare
    from conceptlm.lcm.data.store import EmbeddedDocuments
    from conceptlm.lcm.generate import generate

    folder = tmp_path / "prepared"
    prepare(load_config(PrepareConfig, None, ["docs.n_documents=160", f"prepare.out_dir={folder}",
                                              "prepare.val_fraction=0.2", "prepare.shard_size=64",
                                              f"run.out_dir={tmp_path / 'prep_runs'}", "train.progress=false"]))
    res = train_lcm(cfg_for(tmp_path, "minilm", **{
        "lcm_data.source": str(folder), "lcm.dim": 384, "lcm.d_model": 64, "lcm.n_heads": 2, "lcm.d_ff": 128,
        "lcm.max_sentences": 32, "train.max_steps": 150, "train.micro_batch_size": 8, "optim.lr": 2e-3,
        "schedule.warmup_steps": 10}))
    ev = res.last_eval
    print(f"\nMiniLM documents, validation: teacher-forced l2 {ev['l2']:.4f} vs repeat-previous {ev['l2_prev']:.4f}; "
          f"cos {ev['cos']:.3f}; CA {ev['ca']:.3f}; PAR {ev['par']:.3f}")
    assert ev["l2"] < 0.85 * ev["l2_prev"] and ev["ca"] > 0.6
    assert json.loads((res.checkpoint / "artifacts" / "encoder" / "encoder.json").read_text())["dim"] == 384

    train_docs, val_docs = EmbeddedDocuments(folder, "train"), EmbeddedDocuments(folder, "validation")
    bank_text = [s for i in range(len(train_docs)) for s in train_docs[i]["sentences"]]
    bank = F.normalize(torch.cat([train_docs[i]["vectors"] for i in range(len(train_docs))]), dim=-1)

    def nearest(v: torch.Tensor) -> list[str]:
        return [bank_text[i] for i in (F.normalize(v, dim=-1) @ bank.T).argmax(-1).tolist()]

    eot = get_encoder().encode(["End of text."])[0]
    model = load_lcm(res.checkpoint)
    prompts = [val_docs[i]["vectors"][:3] for i in range(4)]
    out = generate(model, prompts, eot=eot, decode=nearest, options=GenerationOptions(max_new_sentences=20))
    for i, d in enumerate(out[:2]):
        print(f"prompt: {' '.join(val_docs[i]['sentences'][:3])}\n  -> ({d.stop}, {d.steps} steps) {d.text}")
    assert all(s in bank_text for d in out for s in d.sentences)
    assert any(d.stop != "max_new_sentences" for d in out)  # the paper's rules (0.9 / 0.9) end documents
    no_rules = generate(model, prompts, options=GenerationOptions(max_new_sentences=20, repetition_threshold=None))
    assert all(d.stop == "max_new_sentences" and len(d.vectors) == 20 for d in no_rules)
