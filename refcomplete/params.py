"""Request validation: the raw keyword arguments become one frozen CompletionRequest.

Knows: every OpenAI completions parameter, its type, range and default, and the
rules that combine them (SEMANTICS 6-9); the model only through n_vocab, n_ctx and
its tokenizer (`encode_prompts`). Does not know: sampling, decoding, response shapes.

One line per rule, each error naming its `param` (DESIGN 8). Types are strict: a bool
is not a number, a float is not an integer, exactly as JSON Schema says.

    >>> parse({"model": "gpt2", "prompt": "Hi", "logprobs": 9}).logprobs   # clamped
    5
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

from refcomplete.errors import InvalidRequestError

KNOWN = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "suffix", "temperature", "top_p", "user",
    "logprobs_mode", "trace",  # extensions
})
# include_obfuscation (OpenAI's current spec) pads stream chunks with random characters
# against length side channels; accepted and ignored, since our chunks must stay exact.
STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})
ENDOFTEXT = "<|endoftext|>"
MAX_LOGPROBS = 5
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# The smallest temperature used: z / t must stay finite for any float32 logits (|z| <
# 3.5e38 with bias and penalties), else softmax computes inf - inf = NaN. A positive
# temperature below it is raised to it, which changes no draw unless two logits differ
# by less than about 1e-190 (found by fuzzing: temperature 2.2e-313 crashed select).
MIN_TEMPERATURE = 1e-200


@dataclass(frozen=True)
class Limits:
    """Bounds on one request's size and work; each breach is a 400 that names its `param`.

    Our extension (OpenAI publishes no such limits for the legacy endpoint). The defaults
    never refuse a request that fits a 1024-token GPT-2 context with OpenAI's own n and
    best_of ranges, except by total work:

    max_prompts        prompts in one request (a list of strings or of token-id lists): 128
    max_prompt_chars   characters of one string prompt, checked before tokenizing: 131072
                       (1024 tokens x the longest r50k token, 128 bytes)
    max_prompt_tokens  ids in one token-id prompt, checked before the vocabulary: 131072
    max_work_tokens    tokens a request may generate: the sum over its prompts of
                       best_of x max_tokens (max_tokens null: n_ctx - prompt length): 65536

        >>> Completions(limits=Limits(max_work_tokens=4096))   # refcomplete.completions
    """

    max_prompts: int = 128
    max_prompt_chars: int = 131_072
    max_prompt_tokens: int = 131_072
    max_work_tokens: int = 65_536


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request; every field holds its effective value (defaults applied)."""

    model: str
    prompt: Any                   # str | list[str] | list[int] | list[list[int]] (checked)
    max_tokens: int | None = 16   # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    best_of: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None   # clamped to [0, 5]
    echo: bool = False
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias), ids unchecked vs vocab
    seed: int | None = None
    user: str | None = None
    logprobs_mode: str = "raw"
    trace: bool = False


class _ShortRepr(reprlib.Repr):
    """reprlib with integers too long for str() (over 4300 digits) shown by their size."""

    def repr_int(self, x, level):
        if x.bit_length() > 256:
            return f"<{'negative ' if x < 0 else ''}integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 60, 60, 80


def _show(x: Any) -> str:
    """A bounded repr for error messages: huge, deeply nested or huge-integer values from a
    request must not make the message huge or raise (RecursionError, int-to-str limit)."""
    return _SHORT.repr(x)


