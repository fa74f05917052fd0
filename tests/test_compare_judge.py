"""compare's judge on hand-built answers: the logprob tolerance passes float32 noise and
fails wrong logprobs; each dialect's evidence has a broken twin that is a mismatch;
findings name where and what differs, and the summary shows what decided a verdict."""

from __future__ import annotations

import numpy as np
import pytest

from refcomplete import compare
from refcomplete.compare_judge import Judge

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0, 3, size=(8, 200))      # 8 positions over a 200-token vocabulary


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logprobs_obj(lp, k=5, echo=False):
    """A logprobs object for greedy tokens of log-probabilities lp [T, V]."""
    toks = [int(np.argmax(row)) for row in lp]
    tops = [{f"t{j}": float(row[j]) for j in np.argsort(-row)[:k]} for row in lp]
    obj = {"tokens": [f"t{t}" for t in toks], "token_logprobs": [float(r[t]) for r, t in zip(lp, toks)],
           "top_logprobs": tops, "text_offset": list(range(6, 6 + len(toks)))}
    if echo:
        obj["token_logprobs"][0], obj["top_logprobs"][0] = None, None
    return obj


def judge(got, want, tags=("greedy",), request=None, j=None):
    res = compare.CaseResult("t", "completion")
    (j or Judge()).logprobs(res, {"tags": list(tags), "request": request or {"logprobs": 5}},
                            got, want, "choice 0")
    return res


def bad(res):
    return [(f.check, f.outcome) for f in res.findings if f.outcome != "ok"]


GOLDEN = log_softmax(LOGITS)


def test_a_float32_like_common_shift_passes_and_is_reported():
    shift = 1.4e-4 * np.sign(RNG.normal(size=(8, 1)))            # per position, all entries
    noise = RNG.uniform(-2.4e-5, 2.4e-5, size=GOLDEN.shape)      # the shape
    res = judge(logprobs_obj(GOLDEN + shift + noise), logprobs_obj(GOLDEN))
    assert bad(res) == []
    info = next(f for f in res.findings if f.check == "choice 0 logprobs")
    assert 1.3e-4 < info.data["shift"] < 1.7e-4 and info.data["shape"] < 5e-5
    strict = judge(logprobs_obj(GOLDEN + shift + noise), logprobs_obj(GOLDEN), j=Judge(1e-4, 1e-4))
    assert bad(strict) == [("choice 0 logprobs shift", "mismatch")]      # shift told apart


def test_a_f16_kv_cache_sized_difference_passes():
    noise = RNG.uniform(-1.25e-3, 1.25e-3, size=GOLDEN.shape)   # llama.cpp, 40 tokens
    assert bad(judge(logprobs_obj(GOLDEN + noise), logprobs_obj(GOLDEN))) == []
    deep = np.array(noise) * 0.5                   # a sampled path: small, one outlier
    deep[5, int(np.argsort(-GOLDEN[5])[3])] += 3.85e-3
    assert bad(judge(logprobs_obj(GOLDEN + deep), logprobs_obj(GOLDEN))) == []


def test_float16_logits_fail_by_the_root_mean_square_of_the_shape():
    """Every value rounded to float16 (spacing 2**-7 at |z| in [8, 16)): each entry within
    the per-entry tolerance, but all of them off."""
    z = np.random.default_rng(5).uniform(-12, 12, size=(64, 200))
    lp16 = log_softmax(z.astype(np.float16).astype(np.float64))
    res = judge(logprobs_obj(lp16), logprobs_obj(log_softmax(z)))
    info = next(f for f in res.findings if f.check == "choice 0 logprobs")
    assert info.data["shape"] < 5e-3 and info.data["rms_shape"] > 1.2e-3, info.data
    found = [x for x in bad(res) if x[1] == "mismatch"]
    assert found == [("choice 0 logprobs shape rms", "mismatch")], bad(res)


@pytest.mark.parametrize("temperature", [0.8, 1.2])
def test_logprobs_after_temperature_fail(temperature):
    got = logprobs_obj(log_softmax(LOGITS / temperature))
    res = judge(got, logprobs_obj(GOLDEN), tags=("sampled",))
    assert ("choice 0 logprobs shape", "mismatch") in bad(res)


