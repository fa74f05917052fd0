"""Numba kernels for one GPT-2 decode step over a batch of rows, and their NumPy twins.

Knows: the arithmetic of layer norm, Conv1D-style linear layers, gelu_new, cached
attention and the LM head. Does not know: checkpoints, sessions, sampling.

Dimensions: B = rows in this step, C = n_embd, K = in features, N = out features,
H = heads, D = C // H, P = shared prompt length, S = per-row capacity, R = rows of
the session, V = vocabulary.

Batch invariance (SEMANTICS 4): every output element is computed by one thread, with
a reduction order that depends only on its own row, never on B or on which rows share
the step. Every reduction runs strictly in order (k = 0, 1, ..., K-1 in the linear
layers and the LM head, d = 0, ..., D-1 in attention scores, positions in order in the
softmax), with no reassociation and no FMA contraction: the same bits on any CPU and
from a cold or a warm Numba cache. Vectorisation runs across independent outputs only
(columns, positions), which is why the linear layers and the LM head take their weights
packed into column panels (pack(); the head's is the embedding matrix transposed) and
attention takes keys transposed.
exp is ours (kernels/fmath_numba.exp1, in float64), never libm's. Each kernel's NumPy
twin, the spec with the same operation order, is in gpt2_numpy.py: the "numpy" backend.
Parallel loops split only over output panels / (row, head) pairs / heads; `tasks` (the
linear layers' split, normally numba.get_num_threads()) never changes a value.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from refcomplete.kernels import require_package_name
from refcomplete.kernels.fmath import GELU_A, GELU_C
from refcomplete.kernels.fmath_numba import FAST_HI, FAST_LO, exp1, exp1_normal

require_package_name(__name__)

# error_model="numpy": IEEE division (no Python zero-division check), which lets loops
# vectorise; no value changes.
# No kernel allows reassociation (fastmath): with it, the machine code Numba writes to its
# cache summed in another order than the code it JIT-compiles, so bits differed between
# a cold and a warm cache (tests/test_kernels.py::test_cold_and_warm_cache_agree).


# ----------------------------------------------------------------------------- helpers

# A register tile: TILE_ROWS rows x TILE_COLS columns of accumulators held in vector
# registers for the whole k loop (the linears' former column loop, _matmul_cols, sent them
# through memory every 8 k-steps). Every linear, decode's single rows included, goes
# through tiles: of TILE_ROWS rows, then 2, then 1 (the rows' edge). Each element is
# still ((0 + x0*w0) + x1*w1) + ..., a multiply then an add, k strictly in order: the
# same bits whatever the tile's shape. Written as LLVM IR
# (TILE_VEC-float vectors, no fast-math flags, so no FMA contraction): Numba's own loops
# did not keep the accumulators in registers (docs/benchmarks.md). The shape follows the
# compile target: AVX2's 16 vector registers hold 6 x 16 (12 of 8 floats); AVX-512's 32
# hold 4 x 64 (16 of 16 floats), which loads each w vector for 4 rows and each x value for
# 4 vectors. Measured, four prefill-sized linears: AVX2 6 x 16 67-73 GFLOP/s (4 x 24,
# 3 x 32, 2 x 48 alike; _matmul_cols 58-64); AVX-512 4 x 64 111-133 (6 x 16 zmm 80-86,
# 8 x 32 98-110; _matmul_cols 75-86). The target's features, as Numba takes them, are in
# its cache key too: a cached kernel never holds the other shape.
AVX512 = "+avx512f" in (config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features())
TILE_ROWS, TILE_COLS, TILE_VEC = (4, 64, 16) if AVX512 else (6, 16, 8)


def tile(x, k0, panel, acc, b, j, rows, turn, turns):
    """acc[b:b+rows, j:j+C] += x[b:b+rows, k0:k0+kb] @ panel (C = TILE_COLS), one k at a
    time in order; panel [kb, C]; rows is TILE_ROWS, 2 or 1. Every array's last axis is
    contiguous. Compiled, it prefetches the panel rows k with k % turns == turn (the
    tiles that share a k-block take turns). The interpreted twin, for NUMBA_DISABLE_JIT=1;
    compiled, the intrinsics below."""
    for i in range(b, b + rows):
        a = acc[i, j:j + TILE_COLS].copy()
        for k in range(panel.shape[0]):
            a = a + x[i, k0 + k] * panel[k]
        acc[i, j:j + TILE_COLS] = a


def tile_pair(x, k0, panels, acc, b, j, turn, turns):
    """tile() of one row (b) over two adjacent panels at once, panels [2, kb, C], into
    acc[b, j:j + 2*C]: each k-step reads panel 0's row k, then panel 1's, into four
    accumulator vectors on AVX2, eight on AVX-512 (two streams a core, as OpenBLAS's
    GEMV walks several columns). Each element's sum is tile()'s, bit for bit. The
    interpreted twin."""
    for q in range(2):
        tile(x, k0, panels[q], acc, b, j + q * TILE_COLS, 1, turn, turns)


# Prefetch: each panel row's cache lines are prefetched into L2 PREFETCH floats (32 KB)
# ahead, so that w streams in while a k-block's later row tiles compute from L1. The
# hardware prefetcher alone left a decode step latency-bound (AVX-512 Xeon, whole steps,
# min of 40-50, interleaved runs; 1 row / 8 rows): none 24.0-24.5 ms / -, 2 KB ahead into
# L1 19.7-26.4 / 37.4-45.4, 32 KB into L1 27.4-27.9 / 44.3-46.7, 32 KB into L2 18.5-22.5 /
# 32.4-37.8. The row tiles of a k-block take turns (a tile prefetches the rows k with
# k % tiles == its index; else its own row, already wanted): when the first tile issued
# them all, it stalled on full miss buffers and memory idled while the others computed
# (8 rows, min / median of 50 steps, three interleaved runs: 35.0-36.6 / 38.6-40.8 ->
# 31.5-33.2 / 34.1-37.3 ms). A prefetch never faults, past an array's end included.
PREFETCH = 8192                  # floats: 32 KB ahead, in L2


def _make_tile(R, P=1):
    """The register tile of R rows and P panels, compiled: an intrinsic that writes
    _tile_ir's loop."""
    @intrinsic
    def _tile(typingctx, x, k0, panel, acc, b, j, turn, turns):
        return types.void(x, k0, panel, acc, b, j, turn, turns), lambda ctx, bld, sig, args: _tile_ir(ctx, bld, sig, args, R, P)
    return _tile


