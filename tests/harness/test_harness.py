"""lm-evaluation-harness on conceptlm's token-level models, offline, on tasks over local JSONL: the harness's
log-likelihoods equal a direct computation from the same model, and its accuracy equals the one worked out by hand
from answers chosen to make it known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conceptlm.cocomix.config import StudentSection  # noqa: E402
from conceptlm.cocomix.generate import generate  # noqa: E402
from conceptlm.cocomix.harness import CocomixLM  # noqa: E402
from conceptlm.cocomix.hub import export_student  # noqa: E402
from conceptlm.cocomix.model import StudentLM  # noqa: E402
from conceptlm.core.config import load_config  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.harness.evaluate import evaluate, hf_model_args, merge_lora, summarize, write_results  # noqa: E402
from conceptlm.harness.tasks import write_task  # noqa: E402
from tests.conftest import make_chat_records, tiny_overrides, write_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["dog truck ring", "lake lines with", "number letter vowel", "capital before after", "string zero or",
             "more times at", "least once ending", "starting dog lake"]
CHOICES = ["words", "lake", "dog truck", "vowel"]
TEXTS = ["dog truck ring lake lines with words", "number letter vowel capital before after containing string"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _ll(model, tok, context: str, cont: str) -> float:
    """log p(cont | context) summed over the continuation's tokens, as the harness splits them (whole minus
    context encoding); a choice follows the question after the harness's ``target_delimiter``, a space."""
    cont = " " + cont
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + cont, add_special_tokens=False)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logits = model(ids).logits.float().log_softmax(-1)[0]
    return sum(float(logits[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _mc_rows_with_known_answers(model, tok, n_right: int) -> tuple[list[dict], float]:
    """Rows whose ``answer`` is the model's own arg-max choice for the first ``n_right`` questions and another
    choice for the rest: the accuracy is ``n_right / n`` by construction (ties excluded)."""
    rows = []
    for i, q in enumerate(QUESTIONS):
        lls = [_ll(model, tok, q, c) for c in CHOICES]
        best = max(range(len(CHOICES)), key=lambda j: lls[j])
        assert sorted(lls)[-1] > sorted(lls)[-2] + 1e-4  # no near-tie, so the arg-max is the harness's too
        rows.append({"question": q, "choices": CHOICES, "answer": best if i < n_right else (best + 1) % len(CHOICES),
                     "lls": lls})
    return rows, n_right / len(QUESTIONS)


def _check_samples(res: dict, task: str, rows: list[dict]) -> None:
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    for s, row in zip(samples, rows):
        got = [r[0] for r in s["filtered_resps"]]
        assert got == pytest.approx(row["lls"], abs=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([" ".join(QUESTIONS + CHOICES + TEXTS)] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def student(tokenizer):
    torch.manual_seed(0)
    return StudentLM(StudentSection(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=2, max_len=32,
                                    n_concepts=24, concept_k=4, insert_layer=1, init_std=0.5)).eval()


# ------------------------------------------------------------------------------------------------ CoCoMix
def test_cocomix_model_multiple_choice_rolling_and_generation(student, tokenizer, tmp_path):
    rows, acc = _mc_rows_with_known_answers(student, tokenizer, n_right=6)
    tasks = tmp_path / "tasks"
    write_task(tasks, "mc", [{k: r[k] for k in ("question", "choices", "answer")} for r in rows])
    write_task(tasks, "ppl", [{"text": t} for t in TEXTS], kind="perplexity")
    write_task(tasks, "gen", [{"prompt": q, "target": "x"} for q in QUESTIONS[:3]], kind="generate", max_gen_toks=5)
    lm = CocomixLM(model=student, tokenizer=tokenizer, batch_size=3, device="cpu")
    res = evaluate(lm, tasks=["mc", "ppl", "gen"], include_path=tasks, log_samples=True)
    summary = summarize(res)
    assert summary["mc"]["acc"] == pytest.approx(acc)  # 6 of 8, known by construction
    _check_samples(res, "mc", rows)

    # rolling: the text's tokens after the end-of-text token (its empty context), all within max_len
    eos = tokenizer.eos_token_id
    for s in res["samples"]["ppl"]:
        ids = [eos] + tokenizer.encode(s["doc"]["text"], add_special_tokens=False)
        with torch.no_grad():
            lp = student(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
        direct = sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert s["filtered_resps"][0] == pytest.approx(direct, abs=1e-4)

    # generation: the student's own greedy continuation (KV-cached), cut at the newline, at most 5 tokens
    for s in res["samples"]["gen"]:
        ids = tokenizer.encode(s["doc"]["prompt"], add_special_tokens=False)
        seq = generate(student, torch.tensor([ids]), max_new_tokens=5, eos_token_id=eos)[0, len(ids):].tolist()
        text = tokenizer.decode([t for t in seq if t != eos]).split("\n")[0]
        assert s["filtered_resps"][0] == text

    out = write_results(tmp_path / "r.json", res, extra={"note": "x"})
    assert json.loads(out.read_text())["summary"]["mc"]["acc"] == pytest.approx(acc)


def test_batched_scoring_equals_one_at_a_time(student, tokenizer, tmp_path):
    rows, _ = _mc_rows_with_known_answers(student, tokenizer, n_right=8)
    write_task(tmp_path, "mc", [{k: r[k] for k in ("question", "choices", "answer")} for r in rows])
    got = {}
    for bs in (1, 7):
        res = evaluate(CocomixLM(model=student, tokenizer=tokenizer, batch_size=bs, device="cpu"), tasks=["mc"],
                       include_path=tmp_path, log_samples=True)
        got[bs] = [r[0] for s in sorted(res["samples"]["mc"], key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    assert got[1] == pytest.approx(got[7], abs=1e-5)


def test_command_line_registered_model_and_hf_trust_remote_code_agree(student, tokenizer, tmp_path):
    """``python -m conceptlm.harness --model conceptlm-cocomix`` and ``lm_eval --model hf`` with the exported
    transformers model (trust_remote_code) score a Hub-format folder the same."""
    rows, acc = _mc_rows_with_known_answers(student, tokenizer, n_right=5)
    write_task(tmp_path / "tasks", "mc", [{k: r[k] for k in ("question", "choices", "answer")} for r in rows])
    hub = export_student(student, tmp_path / "hub", tokenizer=tokenizer)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    lm_eval_cli = Path(sys.executable).parent / "lm_eval"
    runs = {"conceptlm": [sys.executable, "-m", "conceptlm.harness", "--model", "conceptlm-cocomix",
                          "--model_args", f"pretrained={hub}"],
            "hf": [str(lm_eval_cli), "--model", "hf", "--model_args", hf_model_args(hub)]}
    lls = {}
    for name, cmd in runs.items():
        out = tmp_path / f"out_{name}"
        subprocess.run(cmd + ["--tasks", "mc", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out),
                              "--log_samples", "--batch_size", "2", "--device", "cpu"],
                       env=env, check=True, capture_output=True, cwd=tmp_path)
        result = json.loads(next(out.rglob("results_*.json")).read_text())
        assert result["results"]["mc"]["acc,none"] == pytest.approx(acc)
        samples = [json.loads(line) for line in next(out.rglob("samples_mc_*.jsonl")).read_text().splitlines()]
        lls[name] = [float(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    assert lls["conceptlm"] == pytest.approx(lls["hf"], abs=1e-4)
    assert lls["conceptlm"] == pytest.approx([x for r in rows for x in r["lls"]], abs=1e-4)


# ------------------------------------------------------------------------------------------------ SFT / LoRA exports
def _sft_export(tmp_path: Path, *extra: str) -> Path:
    from conceptlm.sft.config import SFTConfig
    from conceptlm.sft.recipe import train

    data = write_jsonl(tmp_path / "train.jsonl", make_chat_records(64))
    ov = tiny_overrides(tmp_path, data, **{"train.max_steps": 3})
    res = train(load_config(SFTConfig, None, ov + list(extra)))
    return Path(res.checkpoint) / "model"


def _hf_rows(model, tok, n_right: int, tasks: Path) -> tuple[list[dict], float]:
    rows, acc = _mc_rows_with_known_answers(model, tok, n_right)
    write_task(tasks, "mc", [{k: r[k] for k in ("question", "choices", "answer")} for r in rows])
    return rows, acc


def test_sft_export_with_the_hf_model(tmp_path):
    from conceptlm.core.hf import load_causal_lm, load_tokenizer

    folder = _sft_export(tmp_path)
    model, tok = load_causal_lm(folder).eval(), load_tokenizer(folder)
    rows, acc = _hf_rows(model, tok, 3, tmp_path / "tasks")
    res = evaluate("hf", model_args=hf_model_args(folder), device="cpu", tasks=["mc"],
                   include_path=tmp_path / "tasks", log_samples=True, batch_size=4)
    assert summarize(res)["mc"]["acc"] == pytest.approx(acc)
    _check_samples(res, "mc", rows)


def test_lora_export_via_peft_and_merged(tmp_path):
    from peft import PeftModel

    from conceptlm.core.hf import build_tiny_model, load_causal_lm, load_tokenizer

    tok = train_bpe_tokenizer([" ".join(QUESTIONS + CHOICES)] * 20, vocab_size=300)
    base = tmp_path / "base"
    build_tiny_model("llama", len(tok), hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=128,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    adapter = _sft_export(tmp_path, f"model.path={base}", f"tokenizer.path={base}", "model.lora.enabled=true",
                          "optim.lr=0.05")
    assert (adapter / "adapter_config.json").is_file()
    assert "peft=" in hf_model_args(adapter)
    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter)).eval()
    rows, acc = _hf_rows(model, load_tokenizer(adapter), 5, tmp_path / "tasks")
    with torch.no_grad():  # the adapter changes the model (else this test would not see a missing adapter)
        ids = torch.tensor([load_tokenizer(adapter).encode(QUESTIONS[0], add_special_tokens=False)])
        assert not torch.allclose(model(ids).logits, load_causal_lm(base)(ids).logits)
    for args in (hf_model_args(adapter), hf_model_args(merge_lora(adapter, tmp_path / "merged"))):
        res = evaluate("hf", model_args=args, device="cpu", tasks=["mc"], include_path=tmp_path / "tasks",
                       log_samples=True)
        assert summarize(res)["mc"]["acc"] == pytest.approx(acc)
        _check_samples(res, "mc", rows)
