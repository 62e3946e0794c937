"""The Base-LCM training recipe: ``train_lcm(cfg)`` on the shared loop.

Config sections (besides run/optim/schedule/train/dist): ``lcm`` (:class:`~conceptlm.lcm.model.LCMSection`, the
architecture) and ``lcm_data`` (:class:`LCMDataSection`). Data are any datasets of ``{"id", "vectors" (n, D)}``
documents passed to :func:`train_lcm`, or, by default, :class:`SyntheticVectorDocuments` (vectors that follow a
fixed noisy rotation, so the next vector is predictable from the previous ones).

The normalizer (``lcm.normalize``) is fitted on up to ``lcm.normalizer_samples`` training sentence vectors before
the run starts: ``center = median``, ``scale = IQR / 1.34898`` per dimension (the documented robust scaler of spec
§2.3, not the reference code's percent-quantile bug), ``scale = 1`` where the IQR is 0. Its statistics are
buffers of the model (so ``unit.safetensors`` alone can generate) and are also written with every checkpoint as
the artefact ``artifacts/normalizer/`` (``normalizer.safetensors`` + ``normalizer.json``; read it back with
:func:`load_normalizer_artifact`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conceptlm.core.config import RunConfig, check
from conceptlm.core.errors import ConfigError
from conceptlm.core.recipe import fit, make_plan
from conceptlm.core.run import run_session
from conceptlm.core.trainer import TrainResult
from conceptlm.lcm.model import LCMSection
from conceptlm.lcm.unit import BaseLCMUnit, DocumentChunks, collate_documents

__all__ = ["LCMDataSection", "LCMTrainConfig", "SyntheticVectorDocuments", "train_lcm", "fit_robust_normalizer",
           "sample_vectors", "NormalizerArtifact", "load_normalizer_artifact", "GAUSSIAN_IQR"]

log = logging.getLogger(__name__)

GAUSSIAN_IQR = 1.3489795003921634
"""``Phi^-1(0.75) - Phi^-1(0.25)``: the IQR of a standard normal, so ``IQR / GAUSSIAN_IQR`` estimates a std."""


@dataclass(kw_only=True)
class LCMDataSection:
    """Training data of an LCM run when no datasets are passed to :func:`train_lcm`."""

    source: str = "synthetic"
    """``synthetic`` (:class:`SyntheticVectorDocuments`)."""
    n_train: int = 512
    n_eval: int = 64
    min_sentences: int = 4
    max_sentences: int = 24
    """Synthetic document lengths are uniform in ``[min_sentences, max_sentences]``."""
    rotation: float = 0.6
    """Synthetic: rotation angle (radians) per sentence in each of the ``dim/2`` planes of the dynamic."""
    noise: float = 0.05
    seed: int = 0
    min_length: int = 2
    """Chunks with fewer sentences are dropped (a target needs one sentence of context)."""

    def validate(self) -> None:
        check(self.source == "synthetic", "lcm_data.source",
              f"{self.source!r}: only 'synthetic' is built in; pass datasets to train_lcm for other data")
        check(self.n_train > 0 and self.n_eval >= 0, "lcm_data.n_train", "n_train must be > 0, n_eval >= 0")
        check(2 <= self.min_sentences <= self.max_sentences, "lcm_data.min_sentences",
              "need 2 <= min_sentences <= max_sentences")
        check(self.noise >= 0, "lcm_data.noise", "must be >= 0")
        check(self.min_length >= 2, "lcm_data.min_length", "must be >= 2")


@dataclass(kw_only=True)
class LCMTrainConfig(RunConfig):
    """An LCM run: the shared run sections plus ``lcm`` (architecture) and ``lcm_data``."""

    lcm: LCMSection = field(default_factory=LCMSection)
    lcm_data: LCMDataSection = field(default_factory=LCMDataSection)


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
    """The first ``limit`` sentence vectors of ``documents`` in order ``(N, D)`` (deterministic)."""
    rows, n = [], 0
    for i in range(len(documents)):
        v = torch.as_tensor(documents[i]["vectors"]).float()
        rows.append(v[:limit - n])
        n += len(rows[-1])
        if n >= limit:
            break
    return torch.cat(rows)


def fit_robust_normalizer(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(center, scale)`` ``(D,)``: the per-dimension median and ``IQR / 1.34898`` (1 where the IQR is 0)."""
    q25, q50, q75 = np.quantile(vectors.double().numpy(), [0.25, 0.5, 0.75], axis=0)
    scale = (q75 - q25) / GAUSSIAN_IQR
    scale[scale <= 0] = 1.0
    return torch.from_numpy(q50).float(), torch.from_numpy(scale).float()


class NormalizerArtifact:
    """The checkpoint artefact of a model's normalizer: ``normalizer.safetensors`` (center, scale, clip_min,
    clip_max) and ``normalizer.json`` (method and sample count)."""

    def __init__(self, model, *, method: str, n_samples: int):
        self.model, self.method, self.n_samples = model, method, n_samples

    def __call__(self, directory: Path) -> None:
        m = self.model
        save_file({k: getattr(m, k).detach().cpu().contiguous() for k in ("center", "scale", "clip_min", "clip_max")},
                  str(directory / "normalizer.safetensors"))
        meta = {"method": self.method, "n_samples": self.n_samples, "dim": int(m.center.numel())}
        (directory / "normalizer.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def load_normalizer_artifact(directory: str | Path) -> dict[str, torch.Tensor]:
    """``{"center", "scale", "clip_min", "clip_max"}`` from a checkpoint's ``artifacts/normalizer`` folder."""
    return load_file(str(Path(directory) / "normalizer.safetensors"))


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
    kw = dict(min_sentences=d.min_sentences, max_sentences=d.max_sentences, rotation=d.rotation, noise=d.noise,
              seed=d.seed)
    train = SyntheticVectorDocuments(d.n_train, cfg.lcm.dim, split=0, **kw)
    evals = SyntheticVectorDocuments(d.n_eval, cfg.lcm.dim, split=1, **kw) if d.n_eval else None
    return train, evals


def train_lcm(cfg: LCMTrainConfig, *, command: str | None = None, train_ds=None, eval_ds=None) -> TrainResult:
    """Train a Base-LCM on ``train_ds`` (default: ``lcm_data``'s synthetic documents) with the shared loop.

    Args:
        cfg: the run config.
        command: the command line, written at the top of the run's ``config.yaml``.
        train_ds / eval_ds: datasets of ``{"id", "vectors" (n, D)}`` documents (e.g. embedded documents from
            the LCM data pipeline); given ``train_ds`` without ``eval_ds`` means no evaluation.
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
        unit = BaseLCMUnit(c)
        n_fit = 0
        if c.normalize:
            vectors = sample_vectors(train_ds, c.normalizer_samples)
            n_fit = len(vectors)
            unit.model.set_normalizer(*fit_robust_normalizer(vectors))
        plan = make_plan(cfg, session.info, chunks)  # too little data: an error before anything is written
        session.create_run_dir()
        artifact = NormalizerArtifact(unit.model, method="median_iqr" if c.normalize else "identity",
                                      n_samples=n_fit)
        source = getattr(train_ds, "name", type(train_ds).__name__)
        return fit(cfg, session.info, unit, train_ds=chunks, eval_ds=eval_chunks, collate_fn=collate_documents,
                   source_name=f"lcm:{source}", artifacts={"normalizer": artifact}, plan=plan)
