"""Our own float64 exp, log and sum, from IEEE-754 basic operations only (SEMANTICS 11).

Knows: the elementary functions and the summation order every response depends on.
Does not know: models, sampling. Pure NumPy, no Numba: this module is the spec, and
kernels/fmath_numba.py computes the same bits, pinned by tests/test_fmath.py.

Why not np.exp / np.log: numpy's AVX-512 exp and log differ in the last bit from the
libm it uses elsewhere (numpy/numpy#23523), and np.log changed between versions
(#22904), so a response would depend on the CPU. Here every step is `+ - * /`, a
comparison, `floor`, or an exact scaling by a power of two, never an FMA; the order of
each step is written out and is part of the contract (docs/semantics.md §11).

The algorithms are fdlibm's (Sun Microsystems, 1993; e_exp.c and e_log.c) with their
constants, written without fdlibm's shortcut branches (which change no value), and
measured within 1 ulp of the correctly rounded result (tests/test_fmath.py):

exp(x):
    x > EXP_OVERFLOW -> inf;  x < EXP_UNDERFLOW -> 0;  NaN -> NaN
    k  = floor(x * INV_LN2 + 0.5)                    (an integer in [-1075, 1024])
    hi = x - k * LN2_HI                              (exact: LN2_HI has 32 low zero bits)
    lo = k * LN2_LO
    r  = hi - lo                                     (|r| <= ~0.5 ln 2)
    t  = r * r
    c  = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))))
    y  = 1 - ((lo - (r * c) / (2 - c)) - hi)         (exp(r), in [0.7, 1.42])
    h  = floor(k / 2)
    exp(x) = (y * 2^(k - h)) * 2^h                   (the first product is exact; the
                                                      second rounds once, into subnormals)
log(x):
    x < 0 or NaN -> NaN;  x == 0 -> -inf;  x == inf -> inf
    x subnormal: x = x * 2^54 and k0 = -54, else k0 = 0
    write x = 2^e * m with m in [1, 2); if m >= M_SPLIT (~sqrt 2, see below) use m / 2
    and e + 1, so that m is in [~0.707, ~1.414);  k = k0 + e
    f = m - 1 (exact);  s = f / (2 + f);  z = s * s;  w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    R = t2 + t1;  hfsq = (0.5 * f) * f
    log(x) = k * LN2_HI - ((hfsq - (s * (hfsq + R) + k * LN2_LO)) - f)
    M_SPLIT: m's top 20 fraction bits plus 0x95f64 carry into bit 20 (fdlibm's test),
    i.e. m >= 0x1.6a09cp0 (1.41421508...).
sum(x) (float64, any length n):
    lane j (j = 0..7) = ((0 + x[j]) + x[j + 8]) + x[j + 16] + ..., strictly in order;
    sum = ((lane0 + lane1) + (lane2 + lane3)) + ((lane4 + lane5) + (lane6 + lane7))
    (eight interleaved lanes, so the compiled twin vectorises; an empty sum is +0.0).

Dimensions: V = any length of a 1-D array.

    >>> float(exp(np.array([1.0]))[0]), float(log(np.array([10.0]))[0])
    (2.7182818284590455, 2.302585092994046)
"""

from __future__ import annotations

import struct

import numpy as np


def _f(bits: int) -> float:
    """The float64 whose IEEE-754 bit pattern is `bits` (how fdlibm writes its constants)."""
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


LN2_HI = _f(0x3FE62E42FEE00000)          # 6.93147180369123816490e-01, 32 low bits zero
LN2_LO = _f(0x3DEA39EF35793C76)          # 1.90821492927058770002e-10
INV_LN2 = _f(0x3FF71547652B82FE)         # 1.44269504088896338700e+00
P1 = _f(0x3FC555555555553E)              # 1.66666666666666019037e-01
P2 = _f(0xBF66C16C16BEBD93)              # -2.77777777770155933842e-03
P3 = _f(0x3F11566AAF25DE2C)              # 6.61375632143793436117e-05
P4 = _f(0xBEBBBD41C5D26BF1)              # -1.65339022054652515390e-06
P5 = _f(0x3E66376972BEA4D0)              # 4.13813679705723846039e-08
EXP_OVERFLOW = _f(0x40862E42FEFA39EF)    # 7.09782712893383973096e+02
EXP_UNDERFLOW = _f(0xC0874910D52D3051)   # -7.45133219101941108420e+02
LG1 = _f(0x3FE5555555555593)             # 6.666666666666735130e-01
LG2 = _f(0x3FD999999997FA04)             # 3.999999999940941908e-01
LG3 = _f(0x3FD2492494229359)             # 2.857142874366239149e-01
LG4 = _f(0x3FCC71C51D8E78AF)             # 2.222219843214978396e-01
LG5 = _f(0x3FC7466496CB03DE)             # 1.818357216161805012e-01
LG6 = _f(0x3FC39A09D078C69F)             # 1.531383769920937332e-01
LG7 = _f(0x3FC2F112DF3E5244)             # 1.479819860511658591e-01
TWO54 = 2.0 ** 54
GELU_C = _f(0x3FE9884533D43651)          # sqrt(2 / pi) = 0.7978845608028654, gelu_new's
GELU_A = 0.044715                        # gelu_new's cubic coefficient (0x3FA6E4E26D4801F7)
MIN_NORMAL = 2.0 ** -1022
LANES = 8


