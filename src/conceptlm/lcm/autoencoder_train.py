"""``conceptlm lcm train-autoencoder``: a sentence encoder and decoder trained together on the shared loop
(:mod:`conceptlm.lcm.autoencoder`).

The sentences are those ``train-decoder`` takes (:mod:`conceptlm.lcm.decoder_train`): the training documents
only (the prepared folder's train split, or the documents of ``docs`` that ``prepare``'s split rule puts there),
unique, shuffled with the seed; ``decoder_train.eval_sentences`` of them are held out (eval loss) and the first
``decoder_train.decode_eval`` of those are decoded at every evaluation (AutoBLEU, round-trip cosine through the
encoder being trained). Length and step size: ``decoder_train.steps`` / ``batch_size`` / ``lr`` (else the run's).
Checkpoints, resume, metrics and the export (the autoencoder folder, each checkpoint's ``model/``) come from the
core loop (:func:`~conceptlm.core.recipe.fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

import torch

from conceptlm.core.artifact import Identity, digest
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.lcm.autoencoder import AUTOENCODER_KIND, AutoencoderEncoder, AutoencoderUnit, build_autoencoder, log_size
from conceptlm.lcm.config import AutoencoderTrainConfig, EncoderSection, decoder_run_config
from conceptlm.lcm.decoder_train import SentenceTargets, TargetCollator, _sentences, evaluate_decoder
from conceptlm.lcm.decoders import DECODER_KIND

__all__ = ["train_autoencoder", "autoencoder_identity"]

log = logging.getLogger(__name__)


def autoencoder_identity(cfg: AutoencoderTrainConfig, train_s: Sequence[str], eval_s: Sequence[str], data: dict,
                         align: str | None = None) -> tuple[Identity, dict]:
    """The folder's identity (kind ``lcm.autoencoder``): settings = the ``autoencoder`` section, the sentence
    choice of ``decoder_train``, the seed and the run's length and optimizer; inputs = the fingerprints of the
    training and held-out sentences (and of the alignment encoder and the prepared folder, when used)."""
    d = {k: v for k, v in asdict(cfg.decoder_train).items() if k != "on_change"}
    settings = {"autoencoder": asdict(cfg.autoencoder), "decoder_train": d, "seed": cfg.train.seed,
                "train": {"max_steps": cfg.train.max_steps, "micro_batch_size": cfg.train.micro_batch_size,
                          "grad_accum": cfg.train.grad_accum, "optim": asdict(cfg.optim),
                          "schedule": asdict(cfg.schedule)}}
    if not cfg.autoencoder.align_weight:
        settings["autoencoder"].pop("align_encoder")
    inputs = {"sentences": digest(list(train_s)), "held_out": digest(list(eval_s))}
    if align is not None:
        inputs["align_encoder"] = align
    if data.get("prepared"):
        inputs["prepared"] = data["prepared"]
    extra = {"data": data, "n_sentences": len(train_s), "n_held_out": len(eval_s)}
    return Identity(kind=AUTOENCODER_KIND, format=1, settings=settings, inputs=inputs), extra


def train_autoencoder(cfg: AutoencoderTrainConfig, *, command: str | None = None,
                      sentences: Sequence[str] | None = None, data: dict | None = None) -> TrainResult:
    """Train the autoencoder of ``cfg.autoencoder`` (module docstring).

    Args:
        sentences: the training corpus (default: the sentences of ``cfg.docs``' training documents).
        data: where ``sentences`` came from, recorded in ``artifact.json`` (as for ``train_decoder``).

    Returns:
        The loop's ``TrainResult``; each checkpoint's ``model/`` is the autoencoder folder.
    """
    from conceptlm.lcm.data.encoders import get_encoder, identity_fingerprint

    cfg = decoder_run_config(cfg)
    a = cfg.autoencoder
    with run_session(cfg, command) as session:
        train_s, eval_s, data = _sentences(cfg, sentences, data)
        enc, decoder = build_autoencoder(a, train_s, seed=cfg.train.seed)
        sizes = log_size(enc, decoder)
        align_fp = None
        if a.align_weight > 0:
            aligner = get_encoder(EncoderSection(name=a.align_encoder, device=cfg.encoder.device))
            align_fp = identity_fingerprint(aligner)
            log.info("alignment targets: %d sentences through %s", len(train_s) + len(eval_s), a.align_encoder)
            vectors = aligner.encode(train_s + eval_s, progress=cfg.train.progress)
        else:
            vectors = torch.zeros(len(train_s) + len(eval_s), 0)
        train_ds = SentenceTargets(vectors[:len(train_s)], decoder.target_ids(train_s))
        eval_ds = SentenceTargets(vectors[len(train_s):], decoder.target_ids(eval_s)) if eval_s else None
        unit = AutoencoderUnit(enc, decoder, noise_std=a.noise_std, noise_schedule=a.noise_schedule,
                               align_weight=a.align_weight, align_dim=vectors.shape[1])
        identity, extra = autoencoder_identity(cfg, train_s, eval_s, data, align_fp)
        unit.manifest = (identity, {**extra, **sizes})
        dm_settings = {"autoencoder": identity.fingerprint}
        unit.decoder_manifest = (Identity(kind=DECODER_KIND, format=1, settings=dm_settings, inputs=identity.inputs),
                                 extra)
        plan = make_plan(cfg, session.info, train_ds)
        session.create_run_dir()
        k = cfg.decoder_train.decode_eval
        on_eval = None
        if k:
            live = AutoencoderEncoder.live(enc, decoder.tokenizer)

            def on_eval(step: int) -> dict[str, float]:
                m = evaluate_decoder(live, decoder, eval_s[:k])
                return {key: m[key] for key in ("autobleu", "autobleu_sentence", "round_trip_cos")}
        return fit(cfg, session.info, unit, train_ds=train_ds, eval_ds=eval_ds,
                   collate_fn=TargetCollator(decoder.pad_id), source_name="lcm-autoencoder-sentences",
                   artifacts={"tokenizer": decoder.tokenizer}, on_eval=on_eval, plan=plan)
