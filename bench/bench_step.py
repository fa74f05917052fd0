"""Where a batch-1 decode step's time goes (124M shapes, random weights): the profile behind
P1's roofline share. Prints the machine, the BLAS kernel (threadpoolctl), and per round:

- the step: min / median of `Session.step` over --steps steps, split into the twelve
  layers (one `blocks` call), the LM head, and the Python around them;
- each linear kind alone (the 12 layers' q/k/v, proj, fc, out, then the LM head), our
  kernels against numpy's GEMV (OpenBLAS) on matrices of the same shapes, in GB/s of
  weights streamed, with the share ours / numpy;
- numpy's GEMV on the roofline's 402 MB matrix (bench_runtime's), before the step.

Rounds alternate numpy and ours, with a 0.5 s pause after every numpy call: OpenBLAS's
threads spin after a call, and a Numba linear begun within ~50 ms of one ran 2-8x slower.
Run on an idle machine; a busy neighbour moves every figure (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

KINDS = (("q/k/v", "attn.c_attn.weight", 768, 2304), ("proj", "attn.c_proj.weight", 768, 768),
         ("fc", "mlp.c_fc.weight", 768, 3072), ("out", "mlp.c_proj.weight", 3072, 768))


def settle():
    time.sleep(0.5)             # OpenBLAS's spinning threads go to sleep


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="timings of each linear kind per round (min taken)")
    args = ap.parse_args()
    if min(args.rounds, args.steps, args.repeats) < 1:
        ap.error("--rounds, --steps and --repeats must be >= 1")

    from threadpoolctl import threadpool_info

    from bench_runtime import PROMPT, best_of, checkpoint, gemv_bandwidth
    from machine import header
    from refcomplete.checkpoint import load_checkpoint
    from refcomplete.runtime import BLOCK_WEIGHTS, GPT2Model

    print(header())
    print("BLAS:", ", ".join(f"{i['internal_api']} {i.get('version')} kernel={i.get('architecture')} "
                              f"threads={i['num_threads']}" for i in threadpool_info()))
    model = GPT2Model(load_checkpoint(checkpoint()))
    if model.backend != "numba":
        sys.exit("bench_step profiles the numba kernels: install numba (the default backend)")
    k, tasks = model._k, model._threads
    print(f"numba threads {tasks}; {args.rounds} rounds, {args.steps} steps, {args.repeats} timings per kind\n")
    rng = np.random.default_rng(0)
    layers = [(label, model._block_w[BLOCK_WEIGHTS.index(name)], K, N) for label, name, K, N in KINDS]
    layers.append(("LM head", [model._head_w], 768, model.n_vocab))
    twins = {label: [rng.standard_normal((K, N), dtype=np.float32) for _ in ws] for label, ws, K, N in layers}

    # the step, split: wrap the model's two kernel calls
    spent = {"layers": [], "head": []}

    def wrap(fn, key):
        def call(*a):
            t = time.perf_counter()
            r = fn(*a)
            spent[key].append(time.perf_counter() - t)
            return r
        return call
    model._layers, model._head = wrap(model._layers, "layers"), wrap(model._head, "head")

    def steps():
        sess = model.session(PROMPT, rows=1, max_new_tokens=args.steps)
        tok = [int(sess.prefill()[0].argmax())]
        for v in spent.values():
            v.clear()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            logits = sess.step([0], tok)
            times.append(time.perf_counter() - t)
            tok = [int(logits[0].argmax())]
        return np.array(times), np.array(spent["layers"]), np.array(spent["head"])

    steps()                                                        # compile / warm up
    for rnd in range(1, args.rounds + 1):
        gemv = gemv_bandwidth()                                    # it waits for BLAS's threads
        s, lay, hd = (a * 1e3 for a in steps())
        print(f"round {rnd}: GEMV 402 MB {gemv:.1f} GB/s (roofline {gemv * 1e9 / (124.44e6 * 4):.1f} tok/s)")
        print(f"  step min {s.min():.2f} / median {np.median(s):.2f} ms = layers {lay.min():.2f} / "
              f"{np.median(lay):.2f} + head {hd.min():.2f} / {np.median(hd):.2f} + the rest "
              f"{np.median(s - lay - hd):.2f} (median)")
        print("  | kind | MB | ours GB/s | numpy GB/s | ours / numpy |")
        print("  |---|---|---|---|---|")
        for label, ws, K, N in layers:
            mb = sum(w.nbytes for w in twins[label]) / 1e6
            x = np.ones((1, K), np.float32)
            out, b = np.empty((1, N), np.float32), np.zeros(N, np.float32)
            theirs = best_of(lambda: [x @ w for w in twins[label]], args.repeats)
            settle()
            ours = best_of(lambda: [k.linear(x, w, b, out, tasks) for w in ws], args.repeats)
            print(f"  | {label} | {mb:.0f} | {mb / 1e3 / ours:.1f} | {mb / 1e3 / theirs:.1f} | {theirs / ours:.2f} |")
        print()


if __name__ == "__main__":
    main()
