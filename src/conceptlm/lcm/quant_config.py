"""``lcm.quant``: the residual vector quantizer and the Quantized LCM's targets (paper §2.3.5, spec §7)."""

from __future__ import annotations

from dataclasses import dataclass

from conceptlm.core.config import check

__all__ = ["QuantSection", "QuantSamplingOptions"]


@dataclass(kw_only=True)
class QuantSection:
    """Residual vector quantization of the (normalized) concept space and Quant-LCM training (``lcm.quant``).

    The paper quantizes SONAR with 64 codebooks of 8192 units; a CPU-sized concept space needs far fewer.
    """

    n_codebooks: int = 8
    codebook_size: int = 256
    fit_samples: int = 50_000
    """At most this many training sentence vectors fit the codebooks."""
    fit_iters: int = 20
    """k-means iterations per codebook."""
    cfg_dropout: float = 0.15
    """Probability that a target is trained without its left context (for classifier-free guidance)."""

    def validate(self) -> None:
        check(self.n_codebooks >= 1, "lcm.quant.n_codebooks", "must be >= 1")
        check(self.codebook_size >= 2, "lcm.quant.codebook_size", "must be >= 2")
        check(self.fit_samples >= self.codebook_size, "lcm.quant.fit_samples", "must be >= codebook_size")
        check(self.fit_iters >= 1, "lcm.quant.fit_iters", "must be >= 1")
        check(0.0 <= self.cfg_dropout < 1.0, "lcm.quant.cfg_dropout", "must be in [0, 1)")


@dataclass(kw_only=True)
class QuantSamplingOptions:
    """How a Quant-LCM picks each residual unit during generation (``generate.quant``; paper §2.3.5).

    Defaults are the paper's multi-sentence settings for Quant-LCM-D (temperature 1, top-k 3, guidance 1); for
    Quant-LCM-C the paper uses temperature 0.005, top-k 5, guidance 1.5.
    """

    temperature: float = 1.0
    """Quant-D: softmax temperature of the unit logits; Quant-C: the temperature of
    ``p(c | r) ~ exp(-||c - r||^2 / temperature)`` over the codebook (0 = the argmax / nearest centroid)."""
    top_k: int = 3
    """Sample among the k most likely units (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling over the remaining units (1 = off)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance on the logits (Quant-D) or on the predicted vector (Quant-C); 1 = off."""

    def validate(self) -> None:
        check(self.temperature >= 0, "generate.quant.temperature", "must be >= 0")
        check(self.top_k >= 0, "generate.quant.top_k", "must be >= 0")
        check(0 < self.top_p <= 1, "generate.quant.top_p", "must be in (0, 1]")
        check(self.guidance_scale >= 0, "generate.quant.guidance_scale", "must be >= 0")
