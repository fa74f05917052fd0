"""`refcomplete batch INPUT.jsonl --out OUTPUT.jsonl`: OpenAI Batch files, run locally.

Knows: the Batch line formats, resuming, ordering, local worker processes. Does not
know: anything create() does (each body goes to Completions.create as it is), Ray
(batch_ray.py) or drawing the progress bar (progress.py).

    refcomplete batch requests.jsonl --out results.jsonl               # one process
    refcomplete batch requests.jsonl --out results.jsonl --workers 2   # 2 local processes
    refcomplete batch requests.jsonl --out results.jsonl --ray auto    # an existing Ray cluster

An input line is OpenAI's request input object
`{"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {...}}`; an
output line is OpenAI's request output object
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`, one per
non-blank input line, in input order. OpenAI's spec of `error`: "For requests that failed
with a non-HTTP error, this will contain more information on the cause of the failure."
So a body that create() refuses, an HTTP error, is a `response` with its status (400, or
404 for an unknown model), OpenAI's error body and `error: null`. A line that is not a request at all (bad JSON, a missing field, a
duplicate custom_id, an unsupported method or url) has `response: null` and
`error: {"code", "message", "line", "param"}` (OpenAI's batch error shape). A body with
`stream: true` is refused with a 400 (a batch has no stream to send).

Resuming: the output is appended to. On start a trailing partial line is cut off, the
custom_ids already written are skipped (the k-th occurrence of an id is skipped when
the output has k or more lines for it; lines without a usable custom_id by their line
number), and every result is written with one write of a whole line. A kill loses at
most the lines in flight. Bits do not depend on the process or the machine, so one
process, `--workers N` and Ray write the same bytes apart from `id`, `created` and
`request_id` (and seeds that create() draws fresh when a body gives none, as OpenAI does).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import secrets
import sys
import threading
import time
from typing import Iterable, Iterator, NamedTuple

from refcomplete.errors import CompletionError, InvalidRequestError
from refcomplete.progress import Progress

URL = "/v1/completions"
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_SERVER_ERROR = {"error": {"message": "The server had an error while processing your request.",
                           "type": "server_error", "param": None, "code": None}}


class BatchFileError(ValueError):
    """The --out file is not a batch output file (so it is neither resumed nor appended to)."""


class Item(NamedTuple):
    """One input line: `body` to send to create(), or `ready` (status, body, error) when the
    line is answered without it. Resuming matches on `custom_id`, else on `line`."""

    line: int
    custom_id: str | None
    body: dict | None
    ready: tuple | None


def line_error(n: int, custom_id, code: str, message: str, param: str | None = None) -> Item:
    return Item(n, custom_id, None, (None, None, {"code": code, "message": message,
                                                  "line": n, "param": param}))


def parse_line(n: int, raw: bytes, seen: set) -> Item:
    """The Item for input line `n` (1-based); `seen` holds the custom_ids met so far."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return line_error(n, None, "invalid_json_line", f"Line {n} is not valid JSON.")
    if not isinstance(obj, dict):
        return line_error(n, None, "invalid_json_line", f"Line {n} is not a JSON object.")
    cid = obj.get("custom_id")
    if not isinstance(cid, str):
        return line_error(n, None, "missing_required_parameter",
                          f"Line {n} has no custom_id string.", "custom_id")
    if cid in seen:
        return line_error(n, cid, "duplicate_custom_id",
                          f"The custom_id {cid[:200]!r} of line {n} was used on an earlier "
                          "line; each must be unique.", "custom_id")
    seen.add(cid)
    if obj.get("method") != "POST":
        return line_error(n, cid, "invalid_method", "Only POST is supported.", "method")
    if obj.get("url") != URL:
        url = obj.get("url")
        return line_error(n, cid, "invalid_url", f"The url {str(url)[:200]!r} is not "
                          f"supported; the supported url is {URL!r}.", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return line_error(n, cid, "missing_required_parameter",
                          f"Line {n} has no body object.", "body")
    if body.get("stream") is True:
        refusal = InvalidRequestError("Streaming is not supported in a batch: set `stream` "
                                      "to false or leave it out.", param="stream")
        return Item(n, cid, None, (refusal.status, refusal.to_dict(), None))
    return Item(n, cid, body, None)


def answer(completions, body: dict) -> tuple:
    """(status, response body, error) for one request body, as the server would answer."""
    try:
        return 200, completions.create(**body), None
    except CompletionError as exc:
        return exc.status, exc.to_dict(), None
    except Exception:   # a bug, not a bad request: OpenAI's 500, and the run goes on
        import logging
        logging.getLogger("refcomplete.batch").exception("unexpected error in a batch line")
        return 500, _SERVER_ERROR, None


def output_line(item: Item, result: tuple) -> bytes:
    """The output object for `item`, as one JSON line (ASCII, newline-terminated)."""
    status, body, error = result
    response = None if status is None else {"status_code": status,
                                            "request_id": secrets.token_hex(16), "body": body}
    obj = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": item.custom_id,
           "response": response, "error": error}
    return (json.dumps(obj) + "\n").encode("ascii")


