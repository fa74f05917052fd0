"""Resource limits (params.Limits): prompt count, prompt length and total work are bounded
by clear 400s naming their param; the defaults are documented and let through everything
that fits a 1024-token GPT-2 context within OpenAI's n and best_of ranges."""

import dataclasses
import time

import pytest

from fakes import FakeModel
from refcomplete import CompletionError
from refcomplete.completions import Completions, Limits
from refcomplete.params import DEFAULT_LIMITS, parse

SMALL = Limits(max_prompts=3, max_prompt_chars=20, max_prompt_tokens=5, max_work_tokens=24)
API = Completions({"m": FakeModel(n_ctx=64)}, limits=SMALL)


def err(api=API, **kw):
    with pytest.raises(CompletionError) as e:
        api.create(**{"model": "m", **kw})
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    assert len(e.value.message) < 400
    return e.value


def test_defaults_are_the_documented_ones_and_frozen():
    assert DEFAULT_LIMITS == Limits(max_prompts=128, max_prompt_chars=131_072,
                                    max_prompt_tokens=131_072, max_work_tokens=65_536)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_prompts = 1
    assert Completions({"m": FakeModel()}).limits is DEFAULT_LIMITS
    for field in dataclasses.fields(Limits):                  # each default is documented
        assert field.name in Limits.__doc__


def test_prompt_list_length():
    e = err(prompt=["a", "b", "c", "d"], max_tokens=1)
    assert e.param == "prompt" and "Too many prompts: 4 given, the limit is 3" in e.message
    e = err(prompt=[[1], [2], [3], [4]], max_tokens=1)
    assert e.param == "prompt" and "limit is 3" in e.message
    assert len(API.create(model="m", prompt=["a", "b", "c"], max_tokens=1)["choices"]) == 3


def test_prompt_length_in_characters_and_token_ids():
    e = err(prompt="x" * 21, max_tokens=1)
    assert e.param == "prompt" and "21 characters is too long: the limit is 20" in e.message
    e = err(prompt=["ok", "y" * 30], max_tokens=1)
    assert "30 characters" in e.message
    e = err(prompt=[1, 2, 3, 4, 5, 6], max_tokens=1)
    assert e.param == "prompt" and "6 token ids is too long: the limit is 5" in e.message
    e = err(prompt=[[1], [1, 2, 3, 4, 5, 6]], max_tokens=1)
    assert "6 token ids" in e.message
    API.create(model="m", prompt="x" * 20, max_tokens=1)
    API.create(model="m", prompt=[1, 2, 3, 4, 5], max_tokens=1)


def test_prompt_limits_come_before_the_model_and_the_tokenizer():
    """A huge prompt is refused by parse() alone: no model lookup, no tokenizing."""
    with pytest.raises(CompletionError) as e:
        parse({"model": "not-loaded", "prompt": "z" * 10**6}, SMALL)
    assert e.value.param == "prompt"
    t = time.perf_counter()
    with pytest.raises(CompletionError):
        Completions({}).create(model="absent", prompt=["a"] * 200)   # default limit: 128
    assert time.perf_counter() - t < 1


def test_total_work_is_prompts_times_best_of_times_max_tokens():
    e = err(prompt=["a", "b"], max_tokens=5, n=3)                      # 2 x 3 x 5 = 30 > 24
    assert e.param == "max_tokens"
    assert "may generate up to 30 tokens (2 prompt(s) x best_of 3 x max_tokens up to 5)" in e.message
    assert "the limit is 24" in e.message
    err(prompt="a", max_tokens=5, n=1, best_of=5)                      # best_of counts: 25
    r = API.create(model="m", prompt=["a", "b"], max_tokens=4, n=3)   # 24: at the limit
    assert len(r["choices"]) == 6
    API.create(model="m", prompt="a", max_tokens=8, n=1, best_of=3)   # 24


def test_work_with_max_tokens_null_counts_up_to_the_context():
    api = Completions({"m": FakeModel(n_ctx=30)}, limits=SMALL)
    e = err(api, prompt="a", max_tokens=None)                         # 1 x 1 x 29 > 24
    assert "up to 29 tokens" in e.message and "up to the context length" in e.message
    err(api, prompt=[1] * 5, max_tokens=None)                         # 30 - 5 = 25 > 24
    loose = Completions({"m": FakeModel(n_ctx=30)},
                        limits=dataclasses.replace(SMALL, max_work_tokens=25))
    r = loose.create(model="m", prompt=[1] * 5, max_tokens=None, temperature=0,
                     logit_bias={"50256": -100})
    assert r["usage"]["completion_tokens"] <= 25


def test_context_length_error_comes_before_the_work_limit():
    """OpenAI's own message wins where it applies."""
    e = err(prompt="a", max_tokens=1000)
    assert "maximum context length is 64 tokens" in e.message


def test_default_work_limit_admits_openai_ranges_on_gpt2_context():
    api = Completions({"m": FakeModel(n_ctx=1024)})
    req = parse({"model": "m", "prompt": "a", "n": 20, "best_of": 20, "max_tokens": None})
    from refcomplete.params import _check_work
    _check_work(req, [1], 1024, DEFAULT_LIMITS)                      # 20 x 1023 = 20460
    _check_work(parse({"model": "m", "prompt": ["a"] * 128, "n": 16, "max_tokens": 32}),
                [1] * 128, 1024, DEFAULT_LIMITS)                     # 128 x 16 x 32 = 65536
    e = err(api, prompt=["a"] * 128, n=16, max_tokens=33)
    assert e.param == "max_tokens" and "the limit is 65536" in e.message
