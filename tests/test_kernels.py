"""Each Numba kernel against its NumPy twin, bit for bit (np.array_equal, never allclose);
batch invariance of every kernel; the twins against the BLAS reference math.

Also run with NUMBA_DISABLE_JIT=1 (test_kernels_without_jit), so the interpreted
Python of the kernels is pinned to the twins too.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from refcomplete.kernels import gpt2 as k
from refcomplete.kernels import gpt2_numpy as twin
from test_bits_portable import AVX2_FEATURES

RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


SHAPES = [(1, 16, 24), (3, 64, 300), (5, 40, 257), (2, 128, 33),  # (B, K, N): N not a multiple
          (3, 13, 50), (2, 7, 20), (4, 21, 33),                  # of the task size; K not of 8
          (1, 300, 77), (1, 2 * 512 + 5, 16 * 7)]                # one row: pairs, an odd panel left


@pytest.mark.parametrize("B,K,N", SHAPES)
def test_linear_family_equals_twins_bitwise(B, K, N):
    x, w, b, resid = rand(B, K), rand(K, N, scale=0.2), rand(N), rand(B, N)
    for kern, tw in ((k.linear, twin.linear), (k.linear_gelu, twin.linear_gelu)):
        out, ref = np.empty((B, N), np.float32), np.empty((B, N), np.float32)
        kern(x, k.pack(w), b, out, 2)
        tw(x, w, b, ref, 2)
        assert np.array_equal(out, ref), kern
    r1, r2 = resid.copy(), resid.copy()
    k.linear_residual(x, k.pack(w), b, r1, 3)
    twin.linear_residual(x, w, b, r2, 3)
    assert np.array_equal(r1, r2)
    # and the twins are the math: the BLAS forward within float32 rounding
    out = np.empty((B, N), np.float32)
    twin.linear_gelu(x, w, b, out)
    y = x.astype(np.float64) @ w + b
    gelu = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    np.testing.assert_allclose(out, gelu, rtol=2e-5, atol=2e-5)


def test_gelu_at_its_extremes():
    """Huge |y| overflows exp(2u) to inf (tanh 1) or underflows it to 0 (tanh -1): no NaN."""
    x = np.array([[1.0]], np.float32)
    for v in (-1e30, -30.0, -1e-30, 0.0, 1e-30, 30.0, 1e30):
        out, ref = np.empty((1, 1), np.float32), np.empty((1, 1), np.float32)
        w = np.array([[v]], np.float32)
        k.linear_gelu(x, k.pack(w), np.zeros(1, np.float32), out, 1)
        twin.linear_gelu(x, w, np.zeros(1, np.float32), ref)
        assert np.array_equal(out, ref) and np.isfinite(out).all()
    assert out[0, 0] == np.float32(1e30)


@pytest.mark.parametrize("B,C", [(1, 8), (4, 64), (2, 37), (3, 768)])
def test_layer_norm_equals_twin_bitwise(B, C):
    x, g, b = rand(B, C, scale=3), rand(C), rand(C)
    out, ref = np.empty_like(x), np.empty_like(x)
    k.layer_norm(x, g, b, 1e-5, out)
    twin.layer_norm(x, g, b, 1e-5, ref)
    assert np.array_equal(out, ref)
    m = x.astype(np.float64).mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(out, (x - m) / np.sqrt(v + 1e-5) * g + b, rtol=1e-4, atol=1e-5)


def attention_case(B=3, H=2, D=16, P=5, R=4, S=6):
    q, k_pre, v_pre = rand(B, H, D), rand(H, D, P), rand(H, P, D)      # keys transposed
    k_row, v_row = rand(R, H, D, S), rand(R, H, S, D)
    k_row[:, :, :, -1] = np.nan                  # an unfilled slot: must never be read
    rows = np.array([2, 0, 3][:B], np.int64)
    n_row = np.array([1, 4, S - 1][:B], np.int64)
    return q, k_pre, v_pre, P, k_row, v_row, rows, n_row


def attend_math(q, kt_pre, v_pre, n_pre, kt_row, v_row, rows, n_row):
    """Attention as plain float64 math (einsum, np.exp): what the kernels approximate."""
    B, H, D = q.shape
    out = np.empty(q.shape)
    for b in range(B):
        kk = np.concatenate([kt_pre[:, :, :n_pre], kt_row[rows[b], :, :, : n_row[b]]], axis=2)
        vv = np.concatenate([v_pre[:, :n_pre], v_row[rows[b], :, : n_row[b]]], axis=1)
        s = np.einsum("hd,hdt->ht", q[b].astype(np.float64), kk) / np.sqrt(D)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        out[b] = np.einsum("ht,htd->hd", p / p.sum(-1, keepdims=True), vv)
    return out


@pytest.mark.parametrize("shape", [{}, dict(B=3, H=4, D=64, P=300, R=4, S=40), dict(B=40, P=0, S=45)])
def test_attend_equals_twin_bitwise(shape):
    args = attention_case(**shape)
    if shape.get("B") == 40:                                     # a prefill: 40 rows, 40 lengths
        q, k_pre, v_pre, P, k_row, v_row, _, _ = args
        args = (rand(40, 2, 16), k_pre, v_pre, 0, k_row, v_row, np.zeros(40, np.int64),
                np.arange(1, 41, dtype=np.int64) + 4)          # the NaN slot 44 stays unread
    out, ref = np.empty_like(args[0]), np.empty_like(args[0])
    k.attend(*args, out)
    twin.attend(*args, ref)
    assert np.array_equal(out, ref)
    np.testing.assert_allclose(out, attend_math(*args), rtol=1e-5, atol=1e-6)


def test_attend_takes_the_full_exp_where_a_score_is_708_below_the_max():
    """Scores thousands apart: exp underflows to subnormals and 0 (the kernel's slow path);
    a NaN query gives NaN, as the twin does."""
    q, k_pre, v_pre, P, k_row, v_row, rows, n_row = attention_case(B=3, H=2, D=16, P=5)
    q = q * np.float32(400.0)
    q[2, 1, 0] = np.nan
    out, ref = np.empty_like(q), np.empty_like(q)
    k.attend(q, k_pre, v_pre, P, k_row, v_row, rows, n_row, out)
    twin.attend(q, k_pre, v_pre, P, k_row, v_row, rows, n_row, ref)
    assert np.array_equal(out, ref, equal_nan=True)
    assert np.isnan(out[2, 1]).all() and np.isfinite(out[:2]).all()


@pytest.mark.parametrize("T,H,D,S,scale", [(40, 2, 16, 45, 1.0), (37, 3, 64, 50, 1.0), (64, 2, 24, 64, 1.0),
                                           (6, 1, 16, 6, 1.0), (13, 2, 16, 1024, 1.0), (50, 2, 16, 50, 400.0)])
def test_attend_prompt_equals_attend_bitwise(T, H, D, S, scale):
    """A prompt's attention through register tiles: T % TILE_ROWS edge queries, D %
    TILE_COLS edge columns, a capacity S of 4 KB rows, the NaN entries past T never read,
    and (scale 400) scores thousands apart, the full exp's path."""
    q = rand(T, H, D, scale=scale)
    k_row = np.full((1, H, D, S), np.nan, np.float32)
    v_row = np.full((1, H, S, D), np.nan, np.float32)
    k_row[..., :T], v_row[:, :, :T] = rand(1, H, D, T, scale=scale), rand(1, H, T, D)
    args = (q, np.zeros((H, D, 0), np.float32), np.zeros((H, 0, D), np.float32), 0, k_row, v_row,
            np.zeros(T, np.int64), np.arange(1, T + 1, dtype=np.int64))
    out, ref = np.empty_like(q), np.empty_like(q)
    k.attend_prompt(q, k_row[0], v_row[0], out)
    twin.attend(*args, ref)
    assert np.array_equal(out, ref)
    np.testing.assert_allclose(out, attend_math(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("B,n_pre,prompt", [(3, 5, False), (7, 0, False), (k.PROMPT_TILE_MIN + 3, 0, True)])
def test_blocks_equal_twin_bitwise(B, n_pre, prompt):
    """The whole layer loop (one compiled call) against its NumPy twin: the hidden states
    and every key and value it writes into the rows' caches; also for one row's prompt
    (attend_prompt)."""
    L, C, H, R, S = 2, 32, 2, 4, (B + 2 if prompt else 12)
    D = C // H
    w = tuple(tuple(rand(*shape, scale=0.3) for _ in range(L)) for shape in (
        (C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,), (C, 4 * C), (4 * C,),
        (4 * C, C), (C,)))
    k_pre = tuple(rand(H, D, n_pre) for _ in range(L))
    v_pre = tuple(rand(H, n_pre, D) for _ in range(L))
    rows = np.array([i % R for i in range(B)] if not prompt else [1] * B, np.int64)
    slot = np.array([i // R for i in range(B)] if not prompt else range(B), np.int64)  # distinct (row, slot);
    # every entry a token attends to is written in the same layer; the NaN rest is unread
    x = rand(B, C)
    got, ref = [], []
    for mod, out in ((k, got), (twin, ref)):
        fn = mod.blocks
        wb = tuple(tuple(mod.pack(m) for m in ws) if i in (2, 4, 8, 10) else ws for i, ws in enumerate(w))
        k_row = tuple(np.full((R, H, D, S), np.nan, np.float32) for _ in range(L))
        v_row = tuple(np.full((R, H, S, D), np.nan, np.float32) for _ in range(L))
        xs = x.copy()
        fn(xs, wb, 1e-5, k_pre, v_pre, n_pre, k_row, v_row, rows, slot, 2)
        out += [xs, *k_row, *v_row]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, ref))
    assert np.isfinite(got[0]).all()


def test_kernels_are_batch_invariant():
    """A row's result is bitwise the same alone or in any batch (SEMANTICS 4)."""
    x, w, b = rand(6, 64), rand(64, 300, scale=0.2), rand(300)
    full = np.empty((6, 300), np.float32)
    k.linear(x, k.pack(w), b, full, 2)
    for i in range(6):
        one = np.empty((1, 300), np.float32)
        k.linear(x[i:i + 1], k.pack(w), b, one, 1 + i % 3)  # the task split never changes a value
        assert np.array_equal(one[0], full[i])
    q, k_pre, v_pre, P, k_row, v_row, rows, n_row = attention_case()
    out = np.empty_like(q)
    k.attend(q, k_pre, v_pre, P, k_row, v_row, rows, n_row, out)
    alone = np.empty_like(q[1:2])
    k.attend(q[1:2], k_pre, v_pre, P, k_row, v_row, rows[1:2], n_row[1:2], alone)
    assert np.array_equal(alone[0], out[1])


COLD_WARM = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import test_kernels as t
from refcomplete.kernels import gpt2 as k
x, w, b = t.rand(5, 64), t.rand(64, 300, scale=0.2), t.rand(300)
out = np.empty((5, 300), np.float32); k.linear(x, k.pack(w), b, out, 2)
g = np.empty((5, 300), np.float32); k.linear_gelu(x, k.pack(w), b, g, 2)
args = t.attention_case(B=3, H=4, D=64, P=300, R=4, S=40)
a = np.empty_like(args[0]); k.attend(*args, a)
print(hashlib.sha256(out.tobytes() + g.tobytes() + a.tobytes()).hexdigest())
"""


@pytest.mark.parametrize("B", [1, 2, 3, k.TILE_ROWS, k.TILE_ROWS + 3, 2 * k.TILE_ROWS + 1, 33])
@pytest.mark.parametrize("K", [16, 300, 2 * k.TILE_K + 5])
def test_register_tiles_equal_twin_bitwise(B, K):
    """One panel through the register tiles, in this target's tile shape: TILE_ROWS-row
    tiles, then tiles of 2 and 1 rows for the B % TILE_ROWS edge, k in blocks of TILE_K
    (K one block, several, and a partial last one). Under NUMBA_DISABLE_JIT=1 this pins
    the tile's interpreted twin."""
    from numba import njit

    x, w = rand(B, K), rand(K, 2 * k.TILE_COLS + 3, scale=0.2)
    acc = np.full((B + 1, k.TILE_COLS), np.nan, np.float32)            # row B: never written
    panel = njit(lambda x, wp, p, acc: k._matmul_panel(x, wp, p, acc))
    panel(x, k.pack(w), 1, acc)
    assert np.array_equal(acc[:B], twin._matmul(x, w[:, k.TILE_COLS:2 * k.TILE_COLS]))
    assert np.isnan(acc[B]).all()


@pytest.mark.parametrize("K", [1, 16, 300, 2 * k.TILE_K + 5])
def test_pair_tile_equals_two_single_panels_bitwise(K):
    """One row over two adjacent panels at once (the batch-1 path) gives each panel's
    single-panel sums, bit for bit, and writes only its row's 2 x TILE_COLS accumulators.
    Under NUMBA_DISABLE_JIT=1 this pins tile_pair's interpreted twin."""
    from numba import njit

    x, w = rand(1, K), rand(K, 4 * k.TILE_COLS, scale=0.2)
    wp = k.pack(w)
    acc = np.full((2, 2 * k.TILE_COLS), np.nan, np.float32)               # row 1: never written
    njit(lambda x, wp, p, acc: k._matmul_pair(x, wp, p, acc))(x, wp, 1, acc)
    assert np.array_equal(acc[:1], twin._matmul(x, w[:, k.TILE_COLS:3 * k.TILE_COLS]))
    assert np.isnan(acc[1]).all()
    one = np.empty((1, k.TILE_COLS), np.float32)
    panel = njit(lambda x, wp, p, acc: k._matmul_panel(x, wp, p, acc))
    for q in (1, 2):
        panel(x, wp, q, one)
        assert np.array_equal(one[0], acc[0, (q - 1) * k.TILE_COLS:q * k.TILE_COLS])


@pytest.mark.parametrize("K,N", [(5, 1), (7, 16), (3, 65), (768, 2304)])
def test_pack_keeps_every_weight_and_pads_with_zeros(K, N):
    w = rand(K, N)
    wp = k.pack(w)
    assert wp.shape == k.packed_shape(K, N) == (-(-N // k.TILE_COLS), K, k.TILE_COLS)
    assert np.array_equal(wp.transpose(1, 0, 2).reshape(K, -1)[:, :N], w)
    assert not wp.transpose(1, 0, 2).reshape(K, -1)[:, N:].any()
    cols = np.array([0, N - 1, N // 2])
    assert np.array_equal(k.unpack_columns(wp, cols), w[:, cols].T)
    assert np.array_equal(twin.unpack_columns(twin.pack(w), cols), w[:, cols].T)
    into = np.zeros(k.packed_shape(K, N + 2 * k.TILE_COLS), np.float32)   # pack(out=, n0=): the head's way
    k.pack(w, into, 2 * k.TILE_COLS)
    assert np.array_equal(k.unpack_columns(into, cols + 2 * k.TILE_COLS), w[:, cols].T)


TILED_LINEARS = """
import sys
import numpy as np
from refcomplete.kernels import gpt2 as k, gpt2_numpy as t
if sys.argv[1:] == ["--shape-only"]:        # the host cannot run this target's code
    print(f"{k.TILE_ROWS}x{k.TILE_COLS}/{k.TILE_VEC}")
    sys.exit()
r = np.random.default_rng(1)
N = 3 * k.TILE_COLS * 2 + 7                      # two tasks of three panels and a partial one
x, w, b = (r.standard_normal(s).astype(np.float32) for s in ((2 * k.TILE_ROWS + 3, 70), (70, N), (N,)))
same = []
for kern, tw in ((k.linear, t.linear), (k.linear_gelu, t.linear_gelu), (k.linear_residual, t.linear_residual)):
    o1 = np.ones((len(x), N), np.float32)
    o2 = o1.copy()
    kern(x, k.pack(w), b, o1, 2)
    tw(x, w, b, o2, 2)
    same.append(bool(np.array_equal(o1, o2)))
print(f"{k.TILE_ROWS}x{k.TILE_COLS}/{k.TILE_VEC}", all(same))
"""


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no compile target")
@pytest.mark.parametrize("features,shape", [(AVX2_FEATURES, "6x16/8"), (AVX2_FEATURES + ",+avx512f", "4x64/16")])
def test_tiles_follow_the_compile_target(tmp_path, features, shape):
    """The tile's shape follows the target Numba compiles for (on any machine:
    NUMBA_CPU_FEATURES sets it), and prefill-sized linears equal their twins in either
    shape, bit for bit."""
    env = dict(os.environ, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path))
    from numba.core.codegen import get_host_cpu_features    # what gpt2.py reads, too
    host = set(get_host_cpu_features().split(","))
    runnable = all(f in host for f in features.split(",") if f.startswith("+avx512"))
    args = [] if runnable else ["--shape-only"]       # AVX-512 code on an AVX2 host: SIGILL
    r = subprocess.run([sys.executable, "-c", TILED_LINEARS, *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ([shape, "True"] if runnable else [shape])


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no JIT, no cache")
def test_cold_and_warm_cache_agree(tmp_path):
    """Freshly JIT-compiled and cache-loaded kernels give the same bits (they did not while
    dot products allowed reassociation: the cached machine code summed in another order)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    run = lambda: subprocess.run([sys.executable, "-c", COLD_WARM, os.path.dirname(__file__)], env=env,
                                 capture_output=True, text=True, timeout=600, check=True).stdout
    cold, warm = run(), run()
    assert any((tmp_path / "numba-cache").rglob("*.nbi")), "nothing was cached"
    assert cold == warm


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="already without JIT")
def test_kernels_without_jit():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
