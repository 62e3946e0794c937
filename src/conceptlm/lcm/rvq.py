"""Residual vector quantization (RVQ) of sentence embeddings (paper §2.3.5; Zeghidour et al. 2021).

``K`` codebooks of ``C`` centroids each, ``codebooks`` ``(K, C, D)``. A vector ``x`` ``(D,)`` is encoded greedily
(Improved RVQ, Liu et al. 2015, with beam size 1, the paper's setting)::

    r_0 = x,   i_k = argmin_c ||r_{k-1} - C_k[c]||^2,   r_k = r_{k-1} - C_k[i_k]        (k = 1 .. K)

and ``decode(codes, k) = sum_{j <= k} C_j[i_j]`` is the coarse-to-fine approximation from the first ``k`` codebooks
(the "partial sum" the Quantized LCM is conditioned on; ``k = 0`` gives zeros).

Fitting (:meth:`ResidualQuantizer.fit`) is greedy residual k-means, codebook by codebook: k-means (random or
k-means++ init from the data) on the vectors, then on the residuals left by the first codebook, and so on. A unit
that loses all its points during an iteration is, by default, kept where it is (``empty="keep"``, what
``vector-quantize-pytorch``'s k-means does; points usually come back to it in later iterations, and
:attr:`ResidualQuantizer.fit_log` counts the units left without points). ``empty="split"`` re-seeds it instead by
splitting a populated cluster, the way FAISS' k-means (the paper's RVQ) handles empty clusters: a cluster is drawn
with probability proportional to its size minus one, the empty unit takes a copy of its centroid, and the two copies
are pushed apart by a relative ``+-1/1024`` alternating over the dimensions. On MiniLM embeddings of Yelp sentences
(16 x 256 units, ``benchmarks/lcm_rvq.py --empty split``) splitting gave a higher train and held-out error than
keeping, and k-means++ init a higher held-out error than random init. All draws come from the ``generator`` passed
in: the same data, settings and seed give the same codebooks (on the CPU bit for bit; on a GPU the floating-point
sums of the centroid update may differ in the last bits).

Distances are computed in row chunks (``||x||^2 - 2 x.c + ||c||^2``) so memory stays ``O(chunk * C)``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = ["ResidualQuantizer", "kmeans", "squared_distances"]

_FORMAT = "conceptlm-lcm-rvq/1"
_CHUNK_ELEMENTS = 1 << 22
"""Rows per distance chunk = this / codebook size (about 16 MiB of float32 distances)."""


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``||x_i - c_j||^2`` for ``x`` ``(N, D)`` and ``centroids`` ``(C, D)`` -> ``(N, C)`` (clamped at 0)."""
    x, centroids = x.float(), centroids.float()
    d = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ centroids.T) + (centroids * centroids).sum(-1).unsqueeze(0)
    return d.clamp_min_(0.0)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``(N,)`` long of the nearest centroid of each row and its squared distance ``(N,)``, in chunks."""
    n = x.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, centroids.shape[0]))
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):
        d = squared_distances(x[s:s + chunk], centroids)
        dist[s:s + chunk], idx[s:s + chunk] = d.min(dim=-1)
    return idx, dist


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``k`` rows of ``x`` ``(N, D)``, each next one drawn with
    probability proportional to its squared distance to the nearest row chosen so far."""
    n = x.shape[0]
    x_sq = (x * x).sum(-1)

    def dist_to(i: int) -> torch.Tensor:
        return (x_sq - 2.0 * (x @ x[i]) + x_sq[i]).clamp_min(0.0).double()

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = dist_to(first)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            i = int(torch.multinomial((d2 / total).float().cpu(), 1, generator=generator))
        else:  # every row coincides with a chosen one (duplicated data): any unused row
            free = torch.ones(n, dtype=torch.bool)
            free[chosen] = False
            pool = free.nonzero().squeeze(1)
            i = int(pool[torch.randint(len(pool), (1,), generator=generator)]) if len(pool) else chosen[-1]
        chosen.append(i)
        d2 = torch.minimum(d2, dist_to(i))
    return x[torch.tensor(chosen, device=x.device)].clone()


