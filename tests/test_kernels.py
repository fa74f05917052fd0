"""Each Numba kernel against its NumPy twin; batch invariance of every kernel.

Also run with NUMBA_DISABLE_JIT=1 (test_kernels_without_jit), so the interpreted
Python of the kernels is pinned to the twins too.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from refcomplete.kernels import gpt2 as k

RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


SHAPES = [(1, 16, 24), (3, 64, 300), (5, 40, 257)]  # (B, K, N): N not a multiple of the task size


@pytest.mark.parametrize("B,K,N", SHAPES)
def test_linear_family_matches_twins(B, K, N):
    x, w, b, resid = rand(B, K), rand(K, N, scale=0.2), rand(N), rand(B, N)
    out = np.empty((B, N), np.float32)
    k.linear(x, w, b, out, 2)
    np.testing.assert_allclose(out, k.linear_ref(x, w, b), rtol=1e-5, atol=1e-5)
    k.linear_gelu(x, w, b, out, 3)
    np.testing.assert_allclose(out, k.linear_gelu_ref(x, w, b), rtol=1e-5, atol=1e-5)
    expect = k.linear_residual_ref(x, w, b, resid)
    k.linear_residual(x, w, b, resid, 2)
    np.testing.assert_allclose(resid, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,C", [(1, 8), (4, 64), (2, 37)])
def test_layer_norm(B, C):
    x, g, b = rand(B, C, scale=3), rand(C), rand(C)
    out = np.empty_like(x)
    k.layer_norm(x, g, b, 1e-5, out)
    np.testing.assert_allclose(out, k.layer_norm_ref(x, g, b, 1e-5), rtol=1e-4, atol=1e-5)


def attention_case(B=3, H=2, D=16, P=5, R=4, S=6):
    q, k_pre, v_pre = rand(B, H, D), rand(H, D, P), rand(H, P, D)      # keys transposed
    k_row, v_row = rand(R, H, D, S), rand(R, H, S, D)
    rows = np.array([2, 0, 3][:B], np.int64)
    n_row = np.array([1, 4, 6][:B], np.int64)
    return q, k_pre, v_pre, P, k_row, v_row, rows, n_row


def test_attend_matches_twin():
    args = attention_case()
    out = np.empty_like(args[0])
    k.attend(*args, out)
    np.testing.assert_allclose(out, k.attend_ref(*args), rtol=1e-5, atol=1e-6)


def test_kernels_are_batch_invariant():
    """A row's result is bitwise the same alone or in any batch (SEMANTICS 4)."""
    x, w, b = rand(6, 64), rand(64, 300, scale=0.2), rand(300)
    full = np.empty((6, 300), np.float32)
    k.linear(x, w, b, full, 2)
    for i in range(6):
        one = np.empty((1, 300), np.float32)
        k.linear(x[i:i + 1], w, b, one, 1 + i % 3)  # the task split never changes a value
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
out = np.empty((5, 300), np.float32); k.linear(x, w, b, out, 2)
g = np.empty((5, 300), np.float32); k.linear_gelu(x, w, b, g, 2)
args = t.attention_case(B=3, H=4, D=64, P=300, R=4, S=40)
a = np.empty_like(args[0]); k.attend(*args, a)
print(hashlib.sha256(out.tobytes() + g.tobytes() + a.tobytes()).hexdigest())
"""


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
