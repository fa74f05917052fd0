"""Request fuzzing: arbitrary JSON-like bodies through create() end in a response the
`openai` SDK's types accept, or in an OpenAI-shaped CompletionError with the right
status; never another exception, never a hang.

Bodies mix per-field plausible values (to reach generation) with arbitrary JSON values:
wrong types, bools for numbers, NaN and infinities, huge and negative integers (past
int64 and past Python's 4300-digit str limit), subnormal floats, unicode with control
characters and lone surrogates, deep nesting (up to 5000 levels), huge lists, unknown
keys. Model names are the fast fake ("m"), the bundled model and the registry (paths,
hub ids, "~user", over-long names).

Example counts: REFCOMPLETE_FUZZ_EXAMPLES (default 2000: the CI run). A long run:
    REFCOMPLETE_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q tests/test_fuzz.py -k fuzz_create
Figures and the bugs this found: docs/reliability.md.
"""

import json
import math
import os
import time

import openai.types as ot
from hypothesis import HealthCheck, given, settings, strategies as st
from openai.types.shared import ErrorObject

from fakes import FakeModel
from test_streaming import sdk_view
from refcomplete import CompletionError
from refcomplete.completions import Completions, Limits, registry_loader
from refcomplete.params import KNOWN

EXAMPLES = int(os.environ.get("REFCOMPLETE_FUZZ_EXAMPLES", "2000"))
settings.register_profile("refcomplete-fuzz", max_examples=EXAMPLES, deadline=None,
                          print_blob=True, suppress_health_check=list(HealthCheck))
FUZZ = settings.get_profile("refcomplete-fuzz")
HANG_S = 30.0   # one request; the slowest accepted request takes well under a second

BUNDLED = "gpt2-tiny-shakespeare"
FAKE = FakeModel(n_ctx=24)                       # a small context bounds every request's work
LIMITS = Limits(max_prompts=6, max_prompt_chars=2000, max_prompt_tokens=64,
                max_work_tokens=64)


def loader(name):
    return FAKE if name == "m" else registry_loader(name)


API = Completions(loader, limits=LIMITS)
SERVED = {"m", BUNDLED}

# -- values ------------------------------------------------------------------------------

chars = st.characters(exclude_categories=())         # every code point, surrogates included
texts = st.one_of(st.text(chars, max_size=12), st.text(max_size=40),
                  st.sampled_from(["", " ", "\x00", "\n", "\ud800", "\U0001F600", "’", "<|endoftext|>",
                                   "a" * 3000, "é" * 500]))
ints = st.one_of(st.integers(-3, 40), st.integers(), st.sampled_from(
    [2**31, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 10**100, -10**100, 50256, 50257]),
    st.sampled_from([1, -1]).map(lambda sign: sign * 10**5000))   # past str()'s 4300 digits
floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e308, math.nan,
                                                 math.inf, -math.inf, 0.5, 2.0000000001]))
leaves = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(texts, kids, max_size=4)), max_leaves=12)


def nest(depth_and_dict):
    depth, as_dict = depth_and_dict
    x = 1
    for _ in range(depth):
        x = {"a": x} if as_dict else [x]
    return x


deep = st.tuples(st.integers(50, 5000), st.booleans()).map(nest)
huge = st.sampled_from(["lists", "strs", "nested", "dict", "text"]).map(lambda k: {
    "lists": [7] * 100_000, "strs": ["a"] * 20_000, "nested": [[1, 2]] * 10_000,
    "dict": {str(i): 1 for i in range(20_000)}, "text": "ab " * 200_000}[k])
anything = st.one_of(json_values, json_values, json_values, deep, huge)

