"""Hub-format export of CoCoMix students: ``from_pretrained`` outside conceptlm gives the same logits bit for bit;
conceptlm reads the folders back; the pipeline's harness columns, ``eval-harness`` and ``export`` verbs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conceptlm.cocomix.config import StudentSection
from conceptlm.cocomix.generate import generate
from conceptlm.cocomix.hub import MODELING_FILE, export_student, is_hub_student, load_hub_student
from conceptlm.cocomix.model import StudentLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = [(style, mix) for style in ("gpt2", "llama") for mix in ("interleave", "add", "pause", "none")]


def _student(style: str, mix: str, **kw) -> StudentLM:
    torch.manual_seed(len(style) + len(mix))
    s = StudentSection(style=style, mix=mix, vocab_size=61, d_model=16, n_layers=3, n_heads=2, max_len=24,
                       concept_head=mix != "pause", insert_layer=1, n_concepts=24, concept_k=4, init_std=0.3,
                       tie_embeddings=mix != "add", **kw)
    return StudentLM(s).eval()


def test_from_pretrained_without_conceptlm_gives_identical_logits(tmp_path):
    """One fresh interpreter loads every variant with AutoModelForCausalLM (trust_remote_code) and never imports
    conceptlm; its logits equal StudentLM's exactly (torch.equal; same device and thread count, as the kernels'
    reduction order depends on both)."""
    ids = torch.randint(0, 61, (3, 19), generator=torch.Generator().manual_seed(0))
    folders = []
    for style, mix in VARIANTS:
        extra = {"slot_positions": True} if (style, mix) == ("gpt2", "interleave") else {}
        model = _student(style, mix, **extra)
        folder = export_student(model, tmp_path / f"{style}-{mix}")
        assert {"config.json", "model.safetensors", MODELING_FILE} <= {p.name for p in folder.iterdir()}
        with torch.no_grad():
            torch.save({"ids": ids, "logits": model(ids).logits}, folder / "expected.pt")
        folders.append(str(folder))
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({torch.get_num_threads()})
for folder in {folders!r}:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ref = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        out = model(ref["ids"]).logits
    print(folder.rsplit("/", 1)[-1], torch.equal(out, ref["logits"]))
print("conceptlm imported:", any(m == "conceptlm" or m.startswith("conceptlm.") for m in sys.modules))
"""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "conceptlm imported: False"
    assert lines[:-1] == [f"{s}-{m} True" for s, m in VARIANTS]


