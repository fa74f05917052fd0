"""stats: the chi-square survival function against closed forms (integer df), the G-test
and PIT calibration under the null, Holm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refcomplete import stats


def chi2_sf_closed(x: float, k: int) -> float:
    """Closed forms: even k: e^{-x/2} sum_{i<k/2} (x/2)^i/i!; odd k: erfc(sqrt(x/2)) +
    e^{-x/2} sum_{i=1}^{(k-1)/2} (x/2)^{i-1/2} / Gamma(i+1/2)."""
    h = x / 2
    if k % 2 == 0:
        return math.exp(-h) * sum(h ** i / math.factorial(i) for i in range(k // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * sum(
        h ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, (k - 1) // 2 + 1))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 9, 10, 31, 50, 99, 150])
def test_chi2_sf_matches_closed_forms(k):
    for x in [0.01, 0.5, 1, k / 2, k - 1, k, k + 1, 1.5 * k + 3, 3 * k + 20]:
        want = chi2_sf_closed(x, k)
        assert stats.chi2_sf(x, k) == pytest.approx(want, rel=1e-9, abs=1e-300), (x, k)


def test_chi2_sf_known_percentage_points():
    assert stats.chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert stats.chi2_sf(6.634896601021214, 1) == pytest.approx(0.01, rel=1e-9)
    assert stats.chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert stats.chi2_sf(0, 3) == 1.0 and stats.chi2_sf(1e4, 3) < 1e-300 + 1e-200
    assert stats.normal_sf2(1.959963984540054) == pytest.approx(0.05, rel=1e-9)


def test_pooling_keeps_the_total_and_every_cell_large():
    o, e, labels = stats.pool([50, 30, 1, 2, 0, 1], [48.0, 31.0, 2.0, 1.0, 1.5, 1.5])
    assert o.sum() == 84 and e.sum() == pytest.approx(85.0) and min(e) >= 5 and -1 in labels
    o, e, labels = stats.pool([50, 30, 1], [48.0, 31.0, 2.0])     # a tail too small: merged
    assert len(o) == 2 and o.sum() == 81 and labels.count(-1) == 1


def test_g_test_and_pit_are_calibrated_under_the_null():
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.full(40, 0.3))
    ps = [stats.g_test(np.bincount(rng.choice(40, 2000, p=p), minlength=40), 2000 * p)[2]
          for _ in range(400)]
    for level in (0.05, 0.2):   # within 3.5 binomial standard deviations
        assert abs(np.mean(np.array(ps) < level) - level) < 3.5 * math.sqrt(level * (1 - level) / 400)
    pits = [stats.pit(p, int(rng.choice(40, p=p)), rng.random()) for _ in range(5000)]
    assert stats.uniform_chi2(pits)[2] > 1e-3
    skewed = [stats.pit(p, int(np.argmax(p)), rng.random()) for _ in range(200)]
    assert stats.uniform_chi2(skewed)[2] < 1e-10


def test_pit_ranks_by_probability_then_id():
    p = np.array([0.2, 0.5, 0.2, 0.1])
    assert stats.pit(p, 1, 0.0) == 0.0 and stats.pit(p, 0, 0.0) == pytest.approx(0.5)
    assert stats.pit(p, 2, 0.5) == pytest.approx(0.8) and stats.pit(p, 3, 1.0) == pytest.approx(1.0)


def test_holm_and_tvd():
    assert stats.holm([0.001, 0.04, 0.03], 0.05) == [True, False, False]
    assert stats.holm([0.01, 0.02, 0.03], 0.06) == [True, True, True]
    assert stats.holm([], 0.05) == []
    assert stats.tvd([2, 2, 0], [0.5, 0.25, 0.25]) == pytest.approx(0.25)


def test_the_monte_carlo_g_test_is_valid_and_agrees_with_chi_square_in_the_bulk():
    rng = np.random.default_rng(9)
    p = rng.dirichlet(np.full(60, 0.3))
    counts = np.bincount(rng.choice(60, 2000, p=p), minlength=60)
    g, df, pc, pm = stats.g_test_mc(counts, 2000 * p, rng, 20000)
    g2, df2, pc2 = stats.g_test(counts, 2000 * p)
    assert g == pytest.approx(g2, rel=1e-12) and df == df2 and pc == pytest.approx(pc2)
    assert abs(pc - pm) < 0.05
    ps = np.array([stats.g_test_mc(np.bincount(rng.choice(60, 2000, p=p), minlength=60),
                                   2000 * p, rng, 1000)[3] for _ in range(200)])
    assert np.mean(ps < 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200)
    far = np.zeros(60)
    far[np.argmax(p)] = 2000
    assert stats.g_test_mc(far, 2000 * p, rng, 1000)[3] == 1 / 1001
