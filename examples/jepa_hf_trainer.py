"""LLM-JEPA with a plain ``transformers.Trainer``: fine-tune a causal LM on chat records with L_LM + λ·L_JEPA.

Offline on a CPU, about a minute (a tiny Llama built from config, a BPE tokenizer trained on generated NL-RX
records)::

    python examples/jepa_hf_trainer.py

A real model and dataset (any local HF folder, a ``.gguf`` file, or the named offline model ``smollm2-135m``)::

    python examples/jepa_hf_trainer.py --model smollm2-135m \
        --data ../shared/data/llm_jepa/synth_train.jsonl --limit 512 --steps 50 --batch-size 8 --lr 2e-5

The steps: (1) a tokenizer and model, (2) the predictor tokens ``<|predictor_1..k|>`` added to both, (3) every
record turned into its LM sequence, Text view and Code view (:class:`conceptlm.jepa.data.JepaDataset`), (4)
:class:`conceptlm.jepa.hf_trainer.JepaTrainer` with the same view settings as the data (the trainer checks them
against every batch), (5) train, evaluate, save with ``save_pretrained`` (loads back with ``from_pretrained``).
Prints a JSON summary: the logged train loss / LM / JEPA parts and ``eval_loss``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from conceptlm.core.hf import build_tiny_model, ensure_pad_token, load_causal_lm, load_tokenizer  # noqa: E402
from conceptlm.core.tokenizer import train_bpe_tokenizer  # noqa: E402
from conceptlm.data.chat import iter_jsonl_objects  # noqa: E402
from conceptlm.data.generators.nlrx import generate_records  # noqa: E402
from conceptlm.jepa.config import JepaSection, ViewConfig  # noqa: E402
from conceptlm.jepa.data import JepaDataset  # noqa: E402
from conceptlm.jepa.hf_trainer import JepaTrainer  # noqa: E402
from conceptlm.jepa.views import add_predictor_tokens  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="chat JSONL ({'messages': [...]} per line); default: 256 generated NL-RX records")
    p.add_argument("--model", help="local HF model folder, .gguf file or smollm2-135m; default: a tiny Llama")
    p.add_argument("--out", default="runs/jepa_hf_trainer", help="output folder (model, tokenizer, summary)")
    p.add_argument("--limit", type=int, default=256, help="records read from --data")
    p.add_argument("--eval-records", type=int, default=32, help="records held out for evaluation")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=1.0, help="λ, weight of the JEPA term (0 = plain SFT)")
    p.add_argument("--k", type=int, default=1, help="number of predictor tokens")
    p.add_argument("--mode", choices=("packed", "separate"), default="packed")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_records(args: argparse.Namespace) -> list[dict]:
    if args.data is None:
        return generate_records(args.limit, seed=args.seed)
    return [record for _, record in iter_jsonl_objects(args.data, limit=args.limit)]


def tokenizer_and_model(args: argparse.Namespace, records: list[dict]):
    """A local/named model with its tokenizer, or a BPE tokenizer trained on the records and a tiny Llama."""
    if args.model:
        tokenizer = load_tokenizer(args.model)
        model = load_causal_lm(args.model, dtype=torch.float32)
        ensure_pad_token(tokenizer, model)
        return tokenizer, model
    texts = [m["content"] for r in records for m in r["messages"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    model = build_tiny_model("llama", len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                             max_position_embeddings=args.max_length, seed=args.seed,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer, model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    transformers.set_seed(args.seed)
    records = load_records(args)
    tokenizer, model = tokenizer_and_model(args, records)

    # The view settings are given ONCE and used for the data and the trainer (which checks them per batch).
    jepa = JepaSection(lam=args.lam, num_predictors=args.k, mode=args.mode)
    views = ViewConfig(num_predictors=jepa.num_predictors, predictor_position=jepa.predictor_position,
                       text_view=jepa.text_view, direction=jepa.direction, code_view=jepa.code_view)
    add_predictor_tokens(tokenizer, model, jepa.num_predictors)  # resizes the embeddings (mean init)

    held_out = min(args.eval_records, len(records) // 4)
    train_ds = JepaDataset(records[held_out:], tokenizer, views, max_length=args.max_length, name="train")
    eval_ds = JepaDataset(records[:held_out], tokenizer, views, max_length=args.max_length, name="eval")

    out = Path(args.out)
    training_args = transformers.TrainingArguments(
        output_dir=str(out), remove_unused_columns=False,  # batches are JEPA views, not model.forward inputs
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        warmup_steps=0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none",
        seed=args.seed, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = JepaTrainer(model, training_args, jepa_args=jepa, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "model"))  # model + tokenizer, loadable with from_pretrained

    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"train_examples": len(train_ds), "eval_examples": len(eval_ds), "steps": trainer.state.global_step,
               "first": {k: logs[0][k] for k in ("loss", "lm", "jepa") if k in logs[0]},
               "last": {k: logs[-1][k] for k in ("loss", "lm", "jepa") if k in logs[-1]},
               "eval_loss": metrics["eval_loss"], "model_dir": str(out / "model")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