def _clip(text: str, limit: int = 60) -> str:
    """A request's string as shown inside a message, cut to `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


def _bad(message: str, param: str | None, code: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


def _type_error(name: str, expected: str, value: Any) -> InvalidRequestError:
    return _bad(f"Invalid type for '{name}': expected {expected}, but got {type(value).__name__} "
                f"value {_show(value)}.", name, "invalid_type")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(p: dict, name: str, default: float, lo: float, hi: float) -> float:
    x = p.get(name)
    if x is None:
        return default
    if not _is_number(x) or (isinstance(x, float) and math.isnan(x)):
        raise _type_error(name, "a number", x)
    if x < lo:
        raise _bad(f"{_show(x)} is less than the minimum of {lo:g} - '{name}'", name)
    if x > hi:
        raise _bad(f"{_show(x)} is greater than the maximum of {hi:g} - '{name}'", name)
    return float(x)


def _integer(p: dict, name: str, default: int | None, lo: int, hi: int | None = None):
    x = p.get(name)
    if x is None:
        return default
    if not _is_int(x):
        raise _type_error(name, "an integer", x)
    if x < lo:
        raise _bad(f"{_show(x)} is less than the minimum of {lo} - '{name}'", name)
    if hi is not None and x > hi:
        raise _bad(f"{_show(x)} is greater than the maximum of {hi} - '{name}'", name)
    return x


def _temperature(t: float) -> float:
    """0 stays 0 (greedy); a positive temperature is at least MIN_TEMPERATURE."""
    return t if t == 0 else max(t, MIN_TEMPERATURE)


def _boolean(p: dict, name: str) -> bool:
    x = p.get(name)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise _type_error(name, "a boolean", x)
    return x


def _prompt(x: Any, limits: Limits) -> Any:
    """SEMANTICS 6: string, list of strings, list of ids, list of lists of ids; never empty.
    Then the Limits on the number of prompts and each prompt's length."""
    x = _prompt_form(x)
    many = [x] if isinstance(x, str) or _is_int(x[0]) else x
    if len(many) > limits.max_prompts:
        raise _bad(f"Too many prompts: {len(many)} given, the limit is {limits.max_prompts} "
                   "per request.", "prompt")
    for item in many:
        if isinstance(item, str) and len(item) > limits.max_prompt_chars:
            raise _bad(f"A prompt of {len(item)} characters is too long: the limit is "
                       f"{limits.max_prompt_chars} characters.", "prompt")
        if not isinstance(item, str) and len(item) > limits.max_prompt_tokens:
            raise _bad(f"A prompt of {len(item)} token ids is too long: the limit is "
                       f"{limits.max_prompt_tokens} tokens.", "prompt")
    return x


def _prompt_form(x: Any) -> Any:
    if x is None:
        return ENDOFTEXT
    if isinstance(x, str):
        if not x:
            raise _bad("'prompt' must not be an empty string.", "prompt")
        return x
    if not isinstance(x, list) or not x:
        raise _bad(f"{_show(x)} is not valid under any of the given schemas - 'prompt' "
                   "(expected a non-empty string, list of strings, list of token ids, "
                   "or list of lists of token ids)", "prompt")
    if all(isinstance(e, str) for e in x):
        if not all(x):
            raise _bad("'prompt' must not contain an empty string.", "prompt")
        return list(x)
    if all(_is_int(e) for e in x):
        return list(x)
    if all(isinstance(e, list) and e and all(_is_int(t) for t in e) for e in x):
        return [list(e) for e in x]
    raise _bad("'prompt' must be a non-empty string, list of strings, list of token ids, or "
               "list of non-empty lists of token ids.", "prompt")


def _stop(x: Any) -> tuple[str, ...]:
    """SEMANTICS 7: a string or 1 to 4 non-empty strings."""
    if x is None:
        return ()
    stops = [x] if isinstance(x, str) else x
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4:
        raise _bad(f"{_show(x)} is not valid under any of the given schemas - 'stop' "
                   "(expected a string or a list of 1 to 4 strings)", "stop")
    if not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must contain only non-empty strings.", "stop")
    return tuple(stops)