def _tile_ir(context, builder, signature, args, R, P):
    """LLVM IR of tile(x, k0, panel, acc, b, j, R, turn, turns) (P = 1, panel [kb, C]) or
    of tile_pair (P = 2, panel [2, kb, C]): R x P*TILE_COLS accumulators as phis of
    TILE_VEC-float vectors across the k loop, a separate fmul and fadd per k (no fast-math
    flags); on its turns (k % turns == turn) each panel row's cache lines are prefetched
    PREFETCH floats ahead."""
    f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
    vec = ir.VectorType(f32, TILE_VEC)
    nv = TILE_COLS // TILE_VEC
    x_, p_, a_ = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3))
    k0_, b_, j_, turn_, turns_ = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (1, 4, 5, 6, 7))
    const = lambda n: ir.Constant(i64, n)
    in_floats = lambda a, axis=0: builder.sdiv(builder.extract_value(a.strides, axis), const(4))
    row = lambda a, i, col: builder.gep(a.data, [builder.add(builder.mul(builder.add(b_, const(i)), in_floats(a)), col)])
    vptr = lambda p, v: builder.bitcast(builder.gep(p, [const(TILE_VEC * v)]), vec.as_pointer())
    i8p = ir.IntType(8).as_pointer()
    prefetch = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
    K = builder.extract_value(p_.shape, P - 1)
    pstride = in_floats(p_, P - 1)                   # floats between a panel's rows
    qstride = in_floats(p_) if P > 1 else const(0)   # between panels
    xrows = [row(x_, i, k0_) for i in range(R)]
    arows = [row(a_, i, j_) for i in range(R)]
    nv *= P                                          # an accumulator row: P panels' vectors
    start = [builder.load(vptr(arows[i], v), align=4) for i in range(R) for v in range(nv)]
    entry = builder.block
    head, body, done = (builder.append_basic_block(f"tile.{n}") for n in ("head", "body", "done"))
    builder.branch(head)
    builder.position_at_end(head)                    # k, and the accumulators, as phis
    k = builder.phi(i64)
    k.add_incoming(const(0), entry)
    turn = builder.phi(i64)                          # k % turns
    turn.add_incoming(const(0), entry)
    accs = [builder.phi(vec) for _ in start]
    for a, s0 in zip(accs, start):
        a.add_incoming(s0, entry)
    builder.cbranch(builder.icmp_signed("<", k, K), body, done)
    builder.position_at_end(body)                    # acc += x[., k] * panel[k], k in order
    mine = builder.icmp_signed("==", turn, turn_)    # this tile's turn: 32 KB ahead; else its own row
    wv = []
    for q in range(P):                               # panel q's row k, then panel q + 1's
        pk = builder.gep(p_.data, [builder.add(builder.mul(const(q), qstride), builder.mul(k, pstride))])
        for line in range(0, TILE_COLS, 16):         # read, into L2 (locality 2)
            ahead = builder.bitcast(builder.gep(pk, [builder.select(mine, const(PREFETCH + line), const(line))]), i8p)
            builder.call(prefetch, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        wv += [builder.load(vptr(pk, v), align=4) for v in range(TILE_COLS // TILE_VEC)]
    undef, splat = ir.Constant(vec, None), ir.Constant(ir.VectorType(i32, TILE_VEC), [0] * TILE_VEC)
    new = []
    for i in range(R):
        xs = builder.insert_element(undef, builder.load(builder.gep(xrows[i], [k])), const(0))
        xb = builder.shuffle_vector(xs, undef, splat)
        new += [builder.fadd(accs[i * nv + v], builder.fmul(xb, wv[v])) for v in range(nv)]
    k.add_incoming(builder.add(k, const(1)), body)
    t1 = builder.add(turn, const(1))
    turn.add_incoming(builder.select(builder.icmp_signed("==", t1, turns_), const(0), t1), body)
    for a, n in zip(accs, new):
        a.add_incoming(n, body)
    builder.branch(head)
    builder.position_at_end(done)
    for i in range(R):
        for v in range(nv):
            builder.store(accs[i * nv + v], vptr(arows[i], v), align=4)
    return context.get_dummy_value()


_tile_r, _tile_2, _tile_1 = (_make_tile(r) for r in (TILE_ROWS, 2, 1))
_tile_pair = _make_tile(1, 2)


@overload(tile)
def _ol_tile(x, k0, panel, acc, b, j, rows, turn, turns):
    def impl(x, k0, panel, acc, b, j, rows, turn, turns):
        if rows == TILE_ROWS:
            _tile_r(x, k0, panel, acc, b, j, turn, turns)
        elif rows == 2:
            _tile_2(x, k0, panel, acc, b, j, turn, turns)
        else:
            _tile_1(x, k0, panel, acc, b, j, turn, turns)
    return impl


@overload(tile_pair)
def _ol_tile_pair(x, k0, panels, acc, b, j, turn, turns):
    return lambda x, k0, panels, acc, b, j, turn, turns: _tile_pair(x, k0, panels, acc, b, j, turn, turns)


# The linear layers' weights, packed (pack()): [K, N] as ceil(N / TILE_COLS) panels of
# [K, TILE_COLS], each contiguous, the last zero-padded. A tile then reads its w in one
# sequential stream, where the [K, N] layout's rows lie N floats apart (for N = 3072 a
# multiple of 4 KB: one L1 set), and prefill needs no per-call panel copy.
def packed_shape(K, N):
    return (-(-N // TILE_COLS), K, TILE_COLS)


def pack(w, out=None, n0=0):
    """w [K, N] (any strides) into column panels: out[n0 // TILE_COLS + p] = w's columns
    p*TILE_COLS.. (n0 a multiple of TILE_COLS); a new packed array when out is None."""
    K, N = w.shape
    if out is None:
        out = np.zeros(packed_shape(K, N), np.float32)
    for p in range(-(-N // TILE_COLS)):
        cols = w[:, p * TILE_COLS:(p + 1) * TILE_COLS]
        out[n0 // TILE_COLS + p, :, :cols.shape[1]] = cols
    return out


def unpack_columns(wp, cols):
    """w[:, cols].T, [len(cols), K], from packed weights (the tied embedding's rows)."""
    cols = np.asarray(cols)
    return wp[cols // TILE_COLS, :, cols % TILE_COLS]


# k-block of the tiles, read from L1 by each row tile after the first: 64 k-steps of 4 x 64
# (16 KB; 16 rows' linears 26-29 ms against 32-35 with 128, 12 layers' four, four
# interleaved rounds; 8 rows and 128 alike), 512 of 6 x 16 (32 KB).
TILE_K = 64 if AVX512 else 512


@njit(cache=True, error_model="numpy", inline="always")
def _matmul_panel(x, wp, p, acc):
    """acc[:B] = x @ panel p of wp, through register tiles: TILE_ROWS rows at a time, then
    2, then 1; k in blocks of TILE_K, each block's tiles in row order. Every element is
    (((0 + x0*w0) + x1*w1) + ...), k strictly in order, whatever B."""
    B, K = x.shape
    acc[:B] = 0.0
    edge = B % TILE_ROWS
    tiles = B // TILE_ROWS + edge // 2 + edge % 2   # per k-block, taking turns to prefetch
    for k0 in range(0, K, TILE_K):
        blk = wp[p, k0:min(K, k0 + TILE_K)]
        b = i = 0
        while b + TILE_ROWS <= B:
            tile(x, k0, blk, acc, b, 0, TILE_ROWS, i, tiles)
            b, i = b + TILE_ROWS, i + 1
        while b + 2 <= B:
            tile(x, k0, blk, acc, b, 0, 2, i, tiles)
            b, i = b + 2, i + 1
        if b < B:
            tile(x, k0, blk, acc, b, 0, 1, i, tiles)


# One row: two panels at a time (tile_pair) instead of one, on both machine kinds. Whole
# batch-1 steps of the 124M shapes, one panel and two alternated in one process (8 rounds
# of 40 steps), the same logits bit for bit (docs/benchmarks.md, ninth and tenth passes):
# AVX2 (Zen 3), two runs: median of the medians 19.83 -> 17.88 and 19.30 -> 16.91 ms, min
# 17.00 -> 15.59 and 17.04 -> 13.55; pairs for the K = 768 linears only (not out's K =
# 3072): 17.21. AVX-512 (Zen 4, 64-column panels: eight zmm accumulators), three runs:
# 18.13 -> 17.60, 17.24 -> 15.76, 16.70 -> 15.53 ms; min 15.54 -> 14.69, 13.92 -> 14.05,
# 15.55 -> 14.38.
PAIRS = True


@njit(cache=True, error_model="numpy", inline="always")
def _matmul_pair(x, wp, p, acc):
    """acc[0, :2*TILE_COLS] = x[0] @ panels p and p + 1 of wp, one tile_pair over all of
    K; the same sums as _matmul_panel's, bit for bit."""
    acc[0] = 0.0
    tile_pair(x, 0, wp[p:p + 2], acc, 0, 0, 0, 1)


# ----------------------------------------------------------------------------- kernels

@njit(cache=True, error_model="numpy", nogil=True)
def layer_norm(x, g, bias, eps, out):                       # [B, C] -> out [B, C]
    B, C = x.shape
    for b in range(B):                                      # serial: too little work to split
        mean = np.float32(0.0)
        for c in range(C):
            mean += x[b, c]
        mean = mean / np.float32(C)
        var = np.float32(0.0)
        for c in range(C):
            d = x[b, c] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / np.float32(C) + np.float32(eps))
        for c in range(C):
            out[b, c] = (x[b, c] - mean) * inv * g[c] + bias[c]


PLAIN, GELU, RESIDUAL = 0, 1, 2     # what _linear does with each row of x @ w + bias


@njit(cache=True, error_model="numpy", inline="always")
def _gelu_into(a, bias, n0, out):
    """out[n] = gelu_new(a[n - n0] + bias[n]) for n in [n0, n0 + len(a)), in float64 as
    gpt2_numpy.gelu: one pass checks that every exp argument is in exp1_normal's range (no
    NaN), so that the second runs the fast exp, which there gives the same bits."""
    n1 = n0 + a.shape[0]
    outside = False
    for n in range(n0, n1):
        y = np.float64(a[n - n0] + bias[n])
        u2 = 2.0 * (GELU_C * (y + ((GELU_A * y) * y) * y))
        outside |= not (u2 >= FAST_LO and u2 <= FAST_HI)
    for n in range(n0, n1):
        y = np.float64(a[n - n0] + bias[n])
        u = GELU_C * (y + ((GELU_A * y) * y) * y)
        e = exp1(2.0 * u) if outside else exp1_normal(2.0 * u)
        th = 1.0 - 2.0 / (e + 1.0)                         # tanh(u), with our exp
        out[n] = np.float32((0.5 * y) * (1.0 + th))


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _linear(x, wp, bias, out, tasks, epilogue):
    """The three linear layers: x [B, K] @ w [K, N] + bias [N], w packed (pack()), then per
    `epilogue` stored into out [B, N] (PLAIN), stored through gelu_new (GELU), or added to
    out (RESIDUAL). `tasks` tasks own a contiguous run of panels each; a task accumulates
    a panel's TILE_COLS columns for all B rows in its scratch, then applies the epilogue
    row by row. One row goes two panels at a time (PAIRS), a task's run even."""
    B = x.shape[0]
    N = out.shape[1]
    n_panels = wp.shape[0]
    pairs = PAIRS and B == 1
    per = (n_panels + tasks - 1) // tasks
    per += per % 2 if pairs else 0
    for t in prange((n_panels + per - 1) // per):
        acc = np.empty((B, 2 * TILE_COLS), np.float32)
        p, end = t * per, min(n_panels, (t + 1) * per)
        while p < end:
            width = 2 if pairs and p + 1 < end else 1
            if width == 2:
                _matmul_pair(x, wp, p, acc)
            else:
                _matmul_panel(x, wp, p, acc)
            n0 = p * TILE_COLS
            for b in range(B):
                _epilogue(acc[b, :min(N, n0 + width * TILE_COLS) - n0], bias, out, b, n0, epilogue)
            p += width


@njit(cache=True, error_model="numpy", inline="always")
def _epilogue(a, bias, out, b, n0, epilogue):
    """Row b, columns [n0, n0 + len(a)) of a linear layer, from its sums a."""
    n1 = n0 + a.shape[0]
    if epilogue == GELU:
        _gelu_into(a, bias, n0, out[b])
    elif epilogue == RESIDUAL:
        for n in range(n0, n1):
            out[b, n] = out[b, n] + (a[n - n0] + bias[n])
    else:
        for n in range(n0, n1):
            out[b, n] = a[n - n0] + bias[n]


@njit(cache=True, error_model="numpy", nogil=True)
def linear(x, wp, bias, out, tasks):                               # [B, K] @ [K, N] + [N] -> out [B, N]
    _linear(x, wp, bias, out, tasks, PLAIN)


@njit(cache=True, error_model="numpy", nogil=True)
def linear_gelu(x, wp, bias, out, tasks):                          # gelu_new([B, K] @ [K, N] + [N])
    _linear(x, wp, bias, out, tasks, GELU)


@njit(cache=True, error_model="numpy", nogil=True)
def linear_residual(x, wp, bias, resid, tasks):                    # resid [B, N] += [B, K] @ [K, N] + [N]
    _linear(x, wp, bias, resid, tasks, RESIDUAL)


@njit(cache=True, error_model="numpy", inline="always")
def _scores(qh, kt, n, s):
    """s[t] = sum over d of qh[d] * kt[d, t] for t < n, d strictly in order, eight d-steps
    per pass over s (the same order as one at a time, an eighth of the loads and stores)."""
    D = qh.shape[0]
    s[:n] = 0.0
    D8 = D - D % 8
    for d in range(0, D8, 8):
        q0, q1, q2, q3 = qh[d], qh[d + 1], qh[d + 2], qh[d + 3]
        q4, q5, q6, q7 = qh[d + 4], qh[d + 5], qh[d + 6], qh[d + 7]
        k0, k1, k2, k3 = kt[d], kt[d + 1], kt[d + 2], kt[d + 3]
        k4, k5, k6, k7 = kt[d + 4], kt[d + 5], kt[d + 6], kt[d + 7]
        for t in range(n):
            s[t] = (((((((s[t] + q0 * k0[t]) + q1 * k1[t]) + q2 * k2[t]) + q3 * k3[t])
                      + q4 * k4[t]) + q5 * k5[t]) + q6 * k6[t]) + q7 * k7[t]
    for d in range(D8, D):
        qd = qh[d]
        kd = kt[d]
        for t in range(n):
            s[t] += qd * kd[t]


@njit(cache=True, error_model="numpy", inline="always")
def _mix(s, total, v, n, o):
    """o[d] += (s[t] / total) * v[t, d] for t = 0, 1, ..., n-1 strictly in order, four
    t-steps per pass over o."""
    n4 = n - n % 4
    for t in range(0, n4, 4):
        p0, p1, p2, p3 = s[t] / total, s[t + 1] / total, s[t + 2] / total, s[t + 3] / total
        v0, v1, v2, v3 = v[t], v[t + 1], v[t + 2], v[t + 3]
        for d in range(o.shape[0]):
            o[d] = (((o[d] + p0 * v0[d]) + p1 * v1[d]) + p2 * v2[d]) + p3 * v3[d]
    for t in range(n4, n):
        p = s[t] / total
        vt = v[t]
        for d in range(o.shape[0]):
            o[d] += p * vt[d]


@njit(cache=True, error_model="numpy", inline="always")
def _softmax_numerators(s, scale):
    """s[t] = exp(s[t] / scale - max) in place, our exp in float64 rounded to float32;
    returns their sum, t in order."""
    n = s.shape[0]
    mx = s[0] / scale
    for t in range(n):
        s[t] = s[t] / scale
        mx = max(mx, s[t])
    outside = False          # a score 708 below the max, or a NaN: the full exp1
    for t in range(n):
        outside |= not np.float64(s[t] - mx) >= FAST_LO
    if outside:              # our exp, in float64, rounded
        for t in range(n):
            s[t] = np.float32(exp1(np.float64(s[t] - mx)))
    else:                    # the same bits where every result is a normal number
        for t in range(n):
            s[t] = np.float32(exp1_normal(np.float64(s[t] - mx)))
    total = np.float32(0.0)
    for t in range(n):       # apart from the exp loop, which then vectorises
        total += s[t]
    return total


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def attend(q, kt_pre, v_pre, n_pre, kt_row, v_row, rows, n_row, out):
    """Causal attention of one new query per row over the shared prompt and the row's own past.

    q [B, H, D]; kt_pre [H, D, P] (keys transposed), v_pre [H, P, D] (first n_pre used);
    kt_row [R, H, D, S], v_row [R, H, S, D]; rows [B] (session row of each batch entry);
    n_row [B] (filled entries of that row, the new token's included); out [B, H, D].
    Keys are stored transposed so that every score sums over d strictly in order while
    the loop over positions vectorises (no reassociation anywhere).
    """
    B, H, D = q.shape
    scale = np.float32(math.sqrt(D))
    for i in prange(B * H):
        # batch entries in the order 0, B-1, 1, B-2, ...: each thread's contiguous share
        # of i then holds short and long rows alike (a prefill's row b attends to b + 1
        # positions; in order, the last thread would get three quarters of the work)
        j = i // H
        b = j // 2 if j % 2 == 0 else B - 1 - j // 2
        h = i % H
        r = rows[b]
        m = n_row[b]
        s = np.empty(n_pre + m, np.float32)
        _scores(q[b, h], kt_pre[h], n_pre, s[:n_pre])
        _scores(q[b, h], kt_row[r, h], m, s[n_pre:])
        total = _softmax_numerators(s, scale)
        o = out[b, h]
        o[:] = 0.0
        _mix(s[:n_pre], total, v_pre[h], n_pre, o)
        _mix(s[n_pre:], total, v_row[r, h], m, o)


# Prompts from PROMPT_TILE_MIN tokens take attend_prompt (AVX2: 64 tokens 0.86x as fast as
# attend, 96 1.4x, 512 1.6x; AVX-512: 8 0.7-0.85x, 12 alike, 16 1.1-1.3x, 512 2.1-2.7x).
PROMPT_TILE_MIN = 16 if AVX512 else 96


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def attend_prompt(q, kt, v, out):
    """attend() for a prompt: query t attends to positions 0..t of the same row, none
    shared (n_pre = 0). q [T, H, D]; kt [H, D, S] and v [H, S, D], that row's cache (S >= T);
    out [T, H, D]. The same bits as attend() with rows = 0 and n_row = 1..T: every score
    and every output element the same sum in the same order. Queries go TILE_ROWS at a
    time through register tiles (TILE_COLS positions per tile for the scores, then
    TILE_COLS of D for the mix, over the positions all of the tile's queries attend to,
    each query's last few after it, in order); the last T % TILE_ROWS queries go as in
    attend(). Parallel over heads."""
    T, H, D = q.shape
    scale = np.float32(math.sqrt(D))
    Tt = T - T % TILE_ROWS
    Tp = (T + TILE_COLS - 1) // TILE_COLS * TILE_COLS
    for h in prange(H):
        p = np.zeros((T, Tp), np.float32)         # scores, then the softmax numerators
        panel = np.zeros((D, TILE_COLS), np.float32)
        qh, kh, vh, oh = q[:, h], kt[h], v[h], out[:, h]
        for t0 in range(0, Tp, TILE_COLS):        # positions t0.., keys copied
            for d in range(D):                    # contiguous (zero past T; unused)
                for c in range(TILE_COLS):
                    panel[d, c] = kh[d, t0 + c] if t0 + c < T else np.float32(0.0)
            for b in range(t0 // TILE_ROWS * TILE_ROWS, Tt, TILE_ROWS):
                tile(qh, 0, panel, p, b, t0, TILE_ROWS, 0, 1)  # the queries that reach t0
        for b in range(Tt, T):
            _scores(qh[b], kh, b + 1, p[b])
        for b in range(T):
            s = p[b, :b + 1]
            total = _softmax_numerators(s, scale)
            for t in range(b + 1):
                s[t] = s[t] / total               # attend's weights, s[t] / total
        oh[:] = 0.0
        for d0 in range(0, D - D % TILE_COLS, TILE_COLS):
            for b in range(0, Tt, TILE_ROWS):     # positions 0..b: all the tile's queries reach them
                tile(p, 0, vh[:b + 1, d0:d0 + TILE_COLS], oh, b, d0, TILE_ROWS, 0, 1)
                for i in range(1, TILE_ROWS):     # then query b+i's own last i, in order
                    o = oh[b + i, d0:d0 + TILE_COLS]
                    for t in range(b + 1, b + i + 1):
                        w = p[b + i, t]
                        for c in range(TILE_COLS):
                            o[c] += w * vh[t, d0 + c]
        for b in range(T):                        # D % TILE_COLS columns, the last T % TILE_ROWS queries
            dl = D - D % TILE_COLS if b < Tt else 0
            for t in range(b + 1):
                w = p[b, t]
                for d in range(dl, D):
                    oh[b, d] += w * vh[t, d]


# ----------------------------------------------------------------------------- the blocks

@njit(cache=True, error_model="numpy", nogil=True)
def blocks(x, w, eps, k_pre, v_pre, n_pre, k_row, v_row, rows, slot, tasks):
    """Every transformer block, in one call that holds no GIL (gpt2_numpy.blocks is the
    same loop in Python, and its spec). x [B, C] (embedded tokens) is updated in place and
    returned; w: the per-layer weights, 12 tuples of L arrays (runtime.BLOCK_WEIGHTS' order);
    token i is row rows[i]'s entry slot[i], after the n_pre shared prompt entries of
    k_pre / v_pre (L x [H, D, P], [H, P, D]); its key and value go into k_row / v_row
    (L x [R, H, D, S], [R, H, S, D]). Called from Python, a forward re-took the GIL after
    each of its ~100 kernel and NumPy calls: with one pure-Python thread beside it, a
    16-row forward of the bundled model took 617 ms instead of 4.5 (GIL hand-offs)."""
    ln1_g, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_g, ln2_b, fc_w, fc_b, out_w, out_b = w
    B, C = x.shape
    H = k_row[0].shape[1]
    D = C // H
    h = np.empty((B, C), np.float32)
    qkv = np.empty((B, 3 * C), np.float32)
    q = np.empty((B, H, D), np.float32)
    a = np.empty((B, H, D), np.float32)
    f = np.empty((B, fc_b[0].shape[0]), np.float32)
    n_row = slot + 1
    prompt = n_pre == 0 and B >= PROMPT_TILE_MIN        # one row's prompt, from its start
    for i in range(B):
        prompt &= rows[i] == rows[0] and slot[i] == i
    for layer in range(len(k_row)):
        layer_norm(x, ln1_g[layer], ln1_b[layer], eps, h)
        linear(h, attn_w[layer], attn_b[layer], qkv, tasks)
        kr, vr = k_row[layer], v_row[layer]
        for i in range(B):                                  # split q | k | v, store k and v
            r, s = rows[i], slot[i]
            for hh in range(H):
                for d in range(D):
                    q[i, hh, d] = qkv[i, hh * D + d]
                    kr[r, hh, d, s] = qkv[i, C + hh * D + d]
                    vr[r, hh, s, d] = qkv[i, 2 * C + hh * D + d]
        if prompt:
            attend_prompt(q, kr[rows[0]], vr[rows[0]], a)
        else:
            attend(q, k_pre[layer], v_pre[layer], n_pre, kr, vr, rows, n_row, a)
        linear_residual(a.reshape(B, C), proj_w[layer], proj_b[layer], x, tasks)
        layer_norm(x, ln2_g[layer], ln2_b[layer], eps, h)
        linear_gelu(h, fc_w[layer], fc_b[layer], f, tasks)
        linear_residual(f, out_w[layer], out_b[layer], x, tasks)
    return x
