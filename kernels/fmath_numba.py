"""The Numba twins of kernels/fmath.py: the same exp, log and sum, bit for bit, compiled.

Knows: how to compute fmath's functions fast (scalar helpers that other kernels inline,
array kernels for the sampling path). Does not know: the algorithms' design; they are
specified, with their constants, in kernels/fmath.py, and every step here is the same
basic operation in the same order (no fastmath: no FMA contraction, no reassociation).
Powers of two and log's exponent and mantissa come from bit casts (an LLVM `bitcast`,
as NumPy's `.view`). tests/test_fmath.py pins each
function here to its NumPy spec with np.array_equal.

Dimensions: V = length of a 1-D array.
"""

import struct

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from refcomplete.kernels import nrt_cache, require_package_name
from refcomplete.kernels.fmath import (BUCKET_BITS, BUCKETS, EXP_OVERFLOW, EXP_UNDERFLOW, INV_LN2,
                                       LG1, LG2, LG3, LG4, LG5, LG6, LG7, LN2_HI, LN2_LO, MIN_NORMAL,
                                       P1, P2, P3, P4, P5, POOL, SELECT_BLOCK, TWO54)
MAGIC_POW2 = 1023.0 + 2.0 ** 52

require_package_name(__name__)
nrt_cache.install()                 # before any kernel loads; gpt2.py imports this module first


def f64_from_bits(bits):
    """The float64 whose IEEE-754 bit pattern is the int64 `bits` (a bit cast, no arithmetic)."""
    return struct.unpack("<d", struct.pack("<Q", int(bits) & 0xFFFFFFFFFFFFFFFF))[0]


def bits_from_f64(x):
    """The int64 bit pattern of the float64 x."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# Compiled, both are one LLVM `bitcast`; the Python bodies above serve NUMBA_DISABLE_JIT=1.
@intrinsic
def _f64_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _bits_from_f64(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@overload(f64_from_bits)
def _ol_f64_from_bits(bits):
    return lambda bits: _f64_from_bits(bits)


@overload(bits_from_f64)
def _ol_bits_from_f64(x):
    return lambda x: _bits_from_f64(x)


@njit(cache=True, error_model="numpy", inline="always")
def pow2(j):
    """2^j for an integer-valued float64 j in [-1022, 1023], from its exponent bits.

    j + (1023 + 2^52) is exact and holds j + 1023 in its low mantissa bits, which the
    shift moves into the exponent field (no float-to-integer conversion, which AVX2 lacks
    for vectors of int64)."""
    return f64_from_bits(bits_from_f64(j + MAGIC_POW2) << 52)


@njit(cache=True, error_model="numpy", inline="always")
def _exp_reduced(x):
    """(y, k) with exp(x) = y * 2^k: fmath.exp's range reduction and polynomial."""
    k = np.floor(x * INV_LN2 + 0.5)
    hi = x - k * LN2_HI
    lo = k * LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))))
    return 1.0 - ((lo - (r * c) / (2.0 - c)) - hi), k


@njit(cache=True, error_model="numpy", inline="always")
def exp1(x):
    """float64 exp of one float64 (fmath.exp). Written with selects, not early returns,
    so that loops over it vectorise; the out-of-range lanes compute exp(0) and are replaced."""
    ok = (x <= EXP_OVERFLOW) and (x >= EXP_UNDERFLOW)
    y, k = _exp_reduced(x if ok else 0.0)
    h = np.floor(k * 0.5)
    y = (y * pow2(k - h)) * pow2(h)
    y = y if ok else (np.inf if x > EXP_OVERFLOW else 0.0)
    return x if x != x else y


# Where every result is a normal number (FAST_LO <= x <= FAST_HI: k in [-1021, 1023]), the
# spec's two scalings (y * 2^(k-h)) * 2^h are both exact, so one exact y * 2^k is the same
# float. The array kernels run that path, and redo the array with exp1 if any x fell outside.
FAST_LO, FAST_HI = -708.0, 709.0


@njit(cache=True, error_model="numpy", inline="always")
def exp1_normal(x):
    """exp1(x) for FAST_LO <= x <= FAST_HI only (the same bits there, fewer operations)."""
    y, k = _exp_reduced(x)
    return y * pow2(k)


