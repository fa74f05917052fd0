"""Judging one server answer against its golden one, for `refcomplete compare`.

Knows: what a completion response must equal (choices, tokens, text, finish_reason,
usage counts, text_offset) and how close its logprobs must be, and the evidence each
dialect needs before it is named (compare_findings.DIALECTS). Does not know: HTTP, streams
or error cases (compare_replay.py).

Logprobs, per position: the common shift is the mean difference over the golden top-k
keys (the token's own logprob when there are none); the shape is what is left of each
difference once that shift is removed. A float32 log_softmax moves every entry of a
position by the same amount (vLLM 0.32: up to 1.4e-4, shape <= 2.4e-5), so the two have
their own tolerances:

    >>> j = Judge()
    >>> j.shift_tol, j.shape_tol, j.shape_rms_tol
    (0.002, 0.005, 0.001)

The shape has two tolerances: on each entry (the largest), and on the root mean square
over all a case's entries. The defaults pass the measured float differences of vLLM 0.32
(float32 log_softmax: shape <= 2.4e-5) and llama-cpp-python 0.3.36 (f16 KV cache: at
most 3.85e-3 on one entry of a sampled path 8 tokens deep, root mean square at most
5.8e-4 per case), and fail wrong logprobs (after temperature, from another step, shifted
by one position), which differ by 1e-2 and more, and float16 logits (rounding every value:
root mean square 1.4e-3 to 1.6e-3 over the sampled paths).
"""

from __future__ import annotations

from refcomplete.compare_findings import list_diff, text_diff

