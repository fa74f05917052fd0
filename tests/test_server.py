"""`refcomplete serve`: a real server process on 127.0.0.1, driven by the official `openai`
package (sync and async, streamed and not), raw HTTP for the error matrix, and an
in-process uvicorn with a slow fake model for client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from fakes import FakeModel
from test_server_security import free_port, serve_process
from refcomplete.completions import Completions
from refcomplete.server import Endpoint, create_app

KEY = "sk-test-key"


@contextlib.contextmanager
def server_process(*models: str, api_key: str | None = None, timeout: float = 90.0):
    """Start `refcomplete serve` in a subprocess on a free port; yield its base URL; always
    stop it (test_server_security.serve_process does the work)."""
    with serve_process(*models, flags=["--api-key", api_key] if api_key else [], timeout=timeout) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def server(tiny_dir):
    with server_process(f"tiny={tiny_dir}", api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tiny_dir):
    from refcomplete.registry import load_model
    return Completions({"tiny": load_model(str(tiny_dir))})


def same(a: dict, b: dict) -> bool:
    strip = lambda r: {k: v for k, v in r.items() if k not in ("id", "created")}
    return strip(a) == strip(b)


REQ = dict(model="tiny", prompt=["Hello there", "To be"], max_tokens=6, temperature=0,
           logprobs=3, echo=True, stop=["e t"])


def test_sync_client_matches_create(server, reference):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    r = client.completions.create(**REQ)
    assert same(r.model_dump(exclude_unset=True), reference.create(**REQ))


def test_sync_stream_folds_to_the_response(server, reference):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    chunks = list(client.completions.create(**REQ, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices == []
    text = {}
    for c in chunks[:-1]:
        assert c.usage is None
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + ch.text
    expected = reference.create(**REQ)
    assert text == {c["index"]: c["text"] for c in expected["choices"]}
    assert chunks[-1].usage.model_dump(exclude_none=True) == expected["usage"]


def test_async_client_streamed_and_not(server, reference):
    async def go():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        r = await client.completions.create(model="tiny", prompt="Hi", max_tokens=4,
                                            temperature=0)
        parts = [c.choices[0].text async for c in await client.completions.create(
            model="tiny", prompt="Hi", max_tokens=4, temperature=0, stream=True) if c.choices]
        await client.close()
        return r, parts
    r, parts = asyncio.run(go())
    expected = reference.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    assert r.choices[0].text == "".join(parts) == expected["choices"][0]["text"]


def test_models_and_auth(server):
    ok = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list()] == ["tiny"]
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="tiny", prompt="x")
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.post(server + "/v1/completions", json={"model": "tiny"}).status_code == 401


AUTH = {"authorization": f"Bearer {KEY}"}
RAW_ERRORS = [  # (method, path, body bytes, status, code)
    ("POST", "/v1/completions", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 9}', 400, None),
    ("POST", "/v1/completions", b'{"model": "/etc", "prompt": "x"}', 404, "model_not_found"),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "x", "self": 1}', 400, None),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * (1 << 21) + b'"}',
     413, "request_too_large"),
    ("GET", "/v1/completions", b"", 405, "method_not_allowed"),
    ("POST", "/v1/chat/completions", b"{}", 404, "unknown_url"),
    ("GET", "/v1/models/nope", b"", 404, "model_not_found"),
]


@pytest.mark.parametrize("method,path,body,status,code", RAW_ERRORS,
                         ids=[f"{r[3]}-{r[4]}" for r in RAW_ERRORS])
def test_error_bodies(server, method, path, body, status, code):
    r = httpx.request(method, server + path, content=body, headers=AUTH, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert err["type"] == "invalid_request_error" and err["message"]


def test_sse_framing(server):
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=30,
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    frames = raw.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    assert all(f.startswith(b"data: {") for f in frames[:-2])
    assert json.loads(frames[-3][6:])["choices"][0]["finish_reason"] == "length"


def test_binds_loopback_by_default():
    import inspect
    from refcomplete.server import serve
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


@contextlib.contextmanager
def slow_server():
    """An in-process uvicorn serving a fake model that takes 10 ms per forward and never
    stops by itself; yields (port, steps: one entry per forward, endpoint)."""
    steps = []

    def slow(prompt, generated):
        steps.append(len(generated))
        time.sleep(0.01)
        z = np.zeros(50257, np.float32)
        z[11] = 5.0                      # "," forever: never a stop
        return z

    import uvicorn
    port = free_port()
    endpoint = Endpoint({"slow": FakeModel(slow, n_ctx=4096)})
    srv = uvicorn.Server(uvicorn.Config(create_app(endpoint), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield port, steps, endpoint
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _stops_after_client_left(steps) -> None:
    time.sleep(1.0)
    n = len(steps)
    time.sleep(1.0)
    assert len(steps) == n < 1000, "generation went on after the client left"


def test_client_disconnect_stops_generation():
    with slow_server() as (port, steps, _):
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                          json={"model": "slow", "prompt": "Hi", "max_tokens": 4000,
                                "stream": True}) as r:
            it = r.iter_lines()
            got = [line for line, _ in zip(it, range(6))]
            assert got[0].startswith("data: ")
        _stops_after_client_left(steps)


@pytest.mark.parametrize("extra", [{}, {"n": 2, "best_of": 3}], ids=["plain", "best_of"])
def test_client_disconnect_stops_a_non_streamed_request(extra):
    """A non-streamed request of 4,000 tokens (40 s here) whose client leaves after 0.5 s
    stops within a step; the server then answers the next request at once."""
    body = json.dumps({"model": "slow", "prompt": "Hi", "max_tokens": 4000, **extra}).encode()
    with slow_server() as (port, steps, endpoint):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 20
            while len(steps) < 20:
                assert time.monotonic() < deadline, "generation did not start"
                time.sleep(0.05)
        _stops_after_client_left(steps)
        assert not endpoint.lock.locked()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "slow", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ",,,"


def test_a_request_whose_client_already_left_runs_no_forward():
    calls = []
    model = FakeModel(lambda p, g: calls.append(1) or np.zeros(50257, np.float32))
    endpoint = Endpoint({"m": model})
    gone = threading.Event()
    body = b'{"model": "m", "prompt": "Hi", "max_tokens": 5}'
    assert endpoint.handle("POST", "/v1/completions", {}, body, gone=gone).status == 200
    n = len(calls)
    gone.set()
    r = endpoint.handle("POST", "/v1/completions", {}, body, gone=gone)
    assert r.status == 499 and json.loads(r.body)["error"]["code"] == "client_closed_request"
    assert len(calls) == n and n > 0
    streamed = endpoint.handle("POST", "/v1/completions", {}, body[:-1] + b', "stream": true}',
                               gone=gone)           # a stream stops by being closed instead
    assert streamed.status == 200 and b"".join(streamed.stream).endswith(b"data: [DONE]\n\n")


def _without_ids(raw: bytes) -> bytes:
    """SSE bytes without each chunk's `id` and `created` (they differ between requests)."""
    return re.sub(rb'"(id|created)": [^,]*, ', b"", raw)


