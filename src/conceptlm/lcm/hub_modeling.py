"""Every Large Concept Model variant as a Hugging Face ``transformers`` model, with no dependency on conceptlm.

This file is copied verbatim into every LCM Hub-format export (as ``modeling_lcm.py``, named by the folder's
``config.json`` ``auto_map``), so the folder loads anywhere ``torch`` and ``transformers`` are installed::

    from transformers import AutoModel
    model = AutoModel.from_pretrained("exported/", trust_remote_code=True)   # eval mode
    z = model.normalize(x)                       # raw sentence embeddings (B, T, D) -> the model's space
    y = model(z).prediction                      # Base-LCM: y[:, t] predicts z[:, t + 1]
    x_next = model.denormalize(y[:, -1])         # the next sentence embedding, raw; or model.predict_next(x)

Inputs and outputs of ``forward`` are in the model's normalized space (``normalize`` / ``denormalize`` are the
fitted normalizer, stored as the buffers ``center`` / ``scale`` / ``clip_min`` / ``clip_max``). Per variant
(``config.variant``), with ``embeddings`` the clean normalized sentences ``(B, T, D)``:

* ``base`` -- ``model(embeddings)``: next-sentence predictions ``(B, T, D)`` (causal);
* ``two_tower`` -- ``model(embeddings, noisy=x_t, timesteps=t, drop=None)``: the denoiser's prediction for every
  sentence ``n`` from its noisy latent ``x_t[:, n]`` at integer step ``t[:, n]`` given the clean sentences before
  it (what ``lcm.diffusion.prediction`` names; the paper: x0); ``drop`` (bool ``(B, T)``) makes a row unconditional;
* ``one_tower`` -- the same arguments, plus ``attention_mask`` (bool ``(B, T)``, real sentences);
* ``quant_d`` / ``quant_c`` -- ``model(embeddings, queries=partial_sums, stages=k - 1)``: logits over the units of
  codebook ``k`` (D) or the regressed sentence (C) per sentence; the codebooks are ``model.codebooks`` ``(K, C, D)``.

It is the inference forward of conceptlm's models (``conceptlm.lcm.variants``) written out with the same operations
in the same order and the same parameter names, so ``model.safetensors`` is their state dict and the outputs are
identical (``tests/lcm/test_hub.py`` checks every variant). Left out: training (losses, dropout: the model is for
inference), the noise schedule and samplers (DDIM, classifier-free guidance, coarse-to-fine decoding; their settings
are in ``config.json`` under ``lcm``), KV caches and the stopping rules of generation; conceptlm reads the folder
back for those (``conceptlm lcm generate --checkpoint FOLDER``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

__all__ = ["LCMHubConfig", "LCMHubModel", "LCMOutput", "MODEL_TYPE"]

MODEL_TYPE = "conceptlm_lcm"
_EPS = 1e-5  # every norm of the LCMs
_FREQ_DIM = 256  # sinusoidal timestep features


class LCMHubConfig(PretrainedConfig):
    """The architecture: conceptlm's ``lcm`` section (``variant`` = its ``model``); the whole section, sub-sections
    included, is kept as ``lcm``."""

    model_type = MODEL_TYPE

    def __init__(self, variant: str = "base", dim: int = 384, d_model: int = 256, n_layers: int = 2,
                 n_denoiser_layers: int = 2, n_heads: int = 4, d_ff: int = 768, max_sentences: int = 128,
                 positions: str = "rope", rope_theta: float = 10000.0, scale_embeddings: bool = False,
                 n_codebooks: int = 8, codebook_size: int = 256, lcm: dict | None = None, **kwargs) -> None:
        self.variant, self.dim, self.d_model, self.n_layers = variant, dim, d_model, n_layers
        self.n_denoiser_layers, self.n_heads, self.d_ff, self.max_sentences = n_denoiser_layers, n_heads, d_ff, \
            max_sentences
        self.positions, self.rope_theta, self.scale_embeddings = positions, rope_theta, scale_embeddings
        self.n_codebooks, self.codebook_size, self.lcm = n_codebooks, codebook_size, dict(lcm or {})
        kwargs.setdefault("hidden_size", d_model)
        kwargs.setdefault("num_hidden_layers", n_layers)
        kwargs.setdefault("num_attention_heads", n_heads)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


@dataclass
class LCMOutput(ModelOutput):
    """``prediction``: ``(B, T, D)`` vectors in normalized space, or ``(B, T, C)`` logits (``quant_d``)."""

    prediction: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------ masks
def _mask(q_len: int, k_len: int, *, causal: bool, keep_keys: torch.Tensor | None, additive: torch.Tensor | None,
          dtype: torch.dtype, device) -> tuple[torch.Tensor | None, bool]:
    """``(additive bias or None, is_causal)`` for SDPA: causal (bottom-right) & key padding & an additive mask."""
    need_causal = causal and q_len > 1
    if keep_keys is None and additive is None:
        if not need_causal:
            return None, False
        if q_len == k_len:
            return None, True
    keep = None
    if need_causal:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len).view(1, 1, q_len, k_len)
    if keep_keys is not None:
        kpm = keep_keys.to(device=device, dtype=torch.bool)[:, None, None, :]
        keep = kpm if keep is None else keep & kpm
    neg = torch.finfo(dtype).min
    if additive is not None:
        bias = additive.to(device=device, dtype=dtype).clamp(min=neg)
        if keep is not None:
            bias = torch.where(keep, bias, torch.tensor(neg, dtype=dtype, device=device))
        return bias, False
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, neg), False


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                      torch.finfo(dtype).min)


def _interleave(queries: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    b, n = queries.shape[:2]
    return torch.stack([queries, clean], dim=2).reshape(b, 2 * n, *queries.shape[2:])


def _interleaved_mask(n: int, drop: torch.Tensor | None, keep: torch.Tensor | None, device) -> torch.Tensor:
    """Bool ``(B|1, 1, 2N, 2N)``: query copy 2n sees the clean copies of earlier sentences and itself, clean copy
    2n+1 the clean copies up to its own; a dropped query sees only itself; padded sentences are never seen."""
    idx = torch.arange(2 * n, device=device)
    sent, is_clean = idx // 2, (idx % 2) == 1
    q_sent, k_sent = sent.unsqueeze(1), sent.unsqueeze(0)
    q_clean, k_clean = is_clean.unsqueeze(1), is_clean.unsqueeze(0)
    allowed = k_clean & ((k_sent < q_sent) | (q_clean & (k_sent == q_sent)))
    allowed = allowed | torch.eye(2 * n, dtype=torch.bool, device=device)
    mask = allowed.view(1, 1, 2 * n, 2 * n)
    eye = torch.eye(2 * n, dtype=torch.bool, device=device).view(1, 1, 2 * n, 2 * n)
    if drop is not None:
        query_rows = (~is_clean).view(1, 2 * n) & drop.repeat_interleave(2, dim=1)
        mask = torch.where(query_rows.view(-1, 1, 2 * n, 1), eye, mask)
    if keep is not None:
        mask = (mask & keep.repeat_interleave(2, dim=1).view(-1, 1, 1, 2 * n)) | eye
    return mask


# ------------------------------------------------------------------------------------------------ blocks
class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _EPS)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(nn.Module):
    """q/k/v/o projections with biases (keys and values from ``d_kv`` inputs)."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v, bias, is_causal: bool) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=is_causal)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope, mask) -> torch.Tensor:
        q, k, v = self.heads(self.q_proj, x), self.heads(self.k_proj, x), self.heads(self.v_proj, x)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return self.attend(q, k, v, *mask)


