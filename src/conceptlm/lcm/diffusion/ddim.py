"""DDIM sampling of one sentence embedding with classifier-free guidance (LCM paper §2.3.2, §2.4.1).

Per inference step ``t → t'`` (``timesteps[i] → timesteps[i+1]``, the clean end ``ᾱ' = 1`` after the last):

1. the denoiser's outputs (conditional, and unconditional when guiding) become ``x̂0`` and ``ε̂``;
2. where ``ᾱ_t = 0`` (the first step under zero terminal SNR; the x0↔ε conversion is singular) ``x0 = x̂0_cond`` and
   ``ε = x_t``, without guidance; elsewhere, with an unconditional prediction, guidance in ε space
   ``ε_g = ε_u + g·(ε_c − ε_u)``, CFG-rescale (Lin et al. 2024, Alg. 2), ``x0 = (x_t − sqrt(1 − ᾱ_t)·ε_g)/sqrt(ᾱ_t)``;
3. epsilon scaling ``ε ← ε / λ`` (Ning et al. 2023), after x0, so only the direction term shrinks;
4. optional dynamic thresholding of x0 (Saharia et al. 2022);
5. ``x_{t'} = sqrt(ᾱ')·x0 + sqrt(1 − ᾱ' − σ²)·ε + σ·z``, ``σ = η·sqrt((1 − ᾱ')/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ')``
   (Song et al. 2021, Eq. 12/16), clipped to ``±clip_noise``.

The sampled vector is the last step's x0 (as in the reference), not the final latent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from conceptlm.core.rng import EVAL_STEP, StepRandomness
from conceptlm.lcm.config import SamplerOptions
from conceptlm.lcm.diffusion.schedule import NoiseSchedule, _check_prediction, inference_timesteps

__all__ = ["classifier_free_guidance", "dynamic_threshold", "DDIMSampler", "Denoise", "teacher_forced_noise"]

Denoise = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor | None]"]
"""``denoise(x (..., D), t (...) long) -> (pred_cond (..., D), pred_uncond (..., D) or None)``."""


def classifier_free_guidance(eps_cond: Tensor, eps_uncond: Tensor, scale: float, rescale: float) -> Tensor:
    """Guided noise ``ε_g = ε_u + scale·(ε_c − ε_u)``, then CFG-rescale (Lin et al. 2024, Alg. 2, on ε):
    ``ε_g ← (rescale·std(ε_c)/std(ε_g) + (1 − rescale))·ε_g`` with ``std`` over the last (feature) dimension of each
    vector, unbiased (torch's default). ``rescale = 0`` is plain CFG; ``scale = 1`` gives ``ε_c``. A vector whose
    guided noise is constant (std 0) is left unrescaled. (..., D), (..., D) → (..., D)."""
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"conditional and unconditional predictions differ in shape: {tuple(eps_cond.shape)} vs "
                         f"{tuple(eps_uncond.shape)}")
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale == 0:
        return guided
    if eps_cond.shape[-1] < 2:
        raise ValueError("CFG rescale needs at least 2 features (the std is taken over the last dimension)")
    work = torch.float32 if guided.dtype in (torch.float16, torch.bfloat16) else guided.dtype
    std_c = eps_cond.to(work).std(dim=-1, keepdim=True)
    std_g = guided.to(work).std(dim=-1, keepdim=True)
    ratio = torch.where(std_g > 0, std_c / std_g, torch.ones_like(std_g))
    factor = rescale * ratio + (1.0 - rescale)
    return (factor * guided.to(work)).to(guided.dtype)


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding per vector (last dimension): ``s = clamp(quantile(|x0|, ratio), 1, max_value)``,
    ``x0 ← clamp(x0, −s, s) / s`` (s = 1 is plain clipping to ±1). (..., D) → (..., D), same dtype."""
    work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    s = torch.quantile(work.abs(), ratio, dim=-1, keepdim=True).clamp(min=1.0, max=max_value)
    return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype)


