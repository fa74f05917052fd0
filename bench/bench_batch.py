"""Benchmark: `refcomplete batch` throughput, one process against `--workers N` and Ray.

Each mode runs the same input file of seeded requests end to end in a fresh process
(`python -m refcomplete.cli batch`), start-up and model loading included, so the figures
are what a user waits for. The modes take turns in each round, so a change in the
machine's load hits all of them. Prints a Markdown table (median wall time and its range,
lines/s, completion tokens/s, the ratio to one process, the CPU seconds of the processes
the run waited for, the load average at each start: other people's work on a shared
machine skews every figure), and checks that all modes wrote the same bytes apart from
ids, `created` and request ids. "one process, 1 thread" is one process with every
thread pool at 1, what each of the N workers runs with on N cores.

    python bench/bench_batch.py [--lines 200] [--max-tokens 32] [--workers 2] [--repeat 3]
Ray runs only where it is installed (`pip install -e '.[ray]'`); `--ray local` starts a
private instance inside the timed run (its start-up is counted, about 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "To be, or not",
           "MENENIUS:\nWhat work's, my countrymen, in hand?"]


def write_input(path: Path, lines: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            body = {"model": "gpt2-tiny-shakespeare", "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95, "seed": i}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/completions", "body": body}) + "\n")


def same_bytes(data: bytes) -> bytes:
    data = re.sub(rb'"(id|request_id)": "[^"]*"', rb'"\1": "-"', data)
    return re.sub(rb'"created": \d+', rb'"created": 0', data)


def run_mode(src: Path, out: Path, flags: list[str], env: dict | None = None) -> tuple:
    """(wall seconds, CPU seconds of the run's waited-for processes) for one fresh run."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "refcomplete.cli", "batch", str(src), "--out", str(out),
           "--no-progress", *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; modes interleave in each")
    args = ap.parse_args()
    one_thread = {k: "1" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                   "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    w = str(args.workers)
    modes = [("one process", [], None), ("one process, 1 thread", [], one_thread),
             (f"--workers {w}", ["--workers", w], None)]
    try:
        import ray  # noqa: F401
        modes.append((f"--ray local --workers {w}", ["--ray", "local", "--workers", w], None))
    except ImportError:
        print("ray is not installed: the Ray row is left out", file=sys.stderr)
    runs: dict = {name: [] for name, _, _ in modes}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        write_input(src, args.lines, args.max_tokens)
        run_mode(src, Path(tmp) / "warm.jsonl", [])              # Numba cache warm
        outputs = []
        for _ in range(args.repeat):          # ABC ABC ABC: a load change hits every mode
            for i, (name, flags, env) in enumerate(modes):
                out = Path(tmp) / f"out{i}.jsonl"
                load = os.getloadavg()[0]
                wall, cpu = run_mode(src, out, flags, env)
                runs[name].append((wall, cpu, load))
        for i, _ in enumerate(modes):
            outputs.append(same_bytes((Path(tmp) / f"out{i}.jsonl").read_bytes()))
        data = (Path(tmp) / "out0.jsonl").read_bytes()
        tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                     for x in data.splitlines())
    base = statistics.median(r[0] for r in runs[modes[0][0]])
    print(header())
    print(f"{args.lines} lines x {args.max_tokens} tokens, seeded, temperature 0.8, top_p 0.95;"
          f" {os.cpu_count()} CPUs; median of {args.repeat} interleaved rounds")
    print("| mode | wall s (median, min-max) | lines/s | tokens/s | vs one process "
          "| CPU s | load avg at start |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, _, _ in modes:
        walls = [r[0] for r in runs[name]]
        t = statistics.median(walls)
        cpu = statistics.median(r[1] for r in runs[name])
        loads = ", ".join(f"{r[2]:.1f}" for r in runs[name])
        print(f"| `{name}` | {t:.1f} ({min(walls):.1f}-{max(walls):.1f}) | "
              f"{args.lines / t:.1f} | {tokens / t:.0f} | {base / t:.2f}x | {cpu:.1f} | {loads} |")
    same = all(o == outputs[0] for o in outputs)
    print("outputs identical apart from ids, created, request_id:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
