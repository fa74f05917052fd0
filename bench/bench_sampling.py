"""P7: sampling + logprob extraction per step at batch 1 over 50,257 logits (target <= 0.3 ms).

Times decode.draw (the whole per-row step minus the model: pipeline, coin, select,
logprobs) for a few request shapes with the backend's exp/log/sum, and prints the CPU's
SIMD flags and the BLAS kernel (threadpoolctl). Every stage allocates its float64 [V]
result (402 KB), so the figures depend on glibc's malloc settings: by default glibc's
own (dynamic thresholds, as a script or notebook has them); --serve-malloc first applies
`refcomplete serve`'s (server.fixed_malloc_thresholds).
    python bench/bench_sampling.py [--backend numba|numpy] [--serve-malloc]
"""

import argparse
import platform
import timeit

import numpy as np
from threadpoolctl import threadpool_info

from machine import header
from refcomplete.decode import Plan, draw
from refcomplete.sampling import SamplingParams
from refcomplete.tokenizer import get_tokenizer

tok = get_tokenizer()
logits = (np.random.default_rng(0).standard_normal(50257) * 3).astype(np.float32)
counts = {11: 2, 262: 1, 13: 1}
CASES = {
    "greedy, no logprobs": (SamplingParams(temperature=0), None),
    "default (T=1, top_p=1), no logprobs": (SamplingParams(), None),
    "T=0.8 top_p=0.9 penalties, logprobs=5": (
        SamplingParams(0.8, 0.9, 0.5, 0.5, ((11, 2.0),)), 5),
    "T=1 top_p=1, logprobs=5": (SamplingParams(), 5),
}
ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="numba", choices=["numba", "numpy"])
ap.add_argument("--serve-malloc", action="store_true", help="glibc malloc as `serve` sets it")
args = ap.parse_args()
if args.serve_malloc:
    from refcomplete.server import fixed_malloc_thresholds
    if not fixed_malloc_thresholds():
        ap.error("--serve-malloc: no glibc malloc here")
if args.backend == "numba":
    from refcomplete.kernels import fmath_numba as ops
else:
    from refcomplete.kernels import fmath as ops


print(f"numpy {np.__version__}, {platform.processor() or platform.machine()}, backend {args.backend}, "
      f"malloc {'as serve sets it' if args.serve_malloc else 'glibc defaults'}")
print(header())
for info in threadpool_info():
    print(f"BLAS: {info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')}"
          f" threads={info.get('num_threads')}")
for name, (params, k) in CASES.items():
    plan = Plan(rows=1, max_new_tokens=16, sampling=params, seed=1, logprobs=k)
    step = iter(range(10**9))
    f = lambda: draw(tok, logits, counts, plan, 0, next(step), ops)  # noqa: E731
    best = min(timeit.repeat(f, number=200, repeat=5)) / 200
    print(f"{name:<42} {best * 1e3:6.3f} ms/step")
