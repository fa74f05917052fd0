"""Streaming is the primitive: chunk shapes, include_usage, SSE, the fold (SEMANTICS 10)."""

import json

import openai.types as ot
import pytest

from fakes import FakeModel, scripted_text
from refcomplete.completions import Completions
from refcomplete.streaming import fold, sse

API = Completions({"m": FakeModel(), "s": scripted_text("Hello world, it\u2019s me. STOP")})


def stream(**kw):
    return list(API.create(model="m", stream=True, **{"prompt": "Hi", "max_tokens": 6,
                                                        "seed": 2, **kw}))


def test_chunks_share_the_envelope_and_carry_one_choice_delta():
    chunks = stream(n=2, logprobs=1)
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "text_completion" and len(c["choices"]) == 1 and "usage" not in c
        assert set(c["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert all(d["finish_reason"] is None for d in mine[:-1]) and mine[-1]["finish_reason"]


def test_include_usage_adds_a_final_usage_chunk_and_nulls():
    chunks = stream(stream_options={"include_usage": True})
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 1
    assert stream(stream_options={"include_usage": False})[-1]["choices"]


def test_fold_equals_the_non_streamed_response():
    kw = dict(prompt=["Hi", "Yo"], n=2, logprobs=2, echo=True, stop=["a", " b"], seed=5)
    folded = fold(stream(**kw, stream_options={"include_usage": True}))
    whole = API.create(model="m", max_tokens=6, **kw)
    for r in (folded, whole):
        r.pop("id"), r.pop("created")
    assert folded == whole


def test_stream_holds_back_stop_prefixes():
    chunks = list(API.create(model="s", prompt="x", max_tokens=20, temperature=0,
                             stream=True, stop=" STOP"))
    texts = [c["choices"][0]["text"] for c in chunks]
    final, shown = "Hello world, it\u2019s me.", ""
    for t in texts:
        shown += t
        assert final.startswith(shown)            # never a character the text will lose
    assert shown == final
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def sdk_view(response: dict) -> dict:
    """What the SDK's types accept: they type `finish_reason` non-null (stream chunks have
    null) and token_logprobs/top_logprobs entries non-null (an echo's first token has
    null, as OpenAI's own captured responses do), so those two are filled in."""
    response = json.loads(json.dumps(response))
    for ch in response["choices"]:
        ch["finish_reason"] = ch["finish_reason"] or "stop"
        lp = ch["logprobs"]
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0] = 0.0
            if lp["top_logprobs"]:
                lp["top_logprobs"][0] = {}
    return response


@pytest.mark.parametrize("echo", [False, True])
def test_every_chunk_validates_with_the_openai_sdk(echo):
    for c in stream(n=2, logprobs=3, echo=echo, stream_options={"include_usage": True}):
        ot.Completion.model_validate(sdk_view(c))


def test_sse_framing():
    frames = list(sse(stream(max_tokens=1)))
    assert frames[-1] == b"data: [DONE]\n\n"
    assert all(f.startswith(b"data: {") and f.endswith(b"}\n\n") for f in frames[:-1])


def test_stream_with_best_of_equal_n_is_allowed():
    assert stream(n=2, best_of=2)
