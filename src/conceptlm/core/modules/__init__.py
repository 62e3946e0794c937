"""Shared transformer building blocks (torch only).

* :mod:`.norms` -- :class:`RMSNorm` (HF-Llama exact), :func:`build_norm`.
* :mod:`.rope` -- :class:`RotaryEmbedding` with explicit ``(B, T)`` positions.
* :mod:`.mlp` -- :class:`SwiGLU`, :class:`GeluMLP`.
* :mod:`.attention` -- :class:`KVCache`, :class:`SelfAttention`, :class:`CrossAttention` (SDPA).
* :mod:`.modulation` -- AdaLN-zero modulation and sinusoidal timestep embeddings.
* :mod:`.block` / :mod:`.decoder` -- :class:`DecoderBlock`, :class:`DecoderConfig`, :class:`Decoder`.
* :mod:`.hf_interop` -- load HF Llama weights into a :class:`Decoder`.
"""

from .attention import AttentionMask, CrossAttention, SelfAttention, build_attention_mask, sdpa
from .block import DecoderBlock
from .cache import KVCache
from .decoder import Decoder, DecoderConfig, positions_from_padding
from .hf_interop import decoder_config_from_hf_llama, hf_llama_key_map, load_hf_llama_weights
from .mlp import GeluMLP, SwiGLU, build_mlp
from .modulation import AdaLNModulation, Modulation, TimestepEmbedder, modulate, timestep_embedding
from .norms import RMSNorm, build_norm
from .rope import RotaryEmbedding, apply_rotary, rotate_half

__all__ = [
    "AdaLNModulation",
    "AttentionMask",
    "CrossAttention",
    "Decoder",
    "DecoderBlock",
    "DecoderConfig",
    "GeluMLP",
    "KVCache",
    "Modulation",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfAttention",
    "SwiGLU",
    "TimestepEmbedder",
    "apply_rotary",
    "build_attention_mask",
    "build_mlp",
    "build_norm",
    "decoder_config_from_hf_llama",
    "hf_llama_key_map",
    "load_hf_llama_weights",
    "modulate",
    "positions_from_padding",
    "rotate_half",
    "timestep_embedding",
    "sdpa",
]
