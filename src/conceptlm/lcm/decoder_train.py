"""Training and evaluating sentence decoders (embedding -> text) on the shared loop.

The prefix decoder trains as a :class:`~conceptlm.core.unit.TrainUnit` with one loss part, ``ntp``: next-token
cross-entropy of the sentence tokens (and EOS) given the ``n_prefix`` prefix embeddings of the sentence's vector.

The frozen sentence encoder is **not part of the unit**: every sentence is embedded once, before training, and the
dataset holds the vectors (a sentence is seen many times over the epochs; encoding it once is far cheaper than in
every step, and the unit stays a plain LM that DDP/FSDP handle as usual). Training inputs are **noised** for
robustness (LCM paper §2.5.2, Eq. 27): ``x' = normalize(x + s * eps / sqrt(dim))``, ``eps ~ N(0, I)``, with ``s``
``decoder.noise_std`` (``fixed``) or drawn per example from U[0, noise_std] (``uniform``). The draws come from
``step_rng.per_example`` keyed by (step, sentence index): the same on whichever rank or micro-batch holds the
sentence. Evaluation reads clean vectors.

Evaluation: eval ``ntp`` / ``token_acc`` from the loop, plus, at every evaluation, decoding of the first
``data.decode_eval`` held-out sentences: **AutoBLEU** (sacrebleu BLEU of ``decode(encode(s))`` against ``s``,
corpus-level ``autobleu`` and the mean sentence-level ``autobleu_sentence``) and the **round-trip cosine**
``cos(encode(decode(encode(s))), encode(s))`` (``round_trip_cos``).

``decoder.kind: retrieval`` needs no training: ``train_decoder`` embeds the training sentences into a bank, saves it
in ``{run_dir}/decoder`` and evaluates it the same way (an identical bank already there is reused).

Splits: a decoder learns from the **training documents only** (``decoder_train.split: train``, the default): the
documents that ``prepare`` puts in the train split (``store.assign_split`` with ``prepare.val_fraction`` /
``prepare.split_seed``), so no sentence of a validation document is in a retrieval bank or in a prefix decoder's
training targets unless it also occurs in a training document. Its own held-out sentences (eval loss, AutoBLEU)
are a seeded subset of those training documents' sentences. ``split: all`` (every document) is recorded, and
``generate`` / ``evaluate`` refuse such a decoder on validation documents. Every decoder carries ``artifact.json``
(kind ``lcm.decoder``): the fingerprints of its sentences, held-out sentences and encoder, and ``data`` -- where the
sentences came from (``source``: ``prepared`` with the prepared folder's fingerprint, ``docs``, or ``given``), the
split and the split rule.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conceptlm.core.artifact import Identity, decide, digest
from conceptlm.core.errors import ConceptLMError, ConfigError
from conceptlm.core.io import atomic_write_text
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.rng import StepRandomness, derive_seed
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm.config import DecoderTrainConfig, DocsSection, PrepareSection, SegmentSection, decoder_run_config
from conceptlm.lcm.data.documents import iter_documents
from conceptlm.lcm.data.encoders import SentenceEncoder, get_encoder, identity_fingerprint, verify_identity
from conceptlm.lcm.data.segment import get_segmenter
from conceptlm.lcm.data.store import MANIFEST_FILE, EmbeddedDocuments, assign_split
from conceptlm.lcm.decoders import DECODER_KIND, RetrievalDecoder, SentenceDecoder, load_decoder
from conceptlm.lcm.prefix_decoder import PrefixLMDecoder, build_prefix_decoder

__all__ = [
    "SentenceTargets", "TargetCollator",
    "PrefixDecoderUnit", "noise_embeddings", "autobleu", "round_trip_cosine", "evaluate_decoder",
    "corpus_sentences", "split_sentences", "train_decoder", "eval_decoder", "decoder_identity",
    "StoredVectorsEncoder", "prepared_sentences",
]

log = logging.getLogger(__name__)
NOISE_PURPOSE = "lcm-decoder-noise"
NOISE_SCALE_PURPOSE = "lcm-decoder-noise-scale"


# ------------------------------------------------------------------------------------------------ data
def corpus_sentences(docs: DocsSection, segment: SegmentSection, *, min_chars: int = 2,
                     split: PrepareSection | None = None) -> list[str]:
    """Every sentence of the documents of ``docs`` split by ``segment`` (document order), short ones dropped.

    Args:
        split: keep only the documents that ``prepare`` with this section puts in the train split
            (``assign_split(doc_id, split.val_fraction, split.split_seed)``); None = every document.
    """
    splitter = get_segmenter(segment)
    return [s for doc_id, text in iter_documents(docs)
            if split is None or assign_split(doc_id, split.val_fraction, split.split_seed) == "train"
            for s in splitter.split(text) if len(s) >= min_chars]


def split_sentences(sentences: Sequence[str], *, n_eval: int, max_train: int, seed: int
                    ) -> tuple[list[str], list[str]]:
    """Unique sentences, shuffled with a seeded RNG: ``(train[:max_train], eval[:n_eval])``, disjoint."""
    unique = list(dict.fromkeys(sentences))
    random.Random(derive_seed("lcm-decoder-split", seed)).shuffle(unique)
    return unique[n_eval:n_eval + max_train], unique[:n_eval]


class SentenceTargets:
    """Dataset of ``{"id", "vector", "ids"}``: sentence i's embedding (dim,) and its target token ids.

    ``lengths`` (target tokens) lets the batch plan bucket sentences of similar length.
    """

    def __init__(self, vectors: torch.Tensor, targets: list[list[int]]):
        if vectors.shape[0] != len(targets):
            raise ValueError(f"{vectors.shape[0]} vectors for {len(targets)} targets")
        self.vectors, self.targets = vectors, targets
        self.lengths = [len(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"id": i, "vector": self.vectors[i], "ids": self.targets[i]}


@dataclass(frozen=True)
class TargetCollator:
    """Right-pads target ids with ``pad_id``: ``ids`` (B,), ``vectors`` (B, dim), ``input_ids`` / ``labels`` /
    ``attention_mask`` (B, T) with labels -100 at padding."""

    pad_id: int

    def __call__(self, items: list[dict]) -> dict:
        t = max(len(it["ids"]) for it in items)
        input_ids = torch.full((len(items), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), t), -100, dtype=torch.long)
        mask = torch.zeros((len(items), t), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["ids"])
            input_ids[r, :n] = labels[r, :n] = torch.tensor(it["ids"], dtype=torch.long)
            mask[r, :n] = 1
        return {"ids": torch.tensor([it["id"] for it in items]), "vectors": torch.stack([it["vector"] for it in items]),
                "input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------ unit
def noise_embeddings(vectors: torch.Tensor, ids: Sequence[int] | torch.Tensor, rng: StepRandomness, *,
                     std: float, schedule: str = "uniform") -> torch.Tensor:
    """Noised unit-norm embeddings ``normalize(normalize(x) + s * eps / sqrt(dim))`` (B, dim).

    ``eps ~ N(0, I)`` and (``schedule="uniform"``) ``s ~ U[0, std]`` are drawn per example from
    ``rng.per_example`` keyed by the example ids, so an example's noise does not depend on the batch it is in;
    ``schedule="fixed"`` uses ``s = std``. ``std`` is thus the expected noise norm relative to the unit vector.
    """
    dim = vectors.shape[1]
    x = F.normalize(vectors.float(), dim=-1)
    eps = rng.per_example(NOISE_PURPOSE, ids, (dim,), device=x.device)
    if schedule == "uniform":
        scale = std * rng.per_example(NOISE_SCALE_PURPOSE, ids, (1,), sampler=torch.rand, device=x.device)
    elif schedule == "fixed":
        scale = torch.full((x.shape[0], 1), float(std), device=x.device)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r} (fixed or uniform)")
    return F.normalize(x + scale * eps / math.sqrt(dim), dim=-1).to(vectors.dtype)


class PrefixDecoderUnit(TrainUnit):
    """Trains a :class:`PrefixLMDecoder`: loss part ``ntp`` (sentence tokens + EOS given the prefix), metric
    ``token_acc`` (greedy next-token accuracy); throughput in sentences. Its export is the decoder folder."""

    metric_names = ("token_acc",)
    throughput_unit = "sentences"

    def __init__(self, decoder: PrefixLMDecoder, *, noise_std: float = 0.0, noise_schedule: str = "uniform"):
        super().__init__()
        self.decoder = decoder
        self.noise_std, self.noise_schedule = noise_std, noise_schedule
        self.loss_weights = {"ntp": 1.0}
        self.manifest: tuple[Identity, dict] | None = None
        """``(identity, extra)`` written as the export's ``artifact.json`` (see :func:`decoder_identity`)."""

    def counts(self, batch: dict) -> dict:
        return {"ntp": (batch["labels"] != -100).sum(), THROUGHPUT_KEY: batch["labels"].shape[0]}

    def forward(self, batch: dict) -> dict:
        vectors = batch["vectors"]
        if self.training and self.noise_std > 0 and self.step_rng is not None:
            vectors = noise_embeddings(vectors, batch["ids"], self.step_rng, std=self.noise_std,
                                       schedule=self.noise_schedule)
        loss, n, correct = self.decoder.token_loss(vectors, batch["input_ids"], batch["labels"],
                                                   batch["attention_mask"])
        return {"ntp": loss, "token_acc": (correct, n)}

    def export(self, directory: Path, state_dict: dict[str, torch.Tensor], artifacts: dict[str, Any]) -> bool:
        sd = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        self.decoder.write(Path(directory), sd)
        if self.manifest is not None:
            from conceptlm.core.artifact import write_manifest

            write_manifest(Path(directory), self.manifest[0], extra=self.manifest[1])
        return True


