"""P8: `refcomplete serve` throughput, batched (the default) and batched in one worker per
core (`--workers N`) against `--serial`, in one run.

Starts three servers on 127.0.0.1 (the bundled model; batched, --workers N, --serial),
then for 1, 4 and 32 clients, each mode in turn, sends streaming requests (max_tokens 8,
sampled with a seed per request, include_usage) over keep-alive connections and reports
requests/s, generated tokens/s (usage.completion_tokens), p50 and p99 latency (request sent
to [DONE]); with --rounds > 1, each ratio's spread between rounds too (how much of a ratio
the host's own drift moves). Checks that every mode streamed the same bytes for each
request (apart from id and created). Prints the CPU's SIMD flags, the cores and the versions.

    python bench/bench_server.py [--requests-per-client 8] [--clients 1,4,32] [--rounds 1]
                                 [--workers N (default: the usable cores)]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_server_security import serve_process   # noqa: E402  (the tests' server helper)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402

from refcomplete.batch import usable_cores  # noqa: E402

MODEL = "gpt2-tiny-shakespeare"
PROMPTS = ["ROMEO:", "JULIET:", "To be, or not", "KING HENRY:", "O", "First Citizen:",
           "What light", "Now is the winter"]


def body(i: int) -> bytes:
    return json.dumps({"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8,
                       "seed": i, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


async def request(reader, writer, port: int, i: int):
    """One streamed request on a keep-alive connection: (latency s, tokens, chunk texts)."""
    data = body(i)
    start = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(data), data))
    await writer.drain()
    buf = b""
    while not buf.endswith(b"\r\n0\r\n\r\n"):
        part = await reader.read(65536)
        if not part:
            raise ConnectionError("server closed the connection")
        buf += part
    took = time.perf_counter() - start
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    events = [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n\n", buf)]
    usage = [e["usage"] for e in events if e.get("usage")]
    texts = [json.dumps({k: v for k, v in e.items() if k not in ("id", "created")},
                        sort_keys=True) for e in events]
    return took, usage[-1]["completion_tokens"], texts


async def load(port: int, clients: int, per_client: int, offset: int):
    latencies, tokens, answers = [], 0, {}

    async def client(c: int):
        nonlocal tokens
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for k in range(per_client):
                i = offset + c * per_client + k
                took, n, texts = await request(reader, writer, port, i)
                latencies.append(took)
                tokens += n
                answers[i] = texts
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - start, latencies, tokens, answers


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--clients", default="1,4,32")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole table, interleaved")
    ap.add_argument("--backend", choices=["numba", "numpy"], default=None)
    ap.add_argument("--workers", type=int, default=usable_cores(),
                    help="worker processes of the third server (default: the usable cores)")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    import numba
    print(header())
    print(f"refcomplete serve, {MODEL}, streaming, max_tokens 8")
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}")
    extra = ["--backend", args.backend] if args.backend else []
    rows = {}
    workers = f"{args.workers} workers"
    with serve_process(MODEL, flags=extra) as batched, \
            serve_process(MODEL, flags=["--workers", str(args.workers), *extra]) as many, \
            serve_process(MODEL, flags=["--serial", *extra]) as serial:
        servers = {"batched": batched, workers: many, "serial": serial}
        for srv in servers.values():          # warm up: Numba caches, threads, pool pages
            asyncio.run(load(srv.port, 32, 2, 10_000))
        for round_ in range(args.rounds):
            for clients in counts:
                for mode, srv in servers.items():
                    per = max(args.requests_per_client, 16 // clients)
                    wall, lat, tokens, answers = asyncio.run(load(srv.port, clients, per, 0))
                    rows.setdefault((clients, mode), []).append((wall, lat, tokens, answers))
        for srv in servers.values():
            assert srv.alive() and srv.log_errors() == [], srv.output()[-2000:]

    print("\n| clients | mode | requests/s | tokens/s | p50 latency | p99 latency |")
    print("|---|---|---|---|---|---|")
    same = True
    for clients in counts:
        rate = {}
        for mode in ("serial", "batched", workers):
            runs = rows[(clients, mode)]
            wall = sum(r[0] for r in runs)
            lat = [x for r in runs for x in r[1]]
            tokens = sum(r[2] for r in runs)
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
            rate[mode] = tokens / wall
            print(f"| {clients} | {mode} | {len(lat) / wall:.1f} | {tokens / wall:.0f} | "
                  f"{q[49] * 1000:.0f} ms | {q[98] * 1000:.0f} ms |")
        a = rows[(clients, "serial")][0][3]
        same &= a == rows[(clients, "batched")][0][3] == rows[(clients, workers)][0][3]
        for mode in ("batched", workers):
            per = sorted(r[2] / r[0] / (s[2] / s[0])          # each round's ratio, side by side
                         for r, s in zip(rows[(clients, mode)], rows[(clients, "serial")]))
            spread = f" (rounds {per[0]:.2f}-{per[-1]:.2f}x)" if len(per) > 1 else ""
            print(f"|   | {mode} / serial | | {rate[mode] / rate['serial']:.2f}x{spread} | | |")
    print(f"\nstreams byte-identical between the three modes (apart from id, created): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
