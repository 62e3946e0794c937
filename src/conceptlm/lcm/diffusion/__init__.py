"""Diffusion for the LCMs: noise schedules, the DDIM sampler with classifier-free guidance, loss weighting."""

from conceptlm.lcm.diffusion.config import DiffusionSection, SamplerOptions

__all__ = ["DiffusionSection", "SamplerOptions"]
