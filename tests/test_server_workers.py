"""`refcomplete serve --workers N`: the processes behind one port (refcomplete/workers.py).

Real servers on 127.0.0.1 (the bundled model). Both workers answer; a stop (SIGTERM,
SIGINT) ends every process with status 0; a worker that dies stops the others and the
server exits non-zero, saying which; a killed parent takes its workers with it; bad
flags, an unknown model and a taken port are clear errors before anything is served;
under 64 clients' mixed load no request fails and each worker's memory levels off.
The bytes are pinned in test_server_batching.py (the same answers as --serial). Every
wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_server_batching import send_all, worker_pids
from test_server_load import CONCURRENCY, LOAD_REQUESTS, _load, cpu_seconds
from test_server_security import free_port, rss_kib, serve_process

MODEL = "gpt2-tiny-shakespeare"
FAST = ["--workers", "2", "--shutdown-timeout", "3"]
JOBS = [(0, False), (1, True)] * 16


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"     # a zombie is gone
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def serve_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "refcomplete.cli", "serve", "--log-level", "warning", *flags]


def test_both_workers_answer_and_a_stop_ends_them_all():
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        assert len(kids) == 2
        before = {p: cpu_seconds(p) for p in kids}
        asyncio.run(send_all(srv.url, JOBS, 32))           # 32 connections: both get some
        used = {p: cpu_seconds(p) - before[p] for p in kids}
        assert all(u > 0.05 for u in used.values()), used
        assert "2 workers ready" in srv.output()
        assert srv.stop() == 0
        assert wait_gone(kids)
        assert srv.log_errors() == [], srv.output()[-3000:]


def open_connections(pid: int, port: int) -> int:
    """Established TCP connections to `port` that process `pid` holds (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and int(f[1].split(":")[1], 16) == port and f[9] in inodes:
            count += 1
    return count


def test_connections_go_to_the_least_loaded_worker():
    """32 keep-alive connections, opened one after another: 16 on each worker (the kernel's
    hash split them unevenly, and the heavier worker then set the pace)."""
    body = b'{"model": "%s", "prompt": "O", "max_tokens": 1}' % MODEL.encode()
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        socks = []
        try:
            for _ in range(32):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body))
                assert s.recv(65536).startswith(b"HTTP/1.1 200")   # served, still open
                socks.append(s)
            assert sorted(open_connections(p, srv.port) for p in kids) == [16, 16]
        finally:
            for s in socks:
                s.close()


