"""Validation: every invalid field is a CompletionError with the right param, type, status."""

import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fakes import FakeModel  # noqa: E402

from refcomplete import CompletionError  # noqa: E402
from refcomplete.completions import Completions  # noqa: E402
from refcomplete.errors import InvalidRequestError, ModelNotFoundError  # noqa: E402
from refcomplete.params import parse  # noqa: E402

API = Completions({"fake": FakeModel(n_ctx=64)})
OK = {"model": "fake", "prompt": "Hi", "max_tokens": 2}


def error(**changes) -> CompletionError:
    req = {**OK, **changes}
    req = {k: v for k, v in req.items() if v is not ...}
    with pytest.raises(CompletionError) as info:
        API.create(**req)
    return info.value


BAD = [  # (changes, param)
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": "1"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.01}, "top_p"), ({"top_p": -1}, "top_p"), ({"top_p": False}, "top_p"),
    ({"presence_penalty": 2.1}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": [1]}, "frequency_penalty"),
    ({"n": 0}, "n"), ({"n": 129}, "n"), ({"n": 1.0}, "n"), ({"n": True}, "n"),
    ({"best_of": 21}, "best_of"), ({"best_of": 0}, "best_of"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"stream": True, "n": 1, "best_of": 2}, "best_of"),
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 0, "echo": True}, "max_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"logprobs": 2.0}, "logprobs"),
    ({"echo": 1}, "echo"), ({"stream": "yes"}, "stream"), ({"trace": 1}, "trace"),
    ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.0}, "seed"),
    ({"stop": ""}, "stop"), ({"stop": []}, "stop"), ({"stop": ["a"] * 5}, "stop"),
    ({"stop": ["a", ""]}, "stop"), ({"stop": 5}, "stop"), ({"stop": ["a", 1]}, "stop"),
    ({"suffix": "x"}, "suffix"), ({"suffix": ""}, "suffix"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ({"stream": True, "stream_options": [1]}, "stream_options"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"50257": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"), ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"logit_bias": {"5": 1, 5: 2}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"5": float("inf")}}, "logit_bias"), ({"logit_bias": {-3: 1}}, "logit_bias"),
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [50257]}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"prompt": [[1], [2, 99999]]}, "prompt"),
    ({"prompt": [True]}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": {"a": 1}}, "prompt"),
    ({"user": 5}, "user"), ({"model": 5}, "model"), ({"model": ...}, "model"),
    ({"logprobs_mode": "cooked"}, "logprobs_mode"),
    ({"bogus": 1}, "bogus"), ({"functions": []}, "functions"),
    ({"self": 1}, "self"), ({"request": {}}, "request"), ({"limits": None}, "limits"),
    ({"stream": True, "stream_options": {"include_obfuscation": "yes"}}, "include_obfuscation"),
    ({"prompt": "x " * 70}, "max_tokens"), ({"max_tokens": 64}, "max_tokens"),
    ({"max_tokens": None, "prompt": [1] * 64}, "prompt"),
]


@pytest.mark.parametrize("changes,param", BAD, ids=[repr(c) for c, _ in BAD])
def test_invalid_field_is_a_400_naming_its_param(changes, param):
    e = error(**changes)
    assert isinstance(e, InvalidRequestError)
    assert (e.status, e.type, e.param) == (400, "invalid_request_error", param)
    body = e.to_dict()
    assert set(body["error"]) == {"message", "type", "param", "code"} and e.message


def test_range_messages_follow_openai():
    assert error(temperature=3).message == "3 is greater than the maximum of 2 - 'temperature'"
    assert error(n=0).message == "0 is less than the minimum of 1 - 'n'"


def test_unknown_parameter_message():
    assert error(bogus=1).message == "Unrecognized request argument supplied: bogus"


def test_max_tokens_zero_messages():
    assert error(max_tokens=0).message.startswith(
        "You requested a length 0 completion, but you did not set the 'echo' parameter.")
    assert error(max_tokens=0, echo=True).message.startswith(
        "You requested a length 0 completion, but did not specify a 'logprobs' parameter")


