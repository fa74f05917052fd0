"""Logprobs: the numbers of each token's entry, and the OpenAI `logprobs` object (SEMANTICS 5).

Knows: which distribution a logprob comes from (raw or processed), top-k selection,
display strings, the JSON shape {tokens, token_logprobs, top_logprobs, text_offset}.
Does not know: sampling decisions, stop strings, streams. This is the only module that
builds a logprobs object; a stream's deltas and the non-streamed response both come
from `block`, and `concat` folds deltas.

    >>> block(tok, [(5, Token(11, -0.25, top=((11, -0.25),)))], k=1)
    {'tokens': [','], 'token_logprobs': [-0.25], 'top_logprobs': [{',': -0.25}], 'text_offset': [5]}

OpenAI: "Include the log probabilities on the logprobs most likely output tokens, as
well the chosen tokens ... there may be up to logprobs+1 elements in the response."
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from refcomplete.kernels import fmath
from refcomplete.sampling import log_softmax_at, top_k

PROMPT_CHUNK = 64  # prompt positions converted to float64 at a time


@dataclass(frozen=True)
class Token:
    """One token of a choice: id, reported logprob, top-k [(id, logprob)], raw logprob
    (for best_of ranking), trace record. Prompt tokens of an echo have raw = None."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None
    raw: float | None = None
    trace: Any = None


def generated(z: np.ndarray, x: np.ndarray, token: int, k: int | None, processed: bool,
              greedy: bool, ops: ModuleType = fmath) -> tuple[float | None, tuple | None]:
    """(logprob of token, top-k) from the raw logits z, or, if processed, from the final
    pipeline value x: probabilities after top_p (removed tokens never listed), or the
    biased and penalised logits when greedy."""
    if k is None:
        return None, None
    if not processed or greedy:
        src = z if not processed else x
        ids = [token] + top_k(src, k, ops=ops)
        lps = log_softmax_at(src, ids, ops)
    else:
        ids = [token] + top_k(x, k, positive=True, ops=ops)
        lps = ops.log(x[ids])
    lps = [float(v) for v in lps]
    return lps[0], tuple(zip(ids[1:], lps[1:]))


def prompt_tokens(tokenizer, prompt, logits: np.ndarray | None, k: int | None,
                  ops: ModuleType = fmath) -> list:
    """(text offset, Token) for each echoed prompt token. logits: float32 [T, V] from
    prefill(all_positions=True) (row t predicts token t+1), or None without logprobs.
    The first token has no logprob and no top entry (no BOS is ever added)."""
    dec, offset, out = tokenizer.stream_decoder(), 0, []
    lps: list = [None] * len(prompt)
    tops: list = [None] * len(prompt)
    if k is not None:
        for lo in range(0, len(prompt) - 1, PROMPT_CHUNK):
            rows = logits[lo:lo + PROMPT_CHUNK].astype(np.float64)
            for j, z in enumerate(rows[: len(prompt) - 1 - lo]):
                t = lo + j + 1
                ids = [prompt[t]] + top_k(z, k, ops=ops)
                v = [float(a) for a in log_softmax_at(z, ids, ops)]
                lps[t], tops[t] = v[0], tuple(zip(ids[1:], v[1:]))
    for t, token in enumerate(prompt):
        out.append((offset + dec.carried(token), Token(token, lps[t], tops[t])))
        offset += len(dec.feed(token))
    return out


def block(tokenizer, entries: list, k: int | None) -> dict | None:
    """The OpenAI logprobs object of some tokens: entries are (text offset, Token).

    k None: no logprobs requested (null). k == 0: `top_logprobs` is null. Else each
    top dict holds the chosen token first, then the top-k by logprob (k or k+1 entries).
    """
    if k is None:
        return None
    show = tokenizer.display
    tops = None
    if k > 0:
        tops = [None if t.top is None else
                {show(t.id): t.logprob, **{show(i): lp for i, lp in t.top if i != t.id}}
                for _, t in entries]
    return {"tokens": [show(t.id) for _, t in entries],
            "token_logprobs": [t.logprob for _, t in entries],
            "top_logprobs": tops,
            "text_offset": [o for o, _ in entries]}


def concat(a: dict | None, b: dict | None) -> dict | None:
    """Fold two consecutive logprobs deltas of one choice."""
    if a is None or b is None:
        return a if b is None else b
    return {key: None if a[key] is None else a[key] + b[key] for key in a}
