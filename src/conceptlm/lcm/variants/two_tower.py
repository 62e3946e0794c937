"""Two-Tower diffusion LCM: a causal contextualizer and an AdaLN-zero denoiser that cross-attends to it
(LCM paper §2.3.4, Fig. 6 and 8).

Shapes: ``B`` documents, ``T`` sentences, ``D`` = ``lcm.dim``, ``d`` = ``lcm.d_model``, all embeddings in the
model's normalized space.

**Contextualizer** (the Base-LCM's tower: PreNet, causal pre-norm blocks with RoPE, final RMSNorm)::

    C = Ctx(PreNet(z))                                                   (B, T, d)

**Denoiser** (``lcm.n_denoiser_layers`` blocks). Keys ``K = [0; C]`` (a zero vector prepended, ``T + 1`` keys);
timestep embedding ``e_t = MLP(phi(t))`` (``phi``: 256 sinusoidal features of the integer step, cos first)::

    h = PreDenoiser(x_t)                                                 (B, T, d)
    per block, (shift, scale, gate) x 3 = Linear_zero(SiLU(e_t)):
        h += gate_sa * V(mod(norm1(h)))        identity self-attention: each latent attends only to itself, so
                                               the sub-layer is o_proj(v_proj(u)) (no q/k projections: they
                                               would never get a gradient)
        h += gate_ca * CrossAttn(mod(norm2(h)), K, mask)
        h += gate_ff * SwiGLU(mod(norm3(h)))
    x0^ = PostDenoiser(RMSNorm(h))                                       (B, T, D)

The modulation projections are zero-initialized, so a fresh denoiser ignores the context (every block is the
identity) and returns ``PostDenoiser(RMSNorm(PreDenoiser(x_t)))``.

**Training** (:class:`TwoTowerUnit`): every real sentence gets its own timestep (``lcm.diffusion.step_sampling``)
and noise, and the denoiser predicts all of them in one pass. Cross-attention mask: the query of sentence ``i``
sees keys ``j <= i`` -- the zero vector and the contextualized *previous* sentences ``C_0..C_{i-1}``; position 0
sees only the zero vector (an unconditional first sentence). Classifier-free guidance training: a row is
restricted to the zero key with probability ``lcm.diffusion.cfg_dropout``, independently per document and row
(the reference drops the same ``floor((T - 1) p)`` rows of every document, which is none for documents of at
most 7 sentences). All draws are per example (:meth:`conceptlm.core.rng.StepRandomness.per_example`), so an
example's noise does not depend on its rank, micro-batch or padding: 2 processes equal 1.

**Generation** (:class:`TwoTowerPredictor`; caching choices of ours, not in the paper): the contextualizer runs one
new position per sentence (KV cache); the cross-attention keys/values of the context are projected once per sentence
and appended (the reference recomputes them at every diffusion step); the AdaLN modulations of the sampler's
timesteps are computed once per generation call (they depend on ``t`` only); the unconditional CFG branch is batched
with the conditional one and skips its cross-attention, whose output with only the zero key is a per-layer constant
``o_proj(v_proj(0))``. ``use_cache=False`` recomputes everything at every step (same output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conceptlm.core.modules import (
    AdaLNModulation,
    CrossAttention,
    Modulation,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    modulate,
)
from conceptlm.core.modules.cache import KVCache
from conceptlm.core.rng import derived_generator
from conceptlm.core.unit import THROUGHPUT_KEY, TrainUnit
from conceptlm.lcm.config import LCMSection, SamplerOptions
from conceptlm.lcm.diffusion.ddim import teacher_forced_noise
from conceptlm.lcm.sequence import CausalSentenceModel, TeacherForcedEval

__all__ = ["TwoTowerLCM", "DenoiserBlock", "TwoTowerUnit", "TwoTowerPredictor", "cross_attention_keep",
           "draw_training_noise"]

FREQ_DIM = 256
"""Sinusoidal timestep features (reference ``frequency_embedding_size``)."""

EVAL_PURPOSE = "lcm-two-tower-eval"


class DenoiserBlock(nn.Module):
    """One AdaLN-zero denoiser block (module docstring). Parameter names follow the shared blocks."""

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__()
        d = cfg.d_model
        self.dropout = cfg.dropout
        self.attn_norm, self.cross_norm, self.mlp_norm = (RMSNorm(d, 1e-5) for _ in range(3))
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.cross_attn = CrossAttention(d, cfg.n_heads, bias=True, dropout=cfg.attn_dropout)
        self.mlp = SwiGLU(d, cfg.d_ff, bias=True)
        self.modulation = AdaLNModulation(d, d, n_sublayers=3)

    def _residual(self, h: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return h + gate * F.dropout(out, self.dropout, self.training)

    def uncond_cross(self) -> torch.Tensor:
        """``(d,)``: the cross-attention output of a query whose only key is the zero vector."""
        v = self.cross_attn.v_proj(torch.zeros_like(self.cross_attn.v_proj.weight[:1]))
        return self.cross_attn.o_proj(v)[0]

    def forward(self, h: torch.Tensor, mods: list[Modulation], memory_kv: tuple[torch.Tensor, torch.Tensor] | None,
                *, memory_mask: torch.Tensor | None = None, memory_attn_mask: torch.Tensor | None = None,
                n_cond: int | None = None) -> torch.Tensor:
        """``h`` ``(N, T, d)``; ``mods``: the block's three :class:`Modulation` triples ``(N|1, T|1, d)``.

        Args:
            memory_kv: projected keys/values of ``[0; C]`` ``(Nc, H, S, hd)`` for the first ``Nc`` rows.
            memory_mask: bool ``(Nc, S)`` key padding; memory_attn_mask: additive ``(Nc|1, 1, T, S)``.
            n_cond: rows ``>= n_cond`` are unconditional (only the zero key): their cross-attention output is the
                constant :meth:`uncond_cross`, and ``memory_kv`` covers the first ``n_cond`` rows only.
        """
        sa, ca, ff = mods
        u = modulate(self.attn_norm(h), sa.shift, sa.scale)
        h = self._residual(h, self.o_proj(self.v_proj(u)), sa.gate)
        u = modulate(self.cross_norm(h), ca.shift, ca.scale)
        n = h.shape[0] if n_cond is None else n_cond
        parts = []
        if n > 0:
            parts.append(self.cross_attn(u[:n], memory_mask=memory_mask, attn_mask=memory_attn_mask,
                                         memory_kv=memory_kv))
        if n < h.shape[0]:
            parts.append(self.uncond_cross().to(u.dtype).expand(h.shape[0] - n, h.shape[1], -1))
        c = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        h = self._residual(h, c, ca.gate)
        u = modulate(self.mlp_norm(h), ff.shift, ff.scale)
        return self._residual(h, self.mlp(u), ff.gate)


def cross_attention_keep(t: int, drop: torch.Tensor | None = None, *, device=None) -> torch.Tensor:
    """Training cross-attention keep-mask ``(B | 1, 1, T, T + 1)``: query ``i`` sees keys ``j <= i`` (key 0 = the
    zero vector, key ``j`` = ``C_{j-1}``); a dropped row (``drop`` bool ``(B, T)``) sees key 0 only."""
    keep = torch.ones(t, t + 1, dtype=torch.bool, device=device).tril().view(1, 1, t, t + 1)
    if drop is not None:
        only_zero = torch.zeros(t + 1, dtype=torch.bool, device=drop.device)
        only_zero[0] = True
        keep = torch.where(drop.view(-1, 1, t, 1), only_zero.view(1, 1, 1, t + 1), keep)
    return keep


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


class TwoTowerLCM(CausalSentenceModel):
    """Contextualizer + denoiser (module docstring); ``cfg.diffusion`` defines the noise process."""

    def __init__(self, cfg: LCMSection) -> None:
        super().__init__(cfg)
        from conceptlm.lcm.diffusion.schedule import build_schedule

        d, dim = cfg.d_model, cfg.dim
        self._build_causal_tower("contextualizer")
        self.pre_denoiser = nn.Linear(dim, d)
        self.time_embed = TimestepEmbedder(d, FREQ_DIM)
        self.denoiser = nn.ModuleList(DenoiserBlock(cfg) for _ in range(cfg.n_denoiser_layers))
        self.denoiser_norm = RMSNorm(d, 1e-5)
        self.post_denoiser = nn.Linear(d, dim)
        self._init_denoiser()
        self.schedule = build_schedule(cfg.diffusion)

    def _init_denoiser(self) -> None:
        """Reference init: N(0, 0.02) weights and zero biases in the timestep MLP and the denoiser's linear maps,
        zero AdaLN modulation (every block starts as the identity)."""
        for m in [*self.time_embed.modules(), *self.denoiser.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for block in self.denoiser:
            block.modulation.reset_parameters()

    # ----------------------------------------------------------------------------------------- towers
    def contextualize(self, z: torch.Tensor, *, positions: torch.Tensor | None = None,
                      key_padding_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Normalized sentences ``z`` ``(B, T, D)`` -> contextualizer outputs ``C`` ``(B, T, d)`` (causal; with a
        ``cache`` only the new positions are run)."""
        return self._run_causal_tower(z, positions=positions, key_padding_mask=key_padding_mask, cache=cache)

    def memory_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per denoiser block, the projected keys/values of ``[0; C]``: ``(B, H, T + 1, hd)`` each."""
        keys = torch.cat([torch.zeros_like(context[:, :1]), context], dim=1)
        return [block.cross_attn.project_memory(keys) for block in self.denoiser]

    def modulations(self, t: torch.Tensor) -> list[list[Modulation]]:
        """Timesteps ``t`` long ``(...)`` -> per block, three :class:`Modulation` triples of shape ``t.shape + (d,)``
        (computed once per distinct timestep and gathered)."""
        flat = t.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        e = self.time_embed(uniq)  # (U, d)
        out = []
        for block in self.denoiser:
            mods = block.modulation(e)  # each (U, 1, d)
            out.append([Modulation(*(m.squeeze(1)[inverse].reshape(*t.shape, -1) for m in mod)) for mod in mods])
        return out

    def denoise(self, x_t: torch.Tensor, mods: list[list[Modulation]],
                memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, *,
                memory_mask: torch.Tensor | None = None, memory_attn_mask: torch.Tensor | None = None,
                n_cond: int | None = None) -> torch.Tensor:
        """Noisy latents ``x_t`` ``(N, T, D)`` -> the denoiser's prediction ``(N, T, D)`` (keywords as
        :meth:`DenoiserBlock.forward`; ``mods`` from :meth:`modulations`)."""
        h = self.pre_denoiser(x_t)
        for i, block in enumerate(self.denoiser):
            h = block(h, mods[i], memory_kv[i] if memory_kv is not None else None, memory_mask=memory_mask,
                      memory_attn_mask=memory_attn_mask, n_cond=n_cond)
        return self.post_denoiser(self.denoiser_norm(h))

    def forward_normalized(self, z: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                           drop: torch.Tensor | None = None) -> torch.Tensor:
        """Training pass: clean ``z`` ``(B, T, D)`` (right-padded), noisy ``x_t`` ``(B, T, D)``, timesteps ``t``
        long ``(B, T)``, CFG-dropped rows ``drop`` bool ``(B, T)`` -> prediction ``(B, T, D)``."""
        context = self.contextualize(z)
        keep = cross_attention_keep(z.shape[1], drop, device=z.device)
        return self.denoise(x_t, self.modulations(t), self.memory_kv(context),
                            memory_attn_mask=_additive(keep, x_t.dtype))

    def predictor(self, options) -> TwoTowerPredictor:
        """The generation side (:class:`TwoTowerPredictor`) for :func:`conceptlm.lcm.generate.generate`."""
        return TwoTowerPredictor(self, options)


# ------------------------------------------------------------------------------------------------ sampling
def _sampler(model: TwoTowerLCM, options: SamplerOptions):
    from conceptlm.lcm.diffusion.ddim import DDIMSampler

    return DDIMSampler(model.schedule, options, prediction=model.cfg.diffusion.prediction)


def _step_modulations(model: TwoTowerLCM, timesteps: torch.Tensor) -> list[list[list[Modulation]]]:
    """Per sampler step, per block, the three modulation triples ``(1, 1, d)``."""
    table = model.modulations(timesteps.view(-1, 1))  # per block: triples of (S', 1, d)
    return [[[Modulation(*(x[i:i + 1] for x in mod)) for mod in block] for block in table]
            for i in range(len(timesteps))]


class TwoTowerPredictor:
    """:class:`~conceptlm.lcm.generate.NextSentencePredictor` of a :class:`TwoTowerLCM` (module docstring).

    Per document and generated sentence, the initial latent and any DDIM noise come from
    ``row_generator("lcm-diffusion", seed, row, step)``; the emitted sentence is the sampler's last ``x0``.
    """

    def __init__(self, model: TwoTowerLCM, options) -> None:
        self.model, self.o = model, options
        self.sampler = _sampler(model, options.diffusion)
        self.cached = options.use_cache
        self.ctx_cache = KVCache() if self.cached else None
        self.seq = None
        self.context: torch.Tensor | None = None  # (A, S, d), cached mode
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # cached mode, per block (A, H, S + 1, hd)
        self.step_mods = _step_modulations(model, self.sampler.timesteps.to(model.center.device)) \
            if self.cached else None

    # -- protocol
    def start(self, z, keep, positions, rows):
        from conceptlm.lcm.generate import SequenceState

        self.seq = SequenceState(z, keep, positions)
        if self.cached:
            self.context = self.model.contextualize(z, positions=positions, key_padding_mask=keep,
                                                    cache=self.ctx_cache)
            self.kv = self.model.memory_kv(self.context)
        return self._sample(rows, 0)

    def step(self, z_new, rows, step):
        s = self.seq
        s.append(z_new)
        if self.cached:
            c = self.model.contextualize(z_new.unsqueeze(1), positions=s.positions[:, -1:], key_padding_mask=s.keep,
                                         cache=self.ctx_cache)
            self.context = torch.cat([self.context, c], dim=1)
            self.kv = [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2))
                       for (k, v), (nk, nv) in zip(self.kv, (b.cross_attn.project_memory(c)
                                                            for b in self.model.denoiser))]
        return self._sample(rows, step)

    def select(self, index):
        self.seq.select(index)
        if self.cached:
            self.ctx_cache.reorder(index)
            self.context = self.context[index]
            self.kv = [(k[index], v[index]) for k, v in self.kv]

    # -- one sentence per running document
    def _initial(self, rows: list[int], step: int, dim: int, device) -> tuple[torch.Tensor, list[torch.Generator]]:
        from conceptlm.lcm.generate import row_generator

        gens = [row_generator("lcm-diffusion", self.o.seed, r, step) for r in rows]
        noise = torch.stack([torch.randn(dim, generator=g) for g in gens]).to(device)
        return self.sampler.initial_latent(noise), gens  # (A, D)

    def _sample(self, rows: list[int], step: int) -> torch.Tensor:
        m, s = self.model, self.seq
        a, dim = len(rows), m.cfg.dim
        x, gens = self._initial(rows, step, dim, s.z.device)
        guided = self.sampler.guided
        mem_keep = torch.cat([torch.ones_like(s.keep[:, :1]), s.keep], dim=1)  # (A, S + 1): zero key + context
        kv = self.kv  # None without the cache: the context and its keys/values are recomputed at every step

        def denoise(i: int, x_in: torch.Tensor, t: torch.Tensor):
            x_in = x_in.unsqueeze(1)  # (A, 1, D)
            if self.cached:
                mods = self.step_mods[i]
                batch = torch.cat([x_in, x_in], dim=0) if guided else x_in
                pred = m.denoise(batch, mods, kv, memory_mask=mem_keep, n_cond=a)
            else:
                context = m.contextualize(s.z, positions=s.positions, key_padding_mask=s.keep)
                mem = m.memory_kv(context)
                mods = m.modulations(t.view(1, 1))
                pred = m.denoise(x_in, mods, mem, memory_mask=mem_keep)
                if guided:  # the unconditional branch with a real cross-attention over the zero key only
                    only_zero = torch.zeros_like(mem_keep)
                    only_zero[:, 0] = True
                    pred = torch.cat([pred, m.denoise(x_in, mods, mem, memory_mask=only_zero)], dim=0)
            pred = pred[:, 0]
            return (pred[:a], pred[a:]) if guided else (pred, None)

        x0 = x
        for i, t in enumerate(self.sampler.timesteps.tolist()):
            pc, pu = denoise(i, x, torch.tensor(t, device=x.device))
            noise = None
            if self.o.diffusion.eta > 0:
                noise = torch.stack([torch.randn(dim, generator=g) for g in gens]).to(x)
            x, x0 = self.sampler.step(i, x, pc, pu, noise=noise)
        return x0


# ------------------------------------------------------------------------------------------------ training
def draw_training_noise(cfg: LCMSection, step_rng, ids: torch.Tensor, t_len: int, device) -> dict[str, torch.Tensor]:
    """Per-example draws of one training step, sliced to the batch's ``T`` sentences: ``t`` long ``(B, T)``,
    ``noise`` ``(B, T, D)``, ``drop`` bool ``(B, T)``. Drawn at ``cfg.max_sentences`` length from generators keyed by
    ``(step, example id)`` (``step_rng``), or from a fixed generator keyed by the ids when there is none."""
    from conceptlm.lcm.diffusion.weighting import sample_timesteps

    d = cfg.diffusion
    n = cfg.max_sentences

    def timesteps(*shape, generator, dtype):
        return sample_timesteps(shape, d.num_train_steps, generator, kind=d.step_sampling)

    if step_rng is not None:
        t = step_rng.per_example("lcm-diffusion-t", ids, (n,), sampler=timesteps, dtype=torch.long)
        noise = step_rng.per_example("lcm-diffusion-noise", ids, (n, cfg.dim))
        u = step_rng.per_example("lcm-diffusion-cfg", ids, (n,), sampler=torch.rand)
    else:
        gens = [(derived_generator("lcm-diffusion", 0, "t", int(i)), derived_generator("lcm-diffusion", 0, "e", int(i)),
                 derived_generator("lcm-diffusion", 0, "c", int(i))) for i in ids.tolist()]
        t = torch.stack([timesteps(n, generator=g[0], dtype=torch.long) for g in gens])
        noise = torch.stack([torch.randn(n, cfg.dim, generator=g[1]) for g in gens])
        u = torch.stack([torch.rand(n, generator=g[2]) for g in gens])
    return {"t": t[:, :t_len].to(device), "noise": noise[:, :t_len].to(device),
            "drop": (u[:, :t_len] < d.cfg_dropout).to(device)}


class TwoTowerUnit(TeacherForcedEval, TrainUnit):
    """The Two-Tower diffusion LCM as a :class:`~conceptlm.core.unit.TrainUnit`.

    Loss part ``mse``: ``sum over loss positions of w_t * ||x0^ - z||^2`` in normalized space (``x0^`` converted
    from the denoiser's output when ``lcm.diffusion.prediction`` is not ``x0``; ``w_t`` from
    ``lcm.diffusion.weighting``), loss positions = ``batch["loss_mask"]`` if present (instruction data), else every
    real sentence including the first (predicted unconditionally). Eval metrics: :data:`TEACHER_FORCED_METRICS`,
    each position sampled by DDIM from its ground-truth context (``self.eval_sampler``: the paper's settings, at
    most as many steps as the schedule has; ``conceptlm lcm evaluate`` uses ``generate.diffusion``; fixed noise, so
    evaluations are comparable).
    """

    def __init__(self, cfg: LCMSection, *, round_trip=None, model: TwoTowerLCM | None = None):
        super().__init__()
        self.cfg = cfg
        self.loss_weights = {"mse": 1.0}
        self.model = model if model is not None else TwoTowerLCM(cfg)
        self.round_trip = round_trip
        self.eval_sampler = SamplerOptions(inference_steps=min(40, cfg.diffusion.num_train_steps))

    @staticmethod
    def loss_positions(batch: dict) -> torch.Tensor:
        return batch.get("loss_mask", batch["mask"])

    def counts(self, batch: dict) -> dict:
        return {"mse": self.loss_positions(batch).sum(), THROUGHPUT_KEY: batch["mask"].sum()}

    def forward(self, batch: dict) -> dict:
        from conceptlm.lcm.diffusion.weighting import loss_weights

        m, d = self.model, self.cfg.diffusion
        z = m.normalize(batch["vectors"])
        r = draw_training_noise(self.cfg, self.step_rng, batch["ids"], z.shape[1], z.device)
        x_t = m.schedule.add_noise(z, r["noise"].to(z.dtype), r["t"])
        pred = m.forward_normalized(z, x_t, r["t"], drop=r["drop"])
        x0 = m.schedule.x0_from_prediction(x_t, pred, r["t"], d.prediction) if d.prediction != "x0" else pred
        valid = self.loss_positions(batch)
        w = loss_weights(m.schedule, r["t"], valid, kind=d.weighting, min_snr=d.min_snr, max_snr=d.max_snr)
        se = ((x0.float() - z.float()) ** 2).sum(-1) * w
        return {"mse": se[valid].sum()}

    @torch.no_grad()
    def teacher_forced(self, batch: dict, options: SamplerOptions | None = None) -> torch.Tensor:
        """Normalized predictions ``(B, T, D)`` of every sentence from its ground-truth previous sentences."""
        m = self.model
        options = options or self.eval_sampler
        sampler = _sampler(m, options)
        z = m.normalize(batch["vectors"])
        b, t, dim = z.shape
        kv = m.memory_kv(m.contextualize(z))
        keep = cross_attention_keep(t, None, device=z.device)
        cond_mask = _additive(keep, z.dtype)
        only_zero = _additive(cross_attention_keep(t, torch.ones(1, t, dtype=torch.bool, device=z.device)), z.dtype)
        noise = teacher_forced_noise(self.step_rng, EVAL_PURPOSE, batch["ids"], max_sentences=self.cfg.max_sentences,
                                     dim=self.cfg.dim, n_sentences=t, n_steps=len(sampler.timesteps), eta=options.eta,
                                     device=z.device).to(z)
        x = sampler.initial_latent(noise[:, 0])
        x0 = x
        for i, ts in enumerate(sampler.timesteps.tolist()):
            mods = m.modulations(torch.full((1, 1), ts, dtype=torch.long, device=z.device))
            pc = m.denoise(x, mods, kv, memory_attn_mask=cond_mask)
            pu = m.denoise(x, mods, kv, memory_attn_mask=only_zero) if sampler.guided else None
            x, x0 = sampler.step(i, x, pc, pu, noise=noise[:, i + 1] if options.eta > 0 else None)
        return x0
