"""Throughput of the conceptlm training loop vs a bare PyTorch loop, side by side in one process.

Two pairs: (1) an HF tiny Llama through the SFT unit, (2) the same-size LM on ``core.modules`` (embedding ->
``Decoder`` -> head) through a plain ``TrainUnit`` with no HF model. In each pair both loops train the same model on
the same micro-batches (the same BatchPlan, label_mode=all so both compute
the LM head on every position) with AdamW and grad clipping. Rounds alternate bare / trainer so machine noise hits
both alike; the ratio of median tokens/s is the loop's overhead.

    python benchmarks/trainer_overhead.py --rounds 5 --steps 20

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["CONCEPTLM_NO_PROGRESS"] = "1"

    from conceptlm.core.config import load_config
    from conceptlm.core.distributed import init_distributed
    from conceptlm.core.hf import build_tiny_model
    from conceptlm.core.sampling import BatchPlan, step_batches
    from conceptlm.core.tokenizer import train_bpe_tokenizer
    from conceptlm.core.trainer import Trainer
    from conceptlm.data.batching import collate
    from conceptlm.data.chat import ChatDataset
    from conceptlm.data.generators.nlrx import generate_records
    from conceptlm.sft.config import SFTConfig
    from conceptlm.sft.unit import SFTUnit

    records = [r["messages"] for r in generate_records(4000, seed=0)]
    tok = train_bpe_tokenizer((m["content"] for r in records for m in r), vocab_size=1024)
    ds = ChatDataset(records, tok, label_mode="all", max_length=128)
    plan = BatchPlan(ds.lengths, micro_batch_size=args.batch, grad_accum=1, seed=0)
    get = step_batches(ds, plan, functools.partial(collate, pad_token_id=tok.pad_token_id))
    info = init_distributed("cpu")

    def fresh_model():
        return build_tiny_model("llama", len(tok), hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=4, max_position_embeddings=128, seed=0)

    def bare_loop(model, loss_of, offset: int) -> float:
        """The plain PyTorch loop the trainer is measured against; ``loss_of(model, batch)`` is the mean loss."""
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        tokens, t0 = 0, time.perf_counter()
        for s in range(offset, offset + args.steps):
            (b,) = get(s)
            loss_of(model, b).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(b["attention_mask"].sum())
        return tokens / (time.perf_counter() - t0)

    def bare(offset: int) -> float:
        return bare_loop(fresh_model(), lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                       labels=b["labels"]).loss, offset)

    def ours(offset: int, tmp: str) -> float:
        cfg = load_config(SFTConfig, None, [f"run.out_dir={tmp}", f"run.name=r{offset}",
                                            f"train.max_steps={args.steps}",
                                            f"train.log_every={args.steps}", "train.eval_every=0",
                                            "train.progress=false", "optim.lr=1e-3"])
        trainer = Trainer(SFTUnit(fresh_model()), cfg, info, train_batches=lambda s: get(s + offset),
                          artifacts={"tokenizer": tok}, data_state={})
        res = trainer.fit()
        return res.last_train["tokens_per_s"]

    from conceptlm.core.modules import Decoder, DecoderConfig
    from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit

    class ModulesLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(len(tok), args.hidden)
            self.decoder = Decoder(DecoderConfig(d_model=args.hidden, n_layers=args.layers, n_heads=4,
                                                 d_ff=4 * args.hidden))
            self.head = torch.nn.Linear(args.hidden, len(tok), bias=False)

        def loss_sum(self, b):
            h = self.decoder(self.embed(b["input_ids"]), key_padding_mask=b["attention_mask"].bool())
            logits = self.head(h[:, :-1]).float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                                     reduction="sum")

    class ModulesUnit(TrainUnit):
        def __init__(self):
            super().__init__()
            self.lm = ModulesLM()
            self.loss_weights = {"lm": 1.0}

        def counts(self, b):
            return {"lm": int((b["labels"][:, 1:] != -100).sum()), THROUGHPUT_KEY: int(b["attention_mask"].sum())}

        def forward(self, b):
            return {"lm": self.lm.loss_sum(b)}

    def bare_modules(offset: int) -> float:
        return bare_loop(ModulesLM(), lambda m, b: m.loss_sum(b) / (b["labels"][:, 1:] != -100).sum(), offset)

    def ours_modules(offset: int, tmp: str) -> float:
        from conceptlm.core.config import RunConfig

        cfg = load_config(RunConfig, None, [f"run.out_dir={tmp}", f"run.name=m{offset}",
                                            f"train.max_steps={args.steps}",
                                            f"train.log_every={args.steps}", "train.eval_every=0",
                                            "train.progress=false", "optim.lr=1e-3"])
        trainer = Trainer(ModulesUnit(), cfg, info, train_batches=lambda s: get(s + offset), data_state={})
        return trainer.fit().last_train["tokens_per_s"]

    bare_tps, our_tps, mbare_tps, mour_tps = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            off = r * args.steps
            bare_tps.append(bare(off))
            our_tps.append(ours(off, tmp))
            mbare_tps.append(bare_modules(off))
            mour_tps.append(ours_modules(off, tmp))
    out = {
        "model": f"llama d{args.hidden} L{args.layers} V{len(tok)}", "batch": f"{args.batch} x <=128 (NL-RX chat)",
        "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps,
        "bare_tokens_per_s_median": statistics.median(bare_tps),
        "trainer_tokens_per_s_median": statistics.median(our_tps),
        "trainer_over_bare": statistics.median(our_tps) / statistics.median(bare_tps),
        "per_round_ratio": [o / b for o, b in zip(our_tps, bare_tps)],
        "modules_bare_tokens_per_s_median": statistics.median(mbare_tps),
        "modules_trainer_tokens_per_s_median": statistics.median(mour_tps),
        "modules_trainer_over_bare": statistics.median(mour_tps) / statistics.median(mbare_tps),
        "modules_per_round_ratio": [o / b for o, b in zip(mour_tps, mbare_tps)],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
