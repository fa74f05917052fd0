"""The coin generator: published test vectors (docs/semantics.md) and its keying."""

import subprocess
import sys

import pytest

from refcomplete import rng

# (seed, candidate, step) -> coin; the same table is in docs/semantics.md
VECTORS = [
    ((0, 0, 0), 0.13870941014555427),
    ((0, 0, 1), 0.18436667429957676),
    ((0, 1, 0), 0.2691303195904541),
    ((1, 0, 0), 0.6935121390102292),
    ((42, 0, 0), 0.3869742762400409),
    ((42, 3, 7), 0.6686949404958634),
    ((-1, 0, 0), 0.9844383619111032),
    ((2**63 - 1, 0, 0), 0.397540582762002),
    ((-2**63, 19, 1023), 0.49752333767906465),
]


@pytest.mark.parametrize("key,expected", VECTORS)
def test_published_vectors(key, expected):
    assert rng.coin(*key) == expected


def test_mix_is_splitmix64():
    # the first output of the reference SplitMix64 generator seeded with 0
    assert rng.mix(0) == 0xE220A8397B1DCDAF


def test_negative_seed_is_twos_complement():
    assert rng.coin(-1, 2, 3) == rng.coin(2**64 - 1, 2, 3)
    assert rng.coin(-(2**63), 0, 5) == rng.coin(2**63, 0, 5)


def test_coins_are_in_unit_interval_and_distinct():
    coins = [rng.coin(7, c, s) for c in range(8) for s in range(64)]
    assert all(0.0 <= u < 1.0 for u in coins)
    assert len(set(coins)) == len(coins)
    assert 0.4 < sum(coins) / len(coins) < 0.6


def test_no_global_state():
    a = [rng.coin(3, 0, s) for s in range(5)]
    rng.fresh_seed()
    assert [rng.coin(3, 0, s) for s in reversed(range(5))][::-1] == a


def test_fresh_seed_is_63_bits_and_fresh():
    seeds = {rng.fresh_seed() for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2**63 for s in seeds)


def test_same_coins_in_a_fresh_process():
    code = "from refcomplete.rng import coin; print(repr(coin(42, 3, 7)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(rng.coin(42, 3, 7))