class _SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, d_ff), nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, c: LCMHubConfig) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = _RMSNorm(c.d_model), _RMSNorm(c.d_model)
        self.attn = _Attention(c.d_model, c.n_heads)
        self.mlp = _SwiGLU(c.d_model, c.d_ff)

    def forward(self, h: torch.Tensor, rope, mask) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), rope, mask)
        return h + self.mlp(self.mlp_norm(h))


class _Decoder(nn.Module):
    """Pre-norm blocks (RoPE on sentence positions when ``positions == "rope"``) and a final RMSNorm."""

    def __init__(self, c: LCMHubConfig, causal: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.n_layers))
        self.norm = _RMSNorm(c.d_model)
        self.causal, self.rope, self.theta = causal, c.positions == "rope", c.rope_theta
        self.head_dim = c.d_model // c.n_heads

    def forward(self, h: torch.Tensor, positions: torch.Tensor, *, keep_keys: torch.Tensor | None = None,
                additive: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.layers) == 0:
            return h
        rope = None
        if self.rope:  # (computed here, not a buffer: from_pretrained leaves non-persistent buffers unset)
            d = self.head_dim
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            rope = (emb.cos().to(h.dtype), emb.sin().to(h.dtype))
        t = h.shape[1]
        mask = _mask(t, t, causal=self.causal, keep_keys=keep_keys, additive=additive, dtype=h.dtype,
                     device=h.device)
        for layer in self.layers:
            h = layer(h, rope, mask)
        return self.norm(h)


