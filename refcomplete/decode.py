"""The decode loop: the candidates of one prompt, decoded together as rows of one session.

Knows: token ids, text deltas, steps, finish reasons. Does not know: request dicts,
chunk shapes, HTTP, n/best_of ranking (choices.py), how a model computes logits.

    for piece in generate(model, prompt_ids, plan):
        piece.row, piece.text, piece.tokens, piece.finish

Each step, every unfinished row draws one token from its own logits with its own coin
`rng.coin(seed, row, step)`; rows that finished are not stepped (SEMANTICS 3-4). A row
ends on <|endoftext|> ("stop"), on a stop string ("stop"), or after max_new_tokens
("length"); the token that ends it is kept and counted (SEMANTICS 7).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from refcomplete import logprobs, rng, sampling, trace
from refcomplete.kernels import fmath
from refcomplete.logprobs import Token
from refcomplete.stop import RowText


@dataclass(frozen=True)
class Plan:
    """What the loop needs to know about a request, and nothing of its JSON."""

    rows: int
    max_new_tokens: int
    sampling: sampling.SamplingParams
    seed: int
    stops: tuple[str, ...] = ()
    logprobs: int | None = None   # top-k size; None: no logprobs
    processed: bool = False       # logprobs_mode == "processed"
    echo: bool = False
    rank: bool = False            # record each token's raw logprob (best_of ranking)
    trace: bool = False

    @property
    def plain(self) -> bool:
        """Only temperature and softmax apply, and nothing but the token is reported."""
        return self.sampling.plain and self.logprobs is None and not (self.rank or self.trace)


@dataclass(frozen=True)
class Piece:
    """What one row releases after one step: text, (text offset, Token) pairs, finish;
    `generated` counts the tokens this piece's step generated (0 for the echoed prompt)."""

    row: int
    text: str
    tokens: tuple
    finish: str | None = None
    generated: int = 1


def generate(model, prompt: list[int], plan: Plan) -> Iterator[Piece]:
    tok = model.tokenizer
    ops = getattr(model, "ops", fmath)          # the backend's exp/log/sum: same bits, its speed
    sess = model.session(prompt, rows=plan.rows, max_new_tokens=plan.max_new_tokens)
    logits = sess.prefill(all_positions=plan.echo and plan.logprobs is not None)
    prompt_text = tok.decode(prompt)
    if plan.echo:
        head = logprobs.prompt_tokens(tok, prompt, logits, plan.logprobs, ops)
        done = "length" if plan.max_new_tokens == 0 else None
        yield from (Piece(r, prompt_text, tuple(head), done, 0) for r in range(plan.rows))
    if plan.max_new_tokens == 0:
        return
    texts = [RowText(tok, plan.stops, len(prompt_text)) for _ in range(plan.rows)]
    counts = [Counter() for _ in range(plan.rows)]
    active, batch, step = list(range(plan.rows)), logits[-1:], 0
    while active:
        chosen = []
        for i, r in enumerate(active):
            z = batch[min(i, len(batch) - 1)]        # step 0: all rows share the prompt's row
            token = draw(tok, z, counts[r], plan, r, step, ops)
            counts[r][token.id] += 1
            eos = token.id == model.eot_id
            end = eos or step + 1 == plan.max_new_tokens
            text, released, stopped = texts[r].push(token.id, token, has_text=not eos, end=end)
            finish = "stop" if stopped or eos else "length" if end else None
            yield Piece(r, text, tuple(released), finish)
            chosen.append((r, token.id, finish))
        active = [r for r, _, f in chosen if f is None]
        if active:
            batch = sess.step(active, [t for _, t, f in chosen if f is None])
        step += 1


def draw(tok, logits: np.ndarray, counts: Counter, plan: Plan, row: int, step: int,
         ops=fmath) -> Token:
    """Sample one token of one row and gather its logprobs and trace (SEMANTICS 1)."""
    params = plan.sampling
    coin = None if params.greedy else rng.coin(plan.seed, row, step)
    if plan.plain:                                                  # the same token, one call
        return Token(sampling.select_plain(logits, params.temperature, coin, ops))
    z = logits.astype(np.float64)                                   # [V]
    x, seen = sampling.run(z, sampling.State(params, counts, ops), trace=plan.trace)
    token = sampling.greedy(x) if params.greedy else sampling.select(x, coin, ops)
    lp, top = logprobs.generated(z, x, token, plan.logprobs, plan.processed, params.greedy, ops)
    raw = None
    if plan.rank:
        raw = lp if lp is not None and not plan.processed else float(
            sampling.log_softmax_at(z, [token], ops)[0])
    record = trace.record(tok, step, z, seen, coin, token, candidate=row, ops=ops) if plan.trace else None
    return Token(token, lp, top, raw, record)
