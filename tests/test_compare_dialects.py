"""compare against fakes of real servers: a vLLM 0.32-like and a llama-cpp-python
0.3.36-like server (the behaviours measured in docs/golden.md) get exactly their dialects
named, and their real bugs (lost text, crashes, 500s) still FAIL; the broken twin of each
dialect's evidence is a FAIL."""

from __future__ import annotations

import json

import httpx
import pytest

from refcomplete import compare
from test_compare import (Mutating, by_name, endpoint, failing, named, outcomes,  # noqa: F401
                          replay, suite, Endpoint_status)

N_CTX = 64          # the test model's context (conftest.TINY)
SHIFT = 1.4e-4      # vLLM's float32 log_softmax: a shift common to a position's top-k


def vllm_like(req, resp):
    """vLLM 0.32 as measured: offsets from 0 and unclamped at a stop, one-entry top_logprobs
    for logprobs=0, greedy n>1 and a missing prompt refused, usage details only when not
    streamed, no usage: null in stream chunks, '\ufffd' for split bytes (generated text lost),
    logprobs shifted by up to 1.4e-4 per position."""
    if resp is None:
        if req.get("temperature") == 0 and req.get("n", 1) > 1:
            return 400, {"error": {"message": "n must be 1 when using greedy sampling, got 3.",
                                   "type": "BadRequestError", "param": None, "code": 400}}
        if "prompt" not in req:
            return 400, {"error": {"message": "Either prompt or prompt_embeds must be provided and "
                                   "non-empty.", "type": "BadRequestError", "param": None, "code": 400}}
        return None
    if "usage" in resp and resp["usage"] is None and resp.get("choices"):
        del resp["usage"]
    elif resp.get("usage") and not req.get("stream"):
        resp["usage"].update(prompt_tokens_details=None, completion_tokens_details=None)
    for c in resp["choices"]:
        if req.get("logit_bias") and not req.get("echo"):
            c["text"] = c["text"].replace("\ufffd", "")        # split characters are lost
        lp = c["logprobs"]
        if not lp:
            continue
        shift = [SHIFT * (1 if len(t) % 2 else -1) for t in lp["tokens"]]
        lp["tokens"] = ["\ufffd" if t.startswith("bytes:") else t for t in lp["tokens"]]
        lp["token_logprobs"] = [None if v is None else v + s for v, s in zip(lp["token_logprobs"], shift)]
        if lp["top_logprobs"]:      # shape: 2e-5 on the last alternative
            lp["top_logprobs"] = [None if d is None else {
                ("\ufffd" if k.startswith("bytes:") else k): v + s + (2e-5 if k == list(d)[-1] != t else 0)
                for k, v in d.items()} for d, s, t in zip(lp["top_logprobs"], shift, lp["tokens"])]
        if req.get("stop"):         # the stop-completing token's offset is not clamped
            key = (id(req), c["index"])
            for j, t in enumerate(lp["tokens"]):
                if key in _LAST:
                    lp["text_offset"][j] = max(lp["text_offset"][j], _LAST[key][0] + len(_LAST[key][1]))
                _LAST[key] = (lp["text_offset"][j], t)
        if not req.get("echo") and isinstance(req.get("prompt"), str):
            lp["text_offset"] = [o - len(req["prompt"]) for o in lp["text_offset"]]
        if req.get("logprobs") == 0:
            lp["top_logprobs"] = [None if v is None else {t: v}
                                  for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    return resp


_LAST: dict = {}    # (request, choice index) -> the last (offset, token) seen, across chunks


def vllm_rewrite(model):
    def rewrite(req):          # a context overflow and logit_bias 101 are clamped
        if isinstance(req.get("prompt"), str) and req.get("max_tokens"):
            req["max_tokens"] = min(req["max_tokens"], N_CTX - len(model.tokenizer.encode(req["prompt"])))
        if req.get("logit_bias"):
            req["logit_bias"] = {k: max(-100, min(100, v)) for k, v in req["logit_bias"].items()}
        return req
    return rewrite


def test_a_vllm_like_server_gets_its_dialects_and_its_bugs(suite, endpoint, tiny_dir):
    from refcomplete.registry import load_model
    results = replay(suite, Mutating(endpoint, vllm_like, vllm_rewrite(load_model(str(tiny_dir)))))
    assert named(results) == {"text_offset_zero", "top_logprobs_for_logprobs0", "greedy_n_refused",
                              "default_prompt_refused", "usage_null_omitted", "offset_not_clamped",
                              "context_clamped", "logit_bias_clamped", "utf8_display", "mismatch"}
    assert failing(results, compare.DIALECTS) == {"utf8_split_generated", "stream_utf8"}  # text lost
    lost = next(f for f in results["utf8_split_generated"].findings if f.outcome == "mismatch")
    assert lost.check == "choice 0 text" and lost.data["got"] == ""
    assert "offset_not_clamped" in outcomes(results["stop_spans_tokens"])
    shifts = [f.data["shift"] for r in results.values() for f in r.findings if "shift" in f.data]
    assert SHIFT <= max(shifts) <= 1.5e-4     # reported, and within the default tolerance
    # usage details (non-streamed only) and the common shift are no finding
    assert set(outcomes(results["greedy_0"])) == {"text_offset_zero", "usage_null_omitted"}
    bugs = {"utf8_split_generated", "stream_utf8"}
    for name in ("usage_null_omitted", "context_clamped", "logit_bias_clamped", "offset_not_clamped",
                 "default_prompt_refused", "greedy_n_refused"):   # each waiver is needed
        showing = {n for n, r in results.items() if name in r.outcomes()}
        assert showing and failing(results, set(compare.DIALECTS) - {name}) - bugs == showing - bugs


class LlamaLike(Mutating):
    """llama-cpp-python 0.3.36 as measured: n and best_of ignored, no usage chunk, streams
    ignore echo, EOS left out of tokens and usage, '' for split bytes, a 500 for a missing
    prompt, out-of-range top_p / presence_penalty and an empty prompt, most other invalid
    requests accepted, a forced partial-UTF-8 token a 500 or a stream cut with no [DONE]
    after which the keep-alive connection is dead until the client opens a new one."""

    def __init__(self, endpoint):
        super().__init__(endpoint, self.answer, self.forward)
        self.dead, self.stale_hits = False, 0

    def close(self) -> None:
        self.dead = False

    def handle_request(self, request):
        if self.dead:
            self.stale_hits += 1
            raise httpx.ReadError("the connection was closed by the server")
        return super().handle_request(request)

    def answer(self, req, obj):
        if obj is not None:
            return self.mutate_answer(req, obj)
        crash = {"error": {"message": "", "type": "internal_server_error"}}
        if "prompt" not in req or req.get("prompt") == "" or req.get("top_p", 1) > 1 \
                or req.get("presence_penalty", 0) < -2:
            return 500, crash
        if "447" in (req.get("logit_bias") or {}):
            if not req.get("stream"):
                return 500, {"error": {"message": "llama_decode returned 1", "type": "internal_server_error"}}
            self.dead = True
            frame = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
                     "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": None}]}
            return httpx.Response(200, content=f"data: {json.dumps(frame)}\n\n".encode(),
                                  headers={"content-type": "text/event-stream"})
        if req.get("stream") and req.get("echo") and req.get("max_tokens") == 0:
            frame = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
                     "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]}
            return httpx.Response(200, content=f"data: {json.dumps(frame)}\n\ndata: [DONE]\n\n".encode(),
                                  headers={"content-type": "text/event-stream"})
        clean = {k: v for k, v in req.items() if k not in ("n", "best_of")}
        if Endpoint_status(self.endpoint, clean)[0] in (400, 404):
            total = req["max_tokens"] if req.get("max_tokens", 0) >= N_CTX else 17
            return 200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
                         "choices": [{"text": "la", "index": 0, "logprobs": None, "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": total - 1, "total_tokens": total}}
        return None

    def forward(self, req):
        req = {k: v for k, v in req.items() if k not in ("n", "best_of")}
        if req.get("stream"):
            req.pop("echo", None)
        return req

    def mutate_answer(self, req, obj):
        if obj.get("choices") == [] and obj.get("usage"):
            return None                                  # no usage chunk
        if req.get("stream"):
            obj.pop("usage", None)
        for c in obj["choices"]:
            lp = c["logprobs"]
            if lp and lp["tokens"] and lp["tokens"][-1] == "<|endoftext|>":
                c["logprobs"] = lp = {k: v[:-1] if isinstance(v, list) else v for k, v in lp.items()}
                if obj.get("usage"):
                    obj["usage"] = {k: v - (k != "prompt_tokens") for k, v in obj["usage"].items()}
            if lp:
                lp["tokens"] = ["" if t.startswith("bytes:") else t for t in lp["tokens"]]
                if lp["top_logprobs"]:
                    lp["top_logprobs"] = [None if d is None else {("" if k.startswith("bytes:") else k): v
                                                                  for k, v in d.items()}
                                          for d in lp["top_logprobs"]]
        return obj


