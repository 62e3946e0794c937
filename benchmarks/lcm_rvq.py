"""Residual vector quantization of real sentence embeddings: quality as a function of the number of codebooks.

Sentences of the Yelp reviews (``../shared/data/llm_jepa/yelp_test.jsonl``, rule segmenter, 3-40 words) are
embedded with all-MiniLM-L6-v2; training sentences come from the first reviews, held-out sentences from the last
``--held-docs`` reviews (no held-out sentence occurs in a training review). As in the Quantized LCM, the
quantizer is fitted in the normalized space (the LCM's robust normalizer, fitted on the training vectors) and its
approximations are denormalized before decoding.

For every number of codebooks ``k`` (and the unquantized vector as the reference row) on the held-out sentences:

- ``mse``: squared error per dimension in normalized space (train: the same on the fitting vectors);
- ``cos``: cosine between the denormalized approximation and the unquantized embedding;
- ``bleu`` / ``rt_cos``: AutoBLEU (sacrebleu corpus BLEU against the original sentence) and round-trip cosine
  ``cos(encode(decode(v_k)), x)`` of the retrieval decoder over the training sentences (held-out sentences are
  not in its bank, so even the unquantized vector decodes to a paraphrase);
- ``exact`` / ``bleu_oracle``: the same retrieval with the held-out sentences added to the bank: the fraction of
  approximations that still retrieve their own sentence, and the AutoBLEU of that decoder;
- ``mse_alt``: the held-out ``mse`` of our quantizer fitted with the other seeding (k-means++ when ``--init
  random``, and vice versa);
- ``vqp_mse``: the held-out ``mse`` of vector-quantize-pytorch's ``ResidualVQ`` fitted on the same vectors with
  its k-means initialisation (eval-mode forward, same iterations; its draws from the global RNG, seeded), side
  by side with ours.

    python benchmarks/lcm_rvq.py --train-sentences 20000 --test-sentences 400   # ~5.5 min, one thread
    python benchmarks/lcm_rvq.py --codebooks 8 --codebook-size 64 --train-sentences 2000   # quick

Prints a markdown table and writes ``--out`` (JSON) and the same path with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conceptlm.core.io import atomic_write_text  # noqa: E402
from conceptlm.lcm.config import DocsSection, SegmentSection  # noqa: E402
from conceptlm.lcm.data.documents import iter_documents  # noqa: E402
from conceptlm.lcm.data.encoders import get_encoder  # noqa: E402
from conceptlm.lcm.data.normalizer import RobustNormalizer  # noqa: E402
from conceptlm.lcm.data.segment import get_segmenter  # noqa: E402
from conceptlm.lcm.decoder_train import autobleu  # noqa: E402
from conceptlm.lcm.decoders import RetrievalDecoder  # noqa: E402
from conceptlm.lcm.rvq import ResidualQuantizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
YELP = REPO.parent / "shared" / "data" / "llm_jepa" / "yelp_test.jsonl"


def yelp_sentences(path: Path, n_docs: int, held_docs: int, max_train: int, n_test: int
                   ) -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences) from disjoint reviews; 3-40 words, deduplicated."""
    docs = DocsSection(source=str(path), text_field="messages.1.content", unescape=True, limit=n_docs)
    seg = get_segmenter(SegmentSection())
    texts = [t for _, t in iter_documents(docs)]
    ok = lambda s: 3 <= len(s.split()) <= 40  # noqa: E731
    train = list(dict.fromkeys(s for t in texts[:-held_docs] for s in seg.split(t) if ok(s)))[:max_train]
    seen = set(train)
    held = [s for s in dict.fromkeys(s for t in texts[-held_docs:] for s in seg.split(t) if ok(s))
            if s not in seen][:n_test]
    return train, held


