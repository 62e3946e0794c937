"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") — the concept space.

Formulas (the TopK SAE of Gao et al. 2024 that the CoCoMix paper uses, §2.1 and App. A; ``d = d_in``,
``C = n_latents``):

- ``normalize``: ``mu = mean(h)``, ``sigma = std(h - mu)`` (unbiased, divides by ``d - 1``),
  ``x = (h - mu) / (sigma + eps)``; the identity (``mu = 0``, ``sigma = 1``, ``eps`` unused) when
  ``normalize_input=False``.
- ``pre_activations``: ``z = (x - b_dec) @ W_enc.T + b_enc`` (``b_dec`` is the pre-bias).
- ``encode``: the ``k`` largest entries of ``z`` per token, then ReLU on the kept values (``values >= 0``; exactly
  ``k`` indices per token, some values may be 0).
- ``decode``: ``x_hat = sum_j values_j * W_dec[indices_j] + b_dec`` — a gather of ``k`` decoder rows per token
  (``F.embedding_bag``), never a dense ``(..., C)`` product.
- ``reconstruct``: ``h_hat = x_hat * (sigma + eps) + mu``, the exact inverse of ``normalize``. The reference code
  multiplies by ``sigma`` alone; the two differ by ``eps * x_hat`` (relative ``eps / sigma``).

Dead latents and AuxK (Gao et al. §A.2): a latent is *dead* when it has not fired (been among the top k with a
positive value) in the last ``dead_after_tokens`` tokens. The AuxK reconstruction ``e_hat`` decodes (without
``b_dec``) the ``k_aux`` largest pre-activations among the dead latents (ReLU); the AuxK loss is
``||e - e_hat||^2`` with ``e = x - x_hat`` detached, weighted by ``aux_coef`` (paper: 1/32).

Training cost (what :meth:`TopKSAE.forward` does with gradients on): the pre-activations ``z`` are computed without
autograd, in row chunks of at most :data:`ENCODE_CHUNK_ROWS` tokens (so no ``(N, C)`` tensor of the whole batch is
kept, and none is built for the backward); only the ``k`` (and ``k_aux``) selected entries are recomputed as a
differentiable gather (:class:`_SelectedPreActivations`) whose backward is sparse: ``dL/dx = sum_j g_j W_enc[i_j]``
(``F.embedding_bag``), ``dL/dW_enc[i_j] += g_j (x - b_dec)`` and ``dL/db_enc[i_j] += g_j`` (``index_add_``; on CUDA
a sorted, deterministic reduction) — the same sums the dense product's backward forms, in ``O(N k d)`` instead of
``O(N C d)``. The forward values are
those of :meth:`TopKSAE.encode` bit for bit.

Firing is counted at optimizer-step granularity: during a step :meth:`TopKSAE.record_firing` accumulates which
latents fired and how many tokens were seen; :meth:`TopKSAE.commit_firing` (call it at the start of every step)
folds that into ``tokens_since_fired``. The dead set is therefore fixed within a step and does not depend on how a
step's batch is split into micro-batches or ranks. All three counters are persistent buffers, so a resumed run
continues exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conceptlm.cocomix.config import DEFAULT_DEAD_AFTER_TOKENS
from conceptlm.core.errors import CheckpointError
from conceptlm.core.io import atomic_dir, atomic_write_text

__all__ = ["TopKSAE", "SAEOutput", "fvu_terms", "batch_fvu", "l0_terms", "mse_sum", "auxk_sum", "save_sae",
           "load_sae", "read_sae_config", "SAE_WEIGHTS", "SAE_CONFIG", "SAE_FORMAT"]

SAE_WEIGHTS = "sae.safetensors"
SAE_CONFIG = "sae.json"
SAE_FORMAT = "conceptlm-topk-sae"
_FORMAT_VERSION = 1

ENCODE_CHUNK_ROWS = 8192
"""Tokens per chunk of the training forward's pre-activations (bounds its ``(rows, n_latents)`` scratch tensor);
a batch of at most this many tokens is encoded in one product, exactly as :meth:`TopKSAE.encode` does."""

