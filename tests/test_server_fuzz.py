"""Request fuzzing through the server: arbitrary bodies end in a valid completion or an
OpenAI error body with the right status; never a 500, an exception or a hang.

Two drivers over one strategy: `Endpoint.handle` in-process for volume (FUZZ_EXAMPLES,
2,000 by default; REFCOMPLETE_FUZZ_EXAMPLES overrides), and a smaller sample POSTed to
a real `refcomplete serve` process. Bodies: requests with plausible and absurd values for
every parameter (wrong types, bools for numbers, NaN and infinities, huge and negative
numbers, unicode and control characters, lone surrogates), arbitrary JSON values, deep
nesting, huge lists and strings, truncated or corrupted JSON, random bytes, bodies over
the size limit. Work is bounded by the server's Limits, so every example ends quickly.
"""

from __future__ import annotations

import json
import os
import re
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from fakes import FakeModel
from refcomplete.completions import Completions
from refcomplete.errors import CompletionError
from refcomplete.params import KNOWN, Limits
from refcomplete.server import Endpoint

FUZZ_EXAMPLES = int(os.environ.get("REFCOMPLETE_FUZZ_EXAMPLES", "2000"))
SERVER_EXAMPLES = max(FUZZ_EXAMPLES // 12, 50)
LIMITS = Limits(max_prompts=16, max_prompt_chars=4096, max_prompt_tokens=4096,
                max_work_tokens=64)
MAX_BODY = 256 * 1024
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)

# -- the strategy ------------------------------------------------------------------------

chars = st.one_of(st.characters(), st.characters(max_codepoint=31),          # control chars
                  st.characters(categories=["Cs"]),                         # lone surrogates
                  st.sampled_from(["\u2019", "é", "\U0001f600", "\x00"]))
text = st.one_of(st.text(chars, max_size=12), st.sampled_from(["<|endoftext|>", "a<|endoftext|>"]))
huge_ints = st.sampled_from([2**63, -2**63 - 1, 2**64, 10**400, -(10**4000), 2**31])
numbers = st.one_of(st.integers(), huge_ints, st.floats(), st.booleans(),
                    st.sampled_from([0, -0.0, 1e-320, 1e308, float("inf"), float("-inf"),
                                     float("nan")]))
leaves = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.floats(), text)
json_values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)


def big(value, size):   # a huge list or string without making hypothesis build it
    return st.builds(lambda v, n: v * n, value, size)


token_ids = st.integers(-2, 50300)
prompts = st.one_of(
    text, st.lists(text, max_size=5), st.lists(token_ids, max_size=6),
    st.lists(st.lists(token_ids, max_size=4), max_size=4),
    st.sampled_from(["Hi", "ROMEO:", "", [], [[]], [""], ["a", 1], [50256], [[1], ["x"]]]),
    big(st.sampled_from(["a", "é", "\U0001f600"]), st.integers(0, 200_000)),
    big(st.sampled_from([[1], ["ab"], [[5, 6]]]), st.integers(0, 60_000)))
PLAUSIBLE = {
    "model": st.sampled_from(["fake", "tiny", "gpt2", "gpt2-tiny-shakespeare", "../tiny",
                              "/etc/passwd", "", "fake\x00", "FAKE", " fake"]),
    "prompt": prompts,
    "max_tokens": st.one_of(st.integers(0, 6), st.integers(-3, 10**6)),
    "temperature": numbers, "top_p": numbers,
    "presence_penalty": numbers, "frequency_penalty": numbers,
    "n": st.integers(-1, 25), "best_of": st.integers(-1, 25),
    "logprobs": st.integers(-1, 7),
    "echo": st.booleans(), "stream": st.booleans(), "trace": st.booleans(),
    "stop": st.one_of(text, st.lists(text, max_size=6)),
    "logit_bias": st.dictionaries(st.one_of(st.sampled_from(["11", "50256", "-1", "0x10",
                                                             "99999", " 5", "007"]), text),
                                  numbers, max_size=4),
    "seed": st.one_of(st.integers(), huge_ints),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                st.dictionaries(text, json_values, max_size=2)),
    "suffix": st.one_of(st.none(), text),
    "user": text,
    "logprobs_mode": st.sampled_from(["raw", "processed", "RAW", ""]),
}