class CachedEncoder:
    """Remembers every sentence's vector (decoded sentences come from the bank, so re-encoding them is free)."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.cache = encoder, encoder.dim, {}

    def encode(self, sentences, batch_size=None, progress=False) -> torch.Tensor:
        todo = list(dict.fromkeys(s for s in sentences if s not in self.cache))
        if todo:
            for s, v in zip(todo, self.encoder.encode(todo, batch_size=batch_size, progress=progress)):
                self.cache[s] = v.float()
        return torch.stack([self.cache[s] for s in sentences]) if sentences else torch.empty(0, self.dim)

    def identity(self) -> dict:
        return self.encoder.identity()


def embed(enc: CachedEncoder, train: list[str], held: list[str], cache: str | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors of the training and held-out sentences, from ``cache`` when it holds exactly these sentences."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = json.dumps([train, held], ensure_ascii=False)
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("sentences") == key:
                x_train, x_test = f.get_tensor("train"), f.get_tensor("held")
                enc.cache.update(zip(train + held, torch.cat([x_train, x_test])))
                return x_train, x_test
    x_train, x_test = enc.encode(train), enc.encode(held)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"train": x_train.contiguous(), "held": x_test.contiguous()}, str(tmp), metadata={"sentences": key})
        os.replace(tmp, path)
    return x_train, x_test


def vqp_curve(z_train: torch.Tensor, z_test: torch.Tensor, k: int, c: int, iters: int, seed: int) -> dict:
    """Held-out MSE per number of codebooks of vector-quantize-pytorch's ResidualVQ (k-means init, offline)."""
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return {"error": "vector-quantize-pytorch is not installed"}
    t = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = ResidualVQ(dim=z_train.shape[1], num_quantizers=k, codebook_size=c, kmeans_init=True,
                         kmeans_iters=iters)
        ref.eval()
        with torch.no_grad():
            ref(z_train[None])  # the k-means init of every layer on the training residuals
    fit_s = time.perf_counter() - t
    with torch.no_grad():
        _, codes, _ = ref(z_test[None])
        parts = ref.get_codes_from_indices(codes).cumsum(0)[:, 0]  # (K, N, D)
    mse = [float(((z_test - parts[j]) ** 2).mean()) for j in range(k)]
    return {"fit_s": round(fit_s, 1), "mse": mse}


