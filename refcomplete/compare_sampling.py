"""`refcomplete compare --sampling`: a server's sampler against our exact processed distribution.

Knows: the sampling cases (prompts and parameters; the top_p edges and the biased tokens
are chosen from our model's own distribution), how draws are asked for (the server's own
seed, varied per request, or no seed: never our coins), our exact distribution of every
draw (sampling.run on the model's logits for the draw's own prefix: logit_bias,
penalties counted over the draw's own tokens, temperature, top_p; SEMANTICS 1-2) and the
checks: membership, goodness of fit (a pooled G-test of the first tokens, a randomised PIT
and penalty score tests along multi-token paths, Holm-corrected over the whole run at
ALPHA) and the logprobs along each sampled path (compare_judge's tolerances). Does not
know: HTTP (compare_replay.Replayer sends), the statistics' formulas (stats.py).

    results = run_sampling(load_model("gpt2-tiny-shakespeare"), replayer)   # [CaseResult]

Each draw is a choice of a request with `n` (BATCH per request) and `logprobs` 5; the
choices of one seeded request must be independent draws (ours: the candidate index
enters the coin; vLLM: seed + index).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from refcomplete import stats
from refcomplete.compare_findings import CaseResult
from refcomplete.sampling import SamplingParams, State, run, top_k

DRAWS = 2000          # first-token draws per single-step case
PATHS = 300           # paths per multi-token case
ALPHA = 0.01          # the run's family-wise false-alarm rate (Holm over every test of every case)
BAND = 1e-3           # a token outside the nucleus by less than this mass is a rounding, not a bug
EDGE = 5e-3           # how far the top_p edge cases set top_p from a token's edge
IMPOSSIBLE = 1e-12    # a drawn token below this probability is outside the support
BATCH = 50            # n per request
MC_REPS = 20000       # null runs behind the G-test's p-value (its smallest: 5e-5)
TOP = 5

JULIET, CITIZEN, ROMEO = "JULIET:\nI", "First Citizen:\nBefore we proceed any further, hear me", \
    "ROMEO:\nO Romeo, Romeo"


@dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    params: dict                          # the request's sampling fields
    max_tokens: int = 1
    draws: int = DRAWS
    targets: str = ""                     # the bugs it is built to catch

    def sampling(self) -> SamplingParams:
        p = self.params
        return SamplingParams(p.get("temperature", 1.0), p.get("top_p", 1.0),
                              p.get("presence_penalty", 0.0), p.get("frequency_penalty", 0.0),
                              tuple(sorted((int(k), float(v)) for k, v in p.get("logit_bias", {}).items())))


def build_cases(model, scale: float = 1.0) -> list[Case]:
    """The cases, with the top_p edges and the biased tokens read off our own distribution."""
    tok = model.tokenizer
    z = model.logits(tok.encode(JULIET))[-1].astype(np.float64)
    q = run(z, State(SamplingParams(), ops=model.ops))[0]
    qs = np.sort(q)[::-1]
    before = np.concatenate(([0.0], np.cumsum(qs)[:-1]))
    # keep k + 1 tokens (k >= 4), the last kept and the first dropped both likely enough
    # to be drawn often; top_p just above the last kept token's edge, or just below the
    # first dropped one's, by EDGE (beyond BAND, and beyond float32 or f16 rounding)
    k = next((i for i in range(4, 200) if qs[i] >= 0.02 and qs[i + 1] >= 0.015), 4)
    edge = min(EDGE, qs[k] / 4, qs[k + 1] / 4)
    lo, hi = float(before[k] + edge), float(before[k + 1] - edge)
    zc = model.logits(tok.encode(CITIZEN))[-1].astype(np.float64)
    ranked = top_k(zc, 40, ops=model.ops)
    bias = {str(ranked[0]): -100, str(ranked[12]): 3.0, str(ranked[30]): 1.5}   # ban the top token
    n1, nk = max(100, int(DRAWS * scale)), max(50, int(PATHS * scale))
    return [
        Case("temperature", JULIET, {"temperature": 0.7}, 1, n1, "temperature ignored"),
        Case("top_p", CITIZEN, {"temperature": 1.0, "top_p": 0.9}, 1, n1, "nucleus"),
        Case("top_p_low_edge", JULIET, {"temperature": 1.0, "top_p": lo}, 1, n1,
             "top_p keeps one token too few"),
        Case("top_p_high_edge", JULIET, {"temperature": 1.0, "top_p": hi}, 1, n1,
             "top_p keeps one token too many"),
        Case("temperature_top_p", JULIET, {"temperature": 0.7, "top_p": 0.8}, 1, n1,
             "temperature applied after top_p"),
        Case("logit_bias", CITIZEN, {"temperature": 1.0, "top_p": 0.9, "logit_bias": bias}, 1, n1,
             "logit_bias ignored"),
        Case("penalties", ROMEO, {"temperature": 1.0, "presence_penalty": 0.8,
                                  "frequency_penalty": 0.6}, 4, nk, "penalties counting the prompt"),
        Case("presence", ROMEO, {"temperature": 1.0, "top_p": 0.95, "presence_penalty": -2.0}, 8, nk,
             "presence applied as frequency"),
        Case("combined", JULIET, {"temperature": 0.8, "top_p": 0.9, "presence_penalty": 0.4,
                                  "frequency_penalty": 0.3, "logit_bias": {str(ranked[3]): 1.0}},
             4, nk, "the stages together"),
    ]


def cases_to_json(cases: list[Case]) -> list[dict]:
    """The cases as `refcomplete golden` writes them into a suite (sampling.json)."""
    return [asdict(c) for c in cases]


def cases_from_json(items: list[dict], scale: float = 1.0) -> list[Case]:
    """A suite's cases, their draws scaled as build_cases scales its own."""
    out = []
    for item in items:
        c = Case(**item)
        floor = 50 if c.max_tokens > 1 else 100
        out.append(replace(c, draws=max(floor, int(c.draws * scale))) if scale != 1.0 else c)
    return out


