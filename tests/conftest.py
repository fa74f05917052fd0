import pytest

from refcomplete.checkpoint import GPT2Config, write_random_checkpoint

TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_ctx=64)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight GPT-2 checkpoint: 2 layers, 64 wide, 4 heads, 64 positions."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, seed=1)
