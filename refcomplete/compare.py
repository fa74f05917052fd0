"""`refcomplete compare`: replay a golden suite against any OpenAI-compatible server.

Knows: how to judge an answer against a golden one (schema via the `openai` package's
types, tokens and text, logprobs within an absolute tolerance, top_logprobs as unordered
maps, finish_reason, usage, stream folding, error status and type) and the known
dialects of other servers, reported by name. Does not know: how the golden values were
made (golden.py) or any completion rule.

    refcomplete compare --base-url http://127.0.0.1:8080 --model gpt2 --suite tests/golden \\
        --atol 3e-3 --extra-body '{"repeat_penalty": 1.0, "top_k": 0, "min_p": 0}' \\
        --waive text_offset_zero --report out.json

Each case ends "pass", "dialect" (only named differences, all waived) or "fail" (a
mismatch, or a named difference not waived). Exit status 1 if any case fails.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

DIALECTS = {
    "text_offset_zero": "text_offset counts from the completion start, not prompt+text (vLLM)",
    "top_logprobs_for_logprobs0": "logprobs=0 gives top_logprobs entries, not null (vLLM)",
    "logprobs_not_capped": "logprobs above 5 are not clamped to 5 (vLLM, llama.cpp)",
    "best_of_ignored": "best_of is ignored: fewer candidates generated and counted (vLLM V1)",
    "greedy_n_refused": "n > 1 with temperature 0 is refused (vLLM)",
    "sampler_differs": "seeded sampling draws other tokens (another RNG or sampler order)",
    "echo_usage": "echo with max_tokens=0 counts completion tokens (vLLM: 1)",
    "validation_differs": "an invalid request is accepted, or rejected with another status",
    "error_type_differs": "the right status with another error type (vLLM: BadRequestError)",
    "near_tie": "greedy tokens diverge where the golden top-2 margin is under --tie-margin",
}


@dataclass
class CaseResult:
    name: str
    kind: str
    findings: list = field(default_factory=list)   # (check, outcome, detail)

    def add(self, check: str, outcome: str, detail: str = "") -> None:
        self.findings.append((check, outcome, detail))

    def verdict(self, waived: set) -> str:
        outcomes = [o for _, o, _ in self.findings if o != "ok"]
        if any(o == "mismatch" or o not in waived for o in outcomes):
            return "fail"
        return "dialect" if outcomes else "pass"


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
    except Exception as exc:  # pydantic.ValidationError
        return str(exc).splitlines()[0]
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
                        c["logprobs"][k] = None if v is None else (c["logprobs"][k] or []) + list(v)
    return {"choices": [merged[i] for i in sorted(merged)], "usage": usage}


class Judge:
    """Compares one server answer with the golden one; records findings on a CaseResult."""

    def __init__(self, atol: float, tie_margin: float):
        self.atol, self.tie_margin = atol, tie_margin

    def response(self, res: CaseResult, case: dict, got: dict, want: dict, prefix: str = "") -> None:
        tags = set(case["tags"])
        gc, wc = got.get("choices") or [], want["choices"]
        if [c["index"] for c in gc] != [c["index"] for c in wc]:
            res.add(prefix + "choices", "best_of_ignored" if "best_of" in tags else "mismatch",
                    f"indices {[c['index'] for c in gc]} != {[c['index'] for c in wc]}")
            return
        sampled = "sampled" in tags
        for g, w in zip(gc, wc):
            where = f"{prefix}choice {w['index']}"
            if sampled and g["text"] != w["text"]:
                res.add(where, "sampler_differs", f"text {g['text'][:30]!r} != {w['text'][:30]!r}")
                continue
            cut = self.logprobs(res, case, g.get("logprobs"), w["logprobs"], where)
            if g["text"] != w["text"] and cut is None:
                res.add(where + " text", "mismatch", f"{g['text'][:40]!r} != {w['text'][:40]!r}")
            if g.get("finish_reason") != w["finish_reason"] and cut is None:
                res.add(where + " finish_reason", "mismatch",
                        f"{g.get('finish_reason')} != {w['finish_reason']}")
        if not prefix:
            self.usage(res, tags, got.get("usage"), want.get("usage"))

    def usage(self, res: CaseResult, tags: set, got, want) -> None:
        if want is None:
            return
        got = {k: (got or {}).get(k) for k in want}
        if got == want:
            return
        if "echo_max0" in tags and got["prompt_tokens"] == want["prompt_tokens"]:
            res.add("usage", "echo_usage", f"{got} != {want}")
        elif "best_of" in tags and (got["completion_tokens"] or 0) < want["completion_tokens"]:
            res.add("usage", "best_of_ignored", f"{got} != {want}")
        elif "sampled" in tags and got["prompt_tokens"] == want["prompt_tokens"]:
            res.add("usage", "sampler_differs", f"{got} != {want}")
        else:
            res.add("usage", "mismatch", f"{got} != {want}")

    def logprobs(self, res: CaseResult, case: dict, g, w, where: str) -> int | None:
        """Compare logprobs objects; returns the token index of a near-tie divergence, if any."""
        if w is None:
            if g is not None:
                res.add(where + " logprobs", "mismatch", "logprobs returned but not requested")
            return None
        if not g:
            res.add(where + " logprobs", "mismatch", "no logprobs")
            return None
        gt, wt = g.get("tokens") or [], w["tokens"]
        n = next((i for i, (a, b) in enumerate(zip(gt, wt)) if a != b), min(len(gt), len(wt)))
        cut = None
        if n < len(wt) or len(gt) != len(wt):
            tops = w.get("top_logprobs")
            margin = _margin(tops[n]) if tops and n < len(tops) and tops[n] else None
            if margin is not None and margin < self.tie_margin:
                res.add(where + " tokens", "near_tie", f"diverge at {n}, golden margin {margin:.2g}")
                cut = n
            else:
                res.add(where + " tokens", "mismatch",
                        f"at {n}: {gt[n:n + 3]} != {wt[n:n + 3]}")
        m = n if cut is not None else min(len(gt), len(wt))
        bad = [i for i, (a, b) in enumerate(zip(g.get("token_logprobs", [])[:m], w["token_logprobs"][:m]))
               if (a is None) != (b is None) or (a is not None and abs(a - b) > self.atol)]
        if bad:
            i = bad[0]
            res.add(where + " token_logprobs", "mismatch",
                    f"{len(bad)} positions off by more than {self.atol}; first at {i}: "
                    f"{g['token_logprobs'][i]} vs {w['token_logprobs'][i]}")
        self.tops(res, case, g.get("top_logprobs"), w.get("top_logprobs"), m, where)
        go, wo = g.get("text_offset") or [], w["text_offset"][:m]
        if list(go[:m]) != list(wo):
            shift = [o - wo[0] for o in wo] if wo else []
            name = "text_offset_zero" if list(go[:m]) == shift else "mismatch"
            res.add(where + " text_offset", name, f"{list(go[:3])} != {wo[:3]}")
        return cut

    def tops(self, res: CaseResult, case: dict, g, w, m: int, where: str) -> None:
        tags = set(case["tags"])
        if w is None:
            if g is not None:
                lp0 = "logprobs0" in tags or case["request"].get("logprobs") == 0
                res.add(where + " top_logprobs", "top_logprobs_for_logprobs0"
                        if lp0 else "mismatch", "a list where null was expected")
            return
        if g is None:
            res.add(where + " top_logprobs", "mismatch", "null where a list was expected")
            return
        for i, (a, b) in enumerate(zip(g[:m], w[:m])):
            if (a is None) != (b is None):
                res.add(where + " top_logprobs", "mismatch", f"position {i}: {a} vs {b}")
                return
            if a is None:
                continue
            if set(a) != set(b):
                extra = set(a) - set(b)
                name = "logprobs_not_capped" if "logprobs_over5" in tags and set(b) <= set(a) else \
                    "near_tie" if _edge_tie(a, b, self.tie_margin) else "mismatch"
                res.add(where + " top_logprobs", name,
                        f"position {i}: keys differ (+{sorted(extra)[:3]} -{sorted(set(b) - set(a))[:3]})")
                return
            if any((a[k] is None) != (b[k] is None) for k in b):
                res.add(where + " top_logprobs", "mismatch", f"position {i}: null values differ")
                return
            off = max((abs(a[k] - b[k]) for k in b if b[k] is not None), default=0.0)
            if off > self.atol:
                res.add(where + " top_logprobs", "mismatch", f"position {i}: off by {off:.3g}")
                return


def _margin(top: dict) -> float | None:
    vals = sorted(top.values(), reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else None


def _edge_tie(a: dict, b: dict, margin: float) -> bool:
    """Keys differ only where the golden k-th value ties with what replaced it."""
    lo = min(b.values())
    return all(abs(v - lo) < margin for k, v in a.items() if k not in b)


class Replayer:
    """Sends a suite's requests to one server (httpx) and judges the answers."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 extra_body: dict | None = None, atol: float = 1e-4, tie_margin: float = 5e-3,
                 transport=None, timeout: float = 300.0):
        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                 transport=transport)
        self.model, self.extra = model, extra_body or {}
        self.judge = Judge(atol, tie_margin)

    def _post(self, request: dict, stream: bool = False):
        body = {"model": self.model, **request, **self.extra}
        if not stream:
            r = self.http.post("/v1/completions", json=body)
            try:
                return r.status_code, r.json()
            except ValueError:
                return r.status_code, {"_raw": r.text[:200]}
        chunks, done = [], False
        with self.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.json()
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunks.append(json.loads(data))
        return 200, {"chunks": chunks, "done": done}

    def run_case(self, case: dict) -> CaseResult:
        res = CaseResult(case["name"], case["kind"])
        try:
            getattr(self, "_" + case["kind"])(res, case)
        except Exception as exc:  # a crash of one case is a finding, not the end of the run
            res.add("request", "mismatch", f"{type(exc).__name__}: {exc}")
        if not res.findings:
            res.add("all", "ok")
        return res

    def _error(self, res: CaseResult, case: dict) -> None:
        want = case["expect"]
        status, body = self._post(case["request"])
        if status != want["status"]:
            res.add("status", "validation_differs", f"{status} != {want['status']}")
            return
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            res.add("error body", "mismatch", f"no OpenAI error object: {str(body)[:80]}")
        elif err.get("type") != want["error"]["type"]:
            res.add("error type", "error_type_differs", f"{err.get('type')} != {want['error']['type']}")
        else:
            res.add("status", "ok")

    def _completion(self, res: CaseResult, case: dict) -> None:
        status, got = self._post(case["request"])
        if status != 200:
            greedy_n = "greedy_n" in case["tags"] and status == 400
            res.add("status", "greedy_n_refused" if greedy_n else "mismatch",
                    f"{status}: {str(got)[:120]}")
            return
        problem = sdk_validate(got)
        res.add("schema", "mismatch" if problem else "ok", problem or "")
        self.judge.response(res, case, got, case["expect"])
        req = case["request"]
        if req.get("best_of", req.get("n", 1)) == req.get("n", 1):
            self._fold(res, case, {**req, "stream": True, "stream_options": {"include_usage": True}},
                       got)

    def _stream(self, res: CaseResult, case: dict) -> None:
        self._fold(res, case, case["request"], fold(case["expect"]), golden=True)

    def _fold(self, res: CaseResult, case: dict, request: dict, want: dict, golden=False) -> None:
        status, out = self._post(request, stream=True)
        if status != 200:
            res.add("stream status", "mismatch", f"{status}: {str(out)[:120]}")
            return
        chunks = out["chunks"]
        if not out["done"]:
            res.add("stream", "mismatch", "no data: [DONE]")
        errors = [c for c in chunks if "error" in c]
        problems = [p for p in (sdk_validate(c) for c in chunks if "error" not in c) if p]
        if errors or problems:
            res.add("stream chunks", "mismatch", str((errors or problems)[0])[:120])
            return
        if len({c.get("id") for c in chunks}) > 1:
            res.add("stream ids", "mismatch", "chunks carry different ids")
        include_usage = (request.get("stream_options") or {}).get("include_usage")
        if include_usage and not (chunks and chunks[-1].get("choices") == [] and chunks[-1].get("usage")):
            res.add("stream usage", "mismatch", "no final usage chunk with empty choices")
        folded = fold(chunks)
        self.judge.response(res, case, folded, want, prefix="" if golden else "stream-vs-plain ")
        if not golden and include_usage and want.get("usage") and folded["usage"] != want["usage"]:
            res.add("stream usage", "mismatch", f"{folded['usage']} != {want['usage']}")


