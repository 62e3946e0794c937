"""Noise schedules: the spec's ᾱ table (cosine, T=100, zero terminal SNR), sigmoid log-SNR centres, closed forms,
the rescale's invariants, inference timestep lists, the forward process and target conversions — against hand
values and diffusers' DDIMScheduler. Training-step sampling and clamped-SNR loss weights, by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import DiffusionSection
from conceptlm.lcm.diffusion.schedule import (
    NoiseSchedule,
    betas_from_alpha_bar,
    build_schedule,
    cosine_betas,
    inference_timesteps,
    linear_betas,
    quadratic_betas,
    rescale_zero_terminal_snr,
    sigmoid_betas,
)
from conceptlm.lcm.diffusion.weighting import loss_weights, sample_timesteps, step_probabilities

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers (the reference DDIMScheduler) is not installed")


# --- ᾱ values ---------------------------------------------------------------------------------------------------
def test_cosine_zero_snr_alpha_bar_table():
    s = build_schedule(DiffusionSection())  # cosine, T=100, zero terminal SNR (the default)
    ts = [0, 1, 9, 24, 49, 74, 89, 98]
    want = [0.9994, 0.9983, 0.9721, 0.8469, 0.4936, 0.1440, 0.02396, 2.28e-4]
    got = s.alphas_cumprod[ts].tolist()
    for t, g, w in zip(ts, got, want):
        assert g == pytest.approx(w, rel=6e-4, abs=6e-5), t
    assert s.alphas_cumprod[99].item() == 0.0
    assert s.alphas_cumprod.dtype == torch.float64 and s.betas.dtype == torch.float64
    assert s.num_train_steps == 100 and s.betas[-1].item() == 1.0
    # log-SNR of the spec's table
    lsnr = [math.log(a / (1 - a)) for a in got]
    for g, w in zip(lsnr, [7.37, 6.35, 3.55, 1.71, -0.03, -1.78, -3.71, -8.39]):
        assert g == pytest.approx(w, abs=0.01)


def test_cosine_before_rescale():
    s = build_schedule(DiffusionSection(zero_terminal_snr=False))
    assert s.alphas_cumprod[99].item() == pytest.approx(2.4e-7, rel=0.02)
    assert s.betas[-1].item() == pytest.approx(0.999)  # the cap sets the last step, where f(1) = 0
    # ᾱ_t = f((t+1)/T) / f(0) exactly for the uncapped steps
    f = [math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2 for u in (0.0, 0.5)]
    assert s.alphas_cumprod[49].item() == pytest.approx(f[1] / f[0], rel=1e-12)


def test_cosine_matches_diffusers():
    d = _diffusers()
    from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar

    torch.testing.assert_close(cosine_betas(100).float(), betas_for_alpha_bar(100), rtol=1e-5, atol=1e-7)
    ref = d.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    ours = build_schedule(DiffusionSection())
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-6)
    # diffusers' DDIMScheduler leaves the last ᾱ at exactly 0 as well (no 2**-24 clamp, unlike its Euler schedulers)
    assert ref.alphas_cumprod[-1].item() == 0.0 and ours.alphas_cumprod[-1].item() == 0.0


@pytest.mark.parametrize("scale,shift,want", [(1.5, -1.0, -1.0), (1.5, -2.0, -2.0), (0.8, -1.0, -1.01),
                                              (3.5, 0.0, 0.0)])
def test_sigmoid_log_snr_centre(scale, shift, want):
    sec = DiffusionSection(schedule="sigmoid", sigmoid_scale=scale, sigmoid_shift=shift)
    lsnr = build_schedule(sec).snr(torch.tensor(49)).double().log().item()
    assert lsnr == pytest.approx(want, abs=0.005)
    # before the rescale ᾱ_49 = f(1/2)/f(0) = sigmoid(δ)/f(0), f(0) = 1 - O(e^-100): the log-SNR is δ
    raw = build_schedule(DiffusionSection(schedule="sigmoid", sigmoid_scale=scale, sigmoid_shift=shift,
                                          zero_terminal_snr=False))
    a = raw.alphas_cumprod[49].item()
    assert math.log(a / (1 - a)) == pytest.approx(shift, abs=1e-9)


def test_sigmoid_betas_closed_form():
    b = sigmoid_betas(10, 1.5, -1.0)
    f = [1 / (1 + math.exp(-(-1.0 - 1.5 * math.log(u / (1 - u))))) for u in [1e-32] + [i / 10 for i in range(1, 10)]]
    want = [min(1 - f[i + 1] / f[i], 0.999) for i in range(9)] + [0.999]  # f(1) = 0: capped
    torch.testing.assert_close(b, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_quadratic_and_linear_closed_form():
    T, b0, b1 = 7, 0.001, 0.0012
    want = [(math.sqrt(b0) + i / (T - 1) * (math.sqrt(b1) - math.sqrt(b0))) ** 2 for i in range(T)]
    torch.testing.assert_close(quadratic_betas(T, b0, b1), torch.tensor(want, dtype=torch.float64))
    want = [b0 + i / (T - 1) * (b1 - b0) for i in range(T)]
    torch.testing.assert_close(linear_betas(T, b0, b1), torch.tensor(want, dtype=torch.float64))
    s = build_schedule(DiffusionSection(schedule="quadratic", beta_start=0.02, beta_end=0.022,
                                        zero_terminal_snr=False))
    assert s.betas[0].item() == pytest.approx(0.02) and s.betas[-1].item() == pytest.approx(0.022)
    assert s.alphas_cumprod[3].item() == pytest.approx(math.prod(1 - s.betas[i].item() for i in range(4)))


def test_quadratic_linear_match_diffusers():
    d = _diffusers()
    for name, ours in (("scaled_linear", quadratic_betas(50, 1e-4, 0.02)), ("linear", linear_betas(50, 1e-4, 0.02))):
        ref = d.DDIMScheduler(num_train_timesteps=50, beta_schedule=name, beta_start=1e-4, beta_end=0.02)
        torch.testing.assert_close(ours.float(), ref.betas)


def test_betas_from_alpha_bar_hand():
    # ᾱ(u) = 1 - u/2 over T=2: β_0 = 1 - 0.75/1, β_1 = 1 - 0.5/0.75
    b = betas_from_alpha_bar(lambda u: 1 - u / 2, 2)
    torch.testing.assert_close(b, torch.tensor([0.25, 1 / 3], dtype=torch.float64))
    assert betas_from_alpha_bar(lambda u: 1 - u, 2, max_beta=0.9)[-1].item() == pytest.approx(0.9)


@pytest.mark.parametrize("schedule", ["cosine", "quadratic", "linear", "sigmoid"])
def test_rescale_invariants(schedule):
    raw = build_schedule(DiffusionSection(schedule=schedule, num_train_steps=30, zero_terminal_snr=False))
    res = NoiseSchedule(rescale_zero_terminal_snr(raw.betas))
    assert res.alphas_cumprod[-1].item() == 0.0
    assert res.alphas_cumprod[0].item() == pytest.approx(raw.alphas_cumprod[0].item(), rel=1e-12)
    # sqrt(ᾱ) is an affine image of the old one
    s_old, s_new = raw.alphas_cumprod.sqrt(), res.alphas_cumprod.sqrt()
    want = (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1])
    torch.testing.assert_close(s_new, want, rtol=1e-10, atol=1e-12)
    assert (res.alphas_cumprod[1:] < res.alphas_cumprod[:-1]).all()
    built = build_schedule(DiffusionSection(schedule=schedule, num_train_steps=30))
    torch.testing.assert_close(built.betas, res.betas)


def test_schedule_errors():
    with pytest.raises(ValueError, match="1-d"):
        NoiseSchedule(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="only the last"):
        NoiseSchedule(torch.tensor([0.1, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(torch.tensor([0.0, 0.5]))
    sec = DiffusionSection()
    sec.schedule = "exp"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="lcm.diffusion.schedule"):
        build_schedule(sec)
    s = build_schedule(DiffusionSection(num_train_steps=4))
    with pytest.raises(TypeError, match="integer"):
        s.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="prediction"):
        s.target(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), "sample")


# --- inference timesteps ---------------------------------------------------------------------------------------
def test_reference_timesteps():
    assert inference_timesteps(100, 40, "reference").tolist() == list(range(99, 0, -2))
    assert len(inference_timesteps(100, 40, "reference")) == 50
    assert inference_timesteps(100, 20, "reference").tolist() == list(range(99, 3, -5))
    ts = inference_timesteps(100, 30, "reference").tolist()
    assert len(ts) == 34 and ts[0] == 99 and ts[-1] == 0 and ts == list(range(99, -1, -3))
    for S in (25, 50, 100):
        assert inference_timesteps(100, S, "reference").tolist() == inference_timesteps(100, S, "trailing").tolist()


def test_trailing_leading_linspace_hand():
    assert inference_timesteps(10, 4, "trailing").tolist() == [9, 7, 4, 1]  # 10, 7.5→8, 5, 2.5→2 (ties to even), −1
    assert inference_timesteps(10, 4, "leading").tolist() == [6, 4, 2, 0]
    assert inference_timesteps(10, 4, "linspace").tolist() == [9, 6, 3, 0]
    assert inference_timesteps(10, 1, "trailing").tolist() == [9]
    assert inference_timesteps(10, 1, "linspace").tolist() == [0]
    ts = inference_timesteps(100, 40, "trailing")
    assert ts.dtype == torch.long and len(ts) == 40 and ts[0] == 99 and ts[-1] == 1
    assert ts.tolist() == [round(Fraction(100 * 40 - k * 100, 40)) - 1 for k in range(40)]
    with pytest.raises(ValueError, match="cannot take"):
        inference_timesteps(10, 11)
    with pytest.raises(ValueError, match="spacing"):
        inference_timesteps(10, 2, "karras")


def test_timesteps_match_diffusers():
    d = _diffusers()
    for spacing in ("trailing", "leading", "linspace"):
        for T in (10, 100, 33):
            for S in range(1, T + 1):
                ref = d.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
                ref.set_timesteps(S)
                ours = inference_timesteps(T, S, spacing).tolist()
                if T % S == 0 or spacing == "leading":
                    assert ours == ref.timesteps.tolist(), (spacing, T, S)
                    continue
                # elsewhere diffusers' float rounding differs only at exact x.5 ties, and its trailing may append -1
                if spacing == "trailing":
                    exact = [Fraction(T * S - k * T, S) for k in range(S)]
                else:
                    exact = [Fraction((T - 1) * (S - 1 - k), S - 1) for k in range(S)]
                r = ref.timesteps.tolist()
                if r[-1] == -1:
                    r = r[:-1]
                for o, x, e in zip(ours, r, exact):
                    assert o == x or e.denominator == 2, (spacing, T, S)
                assert len(r) == len(ours)


# --- forward process and conversions ---------------------------------------------------------------------------
def _data(seed=0, shape=(3, 4, 6), T=20):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, T, shape[:-1], generator=g)
    return x0, eps, t


def test_add_noise_hand_and_diffusers():
    s = build_schedule(DiffusionSection(num_train_steps=20))
    x0, eps, t = _data()
    ab = s.alphas_cumprod[t].float().unsqueeze(-1)
    torch.testing.assert_close(s.add_noise(x0, eps, t), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    a = s.alpha_bar(t, x0)
    assert a.shape == (3, 4, 1) and a.dtype == torch.float32
    torch.testing.assert_close(a, ab)
    # one 0-d t applies to everything
    torch.testing.assert_close(s.add_noise(x0, eps, torch.tensor(19)), eps)
    torch.testing.assert_close(s.add_noise(x0, eps, torch.tensor(7)), s.add_noise(x0, eps, torch.full(t.shape, 7)))
    with pytest.raises(IndexError, match="outside"):
        s.add_noise(x0, eps, torch.tensor(20))
    assert s.alpha_bar(torch.tensor([2, 5]), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    d = _diffusers()
    ref = d.DDIMScheduler(num_train_timesteps=20, trained_betas=s.betas.numpy())
    flat = (x0.reshape(-1, 6), eps.reshape(-1, 6), t.reshape(-1))  # diffusers takes one timestep per row
    torch.testing.assert_close(s.add_noise(x0, eps, t).reshape(-1, 6), ref.add_noise(*flat), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.velocity(x0, eps, t).reshape(-1, 6), ref.get_velocity(*flat), rtol=1e-5, atol=1e-6)


def test_add_noise_low_precision():
    s = build_schedule(DiffusionSection(num_train_steps=20))
    x0, eps, t = _data()
    out = s.add_noise(x0.bfloat16(), eps.bfloat16(), t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), s.add_noise(x0, eps, t), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("prediction", ["x0", "epsilon", "v"])
def test_conversions_round_trip(prediction):
    s = build_schedule(DiffusionSection(num_train_steps=20))
    x0, eps, t = _data(1)
    t = t.clamp(max=18)  # ᾱ > 0: every conversion is defined
    xt = s.add_noise(x0.double(), eps.double(), t)
    target = s.target(x0.double(), eps.double(), t, prediction)
    torch.testing.assert_close(s.x0_from_prediction(xt, target, t, prediction), x0.double())
    torch.testing.assert_close(s.epsilon_from_prediction(xt, target, t, prediction), eps.double())
    torch.testing.assert_close(s.x0_from_epsilon(xt, eps.double(), t), x0.double())
    torch.testing.assert_close(s.epsilon_from_x0(xt, x0.double(), t), eps.double())
    want = {"x0": x0, "epsilon": eps}.get(prediction)
    if want is not None:
        assert torch.equal(target, want.double())
    else:
        ab = s.alphas_cumprod[t].unsqueeze(-1)
        torch.testing.assert_close(target, ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double())


def test_v_at_pure_noise():
    s = build_schedule(DiffusionSection(num_train_steps=20))
    x0, eps, _ = _data(2)
    t = torch.full(x0.shape[:-1], 19)
    xt = s.add_noise(x0, eps, t)
    assert torch.equal(xt, eps)
    v = s.target(x0, eps, t, "v")
    torch.testing.assert_close(v, -x0)
    torch.testing.assert_close(s.x0_from_prediction(xt, v, t, "v"), x0)
    torch.testing.assert_close(s.epsilon_from_prediction(xt, v, t, "v"), xt)


def test_snr():
    s = build_schedule(DiffusionSection(num_train_steps=20))
    t = torch.tensor([[0, 5], [10, 19]])
    snr = s.snr(t)
    assert snr.dtype == torch.float32 and snr.shape == (2, 2)
    ab = s.alphas_cumprod[t]
    torch.testing.assert_close(snr, (ab / (1 - ab)).float())
    assert snr[1, 1].item() == 0.0


# --- training steps and loss weights ---------------------------------------------------------------------------
def _tiny_schedule():
    # ᾱ = 0.9, 0.5, 0.2, 0 → SNR = 9, 1, 0.25, 0
    return NoiseSchedule(torch.tensor([0.1, 1 - 0.5 / 0.9, 1 - 0.2 / 0.5, 1.0], dtype=torch.float64))


def test_clamp_snr_weights_by_hand():
    s = _tiny_schedule()
    torch.testing.assert_close(s.snr(torch.arange(4)), torch.tensor([9.0, 1.0, 0.25, 0.0]))
    t = torch.tensor([[0, 1, 2], [3, 0, 1]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    w = loss_weights(s, t, valid, "clamp_snr", 0.0, 5.0)
    # clamped γ at the valid positions: 5, 1, 0.25, 0, 5 (sum 11.25); 5 valid positions
    k = 5 / 11.25
    torch.testing.assert_close(w, torch.tensor([[5 * k, 1 * k, 0.25 * k], [0.0, 5 * k, 0.0]]))
    assert w.dtype == torch.float32 and w[valid].sum().item() == pytest.approx(5.0)
    w = loss_weights(s, t, valid, "clamp_snr", 0.5, 5.0)  # γ = 5, 1, 0.5, 0.5, 5 (sum 12)
    torch.testing.assert_close(w, torch.tensor([[5.0, 1.0, 0.5], [0.5, 5.0, 0.0]]) * (5 / 12))
    torch.testing.assert_close(loss_weights(s, t, valid), torch.ones(2, 3))
    # all positions valid: the reference's γ · numel / Σγ
    full = torch.ones_like(valid)
    g = s.snr(t).clamp(0, 5)
    torch.testing.assert_close(loss_weights(s, t, full, "clamp_snr"), g * t.numel() / g.sum())
    # nothing to renormalise: every valid γ is 0
    assert torch.equal(loss_weights(s, torch.full((2,), 3), torch.ones(2, dtype=torch.bool), "clamp_snr"),
                       torch.zeros(2))
    torch.testing.assert_close(loss_weights(s, t, valid.float(), "clamp_snr"), loss_weights(s, t, valid, "clamp_snr"))
    with pytest.raises(ValueError, match="mask of t's shape"):
        loss_weights(s, t, torch.ones(3, 2, dtype=torch.bool), "clamp_snr")
    with pytest.raises(ValueError, match="weighting"):
        loss_weights(s, t, valid, "min_snr")


def test_beta_step_probabilities_match_density():
    T, a, b = 10, 0.8, 1.0
    p = step_probabilities(T, "beta", a, b)
    dens = [(k / T) ** (a - 1) * (1 - k / T) ** (b - 1) for k in range(1, T + 1)]
    torch.testing.assert_close(p, torch.tensor(dens, dtype=torch.float64) / sum(dens))
    assert p[0] > p[-1] and p.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(step_probabilities(T, "beta", 1.0, 1.0), step_probabilities(T))
    assert step_probabilities(5, "beta", 2.0, 2.0)[-1].item() == 0.0  # density 0 at u = 1
    with pytest.raises(ValueError, match="infinite"):
        step_probabilities(T, "beta", 0.8, 0.5)
    n = 100_000
    draws = sample_timesteps((n // 100, 100), T, torch.Generator().manual_seed(0), "beta", a, b)
    assert draws.shape == (1000, 100) and draws.dtype == torch.long
    freq = torch.bincount(draws.flatten(), minlength=T).double() / n
    tol = 4 * (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= tol).all(), (freq, p)


def test_uniform_step_sampling():
    g = torch.Generator().manual_seed(1)
    draws = sample_timesteps((50_000,), 5, g)
    assert draws.min().item() == 0 and draws.max().item() == 4
    freq = torch.bincount(draws, minlength=5).double() / 50_000
    assert (freq - 0.2).abs().max().item() < 0.01
    a = sample_timesteps((3, 4), 7, torch.Generator().manual_seed(3), "beta")
    b = sample_timesteps((3, 4), 7, torch.Generator().manual_seed(3), "beta")
    assert torch.equal(a, b) and sample_timesteps((0, 4), 7, None, "beta").shape == (0, 4)
    with pytest.raises(ValueError, match="step sampling"):
        sample_timesteps((2,), 5, g, "lognormal")
