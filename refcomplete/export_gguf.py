"""`refcomplete export --format gguf`: the same GPT-2 model as a GGUF file for llama.cpp.

Knows: llama.cpp's GPT-2 conventions as its `convert_hf_to_gguf.py` writes them
(architecture "gpt2"; tensor names from gguf's own GPT-2 name map; Conv1D weights
c_attn / c_proj / c_fc transposed to [out, in]; attn.bias / attn.masked_bias buffers
dropped; no output.weight when lm_head is tied to wte, llama.cpp then reuses
token_embd) and its tokenizer metadata (model "gpt2", pre-tokenizer "gpt-2", the
byte-level token strings of vocab.json in id order, token types NORMAL and CONTROL for
<|endoftext|>, the merges, bos = eos = unk = 50256, no BOS added). Does not know: how
the model runs (runtime.py) or how llama.cpp samples.

    refcomplete export --format gguf --model gpt2-tiny-shakespeare --out tiny.gguf
    python -m llama_cpp.server --model tiny.gguf --n_ctx 512

Tensors are written as float32 (file type ALL_F32), so nothing is rounded here; the
differences llama.cpp shows (f16 KV cache, fp16 GELU table) are its own, see
docs/golden.md for tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCH = "gpt2"
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tokenizer_tables(model_dir: Path) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges) from the model directory's vocab.json / merges.txt, or,
    when it has none, derived from the bundled r50k ranks (the same files)."""
    vocab_path, merges_path = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        merges = [m for m in lines if m and not m.startswith("#version")]
    else:
        from refcomplete.tokenizer import get_tokenizer, load_ranks
        from refcomplete.training.hf_tokenizer import vocab_and_merges

        vocab, merges = vocab_and_merges(load_ranks(get_tokenizer().path))
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    if any(t is None for t in tokens):
        raise ValueError(f"{vocab_path}: token ids are not 0..{len(vocab) - 1}")
    return tokens, merges


def gguf_tensors(checkpoint) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, in llama.cpp's layout."""
    import gguf

    cfg, p = checkpoint.config, checkpoint.params
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)

    def name(hf: str) -> str:
        return names.get_name(hf, try_suffixes=(".weight", ".bias"))

    out = {name("transformer.wte.weight"): p.wte, name("transformer.wpe.weight"): p.wpe}
    for i, block in enumerate(p.blocks):
        for key, value in block.items():
            out[name(f"transformer.h.{i}.{key}")] = value.T if key in TRANSPOSED else value
    out[name("transformer.ln_f.weight")] = p.ln_f_weight
    out[name("transformer.ln_f.bias")] = p.ln_f_bias
    if p.lm_head is not p.wte:
        out[name("lm_head.weight")] = p.lm_head
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_gguf(model_dir, out_file, name: str | None = None) -> Path:
    """Write the HF GPT-2 model in model_dir as a float32 GGUF file."""
    import gguf

    from refcomplete.checkpoint import load_checkpoint
    from refcomplete.tokenizer import EOT_ID

    model_dir, out_file = Path(model_dir), Path(out_file)
    ckpt = load_checkpoint(model_dir)
    cfg = ckpt.config
    tokens, merges = tokenizer_tables(model_dir)
    if len(tokens) != cfg.n_vocab:
        raise ValueError(f"tokenizer has {len(tokens)} tokens, the model {cfg.n_vocab}")
    w = gguf.GGUFWriter(str(out_file), ARCH)
    w.add_name(name or model_dir.name)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == EOT_ID else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_unk_token_id(EOT_ID)
    w.add_add_bos_token(False)
    for tname, array in gguf_tensors(ckpt).items():
        w.add_tensor(tname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


def add_subcommand(subparsers) -> None:
    """Register `refcomplete export` on the CLI's subparsers."""
    p = subparsers.add_parser("export", help="export a model for another runtime (GGUF)")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--model", default="gpt2-tiny-shakespeare", help="model name or directory")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    """Exit status 2 with one line on stderr for a bad --out or an unknown model."""
    import sys

    from refcomplete.registry import ModelNotFound, resolve

    out = Path(args.out)
    problem = (f"--out {out} is a directory; give the file to write, e.g. {out / 'model.gguf'}"
               if out.is_dir() else f"the directory of --out ({out.parent}) does not exist"
               if not out.parent.is_dir() else None)
    try:
        model_dir = None if problem else resolve(args.model)
    except ModelNotFound as exc:
        problem = str(exc)
    if problem:
        print(f"refcomplete export: error: {problem}", file=sys.stderr)
        return 2
    out = export_gguf(model_dir, out, name=Path(args.model).name)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0