def test_echo_logprobs_shifted_by_one_position_fail():
    want = logprobs_obj(GOLDEN, echo=True)
    got = {**want, "token_logprobs": want["token_logprobs"][1:] + [-1.0],
           "top_logprobs": want["top_logprobs"][1:] + [{"t0": -1.0}]}
    assert ("choice 0 token_logprobs", "mismatch") in bad(judge(got, want, tags=("echo",)))
    got = {**want, "token_logprobs": [None] + want["token_logprobs"][2:] + [-1.0],
           "top_logprobs": [None] + want["top_logprobs"][2:] + [{"t0": -1.0}]}
    assert {c for c, o in bad(judge(got, want, tags=("echo",)))} >= {"choice 0 top_logprobs"}


def test_top_logprobs_from_another_step_fail():
    want = logprobs_obj(GOLDEN)
    got = {**want, "top_logprobs": want["top_logprobs"][1:] + want["top_logprobs"][:1]}
    assert ("choice 0 top_logprobs", "mismatch") in bad(judge(got, want))
    same_keys = [{k: v for k, v in zip(t, o.values())} for t, o in     # keys kept, values moved
                 zip(want["top_logprobs"], got["top_logprobs"])]
    assert ("choice 0 logprobs shape", "mismatch") in bad(judge({**want, "top_logprobs": same_keys}, want))


def test_a_shape_finding_names_the_position_key_and_both_values():
    want = logprobs_obj(GOLDEN)
    got = logprobs_obj(GOLDEN)
    key = list(got["top_logprobs"][3])[2]
    got["top_logprobs"][3][key] += 0.05
    found = judge(got, want).findings
    f = next(f for f in found if f.check == "choice 0 logprobs shape")    # (the mean moves too)
    assert f"top_logprobs[3][{key!r}]" in f.detail and repr(want["top_logprobs"][3][key]) in f.detail
    assert f.data["index"] == 3 and f.data["diff"] == pytest.approx(0.04, abs=1e-3)


def test_zero_tokens_equal_an_empty_logprobs_object():
    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    assert bad(judge(None, empty)) == [] and bad(judge(empty, None)) == []
    assert bad(judge(None, logprobs_obj(GOLDEN))) == [("choice 0 logprobs", "mismatch")]


def offsets(got, want, stop=True):
    g = {"tokens": list("abcd"), "token_logprobs": [-1.0] * 4, "top_logprobs": None, "text_offset": got}
    w = {**g, "text_offset": want}
    res = compare.CaseResult("t", "completion")
    Judge().logprobs(res, {"tags": ["greedy"], "request": {}}, g, w, "choice 0", stop_cut=stop)
    return bad(res)


def test_offset_dialects_and_their_broken_twins():
    assert offsets([6, 7, 8, 9], [6, 7, 8, 9]) == []
    assert offsets([0, 1, 2, 3], [6, 7, 8, 9]) == [("choice 0 text_offset", "text_offset_zero")]
    assert offsets([1, 2, 3, 4], [6, 7, 8, 9]) == [("choice 0 text_offset", "mismatch")]
    assert offsets([6, 7, 8, 12], [6, 7, 8, 9]) == [("choice 0 text_offset", "offset_not_clamped")]
    assert offsets([0, 1, 2, 6], [6, 7, 8, 9]) == [("choice 0 text_offset", "text_offset_zero"),
                                                   ("choice 0 text_offset", "offset_not_clamped")]
    assert offsets([6, 7, 8, 12], [6, 7, 8, 9], stop=False) == [("choice 0 text_offset", "mismatch")]
    assert offsets([6, 9, 9, 12], [6, 7, 9, 9]) == [("choice 0 text_offset", "mismatch")]
    assert offsets([6, 8, 8, 9], [6, 7, 8, 9]) == [("choice 0 text_offset", "mismatch")]