def test_context_overflow_message_follows_openai():
    e = error(prompt=[1] * 60, max_tokens=10)
    assert e.message == ("This model's maximum context length is 64 tokens, however you "
                         "requested 70 tokens (60 in your prompt; 10 for the completion). "
                         "Please reduce your prompt; or completion length.")


def test_stream_options_without_stream_message():
    assert error(stream_options={"include_usage": True}).message == \
        "The 'stream_options' parameter is only allowed when 'stream' is enabled."


def test_logit_bias_out_of_vocab_message():
    assert error(logit_bias={"50257": 1}).message == \
        "Invalid key in 'logit_bias': 50257. Maximum value is 50256."


def test_unknown_model_is_404_model_not_found():
    e = error(model="nope")
    assert isinstance(e, ModelNotFoundError)
    assert (e.status, e.code, e.type) == (404, "model_not_found", "invalid_request_error")


def test_registry_model_not_found_maps_to_404():
    e = pytest.raises(CompletionError, Completions().create, model="no-such-model-xyz",
                      prompt="x").value
    assert (e.status, e.code) == (404, "model_not_found")


def test_errors_are_raised_before_a_stream_starts():
    with pytest.raises(CompletionError):
        API.create(**OK, stream=True, temperature=9)


def test_defaults_and_clamps():
    r = parse({"model": "m"})
    assert (r.prompt, r.max_tokens, r.temperature, r.top_p, r.n, r.best_of, r.logprobs) == \
        ("<|endoftext|>", 16, 1.0, 1.0, 1, 1, None)
    assert parse({"model": "m", "prompt": None, "max_tokens": None}).max_tokens is None
    assert parse({"model": "m", "logprobs": 100}).logprobs == 5
    assert parse({"model": "m", "n": 3}).best_of == 3
    assert parse({"model": "m", "stop": "x"}).stop == ("x",)
    assert parse({"model": "m", "logit_bias": {"7": 1, 3: -2.5}}).logit_bias == ((3, -2.5), (7, 1.0))
    assert parse({"model": "m", "user": "u", "suffix": None, "seed": -5}).seed == -5


def test_valid_edge_values_are_accepted():
    for changes in ({"temperature": 0}, {"temperature": 2}, {"top_p": 0}, {"n": 2, "best_of": 20},
                    {"stop": ["a", "b", "c", "d"]}, {"logit_bias": {"50256": -100}},
                    {"prompt": [[1, 2], [3]]}, {"prompt": ["a", "b"]}, {"prompt": None},
                    {"max_tokens": None, "prompt": [1] * 63}, {"seed": 2**63 - 1},
                    {"logprobs_mode": "processed", "logprobs": 0}):
        assert API.create(**{**OK, **changes})["object"] == "text_completion"


# Names of the Python parameters a request passes through: as request keys each is an
# unknown argument (a 400), never a TypeError from a collision with the signature.
PYTHON_NAMES = ["self", "cls", "request", "p", "limits", "models", "kwargs", "args",
                "__class__", "name"]


@pytest.mark.parametrize("name", PYTHON_NAMES)
def test_keys_named_like_python_parameters_are_unknown_arguments(name):
    import refcomplete
    e = error(**{name: 1})
    assert (e.status, e.param, e.message) == (
        400, name, f"Unrecognized request argument supplied: {name}")
    with pytest.raises(CompletionError) as info:   # the module-level create() too
        refcomplete.create(**{**OK, "model": "no-such-model-xyz", name: 1})
    assert (info.value.status, info.value.param) == (400, name)


def test_include_obfuscation_is_accepted_and_ignored():
    def text(**options):
        chunks = API.create(**OK, seed=3, stream=True, stream_options=options or None)
        return [{k: v for k, v in c.items() if k not in ("id", "created")} for c in chunks]
    plain = text()
    assert text(include_obfuscation=True) == text(include_obfuscation=False) == plain
    assert text(include_usage=True, include_obfuscation=True)[:-1] == \
        [{**c, "usage": None} for c in plain]
