"""`openai_client(model=...)`: an `openai.OpenAI` client that calls refcomplete in-process.

Knows: httpx transports and how the `openai` package is configured. Does not know: HTTP
semantics (server.Endpoint answers every request, exactly as `refcomplete serve` does)
or completion rules. No server, no socket, no network: for testing OpenAI-client code
offline.

    >>> client = refcomplete.openai_client(model="gpt2-tiny-shakespeare")
    >>> r = client.completions.create(model="gpt2-tiny-shakespeare", prompt="ROMEO:",
    ...                               max_tokens=5, temperature=0)
    >>> r.choices[0].finish_reason
    'length'
    >>> for chunk in client.completions.create(model="gpt2-tiny-shakespeare",
    ...                                        prompt="ROMEO:", stream=True):
    ...     print(chunk.choices[0].text, end="")

Bad requests raise the SDK's own exceptions (`openai.BadRequestError`, status 400, with
OpenAI's error body), because they travel as real HTTP responses through the SDK.
"""

from __future__ import annotations

from typing import Iterable

import httpx

from refcomplete.server import Endpoint

BASE_URL = "http://refcomplete.invalid/v1"   # never resolved: the transport answers


class _FrameStream(httpx.SyncByteStream):
    def __init__(self, frames):
        self._frames = frames

    def __iter__(self):
        yield from self._frames

    def close(self) -> None:
        close = getattr(self._frames, "close", None)
        if close is not None:
            close()   # a client that stops reading stops the generation


class EndpointTransport(httpx.BaseTransport):
    """An httpx transport that answers requests with a server.Endpoint, in this thread."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        resp = self.endpoint.handle(request.method, request.url.path, headers, body)
        if resp.stream is None:
            return httpx.Response(resp.status, headers=resp.headers, content=resp.body,
                                  request=request)
        return httpx.Response(resp.status, headers=resp.headers,
                              stream=_FrameStream(resp.stream), request=request)


class AsyncEndpointTransport(httpx.AsyncBaseTransport):
    """The async twin: each blocking step runs in a worker thread."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import anyio

        body = await request.aread()
        headers = {k.lower(): v for k, v in request.headers.items()}
        resp = await anyio.to_thread.run_sync(self.endpoint.handle, request.method,
                                              request.url.path, headers, body)
        if resp.stream is None:
            return httpx.Response(resp.status, headers=resp.headers, content=resp.body,
                                  request=request)
        return httpx.Response(resp.status, headers=resp.headers,
                              stream=_AsyncFrameStream(resp.stream), request=request)


class _AsyncFrameStream(httpx.AsyncByteStream):
    def __init__(self, frames):
        self._frames = frames

    async def __aiter__(self):
        import anyio

        done = object()
        while True:
            frame = await anyio.to_thread.run_sync(next, self._frames, done)
            if frame is done:
                return
            yield frame

    async def aclose(self) -> None:
        self._frames.close()


def _endpoint(model, models) -> Endpoint:
    """Endpoint over `models` (name -> loaded model), or over `model` (a name, or a model)."""
    if models is not None:
        return Endpoint(models)
    names = [model] if isinstance(model, str) or not isinstance(model, Iterable) else list(model)
    loaded = {}
    for m in names:
        if isinstance(m, str):
            from refcomplete.registry import load_model

            loaded[m] = load_model(m)
        else:
            loaded[m.name] = m
    return Endpoint(loaded)


def openai_client(model="gpt2-tiny-shakespeare", *, models=None, **kwargs):
    """An `openai.OpenAI` client served in-process by refcomplete.

    model: a model name (loaded through the registry, now), a loaded model (served under
    its `.name`), or a list of either. models: a mapping name -> loaded model instead.
    kwargs go to `openai.OpenAI` (e.g. max_retries).
    """
    import openai

    transport = EndpointTransport(_endpoint(model, models))
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(api_key=kwargs.pop("api_key", "refcomplete"), base_url=BASE_URL,
                         http_client=httpx.Client(transport=transport), **kwargs)


def async_openai_client(model="gpt2-tiny-shakespeare", *, models=None, **kwargs):
    """An `openai.AsyncOpenAI` client served in-process by refcomplete (see openai_client)."""
    import openai

    transport = AsyncEndpointTransport(_endpoint(model, models))
    kwargs.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(api_key=kwargs.pop("api_key", "refcomplete"), base_url=BASE_URL,
                              http_client=httpx.AsyncClient(transport=transport), **kwargs)
