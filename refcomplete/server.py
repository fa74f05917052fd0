"""`refcomplete serve`: the completions endpoint over HTTP (a plain ASGI app on uvicorn).

Knows: HTTP: routes, status codes, OpenAI error bodies, bearer auth, body limits, SSE
framing, and keeping generation off the event loop. Does not know: any completion
rule (completions.py) or where models live (registry.py: used once, at start).

Two layers, so that the in-process OpenAI client (client.py) and the real server
answer every request with the same code:

    endpoint = Endpoint({"gpt2-tiny-shakespeare": model}, api_key="k")
    endpoint.handle("POST", "/v1/completions", headers, body)  # -> HTTPResponse (no I/O)
    app = create_app(endpoint)                                   # an ASGI app
    serve(["gpt2-tiny-shakespeare"], port=8000)                  # uvicorn on 127.0.0.1

Routes: POST /v1/completions (JSON, or SSE with stream=true: `data: {json}\\n\\n` per
chunk, then `data: [DONE]\\n\\n`), GET /v1/models, GET /v1/models/{id}; and vLLM's
tokenizer routes POST /tokenize, POST /detokenize, GET /tokenizer_info (tokenization.py;
lm-eval's remote tokenizer). Errors are OpenAI bodies `{"error": {"message", "type",
"param", "code"}}`: 400 (bad request, malformed JSON: never 422; a request over the
Limits), 401 (missing or wrong `Authorization: Bearer KEY` when the server has a key),
404 (unknown route or model), 405, 408 (body not received in time), 413 (body over the
limit), 421 (a Host header not allowed: guards.py), 500 `server_error` (a fault of ours:
logged, never detailed to the client).
Only the models named at start are served: a request's `model` is a key into that
mapping, never a path, so no request makes the server open a file. Generation runs
in worker threads. Batched (the default of `serve`): requests run concurrently and every
forward of a GPT-2 model goes to its batching.BatchingModel, which steps the rows of all
open requests together (the same bits as alone: batching.py). Serial
(`serve --serial`, and Endpoint's default): one request's model call at a time, under a
lock. A stream's generation runs in one worker thread, at most AHEAD frames ahead of the
socket, and a client that disconnects stops it at the next chunk; a non-streamed request
checks before each forward that its client is still there.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from refcomplete import tokenization
from refcomplete.completions import Completions
from refcomplete.errors import CompletionError
from refcomplete.guards import ClientGone, HostPolicy, Watched, h11_protocol
from refcomplete.params import DEFAULT_LIMITS, Limits

MAX_BODY = 1 << 20   # bytes; OpenAI's own limits are larger, our prompts are short
BODY_TIMEOUT = 30.0  # seconds to receive a whole request body (then 408)
SHUTDOWN_TIMEOUT = 10  # seconds a stop waits for requests in flight (a stalled reader...)
AHEAD = 4            # frames a stream's generation may run ahead of what was sent
ROUTES = {"/v1/completions": ("POST",), "/v1/models": ("GET",),
          "/tokenize": ("POST",), "/detokenize": ("POST",), "/tokenizer_info": ("GET",)}
SERVER_ERROR = "The server had an error while processing your request."
log = logging.getLogger("refcomplete.server")


@dataclass
class HTTPResponse:
    """What a transport sends: a status, headers, and either a body or an SSE byte stream."""

    status: int
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})
    body: bytes = b""
    stream: Iterator[bytes] | None = None


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers=None) -> HTTPResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return HTTPResponse(status, {"content-type": "application/json", **(headers or {})},
                        json.dumps(body).encode())


def too_large(max_body: int) -> HTTPResponse:
    """413: a body (or a declared Content-Length) over the limit."""
    return error_response(413, f"Request body too large: the limit is {max_body} bytes.",
                          code="request_too_large")


def _json(status: int, obj) -> HTTPResponse:
    return HTTPResponse(status, body=json.dumps(obj).encode())


def _clip(text: str, limit: int = 200) -> str:
    """Text from a request (a path, a name) cut so that it cannot make a message huge."""
    return text if len(text) <= limit else text[:limit] + "..."


def _no_constant(name: str):
    """json.loads hook: NaN, Infinity and -Infinity are not JSON (RFC 8259): 400 invalid_json."""
    raise ValueError(f"{name} is not a JSON value")


class Endpoint:
    """The API's HTTP semantics over a fixed set of loaded models, free of any transport.

    models: name -> loaded model (refcomplete.lm.LanguageModel). api_key: required bearer
    token, or None for an open server. max_body: the largest request body, in bytes (413).
    limits: the library's bounds on one request (params.Limits: prompts, prompt length,
    total work; each breach a 400). hosts: the Host headers answered (guards.HostPolicy;
    None: any, as for the in-process client, which has no network to be reached over).
    serial: one model call at a time, under `self.lock` (the default); False: requests run
    concurrently, and each GPT-2 model (one with `_layers`: runtime.GPT2Model) is wrapped in
    a batching.BatchingModel of `max_batch_rows` pool slots (None: its default), which
    batches the decode steps of all requests; any other model still runs under the lock.
    """

    def __init__(self, models: Mapping, api_key: str | None = None, max_body: int = MAX_BODY,
                 limits: Limits = DEFAULT_LIMITS, hosts: HostPolicy | None = None,
                 serial: bool = True, max_batch_rows: int | None = None):
        self.serial = serial
        self.batched: set[str] = set()
        if not serial:
            from refcomplete.batching import BatchingModel
            self.batched = {n for n, m in models.items()
                            if isinstance(m, BatchingModel) or hasattr(m, "_layers")}
            models = {n: BatchingModel(m, max_batch_rows) if n in self.batched
                      and not isinstance(m, BatchingModel) else m for n, m in models.items()}
        self.models = dict(models)
        # Batched, a request thread blocks while its rows wait for a round, and a stream
        # holds a thread while it lasts: more worker threads than anyio's 40, so that
        # waiting requests do not keep the others from queueing theirs (waiting costs none).
        self.worker_threads = None if not self.batched else 40 + 2 * sum(
            m.max_rows for n, m in self.models.items() if n in self.batched)
        self.api = Completions(self.models, limits=limits)
        self.limits = limits
        self.api_key = api_key
        self.max_body = max_body
        self.hosts = hosts
        self.lock = threading.Lock()
        self.created = int(time.time())

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               oversized: bool = False, gone=None) -> HTTPResponse:
        """Answer one request. headers: lower-case names. Blocking: call it off the event loop.

        With stream=true the returned HTTPResponse holds a lazy SSE iterator; validation
        errors still come back as plain error responses, before any byte is streamed.
        gone: an Event-like object (`is_set()`) that the transport sets when the client has
        left; a non-streamed completion checks it before every forward and stops (answered
        499, which nobody receives). Never raises: a fault of ours is logged here and
        answered 500 `server_error`, saying nothing of its cause (no path, no header, no
        key reaches the client).
        """
        try:
            return self._handle(method, path, headers, body, oversized, gone)
        except Exception:
            log.exception("unexpected error answering %s %s", method, _clip(path))
            return error_response(500, SERVER_ERROR, "server_error")

    def gate(self, method: str, path: str, headers: Mapping[str, str]) -> HTTPResponse | None:
        """The checks that need no body: Host (421), route (404), method (405), key (401);
        None: pass.

        The transport calls it before reading a body, so an unauthenticated client cannot
        make the server buffer one. The Host comes first: a page that rebinds its domain
        name to this server learns nothing, whatever the key."""
        host = headers.get("host")
        if self.hosts is not None and not self.hosts.allows(host):
            return error_response(421, f"This server does not answer to the host "
                                  f"{_clip(host, 100)!r}. Its operator can allow it with "
                                  "`refcomplete serve --allowed-host NAME`.",
                                  code="host_not_allowed")
        route = self._route(path)
        if route is None:
            return error_response(404, f"Invalid URL ({_clip(method)} {_clip(path)})",
                                  code="unknown_url")
        allowed = ROUTES[route]
        if method not in allowed:
            return error_response(405, f"Method {_clip(method)} is not allowed for "
                                  f"{_clip(path)}; use {', '.join(allowed)}.",
                                  code="method_not_allowed", headers={"allow": ", ".join(allowed)})
        return self._auth(headers)

    @staticmethod
    def _route(path: str) -> str | None:
        path = path.rstrip("/") or "/"
        return path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else None

    def _handle(self, method, path, headers, body, oversized, gone) -> HTTPResponse:
        denied = self.gate(method, path, headers)
        if denied is not None:
            return denied
        path = path.rstrip("/") or "/"
        route = self._route(path)
        if route == "/v1/models":
            return self._models(path[len("/v1/models/"):] if path != "/v1/models" else None)
        if route == "/tokenizer_info":
            return _json(200, tokenization.tokenizer_info(self.models))
        if oversized or len(body) > self.max_body:
            return too_large(self.max_body)
        try:
            request = json.loads(body, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(400, "We could not parse the JSON body of your request. "
                                  f"({_clip(str(exc))})", code="invalid_json")
        except RecursionError:
            return error_response(400, "We could not parse the JSON body of your request. "
                                  "(It is nested too deeply.)", code="invalid_json")
        if not isinstance(request, dict):
            return error_response(400, "The request body must be a JSON object.", code="invalid_json")
        if route == "/v1/completions":
            return self._complete(request, gone)
        job = tokenization.tokenize if route == "/tokenize" else tokenization.detokenize
        try:
            return _json(200, job(self.models, request, self.limits))
        except CompletionError as exc:
            return HTTPResponse(exc.status, body=json.dumps(exc.to_dict()).encode())

    def _auth(self, headers: Mapping[str, str]) -> HTTPResponse | None:
        if self.api_key is None:
            return None
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.api_key.encode()):
            return None
        message = ("You didn't provide an API key. You need to provide your API key in an "
                   "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                   if not given else "Incorrect API key provided.")
        return error_response(401, message, code="invalid_api_key",
                              headers={"www-authenticate": "Bearer"})

    def _models(self, name: str | None) -> HTTPResponse:
        def card(n):
            return {"id": n, "object": "model", "created": self.created, "owned_by": "refcomplete"}
        if name is None:
            return _json(200, {"object": "list", "data": [card(n) for n in self.models]})
        if name not in self.models:
            return error_response(404, f"The model `{_clip(name)}` does not exist or you do not have "
                                  "access to it.", param="model", code="model_not_found")
        return _json(200, card(name))

    def _complete(self, request: dict, gone=None) -> HTTPResponse:
        api = self.api
        if gone is not None and not request.get("stream"):
            api = Completions({n: Watched(m, gone) for n, m in self.models.items()},
                              limits=self.limits)
        name = request.get("model")
        lock = nullcontext() if isinstance(name, str) and name in self.batched else self.lock
        try:
            with lock:
                result = api.create(**request)
        except CompletionError as exc:
            return HTTPResponse(exc.status, body=json.dumps(exc.to_dict()).encode())
        except ClientGone:
            return error_response(499, "The client closed the connection before the "
                                  "completion was ready.", code="client_closed_request")
        if not request.get("stream"):
            return _json(200, result)
        return HTTPResponse(200, {"content-type": "text/event-stream", "cache-control": "no-cache"},
                            stream=self._sse(result, lock))

    def _sse(self, chunks: Iterator[dict], lock=None) -> Iterator[bytes]:
        """SSE frames, computing each chunk under `lock` (the serial mode's; a batched model
        needs none); closing this stops generation.

        A chunk that ends a choice is sent together with the next one, computed at once:
        when it was the last choice, its generation then finishes (and a batched model
        stops waiting for that request) with this frame rather than the next. The
        bytes sent are the same; only how they are grouped into writes differs."""
        lock = self.lock if lock is None else lock
        pending = b""                                   # frames held for the next write
        try:
            while True:
                with lock:
                    chunk = next(chunks, None)
                    while chunk is not None and _ends_a_choice(chunk):
                        pending += _frame(chunk)
                        chunk = next(chunks, None)
                if chunk is None:
                    break
                out, pending = pending + _frame(chunk), b""
                yield out
        except Exception as exc:  # after the 200 went out: OpenAI's mid-stream error frame
            if isinstance(exc, CompletionError):
                body = exc.to_dict()
            else:                 # a fault of ours: logged here, never detailed to the client
                log.exception("unexpected error in a stream")
                body = json.loads(error_response(500, SERVER_ERROR, "server_error").body)
            out, pending = pending + _frame(body), b""
            yield out
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        yield pending + b"data: [DONE]\n\n"


def _frame(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _ends_a_choice(chunk: dict) -> bool:
    return any(c.get("finish_reason") for c in chunk.get("choices") or ())


def create_app(endpoint: Endpoint, body_timeout: float = BODY_TIMEOUT):
    """An ASGI app that hands every request (any method, any path) to `endpoint`.

    Host, route, method and key are checked before the body is read (Endpoint.gate); a body over
    the limit is refused unread (413); one not received within `body_timeout` seconds is a
    408; `Endpoint.handle` runs in a worker thread, and so does each stream, AHEAD frames
    ahead of the socket at most. A client that disconnects while sending its body gets
    nothing; one that disconnects mid-stream closes the stream, which ends its generation
    (at most one chunk later); one that disconnects while its
    non-streamed request is computed sets the `gone` event that the generation checks
    before each forward (the same watcher as for streams).
    """
    import anyio

    async def read_body(receive, headers) -> tuple[bytes, bool]:
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > endpoint.max_body:
            return b"", True
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            part = message.get("body", b"")
            size += len(part)
            if size > endpoint.max_body:
                return b"", True
            parts.append(part)
            more = message.get("more_body", False)
        return b"".join(parts), False

    async def http(scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        resp = endpoint.gate(method, path, headers)
        if resp is None:
            body, oversized = b"", False
            if method == "POST":
                with anyio.move_on_after(body_timeout) as waited:
                    body, oversized = await read_body(receive, headers)
                if waited.cancelled_caught:
                    resp = error_response(408, f"The request body did not arrive within "
                                          f"{body_timeout:g} seconds.", code="request_timeout",
                                          headers={"connection": "close"})
            if resp is None:
                resp = await answer(method, path, headers, body, oversized, receive)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
        if resp.stream is None:
            raw.append((b"content-length", str(len(resp.body)).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": raw})
            await send({"type": "http.response.body", "body": resp.body})
            return
        await send({"type": "http.response.start", "status": resp.status, "headers": raw})
        await stream(resp.stream, receive, send)

    async def answer(method, path, headers, body, oversized, receive) -> HTTPResponse:
        # Endpoint.handle in a worker thread, while a watcher waits for the client to leave.
        gone = threading.Event()
        async with anyio.create_task_group() as tg:
            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
            tg.start_soon(watch)
            resp = await anyio.to_thread.run_sync(endpoint.handle, method, path, headers,
                                                  body, oversized, gone)
            tg.cancel_scope.cancel()
        return resp

    async def stream(frames: Iterator[bytes], receive, send) -> None:
        # The stream's generation runs in one worker thread (`pump`) for the whole stream,
        # up to AHEAD frames ahead of the socket, so that a batched request queues its next
        # step as soon as it has sampled, not after a round trip through this loop. A
        # watcher waits for the client to leave; then, or when the stream ends or fails,
        # the pump stops before its next frame, this waits for it, and either way
        # `frames.close()` runs here (the pump may never have started), which ends the
        # generation.
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue = asyncio.Queue()
        room, stop, done = threading.Semaphore(AHEAD), threading.Event(), object()

        def pump() -> None:
            try:
                while room.acquire() and not stop.is_set():
                    try:
                        frame = next(frames, done)
                    except BaseException as exc:   # _sse answers errors: a fault of ours
                        frame = exc
                    loop.call_soon_threadsafe(ready.put_nowait, frame)
                    if frame is done or isinstance(frame, BaseException):
                        break
            except RuntimeError:                   # the loop closed (a forced shutdown)
                pass

        try:
            async with anyio.create_task_group() as tg:
                async def watch():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()
                tg.start_soon(watch)
                tg.start_soon(anyio.to_thread.run_sync, pump)
                try:
                    while (frame := await ready.get()) is not done:
                        if isinstance(frame, BaseException):
                            raise frame
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                        room.release()
                    await send({"type": "http.response.body", "body": b""})
                finally:
                    stop.set()
                    room.release()
                tg.cancel_scope.cancel()
        finally:
            frames.close()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if endpoint.worker_threads:
                    limiter = anyio.to_thread.current_default_thread_limiter()
                    limiter.total_tokens = max(limiter.total_tokens, endpoint.worker_threads)
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            try:
                await http(scope, receive, send)
            except _Disconnected:
                pass
        else:   # websocket: not served
            await send({"type": "websocket.close", "code": 1008})

    return app


class _Disconnected(Exception):
    """The client went away before its request body was complete."""


def load_endpoint(models: list[str], api_key: str | None = None, max_body: int = MAX_BODY,
                  limits: Limits = DEFAULT_LIMITS, hosts: HostPolicy | None = None,
                  backend: str | None = None, serial: bool = False,
                  max_batch_rows: int | None = None) -> Endpoint:
    """Load each model once (through the registry, on `backend`: "numba" or "numpy", the
    same bits). A spec is `NAME` (served as NAME) or `NAME=WHERE` (the model at WHERE, a
    registry name or directory, served as NAME). Batched unless `serial` (Endpoint)."""
    from refcomplete.registry import load_model

    pairs = [spec.split("=", 1) if "=" in spec else (spec, spec) for spec in models]
    return Endpoint({name: load_model(where, backend) for name, where in pairs}, api_key=api_key,
                    max_body=max_body, limits=limits, hosts=hosts, serial=serial,
                    max_batch_rows=max_batch_rows)


def serve(models: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info", max_body: int = MAX_BODY,
          limits: Limits = DEFAULT_LIMITS, body_timeout: float = BODY_TIMEOUT,
          shutdown_timeout: int = SHUTDOWN_TIMEOUT, allowed_hosts: tuple[str, ...] = (),
          backend: str | None = None, serial: bool = False,
          max_batch_rows: int | None = None, workers: int = 1, loop: str = "auto") -> int:
    """Load the models, then run uvicorn until interrupted (SIGINT, SIGTERM: requests in
    flight get `shutdown_timeout` seconds to finish, then are cut). Only the Hosts of
    `guards.HostPolicy.for_server(host, allowed_hosts)` are answered. uvicorn runs its h11
    protocol (guards.h11_protocol: an over-long Content-Length is our 413). Requests are
    batched (batching.py) unless `serial`; `workers` > 1 runs that many such servers in
    processes behind the port, the parent handing each one connections (workers.py),
    and sharing one copy of each model's packed weights (runtime.PACK_DIR: a temporary
    directory, removed when the server stops). `loop`: uvicorn's event loop, "auto" (uvloop
    where it is installed, as it is with the `server` extra), "asyncio" or "uvloop".
    Returns the exit status."""
    import uvicorn

    def run(inbox=None, ready=None, packs=None):
        fixed_malloc_thresholds()
        if packs is not None:
            from refcomplete import runtime
            runtime.PACK_DIR = packs
        endpoint = load_endpoint(models, api_key, max_body, limits,
                                 HostPolicy.for_server(host, allowed_hosts), backend, serial,
                                 max_batch_rows)
        big = too_large(max_body)
        app = create_app(endpoint, body_timeout)
        if inbox is not None:                     # one of --workers: share the cores
            app = _sharing_cores(app, endpoint, inbox)
        config = uvicorn.Config(app, host=host, port=port, loop=loop,
                                log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=shutdown_timeout,
                                http=h11_protocol(big.status, big.headers, big.body))
        if ready:
            ready()
        server = _worker_server(inbox)(config) if inbox else uvicorn.Server(config)
        server.run()
        return 0 if server.started else 3          # 3: as uvicorn.run (the port was taken...)

    if workers == 1:
        return run()
    if serial:
        raise ValueError("--serial runs one request at a time in one process: not with --workers")
    from refcomplete.registry import resolve
    from refcomplete.workers import run_workers

    for spec in models:                           # a name that does not resolve: before forking
        resolve(spec.split("=", 1)[-1])
    from refcomplete.runtime import shared_packs

    with shared_packs() as packs:                 # the parent's exit (a worker never returns)
        return run_workers(workers, host, port, lambda inbox, ready: run(inbox, ready, packs),
                           say=lambda text: print(text, flush=True))


def _sharing_cores(app, endpoint: Endpoint, inbox):
    """One worker's app and models: the app counts its requests in flight in the shared
    array (workers.Inbox.begin, end), and every forward of its GPT-2 models takes the
    threads Inbox.share grants then (the same bits on any number of threads)."""
    for model in endpoint.models.values():
        model = getattr(model, "_model", model)            # a BatchingModel's GPT2Model
        if hasattr(model, "thread_share"):
            model.thread_share = inbox.share

    async def counted(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        inbox.begin()
        try:
            await app(scope, receive, send)
        finally:
            inbox.end()
    return counted


def _worker_server(inbox):
    """uvicorn's Server for one of `serve --workers N`: it listens on no socket of its own
    but serves the connections the parent hands it (workers.Inbox), and counts each one it
    closes (the parent sends new ones to the worker with the fewest open)."""
    import asyncio

    import uvicorn

    class Worker(uvicorn.Server):
        async def startup(self, sockets=None):
            await self.lifespan.startup()
            if self.lifespan.should_exit:
                sys.exit(3)
            config, state = self.config, self.server_state

            class Counted(config.http_protocol_class):
                def connection_lost(self, exc):
                    super().connection_lost(exc)
                    inbox.closed_one()

            def protocol():
                return Counted(config=config, server_state=state, app_state=self.lifespan.state)
            self.servers = []
            inbox.serve(asyncio.get_running_loop(), protocol,
                        parent_gone=lambda: setattr(self, "should_exit", True))
            self.started = True

        async def shutdown(self, sockets=None):
            inbox.stop(asyncio.get_running_loop())
            await super().shutdown(sockets)
    return Worker


MMAP_THRESHOLD = 1 << 20   # bytes: one row's float64 logits (402 KB for GPT-2) stay below
TRIM_THRESHOLD = 8 << 20   # bytes of free memory an arena keeps at its top


def fixed_malloc_thresholds(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Keep glibc's mmap threshold fixed at 1 MiB, so that every larger block (a batch's
    logits and activations) is mapped and returned to the system when freed, and let each
    arena keep up to 8 MiB free at its top.

    glibc raises the mmap threshold after each large free (up to 32 MiB), and then serves
    large blocks from per-thread arenas, which concurrent request threads fragment: the
    server's resident memory then climbed by about 10 MiB per 80 requests under 64 clients
    and did not level off; with it fixed it stays flat (tests/test_server_load.py). At
    glibc's initial 128 KiB, each row's float64 copies of its logits were mapped afresh
    and page-faulted at every step: 1,280 requests from 64 clients ran at 97 req/s
    (resident 264.7 -> 269.3 MiB over four rounds), at 1 MiB 122 req/s (288.6 -> 292.8
    MiB). Fixing the mmap threshold also fixes the trim threshold, at 128 KiB: each free
    of a row's temporaries handed the arena's top back (brk, or MADV_DONTNEED in a thread's
    arena), and the next step faulted it in again. One hard-case draw (T 0.8, top_p 0.9,
    penalties, logprobs 5; bench/bench_sampling.py's) took 1.41 ms so, 0.38-0.50 ms with 8
    MiB (glibc's own dynamic thresholds: 0.53); 32 streaming clients on the bundled model,
    alternated in one run: 526 -> 596 tok/s (docs/benchmarks.md, tenth pass). False where
    there is no glibc (nothing is changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trimmed = libc.mallopt(-1, trim)                  # M_TRIM_THRESHOLD
        mapped = libc.mallopt(-3, threshold)              # M_MMAP_THRESHOLD
        return bool(trimmed and mapped)
    except (OSError, AttributeError):
        return False


def add_backend_flag(p) -> None:
    """--backend, shared by serve, golden and complete."""
    p.add_argument("--backend", choices=("numba", "numpy"), default=None,
                   help="numba (compiled, the default where installed) or numpy (no Numba); "
                   "the same bits either way")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


LIMIT_FLAGS = {  # flag -> (Limits field, help)
    "--max-prompts": ("max_prompts", "prompts in one request"),
    "--max-prompt-chars": ("max_prompt_chars", "characters of one string prompt"),
    "--max-prompt-tokens": ("max_prompt_tokens", "ids of one token-id prompt"),
    "--max-work-tokens": ("max_work_tokens", "tokens one request may generate: the sum over "
                          "its prompts of best_of x max_tokens"),
}


def add_subcommand(subparsers) -> None:
    """Register `refcomplete serve` on the CLI's subparsers."""
    p = subparsers.add_parser("serve", help="serve POST /v1/completions over HTTP")
    p.add_argument("--model", action="append", dest="models",
                   help="a model to serve: NAME or NAME=PATH (repeatable; default "
                   "gpt2-tiny-shakespeare)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request")
    p.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts",
                   metavar="NAME", help="also answer requests whose Host is NAME (repeatable; "
                   "'*': any). Always answered: localhost, loopback addresses, the --host "
                   "address; any other Host is a 421")
    p.add_argument("--log-level", default="info")
    add_backend_flag(p)
    p.add_argument("--serial", action="store_true",
                   help="run one request's model call at a time, as before batching (for "
                   "comparison; the same bytes either way)")
    p.add_argument("--workers", type=_positive(int), default=1, metavar="N",
                   help="server processes behind the port, each batching its own requests; "
                   "a forward uses the cores split between the workers busy at that moment "
                   "(default 1; the number of cores serves the most: about 3x --serial with "
                   "32 clients on 2 cores, against 2x with 1, and as fast with one client; "
                   "each worker holds its own copy of the models' non-file memory)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="the event loop: auto (uvloop where installed, as with the `server` "
                   "extra; else asyncio), asyncio or uvloop (the same bytes either way)")
    p.add_argument("--max-batch-rows", type=_positive(int), default=None, metavar="N",
                   help="KV-cache row slots of the batch pool, per model (default 64, fewer "
                   "where the pool would exceed 1 GiB); a request that finds too few free "
                   "runs alone, unbatched")
    p.add_argument("--max-body", type=_positive(int), default=MAX_BODY, metavar="BYTES",
                   help=f"the largest request body; larger is a 413 (default {MAX_BODY})")
    p.add_argument("--body-timeout", type=_positive(float), default=BODY_TIMEOUT,
                   metavar="SECONDS", help="time allowed to receive a request body; then a "
                   f"408 (default {BODY_TIMEOUT:g})")
    p.add_argument("--shutdown-timeout", type=_positive(int), default=SHUTDOWN_TIMEOUT,
                   metavar="SECONDS", help="on SIGINT/SIGTERM, time given to requests in "
                   f"flight before they are cut (default {SHUTDOWN_TIMEOUT})")
    for flag, (name, text) in LIMIT_FLAGS.items():
        p.add_argument(flag, type=_positive(int), default=getattr(DEFAULT_LIMITS, name),
                       dest=name, metavar="N",
                       help=f"{text}; more is a 400 (default {getattr(DEFAULT_LIMITS, name)})")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from refcomplete.registry import DEFAULT_MODEL, ModelNotFound

    limits = Limits(**{name: getattr(args, name) for name, _ in LIMIT_FLAGS.values()})
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach "
              "this address can use the server", file=sys.stderr)
    if args.serial and args.workers > 1:
        print("error: --serial runs one request at a time in one process; it cannot be "
              "combined with --workers", file=sys.stderr)
        return 2
    try:
        return serve(args.models or [DEFAULT_MODEL], args.host, args.port, args.api_key,
                     args.log_level, args.max_body, limits, args.body_timeout,
                     args.shutdown_timeout, tuple(args.allowed_hosts), backend=args.backend,
                     serial=args.serial, max_batch_rows=args.max_batch_rows,
                     workers=args.workers, loop=args.loop) or 0
    except ModelNotFound as exc:
        print(f"error: {exc}")
        return 2