class Exact:
    """Our side: next-token logits of any prefix and the processed distribution of a step
    (a small LRU: draws share their short prefixes)."""

    def __init__(self, model, size: int = 96):
        self.model, self.tok, self.ops = model, model.tokenizer, model.ops
        self._rows: OrderedDict = OrderedDict()
        self.size = size
        self.ids = {self.tok.display(i): i for i in range(model.n_vocab)}

    def heads_logits(self, prompt: list[int], heads: list[tuple], chunk: int = 32):
        """Yield (head, float32 [len(head) + 1, V]): the next-token logits after the prompt
        and after each token of head; a KV-cache session per chunk of heads (a model
        without sessions: one prefill per head)."""
        for c0 in range(0, len(heads), chunk):
            part = heads[c0:c0 + chunk]
            if not hasattr(self.model, "session"):
                for h in part:
                    yield h, self.model.logits(prompt + list(h))[len(prompt) - 1:]
                continue
            steps = max(len(h) for h in part)
            sess = self.model.session(prompt, rows=len(part), max_new_tokens=max(steps, 1))
            z0 = np.array(sess.prefill()[-1])
            rows = [[z0] for _ in part]
            for k in range(steps):
                live = [r for r, h in enumerate(part) if len(h) > k]
                z = np.array(sess.step(live, [part[r][k] for r in live]))
                for j, r in enumerate(live):
                    rows[r].append(z[j])
            yield from ((h, np.stack(r)) for h, r in zip(part, rows))

    def step(self, key: tuple, z: np.ndarray, params: SamplingParams, counts: dict) -> dict:
        """p (processed), q (after softmax, before top_p), the raw logprob row's top-k."""
        if key in self._rows:
            self._rows.move_to_end(key)
            return self._rows[key]
        p, seen = run(z, State(params, counts, ops=self.ops), trace=True)
        ids = top_k(z, TOP, ops=self.ops)
        row = {"p": p, "q": dict(seen)["softmax"], "z": z,
               "top": dict(zip(ids, self.ops.log_softmax_at(z, np.array(ids)).tolist()))}
        self._rows[key] = row
        if len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return row

    def logprob(self, row: dict, token: int) -> float:
        return float(self.ops.log_softmax_at(row["z"], np.array([token]))[0])