ids = st.one_of(st.integers(0, 50256), st.integers(-2, 50300))
PLAUSIBLE = {
    "model": st.sampled_from(["m", "m", "m", "m", BUNDLED, "no-such-model", "", "gpt2", "~nobody/x",
                              "x" * 300, "/", "./weights", "openai-community/gpt2"]),
    "prompt": st.one_of(texts, st.lists(texts, min_size=0, max_size=7),
                        st.lists(ids, max_size=10), st.lists(st.lists(ids, max_size=6), max_size=4)),
    "max_tokens": st.one_of(st.none(), st.integers(-2, 30)),
    "temperature": st.one_of(st.floats(-0.5, 2.5), st.sampled_from([0, 1, 2, 1e-300, 5e-324])),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, 1e-300])),
    "n": st.integers(-1, 6), "best_of": st.integers(-1, 7),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "logprobs": st.integers(-1, 8), "echo": st.booleans(),
    "stop": st.one_of(texts, st.lists(texts, max_size=5)),
    "presence_penalty": st.floats(-2.5, 2.5), "frequency_penalty": st.floats(-2.5, 2.5),
    "logit_bias": st.dictionaries(st.one_of(ids.map(str), texts), st.one_of(
        st.floats(-150, 150), st.integers(-150, 150)), max_size=4),
    "seed": ints, "suffix": st.one_of(st.none(), texts), "user": texts,
    "logprobs_mode": st.sampled_from(["raw", "processed", "x"]), "trace": st.booleans(),
}
field_value = {k: st.one_of(v, v, v, anything) for k, v in PLAUSIBLE.items()}
short_texts = st.text(chars, min_size=1, max_size=8)
VALID = {   # within every rule, so that generation is reached
    "prompt": st.one_of(short_texts, st.lists(short_texts, min_size=1, max_size=3),
                        st.lists(st.integers(0, 50256), min_size=1, max_size=6)),
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "n": st.integers(1, 2), "logprobs": st.integers(0, 5),
    "echo": st.booleans(), "stop": st.one_of(short_texts, st.lists(short_texts, min_size=1,
                                                                   max_size=4)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 50256).map(str), st.floats(-100, 100),
                                  max_size=3),
    "seed": st.integers(-2**63, 2**63 - 1), "user": texts,
    "logprobs_mode": st.sampled_from(["raw", "processed"]), "trace": st.booleans(),
    "stream": st.booleans(), "suffix": st.none(),
}
valid_requests = st.fixed_dictionaries({"model": st.sampled_from(["m"] * 9 + [BUNDLED])},
                                       optional=VALID).map(
    lambda r: {**r, "stream_options": {"include_usage": True}} if r.get("stream") else r)


@st.composite
def mutated(draw):
    """A valid request with one or two fields replaced by plausible or arbitrary values."""
    r = dict(draw(valid_requests))
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(PLAUSIBLE)))
        r[key] = draw(field_value[key])
    return r


requests = st.one_of(
    valid_requests, mutated(), mutated(),
    st.fixed_dictionaries({"model": field_value["model"]},
                          optional={k: v for k, v in field_value.items() if k != "model"}),
    st.fixed_dictionaries({"model": PLAUSIBLE["model"], "prompt": PLAUSIBLE["prompt"]},
                          optional={"max_tokens": PLAUSIBLE["max_tokens"],
                                    "stream": PLAUSIBLE["stream"]}),
    st.dictionaries(st.one_of(st.sampled_from(sorted(KNOWN)), texts), anything, max_size=5),
).flatmap(lambda r: st.one_of(st.just(r), st.dictionaries(
    texts.filter(lambda k: k not in KNOWN), anything, min_size=1, max_size=2).map(
        lambda extra: {**r, **extra})))

# -- checks -------------------------------------------------------------------------------


