"""RobustNormalizer: hand-computed statistics, exact quantiles in column blocks, round trips, clipping, the
reference's percent bug reproduced for comparison, artefact round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conceptlm.core.errors import ConceptLMError
from conceptlm.lcm.data import normalizer as norm_mod
from conceptlm.lcm.data.normalizer import RobustNormalizer, column_quantiles

PHI_IQR = 1.3489795003921634  # Φ⁻¹(0.75) − Φ⁻¹(0.25)


def _x():
    # column 0: 1..5 (median 3, q25 2, q75 4); column 1: constant; column 2: 0, 0, 0, 10, 100
    return torch.tensor([[1.0, 7.0, 0.0], [2.0, 7.0, 0.0], [3.0, 7.0, 0.0], [4.0, 7.0, 10.0], [5.0, 7.0, 100.0]])


def test_hand_computed_gaussian_robust():
    n = RobustNormalizer(3).fit(_x())
    torch.testing.assert_close(n.center, torch.tensor([3.0, 7.0, 0.0]))
    # IQR: col0 4-2=2; col1 0 -> scale 1; col2 q75=10, q25=0 -> 10
    torch.testing.assert_close(n.scale, torch.tensor([2.0 / PHI_IQR, 1.0, 10.0 / PHI_IQR]))
    assert n.n_fit == 5


def test_hand_computed_robust_and_standard():
    r = RobustNormalizer(3, method="robust").fit(_x())
    torch.testing.assert_close(r.scale, torch.tensor([2.0, 1.0, 10.0]))
    s = RobustNormalizer(3, method="standard").fit(_x())
    torch.testing.assert_close(s.center, torch.tensor([3.0, 7.0, 22.0]))
    torch.testing.assert_close(s.scale, torch.tensor([math.sqrt(2.5), 1.0, float(torch.tensor(
        [0.0, 0.0, 0.0, 10.0, 100.0], dtype=torch.float64).std())]))


def test_quantiles_equal_torch_quantile_also_in_small_blocks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(501, 37, generator=g)
    qs = [0.0, 0.0025, 0.25, 0.5, 0.75, 0.9999, 1.0]
    ref = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.float64), dim=0)
    torch.testing.assert_close(column_quantiles(x, qs), ref)
    monkeypatch.setattr(norm_mod, "_SORT_BLOCK", 501 * 3)  # 3 columns per sorted block
    torch.testing.assert_close(column_quantiles(x, qs), ref)


def test_round_trip_exact_within_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 16, generator=g) * 0.05 + 0.01
    n = RobustNormalizer(16).fit(x)
    z = n.normalize(x)
    torch.testing.assert_close(n.denormalize(z), x, rtol=1e-6, atol=1e-7)
    assert z.median(dim=0).values.abs().max() < 0.01
    # gaussian data: documented scale ≈ std ⇒ normalised std ≈ 1
    torch.testing.assert_close(z.std(dim=0), torch.ones(16), atol=0.08, rtol=0)
    assert n.normalize(x.view(100, 20, 16)).shape == (100, 20, 16)


def test_heavy_tails_documented_scale_vs_reference_percent_bug():
    g = torch.Generator().manual_seed(2)
    # Student-t(3) via normal / sqrt(chi2_3 / 3)
    z = torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    chi = (torch.randn(400_000, 2, 3, generator=g, dtype=torch.float64) ** 2).sum(-1)
    t = (z / (chi / 3).sqrt()).float()
    good = RobustNormalizer(2).fit(t).scale
    bad = RobustNormalizer(2, method="reference_percent").fit(t).scale
    # t(3): IQR = 2 * 0.7649 => 1.134; percent-quantile version ≈ 6.6 (the reference fit script)
    torch.testing.assert_close(good, torch.full((2,), 2 * 0.76489 / PHI_IQR), atol=0.02, rtol=0)
    assert (bad > 5.5).all() and (bad < 7.8).all()
    gauss = torch.randn(400_000, 2, generator=g)
    for method in ("gaussian_robust", "reference_percent"):  # both ≈ σ on Gaussian data
        torch.testing.assert_close(RobustNormalizer(2, method=method).fit(gauss).scale, torch.ones(2), atol=0.03,
                                   rtol=0)


def test_clipping_bounds_are_tail_quantiles_of_normalised_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, 4, generator=g)
    n = RobustNormalizer(4, clip_proba=0.01).fit(x)
    z_raw = (x - n.center) / n.scale
    torch.testing.assert_close(n.clip_min, torch.quantile(z_raw, 0.01, dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.clip_max, torch.quantile(z_raw, 0.99, dim=0), atol=1e-5, rtol=0)
    z = n.normalize(x)
    assert (z >= n.clip_min).all() and (z <= n.clip_max).all()
    inside = ((z_raw > n.clip_min) & (z_raw < n.clip_max)).all(dim=1)
    torch.testing.assert_close(n.denormalize(z)[inside], x[inside], rtol=1e-6, atol=1e-6)
    far = torch.full((1, 4), 1e3)
    torch.testing.assert_close(n.denormalize(far)[0], n.clip_max * n.scale + n.center)


def test_max_samples_uses_strided_rows():
    x = torch.arange(100, dtype=torch.float32).view(100, 1)
    n = RobustNormalizer(1, method="robust").fit(x, max_samples=10)  # rows 0, 10, ..., 90
    assert n.n_fit == 10
    torch.testing.assert_close(n.center, torch.tensor([45.0]))
    torch.testing.assert_close(n.scale, torch.tensor([67.5 - 22.5]))


def test_artifact_round_trips_are_exact(tmp_path):
    g = torch.Generator().manual_seed(4)
    n = RobustNormalizer(8, clip_proba=1e-3).fit(torch.randn(3000, 8, generator=g) * 0.006)
    back = RobustNormalizer.from_artifact(json.loads(json.dumps(n.to_artifact())))
    n.save_pretrained(tmp_path)
    loaded = RobustNormalizer.from_pretrained(tmp_path)
    for other in (back, loaded):
        for name in ("center", "scale", "clip_min", "clip_max"):
            assert torch.equal(getattr(other, name), getattr(n, name))
        assert (other.method, other.clip_proba, other.n_fit) == (n.method, n.clip_proba, n.n_fit)
    unclipped = RobustNormalizer(8).fit(torch.randn(50, 8, generator=g))
    assert torch.isinf(RobustNormalizer.from_artifact(unclipped.to_artifact()).clip_max).all()
    fresh = RobustNormalizer(8)
    fresh.load_state_dict(n.state_dict())
    x = torch.randn(5, 8, generator=g)
    assert torch.equal(fresh.normalize(x), n.normalize(x))


def test_bad_artifacts_are_one_line_errors(tmp_path):
    with pytest.raises(ConceptLMError, match="not a normalizer"):
        RobustNormalizer.from_artifact({"dim": 2})
    art = RobustNormalizer(2).to_artifact()
    art["scale"] = [1.0]
    with pytest.raises(ConceptLMError, match="'scale' has 1 values"):
        RobustNormalizer.from_artifact(art)
    (tmp_path / "normalizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ConceptLMError, match="cannot read normalizer") as e:
        RobustNormalizer.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected"):
        RobustNormalizer(3).fit(torch.zeros(4, 2))
