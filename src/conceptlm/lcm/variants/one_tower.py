"""One-Tower diffusion LCM (paper §2.3.3, Fig. 6 left and Fig. 7): one transformer both reads the clean context and
denoises the next sentence embedding.

Shapes: ``B`` documents, ``N`` sentences, ``D`` = ``dim``, ``d`` = ``d_model``; everything in normalized space.

Model. Every input of the interleaved layout of :mod:`conceptlm.lcm.interleave` (query copy ``2n`` = the noisy
latent ``x_t`` of sentence ``n``, clean copy ``2n + 1`` = its embedding ``z_n``) is concatenated with the
embedding of its diffusion timestep (clean copies carry ``t = 0``)::

    e_t = TimestepEmbedder(t)                          sinusoid(256, cos first, raw integer t) -> Linear-SiLU-Linear
    h0  = PreNet([u ; e_t]) = [u ; e_t] W_pre^T + b     (D + d -> d)   (x sqrt(d) if scale_embeddings)
                                                        (+ learned position table, if positions == "learned")
    hL  = Decoder(h0, attn_mask = interleaved mask)     non-causal blocks, the mask alone decides who sees whom,
                                                        RoPE on shared sentence positions if positions == "rope"
    y   = PostNet(RMSNorm(hL))                          (d -> D), read at the query positions 2n

The timestep embedding has width ``d`` (the reference frontend's ``timestep_embed_dim`` feeding a
``D + timestep_embed_dim`` pre-linear) and is the Two-Tower's DiT embedder (init N(0, 0.02), zero biases). Both
copies of sentence ``n`` get sentence position ``n``. ``y`` is what ``lcm.diffusion.prediction`` names (the paper:
``x0``).

Training (:class:`OneTowerUnit`). Per real sentence: a timestep (``lcm.diffusion.step_sampling``), Gaussian noise
and a classifier-free-guidance drop ~ Bernoulli(``cfg_dropout``) (a dropped query sees only itself). All three
come from ``step_rng.per_example`` with shapes of ``max_sentences`` rows, sliced to the batch's ``N``, so an
example's draws depend only on ``(seed, step, example id)``. Loss part ``mse`` = ``sum over loss positions of
w_t ||y - target||^2`` where ``target`` is the schedule's target for the prediction type (``z`` itself for x0; for
epsilon / v the loss stays in their space, which avoids the singular x0 conversion at zero terminal SNR) and
``w_t`` the loss weights of ``lcm.diffusion.weighting``. Loss positions = ``batch["loss_mask"]`` when given, else
every real sentence, including position 0 (predicted unconditionally).

Evaluation: teacher-forced DDIM for all positions at once (ground-truth clean context), deterministic noise; the
shared Table 3 metrics on the denormalized last x0. The clean copies never attend to a query, so they are run once
into a KV cache and each sampler step runs only the queries (1.46x faster at the Table 3 size with guidance;
``use_cache=False`` recomputes the whole interleaved sequence, the reference for the tests).

Generation (:class:`OneTowerPredictor`). Only the clean copies of the known sentences and one query are needed (no
position attends to an earlier query copy): sequence ``[z_0, ..., z_{n-1}, q_n]``. With the KV cache the clean
prefix is computed once (the prompt at ``start``, one new clean copy per sentence) and each of the S denoising
steps runs only the query (then the cache is cropped back to the prefix). With guidance the unconditional branch
is a *second query position* in the same call that attends only to itself -- it needs no context, so no second
copy of the cache or the batch is made. Without the cache the whole sequence is recomputed at every step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from conceptlm.core.modules import Decoder, KVCache, TimestepEmbedder
from conceptlm.core.rng import StepRandomness
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm import metrics as M
from conceptlm.lcm.config import GenerationOptions, LCMSection, SamplerOptions
from conceptlm.lcm.diffusion.ddim import DDIMSampler, teacher_forced_noise
from conceptlm.lcm.diffusion.schedule import NoiseSchedule, build_schedule
from conceptlm.lcm.diffusion.weighting import loss_weights, sample_timesteps
from conceptlm.lcm.generate import SequenceState, row_generator
from conceptlm.lcm.interleave import interleave, interleaved_attention_mask, interleaved_positions
from conceptlm.lcm.sequence import LEARNED_POSITION_STD, NormalizedModel, TeacherForcedEval

__all__ = ["OneTowerLCM", "OneTowerUnit", "OneTowerPredictor", "additive_mask", "TIMESTEP_FREQ_DIM"]

TIMESTEP_FREQ_DIM = 256
"""Sinusoidal features of the timestep embedding (the reference's frequency size)."""

NOISE_PURPOSE, TIMESTEP_PURPOSE, DROP_PURPOSE = "lcm-one-tower-noise", "lcm-one-tower-t", "lcm-one-tower-cfg"
EVAL_PURPOSE = "lcm-one-tower-eval"
GENERATE_PURPOSE = "lcm-diffusion"


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool keep-mask -> additive float mask of the same shape (0 = may attend, the dtype's minimum = blocked)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                      torch.finfo(dtype).min)


def _causal_prefix_mask(keep: torch.Tensor) -> torch.Tensor:
    """Clean copies only: bool ``(A, 1, S, S)``, position ``i`` sees real ``j <= i`` (and always itself)."""
    s = keep.shape[1]
    eye = torch.eye(s, dtype=torch.bool, device=keep.device)
    tril = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    return ((tril & keep[:, None, :]) | eye).unsqueeze(1)


class OneTowerLCM(NormalizedModel):
    """The One-Tower diffusion LCM (module docstring); the normalizer lives in the buffers of
    :class:`~conceptlm.lcm.sequence.NormalizedModel`.

    Args:
        cfg: the architecture (``cfg.diffusion``: the noise process).
    """

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__(cfg)
        d, dim = cfg.d_model, cfg.dim
        self.time_embed = TimestepEmbedder(d, freq_dim=TIMESTEP_FREQ_DIM)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.prenet = nn.Linear(dim + d, d)
        self.position = None
        if cfg.positions == "learned":
            self.position = nn.Embedding(cfg.max_sentences, d)
            nn.init.normal_(self.position.weight, std=LEARNED_POSITION_STD)
        self.decoder = Decoder(dataclasses.replace(cfg.decoder_config(), causal=False))
        for layer in self.decoder.layers:  # the reference init of the attention outputs (as Base-LCM)
            nn.init.xavier_uniform_(layer.attn.o_proj.weight)
            nn.init.zeros_(layer.attn.o_proj.bias)
        self.postnet = nn.Linear(d, dim)
        self.schedule: NoiseSchedule = build_schedule(cfg.diffusion)

    # ----------------------------------------------------------------------------------------- building blocks
    def embed(self, u: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, *,
              time_embedding: torch.Tensor | None = None, check_positions: bool = True) -> torch.Tensor:
        """Inputs ``u`` ``(B, L, D)``, integer timesteps ``t`` ``(B, L)`` and sentence positions ``(B, L)`` ->
        PreNet output ``(B, L, d)`` (plus the learned position, if any).

        Args:
            time_embedding: ``time_embed(t)`` ``(B | 1, L | 1, d)`` when already known (then ``t`` is unused).
            check_positions: refuse positions beyond the learned table (a host sync; the generation loop, whose
                positions never reach ``max_sentences``, skips it).
        """
        if (check_positions and self.position is not None and positions.numel()
                and int(positions.max()) >= self.cfg.max_sentences):
            raise ValueError(f"sentence position {int(positions.max())} >= lcm.max_sentences="
                             f"{self.cfg.max_sentences} (the learned position table)")
        e = self.time_embed(t) if time_embedding is None else time_embedding
        e = e.to(u.dtype).expand(*u.shape[:-1], e.shape[-1])
        h = self.prenet(torch.cat([u, e], dim=-1))
        if self.cfg.scale_embeddings:
            h = h * math.sqrt(self.cfg.d_model)
        if self.position is not None:
            h = h + self.position(positions)
        return h

    def run(self, h: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
            cache: KVCache | None = None) -> torch.Tensor:
        """PreNet outputs ``h`` ``(B, L, d)`` -> PostNet outputs ``(B, L, D)`` under ``allowed`` ``(B | 1, 1, L, S)``
        over all keys (``S`` = cached + ``L``): a bool keep-mask, or one already made :func:`additive_mask`.
        The new keys/values join ``cache``."""
        bias = additive_mask(allowed, h.dtype) if allowed.dtype == torch.bool else allowed
        h = self.decoder(h, positions=positions, attn_mask=bias, cache=cache)
        return self.postnet(h)

    # ----------------------------------------------------------------------------------------- forward
    def forward_normalized(self, z_noisy: torch.Tensor, t: torch.Tensor, z_clean: torch.Tensor,
                           positions: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                           drop: torch.Tensor | None = None) -> torch.Tensor:
        """The training layout: predictions ``(B, N, D)`` for every sentence, read at the query positions.

        Args:
            z_noisy: noisy latents ``x_t`` ``(B, N, D)`` (the query copies).
            t: long ``(B, N)`` their timesteps.
            z_clean: clean embeddings ``(B, N, D)``.
            positions: long ``(B, N)`` sentence positions (default ``arange(N)``).
            keep: bool ``(B, N)`` real sentences (padding is never attended).
            drop: bool ``(B, N)`` unconditional queries (see only themselves).
        """
        b, n, _ = z_noisy.shape
        if t.shape != (b, n):
            raise ValueError(f"timesteps of shape {tuple(t.shape)}, expected {(b, n)}")
        if positions is None:
            positions = torch.arange(n, device=z_noisy.device).unsqueeze(0).expand(b, n)
        u = interleave(z_noisy, z_clean.to(z_noisy.dtype))
        ts = interleave(t.long(), torch.zeros_like(t, dtype=torch.long))
        pos = interleaved_positions(positions)
        allowed = interleaved_attention_mask(n, drop=drop, keep=keep, device=z_noisy.device)
        return self.run(self.embed(u, ts, pos), pos, allowed)[:, 0::2]

    def forward_unconditional(self, z_noisy: torch.Tensor, t: torch.Tensor,
                              positions: torch.Tensor | None = None) -> torch.Tensor:
        """What dropped queries predict, without the clean copies they never see: every query attends only to
        itself. ``(B, N, D)``, ``t`` ``(B, N)`` -> ``(B, N, D)`` (equals :meth:`forward_normalized` with every
        query dropped)."""
        b, n, _ = z_noisy.shape
        if positions is None:
            positions = torch.arange(n, device=z_noisy.device).unsqueeze(0).expand(b, n)
        eye = torch.eye(n, dtype=torch.bool, device=z_noisy.device).view(1, 1, n, n)
        return self.run(self.embed(z_noisy, t.long(), positions), positions, eye)

    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, x_clean: torch.Tensor, **kwargs) -> torch.Tensor:
        """Raw-space wrapper of :meth:`forward_normalized` for x0-predicting models: raw noisy and clean inputs ->
        raw predictions ``(B, N, D)``."""
        return self.denormalize(self.forward_normalized(self.normalize(x_noisy), t, self.normalize(x_clean),
                                                        **kwargs))

    def predictor(self, options: GenerationOptions) -> OneTowerPredictor:
        """The :class:`~conceptlm.lcm.generate.NextSentencePredictor` of :func:`~conceptlm.lcm.generate.generate`."""
        return OneTowerPredictor(self, options)


# ================================================================================================ generation
class OneTowerPredictor:
    """Generates each next sentence with ``S`` DDIM steps on one query after the clean prefix (module docstring).

    Initial noise (and DDIM eta noise) of document ``row`` at generation ``step`` come from
    ``row_generator("lcm-diffusion", options.seed, row, step)``, so outputs do not depend on the batch nor on the
    cache. The emitted sentence is the sampler's last x0. Per sentence, the query's inputs that do not change
    across the S steps (its position, the attention mask, and the timestep embeddings of the schedule) are built
    once.
    """

    def __init__(self, model: OneTowerLCM, options: GenerationOptions) -> None:
        self.model, self.o = model, options
        self.sampler = DDIMSampler(model.schedule, options.diffusion, prediction=model.cfg.diffusion.prediction)
        self.cache = KVCache() if options.use_cache else None
        self.seq: SequenceState | None = None
        self._time: dict[int, torch.Tensor] = {}

    def _time_embedding(self, t: int, device: torch.device) -> torch.Tensor:
        """``time_embed(t)`` ``(1, 1, d)``, computed once per timestep."""
        if t not in self._time:
            self._time[t] = self.model.time_embed(torch.full((1, 1), t, dtype=torch.long, device=device))
        return self._time[t]

    # --------------------------------------------------------------------------- one sentence
    def _query_layout(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Queries per document ``k`` (2 with guidance: the unconditional branch is a second query that sees only
        itself), their positions ``(A, k)`` and the additive mask of this sentence's denoiser calls: ``(A, 1, k,
        P + k)`` with the cache, ``(A, 1, P + k, P + k)`` without (the clean prefix is recomputed)."""
        s = self.seq
        a, p = s.keep.shape
        dev = s.keep.device
        k = 2 if self.sampler.guided else 1
        pos_q = (s.positions[:, -1:] + 1).expand(a, k)
        q_prefix = torch.zeros(a, 1, k, p, dtype=torch.bool, device=dev)
        q_prefix[:, 0, 0] = s.keep  # the conditional query sees the real prefix
        q_rows = torch.cat([q_prefix, torch.eye(k, dtype=torch.bool, device=dev).expand(a, 1, k, k)], dim=-1)
        if self.cache is None:
            prefix_rows = torch.cat([_causal_prefix_mask(s.keep),
                                     torch.zeros(a, 1, p, k, dtype=torch.bool, device=dev)], dim=-1)
            q_rows = torch.cat([prefix_rows, q_rows], dim=2)
        return k, pos_q, additive_mask(q_rows, self.model.prenet.weight.dtype)

    def _denoise(self, x: torch.Tensor, t: int, layout: tuple[int, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents ``x`` ``(A, D)`` at timestep ``t`` -> conditional (and, with guidance, unconditional)
        predictions ``(A, D)`` given the clean prefix, in one model call."""
        s, m = self.seq, self.model
        k, pos_q, bias = layout or self._query_layout()
        a, p = s.keep.shape
        q = x.unsqueeze(1).expand(a, k, x.shape[-1])
        e = self._time_embedding(int(t), x.device)
        if self.cache is not None:
            out = m.run(m.embed(q, None, pos_q, time_embedding=e, check_positions=False), pos_q, bias,
                        cache=self.cache)
            self.cache.crop(p)
        else:
            h = torch.cat([m.embed(s.z, torch.zeros_like(s.positions), s.positions, check_positions=False),
                           m.embed(q, None, pos_q, time_embedding=e, check_positions=False)], dim=1)
            out = m.run(h, torch.cat([s.positions, pos_q], dim=1), bias)[:, p:]
        return out[:, 0], (out[:, 1] if k == 2 else None)

    def _sample(self, rows: list[int], step: int) -> torch.Tensor:
        """One new sentence ``(A, D)`` (normalized) for the running documents ``rows``."""
        dim = self.model.cfg.dim
        gens = [row_generator(GENERATE_PURPOSE, self.o.seed, r, step) for r in rows]

        def draw() -> torch.Tensor:
            return torch.stack([torch.randn(dim, generator=g) for g in gens]).to(self.seq.z)

        layout = self._query_layout()
        x = self.sampler.initial_latent(draw())
        x0 = x
        stochastic = self.o.diffusion.eta > 0
        for i, t in enumerate(self.sampler.timesteps.tolist()):
            pred_c, pred_u = self._denoise(x, t, layout)
            x, x0 = self.sampler.step(i, x, pred_c, pred_u, noise=draw() if stochastic else None)
        return x0

    # --------------------------------------------------------------------------- the protocol
    def start(self, z: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, rows: list[int]) -> torch.Tensor:
        self.seq = SequenceState(z, keep, positions)
        if self.cache is not None:  # prefill the prompt's clean copies (t = 0)
            m = self.model
            t0 = torch.zeros(keep.shape, dtype=torch.long, device=z.device)
            m.run(m.embed(z, t0, positions), positions, _causal_prefix_mask(keep), cache=self.cache)
        return self._sample(rows, 0)

    def step(self, z_new: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
        s = self.seq
        s.append(z_new)
        if self.cache is not None:  # the new clean copy joins the cache
            m = self.model
            pos = s.positions[:, -1:]
            h = m.embed(z_new.unsqueeze(1), torch.zeros_like(pos), pos, check_positions=False)
            m.run(h, pos, s.keep[:, None, None, :], cache=self.cache)
        return self._sample(rows, step)

    def select(self, index: torch.Tensor) -> None:
        self.seq.select(index)
        if self.cache is not None:
            self.cache.reorder(index)


# ================================================================================================ training unit
def _timestep_sampler(num_steps: int, kind: str):
    """A ``per_example`` sampler drawing integer timesteps with :func:`sample_timesteps`."""
    def sampler(*shape: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return sample_timesteps(tuple(shape), num_steps, generator, kind)
    return sampler


class OneTowerUnit(TeacherForcedEval, TrainUnit):
    """The One-Tower diffusion LCM as a :class:`~conceptlm.core.unit.TrainUnit` (objective in the module docstring).

    Eval metrics: the shared teacher-forced ones (:func:`~conceptlm.lcm.sequence.teacher_forced_metrics`) of a DDIM run
    with ``self.eval_sampler`` (default: :class:`SamplerOptions`, at most the schedule's steps) for every position
    given the true clean context.

    Args:
        cfg: the architecture (``cfg.model`` should be ``one_tower``).
        round_trip: optional ``encode(decode(v))`` for ``l2_r``.
        model: an existing model to wrap (e.g. loaded from a checkpoint); default a fresh one.
    """

    def __init__(self, cfg: LCMSection, *, round_trip: M.Vectors | None = None, model: OneTowerLCM | None = None):
        super().__init__()
        self.cfg = cfg
        self.loss_weights = {"mse": 1.0}
        self.model = model if model is not None else OneTowerLCM(cfg)
        self.round_trip = round_trip
        self.eval_sampler = SamplerOptions(inference_steps=min(40, cfg.diffusion.num_train_steps))

    # --------------------------------------------------------------------------- randomness
    def _rng(self) -> StepRandomness:
        """The trainer's randomness, or (outside the trainer) a fixed one."""
        return self.step_rng if self.step_rng is not None else StepRandomness(seed=0, step=0)

    def draws(self, batch: dict, rng: StepRandomness | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example training draws for the batch's ``N`` sentences: timesteps long ``(B, N)``, noise
        ``(B, N, D)`` and CFG drops bool ``(B, N)``, each drawn for ``max_sentences`` rows and sliced."""
        rng = rng or self._rng()
        c, ids = self.cfg, batch["ids"]
        b, n, dim = batch["vectors"].shape
        if n > c.max_sentences:
            raise ValueError(f"batch of {n} sentences per document > lcm.max_sentences={c.max_sentences}")
        dev = batch["vectors"].device
        kind = c.diffusion.step_sampling
        t = rng.per_example(TIMESTEP_PURPOSE, ids, (c.max_sentences,), device=dev,
                            sampler=_timestep_sampler(c.diffusion.num_train_steps, kind))[:, :n].long()
        noise = rng.per_example(NOISE_PURPOSE, ids, (c.max_sentences, dim), device=dev)[:, :n]
        if c.diffusion.cfg_dropout > 0:
            drop = rng.per_example(DROP_PURPOSE, ids, (c.max_sentences,), sampler=torch.rand,
                                   device=dev)[:, :n] < c.diffusion.cfg_dropout
        else:
            drop = torch.zeros(b, n, dtype=torch.bool, device=dev)
        return t, noise, drop

    # --------------------------------------------------------------------------- loss
    def _loss_mask(self, batch: dict) -> torch.Tensor:
        """Bool ``(B, N)``: ``batch["loss_mask"]`` (nonzero = a loss position) if given, else every real sentence."""
        return batch.get("loss_mask", batch["mask"]).bool() & batch["mask"].bool()

    def counts(self, batch: dict) -> dict:
        return {"mse": self._loss_mask(batch).sum(), THROUGHPUT_KEY: batch["mask"].sum()}

    def forward(self, batch: dict) -> dict:
        m, c = self.model, self.cfg.diffusion
        z = m.normalize(batch["vectors"].float())
        keep = batch["mask"]
        t, noise, drop = self.draws(batch)
        x_t = m.schedule.add_noise(z, noise, t)
        pred = m.forward_normalized(x_t, t, z, keep=keep, drop=drop)
        target = m.schedule.target(z, noise, t, c.prediction)
        se = ((pred.float() - target.float()) ** 2).sum(-1)
        lm = self._loss_mask(batch)
        w = loss_weights(m.schedule, t, lm, c.weighting, c.min_snr, c.max_snr)
        return {"mse": (se * w.to(se))[lm].sum()}

    # --------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def teacher_forced(self, batch: dict, options: SamplerOptions | None = None, *,
                       use_cache: bool = True) -> torch.Tensor:
        """Normalized x0 ``(B, N, D)`` for every position from a DDIM run given the true clean context, all
        positions in one batched run. Noise: per example, fixed (the same at every evaluation).

        With ``use_cache`` (default) the clean copies, which never attend to a query, are run once into a KV cache
        and each of the S sampler steps runs only the ``N`` queries (``2N`` with guidance: the unconditional
        branch as a second set of queries that see only themselves) against it; without it every step runs the
        whole interleaved ``2N`` sequence, plus ``N`` unconditional queries. Both give the same x0 (to float
        rounding: the keys are summed in another order)."""
        m = self.model
        options = options or self.eval_sampler
        z = m.normalize(batch["vectors"].float())
        keep = batch["mask"]
        b, n, dim = z.shape
        sampler = DDIMSampler(m.schedule, options, prediction=self.cfg.diffusion.prediction)
        noise = teacher_forced_noise(self.step_rng, EVAL_PURPOSE, batch["ids"], max_sentences=self.cfg.max_sentences,
                                     dim=self.cfg.dim, n_sentences=n, n_steps=len(sampler.timesteps), eta=options.eta,
                                     device=z.device)
        denoise = self._cached_denoiser(z, keep, sampler.guided) if use_cache else None
        x = sampler.initial_latent(noise[:, 0])
        x0 = x
        for i, t in enumerate(sampler.timesteps.tolist()):
            if denoise is not None:
                pred_c, pred_u = denoise(x, int(t))
            else:
                tt = torch.full((b, n), int(t), dtype=torch.long, device=z.device)
                pred_c = m.forward_normalized(x, tt, z, keep=keep)
                pred_u = m.forward_unconditional(x, tt) if sampler.guided else None
            x, x0 = sampler.step(i, x, pred_c, pred_u, noise=noise[:, i + 1] if options.eta > 0 else None)
        return x0

    def _cached_denoiser(self, z: torch.Tensor, keep: torch.Tensor, guided: bool):
        """``(x, t) -> (pred_c, pred_u | None)`` for all ``N`` positions of ``teacher_forced``, over a KV cache of
        the clean copies (the interleaved layout's clean-to-clean attention is causal, so the cache holds exactly
        what the clean copies compute there). Query ``n`` sees the real clean copies ``m < n`` and itself; the
        unconditional queries see only themselves."""
        m = self.model
        b, n, _ = z.shape
        dev = z.device
        pos = torch.arange(n, device=dev).unsqueeze(0).expand(b, n)
        cache = KVCache()
        m.run(m.embed(z, torch.zeros(b, n, dtype=torch.long, device=dev), pos), pos, _causal_prefix_mask(keep),
              cache=cache)
        q = 2 * n if guided else n
        eye = torch.eye(q, dtype=torch.bool, device=dev).expand(b, 1, q, q)
        to_clean = torch.zeros(b, 1, q, n, dtype=torch.bool, device=dev)
        to_clean[:, 0, :n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril(-1) & keep[:, None, :]
        bias = additive_mask(torch.cat([to_clean, eye], dim=-1), m.prenet.weight.dtype)
        pos_q = pos.repeat(1, 2) if guided else pos

        def denoise(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            e = m.time_embed(torch.full((1, 1), t, dtype=torch.long, device=dev))
            xq = torch.cat([x, x], dim=1) if guided else x
            out = m.run(m.embed(xq, None, pos_q, time_embedding=e), pos_q, bias, cache=cache)
            cache.crop(n)
            return out[:, :n], (out[:, n:] if guided else None)

        return denoise
