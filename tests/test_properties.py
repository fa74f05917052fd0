"""Properties over a grid of requests (hypothesis, fake models, modest example counts)."""

import json
import os
import subprocess
import sys

from hypothesis import HealthCheck, example, given, settings, strategies as st

from fakes import TOK, FakeModel
from refcomplete.completions import Completions
from refcomplete.streaming import fold

API = Completions({"m": FakeModel()})
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

prompts = st.sampled_from(["Hi", "a b", "The", "x\u2019", "!!"])
requests = st.fixed_dictionaries({
    "prompt": prompts,
    "max_tokens": st.integers(1, 8),
    "seed": st.integers(-2**63, 2**63 - 1),
}, optional={
    "temperature": st.sampled_from([0, 0.5, 1.0, 1.7]),
    "top_p": st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    "presence_penalty": st.sampled_from([-1.0, 0.0, 1.5]),
    "frequency_penalty": st.sampled_from([0.0, 0.7]),
    "logprobs": st.integers(0, 6),
    "echo": st.booleans(),
    "stop": st.one_of(st.sampled_from(["a", " b", ".", "\u2019", "x!"]),
                      st.lists(st.sampled_from(["a", " b", "ab", "\n", "x"]), min_size=1,
                               max_size=4)),
    "logit_bias": st.dictionaries(st.sampled_from(["11", "64", "50256"]),
                                  st.sampled_from([-100, -3, 4])),
    "logprobs_mode": st.sampled_from(["raw", "processed"]),
})


def strip(r):
    return {k: v for k, v in r.items() if k not in ("id", "created")}


@SETTINGS
@given(requests, st.integers(1, 3))
def test_fold_of_stream_equals_response(req, n):
    whole = API.create(model="m", n=n, **req)
    chunks = list(API.create(model="m", n=n, stream=True,
                             stream_options={"include_usage": True}, **req))
    assert strip(fold(chunks)) == strip(whole)


@SETTINGS
@given(requests)
def test_prompt_alone_equals_prompt_in_a_list(req):
    alone = API.create(model="m", **req)["choices"][0]
    listed = API.create(model="m", **{**req, "prompt": ["zz", req["prompt"], "q"]})["choices"]
    assert {**listed[1], "index": 0} == alone


@SETTINGS
@given(requests)
def test_candidate_j_is_the_same_for_any_n(req):
    one = API.create(model="m", n=1, **req)["choices"]
    four = API.create(model="m", n=4, **req)["choices"]
    assert four[0] == one[0]
    three = API.create(model="m", n=3, **req)["choices"]
    assert three == four[:3]


@SETTINGS
@given(requests)
def test_stream_never_shows_a_stop_prefix_it_later_cuts(req):
    final = API.create(model="m", **req)["choices"][0]["text"]
    shown = ""
    for chunk in API.create(model="m", stream=True, **req):
        shown += chunk["choices"][0]["text"]
        assert final.startswith(shown)
    assert shown == final
    stops = req.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    generated = final[len(TOK.decode(TOK.encode(req["prompt"]))):] if req.get("echo") else final
    assert not any(s in generated for s in stops)


@SETTINGS
@given(requests.filter(lambda r: r.get("logprobs") is not None))
@example({"prompt": "Hi", "max_tokens": 5, "seed": -15873885, "temperature": 1.7, "top_p": 0.3,
          "logprobs": 0})   # a token broke an unfinished character: its U+FFFD is the earlier token's
def test_logprobs_are_consistent_and_offsets_point_at_tokens(req):
    r = API.create(model="m", **req)
    c = r["choices"][0]
    lp = c["logprobs"]
    prompt_text = TOK.decode(TOK.encode(req["prompt"]))
    full = c["text"] if req.get("echo") else prompt_text + c["text"]
    n = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    if lp["top_logprobs"] is not None:
        for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert top is None and v is None or top[t] == v and list(top)[0] == t
            assert top is None or len(top) <= min(req["logprobs"], 5) + 1
    assert lp["text_offset"] == sorted(lp["text_offset"])
    for t, off in zip(lp["tokens"], lp["text_offset"]):
        assert 0 <= off <= len(full)
        if not t.startswith("bytes:") and t != "<|endoftext|>" and off + len(t) <= len(full):
            assert full[off: off + len(t)] == t        # the offset points at the token's text
    if not req.get("echo"):
        assert lp["text_offset"][0] == len(prompt_text)


@SETTINGS
@given(requests, st.integers(-2**63, 2**63 - 1))
def test_greedy_ignores_the_seed(req, other):
    req = {**req, "temperature": 0}
    assert strip(API.create(model="m", **req)) == strip(API.create(model="m", **{**req, "seed": other}))


REQUEST = {"prompt": ["Hi", "Yo"], "max_tokens": 6, "n": 2, "seed": 123, "logprobs": 3,
           "top_p": 0.9, "temperature": 0.8, "stop": "a", "echo": True}
SCRIPT = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from fakes import FakeModel
from refcomplete.completions import Completions
r = Completions({{"m": FakeModel()}}).create(model="m", **{REQUEST!r})
del r["id"], r["created"]
print(json.dumps(r))
"""


def test_same_seed_same_json_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    here = strip(API.create(model="m", **REQUEST))
    assert out.stdout.strip() == json.dumps(here)
