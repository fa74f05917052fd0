"""GGUF export: read back with gguf.GGUFReader (tensors and tokenizer metadata equal); with
llama-cpp-python importable, its greedy continuation equals ours (skipped otherwise)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from refcomplete import export_gguf
from refcomplete.checkpoint import load_checkpoint
from refcomplete.training.hf_tokenizer import write_hf_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    path = export_gguf.export_gguf(tiny_dir, out, name="tiny")
    return gguf.GGUFReader(str(path)), tiny_dir      # reading 50k tokens back takes ~2 s


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_metadata_follows_llama_cpp_gpt2(exported):
    r, model_dir = exported
    cfg = load_checkpoint(model_dir).config
    assert field(r, "general.architecture") == "gpt2"
    assert field(r, "gpt2.block_count") == cfg.n_layer
    assert field(r, "gpt2.context_length") == cfg.n_ctx
    assert field(r, "gpt2.embedding_length") == cfg.n_embd
    assert field(r, "gpt2.feed_forward_length") == 4 * cfg.n_embd
    assert field(r, "gpt2.attention.head_count") == cfg.n_head
    assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.layer_norm_epsilon)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.bos_token_id") == field(r, "tokenizer.ggml.eos_token_id") == 50256
    assert field(r, "tokenizer.ggml.add_bos_token") is False


def test_tokenizer_tables_equal_the_hf_files(exported, tmp_path):
    r, _ = exported
    write_hf_tokenizer(tmp_path)       # the files a complete HF model directory carries
    tokens, merges = export_gguf.tokenizer_tables(tmp_path)
    assert field(r, "tokenizer.ggml.tokens") == tokens and len(tokens) == 50257
    assert field(r, "tokenizer.ggml.merges") == merges and len(merges) == 50000
    types = field(r, "tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert tokens[50256] == "<|endoftext|>" and tokens[220] == "\u0120"   # "Ġ" is the space byte


def test_tensors_round_trip(exported):
    r, model_dir = exported
    got = {t.name: np.asarray(t.data) for t in r.tensors}
    ckpt = load_checkpoint(model_dir)
    p, C = ckpt.params, ckpt.config.n_embd
    assert "output.weight" not in got          # tied: llama.cpp reuses token_embd
    assert len(got) == 2 + 12 * ckpt.config.n_layer + 2
    np.testing.assert_array_equal(got["token_embd.weight"], p.wte)
    np.testing.assert_array_equal(got["position_embd.weight"], p.wpe)
    b0 = p.blocks[0]
    np.testing.assert_array_equal(got["blk.0.attn_qkv.weight"], b0["attn.c_attn.weight"].T)
    assert got["blk.0.attn_qkv.weight"].shape == (3 * C, C)
    np.testing.assert_array_equal(got["blk.0.ffn_down.weight"], b0["mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(got["blk.1.ffn_norm.bias"], p.blocks[1]["ln_2.bias"])
    np.testing.assert_array_equal(got["output_norm.weight"], p.ln_f_weight)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)


def test_cli(tiny_dir, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    export_gguf.add_subcommand(ap.add_subparsers())
    args = ap.parse_args(["export", "--format", "gguf", "--model", str(tiny_dir), "--out",
                          str(tmp_path / "m.gguf")])
    assert args.handler(args) == 0 and (tmp_path / "m.gguf").stat().st_size > 50257 * 64 * 4


def test_llama_cpp_greedy_matches(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from refcomplete import create
    from refcomplete._paths import weights_dir
    if not (weights_dir() / "gpt2-tiny-shakespeare" / "model.safetensors").is_file():
        pytest.skip("the bundled model has not landed")
    path = export_gguf.export_gguf(weights_dir() / "gpt2-tiny-shakespeare", tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    for prompt in ["ROMEO:", "To be, or not to be"]:
        theirs = llm.create_completion(prompt, max_tokens=20, temperature=0, top_k=1, top_p=1,
                                       min_p=0, repeat_penalty=1.0)
        ours = create(model="gpt2-tiny-shakespeare", prompt=prompt, max_tokens=20, temperature=0)
        assert theirs["choices"][0]["text"] == ours["choices"][0]["text"]
