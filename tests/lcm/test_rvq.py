"""Residual vector quantizer: exact codes on hand-built codebooks, partial sums, the coarse-to-fine error curve,
dead-unit re-seeding, determinism, safetensors round trip, and a side-by-side check against vector-quantize-pytorch
(same codes from the same codebooks; our offline fit reconstructs at least as well as its k-means init)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conceptlm.lcm.rvq import ResidualQuantizer, kmeans, squared_distances

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clustered(n: int = 1500, dim: int = 16, clusters: int = 24, seed: int = 0) -> torch.Tensor:
    """Gaussian mixture: structure at several scales, so every extra codebook should help."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 3
    sub = torch.randn(clusters, 4, dim, generator=g)
    which = torch.randint(clusters, (n,), generator=g)
    return centers[which] + sub[which, torch.randint(4, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)


def hand_built() -> ResidualQuantizer:
    q = ResidualQuantizer(2, 2, 4)
    q.set_codebooks(torch.tensor([[[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]],
                                  [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))
    return q


def test_encode_decode_partial_sums_on_hand_built_codebooks():
    q = hand_built()
    codes = torch.tensor([[1, 2], [3, 3], [0, 1], [2, 0]])
    x = q.codebooks[0][codes[:, 0]] + q.codebooks[1][codes[:, 1]]
    assert torch.equal(q.encode(x), codes)
    assert torch.equal(q.decode(codes), x)
    assert torch.equal(q.decode(codes, k=1), q.codebooks[0][codes[:, 0]])
    ps = q.partial_sums(codes)
    assert ps.shape == (4, 3, 2)
    assert torch.equal(ps[:, 0], torch.zeros(4, 2)) and torch.equal(ps[:, 1], q.decode(codes, 1))
    assert torch.equal(ps[:, 2], x)
    # greedy residual choice: 8.4,0.6 -> first unit (8,0), then the residual (0.4,0.6) -> (0,1)
    assert q.encode(torch.tensor([[8.4, 0.6]])).tolist() == [[1, 2]]
    # leading dimensions are kept
    assert q.encode(x.view(2, 2, 2)).shape == (2, 2, 2) and q.partial_sums(codes.view(2, 2, 2)).shape == (2, 2, 3, 2)
    assert torch.allclose(q.distances(torch.tensor([[1.0, 1.0]]), 1), torch.tensor([[2.0, 1.0, 1.0, 0.0]]))
    assert q.nearest(torch.tensor([[0.9, 0.2]]), 1).tolist() == [1]


def test_squared_distances_match_cdist():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.allclose(squared_distances(a, b), torch.cdist(a, b) ** 2, atol=1e-5)


def test_every_codebook_lowers_the_error_and_all_beat_one():
    x = clustered()
    q = ResidualQuantizer(16, 5, 16).fit(x, iters=15, generator=torch.Generator().manual_seed(0))
    curve = q.reconstruction_curve(x)
    mse = [r["mse"] for r in curve]
    assert [r["k"] for r in curve] == list(range(6))
    assert all(a > b for a, b in zip(mse, mse[1:])), mse
    assert mse[5] < 0.5 * mse[1]
    cos = [r["cos"] for r in curve[1:]]
    assert all(a < b for a, b in zip(cos, cos[1:])) and cos[-1] > 0.95
    assert curve[0]["mse"] == pytest.approx(float((x ** 2).mean()), rel=1e-5)
    # the fit log agrees with the curve on the fitting data (greedy encoding = the fit's assignments)
    assert q.fit_log[-1]["sq_error_after"] == pytest.approx(mse[5] * 16, rel=1e-4)
    recon = q.decode(q.encode(x))
    assert torch.allclose(recon, q.partial_sums(q.encode(x))[:, -1], atol=1e-5)


def test_fit_is_deterministic_given_the_generator():
    x = clustered(600)
    a = ResidualQuantizer(16, 3, 8).fit(x, iters=5, generator=torch.Generator().manual_seed(7))
    b = ResidualQuantizer(16, 3, 8).fit(x, iters=5, generator=torch.Generator().manual_seed(7))
    c = ResidualQuantizer(16, 3, 8).fit(x, iters=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)
    r = ResidualQuantizer(16, 3, 8).fit(x, iters=5, generator=torch.Generator().manual_seed(7), init="random")
    assert torch.equal(r.codebooks, ResidualQuantizer(16, 3, 8).fit(
        x, iters=5, generator=torch.Generator().manual_seed(7), init="random").codebooks)


def test_an_empty_unit_is_reseeded_by_splitting_a_cluster():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 2, generator=g) * torch.tensor([2.0, 0.3]) + torch.tensor([10.0, 10.0])
    b = torch.randn(40, 2, generator=g) * torch.tensor([2.0, 0.3]) + torch.tensor([-10.0, -10.0])
    x = torch.cat([a, b])
    init = torch.tensor([[10.0, 10.0], [-10.0, -10.0], [100.0, 100.0]])  # the third unit gets no point

    def sse(c, assign):
        return float(((x - c[assign]) ** 2).sum())

    two = sse(torch.stack([a.mean(0), b.mean(0)]), torch.arange(80) // 40)
    c, assign = kmeans(x, 3, iters=20, generator=torch.Generator().manual_seed(1), init=init, empty="keep")
    assert torch.equal(c[2], init[2]) and torch.bincount(assign, minlength=3)[2] == 0
    assert sse(c, assign) == pytest.approx(two, rel=1e-5)
    c, assign = kmeans(x, 3, iters=20, generator=torch.Generator().manual_seed(1), init=init, empty="split")
    counts = torch.bincount(assign, minlength=3)
    assert bool((counts > 0).all()) and int(counts.max()) == 40  # one cluster split in two, the other intact
    assert sse(c, assign) < 0.75 * two  # split along its long axis: that cluster keeps 1 - 2/pi of its variance
    # as many distinct points as units: every point becomes a unit (either seeding)
    pts = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    for seeding in ("kmeans++", "random"):
        c, assign = kmeans(pts, 6, iters=3, generator=torch.Generator().manual_seed(2), init=seeding)
        assert torch.allclose(c[assign], pts)
    with pytest.raises(ValueError, match="initial centroids"):
        kmeans(x, 3, iters=1, generator=g, init=init[:2])


def test_save_load_round_trip_and_errors(tmp_path):
    q = ResidualQuantizer(16, 2, 8).fit(clustered(300), iters=3)
    path = q.save(tmp_path / "rvq.safetensors")
    r = ResidualQuantizer.load(path)
    assert (r.dim, r.n_codebooks, r.codebook_size) == (16, 2, 8) and bool(r.fitted)
    assert torch.equal(r.codebooks, q.codebooks)
    x = clustered(50, seed=5)
    assert torch.equal(r.encode(x), q.encode(x))
    # a state dict carries the codebooks too (they are buffers)
    s = ResidualQuantizer(16, 2, 8)
    s.load_state_dict(q.state_dict())
    assert torch.equal(s.encode(x), q.encode(x))
    save_file({"codebooks": torch.zeros(2, 8, 16)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a residual quantizer"):
        ResidualQuantizer.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        ResidualQuantizer.load(tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match="fit it"):
        ResidualQuantizer(16, 2, 8).encode(x)
    with pytest.raises(ValueError, match="at least 8"):
        ResidualQuantizer(16, 2, 8).fit(x[:5])
    with pytest.raises(ValueError, match="dim=16"):
        q.encode(torch.zeros(3, 4))


def test_same_codes_as_vector_quantize_pytorch_and_a_fit_at_least_as_good():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    x = clustered(1000)
    ours_curves, theirs_curves = [], []
    for seed in range(3):
        with torch.random.fork_rng():  # its k-means draws from the global generator
            torch.manual_seed(seed)
            ref = vqp.ResidualVQ(dim=16, num_quantizers=4, codebook_size=16, kmeans_init=True, kmeans_iters=15)
            ref.eval()  # eval mode: k-means init on the residuals of this one batch, no EMA update
            _, ref_codes, _ = ref(x[None])
        ref_parts = ref.get_codes_from_indices(ref_codes).cumsum(0)[:, 0]  # (K, N, D)
        theirs_curves.append([float(((x - ref_parts[k]) ** 2).mean()) for k in range(4)])
        q = ResidualQuantizer(16, 4, 16).fit(x, iters=15, generator=torch.Generator().manual_seed(seed))
        ours_curves.append([r["mse"] for r in q.reconstruction_curve(x)[1:]])
        # the same codebooks give the same greedy codes and the same reconstruction in both implementations
        for k, layer in enumerate(ref.layers):
            layer._codebook.embed.data.copy_(q.codebooks[k][None])
        out, codes, _ = ref(x[None])
        assert torch.equal(codes[0], q.encode(x))
        assert torch.allclose(out[0], q.decode(q.encode(x)), atol=1e-5)
    ours = torch.tensor(ours_curves).mean(0)
    theirs = torch.tensor(theirs_curves).mean(0)
    assert bool((ours <= theirs * 1.01).all()), (ours.tolist(), theirs.tolist())
