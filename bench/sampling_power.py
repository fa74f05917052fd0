"""Power and false-alarm rates of `refcomplete compare --sampling`, measured (docs/golden.md).

    .venv/bin/python bench/sampling_power.py [--reps 5] [--null-reps 1000] [--chain-reps 300] [--skip-power] [--skip-correct]

Power: each deliberately broken sampler of tests/sampling_fakes.py against the case built
for it, `--reps` times with different seeds and the default number of draws, judged as
in a full run (Holm over all its tests at ALPHA). False alarms: the first-token G-test
simulated under the null from our exact distribution of every single-step case (the
fraction of runs where it alone would reach the run's per-test Bonferroni level and 5%),
and a correct sampler with NumPy's coins over every case, `--reps` times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from refcomplete import compare_sampling as cs, stats  # noqa: E402
from refcomplete.compare_replay import Replayer  # noqa: E402
from refcomplete.registry import load_model  # noqa: E402
from refcomplete.sampling import State, run  # noqa: E402
from sampling_fakes import BUGS, SamplerServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header  # noqa: E402

TARGET = {"top_p_plus1": "top_p_high_edge", "top_p_minus1": "top_p_low_edge",
          "temp_after_top_p": "temperature_top_p", "prompt_penalties": "penalties",
          "presence_as_frequency": "presence", "ignore_bias": "logit_bias",
          "float16": "penalties", "ignore_temperature": "temperature"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--null-reps", type=int, default=1000)
    ap.add_argument("--skip-power", action="store_true")
    ap.add_argument("--chain-reps", type=int, default=0, help="PIT and score tests under the null")
    ap.add_argument("--skip-correct", action="store_true")
    a = ap.parse_args()
    model = load_model("gpt2-tiny-shakespeare")
    cases = {c.name: c for c in cs.build_cases(model)}
    fam = sum(1 + 3 * (c.max_tokens > 1) for c in cases.values())
    level = cs.ALPHA / fam
    ex = cs.Exact(model)
    print(header())
    print(f"{len(cases)} cases, {fam} tests per run, ALPHA {cs.ALPHA} (Bonferroni level {level:.2g})")
    rng = np.random.default_rng(0)
    print("\nfirst-token G-test under the null: fraction of simulated runs below 5% / the level")
    for c in cases.values():
        if c.max_tokens > 1 or not a.null_reps:
            continue
        z = model.logits(model.tokenizer.encode(c.prompt))[-1].astype(np.float64)
        p = run(z, State(c.sampling()))[0]
        ps = np.array([stats.g_test_mc(rng.multinomial(c.draws, p / p.sum()), c.draws * p, rng,
                                       cs.MC_REPS)[3] for _ in range(a.null_reps)])
        print(f"  {c.name:<20} {np.mean(ps < 0.05):.4f} / {np.mean(ps < level):.4f}  "
              f"({a.null_reps} runs of {c.draws} draws)")
    if a.chain_reps:
        from test_compare_sampling import Chain, simulated_draws

        chain, found = Chain(), {}
        cex = cs.Exact(chain)
        case = cs.Case("sim", "x", {"temperature": 0.9, "top_p": 0.95, "presence_penalty": 0.7,
                                    "frequency_penalty": 0.4}, 4, 100)
        for r in range(a.chain_reps):
            d = simulated_draws(chain, [5, 9, 9, 17], case.sampling(), 100, 4, rng)
            for check, pv, _ in cs.evaluate(case, [5, 9, 9, 17], d, cex, r).tests:
                found.setdefault(check, []).append(pv)
        print(f"\npaths under the null ({a.chain_reps} runs of 100 paths x 4 tokens, a 64-token "
              "chain): fraction below 5% / 1% / the level")
        for check, ps in found.items():
            ps = np.array(ps)
            print(f"  {check:<20} {np.mean(ps < 0.05):.4f} / {np.mean(ps < 0.01):.4f} / "
                  f"{np.mean(ps < level):.4f}")
    print("\npower: broken sampler, its case, runs detected, the deciding finding (median p)")
    for bug, name in ({} if a.skip_power else TARGET).items():
        hits, ps, t0, how = 0, [], time.time(), set()
        for r in range(a.reps):
            rep = Replayer("http://fake", "m", transport=SamplerServer(model, bug))
            res = cs.run_sampling(model, rep, cases=[cases[name]], exact=ex, progress=None,
                                  family=fam, base_seed=1000 + r)[0]
            bad = [f for f in res.findings if f.outcome != "ok"]
            hits += res.verdict(set()) == "fail"
            how |= {f.outcome for f in bad}
            ps += [min([f.data["p"] for f in bad if "p" in f.data] or [float("nan")])]
        print(f"  {BUGS[bug]:<58} {name:<18} {hits}/{a.reps}  {sorted(how)} "
              f"(median p {np.nanmedian(ps) if not np.all(np.isnan(ps)) else float('nan'):.2g}) "
              f"{(time.time() - t0) / a.reps:.0f} s/run", flush=True)
    if not a.skip_correct:
        fails, t0 = 0, time.time()
        for r in range(a.reps):
            rep = Replayer("http://fake", "m", transport=SamplerServer(model))
            res = cs.run_sampling(model, rep, exact=ex, progress=None, base_seed=2000 + r)
            fails += any(x.verdict(set()) == "fail" for x in res)
        print(f"\ncorrect sampler (NumPy coins), every case: {fails}/{a.reps} runs with a "
              f"failure, {(time.time() - t0) / a.reps:.0f} s/run")


if __name__ == "__main__":
    main()
