"""``lcm.diffusion``: the noise process and training objective of the diffusion LCMs (One-Tower, Two-Tower).

Defaults are the reference's Two-Tower recipe (spec §4.2-4.3): 100 training steps, cosine schedule rescaled to
zero terminal SNR, x0-prediction, uniform timesteps, no loss weighting, classifier-free-guidance dropout 0.15.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from conceptlm.core.config import check

__all__ = ["DiffusionSection", "SamplerOptions"]


@dataclass(kw_only=True)
class DiffusionSection:
    """The diffusion process of a One-/Two-Tower LCM (section ``lcm.diffusion``)."""

    schedule: Literal["cosine", "quadratic", "linear", "sigmoid"] = "cosine"
    """Noise schedule: ``cosine`` (Nichol & Dhariwal, s = 0.008), ``quadratic`` (reference ``scaled_linear``:
    betas on a line in sqrt space from ``beta_start`` to ``beta_end``), ``linear`` (betas on a line) or ``sigmoid``
    (the paper's, log-SNR centred on ``sigmoid_shift`` with scale ``sigmoid_scale``)."""
    num_train_steps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sigmoid_scale: float = 1.5
    """Sigmoid schedule's gamma (reference ``sigmoid_schedule_alpha``)."""
    sigmoid_shift: float = 0.0
    """Sigmoid schedule's delta (reference ``sigmoid_schedule_beta``): the centre of the log-SNR distribution."""
    zero_terminal_snr: bool = True
    """Rescale the schedule so the last step is pure noise (Lin et al. 2024, Alg. 1)."""
    prediction: Literal["x0", "epsilon", "v"] = "x0"
    """What the denoiser predicts (the reference and the paper: ``x0``, reference name ``sample``)."""
    weighting: Literal["none", "clamp_snr"] = "none"
    """Per-position loss weight: none, or ``clamp(SNR_t, min_snr, max_snr)`` renormalised to sum to the number of
    targets of the batch (reference ``clamp_snr``)."""
    min_snr: float = 0.0
    max_snr: float = 5.0
    step_sampling: Literal["uniform", "beta"] = "uniform"
    """Training timesteps: uniform over ``0..T-1``, or with probabilities from a Beta(0.8, 1) density."""
    cfg_dropout: float = 0.15
    """Probability that a target row is trained unconditionally (its context dropped), drawn independently per
    document and row (the reference drops exactly ``floor((T-1) * p)`` rows, the same for every document; spec
    §10.2 item 6). 0 = no classifier-free guidance training."""

    def validate(self) -> None:
        check(self.num_train_steps >= 2, "lcm.diffusion.num_train_steps", "must be >= 2")
        check(0 < self.beta_start < 1 and 0 < self.beta_end < 1, "lcm.diffusion.beta_start",
              "beta_start and beta_end must be in (0, 1)")
        check(self.sigmoid_scale > 0, "lcm.diffusion.sigmoid_scale", "must be > 0")
        check(0 <= self.min_snr <= self.max_snr, "lcm.diffusion.min_snr", "need 0 <= min_snr <= max_snr")
        check(0.0 <= self.cfg_dropout < 1.0, "lcm.diffusion.cfg_dropout", "must be in [0, 1)")


@dataclass(kw_only=True)
class SamplerOptions:
    """How a diffusion LCM samples one sentence embedding (``generate.diffusion``; spec §4.4).

    Defaults are the paper's evaluation settings: 40 inference steps, guidance 3 with rescale 0.7, initial noise
    scale 0.6, epsilon scaling 1.00045, deterministic DDIM.
    """

    inference_steps: int = 40
    spacing: Literal["trailing", "leading", "linspace", "reference"] = "trailing"
    """Timestep spacing: ``trailing`` = ``round(T - k T / S) - 1`` (the paper's formula, diffusers' ``trailing``),
    ``leading``, ``linspace``, or ``reference`` = the released code's integer-stride list (S = 40 of T = 100 runs
    50 steps, spec §4.4 item 3)."""
    guidance_scale: float = 3.0
    """Classifier-free guidance ``g`` (1 = the conditional prediction only; the unconditional pass is skipped)."""
    guidance_rescale: float = 0.7
    """CFG rescale ``phi`` (Lin et al. 2024, Alg. 2); 0 = plain CFG."""
    initial_noise_scale: float = 0.6
    epsilon_scaling: float | None = 1.00045
    """Divide the noise direction by this after x0 is computed (Ning et al. 2023); null = off."""
    eta: float = 0.0
    """DDIM stochasticity (0 = deterministic)."""
    clip_noise: float = 100.0
    """Clip latents to +-clip_noise (the reference's default, effectively off)."""
    thresholding: bool = False
    """Dynamic thresholding of x0 (ratio ``threshold_ratio``, bound ``sample_max_value``)."""
    threshold_ratio: float = 0.995
    sample_max_value: float = 6.0

    def validate(self) -> None:
        check(self.inference_steps >= 1, "generate.diffusion.inference_steps", "must be >= 1")
        check(self.guidance_scale >= 0, "generate.diffusion.guidance_scale", "must be >= 0")
        check(0.0 <= self.guidance_rescale <= 1.0, "generate.diffusion.guidance_rescale", "must be in [0, 1]")
        check(self.initial_noise_scale > 0, "generate.diffusion.initial_noise_scale", "must be > 0")
        check(self.epsilon_scaling is None or self.epsilon_scaling > 0, "generate.diffusion.epsilon_scaling",
              "must be > 0 or null")
        check(self.eta >= 0, "generate.diffusion.eta", "must be >= 0")
        check(self.clip_noise > 0, "generate.diffusion.clip_noise", "must be > 0")
        check(0 < self.threshold_ratio <= 1 and self.sample_max_value >= 1, "generate.diffusion.threshold_ratio",
              "need 0 < threshold_ratio <= 1 and sample_max_value >= 1")