def pow2(j: np.ndarray) -> np.ndarray:
    """2^j for integer-valued float64 j in [-1022, 1023], built from its exponent bits."""
    return ((j.astype(np.int64) + 1023) << 52).view(np.float64)


def exp(x: np.ndarray) -> np.ndarray:
    """float64 exp(x), elementwise (algorithm in the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = (x <= EXP_OVERFLOW) & (x >= EXP_UNDERFLOW)
        xs = np.where(ok, x, 0.0)
        k = np.floor(xs * INV_LN2 + 0.5)
        hi = xs - k * LN2_HI
        lo = k * LN2_LO
        r = hi - lo
        t = r * r
        c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))))
        y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
        h = np.floor(k * 0.5)
        y = (y * pow2(k - h)) * pow2(h)
        y = np.where(ok, y, np.where(x > EXP_OVERFLOW, np.inf, 0.0))
        return np.where(np.isnan(x), x, y)


def log(x: np.ndarray) -> np.ndarray:
    """float64 natural log(x), elementwise (algorithm in the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ok = (x > 0) & (x < np.inf)
        sub = ok & (x < MIN_NORMAL)
        xs = np.where(ok, np.where(sub, x * TWO54, x), 1.0)
        bits = np.ascontiguousarray(xs).view(np.int64)
        hx = bits >> 32                                          # sign, exponent, top 20 bits
        frac = hx & 0x000FFFFF
        i = (frac + 0x95F64) & 0x100000                          # 0x100000 iff m >= M_SPLIT
        m = (((frac | (i ^ 0x3FF00000)) << 32) | (bits & 0xFFFFFFFF)).view(np.float64)
        k = (np.where(sub, -54, 0) + (hx >> 20) - 1023 + (i >> 20)).astype(np.float64)
        f = m - 1.0
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        t1 = w * (LG2 + w * (LG4 + w * LG6))
        t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
        R = t2 + t1
        hfsq = (0.5 * f) * f
        y = k * LN2_HI - ((hfsq - (s * (hfsq + R) + k * LN2_LO)) - f)
        special = np.where(x == 0, -np.inf, np.where(x == np.inf, np.inf, np.nan))
        return np.where(ok, y, special)


def sum(x: np.ndarray) -> float:   # noqa: A001 - the module's own sum, by design
    """float64 sum in eight interleaved lanes combined in a fixed tree (module docstring).

    np.add.accumulate is sequential by definition, so it is each lane's strict sum.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    rows = np.zeros((1 + -(-len(x) // LANES), LANES))            # row 0: the lanes' +0.0
    rows.ravel()[LANES:LANES + len(x)] = x
    lane = np.add.accumulate(rows, axis=0)[-1]
    return float(((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])))


def sum32_sequential(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """float32 strict left-to-right sum along axis, starting from +0.0 (layer norm, attention)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    padded = np.concatenate([np.zeros(x.shape[:-1] + (1,), np.float32), x], axis=-1)
    return np.add.accumulate(padded, axis=-1)[..., -1]


def softmax(z: np.ndarray) -> np.ndarray:
    """p = e / sum(e), e = exp(z - max z), float64 [V] (SEMANTICS 1)."""
    e = exp(z - np.max(z))
    return e / sum(e)


def log_softmax_at(z: np.ndarray, ids) -> np.ndarray:
    """log_softmax(z)[ids] = (z[ids] - max z) - log(sum(exp(z - max z))), float64."""
    m = np.max(z)
    return (np.asarray(z)[ids] - m) - log(np.array([sum(exp(z - m))]))[0]


def top_k(x: np.ndarray, k: int, positive: bool = False) -> list[int]:
    """The k largest entries' ids, descending, ties by ascending id (positive: only x > 0).
    Selection, no arithmetic; here so that each backend brings its fast version."""
    out: list[int] = []
    y = np.array(x, dtype=np.float64)
    k = min(max(k, 0), len(y))
    while len(out) < k:
        i = int(np.argmax(y))
        if positive and not y[i] > 0:
            break
        if y[i] == -np.inf:                  # only -inf left: the unpicked ones, by ascending id
            taken = set(out)
            out += [int(j) for j in np.flatnonzero(np.asarray(x) == -np.inf) if j not in taken][: k - len(out)]
            break
        out.append(i)
        y[i] = -np.inf
    return out


# -- select, and top_p's nucleus: no arithmetic beyond sequential sums and our sum; here
# so that each backend brings its fast version (kernels/fmath_numba.py's select,
# renormalise and top_p_keep, with these constants: the same results, pinned by
# tests/test_fmath.py and tests/test_sampling.py)

SELECT_BLOCK = 256
_EXACT_BELOW = 4096


def select(p: np.ndarray, u: float) -> int:
    """First kept token (ascending id) whose cumulative probability exceeds u * total.

    `total` is the last cumulative sum, so p need not be normalised; tokens with p == 0
    are never chosen. Over a large support the cumulative sums are first estimated by
    blocks; the estimate is used only when u * total is farther from every boundary
    than the worst-case rounding difference, else the exact sequential walk decides,
    so the result always equals `select_reference`.
    """
    kept = p > 0
    ids = None if kept.all() else np.flatnonzero(kept)      # no id array when all are kept
    w = p if ids is None else p[ids]

    def at(i) -> int:                                       # the token id of w's entry i
        return int(i) if ids is None else int(ids[i])

    if len(w) < _EXACT_BELOW:
        return at(_walk(np.cumsum(w), u))
    nb = len(w) // SELECT_BLOCK
    sums = w[: nb * SELECT_BLOCK].reshape(nb, SELECT_BLOCK).sum(axis=1)
    if len(w) > nb * SELECT_BLOCK:
        sums = np.append(sums, w[nb * SELECT_BLOCK:].sum())
    ends = np.cumsum(sums)                                  # approx cumsum at block ends
    x = u * ends[-1]
    j = min(int(np.searchsorted(ends, x, side="right")), len(ends) - 1)
    base = ends[j - 1] if j else 0.0
    local = base + np.cumsum(w[j * SELECT_BLOCK:(j + 1) * SELECT_BLOCK])
    k = min(int(np.searchsorted(local, x, side="right")), len(local) - 1)
    margin = 8.0 * len(w) * 2.0**-52 * ends[-1]             # >> any rounding difference
    lo = local[k - 1] if k else base
    if local[k] - x > margin and (x - lo > margin or (j == 0 and k == 0)):
        return at(j * SELECT_BLOCK + k)
    return at(_walk(np.cumsum(w), u))


def softmax_select(logits: np.ndarray, t: float, u: float) -> int:
    """select(softmax(z / t), u) with z = float64(logits) (t == 1 divides nothing): the
    sampling pipeline of a row that no stage but temperature and softmax changes
    (sampling.select_plain). The compiled twin runs it in one call, with no float64
    temporaries handed back to Python."""
    z = np.asarray(logits, dtype=np.float64)
    return select(softmax(z if t == 1 else z / t), u)


def _walk(c: np.ndarray, u: float) -> int:
    """Index of the first cumulative sum c[i] > u * c[-1] (clamped to the last)."""
    return min(int(np.searchsorted(c, u * c[-1], side="right")), len(c) - 1)


def renormalise(p: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """p[kept] / sum(p[kept]) (kept ascending: the sum's lanes run in id order), 0 elsewhere."""
    out = np.zeros_like(p)
    pk = p[kept]
    out[kept] = pk / sum(pk)
    return out


_FRACTIONS = (2.0**-6, 2.0**-9, 2.0**-12, 2.0**-16, 2.0**-20, 2.0**-28, 2.0**-40, 0.0)
POOL = 2.0**-16


def top_p_keep(p: np.ndarray, top_p: float) -> np.ndarray:
    """Ids kept by the nucleus rule, without sorting the vocabulary.

    The candidates {p >= f * max p} all precede every other token in the sorted order,
    so if their mass already reaches top_p the rule is decided among them; else a
    lower threshold is tried, down to the whole vocabulary. A set whose sum is short of
    top_p by more than any rounding difference is skipped unsorted (that sum only picks
    which set to sort, never a kept token, so numpy's pairwise sum is fine there). The
    thresholds are tried within a pool {p >= POOL * max p} first, which holds nearly all
    the mass of a trained model's distribution, so the vocabulary is scanned once.
    Only the candidates' values are sorted (the sorted values are the same whatever the
    sort, and equal values in any order give the same cumulative sums), and of a large
    set only the bucket where the mass crosses top_p (`nucleus_by_buckets`); the kept
    ids are then those above the last kept value, and of its tie group the lowest ids,
    as the spec says.
    """
    pmax = p.max()
    pool = np.flatnonzero(p >= pmax * POOL)
    in_pool = p[pool]
    pool_mass = in_pool.sum()
    for f in _FRACTIONS:          # (x[flatnonzero(mask)]: 3x faster than x[mask] here)
        if f and f >= POOL and pool_mass >= top_p - 1e-9:
            cand = pool[np.flatnonzero(in_pool >= pmax * f)]   # ascending ids, as flatnonzero's
        else:
            cand = np.flatnonzero(p >= pmax * f) if f else np.arange(len(p))
        pc = p[cand]
        if f and pc.sum() < top_p - 1e-9:          # surely short of top_p: skip the sort
            continue
        decided = nucleus_by_buckets(pc, top_p)
        if decided is None:
            vals = np.sort(pc)[::-1]               # descending (values only: 4x argsort's speed)
            cum = np.cumsum(vals)
            if cum[-1] < top_p and f:
                continue
            # n_keep = how many of before = [0, cum[0], cum[1], ...] are < top_p (nondecreasing)
            n_keep = max(1, int(top_p > 0) + int(np.searchsorted(cum[:-1], top_p, side="left")))
            decided = n_keep, vals[n_keep - 1]
        n_keep, last = decided
        keep = pc > last
        ties = np.flatnonzero(pc == last)[: n_keep - int(np.count_nonzero(keep))]
        keep[ties] = True                                            # lowest ids first
        return cand[np.flatnonzero(keep)]                            # ascending, as cand
    raise AssertionError("unreachable")


BUCKET_BITS = 45       # a float64's bits >> 45: its exponent and top 7 mantissa bits
BUCKETS = 8192         # buckets 2**-7 wide, the lowest holding everything farther down
_SORT_BELOW = 2048


def nucleus_by_buckets(pc: np.ndarray, top_p: float) -> tuple[int, float] | None:
    """(n_keep, last) of the nucleus rule over the values pc: how many of them, sorted
    descending, have a mass before them < top_p, and the last one kept; sorting only the
    bucket of values where the mass crosses top_p. Positive floats order as their bits,
    so buckets of bits >> BUCKET_BITS hold value ranges in order, and equal values
    share one. The masses here are estimates (bincount's sums, not the sorted sequential
    sum the spec takes); they decide only when top_p is farther from both sums around
    the crossing than any rounding difference, else None (and the caller sorts all).
    """
    n = len(pc)
    if n < _SORT_BELOW or not top_p > 0:
        return None
    key = (pc.view(np.uint64) >> np.uint64(BUCKET_BITS)).astype(np.intp)
    b = np.minimum(key.max() - key, BUCKETS - 1)           # 0: the bucket of the largest
    mass = np.cumsum(np.bincount(b, weights=pc))             # mass of buckets 0..j
    j = int(np.searchsorted(mass, top_p, side="left"))      # the bucket where it crosses
    if j == len(mass):
        return None
    base = mass[j - 1] if j else 0.0
    vals = np.sort(pc[b == j])[::-1]
    local = base + np.cumsum(vals)
    k = min(int(np.searchsorted(local, top_p, side="left")), len(vals) - 1)
    margin = 8.0 * (n + len(mass)) * 2.0**-52 * mass[-1]     # >> any rounding difference
    lo = local[k - 1] if k else base
    if local[k] - top_p > margin and top_p - lo > margin:
        return int(np.count_nonzero(b < j)) + k + 1, vals[k]
    return None
