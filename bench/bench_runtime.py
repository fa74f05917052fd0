"""Benchmark: refcomplete's GPT-2 runtime against HF transformers, side by side in one run.

On a random-weight checkpoint with GPT-2 124M shapes (same speed as the real weights;
built once with a fixed seed): decode tokens/s at batch 1 and batch 8, prefill of a
512-token prompt, and peak RSS (each in a fresh process). Prints the ratios, the BLAS
kernel (threadpoolctl) and versions. Targets P1, P2, P4, P6 of PERFORMANCE.md.

    python bench/bench_runtime.py [--steps 64] [--json out.json]

Needs torch==2.13.0 and transformers (`make crosscheck` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CKPT = Path(tempfile.gettempdir()) / "refcomplete-bench" / "gpt2-124m-random-seed0"
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def checkpoint() -> Path:
    from refcomplete.checkpoint import GPT2Config, write_random_checkpoint

    if not (CKPT / "model.safetensors").exists():
        print(f"writing random GPT-2 124M checkpoint to {CKPT} ...", file=sys.stderr)
        write_random_checkpoint(CKPT, GPT2Config(), seed=0)
    return CKPT


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ---------------------------------------------------------------------------- refcomplete

def ours(steps: int) -> dict:
    from refcomplete.checkpoint import load_checkpoint
    from refcomplete.runtime import GPT2Model

    model = GPT2Model(load_checkpoint(checkpoint()))
    model.session(PROMPT, 8, 2).prefill()                       # compile / warm up

    def decode(batch):
        sess = model.session(PROMPT, rows=batch, max_new_tokens=steps)
        logits = sess.prefill()
        rows = list(range(batch))
        tok = [int(logits[0].argmax())] * batch
        for _ in range(steps):
            logits = sess.step(rows, tok)
            tok = [int(i) for i in logits.argmax(axis=-1)]

    warm = model.session(PROMPT, 8, 2)
    warm.prefill()
    warm.step(list(range(8)), [1] * 8)
    res = {}
    # the roofline's GEMV right before and after batch 1, in this process: this host's
    # bandwidth drifts by a third within minutes, and P1's share needs both at one time
    bw = gemv_bandwidth()
    res["decode_b1_tok_s"] = steps / best_of(lambda: decode(1), 2)
    res["gemv_gb_s_around_b1"] = [bw, gemv_bandwidth()]
    res["decode_b8_tok_s"] = 8 * steps / best_of(lambda: decode(8), 2)
    ids = list(np.random.default_rng(0).integers(0, 50000, 512))
    res["prefill512_s"] = best_of(lambda: model.session(ids, 1, 1).prefill())
    return res


# ---------------------------------------------------------------------------- HF transformers

def hf(steps: int) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    model = GPT2LMHeadModel.from_pretrained(str(checkpoint()), dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPT])

    def generate(batch, sample):
        with torch.no_grad():
            model.generate(prompt.repeat(batch, 1), attention_mask=torch.ones(batch, len(PROMPT), dtype=torch.long),
                           max_new_tokens=steps, min_new_tokens=steps, do_sample=sample,
                           top_p=0.9 if sample else None, pad_token_id=50256)

    generate(1, False)
    res = {}
    for batch in (1, 8):
        res[f"decode_b{batch}_tok_s"] = batch * steps / best_of(lambda: generate(batch, batch > 1), 2)
    ids = torch.tensor([list(np.random.default_rng(0).integers(0, 50000, 512))])

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=True)

    prefill()
    res["prefill512_s"] = best_of(prefill)
    return res


# ---------------------------------------------------------------------------- peak RSS (fresh process)

def rss_child(which: str) -> None:
    if which == "ours":
        from refcomplete.checkpoint import load_checkpoint
        from refcomplete.runtime import GPT2Model

        model = GPT2Model(load_checkpoint(checkpoint()))
        sess = model.session(PROMPT, rows=1, max_new_tokens=32)
        sess.prefill()
        for _ in range(32):
            sess.step([0], [11])
    else:
        import torch
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(str(checkpoint()), dtype=torch.float32).eval()
        with torch.no_grad():
            model.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, pad_token_id=50256)
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec. At the
    # end, its two parts: anonymous memory and mapped file pages (mostly shared libraries:
    # libllvmlite.so's resident share was 103 MB of 179 with the file in the page cache,
    # right after pip install, and 50 MB once its cached pages were dropped; Zen 3).
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({k: int(status[f].split()[0]) / 1024 for k, f in
                      (("peak", "VmHWM"), ("anon", "RssAnon"), ("file", "RssFile"))}))  # MB


def part(which: str, steps: int) -> dict:
    """One side's timings, in its own process: torch's and Numba's OpenMP thread pools
    would otherwise compete (each spins for a while after its parallel regions)."""
    out = subprocess.run([sys.executable, __file__, "--part", which, "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss(which: str) -> dict:
    """{"peak", "anon", "file"} MB of one side's fresh process (rss_child)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", which], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def facts() -> dict:
    """The platform facts a benchmark result depends on: CPU, BLAS kernel, versions, threads."""
    from threadpoolctl import threadpool_info

    import numba
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    from machine import cpu as cpu_facts

    return {
        "cpu": cpu, "cores": os.cpu_count(), "simd": cpu_facts()["simd"],
        "blas": [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")} for i in threadpool_info()],
        "numpy": np.__version__, "numba": numba.__version__, "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def gemv_bandwidth() -> float:
    """GB/s of a 1 x 768 @ 768 x 131072 fp32 GEMV (402 MB, out of cache): the decode roofline."""
    w = np.random.default_rng(0).standard_normal((768, 131072), dtype=np.float32)
    x = np.ones((1, 768), np.float32)
    gb_s = w.nbytes / best_of(lambda: x @ w, 5) / 1e9
    # OpenBLAS's threads spin after a call: a Numba linear of 768 x 3072 begun 0-50 ms after
    # this GEMV took 0.9-4.5 ms against 0.52-0.60 (200 ms after, or alone; Zen 3, 2 cores)
    time.sleep(0.5)
    return gb_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rss-child", choices=["ours", "hf"])
    ap.add_argument("--part", choices=["ours", "hf"], help="measure one side (a child process)")
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    if args.part:
        print(json.dumps((ours if args.part == "ours" else hf)(args.steps)))
        return None

    from machine import header

    print(header())
    checkpoint()
    bw = gemv_bandwidth()
    r, h = part("ours", args.steps), part("hf", args.steps)
    rss = {"ours": peak_rss("ours"), "hf": peak_rss("hf")}
    r["peak_rss_mb"], h["peak_rss_mb"] = rss["ours"]["peak"], rss["hf"]["peak"]
    weights_gb = 124.44e6 * 4 / 1e9
    around = r.pop("gemv_gb_s_around_b1")
    roofline = sum(around) / len(around) / weights_gb            # tok/s at batch 1
    rows = [  # ratio = how many times better we are: speed ours/HF, time HF/ours; RSS is ours/HF
        ("decode batch 1 (tok/s)", "decode_b1_tok_s", lambda a, b: a / b, "P1 >= 2.0x"),
        ("decode batch 8 (tok/s)", "decode_b8_tok_s", lambda a, b: a / b, "P2 >= 3.0x"),
        ("prefill 512 tokens (s)", "prefill512_s", lambda a, b: b / a, "P4 >= 1.0x (HF time / ours)"),
        ("peak RSS (MB)", "peak_rss_mb", lambda a, b: a / b, "P6 <= 0.75x (ours / HF)"),
    ]
    print(f"\n{json.dumps(facts())}\nGEMV bandwidth {around[0]:.1f} and {around[1]:.1f} GB/s right before and "
          f"after our batch 1 (at the start: {bw:.1f}) -> batch-1 roofline {roofline:.1f} tok/s\n")
    print("| measure | refcomplete | HF transformers | ratio | target |")
    print("|---|---|---|---|---|")
    for label, key, ratio, target in rows:
        print(f"| {label} | {r[key]:.3f} | {h[key]:.3f} | {ratio(r[key], h[key]):.2f}x | {target} |")
    print("peak RSS at exit, anonymous + mapped files (shared libraries' pages; how many are mapped depends "
          "on what the page cache holds): " + ", ".join(f"{side} {m['anon']:.0f} + {m['file']:.0f} MB"
                                                       for side, m in rss.items()))
    print(f"\nbatch-1 decode = {100 * r['decode_b1_tok_s'] / roofline:.0f}% of the bandwidth roofline (P1: >= 85%)")
    flops = 2 * 512 * (85.0e6 + 12 * 2 * 512 * 768)              # matmuls + attention, LM head of 1 row
    print(f"prefill 512 = {flops / r['prefill512_s'] / 1e9:.0f} GFLOP/s (P4: >= 70% of ~189 GFLOP/s sgemm)")
    if args.json:
        args.json.write_text(json.dumps({"facts": facts(), "gemv_gb_s": bw, "gemv_gb_s_around_b1": around,
                                         "refcomplete": r, "hf": h, "rss_mb": rss}, indent=2))


if __name__ == "__main__":
    main()