@njit(cache=True, error_model="numpy", nogil=True)
def exp_shifted_into(z, m, out):
    """out[i] = exp(z[i] - m) (float64 [V]); m = 0.0 gives exp(z)."""
    n = z.shape[0]
    outside = False
    for i in range(n):
        x = z[i] - m
        outside |= not (x >= FAST_LO and x <= FAST_HI)       # NaN counts as outside
        out[i] = exp1_normal(x)
    if outside:
        for i in range(n):
            out[i] = exp1(z[i] - m)


@njit(cache=True, error_model="numpy", nogil=True)
def exp_into(x, out):
    """out[i] = exp(x[i]) (float64 [V])."""
    exp_shifted_into(x, 0.0, out)


@njit(cache=True, error_model="numpy", nogil=True)
def log_into(x, out):
    """out[i] = log(x[i]) (float64 [V]); the exponent and mantissa come from x's bits."""
    n = x.shape[0]
    xs = np.empty(n, np.float64)
    for i in range(n):
        v = x[i]
        xs[i] = v * TWO54 if (v > 0.0 and v < MIN_NORMAL) else (v if (v > 0.0 and v < np.inf) else 1.0)
    bits = xs.view(np.int64)
    mb = np.empty(n, np.int64)
    ks = np.empty(n, np.float64)
    for i in range(n):
        hx = bits[i] >> 32
        frac = hx & 0x000FFFFF
        j = (frac + 0x95F64) & 0x100000
        mb[i] = ((frac | (j ^ 0x3FF00000)) << 32) | (bits[i] & 0xFFFFFFFF)
        k0 = -54 if (x[i] > 0.0 and x[i] < MIN_NORMAL) else 0
        ks[i] = np.float64(k0 + (hx >> 20) - 1023 + (j >> 20))
    m = mb.view(np.float64)
    for i in range(n):
        v = x[i]
        if v > 0.0 and v < np.inf:
            k = ks[i]
            f = m[i] - 1.0
            s = f / (2.0 + f)
            z = s * s
            w = z * z
            t1 = w * (LG2 + w * (LG4 + w * LG6))
            t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
            R = t2 + t1
            hfsq = (0.5 * f) * f
            out[i] = k * LN2_HI - ((hfsq - (s * (hfsq + R) + k * LN2_LO)) - f)
        elif v == 0.0:
            out[i] = -np.inf
        elif v == np.inf:
            out[i] = np.inf
        else:
            out[i] = np.nan


@njit(cache=True, error_model="numpy", nogil=True)
def sum8(x):
    """fmath.sum: eight interleaved lanes, each strictly in order, combined in a fixed tree.
    The lanes are eight scalars, which stay in registers (an 8-element array was reloaded
    and stored on every step: 35 against 10 us for 50257 entries, AVX-512 Xeon)."""
    n = x.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    for i in range(0, n8, 8):
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        a4 += x[i + 4]
        a5 += x[i + 5]
        a6 += x[i + 6]
        a7 += x[i + 7]
    r = n - n8                                  # the tail: lanes 0 .. r-1 take one more
    if r > 0:
        a0 += x[n8]
    if r > 1:
        a1 += x[n8 + 1]
    if r > 2:
        a2 += x[n8 + 2]
    if r > 3:
        a3 += x[n8 + 3]
    if r > 4:
        a4 += x[n8 + 4]
    if r > 5:
        a5 += x[n8 + 5]
    if r > 6:
        a6 += x[n8 + 6]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, error_model="numpy", nogil=True)
def softmax_into(z, m, out):
    """out = exp(z - m) / sum(exp(z - m)) with m = max z given (fmath.softmax)."""
    exp_shifted_into(z, m, out)
    s = sum8(out)
    for i in range(z.shape[0]):
        out[i] = out[i] / s


@njit(cache=True, error_model="numpy", nogil=True)
def sum_exp(z, m):
    """sum(exp(z - m)) in fmath.sum's order."""
    e = np.empty_like(z)
    exp_shifted_into(z, m, e)
    return sum8(e)


