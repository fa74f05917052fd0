"""kernels/nrt_cache.py: Numba's runtime module comes from a file after the first process,
and everything that needs it (our cached kernels, functions compiled afresh) still works."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no JIT, no runtime module")

SCRIPT = r"""
import hashlib
import numpy as np
from numba import njit, prange
from numba.core.runtime import nrtdynmod
import refcomplete.kernels.gpt2 as g

compiles = []
build = nrtdynmod.create_nrt_module
nrtdynmod.create_nrt_module = lambda ctx: compiles.append(1) or build(ctx)

x = np.linspace(-3, 3, 2 * 768, dtype=np.float32).reshape(2, 768)
out = np.empty_like(x)
g.layer_norm(x, x[0], x[1], 1e-5, out)              # a cached kernel of ours

@njit(parallel=True)
def fresh(n):                                       # compiled now: allocates, so it needs the runtime
    a = np.empty(n)
    for i in prange(n):
        a[i] = i * 0.5
    return a.copy(), [a[0], a[-1]]

arr, lst = fresh(1000)
print(len(compiles), hashlib.sha256(out.tobytes() + arr.tobytes()).hexdigest(), lst)
"""


def run(env):
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    compiles, rest = r.stdout.split(" ", 1)
    return int(compiles), rest


def test_runtime_module_is_compiled_once_then_loaded(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    first, out1 = run(env)
    files = list(tmp_path.rglob("numba-nrt-*.nbo"))
    assert first == 1 and len(files) == 1
    assert oct(files[0].stat().st_mode & 0o777) == "0o644"
    second, out2 = run(env)
    assert second == 0, "the second process compiled Numba's runtime module again"
    assert out1 == out2


def test_a_damaged_file_is_compiled_again_and_replaced(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    _, good = run(env)
    (path,) = tmp_path.rglob("numba-nrt-*.nbo")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    compiles, out = run(env)
    assert compiles == 1 and out == good
    assert path.stat().st_size == size
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_key_follows_the_target(tmp_path):
    """Another CPU name (as under the AVX2 bit tests) is another file, never this one's code."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    _, native = run(env)
    compiles, haswell = run(dict(env, NUMBA_CPU_NAME="haswell"))
    assert compiles == 1 and haswell == native
    assert len(list(tmp_path.rglob("numba-nrt-*.nbo"))) == 2
