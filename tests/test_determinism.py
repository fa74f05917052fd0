"""Determinism: the same seeded request in three fresh processes gives byte-identical JSON
apart from `id` and `created`, on the bundled model and on a model wide enough (n_embd
512) to run the Numba kernels multi-threaded, with different Numba thread counts and a
random PYTHONHASHSEED in each process.

Found here, and fixed: the prompt prefill used to run through NumPy's BLAS, and OpenBLAS
with 1 and with 2 threads gave different float32 bits for a 512-wide model. The runtime
now makes no BLAS call (every token goes through the Numba kernels), so the processes
below also differ in their BLAS thread counts. The platform facts are printed by
`python tests/test_determinism.py` and recorded in docs/reliability.md.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from refcomplete.checkpoint import GPT2Config, write_random_checkpoint

HERE = Path(__file__).resolve().parent
REQUEST = {"prompt": ["ROMEO:", "To be, or not"], "max_tokens": 12, "n": 2, "best_of": 3,
           "seed": 20260101, "temperature": 0.9, "top_p": 0.95, "logprobs": 3, "echo": True,
           "stop": "\n\n", "presence_penalty": 0.3, "logit_bias": {"11": 2.5}}
SCRIPT = """
import json, sys
import refcomplete
from refcomplete.completions import Completions
model, request = sys.argv[1], json.loads(sys.argv[2])
api = Completions()
r = api.create(model=model, **request)
del r["id"], r["created"]
chunks = []
for c in api.create(model=model, stream=True, **{**request, "best_of": request["n"]}):
    del c["id"], c["created"]
    chunks.append(c)
print(json.dumps({"response": r, "stream": chunks}))
"""
THREADS = [  # (Numba threads, BLAS threads) per process; None leaves the default
    (None, None), ("1", "1"), ("2", "2")]


def fresh_runs(model: str, threads=THREADS) -> list[str]:
    procs = []
    for numba_threads, blas_threads in threads:
        env = {**os.environ, "PYTHONHASHSEED": "random"}
        for var, value in (("NUMBA_NUM_THREADS", numba_threads), ("OMP_NUM_THREADS", blas_threads),
                           ("OPENBLAS_NUM_THREADS", blas_threads)):
            env.pop(var, None)
            if value is not None:
                env[var] = value
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, model, json.dumps(REQUEST)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                      text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    return outs


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    cfg = GPT2Config(n_layer=2, n_embd=512, n_head=8, n_ctx=64)
    return write_random_checkpoint(tmp_path_factory.mktemp("wide"), cfg, seed=7)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bundled", "wide"])
def test_three_fresh_processes_give_identical_json(which, request):
    model = "gpt2-tiny-shakespeare" if which == "bundled" else str(request.getfixturevalue("wide_dir"))
    outs = fresh_runs(model)
    assert outs[0] == outs[1] == outs[2]
    result = json.loads(outs[0])
    assert len(result["response"]["choices"]) == 4 and result["stream"]
    assert result["response"]["usage"]["completion_tokens"] > 12


@pytest.mark.slow
def test_blas_thread_count_changes_nothing(wide_dir):
    """The regression the first version of this file recorded: BLAS threads 1 vs 2."""
    one, two = fresh_runs(str(wide_dir), [("1", "1"), ("1", "2")])
    assert one == two


def platform_facts() -> dict:
    """CPU, library versions, BLAS and thread counts: what bitwise results depend on."""
    import numba
    import numpy
    from threadpoolctl import threadpool_info

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = next((line.split(":", 1)[1].split() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                 []) if Path("/proc/cpuinfo").exists() else []
    return {
        "cpu": cpu, "machine": platform.machine(), "os_cpu_count": os.cpu_count(),
        "simd": [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags],
        "python": platform.python_version(), "numpy": numpy.__version__,
        "numba": numba.__version__, "llvmlite": __import__("llvmlite").__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": numba.config.THREADING_LAYER,
        "blas": [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                        "threading_layer")} for i in threadpool_info()],
    }


if __name__ == "__main__":
    print(json.dumps(platform_facts(), indent=2))