def test_load_64_clients_on_two_workers():
    """test_server_load's mixed load (errors among it) on two workers: each worker's RSS
    after warm-up and after each of four rounds, bounded as for one process."""
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        asyncio.run(_load(srv.url, 2 * CONCURRENCY, CONCURRENCY))       # warm up
        rss, failures = [[rss_kib(p) for p in kids]], []
        for round_ in range(4):
            failures += asyncio.run(_load(srv.url, LOAD_REQUESTS // 4, CONCURRENCY))[1]
            rss.append([rss_kib(p) for p in kids])
        print("\nworkers' RSS after warm-up and each round (MiB): " + ", ".join(
            " ".join(f"{r[w] / 1024:.1f}" for r in rss) for w in range(len(kids))))
        assert failures == [], failures[:5]
        for w in range(len(kids)):
            assert rss[-1][w] - rss[0][w] < 64 * 1024, "a worker's memory grew by over 64 MiB"
            assert rss[-1][w] - rss[-2][w] < 16 * 1024, "a worker's memory still climbing"
        assert srv.log_errors() == [], srv.output()[-3000:]


def test_sigint_to_the_parent_is_a_graceful_stop():
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=20) == 0
        assert wait_gone(kids)


def test_a_worker_that_dies_stops_the_server():
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        os.kill(kids[0], signal.SIGKILL)
        code = srv.proc.wait(timeout=20)
        assert code != 0
        assert wait_gone(kids)
        assert f"worker {kids[0]} exited (signal SIGKILL); stopping the others" in srv.output()


def test_a_killed_parent_takes_its_workers_with_it():
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        srv.proc.kill()
        srv.proc.wait(timeout=10)
        assert wait_gone(kids), "workers outlived their parent"


@pytest.mark.parametrize("flags, message", [
    (["--workers", "2", "--serial"], "cannot be combined with --workers"),
    (["--workers", "2", "--model", "no-such-model"], "error:"),
])
def test_errors_before_serving(flags, message):
    r = subprocess.run(serve_argv("--port", str(free_port()), *flags), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stdout + r.stderr


def test_workers_must_be_positive():
    r = subprocess.run(serve_argv("--workers", "0"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers" in r.stderr


def test_a_taken_port_is_an_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run(serve_argv("--port", str(port), "--workers", "2"),
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr



def _pack_mappings(pid: int) -> set[tuple[str, str]]:
    """(inode, path) of the packed-weight files (runtime.PACK_DIR) process `pid` maps."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and "refcomplete-packed-" in fields[5]:
                out.add((fields[4], fields[5]))
    return out


def test_workers_map_one_shared_copy_of_the_packed_weights():
    """Each worker maps the same files of packed weights (one copy in memory for both, not
    one each), the two answer alike, and the files go when the server stops."""
    with serve_process(MODEL, flags=FAST) as srv:
        kids = worker_pids(srv)
        maps = [_pack_mappings(p) for p in kids]
        assert len(maps[0]) == 1 + 4 * 8 and maps[0] == maps[1], maps   # LM head + 4 per layer
        folder = os.path.dirname(next(iter(maps[0]))[1])
        assert os.path.isdir(folder)
        out = asyncio.run(send_all(srv.url, JOBS, 8))          # the same two jobs, 16 times
        assert all(out[i] == out[i % 2] for i in out)
        assert srv.stop() == 0
    assert not os.path.exists(folder)


# -- the cores split between the workers busy now (no server needed) ----------------------

def test_a_worker_serving_alone_gets_every_core_and_busy_ones_split_them():
    from refcomplete.workers import Inbox

    busy = memoryview(bytearray(8 * 3)).cast("q")                 # as the shared mmap
    a, b, c = (Inbox(None, None, i, busy) for i in range(3))
    assert a.share(4) == 4                                         # none busy: all its own
    b.begin()
    assert b.share(4) == 4                                         # busy alone: all of them
    assert a.share(4) == 2 and a.share(3) == 1                     # a forward of a's: a and b
    c.begin()
    c.begin()                                                      # two requests: still one worker
    assert a.share(6) == 2 and c.share(2) == 1                     # never below one thread
    for w in (c, c, b):
        w.end()
    assert list(busy) == [0, 0, 0] and c.share(4) == 4


def test_worker_env_sizes_numbas_pool_for_every_core(monkeypatch):
    from refcomplete import batch, workers

    for name in batch.THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(batch, "usable_cores", lambda: 4)
    assert workers.worker_env(2) == {"NUMBA_NUM_THREADS": "4", "OMP_NUM_THREADS": "2",
                                     "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")                   # the user's setting stands
    assert "NUMBA_NUM_THREADS" not in workers.worker_env(2)


def test_a_workers_app_counts_its_requests_and_its_models_take_the_share(tiny_dir):
    """server._sharing_cores: a request is counted in the worker's slot while the app
    runs (also when it fails), and the batched GPT-2 model's forwards ask Inbox.share."""
    from refcomplete.checkpoint import load_checkpoint
    from refcomplete.runtime import GPT2Model
    from refcomplete.server import Endpoint, _sharing_cores
    from refcomplete.workers import Inbox

    busy = memoryview(bytearray(16)).cast("q")
    inbox = Inbox(None, None, 1, busy)
    endpoint = Endpoint({"tiny": GPT2Model(load_checkpoint(tiny_dir))}, serial=False)
    seen = []

    async def app(scope, receive, send):
        seen.append(list(busy))
        if scope["path"] == "/fail":
            raise RuntimeError("boom")

    counted = _sharing_cores(app, endpoint, inbox)
    assert endpoint.models["tiny"]._model.thread_share == inbox.share
    asyncio.run(counted({"type": "http", "path": "/"}, None, None))
    with pytest.raises(RuntimeError):
        asyncio.run(counted({"type": "http", "path": "/fail"}, None, None))
    asyncio.run(counted({"type": "lifespan", "path": "/"}, None, None))
    assert seen == [[0, 1], [0, 1], [0, 0]] and list(busy) == [0, 0]