@njit(cache=True, inline="always")
def _insert(ids, vals, cnt, k, v, i):
    """Put (v, i) into the sorted buffer (value desc; an equal value keeps the lower id first)."""
    j = cnt if cnt < k else k - 1
    while j > 0 and vals[j - 1] < v:
        vals[j] = vals[j - 1]
        ids[j] = ids[j - 1]
        j -= 1
    vals[j] = v
    ids[j] = i


@njit(cache=True, nogil=True)
def top_k_ids(x, k, positive):
    """fmath.top_k in one pass: an insertion-sorted buffer of the k best. Once it is full,
    blocks of 64 are first counted for entries beating the buffer's worst (a vectorised
    count); only a block with one is walked."""
    ids = np.empty(k, np.int64)
    vals = np.empty(k, np.float64)
    cnt = 0
    n = x.shape[0]
    i = 0
    while i < n and cnt < k:
        v = x[i]
        if not positive or v > 0:
            _insert(ids, vals, cnt, k, v, i)
            cnt += 1
        i += 1
    if cnt < k:
        return ids[:cnt]
    worst = vals[k - 1]                  # > 0 when positive: beating it implies v > 0
    while i < n:
        e = min(n, i + 64)
        hits = 0
        for t in range(i, e):
            hits += x[t] > worst
        if hits:
            for t in range(i, e):
                v = x[t]
                if v > worst:
                    _insert(ids, vals, cnt, k, v, t)
                    worst = vals[k - 1]
        i = e
    return ids


@njit(cache=True, error_model="numpy", inline="always")
def _bucket(top, v):
    return min(top - (bits_from_f64(v) >> BUCKET_BITS), BUCKETS - 1)


@njit(cache=True, error_model="numpy", nogil=True)
def _crossing(p, ids, direct, top_p, pmax):
    """(decided, n_keep, last) of the nucleus rule from the values p[ids] alone (ids: a
    set that holds every value above its smallest; with direct, all of p), by buckets:
    the mass of each bucket of bits >> BUCKET_BITS, summed in id order, locates the
    bucket where the mass crosses top_p; only that bucket's values are sorted. The
    masses are estimates: they decide only when top_p is farther from both sums around
    the crossing than any rounding difference (fmath.nucleus_by_buckets' margin)."""
    n = p.shape[0] if direct else ids.shape[0]
    top = bits_from_f64(pmax) >> BUCKET_BITS
    mass = np.zeros(BUCKETS, np.float64)
    count = np.zeros(BUCKETS, np.int64)
    for i in range(n):
        v = p[i] if direct else p[ids[i]]
        b = _bucket(top, v)
        mass[b] += v
        count[b] += 1
    total, base, j, before = 0.0, 0.0, -1, 0
    for b in range(BUCKETS):
        if j < 0:
            if total + mass[b] >= top_p:
                j, base = b, total
            else:
                before += count[b]
        total += mass[b]
    if j < 0:
        return False, 0, 0.0
    vals = np.empty(count[j], np.float64)
    m = 0
    for i in range(n):
        v = p[i] if direct else p[ids[i]]
        if _bucket(top, v) == j:
            vals[m] = v
            m += 1
    vals = np.sort(vals)[::-1]
    lo, hi, k = base, base + vals[0], 0
    while hi < top_p and k < m - 1:
        k += 1
        lo, hi = hi, hi + vals[k]
    margin = 8.0 * (p.shape[0] + BUCKETS) * 2.0**-52 * total
    return hi - top_p > margin and top_p - lo > margin, before + k + 1, vals[k]


@njit(cache=True, error_model="numpy", inline="always")
def _at_least(p, floor):
    """The ids i, ascending, with p[i] >= floor: counted first, then compressed without a
    branch into a buffer of that many (+1: the last id written is dropped), which stays in
    L1 where a buffer of len(p) would stream 400 KB of stores (and np.arange(len(p)) as
    many more)."""
    n = p.shape[0]
    count = 0
    for i in range(n):
        count += p[i] >= floor
    out = np.empty(count + 1, np.int64)
    m = 0
    for i in range(n):
        out[m] = i
        m += p[i] >= floor
    return out[:m]


