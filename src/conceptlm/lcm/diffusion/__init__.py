"""Diffusion for the LCMs: noise schedules, the DDIM sampler with classifier-free guidance, loss weighting."""

from conceptlm.lcm.config import DiffusionSection, SamplerOptions
from conceptlm.lcm.diffusion.cosine import cosine_betas
from conceptlm.lcm.diffusion.ddim import DDIMSampler, classifier_free_guidance, dynamic_threshold
from conceptlm.lcm.diffusion.linear import linear_betas
from conceptlm.lcm.diffusion.quadratic import quadratic_betas
from conceptlm.lcm.diffusion.schedule import (
    PREDICTIONS,
    NoiseSchedule,
    betas_from_alpha_bar,
    build_schedule,
    inference_timesteps,
    rescale_zero_terminal_snr,
)
from conceptlm.lcm.diffusion.sigmoid import sigmoid_betas
from conceptlm.lcm.diffusion.weighting import loss_weights, sample_timesteps, step_probabilities

__all__ = [
    "DiffusionSection", "SamplerOptions",
    "PREDICTIONS", "NoiseSchedule", "betas_from_alpha_bar", "build_schedule", "inference_timesteps",
    "rescale_zero_terminal_snr", "cosine_betas", "linear_betas", "quadratic_betas", "sigmoid_betas",
    "DDIMSampler", "classifier_free_guidance", "dynamic_threshold",
    "loss_weights", "sample_timesteps", "step_probabilities",
]