# ------------------------------------------------------------------------------------------------ metrics
def autobleu(refs: Sequence[str], hyps: Sequence[str], *, lowercase: bool = False) -> dict[str, float]:
    """Auto-encoding BLEU (sacrebleu, 13a tokenization, 0-100) of decoded sentences against their sources.

    Returns:
        ``autobleu``: corpus BLEU over all pairs; ``autobleu_sentence``: mean sentence BLEU (exp smoothing).
    """
    import sacrebleu

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references for {len(hyps)} hypotheses")
    if not refs:
        return {"autobleu": float("nan"), "autobleu_sentence": float("nan")}
    corpus = sacrebleu.corpus_bleu(list(hyps), [list(refs)], lowercase=lowercase).score
    sent = [sacrebleu.sentence_bleu(h, [r], lowercase=lowercase).score for r, h in zip(refs, hyps)]
    return {"autobleu": corpus, "autobleu_sentence": sum(sent) / len(sent)}


def _round_trip(encoder: SentenceEncoder, decoder: SentenceDecoder, sentences: Sequence[str],
                vectors: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
    x = encoder.encode(list(sentences)) if vectors is None else vectors
    hyps = decoder.decode(x)
    back = encoder.encode(hyps)
    return hyps, F.cosine_similarity(back.float(), x.float().to(back.device), dim=-1)


def round_trip_cosine(encoder: SentenceEncoder, decoder: SentenceDecoder, sentences: Sequence[str]) -> float:
    """Mean ``cos(encode(decode(encode(s))), encode(s))`` over ``sentences``."""
    return float(_round_trip(encoder, decoder, sentences)[1].mean())


def evaluate_decoder(encoder: SentenceEncoder, decoder: SentenceDecoder, sentences: Sequence[str], *,
                     vectors: torch.Tensor | None = None, examples: int = 0, lowercase: bool = False) -> dict:
    """AutoBLEU and round-trip cosine of ``decoder`` on ``sentences`` with one decoding pass.

    Args:
        vectors: ``encoder.encode(sentences)`` when already computed (n, dim).
        examples: how many ``{"ref", "hyp"}`` pairs to include under ``"examples"``.
        lowercase: case-insensitive BLEU.

    Returns:
        ``{"autobleu", "autobleu_sentence", "round_trip_cos", "n"}`` (+ ``"examples"``).
    """
    hyps, cos = _round_trip(encoder, decoder, sentences, vectors)
    out: dict[str, Any] = {**autobleu(sentences, hyps, lowercase=lowercase), "round_trip_cos": float(cos.mean()),
                           "n": len(hyps)}
    if examples:
        out["examples"] = [{"ref": r, "hyp": h} for r, h in zip(list(sentences)[:examples], hyps[:examples])]
    return out


# ------------------------------------------------------------------------------------------------ recipes
class StoredVectorsEncoder:
    """An encoder that answers from the vectors a ``prepare`` run already stored (fp16) and encodes only the
    sentences it has not seen; same identity as the wrapped encoder."""

    def __init__(self, encoder, table: dict[str, torch.Tensor]):
        self.encoder, self.table = encoder, table
        self.name = encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def identity(self) -> dict:
        return self.encoder.identity()

    def encode(self, sentences, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        sentences = list(sentences)
        missing = list(dict.fromkeys(s for s in sentences if s not in self.table))
        fresh = dict(zip(missing, self.encoder.encode(missing, batch_size=batch_size, progress=progress))) \
            if missing else {}
        if not sentences:
            return torch.zeros(0, self.dim)
        return torch.stack([self.table[s] if s in self.table else fresh[s] for s in sentences]).float()


def prepared_sentences(folder: Path | None, split: str, encoder) -> tuple[list[str] | None,
                                                                         dict[str, torch.Tensor] | None, dict | None]:
    """``(sentences, vectors, data)`` of the prepared ``folder``'s training documents (all documents with
    ``split="all"``, ``decoder_train.split``) for the decoder, or ``(None, None, None)`` when there is no prepared
    folder.

    ``sentences``: every sentence in document order except the appended end-of-text sentence; ``vectors``:
    sentence -> stored vector (fp16, as the LCM sees it) when the folder was made with this encoder, else None;
    ``data``: what the decoder's manifest records (the folder's fingerprint, the split and the split rule)."""
    if folder is None or not (folder / MANIFEST_FILE).is_file():
        return None, None, None
    docs = EmbeddedDocuments(folder, "train" if split == "train" else "all")
    try:
        verify_identity(docs.encoder_identity, encoder, where=str(folder))
        same = True
    except ConceptLMError:
        same = False
    prep = docs.manifest.get("prepare") or {}
    eot = prep.get("end_of_text_sentence") if prep.get("end_of_text") else None
    sentences: list[str] = []
    table: dict[str, torch.Tensor] = {}
    for i in range(len(docs)):
        d = docs[i]
        sents = d["sentences"]
        n = len(sents) - 1 if eot is not None and sents and sents[-1] == eot else len(sents)
        sentences.extend(sents[:n])
        if same:
            for sentence, vector in zip(sents[:n], d["vectors"][:n]):
                table.setdefault(sentence, vector)
    data = {"source": "prepared", "prepared": docs.fingerprint, "split": split,
            "val_fraction": prep.get("val_fraction"), "split_seed": prep.get("split_seed"), "documents": len(docs)}
    return sentences, (table if same else None), data


def _sentences(cfg: DecoderTrainConfig, given: Sequence[str] | None, data: dict | None = None
               ) -> tuple[list[str], list[str], dict]:
    """``(train, held_out, data)``: the decoder's sentences and where they came from (see the module docstring)."""
    d = cfg.decoder_train
    if given is None:
        rule = cfg.prepare if d.split == "train" else None
        given = corpus_sentences(cfg.docs, cfg.segment, min_chars=d.min_chars, split=rule)
        data = {"source": "docs", "split": d.split, "val_fraction": cfg.prepare.val_fraction,
                "split_seed": cfg.prepare.split_seed}
    else:
        given = [s for s in given if len(s) >= d.min_chars]
        data = dict(data) if data is not None else {"source": "given", "split": "given"}
    train_s, eval_s = split_sentences(given, n_eval=d.eval_sentences, max_train=d.max_sentences,
                                      seed=cfg.train.seed)
    if not train_s:
        raise ConfigError(f"no training sentences left after holding out data.eval_sentences={d.eval_sentences} "
                          f"of {len(set(given))} unique sentences", field="decoder_train.eval_sentences")
    return train_s, eval_s, data


def decoder_identity(cfg: DecoderTrainConfig, encoder: SentenceEncoder, train_s: Sequence[str],
                     eval_s: Sequence[str], data: dict) -> tuple[Identity, dict]:
    """The decoder's identity (kind ``lcm.decoder``) and the extra manifest fields (``data``, ``encoder``).

    Settings: the decoder and ``decoder_train`` sections and the seed (a prefix decoder also its optimizer,
    schedule and length); inputs: the fingerprints of the training and held-out sentences, of the encoder
    (:func:`~conceptlm.lcm.data.encoders.identity_fingerprint`) and, when the vectors came from a prepared folder, of
    that folder."""
    d = {k: v for k, v in asdict(cfg.decoder_train).items() if k != "on_change"}  # what to do, not what it is
    settings: dict[str, Any] = {"decoder": {k: v for k, v in asdict(cfg.decoder).items()
                                            if k != "path" and not k.startswith("sonar_")},
                                "seed": cfg.train.seed}
    if cfg.decoder.kind == "retrieval":
        settings["decoder"] = {"kind": cfg.decoder.kind}
        settings["decoder_train"] = {k: d[k] for k in ("max_sentences", "eval_sentences", "min_chars", "split")}
    else:
        settings["decoder_train"] = d
        settings["train"] = {"max_steps": cfg.train.max_steps, "micro_batch_size": cfg.train.micro_batch_size,
                             "grad_accum": cfg.train.grad_accum, "optim": asdict(cfg.optim),
                             "schedule": asdict(cfg.schedule)}
    inputs = {"encoder": identity_fingerprint(encoder), "sentences": digest(list(train_s)),
              "held_out": digest(list(eval_s))}
    if data.get("prepared"):
        inputs["prepared"] = data["prepared"]
    extra = {"data": data, "encoder": encoder.identity(), "n_sentences": len(train_s), "n_held_out": len(eval_s)}
    return Identity(kind=DECODER_KIND, format=1, settings=settings, inputs=inputs), extra


def _train_retrieval(cfg: DecoderTrainConfig, session, encoder: SentenceEncoder, train_s: list[str],
                     eval_s: list[str], data: dict) -> TrainResult:
    identity, extra = decoder_identity(cfg, encoder, train_s, eval_s, data)
    where = cfg.run_dir / "decoder"
    reused = decide(where, identity, on_change=cfg.decoder_train.on_change, what=str(where),
                    option="decoder_train.on_change") == "reuse"
    if reused:
        log.info("%s: the same bank (sentences, encoder and settings) is there already: reused", where)
        bank = RetrievalDecoder.load(where, encoder=encoder)
    else:
        bank = RetrievalDecoder.build(train_s, encoder, progress=cfg.train.progress)
    session.create_run_dir()
    metrics: dict[str, Any] = {}
    if cfg.decoder_train.decode_eval:
        metrics = evaluate_decoder(encoder, bank, eval_s[:cfg.decoder_train.decode_eval])
    path = None
    if session.info.is_main:
        path = where if reused else bank.save(where, identity=identity, extra=extra)
        atomic_write_text(cfg.run_dir / "eval.json", json.dumps(metrics, indent=2))
    return TrainResult(step=0, run_dir=cfg.run_dir, last_train={}, last_eval=metrics, checkpoint=path)


def train_decoder(cfg: DecoderTrainConfig, *, command: str | None = None,
                  sentences: Sequence[str] | None = None, encoder: SentenceEncoder | None = None,
                  data: dict | None = None) -> TrainResult:
    """Train a prefix decoder on the shared loop (or build a retrieval bank) for the encoder of ``cfg.encoder``.

    Args:
        sentences: the training corpus (default: the sentences of ``cfg.docs``' training documents, segmented by
            ``cfg.segment``); duplicates are dropped and ``decoder_train.eval_sentences`` of them are held out.
        encoder: an already built encoder (default: ``get_encoder(cfg.encoder)``).
        data: where ``sentences`` came from, recorded in the decoder's ``artifact.json`` (e.g. ``{"source":
            "prepared", "prepared": <fingerprint>, "split": "train", ...}``; default ``{"source": "given"}``).

    Returns:
        The loop's ``TrainResult``; the checkpoints' ``model/`` folder is the decoder (``load_decoder`` reads it).
        For ``decoder.kind: retrieval``: step 0, ``checkpoint`` = the saved bank, ``last_eval`` its metrics.
    """
    cfg = decoder_run_config(cfg)
    if cfg.decoder.kind == "sonar":
        raise ConfigError("decoder.kind=sonar is SONAR's pretrained decoder: there is nothing to train (generate, "
                          "evaluate and eval-decoder load it directly)", field="decoder.kind")
    with run_session(cfg, command) as session:
        train_s, eval_s, data = _sentences(cfg, sentences, data)
        encoder = encoder or get_encoder(cfg.encoder)
        if cfg.decoder.kind == "retrieval":
            return _train_retrieval(cfg, session, encoder, train_s, eval_s, data)
        c = cfg.decoder
        decoder = build_prefix_decoder(c, dim=encoder.dim, encoder_identity=encoder.identity(), sentences=train_s,
                                       seed=cfg.train.seed)
        log.info("embedding %d training and %d held-out sentences", len(train_s), len(eval_s))
        vectors = encoder.encode(train_s + eval_s, progress=cfg.train.progress)
        train_ds = SentenceTargets(vectors[:len(train_s)], decoder.target_ids(train_s))
        eval_ds = SentenceTargets(vectors[len(train_s):], decoder.target_ids(eval_s)) if eval_s else None
        unit = PrefixDecoderUnit(decoder, noise_std=c.noise_std, noise_schedule=c.noise_schedule)
        unit.manifest = decoder_identity(cfg, encoder, train_s, eval_s, data)
        plan = make_plan(cfg, session.info, train_ds)
        session.create_run_dir()
        k = cfg.decoder_train.decode_eval
        on_eval = None
        if k:
            def on_eval(step: int) -> dict[str, float]:
                m = evaluate_decoder(encoder, decoder, eval_s[:k], vectors=eval_ds.vectors[:k])
                return {key: m[key] for key in ("autobleu", "autobleu_sentence", "round_trip_cos")}
        return fit(cfg, session.info, unit, train_ds=train_ds, eval_ds=eval_ds,
                   collate_fn=TargetCollator(decoder.pad_id), source_name="lcm-decoder-sentences",
                   artifacts={"tokenizer": decoder.tokenizer}, on_eval=on_eval, plan=plan)


def eval_decoder(cfg: DecoderTrainConfig, *, checkpoint: str | None = None, output: str | None = None,
                 sentences: Sequence[str] | None = None, encoder: SentenceEncoder | None = None) -> dict:
    """AutoBLEU and round-trip cosine of a saved decoder on the held-out sentences of ``cfg``.

    ``checkpoint``: a decoder folder, a checkpoint or a run folder (default: ``decoder.path``, else the run's
    newest checkpoint or bank). Writes the result as JSON to ``output`` when given (atomically).
    """
    _, eval_s, _ = _sentences(cfg, sentences)
    n = cfg.decoder_train.decode_eval or len(eval_s)
    encoder = encoder or get_encoder(cfg.encoder)
    if cfg.decoder.kind == "sonar" and checkpoint is None:
        from conceptlm.lcm.sonar_decoder import SonarDecoder

        source: str | Path = f"sonar:{cfg.decoder.sonar_decoder}"
        decoder: SentenceDecoder = SonarDecoder(cfg.decoder, encoder.identity())
    else:
        source = checkpoint or cfg.decoder.path or cfg.run_dir
        decoder = load_decoder(source, encoder=encoder)
    res = {"decoder": decoder.identity(), "source": str(source),
           **evaluate_decoder(encoder, decoder, eval_s[:n], examples=8)}
    if output:
        atomic_write_text(output, json.dumps(res, indent=2, ensure_ascii=False))
    return res