def test_utf8_display_and_its_broken_twins():
    split = "bytes:\\xe2\\x80"
    want = {"tokens": ["a", split, split], "token_logprobs": [-1.0, -2.0, -3.0],
            "top_logprobs": [{"a": -1.0, "b": -2.0}, {split: -2.0, "b": -0.5}, {split: -3.0, "c": -0.1}],
            "text_offset": [1, 2, 3]}
    shown = {**want, "tokens": ["a", "\ufffd", ""],
             "top_logprobs": [{"a": -1.0, "b": -2.0}, {"\ufffd": -2.0, "b": -0.5}, {"": -3.0, "c": -0.1}]}
    assert {o for _, o in bad(judge(shown, want))} == {"utf8_display"}
    wrong_token = {**shown, "tokens": ["a", "x", ""]}
    assert ("choice 0 tokens", "mismatch") in bad(judge(wrong_token, want))
    wrong_value = {**shown, "top_logprobs": [{"a": -1.0, "b": -2.0}, {"\ufffd": -7.0, "b": -0.5},
                                             {"": -3.0, "c": -0.1}]}
    assert ("choice 0 top_logprobs", "mismatch") in bad(judge(wrong_value, want))


def test_a_split_byte_token_shown_by_its_decodable_part_is_utf8_display():
    """llama-cpp-python shows b' \\xe6' (a space, then a character's first byte) as ' '."""
    from refcomplete.compare_judge import utf8_shown
    half = "bytes: \\xe6"
    assert all(utf8_shown(g, half) for g in (" ", " \ufffd", "", "\ufffd"))
    assert not any(utf8_shown(g, half) for g in ("  ", "x", "x\ufffd", " \u6771"))
    want = {"tokens": ["a", half], "token_logprobs": [-1.0, -2.0], "text_offset": [1, 2],
            "top_logprobs": [{"a": -1.0}, {half: -2.0}]}
    shown = {**want, "tokens": ["a", " "], "top_logprobs": [{"a": -1.0}, {" ": -2.0}]}
    assert {o for _, o in bad(judge(shown, want, request={"logprobs": 1}))} == {"utf8_display"}


def test_split_bytes_inverts_the_display_of_every_vocabulary_token_that_is_not_utf8():
    from refcomplete.compare_judge import split_bytes
    from refcomplete.registry import load_model
    from refcomplete.tokenizer import display
    tok = load_model("gpt2-tiny-shakespeare").tokenizer
    raw = [tok.encoding.decode_single_token_bytes(i) for i in range(50256)]
    split = [b for b in raw if display(b).startswith("bytes:")]
    assert len(split) == 344 and all(split_bytes(display(b)) == b for b in split)


def test_logprobs0_lists_and_their_broken_twin():
    want = {**logprobs_obj(GOLDEN), "top_logprobs": None}
    one = {**want, "top_logprobs": [{t: v} for t, v in zip(want["tokens"], want["token_logprobs"])]}
    assert bad(judge(one, want, ("logprobs0",), {"logprobs": 0})) == \
        [("choice 0 top_logprobs", "top_logprobs_for_logprobs0")]
    two = {**want, "top_logprobs": logprobs_obj(GOLDEN, k=2)["top_logprobs"]}
    assert bad(judge(two, want, ("logprobs0",), {"logprobs": 0})) == [("choice 0 top_logprobs", "mismatch")]


def response(choices, usage):
    return {"choices": [{"index": i, "text": t, "finish_reason": "length", "logprobs": None}
                        for i, t in enumerate(choices)],
            "usage": dict(zip(("prompt_tokens", "completion_tokens", "total_tokens"), usage))}


def judge_response(got, want, tags=("greedy",), request=None):
    res = compare.CaseResult("t", "completion")
    Judge().response(res, {"tags": list(tags), "request": request or {}}, got, want)
    return bad(res)


def test_usage_counts_only_and_named_usage_differences():
    want = response(["ab"], (3, 2, 5))
    extra = {**response(["ab"], (3, 2, 5))}
    extra["usage"].update(prompt_tokens_details=None, completion_tokens_details=None)
    assert judge_response(extra, want) == []
    assert judge_response(response(["ab"], (3, 3, 6)), want) == [("usage", "mismatch")]
    echo = response(["ab"], (3, 0, 3))
    assert judge_response(response(["ab"], (3, 1, 4)), echo, ("echo_max0",)) == [("usage", "echo_usage")]
    assert judge_response(response(["ab"], (3, 5, 8)), echo, ("echo_max0",)) == [("usage", "mismatch")]


def test_n_ignored_and_its_broken_twin():
    want = response(["ab", "ab", "ab"], (3, 6, 9))
    req = {"n": 3, "max_tokens": 2}
    assert judge_response(response(["ab"], (3, 2, 5)), want, request=req) == \
        [("choices", "n_ignored"), ("usage", "n_ignored")]
    assert judge_response(response(["ab", "ab"], (3, 4, 7)), want, request=req) == [("choices", "mismatch")]


