"""compare: a suite replayed against `refcomplete serve` passes every case; deliberately
wrong servers fail the cases they should; servers with the dialects of vLLM and
llama-cpp-python get those dialects named, and nothing else."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

from refcomplete import compare, golden
from refcomplete.client import EndpointTransport
from refcomplete.registry import load_model
from refcomplete.server import Endpoint
from test_server import server_process


@pytest.fixture(scope="module")
def suite(tiny_dir, tmp_path_factory):
    return golden.generate_suite(load_model(str(tiny_dir)), "tiny",
                                 tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def endpoint(tiny_dir):
    return Endpoint({"tiny": load_model(str(tiny_dir))})


@pytest.fixture(scope="module")
def by_name(suite):
    return {c["name"]: c for c in golden.load_suite(suite)[1]}


def cli(argv) -> int:
    ap = argparse.ArgumentParser()
    compare.add_subcommand(ap.add_subparsers())
    args = ap.parse_args(argv)
    return args.handler(args)


def test_refcomplete_serve_passes_every_case(suite, tiny_dir, tmp_path, capsys):
    with server_process(f"tiny={tiny_dir}", api_key="k") as url:
        code = cli(["compare", "--base-url", url + "/v1", "--model", "tiny", "--suite", str(suite),
                    "--api-key", "k", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr()
    rep = json.loads((tmp_path / "r.json").read_text())
    failed = [c for c in rep["cases"] if c["result"] != "pass"]
    assert code == 0 and not failed, failed[:3]
    assert len(rep["cases"]) == len(golden.load_suite(suite)[1])
    assert "0 fail" in out.out and "49/49" in out.err and f"using suite {suite}" in out.err
    assert "largest common shift 0 " in out.out


class Mutating(EndpointTransport):
    """An in-process server: `rewrite` changes the request it answers, `mutate(req, None)`
    may answer instead ((status, body) or an httpx.Response), `mutate(req, obj)` changes each JSON answer and
    stream chunk (None drops a chunk). It records every request it receives."""

    def __init__(self, endpoint, mutate=None, rewrite=None):
        super().__init__(endpoint)
        self.mutate = mutate or (lambda req, obj: obj)
        self.rewrite, self.seen = rewrite, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        req = json.loads(request.read() or b"{}")
        self.seen.append(req)
        override = self.mutate(req, None)
        if isinstance(override, httpx.Response):
            return override
        if override is not None:
            return httpx.Response(override[0], json=override[1], request=request)
        if self.rewrite is not None:
            request = httpx.Request(request.method, request.url, json=self.rewrite(dict(req)),
                                    headers={k: v for k, v in request.headers.items()
                                             if k.lower() != "content-length"})
        resp = super().handle_request(request)
        if resp.status_code != 200 or request.url.path != "/v1/completions":
            return resp
        if req.get("stream"):
            frames = []
            for line in resp.read().decode().split("\n\n"):
                if line.startswith("data: {"):
                    chunk = self.mutate(req, json.loads(line[6:]))
                    if chunk is None:
                        continue
                    line = "data: " + json.dumps(chunk)
                frames.append(line)
            return httpx.Response(200, content="\n\n".join(frames).encode(), request=request,
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=self.mutate(req, resp.json()), request=request)


def replay(suite, transport, **kw):
    rep = compare.Replayer("http://test", "tiny", transport=transport, **kw)
    return {r.name: r for r in compare.run(suite, rep, progress=None)}


def named(results) -> set:
    return {o for r in results.values() for o in r.outcomes()}


def outcomes(result) -> list:
    return [f.outcome for f in result.findings if f.outcome != "ok"]


def failing(results, waived=frozenset()) -> set:
    return {n for n, r in results.items() if r.verdict(set(waived)) == "fail"}


def leaky_and_shifted(req, resp):
    """Leaks stop strings into text and shifts every token logprob by 0.01 (non-streamed only)."""
    if resp is None or req.get("stream"):
        return None if resp is None else resp
    for c in resp["choices"]:
        if req.get("stop") and c["finish_reason"] == "stop" and c["text"]:
            stop = req["stop"] if isinstance(req["stop"], str) else req["stop"][0]
            c["text"] += stop
        if c["logprobs"]:
            c["logprobs"]["token_logprobs"] = [None if v is None else v + 0.01
                                               for v in c["logprobs"]["token_logprobs"]]
    return resp


def test_a_wrong_server_fails_with_the_right_cases_named(suite, endpoint):
    results = replay(suite, Mutating(endpoint, leaky_and_shifted))
    failed = failing(results)
    assert {"stop_spans_tokens", "greedy_0", "echo_score_max0_lp5", "penalties"} <= failed
    assert {"greedy_no_logprobs", "bad_temperature", "n_greedy", "stream_include_usage"}.isdisjoint(failed)
    checks = {f.check for r in results.values() for f in r.findings if f.outcome == "mismatch"}
    assert {"choice 0 logprobs shape", "choice 0 text"} <= checks     # top-k 0, token 0.01
    assert "choice 0 logprobs shift" in {f.check for f in results["logprobs_0"].findings
                                         if f.outcome == "mismatch"}  # no top-k: a shift
    text = next(f for f in results["stop_spans_tokens"].findings if f.check == "choice 0 text")
    assert text.detail.startswith("char ") and "|" in text.detail and "(golden)" in text.detail
    table = compare.summary(list(results.values()), set())
    assert "FAIL" in table and "stop_spans_tokens" in table


def refuses_everything(req, resp):
    if resp is None:
        return 400, {"error": {"message": "bad request", "type": "invalid_request_error",
                               "param": None, "code": None}}
    return resp


def test_a_server_refusing_everything_fails_every_error_case(suite, endpoint):
    results = replay(suite, Mutating(endpoint, refuses_everything))
    errors = {n for n, r in results.items() if r.kind == "error"}
    assert failing(results, compare.DIALECTS) >= errors
    assert all("refused_regardless" in outcomes(results[n]) for n in errors)
    assert results["n_greedy"].verdict(set(compare.DIALECTS)) == "fail"       # not greedy_n_refused
    assert results["default_prompt"].verdict(set(compare.DIALECTS)) == "fail"  # nor default_prompt_refused


def test_a_500_on_invalid_input_is_never_waived(suite, endpoint):
    def crashes(req, resp):
        if resp is None:
            status, _ = Endpoint_status(endpoint, req)
            return (500, {"error": {"message": "", "type": "internal_error"}}) if status >= 400 else None
        return resp
    results = replay(suite, Mutating(endpoint, crashes))
    errors = {n for n, r in results.items() if r.kind == "error"}
    assert failing(results, compare.DIALECTS) == errors
    assert all(outcomes(results[n]) == ["server_error_on_invalid"] for n in errors)
    assert "server_error_on_invalid" not in compare.DIALECTS


def Endpoint_status(endpoint, req):
    """What the real endpoint answers to req (status, body)."""
    r = endpoint.handle("POST", "/v1/completions", {"content-type": "application/json"},
                        json.dumps(req).encode())
    return r.status, r.body


def test_a_server_accepting_bad_requests_fails_them(suite, endpoint):
    canned = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "tiny",
              "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 600, "total_tokens": 601}}

    def lenient(req, resp):        # accepts what we refuse and ignores it: no clamping
        if resp is None and Endpoint_status(endpoint, req)[0] == 400 and not req.get("stream"):
            return 200, canned
        return resp
    results = replay(suite, Mutating(endpoint, lenient))
    for name in ("bad_temperature", "context_overflow", "logit_bias_bad_value"):
        assert outcomes(results[name]) == ["validation_differs"], results[name].findings
    assert results["bad_temperature"].verdict(set()) == "fail"
    assert results["bad_temperature"].verdict({"validation_differs"}) == "dialect"


def test_extra_body_never_overrides_a_case_and_skips_error_cases(suite, endpoint):
    extra = {"top_k": 0, "repeat_penalty": 1.0, "max_tokens": 99}
    server = Mutating(endpoint, rewrite=lambda req: {k: v for k, v in req.items()
                                                     if k not in ("repeat_penalty",) and
                                                     (k != "top_k" or v != 0)})
    replay(suite, server, extra_body=extra)
    sent = server.seen
    unknown = [r for r in sent if r.get("top_k") is not None and "repeat_penalty" not in r]
    assert unknown and all(r["top_k"] == 5 for r in unknown)     # the case's own field
    greedy = next(r for r in sent if r.get("prompt") == golden.PROMPTS[0] and r.get("logprobs") == 5)
    assert greedy["max_tokens"] == 24 and greedy["repeat_penalty"] == 1.0
    invalid = [r for r in sent if r.get("prompt") == "x"]
    assert invalid and all("repeat_penalty" not in r for r in invalid)
    server.seen.clear()
    replay(suite, server, extra_body=extra, extra_on_errors=True)
    invalid = [r for r in server.seen if r.get("prompt") == "x" and r.get("temperature") == 3]
    assert invalid and all(r["repeat_penalty"] == 1.0 for r in invalid)
    assert [r["top_k"] for r in server.seen if r.get("top_k") not in (None, 0)] == [5]


class Flaky(Mutating):
    """Drops the connection on greedy_1's plain request: once, or every time."""

    def __init__(self, endpoint, always):
        super().__init__(endpoint)
        self.always, self.drops, self.closes = always, 0, 0

    def close(self) -> None:
        self.closes += 1

    def handle_request(self, request):
        req = json.loads(request.read() or b"{}")
        if req.get("prompt") == golden.PROMPTS[1] and req.get("max_tokens") == 24 and not req.get("stream") \
                and (self.always or not self.drops):
            self.drops += 1
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return super().handle_request(request)