small_text = st.text(chars, min_size=1, max_size=8)
VALID = {   # values within the rules, so that many requests get through to generation
    "prompt": st.one_of(st.sampled_from(["Hi", "ROMEO:", "a b", "x\u2019", "<|endoftext|>"]),
                        small_text, st.lists(small_text, min_size=1, max_size=3),
                        st.lists(st.integers(0, 50256), min_size=1, max_size=5),
                        st.lists(st.lists(st.integers(0, 50256), min_size=1, max_size=3),
                                 min_size=1, max_size=3)),
    "temperature": st.one_of(st.just(0), st.floats(0, 2)), "top_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "n": st.integers(1, 2), "best_of": st.integers(1, 3), "logprobs": st.integers(0, 5),
    "echo": st.booleans(), "stream": st.booleans(), "trace": st.booleans(),
    "stop": st.one_of(small_text, st.lists(small_text, min_size=1, max_size=4)),
    "logit_bias": st.dictionaries(st.sampled_from(["11", "0", "50256", "198"]),
                                  st.floats(-100, 100), max_size=3),
    "seed": st.integers(-2**63, 2**63 - 1), "user": text,
    "logprobs_mode": st.sampled_from(["raw", "processed"]),
}


rarely = st.sampled_from([False] * 7 + [True] + [False] * 7)   # hypothesis favours the ends


@st.composite
def requests(draw):
    """A request within the rules, then 0 to 3 parameters set to something plausible or
    absurd (any JSON value), sometimes the model dropped or an unknown key added."""
    req = {"model": draw(st.sampled_from(["fake", "tiny"])), "prompt": draw(VALID["prompt"]),
           "max_tokens": draw(st.integers(1, 4)), "stream": draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=5)):
        req[name] = draw(VALID[name])
    if req.get("stream") and draw(st.booleans()):
        req["stream_options"] = {"include_usage": draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(sorted(KNOWN)), unique=True, max_size=3)):
        req[name] = draw(st.one_of(PLAUSIBLE[name], json_values, numbers))
    if draw(rarely):
        del req["model"]
    if draw(rarely):
        req[draw(text)] = draw(json_values)            # an unknown (or empty) key
    return req


def encode(obj, ascii_only: bool, inf_as_number: bool) -> bytes:
    """JSON bytes; Python writes NaN/Infinity (not JSON): sometimes spell inf as 1e999."""
    raw = json.dumps(obj, ensure_ascii=ascii_only)
    if inf_as_number:
        raw = re.sub(r"-?Infinity", lambda m: m.group().replace("Infinity", "1e999"), raw)
    return raw.encode("utf-8", "surrogatepass")


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["request"] * 8 + ["mangled", "value", "bytes", "deep",
                                                   "oversized", "digits"]))
    if kind == "request":
        return encode(draw(requests()), draw(st.booleans()), draw(st.booleans()))
    if kind == "mangled":   # truncated, or one byte changed
        raw = encode(draw(requests()), True, False)
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        return raw[:i] if draw(st.booleans()) else raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    if kind == "value":
        return encode(draw(json_values), draw(st.booleans()), draw(st.booleans()))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth * draw(st.integers(0, 1))
        return ('{"model": "fake", "max_tokens": 1, "prompt": ' + inner + "}").encode()
    if kind == "oversized":
        return b'{"model": "fake", "prompt": "' + b"a" * (MAX_BODY + draw(st.integers(1, 99))) + b'"}'
    return b'{"model": "fake", "max_tokens": ' + b"9" * draw(st.integers(4000, 6000)) + b"}"


# -- what every answer must be ------------------------------------------------------------

