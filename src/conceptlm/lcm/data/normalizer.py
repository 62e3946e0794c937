"""Per-dimension robust scaling of sentence embeddings (arXiv 2412.08821 §2.3.1, "SONAR normalizer").

``normalize(x) = clamp((x - center) / scale, clip_min, clip_max)`` and ``denormalize(z) = clamp(z, clip_min,
clip_max) * scale + center``. Fitting methods:

- ``gaussian_robust`` (default, the paper's documented scaler): ``center = median``, ``scale = (q75 - q25) /
  (Φ⁻¹(0.75) - Φ⁻¹(0.25)) = IQR / 1.34898`` — a standard-deviation estimate that is consistent for Gaussian data
  and insensitive to heavy tails;
- ``robust``: ``center = median``, ``scale = q75 - q25``;
- ``standard``: ``center = mean``, ``scale = std``;
- ``reference_percent``: what the reference fitting script computes (``RobustScaler(quantile_range=(0.25, 0.75),
  unit_variance=True)`` reads the range in percent): ``scale = (q_0.0075 - q_0.0025) / (Φ⁻¹(0.0075) -
  Φ⁻¹(0.0025))``, kept only to compare against the documented scaler.

A scale of 0 (a constant dimension) becomes 1. With ``clip_proba=p`` the clip bounds are the ``p`` / ``1 - p``
per-dimension quantiles of the normalised fitting data; without it they are ±inf (clamping is then the identity).

Quantiles are exact (linear interpolation between order statistics, as ``numpy.quantile``), computed by sorting
blocks of columns so memory stays bounded; ``max_samples`` fits on an evenly strided subset of the rows.

Fitting data of a prepared folder (``lcm prepare``): the training split's vectors only, gathered by one streaming
pass over the shards (:func:`conceptlm.lcm.data.prepare.fit_normalizer_streaming`). Up to
``prepare.normalizer_max_fit_vectors`` vectors (after the ``normalizer_max_samples`` stride) the fit is exact, the
same as fitting on all of them at once; beyond it, the fit uses a uniform sample without replacement of that many:
the vectors with the smallest keys of a ``PCG64(prepare.normalizer_sample_seed)`` stream of uniforms drawn in shard
order (deterministic, independent of how many workers wrote the shards). Both settings are part of the folder's
identity. A sample of ``m`` vectors puts a quantile within about ``sqrt(p (1 - p) / m)`` in probability of the
full data's (the standard error of an empirical quantile): ±0.0005 for the median at the default million, far
below what separates the median from the quartiles.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from conceptlm.core.errors import ConceptLMError
from conceptlm.core.io import atomic_write_text
from conceptlm.lcm.config import NORMALIZER_METHODS

__all__ = ["RobustNormalizer", "column_quantiles", "NORMALIZER_FILE", "MIN_FIT_VECTORS",
           "warn_if_few_vectors"]

log = logging.getLogger(__name__)

NORMALIZER_FILE = "normalizer.json"
Method = Literal["gaussian_robust", "robust", "standard", "reference_percent"]
_FORMAT = "conceptlm-lcm-normalizer/1"
_SORT_BLOCK = 1 << 24  # elements per sorted block of columns
MIN_FIT_VECTORS = 1000
"""Fewer fitting vectors than this give noisy quantiles: the fit is logged as a warning."""


def warn_if_few_vectors(n: int, where: str) -> bool:
    """Log a warning when a normalizer for ``where`` was fitted on fewer than :data:`MIN_FIT_VECTORS` vectors;
    returns whether it warned."""
    if n >= MIN_FIT_VECTORS:
        return False
    log.warning("%s: normalizer fitted on only %d training vectors (fewer than %d): its median and quantiles are "
                "noisy; prepare more documents", where, n, MIN_FIT_VECTORS)
    return True


def column_quantiles(x: torch.Tensor, qs: list[float]) -> torch.Tensor:
    """Per-column quantiles of ``x`` (n, d) with linear interpolation; returns (len(qs), d) float64."""
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot take quantiles of zero rows")
    cols = max(1, _SORT_BLOCK // max(n, 1))
    pos = torch.tensor(qs, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo).unsqueeze(1)
    out = torch.empty((len(qs), d), dtype=torch.float64)
    for j in range(0, d, cols):
        block = x[:, j:j + cols].to(torch.float64).sort(dim=0).values
        out[:, j:j + cols] = block[lo] + (block[hi] - block[lo]) * frac
    return out


def _ppf(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


class RobustNormalizer(nn.Module):
    """Frozen per-dimension affine normaliser with optional clipping (buffers ``center``, ``scale``,
    ``clip_min``, ``clip_max``, all ``(dim,)`` float32).

    Args:
        dim: embedding dimension.
        method: fitting method (see the module docstring).
        clip_proba: fit clip bounds at these tail probabilities (the reference's ``clip_proba=1e-4``); None = no
            clipping.
    """

    def __init__(self, dim: int, *, method: Method = "gaussian_robust", clip_proba: float | None = None):
        super().__init__()
        if method not in NORMALIZER_METHODS:
            raise ValueError(f"unknown normalizer method {method!r} (one of {', '.join(NORMALIZER_METHODS)})")
        if clip_proba is not None and not 0.0 < clip_proba < 0.5:
            raise ValueError("clip_proba must be in (0, 0.5) or None")
        self.dim, self.method, self.clip_proba = dim, method, clip_proba
        self.n_fit = 0
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("clip_min", torch.full((dim,), -math.inf))
        self.register_buffer("clip_max", torch.full((dim,), math.inf))

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor, *, max_samples: int | None = None) -> RobustNormalizer:
        """Fit on ``x`` (n, dim) (any float dtype; statistics in float64). Returns ``self``.

        Args:
            max_samples: use at most this many rows, every ``ceil(n / max_samples)``-th one.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) vectors, got {tuple(x.shape)}")
        if max_samples is not None and x.shape[0] > max_samples:
            x = x[::math.ceil(x.shape[0] / max_samples)]
        if x.shape[0] < 2:
            raise ValueError("need at least 2 vectors to fit a normalizer")
        if self.method == "standard":
            xd = x.to(torch.float64)
            center, scale = xd.mean(dim=0), xd.std(dim=0)
        elif self.method == "reference_percent":
            q = column_quantiles(x, [0.5, 0.0025, 0.0075])
            center, scale = q[0], (q[2] - q[1]) / (_ppf(0.0075) - _ppf(0.0025))
        else:
            q = column_quantiles(x, [0.5, 0.25, 0.75])
            center, scale = q[0], q[2] - q[1]
            if self.method == "gaussian_robust":
                scale = scale / (_ppf(0.75) - _ppf(0.25))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.center.copy_(center.float())
        self.scale.copy_(scale.float())
        self.clip_min.fill_(-math.inf)
        self.clip_max.fill_(math.inf)
        if self.clip_proba is not None:
            z = torch.cat([self.normalize(x[i:i + 65536].float()) for i in range(0, x.shape[0], 65536)])
            bounds = column_quantiles(z, [self.clip_proba, 1.0 - self.clip_proba])
            self.clip_min.copy_(bounds[0].float())
            self.clip_max.copy_(bounds[1].float())
        self.n_fit = int(x.shape[0])
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` raw vectors -> normalised, same dtype."""
        c, s = self.center.to(x.dtype), self.scale.to(x.dtype)
        return torch.clamp((x - c) / s, self.clip_min.to(x.dtype), self.clip_max.to(x.dtype))

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` normalised vectors -> raw, same dtype."""
        z = torch.clamp(z, self.clip_min.to(z.dtype), self.clip_max.to(z.dtype))
        return z * self.scale.to(z.dtype) + self.center.to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)

    # ------------------------------------------------------------------------------------------------------------
    def to_artifact(self) -> dict:
        """JSON-able state (float32 values written as exact decimal floats)."""
        def vals(t: torch.Tensor) -> list:
            return [v if math.isfinite(v) else ("inf" if v > 0 else "-inf") for v in t.detach().cpu().tolist()]

        return {"format": _FORMAT, "dim": self.dim, "method": self.method, "clip_proba": self.clip_proba,
                "n_fit": self.n_fit, "center": vals(self.center), "scale": vals(self.scale),
                "clip_min": vals(self.clip_min), "clip_max": vals(self.clip_max)}

    @classmethod
    def from_artifact(cls, data: dict, *, source: str = "normalizer") -> RobustNormalizer:
        """Inverse of :meth:`to_artifact`; raises :class:`ConceptLMError` naming the bad field."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ConceptLMError(f"{source}: not a normalizer file (format {_FORMAT!r} expected)")
        try:
            norm = cls(int(data["dim"]), method=data["method"], clip_proba=data.get("clip_proba"))
            for name in ("center", "scale", "clip_min", "clip_max"):
                values = torch.tensor([float(v) for v in data[name]], dtype=torch.float32)
                if values.shape != (norm.dim,):
                    raise ConceptLMError(f"{source}: field '{name}' has {values.numel()} values, expected {norm.dim}")
                getattr(norm, name).copy_(values)
        except (KeyError, TypeError, ValueError) as e:
            raise ConceptLMError(f"{source}: invalid normalizer ({type(e).__name__}: {e})") from None
        norm.n_fit = int(data.get("n_fit", 0))
        return norm

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``normalizer.json`` into ``directory`` atomically (a checkpoint artefact); returns its path."""
        path = Path(directory) / NORMALIZER_FILE
        atomic_write_text(path, json.dumps(self.to_artifact()) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RobustNormalizer:
        """Load from a ``normalizer.json`` file or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / NORMALIZER_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConceptLMError(f"{path}: cannot read normalizer ({type(e).__name__})") from None
        return cls.from_artifact(data, source=str(path))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, method={self.method}, clip_proba={self.clip_proba}, n_fit={self.n_fit}"