def markdown(rows: list[dict]) -> str:
    cols = ["k", "bits", "mse_train", "mse", "mse_alt", "vqp_mse", "cos", "bleu", "rt_cos", "exact", "bleu_oracle"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench/lcm_rvq.json")
    ap.add_argument("--docs", type=int, default=2000, help="yelp reviews read")
    ap.add_argument("--held-docs", type=int, default=200, help="last reviews kept for held-out sentences")
    ap.add_argument("--train-sentences", type=int, default=8000)
    ap.add_argument("--test-sentences", type=int, default=300)
    ap.add_argument("--codebooks", type=int, default=16)
    ap.add_argument("--codebook-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20, help="k-means iterations per codebook")
    ap.add_argument("--ks", default="0,1,2,3,4,6,8,12,16", help="numbers of codebooks reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", choices=["random", "kmeans++"], default="random", help="k-means seeding")
    ap.add_argument("--empty", choices=["keep", "split"], default="keep", help="empty-unit rule")
    ap.add_argument("--no-variant", action="store_true", help="skip the fit with the other seeding (mse_alt)")
    ap.add_argument("--no-vqp", action="store_true", help="skip the vector-quantize-pytorch comparison")
    ap.add_argument("--vectors-cache", default=None,
                    help="safetensors file of the embedded sentences: read when it holds the same sentences, "
                         "else written (skips the embedding on reruns)")
    args = ap.parse_args()
    if not YELP.is_file():
        raise SystemExit(f"{YELP} not found (the shared data folder is needed)")
    torch.set_num_threads(args.threads)
    ks = [k for k in (int(s) for s in args.ks.split(",")) if k <= args.codebooks]
    res: dict = {"command": " ".join(["python", "benchmarks/lcm_rvq.py", *sys.argv[1:]]), "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "platform": platform.platform(), "load_avg_start": os.getloadavg()}}

    t0 = time.perf_counter()
    train, held = yelp_sentences(YELP, args.docs, args.held_docs, args.train_sentences, args.test_sentences)
    enc = CachedEncoder(get_encoder())
    x_train, x_test = embed(enc, train, held, args.vectors_cache)
    res["data"] = {"source": str(YELP), "train_sentences": len(train), "test_sentences": len(held),
                   "mean_words_test": round(sum(len(s.split()) for s in held) / len(held), 1),
                   "embed_s": round(time.perf_counter() - t0, 1), "encoder": enc.identity()}
    print(json.dumps(res["data"]), flush=True)

    norm = RobustNormalizer(x_train.shape[1]).fit(x_train)
    z_train, z_test = norm.normalize(x_train), norm.normalize(x_test)
    t = time.perf_counter()
    q = ResidualQuantizer(z_train.shape[1], args.codebooks, args.codebook_size)
    q.fit(z_train, iters=args.iters, generator=torch.Generator().manual_seed(args.seed), init=args.init,
          empty=args.empty)
    res["fit"] = {"seconds": round(time.perf_counter() - t, 1), "codebooks": args.codebooks,
                  "codebook_size": args.codebook_size, "iters": args.iters, "init": args.init, "empty": args.empty,
                  "log": q.fit_log}
    print(json.dumps({k: v for k, v in res["fit"].items() if k != "log"}), flush=True)
    alt = None
    if not args.no_variant:  # the other seeding, same everything else: held-out mse only
        other = "kmeans++" if args.init == "random" else "random"
        t = time.perf_counter()
        alt = ResidualQuantizer(z_train.shape[1], args.codebooks, args.codebook_size).fit(
            z_train, iters=args.iters, generator=torch.Generator().manual_seed(args.seed), init=other,
            empty=args.empty)
        res["fit_alt"] = {"init": other, "seconds": round(time.perf_counter() - t, 1),
                          "train_mse": [r["mse"] for r in alt.reconstruction_curve(z_train)]}
        alt_parts = alt.partial_sums(alt.encode(z_test))
    vqp = None if args.no_vqp else vqp_curve(z_train, z_test, args.codebooks, args.codebook_size, args.iters,
                                               args.seed)
    res["vqp"] = vqp

    bank = RetrievalDecoder(x_train, train, enc.identity())
    oracle = RetrievalDecoder(torch.cat([x_train, x_test]), train + held, enc.identity())
    train_curve = q.reconstruction_curve(z_train)
    parts = q.partial_sums(q.encode(z_test))  # (N, K + 1, D)
    rows = []
    for k in [None, *ks]:
        z_k = z_test if k is None else parts[:, k]
        v = x_test if k is None else norm.denormalize(z_k)
        hyps = bank.decode(v)
        rt = F.cosine_similarity(enc.encode(hyps), x_test, dim=-1)
        hyps_o = oracle.decode(v)
        row = {"k": "none" if k is None else k,
               "bits": None if k is None else int(ResidualQuantizer.bits(k, args.codebook_size)),
               "mse_train": 0.0 if k is None else train_curve[k]["mse"],
               "mse": float(((z_test - z_k) ** 2).mean()),
               "mse_alt": None if (k is None or alt is None) else float(((z_test - alt_parts[:, k]) ** 2).mean()),
               "vqp_mse": (vqp["mse"][k - 1] if vqp and "mse" in vqp and k else None),
               "cos": float(F.cosine_similarity(v, x_test, dim=-1).mean()),
               "bleu": autobleu(held, hyps)["autobleu"], "rt_cos": float(rt.mean()),
               "exact": sum(h == s for h, s in zip(hyps_o, held)) / len(held),
               "bleu_oracle": autobleu(held, hyps_o)["autobleu"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res["rows"] = rows
    res["examples"] = [{"ref": held[i], **{f"k={k}": bank.decode(norm.denormalize(parts[i:i + 1, k]))[0]
                                           for k in ks if k > 0}} for i in range(3)]
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["machine"]["load_avg_end"] = os.getloadavg()
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    atomic_write_text(out, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out.with_suffix(".md"), f"`{res['command']}`\n\n{table}\n")


if __name__ == "__main__":
    main()
