"""Bits that do not depend on the machine (SEMANTICS 11).

- The committed golden suite regenerates byte for byte in fresh processes under numpy's
  SIMD targets switched off (NPY_DISABLE_CPU_FEATURES), Numba compiling for a generic
  CPU or for Haswell (AVX2, no AVX-512) with a fresh cache, one Numba thread, the NumPy
  backend, and combinations of these.
- No numpy or math transcendental is reachable from a response: a spread of requests
  runs with np.exp, np.log, np.tanh, np.power and math.exp, math.log, math.tanh, math.pow
  replaced by functions that raise, on both backends.
- The NumPy backend works where Numba cannot be imported.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refcomplete
from refcomplete._paths import weights_dir
from refcomplete.completions import Completions
from refcomplete.registry import load_model

COMMITTED = Path(__file__).parent / "golden"
BUNDLED = "gpt2-tiny-shakespeare"
HAVE_MODEL = (weights_dir() / BUNDLED / "model.safetensors").is_file()
JIT = os.environ.get("NUMBA_DISABLE_JIT") != "1"
# Numba takes the host's features unless told (NUMBA_CPU_NAME alone would keep AVX-512);
# these are an AVX2 + FMA machine's, with no AVX-512 (a Zen 3 or Haswell).
AVX2_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,"
                 "+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")

REGENERATE = """
import sys
from refcomplete import golden
from refcomplete.registry import load_model
golden.generate_suite(load_model(sys.argv[1], backend=sys.argv[2]), sys.argv[1], sys.argv[3])
"""


def numpy_targets() -> list[str]:
    """numpy's dispatch targets that this CPU has (each can be switched off)."""
    from numpy._core import _multiarray_umath as mu
    return [t for t in mu.__cpu_dispatch__ if mu.__cpu_features__.get(t)]


