"""n, best_of, prompt lists: indices, ranking, ties, usage (SEMANTICS 8)."""

import pytest

from fakes import FakeModel
from refcomplete.choices import mean_raw_logprob
from refcomplete.completions import Completions

API = Completions({"m": FakeModel()})


def create(**kw):
    return API.create(model="m", **{"prompt": "Hi", "max_tokens": 5, "seed": 11, **kw})


def test_prompt_list_times_n_index_order():
    r = create(prompt=["a", "b", "c"], n=2)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3, 4, 5]
    for i, p in enumerate(["a", "b", "c"]):
        alone = create(prompt=p, n=2)["choices"]
        assert [c["text"] for c in r["choices"][2 * i: 2 * i + 2]] == [c["text"] for c in alone]


def test_usage_counts_each_prompt_once_and_every_candidate():
    r = create(prompt=["a b", "c"], n=2, best_of=3, logprobs=0)
    assert r["usage"]["prompt_tokens"] == 3
    seen = sum(len(c["logprobs"]["tokens"]) for c in r["choices"])
    assert r["usage"]["completion_tokens"] >= seen      # best_of losers count too
    full = create(prompt=["a b", "c"], n=3, logprobs=0)
    assert r["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]


def test_best_of_returns_the_n_best_by_mean_raw_logprob_best_first():
    everyone = create(n=6, logprobs=0, max_tokens=6)["choices"]
    mean = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])
            for c in everyone]
    order = sorted(range(6), key=lambda j: (-mean[j], j))
    best = create(n=2, best_of=6, logprobs=0, max_tokens=6)["choices"]
    assert [c["index"] for c in best] == [0, 1]
    assert [c["text"] for c in best] == [everyone[j]["text"] for j in order[:2]]
    assert [c["logprobs"] for c in best] == [everyone[j]["logprobs"] for j in order[:2]]


def test_best_of_ranking_uses_raw_logprobs_even_in_processed_mode():
    a = create(n=1, best_of=5, logprobs=0, logprobs_mode="processed", top_p=0.5)["choices"]
    b = create(n=1, best_of=5, logprobs=0, top_p=0.5)["choices"]
    assert a[0]["text"] == b[0]["text"]


def test_best_of_ties_go_to_the_lower_candidate():
    r = create(n=2, best_of=4, temperature=0, logprobs=0)
    assert r["choices"][0]["text"] == r["choices"][1]["text"]   # greedy: all tie


def test_best_of_equal_n_keeps_candidate_order():
    a, b = create(n=3, best_of=3), create(n=3)
    assert a["choices"] == b["choices"]


def test_greedy_n_gives_identical_choices():
    r = create(n=3, temperature=0)
    assert len({c["text"] for c in r["choices"]}) == 1


def test_mean_of_no_tokens_is_zero():
    assert mean_raw_logprob([]) == 0.0


@pytest.mark.parametrize("n,best_of", [(1, 3), (2, 2)])
def test_echo_with_best_of(n, best_of):
    r = create(prompt="Hey you", echo=True, logprobs=1, n=n, best_of=best_of, max_tokens=2)
    assert all(c["text"].startswith("Hey you") for c in r["choices"])
