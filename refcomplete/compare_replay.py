"""Sending a golden suite's requests to one server, for `refcomplete compare`.

Knows: HTTP (httpx), server-sent events, how a stream folds into a response, which
request a case sends (the case's own fields win over --extra-body, which error cases get
only when asked), what an error case must show (the status, the golden `param` where the
server names one, and that the request is accepted once the case's field is taken out),
and the evidence for the dialects of refusals and streams. Does not know: how a response
is judged (compare_judge.py).

    rep = Replayer("http://127.0.0.1:8000", "gpt2-tiny-shakespeare")
    result = rep.run_case(case)          # a CaseResult; raises Unreachable if nothing answers

A broken stream or a transport error closes the connection pool: the next request goes
over a fresh connection (a server that cut a stream may leave a dead keep-alive socket).
"""

from __future__ import annotations

import json
import re

from refcomplete.compare_findings import CaseResult, text_diff
from refcomplete.compare_judge import COUNTS, Judge


class Unreachable(Exception):
    """No connection to the server could be made."""


def sdk_validate(obj: dict) -> str | None:
    """None if the response validates as openai.types.Completion, else the error. Nulls the
    SDK types reject but OpenAI sends (first echo token, stream finish_reason) are filled."""
    from openai.types import Completion

    obj = json.loads(json.dumps(obj))
    for ch in obj.get("choices", []):
        ch["finish_reason"] = ch.get("finish_reason") or "stop"
        lp = ch.get("logprobs")
        if lp and lp.get("token_logprobs") and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0] = 0.0
            if lp.get("top_logprobs"):
                lp["top_logprobs"][0] = {}
    try:
        Completion.model_validate(obj)
    except Exception as exc:  # pydantic.ValidationError: say where and what
        errors = exc.errors() if hasattr(exc, "errors") else []
        if not errors:
            return str(exc).splitlines()[0]
        e = errors[0]
        where = ".".join(str(x) for x in e.get("loc", ()))
        return f"{len(errors)} schema error(s); {where}: {e.get('msg')} (got {e.get('input')!r:.60})"
    return None


def fold(chunks: list[dict]) -> dict:
    """The response a stream stands for: per index, concatenated text and logprobs."""
    merged: dict = {}
    usage = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for d in chunk.get("choices", []):
            c = merged.setdefault(d["index"], {"text": "", "index": d["index"], "logprobs": None,
                                               "finish_reason": None})
            c["text"] += d.get("text") or ""
            c["finish_reason"] = d.get("finish_reason") or c["finish_reason"]
            if d.get("logprobs"):
                if c["logprobs"] is None:
                    c["logprobs"] = {k: (None if v is None else list(v)) for k, v in d["logprobs"].items()}
                else:
                    for k, v in d["logprobs"].items():
                        c["logprobs"][k] = None if v is None else (c["logprobs"].get(k) or []) + list(v)
    return {"choices": [merged[i] for i in sorted(merged)], "usage": usage}


def _message(body) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    text = err.get("message") if isinstance(err, dict) else body
    return repr(str(text)[:160])


