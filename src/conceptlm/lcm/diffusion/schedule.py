"""The variance-preserving noise process of the diffusion LCMs (LCM paper §2.3.2).

``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε`` with ``ᾱ_t = Π_{s≤t}(1 − β_s)``, ``t = 0..T−1``. A schedule is a float64
``betas (T,)`` table (:func:`linear_betas`, :func:`quadratic_betas`, :func:`cosine_betas`, :func:`sigmoid_betas`);
:class:`NoiseSchedule` turns it into the per-step coefficients and the conversions between
the three prediction targets (``x0``, ``epsilon``, ``v``). :func:`build_schedule` makes one from the config section
``lcm.diffusion``; :func:`inference_timesteps` lists the steps a sampler visits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import DiffusionSection

__all__ = [
    "PREDICTIONS", "NoiseSchedule", "betas_from_alpha_bar", "linear_betas", "quadratic_betas", "cosine_betas",
    "sigmoid_betas", "rescale_zero_terminal_snr", "build_schedule", "inference_timesteps", "SPACINGS",
]

PREDICTIONS = ("x0", "epsilon", "v")
"""What a denoiser may predict: the clean vector, the noise, or the velocity ``sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0``."""

SPACINGS = ("trailing", "leading", "linspace", "reference")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


class NoiseSchedule:
    """Coefficients of the forward process for ``T`` training steps, from float64 ``betas (T,)``.

    Attributes (float64, CPU): ``betas (T,)``, ``alphas_cumprod (T,)`` = ᾱ; ``num_train_steps`` = T.

    Every method takes ``t``, a long tensor of timesteps in ``0..T−1`` whose shape is that of ``x`` without its last
    (feature) dimension — or any shape that broadcasts after a trailing ``1`` is appended (a 0-d ``t`` applies one
    step to everything). The arithmetic runs in ``x``'s dtype on ``x``'s device; the square roots are taken in
    float64 once and cached per (device, dtype); a 0-d CPU ``t`` uses Python-float coefficients (no device copy).
    Tensor timesteps are not range-checked (that would synchronise a GPU); out-of-range values fail or wrap as
    tensor indexing does.
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-d tensor of at least 2 steps, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and in (0, 1]")
        if (betas[:-1] >= 1).any():
            raise ValueError("only the last beta may be 1 (zero terminal SNR); an earlier 1 erases the signal")
        self.betas = betas
        self.num_train_steps = int(betas.numel())
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_train_steps}, alpha_bar[0]={self.alphas_cumprod[0].item():.6g}, "
                f"alpha_bar[T-1]={self.alphas_cumprod[-1].item():.3g})")

    # --- coefficient tables ------------------------------------------------------------------------------------
    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(ᾱ, sqrt(ᾱ), sqrt(1 − ᾱ)) as ``(T,)`` tensors on ``device`` in ``dtype``."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            ab = self.alphas_cumprod
            tabs = (ab, ab.sqrt(), (1.0 - ab).clamp_min(0.0).sqrt())
            self._tables[key] = tuple(x.to(device=device, dtype=dtype) for x in tabs)  # type: ignore[assignment]
        return self._tables[key]

    def _gather(self, which: int, t: Tensor, like: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
        table = self._table(like.device, like.dtype)[which]
        return table[t.to(device=like.device, dtype=torch.long)].unsqueeze(-1)

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ_t: ``t`` (...) long → (..., 1) in ``like``'s dtype and device."""
        return self._gather(0, t, like)

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) as (..., 1) tensors; as Python floats for a 0-d CPU ``t`` (one step for the
        whole tensor, as in sampling), which needs no table on ``like``'s device nor a host-to-device copy."""
        t = torch.as_tensor(t)
        if t.ndim == 0 and t.device.type == "cpu" and not (t.dtype.is_floating_point or t.dtype == torch.bool):
            i = int(t)
            if not 0 <= i < self.num_train_steps:
                raise IndexError(f"timestep {i} outside 0..{self.num_train_steps - 1}")
            ab = float(self.alphas_cumprod[i])
            return math.sqrt(ab), math.sqrt(max(1.0 - ab, 0.0))
        return self._gather(1, t, like), self._gather(2, t, like)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``ᾱ_t / (1 − ᾱ_t)`` (0 where ᾱ_t = 0): ``t`` (...) long → (...) float32 on t's
        device (computed in float64)."""
        t = torch.as_tensor(t)
        ab = self.alphas_cumprod
        table = (ab / (1.0 - ab)).to(torch.float32)
        return table.to(t.device)[t.long()]

    # --- forward process and conversions ----------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise``; x0, noise (..., D), t (...) → (..., D)."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v target ``sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0`` (Salimans & Ho 2022); (..., D)."""
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def x0_from_epsilon(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x0 = (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)`` (undefined where ᾱ_t = 0: gives inf/nan); (..., D)."""
        a, s = self._coefs(t, x_t)
        return (x_t - s * eps) / a

    def epsilon_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``ε = (x_t − sqrt(ᾱ_t)·x0) / sqrt(1 − ᾱ_t)``; (..., D)."""
        a, s = self._coefs(t, x_t)
        return (x_t - a * x0) / s

    def x0_from_prediction(self, x_t: Tensor, pred: Tensor, t: Tensor, prediction: str) -> Tensor:
        """The clean vector implied by a denoiser output ``pred`` of kind ``prediction`` (``x0`` | ``epsilon`` |
        ``v``): x0 as is; epsilon via :meth:`x0_from_epsilon`; v: ``sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v``. (..., D)."""
        _check_prediction(prediction)
        if prediction == "x0":
            return pred
        if prediction == "epsilon":
            return self.x0_from_epsilon(x_t, pred, t)
        a, s = self._coefs(t, x_t)
        return a * x_t - s * pred

    def epsilon_from_prediction(self, x_t: Tensor, pred: Tensor, t: Tensor, prediction: str) -> Tensor:
        """The noise implied by ``pred``: x0 via :meth:`epsilon_from_x0`; epsilon as is; v:
        ``sqrt(ᾱ_t)·v + sqrt(1 − ᾱ_t)·x_t``. Equal to ``epsilon_from_x0(x_t, x0_from_prediction(...))`` without the
        round trip's rounding (and defined for v at ᾱ_t = 0, where it is ``x_t``). (..., D)."""
        _check_prediction(prediction)
        if prediction == "epsilon":
            return pred
        if prediction == "x0":
            return self.epsilon_from_x0(x_t, pred, t)
        a, s = self._coefs(t, x_t)
        return a * pred + s * x_t

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction: str) -> Tensor:
        """The training target for ``prediction``: x0, the noise, or :meth:`velocity`; (..., D)."""
        _check_prediction(prediction)
        if prediction == "x0":
            return x0
        if prediction == "epsilon":
            return noise
        return self.velocity(x0, noise, t)


