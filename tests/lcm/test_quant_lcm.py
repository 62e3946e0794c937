"""Quantized LCM: unit sampling (temperature / top-k / top-p, Eq. 23), the interleaved mask and its equality with the
incremental inference layout, the loss by hand on a fixed model, the per-example draws, generation (cached ==
uncached, batched == single, hand-built models emit known sums of centroids), checkpoint round trip, and a short
training run that lowers the loss."""

from __future__ import annotations

import math

import pytest
import torch

from conceptlm.core.rng import StepRandomness
from conceptlm.lcm.config import GenerationOptions, LCMSection, QuantSamplingOptions, QuantSection
from conceptlm.lcm.generate import generate
from conceptlm.lcm.sequence import TEACHER_FORCED_METRICS, collate_documents
from conceptlm.lcm.variants.quant import QuantLCM, QuantLCMUnit, sample_units

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM = 6


def section(model: str = "quant_d", *, n_layers: int = 2, k: int = 3, c: int = 4, positions: str = "rope",
            cfg_dropout: float = 0.15, d_model: int = 16, max_sentences: int = 12) -> LCMSection:
    return LCMSection(model=model, dim=DIM, d_model=d_model, n_layers=n_layers, n_heads=2, d_ff=32, dropout=0.0,
                      positions=positions, max_sentences=max_sentences,
                      quant=QuantSection(n_codebooks=k, codebook_size=c, fit_samples=400, fit_iters=5,
                                         cfg_dropout=cfg_dropout))


def documents(n: int = 6, seed: int = 0, lo: int = 3, hi: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"id": i, "vectors": torch.randn(int(torch.randint(lo, hi, (1,), generator=g)), DIM, generator=g)}
            for i in range(n)]


def fitted(model: QuantLCM, seed: int = 0) -> QuantLCM:
    x = torch.randn(300, DIM, generator=torch.Generator().manual_seed(seed))
    model.fit_quantizer(model.normalize(x), generator=torch.Generator().manual_seed(1))
    return model


def opts(**quant) -> GenerationOptions:
    return GenerationOptions(max_new_sentences=4, eos_threshold=None, repetition_threshold=None,
                             quant=QuantSamplingOptions(**quant))


# ------------------------------------------------------------------------------------------------ sampling
def test_sample_units_inverts_the_cdf_with_top_k_and_top_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()[[2, 0, 3, 1]].unsqueeze(0).expand(1000, 4)  # shuffled: units 1, 3, 0, 2 by probability
    u = (torch.arange(1000) + 0.5) / 1000

    def counts(**kw):
        return torch.bincount(sample_units(logits, u, **kw), minlength=4).tolist()

    assert counts(temperature=1.0) == [150, 500, 50, 300]
    assert counts(temperature=1.0, top_k=2) == [0, 625, 0, 375]
    assert counts(temperature=1.0, top_p=0.45) == [0, 1000, 0, 0]
    assert counts(temperature=1.0, top_p=0.7) == [0, 625, 0, 375]
    assert counts(temperature=1.0, top_p=0.9) == [158, 526, 0, 316]  # 0.15/0.95, 0.5/0.95, 0.3/0.95
    # the nucleus is taken after top-k renormalization: 0.5 < 0.51 keeps two units, 0.5 / 0.95 > 0.51 only one
    assert counts(temperature=1.0, top_p=0.51) == [0, 625, 0, 375]
    assert counts(temperature=1.0, top_k=3, top_p=0.51) == [0, 1000, 0, 0]
    hot = torch.softmax(p.log() / 2.0, 0)[[2, 0, 3, 1]]
    assert counts(temperature=2.0) == pytest.approx((hot * 1000).tolist(), abs=1)
    assert counts(temperature=0.0) == [0, 1000, 0, 0] == counts(temperature=5.0, top_k=1)


def hand_quantizer_model(model: str, n_layers: int = 0, **kw) -> QuantLCM:
    """dim 6, 2 codebooks of 4 hand-set centroids, identity normalizer."""
    m = QuantLCM(section(model, n_layers=n_layers, k=2, c=4, positions="none", **kw))
    books = torch.zeros(2, 4, DIM)
    books[0, :, 0] = torch.tensor([0.0, 4.0, -4.0, 8.0])
    books[1, :, 1] = torch.tensor([0.0, 1.0, -1.0, 2.0])
    m.quantizer.set_codebooks(books)
    return m


