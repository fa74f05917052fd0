"""Model name resolution: bundled, local directory, local HF cache; never a download."""

import shutil

import pytest

from refcomplete import registry
from refcomplete.registry import ModelNotFound, resolve


def fake_hub_cache(root, repo_id, src):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    return snap


def test_local_directory(tiny_dir):
    assert resolve(str(tiny_dir)) == tiny_dir


def test_hub_cache_layouts(tiny_dir, tmp_path, monkeypatch):
    snap = fake_hub_cache(tmp_path / "hub", "openai-community/gpt2", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("openai-community/gpt2") == snap
    assert resolve("gpt2") == snap                          # legacy id, redirected on the hub
    assert "openai-community/gpt2" in registry.list_models()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve("gpt2") == snap


def test_unknown_name_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFound) as e:
        resolve("no-such-model")
    msg = str(e.value)
    assert "bundled models" in msg and "local directory" in msg and "models--no-such-model" in msg


def test_load_model_runs(tiny_dir):
    model = registry.load_model(str(tiny_dir))
    assert model.n_vocab == 50257 and model.n_ctx == 64
    assert model is registry.load_model(str(tiny_dir))     # loaded once per process
