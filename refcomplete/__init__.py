"""refcomplete: OpenAI's legacy completions endpoint, as an exact reference, on the CPU.

Public API (explicit re-exports; importing this package does not import numba):
    load_model, list_models    resolve and load GPT-2-family models (registry.py)
"""

from refcomplete.registry import DEFAULT_MODEL, ModelNotFound, list_models, load_model

__all__ = ["DEFAULT_MODEL", "ModelNotFound", "list_models", "load_model"]
