"""trace.record and format_trace on hand-built distributions, and through create()."""

import numpy as np

from fakes import FakeModel

from refcomplete import rng
from refcomplete import sampling as S
from refcomplete.completions import Completions
from refcomplete.tokenizer import get_tokenizer
from refcomplete.trace import format_trace, interval, record

TOK = get_tokenizer()
Z = np.log(np.array([0.1, 0.4, 0.3, 0.2, 1e-3, 1e-3, 1e-3]))      # 7 tokens


def step(z=Z, coin=0.5, **params):
    st = S.State(S.SamplingParams(**params), counts={})
    x, seen = S.run(z, st, trace=True)
    token = S.greedy(x) if st.params.greedy else S.select(x, coin)
    return record(TOK, 0, z, seen, None if st.params.greedy else coin, token), x


def test_top_p_stage_reports_kept_count_and_mass():
    rec, _ = step(top_p=0.5)
    tp = rec["stages"][-1]
    assert tp["stage"] == "top_p" and tp["kept"] == 2
    assert np.isclose(tp["mass"], 0.7 / (1 + 3e-3))         # 0.4 + 0.3 before renormalising
    rec0, _ = step(top_p=0.0)
    assert rec0["stages"][-1]["kept"] == 1 and rec0["token"] == 1


def test_chosen_probability_is_reported_even_outside_the_top():
    rec, x = step(coin=0.9999, temperature=2.0)      # lands on the last id: a 1e-3 token
    assert rec["token"] == 6
    assert all(6 not in [t for _, t, _ in st["top"]] for st in rec["stages"])
    assert np.isclose(rec["stages"][-1]["chosen"], x[6])
    table = format_trace([rec])
    assert table.splitlines()[-1].lstrip().startswith("*")   # the extra row for the chosen token
    assert f"{x[6]:6.3f}" in table.splitlines()[-1]


def test_interval_holds_the_coin_and_matches_select():
    p = S.softmax(np.random.default_rng(3).standard_normal(50))
    p = S.top_p(p, S.State(S.SamplingParams(top_p=0.8)))
    for u in np.linspace(0, 1, 101)[:-1]:
        t = S.select(p, u)
        lo, hi = interval(p, t)
        assert lo <= u < hi or np.isclose(u, hi) or np.isclose(u, lo)
    edges = [interval(p, int(t))[0] for t in np.flatnonzero(p)]
    assert edges[0] == 0.0 and edges == sorted(edges)


def test_greedy_has_no_coin_interval_or_top_p_fields():
    rec, _ = step(temperature=0.0)
    assert rec["coin"] is None and rec["interval"] is None
    assert [st["stage"] for st in rec["stages"]] == ["raw", "logit_bias", "penalties"]
    assert all("kept" not in st for st in rec["stages"])
    assert "greedy" in format_trace([rec])


def test_candidate_is_recorded_when_given():
    st = S.State(S.SamplingParams(), counts={})
    x, seen = S.run(Z, st, trace=True)
    rec = record(TOK, 2, Z, seen, 0.3, S.select(x, 0.3), candidate=4)
    assert rec["candidate"] == 4 and list(rec)[:2] == ["step", "candidate"]
    assert format_trace([rec]).startswith("candidate 4  step 2")


def test_format_trace_can_show_only_some_stages():
    rec, _ = step(top_p=0.5)
    table = format_trace([rec], stages=("raw", "top_p"))
    header = table.splitlines()[1].split()
    assert header == ["raw", "top_p"] and "kept 2" in table.splitlines()[0]
    whole, _ = step()                                      # top_p = 1 removes nothing: not shown
    assert "kept" not in format_trace([whole]) and whole["stages"][-1]["kept"] == 7


def test_each_traced_coin_is_the_documented_coin_and_lies_in_its_interval():
    api = Completions({"m": FakeModel()})
    r = api.create(model="m", prompt="Hi", max_tokens=6, trace=True, seed=11, top_p=0.9, n=2)
    for c in r["choices"]:
        for s in c["trace"]:
            assert s["coin"] == rng.coin(11, c["index"], s["step"])
            lo, hi = s["interval"]
            assert lo - 1e-12 <= s["coin"] <= hi + 1e-12
            tp = s["stages"][-1]
            assert tp["kept"] >= 1 and (tp["mass"] >= 0.9 or tp["kept"] == 1)
