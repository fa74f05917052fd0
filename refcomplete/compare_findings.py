"""What `refcomplete compare` can find: the named dialects, the named failures, a case's
findings and verdict, and how findings are written (diffs, the summary table, the report).

Knows: the names (each dialect with the servers it was seen on), how to describe a
difference so its cause shows (choice, field, index, key, both values, the largest
difference; the first differing character of a text, with context), and which findings
decide a verdict. Does not know: how answers are judged (compare_judge.py) or fetched
(compare_replay.py).

    >>> text_diff("O Romeo, Romeo!", "O Romeo, Juliet!")
    "char 9 of 15/16: 'O Romeo, |Romeo!' vs 'O Romeo, |Juliet!' (golden)"

An outcome is "ok", a dialect (waivable with --waive) or a failure (never waivable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# name: (what it is, the servers it was seen on)
DIALECTS = {
    "text_offset_zero": ("text_offset counts from the completion start, not prompt+text", "vLLM 0.32"),
    "offset_not_clamped": ("the stop-completing token's text_offset is not clamped to the end "
                           "of the text", "vLLM 0.32, llama-cpp-python 0.3.36"),
    "top_logprobs_for_logprobs0": ("logprobs=0 gives one-entry top_logprobs dicts, not null",
                                   "vLLM 0.32, llama-cpp-python 0.3.36"),
    "logprobs_not_capped": ("logprobs above 5 are not clamped to 5",
                            "vLLM 0.32, llama-cpp-python 0.3.36"),
    "utf8_display": ("tokens that split a UTF-8 character are shown as '\ufffd' or '', not in the "
                     "bytes: form", "vLLM 0.32 ('\ufffd' / '', the character on its last token), "
                     "llama-cpp-python 0.3.36 ('', ' ')"),
    "eos_not_reported": ("<|endoftext|> is left out of tokens and usage", "llama-cpp-python 0.3.36"),
    "n_ignored": ("n > 1 is ignored: one choice per prompt", "llama-cpp-python 0.3.36"),
    "best_of_ignored": ("best_of is ignored: only n candidates generated and counted",
                        "vLLM 0.32, llama-cpp-python 0.3.36"),
    "greedy_n_refused": ("n > 1 with temperature 0 is refused with a 400 about n", "vLLM 0.32"),
    "default_prompt_refused": ("a request without a prompt is refused with a 400 about the "
                               "prompt (OpenAI uses <|endoftext|>)", "vLLM 0.32"),
    "sampler_differs": ("seeded sampling draws other tokens (another RNG or sampler order)",
                        "every other server"),
    "echo_usage": ("echo with max_tokens=0 counts completion tokens", "vLLM 0.32 (1)"),
    "no_usage_chunk": ("stream_options.include_usage gives no usage chunk at all",
                       "llama-cpp-python 0.3.36"),
    "usage_null_omitted": ("with include_usage, the chunks before the usage chunk omit usage "
                           "instead of sending usage: null", "vLLM 0.32"),
    "stream_ignores_echo": ("a streamed echo request does not echo the prompt",
                            "llama-cpp-python 0.3.36"),
    "context_clamped": ("a context overflow is accepted and generation cut at the context end",
                        "vLLM 0.32 (511 of 512), llama-cpp-python 0.3.36 (511)"),
    "logit_bias_clamped": ("a logit_bias value outside [-100, 100] is accepted and acts as "
                           "the nearest bound (the same greedy text)",
                           "vLLM 0.32 (101 -> 100), llama-cpp-python 0.3.36"),
    "validation_differs": ("an invalid request is accepted, or refused with another 4xx status",
                           "vLLM 0.32 (4: max_tokens 0, best_of, unknown parameters), "
                           "llama-cpp-python 0.3.36 (12)"),
    "error_type_differs": ("the right status with another error type",
                           "vLLM 0.32 (BadRequestError, NotFoundError; Bad Request with param "
                           "'body.stop')"),
    "near_tie": ("greedy tokens diverge where the golden top-2 margin is under --tie-margin, "
                 "or top_logprobs keys swap between values that close",
                 "llama-cpp-python 0.3.36 (f16 KV cache: top_logprobs along a sampled path, "
                 "with other seeds)"),
}

FAILURES = {
    "mismatch": "a value differs from the golden one",
    "server_error": "HTTP 5xx on a valid request",
    "server_error_on_invalid": "HTTP 5xx on an invalid request (a crash, not a validation rule)",
    "refused_regardless": "the request is refused even without the field the case is about",
    "broken_stream": "a stream cut before data: [DONE], or a chunk that is not JSON",
    "transport_error": "the connection failed (a fresh one is opened for the next request)",
    "outside_nucleus": "--sampling: a draw our processed distribution excludes (top_p, a ban), "
                       "beyond the rounding band at the top_p edge",
    "distribution_misfit": "--sampling: the draws do not fit our processed distribution "
                           "(G-test, PIT or penalty score; Holm over the run)",
}


@dataclass
class Finding:
    check: str            # where: "choice 0 top_logprobs", "stream usage", "status", ...
    outcome: str          # "ok", a DIALECTS name or a FAILURES name
    detail: str = ""
    data: dict = field(default_factory=dict)   # structured: index, key, got, want, diff, ...

    def decides(self, waived: set) -> bool:
        return self.outcome != "ok" and not (self.outcome in DIALECTS and self.outcome in waived)


@dataclass
class CaseResult:
    name: str
    kind: str
    findings: list = field(default_factory=list)

    def add(self, check: str, outcome: str, detail: str = "", **data) -> Finding:
        f = Finding(check, outcome, detail, data)
        self.findings.append(f)
        return f

    def outcomes(self) -> set:
        return {f.outcome for f in self.findings} - {"ok"}

    def verdict(self, waived: set) -> str:
        if any(f.decides(waived) for f in self.findings):
            return "fail"
        return "dialect" if self.outcomes() else "pass"

    def ordered(self, waived: set) -> list:
        """Non-ok findings, those that decide the verdict first."""
        bad = [f for f in self.findings if f.outcome != "ok"]
        return sorted(bad, key=lambda f: not f.decides(waived))


def text_diff(got: str, want: str, context: int = 20) -> str:
    """The first differing character of two texts, with `context` characters around it."""
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    lo = max(0, i - context)
    show = lambda s: ("\u2026" if lo else "") + repr(s[lo:i] + "|" + s[i:i + context])[1:-1] + \
        ("\u2026" if len(s) > i + context else "")
    return f"char {i} of {len(got)}/{len(want)}: '{show(got)}' vs '{show(want)}' (golden)"


def list_diff(name: str, got: list, want: list) -> tuple[str, dict]:
    """First differing index of two lists, both values, how many differ, the largest gap."""
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    if not bad:
        i = min(len(got), len(want))
        return (f"{name}: {len(got)} entries vs {len(want)} (golden); first {i} equal",
                {"index": i, "got_len": len(got), "want_len": len(want)})
    i = bad[0]
    nums = [abs(got[k] - want[k]) for k in bad if isinstance(got[k], (int, float))
            and isinstance(want[k], (int, float))]
    big = f"; largest difference {max(nums):.4g}" if nums else ""
    return (f"{name}[{i}]: {got[i]!r} vs {want[i]!r} (golden); {len(bad)} of {len(want)} differ{big}",
            {"index": i, "got": got[i], "want": want[i], "count": len(bad),
             "largest": max(nums) if nums else None})


def summary(results: list, waived: set) -> str:
    """A table (case, kind, verdict, the finding that decided it, then a count of the rest),
    the totals, each finding name's count, and the largest logprob shift and shape."""
    rows = [("case", "kind", "result", "details")]
    for r in results:
        bad = r.ordered(waived)
        v = r.verdict(waived)
        detail = ""
        if bad:
            f = bad[0]
            detail = f"{f.check}: {f.outcome}" + (" (waived)" if not f.decides(waived) else "") + \
                (f" {f.detail}" if f.detail else "")
            detail = detail if len(detail) <= 240 else detail[:239] + "\u2026"
            detail += f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        rows.append((r.name, r.kind, v.upper() if v == "fail" else v, detail))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    counts = {v: sum(r.verdict(waived) == v for r in results) for v in ("pass", "dialect", "fail")}
    lines.append(f"\n{counts['pass']} pass, {counts['dialect']} dialect (waived), {counts['fail']} fail"
                 f" of {len(results)} cases")
    names: dict = {}
    for r in results:
        for o in r.outcomes():
            names[o] = names.get(o, 0) + 1
    if names:
        lines.append("findings (cases): " + ", ".join(
            f"{o} {k}" + (" (waived)" if o in waived and o in DIALECTS else "")
            for o, k in sorted(names.items(), key=lambda kv: (kv[0] in waived, -kv[1], kv[0]))))
    spread = [(f.data["shift"], f.data["shape"], r.name) for r in results for f in r.findings
              if "shift" in f.data and "shape" in f.data]
    if spread:
        s, sc = max((abs(x[0]), x[2]) for x in spread)
        h, hc = max((x[1], x[2]) for x in spread)
        lines.append(f"logprobs: largest common shift {s:.3g} ({sc}), "
                     f"largest shape difference {h:.3g} ({hc})")
    return "\n".join(lines)


def report(results: list, waived: set, **meta) -> dict:
    """Every finding of every case, as JSON-ready data."""
    return {**meta, "waived": sorted(waived),
            "dialects": {k: {"what": w, "seen_on": s} for k, (w, s) in DIALECTS.items()},
            "failures": FAILURES,
            "cases": [{"name": r.name, "kind": r.kind, "result": r.verdict(waived),
                       "findings": [{"check": f.check, "outcome": f.outcome, "detail": f.detail,
                                     "decides": f.decides(waived), **({"data": f.data} if f.data else {})}
                                    for f in r.findings]}
                      for r in results]}
