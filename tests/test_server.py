"""`refcomplete serve`: a real server process on 127.0.0.1, driven by the official `openai`
package (sync and async, streamed and not), raw HTTP for the error matrix, and an
in-process uvicorn with a slow fake model for client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from fakes import FakeModel
from refcomplete.completions import Completions
from refcomplete.server import Endpoint, create_app

KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(*models: str, api_key: str | None = None, timeout: float = 90.0):
    """Start `refcomplete serve` in a subprocess on a free port; yield its base URL; always
    kill it. A start that fails (e.g. the port was taken meanwhile) is retried once."""
    for attempt in range(2):
        try:
            cm = _server_process(models, api_key, timeout)
            url = cm.__enter__()
            break
        except RuntimeError:
            if attempt:
                raise
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


@contextlib.contextmanager
def _server_process(models, api_key, timeout):
    port = free_port()
    argv = [sys.executable, "-m", "refcomplete.cli", "serve", "--port", str(port),
            "--log-level", "warning", *[a for m in models for a in ("--model", m)],
            *(["--api-key", api_key] if api_key else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited: " + proc.stdout.read().decode(errors="replace"))
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {port} not ready after {timeout}s")
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


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


def test_client_disconnect_stops_generation():
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
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                          json={"model": "slow", "prompt": "Hi", "max_tokens": 4000,
                                "stream": True}) as r:
            it = r.iter_lines()
            got = [line for line, _ in zip(it, range(6))]
            assert got[0].startswith("data: ")
        time.sleep(1.0)
        n = len(steps)
        time.sleep(1.0)
        assert len(steps) == n < 1000, "generation went on after the client left"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