def test_eos_not_reported_and_its_broken_twin():
    want = {"tokens": ["a", "<|endoftext|>"], "token_logprobs": [-1.0, -2.0],
            "top_logprobs": None, "text_offset": [1, 2]}
    w = {"choices": [{"index": 0, "text": "a", "finish_reason": "stop", "logprobs": want}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    short = {k: v[:1] if isinstance(v, list) else v for k, v in want.items()}
    g = {"choices": [{**w["choices"][0], "logprobs": short}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    assert judge_response(g, w) == [("choice 0 tokens", "eos_not_reported"), ("usage", "eos_not_reported")]
    lost = {"choices": [{**w["choices"][0], "text": "", "logprobs": {k: v[:0] if isinstance(v, list)
                                                                      else v for k, v in want.items()}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}
    assert ("usage", "mismatch") in judge_response(lost, w) and \
        ("choice 0 tokens", "mismatch") in judge_response(lost, w)


def test_text_and_list_diffs_show_where():
    assert compare.text_diff("O Romeo, Romeo!", "O Romeo, Juliet!") == \
        "char 9 of 15/16: 'O Romeo, |Romeo!' vs 'O Romeo, |Juliet!' (golden)"
    long = "x" * 50 + "abc" + "y" * 50
    d = compare.text_diff(long, long.replace("b", "B"))
    assert d.startswith("char 51 of 103/103:") and "'\u2026xxxxxxxxxxxxxxxxxxxa|bc" in d
    from refcomplete.compare_findings import list_diff
    detail, data = list_diff("text_offset", [6, 7, 8, 12], [6, 7, 8, 9])
    assert detail == "text_offset[3]: 12 vs 9 (golden); 1 of 4 differ; largest difference 3"


def test_summary_shows_the_deciding_finding_first_in_full():
    r = compare.CaseResult("c", "completion")
    r.add("choice 0 text_offset", "text_offset_zero", "waived one")
    r.add("choice 0 text", "mismatch", "char 120: " + "z" * 150)
    table = compare.summary([r], {"text_offset_zero"})
    row = next(line for line in table.splitlines() if line.startswith("c "))
    assert "FAIL" in row and row.index("choice 0 text: mismatch") < row.index("(+1 more)")
    assert "z" * 150 in row and "waived one" not in row
    assert r.verdict({"text_offset_zero"}) == "fail" and [f.outcome for f in r.ordered(set())][0] == \
        "text_offset_zero"     # with nothing waived, both decide: the order they were found


def test_near_tie_divergence_is_not_a_mismatch_and_a_clear_one_is():
    want = {"tokens": ["a", "b"], "token_logprobs": [-1.0, -0.6930],
            "top_logprobs": [{"a": -1.0, "c": -2.0}, {"b": -0.6930, "d": -0.6935}],
            "text_offset": [1, 2]}
    got = {"tokens": ["a", "d"], "token_logprobs": [-1.0, -0.6935],
           "top_logprobs": [{"a": -1.0, "c": -2.0}, {"d": -0.6935, "b": -0.6930}],
           "text_offset": [1, 2]}
    res = compare.CaseResult("t", "completion")
    assert Judge(tie_margin=5e-3).logprobs(res, {"tags": ["greedy"], "request": {}}, got, want, "c0") == 1
    assert bad(res) == [("c0 tokens", "near_tie")]
    far = {**want, "top_logprobs": [want["top_logprobs"][0], {"b": -0.1, "d": -2.5}]}
    res = compare.CaseResult("t", "completion")
    assert Judge().logprobs(res, {"tags": ["greedy"], "request": {}}, got, far, "c0") is None
    assert ("c0 tokens", "mismatch") in bad(res)


def test_a_near_tie_swap_is_found_beside_a_listed_drawn_token_and_a_far_swap_is_not():
    """On a sampled path the golden lists the drawn token too (k + 1 entries): the swapped
    k-th entry is then not the golden's smallest value (llama-cpp-python, sampling_combined:
    ' love' -3.78360 for ' son' -3.78368, beside a drawn token at -9)."""
    want = {"tokens": ["x"], "token_logprobs": [-9.0], "text_offset": [0],
            "top_logprobs": [{"a": -1.0, "b": -2.0, "son": -3.783677, "x": -9.0}]}
    got = {"tokens": ["x"], "token_logprobs": [-9.0], "text_offset": [0],
           "top_logprobs": [{"a": -1.0, "b": -2.0, "love": -3.783601, "x": -9.0}]}
    res = judge(got, want, tags=(), request={"logprobs": 3})
    assert bad(res) == [("choice 0 top_logprobs", "near_tie")]
    far = {**got, "top_logprobs": [{"a": -1.0, "b": -2.0, "love": -3.7, "x": -9.0}]}
    assert bad(judge(far, want, tags=(), request={"logprobs": 3})) == \
        [("choice 0 top_logprobs", "mismatch")]
    fewer = {**got, "top_logprobs": [{"a": -1.0, "b": -2.0, "x": -9.0}]}
    assert bad(judge(fewer, want, tags=(), request={"logprobs": 3})) == \
        [("choice 0 top_logprobs", "mismatch")]


def test_vllm_shows_a_split_character_on_the_token_that_completes_it():
    """vLLM 0.32 on utf8_split_echo: tokens and text_offset from its own strings."""
    from refcomplete.compare_judge import utf8_shown
    assert utf8_shown(" \u6771", "bytes:\\xb1") and utf8_shown("\u4eac", "bytes:\\xac")
    assert not utf8_shown(" \u6771", "bytes:\\xb2") and not utf8_shown("x", "bytes:\\xb1")
    golden = ["bytes:\\xe2\\x80", "bytes:\\x99", "T", "is", " caf\u00e9", "bytes: \\xe6",
              "bytes:\\x9d", "bytes:\\xb1", "bytes:\\xe4\\xba", "bytes:\\xac",
              "bytes: \\xf0\\x9f\\x98", "bytes:\\x80"]
    vllm = ["\ufffd", "", "T", "is", " caf\u00e9", "", "", " \u6771", "", "\u4eac", "", " \U0001F600"]
    lp = [-1.0 - i for i in range(12)]
    want = {"tokens": golden, "token_logprobs": lp, "top_logprobs": None,
            "text_offset": [0, 0, 1, 2, 4, 9, 10, 10, 11, 11, 12, 13]}
    got = {"tokens": vllm, "token_logprobs": lp, "top_logprobs": None,
           "text_offset": [0, 1, 1, 2, 4, 9, 9, 9, 11, 11, 12, 12]}
    res = judge(got, want, tags=(), request={"logprobs": 0})
    assert {o for _, o in bad(res)} == {"utf8_display"}, bad(res)
    wrong = {**got, "text_offset": [0, 1, 1, 2, 4, 9, 9, 9, 11, 11, 12, 14]}
    assert ("choice 0 text_offset", "mismatch") in bad(judge(wrong, want, tags=(), request={"logprobs": 0}))
    moved = {**got, "tokens": vllm[:7] + [" \u6772"] + vllm[8:]}
    assert ("choice 0 tokens", "mismatch") in bad(judge(moved, want, tags=(), request={"logprobs": 0}))


@pytest.mark.parametrize("param, outcome", [("body.stop", "error_type_differs"),
                                            ("stop", None), ("body.n", "mismatch")])
def test_an_error_param_in_fastapis_location_form_names_the_field(param, outcome):
    import httpx

    from refcomplete.compare_replay import Replayer

    def answer(request):
        body = __import__("json").loads(request.read())
        if "stop" not in body:
            return httpx.Response(200, json={"id": "x", "object": "text_completion", "created": 0,
                                             "model": "m", "choices": [], "usage": None})
        return httpx.Response(400, json={"error": {"message": "List should have at most 4 items",
                                                   "type": "invalid_request_error", "param": param,
                                                   "code": None}})
    rep = Replayer("http://fake", "m", transport=httpx.MockTransport(answer))
    case = {"name": "five_stops", "kind": "error", "tags": [],
            "request": {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
            "expect": {"status": 400, "error": {"type": "invalid_request_error", "param": "stop"}}}
    res = rep.run_case(case)
    assert [o for _, o in bad(res)] == ([outcome] if outcome else []), res.findings
