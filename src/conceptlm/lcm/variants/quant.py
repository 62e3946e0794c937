"""The Quantized LCM (LCM paper §2.3.5): coarse-to-fine generation over residual-quantization codes.

Shapes: ``B`` documents, ``N`` (or ``T``) sentences, ``D`` = ``dim``, ``d`` = ``d_model``, ``K`` codebooks of ``C``
units (``lcm.quant``). Everything happens in the model's normalized space ``z = normalize(x)``; the
:class:`~conceptlm.lcm.rvq.ResidualQuantizer` is fitted there (:meth:`QuantLCM.fit_quantizer`, after the normalizer
is set).

Architecture: the One-Tower layout (:mod:`conceptlm.lcm.interleave`) with the noisy latent replaced by the partial
quantization and the timestep embedding by a codebook-index embedding. Sentence ``n`` of a document contributes two
positions, both at sentence position ``n``::

    query copy 2n:    h = PreNet(q_n) + E[k - 1]   q_n = sum of the first k-1 centroids of z_n (zeros for k = 1)
    clean copy 2n+1:  h = PreNet(z_n) + E[K]       E[K] = the reserved "clean" index

(plus the learned position table when ``lcm.positions = learned``; ``scale_embeddings`` multiplies the PreNet output
by ``sqrt(d)`` before the index embedding is added). The index embedding is *added after* the PreNet (the paper's
One-Tower concatenates its timestep embedding before the PreNet; a sum after a linear PreNet is the same function
class). The causal decoder runs under the interleaved mask, and the head reads the query copies:

- ``quant_d`` (Quant-LCM-d): logits over the ``C`` units of codebook ``k`` (one head shared by all codebooks, the
  codebook is known from the input index); loss part ``ce`` = summed cross-entropy against the target's unit
  ``codes_n[k - 1]``;
- ``quant_c`` (Quant-LCM-c): a vector ``(D,)`` regressing the target ``z_n``; loss part ``mse`` = summed squared
  error in normalized space.

Training draws, per (document, sentence), ``k`` uniformly in ``1..K`` and a classifier-free-guidance drop
``Bernoulli(lcm.quant.cfg_dropout)`` (a dropped query sees only itself). Generation (:class:`QuantLCMPredictor`)
starts a sentence from zeros and adds one centroid per codebook, ``K`` model calls per sentence:

- D: the unit is drawn from the (guided) logits with ``generate.quant`` temperature / top-k / top-p (temperature 0
  or top-k 1 = argmax);
- C: the (guided) predicted vector ``y`` gives the residual ``r = y - partial``; the unit is the centroid nearest to
  ``r`` (temperature 0) or is drawn from ``p(c_i | r) ~ exp(-||c_i - r||^2 / temperature)`` restricted to top-k /
  top-p (paper Eq. 23 with ``beta = 1 / temperature``).

Guidance combines the conditional and the unconditional outputs (``u + g (c - u)``, on the logits for D, on the
vector for C); both branches run in one batched call. The emitted sentence is the final partial sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from conceptlm.core.modules import Decoder, KVCache
from conceptlm.core.rng import EVAL_STEP, StepRandomness
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import GenerationOptions, LCMSection, QuantSamplingOptions
from conceptlm.lcm.generate import SequenceState, row_generator
from conceptlm.lcm.interleave import interleave, interleaved_attention_mask, interleaved_positions
from conceptlm.lcm.rvq import ResidualQuantizer
from conceptlm.lcm.sequence import LEARNED_POSITION_STD, TEACHER_FORCED_METRICS, NormalizedModel, TeacherForcedEval

__all__ = ["QuantLCM", "QuantLCMUnit", "QuantLCMPredictor", "sample_units", "INDEX_EMBED_STD"]

INDEX_EMBED_STD = 0.3
"""Init std of the codebook-index embedding (about half the PreNet output's scale on unit-variance inputs)."""


def sample_units(logits: torch.Tensor, u: torch.Tensor, *, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> torch.Tensor:
    """Draw one unit per row from ``logits`` ``(A, C)`` with the uniforms ``u`` ``(A,)`` in ``[0, 1)``.

    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest (0 = all), then to the smallest set of
    the remaining units whose probability reaches ``top_p`` (renormalized after top-k), sampled by inverting the
    cumulative distribution at ``u``. ``temperature == 0`` or ``top_k == 1`` is the argmax (``u`` unused).
    Returns long ``(A,)``.
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    s, order = (logits.float() / temperature).sort(dim=-1, descending=True, stable=True)
    if 0 < top_k < s.shape[-1]:
        s = s.clone()
        s[:, top_k:] = -math.inf
    p = torch.softmax(s, dim=-1)
    if top_p < 1.0:
        before = p.cumsum(-1) - p  # probability of the better units
        p = torch.where(before < top_p, p, torch.zeros_like(p))
    cdf = p.cumsum(-1)
    target = (u.to(cdf).clamp(0, 1) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_max(s.shape[-1] - 1)
    last = (p > 0).sum(-1, keepdim=True) - 1  # never beyond the last allowed unit (rounding at u ~ 1)
    pick = torch.minimum(pick, last)
    return order.gather(-1, pick).squeeze(-1)


class QuantLCM(NormalizedModel):
    """Quant-LCM-d (``cfg.model = "quant_d"``) or Quant-LCM-c (``"quant_c"``); module docstring.

    Submodules: ``quantizer`` (:class:`ResidualQuantizer`, buffers), ``prenet`` ``Linear(D, d)``,
    ``index_embedding`` ``Embedding(K + 1, d)`` (row ``k - 1`` = query at codebook ``k``, row ``K`` = clean copy),
    optional ``position`` table, ``decoder`` (causal, run under the interleaved mask) and ``head``
    (``Linear(d, C)`` for D, ``Linear(d, D)`` for C).
    """

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__(cfg)
        if cfg.model not in ("quant_d", "quant_c"):
            raise ValueError(f"QuantLCM needs lcm.model = quant_d or quant_c, got {cfg.model!r}")
        q, d = cfg.quant, cfg.d_model
        self.discrete = cfg.model == "quant_d"
        self.quantizer = ResidualQuantizer(cfg.dim, q.n_codebooks, q.codebook_size)
        self.prenet = nn.Linear(cfg.dim, d)
        self.index_embedding = nn.Embedding(q.n_codebooks + 1, d)
        nn.init.normal_(self.index_embedding.weight, std=INDEX_EMBED_STD)
        self.position = None
        if cfg.positions == "learned":
            self.position = nn.Embedding(cfg.max_sentences, d)
            nn.init.normal_(self.position.weight, std=LEARNED_POSITION_STD)
        self.decoder = Decoder(cfg.decoder_config())
        for layer in self.decoder.layers:  # the reference init of attention outputs (as BaseLCM)
            nn.init.xavier_uniform_(layer.attn.o_proj.weight)
            nn.init.zeros_(layer.attn.o_proj.bias)
        self.head = nn.Linear(d, q.codebook_size if self.discrete else cfg.dim)

    @property
    def n_codebooks(self) -> int:
        return self.quantizer.n_codebooks

    @property
    def clean_index(self) -> int:
        """The index-embedding row of clean copies (``K``)."""
        return self.quantizer.n_codebooks

    # ----------------------------------------------------------------------------------------- quantizer
    @torch.no_grad()
    def fit_quantizer(self, z: torch.Tensor, generator: torch.Generator | None = None) -> list[dict]:
        """Fit the codebooks on NORMALIZED training vectors ``z`` ``(N, D)`` (``self.normalize(x)``; at most
        ``lcm.quant.fit_samples`` rows, evenly strided, ``lcm.quant.fit_iters`` k-means iterations per codebook).

        Returns the reconstruction curve on the fitting vectors (:meth:`ResidualQuantizer.reconstruction_curve`).
        """
        q = self.cfg.quant
        z = z.detach().float()
        if z.ndim != 2:
            raise ValueError(f"fit_quantizer expects (N, {self.cfg.dim}) normalized vectors, got {tuple(z.shape)}")
        if z.shape[0] > q.fit_samples:
            z = z[::math.ceil(z.shape[0] / q.fit_samples)]
        if z.shape[0] < q.codebook_size:
            raise ValueError(f"fit_quantizer: {z.shape[0]} training vectors, fewer than lcm.quant.codebook_size="
                             f"{q.codebook_size}; use more data or a smaller codebook")
        device = self.quantizer.codebooks.device
        self.quantizer.fit(z.to(device), iters=q.fit_iters, generator=generator)
        return self.quantizer.reconstruction_curve(z.to(device))

    # ----------------------------------------------------------------------------------------- network
    def embed(self, v: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
        """Inputs ``(B, T, D)`` and their index-embedding rows (long ``(B, T)`` or one int) -> ``(B, T, d)``."""
        h = self.prenet(v)
        if self.cfg.scale_embeddings:
            h = h * math.sqrt(self.cfg.d_model)
        if isinstance(index, int):
            return h + self.index_embedding.weight[index].to(h.dtype)
        return h + self.index_embedding(index).to(h.dtype)

    def trunk(self, h: torch.Tensor, positions: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
              attn_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Positions + causal decoder: ``h`` ``(B, T, d)`` with sentence ``positions`` long ``(B, T)`` ->
        ``(B, T, d)`` (``attn_mask`` bool ``(B|1, 1, T, S)``, True = may attend, combined with causality and
        ``key_padding_mask`` ``(B, S)``)."""
        if self.position is not None:
            if int(positions.max()) >= self.cfg.max_sentences:
                raise ValueError(f"sentence position {int(positions.max())} >= lcm.max_sentences="
                                 f"{self.cfg.max_sentences} (the learned position table)")
            h = h + self.position(positions).to(h.dtype)
        bias = None
        if attn_mask is not None:
            bias = torch.zeros(attn_mask.shape, dtype=h.dtype, device=h.device)
            bias = bias.masked_fill(~attn_mask, torch.finfo(h.dtype).min)
        return self.decoder(h, positions=positions, key_padding_mask=key_padding_mask, attn_mask=bias, cache=cache)

    def forward_interleaved(self, queries: torch.Tensor, z: torch.Tensor, stage: torch.Tensor, *,
                            positions: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                            drop: torch.Tensor | None = None) -> torch.Tensor:
        """All sentences in one pass: query inputs ``queries`` ``(B, N, D)`` (partial sums) at codebook ``stage``
        (long ``(B, N)``, 0-based: ``stage = k - 1``), clean ``z`` ``(B, N, D)`` -> head outputs at the query
        copies: logits ``(B, N, C)`` (D) or vectors ``(B, N, D)`` (C).

        Args:
            positions: sentence positions long ``(B, N)`` (default ``0..N-1``).
            keep: bool ``(B, N)`` real sentences (right or left padding).
            drop: bool ``(B, N)`` unconditional queries (see only themselves).
        """
        b, n, _ = z.shape
        if positions is None:
            positions = torch.arange(n, device=z.device).unsqueeze(0).expand(b, n)
        h = interleave(self.embed(queries, stage), self.embed(z, self.clean_index))
        mask = interleaved_attention_mask(n, drop=drop, keep=keep, device=z.device)
        h = self.trunk(h, interleaved_positions(positions), attn_mask=mask)
        return self.head(h[:, 0::2])

    def query_inputs(self, codes: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """Partial quantizations: codes long ``(B, N, K)``, stage ``(B, N)`` -> ``sum_{j < stage} C_j[codes_j]``
        ``(B, N, D)``."""
        parts = self.quantizer.partial_sums(codes)  # (B, N, K + 1, D)
        idx = stage.view(*stage.shape, 1, 1).expand(*stage.shape, 1, parts.shape[-1])
        return parts.gather(-2, idx).squeeze(-2)

    def pick(self, out: torch.Tensor, partial: torch.Tensor, stage: int, u: torch.Tensor | None,
             o: QuantSamplingOptions) -> torch.Tensor:
        """The unit of codebook ``stage`` for head outputs ``out`` ``(A, C|D)`` given the current partial sums
        ``(A, D)`` and uniforms ``u`` ``(A,)`` (``None`` = greedy) -> long ``(A,)`` (module docstring)."""
        greedy = u is None or o.temperature == 0
        if self.discrete:
            if greedy:
                return out.argmax(-1)
            return sample_units(out, u, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)
        residual = out.float() - partial.float()
        if greedy:
            return self.quantizer.nearest(residual, stage)
        logits = -self.quantizer.distances(residual, stage)
        return sample_units(logits, u, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)

    @torch.no_grad()
    def teacher_forced(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy coarse-to-fine prediction of every sentence from its ground-truth prefix (guidance 1), all
        positions at once: ``z`` ``(B, T, D)`` -> normalized predictions ``(B, T, D)`` (``[:, t]`` predicts
        ``z[:, t]``; ``K`` passes)."""
        self.quantizer.require_fitted()
        b, t, _ = z.shape
        partial = torch.zeros_like(z, dtype=torch.float32)
        greedy = QuantSamplingOptions(temperature=0.0)
        for j in range(self.n_codebooks):
            stage = torch.full((b, t), j, dtype=torch.long, device=z.device)
            out = self.forward_interleaved(partial.to(z.dtype), z, stage, keep=keep)
            unit = self.pick(out.reshape(b * t, -1), partial.reshape(b * t, -1), j, None, greedy)
            partial = partial + self.quantizer.codebooks[j][unit].reshape(b, t, -1)
        return partial

    def predictor(self, options: GenerationOptions) -> QuantLCMPredictor:
        """The :class:`~conceptlm.lcm.generate.NextSentencePredictor` of :func:`~conceptlm.lcm.generate.generate`."""
        return QuantLCMPredictor(self, options)


class QuantLCMPredictor:
    """Coarse-to-fine generation (module docstring): ``K`` query calls per sentence.

    Only the clean copies of the known sentences and the query of the next one are needed (no position attends to
    an earlier query copy): ``[z_0, ..., z_{n-1}, q_n]``. With ``options.use_cache`` the clean prefix is KV-cached
    (the prompt prefilled once, then one clean position per emitted sentence); each query call runs only the query
    against the cache, which is then cropped back to the prefix. Without it the whole sequence is recomputed at
    every call. With guidance (``generate.quant.guidance_scale != 1``) the unconditional branch is a second query
    position in the same call, at the same sentence position, that attends only to itself (no copy of the batch or
    of the cache). The uniforms of a sentence are ``torch.rand(K)`` of ``row_generator("lcm-quant", seed, row,
    step)``, the ``j``-th for codebook ``j``, so a document's output depends neither on the rest of the batch nor
    on the cache.
    """

    def __init__(self, model: QuantLCM, options: GenerationOptions) -> None:
        model.quantizer.require_fitted()
        self.model, self.o, self.q = model, options, options.quant
        self.n_queries = 1 if self.q.guidance_scale == 1.0 else 2
        self.cache = KVCache() if options.use_cache else None
        self.seq: SequenceState | None = None

    def start(self, z, keep, positions, rows):
        self.seq = SequenceState(z, keep, positions)
        if self.cache is not None:
            m = self.model
            m.trunk(m.embed(z, m.clean_index), positions, key_padding_mask=keep, cache=self.cache)
        return self._sentence(rows, 0)

    def step(self, z_new, rows, step):
        s = self.seq
        s.append(z_new)
        if self.cache is not None:
            m = self.model
            m.trunk(m.embed(z_new.unsqueeze(1), m.clean_index), s.positions[:, -1:], key_padding_mask=s.keep,
                    cache=self.cache)
        return self._sentence(rows, step)

    def select(self, index):
        self.seq.select(index)
        if self.cache is not None:
            self.cache.reorder(index)

    def _query_mask(self) -> torch.Tensor:
        """Bool ``(A, 1, Q, S + Q)`` of the ``Q`` query rows over the prefix and the queries: the conditional query
        sees the real prefix and itself, the unconditional one only itself."""
        keep = self.seq.keep
        a, prefix = keep.shape
        n_q = self.n_queries
        allow = torch.zeros(a, 1, n_q, prefix + n_q, dtype=torch.bool, device=keep.device)
        allow[:, 0, 0, :prefix] = keep
        allow[:, 0, torch.arange(n_q), prefix + torch.arange(n_q)] = True
        return allow

    def _query(self, partial: torch.Tensor, stage: int) -> torch.Tensor:
        """Head output ``(A, C|D)`` for the query ``partial`` ``(A, D)`` of the next sentence (guided)."""
        m, s = self.model, self.seq
        a, prefix = s.keep.shape
        n_q = self.n_queries
        hq = m.embed(partial.to(s.z.dtype).unsqueeze(1).expand(a, n_q, -1), stage)
        pos_q = (s.positions[:, -1:] + 1).expand(a, n_q)
        allow = self._query_mask()
        if self.cache is not None:
            h = m.trunk(hq, pos_q, attn_mask=allow, cache=self.cache)
            self.cache.crop(prefix)
        else:
            full = torch.zeros(a, 1, prefix + n_q, prefix + n_q, dtype=torch.bool, device=allow.device)
            full[:, 0, :prefix, :prefix] = s.keep.view(a, 1, prefix)  # causality is the decoder's
            full[:, :, prefix:] = allow
            h = m.trunk(torch.cat([m.embed(s.z, m.clean_index), hq], dim=1), torch.cat([s.positions, pos_q], dim=1),
                        attn_mask=full)[:, prefix:]
        out = m.head(h).float()  # (A, Q, C|D)
        if n_q == 1:
            return out[:, 0]
        cond, unc = out[:, 0], out[:, 1]
        return unc + self.q.guidance_scale * (cond - unc)

    def _sentence(self, rows: list[int], step: int) -> torch.Tensor:
        m = self.model
        k = m.n_codebooks
        device = self.seq.z.device
        u = torch.stack([torch.rand(k, generator=row_generator("lcm-quant", self.o.seed, r, step))
                         for r in rows]).to(device)  # (A, K)
        partial = torch.zeros(len(rows), m.cfg.dim, device=device)
        for j in range(k):
            out = self._query(partial, j)
            unit = m.pick(out, partial, j, u[:, j], self.q)
            partial = partial + m.quantizer.codebooks[j][unit]
        return partial


class QuantLCMUnit(TeacherForcedEval, TrainUnit):
    """Quant-LCM-d / -c training (``cfg.model`` chooses) as a :class:`~conceptlm.core.unit.TrainUnit`.

    Loss part ``ce`` (D) or ``mse`` (C), summed over the loss positions ``batch.get("loss_mask", batch["mask"])``;
    D also reports ``unit_acc`` (argmax = target unit). Randomness: ``k`` and the guidance drop of each
    (document, sentence) come from ``step_rng.per_example`` with shape ``(max_sentences,)`` sliced to ``T`` (the
    same draws whatever the padding, micro-batch or rank); without ``step_rng`` a fixed evaluation stream is used.
    The drop applies in training mode only (the eval loss is the conditional one). ``eval_metrics``: the Table 3
    metrics of the greedy teacher-forced prediction (:meth:`QuantLCM.teacher_forced`) at the positions
    ``target_mask(loss positions, min_context)``.

    Args:
        cfg: the architecture (``cfg.quant``: codebooks, CFG dropout).
        round_trip: optional ``encode(decode(v))`` ``(N, D) -> (N, D)`` for ``l2_r``.
        model: an existing model to wrap (e.g. loaded from a checkpoint); default a fresh one.
    """

    def __init__(self, cfg: LCMSection, *, round_trip: M.Vectors | None = None, model: QuantLCM | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model if model is not None else QuantLCM(cfg)
        self.part = "ce" if self.model.discrete else "mse"
        self.loss_weights = {self.part: 1.0}
        self.metric_names = TEACHER_FORCED_METRICS + (("unit_acc",) if self.model.discrete else ())
        self.round_trip = round_trip

    def _loss_mask(self, batch: dict) -> torch.Tensor:
        return batch.get("loss_mask", batch["mask"]) & batch["mask"]

    def counts(self, batch: dict) -> dict:
        return {self.part: self._loss_mask(batch).sum(), THROUGHPUT_KEY: batch["mask"].sum()}

    def prepare(self, batch: dict) -> dict:
        """Adds ``codes`` long ``(B, T, K)``: the greedy RVQ codes of the normalized targets."""
        if "codes" not in batch:
            batch["codes"] = self.model.quantizer.encode(self.model.normalize(batch["vectors"]))
        return batch

    def draws(self, ids: torch.Tensor, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook stage ``k - 1`` long ``(B, T)`` uniform in ``0..K-1`` and the guidance drop bool ``(B, T)``."""
        if t > self.cfg.max_sentences:
            raise ValueError(f"a batch of {t} sentences is longer than lcm.max_sentences={self.cfg.max_sentences}")
        rng = self.step_rng or StepRandomness(seed=0, step=EVAL_STEP)
        shape = (self.cfg.max_sentences,)
        k = self.model.n_codebooks
        u = rng.per_example("lcm-quant-stage", ids, shape, sampler=torch.rand, device=device)[:, :t]
        stage = (u * k).long().clamp_max(k - 1)
        drop = rng.per_example("lcm-quant-cfg", ids, shape, sampler=torch.rand, device=device)[:, :t]
        return stage, drop < self.cfg.quant.cfg_dropout

    def forward(self, batch: dict) -> dict:
        m = self.model
        m.quantizer.require_fitted()
        mask = batch["mask"]
        z = m.normalize(batch["vectors"])
        codes = batch["codes"] if "codes" in batch else m.quantizer.encode(z)
        stage, drop = self.draws(batch["ids"], mask.shape[1], mask.device)
        queries = m.query_inputs(codes, stage)
        out = m.forward_interleaved(queries, z, stage, keep=mask, drop=drop if self.training else None)
        lm = self._loss_mask(batch)
        if m.discrete:
            target = codes.gather(-1, stage.unsqueeze(-1)).squeeze(-1)
            logits = out[lm].float()
            ce = F.cross_entropy(logits, target[lm], reduction="sum")
            return {"ce": ce, "unit_acc": ((logits.argmax(-1) == target[lm]).sum(), lm.sum())}
        se = ((out.float() - z.float()) ** 2).sum(-1)
        return {"mse": se[lm].sum()}

    @torch.no_grad()
    def teacher_forced(self, batch: dict) -> torch.Tensor:
        """Normalized greedy predictions ``(B, T, D)`` of every sentence from its true prefix
        (:meth:`QuantLCM.teacher_forced`)."""
        m = self.model
        return m.teacher_forced(m.normalize(batch["vectors"]), keep=batch["mask"])