def environments() -> list[tuple[str, str, dict]]:
    """(id, backend, env): each factor alone, then combinations."""
    targets = numpy_targets()
    out = [(f"npy-no-{t}", "numba", {"NPY_DISABLE_CPU_FEATURES": t}) for t in targets]
    out += [("numba-generic", "numba", {"NUMBA_CPU_NAME": "generic", "cache": "generic"}),
            ("numba-1-thread", "numba", {"NUMBA_NUM_THREADS": "1"}),
            ("numpy-backend", "numpy", {})]
    if "X86_V4" in targets:                         # what an AVX2 machine (no AVX-512) runs
        out.append(("avx2-machine", "numba", {"NPY_DISABLE_CPU_FEATURES": "X86_V4", "NUMBA_CPU_NAME": "haswell",
                                              "NUMBA_CPU_FEATURES": AVX2_FEATURES, "NUMBA_NUM_THREADS": "1",
                                              "cache": "haswell"}))
        out.append(("numpy-backend-npy-no-X86_V4", "numpy", {"NPY_DISABLE_CPU_FEATURES": "X86_V4"}))
    if "X86_V3" in targets:                         # no AVX at all in numpy, generic Numba code
        out.append(("sse-only", "numba", {"NPY_DISABLE_CPU_FEATURES": "X86_V3", "NUMBA_CPU_NAME": "generic",
                                          "NUMBA_NUM_THREADS": "1", "cache": "generic"}))
        out.append(("numpy-backend-npy-no-X86_V3", "numpy", {"NPY_DISABLE_CPU_FEATURES": "X86_V3"}))
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    return tmp_path_factory.mktemp("numba-caches")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason="the bundled model has not landed")
@pytest.mark.parametrize("name,backend,extra", environments(), ids=[e[0] for e in environments()])
def test_committed_suite_regenerates_identically_under(name, backend, extra, caches, tmp_path):
    if not JIT and backend == "numba":
        pytest.skip("NUMBA_DISABLE_JIT=1: the whole file runs uncompiled elsewhere")
    extra = dict(extra)
    env = dict(os.environ, **{k: v for k, v in extra.items() if k != "cache"})
    if "cache" in extra:                            # a fresh cache per foreign CPU target
        env["NUMBA_CACHE_DIR"] = str(caches / extra["cache"])
    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, "-c", REGENERATE, BUNDLED, backend, str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(str(p.relative_to(COMMITTED)) for p in COMMITTED.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(COMMITTED, out, files, shallow=False)
    assert not mismatch and not errors, f"{name}: regenerated files differ: {mismatch + errors}"


def test_environments_cover_the_machine():
    ids = [e[0] for e in environments()]
    assert {"numba-generic", "numba-1-thread", "numpy-backend"} <= set(ids)
    assert len([i for i in ids if i.startswith("npy-no-")]) == len(numpy_targets()) >= 1


# -- nothing reaches a libm or numpy transcendental ------------------------------------------

REQUESTS = [
    dict(prompt="ROMEO:", max_tokens=6, temperature=0),
    dict(prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=5),
    dict(prompt="To be", max_tokens=8, temperature=0.8, top_p=0.9, presence_penalty=0.5,
         frequency_penalty=0.7, logprobs=5, seed=3, logit_bias={"11": 3.5, "13": -100}),
    dict(prompt="To be", max_tokens=5, temperature=1.3, top_p=0.5, logprobs=3, seed=4,
         logprobs_mode="processed"),
    dict(prompt="JULIET: O", max_tokens=4, temperature=0, logprobs=2, logprobs_mode="processed",
         presence_penalty=1.0),
    dict(prompt="First Citizen:", max_tokens=0, echo=True, logprobs=2),
    dict(prompt="First Citizen:", max_tokens=4, echo=True, logprobs=1, temperature=0.7, seed=5),
    dict(prompt="KING:", max_tokens=5, n=2, best_of=4, temperature=0.9, seed=6, logprobs=1),
    dict(prompt="KING:", max_tokens=3, temperature=0.9, top_p=0.8, seed=7, trace=True),
    dict(prompt=[[464, 3290], [32]], max_tokens=3, temperature=1.0, seed=8, stop=["\n"]),
]


def _raiser(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called on a response path")
    return fail


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("id", "created")}


@pytest.mark.skipif(not HAVE_MODEL, reason="the bundled model has not landed")
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_no_transcendental_is_reached(backend, monkeypatch):
    if backend == "numba" and not JIT:
        pytest.skip("compiled kernels only")
    api = Completions(models={"m": load_model(BUNDLED, backend=backend)})
    api.create(model="m", prompt="warm", max_tokens=2, temperature=0.5, seed=1, logprobs=1)  # compile first
    before = [_strip(api.create(model="m", **req)) for req in REQUESTS]
    for mod, names in ((np, ("exp", "log", "tanh", "power", "log1p", "expm1", "exp2", "log2")),
                       (math, ("exp", "log", "tanh", "pow", "log1p", "expm1", "log2"))):
        for n in names:
            monkeypatch.setattr(mod, n, _raiser(f"{mod.__name__}.{n}"))
    with pytest.raises(AssertionError, match="np|numpy"):
        np.exp(1.0)                                                  # the trap is armed
    after = [_strip(api.create(model="m", **req)) for req in REQUESTS]
    assert after == before


# -- the NumPy backend without Numba ----------------------------------------------------------

NO_NUMBA = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("numba", "llvmlite"):
            raise ImportError("numba is blocked in this test")
sys.meta_path.insert(0, Block())
import refcomplete
from refcomplete.runtime import resolve_backend
assert resolve_backend(None) == "numpy", resolve_backend(None)
r = refcomplete.create(model="gpt2-tiny-shakespeare", prompt="ROMEO:", max_tokens=6, temperature=0.8,
                       top_p=0.9, seed=11, logprobs=2)
assert not any(m.split(".")[0] in ("numba", "llvmlite") for m in sys.modules)
r.pop("id"); r.pop("created")
print(json.dumps(r, sort_keys=True))
"""


@pytest.mark.skipif(not HAVE_MODEL, reason="the bundled model has not landed")
def test_numpy_backend_works_without_numba():
    r = subprocess.run([sys.executable, "-c", NO_NUMBA], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    api = Completions(models={"gpt2-tiny-shakespeare": load_model(BUNDLED)})   # the default backend
    here = _strip(api.create(model="gpt2-tiny-shakespeare", prompt="ROMEO:", max_tokens=6,
                             temperature=0.8, top_p=0.9, seed=11, logprobs=2))
    assert json.loads(r.stdout) == json.loads(json.dumps(here, sort_keys=True))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*numba, numpy"):
        load_model(BUNDLED, backend="cuda")
    assert refcomplete.load_model is load_model
