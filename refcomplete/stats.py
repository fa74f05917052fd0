"""The few statistical tests `refcomplete compare --sampling` needs, in pure Python/NumPy.

Knows: the chi-square survival function (through the regularized upper incomplete gamma
function, Numerical Recipes' series and Lentz continued fraction), a G-test of counts
against expected counts with the sparse cells pooled, the randomised probability
integral transform (PIT) of a discrete draw, a chi-square test of uniformity, a
two-sided normal tail, Holm's step-down correction, and total variation distance.
Does not know: models, servers, sampling parameters (compare_sampling.py).

    >>> round(chi2_sf(3.841458820694124, 1), 6)         # the 5% point of chi-square(1)
    0.05
    >>> holm([0.001, 0.04, 0.03], alpha=0.05)            # 0.001 < 0.05/3, 0.03 > 0.05/2
    [True, False, False]
"""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-15
_TINY = 1e-300


def gammaincc(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a), the regularized upper incomplete gamma function."""
    if a <= 0:
        raise ValueError("a must be positive")
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:                                      # the series for P converges fast
        term = total = 1.0 / a
        ap = a
        for _ in range(100000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    b = x + 1 - a                                      # Lentz's continued fraction for Q
    c, d = 1.0 / _TINY, 1.0 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < _EPS:
            break
    return min(1.0, math.exp(log_front) * h)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df)."""
    return gammaincc(df / 2.0, x / 2.0) if x > 0 else 1.0


def normal_sf2(z: float) -> float:
    """Two-sided normal tail P(|Z| >= |z|)."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def pool(observed, expected, min_expected: float = 5.0):
    """(observed, expected, labels) with every cell of expected count < min_expected pooled
    into one tail cell (itself merged into the smallest other cell if still too small).
    labels[i] is the input index of a kept cell, -1 for the tail."""
    o, e = np.asarray(observed, float), np.asarray(expected, float)
    big = e >= min_expected
    ko, ke, labels = list(o[big]), list(e[big]), list(np.flatnonzero(big))
    to, te = o[~big].sum(), e[~big].sum()
    if te > 0 or to > 0:
        if te >= min_expected or not ke:
            ko, ke, labels = ko + [to], ke + [te], labels + [-1]
        else:
            j = int(np.argmin(ke))
            ko[j], ke[j], labels[j] = ko[j] + to, ke[j] + te, -1
    return np.array(ko), np.array(ke), labels


def g_test(observed, expected, min_expected: float = 5.0) -> tuple[float, int, float]:
    """(G, degrees of freedom, p) of counts against expected counts of the same total,
    cells with expected < min_expected pooled. G = 2 sum O ln(O / E)."""
    o, e, _ = pool(observed, expected, min_expected)
    if len(o) < 2:
        return 0.0, 0, 1.0
    e = e * (o.sum() / e.sum())
    nz = o > 0
    g = float(2.0 * np.sum(o[nz] * np.log(o[nz] / e[nz])))
    df = len(o) - 1
    return g, df, chi2_sf(g, df)


def g_test_mc(observed, expected, rng, reps: int = 20000, min_expected: float = 5.0):
    """(G, df, p from chi-square, p by Monte Carlo): the G-test with its p-value also from
    `reps` multinomial draws of the pooled cells under the null, (1 + #{G* >= G}) /
    (reps + 1). That p is valid at any level whatever the cell sizes (the chi-square one
    runs 2-4x small at the 5e-4 level with cells of 5 to 10); it is never below
    1 / (reps + 1)."""
    o, e, _ = pool(observed, expected, min_expected)
    if len(o) < 2:
        return 0.0, 0, 1.0, 1.0
    n = int(o.sum())
    q = e / e.sum()
    g = _g(o[None, :], n * q)[0]
    sims = _g(rng.multinomial(n, q, size=reps), n * q)
    return float(g), len(o) - 1, chi2_sf(g, len(o) - 1), \
        float((1 + np.count_nonzero(sims >= g * (1 - 1e-12))) / (reps + 1))


def _g(o: np.ndarray, e: np.ndarray) -> np.ndarray:
    """G = 2 sum O ln(O / E) per row of o [R, k]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(o > 0, o * np.log(o / e), 0.0)
    return 2.0 * terms.sum(axis=1)


def pit(p: np.ndarray, token: int, u: float) -> float:
    """Randomised PIT of a draw `token` from p: the mass of the tokens ranked before it
    (probability descending, ties by ascending id) plus u * p[token]. Uniform on [0, 1)
    when token ~ p and u ~ U(0, 1) independently."""
    pt = p[token]
    before = p[p > pt].sum() + p[:token][p[:token] == pt].sum()
    return float(min(1.0, (before + u * pt) / p.sum()))


def score_term(p: np.ndarray, f: dict, token: int) -> tuple[float, float]:
    """(f(token) - E_p f, Var_p f) for a function f of the tokens (a dict, 0 elsewhere): one
    step's term of a score test. Summed over the steps of paths drawn from p, the first
    is a martingale: sum / sqrt(sum of the second) is about N(0, 1) under the null."""
    ids, vals = np.fromiter(f, int, len(f)), np.fromiter(f.values(), float, len(f))
    e = float(p[ids] @ vals)
    return f.get(token, 0.0) - e, float(p[ids] @ vals ** 2) - e * e


def uniform_chi2(values, bins: int = 10) -> tuple[float, int, float]:
    """(X2, df, p): Pearson's chi-square of values in [0, 1) against the uniform, equal bins."""
    v = np.asarray(values, float)
    if len(v) < 5 * bins:
        bins = max(2, len(v) // 5)
    counts = np.bincount(np.minimum((v * bins).astype(int), bins - 1), minlength=bins)
    e = len(v) / bins
    x2 = float(((counts - e) ** 2).sum() / e)
    return x2, bins - 1, chi2_sf(x2, bins - 1)


def holm(pvalues, alpha: float) -> list[bool]:
    """Holm's step-down: which hypotheses to reject, family-wise error rate <= alpha."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    reject = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        reject[i] = True
    return reject


def tvd(counts, p) -> float:
    """Total variation distance between the empirical distribution of counts and p."""
    c = np.asarray(counts, float)
    return float(0.5 * np.abs(c / c.sum() - np.asarray(p, float)).sum())
