"""Benchmark: `refcomplete batch` throughput, one process against `--workers N` and Ray.

Each mode runs the same input file of seeded requests end to end in a fresh process
(`python -m refcomplete.cli batch`), start-up and model loading included, so the figures
are what a user waits for. Prints a Markdown table (wall time, lines/s, completion
tokens/s, the ratio to one process), the load average before and after each run (other
people's work on a shared machine skews every figure), and checks that all modes wrote
the same bytes apart from ids, `created` and request ids.

    python bench/bench_batch.py [--lines 200] [--max-tokens 32] [--workers 2] [--repeat 2]
Ray runs only where it is installed (`pip install -e '.[ray]'`); `--ray local` starts a
private instance inside the timed run (its start-up is counted, about 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run_mode(src: Path, out: Path, flags: list[str]) -> float:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "refcomplete.cli", "batch", str(src), "--out", str(out),
           "--no-progress", *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per mode; the best is kept")
    args = ap.parse_args()
    modes = [("one process", []), (f"--workers {args.workers}", ["--workers", str(args.workers)])]
    try:
        import ray  # noqa: F401
        modes.append((f"--ray local --workers {args.workers}",
                      ["--ray", "local", "--workers", str(args.workers)]))
    except ImportError:
        print("ray is not installed: the Ray row is left out", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        write_input(src, args.lines, args.max_tokens)
        run_mode(src, Path(tmp) / "warm.jsonl", ["--workers", "1"])   # Numba cache warm
        rows, outputs = [], []
        for name, flags in modes:
            out = Path(tmp) / f"out{len(outputs)}.jsonl"
            times, loads = [], []
            for _ in range(args.repeat):
                before = os.getloadavg()[0]
                times.append(run_mode(src, out, flags))
                loads.append((before, os.getloadavg()[0]))
            data = out.read_bytes()
            outputs.append(same_bytes(data))
            tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                         for x in data.splitlines())
            best = min(times)
            rows.append((name, best, args.lines / best, tokens / best,
                         loads[times.index(best)]))
    base = rows[0][1]
    print(f"{args.lines} lines x {args.max_tokens} tokens, seeded, temperature 0.8, top_p 0.95;"
          f" {os.cpu_count()} CPUs; best of {args.repeat}")
    print("| mode | wall s | lines/s | tokens/s | vs one process | load avg before -> after |")
    print("|---|---:|---:|---:|---:|---|")
    for name, t, lps, tps, (l0, l1) in rows:
        print(f"| `{name}` | {t:.1f} | {lps:.1f} | {tps:.0f} | {base / t:.2f}x | "
              f"{l0:.1f} -> {l1:.1f} |")
    same = all(o == outputs[0] for o in outputs)
    print("outputs identical apart from ids, created, request_id:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