def check_error(request: dict, e: CompletionError) -> None:
    body = e.to_dict()
    json.dumps(body, allow_nan=False)
    err = ErrorObject.model_validate(body["error"])
    assert isinstance(err.message, str) and 0 < len(err.message) <= 1000, err.message[:200]
    unknown = [k for k in request if k not in KNOWN]
    if unknown:                                          # the first rule of parse()
        assert (e.status, e.type, e.param) == (400, "invalid_request_error", unknown[0]), e
    elif e.status == 404:
        assert (e.type, e.code, e.param) == ("invalid_request_error", "model_not_found", "model")
        assert request.get("model") not in SERVED
    else:
        assert (e.status, e.type) == (400, "invalid_request_error"), repr(e)
        assert e.param is None or e.param in KNOWN | {"include_usage"}, e.param


def check_response(request: dict, r: dict) -> None:
    json.dumps(r, allow_nan=False)
    ot.Completion.model_validate(sdk_view(r))
    n = request.get("n") or 1
    prompt = request.get("prompt")
    prompts = 1 if not isinstance(prompt, list) or isinstance(prompt[0], int) else len(prompt)
    assert [c["index"] for c in r["choices"]] == list(range(prompts * n))
    assert r["usage"]["completion_tokens"] <= LIMITS.max_work_tokens


def check_stream(request: dict, chunks) -> None:
    seen = []
    for chunk in chunks:
        json.dumps(chunk, allow_nan=False)
        ot.Completion.model_validate(sdk_view(chunk))
        seen.append(chunk)
    assert seen and all(c["id"] == seen[0]["id"] for c in seen)
    if (request.get("stream_options") or {}).get("include_usage"):
        assert seen[-1]["choices"] == [] and seen[-1]["usage"]["total_tokens"] >= 1


def run(api: Completions, request: dict) -> str:
    t = time.perf_counter()
    try:
        result = api.create(**request)
        if request.get("stream") is True:
            check_stream(request, result)
            outcome = "stream"
        else:
            check_response(request, result)
            outcome = "ok"
    except CompletionError as e:
        check_error(request, e)
        outcome = str(e.status)
    assert time.perf_counter() - t < HANG_S, ("slow", request)
    return outcome


@FUZZ
@given(requests)
def test_fuzz_create(request):
    run(API, request)


def test_fuzz_reaches_both_outcomes():
    """The generator is not all errors: a fixed sample of it, by outcome."""
    seen = {}

    @settings(FUZZ, max_examples=150, database=None)
    @given(requests)
    def sample(request):
        out = run(API, request)
        seen[out] = seen.get(out, 0) + 1

    sample()
    assert seen.get("400", 0) > 15 and seen.get("ok", 0) + seen.get("stream", 0) > 15, seen


# -- regressions the fuzzing found (each escaped create() as another exception) -----------

def test_regressions_found_by_fuzzing():
    deep_list = nest((100_000, False))
    cases = [
        {"prompt": "x", "logit_bias": {"1": deep_list}},                  # RecursionError
        {"prompt": "x", "user": deep_list}, {"prompt": "x", "logprobs_mode": deep_list},
        {"prompt": "x", "logit_bias": {"1" * 5000: 1}},                   # int() digit limit
        {"prompt": "x", "logit_bias": {"1": 10**400}},                    # OverflowError
        {"prompt": "x", "n": 10**5000}, {"prompt": "x", "temperature": -10**5000},
        {"prompt": "x", "max_tokens": 10**5000},                          # str() digit limit
        {"prompt": [10**5000]}, {"model": "~nosuchuser/x"},               # expanduser
        {"model": "a" * 5000}, {"model": "a/" + "b" * 300},               # ENAMETOOLONG
    ]
    for extra in cases:
        assert run(API, {"model": "m", **extra}) in ("400", "404")
    for t in (5e-324, 2.2250738585e-313, 1e-300):                     # inf - inf in softmax
        for extra in ({}, {"top_p": 0.5}, {"trace": True, "logprobs": 5,
                                           "logprobs_mode": "processed"}):
            assert run(API, {"model": "m", "prompt": "Hi", "max_tokens": 3, "seed": 1,
                             "temperature": t, **extra}) == "ok"