def _logit_bias(x: Any) -> tuple[tuple[int, float], ...]:
    """SEMANTICS 9: token-id keys (decimal strings, or ints from Python), values in [-100, 100]."""
    if x is None:
        return ()
    if not isinstance(x, dict):
        raise _type_error("logit_bias", "an object", x)
    out: dict[int, float] = {}
    for key, value in x.items():
        shown = _clip(key) if isinstance(key, str) else _show(key)
        if _is_int(key):
            token = key
        elif isinstance(key, str) and key.isascii() and key.isdecimal():
            digits = key.lstrip("0") or "0"
            if len(digits) > 18:   # beyond int64 (and int() refuses over 4300 digits)
                raise _bad(f"Invalid key in 'logit_bias': {shown}. Token ids are below the "
                           "vocabulary size.", "logit_bias")
            token = int(digits)
        else:
            raise _bad(f"Invalid key in 'logit_bias': {shown}. You should only be submitting "
                       "non-negative integers.", "logit_bias")
        if token < 0:
            raise _bad(f"Invalid key in 'logit_bias': {shown}. You should only be submitting "
                       "non-negative integers.", "logit_bias")
        if token in out:
            raise _bad(f"Invalid key in 'logit_bias': token id {token} is given twice.",
                       "logit_bias")
        if not _is_number(value) or isinstance(value, float) and math.isnan(value):
            raise _bad(f"Invalid value in 'logit_bias' for key {shown}: expected a number, "
                       f"got {_show(value)}.", "logit_bias")
        if not -100 <= value <= 100:   # compared before float(): ints may be huge
            raise _bad(f"Invalid value in 'logit_bias' for key {shown}: {_show(value)} is "
                       "outside [-100, 100].", "logit_bias")
        out[token] = float(value)
    return tuple(sorted(out.items()))