def test_a_llama_cpp_like_server_gets_its_dialects_and_its_bugs(suite, endpoint):
    server = LlamaLike(endpoint)
    results = replay(suite, server)
    assert named(results) >= {"no_usage_chunk", "eos_not_reported", "stream_ignores_echo",
                              "n_ignored", "utf8_display", "server_error", "server_error_on_invalid",
                              "validation_differs", "context_clamped", "broken_stream"}
    assert failing(results, compare.DIALECTS) == {
        "default_prompt", "utf8_split_generated", "stream_utf8",       # 500s and a cut stream
        "bad_top_p", "bad_presence_penalty", "empty_prompt"}           # 500s on invalid input
    assert server.stale_hits == 0                 # a fresh connection after the cut stream
    assert outcomes(results["bad_temperature"]) == ["validation_differs"]   # the case after it
    assert outcomes(results["stream_include_usage"]) == ["no_usage_chunk"]  # once, not twice
    for name in ("n_greedy", "seeded_n", "best_of_n2"):
        assert "n_ignored" in outcomes(results[name]), results[name].findings
    assert set(outcomes(results["eos_forced"])) == {"eos_not_reported", "no_usage_chunk"}
    assert "stream_ignores_echo" in outcomes(results["echo_greedy"])
    assert "stream_ignores_echo" in outcomes(results["echo_score_max0_lp5"])