DEFAULT_SHIFT_TOL = 2e-3
DEFAULT_SHAPE_TOL = 5e-3
DEFAULT_SHAPE_RMS_TOL = 1e-3
EOS = "<|endoftext|>"
TOKEN = None          # the key standing for token_logprobs[i] among a position's differences
COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def split_bytes(shown: str) -> bytes:
    """The token bytes behind a golden "bytes:" display (tokenizer.display's inverse):
    printable ASCII as itself, every other byte as \\xNN."""
    body, out, i = shown[len("bytes:"):], bytearray(), 0
    while i < len(body):
        if body[i:i + 2] == "\\x" and len(body) >= i + 4:
            out.append(int(body[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(ord(body[i]) & 0xFF)
            i += 1
    return bytes(out)


def utf8_shown(got: str, want: str) -> bool:
    """A golden split-byte token ("bytes:\\xe2\\x80", "bytes: \\xe6") that the server shows
    as '', as '\ufffd', or by its decodable part with or without '\ufffd' for the partial
    bytes (for b' \\xe6': '', '\ufffd', ' ', ' \ufffd'; llama-cpp-python 0.3.36 shows ' '), or
    with the character it completes (b'\\xb1' after b' \\xe6\\x9d' as ' 東', vLLM 0.32)."""
    if not want.startswith("bytes:"):
        return False
    try:
        valid = split_bytes(want).decode("utf-8", "ignore")
    except ValueError:
        return False
    if got.replace("\ufffd", "") in ("", valid):
        return True
    # the whole character shown on the token that completes it (vLLM 0.32: ' 東' for b'\\xb1')
    return "\ufffd" not in got and got.encode("utf-8").endswith(split_bytes(want))


def _same_token(got, want) -> bool:
    return got == want or (isinstance(got, str) and utf8_shown(got, want))


def _margin(top: dict) -> float | None:
    vals = sorted(v for v in top.values() if v is not None)[::-1]
    return vals[0] - vals[1] if len(vals) > 1 else None


def _edge_tie(a: dict, b: dict, margin: float) -> bool:
    """Keys differ only by near-ties: every golden key the server left out has a value
    within margin of one the server put in instead, and the other way round. (The k-th
    and (k+1)-th entries swapped; on a sampled path the golden also lists the drawn token,
    so the golden's smallest value is not always the one that was swapped.)"""
    extra = [a[k] for k in a if k not in b]
    missing = [b[k] for k in b if k not in a]
    if not extra or len(extra) != len(missing) or None in extra + missing:
        return False
    return all(min(abs(x - y) for y in missing) < margin for x in extra) and \
        all(min(abs(x - y) for x in extra) < margin for y in missing)


def _prompts(case: dict, want: dict) -> int:
    n = case["request"].get("n", 1)
    return max(1, len(want["choices"]) // max(1, n))


class Judge:
    """Compares one answer with the golden one and records findings on a CaseResult."""

    def __init__(self, shift_tol: float = DEFAULT_SHIFT_TOL, shape_tol: float = DEFAULT_SHAPE_TOL,
                 tie_margin: float = 5e-3, shape_rms_tol: float = DEFAULT_SHAPE_RMS_TOL):
        self.shift_tol, self.shape_tol, self.tie_margin = shift_tol, shape_tol, tie_margin
        self.shape_rms_tol = shape_rms_tol

    def response(self, res, case: dict, got: dict, want: dict, prefix: str = "",
                 usage: bool = True) -> None:
        req = case["request"]
        gc, wc = got.get("choices") or [], want["choices"]
        gi, wi = [c.get("index") for c in gc], [c["index"] for c in wc]
        pairs, n_ignored, n = list(zip(gc, wc)), False, req.get("n", 1)
        if gi != wi:
            if n > 1 and gi == list(range(len(gc))) and len(wc) == n * len(gc):
                res.add(prefix + "choices", "n_ignored", f"{len(gc)} choice(s) for n={n}: "
                        f"indices {gi}, golden {wi}", got=gi, want=wi)
                pairs, n_ignored = [(g, wc[i * n]) for i, g in enumerate(gc)], True
            else:
                res.add(prefix + "choices", "mismatch", f"indices {gi} vs {wi} (golden)", got=gi, want=wi)
                return
        dropped = candidates = 0
        for g, w in pairs:
            where = f"{prefix}choice {g.get('index')}" + (
                f" (golden {w['index']})" if g.get("index") != w["index"] else "")
            dropped += self.choice(res, case, g, w, where)
            candidates += (w["finish_reason"] == "stop" and not req.get("stop")
                           and w.get("logprobs") is None and g.get("text") == w["text"])
        if usage:
            self.usage(res, case, got.get("usage"), want, prefix, n_ignored, dropped or candidates)

    def choice(self, res, case: dict, g: dict, w: dict, where: str) -> int:
        """Compare one choice; 1 if the golden's final <|endoftext|> is missing from it."""
        gtext, wtext = g.get("text"), w["text"]
        if "sampled" in case["tags"] and gtext != wtext:
            res.add(where + " text", "sampler_differs", text_diff(str(gtext), wtext), got=gtext, want=wtext)
            return 0
        glp, wlp, dropped = g.get("logprobs"), w["logprobs"], 0
        if wlp and wlp["tokens"] and wlp["tokens"][-1] == EOS and glp and gtext == wtext \
                and g.get("finish_reason") == "stop" \
                and len(glp.get("tokens") or []) == len(wlp["tokens"]) - 1 \
                and all(map(_same_token, glp["tokens"], wlp["tokens"])):
            res.add(where + " tokens", "eos_not_reported", f"{len(glp['tokens'])} tokens; the "
                    f"golden {len(wlp['tokens'])} end with {EOS!r}", index=len(wlp["tokens"]) - 1)
            wlp, dropped = {k: (v[:-1] if isinstance(v, list) else v) for k, v in wlp.items()}, 1
        stop_cut = bool(case["request"].get("stop")) and w["finish_reason"] == "stop"
        cut = self.logprobs(res, case, glp, wlp, where, stop_cut)
        if gtext != wtext and cut is None:
            res.add(where + " text", "mismatch", text_diff(gtext, wtext) if isinstance(gtext, str)
                    else f"text {gtext!r}; golden {wtext[:40]!r}", got=gtext, want=wtext)
        if g.get("finish_reason") != w["finish_reason"] and cut is None:
            res.add(where + " finish_reason", "mismatch",
                    f"{g.get('finish_reason')!r} vs {w['finish_reason']!r} (golden)",
                    got=g.get("finish_reason"), want=w["finish_reason"])
        return dropped

    def usage(self, res, case: dict, got, want: dict, prefix: str = "", n_ignored: bool = False,
              eos: int = 0) -> None:
        """The three counts only (a server may add fields such as prompt_tokens_details)."""
        w = want.get("usage")
        if w is None:
            return
        w = {k: w.get(k) for k in COUNTS}
        if not isinstance(got, dict):
            res.add(prefix + "usage", "mismatch", f"usage {got!r}; golden {w}", got=got, want=w)
            return
        g = {k: got.get(k) for k in COUNTS}
        if g == w:
            return
        tags, req = set(case["tags"]), case["request"]
        gc, wc = g["completion_tokens"], w["completion_tokens"]
        fits = g["prompt_tokens"] == w["prompt_tokens"] and isinstance(gc, int) \
            and g["total_tokens"] == g["prompt_tokens"] + gc
        most = req.get("n", 1) * _prompts(case, want) * req.get("max_tokens", 16)
        name = "mismatch"
        if fits and "echo_max0" in tags and wc == 0 and gc == 1:
            name = "echo_usage"
        elif fits and eos and gc == wc - eos:
            name = "eos_not_reported"
        elif fits and n_ignored and gc < wc:
            name = "n_ignored"
        elif fits and "best_of" in tags and gc < wc and gc <= most:
            name = "best_of_ignored"
        elif fits and "sampled" in tags and gc <= most:
            name = "sampler_differs"
        detail = ", ".join(f"{k} {g[k]} vs {w[k]}" for k in COUNTS if g[k] != w[k]) + " (golden)"
        res.add(prefix + "usage", name, detail, got=g, want=w)

    def logprobs(self, res, case: dict, g, w, where: str, stop_cut: bool = False) -> int | None:
        """Compare logprobs objects; returns the token index of a near-tie divergence, if any."""
        if w is None:
            if g and g.get("tokens"):
                res.add(where + " logprobs", "mismatch", "logprobs returned but not requested")
            return None
        wt = w["tokens"]
        if not g:
            if wt:      # an empty object and none are the same thing for zero tokens
                res.add(where + " logprobs", "mismatch", f"null; the golden has {len(wt)} tokens")
            return None
        gt = list(g.get("tokens") or [])
        m = min(len(gt), len(wt))
        n = next((i for i in range(m) if not _same_token(gt[i], wt[i])), m)
        shown = [i for i in range(n) if gt[i] != wt[i]]
        if shown:
            i = shown[0]
            res.add(where + " tokens", "utf8_display", f"{len(shown)} split-byte token(s) shown "
                    f"differently; tokens[{i}]: {gt[i]!r} vs {wt[i]!r} (golden)", index=i,
                    got=gt[i], want=wt[i])
        cut = None
        if n < m or len(gt) != len(wt):
            tops = w.get("top_logprobs")
            margin = _margin(tops[n]) if n < m and tops and n < len(tops) and tops[n] else None
            if margin is not None and margin < self.tie_margin:
                res.add(where + " tokens", "near_tie", f"tokens[{n}]: {gt[n]!r} vs {wt[n]!r} "
                        f"(golden), golden top-2 margin {margin:.2g}", index=n, margin=margin)
                cut = n
            elif n < m:
                res.add(where + " tokens", "mismatch", f"tokens[{n}]: {gt[n]!r} vs {wt[n]!r} "
                        f"(golden); next {gt[n + 1:n + 4]} vs {wt[n + 1:n + 4]}", index=n,
                        got=gt[n], want=wt[n])
            else:
                res.add(where + " tokens", "mismatch", f"{len(gt)} tokens vs {len(wt)} (golden), "
                        f"the first {m} equal; then {(gt[m:] or wt[m:])[:4]}", index=m)
        self.values(res, case, g, w, n, where)
        if shown and self._own_offsets(res, g, w, n, where):
            return cut
        self.offsets(res, g, w, n, where, stop_cut)
        return cut

    def _own_offsets(self, res, g: dict, w: dict, m: int, where: str) -> bool:
        """With split-byte tokens shown otherwise (utf8_display), text_offset may follow the
        server's own token strings: each offset the previous one plus that token's length,
        from the golden start or from 0 (text_offset_zero). True if it does."""
        go, wo, gt = list((g.get("text_offset") or [])[:m]), list(w["text_offset"][:m]), g["tokens"]
        if go == wo or not go or len(go) != len(wo) or go[0] not in (wo[0], 0):
            return go == wo
        if any(go[i + 1] - go[i] != len(gt[i]) for i in range(len(go) - 1)):
            return False
        if go[0] != wo[0]:
            res.add(where + " text_offset", "text_offset_zero", f"text_offset {go[:2]}... vs "
                    f"{wo[:2]}... (golden): from 0", index=0, got=go[0], want=wo[0])
        res.add(where + " text_offset", "utf8_display", f"text_offset {go} follows the server's "
                f"own token strings (golden {wo})", got=go, want=wo)
        return True

    def values(self, res, case: dict, g: dict, w: dict, m: int, where: str) -> None:
        """token_logprobs and top_logprobs of the first m positions: nulls, keys, shift, shape."""
        tags, req = set(case["tags"]), case["request"]
        gl, wl = list(g.get("token_logprobs") or []), w["token_logprobs"]
        gtop, wtop = g.get("top_logprobs"), w.get("top_logprobs")
        if wtop is None and gtop is not None:
            one = all(t is None or len(t) <= 1 for t in gtop)
            lp0 = "logprobs0" in tags or req.get("logprobs") == 0
            res.add(where + " top_logprobs", "top_logprobs_for_logprobs0" if lp0 and one else
                    "mismatch", f"a list of {len(gtop)} where null was expected")
            gtop = None
        elif wtop is not None and gtop is None and m:
            res.add(where + " top_logprobs", "mismatch", "null where a list was expected")
        first: dict = {}      # finding kind -> (detail, data), the first position of each
        rows = []             # (position, shift, shape, label, got, want)
        entries = []          # every top-k entry's shape difference (the token's without top-k)
        for i in range(m):
            a_t = gl[i] if i < len(gl) else "missing"
            if (a_t is None) != (wl[i] is None) or a_t == "missing":
                first.setdefault("null", (f"token_logprobs[{i}]: {a_t!r} vs {wl[i]!r} (golden)", i))
                continue
            diffs = {} if a_t is None else {TOKEN: (a_t, wl[i])}
            a = gtop[i] if gtop is not None and i < len(gtop) else None
            b = wtop[i] if wtop is not None and gtop is not None else None
            if gtop is not None and wtop is not None and (a is None) != (b is None):
                first.setdefault("null", (f"top_logprobs[{i}]: {a!r} vs {b!r} (golden)", i))
                continue
            loose = {}
            if a is not None and b is not None:
                diffs.update({k: (a[k], b[k]) for k in b if k in a and None not in (a[k], b[k])})
                missing, extra = [k for k in b if k not in a], [k for k in a if k not in b]
                if "logprobs_over5" in tags and extra and not missing:
                    first.setdefault("capped", (f"top_logprobs[{i}]: {len(a)} entries, golden "
                                                f"{len(b)} (logprobs {req.get('logprobs')})", i))
                elif missing and all(k.startswith("bytes:") for k in missing) and extra and \
                        all(utf8_shown(k, missing[0]) for k in extra):
                    loose = {k: (a[k], [b[x] for x in missing]) for k in extra}
                elif missing or extra:
                    kind = "tie" if _edge_tie(a, b, self.tie_margin) else "keys"
                    first.setdefault(kind, (f"top_logprobs[{i}] keys: the server's "
                                            f"{ {k: a[k] for k in extra} }, the golden's "
                                            f"{ {k: b[k] for k in missing} }", i))
            if not diffs:
                continue
            d = {k: ga - wa for k, (ga, wa) in diffs.items()}
            tops = [v for k, v in d.items() if k is not TOKEN]
            shift = sum(tops) / len(tops) if tops else d[TOKEN]
            for k, (ga, choices) in loose.items():     # a split-byte key: its value must fit
                if min(abs(ga - v - shift) for v in choices) > self.shape_tol:
                    first.setdefault("keys", (f"top_logprobs[{i}][{k!r}]: {ga} matches none of "
                                              f"the golden split-byte values {choices}", i))
                else:
                    first.setdefault("utf8", (f"top_logprobs[{i}]: {sorted(loose)} for the "
                                              f"golden's split-byte keys", i))
            k = max(d, key=lambda key: abs(d[key] - shift))
            label = f"token_logprobs[{i}]" if k is TOKEN else f"top_logprobs[{i}][{k!r}]"
            rows.append((i, shift, abs(d[k] - shift), label, *diffs[k]))
            entries.extend(abs(v - shift) for key, v in d.items() if key is not TOKEN or not tops)
        names = {"null": ("token_logprobs", "mismatch"), "keys": ("top_logprobs", "mismatch"),
                 "capped": ("top_logprobs", "logprobs_not_capped"),
                 "utf8": ("top_logprobs", "utf8_display"), "tie": ("top_logprobs", "near_tie")}
        for kind, (detail, i) in first.items():
            check, outcome = names[kind]
            res.add(f"{where} {check}", outcome, detail, index=i)
        if rows:
            self._tolerances(res, rows, entries, where)

    def _tolerances(self, res, rows: list, entries: list, where: str) -> None:
        shifts = [r for r in rows if abs(r[1]) > self.shift_tol]
        shapes = [r for r in rows if r[2] > self.shape_tol]
        big_shift, big_shape = max(rows, key=lambda r: abs(r[1])), max(rows, key=lambda r: r[2])
        if shifts:
            i, s = max(shifts, key=lambda r: abs(r[1]))[:2]
            res.add(where + " logprobs shift", "mismatch", f"position {i}: every entry off by "
                    f"{s:+.3g} on average (tolerance {self.shift_tol:g}); {len(shifts)} of "
                    f"{len(rows)} positions over, first at {shifts[0][0]}", index=i, shift=s)
        if shapes:
            i, s, h, label, got, want = max(shapes, key=lambda r: r[2])
            res.add(where + " logprobs shape", "mismatch", f"{label}: {got!r} vs {want!r} (golden), "
                    f"{h:.3g} off beyond the position's common shift {s:+.3g} (tolerance "
                    f"{self.shape_tol:g}); {len(shapes)} of {len(rows)} positions over, first at "
                    f"{shapes[0][0]}", index=i, got=got, want=want, diff=h, shift=s)
        rms_shift = (sum(r[1] ** 2 for r in rows) / len(rows)) ** 0.5
        rms_shape = (sum(e * e for e in entries) / max(1, len(entries))) ** 0.5
        if rms_shape > self.shape_rms_tol and not shapes:
            res.add(where + " logprobs shape rms", "mismatch", f"root mean square shape difference "
                    f"{rms_shape:.3g} over {len(entries)} entries (tolerance {self.shape_rms_tol:g}): "
                    f"every value a little off, as from float16 logits; the largest "
                    f"{big_shape[2]:.3g} ({big_shape[3]})", rms_shape=rms_shape, entries=len(entries))
        res.add(where + " logprobs", "ok", f"largest common shift {big_shift[1]:+.3g} (position "
                f"{big_shift[0]}), largest shape difference {big_shape[2]:.3g} ({big_shape[3]}); "
                f"root mean square: shift {rms_shift:.2g} over {len(rows)} positions, shape "
                f"{rms_shape:.2g} over {len(entries)} entries", shift=abs(big_shift[1]),
                shape=big_shape[2], rms_shift=rms_shift, rms_shape=rms_shape,
                positions=len(rows), entries=len(entries))

    def offsets(self, res, g: dict, w: dict, m: int, where: str, stop_cut: bool) -> None:
        go, wo = list((g.get("text_offset") or [])[:m]), list(w["text_offset"][:m])
        if go == wo:
            return
        zero = [o - wo[0] for o in wo] if wo else []
        for ref, name in ((wo, None), (zero, "text_offset_zero")):
            j = next((x for x in range(len(ref)) if x >= len(go) or go[x] != ref[x]), len(ref))
            clamped = stop_cut and len(go) == len(ref) and 0 < j < len(ref) and all(
                go[x] > ref[x] == ref[-1] for x in range(j, len(ref)))
            if go == ref or clamped:
                if name:
                    res.add(where + " text_offset", name, f"text_offset {go[:2]}... vs {wo[:2]}... "
                            f"(golden): every offset {wo[0]} less", index=0, got=go[0], want=wo[0])
                if clamped:
                    res.add(where + " text_offset", "offset_not_clamped", f"text_offset[{j}]: "
                            f"{go[j]} vs {ref[j]} (golden, clamped to the end of the text)",
                            index=j, got=go[j], want=ref[j])
                return
        detail, data = list_diff("text_offset", go, wo)
        res.add(where + " text_offset", "mismatch", detail, **data)
