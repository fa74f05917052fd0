"""Each sampling stage on hand-built 4-token distributions; fast paths against slow twins."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refcomplete import sampling as S
from refcomplete.kernels import fmath, fmath_numba
from refcomplete.sampling import SamplingParams, State


def state(**kw):
    counts = kw.pop("counts", {})
    return State(SamplingParams(**kw), counts)


Z = np.log(np.array([0.1, 0.4, 0.3, 0.2]))


def test_stage_order_is_written_once():
    assert [name for name, _ in S.STAGES] == ["logit_bias", "penalties", "temperature",
                                              "softmax", "top_p"]
    assert S.GREEDY_STAGES == S.STAGES[:2]


def test_logit_bias_adds_to_listed_ids():
    out = S.logit_bias(Z, state(logit_bias=((0, 2.0), (3, -100.0))))
    assert out.tolist() == [Z[0] + 2.0, Z[1], Z[2], Z[3] - 100.0]


def test_penalties_follow_openais_formula():
    # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    st_ = state(frequency_penalty=0.5, presence_penalty=1.5, counts={1: 3, 2: 1})
    c = np.array([0, 3, 1, 0])
    expected = Z - c * 0.5 - (c > 0) * 1.5
    assert np.array_equal(S.penalties(Z, st_), expected)


def test_negative_penalties_encourage_repetition():
    out = S.penalties(Z, state(frequency_penalty=-2.0, presence_penalty=-2.0, counts={0: 2}))
    assert out[0] == Z[0] + 6.0 and np.array_equal(out[1:], Z[1:])


def test_temperature_divides():
    assert np.array_equal(S.temperature(Z, state(temperature=0.5)), Z / 0.5)
    assert S.temperature(Z, state(temperature=1.0)) is Z


def test_softmax_float64():
    p = S.softmax(np.array([0.0, 0.0, np.log(2.0), 0.0]))
    assert p.dtype == np.float64 and np.allclose(p, [0.2, 0.2, 0.4, 0.2])


@pytest.mark.parametrize("top_p,kept", [
    (0.0, [1]),            # the first token is always kept
    (0.4, [1]),            # mass before 0.3 is 0.4, not < 0.4
    (0.41, [1, 2]),
    (0.7, [1, 2]),         # before 0.2 is 0.7: dropped
    (0.71, [1, 2, 3]),
    (0.95, [0, 1, 2, 3]),
    (1.0, [0, 1, 2, 3]),
])
def test_top_p_keeps_while_mass_before_is_below(top_p, kept):
    p = np.array([0.1, 0.4, 0.3, 0.2])
    out = S.top_p(p, state(top_p=top_p))
    assert np.flatnonzero(out).tolist() == kept
    assert np.isclose(out.sum(), 1.0)
    assert np.allclose(out[kept], p[kept] / p[kept].sum())


def test_top_p_ties_break_by_ascending_id():
    p = np.array([0.25, 0.25, 0.25, 0.25])
    assert np.flatnonzero(S.top_p(p, state(top_p=0.5))).tolist() == [0, 1]
    assert np.flatnonzero(S.top_p(p, state(top_p=0.3))).tolist() == [0, 1]
    assert np.flatnonzero(S.top_p(p, state(top_p=0.2))).tolist() == [0]


BACKENDS = pytest.mark.parametrize("ops", [fmath, fmath_numba], ids=["numpy", "numba"])


@BACKENDS
def test_select_walks_ascending_ids(ops):
    p = np.array([0.1, 0.4, 0.3, 0.2])
    assert [S.select(p, u, ops) for u in (0.0, 0.0999, 0.1, 0.49, 0.5, 0.79, 0.8, 0.9999)] == \
        [0, 0, 1, 1, 2, 2, 3, 3]
    assert S.select(np.array([0.0, 0.5, 0.0, 0.5]), 0.0, ops) == 1    # zero mass is never chosen
    assert S.select(np.array([0.5, 0.0, 0.5, 0.0]), 0.9999, ops) == 2  # nor after the last kept
    assert S.select(p * 3, 0.5, ops) == S.select(p, 0.5, ops)          # unnormalised is fine
    tiny = np.zeros(50257)                                             # subnormal mass counts
    tiny[[7, 40000]] = 5e-324, 1e-310
    assert [S.select(tiny, u, ops) for u in (0.0, 0.9999)] == [7, 40000] == \
        [S.select_reference(tiny, u) for u in (0.0, 0.9999)]


def test_greedy_lowest_id_on_ties():
    assert S.greedy(np.array([1.0, 3.0, 3.0, 2.0])) == 1


def test_run_greedy_stops_after_penalties():
    x, seen = S.run(Z, state(temperature=0.0, logit_bias=((0, 5.0),)), trace=True)
    assert [n for n, _ in seen] == ["logit_bias", "penalties"]
    assert S.greedy(x) == 0


def test_stages_do_not_mutate_their_input():
    z = Z.copy()
    st_ = state(temperature=0.7, top_p=0.5, frequency_penalty=1, presence_penalty=1,
                logit_bias=((1, 3.0),), counts={2: 2})
    p, seen = S.run(z, st_, trace=True)
    assert np.array_equal(z, Z)
    assert len({id(x) for _, x in seen}) == len(seen)     # a new array after every stage
    assert np.isclose(p.sum(), 1.0)


def test_top_k_descending_ties_by_id():
    x = np.array([1.0, 5.0, 3.0, 5.0, 3.0])
    assert S.top_k(x, 3) == [1, 3, 2]
    assert S.top_k(x, 0) == []
    assert S.top_k(np.array([0.0, 0.7, 0.3, 0.0]), 4, positive=True) == [1, 2]


def test_log_softmax_at():
    z = np.array([1.0, 2.0, 3.0, 4.0])
    ref = z - np.log(np.exp(z).sum())
    assert np.allclose(S.log_softmax_at(z, [3, 0]), ref[[3, 0]], atol=1e-15)


# -- fast paths against slow twins ---------------------------------------------------------

probs = st.lists(st.integers(0, 6), min_size=1, max_size=40).filter(any).map(
    lambda w: np.array(w, dtype=np.float64) / sum(w))   # many exact ties and zeros


@settings(max_examples=150, deadline=None)
@given(probs, st.floats(0, 1))
def test_top_p_fast_equals_reference(p, top_p):
    assert np.array_equal(S.top_p(p, state(top_p=top_p)), S.top_p_reference(p, top_p))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0, 1), st.floats(0.2, 4))
def test_top_p_fast_equals_reference_full_vocab(seed, top_p, scale):
    z = np.random.default_rng(seed).standard_normal(50257) * scale
    p = S.softmax(z)
    assert np.array_equal(S.top_p(p, state(top_p=top_p)), S.top_p_reference(p, top_p))


def test_top_p_fast_path_reaches_the_whole_vocabulary():
    p = np.full(50257, 1 / 50257)          # flat: every threshold set is the whole vocab
    out = S.top_p(p, state(top_p=0.5))
    assert np.array_equal(out, S.top_p_reference(p, 0.5))
    assert np.count_nonzero(out) == 25129


@BACKENDS
@settings(max_examples=150, deadline=None)
@given(p=probs, u=st.floats(0, 1, exclude_max=True))
def test_select_equals_reference_small(ops, p, u):
    assert S.select(p, u, ops) == S.select_reference(p, u)


@BACKENDS
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), u=st.floats(0, 1, exclude_max=True), scale=st.floats(0.1, 3))
def test_select_equals_reference_blocked(ops, seed, u, scale):
    p = S.softmax(np.random.default_rng(seed).standard_normal(50257) * scale)
    assert S.select(p, u, ops) == S.select_reference(p, u)


@BACKENDS
def test_select_blocked_falls_back_exactly_at_boundaries(ops):
    p = np.full(8192, 1 / 8192)
    for k in (0, 1, 255, 256, 4095, 8191):
        for u in (k / 8192, np.nextafter(k / 8192, 0), np.nextafter(k / 8192, 1)):
            assert S.select(p, u, ops) == S.select_reference(p, u)
    c = np.cumsum(p)                                   # u * total exactly on a running sum
    for i in (0, 1, 4095, 8190):
        assert S.select(p, c[i] / c[-1], ops) == S.select_reference(p, c[i] / c[-1])
    for s in (0.5, 3):                                 # and where block estimates round
        p = S.softmax(np.random.default_rng(5).standard_normal(50257) * s)
        p[::3] = 0.0                                   # as after top_p: zeros between kept ids
        c = np.cumsum(p)
        for i in (2, 301, 20000, 50254):
            u0 = c[i] / c[-1]
            for u in (u0, np.nextafter(u0, 0), np.nextafter(u0, 1)):
                assert S.select(p, u, ops) == S.select_reference(p, u), (s, i, u)


def _nucleus_by_sorting(pc, top_p):
    """(n_keep, last) as the spec computes them: the full descending sort and its cumsum."""
    vals = np.sort(pc)[::-1]
    cum = np.cumsum(vals)
    n_keep = max(1, int(top_p > 0) + int(np.searchsorted(cum[:-1], top_p, side="left")))
    return n_keep, vals[n_keep - 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.01, 0.999), st.floats(0.2, 4))
def test_nucleus_by_buckets_decides_as_the_full_sort(seed, top_p, scale):
    p = S.softmax(np.random.default_rng(seed).standard_normal(50257) * scale)
    got = fmath.nucleus_by_buckets(p, top_p)
    if got is not None:                                # None: too close to call, caller sorts
        assert got == _nucleus_by_sorting(p, top_p)


def test_nucleus_by_buckets_decides_typical_distributions():
    rng = np.random.default_rng(0)
    decided = [fmath.nucleus_by_buckets(S.softmax(rng.standard_normal(50257) * s), tp)
               for s in (0.5, 1, 2) for tp in (0.3, 0.9, 0.99)]
    assert all(d is not None for d in decided)        # the fast path is the one taken


def test_nucleus_by_buckets_refuses_a_crossing_within_rounding():
    p = np.full(8192, 1 / 8192)                       # prefix sums land exactly on k / 8192
    for k in (1, 100, 4096, 8191):
        assert fmath.nucleus_by_buckets(p, k / 8192) is None
        for top_p in (k / 8192, np.nextafter(k / 8192, 0), np.nextafter(k / 8192, 1)):
            assert np.array_equal(S.top_p(p, state(top_p=top_p)), S.top_p_reference(p, top_p))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_top_p_large_support_with_ties_equals_reference(seed, top_p):
    w = np.random.default_rng(seed).integers(1, 7, 5000).astype(np.float64)   # many ties
    p = w / w.sum()
    assert np.array_equal(S.top_p(p, state(top_p=top_p)), S.top_p_reference(p, top_p))


def test_top_p_wide_range_uses_the_lowest_bucket():
    z = np.random.default_rng(1).standard_normal(50257) * 60   # values over ~800 binades
    p = S.softmax(z)
    for top_p in (0.5, 0.999999, 1 - 1e-15):
        assert np.array_equal(S.top_p(p, state(top_p=top_p)), S.top_p_reference(p, top_p))


@pytest.mark.parametrize("scale", [0.5, 2])
def test_top_p_at_the_specs_own_prefix_sums_equals_reference(scale):
    # top_p on (and one ulp either side of) the sorted cumulative sums the spec takes: the
    # bucket estimate, summed in another order, must refuse rather than decide these
    p = S.softmax(np.random.default_rng(3).standard_normal(50257) * scale)
    cum = np.cumsum(np.sort(p)[::-1])
    for i in np.linspace(0, 50000, 41).astype(int):
        for top_p in (cum[i], np.nextafter(cum[i], 0), np.nextafter(cum[i], 1)):
            if top_p < 1:
                assert np.array_equal(S.top_p(p, state(top_p=top_p)), S.top_p_reference(p, top_p))


def _token_or_error(draw):
    try:
        with np.errstate(invalid="ignore"):           # inf - inf: the NumPy twin warns
            return draw()
    except (ValueError, IndexError) as exc:
        return type(exc).__name__


def _pipeline_or_error(logits, t, u, ops):
    """The stages' token (run, then select) for plain params, or the exception's type."""
    x = lambda: S.run(logits.astype(np.float64), State(SamplingParams(temperature=t), {}, ops))[0]
    return _token_or_error(lambda: S.select(x(), u, ops))


@BACKENDS
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([1, 7, 8, 9, 300, 4097, 50257]),
       scale=st.sampled_from([1e-3, 1.0, 4.0, 40.0]), t=st.sampled_from([1.0, 0.7, 1.3, 1e-3, 5.0]),
       u=st.floats(0, 1, exclude_max=True), ban=st.booleans())
def test_select_plain_is_the_stages_token(ops, seed, n, scale, t, u, ban):
    """select_plain (the backend's softmax_select: one compiled call on the numba backend)
    draws the token that run() then select() draw for plain params, on float32 logits of
    any length (the eight max lanes' tail), at any temperature, with -inf entries too."""
    rng_ = np.random.default_rng(seed)
    logits = (rng_.standard_normal(n) * scale).astype(np.float32)
    if ban:
        logits[rng_.integers(0, n, size=max(1, n // 3))] = -np.inf
    got = _token_or_error(lambda: S.select_plain(logits, t, u, ops))
    assert got == _pipeline_or_error(logits, t, u, ops)


@BACKENDS
def test_select_plain_edge_cases_match_the_stages(ops):
    """Ties, a single finite entry, and the inputs where the stages find no positive
    probability (every entry -inf, a NaN, +inf) raise as the stages do."""
    ties = np.zeros(50257, np.float32)
    assert [S.select_plain(ties, 1.0, u, ops) for u in (0.0, 0.5, 0.99999)] == \
        [_pipeline_or_error(ties, 1.0, u, ops) for u in (0.0, 0.5, 0.99999)] == [0, 25128, 50256]
    one = np.full(50257, -np.inf, np.float32)
    one[1234] = -80.0
    assert S.select_plain(one, 0.5, 0.9, ops) == 1234 == _pipeline_or_error(one, 0.5, 0.9, ops)
    for bad in (np.full(64, -np.inf, np.float32), np.array([0.0, np.nan, 1.0], np.float32),
                np.array([0.0, np.inf, 1.0], np.float32)):
        expected = _pipeline_or_error(bad, 1.0, 0.3, ops)
        assert isinstance(expected, str)                  # the stages raise ...
        with pytest.raises((ValueError, IndexError)) as info, np.errstate(invalid="ignore"):
            S.select_plain(bad, 1.0, 0.3, ops)            # ... and so does select_plain
        assert type(info.value).__name__ == expected


@BACKENDS
@pytest.mark.parametrize("t", [1.0, 0.7, 1.3, 0.3])
def test_select_plain_agrees_at_every_boundary_to_the_last_bit(ops, t):
    """Coins a few ulps either side of each cumulative boundary: a probability off by one
    bit (a temperature applied as a product, another max) moves some boundary's token."""
    logits = (np.random.default_rng(5).standard_normal(9) * 2 - 50).astype(np.float32)
    x, _ = S.run(logits.astype(np.float64), State(SamplingParams(temperature=t), {}, ops))
    c = np.cumsum(x)
    for k in range(len(c) - 1):
        u = c[k] / c[-1]
        for _ in range(6):
            u = np.nextafter(u, 0.0)
        for _ in range(12):
            assert S.select_plain(logits, t, float(u), ops) == S.select(x, float(u), ops), (k, u)
            u = np.nextafter(u, 1.0)


def test_plain_means_no_stage_but_temperature_and_softmax():
    assert SamplingParams().plain and SamplingParams(temperature=0.3).plain
    assert not SamplingParams(temperature=0).plain                      # greedy: argmax
    for changed in ({"top_p": 0.9}, {"presence_penalty": 0.5}, {"frequency_penalty": -1.0},
                    {"logit_bias": ((5, 1.0),)}):
        assert not SamplingParams(**changed).plain, changed
