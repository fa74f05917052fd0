"""Checkpoint loading: HF key layouts, dtypes, memory mapping, and clear errors for bad files."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from refcomplete.checkpoint import (CheckpointError, GPT2Config, load_checkpoint, read_safetensors,
                                    write_random_checkpoint)
from conftest import TINY


def rewrite(src, dst, transform, config_patch=None):
    """Copy a checkpoint with its tensors passed through transform(dict) -> dict."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.array(v) for k, v in read_safetensors(src / "model.safetensors").items()}
    save_file(transform(tensors), str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_patch or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_loads_random_checkpoint_memory_mapped(tiny_dir):
    ck = load_checkpoint(tiny_dir)
    assert ck.config == TINY
    assert ck.params.wte.shape == (50257, 64)
    assert isinstance(ck.params.wte, np.memmap)
    assert ck.params.lm_head is ck.params.wte
    assert ck.params.blocks[1]["attn.c_attn.weight"].shape == (64, 192)  # Conv1D: [in, out]
    assert len(ck.weights_sha256) == 64


def test_write_random_checkpoint_is_deterministic(tmp_path, tiny_dir):
    again = write_random_checkpoint(tmp_path / "again", TINY, seed=1)
    assert load_checkpoint(again).weights_sha256 == load_checkpoint(tiny_dir).weights_sha256


def test_transformer_prefix_and_mask_buffers_accepted(tiny_dir, tmp_path):
    def hf_layout(t):
        out = {"transformer." + k: v for k, v in t.items()}
        out["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        out["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
        out["lm_head.weight"] = t["wte.weight"]
        return out

    ck = load_checkpoint(rewrite(tiny_dir, tmp_path / "hf", hf_layout))
    ref = load_checkpoint(tiny_dir)
    np.testing.assert_array_equal(ck.params.blocks[0]["mlp.c_fc.weight"], ref.params.blocks[0]["mlp.c_fc.weight"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_widened_to_fp32(tiny_dir, tmp_path, dtype):
    ref = load_checkpoint(tiny_dir)
    if dtype == "float16":
        d = rewrite(tiny_dir, tmp_path / dtype, lambda t: {k: v.astype(np.float16) for k, v in t.items()})
        expect = ref.params.wte.astype(np.float16).astype(np.float32)
    else:  # bf16 by truncating fp32 bits; safetensors.numpy cannot write bf16, so patch the header
        d = rewrite(tiny_dir, tmp_path / dtype, lambda t: {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in t.items()})
        raw = (d / "model.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"U16"', b'"BF16"')
        (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
        expect = ((ref.params.wte.view(np.uint32) >> 16) << 16).view(np.float32)
    ck = load_checkpoint(d)
    assert ck.params.wte.dtype == np.float32
    np.testing.assert_array_equal(ck.params.wte, expect)


def test_untied_lm_head(tiny_dir, tmp_path):
    d = rewrite(tiny_dir, tmp_path / "untied", lambda t: {**t, "lm_head.weight": t["wte.weight"] * 2},
                {"tie_word_embeddings": False})
    ck = load_checkpoint(d)
    np.testing.assert_array_equal(ck.params.lm_head, ck.params.wte * 2)


def test_truncated_file_names_the_file(tiny_dir, tmp_path):
    d = rewrite(tiny_dir, tmp_path / "trunc", lambda t: t)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|outside)"):
        load_checkpoint(d)
    (d / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(d)


def test_missing_tensor_names_it(tiny_dir, tmp_path):
    d = rewrite(tiny_dir, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != "h.1.mlp.c_fc.bias"})
    with pytest.raises(CheckpointError, match="h.1.mlp.c_fc.bias"):
        load_checkpoint(d)


def test_misshaped_tensor_names_it(tiny_dir, tmp_path):
    d = rewrite(tiny_dir, tmp_path / "shape", lambda t: {**t, "h.0.attn.c_attn.weight": t["h.0.attn.c_attn.weight"].T.copy()})
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight.*shape"):
        load_checkpoint(d)


def test_config_tensor_mismatch(tiny_dir, tmp_path):
    d = rewrite(tiny_dir, tmp_path / "layers", lambda t: t, {"n_layer": 3})
    with pytest.raises(CheckpointError, match="h.2"):
        load_checkpoint(d)
    d = rewrite(tiny_dir, tmp_path / "fewer", lambda t: t, {"n_layer": 1})
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_checkpoint(d)


def test_bad_config(tiny_dir, tmp_path):
    d = rewrite(tiny_dir, tmp_path / "act", lambda t: t, {"activation_function": "relu"})
    with pytest.raises(CheckpointError, match="config.json.*relu"):
        load_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(d)
