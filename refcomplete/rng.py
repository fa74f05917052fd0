"""Coins: the only source of randomness, counter-based and documented.

Knows: how a request seed, a candidate index and a step become one float in [0, 1).
Does not know: distributions, tokens, requests.

Every random draw of the decode loop is `coin(seed, candidate, step)`: a pure function
of its three integers, so a candidate's draws do not depend on batch size, on the
prompt's position in a prompt list, on other candidates, or on global state
(SEMANTICS 3). The algorithm (SplitMix64 mixing, all arithmetic mod 2**64):

    mix(x):  x = x + 0x9E3779B97F4A7C15
             x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
             x = (x ^ (x >> 27)) * 0x94D049BB133111EB
             return x ^ (x >> 31)
    s = mix(seed mod 2**64)          # negative seeds: int64 two's complement
    s = mix(s ^ candidate)
    s = mix(s ^ step)
    u = (s >> 11) * 2**-53           # 53 random bits, exactly representable

    >>> coin(0, 0, 0)
    0.13870941014555427

Test vectors are published in docs/semantics.md and pinned in tests/test_rng.py.
"""

from __future__ import annotations

import secrets

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def mix(x: int) -> int:
    """One SplitMix64 step: add the golden gamma, then finalise (mod 2**64)."""
    x = (x + GOLDEN) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def coin(seed: int, candidate: int, step: int) -> float:
    """The coin u in [0, 1) of candidate `candidate` at decode step `step` (both from 0)."""
    s = mix(seed & MASK64)
    s = mix(s ^ candidate)
    s = mix(s ^ step)
    return (s >> 11) * 2.0**-53


def fresh_seed() -> int:
    """A new 63-bit seed from OS entropy, used when a request has `seed: null`."""
    return secrets.randbits(63)
