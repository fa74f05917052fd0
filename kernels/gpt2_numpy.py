"""The NumPy twins of kernels/gpt2.py: the same kernels, the same bits, no Numba (the spec).

Knows: the operation order of every GPT-2 kernel, written as plain NumPy. Does not know:
checkpoints, sessions, sampling. This module is the "numpy" backend of
refcomplete.runtime (SEMANTICS 11): each function has its Numba twin's name and
signature (results written into `out`), performs the same IEEE operations in the same
order, and tests/test_kernels.py pins the pair together with np.array_equal. No BLAS
call (a matmul's blocking is not ours to specify), no pairwise sum, exp is fmath.exp.

Dimensions: as in gpt2.py. B = rows, C = n_embd, K = in features, N = out features,
H = heads, D = head size, P = shared prompt length, S = per-row capacity, R = rows of the
session, T = positions a row attends to.

The orders (docs/semantics.md §11):
- linear: acc = 0; acc = acc + x[:, k] * w[k] for k = 0, 1, ..., K-1; out = acc + bias.
- layer norm: mean = (((0 + x0) + x1) + ...) / C; var = (((0 + d0*d0) + d1*d1) + ...) / C
  with d = x - mean; out = ((x - mean) * (1 / sqrt(var + eps))) * g + bias; float32.
- gelu_new, in float64 from y = float64(acc + bias): u = GELU_C * (y + ((GELU_A*y)*y)*y),
  tanh = 1 - 2 / (exp(2u) + 1), out = float32((0.5*y) * (1 + tanh)).
- attention, per (row, head), float32: score[t] = (((0 + q0*k0[t]) + q1*k1[t]) + ...) /
  sqrt(D); e[t] = float32(exp(float64(score[t] - max score))); total = ((0 + e0) + e1)
  + ...; out = ((0 + (e0/total)*v0) + (e1/total)*v1) + ..., over the shared prompt's
  positions, then the row's own.
"""

from __future__ import annotations

import math

import numpy as np

from refcomplete.kernels.fmath import GELU_A, GELU_C, exp, sum32_sequential

ATTEND_CHUNK = 32  # rows whose attention is computed together (memory, not values)


def _matmul(x, w):                                             # [B, K] @ [K, N], k in order
    acc = np.zeros((x.shape[0], w.shape[1]), np.float32)
    for k in range(x.shape[1]):
        acc = acc + x[:, k, None] * w[k]
    return acc


def packed_shape(K, N):                                       # gpt2.pack's layout: here [K, N] itself
    return (K, N)


def pack(w, out=None, n0=0):
    """The spec's linears take w [K, N] as it is: w itself, or copied into out[:, n0:]."""
    if out is None:
        return w
    out[:, n0:n0 + w.shape[1]] = w
    return out


def unpack_columns(w, cols):                                   # w[:, cols].T, [len(cols), K]
    return w[:, np.asarray(cols)].T


def gelu(y):                                                   # float32 [...] -> float32 [...]
    y = y.astype(np.float64)
    u = GELU_C * (y + ((GELU_A * y) * y) * y)
    with np.errstate(over="ignore"):
        th = 1.0 - 2.0 / (exp(2.0 * u) + 1.0)
    return ((0.5 * y) * (1.0 + th)).astype(np.float32)


def layer_norm(x, g, bias, eps, out):                          # [B, C] -> out [B, C]
    C = np.float32(x.shape[1])
    mean = sum32_sequential(x) / C                             # [B]
    d = x - mean[:, None]
    var = sum32_sequential(d * d) / C
    inv = np.float32(1.0) / np.sqrt(var + np.float32(eps))
    out[:] = ((x - mean[:, None]) * inv[:, None]) * g + bias


def linear(x, w, bias, out, tasks=1):                          # [B, K] @ [K, N] + [N]
    out[:] = _matmul(x, w) + bias


def linear_gelu(x, w, bias, out, tasks=1):                     # gelu_new([B, K] @ [K, N] + [N])
    out[:] = gelu(_matmul(x, w) + bias)