def _asgi_stream(endpoint, body: bytes, on_frame):
    """Drive create_app(endpoint)'s ASGI app for one streamed POST, without a socket:
    `on_frame(i, frame, leave)` is awaited for each body frame sent (so it can stall the
    "socket"), with the event that makes the client leave. Returns the frames sent."""
    app = create_app(endpoint)
    sent: list[bytes] = []

    async def run():
        leave = asyncio.Event()
        given = False

        async def receive():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("more_body"):
                sent.append(message["body"])
                await on_frame(len(sent) - 1, message["body"], leave)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions",
                 "headers": [(b"content-type", b"application/json")]}
        await app(scope, receive, send)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the app did not return within 20 s"
    return sent


def test_a_stream_runs_at_most_AHEAD_frames_ahead_of_its_socket_and_stops_when_its_client_leaves():
    """The stream's generation runs in a thread of its own (the pump): while the socket
    is stalled on frame 1 it computes no more than AHEAD frames past it, and once the
    client leaves it stops and the app returns."""
    from refcomplete.server import AHEAD
    steps = []

    def model(prompt, generated):
        steps.append(len(generated))
        z = np.zeros(50257, np.float32)
        z[11] = 5.0                      # "," forever
        return z

    endpoint = Endpoint({"m": FakeModel(model, n_ctx=4096)})
    seen = {}

    async def on_frame(i, frame, leave):
        if i == 1:                       # the socket stalls here for 0.5 s, then the client leaves
            await asyncio.sleep(0.5)
            seen["while stalled"] = len(steps)
            leave.set()
            await asyncio.sleep(5)       # cancelled: the watcher sees the client leave

    body = b'{"model": "m", "prompt": "Hi", "max_tokens": 3000, "stream": true}'
    sent = _asgi_stream(endpoint, body, on_frame)
    assert len(sent) == 2
    # frames 0 and 1 sent, AHEAD more computed at most (each one forward), +1: the first
    # frame's forward and the prompt's
    assert 2 <= seen["while stalled"] <= AHEAD + 3, seen
    returned = len(steps)
    assert returned <= seen["while stalled"] + 1, (seen, returned)
    time.sleep(0.3)
    assert len(steps) == returned, "generation went on after the app returned"


def test_a_stream_sends_every_frame_in_order_through_the_pump():
    endpoint = Endpoint({"m": FakeModel(lambda p, g: np.linspace(0, 3, 50257, dtype=np.float32),
                                        n_ctx=4096)})

    async def on_frame(i, frame, leave):
        if i % 7 == 0:
            await asyncio.sleep(0.01)    # an uneven socket: the pump runs ahead, then waits

    body = b'{"model": "m", "prompt": "Hi", "max_tokens": 40, "seed": 3, "stream": true}'
    sent = _asgi_stream(endpoint, body, on_frame)
    direct = endpoint.handle("POST", "/v1/completions", {}, body)
    expected = b"".join(direct.stream)
    assert expected.count(b"data: ") == 41 and expected.endswith(b"data: [DONE]\n\n")
    assert _without_ids(b"".join(sent)) == _without_ids(expected)


def test_serve_loop_flag_picks_the_event_loop_and_changes_no_byte(tiny_dir):
    """`serve --loop asyncio|uvloop`: the process runs that loop (uvloop's extension is
    mapped or not) and streams the same bytes."""
    pytest.importorskip("uvloop")
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 6, "seed": 7, "stream": True,
            "logprobs": 2}
    streamed = {}
    for loop in ("asyncio", "uvloop"):
        with serve_process(f"tiny={tiny_dir}", flags=["--loop", loop]) as srv:
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200
            streamed[loop] = _without_ids(r.content)
            maps = open(f"/proc/{srv.proc.pid}/maps").read()
            assert ("uvloop" in maps) == (loop == "uvloop"), loop
    assert streamed["asyncio"] == streamed["uvloop"] and streamed["uvloop"].endswith(b"[DONE]\n\n")
