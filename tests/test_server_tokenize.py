"""vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info), the ones lm-eval's
RemoteTokenizer calls: their shapes, their errors, agreement with /v1/completions and with
HF's GPT-2 vocabulary; over a real `refcomplete serve` the exact calls lm-eval makes, and
lm-eval's own client where it is installed."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from fakes import FakeModel
from test_server_security import serve_process
from refcomplete._paths import weights_dir
from refcomplete.server import Endpoint
from refcomplete.tokenizer import get_tokenizer

KEY = "sk-tok-0123456789"
TOK = get_tokenizer()
TEXTS = ["Hello world", "ROMEO:\nO, she doth teach", " leading space", "naïve café ’ 🎉",
         "<|endoftext|>", "a<|endoftext|>b", "\x00\t\r\n", "x" * 3000]


@pytest.fixture(scope="module")
def endpoint():
    return Endpoint({"small": FakeModel(n_ctx=512), "big": FakeModel(n_ctx=1024)})


def call(endpoint, method, path, body=None, headers=None):
    raw = b"" if body is None else json.dumps(body).encode()
    r = endpoint.handle(method, path, headers or {}, raw)
    return r.status, json.loads(r.body)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenize_is_the_completions_tokenizer(endpoint, text):
    status, body = call(endpoint, "POST", "/tokenize", {"prompt": text})
    ids = TOK.encode(text)
    assert status == 200
    assert body == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    assert call(endpoint, "POST", "/detokenize", {"tokens": ids}) == (200, {"prompt": text})
    for special in (True, False):   # GPT-2 adds no special tokens: the same ids either way
        assert call(endpoint, "POST", "/tokenize", {"prompt": text, "add_special_tokens":
                                                    special})[1]["tokens"] == ids
    status, body = call(endpoint, "POST", "/tokenize", {"model": "big", "prompt": text})
    assert body["max_model_len"] == 1024 and body["tokens"] == ids


def test_endoftext_is_one_special_id(endpoint):
    """lm-eval takes eos_token_id = encode(tokenizer_info["eos_token"])[0]."""
    info = call(endpoint, "GET", "/tokenizer_info")[1]
    assert call(endpoint, "POST", "/tokenize", {"prompt": info["eos_token"],
                                                "add_special_tokens": False})[1]["tokens"] == [50256]


def test_token_strs_are_hf_vocabulary_strings(endpoint):
    vocab = json.loads((weights_dir() / "gpt2-tiny-shakespeare" / "vocab.json").read_text())
    by_id = {v: k for k, v in vocab.items()}
    text = " ".join(TEXTS)
    body = call(endpoint, "POST", "/tokenize", {"prompt": text, "return_token_strs": True})[1]
    assert body["token_strs"] == [by_id[t] for t in body["tokens"]]
    assert body["token_strs"][:2] == ["Hello", "Ġworld"]
    from refcomplete.tokenization import bpe_string
    assert [bpe_string(TOK.token_bytes(i)) for i in range(len(by_id))] == \
        [by_id[i] for i in range(len(by_id))]                  # all 50,257


def test_detokenize_matches_a_token_prompt_echo(endpoint):
    """Ids that split a character decode with U+FFFD, as the echo of a token-id prompt does."""
    ids = TOK.encode("’ and é")[:1] + [11, 447]
    text = call(endpoint, "POST", "/detokenize", {"tokens": ids})[1]["prompt"]
    status, r = call(endpoint, "POST", "/v1/completions",
                     {"model": "small", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200 and r["choices"][0]["text"] == text and "\ufffd" in text
    assert call(endpoint, "POST", "/detokenize", {"tokens": []}) == (200, {"prompt": ""})


def test_tokenizer_info_is_gpt2s_tokenizer_config(endpoint):
    status, info = call(endpoint, "GET", "/tokenizer_info")
    bundled = json.loads((weights_dir() / "gpt2-tiny-shakespeare" / "tokenizer_config.json")
                         .read_text())
    assert status == 200 and info == {**bundled, "model_max_length": 512}   # the first model
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info.get("pad_token") is None and info.get("chat_template") is None


BAD = [  # (path, body, status, param)
    ("/tokenize", {}, 400, "prompt"), ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": ["a"]}, 400, "prompt"), ("/tokenize", {"prompt": None}, 400, "prompt"),
    ("/tokenize", {"prompt": "a" * 200_000}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": 1}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}, 400, "return_token_strs"),
    ("/tokenize", {"prompt": "a", "bogus": 1}, 400, "bogus"),
    ("/tokenize", {"prompt": "a", "self": 1}, 400, "self"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
    ("/tokenize", {"prompt": "a", "model": 3}, 400, "model"),
    ("/detokenize", {}, 400, "tokens"), ("/detokenize", {"tokens": "15496"}, 400, "tokens"),
    ("/detokenize", {"tokens": [50257]}, 400, "tokens"), ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1.0]}, 400, "tokens"), ("/detokenize", {"tokens": [True]}, 400, "tokens"),
    ("/detokenize", {"tokens": [[1]]}, 400, "tokens"), ("/detokenize", {"tokens": [2**70]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1] * 200_000}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "prompt": "x"}, 400, "prompt"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=range(len(BAD)))
def test_bad_bodies_are_openai_errors(endpoint, path, body, status, param):
    got, r = call(endpoint, "POST", path, body)
    assert got == status and set(r["error"]) == {"message", "type", "param", "code"}
    assert r["error"]["param"] == param and len(json.dumps(r)) < 2000


def test_http_errors_of_the_routes(endpoint):
    for method, path, status in (("GET", "/tokenize", 405), ("POST", "/tokenizer_info", 405),
                                 ("GET", "/detokenize", 405), ("POST", "/v1/tokenize", 404)):
        assert call(endpoint, method, path, {})[0] == status
    for raw, code in ((b"{", "invalid_json"), (b"[]", "invalid_json"), (b"NaN", "invalid_json")):
        r = endpoint.handle("POST", "/tokenize", {}, raw)
        assert r.status == 400 and json.loads(r.body)["error"]["code"] == code
    r = Endpoint({"m": FakeModel()}, max_body=100).handle("POST", "/tokenize", {}, b" " * 101)
    assert r.status == 413
    keyed = Endpoint({"m": FakeModel()}, api_key=KEY)
    for method, path, body in (("GET", "/tokenizer_info", None), ("POST", "/tokenize", {"prompt": "a"}),
                               ("POST", "/detokenize", {"tokens": [1]})):
        assert call(keyed, method, path, body)[0] == 401
        assert call(keyed, method, path, body, {"authorization": f"Bearer {KEY}"})[0] == 200


# -- over a real server, as lm-eval calls it ------------------------------------------------------

def lm_eval_calls(base_url: str, auth_token: str | None) -> dict:
    """What lm-eval 0.4.13 does with `local-completions` and tokenizer_backend auto/remote
    (lm_eval/utils.py: check_remote_tokenizer_support, RemoteTokenizer): strip
    /v1/completions from base_url; GET /tokenizer_info, which must hold "eos_token"; POST
    /tokenize {"prompt", "add_special_tokens": false} -> "tokens"; POST /detokenize
    {"tokens"} -> "prompt"; eos and bos ids are encode(token)[0]."""
    base = base_url.replace("/v1/completions", "").rstrip("/")
    headers = {"Content-Type": "application/json"}
    if auth_token:
        headers["Authorization"] = f"Bearer {auth_token}"
    with httpx.Client(headers=headers, timeout=30) as c:
        info = c.get(base + "/tokenizer_info")
        info.raise_for_status()
        assert isinstance(info.json(), dict) and "eos_token" in info.json()

        def encode(text):
            r = c.post(base + "/tokenize", json={"prompt": text, "add_special_tokens": False})
            r.raise_for_status()
            assert isinstance(r.json().get("tokens"), list)
            return r.json()["tokens"]

        def decode(tokens):
            r = c.post(base + "/detokenize", json={"tokens": tokens})
            r.raise_for_status()
            assert isinstance(r.json().get("prompt"), str)
            return r.json()["prompt"]

        ids = encode("To be, or not to be")
        return {"probe": encode("test"), "ids": ids, "text": decode(ids),
                "eos_token_id": encode(info.json()["eos_token"])[0],
                "bos_token_id": encode(info.json()["bos_token"])[0],
                "pad_token": info.json().get("pad_token")}


def test_lm_eval_remote_tokenizer_calls_over_a_real_server():
    with serve_process("gpt2-tiny-shakespeare", flags=["--api-key", KEY]) as srv:
        got = lm_eval_calls(srv.url + "/v1/completions", KEY)
        assert got == {"probe": TOK.encode("test"), "ids": TOK.encode("To be, or not to be"),
                       "text": "To be, or not to be", "eos_token_id": 50256,
                       "bos_token_id": 50256, "pad_token": None}
        with pytest.raises(httpx.HTTPStatusError):       # the key guards these routes too
            lm_eval_calls(srv.url + "/v1/completions", None)
        # the tokens lm-eval then sends as a prompt are scored by /v1/completions
        r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30, json={"model": "gpt2-tiny-shakespeare", "prompt": got["ids"],
                                         "max_tokens": 1, "temperature": 0, "logprobs": 1,
                                         "echo": True, "seed": 1234})
        assert r.status_code == 200
        assert r.json()["choices"][0]["logprobs"]["tokens"][:2] == ["To", " be"]
        assert srv.log_errors() == []


def test_lm_eval_own_remote_tokenizer():
    """lm-eval's own client classes, where lm-eval is installed (not a test dependency)."""
    utils = pytest.importorskip("lm_eval.utils")
    with serve_process("gpt2-tiny-shakespeare") as srv:
        base = srv.url + "/v1/completions"
        assert utils.check_remote_tokenizer_support(base)
        tok = utils.RemoteTokenizer(base)
        ids = tok.encode("To be, or not to be")
        assert ids == TOK.encode("To be, or not to be") and tok.decode(ids) == "To be, or not to be"
        assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token) == (50256, 50256, None)
        assert tok("Hi")["input_ids"] == TOK.encode("Hi")
        assert tok.batch_decode([ids, ids[:2]]) == ["To be, or not to be", "To be"]
