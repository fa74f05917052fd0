"""Scripted-logits fake models: refcomplete.lm.LanguageModel without weights.

Knows: the model interface (refcomplete/lm.py) and the real bundled tokenizer.
Does not know: anything of requests. The logits of a row are a deterministic function
of (prompt, that row's own generated tokens), so SEMANTICS 4 holds by construction and
tests can check that the loop keeps it.

    model = FakeModel()                       # hashed: varied, readable continuations
    model = ScriptedModel([464, 3797, 50256]) # greedy generates exactly these tokens
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from refcomplete.tokenizer import get_tokenizer

V = 50257
EOT = 50256
TOK = get_tokenizer()
BASE = np.random.default_rng(0).standard_normal(V).astype(np.float32)   # [V] the tail
# short, common tokens so that generated text often hits stop strings; plus the two
# halves of "’" (447, 247) and <|endoftext|>
WORDS = [TOK.encode(w)[0] for w in
         (" a", " b", "a", "b", " ab", "\n", ",", ".", " the", " x", "x", "!", "é")]
FAVOURITES = np.array(WORDS + [447, 247, EOT], dtype=np.int64)


def hashed_logits(prompt: tuple, generated: tuple) -> np.ndarray:
    """BASE plus boosts of +8..+14 on 6 favourite tokens chosen by hashing the context."""
    h = hashlib.blake2b(struct.pack(f"{len(prompt) + len(generated) + 1}q", len(prompt),
                                    *prompt, *generated), digest_size=16).digest()
    pick = np.frombuffer(h, dtype=np.uint8)
    z = BASE.copy()
    ids = FAVOURITES[pick[:6] % len(FAVOURITES)]
    z[ids] += 8.0 + (pick[6:12] % 7).astype(np.float32)
    if len(generated) and generated[-1] == 447:      # finish the character most of the time
        z[247] += 14.0
    return z


class FakeSession:
    def __init__(self, model, prompt, rows, max_new_tokens):
        assert len(prompt) + max_new_tokens <= model.n_ctx, "context overflow reached the model"
        self.model, self.prompt = model, tuple(int(t) for t in prompt)
        self.rows = [() for _ in range(rows)]
        self.max_new_tokens = max_new_tokens
        self.prefilled = False

    def prefill(self, all_positions: bool = False) -> np.ndarray:
        assert not self.prefilled
        self.prefilled = True
        self.model.calls.append(("prefill", all_positions))
        if all_positions:
            return np.stack([self.model.logits(self.prompt[: t + 1], ())
                             for t in range(len(self.prompt))])
        return self.model.logits(self.prompt, ())[None, :]

    def step(self, rows, tokens) -> np.ndarray:
        assert self.prefilled and len(rows) == len(tokens) and len(set(rows)) == len(rows)
        self.model.calls.append(("step", tuple(rows)))
        out = []
        for r, t in zip(rows, tokens):
            self.rows[r] = self.rows[r] + (int(t),)
            assert len(self.rows[r]) <= self.max_new_tokens
            out.append(self.model.logits(self.prompt, self.rows[r]))
        return np.stack(out)


class FakeModel:
    """A LanguageModel whose logits come from `logits(prompt, generated)`."""

    n_vocab = V
    eot_id = EOT
    tokenizer = TOK

    def __init__(self, logits=hashed_logits, n_ctx: int = 1024, name: str = "fake",
                 weights_sha256: str = "0" * 64):
        self.logits, self.n_ctx, self.name = logits, n_ctx, name
        self.weights_sha256 = weights_sha256
        self.calls: list = []

    def session(self, prompt, rows: int, max_new_tokens: int) -> FakeSession:
        return FakeSession(self, prompt, rows, max_new_tokens)


class ScriptedModel(FakeModel):
    """Generated position i strongly prefers script[i] (+30); past the script, EOS."""

    def __init__(self, script, **kw):
        self.script = [int(t) for t in script]
        super().__init__(self._scripted, **kw)

    def _scripted(self, prompt, generated):
        z = BASE.copy()
        i = len(generated)
        z[self.script[i] if i < len(self.script) else EOT] += 30.0
        return z


def scripted_text(text: str, **kw) -> ScriptedModel:
    """A model that greedily generates the tokens of `text`, then <|endoftext|>."""
    return ScriptedModel(TOK.encode(text), **kw)