def test_a_transport_error_is_retried_once_on_a_fresh_connection(suite, endpoint):
    once = Flaky(endpoint, always=False)
    results = replay(suite, once)
    assert once.drops == 1 and once.closes >= 1 and results["greedy_1"].verdict(set()) == "pass"
    always = Flaky(endpoint, always=True)
    results = replay(suite, always)
    assert always.drops == 2 and outcomes(results["greedy_1"]) == ["transport_error"]
    assert "RemoteProtocolError" in results["greedy_1"].findings[0].detail
    assert results["greedy_no_logprobs"].verdict(set()) == "pass"          # the next case
    assert failing(results) == {"greedy_1"}


def test_an_answer_of_the_wrong_shape_is_a_mismatch_not_a_crash(suite, endpoint):
    def odd(req, resp):
        if resp is not None and not req.get("stream") and req.get("max_tokens") == 24:
            resp["choices"] = [{"index": 0}]       # no text, no logprobs, no finish_reason
        return resp
    results = replay(suite, Mutating(endpoint, odd))
    assert results["greedy_0"].verdict(set(compare.DIALECTS)) == "fail"
    assert "transport_error" not in results["greedy_0"].outcomes()
    assert failing(results) == {n for n, r in results.items() if r.kind == "completion"
                                and r.name in {"greedy_0", "greedy_1", "greedy_2", "greedy_3",
                                               "stop_spans_tokens", "stop_list", "penalties"}}
