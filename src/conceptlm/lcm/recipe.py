"""The ``conceptlm lcm`` verbs over one :class:`~conceptlm.lcm.config.LCMConfig`.

Typical order (each verb reads what the previous ones wrote)::

    conceptlm lcm prepare       --config configs/lcm/tiny_cpu.yaml   # documents -> sentence embeddings (Parquet)
    conceptlm lcm train-decoder --config configs/lcm/tiny_cpu.yaml   # embedding -> text ({run_dir}/decoder)
    conceptlm lcm train         --config configs/lcm/tiny_cpu.yaml   # Base-LCM on the prepared documents
    conceptlm lcm generate      --config configs/lcm/tiny_cpu.yaml   # continue a prompt, print the text
    conceptlm lcm evaluate      --config configs/lcm/tiny_cpu.yaml   # Table 3 metrics on validation documents

``generate`` and ``evaluate`` read the run's newest checkpoint (or ``--checkpoint``), the encoder of ``encoder``
(checked against the one recorded with the checkpoint) and the decoder of ``decoder.path`` or
``{run_dir}/decoder``. On validation documents they also check that the prepared folder is the one the run
trained on (by content fingerprint, so a moved folder is still the same) and that the decoder learned from
training documents only (its ``artifact.json``); each refusal is one line.

``train-decoder`` learns from the training documents only: the train split of the prepared folder when there is
one (with the stored vectors when the encoder is the same), else the documents of ``docs`` that ``prepare``'s
split rule puts in the train split (``decoder_train.split``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.errors import CheckpointError, ConceptLMError, ConfigError
from conceptlm.core.evaluation import evaluate_unit
from conceptlm.core.io import atomic_write_text
from conceptlm.core.step_sums import to_device
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import LCMConfig, decoder_config, lcm_train_config, prepare_config
from conceptlm.lcm.sequence import DocumentChunks, collate_documents, scored_positions
from conceptlm.lcm.variants import build_unit

__all__ = ["prepare", "train", "train_decoder", "train_autoencoder", "eval_decoder", "generate", "evaluate", "cost",
           "load_run"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ stages
def prepare(cfg: LCMConfig, *, output: str | None = None) -> dict:
    """``conceptlm lcm prepare``: segment, embed and store ``docs`` in ``prepare.out_dir`` (resumable)."""
    from conceptlm.lcm.data.prepare import prepare as run_prepare

    return run_prepare(prepare_config(cfg), output=output)


def train(cfg: LCMConfig, *, command: str | None = None):
    """``conceptlm lcm train``: the Base-LCM on ``lcm_data`` in the run folder (works under torchrun).

    ``lcm.model: likelihood`` first checks that its frozen decoder (``lcm.likelihood_decoder``) was made for the
    prepared folder's encoder (one-line refusal otherwise)."""
    from conceptlm.lcm.train import train_lcm

    tc = lcm_train_config(cfg)
    if cfg.lcm.model == "likelihood" and tc.lcm_data.source != "synthetic":
        from conceptlm.lcm.data.store import EmbeddedDocuments
        from conceptlm.lcm.variants.likelihood import load_frozen_decoder

        load_frozen_decoder(cfg.lcm.likelihood_decoder, encoder=EmbeddedDocuments(tc.lcm_data.source,
                                                                                  "train").encoder_identity)
    return train_lcm(tc, command=command)


def train_decoder(cfg: LCMConfig, *, command: str | None = None):
    """``conceptlm lcm train-decoder``: the sentence decoder of ``decoder`` in ``{run_dir}/decoder``, learned from
    the training documents only.

    With a prepared folder (``lcm_data.source``) the decoder takes the sentences of its train split, and, when it
    was made with the same encoder, their stored vectors (fp16, as the LCM sees them) instead of encoding them
    again; without one, the documents of ``docs`` in the train split of ``prepare``'s split rule. The decoder's
    ``artifact.json`` records which."""
    from conceptlm.lcm.data.encoders import get_encoder
    from conceptlm.lcm.decoder_train import StoredVectorsEncoder, prepared_sentences
    from conceptlm.lcm.decoder_train import train_decoder as run

    if cfg.decoder.kind == "autoencoder":
        raise ConfigError("decoder.kind=autoencoder is trained together with its encoder: run 'conceptlm lcm "
                          "train-autoencoder'", field="decoder.kind")

    encoder = get_encoder(cfg.encoder)
    sentences, table, data = prepared_sentences(cfg.data_dir, cfg.decoder_train.split, encoder)
    if sentences is not None:
        log.info("decoder: %d sentences of the %s documents of %s (%s)", len(sentences), data["split"],
                 cfg.data_dir, "stored vectors" if table else "encoded again: the folder has another encoder")
    if table:
        encoder = StoredVectorsEncoder(encoder, table)
    return run(decoder_config(cfg), command=command, encoder=encoder, sentences=sentences, data=data)