def betas_from_alpha_bar(f: Callable[[Tensor], Tensor], T: int, max_beta: float = 0.999) -> Tensor:
    """Discretise a continuous ᾱ function: ``β_i = min(1 − f((i+1)/T) / f(i/T), max_beta)``, ``i = 0..T−1``.

    ``f`` maps a float64 tensor of times in ``[0, 1]`` to ᾱ values (elementwise). Returns float64 ``(T,)``.
    """
    if T < 2:
        raise ValueError(f"need T >= 2 steps, got {T}")
    if not 0 < max_beta <= 1:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    fu = torch.as_tensor(f(u), dtype=torch.float64)
    if fu.shape != u.shape:
        raise ValueError(f"the alpha-bar function must be elementwise: {tuple(u.shape)} -> {tuple(fu.shape)}")
    return torch.clamp(1.0 - fu[1:] / fu[:-1], max=max_beta)


# ------------------------------------------------------------------------------------------------ beta tables
def linear_betas(T: int, beta_start: float, beta_end: float) -> Tensor:
    """Linear schedule (Ho et al. 2020; reference ``linear``): betas evenly spaced from ``beta_start`` to
    ``beta_end`` (both included). float64 ``(T,)``."""
    if T < 2:
        raise ValueError(f"need T >= 2 steps, got {T}")
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must be in (0, 1), got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def quadratic_betas(T: int, beta_start: float, beta_end: float) -> Tensor:
    """Quadratic schedule (reference ``scaled_linear`` with exponent 2; the LCM paper's Quadratic-1/-2, §2.3.2):
    betas evenly spaced in sqrt space, squared: ``β_i = (sqrt(β_start) + i/(T−1)·(sqrt(β_end) − sqrt(β_start)))²``,
    ``i = 0..T−1``. float64 ``(T,)``."""
    if T < 2:
        raise ValueError(f"need T >= 2 steps, got {T}")
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must be in (0, 1), got {beta_start}, {beta_end}")
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021; reference ``squaredcos_cap_v2``), the LCM default (LCM paper
    §2.3.2): betas discretising ``ᾱ(u) = f(u)/f(0)``, ``f(u) = cos²((u + s)/(1 + s)·π/2)``, capped at 0.999 (the
    cap sets the last step, where f(1) = 0). float64 ``(T,)``."""
    if s < 0:
        raise ValueError(f"cosine offset s must be >= 0, got {s}")

    def f(u: Tensor) -> Tensor:
        return torch.cos((u + s) / (1.0 + s) * (math.pi / 2)) ** 2

    return betas_from_alpha_bar(f, T)


_SIGMOID_EPS = 1e-32


def sigmoid_betas(T: int, scale: float, shift: float) -> Tensor:
    """The LCM paper's sigmoid schedule (§2.3.2): log-SNR ≈ ``δ − γ·logit(u)``, centred on δ with scale γ. Betas
    discretising ``ᾱ(u) = f(u)/f(0)``, ``f(u) = sigmoid(shift − scale·logit(u))`` with ``u`` clamped to
    ``[1e-32, 1 − 1e-32]`` as in the reference (in float64 the upper bound is 1, so f(1) = 0 and the last beta is
    the 0.999 cap). ``scale`` = γ (reference ``sigmoid_schedule_alpha``), ``shift`` = δ (``sigmoid_schedule_beta``).
    float64 ``(T,)``."""
    if scale <= 0:
        raise ValueError(f"sigmoid scale must be > 0, got {scale}")

    def f(u: Tensor) -> Tensor:
        return torch.sigmoid(shift - scale * torch.logit(u.clamp(_SIGMOID_EPS, 1.0 - _SIGMOID_EPS)))

    return betas_from_alpha_bar(f, T)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale ``sqrt(ᾱ)`` so the last step has ᾱ = 0 and the first keeps its value (Lin et al. 2024,
    Alg. 1): ``s ← (s − s_{T−1})·s_0 / (s_0 − s_{T−1})``, ``ᾱ = s²``, betas from the ratios (the last becomes 1).
    float64 ``(T,)`` → float64 ``(T,)``."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    s = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    if not s0 > sT:
        raise ValueError("cannot rescale to zero terminal SNR: the schedule adds no noise")
    s = (s - sT) * s0 / (s0 - sT)
    ab = s * s
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def _round_half_even(num: Tensor, den: int) -> Tensor:
    """``round(num / den)`` for non-negative long ``num`` and ``den > 0``, exactly, ties to even."""
    q, r = torch.div(num, den, rounding_mode="floor"), torch.remainder(num, den)
    up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
    return q + up.long()


def build_schedule(section: DiffusionSection) -> NoiseSchedule:
    """The schedule of section ``lcm.diffusion``: ``section.schedule`` (cosine | quadratic | linear | sigmoid) over
    ``section.num_train_steps`` steps, rescaled to zero terminal SNR when ``section.zero_terminal_snr``."""
    T = section.num_train_steps
    if section.schedule == "cosine":
        betas = cosine_betas(T)
    elif section.schedule == "quadratic":
        betas = quadratic_betas(T, section.beta_start, section.beta_end)
    elif section.schedule == "linear":
        betas = linear_betas(T, section.beta_start, section.beta_end)
    elif section.schedule == "sigmoid":
        betas = sigmoid_betas(T, section.sigmoid_scale, section.sigmoid_shift)
    else:
        raise ConfigError(f"unknown schedule {section.schedule!r}; choose cosine, quadratic, linear or sigmoid",
                          field="lcm.diffusion.schedule")
    if section.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)


def inference_timesteps(T: int, S: int, spacing: str = "trailing") -> Tensor:
    """The descending training steps a sampler visits: LongTensor ``(S',)``.

    - ``trailing``: ``round(T − k·T/S) − 1``, k = 0..S−1 (diffusers' ``trailing``); starts at T−1.
    - ``leading``: ``k·(T // S)``, k = S−1..0 (diffusers' ``leading`` without ``steps_offset``); ends at 0.
    - ``linspace``: ``round(k·(T−1)/(S−1))``, k = S−1..0 (diffusers' ``linspace``); from T−1 to 0.
    - ``reference``: the released code's integer-stride list, ``stride = T // S``, ``[T−1 − k·stride ...]`` while
      ≥ 0. It has ``ceil(T / stride)`` entries, which is S only when S divides T (S=40 of T=100: 50 steps
      99, 97, …, 1; S=20: 99, 94, …, 4; S=30: 34 steps ending at 0).

    Rounding is exact (integer arithmetic, ties to even). diffusers rounds floats from ``np.arange``/``np.linspace``,
    so where the exact value is a tie (x.5) its float noise may pick the other neighbour, and its ``trailing`` can
    emit an extra step ``−1`` when S does not divide T (e.g. T=100, S=29); the lists agree whenever S divides T.

    The sampler steps from ``timesteps[i]`` to ``timesteps[i+1]`` (to the clean end after the last). diffusers (and
    the reference) instead step to ``t − T // S``; that is the same list when S divides T, and always for
    ``reference`` and ``leading``.
    """
    if T < 1 or S < 1:
        raise ValueError(f"need T >= 1 and S >= 1, got T={T}, S={S}")
    if S > T:
        raise ValueError(f"cannot take {S} inference steps from {T} training steps")
    k = torch.arange(S, dtype=torch.long)
    if spacing == "trailing":
        ts = _round_half_even(T * (S - k), S) - 1
    elif spacing == "leading":
        ts = (S - 1 - k) * (T // S)
    elif spacing == "linspace":
        ts = _round_half_even((T - 1) * (S - 1 - k), S - 1) if S > 1 else torch.zeros(1, dtype=torch.long)
    elif spacing == "reference":
        stride = T // S
        ts = torch.arange(T - 1, -1, -stride, dtype=torch.long)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return ts