class DDIMSampler:
    """DDIM over ``inference_timesteps(T, options.inference_steps, options.spacing)`` for a denoiser that predicts
    ``prediction`` (``x0`` | ``epsilon`` | ``v``).

    Attributes: ``schedule``, ``options``, ``prediction``, ``timesteps`` (LongTensor ``(S',)``, descending).
    ``guided`` is True when ``options.guidance_scale != 1``; the caller then supplies an unconditional prediction.
    """

    def __init__(self, schedule: NoiseSchedule, options: SamplerOptions, prediction: str = "x0"):
        options.validate()
        _check_prediction(prediction)
        self.schedule, self.options, self.prediction = schedule, options, prediction
        T = schedule.num_train_steps
        self.timesteps = inference_timesteps(T, options.inference_steps, options.spacing)
        ab = schedule.alphas_cumprod
        self._ab = [float(ab[t]) for t in self.timesteps.tolist()]
        self._ab_next = self._ab[1:] + [1.0]
        if prediction == "epsilon" and any(a == 0.0 for a in self._ab):
            raise ValueError("an epsilon-predicting denoiser cannot start from pure noise (alpha_bar = 0 at "
                             f"t = {T - 1} under zero terminal SNR): predict x0 or v, or train without "
                             "lcm.diffusion.zero_terminal_snr")

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    @property
    def guided(self) -> bool:
        """Whether sampling uses classifier-free guidance (``guidance_scale != 1``)."""
        return self.options.guidance_scale != 1.0

    def initial_latent(self, noise: Tensor) -> Tensor:
        """The starting latent ``clip(initial_noise_scale·noise, ±clip_noise)`` from standard-normal ``noise``
        (..., D)."""
        c = self.options.clip_noise
        return (self.options.initial_noise_scale * noise).clamp(-c, c)

    def step(self, i: int, x: Tensor, pred_cond: Tensor, pred_uncond: Tensor | None = None,
             noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One DDIM step from ``timesteps[i]``: latent ``x`` (..., D) and the denoiser's predictions at it →
        ``(x_next, x0)``, both (..., D). ``pred_uncond`` (same shape) switches on guidance (ignored where
        ᾱ_t = 0); ``noise`` is a standard-normal tensor like ``x``, required when ``options.eta > 0``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"step {i} out of range for {n} inference steps")
        i = i % n
        if pred_cond.shape != x.shape:
            raise ValueError(f"prediction shape {tuple(pred_cond.shape)} differs from the latent's {tuple(x.shape)}")
        o, sch, p = self.options, self.schedule, self.prediction
        t = self.timesteps[i]
        ab, ab_next = self._ab[i], self._ab_next[i]
        if ab == 0.0:
            x0 = sch.x0_from_prediction(x, pred_cond, t, p)
            eps = x
        elif pred_uncond is None:
            x0 = sch.x0_from_prediction(x, pred_cond, t, p)
            eps = sch.epsilon_from_prediction(x, pred_cond, t, p)
        else:
            eps_c = sch.epsilon_from_prediction(x, pred_cond, t, p)
            eps_u = sch.epsilon_from_prediction(x, pred_uncond, t, p)
            eps = classifier_free_guidance(eps_c, eps_u, o.guidance_scale, o.guidance_rescale)
            x0 = sch.x0_from_epsilon(x, eps, t)
        if o.epsilon_scaling is not None:
            eps = eps / o.epsilon_scaling
        if o.thresholding:
            x0 = dynamic_threshold(x0, o.threshold_ratio, o.sample_max_value)
        sigma = 0.0
        if o.eta > 0:
            if noise is None:
                raise ValueError(f"eta = {o.eta} > 0 needs the step's standard-normal noise")
            if noise.shape != x.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latent's {tuple(x.shape)}")
            sigma = o.eta * math.sqrt((1.0 - ab_next) / (1.0 - ab)) * math.sqrt(max(1.0 - ab / ab_next, 0.0))
        x_next = math.sqrt(ab_next) * x0 + math.sqrt(max(1.0 - ab_next - sigma * sigma, 0.0)) * eps
        if sigma > 0:
            x_next = x_next + sigma * noise
        return x_next.clamp(-o.clip_noise, o.clip_noise), x0

    def sample(self, denoise: Denoise, x_init: Tensor, noise_fn: Callable[[int], Tensor] | None = None) -> Tensor:
        """Run every step from ``x_init`` (..., D) (see :meth:`initial_latent`) and return the last step's x0.

        ``denoise(x, t)`` gets the latent and a long tensor ``t`` of shape ``x.shape[:-1]`` filled with the current
        step; it returns ``(pred_cond, pred_uncond)``, ``pred_uncond`` required when :attr:`guided` (else it may be
        None). ``noise_fn(i)`` gives step i's standard-normal noise when ``eta > 0``. Gradients are not disabled
        here: call under ``torch.no_grad()`` / ``torch.inference_mode()``.
        """
        if self.options.eta > 0 and noise_fn is None:
            raise ValueError(f"eta = {self.options.eta} > 0 needs noise_fn")
        x, x0 = x_init, x_init
        for i, t in enumerate(self.timesteps.tolist()):
            tt = torch.full(x.shape[:-1], t, dtype=torch.long, device=x.device)
            pred_cond, pred_uncond = denoise(x, tt)
            if self.guided and pred_uncond is None:
                raise ValueError(f"guidance_scale = {self.options.guidance_scale} needs an unconditional prediction "
                                 "from the denoiser (or set guidance_scale = 1)")
            noise = noise_fn(i) if self.options.eta > 0 and noise_fn is not None else None
            x, x0 = self.step(i, x, pred_cond, pred_uncond, noise)
        return x0


def teacher_forced_noise(step_rng: StepRandomness | None, purpose: str, ids: Tensor, *, max_sentences: int, dim: int,
                         n_sentences: int, n_steps: int, eta: float, device: torch.device) -> Tensor:
    """The fixed standard-normal noise of a teacher-forced sampler run of a diffusion LCM's unit: ``(B, 1, N, D)``
    (the initial latent), or ``(B, S + 1, N, D)`` with ``eta > 0`` (plus each of the S steps' noise).

    Drawn per example (``ids``) at ``max_sentences`` rows and sliced to ``n_sentences``, from the eval step of the
    seed of ``step_rng`` (0 without one), so a document's noise depends neither on the other documents of its batch
    (eval batch size, ranks) nor on the batch's padded length, and is the same at every evaluation."""
    rng = StepRandomness(seed=step_rng.seed if step_rng is not None else 0, step=EVAL_STEP)
    draws = n_steps + 1 if eta > 0 else 1
    return rng.per_example(purpose, ids, (draws, max_sentences, dim), device=device)[:, :, :n_sentences]
