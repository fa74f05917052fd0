"""refcomplete: OpenAI's legacy completions endpoint, as an exact reference, on the CPU.

Public API (explicit re-exports; importing this package does not import numba):
    load_model, list_models    resolve and load GPT-2-family models (registry.py)
    create                     POST /v1/completions as a call (completions.py)
    CompletionError            what create() raises for a bad request (errors.py)
    sampling, rng              the sampling stages and the coin generator, documented
"""

from refcomplete.registry import DEFAULT_MODEL, ModelNotFound, list_models, load_model

from refcomplete import rng, sampling
from refcomplete._version import __version__
from refcomplete.completions import create
from refcomplete.errors import CompletionError

__all__ = ["DEFAULT_MODEL", "ModelNotFound", "list_models", "load_model",
           "create", "CompletionError", "sampling", "rng", "__version__"]
