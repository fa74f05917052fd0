"""`refcomplete serve` batching across requests: the same bytes under any load.

Against real server processes on 127.0.0.1 (the bundled model): a batched one (the
default), one of two batched worker processes (`--workers 2`) and a `--serial` one. A
fixed set of requests (greedy, sampled with seeds, n > 1, best_of, logprobs, echo, stop;
plain and streamed) sent one at a time to the serial server is the reference; the batched
server and the two workers answer the same bytes (apart from id and created) one at a
time, all at once from 32 clients, and in random interleavings; every stream folds to the
plain answer. In process: the endpoint really batches (fewer forwards
than steps), the Limits still refuse, a non-streamed request whose client left stops.

Every loop is bounded by a count or a deadline.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time

import httpx
import pytest

from refcomplete import streaming
from refcomplete.params import Limits
from refcomplete.registry import load_model
from refcomplete.server import Endpoint
from test_server_load import cpu_seconds
from test_server_security import serve_process

MODEL = "gpt2-tiny-shakespeare"
FAST = ["--body-timeout", "1", "--shutdown-timeout", "3"]
B = {"model": MODEL}
REQUESTS = [
    {**B, "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0},
    {**B, "prompt": "JULIET:", "max_tokens": 12, "seed": 1},
    {**B, "prompt": "To be, or not", "max_tokens": 10, "seed": 2, "logprobs": 3},
    {**B, "prompt": ["O", "KING:"], "max_tokens": 6, "n": 3, "seed": 3, "echo": True, "logprobs": 2},
    {**B, "prompt": "Hark", "max_tokens": 9, "best_of": 4, "n": 2, "seed": 4, "top_p": 0.9},
    {**B, "prompt": "First Citizen:", "max_tokens": 16, "seed": 5, "stop": ["\n", "e"],
     "temperature": 1.2},
    {**B, "prompt": "What", "max_tokens": 7, "seed": 6, "presence_penalty": 0.5,
     "frequency_penalty": 0.7, "logit_bias": {"11": 3}},
    {**B, "prompt": [464, 3290, 318], "max_tokens": 5, "temperature": 0, "logprobs": 5,
     "echo": True},
    {**B, "prompt": "A", "max_tokens": 0, "echo": True, "logprobs": 1},
    {**B, "prompt": "Now is the winter of our discontent", "max_tokens": 20, "seed": 7, "n": 2,
     "top_p": 0.5},
    {**B, "prompt": "MENENIUS:", "max_tokens": 4, "best_of": 3, "seed": 8, "logprobs": 1},
    {**B, "prompt": "\n", "max_tokens": 11, "seed": 9, "stop": [" the"], "temperature": 0.7},
]
# (request index, streamed): streamed only where the API allows it (best_of == n)
JOBS = [(i, False) for i in range(len(REQUESTS))] + [
    (i, True) for i, r in enumerate(REQUESTS) if r.get("best_of", 1) == r.get("n", 1)]


def normal(body: bytes) -> bytes:
    """The body with its id and created blanked: all that may differ between answers."""
    body = re.sub(rb'"id": "cmpl-[A-Za-z0-9]+"', b'"id": ""', body)
    return re.sub(rb'"created": [0-9]+', b'"created": 0', body)


def payload(job) -> dict:
    i, streamed = job
    if not streamed:
        return REQUESTS[i]
    return {**REQUESTS[i], "stream": True, "stream_options": {"include_usage": True}}


async def send_all(url: str, jobs, concurrency: int, jitter: float = 0.0, seed: int = 0):
    """Send jobs (in order, `concurrency` at a time); {position: normalised body}."""
    out, todo, rng = {}, iter(list(enumerate(jobs))), random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker():
            for pos, job in todo:          # shared iterator: each taken once
                if jitter:
                    await asyncio.sleep(rng.random() * jitter)
                r = await client.post("/v1/completions", json=payload(job))
                assert r.status_code == 200, (job, r.text[:300])
                out[pos] = normal(r.content)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert len(out) == len(jobs)
    return out


@pytest.fixture(scope="module")
def servers():
    with serve_process(MODEL, flags=FAST) as batched, \
            serve_process(MODEL, flags=[*FAST, "--workers", "2"]) as workers, \
            serve_process(MODEL, flags=[*FAST, "--serial"]) as serial:
        yield {"batched": batched, "workers": workers, "serial": serial}
        for srv in (batched, workers, serial):
            assert srv.alive()
            assert srv.log_errors() == [], srv.output()[-3000:]


@pytest.fixture(scope="module", params=["batched", "workers"])
def batched(request, servers):
    """The server under test: batched in one process, or in two worker processes."""
    return servers[request.param]


@pytest.fixture(scope="module")
def reference(servers):
    """Each job sent alone to the serial server: {job: normalised body}."""
    got = asyncio.run(send_all(servers["serial"].url, JOBS, 1))
    return {job: got[pos] for pos, job in enumerate(JOBS)}


def test_streams_fold_to_the_plain_answers(reference):
    for (i, streamed), body in reference.items():
        if not streamed:
            continue
        frames = body.split(b"\n\n")
        assert frames[-2:] == [b"data: [DONE]", b""]
        chunks = [json.loads(f[len(b"data: "):]) for f in frames[:-2]]
        assert streaming.fold(chunks) == json.loads(reference[(i, False)]), REQUESTS[i]


def test_one_at_a_time_on_the_batched_server(batched, reference):
    got = asyncio.run(send_all(batched.url, JOBS, 1))
    for pos, job in enumerate(JOBS):
        assert got[pos] == reference[job], (job, got[pos][:300], reference[job][:300])


def test_all_at_once_from_32_clients(batched, reference):
    jobs = (JOBS * 3)[:64]                 # 64 requests, 32 in flight at any moment
    for round_ in range(2):
        got = asyncio.run(send_all(batched.url, jobs, 32))
        for pos, job in enumerate(jobs):
            assert got[pos] == reference[job], (round_, job)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_interleavings(batched, reference, seed):
    rng = random.Random(seed)
    jobs = JOBS * 2
    rng.shuffle(jobs)
    concurrency = rng.choice([3, 8, 17])
    got = asyncio.run(send_all(batched.url, jobs, concurrency, jitter=0.05, seed=seed))
    for pos, job in enumerate(jobs):
        assert got[pos] == reference[job], (seed, job)


def test_a_non_streamed_request_stops_when_its_client_leaves(batched):
    """A 480-token request (plain, and best_of 3), its client gone after 0.3 s, stops at
    its next step: the server's CPU goes idle (every worker's); it then answers at once."""
    for extra in ({}, {"best_of": 3, "n": 2}):
        body = json.dumps({**B, "prompt": "ROMEO:", "max_tokens": 480, "seed": 1,
                           "logprobs": 5, **extra}).encode()
        socks = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", batched.port), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            socks.append(s)
        time.sleep(0.3)
        for s in socks:
            s.close()
        time.sleep(1.0)
        before = server_cpu(batched)
        time.sleep(1.5)
        busy = server_cpu(batched) - before
        assert busy < 0.4, f"the server kept working after its clients left ({busy:.2f} s CPU)"
        r = httpx.post(batched.url + "/v1/completions", json=REQUESTS[0], timeout=30)
        assert r.status_code == 200


def worker_pids(srv) -> list[int]:
    """The server's worker processes (none for a one-process server)."""
    pid = srv.proc.pid
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def server_cpu(srv) -> float:
    """CPU seconds of the server process and its workers."""
    return sum(cpu_seconds(p) for p in [srv.proc.pid, *worker_pids(srv)])