def test_continuous_unit_choice_is_nearest_or_equation_23():
    m = hand_quantizer_model("quant_c")
    partial = torch.zeros(1000, DIM)
    y = torch.zeros(1000, DIM)
    y[:, 0] = 3.0  # residual (3, 0, ...): squared distances to codebook 0 = 9, 1, 49, 25
    u = (torch.arange(1000) + 0.5) / 1000
    greedy = m.pick(y, partial, 0, u, QuantSamplingOptions(temperature=0.0))
    assert greedy.unique().tolist() == [1]
    temp = 4.0
    got = torch.bincount(m.pick(y, partial, 0, u, QuantSamplingOptions(temperature=temp, top_k=0)), minlength=4)
    want = torch.softmax(-torch.tensor([9.0, 1.0, 49.0, 25.0]) / temp, 0) * 1000
    assert got.tolist() == pytest.approx(want.tolist(), abs=1)
    top2 = torch.bincount(m.pick(y, partial, 0, u, QuantSamplingOptions(temperature=temp, top_k=2)), minlength=4)
    assert top2[2] == 0 and top2[3] == 0 and top2.sum() == 1000
    # the residual is prediction - partial sum: with partial = the first centroid, codebook 1 sees (0, 0.9, ...)
    y2, part2 = torch.zeros(1, DIM), torch.zeros(1, DIM)
    y2[0, :2] = torch.tensor([4.0, 0.9])
    part2[0, 0] = 4.0
    assert m.pick(y2, part2, 1, None, QuantSamplingOptions(temperature=0.0)).tolist() == [1]