@njit(cache=True, error_model="numpy", nogil=True)
def top_p_keep_ids(p, top_p):
    """fmath.top_p_keep's ids, ascending, p float64 >= 0: (n_keep, last) by buckets over
    the pool {p >= POOL * max p} (its values are all above the others'), else over the
    whole vocabulary (_crossing), else (too close to call) all values sorted and summed
    in order, the spec's way. Then the ids, from the set that decided: those above
    last, and of last's tie group the lowest."""
    n = p.shape[0]
    pmax = p[0]
    for i in range(n):
        pmax = max(pmax, p[i])
    ids, direct = np.empty(0, np.int64), True            # the set that decides: p[ids], or all of p
    n_keep, last = 1, pmax
    if top_p > 0:
        pool = _at_least(p, pmax * POOL)
        decided = False
        if 2 * pool.shape[0] < n:                        # a small pool: work in it alone
            decided, n_keep, last = _crossing(p, pool, False, top_p, pmax)
            if decided:
                ids, direct = pool, False
        if not decided:
            decided, n_keep, last = _crossing(p, ids, True, top_p, pmax)
        if not decided:                                  # the spec's way: all, sorted, in order
            vals = np.sort(p)[::-1]
            cum, k = 0.0, 0
            while k < n - 1:
                cum += vals[k]
                if not cum < top_p:
                    break
                k += 1
            n_keep, last = k + 1, vals[k]
    n = n if direct else ids.shape[0]
    above = 0
    for i in range(n):
        above += (p[i] if direct else p[ids[i]]) > last
    ties = n_keep - above
    out = np.empty(n_keep + 1, np.int64)
    m = 0
    for i in range(n):                                   # branch-free: a flat p mispredicts
        v = p[i] if direct else p[ids[i]]
        tie = v == last
        take = (v > last) | (tie & (ties > 0))
        out[m] = i if direct else ids[i]                 # kept only if m advances
        m = min(m + take, n_keep)
        ties -= take & tie
    return out[:n_keep]


@njit(cache=True, error_model="numpy", nogil=True)
def renormalise_kept(p, kept):
    """fmath.renormalise: out[kept] = p[kept] / sum(p[kept]), fmath's eight-lane sum over
    the kept values in id order; 0 elsewhere."""
    pk = np.empty(kept.shape[0], np.float64)
    for i in range(kept.shape[0]):
        pk[i] = p[kept[i]]
    s = sum8(pk)
    out = np.zeros(p.shape[0], np.float64)
    for i in range(kept.shape[0]):
        out[kept[i]] = pk[i] / s
    return out


