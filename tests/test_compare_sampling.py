"""compare --sampling: our own server and a correct sampler with other coins pass; each
deliberately broken sampler (tests/sampling_fakes.py) fails the case built for it, with
the default number of draws; the checks' false-alarm rates, simulated under the null,
stay within the stated ones."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from refcomplete import compare, compare_sampling as cs, stats
from refcomplete.client import EndpointTransport
from refcomplete.compare_replay import Replayer
from refcomplete.registry import load_model
from refcomplete.sampling import SamplingParams, State, run
from refcomplete.server import Endpoint
from sampling_fakes import BUGS, SamplerServer

BUNDLED = "gpt2-tiny-shakespeare"


@pytest.fixture(scope="module")
def model():
    return load_model(BUNDLED)


@pytest.fixture(scope="module")
def cases(model):
    return {c.name: c for c in cs.build_cases(model)}


@pytest.fixture(scope="module")
def exact(model):
    return cs.Exact(model)


def family(cases) -> int:
    """The number of tests of a full run: each case's fit, and PIT + 2 scores along paths."""
    return sum(1 + 3 * (c.max_tokens > 1) for c in cases.values())


def judge(model, transport, cases, names, exact, **kw):
    rep = Replayer("http://fake", BUNDLED, transport=transport)
    res = cs.run_sampling(model, rep, cases=[cases[n] for n in names], exact=exact,
                          progress=None, family=family(cases), **kw)
    return {r.name[len("sampling_"):]: r for r in res}


def test_each_case_nucleus_holds_5_to_200_tokens(model, cases):
    for c in cases.values():
        z = model.logits(model.tokenizer.encode(c.prompt))[-1].astype(np.float64)
        kept = int(np.count_nonzero(run(z, State(c.sampling()))[0] > 0))
        if c.params.get("top_p", 1.0) < 1:
            assert 5 <= kept <= 200, (c.name, kept)
    assert cases["top_p_low_edge"].params["top_p"] < cases["top_p_high_edge"].params["top_p"]


def test_our_server_passes_with_varied_and_without_seeds(model, cases, exact):
    ep = EndpointTransport(Endpoint({BUNDLED: model}))
    for seeds, names in (("vary", ["temperature", "top_p_low_edge", "penalties"]),
                         ("none", ["temperature", "logit_bias"])):
        got = judge(model, ep, cases, names, exact, seeds=seeds)
        for name, r in got.items():
            assert r.verdict(set()) == "pass", (seeds, name, [f for f in r.findings if f.outcome != "ok"])
            lp = next(f for f in r.findings if f.check == "sampled paths logprobs")
            assert lp.data["shift"] < 1e-9 and lp.data["shape"] < 1e-9     # our own logprobs
        draws = next(f for f in got["temperature"].findings if f.check == "sampling draws")
        assert draws.data["draws"] == cs.DRAWS and draws.data["requests"] == cs.DRAWS // cs.BATCH
        assert "TVD" in draws.detail and "over-drawn" in draws.detail


def test_a_correct_sampler_with_other_coins_passes(model, cases, exact):
    got = judge(model, SamplerServer(model), cases, ["top_p", "top_p_high_edge",
                                                     "temperature_top_p", "combined"], exact)
    for name, r in got.items():
        assert r.verdict(set()) == "pass", (name, [f for f in r.findings if f.outcome != "ok"])


def test_a_server_seeding_choice_j_with_seed_plus_j_passes(model, cases, exact):
    """vLLM 0.32: choice j of a request seeded s is the draw of a request seeded s + j; the
    requests' seeds must then lie n apart, or draws repeat (all nine cases failed so)."""
    got = judge(model, SamplerServer(model, seed_per_choice=True), cases,
                ["temperature", "top_p", "presence"], exact)
    for name, r in got.items():
        assert r.verdict(set()) == "pass", (name, [f.detail for f in r.findings if f.outcome != "ok"])


POWER = [   # bug, the case built for it, the finding that must decide it
    ("top_p_plus1", "top_p_high_edge", "outside_nucleus"),
    ("top_p_minus1", "top_p_low_edge", "distribution_misfit"),
    ("temp_after_top_p", "temperature_top_p", "outside_nucleus"),
    ("prompt_penalties", "penalties", "distribution_misfit"),
    ("presence_as_frequency", "presence", "distribution_misfit"),
    ("ignore_bias", "logit_bias", "outside_nucleus"),
    ("float16", "penalties", "mismatch"),        # the logprobs along the paths
    ("ignore_temperature", "temperature", "distribution_misfit"),
]


@pytest.mark.parametrize("bug, case, outcome", POWER, ids=[p[0] for p in POWER])
def test_a_broken_sampler_fails_its_case(model, cases, exact, bug, case, outcome):
    r = judge(model, SamplerServer(model, bug), cases, [case], exact)[case]
    bad = [f for f in r.findings if f.outcome == outcome]
    assert r.verdict(set()) == "fail" and bad, (BUGS[bug], [f.detail for f in r.findings])
    if outcome == "outside_nucleus":
        assert "rank" in bad[0].detail and "mass" in bad[0].detail and bad[0].data["count"] >= 5
    if bug == "float16":                   # every value off a little, not one by a lot
        assert any(f.check == "sampled paths logprobs shape rms" for f in bad), bad
    if outcome == "distribution_misfit":   # beyond the run's per-test level, not by luck
        assert min(f.data["p"] for f in bad) < 0.2 * cs.ALPHA / family(cases)


