"""Resolve a model name to a loaded model: bundled, a local directory, or the local HF cache.

Knows: where models may live. Never downloads anything. Does not know: how models run.

Lookup order for a name:
1. a bundled model: a folder of weights/ (in the wheel: refcomplete/weights/);
2. a local directory path holding config.json and model.safetensors;
3. a Hugging Face hub id already in the local cache (HF_HUB_CACHE, else HF_HOME/hub,
   else ~/.cache/huggingface/hub), e.g. "gpt2" or "openai-community/gpt2".

Example:
    >>> model = load_model("gpt2-tiny-shakespeare")
    >>> model.n_ctx
    512
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from refcomplete._paths import weights_dir
from refcomplete.checkpoint import CheckpointError, load_checkpoint

DEFAULT_MODEL = "gpt2-tiny-shakespeare"
# Legacy hub ids that the hub redirects to an organisation's repository.
_HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
                "distilgpt2": "distilbert/distilgpt2"}


class ModelNotFound(LookupError):
    """No model of that name; `looked_in` lists every place that was searched."""

    def __init__(self, name: str, looked_in: list[str]):
        self.name, self.looked_in = name, looked_in
        super().__init__(f"model {name!r} not found; looked in: " + "; ".join(looked_in))


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _is_model_dir(path: Path) -> bool:
    """Whether path holds a checkpoint; False for any name the OS refuses (too long, ...).
    A directory we may not read is a CheckpointError naming it, not "not found"."""
    try:
        return (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read the model directory: {exc}") from exc
    except (OSError, ValueError):
        return False


def _hub_snapshot(repo_id: str, looked_in: list[str]) -> Path | None:
    cache = hf_cache_dir()
    for rid in dict.fromkeys([repo_id, _HUB_ALIASES.get(repo_id, repo_id)]):
        repo = cache / ("models--" + rid.replace("/", "--"))
        looked_in.append(str(repo))
        ref = repo / "refs" / "main"
        snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
        if (repo / "snapshots").is_dir():
            snapshots += sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in snapshots:
            if _is_model_dir(snap):
                return snap
    return None


def resolve(name: str) -> Path:
    """The directory holding model `name`, or ModelNotFound saying where it looked."""
    looked_in: list[str] = []
    if name and "/" not in name and name not in (".", ".."):
        bundled = weights_dir() / name
        looked_in.append(f"bundled models ({weights_dir()})")
        if _is_model_dir(bundled):
            return bundled
    try:
        path = Path(name).expanduser()
    except RuntimeError:            # "~user" with no such user: not a home directory
        path = Path(name)
    looked_in.append(f"local directory {path}")
    if _is_model_dir(path):
        return path
    if name and not name.startswith((".", "/", "~")) and name.count("/") <= 1:
        try:
            snap = _hub_snapshot(name, looked_in)
        except (OSError, ValueError):    # a name the OS refuses as a path (too long, ...)
            snap = None
        if snap is not None:
            return snap
    raise ModelNotFound(name, looked_in)


def list_models() -> list[str]:
    """Bundled models and GPT-2-family models found in the local HF cache."""
    names = sorted(p.name for p in weights_dir().iterdir() if _is_model_dir(p)) if weights_dir().is_dir() else []
    cache = hf_cache_dir()
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            rid = repo.name[len("models--"):].replace("--", "/")
            if _hub_snapshot(rid, []) is not None:
                names.append(rid)
    return names


@functools.lru_cache(maxsize=8)
def _load(path: str, name: str, backend: str):
    from refcomplete.runtime import GPT2Model
    from refcomplete.tokenizer import N_VOCAB

    checkpoint = load_checkpoint(path)
    if checkpoint.config.n_vocab != N_VOCAB:   # the runtime pairs every model with r50k
        raise CheckpointError(f"{Path(path) / 'config.json'}: vocab_size {checkpoint.config.n_vocab} "
                              f"does not match the r50k tokenizer's {N_VOCAB} tokens")
    model = GPT2Model(checkpoint, name=name, backend=backend)
    model.tokenizer     # now, not on first use as GPT2Model alone: a bad ranks file fails the load
    return model


def load_model(name: str = DEFAULT_MODEL, backend: str | None = None):
    """Load (once per process and backend) the model called `name`; see the module
    docstring for lookup. backend: "numba" (default where installed) or "numpy" (no
    Numba import); both compute the same bits (SEMANTICS 11)."""
    from refcomplete.runtime import resolve_backend

    return _load(str(resolve(name).resolve()), name, resolve_backend(backend))
