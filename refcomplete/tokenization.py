"""The tokenizer over HTTP: `/tokenize`, `/detokenize`, `/tokenizer_info`, in vLLM's shapes.

Knows: the request and response shapes of vLLM's tokenizer endpoints (the ones that
lm-evaluation-harness's `RemoteTokenizer` calls), and how to check their bodies. Does
not know: HTTP (server.py routes to it), completion rules.

    tokenize(models, {"prompt": "Hello world"})
    # -> {"count": 2, "max_model_len": 512, "tokens": [15496, 995], "token_strs": None}
    detokenize(models, {"tokens": [15496, 995]})        # -> {"prompt": "Hello world"}
    tokenizer_info(models)   # -> {"tokenizer_class": "GPT2Tokenizer", "eos_token": ...}

vLLM: "TokenizeCompletionRequest: model, prompt, add_special_tokens (default true),
return_token_strs"; "DetokenizeRequest: model, tokens"; TokenizerInfoResponse is the
tokenizer's configuration (tokenizer_config.json) plus `tokenizer_class`. Every model
here uses GPT-2's r50k tokenizer, which adds no special tokens (no BOS), so
`add_special_tokens` changes nothing; the literal `<|endoftext|>` is id 50256, as in
completion prompts and in HF's GPT-2 tokenizer. `model` is optional (default: the first
model served); `/tokenizer_info` takes none and describes the first model. Divergence:
the chat form of `/tokenize` (`messages`) is a 400, as GPT-2 has no chat template.
"""

from __future__ import annotations

from typing import Mapping

from refcomplete.errors import InvalidRequestError, ModelNotFoundError
from refcomplete.params import DEFAULT_LIMITS, Limits, _clip, _show
from refcomplete.tokenizer import ENDOFTEXT

TOKENIZE_KEYS = frozenset({"model", "prompt", "add_special_tokens", "return_token_strs"})
DETOKENIZE_KEYS = frozenset({"model", "tokens"})


def _bad(message: str, param: str | None, code: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _model(models: Mapping, body: dict):
    """The model a body names (404 if it is not served), else the first one served."""
    name = body.get("model")
    if name is None:
        return next(iter(models.values()))
    if not isinstance(name, str):
        raise _bad(f"Invalid type for 'model': expected a string, but got {type(name).__name__} "
                   f"value {_show(name)}.", "model", "invalid_type")
    if name not in models:
        raise ModelNotFoundError(name)
    return models[name]


def _check_keys(body: dict, known: frozenset) -> None:
    for key in body:
        if key not in known:
            if key == "messages":
                raise _bad("Chat requests ('messages') cannot be tokenized: GPT-2 models have "
                           "no chat template. Send 'prompt'.", "messages")
            raise _bad(f"Unrecognized request argument supplied: {_clip(key)}", key)


def _flag(body: dict, name: str, default: bool) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise _bad(f"Invalid type for '{name}': expected a boolean, but got {type(x).__name__} "
                   f"value {_show(x)}.", name, "invalid_type")
    return x


def tokenize(models: Mapping, body: dict, limits: Limits = DEFAULT_LIMITS) -> dict:
    """POST /tokenize: {"prompt": str, ...} -> {"count", "max_model_len", "tokens", "token_strs"}.

    token_strs (with return_token_strs) are the byte-level BPE strings of HF's GPT-2
    vocabulary (" world" is "Ġworld"), as vLLM's `convert_ids_to_tokens` gives them."""
    _check_keys(body, TOKENIZE_KEYS)
    model = _model(models, body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _bad(f"Invalid type for 'prompt': expected a string, but got "
                   f"{type(prompt).__name__} value {_show(prompt)}.", "prompt", "invalid_type")
    if len(prompt) > limits.max_prompt_chars:
        raise _bad(f"A prompt of {len(prompt)} characters is too long: the limit is "
                   f"{limits.max_prompt_chars} characters.", "prompt")
    _flag(body, "add_special_tokens", True)      # checked; GPT-2 adds none either way
    strs = _flag(body, "return_token_strs", False)
    tok = model.tokenizer
    ids = tok.encode(prompt)
    return {"count": len(ids), "max_model_len": model.n_ctx, "tokens": ids,
            "token_strs": [bpe_string(tok.token_bytes(t)) for t in ids] if strs else None}


def detokenize(models: Mapping, body: dict, limits: Limits = DEFAULT_LIMITS) -> dict:
    """POST /detokenize: {"tokens": [int, ...]} -> {"prompt": str} (UTF-8, invalid bytes as
    U+FFFD, exactly the text that a token-id prompt of these ids has in /v1/completions)."""
    _check_keys(body, DETOKENIZE_KEYS)
    model = _model(models, body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise _bad(f"Invalid type for 'tokens': expected an array of token ids, but got "
                   f"{type(tokens).__name__} value {_show(tokens)}.", "tokens", "invalid_type")
    if len(tokens) > limits.max_prompt_tokens:
        raise _bad(f"{len(tokens)} token ids are too many: the limit is "
                   f"{limits.max_prompt_tokens}.", "tokens")
    for t in tokens:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < model.n_vocab:
            raise _bad(f"Invalid token id {_show(t)} in 'tokens': token ids must be integers "
                       f"in [0, {model.n_vocab - 1}].", "tokens")
    return {"prompt": model.tokenizer.decode(tokens)}


def tokenizer_info(models: Mapping) -> dict:
    """GET /tokenizer_info: the first model's tokenizer configuration, as HF's GPT-2
    tokenizer_config.json has it (lm-eval reads eos_token, bos_token, pad_token)."""
    model = next(iter(models.values()))
    return {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False,
            "add_prefix_space": False, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT, "model_max_length": model.n_ctx,
            "clean_up_tokenization_spaces": False, "errors": "replace"}


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, DEL, NBSP, soft hyphen) for U+0100 on."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


_ALPHABET = _byte_alphabet()


def bpe_string(token_bytes: bytes) -> str:
    """A token's string in HF's byte-level GPT-2 vocabulary (vocab.json keys): b" world" -> "Ġworld"."""
    return "".join(_ALPHABET[b] for b in token_bytes)
