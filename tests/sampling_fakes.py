"""Fake servers for `compare --sampling`: a /v1/completions whose sampler draws with NumPy
(not our coins) from a correct or a deliberately broken distribution.

Knows: the real model's logits (a KV-cache session per request, n rows), the request's
sampling fields, the response shape (text, logprobs 5 plus the sampled token, finish_reason).
Does not know: our sampler's coins. BUGS names each broken variant:

    transport = SamplerServer(model, bug="top_p_plus1")
    rep = Replayer("http://fake", "m", transport=transport)
"""

from __future__ import annotations

import json

import httpx
import numpy as np

BUGS = {
    None: "a correct sampler with NumPy's random numbers",
    "top_p_plus1": "top_p keeps one token too many",
    "top_p_minus1": "top_p keeps one token too few",
    "temp_after_top_p": "temperature applied after top_p",
    "prompt_penalties": "penalties count the prompt's tokens",
    "presence_as_frequency": "presence_penalty applied per occurrence, like frequency",
    "ignore_bias": "logit_bias ignored",
    "float16": "float16 logits",
    "ignore_temperature": "temperature ignored",
}


SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def distribution(z32: np.ndarray, req: dict, counts: dict, prompt_counts: dict, bug=None):
    """(p, raw logprobs) of one step: OpenAI's order, with the named bug."""
    z = (z32.astype(np.float16) if bug == "float16" else z32).astype(np.float64)
    raw = z - z.max() - np.log(np.exp(z - z.max()).sum())
    if bug != "ignore_bias":
        for k, v in (req.get("logit_bias") or {}).items():
            z[int(k)] += v
    c = dict(counts)
    if bug == "prompt_penalties":
        for t, n in prompt_counts.items():
            c[t] = c.get(t, 0) + n
    fp, pp = req.get("frequency_penalty", 0.0), req.get("presence_penalty", 0.0)
    for t, n in c.items():
        z[t] -= fp * n + pp * (n if bug == "presence_as_frequency" else 1)
    temp = 1.0 if bug == "ignore_temperature" else req.get("temperature", 1.0)
    top_p = req.get("top_p", 1.0)
    p = _softmax(z / temp)
    if top_p < 1:
        ranked = _softmax(z) if bug == "temp_after_top_p" else p
        cand = np.flatnonzero(ranked >= ranked.max() * 1e-7)     # holds the nucleus; fast
        if ranked[cand].sum() < top_p:
            cand = np.arange(len(ranked))
        order = cand[np.argsort(-ranked[cand], kind="stable")]
        before = np.concatenate(([0.0], np.cumsum(ranked[order])[:-1]))
        keep = max(1, int(np.count_nonzero(before < top_p)))
        keep += {"top_p_plus1": 1, "top_p_minus1": -1}.get(bug, 0)
        mask = np.zeros(len(p), bool)
        mask[order[:max(1, keep)]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p, raw


class SamplerServer(httpx.BaseTransport):
    """An in-process /v1/completions with its own (possibly broken) sampler."""

    def __init__(self, model, bug=None, seed_per_choice=False):
        assert bug in BUGS
        self.model, self.tok, self.bug, self.requests = model, model.tokenizer, bug, 0
        # vLLM's convention: choice j of a request seeded s draws as a request seeded s + j
        self.seed_per_choice = seed_per_choice
        self._memo: dict = {}       # (sampling fields, context) -> (p, cdf, raw, top-5): draws share prefixes

    def _step(self, fields: str, context: tuple, z, req, counts, pcounts):
        key = (fields, context)
        if key not in self._memo:
            if len(self._memo) > 256:
                self._memo.clear()
            p, raw = distribution(z, req, counts, pcounts, self.bug)
            top = np.argpartition(-raw, 5)[:5]
            self._memo[key] = (np.cumsum(p), raw, {self.tok.display(int(i)): float(raw[i]) for i in top})
        return self._memo[key]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        req = json.loads(request.read())
        self.requests += 1
        return httpx.Response(200, json=self.complete(req), request=request)

    def complete(self, req: dict) -> dict:
        prompt = self.tok.encode(req["prompt"])
        n, steps = req.get("n", 1), req.get("max_tokens", 16)
        seed = req.get("seed")
        if self.seed_per_choice and seed is not None:
            rngs = [np.random.default_rng(seed + r) for r in range(n)]
        else:
            rngs = [np.random.default_rng(seed)] * n
        pcounts = {t: prompt.count(t) for t in set(prompt)}
        sess = self.model.session(prompt, rows=n, max_new_tokens=steps)
        z = np.repeat(sess.prefill()[-1:], n, axis=0)
        paths, lps = [[] for _ in range(n)], [[] for _ in range(n)]
        live = list(range(n))
        fields = json.dumps({k: req.get(k) for k in SAMPLING}, sort_keys=True)
        for _ in range(steps):
            toks = []
            for r, zr in zip(live, z):
                counts = {t: paths[r].count(t) for t in set(paths[r])}
                cdf, raw, top5 = self._step(fields, (req["prompt"], *paths[r]), zr, req, counts, pcounts)
                t = min(int(np.searchsorted(cdf, rngs[r].random() * cdf[-1], side="right")), len(cdf) - 1)
                top = {**top5, self.tok.display(t): float(raw[t])}
                paths[r].append(t)
                lps[r].append((self.tok.display(t), float(raw[t]), top))
                toks.append(t)
            keep = [i for i, t in enumerate(toks) if t != self.tok.eot_id]
            live, toks = [live[i] for i in keep], [toks[i] for i in keep]
            if not live or len(paths[live[0]]) == steps:
                break
            z = sess.step(live, toks)
        choices = []
        for i in range(n):
            choices.append({"index": i, "text": self.tok.decode(paths[i]), "finish_reason":
                            "stop" if paths[i][-1] == self.tok.eot_id else "length",
                            "logprobs": {"tokens": [a for a, _, _ in lps[i]],
                                         "token_logprobs": [b for _, b, _ in lps[i]],
                                         "top_logprobs": [c for _, _, c in lps[i]],
                                         "text_offset": list(range(len(lps[i])))}})
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": req["model"],
                "choices": choices, "usage": None}
