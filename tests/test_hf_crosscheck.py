"""Our logits against Hugging Face transformers' GPT2LMHeadModel on the same weights.

Two forms: against the committed fixture (always runs; made by tests/make_hf_fixture.py)
and live against transformers (runs where torch and transformers are installed: CI's
cross-check step). Tolerance: max abs logit difference <= 1e-4, prefill and 20 cached steps.
"""

from pathlib import Path

import numpy as np
import pytest

from hf_reference import CASES, COLUMNS, our_greedy, our_logits
from refcomplete._paths import weights_dir
from refcomplete.checkpoint import load_checkpoint, write_random_checkpoint
from refcomplete.runtime import GPT2Model

FIXTURE = Path(__file__).parent / "fixtures" / "hf_logits.npz"
BUNDLED = weights_dir() / "gpt2-tiny-shakespeare"
TOL = 1e-4


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config, seed = CASES[request.param]
    d = write_random_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=seed)
    prefill, steps = our_logits(GPT2Model(load_checkpoint(d)))
    return request.param, d, np.concatenate([prefill, steps])


def test_against_committed_fixture(case):
    name, _, ours = case
    fx = np.load(FIXTURE)
    assert np.array_equal(fx["columns"], COLUMNS)
    diff = np.abs(ours[:, COLUMNS] - fx[f"{name}/logits"]).max()
    assert diff <= TOL, f"{name}: max abs diff {diff}"
    assert np.array_equal(ours.argmax(axis=-1), fx[f"{name}/argmax"])


@pytest.mark.crosscheck
def test_live_against_transformers(case):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import hf_logits

    name, d, ours = case
    prefill, steps = hf_logits(d)
    theirs = np.concatenate([prefill, steps])
    diff = np.abs(ours - theirs).max()
    print(f"{name}: max abs logit diff vs HF = {diff:.2e}")
    assert diff <= TOL, f"{name}: max abs diff {diff}"


@pytest.fixture(scope="module")
def bundled():
    model = GPT2Model(load_checkpoint(BUNDLED))
    prefill, steps = our_logits(model)
    return model, np.concatenate([prefill, steps])


def test_bundled_model_against_fixture(bundled):
    model, ours = bundled
    fx = np.load(FIXTURE)
    diff = np.abs(ours[:, COLUMNS] - fx["bundled/logits"]).max()
    assert diff <= TOL, f"bundled: max abs diff {diff}"
    assert np.array_equal(ours.argmax(axis=-1), fx["bundled/argmax"])
    assert our_greedy(model) == fx["bundled/greedy"].tolist()


@pytest.mark.crosscheck
def test_bundled_model_live_against_transformers(bundled):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import hf_greedy, hf_logits

    model, ours = bundled
    prefill, steps = hf_logits(BUNDLED)
    diff = np.abs(ours - np.concatenate([prefill, steps])).max()
    print(f"bundled: max abs logit diff vs HF = {diff:.2e}")
    assert diff <= TOL
    assert our_greedy(model) == hf_greedy(BUNDLED)      # token for token, 40 tokens x 4 prompts
