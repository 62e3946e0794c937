"""The LCM training recipe: ``train_lcm(cfg)`` on the shared loop for every ``lcm.model`` variant (Base-LCM,
Two-Tower, One-Tower, Quant-LCM-D/C; :mod:`conceptlm.lcm.variants`), and :func:`load_lcm` to reload a checkpoint.

Config sections (besides run/optim/schedule/train/dist): ``lcm`` (:class:`~conceptlm.lcm.config.LCMSection`, the
architecture) and ``lcm_data`` (:class:`LCMDataSection`). Data are any datasets of ``{"id", "vectors" (n, D)}``
documents passed to :func:`train_lcm`; otherwise ``lcm_data.source`` names a prepared folder (the ``prepare``
verb's Parquet shards, read as :class:`~conceptlm.lcm.data.store.EmbeddedDocuments`: ``train`` split for training,
``validation`` for evaluation) or ``synthetic`` (:class:`SyntheticVectorDocuments`: vectors that follow a fixed
noisy rotation, so the next vector is predictable from the previous ones).

Normalizer (``lcm.normalize``): the training data's own normalizer when it has one (a prepared folder's
``normalizer.json``), else a :class:`~conceptlm.lcm.data.normalizer.RobustNormalizer` (``gaussian_robust``: median,
IQR / 1.34898) fitted on at most ``lcm.normalizer_samples`` training vectors taken from evenly spaced documents.
Its statistics become buffers of the model (``unit.safetensors`` alone can generate) and the normalizer is also
written with every checkpoint as ``artifacts/normalizer/normalizer.json``
(``RobustNormalizer.from_pretrained``). When the data know their encoder (a prepared folder), its identity is
written as ``artifacts/encoder/encoder.json``, and the prepared folder's content fingerprint (its
``artifact.json``) as ``artifacts/prepared/prepared.json``: ``generate`` / ``evaluate`` check both against what
they read (:data:`ENCODER_ARTIFACT`, :data:`PREPARED_ARTIFACT`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from conceptlm.core import checkpoint as ckpt_lib
from conceptlm.core.errors import CheckpointError, ConfigError
from conceptlm.core.io import atomic_write_text
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.lcm.config import LCMSection, LCMTrainConfig
from conceptlm.lcm.data.normalizer import RobustNormalizer, warn_if_few_vectors
from conceptlm.lcm.sequence import DocumentChunks, NormalizedModel, collate_documents
from conceptlm.lcm.variants import build_unit

__all__ = ["SyntheticVectorDocuments", "train_lcm", "load_lcm",
           "sample_vectors", "fit_normalizer", "ENCODER_ARTIFACT", "PREPARED_ARTIFACT"]

ENCODER_ARTIFACT = Path("artifacts") / "encoder" / "encoder.json"
"""Where a checkpoint records the identity of the encoder that made its training vectors."""
PREPARED_ARTIFACT = Path("artifacts") / "prepared" / "prepared.json"
"""Where a checkpoint records the fingerprint of the prepared folder it trained on."""

log = logging.getLogger(__name__)


class SyntheticVectorDocuments:
    """Unit-norm vector documents with a learnable dynamic: ``x_{t+1} = normalize(Q x_t + noise * e)``.

    ``Q`` (fixed by ``seed``) rotates each of ``dim/2`` random orthogonal planes by ``rotation`` radians; ``x_0`` is
    a random unit vector per document. Predicting ``Q x_t`` beats repeating ``x_t`` by about
    ``2 sin(rotation / 2)`` in ℓ2. Document ``i`` depends only on ``(seed, split, i)``.
    """

    def __init__(self, n: int, dim: int, *, min_sentences: int = 4, max_sentences: int = 24,
                 rotation: float = 0.6, noise: float = 0.05, seed: int = 0, split: int = 0):
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        block = torch.eye(dim)
        c, s = math.cos(rotation), math.sin(rotation)
        for k in range(0, dim - 1, 2):
            block[k:k + 2, k:k + 2] = torch.tensor([[c, -s], [s, c]])
        self.q = basis @ block @ basis.T
        self.docs: list[torch.Tensor] = []
        gd = torch.Generator().manual_seed(seed * 1000 + 17 + split)
        for _ in range(n):
            length = int(torch.randint(min_sentences, max_sentences + 1, (1,), generator=gd))
            x = torch.nn.functional.normalize(torch.randn(dim, generator=gd), dim=0)
            rows = [x]
            for _ in range(length - 1):
                x = torch.nn.functional.normalize(self.q @ x + noise * torch.randn(dim, generator=gd), dim=0)
                rows.append(x)
            self.docs.append(torch.stack(rows))
        self.lengths = [len(d) for d in self.docs]
        self.name = f"synthetic(n={n},dim={dim},rot={rotation},noise={noise},seed={seed},split={split})"

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"id": i, "vectors": self.docs[i]}


# ------------------------------------------------------------------------------------------------ normalizer
def sample_vectors(documents, limit: int) -> torch.Tensor:
    """Sentence vectors ``(N, D)`` of evenly spaced documents (every ``k``-th, ``k`` chosen so that about
    ``limit`` vectors are read; deterministic)."""
    lengths = getattr(documents, "lengths", None)
    total = sum(lengths) if lengths is not None else None
    step = max(1, math.ceil(total / limit)) if total else 1
    rows, n = [], 0
    for i in range(0, len(documents), step):
        rows.append(torch.as_tensor(documents[i]["vectors"]).float())
        n += len(rows[-1])
        if n >= limit:
            break
    return torch.cat(rows)


def fit_normalizer(cfg: LCMSection, documents) -> RobustNormalizer:
    """The run's normalizer: identity when ``cfg.normalize`` is off, the data's own (``documents.normalizer()``)
    when it has one, else ``gaussian_robust`` fitted on :func:`sample_vectors`."""
    if not cfg.normalize:
        return RobustNormalizer(cfg.dim)
    own = getattr(documents, "normalizer", None)
    if callable(own):
        norm = own()
        log.info("normalizer: the data's own (fitted on %d vectors)", norm.n_fit)
    else:
        norm = RobustNormalizer(cfg.dim).fit(sample_vectors(documents, cfg.normalizer_samples),
                                             max_samples=cfg.normalizer_samples)
        log.info("normalizer: gaussian_robust fitted on %d training vectors", norm.n_fit)
        warn_if_few_vectors(norm.n_fit, "lcm")
    if norm.dim != cfg.dim:
        raise ConfigError(f"the data's normalizer has dim {norm.dim} but lcm.dim={cfg.dim}", field="lcm.dim")
    return norm


class _JsonArtifact:
    """A checkpoint artefact holding one JSON file (``encoder.json``: which sentence encoder made the training
    vectors; ``prepared.json``: which prepared folder, by content fingerprint)."""

    def __init__(self, name: str, data: dict):
        self.name, self.data = name, data

    def __call__(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / self.name, json.dumps(self.data, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------ recipe
def _check_dim(documents, dim: int, what: str) -> None:
    if len(documents) == 0:
        raise ConfigError(f"the {what} data has no documents", field="lcm_data")
    width = torch.as_tensor(documents[0]["vectors"]).shape[-1]
    if width != dim:
        raise ConfigError(f"the {what} embeddings have {width} dimensions but lcm.dim={dim}; set lcm.dim={width}",
                          field="lcm.dim")


def _datasets(cfg: LCMTrainConfig):
    d = cfg.lcm_data
    if d.source != "synthetic":
        from conceptlm.lcm.data.store import EmbeddedDocuments

        if not (Path(d.source) / "manifest.json").is_file():
            raise ConfigError(f"{d.source!r} is neither 'synthetic' nor a prepared folder (no manifest.json); "
                              "run 'conceptlm lcm prepare' first", field="lcm_data.source")
        train, evals = (EmbeddedDocuments(d.source, split, cache_row_groups=d.cache_row_groups)
                        for split in ("train", "validation"))
        return train, (evals if len(evals) else None)
    kw = dict(min_sentences=d.min_sentences, max_sentences=d.max_sentences, rotation=d.rotation, noise=d.noise,
              seed=d.seed)
    train = SyntheticVectorDocuments(d.n_train, cfg.lcm.dim, split=0, **kw)
    evals = SyntheticVectorDocuments(d.n_eval, cfg.lcm.dim, split=1, **kw) if d.n_eval else None
    return train, evals


def train_lcm(cfg: LCMTrainConfig, *, command: str | None = None, train_ds=None, eval_ds=None,
              round_trip=None) -> TrainResult:
    """Train the LCM of ``cfg.lcm.model`` with the shared loop (a Quant-LCM first fits its codebooks on at most
    ``lcm.quant.fit_samples`` normalized training vectors).

    Args:
        cfg: the run config.
        command: the command line, written at the top of the run's ``config.yaml``.
        train_ds / eval_ds: datasets of ``{"id", "vectors" (n, D)}`` documents; when ``train_ds`` is given,
            ``lcm_data.source`` is not read and no ``eval_ds`` means no evaluation.
        round_trip: optional ``encode(decode(v))`` ``(N, D) -> (N, D)`` for the ``l2_r`` eval metric.
    """
    with run_session(cfg, command) as session:
        if train_ds is None:
            train_ds, eval_ds = _datasets(cfg)
        _check_dim(train_ds, cfg.lcm.dim, "training")
        if eval_ds is not None:
            _check_dim(eval_ds, cfg.lcm.dim, "eval")
        c, min_len = cfg.lcm, cfg.lcm_data.min_length
        chunks = DocumentChunks(train_ds, max_sentences=c.max_sentences, min_length=min_len)
        eval_chunks = (DocumentChunks(eval_ds, max_sentences=c.max_sentences, min_length=min_len)
                       if eval_ds is not None else None)
        unit = build_unit(c, round_trip=round_trip)
        norm = fit_normalizer(c, train_ds)
        unit.model.set_normalizer(norm.center, norm.scale, norm.clip_min, norm.clip_max)
        fit_quantizer = getattr(unit.model, "fit_quantizer", None)
        if callable(fit_quantizer):  # Quant-LCM: residual codebooks on the normalized training vectors
            vectors = sample_vectors(train_ds, c.quant.fit_samples)[:c.quant.fit_samples]
            log.info("fitting %d codebooks of %d units on %d training vectors", c.quant.n_codebooks,
                     c.quant.codebook_size, len(vectors))
            fit_quantizer(unit.model.normalize(vectors), torch.Generator().manual_seed(cfg.train.seed))
        plan = make_plan(cfg, session.info, chunks)  # too little data: an error before anything is written
        session.create_run_dir()
        artifacts: dict[str, Any] = {"normalizer": norm}
        identity = getattr(train_ds, "encoder_identity", None)
        if isinstance(identity, dict):
            artifacts["encoder"] = _JsonArtifact(ENCODER_ARTIFACT.name, identity)
        fingerprint = getattr(train_ds, "fingerprint", None)
        if isinstance(fingerprint, str):
            artifacts["prepared"] = _JsonArtifact(PREPARED_ARTIFACT.name, {"kind": "lcm.prepared",
                                                                          "fingerprint": fingerprint})
        source = getattr(train_ds, "name", None) or str(getattr(train_ds, "root", type(train_ds).__name__))
        return fit(cfg, session.info, unit, train_ds=chunks, eval_ds=eval_chunks, collate_fn=collate_documents,
                   source_name=f"lcm:{source}", artifacts=artifacts, plan=plan)


def load_lcm(checkpoint: str | Path, *, device: str | torch.device = "cpu") -> NormalizedModel:
    """The model (any ``lcm.model`` variant) of a checkpoint folder (its ``config.yaml`` and
    ``unit.safetensors``), or of a Hub-format export (:mod:`conceptlm.lcm.hub`), in eval mode.

    Raises:
        CheckpointError: the folder is damaged or was not written by an LCM run.
    """
    from conceptlm.lcm.hub import is_hub_lcm, load_hub_lcm

    ckpt = Path(checkpoint)
    if is_hub_lcm(ckpt):
        return load_hub_lcm(ckpt, device=device)
    problem = ckpt_lib.verify_checkpoint(ckpt) if ckpt.is_dir() else "no such directory"
    if problem is not None:
        raise CheckpointError(f"{ckpt}: not a usable checkpoint ({problem})")
    data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")) or {}
    if "lcm" not in data:
        raise CheckpointError(f"{ckpt}/config.yaml: no 'lcm' section (not an LCM run)")
    try:
        cfg = LCMSection.from_dict(data["lcm"])
        cfg.validate()
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{ckpt}/config.yaml: the 'lcm' section does not fit this version ({e})") from None
    unit = build_unit(cfg)
    ckpt_lib.load_unit_state(unit, ckpt)
    return unit.model.to(device).eval()
