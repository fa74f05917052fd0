"""Load and write Hugging Face GPT-2 checkpoints (config.json + model.safetensors).

Knows: the safetensors file format, HF GPT-2 key names and their traps. Does not
know: how the model computes (reference.py, runtime.py) or where models live (registry.py).

Format traps, kept in this one place (as nanoGPT's `from_pretrained` does):
- keys come with or without the "transformer." prefix;
- Conv1D weights (c_attn, c_proj, c_fc) are stored [in, out], so y = x @ W + b;
- lm_head is tied to wte unless the config says tie_word_embeddings=false;
- attn.bias / attn.masked_bias are causal-mask buffers, not parameters: ignored;
- fp16/bf16 tensors are widened to fp32; fp32 tensors are memory-mapped, not copied.

Example:
    >>> ckpt = load_checkpoint("weights/gpt2-tiny-shakespeare")
    >>> ckpt.config.n_layer, ckpt.params.blocks[0]["attn.c_attn.weight"].shape
    (4, (128, 384))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from pathlib import Path

import numpy as np


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or does not match its config."""


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257
    n_ctx: int = 1024      # n_positions
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    @classmethod
    def from_json(cls, path: Path) -> "GPT2Config":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        act = raw.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: activation_function {act!r} is not supported (gelu_new only)")

        def field(key, kind, default=None):   # strict: JSON ints, numbers and booleans only
            value = raw.get(key, default)
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, int) and not isinstance(value, bool) and value >= 1
                  if kind is int else isinstance(value, (int, float))
                  and not isinstance(value, bool) and math.isfinite(value) and value > 0)
            if not ok:
                raise CheckpointError(f"{path}: missing or bad field {key!r}: {value!r:.80} (expected "
                                      + {int: "a positive integer", float: "a positive finite number",
                                         bool: "true or false"}[kind] + ")")
            return value

        cfg = cls(
            n_vocab=field("vocab_size", int),
            n_ctx=field("n_positions", int, raw.get("n_ctx", 1024)),
            n_embd=field("n_embd", int),
            n_head=field("n_head", int),
            n_layer=field("n_layer", int),
            layer_norm_epsilon=float(field("layer_norm_epsilon", float, 1e-5)),
            tie_word_embeddings=field("tie_word_embeddings", bool, True),
        )
        if cfg.n_embd % cfg.n_head:
            raise CheckpointError(f"{path}: n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        return cfg

    def to_hf_json(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.n_vocab, "n_positions": self.n_ctx, "n_ctx": self.n_ctx,
            "n_embd": self.n_embd, "n_head": self.n_head, "n_layer": self.n_layer,
            "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon, "tie_word_embeddings": self.tie_word_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "float32",
        }


@dataclasses.dataclass(frozen=True)
class GPT2Params:
    """Weights named like the checkpoint keys. C = n_embd, V = n_vocab, P = n_ctx."""
    wte: np.ndarray            # [V, C]
    wpe: np.ndarray            # [P, C]
    blocks: tuple              # per layer: dict of "ln_1.weight" -> array, etc.
    ln_f_weight: np.ndarray    # [C]
    ln_f_bias: np.ndarray      # [C]
    lm_head: np.ndarray        # [V, C], usually the same array as wte


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: GPT2Config
    params: GPT2Params
    weights_sha256: str


BLOCK_SHAPES = {  # key -> shape as a function of C; Conv1D weights are [in, out]
    "ln_1.weight": lambda C: (C,), "ln_1.bias": lambda C: (C,),
    "attn.c_attn.weight": lambda C: (C, 3 * C), "attn.c_attn.bias": lambda C: (3 * C,),
    "attn.c_proj.weight": lambda C: (C, C), "attn.c_proj.bias": lambda C: (C,),
    "ln_2.weight": lambda C: (C,), "ln_2.bias": lambda C: (C,),
    "mlp.c_fc.weight": lambda C: (C, 4 * C), "mlp.c_fc.bias": lambda C: (4 * C,),
    "mlp.c_proj.weight": lambda C: (4 * C, C), "mlp.c_proj.bias": lambda C: (C,),
}
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Map every tensor of a .safetensors file; fp32 stays a read-only memmap view.

    The header is checked as the format requires: a JSON object of tensors, each with a
    supported dtype, a shape of non-negative integers and [start, end) data offsets that
    match the shape, lie in the file and tile the data buffer without gaps or overlaps.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: damaged safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors, spans = {}, []
    for key, info in header.items():
        dtype, shape, offsets = _tensor_entry(path, key, info)
        start, end = offsets
        count = math.prod(shape)
        if not start <= end <= data.size or end - start != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} lies outside the file (truncated?)")
        spans.append((start, end, key))
        raw = data[start:end].view(dtype).reshape(shape)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F16":
            raw = raw.astype(np.float32)
        tensors[key] = raw
    at = 0
    for start, end, key in sorted(spans):
        if start != at:
            raise CheckpointError(f"{path}: tensor {key!r} starts at byte {start} of the data, "
                                  f"expected {at} (overlapping or misplaced tensors)")
        at = end
    if at != data.size:
        raise CheckpointError(f"{path}: {data.size - at} bytes after the last tensor (damaged file)")
    return tensors