# ------------------------------------------------------------------------------------------------ layout
def test_mask_later_sentences_and_dropped_queries():
    torch.manual_seed(0)
    m = fitted(QuantLCM(section("quant_c", n_layers=2))).eval()
    b, n = 2, 5
    z = torch.randn(b, n, DIM)
    q = torch.randn(b, n, DIM)
    stage = torch.randint(3, (b, n))
    out = m.forward_interleaved(q, z, stage)
    z2, q2 = z.clone(), q.clone()
    z2[:, 3:] += 1.0
    q2[:, 3:] -= 1.0
    out2 = m.forward_interleaved(q2, z2, stage)
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)
    assert not torch.allclose(out[:, 3:], out2[:, 3:], atol=1e-3)
    # a query never sees another sentence's query copy
    q3 = q.clone()
    q3[:, 1] += 5.0
    out3 = m.forward_interleaved(q3, z, stage)
    assert torch.allclose(out3[:, [0, 2, 3, 4]], out[:, [0, 2, 3, 4]], atol=1e-6)
    # a dropped query sees only itself: its output does not depend on the context
    drop = torch.zeros(b, n, dtype=torch.bool)
    drop[:, 3] = True
    z4 = z.clone()
    z4[:, :3] = torch.randn(b, 3, DIM)
    assert torch.allclose(m.forward_interleaved(q, z, stage, drop=drop)[:, 3],
                          m.forward_interleaved(q, z4, stage, drop=drop)[:, 3], atol=1e-6)
    assert not torch.allclose(m.forward_interleaved(q, z, stage)[:, 3], m.forward_interleaved(q, z4, stage)[:, 3])


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_training_layout_equals_the_incremental_inference_layout(positions):
    torch.manual_seed(1)
    m = fitted(QuantLCM(section("quant_d", n_layers=2, positions=positions))).eval()
    n = 4
    z = torch.randn(1, n, DIM)
    codes = m.quantizer.encode(z)
    stage = torch.tensor([[0, 2, 1, 2]])
    q = m.query_inputs(codes, stage)
    assert torch.allclose(q[0, 1], m.quantizer.decode(codes[0, 1:2], k=2)[0])  # stage 2 = first two centroids
    assert torch.equal(q[0, 0], torch.zeros(DIM))
    out = m.forward_interleaved(q, z, stage)
    for t in range(n):  # [clean 0..t-1, query t] with plain causal attention, positions 0..t-1, t
        h = torch.cat([m.embed(z[:, :t], m.clean_index), m.embed(q[:, t:t + 1], stage[:, t:t + 1])], dim=1)
        ref = m.head(m.trunk(h, torch.arange(t + 1).unsqueeze(0)))[:, -1]
        assert torch.allclose(out[:, t], ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------ training
def fixed_unit(model: str) -> QuantLCMUnit:
    """0 layers, identity PreNet, zero index embeddings: the head sees the query input (partial sum) alone."""
    unit = QuantLCMUnit(section(model, n_layers=0, k=2, c=4, positions="none", d_model=DIM))
    m = unit.model
    m.quantizer.set_codebooks(hand_quantizer_model(model).quantizer.codebooks)
    with torch.no_grad():
        m.prenet.weight.copy_(torch.eye(DIM))
        m.prenet.bias.zero_()
        m.index_embedding.weight.zero_()
        if model == "quant_c":
            m.head.weight.copy_(torch.eye(DIM) * 0.5)
            m.head.bias.fill_(0.25)
        else:
            m.head.weight.copy_(torch.arange(4 * DIM, dtype=torch.float32).view(4, DIM) / 20 - 0.5)
            m.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    return unit


@pytest.mark.parametrize("model", ["quant_d", "quant_c"])
def test_loss_by_hand(model):
    unit = fixed_unit(model)
    m = unit.model
    batch = collate_documents(documents(4, seed=2))
    batch["vectors"] *= 4.0
    batch["loss_mask"] = batch["mask"].clone()
    batch["loss_mask"][0, 1] = False
    unit.step_rng = StepRandomness(seed=3, step=5)
    unit.train()
    batch = unit.prepare(batch)
    out = unit(batch)
    rng = StepRandomness(seed=3, step=5)
    t = batch["mask"].shape[1]
    u = rng.per_example("lcm-quant-stage", batch["ids"], (12,), sampler=torch.rand)[:, :t]
    want, n = 0.0, 0
    for i in range(len(batch["ids"])):
        for j in range(t):
            if not batch["loss_mask"][i, j]:
                continue
            x = batch["vectors"][i, j]
            codes = m.quantizer.encode(x)
            k = min(int(u[i, j] * 2), 1) + 1  # codebook 1 or 2
            partial = m.quantizer.decode(codes, k=k - 1) if k > 1 else torch.zeros(DIM)
            head = m.head.weight @ partial + m.head.bias
            if model == "quant_d":
                want += float((torch.logsumexp(head, 0) - head[codes[k - 1]]).detach())
            else:
                want += float(((head - x) ** 2).sum().detach())
            n += 1
    part = "ce" if model == "quant_d" else "mse"
    assert float(out[part].detach()) == pytest.approx(want, rel=1e-5)
    assert int(unit.counts(batch)[part]) == n == int(batch["mask"].sum()) - 1
    assert int(unit.counts(batch)["tokens"]) == int(batch["mask"].sum())
    assert set(out) <= {part, *unit.metric_names}
    if model == "quant_d":
        assert unit.metric_names == (*TEACHER_FORCED_METRICS, "unit_acc") and int(out["unit_acc"][1]) == n


def test_draws_are_per_example_uniform_and_independent_of_padding():
    unit = QuantLCMUnit(section("quant_d", k=4, cfg_dropout=0.3, max_sentences=64))
    unit.step_rng = StepRandomness(seed=0, step=2)
    ids = torch.arange(200)
    stage, drop = unit.draws(ids, 64, torch.device("cpu"))
    freq = torch.bincount(stage.flatten(), minlength=4).float() / stage.numel()
    assert freq.tolist() == pytest.approx([0.25] * 4, abs=0.02)
    assert float(drop.float().mean()) == pytest.approx(0.3, abs=0.02)
    s_short, d_short = unit.draws(ids[[7, 3]], 5, torch.device("cpu"))  # another batch, shorter padding
    assert torch.equal(s_short, stage[[7, 3], :5]) and torch.equal(d_short, drop[[7, 3], :5])
    unit.step_rng = None  # a fixed stream without the trainer
    assert torch.equal(unit.draws(ids[:3], 5, torch.device("cpu"))[0], unit.draws(ids[:3], 5, torch.device("cpu"))[0])
    with pytest.raises(ValueError, match="max_sentences"):
        unit.draws(ids[:1], 65, torch.device("cpu"))


def test_errors():
    with pytest.raises(ValueError, match="quant_d or quant_c"):
        QuantLCM(section("base"))
    unit = QuantLCMUnit(section("quant_c"))
    batch = collate_documents(documents(2))
    with pytest.raises(RuntimeError, match="fit"):
        unit(batch)
    with pytest.raises(RuntimeError, match="fit"):
        generate(unit.model, [batch["vectors"][0, :2]], options=opts())
    with pytest.raises(ValueError, match="codebook_size"):
        unit.model.fit_quantizer(torch.randn(3, DIM))


def structured_documents(n: int, seed: int) -> list[dict]:
    """Sentence t + 1 follows sentence t through a fixed cycle of 6 prototypes (plus a little noise)."""
    g = torch.Generator().manual_seed(123)
    protos = torch.randn(6, DIM, generator=g) * 1.5
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        a = int(torch.randint(6, (1,), generator=g))
        idx = (a + torch.arange(6)) % 6
        docs.append({"id": i, "vectors": protos[idx] + 0.05 * torch.randn(6, DIM, generator=g)})
    return docs


@pytest.mark.parametrize("model", ["quant_d", "quant_c"])
def test_short_training_lowers_the_loss(model):
    torch.manual_seed(0)
    unit = QuantLCMUnit(section(model, n_layers=2, k=3, c=8, d_model=32, cfg_dropout=0.1))
    train = structured_documents(64, seed=1)
    unit.model.fit_quantizer(torch.cat([d["vectors"] for d in train]), generator=torch.Generator().manual_seed(0))
    val = unit.prepare(collate_documents(structured_documents(16, seed=2)))
    part = "ce" if model == "quant_d" else "mse"

    def val_loss() -> float:
        unit.eval()
        unit.step_rng = StepRandomness(seed=0, step=-1)
        with torch.no_grad():
            return float(unit(val)[part]) / int(unit.counts(val)[part])

    def val_l2() -> tuple[float, float]:
        m = unit.eval_metrics(val)
        return float(m["l2"][0]) / m["l2"][1], float(m["l2_prev"][0]) / m["l2_prev"][1]

    before, (l2_before, l2_prev) = val_loss(), val_l2()
    opt = torch.optim.AdamW(unit.parameters(), lr=5e-3)
    for step in range(40):
        unit.train()
        unit.step_rng = StepRandomness(seed=0, step=step)
        batch = unit.prepare(collate_documents([train[(step * 16 + j) % 64] for j in range(16)]))
        loss = unit(batch)[part] / unit.counts(batch)[part]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, (l2_after, _) = val_loss(), val_l2()
    # D keeps the entropy of the first sentence and of the noise codes; C regresses the vector itself
    assert after < (0.8 if model == "quant_d" else 0.2) * before, (before, after)
    # the coarse-to-fine teacher-forced prediction found the next prototype (copying the previous one does not)
    assert l2_after < 0.3 * l2_prev and l2_after < 0.3 * l2_before, (l2_before, l2_after, l2_prev)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("model,quant", [
    ("quant_d", {"temperature": 1.0, "top_k": 3, "top_p": 0.9, "guidance_scale": 1.5}),
    ("quant_d", {"temperature": 1.0, "top_k": 0}),
    ("quant_c", {"temperature": 0.5, "top_k": 3, "guidance_scale": 2.0}),
])
def test_cached_equals_uncached_and_batched_equals_single(model, quant):
    torch.manual_seed(2)
    m = fitted(QuantLCM(section(model, n_layers=2)))
    m.set_normalizer(torch.full((DIM,), 0.1), torch.full((DIM,), 2.0))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randn(n, DIM, generator=g) for n in (2, 1, 5)]
    outs = {}
    for cache in (True, False):
        o = opts(**quant)
        o.use_cache = cache
        outs[cache] = generate(m, prompts, options=o)
    for a, b in zip(outs[True], outs[False]):
        assert a.vectors.shape == (4, DIM)
        assert torch.allclose(a.vectors, b.vectors, atol=1e-5)
    # a document's draws depend on its row only: the first two rows alone (other padding width) are the same
    assert len(prompts[2]) > max(len(prompts[0]), len(prompts[1]))
    for a, s in zip(outs[True], generate(m, prompts[:2], options=opts(**quant))):
        assert torch.allclose(a.vectors, s.vectors, atol=1e-5)
    # greedy: every document alone equals its row of the batch
    greedy = {**quant, "temperature": 0.0}
    batched = generate(m, prompts, options=opts(**greedy))
    for p, a in zip(prompts, batched):
        assert torch.allclose(generate(m, [p], options=opts(**greedy))[0].vectors, a.vectors, atol=1e-5)
    # the emitted sentences are sums of one centroid per codebook (in normalized space)
    z = m.normalize(outs[True][0].vectors)
    assert torch.allclose(m.quantizer.decode(m.quantizer.encode(z)), z, atol=1e-4)
    # sampling is on: another seed gives another document
    o = opts(**quant)
    o.seed = 1
    assert not all(torch.allclose(a.vectors, b.vectors) for a, b in zip(generate(m, prompts, options=o), outs[True]))


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_combines_the_conditional_and_the_context_free_query(use_cache):
    torch.manual_seed(5)
    m = fitted(QuantLCM(section("quant_c", n_layers=2, positions="learned"))).eval()
    prompts = [torch.randn(3, DIM), torch.randn(1, DIM)]
    g = 2.5
    o = opts(temperature=0.0, guidance_scale=g)
    o.use_cache = use_cache
    pred = m.predictor(o)
    keep = torch.tensor([[True, True, True], [False, False, True]])
    z = torch.zeros(2, 3, DIM)
    z[0], z[1, 2:] = prompts[0], prompts[1]
    positions = torch.tensor([[0, 1, 2], [0, 0, 0]])
    pred.start(z, keep, positions, [0, 1])
    partial = torch.randn(2, DIM)
    got = pred._query(partial, 1)
    for i, p in enumerate(prompts):
        n = len(p)
        h = torch.cat([m.embed(p[None], m.clean_index), m.embed(partial[i:i + 1, None], 1)], dim=1)
        cond = m.head(m.trunk(h, torch.arange(n + 1)[None]))[0, -1]
        unc = m.head(m.trunk(m.embed(partial[i:i + 1, None], 1), torch.tensor([[n]])))[0, -1]
        assert torch.allclose(got[i], unc + g * (cond - unc), atol=1e-5)