def parse(p: dict, limits: Limits = DEFAULT_LIMITS) -> CompletionRequest:
    """Validate the model-independent rules of a raw request (SEMANTICS 6-9) and the
    size limits (Limits) that do not need the tokenizer."""
    for name in p:
        if name not in KNOWN:
            raise _bad(f"Unrecognized request argument supplied: {_clip(name)}", name)
    model = p.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if p.get("suffix") is not None:
        raise _bad("'suffix' is not supported: GPT-2 models have no insert mode.", "suffix")
    user = p.get("user")
    if user is not None and not isinstance(user, str):
        raise _type_error("user", "a string", user)
    stream = _boolean(p, "stream")
    options = p.get("stream_options")
    if options is not None and not stream:
        raise _bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                   "stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        for key in options:
            if key not in STREAM_OPTIONS:
                raise _bad(f"Unrecognized request argument supplied: stream_options.{_clip(key)}",
                           "stream_options")
        include_usage = _boolean(options, "include_usage")
        _boolean(options, "include_obfuscation")   # checked, then ignored: see STREAM_OPTIONS
    n = _integer(p, "n", 1, 1, 128)
    best_of = _integer(p, "best_of", n, 1, 20)
    if best_of < n:
        raise _bad(f"best_of must be greater than or equal to n, got n={n} and "
                   f"best_of={best_of}.", "best_of")
    if stream and best_of > n:
        raise _bad("Results cannot be streamed when best_of > n.", "best_of")
    max_tokens = _integer(p, "max_tokens", None, 0) if "max_tokens" in p else 16
    logprobs = _integer(p, "logprobs", None, 0)
    echo = _boolean(p, "echo")
    if max_tokens == 0 and not echo:
        raise _bad("You requested a length 0 completion, but you did not set the 'echo' "
                   "parameter. That means that we will return no data to you. (HINT: set "
                   "'echo' to true in order for the API to echo back the prompt to you.)",
                   "max_tokens")
    if max_tokens == 0 and logprobs is None:
        raise _bad("You requested a length 0 completion, but did not specify a 'logprobs' "
                   "parameter to see the probability of each token. Either request a "
                   "completion with length greater than 1, or set 'logprobs' to 0 (to see "
                   "the probabilities of each token you submitted) or more (to also see the "
                   "probabilities over alternative tokens).", "max_tokens")
    mode = p.get("logprobs_mode")
    if mode is not None and mode not in ("raw", "processed"):
        raise _bad(f"'logprobs_mode' must be 'raw' or 'processed', got {_show(mode)}.",
                   "logprobs_mode")
    return CompletionRequest(
        model=model,
        prompt=_prompt(p.get("prompt"), limits),
        max_tokens=max_tokens,
        temperature=_temperature(_number(p, "temperature", 1.0, 0, 2)),
        top_p=_number(p, "top_p", 1.0, 0, 1),
        n=n,
        best_of=best_of,
        stream=stream,
        include_usage=include_usage,
        logprobs=None if logprobs is None else min(logprobs, MAX_LOGPROBS),
        echo=echo,
        stop=_stop(p.get("stop")),
        presence_penalty=_number(p, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(p, "frequency_penalty", 0.0, -2, 2),
        logit_bias=_logit_bias(p.get("logit_bias")),
        seed=_integer(p, "seed", None, INT64_MIN, INT64_MAX),
        user=user,
        logprobs_mode=mode or "raw",
        trace=_boolean(p, "trace"),
    )


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token ids and its text (for echo and text_offset)."""

    ids: tuple[int, ...]
    text: str


def encode_prompts(req: CompletionRequest, model,
                   limits: Limits = DEFAULT_LIMITS) -> list[Prompt]:
    """Tokenize the prompt(s) and check the model-dependent rules (vocab, context length),
    then the total work (Limits.max_work_tokens).

    A token-id prompt's text is the UTF-8 decoding of its bytes, invalid bytes as U+FFFD;
    a string prompt's text is the decoding of its tokens (the string itself).
    """
    tok, n_vocab = model.tokenizer, model.n_vocab
    for token, _ in req.logit_bias:
        if token >= n_vocab:
            raise _bad(f"Invalid key in 'logit_bias': {_show(token)}. Maximum value is {n_vocab - 1}.",
                       "logit_bias")
    raw = req.prompt
    if isinstance(raw, str):
        raw = [raw]
    elif raw and _is_int(raw[0]):
        raw = [raw]
    prompts = []
    for item in raw:
        ids = tok.encode(item) if isinstance(item, str) else item
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise _bad(f"Invalid token id {_show(bad[0])} in 'prompt': token ids must be in "
                       f"[0, {n_vocab - 1}].", "prompt")
        prompts.append(Prompt(tuple(ids), tok.decode(ids)))
    for pr in prompts:
        _check_context(req, len(pr.ids), model.n_ctx)
    _check_work(req, [len(pr.ids) for pr in prompts], model.n_ctx, limits)
    return prompts


def _check_work(req: CompletionRequest, prompt_lens: list[int], n_ctx: int,
                limits: Limits) -> None:
    """Limits.max_work_tokens: the tokens all candidates of all prompts may generate."""
    work = sum(req.best_of * max_new_tokens(req, n, n_ctx) for n in prompt_lens)
    if work > limits.max_work_tokens:
        upto = req.max_tokens if req.max_tokens is not None else "the context length"
        raise _bad(f"This request may generate up to {work} tokens ({len(prompt_lens)} "
                   f"prompt(s) x best_of {req.best_of} x max_tokens up to {upto}); the limit "
                   f"is {limits.max_work_tokens}. Reduce max_tokens, n or best_of, or send "
                   "fewer prompts.", "max_tokens")


def _check_context(req: CompletionRequest, prompt_len: int, n_ctx: int) -> None:
    """SEMANTICS 6: prompt + max_tokens must fit the context (OpenAI's message)."""
    wanted = req.max_tokens if req.max_tokens is not None else max(n_ctx - prompt_len, 1)
    if prompt_len + wanted > n_ctx:
        raise _bad(f"This model's maximum context length is {n_ctx} tokens, however you "
                   f"requested {_show(prompt_len + wanted)} tokens ({prompt_len} in your prompt; "
                   f"{_show(wanted)} for the completion). Please reduce your prompt; or completion "
                   "length.", "max_tokens" if req.max_tokens is not None else "prompt")


def max_new_tokens(req: CompletionRequest, prompt_len: int, n_ctx: int) -> int:
    """The number of tokens a candidate may generate for this prompt."""
    return req.max_tokens if req.max_tokens is not None else n_ctx - prompt_len