def train_autoencoder(cfg: LCMConfig, *, command: str | None = None):
    """``conceptlm lcm train-autoencoder``: a sentence encoder + decoder trained together (``autoencoder``) in
    ``{run_dir}/autoencoder``, on the sentences ``train-decoder`` would take (the prepared folder's train split
    when there is one, else the training documents of ``docs``). Its checkpoints' ``model/`` (or the run folder)
    is then ``encoder.name`` and ``decoder.path`` (or ``decoder.kind: autoencoder``)."""
    from conceptlm.lcm.autoencoder_train import train_autoencoder as run
    from conceptlm.lcm.config import autoencoder_config
    from conceptlm.lcm.data.store import MANIFEST_FILE
    from conceptlm.lcm.decoder_train import prepared_sentences

    sentences, data = None, None
    folder = cfg.data_dir
    if folder is not None and (folder / MANIFEST_FILE).is_file():  # the sentences, not the vectors, are needed
        sentences, _, data = prepared_sentences(folder, cfg.decoder_train.split, {})
        log.info("autoencoder: %d sentences of the %s documents of %s", len(sentences), data["split"], folder)
    return run(autoencoder_config(cfg), command=command, sentences=sentences, data=data)


def eval_decoder(cfg: LCMConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """``conceptlm lcm eval-decoder``: AutoBLEU and round-trip cosine of the decoder on its held-out sentences
    (from the same training documents as ``train-decoder``)."""
    from conceptlm.lcm.data.encoders import get_encoder
    from conceptlm.lcm.decoder_train import eval_decoder as run
    from conceptlm.lcm.decoder_train import prepared_sentences

    encoder = get_encoder(cfg.encoder)
    sentences, _, _ = prepared_sentences(cfg.data_dir, cfg.decoder_train.split, encoder)
    where = checkpoint or str(cfg.decoder_dir)
    if cfg.decoder.kind == "autoencoder":
        from conceptlm.lcm.autoencoder import autoencoder_dir

        folder = autoencoder_dir(where)
        where = str(folder / "decoder") if folder is not None else where
    return run(decoder_config(cfg), checkpoint=where, output=output,
               sentences=sentences, encoder=encoder)


# ------------------------------------------------------------------------------------------------ loading
class LoadedRun:
    """What ``generate`` / ``evaluate`` need: the model, its checkpoint, the encoder, (optionally) the decoder and
    the fingerprint of the prepared folder the run trained on (None when it did not record one)."""

    def __init__(self, model, checkpoint: Path, encoder, decoder, prepared: str | None = None):
        self.model, self.checkpoint, self.encoder, self.decoder = model, checkpoint, encoder, decoder
        self.prepared = prepared

    def decode(self, vectors: torch.Tensor) -> list[str]:
        return self.decoder.decode(vectors.float())

    def round_trip(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(self.decode(vectors)).to(vectors)


def _checkpoint(cfg: LCMConfig, checkpoint: str | None) -> Path:
    if checkpoint:
        return Path(checkpoint)
    latest = ckpt_lib.find_latest_checkpoint(cfg.run_dir)
    if latest is None:
        raise CheckpointError(f"{cfg.run_dir} holds no checkpoint: run 'conceptlm lcm train' with this config "
                              "first, or pass --checkpoint")
    return latest


def load_run(cfg: LCMConfig, checkpoint: str | None = None, *, need_decoder: bool = True) -> LoadedRun:
    """The run's model (newest checkpoint or ``checkpoint``: a checkpoint or a Hub-format export folder), encoder
    and decoder, checked against each other."""
    from conceptlm.lcm.data.encoders import get_encoder, verify_identity
    from conceptlm.lcm.decoders import load_decoder
    from conceptlm.lcm.train import ENCODER_ARTIFACT, PREPARED_ARTIFACT, load_lcm

    ckpt = _checkpoint(cfg, checkpoint)
    model = load_lcm(ckpt)
    encoder = get_encoder(cfg.encoder)
    identity_file = next((p for p in (ckpt / ENCODER_ARTIFACT, ckpt / "encoder.json") if p.is_file()), None)
    if identity_file is not None:
        try:
            verify_identity(_read_json(identity_file), encoder, where=str(ckpt))
        except ConceptLMError as e:
            raise ConfigError(f"{e}: set encoder.name (and its settings) to the run's encoder, or train again with "
                              "this one", field="encoder.name") from None
    elif cfg.lcm_data.source == "synthetic":
        raise ConfigError(f"{ckpt} was trained on synthetic vectors, which have no text: train on prepared "
                          "documents (lcm_data.source=prepared) to generate or evaluate text", field="lcm_data.source")
    if encoder.dim != model.cfg.dim:
        raise ConfigError(f"the encoder gives {encoder.dim}-d vectors but the model takes {model.cfg.dim}",
                          field="encoder.name")
    decoder = None
    if need_decoder and cfg.decoder.kind == "autoencoder":  # the decoder half of an autoencoder folder, cached
        from conceptlm.lcm.autoencoder import load_autoencoder_decoder

        decoder = load_autoencoder_decoder(cfg.decoder_dir, encoder=encoder)
    elif need_decoder and cfg.decoder.kind == "sonar":  # pretrained, nothing saved here: built from its card
        from conceptlm.lcm.sonar_decoder import SonarDecoder

        decoder = SonarDecoder(cfg.decoder, encoder.identity())
    elif need_decoder:
        where = cfg.decoder_dir
        if not where.exists():
            raise ConfigError(f"no decoder at {where}: run 'conceptlm lcm train-decoder' with this config first, or "
                              "set decoder.path to a saved decoder", field="decoder.path")
        decoder = load_decoder(where, encoder=encoder)
    prepared_file = next((p for p in (ckpt / PREPARED_ARTIFACT, ckpt / "prepared.json") if p.is_file()), None)
    prepared = _read_json(prepared_file).get("fingerprint") if prepared_file is not None else None
    return LoadedRun(model, ckpt, encoder, decoder, prepared=prepared)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _check_decoder_split(cfg: LCMConfig, docs) -> None:
    """Refuse (one line) a decoder that may have learned from the validation documents ``docs`` (an
    ``EmbeddedDocuments``): one without ``artifact.json`` (training data unknown), one that learned from every
    document (``decoder_train.split=all``), or one whose split rule puts some of these documents in its training
    documents (another ``split_seed``, or a smaller ``val_fraction``) when it was not made from this folder."""
    from conceptlm.lcm.decoders import decoder_manifest

    where = cfg.decoder_dir
    if cfg.decoder.kind == "autoencoder":  # the decoder half of the autoencoder folder (or of its run's newest)
        from conceptlm.lcm.autoencoder import autoencoder_dir

        where = (autoencoder_dir(where) or where) / "decoder"
    manifest = decoder_manifest(where)
    if manifest is None:
        raise ConfigError(f"{where}: the decoder has no artifact.json, so which documents it learned from is unknown "
                          "(decoders made by older versions learned from the validation documents too): run "
                          "'conceptlm lcm train-decoder' again", field="decoder.path")
    data = manifest.get("data") or {}
    if data.get("split") == "all":
        raise ConfigError(f"{where}: the decoder learned from every document, validation included "
                          "(decoder_train.split=all): train it with decoder_train.split=train to generate or "
                          "evaluate on validation documents", field="decoder.path")
    if data.get("source") == "given":
        log.warning("%s: the decoder learned from sentences given through the API; cannot check that they hold no "
                    "validation document", where)
        return
    if data.get("prepared") == docs.fingerprint:
        return
    prep = docs.manifest.get("prepare") or {}
    vf, seed = prep.get("val_fraction"), prep.get("split_seed")
    dvf, dseed = data.get("val_fraction"), data.get("split_seed")
    if dseed != seed or not isinstance(dvf, (int, float)) or not isinstance(vf, (int, float)) or dvf < vf:
        raise ConfigError(f"{where}: the decoder learned from the training documents of another split (val_fraction "
                          f"{dvf}, split_seed {dseed}; here {vf}, {seed}), which may hold validation documents of "
                          f"{docs.root}: train the decoder on this prepared folder", field="decoder.path")


def _validation_documents(cfg: LCMConfig, limit: int, run: LoadedRun | None = None) -> list[dict]:
    """The first ``limit`` validation documents of the prepared folder; with ``run``, checked to be the folder
    the run trained on (content fingerprint) and, when the run has a decoder, that the decoder did not learn
    from them (:func:`_check_decoder_split`)."""
    from conceptlm.lcm.data.store import EmbeddedDocuments

    folder = cfg.data_dir
    if folder is None or not (folder / "manifest.json").is_file():
        raise ConfigError(f"no prepared documents at {folder}: run 'conceptlm lcm prepare' first",
                          field="lcm_data.source")
    docs = EmbeddedDocuments(folder, "validation")
    if run is not None and run.prepared is not None and docs.fingerprint != run.prepared:
        raise ConfigError(f"{run.checkpoint} was trained on other prepared documents (fingerprint "
                          f"{run.prepared[:12]}) than {folder} holds now ({docs.fingerprint[:12]}): evaluate on the "
                          "folder the run trained on, or train again", field="lcm_data.source")
    if run is not None and run.decoder is not None and cfg.decoder.kind != "sonar":  # SONAR never saw our data
        _check_decoder_split(cfg, docs)
    if len(docs) == 0:
        raise ConfigError(f"{folder} has no validation documents: raise prepare.val_fraction and prepare again",
                          field="prepare.val_fraction")
    return [docs[i] for i in range(min(limit, len(docs)))]


def _content(doc: dict, cfg: LCMConfig) -> int:
    """Sentences of ``doc`` before its end-of-text sentence."""
    s = doc["sentences"]
    return len(s) - 1 if cfg.prepare.end_of_text and s and s[-1] == cfg.prepare.end_of_text_sentence else len(s)


def _prompt_length(doc: dict, n: int, wanted: int) -> int:
    """Prompt sentences of a validation document: an instruction example's source and marker (``loss_from``),
    else ``wanted``, keeping at least one of its ``n`` content sentences back as the reference."""
    if "loss_from" in doc:
        return int(doc["loss_from"])
    return max(1, min(wanted, n - 1))


def _check_sampler(cfg: LCMConfig, model) -> None:
    """A diffusion model cannot take more sampler steps than its schedule has (a one-line error naming the field)."""
    schedule = getattr(model, "schedule", None)
    steps = cfg.generate.diffusion.inference_steps
    if schedule is not None and steps > schedule.num_train_steps:
        raise ConfigError(f"{steps} inference steps but the model was trained with {schedule.num_train_steps} noise "
                          "levels (lcm.diffusion.num_train_steps)", field="generate.diffusion.inference_steps")


def _eot(cfg: LCMConfig, encoder) -> torch.Tensor | None:
    return encoder.encode([cfg.prepare.end_of_text_sentence])[0] if cfg.prepare.end_of_text else None


# ------------------------------------------------------------------------------------------------ generate
def generate(cfg: LCMConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """``conceptlm lcm generate``: continue ``generate.prompt`` (or validation documents) sentence by sentence,
    decode the new sentences and print them. Writes ``{run_dir}/generate.json`` (or ``output``)."""
    from conceptlm.lcm.data.segment import get_segmenter
    from conceptlm.lcm.generate import generate as run_generate

    g = cfg.generate
    run = load_run(cfg, checkpoint)
    _check_sampler(cfg, run.model)
    prompts: list[torch.Tensor] = []
    cases: list[dict[str, Any]] = []
    if g.prompt.strip():
        sentences = get_segmenter(cfg.segment).split(g.prompt)
        if not sentences:
            raise ConfigError("the prompt has no sentence", field="generate.prompt")
        prompts.append(run.encoder.encode(sentences))
        cases.append({"id": "prompt", "prompt": sentences, "reference": None})
    else:
        docs = [d for d in _validation_documents(cfg, 10 ** 9, run) if _content(d, cfg) >= 2][:g.documents]
        if not docs:
            raise ConfigError("no validation document has two sentences to split into a prompt and a reference; "
                              "set generate.prompt", field="generate.prompt")
        for doc in docs:
            n = _content(doc, cfg)
            p = _prompt_length(doc, n, g.prompt_sentences)
            prompts.append(doc["vectors"][:p])
            cases.append({"id": doc["id"], "prompt": doc["sentences"][:p], "reference": doc["sentences"][p:n]})
    try:
        results = run_generate(run.model, prompts, eot=_eot(cfg, run.encoder), options=g.options(),
                               decode=run.decode)
    except ValueError as e:  # e.g. a prompt longer than the model's max_sentences
        raise ConfigError(str(e), field="generate.prompt") from None
    for case, res in zip(cases, results):
        case.update(continuation=res.sentences, stop=res.stop, new_sentences=len(res.vectors))
        print(f"\n[{case['id']}] prompt: {' '.join(case['prompt'])}")
        print(f"continuation ({len(res.vectors)} sentences, stopped by {res.stop}): {res.text}")
        if case["reference"]:
            print(f"reference: {' '.join(case['reference'])}")
    out = Path(output) if output else cfg.run_dir / "generate.json"
    summary = {"checkpoint": str(run.checkpoint), "decoder": str(cfg.decoder_dir), "output": str(out),
               "documents": cases}
    atomic_write_text(out, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return {"checkpoint": str(run.checkpoint), "output": str(out), "documents": len(cases),
            "stops": dict(Counter(c["stop"] for c in cases))}


# ------------------------------------------------------------------------------------------------ evaluate
def _mi_scorer(name: str):
    from conceptlm.core.hf import load_causal_lm, load_tokenizer

    model = load_causal_lm(name, dtype=torch.float32)
    return M.CausalLMScorer(model, load_tokenizer(name))


def _teacher_forced(cfg: LCMConfig, run: LoadedRun, docs: list[dict]) -> tuple[dict[str, float], list, list]:
    """Means of the unit's eval metrics over the documents (:func:`~conceptlm.core.evaluation.evaluate_unit`, the
    trainer's evaluation path), plus up to ``evaluate.mi_sentences`` predicted vectors with their ground-truth
    context sentences (for MI)."""
    e = cfg.evaluate
    chunks = DocumentChunks(docs, max_sentences=run.model.cfg.max_sentences, min_length=2)
    use_rt = e.round_trip and run.decoder is not None
    unit = build_unit(run.model.cfg, round_trip=run.round_trip if use_rt else None, model=run.model).eval()
    if hasattr(unit, "eval_sampler"):  # diffusion LCMs sample each prediction with generate.diffusion
        unit.eval_sampler = cfg.generate.diffusion
    items = [[chunks[i] for i in range(start, min(start + e.batch_size, len(chunks)))]
             for start in range(0, len(chunks), e.batch_size)]
    batches = [collate_documents(b) for b in items]
    device = next(run.model.parameters()).device
    tf = evaluate_unit(unit, batches, device=device, parts=[]).means(unit.loss_weights)
    mi_vectors: list[torch.Tensor] = []
    mi_contexts: list[list[str]] = []
    for batch, its in zip(batches, items):  # the predictions again (same noise), for as many batches as MI needs
        if not e.mi_model or len(mi_vectors) >= e.mi_sentences:
            break
        pred = unit.predictions(to_device(batch, device))
        tm = scored_positions(batch, unit.cfg.min_context)
        for b, it in enumerate(its):
            sents = docs[it["doc"]]["sentences"][it["start"]:it["start"] + len(it["vectors"])]
            for t in tm[b].nonzero().flatten().tolist():
                if len(mi_vectors) < e.mi_sentences:
                    mi_vectors.append(pred[b, t])
                    mi_contexts.append(sents[:t])
    return tf, mi_vectors, mi_contexts


def _text_metrics(cfg: LCMConfig, run: LoadedRun, docs: list[dict]) -> dict[str, Any]:
    """Continue each document from its first half (an instruction example: answer its source); ROUGE-L against
    the true second half (the reference answer), OVL-3 against the prompt (the source), REP-4 (word n-grams) and
    the character 1-4-gram versions."""
    from conceptlm.lcm.generate import generate as run_generate

    prompts, refs, sources = [], [], []
    for doc in docs:
        n = _content(doc, cfg)
        if n < 2:
            continue
        instruction = "loss_from" in doc
        p = int(doc["loss_from"]) if instruction else max(1, n // 2)
        if instruction and (p >= n or p >= run.model.cfg.max_sentences):
            continue  # no answer sentence, or no room to generate one
        p = min(p, run.model.cfg.max_sentences - 1)
        prompts.append(doc["vectors"][:p])
        sources.append(" ".join(doc["sentences"][:p - 1] if instruction else doc["sentences"][:p]))  # no marker
        refs.append(doc["sentences"][p:n])
        if len(prompts) == cfg.evaluate.generate_documents:
            break
    if not prompts:
        return {}
    opts = cfg.generate.options()
    longest = max(len(r) for r in refs)
    # a continuation gets the reference's length; an answer must also end itself (end-of-text rule)
    instruction = any("loss_from" in d for d in docs)
    opts.max_new_sentences = max(longest, cfg.generate.max_new_sentences) if instruction else longest
    results = run_generate(run.model, prompts, eot=_eot(cfg, run.encoder), options=opts, decode=run.decode)
    rows = {"rouge_l": [], "ovl3": [], "rep4": [], "ovl_char14": [], "rep_char14": []}
    for res, ref, src in zip(results, refs, sources):
        text = res.text or ""
        rows["rouge_l"].append(M.rouge_l(text, " ".join(ref)))
        rows["ovl3"].append(M.ovl3(text, src))
        rows["rep4"].append(M.rep4(text))
        rows["ovl_char14"].append(M.ngram_overlap_char14(text, src))
        rows["rep_char14"].append(M.repetition_char14(text))
    out: dict[str, Any] = {k: sum(v) / len(v) for k, v in rows.items()}
    out["documents"] = len(results)
    out["mean_new_sentences"] = sum(len(r.vectors) for r in results) / len(results)
    out["stops"] = dict(Counter(r.stop for r in results))
    out["example"] = {"prompt": sources[0], "continuation": results[0].text, "reference": " ".join(refs[0])}
    return out


def evaluate(cfg: LCMConfig, *, checkpoint: str | None = None, output: str | None = None) -> dict:
    """``conceptlm lcm evaluate``: the paper's Table 3 pre-training metrics on validation documents.

    Teacher-forced (vectors, in raw embedding space): ``l2`` and the copy-previous baseline ``l2_prev``, ``cos``,
    contrastive accuracy ``ca``, paraphrasing ``par``, round-trip ``l2_r`` (decoder, then encoder); ``mi``
    (coherence of the decoded predictions given their true context, with ``evaluate.mi_model``); text metrics
    of continuations generated from each document's first half; and the decoder's ``fragility`` (Eq. 26, noise
    added in the model's normalized space). Writes ``{run_dir}/evaluate.json`` (or
    ``output``).
    """
    e = cfg.evaluate
    run = load_run(cfg, checkpoint, need_decoder=e.round_trip or bool(e.mi_model) or e.generate_documents > 0)
    _check_sampler(cfg, run.model)
    docs = _validation_documents(cfg, e.documents, run)
    log.info("evaluating %s on %d validation documents", run.checkpoint, len(docs))
    tf, mi_vectors, mi_contexts = _teacher_forced(cfg, run, docs)
    result: dict[str, Any] = {"checkpoint": str(run.checkpoint), "documents": len(docs), "teacher_forced": tf}
    if e.mi_model and mi_vectors:
        scorer = _mi_scorer(e.mi_model)
        generated = run.decode(torch.stack(mi_vectors))
        total, tokens = M.mutual_information(generated, mi_contexts, scorer, k=e.mi_context)
        result["mi"] = total / tokens if tokens else math.nan
        result["mi_sentences"] = len(generated)
    if e.generate_documents and run.decoder is not None:
        result["generation"] = _text_metrics(cfg, run, docs)
    if e.fragility_sentences and run.decoder is not None:
        sentences = [s for d in docs for s in d["sentences"][:_content(d, cfg)]][:e.fragility_sentences]
        model = run.model
        frag = M.fragility(sentences, encode=run.encoder.encode, decode=run.decode, n_samples=e.fragility_samples,
                           normalize=lambda v: model.normalize(v.to(next(model.parameters()).device)).float(),
                           denormalize=lambda z: model.denormalize(z).float(),
                           generator=torch.Generator().manual_seed(cfg.train.seed))
        result["fragility"] = {"mean": float(frag.mean()), "sentences": len(sentences),
                               "samples": e.fragility_samples}
    out = Path(output) if output else cfg.run_dir / "evaluate.json"
    atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    result["output"] = str(out)
    return result



# ------------------------------------------------------------------------------------------------ cost
def cost(cfg: LCMConfig, *, output: str | None = None) -> dict:
    """``conceptlm lcm cost``: the inference-FLOPs table of ``cost`` (``cost.lcm: run`` = this config's ``lcm``
    sizes), printed and written as ``cost.md`` / ``cost.png`` to ``{run_dir}/cost`` (or the folder ``output``)."""
    from conceptlm.lcm.cost import run_cost

    out = run_cost(cfg.cost, Path(output) if output else cfg.run_dir / "cost", cfg.lcm)
    return {"break_even": out["break_even"], "files": out["files"]}
