"""One decode step of one candidate: the sampling pipeline as an ordered tuple of pure stages.

Knows: how next-token logits become a token (SEMANTICS 1-3). Does not know: models,
text, stop strings, response shapes. Plain NumPy, float64; no stage mutates its input.
Every exp, log and float sum that reaches a token or a logprob is ours (State.ops: the
backend's kernels.fmath functions, SEMANTICS 11); cumsum (select, top_p) is a
sequential sum by definition.

The order, written once (V = n_vocab; x is float64 [V] throughout):

    z = float64(logits)
    logit_bias    z + bias                              (ids from the request)
    penalties     z - frequency_penalty*c - presence_penalty*(c > 0)
                  (c: counts of tokens THIS candidate generated; the prompt is excluded)
    -- temperature == 0 stops here: token = argmax(z), lowest id on ties, no coin --
    temperature   z / T
    softmax       p = exp(z - max z) / sum(exp(z - max z))
    top_p         keep a token iff the mass of the tokens sorted before it (probability
                  descending, ties by ascending id) is < top_p; renormalise
    select(p, u)  walk kept tokens by ascending id, accumulate p, take the first whose
                  cumulative sum exceeds u * total

Each stage is `(x, state) -> x`; `run(z, state, trace=True)` also returns every
intermediate; `select_plain` draws the same token in one call where only temperature and
softmax apply. The fast paths (the backend's `top_p_keep` and `select`: kernels/fmath.py
and its compiled twin) never sort the whole vocabulary; `top_p_reference` and
`select_reference` are their slow twins (the spec), pinned together in
tests/test_sampling.py and tests/test_fmath.py.

    >>> st = State(SamplingParams(temperature=1.0, top_p=0.5), counts={})
    >>> p, _ = run(fmath.log(np.array([0.1, 0.4, 0.3, 0.2])), st)
    >>> p.round(3).tolist()            # mass before 0.3 is 0.4 < 0.5: kept; before 0.2: 0.7
    [0.0, 0.571, 0.429, 0.0]
    >>> select(p, 0.5)                 # cumulative 0.571 > 0.5 * 1.0 at token 1
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Mapping

import numpy as np

from refcomplete.kernels import fmath


@dataclass(frozen=True)
class SamplingParams:
    """The request's sampling parameters, validated (see params.py)."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """Sampled, and no stage but temperature and softmax changes the logits: no
        logit_bias, no penalties, top_p >= 1 (select_plain draws such a row's token)."""
        return (not self.greedy and not self.logit_bias and self.top_p >= 1
                and self.presence_penalty == 0 and self.frequency_penalty == 0)


@dataclass(frozen=True)
class State:
    """What a stage may read: the parameters, this candidate's generated-token counts, and
    the backend's elementwise math `ops` (kernels.fmath, or its compiled twin
    kernels.fmath_numba: the same bits, so it changes only the speed)."""

    params: SamplingParams
    counts: Mapping[int, int] = field(default_factory=dict)
    ops: ModuleType = fmath


# -- the stages ---------------------------------------------------------------------------

def logit_bias(z: np.ndarray, st: State) -> np.ndarray:
    """Add the request's bias to the listed token ids ("added to the logits ... prior to sampling")."""
    if not st.params.logit_bias:
        return z
    ids, bias = zip(*st.params.logit_bias)
    out = z.copy()
    out[list(ids)] += np.array(bias)
    return out


def penalties(z: np.ndarray, st: State) -> np.ndarray:
    """OpenAI's formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    fp, pp = st.params.frequency_penalty, st.params.presence_penalty
    if (fp == 0 and pp == 0) or not st.counts:
        return z
    ids = np.fromiter(st.counts.keys(), dtype=np.int64, count=len(st.counts))
    c = np.fromiter(st.counts.values(), dtype=np.float64, count=len(st.counts))
    out = z.copy()
    out[ids] = z[ids] - fp * c - pp
    return out


def temperature(z: np.ndarray, st: State) -> np.ndarray:
    """Divide by the temperature (never 0 here: greedy stops before this stage)."""
    t = st.params.temperature
    return z if t == 1 else z / t


def softmax(z: np.ndarray, st: State | None = None) -> np.ndarray:
    """p = exp(z - max z) / sum(exp(z - max z)), float64, with our exp and our sum
    (kernels/fmath.py: eight interleaved lanes, a fixed tree)."""
    return (fmath if st is None else st.ops).softmax(z)


def top_p(p: np.ndarray, st: State) -> np.ndarray:
    """Nucleus filter (SEMANTICS 2); top_p >= 1 keeps every token and is the identity."""
    if st.params.top_p >= 1:
        return p
    return st.ops.renormalise(p, st.ops.top_p_keep(p, st.params.top_p))


STAGES: tuple[tuple[str, Callable], ...] = (
    ("logit_bias", logit_bias),
    ("penalties", penalties),
    ("temperature", temperature),
    ("softmax", softmax),
    ("top_p", top_p),
)
GREEDY_STAGES = STAGES[:2]


def run(z: np.ndarray, st: State, trace: bool = False):
    """Apply the stages in order. Returns (x, intermediates): x is the final float64 [V]
    (probabilities, or the penalised logits when greedy); intermediates is
    [(stage name, x after it)] if trace, else []."""
    stages = GREEDY_STAGES if st.params.greedy else STAGES
    seen = []
    for name, stage in stages:
        z = stage(z, st)
        if trace:
            seen.append((name, z))
    return z, seen


# -- selection ----------------------------------------------------------------------------

def greedy(z: np.ndarray) -> int:
    """argmax, lowest id on ties (numpy's argmax returns the first maximum)."""
    return int(np.argmax(z))


def select(p: np.ndarray, u: float, ops: ModuleType = fmath) -> int:
    """First kept token (ascending id) whose cumulative probability exceeds u * total.

    `total` is the last cumulative sum (sequential, in id order), so p need not be
    normalised; tokens with p == 0 are never chosen. The backend's select (kernels/
    fmath.py's, or its compiled twin in fmath_numba) estimates the sums by blocks and
    walks in order where the estimate is too close to call: it always equals
    `select_reference`.
    """
    return ops.select(p, u)


def select_plain(logits: np.ndarray, temperature: float, u: float,
                 ops: ModuleType = fmath) -> int:
    """select(run(float64(logits)), u) for plain params (SamplingParams.plain): the
    backend's softmax_select, the same steps in one compiled call from the float32
    logits, which a server's request threads hand the GIL to once instead of four times
    (docs/benchmarks.md, thirteenth pass). Pinned to the stages in tests/test_sampling.py."""
    return ops.softmax_select(logits, temperature, u)


def select_reference(p: np.ndarray, u: float) -> int:
    """Slow twin of `select`: the sequential float64 walk written as the spec says."""
    total, ids = 0.0, [i for i in range(len(p)) if p[i] > 0]
    cums = []
    for i in ids:
        total += float(p[i])
        cums.append(total)
    x = u * total
    for i, c in zip(ids, cums):
        if c > x:
            return i
    return ids[-1]


def top_p_reference(p: np.ndarray, top_p: float) -> np.ndarray:
    """Slow twin of the top_p stage: a full stable sort, as the spec says."""
    if top_p >= 1:
        return p
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    before = np.concatenate(([0.0], cum[:-1]))
    keep = before < top_p
    keep[0] = True
    return fmath.renormalise(p, np.sort(order[keep]))


# -- log-probabilities and top-k (used by logprobs.py and trace.py) -----------------------

def log_softmax_at(z: np.ndarray, ids, ops: ModuleType = fmath) -> np.ndarray:
    """log_softmax(z)[ids] = (z[ids] - max z) - log(sum(exp(z - max z))), float64, with our
    exp, log and sum (kernels/fmath.py)."""
    return ops.log_softmax_at(z, ids)


def top_k(x: np.ndarray, k: int, positive: bool = False, ops: ModuleType = fmath) -> list[int]:
    """The k largest entries' ids, descending, ties by ascending id; no sort of x.

    With positive=True only entries > 0 qualify (for probabilities after top_p).
    """
    return ops.top_k(x, k, positive)
