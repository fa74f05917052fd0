import os
import sys

import pytest

# `python -m pytest` puts the working directory (the repository root) first on sys.path,
# where kernels/ would shadow the PyPI package `kernels` that transformers >= 5.25 imports
# (ImportError: cannot import name 'CUDAProperties' from 'kernels'). refcomplete is
# installed (refcomplete.kernels is this kernels/), so the root need not be on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from refcomplete.checkpoint import GPT2Config, write_random_checkpoint  # noqa: E402

TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_ctx=64)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight GPT-2 checkpoint: 2 layers, 64 wide, 4 heads, 64 positions."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, seed=1)