def run(suite_dir, replayer: Replayer, progress=True) -> list[CaseResult]:
    """Replay every case of a suite; a progress bar goes to stderr, or to the file
    `progress` (None: silent)."""
    from refcomplete.golden import load_suite

    progress = sys.stderr if progress is True else progress
    _, cases = load_suite(suite_dir)
    results = []
    for i, case in enumerate(cases, 1):
        if progress is not None:
            bar = "#" * (30 * i // len(cases))
            progress.write(f"\r[{bar:<30}] {i}/{len(cases)} {case['name'][:28]:<28}")
            progress.flush()
        results.append(replayer.run_case(case))
    if progress is not None:
        progress.write("\n")
    return results


def summary(results: list[CaseResult], waived: set) -> str:
    """A table: case, kind, verdict, and the first non-ok finding."""
    rows = [("case", "kind", "result", "details")]
    for r in results:
        bad = [f for f in r.findings if f[1] != "ok"]
        v = r.verdict(waived)
        detail = "; ".join(f"{c}: {o}" + (" (waived)" if o in waived else "") + (f" {d}" if d else "")
                           for c, o, d in bad[:2])
        rows.append((r.name, r.kind, v.upper() if v == "fail" else v, detail[:110]))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    counts = {v: sum(r.verdict(waived) == v for r in results) for v in ("pass", "dialect", "fail")}
    lines.append(f"\n{counts['pass']} pass, {counts['dialect']} dialect (waived), {counts['fail']} fail"
                 f" of {len(results)} cases")
    return "\n".join(lines)


def report(results: list[CaseResult], waived: set, **meta) -> dict:
    return {**meta, "waived": sorted(waived), "dialects": DIALECTS,
            "cases": [{"name": r.name, "kind": r.kind, "result": r.verdict(waived),
                       "findings": [{"check": c, "outcome": o, "detail": d} for c, o, d in r.findings]}
                      for r in results]}


def add_subcommand(subparsers) -> None:
    """Register `refcomplete compare` on the CLI's subparsers."""
    p = subparsers.add_parser("compare", help="replay a golden suite against a server")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (without /v1)")
    p.add_argument("--model", required=True, help="the model name to send")
    p.add_argument("--suite", default="tests/golden")
    p.add_argument("--api-key")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance on logprobs")
    p.add_argument("--tie-margin", type=float, default=5e-3,
                   help="greedy divergence where the golden top-2 margin is below this is near_tie")
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request")
    p.add_argument("--waive", action="append", default=[], choices=sorted(DIALECTS),
                   help="a named difference to accept (repeatable)")
    p.add_argument("--waive-all-dialects", action="store_true")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    base = args.base_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    waived = set(DIALECTS) if args.waive_all_dialects else set(args.waive)
    rep = Replayer(base, args.model, args.api_key, json.loads(args.extra_body), args.atol,
                   args.tie_margin)
    results = run(args.suite, rep)
    print(summary(results, waived))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report(results, waived, base_url=base, model=args.model, suite=args.suite,
                             atol=args.atol), f, indent=1)
    return 1 if any(r.verdict(waived) == "fail" for r in results) else 0