# --- resuming ---------------------------------------------------------------------------

def recover(path: str) -> tuple[collections.Counter, set, int]:
    """Cut a trailing partial line off `path`, then return (lines per custom_id, line
    numbers of the written errors that have no custom_id, lines written)."""
    done: collections.Counter = collections.Counter()
    keyless: set = set()
    if not os.path.exists(path):
        return done, keyless, 0
    written = end = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):   # a line cut by a kill: dropped below
                if not raw.startswith(b'{"id": "batch_req_'[:len(raw)]):
                    raise BatchFileError(f"{path} ends in a line that is not batch output; "
                                         "is --out the right file?")
                break
            end += len(raw)
            written += 1
            try:
                obj = json.loads(raw)
                cid = obj["custom_id"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BatchFileError(f"line {written} of {path} is not a batch output line; "
                                     "is --out the right file?") from exc
            if isinstance(cid, str):
                done[cid] += 1
            elif obj.get("error"):
                keyless.add(obj["error"].get("line"))
    if os.path.getsize(path) > end:
        os.truncate(path, end)
    return done, keyless, written


def count_lines(path: str) -> int:
    """The number of non-blank lines of `path` (the progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def read_items(path: str, done: collections.Counter, keyless: set) -> Iterator[Item]:
    """The Items still to answer, in input order, read lazily."""
    seen: set = set()
    met: collections.Counter = collections.Counter()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            item = parse_line(n, raw, seen)
            if item.custom_id is None:
                if n in keyless:
                    continue
            else:
                met[item.custom_id] += 1
                if met[item.custom_id] <= done[item.custom_id]:
                    continue
            yield item


# --- executors: each yields (item, result) in input order --------------------------------

_worker_completions = None   # one per worker process, set by _pool_init


def run_serial(items: Iterable[Item], completions) -> Iterator[tuple]:
    for item in items:
        yield item, item.ready or answer(completions, item.body)


def _pool_init(parent: int, backend: str | None, packs: str | None = None) -> None:
    """In each worker: one Completions (models load once, on first use, their packed
    weights shared through `packs`: runtime.PACK_DIR), and an exit when the parent dies (a
    killed run must not leave workers behind)."""
    import functools
    from pathlib import Path

    from refcomplete import runtime
    from refcomplete.completions import Completions, registry_loader
    global _worker_completions
    runtime.PACK_DIR = Path(packs) if packs else None
    _worker_completions = Completions(functools.partial(registry_loader, backend=backend))

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _pool_answer(body: dict) -> tuple:
    return answer(_worker_completions, body)


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share,
    where os.cpu_count() counts the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # no affinity call on this platform
        return os.cpu_count() or 1


def thread_env(workers: int, names: tuple[str, ...] = THREAD_VARS) -> dict:
    """Thread-pool sizes for one of `workers` processes sharing this process's cores (only
    those the user has not set): one threading owner per core, never oversubscribed."""
    per = str(max(1, usable_cores() // workers))
    return {k: per for k in names if k not in os.environ}


def run_pool(items: Iterable[Item], workers: int, backend: str | None,
             window: int | None = None) -> Iterator[tuple]:
    """`workers` spawned processes; at most `window` results held back waiting for an earlier
    line, so memory stays bounded however long the input. A worker that dies stops the run
    (BrokenProcessPool) with every line before it written: rerun to resume. The workers
    hold one copy of each model's packed weights between them (runtime.shared_packs: a
    temporary PACK_DIR, removed at the end)."""
    from refcomplete.runtime import shared_packs

    with shared_packs() as packs:
        yield from _pool_results(items, workers, backend, window or 4 * workers, packs)


def _pool_results(items: Iterable[Item], workers: int, backend: str | None, window: int,
                  packs) -> Iterator[tuple]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    env = thread_env(workers)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:   # processes start on these first submits, so they inherit `env`
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_pool_init,
                                   initargs=(os.getpid(), backend, str(packs)))
        for _ in range(workers):
            pool.submit(os.getpid)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append((item, None if item.ready else pool.submit(_pool_answer, item.body)))
            while pending and (len(pending) > window or pending[0][1] is None
                               or pending[0][1].done()):
                head, future = pending.popleft()
                yield head, head.ready or future.result()
        while pending:
            head, future = pending.popleft()
            yield head, head.ready or future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- the run ----------------------------------------------------------------------------

def run(input_path: str, out_path: str, workers: int = 1, ray_address: str | None = None,
        backend: str | None = None, progress: bool = True, chunk_size: int = 8,
        completions=None) -> dict:
    """Answer every line of `input_path` not yet in `out_path`; returns counts.

    ray_address: None for local processes; "auto", "local" or an address for Ray.
    completions: the endpoint for one process (default: a Completions on the registry).
    """
    done, keyless, written = recover(out_path)
    total = count_lines(input_path)
    items = read_items(input_path, done, keyless)
    bar = Progress(total, min(written, total), progress)
    first = next(items, None)
    items = itertools.chain([first], items)
    if first is None:                  # all done: start no workers, no Ray
        results = (pair for pair in ())
    elif ray_address is not None:
        from refcomplete import batch_ray
        results = batch_ray.run_ray(items, ray_address, workers, backend, chunk_size)
    elif workers > 1:
        results = run_pool(items, workers, backend)
    else:
        if completions is None:
            import functools

            from refcomplete.completions import Completions, registry_loader
            completions = Completions(functools.partial(registry_loader, backend=backend))
        results = run_serial(items, completions)
    counts = collections.Counter(skipped=min(written, total))
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for item, result in results:
            _write_all(fd, output_line(item, result))
            counts["ok" if result[0] == 200 else "failed"] += 1
            bar.step()
    finally:
        results.close()       # stops the workers or actors
        os.close(fd)
        bar.close()
    return dict(counts)


def _write_all(fd: int, data: bytes) -> None:
    """One write of a whole line (O_APPEND, unbuffered); a short write is finished off."""
    while data:
        data = data[os.write(fd, data):]


def add_subcommand(subparsers) -> None:
    """Register `refcomplete batch` on the CLI's subparsers."""
    p = subparsers.add_parser("batch", help="run an OpenAI Batch file (JSONL) of completions")
    p.add_argument("input", help="JSONL of {custom_id, method, url, body} lines")
    p.add_argument("--out", required=True,
                   help="JSONL of results; appended to, so a rerun resumes")
    p.add_argument("--workers", type=int, default=None,
                   help="local processes (default 1); with --ray, actors (default: the "
                        "cluster's CPUs)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (default address: auto; 'local' starts one; "
                        "give it after INPUT, or with an address)")
    p.add_argument("--chunk-size", type=int, default=8, help="lines per Ray task")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    from refcomplete.server import add_backend_flag
    add_backend_flag(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    if not os.path.isfile(args.input):
        print(f"refcomplete batch: no input file {args.input}", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1 or args.chunk_size < 1:
        print("refcomplete batch: --workers and --chunk-size must be at least 1",
              file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        print(f"refcomplete batch: no directory for {args.out}", file=sys.stderr)
        return 2
    workers = args.workers or (0 if args.ray is not None else 1)
    try:
        counts = run(args.input, args.out, workers, args.ray, getattr(args, "backend", None),
                     not args.no_progress, args.chunk_size)
    except BatchFileError as exc:
        print(f"refcomplete batch: {exc}", file=sys.stderr)
        return 2
    print(f"{counts.get('ok', 0)} answered, {counts.get('failed', 0)} errors, "
          f"{counts.get('skipped', 0)} already in {args.out}", file=sys.stderr)
    return 0
