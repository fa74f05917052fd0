"""The logprobs object (SEMANTICS 5, 6): values, shapes, echo, modes."""

import numpy as np
import pytest

from fakes import TOK, FakeModel, hashed_logits
from refcomplete import sampling
from refcomplete.completions import Completions
from refcomplete.logprobs import Token, block, concat

API = Completions({"m": FakeModel()})


def create(**kw):
    return API.create(model="m", **{"prompt": "Hi", "max_tokens": 6, "seed": 1, **kw})


def raw_lp(prompt, generated):
    z = hashed_logits(tuple(prompt), tuple(generated)).astype(np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_block_shapes():
    entries = [(5, Token(11, -0.25, ((11, -0.25),))), (6, Token(13, -2.0, ((11, -0.1),)))]
    assert block(TOK, entries, None) is None
    assert block(TOK, entries, 0)["top_logprobs"] is None
    b = block(TOK, entries, 1)
    assert b == {"tokens": [",", "."], "token_logprobs": [-0.25, -2.0],
                 "top_logprobs": [{",": -0.25}, {".": -2.0, ",": -0.1}], "text_offset": [5, 6]}
    assert list(b["top_logprobs"][1]) == [".", ","]          # the chosen token first
    assert concat(block(TOK, entries[:1], 1), block(TOK, entries[1:], 1)) == b


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_raw_logprobs_are_the_model_distribution(k):
    c = create(logprobs=k, temperature=1.3, top_p=0.8, presence_penalty=1)["choices"][0]
    lp = c["logprobs"]
    ids = [TOK.encode(t)[0] if not t.startswith("bytes:") else None for t in lp["tokens"]]
    prompt = TOK.encode("Hi")
    gen = []
    for i, (t, v) in enumerate(zip(lp["tokens"], lp["token_logprobs"])):
        ref = raw_lp(prompt, gen)
        token = next(j for j in range(50257) if TOK.display(j) == t) if ids[i] is None else ids[i]
        assert v == pytest.approx(ref[token], abs=1e-12)
        if k:
            top = lp["top_logprobs"][i]
            assert top[t] == v and list(top)[0] == t
            best = sampling.top_k(ref, k)
            assert list(top) == [t] + [TOK.display(j) for j in best if j != token]
            assert all(top[TOK.display(j)] == pytest.approx(ref[j], abs=1e-12) for j in best)
            assert len(top) in (k, k + 1)
        gen.append(token)


def test_logprobs_above_five_are_clamped():
    c = create(logprobs=50, temperature=0)["choices"][0]
    assert all(len(d) == 5 for d in c["logprobs"]["top_logprobs"])  # greedy: chosen is top-1


def test_processed_mode_is_the_sampled_distribution():
    c = create(logprobs=5, logprobs_mode="processed", top_p=0.3, temperature=0.7)["choices"][0]
    for i, top in enumerate(c["logprobs"]["top_logprobs"]):
        probs = np.exp(list(top.values()))
        assert probs.sum() <= 1 + 1e-9
    # top_p=0 keeps one token: its processed logprob is 0 and nothing else is listed
    c = create(logprobs=5, logprobs_mode="processed", top_p=0.0)["choices"][0]
    assert all(d == {t: 0.0} for t, d in zip(c["logprobs"]["tokens"], c["logprobs"]["top_logprobs"]))


def test_processed_greedy_is_log_softmax_after_bias():
    c = create(logprobs=1, logprobs_mode="processed", temperature=0, max_tokens=1,
               logit_bias={"50256": 100})["choices"][0]
    assert c["logprobs"]["tokens"] == ["<|endoftext|>"]
    assert c["logprobs"]["token_logprobs"][0] == pytest.approx(0.0, abs=1e-20)
    raw = create(logprobs=1, temperature=0, max_tokens=1, logit_bias={"50256": 100})["choices"][0]
    assert raw["logprobs"]["token_logprobs"][0] < -1


def test_echo_prefixes_prompt_logprobs_first_is_null():
    prompt = "Hello there, world"
    ids = TOK.encode(prompt)
    c = create(prompt=prompt, echo=True, logprobs=2, temperature=0, max_tokens=2)["choices"][0]
    lp = c["logprobs"]
    assert c["text"].startswith(prompt)
    assert lp["tokens"][: len(ids)] == [TOK.display(i) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][: len(ids)] == [0, 5, 11, 12]
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(raw_lp(ids[:t], ())[ids[t]], abs=1e-12)
        assert lp["top_logprobs"][t][lp["tokens"][t]] == lp["token_logprobs"][t]
    assert lp["text_offset"][len(ids)] == len(prompt)


def test_echo_without_generation():
    r = create(prompt="Hello there", echo=True, logprobs=0, max_tokens=0)
    c = r["choices"][0]
    assert c["text"] == "Hello there" and c["finish_reason"] == "length"
    assert c["logprobs"]["top_logprobs"] is None and c["logprobs"]["token_logprobs"][0] is None
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}


def test_echo_token_id_prompt_text_is_decoded_bytes():
    c = create(prompt=[447, 40], echo=True, logprobs=0, max_tokens=0)["choices"][0]
    assert c["text"] == "\ufffdI"
    assert c["logprobs"]["tokens"] == ["bytes:\\xe2\\x80", "I"]


def test_eot_literal_in_prompt_is_one_token():
    r = create(prompt="a<|endoftext|>b", echo=True, logprobs=0, max_tokens=0)
    assert r["choices"][0]["logprobs"]["tokens"] == ["a", "<|endoftext|>", "b"]
    assert create(prompt=None, max_tokens=1)["usage"]["prompt_tokens"] == 1
