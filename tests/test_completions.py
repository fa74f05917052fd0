"""create(): the response envelope, SDK types, fingerprint, and the real runtime end to end."""

import json
import re

import pytest

from fakes import FakeModel
from test_streaming import sdk_view

import openai.types as ot
import refcomplete
from refcomplete import CompletionError
from refcomplete.completions import Completions, fingerprint

API = Completions({"m": FakeModel()})

GRID = [dict(), dict(n=3, logprobs=5), dict(echo=True, logprobs=0), dict(best_of=3, n=2),
        dict(prompt=[[1, 2], [3]], logprobs=2, stop=["a", "b"]), dict(temperature=0, trace=True),
        dict(echo=True, max_tokens=0, logprobs=1), dict(top_p=0.5, frequency_penalty=1.2,
                                                         logit_bias={"11": 5}, seed=-3)]


@pytest.mark.parametrize("kw", GRID, ids=range(len(GRID)))
def test_response_shape_validates_with_the_sdk(kw):
    r = API.create(model="m", **{"prompt": "Hi", "max_tokens": 4, **kw})
    assert list(r) == ["id", "object", "created", "model", "system_fingerprint", "choices",
                       "usage"]
    assert re.fullmatch(r"cmpl-[A-Za-z0-9]{24}", r["id"]) and r["object"] == "text_completion"
    assert isinstance(r["created"], int) and r["model"] == "m"
    assert re.fullmatch(r"fp_[0-9a-f]{10}", r["system_fingerprint"])
    for c in r["choices"]:
        assert list(c)[:4] == ["text", "index", "logprobs", "finish_reason"]
    ot.Completion.model_validate(sdk_view(r))
    json.dumps(r, allow_nan=False)


def test_fingerprint_depends_on_weights_version_and_contract(monkeypatch):
    a, b = FakeModel(), FakeModel(weights_sha256="1" * 64)
    assert fingerprint(a) != fingerprint(b) and fingerprint(a) == fingerprint(FakeModel())
    before = fingerprint(a)
    monkeypatch.setattr("refcomplete.completions.__version__", "9.9.9")
    assert fingerprint(a) != before
    before = fingerprint(a)
    monkeypatch.setattr("refcomplete.completions.CONTRACT_VERSION", "999")
    assert fingerprint(a) != before


def test_ids_are_fresh_and_seed_none_is_random():
    a = API.create(model="m", prompt="Hi", max_tokens=8)
    b = API.create(model="m", prompt="Hi", max_tokens=8)
    assert a["id"] != b["id"]
    texts = {API.create(model="m", prompt="Hi", max_tokens=8)["choices"][0]["text"]
             for _ in range(6)}
    assert len(texts) > 1


def test_trace_records_each_step_readably():
    from refcomplete.trace import format_trace
    r = API.create(model="m", prompt="Hi", max_tokens=3, trace=True, seed=4, top_p=0.9,
                   logprobs=0)
    c = r["choices"][0]
    steps = c["trace"]
    assert [s["step"] for s in steps] == list(range(len(c["logprobs"]["tokens"])))
    assert [s["text"] for s in steps] == c["logprobs"]["tokens"]
    for s in steps:
        assert [st["stage"] for st in s["stages"]] == ["raw", "logit_bias", "penalties",
                                                        "temperature", "top_p"]
        assert 0 <= s["coin"] < 1 and all(len(st["top"]) <= 5 for st in s["stages"])
    table = format_trace(steps)
    assert "step 0" in table and "coin" in table and "top_p" in table
    greedy = API.create(model="m", prompt="Hi", max_tokens=1, trace=True, temperature=0)
    assert greedy["choices"][0]["trace"][0]["coin"] is None


def test_public_api_reexports():
    assert refcomplete.create and refcomplete.CompletionError is CompletionError
    assert refcomplete.sampling.STAGES and refcomplete.rng.coin(0, 0, 0) < 1
    assert refcomplete.__version__


def test_real_runtime_end_to_end(tiny_dir):
    """The registry's real GPT-2 runtime behind create(), on a random tiny checkpoint."""
    api = Completions()
    name = str(tiny_dir)
    r = api.create(model=name, prompt="Hello", max_tokens=5, n=2, logprobs=2, seed=1)
    assert len(r["choices"]) == 2 and r["usage"]["completion_tokens"] <= 10
    alone = api.create(model=name, prompt="Hello", max_tokens=5, n=1, logprobs=2, seed=1)
    assert alone["choices"][0] == r["choices"][0]                   # SEMANTICS 4
    with pytest.raises(CompletionError) as e:
        api.create(model=name, prompt="Hello", max_tokens=64)
    assert "maximum context length is 64 tokens" in e.value.message
    echo = api.create(model=name, prompt="Hello there", echo=True, max_tokens=0, logprobs=1)
    assert echo["choices"][0]["logprobs"]["token_logprobs"][0] is None