def linear_residual(x, w, bias, resid, tasks=1):               # resid [B, N] += [B, K] @ [K, N] + [N]
    resid[:] = resid + (_matmul(x, w) + bias)


def attend(q, kt_pre, v_pre, n_pre, kt_row, v_row, rows, n_row, out):
    """gpt2.attend's twin (same arguments). Rows are taken ATTEND_CHUNK at a time; positions
    past a row's end are masked out with np.where, so they add nothing (not even a zero)."""
    B, H, D = q.shape
    scale = np.float32(math.sqrt(D))
    for b0 in range(0, B, ATTEND_CHUNK):
        bs = slice(b0, min(B, b0 + ATTEND_CHUNK))
        m = n_row[bs]
        M = int(m.max())
        T = n_pre + M
        k = np.concatenate([np.broadcast_to(kt_pre[None, :, :, :n_pre], (len(m), H, D, n_pre)),
                            kt_row[rows[bs], :, :, :M]], axis=3)                 # [b, H, D, T]
        v = np.concatenate([np.broadcast_to(v_pre[None, :, :n_pre], (len(m), H, n_pre, D)),
                            v_row[rows[bs], :, :M]], axis=2)                     # [b, H, T, D]
        valid = (np.arange(T)[None, :] < (n_pre + m)[:, None])[:, None, :]       # [b, 1, T]
        with np.errstate(all="ignore"):                        # masked slots hold stale memory
            s = np.zeros((len(m), H, T), np.float32)
            for d in range(D):
                s = s + q[bs, :, d, None] * k[:, :, d, :]
            s = s / scale
            mx = np.where(valid, s, -np.inf).max(axis=2, keepdims=True)
            e = np.where(valid, exp((s - mx).astype(np.float64)).astype(np.float32), np.float32(0))
            total = sum32_sequential(e)[..., None]             # masked zeros come last: no-ops
            p = e / total
            o = np.zeros((len(m), H, D), np.float32)
            for t in range(T):
                o = np.where(valid[:, :, t, None], o + p[:, :, t, None] * v[:, :, t, :], o)
        out[bs] = o


def blocks(x, w, eps, k_pre, v_pre, n_pre, k_row, v_row, rows, slot, tasks=1):
    """gpt2.blocks' twin (same arguments): every transformer block over x [B, C], in place.
    w: 12 tuples of L arrays, in runtime.BLOCK_WEIGHTS' order; token i is row rows[i]'s entry
    slot[i], after the n_pre shared prompt entries k_pre / v_pre; its key and value are
    written into k_row / v_row."""
    ln1_g, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_g, ln2_b, fc_w, fc_b, out_w, out_b = w
    B, C = x.shape
    H = k_row[0].shape[1]
    D = C // H
    h = np.empty((B, C), np.float32)
    qkv = np.empty((B, 3 * C), np.float32)
    a = np.empty((B, H, D), np.float32)
    f = np.empty((B, fc_w[0].shape[1]), np.float32)
    for layer in range(len(k_row)):
        layer_norm(x, ln1_g[layer], ln1_b[layer], eps, h)
        linear(h, attn_w[layer], attn_b[layer], qkv, tasks)
        q, kn, vn = (qkv[:, i * C:(i + 1) * C].reshape(B, H, D) for i in range(3))
        k_row[layer][rows, :, :, slot] = kn
        v_row[layer][rows, :, slot] = vn
        attend(np.ascontiguousarray(q), k_pre[layer], v_pre[layer], n_pre,
               k_row[layer], v_row[layer], rows, slot + 1, a)
        linear_residual(a.reshape(B, C), proj_w[layer], proj_b[layer], x, tasks)
        layer_norm(x, ln2_g[layer], ln2_b[layer], eps, h)
        linear_gelu(h, fc_w[layer], fc_b[layer], f, tasks)
        linear_residual(f, out_w[layer], out_b[layer], x, tasks)
    return x
