"""The sentence autoencoder trained here (``conceptlm lcm train-autoencoder``): AutoBLEU and round-trip cosine
against training time, on sentences of corpora it was NOT trained on.

Training: the sentences of the Yelp reviews (``yelp_test.jsonl``, ``messages.1.content``) that ``prepare``'s split
rule puts in the train split (``train-autoencoder``'s own sentence source). Evaluation, at every saved checkpoint
(decoding time is not training time): held-out sentences of

- ``yelp_val``: the reviews of the validation split (same domain, documents never seen),
- ``lee_news``: Lee news background corpus (``/tmp/gensim_data/lee_background.cor``, another domain),
- ``nq_questions``: Natural Questions (``nq_open_train.jsonl`` user turns: short lower-case questions, another
  domain and style)

(``/tmp/gensim_data/crime-and-punishment.txt`` is in Russian, so it is not used),

sentences of 3-40 words. Training time is the loop's own clock (``metrics.jsonl``); say the machine's load.

    python benchmarks/lcm_autoencoder.py --out runs/bench/ae --name small --steps 2000 --save-every 400 --lr 3e-3 \
        --batch 32 --dim 256 --hidden 128 --enc-layers 1 --dec-layers 2 --vocab 1024 --max-tokens 48 --threads 1 \
        --json runs/bench/ae_small.json
    python benchmarks/lcm_autoencoder.py --out /tmp/ae --steps 40 --save-every 20 --json /tmp/ae.json  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from conceptlm.core.checkpoint import list_checkpoints
from conceptlm.core.config import load_config
from conceptlm.core.io import atomic_write_text
from conceptlm.lcm.autoencoder import AutoencoderEncoder, load_autoencoder_decoder
from conceptlm.lcm.autoencoder_train import train_autoencoder
from conceptlm.lcm.config import AutoencoderTrainConfig, DocsSection, PrepareSection, SegmentSection
from conceptlm.lcm.data.documents import iter_documents
from conceptlm.lcm.data.segment import get_segmenter
from conceptlm.lcm.data.store import assign_split
from conceptlm.lcm.decoder_train import evaluate_decoder

REPO = Path(__file__).resolve().parents[1]
YELP = REPO.parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"
LEE = Path("/tmp/gensim_data/lee_background.cor")
NQ = YELP.parent / "nq_open_train.jsonl"


def _keep(s: str) -> bool:
    return 3 <= len(s.split()) <= 40


def eval_sets(n: int) -> dict[str, list[str]]:
    """Held-out sentences: validation-split Yelp reviews, Lee news, NQ questions (first ``n`` unique)."""
    seg = get_segmenter(SegmentSection())
    rule = PrepareSection()
    yelp = DocsSection(source=str(YELP), text_field="messages.1.content", unescape=True)
    sets = {"yelp_val": [s for doc_id, t in iter_documents(yelp)
                         if assign_split(doc_id, rule.val_fraction, rule.split_seed) == "validation"
                         for s in seg.split(t)]}
    if LEE.is_file():  # one document per non-empty line
        texts = [line for line in LEE.read_text(encoding="utf-8").splitlines() if line.strip()]
        sets["lee_news"] = [s for t in texts for s in seg.split(t)]
    nq = DocsSection(source=str(NQ), text_field="messages.1.content", limit=5 * n)
    sets["nq_questions"] = [t for _, t in iter_documents(nq)]
    return {k: [s for s in dict.fromkeys(v) if _keep(s)][:n] for k, v in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/lcm_autoencoder", help="run folder parent")
    ap.add_argument("--name", default="ae")
    ap.add_argument("--json", required=True, help="results file (rewritten after every checkpoint's evaluation)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=256, help="bottleneck width")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--enc-layers", type=int, default=2)
    ap.add_argument("--dec-layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-prefix", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--align", type=float, default=0.0, help="autoencoder.align_weight (MiniLM alignment term)")
    ap.add_argument("--max-sentences", type=int, default=200000)
    ap.add_argument("--eval-n", type=int, default=200, help="sentences per evaluation set")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the existing checkpoints, do not train")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "run.out_dir": args.out, "run.name": args.name, "run.resume": "auto", "train.max_steps": args.steps,
        "train.micro_batch_size": args.batch, "train.eval_every": args.save_every, "train.save_every": args.save_every,
        "train.keep_checkpoints": 1000, "train.log_every": 50, "train.progress": False, "optim.lr": args.lr,
        "optim.weight_decay": 0.01, "schedule.warmup_steps": min(200, args.steps // 10),
        "schedule.min_lr_ratio": 0.1, "docs.source": str(YELP), "docs.text_field": "messages.1.content",
        "docs.unescape": True, "decoder_train.eval_sentences": 256, "decoder_train.decode_eval": 64,
        "decoder_train.max_sentences": args.max_sentences, "autoencoder.dim": args.dim,
        "autoencoder.hidden_size": args.hidden, "autoencoder.encoder_layers": args.enc_layers,
        "autoencoder.decoder_layers": args.dec_layers, "autoencoder.vocab_size": args.vocab,
        "autoencoder.noise_std": args.noise, "autoencoder.align_weight": args.align,
        "autoencoder.max_tokens": args.max_tokens, "autoencoder.n_prefix": args.n_prefix,
        "autoencoder.num_heads": args.heads}
    cfg = load_config(AutoencoderTrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    run_dir = Path(args.out) / args.name
    t0 = time.time()
    if not args.eval_only:
        train_autoencoder(cfg)
    wall = time.time() - t0
    clock = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and "time" in row:
            clock[int(row["step"])] = float(row["time"])
    sets = eval_sets(args.eval_n)
    out = {"command": "python benchmarks/lcm_autoencoder.py " + " ".join(os.sys.argv[1:]),
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "loadavg_at_start": os.getloadavg()},
           "settings": overrides, "wall_s": wall, "eval_sets": {k: len(v) for k, v in sets.items()}, "rows": []}
    for ckpt in list_checkpoints(run_dir):
        step = int(ckpt.name.split("_")[-1])
        enc = AutoencoderEncoder(ckpt / "model")
        dec = load_autoencoder_decoder(ckpt / "model", encoder=enc)
        art = json.loads((ckpt / "model" / "artifact.json").read_text())
        row = {"step": step, "train_time_s": clock.get(step), "encoder_params": art.get("encoder_params"),
               "decoder_params": art.get("decoder_params"), "sets": {}}
        t = time.time()
        for name, sents in sets.items():
            m = evaluate_decoder(enc, dec, sents, examples=3)
            row["sets"][name] = {k: m[k] for k in ("autobleu", "autobleu_sentence", "round_trip_cos", "n")}
            row["sets"][name]["examples"] = m["examples"]
        row["eval_s"] = time.time() - t
        out["rows"].append(row)
        print(json.dumps({"step": step, "train_time_s": row["train_time_s"],
                          **{k: (round(v["autobleu"], 1), round(v["round_trip_cos"], 3))
                             for k, v in row["sets"].items()}}), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