@njit(cache=True, error_model="numpy", nogil=True)
def select_index(p, u):
    """fmath.select, compiled (-1 when no p is positive): w = the positive entries in id
    order (compressed without a branch, unless all are); the block sums, each our
    eight-lane sum, estimate the running sums at block ends; the block where u * total
    falls is walked in order from its estimated base. The estimate decides only when
    u * total is farther from both sums around the crossing than any rounding
    difference (fmath.select's margin), else the sequential walk over all of w, the
    spec's (select_reference's) sums, decides."""
    n = p.shape[0]
    positive = 0
    for i in range(n):
        positive += p[i] > 0
    if positive == 0:
        return -1
    ids = np.empty(0, np.int64)                          # w's ids; none when w is p itself
    w = p                                                # (top_p = 1: 31 -> 22.5 us a call)
    if positive < n:
        ids = _at_least(p, 5e-324)                       # p > 0: p >= the least subnormal
        w = np.empty(positive, np.float64)
        for i in range(positive):
            w[i] = p[ids[i]]
    nb = -(-positive // SELECT_BLOCK)
    ends = np.empty(nb, np.float64)
    run = 0.0
    for b in range(nb):
        run += sum8(w[b * SELECT_BLOCK:(b + 1) * SELECT_BLOCK])
        ends[b] = run
    x = u * ends[nb - 1]
    j = 0
    while j < nb - 1 and not ends[j] > x:
        j += 1
    lo = base = ends[j - 1] if j else 0.0
    k, hi = j * SELECT_BLOCK, base + w[j * SELECT_BLOCK]
    end = min(positive, (j + 1) * SELECT_BLOCK)
    while not hi > x and k < end - 1:
        k += 1
        lo, hi = hi, hi + w[k]
    margin = 8.0 * positive * 2.0**-52 * ends[nb - 1]
    if not (hi - x > margin and (x - lo > margin or k == 0)):
        total = 0.0                                      # the spec's way: sequential, in id order
        for i in range(positive):
            total += w[i]
        x, c, k = u * total, 0.0, positive - 1
        for i in range(positive):
            c += w[i]
            if c > x:
                k = i
                break
    return k if positive == n else ids[k]


@njit(cache=True, error_model="numpy", nogil=True)
def max8(z):
    """max(z) in eight lanes (a max is exact, so any order gives np.max's value) for z
    without NaN; with a NaN, some value of z or NaN (softmax_select_index then sees every
    p NaN). -inf for an empty z."""
    n = z.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = -np.inf
    for i in range(0, n8, 8):
        a0 = z[i] if z[i] > a0 else a0
        a1 = z[i + 1] if z[i + 1] > a1 else a1
        a2 = z[i + 2] if z[i + 2] > a2 else a2
        a3 = z[i + 3] if z[i + 3] > a3 else a3
        a4 = z[i + 4] if z[i + 4] > a4 else a4
        a5 = z[i + 5] if z[i + 5] > a5 else a5
        a6 = z[i + 6] if z[i + 6] > a6 else a6
        a7 = z[i + 7] if z[i + 7] > a7 else a7
    for i in range(n8, n):
        a0 = z[i] if z[i] > a0 else a0
    m0 = a0 if a0 > a1 else a1
    m1 = a2 if a2 > a3 else a3
    m2 = a4 if a4 > a5 else a5
    m3 = a6 if a6 > a7 else a7
    m0 = m0 if m0 > m1 else m1
    m2 = m2 if m2 > m3 else m3
    return m0 if m0 > m2 else m2


@njit(cache=True, error_model="numpy", nogil=True)
def softmax_select_index(logits, t, u):
    """fmath.softmax_select, compiled (-1 when no p is positive): z = float64(logits),
    divided by t unless t == 1; softmax_into with m = max8(z); select_index. Without a
    NaN in z, m is np.max(z) and every step is the pipeline's; with one, exp(NaN - m)
    makes the sum and so every p NaN: -1, as select_index of the pipeline's all-NaN p."""
    n = logits.shape[0]
    z = np.empty(n, np.float64)
    if t == 1.0:
        for i in range(n):
            z[i] = np.float64(logits[i])
    else:
        for i in range(n):
            z[i] = np.float64(logits[i]) / t
    p = np.empty(n, np.float64)
    softmax_into(z, max8(z), p)
    return select_index(p, u)


# -- the same interface as kernels/fmath.py (NumPy arrays in, NumPy arrays out) ----------

def exp(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    exp_into(x.ravel(), out.ravel())
    return out


def log(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    out = np.empty_like(x)
    log_into(x.ravel(), out.ravel())
    return out


def sum(x):  # noqa: A001 - fmath's sum
    return float(sum8(np.ascontiguousarray(x, dtype=np.float64).ravel()))


def softmax(z):
    z = np.ascontiguousarray(z, dtype=np.float64)
    out = np.empty_like(z)
    softmax_into(z, np.max(z), out)
    return out


def log_softmax_at(z, ids):
    z = np.ascontiguousarray(z, dtype=np.float64)
    m = np.max(z)
    s = sum_exp(z, m)
    return (z[ids] - m) - log(np.array([s]))[0]


def top_k(x, k, positive=False):
    if k <= 0:
        return []
    return top_k_ids(np.ascontiguousarray(x, dtype=np.float64), int(k), bool(positive)).tolist()


def top_p_keep(p, top_p):
    return top_p_keep_ids(np.ascontiguousarray(p, dtype=np.float64), float(top_p))


def renormalise(p, kept):
    return renormalise_kept(np.ascontiguousarray(p, dtype=np.float64), np.ascontiguousarray(kept, dtype=np.int64))


def select(p, u):
    i = int(select_index(np.ascontiguousarray(p, dtype=np.float64), float(u)))
    if i < 0:
        raise ValueError("select: no token has a positive probability")
    return i


def softmax_select(logits, t, u):
    i = int(softmax_select_index(np.ascontiguousarray(logits).ravel(), float(t), float(u)))
    if i < 0:
        raise ValueError("select: no token has a positive probability")
    return i