_SPLIT_EPS = 1.0 / 1024


def _split_into_empty(c: torch.Tensor, counts: torch.Tensor, empty: torch.Tensor,
                      generator: torch.Generator) -> None:
    """Re-seed every empty unit (indices ``empty``) of ``c`` ``(k, D)`` in place by splitting a populated cluster
    drawn with probability proportional to ``size - 1`` (sizes ``counts``, updated as if each split were even)."""
    size = counts.double().cpu().clone()
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1.0
    for e in empty.tolist():
        w = (size - 1).clamp_min(0)
        if float(w.sum()) <= 0:  # no cluster has two points left: nothing to split
            return
        j = int(torch.multinomial((w / w.sum()).float(), 1, generator=generator))
        base = c[j].clone()
        c[e] = base * (1 + _SPLIT_EPS * sign)
        c[j] = base * (1 - _SPLIT_EPS * sign)
        size[e] = torch.floor(size[j] / 2)
        size[j] -= size[e]


def kmeans(x: torch.Tensor, k: int, *, iters: int, generator: torch.Generator,
           init: Literal["random", "kmeans++"] | torch.Tensor = "random",
           empty: Literal["keep", "split"] = "keep") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` ``(N, D)`` (float32, ``N >= k``) -> centroids ``(k, D)`` and assignments ``(N,)``.

    Args:
        iters: at most this many updates (stops early when no assignment changes and no unit was empty).
        generator: every random draw.
        init: ``random`` (``k`` distinct rows drawn uniformly), ``kmeans++`` seeding, or initial centroids
            ``(k, D)``.
        empty: what happens to a unit without points after an assignment: ``keep`` it in place, or ``split`` a
            populated cluster into it (module docstring).

    Each iteration moves every unit to the mean of its rows (sums in float64), handles the empty ones, and
    re-assigns every row to its nearest unit. The returned assignments are those of the returned centroids.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} vectors (the codebook size), got {n}")
    if empty not in ("split", "keep"):
        raise ValueError(f"unknown empty-unit rule {empty!r} (keep or split)")
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"initial centroids of shape {tuple(init.shape)}, expected {(k, x.shape[1])}")
        c = init.to(x).clone()
    elif init == "kmeans++":
        c = _kmeans_pp(x, k, generator)
    elif init == "random":
        c = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    else:
        raise ValueError(f"unknown k-means init {init!r} (random or kmeans++)")
    assign = _nearest(x, c)[0]
    xd = x.double()
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, assign, xd)
        dead = (counts == 0).nonzero().squeeze(1)
        c = torch.where((counts > 0).unsqueeze(1), (sums / counts.clamp_min(1).unsqueeze(1).double()).float(), c)
        if len(dead) and empty == "split":
            _split_into_empty(c, counts, dead, generator)
        new_assign = _nearest(x, c)[0]
        changed = bool((new_assign != assign).any())
        assign = new_assign
        if not changed and not (len(dead) and empty == "split"):
            break
    return c, assign


class ResidualQuantizer(nn.Module):
    """``K = n_codebooks`` codebooks of ``C = codebook_size`` centroids in ``D = dim`` dimensions.

    Buffers (saved with a model's weights): ``codebooks`` float32 ``(K, C, D)`` and ``fitted`` (bool scalar, set by
    :meth:`fit` or :meth:`set_codebooks`). Codes are long tensors ``(..., K)`` with values in ``[0, C)``.
    """

    def __init__(self, dim: int, n_codebooks: int, codebook_size: int) -> None:
        super().__init__()
        if dim < 1 or n_codebooks < 1 or codebook_size < 2:
            raise ValueError(f"need dim >= 1, n_codebooks >= 1, codebook_size >= 2; got {dim}, {n_codebooks}, "
                             f"{codebook_size}")
        self.dim, self.n_codebooks, self.codebook_size = dim, n_codebooks, codebook_size
        self.register_buffer("codebooks", torch.zeros(n_codebooks, codebook_size, dim))
        self.register_buffer("fitted", torch.tensor(False))
        self.fit_log: list[dict] = []
        """Per codebook of the last :meth:`fit`: squared error per vector before and after it, units left without
        points."""

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_codebooks={self.n_codebooks}, codebook_size={self.codebook_size}"

    # ------------------------------------------------------------------------------------------------ fitting
    def _check(self, x: torch.Tensor, what: str = "vectors") -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{what} of shape {tuple(x.shape)}: the last dimension must be dim={self.dim}")

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor, *, iters: int = 20, generator: torch.Generator | None = None,
            init: Literal["random", "kmeans++"] = "random", empty: Literal["keep", "split"] = "keep"
            ) -> ResidualQuantizer:
        """Greedy residual k-means on ``vectors`` ``(N, D)``, ``N >= codebook_size`` (module docstring).

        Args:
            iters: Lloyd iterations per codebook (at most; stops early at convergence).
            generator: the source of every random draw (default: a generator seeded with 0).
            init: ``random`` (default) or ``kmeans++`` seeding of each codebook (:func:`kmeans`).
            empty: ``keep`` (default) or ``split`` empty units (:func:`kmeans`).

        Returns ``self``; :attr:`fit_log` describes each codebook.
        """
        if vectors.ndim != 2:
            raise ValueError(f"fit expects (N, {self.dim}) vectors, got {tuple(vectors.shape)}")
        self._check(vectors)
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError("fit: the vectors contain NaN or infinite values")
        if iters < 1:
            raise ValueError("iters must be >= 1")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        residual = vectors.detach().float().clone()
        books, log = [], []
        for k in range(self.n_codebooks):
            before = float((residual * residual).sum(-1).mean())
            c, assign = kmeans(residual, self.codebook_size, iters=iters, generator=gen, init=init, empty=empty)
            residual -= c[assign]
            used = torch.bincount(assign, minlength=self.codebook_size)
            log.append({"codebook": k, "sq_error_before": before,
                        "sq_error_after": float((residual * residual).sum(-1).mean()),
                        "unused_units": int((used == 0).sum())})
            books.append(c)
        self.codebooks.copy_(torch.stack(books).to(self.codebooks.device))
        self.fitted.fill_(True)
        self.fit_log = log
        return self

    @torch.no_grad()
    def set_codebooks(self, codebooks: torch.Tensor) -> None:
        """Use given centroids ``(K, C, D)`` (e.g. from another quantizer) and mark the quantizer fitted."""
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)}, expected {tuple(self.codebooks.shape)}")
        self.codebooks.copy_(codebooks.float())
        self.fitted.fill_(True)

    def require_fitted(self) -> None:
        """Raise a clear error when the codebooks were never fitted nor loaded."""
        if not bool(self.fitted):
            raise RuntimeError("the residual quantizer has no codebooks yet: fit it on training vectors first "
                               "(ResidualQuantizer.fit, or QuantLCM.fit_quantizer)")

    # ------------------------------------------------------------------------------------------------ coding
    def distances(self, residual: torch.Tensor, codebook: int) -> torch.Tensor:
        """Squared distances ``(..., C)`` of residuals ``(..., D)`` to the centroids of codebook ``codebook``."""
        self._check(residual, "residuals")
        lead = residual.shape[:-1]
        d = squared_distances(residual.reshape(-1, self.dim), self.codebooks[codebook])
        return d.reshape(*lead, self.codebook_size)

    def nearest(self, residual: torch.Tensor, codebook: int) -> torch.Tensor:
        """Index ``(...)`` long of the centroid of codebook ``codebook`` nearest to each residual ``(..., D)``."""
        self._check(residual, "residuals")
        lead = residual.shape[:-1]
        return _nearest(residual.reshape(-1, self.dim).float(), self.codebooks[codebook])[0].reshape(lead)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy residual codes: ``x`` ``(..., D)`` -> long ``(..., K)``."""
        self.require_fitted()
        self._check(x)
        lead = x.shape[:-1]
        residual = x.detach().reshape(-1, self.dim).float().clone()
        codes = torch.empty(residual.shape[0], self.n_codebooks, dtype=torch.long, device=x.device)
        for k in range(self.n_codebooks):
            idx = _nearest(residual, self.codebooks[k])[0]
            codes[:, k] = idx
            residual -= self.codebooks[k][idx]
        return codes.reshape(*lead, self.n_codebooks)

    def centroids(self, codes: torch.Tensor) -> torch.Tensor:
        """The centroid vectors of codes ``(..., k)`` (``k <= K``, codebooks ``0..k-1``) -> ``(..., k, D)``."""
        k = codes.shape[-1]
        if k > self.n_codebooks:
            raise ValueError(f"codes have {k} columns, the quantizer has {self.n_codebooks} codebooks")
        stage = torch.arange(k, device=codes.device).expand_as(codes)
        return self.codebooks[stage, codes]

    def decode(self, codes: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Sum of the first ``k`` centroids (default: all columns of ``codes``): ``(..., K')`` -> ``(..., D)``."""
        k = codes.shape[-1] if k is None else k
        if not 0 <= k <= codes.shape[-1]:
            raise ValueError(f"k={k} outside [0, {codes.shape[-1]}]")
        return self.centroids(codes[..., :k]).sum(-2)

    def partial_sums(self, codes: torch.Tensor) -> torch.Tensor:
        """All coarse-to-fine approximations: ``(..., K')`` -> ``(..., K' + 1, D)``, row ``k`` = sum of the first
        ``k`` centroids (row 0 = zeros)."""
        c = self.centroids(codes)
        zero = torch.zeros_like(c[..., :1, :])
        return torch.cat([zero, c], dim=-2).cumsum(-2)

    @torch.no_grad()
    def reconstruction_curve(self, x: torch.Tensor) -> list[dict]:
        """Quality of the first ``k`` codebooks on ``x`` ``(N, D)``, for ``k = 0..K``: ``mse`` (mean over vectors
        and dimensions of the squared error), ``fvu`` (squared error / total variance around the mean of ``x``) and
        ``cos`` (mean cosine between a vector and its approximation; 0 for ``k = 0``)."""
        x = x.float()
        parts = self.partial_sums(self.encode(x))  # (N, K + 1, D)
        var = float(((x - x.mean(0)) ** 2).sum(-1).mean())
        out = []
        for k in range(self.n_codebooks + 1):
            approx = parts[:, k]
            se = ((x - approx) ** 2).sum(-1)
            cos = F.cosine_similarity(approx, x, dim=-1) if k > 0 else torch.zeros(len(x))
            out.append({"k": k, "mse": float(se.mean()) / self.dim, "fvu": float(se.mean()) / max(var, 1e-30),
                        "cos": float(cos.mean())})
        return out

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write ``codebooks`` to a safetensors file (atomically: a temporary name, then renamed)."""
        self.require_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"format": _FORMAT, "dim": str(self.dim), "n_codebooks": str(self.n_codebooks),
                "codebook_size": str(self.codebook_size)}
        save_file({"codebooks": self.codebooks.detach().contiguous().cpu()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ResidualQuantizer:
        """Read a file written by :meth:`save` (safetensors only: no code is executed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such quantizer file")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a residual quantizer file (format {meta.get('format')!r}, expected "
                                 f"{_FORMAT!r})")
            books = f.get_tensor("codebooks")
        k, c, d = books.shape
        q = cls(d, k, c)
        q.set_codebooks(books)
        return q

    @staticmethod
    def bits(n_codebooks: int, codebook_size: int) -> float:
        """Bits per vector of a code: ``K * log2(C)``."""
        return n_codebooks * math.log2(codebook_size)
