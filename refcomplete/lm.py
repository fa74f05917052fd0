"""The interface between the decode loop and a language model.

Knows: what the decode loop may ask of a model. Does not know: how the model computes.
The real GPT-2 runtime (refcomplete.runtime.GPT2Model) and the scripted-logits fakes
in tests/fakes.py both implement it, so the loop is tested without weights.

Shapes: T = prompt length, R = rows (candidates) of a session, V = n_vocab.

    model = refcomplete.registry.load_model("gpt2-tiny-shakespeare")
    sess = model.session(prompt_ids, rows=4, max_new_tokens=16)
    prompt_logits = sess.prefill(all_positions=False)   # float32 [1, V]: last prompt position
    logits = sess.step(rows=[0, 1, 3], tokens=[11, 11, 42])   # float32 [3, V]

Rule (SEMANTICS 4): the logits of a row depend only on the prompt and that row's own
tokens, bitwise, never on which other rows are stepped with it.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Session(Protocol):
    def prefill(self, all_positions: bool = False) -> np.ndarray:
        """Run the prompt once (shared by every row). Returns float32 [T, V] logits for every
        prompt position if all_positions (position t predicts token t+1), else [1, V] for the
        last position only. Must be called once, before step()."""

    def step(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Append tokens[i] to row rows[i]; return float32 [len(rows), V] next-token logits."""


class LanguageModel(Protocol):
    name: str            # the model id as resolved (e.g. "gpt2-tiny-shakespeare")
    n_vocab: int         # 50257 for the GPT-2 family
    n_ctx: int           # context length (n_positions)
    eot_id: int          # <|endoftext|> = 50256
    tokenizer: object    # refcomplete.tokenizer.Tokenizer
    weights_sha256: str  # hash of the weights file(s), for system_fingerprint

    def session(self, prompt: Sequence[int], rows: int, max_new_tokens: int) -> Session:
        """A KV-cache session: `rows` candidates continuing the same prompt, each for at most
        max_new_tokens steps. Requires len(prompt) + max_new_tokens <= n_ctx."""

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [T, V] logits for every position of ids (a prefill; used for scoring)."""
