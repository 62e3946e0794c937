"""DDIM sampler and classifier-free guidance: step-by-step equality with diffusers' DDIMScheduler (x0/epsilon/v,
eta 0 and > 0, thresholding), the spec's first-step identity under zero terminal SNR, hand-computed guided steps,
CFG off-switches, epsilon scaling, thresholding, and sample() with an oracle denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from conceptlm.core.errors import ConfigError
from conceptlm.lcm.config import DiffusionSection, SamplerOptions
from conceptlm.lcm.diffusion.ddim import DDIMSampler, classifier_free_guidance, dynamic_threshold
from conceptlm.lcm.diffusion.schedule import build_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIFFUSERS_NAME = {"x0": "sample", "epsilon": "epsilon", "v": "v_prediction"}


def _opts(**kw) -> SamplerOptions:
    base = dict(inference_steps=5, guidance_scale=1.0, guidance_rescale=0.0, initial_noise_scale=1.0,
                epsilon_scaling=None, eta=0.0, clip_noise=100.0)
    base.update(kw)
    return SamplerOptions(**base)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- equality with diffusers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction,zero_snr", [("x0", True), ("v", True), ("x0", False), ("epsilon", False),
                                                 ("v", False)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("thresholding", [False, True])
def test_steps_match_diffusers(prediction, zero_snr, eta, thresholding):
    d = pytest.importorskip("diffusers", reason="diffusers (the reference DDIMScheduler) is not installed")
    T, S = 20, 5
    sched = build_schedule(DiffusionSection(num_train_steps=T, zero_terminal_snr=zero_snr))
    opts = _opts(inference_steps=S, eta=eta, thresholding=thresholding, threshold_ratio=0.9, sample_max_value=1.5,
                 clip_noise=1e9)  # diffusers does not clip latents
    sampler = DDIMSampler(sched, opts, prediction)
    ref = d.DDIMScheduler(num_train_timesteps=T, trained_betas=sched.betas.numpy(), set_alpha_to_one=True,
                          clip_sample=False, prediction_type=DIFFUSERS_NAME[prediction], timestep_spacing="trailing",
                          thresholding=thresholding, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    ref.set_timesteps(S)
    assert sampler.timesteps.tolist() == ref.timesteps.tolist() == [19, 15, 11, 7, 3]
    x = _randn(3, 1, 16, seed=1)
    for i, t in enumerate(sampler.timesteps.tolist()):
        pred = 2.0 * _randn(3, 1, 16, seed=10 + i)
        z = _randn(3, 1, 16, seed=20 + i)
        ours, x0 = sampler.step(i, x, pred, noise=z)
        out = ref.step(pred, t, x, eta=eta, variance_noise=z)
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours, out.prev_sample, rtol=1e-4, atol=1e-4)
        x = ours


def test_reference_spacing_matches_diffusers_stride():
    """S=40 of T=100 with the released code's list runs 50 steps of stride 2 = diffusers' trailing with S=50."""
    d = pytest.importorskip("diffusers", reason="diffusers (the reference DDIMScheduler) is not installed")
    sched = build_schedule(DiffusionSection())
    sampler = DDIMSampler(sched, _opts(inference_steps=40, spacing="reference"))
    assert len(sampler) == 50
    ref = d.DDIMScheduler(num_train_timesteps=100, trained_betas=sched.betas.numpy(), prediction_type="sample",
                          clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(50)
    assert sampler.timesteps.tolist() == ref.timesteps.tolist()
    x = _randn(2, 8)
    for i in (0, 1, 25, 49):
        pred = _randn(2, 8, seed=i + 1)
        want = ref.step(pred, int(sampler.timesteps[i]), x).prev_sample
        torch.testing.assert_close(sampler.step(i, x, pred)[0], want, rtol=1e-4, atol=1e-5)


# --- the spec's identities --------------------------------------------------------------------------------------
def test_first_step_zero_snr_identity():
    """t = T−1, x0-prediction: x' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ')·x_t, and guidance is not applied there."""
    sched = build_schedule(DiffusionSection())
    sampler = DDIMSampler(sched, _opts(inference_steps=40, guidance_scale=3.0, guidance_rescale=0.7))
    assert sampler.timesteps[0].item() == 99 and sched.alphas_cumprod[99].item() == 0.0
    x, x0_hat, x0_unc = _randn(4, 32), _randn(4, 32, seed=1), _randn(4, 32, seed=2)
    ab_next = sched.alphas_cumprod[int(sampler.timesteps[1])].item()
    want = math.sqrt(ab_next) * x0_hat + math.sqrt(1 - ab_next) * x
    for unc in (None, x0_unc):
        x_next, x0 = sampler.step(0, x, x0_hat, unc)
        assert torch.equal(x0, x0_hat)
        torch.testing.assert_close(x_next, want)


def test_guided_step_by_hand():
    sched = build_schedule(DiffusionSection(num_train_steps=100))
    g, phi, lam = 3.0, 0.7, 1.00045
    sampler = DDIMSampler(sched, _opts(inference_steps=10, guidance_scale=g, guidance_rescale=phi,
                                       epsilon_scaling=lam))
    i = 3
    t, t_next = int(sampler.timesteps[i]), int(sampler.timesteps[i + 1])
    ab, abn = sched.alphas_cumprod[t].item(), sched.alphas_cumprod[t_next].item()
    x, xc, xu = (_randn(2, 12, seed=s, dtype=torch.float64) for s in (0, 1, 2))
    ec = (x - math.sqrt(ab) * xc) / math.sqrt(1 - ab)
    eu = (x - math.sqrt(ab) * xu) / math.sqrt(1 - ab)
    eg = eu + g * (ec - eu)
    resc = eg * ec.std(-1, keepdim=True) / eg.std(-1, keepdim=True)  # Lin et al. Alg. 2
    eg = phi * resc + (1 - phi) * eg
    x0 = (x - math.sqrt(1 - ab) * eg) / math.sqrt(ab)
    want = math.sqrt(abn) * x0 + math.sqrt(1 - abn) * eg / lam
    x_next, x0_got = sampler.step(i, x, xc, xu)
    torch.testing.assert_close(x0_got, x0)
    torch.testing.assert_close(x_next, want)


def test_last_step_reaches_clean_end():
    sched = build_schedule(DiffusionSection(num_train_steps=20))
    sampler = DDIMSampler(sched, _opts(inference_steps=4, eta=1.0))
    x, x0 = _randn(2, 6), _randn(2, 6, seed=1)
    x_next, _ = sampler.step(len(sampler) - 1, x, x0, noise=_randn(2, 6, seed=3))
    torch.testing.assert_close(x_next, x0)  # ᾱ' = 1: σ = 0 and the direction term vanishes


def test_eta_step_by_hand():
    sched = build_schedule(DiffusionSection(num_train_steps=20))
    eta = 0.5
    sampler = DDIMSampler(sched, _opts(inference_steps=4, eta=eta))
    i = 1
    ab = sched.alphas_cumprod[int(sampler.timesteps[i])].item()
    abn = sched.alphas_cumprod[int(sampler.timesteps[i + 1])].item()
    x, x0, z = (_randn(3, 5, seed=s, dtype=torch.float64) for s in (0, 1, 2))
    sigma = eta * math.sqrt((1 - abn) / (1 - ab)) * math.sqrt(1 - ab / abn)
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    want = math.sqrt(abn) * x0 + math.sqrt(1 - abn - sigma ** 2) * eps + sigma * z
    torch.testing.assert_close(sampler.step(i, x, x0, noise=z)[0], want)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(i, x, x0)


def test_epsilon_scaling_divides_only_the_direction():
    sched = build_schedule(DiffusionSection(num_train_steps=50))
    lam = 1.25
    plain = DDIMSampler(sched, _opts(inference_steps=5))
    scaled = DDIMSampler(sched, _opts(inference_steps=5, epsilon_scaling=lam))
    x, x0 = _randn(2, 7, dtype=torch.float64), _randn(2, 7, seed=1, dtype=torch.float64)
    for i in (0, 2):  # the zero-SNR first step (ε = x) and an ordinary one
        abn = sched.alphas_cumprod[int(plain.timesteps[i + 1])].item()
        (xp, x0p), (xs, x0s) = plain.step(i, x, x0), scaled.step(i, x, x0)
        torch.testing.assert_close(x0s, x0p)
        torch.testing.assert_close(xs - math.sqrt(abn) * x0s, (xp - math.sqrt(abn) * x0p) / lam)


# --- CFG ---------------------------------------------------------------------------------------------------------
def test_cfg_off_switches_and_rescale():
    ec, eu = _randn(4, 10, seed=1, dtype=torch.float64), _randn(4, 10, seed=2, dtype=torch.float64)
    torch.testing.assert_close(classifier_free_guidance(ec, eu, 1.0, 0.7), ec)
    torch.testing.assert_close(classifier_free_guidance(ec, eu, 1.0, 0.0), ec)
    plain = eu + 3.0 * (ec - eu)
    assert torch.equal(classifier_free_guidance(ec, eu, 3.0, 0.0), plain)
    full = classifier_free_guidance(ec, eu, 3.0, 1.0)  # φ = 1: the guided noise gets the conditional std
    torch.testing.assert_close(full.std(-1), ec.std(-1))
    torch.testing.assert_close(full / full.norm(dim=-1, keepdim=True), plain / plain.norm(dim=-1, keepdim=True))
    # unbiased std over the features, by hand for one vector
    c, u = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    g = 2 * c  # std(c) = 1, std(g) = 2
    torch.testing.assert_close(classifier_free_guidance(c, u, 2.0, 0.5), (0.5 * 0.5 + 0.5) * g)
    # constant guided noise (std 0) is left as plain CFG
    torch.testing.assert_close(classifier_free_guidance(torch.ones(1, 4), torch.zeros(1, 4), 2.0, 0.7),
                               2 * torch.ones(1, 4))


def test_cfg_scale_one_sampler_equals_unguided():
    sched = build_schedule(DiffusionSection(num_train_steps=20))
    a = DDIMSampler(sched, _opts(inference_steps=4, guidance_scale=1.0, guidance_rescale=0.7))
    assert not a.guided and DDIMSampler(sched, _opts(guidance_scale=3.0)).guided
    x, xc, xu = _randn(2, 9), _randn(2, 9, seed=1), _randn(2, 9, seed=2)
    for i in range(4):
        torch.testing.assert_close(a.step(i, x, xc, xu)[0], a.step(i, x, xc)[0], rtol=1e-5, atol=1e-5)


# --- thresholding, initial latent ----------------------------------------------------------------------------------
def test_dynamic_threshold_by_hand():
    x0 = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0],        # median |x| = 2 → s = 2
                       [0.1, -0.5, 3.0, 0.2, 0.3],       # median 0.3 → s = 1: plain clipping
                       [10.0, 20.0, 30.0, -40.0, 50.0]])  # median 30 → s capped at 6
    want = torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0], [0.1, -0.5, 1.0, 0.2, 0.3], [1.0, 1.0, 1.0, -1.0, 1.0]])
    torch.testing.assert_close(dynamic_threshold(x0, 0.5, 6.0), want)
    assert dynamic_threshold(x0.bfloat16(), 0.5, 6.0).dtype == torch.bfloat16
    sched = build_schedule(DiffusionSection(num_train_steps=20))
    s = DDIMSampler(sched, _opts(inference_steps=4, thresholding=True, threshold_ratio=0.5, sample_max_value=6.0))
    x = torch.zeros(3, 5)
    x_next, x0_out = s.step(0, x, x0)
    torch.testing.assert_close(x0_out, want)
    abn = sched.alphas_cumprod[int(s.timesteps[1])].item()
    torch.testing.assert_close(x_next, math.sqrt(abn) * want)  # ε = x = 0 at the zero-SNR step


def test_initial_latent_and_clip():
    sched = build_schedule(DiffusionSection(num_train_steps=20))
    s = DDIMSampler(sched, _opts(initial_noise_scale=0.6, clip_noise=3.0))
    noise = torch.tensor([[1.0, -2.0, 10.0, -10.0]])
    torch.testing.assert_close(s.initial_latent(noise), torch.tensor([[0.6, -1.2, 3.0, -3.0]]))
    x_next, _ = s.step(0, torch.zeros(1, 4), torch.tensor([[100.0, -100.0, 0.5, 0.0]]))
    assert x_next.abs().max().item() == 3.0


# --- sample() ----------------------------------------------------------------------------------------------------
def _oracle(sched, x0, prediction, guided):
    """A denoiser that knows the answer: its prediction implies x̂0 = x0 at every step."""
    calls = []

    def denoise(x, t):
        calls.append(t.clone())
        ab = sched.alphas_cumprod[int(t.flatten()[0])].item()
        eps = x if ab == 0.0 else sched.epsilon_from_x0(x, x0, t)  # the noise that x would carry around x0
        pred = sched.target(x0, eps, t, prediction)
        return pred, (pred.clone() if guided else None)

    return denoise, calls


@pytest.mark.parametrize("prediction,zero_snr", [("x0", True), ("v", True), ("epsilon", False)])
@pytest.mark.parametrize("guided,eta", [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_sample_with_oracle_returns_x0(prediction, zero_snr, guided, eta):
    sched = build_schedule(DiffusionSection(num_train_steps=30, zero_terminal_snr=zero_snr))
    opts = _opts(inference_steps=6, guidance_scale=3.0 if guided else 1.0, guidance_rescale=0.7, eta=eta,
                 epsilon_scaling=1.00045, initial_noise_scale=0.6)
    sampler = DDIMSampler(sched, opts, prediction)
    x0 = _randn(3, 2, 8, seed=5)
    denoise, calls = _oracle(sched, x0, prediction, guided)
    x_init = sampler.initial_latent(_randn(3, 2, 8, seed=6))
    out = sampler.sample(denoise, x_init, noise_fn=lambda i: _randn(3, 2, 8, seed=100 + i))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert [int(c.flatten()[0]) for c in calls] == sampler.timesteps.tolist()
    assert all(c.shape == (3, 2) and c.dtype == torch.long and (c == c.flatten()[0]).all() for c in calls)


def test_sample_errors():
    sched = build_schedule(DiffusionSection(num_train_steps=20))
    x0 = torch.zeros(2, 4)
    guided = DDIMSampler(sched, _opts(guidance_scale=2.0))
    with pytest.raises(ValueError, match="unconditional"):
        guided.sample(lambda x, t: (x0, None), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="noise_fn"):
        DDIMSampler(sched, _opts(eta=1.0)).sample(lambda x, t: (x0, None), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="epsilon"):
        DDIMSampler(sched, _opts(), "epsilon")  # ᾱ = 0 at the first step
    with pytest.raises(ValueError, match="prediction"):
        DDIMSampler(sched, _opts(), "sample")
    with pytest.raises(ConfigError, match="inference_steps"):
        DDIMSampler(sched, _opts(inference_steps=0))
    with pytest.raises(IndexError):
        guided.step(5, torch.zeros(2, 4), x0)
