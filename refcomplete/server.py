"""`refcomplete serve`: the completions endpoint over HTTP (Starlette + uvicorn).

Knows: HTTP: routes, status codes, OpenAI error bodies, bearer auth, body limits, SSE
framing, and keeping generation off the event loop. Does not know: any completion
rule (completions.py) or where models live (registry.py: used once, at start).

Two layers, so that the in-process OpenAI client (client.py) and the real server
answer every request with the same code:

    endpoint = Endpoint({"gpt2-tiny-shakespeare": model}, api_key="k")
    endpoint.handle("POST", "/v1/completions", headers, body)  # -> HTTPResponse (no I/O)
    app = create_app(endpoint)                                   # a Starlette ASGI app
    serve(["gpt2-tiny-shakespeare"], port=8000)                  # uvicorn on 127.0.0.1

Routes: POST /v1/completions (JSON, or SSE with stream=true: `data: {json}\\n\\n` per
chunk, then `data: [DONE]\\n\\n`), GET /v1/models, GET /v1/models/{id}. Errors are
OpenAI bodies `{"error": {"message", "type", "param", "code"}}`: 400 (bad request,
malformed JSON: never 422), 401 (missing or wrong `Authorization: Bearer KEY` when
the server has a key), 404 (unknown route or model), 405, 413 (body over the limit).
Only the models named at start are served: a request's `model` is a key into that
mapping, never a path, so no request makes the server open a file. Generation runs
in worker threads, one model call at a time (a lock: two CPU cores gain nothing from
overlapping forwards); a stream advances one chunk per thread hop, so a client that
disconnects stops its generation at the next chunk.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from refcomplete.completions import Completions
from refcomplete.errors import CompletionError

MAX_BODY = 1 << 20   # bytes; OpenAI's own limits are larger, our prompts are short
ROUTES = {"/v1/completions": ("POST",), "/v1/models": ("GET",)}


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


def _json(status: int, obj) -> HTTPResponse:
    return HTTPResponse(status, body=json.dumps(obj).encode())


class Endpoint:
    """The API's HTTP semantics over a fixed set of loaded models, free of any transport.

    models: name -> loaded model (refcomplete.lm.LanguageModel). api_key: required bearer
    token, or None for an open server. max_body: the largest request body, in bytes.
    """

    def __init__(self, models: Mapping, api_key: str | None = None, max_body: int = MAX_BODY):
        self.models = dict(models)
        self.api = Completions(self.models)
        self.api_key = api_key
        self.max_body = max_body
        self.lock = threading.Lock()
        self.created = int(time.time())

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               oversized: bool = False) -> HTTPResponse:
        """Answer one request. headers: lower-case names. Blocking: call it off the event loop.

        With stream=true the returned HTTPResponse holds a lazy SSE iterator; validation
        errors still come back as plain error responses, before any byte is streamed.
        """
        path = path.rstrip("/") or "/"
        route = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else None
        if route is None:
            return error_response(404, f"Invalid URL ({method} {path})", code="unknown_url")
        allowed = ROUTES[route]
        if method not in allowed:
            return error_response(405, f"Method {method} is not allowed for {path}; use "
                                  f"{', '.join(allowed)}.", code="method_not_allowed",
                                  headers={"allow": ", ".join(allowed)})
        denied = self._auth(headers)
        if denied is not None:
            return denied
        if route == "/v1/models":
            return self._models(path[len("/v1/models/"):] if path != "/v1/models" else None)
        if oversized or len(body) > self.max_body:
            return error_response(413, f"Request body too large: the limit is {self.max_body} "
                                  "bytes.", code="request_too_large")
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(400, f"We could not parse the JSON body of your request. ({exc})",
                                  code="invalid_json")
        if not isinstance(request, dict):
            return error_response(400, "The request body must be a JSON object.", code="invalid_json")
        return self._complete(request)

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
            return error_response(404, f"The model `{name}` does not exist or you do not have "
                                  "access to it.", param="model", code="model_not_found")
        return _json(200, card(name))

    def _complete(self, request: dict) -> HTTPResponse:
        try:
            with self.lock:
                result = self.api.create(**request)
        except CompletionError as exc:
            return HTTPResponse(exc.status, body=json.dumps(exc.to_dict()).encode())
        if not request.get("stream"):
            return _json(200, result)
        return HTTPResponse(200, {"content-type": "text/event-stream", "cache-control": "no-cache"},
                            stream=self._sse(result))

    def _sse(self, chunks: Iterator[dict]) -> Iterator[bytes]:
        """SSE frames, computing each chunk under the lock; closing this stops generation."""
        try:
            while True:
                with self.lock:
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        except Exception as exc:  # after the 200 went out: OpenAI's mid-stream error frame
            status = exc.to_dict() if isinstance(exc, CompletionError) else {"error": {
                "message": f"The server had an error processing your request ({type(exc).__name__}).",
                "type": "server_error", "param": None, "code": None}}
            yield b"data: " + json.dumps(status).encode() + b"\n\n"
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        yield b"data: [DONE]\n\n"


def create_app(endpoint: Endpoint):
    """A Starlette app that hands every request to `endpoint.handle` in a worker thread."""
    import anyio
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def read_body(request) -> tuple[bytes, bool]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > endpoint.max_body:
            return b"", True
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > endpoint.max_body:
                return b"", True
            parts.append(part)
        return b"".join(parts), False

    async def route(request):
        body, oversized = (b"", False) if request.method != "POST" else await read_body(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        resp = await anyio.to_thread.run_sync(endpoint.handle, request.method, request.url.path,
                                              headers, body, oversized)
        if resp.stream is None:
            return Response(resp.body, resp.status, headers=resp.headers)
        return StreamingResponse(_threaded(resp.stream), resp.status, headers=resp.headers)

    async def _threaded(frames: Iterator[bytes]):
        # One thread hop per frame. If the client goes away, the send fails, this
        # generator is closed, and `frames.close()` ends the generation.
        done = object()
        try:
            while True:
                frame = await anyio.to_thread.run_sync(next, frames, done)
                if frame is done:
                    return
                yield frame
        finally:
            frames.close()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", route, methods=methods)])


def load_endpoint(models: list[str], api_key: str | None = None) -> Endpoint:
    """Load each model once (through the registry). A spec is `NAME` (served as NAME) or
    `NAME=WHERE` (the model at WHERE, a registry name or directory, served as NAME)."""
    from refcomplete.registry import load_model

    pairs = [spec.split("=", 1) if "=" in spec else (spec, spec) for spec in models]
    return Endpoint({name: load_model(where) for name, where in pairs}, api_key=api_key)


def serve(models: list[str], host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Load the models, then run uvicorn until interrupted (prints the address when ready)."""
    import uvicorn

    app = create_app(load_endpoint(models, api_key))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def add_subcommand(subparsers) -> None:
    """Register `refcomplete serve` on the CLI's subparsers."""
    p = subparsers.add_parser("serve", help="serve POST /v1/completions over HTTP")
    p.add_argument("--model", action="append", dest="models",
                   help="a model to serve: NAME or NAME=PATH (repeatable; default "
                   "gpt2-tiny-shakespeare)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from refcomplete.registry import DEFAULT_MODEL, ModelNotFound

    try:
        serve(args.models or [DEFAULT_MODEL], args.host, args.port, args.api_key, args.log_level)
    except ModelNotFound as exc:
        print(f"error: {exc}")
        return 2
    return 0
