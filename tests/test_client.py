"""openai_client(): the official SDK, answered in-process by the server's own Endpoint."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest

from fakes import FakeModel
from refcomplete.client import async_openai_client, openai_client
from refcomplete.completions import Completions

MODEL = FakeModel()
REQ = dict(model="fake", prompt=["Hi", "Ho"], max_tokens=5, n=2, logprobs=2, seed=7,
           stop=["a"], echo=True)


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("openai_client opened a socket")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("id", "created")}


def test_completion_equals_create():
    client = openai_client(MODEL)
    r = client.completions.create(**REQ)
    assert isinstance(r, openai.types.Completion)
    assert strip(r.model_dump(exclude_unset=True)) == strip(Completions({"fake": MODEL}).create(**REQ))


def test_stream_and_usage():
    client = openai_client(models={"fake": MODEL})
    chunks = list(client.completions.create(**REQ, stream=True,
                                            stream_options={"include_usage": True}))
    expected = Completions({"fake": MODEL}).create(**REQ)
    text = {}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + ch.text
    assert text == {c["index"]: c["text"] for c in expected["choices"]}
    assert chunks[-1].usage.total_tokens == expected["usage"]["total_tokens"]


def test_errors_are_sdk_exceptions():
    client = openai_client(MODEL)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake", prompt="x", best_of=1, n=2)
    assert e.value.body["param"] == "best_of" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    assert [m.id for m in client.models.list()] == ["fake"]


def test_closing_a_stream_stops_generation():
    model = FakeModel()
    client = openai_client(model)
    stream = client.completions.create(model="fake", prompt="Hi", max_tokens=500, stream=True,
                                       logprobs=0)
    next(iter(stream))
    stream.close()
    calls = len(model.calls)
    assert calls < 50


def test_async_client():
    async def go():
        client = async_openai_client(MODEL)
        r = await client.completions.create(model="fake", prompt="Hi", max_tokens=4, seed=1)
        s = await client.completions.create(model="fake", prompt="Hi", max_tokens=4, seed=1,
                                            stream=True)
        text = "".join([c.choices[0].text async for c in s if c.choices])
        return r.choices[0].text, text
    a, b = asyncio.run(go())
    assert a == b



def test_lazy_reexport():
    import refcomplete
    client = refcomplete.openai_client(MODEL)
    assert client.completions.create(model="fake", prompt="Hi", max_tokens=2).choices