def _tensor_entry(path: Path, key: str, info) -> tuple:
    """(numpy dtype, shape, (start, end)) of one header entry, or a CheckpointError naming it."""
    def is_count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype or bad header "
                              f"({dtype!r:.40}; supported: F32, F16, BF16)")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has a bad shape {shape!r:.80}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {key!r} has bad data_offsets {offsets!r:.80}")
    return _DTYPES[info["dtype"]], tuple(shape), tuple(offsets)


def release_pages(array: np.ndarray, whole_file: bool = False) -> None:
    """Tell the OS it may drop the resident file pages behind a memory-mapped tensor (they
    are read again from the file if used); with whole_file, every page of its file's
    mapping (the header and the other tensors too). A no-op for arrays that are not file
    mappings."""
    import mmap

    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    mm = getattr(base, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    origin = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
    start = array.__array_interface__["data"][0] - origin         # byte position in the mapping
    first = 0 if whole_file else start - start % mmap.PAGESIZE
    last = len(mm) if whole_file else start + array.nbytes
    try:
        length = last - first if whole_file else (last - first) // mmap.PAGESIZE * mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, first, length)      # (the kernel rounds a tail page up)
    except (OSError, ValueError):
        pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(directory) -> Checkpoint:
    """Load config.json + model.safetensors from a directory, checking every tensor."""
    directory = Path(directory)
    cfg = GPT2Config.from_json(directory / "config.json")
    st_path = directory / "model.safetensors"
    if not st_path.is_file():
        raise CheckpointError(f"{st_path}: not found (only safetensors checkpoints are supported)")
    raw = read_safetensors(st_path)
    tensors = {}
    for key, value in raw.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if not _IGNORED.match(name):
            tensors[name] = value

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{st_path}: missing tensor {name!r}")
        t = tensors[name]
        if t.shape != shape:
            raise CheckpointError(f"{st_path}: tensor {name!r} has shape {t.shape}, config implies {shape}")
        return t

    C, V = cfg.n_embd, cfg.n_vocab
    wte = take("wte.weight", (V, C))
    blocks = tuple(
        {k: take(f"h.{i}.{k}", shape(C)) for k, shape in BLOCK_SHAPES.items()} for i in range(cfg.n_layer)
    )
    lm_head = wte if cfg.tie_word_embeddings or "lm_head.weight" not in tensors else take("lm_head.weight", (V, C))
    params = GPT2Params(
        wte=wte, wpe=take("wpe.weight", (cfg.n_ctx, C)), blocks=blocks,
        ln_f_weight=take("ln_f.weight", (C,)), ln_f_bias=take("ln_f.bias", (C,)), lm_head=lm_head,
    )
    _check_finite(st_path, tensors)
    extra = set(tensors) - {f"h.{i}.{k}" for i in range(cfg.n_layer) for k in BLOCK_SHAPES} - {
        "wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    if extra:
        raise CheckpointError(f"{st_path}: unexpected tensors for n_layer={cfg.n_layer}: {sorted(extra)[:5]}")
    return Checkpoint(path=directory, config=cfg, params=params, weights_sha256=file_sha256(st_path))


def _check_finite(path: Path, tensors: dict) -> None:
    """Refuse NaN or infinite weights at load, naming the first such tensor (in blocks of
    about 4M values, so a large memory-mapped tensor needs no full-size temporary)."""
    for name, t in tensors.items():
        flat = t.reshape(-1)
        for i in range(0, flat.size, 1 << 22):
            bad = flat.size and np.count_nonzero(~np.isfinite(flat[i:i + (1 << 22)]))
            if bad:
                raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values "
                                      "(refused at load)")


def write_random_checkpoint(directory, config: GPT2Config = GPT2Config(), seed: int = 0,
                            dtype=np.float32) -> Path:
    """Write a random-weight GPT-2 checkpoint of any shape (fixed seed) for tests and benchmarks.

    Weights ~ N(0, 0.02) like GPT-2's init, layer norms at 1/0; the same speed as a trained model.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    C = config.n_embd

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    tensors = {"wte.weight": normal(config.n_vocab, C), "wpe.weight": normal(config.n_ctx, C),
               "ln_f.weight": (1 + normal(C)).astype(dtype), "ln_f.bias": normal(C)}
    for i in range(config.n_layer):
        for key, shape in BLOCK_SHAPES.items():
            value = normal(*shape(C))
            tensors[f"h.{i}.{key}"] = (1 + value).astype(dtype) if key.startswith("ln_") and key.endswith("weight") else value
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2) + "\n")
    return directory