def _about(body, field: str) -> bool:
    """The error object names `field` (as its param, or as a word of its message)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return False
    return err.get("param") == field or re.search(rf"\b{field}\b", str(err.get("message"))) is not None


class Replayer:
    """Sends a suite's requests to one server (httpx) and judges the answers."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 extra_body: dict | None = None, judge: Judge | None = None, transport=None,
                 timeout: float = 300.0, extra_on_errors: bool = False):
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout
        self.transport, self.http = transport, None
        self.model, self.extra, self.extra_on_errors = model, extra_body or {}, extra_on_errors
        self.judge = judge or Judge()
        self.reset()

    def reset(self) -> None:
        """Drop every pooled connection; the next request opens a fresh one."""
        import httpx

        if self.http is not None:
            self.http.close()
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                 transport=self.transport)

    def body(self, request: dict, invalid: bool = False) -> dict:
        """What is sent: --extra-body, then the model, then the case's own fields."""
        extra = self.extra if not invalid or self.extra_on_errors else {}
        return {**extra, "model": self.model, **request}

    def _post(self, request: dict, stream: bool = False, invalid: bool = False):
        """(status, JSON body), or for a stream (200, {"chunks", "done"}). A transport error
        before any answer is retried once on a fresh connection (a stale keep-alive socket)."""
        import httpx

        body = self.body(request, invalid)
        for attempt in (1, 2):
            try:
                return self._send_stream(body) if stream else self._send(body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self.reset()
                raise Unreachable(f"{type(exc).__name__}: {exc}") from exc
            except httpx.TransportError:
                self.reset()
                if attempt == 2:
                    raise

    def _send(self, body: dict):
        r = self.http.post("/v1/completions", json=body)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"_raw": r.text[:200]}

    def _send_stream(self, body: dict):
        import httpx

        chunks, done = [], False
        with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                try:
                    return r.status_code, r.json()
                except ValueError:
                    return r.status_code, {"_raw": r.text[:200]}
            try:
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunks.append(json.loads(data))
            except (httpx.TransportError, ValueError) as exc:   # cut mid-stream, or not JSON
                chunks.append({"error": f"{type(exc).__name__}: {exc}"[:200], "_broken": True})
        if not done:
            self.reset()
        return 200, {"chunks": chunks, "done": done}

    def run_case(self, case: dict) -> CaseResult:
        res = CaseResult(case["name"], case["kind"])
        try:
            getattr(self, "_" + case["kind"])(res, case)
        except Unreachable:
            raise
        except Exception as exc:  # a crash of one case is a finding, not the end of the run
            import httpx

            if isinstance(exc, httpx.TransportError):
                res.add("request", "transport_error", f"{type(exc).__name__}: {exc}"[:200])
            else:                 # an answer of an unexpected shape (a list for a dict, ...)
                res.add("answer", "mismatch", f"cannot be judged: {type(exc).__name__}: {exc}"[:200])
        if not res.findings:
            res.add("all", "ok")
        return res

    def _error(self, res: CaseResult, case: dict) -> None:
        want, req = case["expect"], case["request"]
        field = want["error"].get("param")
        status, body = self._post(req, stream=bool(req.get("stream")), invalid=True)
        golden = f"golden {want['status']} about {field!r}"
        if status >= 500:
            res.add("status", "server_error_on_invalid", f"HTTP {status} {_message(body)} ({golden})",
                    got=status, want=want["status"])
            return
        if status < 400:
            name = self._accepted(case, body)
            res.add("status", name, f"accepted with {status} ({golden})", got=status, want=want["status"])
            return
        if status != want["status"]:
            res.add("status", "validation_differs", f"{status} vs {want['status']} (golden) "
                    f"{_message(body)}", got=status, want=want["status"])
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            res.add("error body", "mismatch", f"no OpenAI error object: {str(body)[:80]}")
        else:
            param = err.get("param")
            if param is not None and param != field:
                # FastAPI's location form ('body.stop' for 'stop', vLLM 0.32) names the field
                same = field is not None and param == "body." + field
                res.add("error param", "error_type_differs" if same else "mismatch",
                        f"param {param!r} vs {field!r} (golden) {_message(body)}", got=param,
                        want=field)
            if err.get("type") != want["error"]["type"]:
                res.add("error type", "error_type_differs", f"{err.get('type')!r} vs "
                        f"{want['error']['type']!r} (golden)", got=err.get("type"),
                        want=want["error"]["type"])
        self._control(res, req, field)

    def _control(self, res: CaseResult, req: dict, field: str | None) -> None:
        """The refusal must be about `field`: without it (a valid value for prompt and
        model), the same request is accepted."""
        if field is None or field not in req:
            return
        control = {k: v for k, v in req.items() if k != field}
        if field == "prompt":
            control["prompt"] = "x"
        control["max_tokens"] = 1
        status, body = self._post(control, stream=bool(control.get("stream")), invalid=True)
        how = "with a valid" if field == "prompt" else "without"
        if status != 200:
            res.add("reason", "refused_regardless", f"{how} {field!r} the request is refused "
                    f"too ({status} {_message(body)}): the refusal is not about {field!r}",
                    got=status, want=200)
        else:
            res.add("reason", "ok", f"accepted {how} {field!r}")

    def _accepted(self, case: dict, body) -> str:
        """The dialect an accepted invalid request fits, or validation_differs."""
        req, usage = case["request"], (body.get("usage") if isinstance(body, dict) else None) or {}
        if case["name"] == "context_overflow":
            total, done = usage.get("total_tokens"), usage.get("completion_tokens")
            if isinstance(total, int) and isinstance(done, int) and done >= 1 \
                    and total <= req["max_tokens"]:
                return "context_clamped"
        bias = req.get("logit_bias") or {}
        if case["name"] == "logit_bias_bad_value" and bias:
            probe = {"prompt": req.get("prompt", "x"), "temperature": 0, "max_tokens": 3}
            clamped = {k: max(-100, min(100, v)) for k, v in bias.items()}
            a = self._post({**probe, "logit_bias": bias}, invalid=True)
            b = self._post({**probe, "logit_bias": clamped}, invalid=True)
            text = lambda r: [c.get("text") for c in r[1].get("choices", [])] if r[0] == 200 else None
            if text(a) is not None and text(a) == text(b):
                return "logit_bias_clamped"
        return "validation_differs"

    def _completion(self, res: CaseResult, case: dict) -> None:
        req, tags = case["request"], set(case["tags"])
        status, got = self._post(req)
        if status != 200:
            if status >= 500:
                name = "server_error"
            elif "greedy_n" in tags and status == 400 and _about(got, "n"):
                name = "greedy_n_refused"
            elif "prompt" not in req and status == 400 and _about(got, "prompt"):
                name = "default_prompt_refused"
            else:
                name = "mismatch"
            res.add("status", name, f"HTTP {status} {_message(got)}", got=status, want=200)
            return
        problem = sdk_validate(got)
        res.add("schema", "mismatch" if problem else "ok", problem or "")
        self.judge.response(res, case, got, case["expect"])
        if req.get("best_of", req.get("n", 1)) == req.get("n", 1):
            self._fold(res, case, {**req, "stream": True, "stream_options": {"include_usage": True}},
                       got)

    def _stream(self, res: CaseResult, case: dict) -> None:
        self._fold(res, case, case["request"], fold(case["expect"]), golden=True)

    def _fold(self, res: CaseResult, case: dict, request: dict, want: dict, golden=False) -> None:
        pre = "" if golden else "stream-vs-plain "
        status, out = self._post(request, stream=True)
        if status != 200:
            res.add(pre + "stream status", "server_error" if status >= 500 else "mismatch",
                    f"HTTP {status} {_message(out)}", got=status, want=200)
            return
        chunks = [c for c in out["chunks"] if "_broken" not in c]
        if not out["done"]:
            why = [c["error"] for c in out["chunks"] if "_broken" in c]
            texts = ["".join(c.get("text") or "" for c in ch.get("choices") or []) for ch in chunks]
            res.add(pre + "stream", "broken_stream", f"cut after {len(chunks)} chunks, no data: "
                    f"[DONE]" + (f" ({why[0]})" if why else "") +
                    (f"; text so far {''.join(texts)[:80]!r}" if chunks else ""))
            return      # what follows from the cut (missing choices, text) is not reported again
        errors = [c for c in chunks if "error" in c]
        problems = [p for p in (sdk_validate(c) for c in chunks if "error" not in c) if p]
        if errors or problems:
            res.add(pre + "stream chunks", "mismatch", str((errors or problems)[0])[:200])
            return
        if len({c.get("id") for c in chunks}) > 1:
            res.add(pre + "stream ids", "mismatch", "chunks carry different ids")
        usage_ok = self._usage_chunks(res, request, chunks, pre)
        folded = fold(chunks)
        if not golden and request.get("echo") and self._echo_ignored(res, request, folded, want):
            return
        self.judge.response(res, case, folded, want, prefix=pre, usage=golden and usage_ok)
        if not golden and usage_ok and want.get("usage"):
            g, w = ({k: (u or {}).get(k) for k in COUNTS} for u in (folded["usage"], want["usage"]))
            if g != w:
                res.add(pre + "usage", "mismatch", f"stream {g} vs plain {w}", got=g, want=w)

    def _usage_chunks(self, res: CaseResult, request: dict, chunks: list, pre: str) -> bool:
        """With include_usage: one final chunk with empty choices and the usage, `usage: null`
        before it. False if there is no usage to compare."""
        if not (request.get("stream_options") or {}).get("include_usage"):
            return False
        with_usage = [i for i, c in enumerate(chunks) if c.get("usage")]
        if not with_usage:
            res.add(pre + "stream usage", "no_usage_chunk", f"none of {len(chunks)} chunks has usage")
            return False
        last = chunks[-1]
        if with_usage != [len(chunks) - 1] or last.get("choices") != []:
            res.add(pre + "stream usage", "mismatch", f"usage in chunks {with_usage} of "
                    f"{len(chunks)}; OpenAI sends it once, last, with empty choices")
        omitted = [i for i, c in enumerate(chunks[:-1]) if "usage" not in c]
        if omitted:
            res.add(pre + "stream usage", "usage_null_omitted", f"{len(omitted)} of "
                    f"{len(chunks) - 1} chunks before the usage chunk have no usage key "
                    f"(first: chunk {omitted[0]}); OpenAI sends usage: null", index=omitted[0])
        return True

    def _echo_ignored(self, res: CaseResult, request: dict, folded: dict, plain: dict) -> bool:
        """The stream lacks the echoed prompt that the plain answer starts with."""
        prompt = request.get("prompt") if isinstance(request.get("prompt"), str) else None
        pairs = list(zip(folded["choices"], plain["choices"]))
        if not pairs or len(folded["choices"]) != len(plain["choices"]):
            return False
        fits = all(p["text"] != s["text"] and p["text"].endswith(s["text"]) and
                   (prompt is None or p["text"] == prompt + s["text"]) for s, p in pairs)
        if fits:
            s, p = pairs[0]
            res.add("stream-vs-plain choice 0 text", "stream_ignores_echo",
                    "the stream has no echo: " + text_diff(s["text"], p["text"]))
        return fits
