"""lm-evaluation-harness on conceptlm's token-level models, offline, on local tasks: a fine-tuned tiny SFT export
(``hf`` model) and a CoCoMix student vs its NTP twin (``conceptlm-cocomix`` model), next to conceptlm's own
validation loss; and the cost per example of the CoCoMix lm-eval path vs an HF model of the same size.

    python benchmarks/harness_downstream.py [--out runs/bench/harness] [--sft-steps 100] [key=value ...]

Extra ``key=value`` arguments override the CoCoMix config (``configs/cocomix/tiny_cpu.yaml`` with a shorter
schedule, see ``COCOMIX``). Tasks (all built here, under ``{out}/tasks``):

* ``topic_next`` (multiple choice): the first 3 sentences of a held-out latent-topic document (generator seed 1000,
  not the training documents), then its 4th sentence vs the 4th sentences of 3 documents that share none of its
  topics; ``topic_ppl``: rolling log-likelihood of 40 held-out documents;
* ``nlrx_choice`` (multiple choice): an NL-RX test prompt (rendered with the chat template) and its regex vs 3
  regexes of other test prompts; ``nlrx_gen``: greedy generation of the regex, exact match.

Writes ``{out}/harness_downstream.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCOMIX = ["corpus.n_documents=1500", "teacher.steps=300", "sae.steps=150", "train.max_steps=200",
           "train.eval_every=50", "train.progress=false", "labels.progress=false"]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) ", text) if s]


def topic_tasks(tasks: Path, n: int = 40) -> None:
    from conceptlm.cocomix.corpus import generate_documents
    from conceptlm.harness.tasks import write_task

    docs = [d for d in generate_documents(400, seed=1000) if len(_sentences(d.text)) >= 5]
    rng = random.Random(0)
    rows = []
    for d in docs[:n]:
        sents = _sentences(d.text)
        others = [o for o in docs if not set(o.topics) & set(d.topics)]
        choices = [sents[3]] + [_sentences(o.text)[3] for o in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"question": " ".join(sents[:3]), "choices": [choices[i] for i in order],
                     "answer": order.index(0)})
    write_task(tasks, "topic_next", rows)
    write_task(tasks, "topic_ppl", [{"text": d.text} for d in docs[n:2 * n]], kind="perplexity")


def nlrx_tasks(tasks: Path, tokenizer, n: int = 40) -> None:
    from conceptlm.data.generators import make_splits
    from conceptlm.harness.tasks import write_task

    test = make_splits(2000, 200, seed=0)[1][:n]
    rng = random.Random(0)
    mc, gen = [], []
    for i, r in enumerate(test):
        prompt = tokenizer.apply_chat_template(r["messages"][:2], add_generation_prompt=True, tokenize=False)
        answer = r["messages"][2]["content"]
        wrong = [test[j]["messages"][2]["content"] for j in rng.sample([j for j in range(len(test)) if j != i], 3)]
        choices = [answer] + wrong
        order = list(range(4))
        rng.shuffle(order)
        mc.append({"question": prompt, "choices": [choices[k] for k in order], "answer": order.index(0)})
        gen.append({"prompt": prompt, "target": answer})
    write_task(tasks, "nlrx_choice", mc, target_delimiter="")
    write_task(tasks, "nlrx_gen", gen, kind="generate", max_gen_toks=48, target_delimiter="")


def _final_eval(run_dir: Path, key: str) -> float:
    from conceptlm.core.metrics import read_metrics

    return [r[key] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "eval" and key in r][-1]


def sft_part(out: Path, steps: int) -> dict:
    from conceptlm.core.config import load_config
    from conceptlm.core.hf import load_tokenizer
    from conceptlm.harness.evaluate import evaluate, hf_model_args, summarize
    from conceptlm.sft.config import SFTConfig
    from conceptlm.sft.recipe import train

    cfg = load_config(SFTConfig, REPO / "configs/sft/tiny_cpu.yaml",
                      [f"run.out_dir={out}", "run.name=sft", f"train.max_steps={steps}", "train.progress=false"])
    res = train(cfg)
    folder = Path(res.checkpoint) / "model"
    nlrx_tasks(out / "tasks", load_tokenizer(folder))
    start = time.perf_counter()
    h = evaluate("hf", model_args=hf_model_args(folder), device="cpu", tasks=["nlrx_choice", "nlrx_gen"],
                 include_path=out / "tasks", batch_size=8)
    return {"export": str(folder), "steps": steps, "internal_eval_loss": _final_eval(cfg.run_dir, "loss"),
            "harness": summarize(h), "seconds": time.perf_counter() - start}


def cocomix_part(out: Path, overrides: list[str]) -> tuple[dict, object]:
    from conceptlm.cocomix.config import CocomixConfig
    from conceptlm.cocomix.pipeline import pipeline
    from conceptlm.core.config import load_config

    topic_tasks(out / "tasks")
    cfg = load_config(CocomixConfig, REPO / "configs/cocomix/tiny_cpu.yaml",
                      [f"run.out_dir={out}", "run.name=cocomix", *COCOMIX, "harness.tasks=[topic_next,topic_ppl]",
                       f"harness.include_path={out / 'tasks'}", *overrides])
    summary = pipeline(cfg)
    arms = {}
    for arm, a in summary["report"]["arms"].items():
        stored = json.loads((Path(a["runs"][0]) / "harness" / "results.json").read_text())
        arms[arm] = {"internal_val_loss": a["final_val_loss"], "harness": stored["summary"],
                     "harness_seconds": stored["seconds"], "active_parameters": a["active_parameters"]}
    return arms, cfg


def cost_part(out: Path, cfg) -> dict:
    """Seconds per example of topic_next (4 loglikelihoods) and topic_ppl (rolling): the CoCoMix student through
    conceptlm-cocomix and through its exported transformers model (hf, trust_remote_code), the NTP twin, and an HF
    GPT-2 of the student's size (no concept path)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conceptlm.cocomix.harness import CocomixLM
    from conceptlm.cocomix.hub import export, load_hub_student
    from conceptlm.harness.evaluate import evaluate, hf_model_args

    folders = export(cfg)["exported"]
    s = cfg.student
    student, tok = load_hub_student(folders["cocomix-s0"])
    gpt2 = out / "gpt2_same_size"
    GPT2LMHeadModel(GPT2Config(vocab_size=student.config.vocab_size, n_positions=s.max_len, n_embd=s.d_model,
                               n_layer=s.n_layers, n_head=s.n_heads, eos_token_id=tok.eos_token_id,
                               bos_token_id=tok.eos_token_id)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    ntp, _ = load_hub_student(folders["ntp-s0"])
    models = {"cocomix student, conceptlm-cocomix": CocomixLM(model=student, tokenizer=tok, device="cpu"),
              "cocomix student, hf (exported, trust_remote_code)": ("hf", hf_model_args(folders["cocomix-s0"])),
              "ntp twin, conceptlm-cocomix": CocomixLM(model=ntp, tokenizer=tok, device="cpu"),
              "HF GPT-2 of the same size, hf": ("hf", hf_model_args(gpt2))}
    cost = {}
    for name, m in models.items():
        row = {}
        for task in ("topic_next", "topic_ppl"):
            model, args = (m, None) if not isinstance(m, tuple) else m
            evaluate(model, model_args=args, device="cpu", tasks=[task], include_path=out / "tasks", limit=2,
                     batch_size=8)  # warm-up (dataset build, first call)
            start = time.perf_counter()
            res = evaluate(model, model_args=args, device="cpu", tasks=[task], include_path=out / "tasks",
                           batch_size=8)
            row[task] = (time.perf_counter() - start) / res["n-samples"][task]["effective"]
        cost[name] = row
    cost["threads"] = torch.get_num_threads()
    return cost


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "harness"))
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    out = Path(args.out)
    os.environ.setdefault("HF_DATASETS_CACHE", str(out / "hf_datasets"))
    result = {"sft": sft_part(out, args.sft_steps)}
    print(json.dumps(result["sft"], indent=2), file=sys.stderr)
    result["cocomix"], cfg = cocomix_part(out, args.overrides)
    print(json.dumps(result["cocomix"], indent=2), file=sys.stderr)
    result["cost_seconds_per_example"] = cost_part(out, cfg)
    (out / "harness_downstream.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