class _TimestepEmbedder(nn.Module):
    """Sinusoidal features of the integer step (cos first) -> Linear-SiLU-Linear."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = _FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.to(torch.float32).unsqueeze(-1) * freqs
        emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class _Modulation(nn.Module):
    """AdaLN: SiLU -> Linear(d, 9 d) -> three (shift, scale, gate) triples."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 9 * d)

    def forward(self, cond: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        chunks = self.proj(F.silu(cond.unsqueeze(1))).chunk(9, dim=-1)
        return [chunks[3 * i:3 * i + 3] for i in range(3)]


class _DenoiserBlock(nn.Module):
    """Two-Tower denoiser block: identity self-attention (``o_proj(v_proj(u))``), cross-attention to ``[0; C]``,
    SwiGLU, each AdaLN-modulated by the timestep."""

    def __init__(self, c: LCMHubConfig) -> None:
        super().__init__()
        d = c.d_model
        self.attn_norm, self.cross_norm, self.mlp_norm = _RMSNorm(d), _RMSNorm(d), _RMSNorm(d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.cross_attn = _Attention(d, c.n_heads)
        self.mlp = _SwiGLU(d, c.d_ff)
        self.modulation = _Modulation(d)

    def forward(self, h: torch.Tensor, mods, memory_kv, bias: torch.Tensor) -> torch.Tensor:
        (s0, c0, g0), (s1, c1, g1), (s2, c2, g2) = mods
        h = h + g0 * self.o_proj(self.v_proj(self.attn_norm(h) * (1 + c0) + s0))
        u = self.cross_norm(h) * (1 + c1) + s1
        q = self.cross_attn.heads(self.cross_attn.q_proj, u)
        mask = _mask(u.shape[1], memory_kv[0].shape[2], causal=False, keep_keys=None, additive=bias, dtype=q.dtype,
                     device=q.device)
        h = h + g1 * self.cross_attn.attend(q, *memory_kv, *mask)
        return h + g2 * self.mlp(self.mlp_norm(h) * (1 + c2) + s2)


# ------------------------------------------------------------------------------------------------ the model
class LCMHubModel(PreTrainedModel):
    """A Large Concept Model of any variant (module docstring); ``normalize`` / ``denormalize`` are its normalizer."""

    config_class = LCMHubConfig
    base_model_prefix = "lcm"
    main_input_name = "embeddings"
    _no_split_modules = ["_Block", "_DenoiserBlock"]

    def __init__(self, config: LCMHubConfig) -> None:
        super().__init__(config)
        c = config
        d, dim = c.d_model, c.dim
        for name, value in (("center", 0.0), ("scale", 1.0), ("clip_min", -math.inf), ("clip_max", math.inf)):
            self.register_buffer(name, torch.full((dim,), value))
        one_tower, quant = c.variant == "one_tower", c.variant in ("quant_d", "quant_c")
        self.position = nn.Embedding(c.max_sentences, d) if c.positions == "learned" else None
        if c.variant not in ("base", "two_tower", "one_tower", "quant_d", "quant_c"):
            raise ValueError(f"unknown LCM variant {c.variant!r}")
        if one_tower:
            self.time_embed = _TimestepEmbedder(d)
        self.prenet = nn.Linear(dim + d if one_tower else dim, d)
        if quant:
            self.quantizer = nn.Module()
            self.quantizer.register_buffer("codebooks", torch.zeros(c.n_codebooks, c.codebook_size, dim))
            self.quantizer.register_buffer("fitted", torch.tensor(False))
            self.index_embedding = nn.Embedding(c.n_codebooks + 1, d)
            self.head = nn.Linear(d, c.codebook_size if c.variant == "quant_d" else dim)
        tower = _Decoder(c, causal=not one_tower)
        if c.variant == "two_tower":
            self.contextualizer = tower
            self.pre_denoiser = nn.Linear(dim, d)
            self.time_embed = _TimestepEmbedder(d)
            self.denoiser = nn.ModuleList(_DenoiserBlock(c) for _ in range(c.n_denoiser_layers))
            self.denoiser_norm = _RMSNorm(d)
            self.post_denoiser = nn.Linear(d, dim)
        else:
            self.decoder = tower
        if not quant and c.variant != "two_tower":
            self.postnet = nn.Linear(d, dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # weights always come from model.safetensors
        return

    @property
    def codebooks(self) -> torch.Tensor:
        """Quant-LCM: the residual codebooks ``(K, C, D)`` (normalized space)."""
        return self.quantizer.codebooks

    # ----------------------------------------------------------------------------------------- normalizer
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw sentence embeddings ``(..., D)`` -> the model's normalized space."""
        z = (x - self.center) / self.scale
        return torch.maximum(torch.minimum(z, self.clip_max), self.clip_min)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized ``(..., D)`` -> raw embeddings (clamped to the clip bounds first)."""
        z = torch.maximum(torch.minimum(z, self.clip_max), self.clip_min)
        return z * self.scale + self.center

    # ----------------------------------------------------------------------------------------- pieces
    def _positions(self, z: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        b, t = z.shape[:2]
        return positions if positions is not None else torch.arange(t, device=z.device).unsqueeze(0).expand(b, t)

    def _add_position(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.position is None:
            return h
        if int(positions.max()) >= self.config.max_sentences:
            raise ValueError(f"sentence position {int(positions.max())} >= max_sentences={self.config.max_sentences}")
        return h + self.position(positions).to(h.dtype)

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        return h * math.sqrt(self.config.d_model) if self.config.scale_embeddings else h

    def _causal_tower(self, tower: _Decoder, z, positions, keep) -> torch.Tensor:
        pos = self._positions(z, positions)
        return tower(self._add_position(self._scaled(self.prenet(z)), pos), pos, keep_keys=keep)

    def _two_tower(self, z, noisy, t, drop) -> torch.Tensor:
        context = self._causal_tower(self.contextualizer, z, None, None)
        n = z.shape[1]
        keep = torch.ones(n, n + 1, dtype=torch.bool, device=z.device).tril().view(1, 1, n, n + 1)
        if drop is not None:  # a dropped row sees only the zero key
            only_zero = torch.zeros(n + 1, dtype=torch.bool, device=drop.device)
            only_zero[0] = True
            keep = torch.where(drop.view(-1, 1, n, 1), only_zero.view(1, 1, 1, n + 1), keep)
        bias = _additive(keep, noisy.dtype)
        keys = torch.cat([torch.zeros_like(context[:, :1]), context], dim=1)
        uniq, inverse = torch.unique(t.reshape(-1), return_inverse=True)  # each distinct step embedded once
        e = self.time_embed(uniq)
        h = self.pre_denoiser(noisy)
        for block in self.denoiser:
            mods = [tuple(m.squeeze(1)[inverse].reshape(*t.shape, -1) for m in mod) for mod in block.modulation(e)]
            kv = (block.cross_attn.heads(block.cross_attn.k_proj, keys), block.cross_attn.heads(block.cross_attn.v_proj,
                                                                                                 keys))
            h = block(h, mods, kv, bias)
        return self.post_denoiser(self.denoiser_norm(h))

    def _one_tower(self, z, noisy, t, keep, drop, positions) -> torch.Tensor:
        b, n, _ = noisy.shape
        pos = self._positions(noisy, positions).repeat_interleave(2, dim=1)
        u = _interleave(noisy, z.to(noisy.dtype))
        ts = _interleave(t.long(), torch.zeros_like(t, dtype=torch.long))
        e = self.time_embed(ts).to(u.dtype)
        h = self._add_position(self._scaled(self.prenet(torch.cat([u, e.expand(*u.shape[:-1], e.shape[-1])], -1))),
                               pos)
        allowed = _interleaved_mask(n, drop, keep, noisy.device)
        return self.postnet(self.decoder(h, pos, additive=_additive(allowed, h.dtype)))[:, 0::2]

    def _embed_quant(self, v: torch.Tensor, index) -> torch.Tensor:
        h = self._scaled(self.prenet(v))
        if isinstance(index, int):
            return h + self.index_embedding.weight[index].to(h.dtype)
        return h + self.index_embedding(index).to(h.dtype)

    def _quant(self, z, queries, stages, keep, drop, positions) -> torch.Tensor:
        n = z.shape[1]
        h = _interleave(self._embed_quant(queries, stages), self._embed_quant(z, self.config.n_codebooks))
        pos = self._positions(z, positions).repeat_interleave(2, dim=1)
        h = self._add_position(h, pos)
        allowed = _interleaved_mask(n, drop, keep, z.device)
        neg = torch.finfo(h.dtype).min
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, neg)
        return self.head(self.decoder(h, pos, additive=bias)[:, 0::2])

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, embeddings: torch.Tensor, noisy: torch.Tensor | None = None,
                timesteps: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                stages: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> LCMOutput:
        """All tensors in normalized space; ``attention_mask``: bool ``(B, T)`` real sentences (``base``: over all
        keys, left padding; ``one_tower`` / quant: any padding); ``positions``: long ``(B, T)`` sentence positions
        (default ``0..T-1``). See the module docstring for each variant's arguments."""
        v = self.config.variant
        if v == "base":
            pred = self.postnet(self._causal_tower(self.decoder, embeddings, positions, attention_mask))
        elif v == "two_tower":
            pred = self._two_tower(embeddings, self._need(noisy, "noisy"), self._need(timesteps, "timesteps"), drop)
        elif v == "one_tower":
            pred = self._one_tower(embeddings, self._need(noisy, "noisy"), self._need(timesteps, "timesteps"),
                                   attention_mask, drop, positions)
        else:
            pred = self._quant(embeddings, self._need(queries, "queries"), self._need(stages, "stages"),
                               attention_mask, drop, positions)
        return LCMOutput(prediction=pred)

    def _need(self, value, name: str):
        if value is None:
            raise ValueError(f"a {self.config.variant} LCM needs `{name}`")
        return value

    @torch.no_grad()
    def predict_next(self, x: torch.Tensor) -> torch.Tensor:
        """Base-LCM: raw sentence embeddings ``(B, T, D)`` -> the raw embedding of sentence ``T + 1`` ``(B, D)``."""
        if self.config.variant != "base":
            raise ValueError("predict_next is the Base-LCM's regression; diffusion and quantized LCMs sample")
        return self.denormalize(self(self.normalize(x)).prediction[:, -1])


LCMHubConfig.register_for_auto_class()
LCMHubModel.register_for_auto_class("AutoModel")