@dataclass
class Draws:
    paths: list = field(default_factory=list)       # [token ids]
    logprobs: list = field(default_factory=list)    # the server's logprobs object per path
    requests: int = 0
    unmapped: list = field(default_factory=list)    # token strings with no id
    refused: tuple | None = None                    # (status, body) of a request not answered 200


def collect(case: Case, rep, exact: Exact, seeds: str = "vary", base_seed: int = 0,
            progress=None) -> Draws:
    """Ask the server for case.draws choices, BATCH per request."""
    out = Draws()
    body = {"prompt": case.prompt, "max_tokens": case.max_tokens, "logprobs": TOP, **case.params}
    while len(out.paths) < case.draws and out.requests < 4 * (case.draws // BATCH + 1):
        req = {**body, "n": min(BATCH, case.draws - len(out.paths))}
        if seeds == "vary":     # BATCH apart: servers that seed choice j with seed + j (vLLM)
            req["seed"] = base_seed * 1_000_003 + out.requests * BATCH    # draw no choice twice
        status, got = rep._post(req)
        out.requests += 1
        if status != 200:
            out.refused = (status, str(got)[:200])
            break
        for ch in got.get("choices") or []:
            lp = ch.get("logprobs") or {}
            strings = lp.get("tokens")
            if strings is None:                               # no logprobs: the text, if one token
                enc = exact.tok.encode(ch.get("text") or "")
                strings = [exact.tok.display(enc[0])] if len(enc) == 1 and case.max_tokens == 1 else None
            ids = None if strings is None else [exact.ids.get(s) for s in strings]
            if ids is None or None in ids:
                out.unmapped.append(repr(ch.get("text")) if strings is None else
                                    next(s for s, i in zip(strings, ids) if i is None))
                continue
            out.paths.append(ids)
            out.logprobs.append(lp)
        if progress is not None:
            progress(len(out.paths))
    return out


@dataclass
class Outcome:
    """One case's evidence before the run-wide correction."""
    tests: list = field(default_factory=list)        # (check, p, detail)
    outside: list = field(default_factory=list)      # (token, step, rank, mass, why)
    boundary: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    got_lp: dict = field(default_factory=lambda: {"token_logprobs": [], "top_logprobs": []})
    want_lp: dict = field(default_factory=lambda: {"token_logprobs": [], "top_logprobs": [],
                                                  "tokens": [], "text_offset": []})


def evaluate(case: Case, prompt: list[int], draws: Draws, exact: Exact, seed: int = 0) -> Outcome:
    """Membership, the first-token G-test, along paths the PIT and the penalty scores, and
    the logprobs rows to judge."""
    out, params, rng = Outcome(), case.sampling(), np.random.default_rng(seed)
    first = np.zeros(exact.model.n_vocab)
    pits, scores = [], {}
    by_head: dict = {}                  # draws that share all but their last token share logits
    for i, path in enumerate(draws.paths):
        by_head.setdefault(tuple(path[:-1]), []).append(i)
    p0, key = None, (tuple(prompt), params)
    heads = exact.heads_logits(prompt, sorted(by_head))
    for i, zs in ((i, zs) for head, zs in heads for i in by_head[head]):
        path, lp = draws.paths[i], draws.logprobs[i]
        counts: dict = {}
        for k, t in enumerate(path):
            row = exact.step((key, tuple(path[:k])), zs[k].astype(np.float64), params, dict(counts))
            p, q = row["p"], row["q"]
            p0 = p if k == 0 else p0
            if p[t] < IMPOSSIBLE:
                rank = 1 + int(np.count_nonzero(q > q[t]))
                mass_before = float(q[q > q[t]].sum())
                why = "bias/penalty" if p[t] > 0 or params.top_p >= 1 else "top_p"
                entry = (exact.tok.display(t), t, k, rank, float(q[t]), mass_before, why)
                (out.boundary if why == "top_p" and mass_before < params.top_p + BAND
                 else out.outside).append(entry)
            elif k == 0:
                first[t] += 1
            else:
                pits.append(stats.pit(p, t, rng.random()))
            if (params.presence_penalty or params.frequency_penalty) and counts:
                # the penalties' directions: the draw's own counts and presence (penalties
                # that count the prompt show in the first-token G-test already)
                for name, f in (("frequency", counts), ("presence", dict.fromkeys(counts, 1))):
                    d, v = stats.score_term(p, f, t)
                    s = scores.setdefault(name, [0.0, 0.0])
                    s[0], s[1] = s[0] + d, s[1] + v
            _logprob_row(out, exact, row, t, lp, k)
            counts[t] = counts.get(t, 0) + 1
    n = int(first.sum())
    if n:
        g, df, pc, pv = stats.g_test_mc(first, n * p0, rng, MC_REPS)
        out.tests.append(("fit", pv, f"G-test of {n} first tokens: G {g:.1f}, df {df} "
                                     f"(chi-square p {pc:.2g}; p by {MC_REPS} Monte Carlo runs)"))
        out.notes.update(_spread(first, p0, exact, rng))
    if len(pits) >= 50:
        x2, df, pv = stats.uniform_chi2(pits)
        out.tests.append(("pit", pv, f"randomised PIT of {len(pits)} later tokens: X2 {x2:.1f}, df {df}"))
    for name, (s, v) in scores.items():
        if v >= 3:
            z = s / np.sqrt(v)
            out.tests.append((f"score {name}", stats.normal_sf2(z),
                              f"{name} score over the paths: z {z:+.2f}"))
    out.notes.update(draws=len(draws.paths), requests=draws.requests,
                     nucleus=int(np.count_nonzero(p0 > 0)) if p0 is not None else 0)
    return out


def _logprob_row(out: Outcome, exact: Exact, row: dict, t: int, lp: dict, k: int) -> None:
    gl, gt = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    own = row["top"][t] if t in row["top"] else exact.logprob(row, t)
    # OpenAI lists the sampled token too: top_logprobs may hold k + 1 entries
    top = {exact.tok.display(i): v for i, v in {**row["top"], t: own}.items()}
    out.want_lp["tokens"].append(exact.tok.display(t))
    out.want_lp["text_offset"].append(0)
    out.want_lp["token_logprobs"].append(own)
    out.want_lp["top_logprobs"].append(top)
    out.got_lp["token_logprobs"].append(gl[k] if k < len(gl) else "missing")
    out.got_lp["top_logprobs"].append(gt[k] if k < len(gt) else None)


def _spread(counts: np.ndarray, p: np.ndarray, exact: Exact, rng) -> dict:
    """TVD (and what sampling noise alone gives), the most over- and under-drawn tokens."""
    n = int(counts.sum())
    e = n * p
    noise = float(np.mean([stats.tvd(rng.multinomial(n, p / p.sum()), p) for _ in range(20)]))
    ids = np.flatnonzero((e >= 1) | (counts > 0))
    resid = counts[ids] - e[ids]                    # in draws: the tokens that matter most
    show = lambda j: f"{exact.tok.display(int(ids[j]))!r} {int(counts[ids[j]])} vs {e[ids[j]]:.1f}"
    return {"tvd": stats.tvd(counts, p), "tvd_noise": noise,
            "over": [show(j) for j in np.argsort(-resid)[:3] if resid[j] > 0],
            "under": [show(j) for j in np.argsort(resid)[:3] if resid[j] < 0]}


def run_sampling(model, rep, scale: float = 1.0, seeds: str = "vary", alpha: float = ALPHA,
                 progress=True, cases: list | None = None, exact: Exact | None = None,
                 base_seed: int = 0, family: int = 0) -> list[CaseResult]:
    """Every sampling case against the server behind `rep` (a compare_replay.Replayer).
    family: correct for at least this many tests (a subset of cases judged as in a full run)."""
    from refcomplete.compare_judge import Judge

    progress = sys.stderr if progress is True else progress
    exact = exact or Exact(model)
    cases = cases if cases is not None else build_cases(model, scale)
    total, done, t0 = sum(c.draws for c in cases), 0, time.time()
    outcomes = []
    for c in cases:
        def bar(n, c=c, done=done):
            k = done + n
            if progress is not None and (n == c.draws or n % (4 * BATCH) == 0):
                progress.write(f"\r[{'#' * (30 * k // total):<30}] {k}/{total} draws "
                               f"sampling_{c.name[:20]:<20}")
                progress.flush()
        draws = collect(c, rep, exact, seeds, base_seed * 97 + len(outcomes), bar)
        done += c.draws
        outcomes.append((c, draws, None if draws.refused or not draws.paths else
                         evaluate(c, exact.tok.encode(c.prompt), draws, exact, base_seed)))
    if progress is not None:
        progress.write(f"\n{done} draws in {sum(d.requests for _, d, _ in outcomes)} requests, "
                       f"{time.time() - t0:.0f} s\n")
    flat = [(i, t) for i, (_, _, o) in enumerate(outcomes) if o for t in o.tests]
    pad = max(0, family - len(flat))
    reject = stats.holm([t[1] for _, t in flat] + [1.0] * pad, alpha)[:len(flat)]
    level = alpha / max(1, len(flat) + pad)
    results = []
    for i, (c, d, o) in enumerate(outcomes):
        res = CaseResult("sampling_" + c.name, "sampling")
        results.append(res)
        if o is None:
            status, body = d.refused or (200, "no choices")
            res.add("status", "server_error" if status >= 500 else "mismatch",
                    f"HTTP {status} {body} (request {d.requests} of the case)" if d.refused else
                    f"{len(d.unmapped)} choices, none with tokens that name vocabulary entries",
                    got=status, want=200)
            continue
        _findings(res, c, d, o, [(t, r) for (j, t), r in zip(flat, reject) if j == i], alpha, level)
        judge = rep.judge if isinstance(getattr(rep, "judge", None), Judge) else Judge()
        judge.values(res, {"tags": [], "request": {"logprobs": TOP}}, o.got_lp, o.want_lp,
                     len(o.want_lp["tokens"]), "sampled paths")
    return results


def _findings(res: CaseResult, c: Case, d: Draws, o: Outcome, tests: list, alpha: float,
              level: float) -> None:
    n = o.notes
    res.add("sampling draws", "ok", f"{n['draws']} draws ({c.max_tokens} token(s) each) in "
            f"{n['requests']} requests; nucleus {n['nucleus']} tokens; TVD {n.get('tvd', 0):.3f} "
            f"(noise alone {n.get('tvd_noise', 0):.3f}); over-drawn {n.get('over')}, under-drawn "
            f"{n.get('under')}; targets: {c.targets}", params=c.params, **n)
    if d.unmapped:
        res.add("sampling tokens", "mismatch", f"{len(d.unmapped)} choice(s) with a token that "
                f"names no vocabulary entry, e.g. {d.unmapped[0]!r}", count=len(d.unmapped))
    if o.outside:
        text, t, k, rank, mass, before, why = o.outside[0]
        ids = {e[1] for e in o.outside}
        res.add("sampling membership", "outside_nucleus", f"{len(o.outside)} draw(s) of "
                f"{len(ids)} token(s) outside the support; first {text!r} (id {t}) at step {k}: "
                f"rank {rank}, mass {mass:.4g}, mass before it {before:.4f}" +
                (f" >= top_p {c.params.get('top_p')}" if why == "top_p" else f" ({why})"),
                token=t, rank=rank, mass=mass, count=len(o.outside))
    else:
        res.add("sampling membership", "ok", f"every draw inside the support"
                + (f"; {len(o.boundary)} at the top_p edge within {BAND:g}" if o.boundary else ""))
    for (check, pv, detail), rejected in tests:
        res.add("sampling " + check, "distribution_misfit" if rejected else "ok",
                f"{detail}, p {pv:.3g} (Holm over the run at {alpha:g}; per test at least {level:.2g})",
                p=pv)
