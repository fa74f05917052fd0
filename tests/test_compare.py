"""compare: a suite replayed against `refcomplete serve` passes every case; against
deliberately wrong servers and a vLLM-like dialect server, the right cases are named."""

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
    assert "0 fail" in out.out and "49/49" in out.err


class Mutating(EndpointTransport):
    """An in-process server whose JSON answers (and stream chunks) pass through `mutate`."""

    def __init__(self, endpoint, mutate):
        super().__init__(endpoint)
        self.mutate = mutate

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        req = json.loads(request.read() or b"{}")
        override = self.mutate(req, None)   # a whole-response override (status, body), or None
        if override is not None:
            return httpx.Response(override[0], json=override[1], request=request)
        resp = super().handle_request(request)
        if resp.status_code != 200 or request.url.path != "/v1/completions":
            return resp
        if req.get("stream"):
            frames = []
            for line in resp.read().decode().split("\n\n"):
                if line.startswith("data: {"):
                    line = "data: " + json.dumps(self.mutate(req, json.loads(line[6:])))
                frames.append(line)
            return httpx.Response(200, content="\n\n".join(frames).encode(), request=request,
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=self.mutate(req, resp.json()), request=request)


def replay(suite, endpoint, mutate, waived=()):
    rep = compare.Replayer("http://test", "tiny", transport=Mutating(endpoint, mutate))
    results = compare.run(suite, rep, progress=None)
    return {r.name: r for r in results}, set(waived)


def leaky_and_shifted(req, resp):
    """Leaks stop strings into text and shifts every logprob by 0.01 (non-streamed only)."""
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
    results, waived = replay(suite, endpoint, leaky_and_shifted)
    failed = {n for n, r in results.items() if r.verdict(waived) == "fail"}
    assert {"stop_spans_tokens", "greedy_0", "echo_score_max0_lp5", "penalties"} <= failed
    assert {"greedy_no_logprobs", "bad_temperature", "n_greedy", "stream_include_usage"}.isdisjoint(failed)
    checks = {c for _, r in results.items() for c, o, _ in r.findings if o == "mismatch"}
    assert "choice 0 token_logprobs" in checks and "choice 0 text" in checks
    table = compare.summary(list(results.values()), waived)
    assert "FAIL" in table and "stop_spans_tokens" in table


def test_a_server_accepting_bad_requests_fails_them(suite, endpoint):
    def lenient(req, resp):
        if resp is None and req.get("temperature", 0) > 2:
            return 200, {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "tiny",
                         "choices": [{"text": "", "index": 0, "logprobs": None,
                                      "finish_reason": "length"}]}
        return resp
    results, waived = replay(suite, endpoint, lenient)
    assert results["bad_temperature"].verdict(waived) == "fail"
    assert [o for _, o, _ in results["bad_temperature"].findings] == ["validation_differs"]
    assert results["bad_top_p"].verdict(waived) == "pass"


def vllm_like(req, resp):
    """Offsets from 0, one-entry top_logprobs for logprobs=0, greedy n>1 refused, -9999-free."""
    if resp is None:
        if req.get("temperature") == 0 and req.get("n", 1) > 1:
            return 400, {"error": {"message": "n must be 1 when using greedy sampling, got 3.",
                                   "type": "BadRequestError", "param": None, "code": 400}}
        return None
    for c in resp["choices"]:
        lp = c["logprobs"]
        if not lp:
            continue
        if not req.get("echo") and isinstance(req.get("prompt"), str):
            lp["text_offset"] = [o - len(req["prompt"]) for o in lp["text_offset"]]
        if req.get("logprobs") == 0:
            lp["top_logprobs"] = [None if v is None else {t: v}
                                  for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    return resp


def test_dialects_are_named_and_can_be_waived(suite, endpoint):
    results, _ = replay(suite, endpoint, vllm_like)
    named = {o for r in results.values() for _, o, _ in r.findings} - {"ok"}
    assert named == {"text_offset_zero", "top_logprobs_for_logprobs0", "greedy_n_refused"}
    assert all(r.verdict(set()) in ("pass", "fail") for r in results.values())
    assert results["n_greedy"].verdict(set()) == "fail"
    assert all(r.verdict(named) in ("pass", "dialect") for r in results.values())
    assert results["logprobs_0"].verdict(named) == "dialect"
    rep = compare.report(list(results.values()), named, model="tiny")
    assert rep["waived"] == sorted(named) and set(rep["dialects"]) == set(compare.DIALECTS)


def test_near_tie_divergence_is_not_a_mismatch():
    judge = compare.Judge(atol=1e-4, tie_margin=5e-3)
    want = {"tokens": ["a", "b"], "token_logprobs": [-1.0, -0.6930],
            "top_logprobs": [{"a": -1.0, "c": -2.0}, {"b": -0.6930, "d": -0.6935}],
            "text_offset": [1, 2]}
    got = {"tokens": ["a", "d"], "token_logprobs": [-1.0, -0.6935],
           "top_logprobs": [{"a": -1.0, "c": -2.0}, {"d": -0.6935, "b": -0.6930}],
           "text_offset": [1, 2]}
    res = compare.CaseResult("t", "completion")
    assert judge.logprobs(res, {"tags": ["greedy"]}, got, want, "c0") == 1
    assert [o for _, o, _ in res.findings] == ["near_tie"]
