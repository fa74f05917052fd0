"""The decode loop on scripted-logits fakes: stops, EOS, length, UTF-8, batching, coins."""

import numpy as np
import pytest

from fakes import BASE, EOT, TOK, FakeModel, ScriptedModel, scripted_text
from refcomplete import rng, sampling
from refcomplete.completions import Completions
from refcomplete.decode import Plan, generate
from refcomplete.sampling import SamplingParams

SCRIPT = "Hello world, it\u2019s me. STOP here"


def complete(model, **kw):
    return Completions({"m": model}).create(model="m", **{"prompt": "Hi", **kw})


def test_stop_string_spanning_tokens_cuts_text_keeps_the_token():
    r = complete(scripted_text(SCRIPT), max_tokens=30, temperature=0, logprobs=0, stop="e. ST")
    c = r["choices"][0]
    assert c["text"] == "Hello world, it\u2019s m" and c["finish_reason"] == "stop"
    assert c["logprobs"]["tokens"][-1] == " STOP"        # the token completing the stop
    assert r["usage"]["completion_tokens"] == len(c["logprobs"]["tokens"]) == 10
    assert c["logprobs"]["text_offset"][-2:] == [2 + len(c["text"])] * 2  # clamped


def test_several_stops_earliest_match_wins():
    c = complete(scripted_text(SCRIPT), max_tokens=30, temperature=0,
                 stop=["STOP", "it", "world, it"])["choices"][0]
    assert c["text"] == "Hello " and c["finish_reason"] == "stop"


def test_stop_string_only_searched_in_generated_text():
    c = complete(scripted_text(" more"), prompt="Hi STOP", max_tokens=5, temperature=0,
                 stop="STOP")["choices"][0]
    assert c["text"] == " more" and c["finish_reason"] == "stop"     # ended by EOS


def test_eos_ends_with_stop_counted_in_logprobs_not_in_text():
    r = complete(scripted_text(" there"), max_tokens=10, temperature=0, logprobs=1)
    c = r["choices"][0]
    assert c["text"] == " there" and c["finish_reason"] == "stop"
    assert c["logprobs"]["tokens"] == [" there", "<|endoftext|>"]
    assert c["logprobs"]["text_offset"] == [2, 8]
    assert r["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_max_tokens_ends_with_length():
    r = complete(scripted_text(SCRIPT), max_tokens=3, temperature=0)
    assert r["choices"][0] == {"text": "Hello world,", "index": 0, "logprobs": None,
                               "finish_reason": "length"}
    assert r["usage"]["completion_tokens"] == 3


def test_max_tokens_null_runs_to_the_context_length():
    model = ScriptedModel([11] * 100, n_ctx=20)
    r = complete(model, prompt=[1, 2, 3], max_tokens=None, temperature=0)
    assert r["usage"]["completion_tokens"] == 17 and r["choices"][0]["finish_reason"] == "length"


def test_utf8_split_tokens_show_bytes_and_whole_character_in_text():
    c = complete(scripted_text("\u2019s"), max_tokens=5, temperature=0, logprobs=0)["choices"][0]
    assert c["text"] == "\u2019s"
    assert c["logprobs"]["tokens"] == ["bytes:\\xe2\\x80", "bytes:\\x99", "s", "<|endoftext|>"]
    assert c["logprobs"]["text_offset"] == [2, 2, 3, 4]


def test_truncated_utf8_at_length_is_replacement_char():
    c = complete(ScriptedModel([447, 447]), max_tokens=1, temperature=0)["choices"][0]
    assert c["text"] == "\ufffd"


def test_finished_rows_are_not_stepped_and_steps_are_batched():
    model = FakeModel()
    plan = Plan(rows=4, max_new_tokens=12, sampling=SamplingParams(), seed=3)
    pieces = list(generate(model, [40, 41], plan))
    ends = {p.row: sum(q.generated for q in pieces if q.row == p.row)
            for p in pieces if p.finish}
    steps = [rows for kind, rows in model.calls if kind == "step"]
    assert model.calls[0] == ("prefill", False)
    for s, rows in enumerate(steps):            # step s feeds token s of each live row
        assert rows == tuple(r for r in range(4) if ends[r] > s + 1)
    assert len(steps) == max(ends.values()) - 1


def test_each_draw_uses_its_own_coin():
    # a flat 4-token distribution: the token is select(p, coin(seed, row, step))
    flat = np.full(50257, -1e4, dtype=np.float32)
    flat[[10, 20, 30, 40]] = 0.0
    model = FakeModel(lambda prompt, gen: flat)
    plan = Plan(rows=3, max_new_tokens=5, sampling=SamplingParams(), seed=-7)
    got = {}
    for p in generate(model, [1], plan):
        for _, t in p.tokens:
            got.setdefault(p.row, []).append(t.id)
    p = sampling.softmax(flat.astype(np.float64))
    for row in range(3):
        assert got[row] == [sampling.select(p, rng.coin(-7, row, s)) for s in range(5)]


def test_penalties_count_only_generated_tokens_per_candidate():
    # token 11 is favoured; a presence penalty of 2 per use flips the choice after one use
    z = BASE.copy()
    z[11], z[13] = 20.0, 19.0
    model = FakeModel(lambda prompt, gen: z)
    c = complete(model, prompt=[11, 11, 11], max_tokens=3, temperature=0, logprobs=0,
                 presence_penalty=2.0)["choices"][0]
    assert c["logprobs"]["tokens"] == [",", ".", ","]   # the prompt's 11s are not counted


def test_logit_bias_bans_and_forces():
    c = complete(scripted_text(" there"), max_tokens=2, temperature=0,
                 logit_bias={"612": -100, "50256": 100})["choices"][0]
    assert c["text"] == "" and c["finish_reason"] == "stop"


@pytest.mark.parametrize("echo", [False, True])
def test_prompt_logits_used_only_with_echo_logprobs(echo):
    model = scripted_text("x")
    complete(model, max_tokens=1, echo=echo, logprobs=1, temperature=0)
    assert model.calls[0] == ("prefill", echo)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_plain_draws_are_the_pipelines_tokens(backend):
    """A plain plan (only temperature and softmax apply, nothing reported) draws through
    sampling.select_plain; the same plan with a trace goes through every stage, and both
    draw the same tokens, row by row, on the bundled model's logits."""
    from refcomplete.registry import load_model

    model = load_model("gpt2-tiny-shakespeare", backend)
    prompt = model.tokenizer.encode("ROMEO:")
    for t in (1.0, 0.6):
        plan = Plan(rows=3, max_new_tokens=12, sampling=SamplingParams(temperature=t), seed=11)
        traced = Plan(**{**plan.__dict__, "trace": True})
        assert plan.plain and not traced.plain
        ids = [[t_.id for _, t_ in p.tokens] for p in generate(model, prompt, plan)]
        assert ids == [[t_.id for _, t_ in p.tokens] for p in generate(model, prompt, traced)]


def test_plan_plain_only_when_nothing_but_the_token_is_reported():
    plan = Plan(rows=1, max_new_tokens=4, sampling=SamplingParams(), seed=0)
    assert plan.plain
    for changed in ({"logprobs": 0}, {"rank": True}, {"trace": True},
                    {"sampling": SamplingParams(top_p=0.5)}):
        assert not Plan(**{**plan.__dict__, **changed}).plain, changed