def test_conceptlm_reads_the_folder_back_and_hf_generation_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _student("gpt2", "interleave")
    folder = export_student(model, tmp_path / "hub", provenance={"arm": "cocomix-s0"})
    assert is_hub_student(folder) and not is_hub_student(tmp_path)
    assert json.loads((folder / "config.json").read_text())["conceptlm"]["arm"] == "cocomix-s0"
    back, tokenizer = load_hub_student(folder)
    assert tokenizer is None
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ours = generate(back, ids, max_new_tokens=7)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # left padding: positions restart at the first real token; the padded row matches the unpadded one
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits[0, 2:]
        alone = hf(ids[:1, 2:]).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_pipeline_with_harness_tasks_report_columns_verbs_and_export(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from conceptlm.cli import main
    from conceptlm.cocomix.pipeline import pipeline, report
    from conceptlm.harness.tasks import write_task
    from tests.cocomix.test_pipeline import tiny_cfg

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    tasks = tmp_path / "tasks"
    write_task(tasks, "topic_mc", [{"question": "the", "choices": ["a", "b"], "answer": i % 2} for i in range(4)])
    write_task(tasks, "topic_ppl", [{"text": "the cat and the dog"}, {"text": "a b c"}], kind="perplexity")
    cfg = tiny_cfg(tmp_path, "pipeline.arms=[ntp,cocomix]", "harness.tasks=[topic_mc,topic_ppl]",
                   f"harness.include_path={tasks}")
    out = pipeline(cfg)
    run = cfg.run_dir
    arms = out["report"]["arms"]
    for arm in ("ntp", "cocomix"):
        stored = json.loads((run / "students" / f"{arm}-s0" / "harness" / "results.json").read_text())
        assert arms[arm]["downstream"]["topic_mc"] == {"metric": "acc", "value": stored["summary"]["topic_mc"]["acc"],
                                                       "seeds": 1}
        assert arms[arm]["downstream"]["topic_ppl"]["metric"] == "word_perplexity"  # no acc: its first metric
    md = (run / "report" / "report.md").read_text()
    assert "| topic_mc | topic_ppl |" in md and "(word_perplexity)" in md

    # the verb reuses the stored results (same checkpoint, settings and task files) and writes the run's summary
    res = main(["cocomix", "eval-harness", "--config", "configs/cocomix/tiny_cpu.yaml", *_overrides(cfg)])
    assert res == 0
    summary = json.loads((run / "harness.json").read_text())
    assert all(s["reused"] for s in summary["students"].values()) and set(summary["students"]) == {"ntp-s0",
                                                                                                 "cocomix-s0"}
    # a changed task file makes the results stale: the report evaluates again
    write_task(tasks, "topic_mc", [{"question": "the", "choices": ["a", "b"], "answer": 0} for _ in range(4)])
    again = report(cfg)
    assert again["arms"]["ntp"]["downstream"]["topic_mc"]["value"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert json.loads((run / "students" / "ntp-s0" / "harness" / "results.json").read_text())["settings"] == \
        summary["settings"]

    # export: one Hub-format folder per student, with the tokenizer; it reads back with the same logits
    assert main(["cocomix", "export", "--config", "configs/cocomix/tiny_cpu.yaml", *_overrides(cfg)]) == 0
    from conceptlm.cocomix.hub import student_checkpoints
    from conceptlm.cocomix.student import load_student

    (name, sub, ckpt), = [s for s in student_checkpoints(cfg)[0] if s[0] == "cocomix-s0"]
    back, tok = load_hub_student(run / "students" / "cocomix-s0" / "hub")
    assert tok is not None and len(tok) == sub.student.vocab_size
    ids = torch.tensor([tok.encode("the cat", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, load_student(sub, ckpt)(ids).logits)


def _overrides(cfg) -> list[str]:
    from tests.cocomix.test_pipeline import TINY

    return [f"run.out_dir={cfg.run.out_dir}", *TINY, "pipeline.arms=[ntp,cocomix]",
            f"harness.tasks=[{','.join(cfg.harness.tasks)}]", f"harness.include_path={cfg.harness.include_path}"]


def test_stored_harness_results_are_reused_by_weights_content_not_by_path(tmp_path):
    """A student retrained into the same folder and step is evaluated again; the same weights with the task
    folder moved elsewhere (same files) reuse the stored results."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    import conceptlm.cocomix.harness as h
    from conceptlm.cocomix.harness import HARNESS_DIR, student_harness
    from conceptlm.core.io import atomic_write_text
    from conceptlm.harness.tasks import write_task

    def checkpoint(weights_sha: str):
        ckpt = tmp_path / "students" / "ntp-s0" / "checkpoints" / "step_00000200"
        ckpt.mkdir(parents=True, exist_ok=True)
        files = {"unit.safetensors": {"size": 1, "sha256": weights_sha}, "config.yaml": {"size": 1, "sha256": "c"}}
        (ckpt / "manifest.json").write_text(json.dumps({"format": "conceptlm-checkpoint/2", "files": files}))
        return ckpt

    tasks = tmp_path / "tasks"
    write_task(tasks, "topic_mc", [{"question": "the", "choices": ["a", "b"], "answer": 0}])
    section = SimpleNamespace(tasks=["topic_mc"], include_path=str(tasks), limit=None, num_fewshot=0, seed=0)
    run_dir = tmp_path / "students" / "ntp-s0"

    ckpt = checkpoint("a" * 64)
    stored = {"checkpoint": str(ckpt), "weights": h._weights_digest(ckpt), "settings": h._settings(section),
              "tasks_digest": h._tasks_digest(section), "summary": {"topic_mc": {"acc": 1.0}}}
    atomic_write_text(run_dir / HARNESS_DIR / "results.json", json.dumps(stored))
    assert student_harness(run_dir, ckpt, section)["summary"] == {"topic_mc": {"acc": 1.0}}

    moved = tmp_path / "elsewhere"
    tasks.rename(moved)
    assert student_harness(run_dir, ckpt, SimpleNamespace(**{**vars(section), "include_path": str(moved)}))

    retrained = checkpoint("b" * 64)  # same path and step, other weights
    assert retrained == ckpt
    section.include_path = str(moved)
    assert student_harness(run_dir, retrained, section) is None
