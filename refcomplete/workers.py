"""`refcomplete serve --workers N`: N server processes sharing one port.

Knows: processes, signals, a socket. Does not know: HTTP, models, requests (server.py
runs one worker's uvicorn; each worker is the whole batched server of one process).

    run_workers(2, "127.0.0.1", 8000, start)   # start(sock, ready) runs one worker

Why processes. One batched server keeps a single process's per-token Python work (its
sampling, chunks and SSE frames) under one GIL, and measured 1.5x the serial server with
32 streaming clients on 2 cores; two one-thread workers served 2.9x (docs/benchmarks.md).
Every worker computes the same bits (SEMANTICS 4: a row's result depends on no other
row, no thread count), so which worker answers changes no byte.

How. The parent binds one socket per worker to the port (SO_REUSEPORT: see bind), then
forks the workers before it imports Numba or loads
a model (so no thread pool is copied mid-flight; each worker loads its own model: the
weights' file pages are shared through the page cache, the rest is per worker). Each
worker gets cores / N threads (batch.thread_env), loads its models, reports ready, and
waits; once all are ready the parent lets them accept. The kernel then hands each new
connection to one worker's socket; a keep-alive connection stays with its worker.
SIGINT or SIGTERM to the parent is passed on once as SIGTERM (each worker's uvicorn then
gives requests in flight its graceful-shutdown time). Workers run in their own process
group, so a terminal's Ctrl-C reaches the parent only, and they exit if the parent dies.
A worker that exits on its own (a crash, a kill) stops the others: the server never runs
at part strength without saying so. Linux only (fork, prctl).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Callable

READY_TIMEOUT = 600.0    # seconds for every worker to load its models


def bind(host: str, port: int, n: int) -> list[socket.socket]:
    """n sockets bound to (host, port) with SO_REUSEPORT, one per worker: the kernel then
    spreads new connections over the workers by a hash of their addresses. (One shared
    socket let the worker that woke first accept a whole burst: 32 clients then mostly
    landed on one worker, 505 tok/s against 1,000 when split evenly by hand; one socket
    with one accept per wake-up in each worker still gave 525-740.) Not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(n):
            # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say
            # TCP; without it Nagle's algorithm held SSE chunks back (44 ms for 8 tokens).
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]                      # port 0: the others follow the first
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def run_workers(n: int, host: str, port: int, start: Callable, say=print) -> int:
    """Fork n workers that each call start(sock, ready) (ready(): its models are loaded;
    it returns once every worker may accept), then supervise them. Returns the exit
    status: 0 after a requested stop, else the first failing worker's status."""
    from refcomplete.batch import thread_env

    try:
        socks = bind(host, port, n)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 3                                               # uvicorn's status for this
    port = socks[0].getsockname()[1]
    ready_r, ready_w = os.pipe()            # workers -> parent: a byte per worker ready
    go_r, go_w = os.pipe()                  # parent -> workers: a byte each, accept now
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:                                           # the worker
            os.close(ready_r)
            os.close(go_w)
            for other in socks[:i] + socks[i + 1:]:
                other.close()
            _worker(i, socks[i], ready_w, go_r, thread_env(n), start)
        pids.append(pid)
    os.close(ready_w)
    os.close(go_r)
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            _signal_all(pids, signal.SIGTERM)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    status = _await_ready(n, ready_r, pids, stopping)
    if status is None:
        for sock in socks:
            sock.listen(2048)
        os.write(go_w, b"g" * n)
        say(f"refcomplete serve: {n} workers ready on http://{host}:{port} "
            f"(pids {' '.join(map(str, pids))})")
        status = _supervise(pids, stopping, say)
    os.close(ready_r)
    os.close(go_w)
    for sock in socks:
        sock.close()
    return status


def _worker(i: int, sock, ready_w: int, go_r: int, env: dict, start: Callable) -> None:
    """The child side of the fork: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)                                       # the terminal's ^C: the parent's
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.update(env)

        def ready():
            os.write(ready_w, b"r")
            if os.read(go_r, 1) != b"g":                        # the parent went away
                raise SystemExit(1)
        code = start(sock, ready) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the parent dies (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _await_ready(n: int, fd: int, pids: list, stopping: list) -> int | None:
    """None once n workers said ready; else the status to exit with (a worker ended
    first: a model that does not load, say; or a stop was asked meanwhile)."""
    got, deadline = 0, time.monotonic() + READY_TIMEOUT
    os.set_blocking(fd, False)
    while got < n:
        try:
            got += len(os.read(fd, n))
        except BlockingIOError:
            pass
        if stopping:                                           # asked to stop while loading
            return max(_reap(pids), 0)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            pids.remove(pid)
            _signal_all(pids, signal.SIGTERM)
            _reap(pids)
            return code if code > 0 else 1
        if time.monotonic() > deadline:
            print(f"refcomplete serve: the workers were not ready after {READY_TIMEOUT:g} s",
                  file=sys.stderr)
            _signal_all(pids, signal.SIGTERM)
            _reap(pids)
            return 1
        time.sleep(0.05)
    return None


def _supervise(pids: list, stopping: list, say) -> int:
    """Wait for the workers; the first one that ends unasked ends them all."""
    first = None
    while pids:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        pids.remove(pid)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            stopping.append("worker")
            first = code if code > 0 else 1
            say(f"refcomplete serve: worker {pid} exited ({_describe(code)}); stopping the others")
            _signal_all(pids, signal.SIGTERM)
        elif first is None and code > 0:
            first = code
    return first or 0


def _reap(pids: list) -> int:
    """Wait for every worker in pids; the highest exit status (0 if none failed)."""
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in list(pids)]
    pids.clear()
    return max([c for c in codes if c > 0], default=0)


def _signal_all(pids, signum) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