_BACKWARD_CHUNK_ELEMENTS = 1 << 22
"""Bound on the ``(rows, k, d_in)`` products the sparse backward forms at once (16 MiB in fp32)."""


def _selected_rows_grad(idx: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, *,
                        sorted_reduction: bool | None = None) -> torch.Tensor:
    """``out[c] = sum over (n, j) with idx[n, j] == c of g[n, j] * rows[n]`` (``(N, k)``, ``(N, k)``, ``(N, d)`` ->
    ``w``'s shape): the encoder-weight gradient of the selected pre-activations.

    On the CPU an ``index_add_`` over row chunks (sequential, so deterministic); on CUDA (or with
    ``sorted_reduction``) the weight gradient of ``F.embedding_bag``, whose sort-based reduction gives the same bits
    on every run, where CUDA's ``index_add_`` adds with atomics in no fixed order (a resumed run must equal an
    uninterrupted one)."""
    if sorted_reduction if sorted_reduction is not None else w.is_cuda:
        with torch.enable_grad():
            table = torch.zeros_like(w, requires_grad=True)
            out = F.embedding_bag(idx, table, per_sample_weights=g, mode="sum")
            return torch.autograd.grad(out, table, rows)[0]
    k, d = idx.shape[-1], rows.shape[-1]
    grad = torch.zeros_like(w)
    step = max(1, _BACKWARD_CHUNK_ELEMENTS // max(1, k * d))
    for s in range(0, idx.shape[0], step):
        part = (g[s:s + step, :, None] * rows[s:s + step, None, :]).reshape(-1, d)
        grad.index_add_(0, idx[s:s + step].reshape(-1), part)
    return grad


class _SelectedPreActivations(torch.autograd.Function):
    """``z[n, j] = (x - b_dec)[n] . W_enc[i[n, j]] + b_enc[i[n, j]]`` for selected latents ``i``, with a sparse
    backward (see the module docstring). The forward takes the values already computed (the top-k of the
    pre-activations) and returns them; only the backward does work."""

    @staticmethod
    def forward(ctx, xc: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, values: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xc, w_enc, indices)
        ctx.b_shape = b_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xc, w, indices = ctx.saved_tensors
        k, d = indices.shape[-1], xc.shape[-1]
        idx = indices.reshape(-1, k)
        g = grad.reshape(-1, k).to(w.dtype)
        grad_xc = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_xc = F.embedding_bag(idx, w, per_sample_weights=g, mode="sum").reshape(xc.shape).to(xc.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _selected_rows_grad(idx, g, xc.reshape(-1, d).to(w.dtype), w)
        if ctx.needs_input_grad[2]:
            grad_b = _selected_rows_grad(idx, g, g.new_ones(idx.shape[0], 1), w.new_empty(w.shape[0], 1))
            grad_b = grad_b.reshape(ctx.b_shape)
        return grad_xc, grad_w, grad_b, None, None


@dataclass
class SAEOutput:
    """Everything one SAE pass computes (``...`` = the leading dims of the input, e.g. ``(B, T)``).

    Attributes:
        x: ``(..., d_in)`` normalized input.
        x_hat: ``(..., d_in)`` reconstruction in normalized space.
        values: ``(..., k)`` kept activations (ReLU'd, ``>= 0``).
        indices: ``(..., k)`` int64 latent indices.
        mu, sigma: ``(..., 1)`` per-token mean and unbiased std of the input (0 and 1 without normalization).
        aux: ``(..., d_in)`` AuxK reconstruction of the residual ``x - x_hat`` from the dead latents (no ``b_dec``);
            ``None`` outside training or when no latent is dead.
    """

    x: torch.Tensor
    x_hat: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    aux: torch.Tensor | None = None


class TopKSAE(nn.Module):
    """TopK sparse autoencoder with optional per-token layer-norm of its input (see the module docstring).

    Parameters: ``W_enc (n_latents, d_in)``, ``b_enc (n_latents,)``, ``W_dec (n_latents, d_in)`` (rows are the
    unit-norm decoder directions), ``b_dec (d_in,)``. Buffers: ``tokens_since_fired (n_latents,)`` int64 and the
    current step's pending firing record.

    Args:
        d_in: input width (>= 2 when normalizing).
        n_latents: number of latents ``C``.
        k: active latents per token.
        normalize_input: layer-norm each input token (as OpenAI's TopK SAEs do).
        eps: added to ``sigma`` in the normalization.
        k_aux: dead latents used by AuxK (default ``d_in // 2``, as in Gao et al. / sparsify).
        dead_after_tokens: tokens without firing after which a latent counts as dead.
        seed: seed of the initialisation (``None``: torch's global generator).
    """

    def __init__(self, d_in: int, n_latents: int, k: int, *, normalize_input: bool = True, eps: float = 1e-5,
                 k_aux: int | None = None, dead_after_tokens: int = DEFAULT_DEAD_AFTER_TOKENS,
                 seed: int | None = None):
        super().__init__()
        if d_in < 1 or (normalize_input and d_in < 2):
            raise ValueError(f"d_in must be >= {2 if normalize_input else 1}, got {d_in}")
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.normalize_input, self.eps = normalize_input, float(eps)
        self.k_aux = max(1, d_in // 2) if k_aux is None else int(k_aux)
        self.dead_after_tokens = int(dead_after_tokens)
        self.meta: dict[str, Any] = {}  # layer / teacher identity when loaded from disk
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(n_latents, d_in, generator=gen)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.clone())  # encoder initialised as the decoder's transpose (Gao et al.)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.register_buffer("fired_in_step", torch.zeros(n_latents, dtype=torch.bool))
        self.register_buffer("tokens_in_step", torch.zeros((), dtype=torch.long))
        self._grad_hook = self.W_dec.register_hook(self._project_decoder_grad)

    # ------------------------------------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""
        return {"d_in": self.d_in, "n_latents": self.n_latents, "k": self.k, "normalize_input": self.normalize_input,
                "eps": self.eps, "k_aux": self.k_aux, "dead_after_tokens": self.dead_after_tokens}

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, normalize_input={self.normalize_input}"

    # ------------------------------------------------------------------------------------------- forward
    def normalize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h (..., d_in) -> (x, mu (..., 1), sigma (..., 1))`` with ``x = (h - mu) / (sigma + eps)``."""
        if not self.normalize_input:
            one = torch.ones((*h.shape[:-1], 1), dtype=h.dtype, device=h.device)
            return h, torch.zeros_like(one), one
        mu = h.mean(dim=-1, keepdim=True)
        centred = h - mu
        sigma = centred.std(dim=-1, keepdim=True)
        return centred / (sigma + self.eps), mu, sigma

    def denormalize(self, x_hat: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`normalize`: ``x_hat * (sigma + eps) + mu`` (identity without it)."""
        if not self.normalize_input:
            return x_hat
        return x_hat * (sigma + self.eps) + mu

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc.T + b_enc``: ``(..., d_in) -> (..., n_latents)`` (``x`` normalized)."""
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def _topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return F.relu(values), indices

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the pre-activations with ReLU: ``x (..., d_in) -> (values (..., k) >= 0, indices (..., k))``."""
        return self._topk(self.pre_activations(x))

    def _gather_decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``sum_j values_j * W_dec[indices_j]`` without ``b_dec``: ``(..., k) -> (..., d_in)``."""
        lead, k = indices.shape[:-1], indices.shape[-1]
        if k == 0:
            return torch.zeros((*lead, self.d_in), dtype=self.W_dec.dtype, device=self.W_dec.device)
        w = self.W_dec
        out = F.embedding_bag(indices.reshape(-1, k), w, per_sample_weights=values.reshape(-1, k).to(w.dtype),
                              mode="sum")
        return out.reshape(*lead, self.d_in)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``x_hat = sum_j values_j * W_dec[indices_j] + b_dec`` (normalized space): ``(..., k) -> (..., d_in)``."""
        return self._gather_decode(values, indices) + self.b_dec

    def forward(self, h: torch.Tensor, *, track: bool = True) -> SAEOutput:
        """Normalize, encode, decode ``h (..., d_in)``.

        In training mode this also computes the AuxK reconstruction (when some latent is dead) and, with
        ``track=True``, records which latents fired (:meth:`record_firing`, this process only).
        """
        x, mu, sigma = self.normalize(h)
        dead = self._aux_dead() if self.training else None
        values, indices, aux_sel = self._select(x, dead)
        x_hat = self.decode(values, indices)
        aux = None
        if self.training:
            aux = None if aux_sel is None else self._gather_decode(*aux_sel)
            if track:
                self.record_firing(self.fired_latents(values, indices), values[..., 0].numel())
        return SAEOutput(x=x, x_hat=x_hat, values=values, indices=indices, mu=mu, sigma=sigma, aux=aux)

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """``h (..., d_in) -> h_hat (..., d_in)`` in the input space (no firing is recorded)."""
        x, mu, sigma = self.normalize(h)
        values, indices = self.encode(x)
        return self.denormalize(self.decode(values, indices), mu, sigma)

    def dense_activations(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Scatter ``(..., k)`` values into a dense ``(..., n_latents)`` tensor (tests and analysis only)."""
        dense = torch.zeros((*values.shape[:-1], self.n_latents), dtype=values.dtype, device=values.device)
        return dense.scatter(-1, indices, values)

    # ------------------------------------------------------------------------------------------- AuxK
    def dead_mask(self) -> torch.Tensor:
        """``(n_latents,)`` bool: latents that have not fired in the last ``dead_after_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_after_tokens

    def _aux_dead(self) -> tuple[torch.Tensor, int] | None:
        """``(dead mask, k_aux in use)`` when AuxK has work this step, else ``None`` (no latent dead or no AuxK)."""
        if self.k_aux < 1:
            return None
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        return None if n_dead == 0 else (dead, min(self.k_aux, n_dead))

    def _select(self, x: torch.Tensor, dead: tuple[torch.Tensor, int] | None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Top-k (ReLU'd values, indices) of ``x``'s pre-activations and, with ``dead``, the AuxK selection: the
        ``k_aux`` largest pre-activations among the dead latents (ReLU'd values, indices).

        The pre-activations are computed without autograd in row chunks (:data:`ENCODE_CHUNK_ROWS`); when gradients
        are on, the selected entries become differentiable through :class:`_SelectedPreActivations`.
        """
        lead = x.shape[:-1]
        xc = x - self.b_dec
        flat = xc.detach().reshape(-1, self.d_in)
        tops, auxs = [], []
        with torch.no_grad():
            for rows in flat.split(ENCODE_CHUNK_ROWS) if flat.shape[0] else [flat]:
                pre = F.linear(rows, self.W_enc, self.b_enc)
                tops.append(pre.topk(self.k, dim=-1, sorted=False))
                if dead is not None:
                    auxs.append(pre.masked_fill_(~dead[0], float("-inf")).topk(dead[1], dim=-1, sorted=False))

        def joined(parts, k):
            values = torch.cat([p.values for p in parts]) if len(parts) > 1 else parts[0].values
            indices = torch.cat([p.indices for p in parts]) if len(parts) > 1 else parts[0].indices
            values, indices = values.reshape(*lead, k), indices.reshape(*lead, k)
            if torch.is_grad_enabled() and (xc.requires_grad or self.W_enc.requires_grad or self.b_enc.requires_grad):
                values = _SelectedPreActivations.apply(xc, self.W_enc, self.b_enc, values, indices)
            return F.relu(values), indices

        top = joined(tops, self.k)
        return top[0], top[1], (joined(auxs, dead[1]) if dead is not None else None)

    def fired_latents(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``(n_latents,)`` int64: how many tokens of this batch each latent fired on (kept with value > 0)."""
        flat = indices.reshape(-1)[values.reshape(-1) > 0]
        return torch.bincount(flat, minlength=self.n_latents)

    @torch.no_grad()
    def record_firing(self, fired: torch.Tensor, n_tokens: int | torch.Tensor) -> None:
        """Add one batch to the current step's record: ``fired (n_latents,)`` counts (or bools) and its tokens."""
        self.fired_in_step |= fired.to(self.fired_in_step.device) > 0
        self.tokens_in_step += torch.as_tensor(n_tokens, device=self.tokens_in_step.device).long()

    @torch.no_grad()
    def commit_firing(self) -> None:
        """Fold the step's record into ``tokens_since_fired`` (0 for latents that fired) and clear the record."""
        grown = self.tokens_since_fired + self.tokens_in_step
        self.tokens_since_fired.copy_(torch.where(self.fired_in_step, torch.zeros_like(grown), grown))
        self.fired_in_step.zero_()
        self.tokens_in_step.zero_()

    # ------------------------------------------------------------------------------------------- decoder norm
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit L2 norm (call after each optimizer step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    def _project_decoder_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Remove the gradient component parallel to each (unit-norm) decoder row."""
        w = self.W_dec.detach()
        unit = w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        return grad - (grad * unit).sum(-1, keepdim=True) * unit


# ----------------------------------------------------------------------------------------------- losses, metrics
def mse_sum(out: SAEOutput) -> torch.Tensor:
    """``sum_tokens ||x - x_hat||^2 / d_in`` (normalized space); divide by the token count for the MSE."""
    return (out.x - out.x_hat).float().pow(2).sum() / out.x.shape[-1]


def auxk_sum(out: SAEOutput) -> torch.Tensor:
    """``sum_tokens ||e - e_hat||^2 / d_in`` with ``e = (x - x_hat).detach()``; 0 without an AuxK reconstruction.

    Gao et al. 2024 §A.2 (``L_aux``); weight it with ``aux_coef`` (1/32 in the paper).
    """
    if out.aux is None:
        return out.x_hat.sum() * 0.0  # keeps the graph connected (DDP) and the part defined
    e = (out.x - out.x_hat).detach()
    return (e - out.aux).float().pow(2).sum() / out.x.shape[-1]


def fvu_terms(x: torch.Tensor, x_hat: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of variance unexplained as an exactly reducible pair ``(sum ||x - x_hat||^2, sum ||x - r||^2)``.

    ``FVU = sum / count`` over any set of batches, micro-batches and ranks. ``r`` (``(d_in,)``) is a fixed
    reference for the data mean (e.g. the mean of a fixed initialisation sample): with a fixed ``r`` both sums
    add over batches, so the pooled value does not depend on how the data is split. With the mean ``m`` of the
    pooled data, ``sum ||x - r||^2 = sum ||x - m||^2 + N ||m - r||^2``, so this is the usual FVU whenever ``r``
    is the data mean and slightly lower than it otherwise.
    """
    sse = (x - x_hat).float().pow(2).sum()
    sst = (x.float() - reference.float()).pow(2).sum()
    return sse, sst


def batch_fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU about this batch's own mean: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (``x`` is ``(N, d)``)."""
    x2, xh2 = x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()
    return float((x2 - xh2).pow(2).sum() / (x2 - x2.mean(0)).pow(2).sum())


def l0_terms(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean L0 as ``(number of non-zero activations, number of tokens)``."""
    return (values > 0).sum(), values[..., 0].numel()


# ----------------------------------------------------------------------------------------------- save / load
def save_sae(sae: TopKSAE, directory: str | Path, *, layer: int | None = None, teacher: Any = None,
             extra: dict[str, Any] | None = None, in_place: bool = False) -> Path:
    """Write ``sae.safetensors`` (the four parameters) and ``sae.json`` (config, layer, teacher) atomically.

    Args:
        layer: index of the teacher block whose output the SAE reads (defaults to ``sae.meta["layer"]``).
        teacher: a JSON-able identity of the teacher (e.g. its path and a hash; defaults to ``sae.meta``'s).
        extra: further JSON-able entries for ``sae.json``.
        in_place: write the two files into ``directory`` (each atomically), keeping what else it holds (the SAE
            run's config, metrics and checkpoints); by default ``directory`` is replaced as a whole.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg = {"format": SAE_FORMAT, "version": _FORMAT_VERSION, **sae.config(),
           "layer": layer if layer is not None else sae.meta.get("layer"),
           "teacher": teacher if teacher is not None else sae.meta.get("teacher"), **(extra or {})}
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in _param_items(sae)}
    if in_place:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".tmp-{SAE_WEIGHTS}"
        save_file(tensors, str(partial), metadata={"format": SAE_FORMAT})
        os.replace(partial, directory / SAE_WEIGHTS)
        atomic_write_text(directory / SAE_CONFIG, json.dumps(cfg, indent=2) + "\n")
        return directory
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / SAE_WEIGHTS), metadata={"format": SAE_FORMAT})
        (tmp / SAE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return directory


def _param_items(sae: TopKSAE) -> list[tuple[str, torch.Tensor]]:
    return [("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec), ("b_dec", sae.b_dec)]


_REQUIRED = {"d_in": int, "n_latents": int, "k": int, "normalize_input": bool}


def read_sae_config(directory: str | Path) -> dict[str, Any]:
    """Read and check ``sae.json`` in ``directory``; one-line :class:`CheckpointError` on any problem."""
    path = Path(directory) / SAE_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (an SAE folder holds {SAE_WEIGHTS} and {SAE_CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != SAE_FORMAT:
        raise CheckpointError(f"{path}: field 'format' must be {SAE_FORMAT!r}")
    for field, kind in _REQUIRED.items():
        v = cfg.get(field)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise CheckpointError(f"{path}: field '{field}' must be {kind.__name__}, got {v!r}")
    return cfg


def load_sae(directory: str | Path, *, device: str | torch.device = "cpu") -> TopKSAE:
    """Load an SAE written by :func:`save_sae` (strict: every tensor present with its shape, nothing else), or an
    SAE saved by EleutherAI sparsify, SAELens (a folder) or OpenAI (a ``.pt`` file), converted exactly
    (:func:`conceptlm.cocomix.sae_formats.load_any_sae`).

    The layer and teacher identity of our own SAEs are in ``sae.meta``. Raises a one-line :class:`CheckpointError`
    (also for a folder in no known layout).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if directory.exists() and not (directory / SAE_CONFIG).is_file():
        from conceptlm.cocomix.sae_formats import load_any_sae

        return load_any_sae(directory).to(device)  # a foreign layout (or a one-line error naming the folder)
    cfg = read_sae_config(directory)
    try:
        sae = TopKSAE(cfg["d_in"], cfg["n_latents"], cfg["k"], normalize_input=cfg["normalize_input"],
                      eps=float(cfg.get("eps", 1e-5)), k_aux=cfg.get("k_aux"),
                      dead_after_tokens=int(cfg.get("dead_after_tokens", DEFAULT_DEAD_AFTER_TOKENS)), seed=0)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / SAE_CONFIG}: {e}") from None
    wpath = directory / SAE_WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: not found")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{wpath}: cannot be read ({e})") from None
    load_params(sae, tensors, source=wpath)
    sae.meta = {"layer": cfg.get("layer"), "teacher": cfg.get("teacher")}
    return sae.to(device)


def load_params(sae: TopKSAE, tensors: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Copy ``{W_enc, b_enc, W_dec, b_dec}`` into ``sae`` strictly (names and shapes); one-line errors."""
    expected = {name: tuple(p.shape) for name, p in _param_items(sae)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not match a TopK SAE (missing {missing}, unexpected "
                              f"{unexpected})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected "
                                  f"{shape}")
    with torch.no_grad():
        for name, p in _param_items(sae):
            p.copy_(tensors[name].to(p.dtype))