# -- in process ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


def test_the_endpoint_batches_across_requests(model):
    endpoint = Endpoint({MODEL: model}, serial=False)
    batched = endpoint.models[MODEL]
    assert endpoint.batched == {MODEL} and hasattr(batched, "stats")
    serial = Endpoint({MODEL: model})
    bodies = [json.dumps({**REQUESTS[1], "seed": s}).encode() for s in range(12)]
    expect = [normal(serial.handle("POST", "/v1/completions", {}, b).body) for b in bodies]
    got = [None] * len(bodies)

    def run(i):
        got[i] = normal(endpoint.handle("POST", "/v1/completions", {}, bodies[i]).body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expect
    # alone: 12 prefills + up to 12 x 11 steps = 144 forwards; together, about 12
    assert batched.stats["forwards"] < 60 and batched.stats["prefills"] == 12, batched.stats
    assert not endpoint.lock.locked()


def test_limits_still_refuse_on_the_batched_endpoint(model):
    endpoint = Endpoint({MODEL: model}, serial=False, limits=Limits(max_work_tokens=10))
    r = endpoint.handle("POST", "/v1/completions", {},
                        json.dumps({**B, "prompt": "Hi", "max_tokens": 4, "n": 3}).encode())
    assert r.status == 400 and json.loads(r.body)["error"]["param"] == "max_tokens"
    assert endpoint.models[MODEL].stats["forwards"] == 0


def test_a_batched_endpoint_stops_a_request_whose_client_left(model):
    endpoint = Endpoint({MODEL: model}, serial=False)
    gone = threading.Event()
    gone.set()
    body = json.dumps({**B, "prompt": "Hi", "max_tokens": 50}).encode()
    r = endpoint.handle("POST", "/v1/completions", {}, body, gone=gone)
    assert r.status == 499 and endpoint.models[MODEL].stats["forwards"] == 0


def test_serial_and_max_batch_rows_flags_reach_serve(monkeypatch):
    import argparse
    from refcomplete import server
    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a, **k: seen.update(k))
    sub = argparse.ArgumentParser().add_subparsers()
    server.add_subcommand(sub)
    args = sub.choices["serve"].parse_args([])
    assert args.handler(args) == 0 and (seen["serial"], seen["max_batch_rows"]) == (False, None)
    args = sub.choices["serve"].parse_args(["--serial", "--max-batch-rows", "8"])
    assert args.handler(args) == 0 and (seen["serial"], seen["max_batch_rows"]) == (True, 8)
    with pytest.raises(SystemExit):
        sub.choices["serve"].parse_args(["--max-batch-rows", "0"])


def test_load_endpoint_batches_unless_serial(monkeypatch, model):
    from refcomplete import registry, server
    monkeypatch.setattr(registry, "load_model", lambda where, backend=None: model)
    batched = server.load_endpoint([MODEL], max_batch_rows=8)
    assert batched.batched == {MODEL} and batched.models[MODEL].max_rows == 8
    assert batched.worker_threads == 40 + 2 * 8          # anyio's 40, and 2 per pool slot
    serial = server.load_endpoint([MODEL], serial=True)
    assert serial.batched == set() and serial.models[MODEL] is model
    assert serial.worker_threads is None
