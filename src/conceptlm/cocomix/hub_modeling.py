"""A CoCoMix student as a Hugging Face ``transformers`` model, with no dependency on conceptlm.

This file is copied verbatim into every Hub-format export (as ``modeling_cocomix.py``, named by the folder's
``config.json`` ``auto_map``), so the folder loads anywhere ``torch`` and ``transformers`` are installed::

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported/", trust_remote_code=True)
    logits = model(input_ids).logits          # the student's logits, concept path active

It is the inference forward of :class:`conceptlm.cocomix.model.StudentLM` (CoCoMix paper §2.2, Eq. 2-4) written
out with the same operations in the same order, so the same weights give bit-identical logits
(``tests/cocomix/test_hub.py`` checks it for every mixing mode and both block styles): the TopK SAE's layer norm of
the residual stream at the insert layer, the concept logits in the same row chunks, the top-K, the compression of
the kept logits (``embedding_bag``), and the mixing (``interleave`` / ``add`` / ``pause`` / ``none``). Parameter
names are ``StudentLM``'s, so ``model.safetensors`` is its state dict.

What it leaves out: the concept loss and its fused gradient (training only; this model has no backward through the
concept head's top-K indices, like the student at inference), steering, and a KV cache: generation recomputes the
whole sequence each step (``prepare_inputs_for_generation`` passes the full ids). Left padding
(``attention_mask`` with zeros) is supported: positions restart at each row's first real token and padded keys
are masked; rows without padding then match the unpadded forward to float precision (not bitwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

__all__ = ["CocomixStudentConfig", "CocomixForCausalLM", "MODEL_TYPE"]

MODEL_TYPE = "conceptlm_cocomix"
_SAE_LN_EPS = 1e-5
_CHUNK_ELEMENTS = 1 << 23  # as conceptlm.cocomix.model: concept logits formed per chunk of rows


class CocomixStudentConfig(PretrainedConfig):
    """The student's architecture: the fields of conceptlm's ``StudentSection`` (same names and meaning)."""

    model_type = MODEL_TYPE

    def __init__(self, style: str = "gpt2", vocab_size: int = 1024, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 4, d_ff: int = 512, max_len: int = 256, tie_embeddings: bool = True,
                 mix: str = "interleave", concept_head: bool = True, insert_layer: int = 1, n_concepts: int = 1024,
                 concept_k: int = 16, interleave_positions: str = "shared", concept_chunk: int = 0,
                 slot_positions: bool = False, **kwargs) -> None:
        self.style, self.vocab_size, self.d_model, self.n_layers, self.n_heads = style, vocab_size, d_model, n_layers, \
            n_heads
        self.d_ff, self.max_len, self.tie_embeddings, self.mix = d_ff, max_len, tie_embeddings, mix
        self.concept_head, self.insert_layer, self.n_concepts, self.concept_k = concept_head, insert_layer, \
            n_concepts, concept_k
        self.interleave_positions, self.concept_chunk, self.slot_positions = interleave_positions, concept_chunk, \
            slot_positions
        # the names generic code (lm-eval, generate) looks for
        kwargs.setdefault("hidden_size", d_model)
        kwargs.setdefault("num_hidden_layers", n_layers)
        kwargs.setdefault("num_attention_heads", n_heads)
        kwargs.setdefault("max_position_embeddings", max_len)
        kwargs.setdefault("tie_word_embeddings", False)  # the tie is StudentLM's own (no lm_head when tied)
        super().__init__(**kwargs)

    @property
    def doubled(self) -> bool:
        return self.mix in ("interleave", "pause")

    @property
    def compresses(self) -> bool:
        return self.mix in ("interleave", "add")


# ------------------------------------------------------------------------------------------------ blocks
class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class _Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, bias: bool) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)

    def _heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj, x), self._heads(self.k_proj, x), self._heads(self.v_proj, x)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        causal = bias is None and x.shape[1] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _GeluMLP(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, c: CocomixStudentConfig) -> None:
        super().__init__()
        gpt2 = c.style == "gpt2"
        norm = (lambda: nn.LayerNorm(c.d_model, eps=1e-5)) if gpt2 else (lambda: _RMSNorm(c.d_model, 1e-6))
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn = _Attention(c.d_model, c.n_heads, bias=gpt2)
        self.mlp = _GeluMLP(c.d_model, c.d_ff) if gpt2 else _SwiGLU(c.d_model, c.d_ff)

    def forward(self, h: torch.Tensor, rope, bias: torch.Tensor | None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), rope, bias)
        return h + self.mlp(self.mlp_norm(h))


class _Decoder(nn.Module):
    def __init__(self, c: CocomixStudentConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=1e-5) if c.style == "gpt2" else _RMSNorm(c.d_model, 1e-6)
        self.rope = c.style != "gpt2"
        self.head_dim = c.d_model // c.n_heads

    def forward(self, h: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | None, layers: slice
                ) -> torch.Tensor:
        rope = None
        if self.rope:  # (computed here, not a buffer: from_pretrained leaves non-persistent buffers unset)
            d = self.head_dim
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # on the CPU, as
            freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)  # conceptlm does
            emb = torch.cat((freqs, freqs), dim=-1)
            rope = (emb.cos().to(h.dtype), emb.sin().to(h.dtype))
        bias = None
        if keep is not None:  # (B, T) bool: causal & keep, as an additive mask
            t = h.shape[1]
            allowed = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()[None, None] & keep[:, None, None, :]
            bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(
                ~allowed, torch.finfo(h.dtype).min)
        for layer in self.layers[layers]:
            h = layer(h, rope, bias)
        return h


class _ConceptHead(nn.Module):
    def __init__(self, c: CocomixStudentConfig) -> None:
        super().__init__()
        self.k = c.concept_k if c.compresses else 1
        self.chunk, self.compresses = c.concept_chunk, c.compresses
        self.pre_bias = nn.Parameter(torch.zeros(c.d_model))
        self.predictor = nn.Linear(c.d_model, c.n_concepts)
        if c.compresses:
            self.compress = nn.Embedding(c.n_concepts, c.d_model)
            self.compress_bias = nn.Parameter(torch.zeros(c.d_model))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(indices (B, T, k), values (B, T, k), continuous concept (B, T, d) or None)``."""
        b, t, d = h.shape
        mu = h.mean(-1, keepdim=True)
        centred = h - mu
        sigma = centred.std(-1, keepdim=True, unbiased=True)
        x = (centred / (sigma + _SAE_LN_EPS) - self.pre_bias).reshape(b * t, d)
        weight, n = self.predictor.weight, b * t
        chunk = self.chunk or max(1, _CHUNK_ELEMENTS // weight.shape[0])
        val = torch.empty(n, self.k, dtype=torch.float32, device=h.device)
        idx = torch.empty(n, self.k, dtype=torch.long, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            val[s:e], idx[s:e] = F.linear(x[s:e], weight, self.predictor.bias).float().topk(self.k, dim=1)
        cont = None
        if self.compresses:
            comp = F.embedding_bag(idx, self.compress.weight, per_sample_weights=val.to(self.compress.weight.dtype),
                                   mode="sum").view(b, t, d)
            cont = (comp + self.compress_bias + self.pre_bias) * sigma + mu
        return idx.view(b, t, -1), val.view(b, t, -1), cont


# ------------------------------------------------------------------------------------------------ the model
class CocomixForCausalLM(PreTrainedModel, GenerationMixin):
    """The student: ``model(input_ids).logits`` ``(B, T, V)``, ``logits[:, t]`` predicting token ``t+1``.

    ``output_concepts=True`` also returns the kept concepts (``concept_indices`` / ``concept_values``,
    ``(B, T, K)``) of the concept head.
    """

    config_class = CocomixStudentConfig
    base_model_prefix = "cocomix"
    main_input_name = "input_ids"
    _no_split_modules = ["_Block"]
    _supports_cache_class = False

    def __init__(self, config: CocomixStudentConfig) -> None:
        super().__init__(config)
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_len, c.d_model) if c.style == "gpt2" else None
        self.decoder = _Decoder(c)
        self.head = _ConceptHead(c) if c.concept_head else None
        self.pause = nn.Parameter(torch.zeros(c.d_model)) if c.mix == "pause" else None
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # weights always come from model.safetensors
        return

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def _upper_positions(self, pos: torch.Tensor) -> torch.Tensor:
        if self.config.interleave_positions == "shared":
            return pos.repeat_interleave(2, dim=1)
        return (2 * pos.unsqueeze(-1) + torch.arange(2, device=pos.device)).flatten(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_concepts: bool = False, return_dict: bool | None = None, **kwargs) -> CausalLMOutput:
        c = self.config
        b, t = input_ids.shape
        if t > c.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_len={c.max_len}")
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.to(torch.bool)
            pos = (keep.long().cumsum(-1) - 1).clamp_min(0)
        else:
            pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(pos)
        split = c.insert_layer if (self.head is not None or c.doubled) else c.n_layers
        h = self.decoder(h, pos, keep, slice(0, split))
        idx = val = cont = None
        if self.head is not None:
            idx, val, cont = self.head(h)
        if c.mix == "add":
            h = h + cont
        if c.doubled:
            extra = cont if c.mix == "interleave" else self.pause.to(h.dtype).expand(b, t, -1)
            if c.slot_positions:
                extra = extra + self.pos_embed(pos).to(h.dtype)
            h = torch.stack((h, extra), dim=2).view(b, 2 * t, -1)
            upper_keep = keep.repeat_interleave(2, dim=1) if keep is not None else None
            h = self.decoder(h, self._upper_positions(pos), upper_keep, slice(split, None))
            h = h.view(b, t, 2, -1)[:, :, 1]
        else:
            h = self.decoder(h, pos, keep, slice(split, None))
        h = self.decoder.norm(h)
        logits = F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)
        out = CausalLMOutput(logits=logits)
        if output_concepts and idx is not None:
            out["concept_indices"], out["concept_values"] = idx, val
        return out

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """No KV cache: every generation step runs the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


CocomixStudentConfig.register_for_auto_class()
CocomixForCausalLM.register_for_auto_class("AutoModelForCausalLM")