def test_the_first_token_g_test_false_alarm_rate_is_within_the_stated_one(model, cases):
    """Under the null (draws from our exact distribution), for every single-step case."""
    rng = np.random.default_rng(11)
    reps, level = 100, 0.05
    rates = {}
    for c in (c for c in cases.values() if c.max_tokens == 1):
        z = model.logits(model.tokenizer.encode(c.prompt))[-1].astype(np.float64)
        p = run(z, State(c.sampling()))[0]
        n = c.draws
        ps = [stats.g_test_mc(rng.multinomial(n, p / p.sum()), n * p, rng, 1000)[3]
              for _ in range(reps)]
        rates[c.name] = float(np.mean(np.array(ps) < level))
    sd = math.sqrt(level * (1 - level) / reps)
    assert all(r <= level + 3 * sd for r in rates.values()), rates


class Chain:
    """A small model for simulating paths cheaply: 64 tokens, logits a fixed function of
    the last token, with the real tokenizer's display strings."""

    def __init__(self):
        self.n_vocab, self.name = 64, "chain"
        self.tokenizer = load_model(BUNDLED).tokenizer
        from refcomplete.kernels import fmath
        self.ops = fmath
        self.w = np.random.default_rng(3).standard_normal((64, 64)) * 2.0

    def logits(self, ids):
        return self.w[np.asarray(ids) % 64]


def simulated_draws(chain: Chain, prompt: list, params: SamplingParams, paths: int, steps: int,
                    rng) -> cs.Draws:
    """Paths drawn from our exact distribution, with the logprobs a correct server returns."""
    d = cs.Draws()
    for _ in range(paths):
        path, counts = [], {}
        for _ in range(steps):
            z = chain.logits(prompt + path)[-1].astype(np.float64)
            p = run(z, State(params, dict(counts)))[0]
            t = int(rng.choice(64, p=p / p.sum()))
            path.append(t)
            counts[t] = counts.get(t, 0) + 1
        d.paths.append(path)
        d.logprobs.append({})
    return d


def test_the_pit_and_score_tests_are_calibrated_under_the_null():
    chain, rng = Chain(), np.random.default_rng(7)
    ex = cs.Exact(chain)
    case = cs.Case("sim", "x", {"temperature": 0.9, "top_p": 0.95, "presence_penalty": 0.7,
                                "frequency_penalty": 0.4}, 4, 60)
    prompt = [5, 9, 9, 17]
    found: dict = {}
    for r in range(60):
        o = cs.evaluate(case, prompt, simulated_draws(chain, prompt, case.sampling(), 60, 4, rng), ex, r)
        for check, pv, _ in o.tests:
            found.setdefault(check, []).append(pv)
        assert not o.outside
    for check, ps in found.items():
        ps = np.array(ps)
        assert np.mean(ps < 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(ps)), (check, np.mean(ps < 0.05))
        assert abs(ps.mean() - 0.5) < 0.1, (check, ps.mean())   # p-values look uniform
    assert {"fit", "pit", "score frequency", "score presence"} <= set(found)


def test_a_run_is_held_to_alpha_by_holm():
    rng = np.random.default_rng(2)
    runs = [stats.holm(list(rng.random(21)), cs.ALPHA) for _ in range(4000)]
    assert np.mean([any(r) for r in runs]) <= cs.ALPHA + 3 * math.sqrt(cs.ALPHA / 4000)


def test_a_refused_case_is_a_finding_not_a_crash(model, cases, exact):
    import httpx

    refuse = httpx.MockTransport(lambda req: httpx.Response(400, json={"error": {"message": "no"}}))
    r = judge(model, refuse, cases, ["top_p"], exact)["top_p"]
    assert r.verdict(set()) == "fail" and r.findings[0].check == "status"


def test_the_cli_flags_reach_the_run(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cs, "run_sampling", lambda model, rep, scale, seeds, alpha, cases:
                        seen.update(scale=scale, seeds=seeds, alpha=alpha, model=model.name,
                                    cases=cases) or [])
    ap = argparse.ArgumentParser()
    compare.add_subcommand(ap.add_subparsers())
    args = ap.parse_args(["compare", "--base-url", "http://127.0.0.1:9", "--model", BUNDLED,
                          "--sampling-only", "--sampling-scale", "0.5", "--sampling-seeds", "none"])
    assert args.handler(args) == 0
    assert seen == {"scale": 0.5, "seeds": "none", "alpha": 0.01, "model": BUNDLED,
                    "cases": None}                  # no suite: built from the model
    args = ap.parse_args(["compare", "--base-url", "http://127.0.0.1:9", "--model", BUNDLED,
                          "--sampling-only", "--suite", str(compare.bundled_suite()),
                          "--sampling-scale", "0.5"])
    assert args.handler(args) == 0 and len(seen["cases"]) == 9     # the suite's own
    assert seen["cases"][0].draws == cs.DRAWS // 2
    args = ap.parse_args(["compare", "--base-url", "http://127.0.0.1:9", "--model", "other",
                          "--sampling-only"])
    assert args.handler(args) == 2 and "--sampling-model" in capsys.readouterr().err
