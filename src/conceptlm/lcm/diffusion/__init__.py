"""Diffusion for the LCMs (One-Tower, Two-Tower), one module per concern:

- :mod:`~conceptlm.lcm.diffusion.schedule`: the noise process (beta tables, :class:`NoiseSchedule`, zero terminal
  SNR, the sampler's timesteps);
- :mod:`~conceptlm.lcm.diffusion.ddim`: the DDIM sampler with classifier-free guidance, and the fixed noise of a
  teacher-forced sampler run;
- :mod:`~conceptlm.lcm.diffusion.weighting`: training timestep sampling and loss weighting.

The settings are ``lcm.diffusion`` (:class:`~conceptlm.lcm.config.DiffusionSection`) and ``generate.diffusion``
(:class:`~conceptlm.lcm.config.SamplerOptions`).
"""
