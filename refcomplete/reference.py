"""GPT-2 forward in plain NumPy, no cache: the specification of the fast path.

Knows: GPT-2's math (picoGPT-shaped pure functions). Does not know: caches, batching,
sampling. Tests pin the Numba runtime (runtime.py) to `forward`; the runtime never
calls it, so this file can stay as plain as the math.

Dimensions: T = sequence length, C = n_embd, H = n_head, D = C // H, V = n_vocab.
All arrays are float32.
"""

from __future__ import annotations

import numpy as np

from refcomplete.checkpoint import GPT2Config, GPT2Params

GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def gelu_new(x):
    """GPT-2's tanh approximation of GELU (HF "gelu_new")."""
    return 0.5 * x * (1 + np.tanh(GELU_C * (x + np.float32(0.044715) * (x * x * x))))


def layer_norm(x, g, b, eps):                                   # [T, C] -> [T, C]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * g + b


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def linear(x, w, b):                                            # [T, in] @ [in, out] + [out]
    return x @ w + b


def causal_attention(q, k, v):                                  # [H, T, D] x3 -> [H, T, D]
    T, D = q.shape[1], q.shape[2]
    scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(D))  # [H, T, T]
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(mask, np.float32(-1e10), scores)
    return softmax(scores) @ v


def block(x, p, n_head, eps):
    """One transformer block: the new residual [T, C]."""
    T, C = x.shape
    qkv = linear(layer_norm(x, p["ln_1.weight"], p["ln_1.bias"], eps),
                 p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # [T, 3C]
    q, k, v = (a.reshape(T, n_head, C // n_head).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
    a = causal_attention(q, k, v).transpose(1, 0, 2).reshape(T, C)  # [T, C]
    x = x + linear(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    h = gelu_new(linear(layer_norm(x, p["ln_2.weight"], p["ln_2.bias"], eps),
                        p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]))   # [T, 4C]
    return x + linear(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])


def embed(ids, params: GPT2Params):                             # [T] -> [T, C]
    ids = np.asarray(ids)
    return params.wte[ids] + params.wpe[:len(ids)]


def forward(ids, params: GPT2Params, config: GPT2Config):       # [T] -> [T, V] logits
    x = embed(ids, params)
    for p in params.blocks:
        x = block(x, p, config.n_head, config.layer_norm_epsilon)
    x = layer_norm(x, params.ln_f_weight, params.ln_f_bias, config.layer_norm_epsilon)
    return x @ params.lm_head.T
