"""Copy weights between HF Llama models and :class:`~.decoder.Decoder`.

Works by duck typing on the HF objects (no ``transformers`` import), for
``LlamaModel`` or anything with a ``.model`` attribute holding one
(``LlamaForCausalLM``). Token embeddings and the LM head are not part of a
:class:`Decoder` and are skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from .decoder import Decoder, DecoderConfig

__all__ = ["decoder_config_from_hf_llama", "load_hf_llama_weights", "hf_llama_key_map"]

_SUBMODULE_MAP = {
    "self_attn.": "attn.",
    "mlp.": "mlp.",
    "input_layernorm.": "attn_norm.",
    "post_attention_layernorm.": "mlp_norm.",
}


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"only default RoPE is supported, got rope_type={rope_type!r}")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def decoder_config_from_hf_llama(hf_config: Any, **overrides: Any) -> DecoderConfig:
    """Build a :class:`DecoderConfig` matching an HF ``LlamaConfig`` (``overrides`` win)."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"expected hidden_act='silu', got {hf_config.hidden_act!r}")
    kwargs: dict[str, Any] = dict(
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None),
        d_ff=hf_config.intermediate_size,
        mlp="swiglu",
        norm="rms",
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        attn_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        causal=True,
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )
    kwargs.update(overrides)
    return DecoderConfig(**kwargs)


def hf_llama_key_map(hf_key: str) -> str | None:
    """HF Llama state-dict key -> :class:`Decoder` key (``None`` for keys a Decoder has no place for)."""
    if hf_key.startswith("model."):
        hf_key = hf_key[len("model."):]
    if hf_key == "norm.weight":
        return hf_key
    if not hf_key.startswith("layers."):
        return None  # embed_tokens, lm_head, rotary buffers
    _, i, rest = hf_key.split(".", 2)
    for src, dst in _SUBMODULE_MAP.items():
        if rest.startswith(src):
            return f"layers.{i}.{dst}{rest[len(src):]}"
    return None


@torch.no_grad()
def load_hf_llama_weights(decoder: Decoder, hf_model: Any, strict: bool = True) -> list[str]:
    """Copy the transformer weights of an HF Llama model into ``decoder`` in place.

    Args:
        decoder: a :class:`Decoder` with a matching architecture (see :func:`decoder_config_from_hf_llama`).
        hf_model: ``LlamaModel``, ``LlamaForCausalLM`` or a state dict of either.
        strict: raise if any decoder weight that HF Llama has (everything except
            cross-attention and AdaLN modules) is missing, or an HF block weight is unused.

    Returns:
        The decoder keys that were *not* loaded (cross-attention / modulation weights).
    """
    sd = hf_model if isinstance(hf_model, dict) else hf_model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for k, v in sd.items():
        dk = hf_llama_key_map(k)
        if dk is None:
            if ".layers." in f".{k}" and "rotary" not in k:
                unused.append(k)
            continue
        mapped[dk] = v
    result = decoder.load_state_dict(mapped, strict=False)
    missing = list(result.missing_keys)
    if strict:
        bad = [k for k in missing if ".cross_" not in k and ".modulation." not in k]
        problems = bad + list(result.unexpected_keys) + unused
        if problems:
            raise ValueError(f"HF Llama -> Decoder weight mismatch: {problems}")
    return missing
