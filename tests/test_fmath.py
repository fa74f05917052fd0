"""Our exp, log and sum (kernels/fmath.py): accuracy against an exact reference (mpmath at
120 bits), edge cases, the published test vectors and constants, the Numba twins'
bits, and no libm transcendental in any compiled kernel (SEMANTICS 11)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refcomplete.kernels import fmath

mpmath = pytest.importorskip("mpmath")
JIT = os.environ.get("NUMBA_DISABLE_JIT") != "1"
N_POINTS = int(os.environ.get("REFCOMPLETE_FMATH_POINTS", 1_000_000))
INF, NAN = float("inf"), float("nan")


def correctly_rounded(fn, xs: np.ndarray) -> np.ndarray:
    """fn(x) for each x at 120 bits, rounded once to float64 (mpmath's float() rounds to nearest)."""
    with mpmath.workprec(120):
        return np.array([float(fn(mpmath.mpf(x))) for x in xs.tolist()])


def ulps_apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many float64 steps separate a and b (finite, same sign or zero)."""
    ia, ib = a.view(np.int64).astype(object), b.view(np.int64).astype(object)
    return np.array([abs(int(x) - int(y)) for x, y in zip(ia, ib)])


def exp_points(n: int, rng) -> np.ndarray:
    q = n // 5
    return np.concatenate([
        rng.uniform(-745.1, 709.7, 2 * q),                        # the whole finite range
        rng.uniform(-50.0, 0.0, q),                               # softmax's range
        rng.uniform(-1.0, 1.0, q // 2),
        np.copysign(10.0 ** rng.uniform(-300, 0, n - 4 * q - q // 2),
                    rng.uniform(-1, 1, n - 4 * q - q // 2)),      # tiny |x|
        rng.uniform(-745.13321910194122, -708.39641853226408, q),  # results in the subnormals
    ])


def log_points(n: int, rng) -> np.ndarray:
    q = n // 5
    return np.concatenate([
        np.exp(rng.uniform(-744.4, 709.7, 2 * q)),                # every binade, subnormals too
        rng.uniform(0.5, 2.0, q),
        1.0 + rng.uniform(-1e-3, 1e-3, q),                        # log(1 + small)
        rng.uniform(0.0, 2.0 ** -1022, n - 4 * q),                # subnormal inputs
    ])


@pytest.mark.parametrize("name", ["exp", "log"])
def test_within_one_ulp_of_the_correctly_rounded_result(name):
    rng = np.random.default_rng(20261201)
    xs = exp_points(N_POINTS, rng) if name == "exp" else log_points(N_POINTS, rng)
    ours = getattr(fmath, name)(xs)
    exact = correctly_rounded(getattr(mpmath, name), xs)
    finite = np.isfinite(exact) & (exact != 0)
    apart = ulps_apart(ours[finite], exact[finite])
    assert apart.max() <= 1, xs[finite][apart > 1][:5]
    print(f"{name}: {len(apart)} finite points, max {apart.max()} ulp, {100 * (apart == 0).mean():.2f}% correctly rounded")
    assert (apart == 0).mean() > 0.9                              # measured: exp 93.3%, log 98.5%
    assert np.array_equal(ours[~finite], exact[~finite])          # underflow to 0 where exact is 0


def test_edge_cases():
    x = np.array([0.0, -0.0, INF, -INF, NAN, 709.782712893384, 709.7827128933841, -745.1332191019411,
                  -745.1332191019412, -746.0, 1e-320, -1e-320, 5e-324, 1.0, -1.0])
    e = fmath.exp(x)
    assert e[:4].tolist() == [1.0, 1.0, INF, 0.0] and np.isnan(e[4])
    assert e[5] == 1.7976931348622732e308 and e[6] == INF                # last finite, then overflow
    assert e[7] == 5e-324 and e[8] == 0.0 and e[9] == 0.0                # smallest subnormal, then 0
    assert e[10:13].tolist() == [1.0, 1.0, 1.0] and e[13] == 2.7182818284590455        # 1 ulp above the rounded e (fdlibm's)
    y = np.array([0.0, -0.0, INF, -INF, NAN, -1.0, 5e-324, 2.0 ** -1022, 1.0, 2.0, 1.7976931348623157e308])
    g = fmath.log(y)
    assert g[0] == -INF and g[1] == -INF and g[2] == INF and np.isnan(g[3:6]).all()
    assert g[6] == -744.4400719213812 and g[7] == -708.3964185322641
    assert g[8] == 0.0 and not np.signbit(g[8]) and g[9] == 0.6931471805599453
    assert g[10] == 709.782712893384


# (x, exp(x)) and (x, log(x)) as float.hex: the vectors docs/semantics.md publishes.
VECTORS = {
    "exp": [
        ("0x0.0p+0", "0x1.0000000000000p+0"),      # exp(0.0) = 1.0
        ("0x1.0000000000000p+0", "0x1.5bf0a8b14576ap+1"),      # exp(1.0) = 2.7182818284590455
        ("-0x1.0000000000000p+0", "0x1.78b56362cef38p-2"),      # exp(-1.0) = 0.36787944117144233
        ("0x1.0000000000000p-1", "0x1.a61298e1e069cp+0"),      # exp(0.5) = 1.6487212707001282
        ("-0x1.4000000000000p+3", "0x1.7cd79b5647c9ap-15"),      # exp(-10.0) = 4.539992976248485e-05
        ("0x1.62e42fefa39efp+9", "0x1.fffffffffff2ap+1023"),      # exp(709.782712893384) = 1.7976931348622732e+308
        ("-0x1.74910d52d3051p+9", "0x0.0000000000001p-1022"),      # exp(-745.1332191019411) = 5e-324
        ("-0x1.6272bdd7abcd2p+9", "0x0.9b4597e37cb50p-1022"),      # exp(-708.8964185322641) = 1.3495755153097447e-308
        ("0x1.0000000000000p-30", "0x1.0000000400000p+0"),      # exp(9.313225746154785e-10) = 1.0000000009313226
        ("-0x1.999999999999ap-4", "0x1.cf46d99d52b3ap-1"),      # exp(-0.1) = 0.9048374180359595
        ("0x1.c000000000000p+1", "0x1.08ec721396bdbp+5"),      # exp(3.5) = 33.11545195869231
        ("-0x1.4400000000000p+4", "0x1.b93de1e27ca3bp-30"),      # exp(-20.25) = 1.6052280551856116e-09
    ],
    "log": [
        ("0x1.0000000000000p+0", "0x0.0p+0"),      # log(1.0) = 0.0
        ("0x1.0000000000000p+1", "0x1.62e42fefa39efp-1"),      # log(2.0) = 0.6931471805599453
        ("0x1.4000000000000p+3", "0x1.26bb1bbb55516p+1"),      # log(10.0) = 2.302585092994046
        ("0x1.0000000000000p-1", "-0x1.62e42fefa39efp-1"),      # log(0.5) = -0.6931471805599453
        ("0x1.5bf0a8b145769p+1", "0x1.0000000000000p+0"),      # log(2.718281828459045) = 1.0
        ("0x0.0000000000001p-1022", "-0x1.74385446d71c3p+9"),      # log(5e-324) = -744.4400719213812
        ("0x1.fffffffffffffp+1023", "0x1.62e42fefa39efp+9"),      # log(1.7976931348623157e+308) = 709.782712893384
        ("0x1.6a09e667f3bcdp+0", "0x1.62e42fefa39f0p-2"),      # log(1.4142135623730951) = 0.3465735902799727
        ("0x1.0000000100000p+0", "0x1.ffffffff00000p-33"),      # log(1.0000000002328306) = 2.3283064362676457e-10
        ("0x1.999999999999ap-4", "-0x1.26bb1bbb55515p+1"),      # log(0.1) = -2.3025850929940455
        ("0x1.56e1fc2f8f359p-997", "-0x1.5963447f87fb5p+9"),      # log(1e-300) = -690.7755278982137
        ("0x1.e240c9fbe76c9p+16", "0x1.77281cad8a844p+3"),      # log(123456.789) = 11.723646487185881
    ],
}


@pytest.mark.parametrize("name", ["exp", "log"])
def test_published_vectors(name):
    xs = np.array([float.fromhex(a) for a, _ in VECTORS[name]])
    got = [float(v).hex() for v in getattr(fmath, name)(xs)]
    assert got == [float.fromhex(b).hex() for _, b in VECTORS[name]]


def test_constants_are_fdlibms():
    assert (fmath.LN2_HI, fmath.LN2_LO, fmath.INV_LN2) == (6.93147180369123816490e-01,
                                                           1.90821492927058770002e-10, 1.44269504088896338700e+00)
    assert (fmath.P1, fmath.P5) == (1.66666666666666019037e-01, 4.13813679705723846039e-08)
    assert (fmath.LG1, fmath.LG7) == (6.666666666666735130e-01, 1.479819860511658591e-01)
    assert float.fromhex("0x1.62e42feep-1") == fmath.LN2_HI          # 32 low zero bits: k * LN2_HI exact


def test_sum_order_is_eight_lanes_then_a_tree():
    x = np.array([1e16, 1.0, -1e16, 1.0, 3.0, 0.5, 0.25, 2.0, 1.0])
    lane = [1e16 + 1.0, 1.0, -1e16, 1.0, 3.0, 0.5, 0.25, 2.0]       # x[8] joins lane 0
    expect = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))
    assert fmath.sum(x) == expect and fmath.sum(np.array([])) == 0.0
    big = np.random.default_rng(1).standard_normal(50257)
    lanes = [sum(big[j::8].tolist(), 0.0) if sys.version_info < (3, 12) else None for j in range(8)]
    if lanes[0] is not None:                                         # Python < 3.12: sum() is sequential
        t = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        assert fmath.sum(big) == t


@pytest.mark.skipif(not JIT, reason="compares compiled code with the NumPy spec")
def test_numba_twins_give_the_same_bits():
    from refcomplete.kernels import fmath_numba as fn
    rng = np.random.default_rng(7)
    x = np.concatenate([exp_points(200_000, rng), [0.0, -0.0, INF, -INF, NAN, 709.8, -745.2, 5e-324]])
    assert np.array_equal(fmath.exp(x), fn.exp(x), equal_nan=True)
    y = np.concatenate([log_points(200_000, rng), [0.0, -0.0, INF, -INF, NAN, -1.0, 5e-324]])
    assert np.array_equal(fmath.log(y), fn.log(y), equal_nan=True)
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 50257):
        v = rng.standard_normal(n) * 10
        assert fmath.sum(v) == fn.sum(v)
        if n:
            assert np.array_equal(fmath.softmax(v), fn.softmax(v))
            ids = [0, n // 2, n - 1]
            assert np.array_equal(fmath.log_softmax_at(v, ids), fn.log_softmax_at(v, ids))


IR_SCAN = r"""
import re, sys, numpy as np
from refcomplete.kernels import fmath_numba as fn, gpt2 as k
sys.path.insert(0, sys.argv[1])
import test_kernels as t
x = np.random.rand(100); fn.exp(x); fn.log(x); fn.sum(x); fn.softmax(x); fn.log_softmax_at(x, [1])
xx, w, b = t.rand(3, 64), t.rand(64, 300), t.rand(300)
out = np.empty((3, 300), np.float32)
wp = k.pack(w)
k.linear(xx, wp, b, out, 2); k.linear_gelu(xx, wp, b, out, 2); k.linear_residual(xx, wp, b, out, 2)
k.layer_norm(xx, w[0, :64].copy(), b[:64].copy(), 1e-5, np.empty_like(xx))
args = t.attention_case(); k.attend(*args, np.empty_like(args[0]))
bad = re.compile(r"@(llvm\.(exp|exp2|log|log2|log10|pow)\.[a-z0-9]+|(exp|expf|log|logf|tanh|tanhf|pow|powf|exp2|log1p|expm1))\b")
n = 0
for mod in (fn, k):
    for name in dir(mod):
        d = getattr(mod, name)
        if hasattr(d, "inspect_llvm") and d.signatures:
            for sig in d.signatures:
                ir = d.inspect_llvm(sig)
                n += 1
                print("KERNEL", name)
                for line in ir.splitlines():
                    if ("call" in line or "declare" in line) and bad.search(line):
                        print("FOUND", name, line.strip()[:200])
print("SCANNED", n)
"""


@pytest.mark.skipif(not JIT, reason="needs compiled kernels")
def test_no_libm_transcendental_in_any_compiled_kernel(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "fresh-cache"))   # fresh: IR is inspectable
    r = subprocess.run([sys.executable, "-c", IR_SCAN, os.path.dirname(__file__)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FOUND" not in r.stdout, r.stdout
    scanned = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("KERNEL")}
    assert scanned >= {"exp_into", "log_into", "sum8", "softmax_into", "sum_exp", "linear",
                       "linear_gelu", "linear_residual", "layer_norm", "attend"}, scanned


def test_ir_scan_catches_a_libm_call(tmp_path):
    """The scan's pattern is not vacuous: np.exp in a compiled function is found."""
    if not JIT:
        pytest.skip("needs compiled kernels")
    code = ("import numpy as np, re\nfrom numba import njit\n@njit\ndef f(x): return np.exp(x) + np.tanh(x)\n"
            "f(1.0)\nir = f.inspect_llvm(f.signatures[0])\n" + IR_SCAN.split("bad = ")[1].split("\n")[0].join(["bad = ", "\n"])
            + "print(sorted({m.group(0) for m in bad.finditer(ir)}))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)),
                       capture_output=True, text=True, timeout=300)
    assert "llvm.exp" in r.stdout and "tanh" in r.stdout, r.stdout + r.stderr


def test_top_k_is_value_descending_ids_ascending_on_both_backends():
    """top_k on ties, -inf and positive-only inputs, against a full sort (the definition)."""
    backends = [fmath]
    if JIT:
        from refcomplete.kernels import fmath_numba
        backends.append(fmath_numba)
    rng = np.random.default_rng(3)
    for trial in range(600):
        n = int(rng.integers(1, 300))
        x = rng.integers(-3, 4, n).astype(float)
        if trial % 3 == 0:
            x = np.maximum(x, 0)
        if trial % 7 == 0:
            x[rng.integers(0, n, 3)] = -INF
        for k in (0, 1, 5, 70):
            for positive in (False, True):
                ref = sorted(range(n), key=lambda i: (-x[i], i))
                ref = [i for i in ref if x[i] > 0] if positive else ref
                for b in backends:
                    assert b.top_k(x, k, positive) == ref[:k], (b.__name__, x.tolist(), k, positive)


def _top_p_cases(rng):
    """(p, top_p): flat and peaked distributions of the vocabulary's size, tie groups,
    zeros, sums landing on top_p within rounding, tiny supports, top_p at its ends."""
    from refcomplete.sampling import softmax
    for s in (0.01, 0.5, 1, 2, 4, 12):
        p = softmax(rng.standard_normal(50257) * s)
        for tp in (0.0, 1e-9, 0.3, 0.9, 0.99, 0.999999):
            yield p, tp
    for k in (1, 100, 4096, 8191):                     # prefix sums exactly on k / 8192
        p = np.full(8192, 1 / 8192)
        for tp in (k / 8192, np.nextafter(k / 8192, 0), np.nextafter(k / 8192, 1)):
            yield p, tp
    for s in (0.5, 2, 4):                              # top_p on the spec's own cumulative sums:
        p = softmax(rng.standard_normal(50257) * s)    # an estimate off by one rounding decides wrong
        cum = np.cumsum(np.sort(p)[::-1])
        for i in (3, 700, 20000, 45000):
            for tp in (cum[i], np.nextafter(cum[i], 0), np.nextafter(cum[i], 1)):
                yield p, float(tp)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        p = rng.integers(0, 5, n).astype(float)         # ties, and zeros (logit_bias -100)
        if not p.any():
            p[0] = 1.0
        yield p / p.sum(), float(rng.choice([0.0, rng.uniform(0, 1), 0.5, 1 - 1e-12]))


def test_top_p_keep_is_the_spec_on_both_backends():
    """top_p_keep (each backend's) keeps exactly the ids of the full stable sort's rule, and
    renormalise gives the NumPy spec's bits."""
    backends = [fmath]
    if JIT:
        from refcomplete.kernels import fmath_numba
        backends.append(fmath_numba)
    for p, tp in _top_p_cases(np.random.default_rng(11)):
        order = np.argsort(-p, kind="stable")           # the spec (sampling.top_p_reference's rule)
        before = np.concatenate(([0.0], np.cumsum(p[order])[:-1]))
        keep = before < tp
        keep[0] = True
        ref = np.sort(order[keep])                       # zeros included, where the rule keeps them
        for b in backends:
            got = b.top_p_keep(p, tp)
            assert np.array_equal(got, ref), (b.__name__, len(p), tp)
            assert np.array_equal(b.renormalise(p, got), fmath.renormalise(p, ref))
