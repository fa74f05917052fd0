"""refcomplete: OpenAI's legacy completions endpoint, as an exact reference, on the CPU.

Public API (explicit re-exports; importing this package does not import numba):
    load_model, list_models    resolve and load GPT-2-family models (registry.py)
    create                     POST /v1/completions as a call (completions.py)
    CompletionError            what create() raises for a bad request (errors.py)
    sampling, rng              the sampling stages and the coin generator, documented
    openai_client              an openai.OpenAI client served in-process (client.py; lazy)
"""

from refcomplete.registry import DEFAULT_MODEL, ModelNotFound, list_models, load_model

from refcomplete import rng, sampling
from refcomplete._version import __version__
from refcomplete.completions import create
from refcomplete.errors import CompletionError


def openai_client(*args, **kwargs):
    """An `openai.OpenAI` client answered in-process by refcomplete; see refcomplete.client.
    Imports openai and httpx only when called."""
    from refcomplete.client import openai_client as make

    return make(*args, **kwargs)


__all__ = ["DEFAULT_MODEL", "ModelNotFound", "list_models", "load_model",
           "create", "CompletionError", "sampling", "rng", "__version__", "openai_client"]