def check_error(status: int, body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert err["type"] == "invalid_request_error", (status, err)
    assert len(body) < 2000, "an error message echoed too much of the request"
    return err


def validate(completion: dict) -> None:
    """openai.types.Completion, allowing the nulls that OpenAI's own answers have and the
    SDK's types omit: the first echoed prompt token's logprob and top_logprobs entry
    (SEMANTICS 6), finish_reason before a streamed choice's last chunk."""
    completion = json.loads(json.dumps(completion))
    for choice in completion["choices"]:
        assert choice["finish_reason"] in (None, "stop", "length"), choice
        choice["finish_reason"] = choice["finish_reason"] or "length"
        lp = choice["logprobs"]
        if lp is not None:
            assert None not in lp["token_logprobs"][1:] and None not in (lp["top_logprobs"] or [0])[1:]
            lp["token_logprobs"] = [0.0 if v is None else v for v in lp["token_logprobs"]]
            lp["top_logprobs"] = lp["top_logprobs"] and [t or {} for t in lp["top_logprobs"]]
    openai.types.Completion.model_validate(completion)


def check_stream(frames: bytes) -> None:
    parts = frames.split(b"\n\n")
    assert parts[-2:] == [b"data: [DONE]", b""], parts[-3:]
    for part in parts[:-2]:
        assert part.startswith(b"data: "), part[:80]
        chunk = json.loads(part[6:])
        assert "error" not in chunk, chunk
        validate(chunk)


def check(status: int, headers, body: bytes, raw: bytes, expected: int | None) -> None:
    """One answer: a Completion (or SSE stream of them), or an error body with a 4xx that
    matches what the library says (`expected`, when the body was a JSON object)."""
    assert status != 500 and status in (200, 400, 404, 413), (status, body[:300])
    if expected is not None:
        assert status == expected, (status, expected, body[:300])
    if status != 200:
        err = check_error(status, body)
        if status == 413:
            assert len(raw) > MAX_BODY and err["code"] == "request_too_large"
        if status == 404:
            assert err["code"] == "model_not_found" and err["param"] == "model"
        return
    if headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(body)
    else:
        r = json.loads(body)
        validate(r)
        assert r["object"] == "text_completion" and r["usage"] is not None and r["choices"]
        assert all(c["finish_reason"] is not None for c in r["choices"])


def library_status(api: Completions, raw: bytes) -> int | None:
    """The status the library gives this body (None: not a JSON object within the limit)."""
    if len(raw) > MAX_BODY:
        return 413
    try:
        request = json.loads(raw, parse_constant=lambda c: 1 / 0)
    except (ValueError, RecursionError, ZeroDivisionError):
        return 400
    if not isinstance(request, dict):
        return 400
    try:
        result = api.create(**request)
    except CompletionError as exc:
        return exc.status
    close = getattr(result, "close", None)
    if close is not None:
        close()   # a stream: validated, no need to run it here
    return 200


# -- in-process: volume --------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_dir):
    from refcomplete.registry import load_model
    return {"fake": FakeModel(n_ctx=48), "tiny": load_model(str(tiny_dir))}


@pytest.fixture(scope="module")
def endpoint(models):
    return Endpoint(models, max_body=MAX_BODY, limits=LIMITS)


@pytest.fixture(scope="module")
def library(models):
    return Completions(models, limits=LIMITS)


def answer(endpoint: Endpoint, raw: bytes):
    resp = endpoint.handle("POST", "/v1/completions", {"content-type": "application/json"}, raw)
    body = resp.body if resp.stream is None else b"".join(resp.stream)
    return resp.status, resp.headers, body


@settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
@given(raw=bodies())
@example(raw=b"[" * 50_000)
@example(raw=b'{"model": "fake", "prompt": "x", "temperature": NaN}')
@example(raw=b'{"model": "fake", "prompt": "x", "max_tokens": 2, "temperature": 1e999}')
@example(raw=b'{"model": "fake", "prompt": "x\\u0000\\ud800", "max_tokens": 2, "stream": true}')
@example(raw=b'{"model": "fake", "prompt": "x", "max_tokens": null}')
@example(raw=b'{"model": "fake", "prompt": [1], "n": true}')
@example(raw=b'\xef\xbb\xbf{"model": "fake"}')
@example(raw=b'{"model": "fake", "prompt": "x", "max_tokens": 1, "model": "tiny"}')
def test_fuzz_endpoint(endpoint, library, raw):
    start = time.perf_counter()
    status, headers, body = answer(endpoint, raw)
    assert time.perf_counter() - start < 10, "an answer took over 10 s"   # no hang
    check(status, headers, body, raw, library_status(library, raw))


# -- a real server process: a smaller sample ------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_dir):
    from test_server_security import serve_process
    flags = ["--max-body", str(MAX_BODY), "--max-prompts", str(LIMITS.max_prompts),
             "--max-prompt-chars", str(LIMITS.max_prompt_chars),
             "--max-prompt-tokens", str(LIMITS.max_prompt_tokens),
             "--max-work-tokens", str(LIMITS.max_work_tokens)]
    with serve_process(f"tiny={tiny_dir}", f"fake={tiny_dir}", flags=flags) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:   # no hang: 30 s at most
            yield srv, client
        assert srv.log_errors() == []


@pytest.fixture(scope="module")
def server_library(models):   # what the server process serves: the tiny model, twice
    return Completions({"fake": models["tiny"], "tiny": models["tiny"]}, limits=LIMITS)


@settings(max_examples=SERVER_EXAMPLES, **SETTINGS)
@given(raw=bodies())
def test_fuzz_real_server(server, server_library, raw):
    srv, client = server
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    check(r.status_code, r.headers, r.content, raw, library_status(server_library, raw))
    assert srv.alive()
