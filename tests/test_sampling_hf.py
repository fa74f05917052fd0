"""Cross-check: our temperature and top_p stages against HF transformers' warpers.

Runs in CI's cross-check step (torch==2.13.0 + transformers installed); skipped elsewhere.
HF's rule (ascending sort, remove cumsum <= 1 - top_p, keep at least one) is ours
written in the other direction; exact-boundary ties are implementation noise, so the
logits here are random floats.
"""

import numpy as np
import pytest

from refcomplete import sampling as S
from refcomplete.sampling import SamplingParams, State

torch = pytest.importorskip("torch")
generation = pytest.importorskip("transformers.generation")
pytestmark = pytest.mark.crosscheck


def _state(**kw):
    return State(SamplingParams(**kw), {})


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.6])
def test_temperature_matches_hf(seed, temperature):
    z = np.random.default_rng(seed).standard_normal(50257) * 3
    hf = generation.TemperatureLogitsWarper(temperature)(None, torch.tensor(z[None]))
    ours = S.temperature(z, _state(temperature=temperature))
    assert np.allclose(hf.numpy()[0], ours, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_same_tokens_as_hf(seed, top_p):
    z = np.random.default_rng(seed).standard_normal(50257) * (1 + seed)
    scores = torch.tensor(z[None])
    hf = generation.TopPLogitsWarper(top_p)(None, scores).numpy()[0]
    ours = S.top_p(S.softmax(z), _state(top_p=top_p))
    assert np.array_equal(np.isfinite(hf), ours > 0)
    hf_p = torch.softmax(torch.tensor(hf), -1).numpy()
    assert np.allclose(hf_p, ours, atol=1e-12)


def test_pipeline_matches_hf_processor_list():
    """Temperature then top_p, as HF's sampling applies them, gives our distribution."""
    z = np.random.default_rng(9).standard_normal(50257) * 2
    procs = generation.LogitsProcessorList([generation.TemperatureLogitsWarper(0.8),
                                            generation.TopPLogitsWarper(0.9)])
    hf = torch.softmax(procs(None, torch.tensor(z[None])), -1).numpy()[0]
    ours, _ = S.run(z, _state(temperature=0.8, top_p=0.9))
    assert np.allclose(hf, ours, atol=1e-12)
