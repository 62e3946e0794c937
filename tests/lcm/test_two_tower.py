"""Two-Tower diffusion LCM: masks, AdaLN-zero identity at init, the loss by hand, per-example randomness, cached
generation equal to uncached (and batched equal to single documents), a short run that learns."""

from __future__ import annotations

import pytest
import torch

from conceptlm.core.rng import StepRandomness
from conceptlm.lcm.config import DiffusionSection, GenerationOptions, LCMSection, SamplerOptions
from conceptlm.lcm.generate import generate
from conceptlm.lcm.sequence import collate_documents
from conceptlm.lcm.variants.two_tower import TwoTowerUnit, cross_attention_keep, draw_training_noise

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM = 8


def cfg(**kw) -> LCMSection:
    base = dict(model="two_tower", dim=DIM, d_model=16, n_layers=1, n_denoiser_layers=2, n_heads=2, d_ff=32,
                dropout=0.0, max_sentences=12, diffusion=DiffusionSection(num_train_steps=20))
    base.update(kw)
    c = LCMSection(**base)
    c.validate()
    return c


def randomize_modulation(unit: TwoTowerUnit, seed: int = 0) -> None:
    """Non-zero AdaLN weights (a trained-looking denoiser) so the context matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in unit.model.denoiser:
            w = block.modulation.proj.weight
            w.copy_(0.3 * torch.randn(w.shape, generator=g))
            block.modulation.proj.bias.copy_(0.3 * torch.randn(block.modulation.proj.bias.shape, generator=g))


def test_cross_attention_mask_has_the_papers_structure():
    keep = cross_attention_keep(3)[0, 0].int().tolist()
    assert keep == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]  # key 0 = zero vector, key j = C_{j-1}
    drop = torch.tensor([[False, True, False]])
    assert cross_attention_keep(3, drop)[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def test_fresh_denoiser_ignores_the_context():
    torch.manual_seed(0)
    m = TwoTowerUnit(cfg()).model.eval()
    z, x_t = torch.randn(2, 5, DIM), torch.randn(2, 5, DIM)
    t = torch.randint(0, 20, (2, 5))
    out = m.forward_normalized(z, x_t, t)
    expected = m.post_denoiser(m.denoiser_norm(m.pre_denoiser(x_t)))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(m.forward_normalized(torch.randn(2, 5, DIM), x_t, t), out)


def test_predictions_see_only_previous_sentences_and_dropped_rows_see_nothing():
    torch.manual_seed(1)
    unit = TwoTowerUnit(cfg())
    randomize_modulation(unit)
    m = unit.model.eval()
    z, x_t = torch.randn(1, 5, DIM), torch.randn(1, 5, DIM)
    t = torch.randint(0, 20, (1, 5))
    out = m.forward_normalized(z, x_t, t)
    z2 = z.clone()
    z2[:, 2] += 1.0  # sentence 2 changes: predictions of sentences 0..2 must not
    out2 = m.forward_normalized(z2, x_t, t)
    torch.testing.assert_close(out2[:, :3], out[:, :3])
    assert (out2[:, 3:] - out[:, 3:]).abs().max() > 1e-4
    drop = torch.tensor([[False, False, False, True, False]])
    d1 = m.forward_normalized(z, x_t, t, drop=drop)
    d2 = m.forward_normalized(torch.randn(1, 5, DIM), x_t, t, drop=drop)
    torch.testing.assert_close(d1[:, 3], d2[:, 3])
    torch.testing.assert_close(d1[:, 0], out[:, 0])  # row 0 is always unconditional


def test_loss_by_hand_with_a_constant_prediction():
    c = cfg()
    unit = TwoTowerUnit(c)
    b = torch.randn(DIM)
    with torch.no_grad():
        unit.model.post_denoiser.weight.zero_()
        unit.model.post_denoiser.bias.copy_(b)
    batch = collate_documents([{"id": 0, "vectors": torch.randn(4, DIM)}, {"id": 1, "vectors": torch.randn(2, DIM)}])
    z = unit.model.normalize(batch["vectors"])
    expected = ((b - z) ** 2).sum(-1)[batch["mask"]].sum()
    torch.testing.assert_close(unit(batch)["mse"], expected)
    assert int(unit.counts(batch)["mse"]) == 6
    batch["loss_mask"] = batch["mask"].clone()
    batch["loss_mask"][:, :2] = False  # e.g. instruction data: only the answer sentences
    torch.testing.assert_close(unit(batch)["mse"], ((b - z) ** 2).sum(-1)[batch["loss_mask"]].sum())


def test_training_draws_are_per_example_and_independent_of_padding():
    c = cfg(diffusion=DiffusionSection(num_train_steps=20, cfg_dropout=0.5))
    rng0 = StepRandomness(seed=3, step=7, rank=0, micro=0)
    rng1 = StepRandomness(seed=3, step=7, rank=1, micro=2)
    a = draw_training_noise(c, rng0, torch.tensor([4, 9]), 5, "cpu")
    b = draw_training_noise(c, rng1, torch.tensor([9]), 3, "cpu")
    for k in ("t", "noise", "drop"):
        assert torch.equal(a[k][1, :3], b[k][0])
    assert a["t"].min() >= 0 and a["t"].max() < 20 and a["drop"].any() and not a["drop"].all()
    other = draw_training_noise(c, StepRandomness(seed=3, step=8), torch.tensor([9]), 3, "cpu")
    assert not torch.equal(other["noise"], b["noise"])


def _docs(n: int, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, DIM, generator=g) for k in lengths[:n]]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_generation_equals_uncached_and_batched_equals_single(guidance):
    torch.manual_seed(2)
    unit = TwoTowerUnit(cfg())
    randomize_modulation(unit, 5)
    m = unit.model
    prompts = _docs(3, [3, 1, 5])
    diff = SamplerOptions(inference_steps=5, guidance_scale=guidance)
    opts = dict(max_new_sentences=3, eos_threshold=None, repetition_threshold=None, diffusion=diff)
    cached = generate(m, prompts, options=GenerationOptions(**opts))
    uncached = generate(m, prompts, options=GenerationOptions(**opts, use_cache=False))
    for a, b in zip(cached, uncached):
        assert a.vectors.shape == (3, DIM)
        torch.testing.assert_close(a.vectors, b.vectors, atol=1e-5, rtol=1e-5)
    again = generate(m, prompts, options=GenerationOptions(**opts))
    assert all(torch.equal(a.vectors, b.vectors) for a, b in zip(cached, again))
    other_seed = generate(m, prompts, options=GenerationOptions(**opts, seed=1))
    assert not torch.equal(other_seed[0].vectors, cached[0].vectors)


def test_batched_generation_equals_one_document_at_a_time():
    torch.manual_seed(3)
    unit = TwoTowerUnit(cfg())
    randomize_modulation(unit, 6)
    m = unit.model
    prompts = _docs(2, [4, 2])
    opts = GenerationOptions(max_new_sentences=2, eos_threshold=None, repetition_threshold=None,
                             diffusion=SamplerOptions(inference_steps=4, guidance_scale=2.0))
    both = generate(m, prompts, options=opts)
    # the same document as row 0 of its own batch: it draws row 0's noise, which document 0 drew in the batch
    first = generate(m, prompts[:1], options=opts)
    torch.testing.assert_close(both[0].vectors, first[0].vectors, atol=1e-5, rtol=1e-5)


def test_a_short_run_lowers_the_loss():
    from conceptlm.lcm.train import SyntheticVectorDocuments

    torch.manual_seed(0)
    c = cfg(dropout=0.0)
    unit = TwoTowerUnit(c)
    docs = SyntheticVectorDocuments(32, DIM, min_sentences=4, max_sentences=8, seed=1)
    opt = torch.optim.AdamW(unit.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        items = [docs[(step * 8 + j) % len(docs)] for j in range(8)]
        batch = collate_documents([{"id": it["id"], "vectors": it["vectors"]} for it in items])
        unit.step_rng = StepRandomness(seed=0, step=step)
        out = unit(batch)
        loss = out["mse"] / unit.counts(batch)["mse"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_teacher_forced_noise_is_per_document_and_eta_gets_its_step_noise():
    """Teacher-forced eval: a document's result does not depend on the other documents of its eval batch nor on
    the batch's padded length (so not on eval_batch_size or the number of ranks); one unguided step is the
    denoiser's x0 from the initial latent of the document's own noise; eta > 0 runs (it needs step noise)."""
    from conceptlm.core.rng import EVAL_STEP
    from conceptlm.lcm.diffusion.ddim import DDIMSampler
    from conceptlm.lcm.variants.two_tower import EVAL_PURPOSE

    torch.manual_seed(4)
    unit = TwoTowerUnit(cfg()).eval()
    randomize_modulation(unit, 6)
    a, b, c = _docs(3, [5, 3, 2], seed=7)
    batch = collate_documents([{"id": 4, "vectors": a}, {"id": 1, "vectors": b}, {"id": 8, "vectors": c}])
    alone = collate_documents([{"id": 1, "vectors": b}])
    for opts in (SamplerOptions(inference_steps=4, guidance_scale=3.0),
                 SamplerOptions(inference_steps=4, guidance_scale=2.0, eta=0.7)):
        both = unit.teacher_forced(batch, opts)
        single = unit.teacher_forced(alone, opts)
        torch.testing.assert_close(both[1, :3], single[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unit.teacher_forced(batch, opts), both, atol=0, rtol=0)  # fixed noise
    one = SamplerOptions(inference_steps=1, guidance_scale=1.0, initial_noise_scale=0.6)
    noise = StepRandomness(seed=0, step=EVAL_STEP).per_example(EVAL_PURPOSE, [1], (1, 12, DIM))[:, 0, :3]
    x_init = DDIMSampler(unit.model.schedule, one).initial_latent(noise)
    z = unit.model.normalize(alone["vectors"])
    t = torch.full((1, 3), int(DDIMSampler(unit.model.schedule, one).timesteps[0]))
    want = unit.model.forward_normalized(z, x_init, t)
    torch.testing.assert_close(unit.teacher_forced(alone, one), want, atol=1e-5, rtol=1e-5)
