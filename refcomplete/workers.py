"""`refcomplete serve --workers N`: N server processes behind one port.

Knows: processes, signals, sockets, handing a connection to a process. Does not know:
HTTP, models, requests (server.py runs one worker's uvicorn on an Inbox; each worker is
the whole batched server of one process).

    run_workers(2, "127.0.0.1", 8000, start)   # start(inbox, ready) runs one worker

Why processes. One batched server keeps a single process's per-token Python work (its
sampling, chunks and SSE frames) under one GIL, and measured 1.6-1.7x the serial server
with 32 streaming clients on 2 cores; two one-thread workers served 2.95-3.21x
(docs/benchmarks.md). Every worker computes the same bits (SEMANTICS 4: a row's result
depends on no other row, no thread count), so which worker answers changes no byte.

How. The parent binds the port, then forks the workers before it imports Numba or loads
a model (so no thread pool is copied mid-flight; each worker loads its own model; the
numba backend's packed weights go to files that every worker maps, one copy for all:
runtime.PACK_DIR, which server.serve sets up). Each
worker gets cores / N threads for BLAS and OpenMP, and a Numba pool of all the cores of
which each forward takes the share of the workers busy at that moment (Inbox.share: a
worker serving alone uses every core), loads its models, reports ready, and
waits; once all are ready the parent listens. The parent accepts every connection and
sends its descriptor (SCM_RIGHTS) to the worker with the fewest open connections, which
serves it to the end (keep-alive included); workers count the connections they close in
a shared array. Left to the kernel (a socket per worker, SO_REUSEPORT), 32 connections
split by an address hash, 13/19 say, and the heavier worker set the pace.
SIGINT or SIGTERM to the parent is passed on once as SIGTERM (each worker's uvicorn then
gives requests in flight its graceful-shutdown time). Workers run in their own process
group, so a terminal's Ctrl-C reaches the parent only, and they exit if the parent dies.
A worker that exits on its own (a crash, a kill) stops the others: the server never runs
at part strength without saying so. Linux only (fork, prctl, SCM_RIGHTS).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Callable

READY_TIMEOUT = 600.0    # seconds for every worker to load its models
BACKLOG = 2048           # connections waiting to be accepted


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; only the parent accepts on it (see run_workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP;
    # without it Nagle's algorithm held SSE chunks back (44 ms for 8 tokens, not 20).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Inbox:
    """A worker's end of the hand-off: connections the parent accepted arrive here, one
    descriptor per message, and the worker counts each one it has closed in a shared
    slot (the parent's measure of the worker's load). A second shared array holds each
    worker's requests in flight (begin, end), from which `share` splits the cores
    between the workers that are busy now."""

    def __init__(self, conn: socket.socket, closed: memoryview, index: int, busy: memoryview):
        self.conn, self._closed, self._index, self._busy = conn, closed, index, busy

    def begin(self) -> None:
        """A request arrived (on the event loop, the only writer of this worker's slot)."""
        self._busy[self._index] += 1

    def end(self) -> None:
        self._busy[self._index] -= 1

    def share(self, cores: int) -> int:
        """Threads for this worker's next forward: `cores` split evenly between the
        workers serving a request now, this one included. One client on one of two
        workers gets both cores (on a worker's own share, 1 client was 0.84x the one-
        process server's tokens/s); 32 clients, spread over both, one core each, as
        before, never oversubscribed for longer than a forward that began alone."""
        busy = sum(1 for i, n in enumerate(self._busy) if n > 0 or i == self._index)
        return max(1, cores // busy)

    def serve(self, loop, protocol_factory, parent_gone: Callable) -> None:
        """Hand every arriving connection to loop.connect_accepted_socket."""
        import asyncio

        def arrived():
            while True:
                try:
                    msg, fds, _, _ = socket.recv_fds(self.conn, 1, 1)
                except BlockingIOError:
                    return
                except OSError:
                    msg, fds = b"", []
                if not msg:                                    # the parent is gone
                    loop.remove_reader(self.conn.fileno())
                    parent_gone()
                    return
                for fd in fds:
                    sock = socket.socket(fileno=fd)
                    sock.setblocking(False)
                    asyncio.ensure_future(loop.connect_accepted_socket(protocol_factory, sock))
        self.conn.setblocking(False)
        loop.add_reader(self.conn.fileno(), arrived)

    def stop(self, loop) -> None:
        loop.remove_reader(self.conn.fileno())

    def closed_one(self) -> None:
        self._closed[self._index] += 1


def run_workers(n: int, host: str, port: int, start: Callable, say=print) -> int:
    """Fork n workers that each call start(inbox, ready) (ready(): its models are loaded;
    it returns once every worker may serve; inbox: an Inbox), then hand out connections
    and supervise. Returns the exit status: 0 after a requested stop, else the first
    failing worker's status."""
    import mmap
    import threading

    try:
        sock = bind(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 3                                               # uvicorn's status for this
    port = sock.getsockname()[1]
    closed = memoryview(mmap.mmap(-1, 8 * n)).cast("q")        # shared: connections closed
    busy = memoryview(mmap.mmap(-1, 8 * n)).cast("q")          # shared: requests in flight
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(n)]
    ready_r, ready_w = os.pipe()            # workers -> parent: a byte per worker ready
    go_r, go_w = os.pipe()                  # parent -> workers: a byte each, serve now
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:                                           # the worker
            os.close(ready_r)
            os.close(go_w)
            sock.close()
            for j, (mine, theirs) in enumerate(pairs):
                mine.close()
                if j != i:
                    theirs.close()
            _worker(Inbox(pairs[i][1], closed, i, busy), ready_w, go_r, worker_env(n), start)
        pids.append(pid)
    os.close(ready_w)
    os.close(go_r)
    for _, theirs in pairs:
        theirs.close()
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            _signal_all(pids, signal.SIGTERM)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    status = _await_ready(n, ready_r, pids, stopping)
    if status is None:
        sock.listen(BACKLOG)
        os.write(go_w, b"g" * n)
        hand_out = threading.Thread(target=_hand_out, args=(sock, [p for p, _ in pairs], closed,
                                                            stopping), daemon=True)
        hand_out.start()
        say(f"refcomplete serve: {n} workers ready on http://{host}:{port} "
            f"(pids {' '.join(map(str, pids))})")
        status = _supervise(pids, stopping, say)
        stopping.append("done")
        hand_out.join(timeout=2)
    os.close(ready_r)
    os.close(go_w)
    sock.close()
    for mine, _ in pairs:
        mine.close()
    return status


def worker_env(n: int) -> dict:
    """One worker's thread-pool sizes: a share of the cores (batch.thread_env) for BLAS
    and OpenMP, but Numba's pool sized for all of them, each forward taking the share
    Inbox.share grants at that moment (runtime.GPT2Model.thread_share)."""
    from refcomplete.batch import thread_env

    return {**thread_env(n), **thread_env(1, names=("NUMBA_NUM_THREADS",))}


def _hand_out(sock: socket.socket, pairs: list, closed: memoryview, stopping: list) -> None:
    """Accept every connection and send it to the worker with the fewest open ones (ties:
    in turn). Node's cluster module does the same by default on Linux, for the same
    reason: left to the kernel, a few long-lived connections split unevenly."""
    n, sent, turn = len(pairs), [0] * len(pairs), 0
    sock.settimeout(0.25)                                      # to notice a stop
    while not stopping:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            load = [sent[i] - closed[i] for i in range(n)]
            least = min(load)
            i = next(j % n for j in range(turn, turn + n) if load[j % n] == least)
            try:
                socket.send_fds(pairs[i], [b"c"], [conn.fileno()])
            except OSError:                                    # that worker is gone: the
                continue                                       # supervisor stops the rest
            sent[i] += 1
            turn = i + 1


def _worker(inbox: Inbox, ready_w: int, go_r: int, env: dict, start: Callable) -> None:
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
        code = start(inbox, ready) or 0
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
            return _reap(pids)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            pids.remove(pid)
            _stop_all(pids)
            return code if code > 0 else 1
        if time.monotonic() > deadline:
            print(f"refcomplete serve: the workers were not ready after {READY_TIMEOUT:g} s",
                  file=sys.stderr)
            _stop_all(pids)
            return 1
        time.sleep(0.05)
    return None


def _supervise(pids: list, stopping: list, say) -> int:
    """Wait for the workers; the first one that ends unasked ends them all."""
    first = None
    while pids:
        try:
            pid, status = os.waitpid(-1, 0)                    # (EINTR is retried: PEP 475)
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


def _stop_all(pids: list) -> int:
    """SIGTERM every worker in pids, then wait for them all (_reap's status)."""
    _signal_all(pids, signal.SIGTERM)
    return _reap(pids)


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