def test_greedy_models_emit_known_sums_of_centroids():
    m = hand_quantizer_model("quant_d", n_layers=1)
    with torch.no_grad():  # always unit 3, whatever the input
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    docs = generate(m, [torch.randn(2, DIM), torch.randn(4, DIM)], options=opts(temperature=0.0))
    want = m.quantizer.codebooks[:, 3].sum(0)
    for d in docs:
        assert torch.allclose(d.vectors, want.expand(4, DIM))
    # top-k 1 is greedy whatever the temperature
    docs = generate(m, [torch.randn(2, DIM)], options=opts(temperature=3.0, top_k=1))
    assert torch.allclose(docs[0].vectors, want.expand(4, DIM))
    # Quant-C predicting a constant vector v with nearest-centroid choice emits the greedy RVQ code of v
    c = hand_quantizer_model("quant_c", n_layers=1)
    v = torch.tensor([3.7, -1.2, 0.5, 0.0, 0.0, 0.0])
    with torch.no_grad():
        c.head.weight.zero_()
        c.head.bias.copy_(v)
    docs = generate(c, [torch.randn(3, DIM)], options=opts(temperature=0.0))
    assert torch.allclose(docs[0].vectors[0], c.quantizer.decode(c.quantizer.encode(v)))
    assert docs[0].vectors[0].tolist()[:2] == [4.0, -1.0]


def test_state_dict_round_trip_keeps_the_codebooks():
    torch.manual_seed(3)
    m = fitted(QuantLCM(section("quant_c")))
    m2 = QuantLCM(section("quant_c"))
    m2.load_state_dict(m.state_dict())
    assert bool(m2.quantizer.fitted) and torch.equal(m2.quantizer.codebooks, m.quantizer.codebooks)
    p = [torch.randn(3, DIM)]
    assert torch.equal(generate(m, p, options=opts(temperature=0.3))[0].vectors,
                       generate(m2, p, options=opts(temperature=0.3))[0].vectors)
    curve = m.fit_quantizer(torch.randn(1000, DIM))  # strided to fit_samples = 400
    assert [r["k"] for r in curve] == [0, 1, 2, 3] and curve[-1]["mse"] < curve[0]["mse"]
    assert math.isfinite(curve[-1]["cos"])
