"""A slow, obviously-correct float64 model of OScaR for the tests: loops and textbook formulas, no packing, no numba.

It shares no code with the library except the scale-dtype conversions of numpy/ml_dtypes.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np


def sylvester(n: int) -> np.ndarray:
    """Textbook normalized Hadamard matrix by the Sylvester recursion ``H_2n = [[H, H], [H, -H]]``."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def rotation_matrix(rotation, head_dim: int) -> np.ndarray:
    if isinstance(rotation, str):
        return sylvester(head_dim) if rotation == "hadamard" else np.eye(head_dim)
    return np.asarray(rotation, dtype=np.float64)


def _to_dtype_directed(value: float, dtype, direction: int) -> float:
    """The nearest ``dtype`` value on the side ``direction`` (-1 down, +1 up) of float64 ``value``."""
    candidate = np.array(value).astype(dtype)
    while (direction < 0 and float(candidate) > value) or (direction > 0 and float(candidate) < value):
        candidate = np.nextafter(candidate, np.array(direction * np.inf, dtype=dtype))
    return float(candidate)


def quantize_group(x: np.ndarray, bits: int, dtype):
    """``(codes, scale, zero)`` of a 1-D float64 group ``x`` (the library's definition, computed in float64)."""
    levels = 2**bits - 1
    if x.size == 0:
        return np.zeros(0, dtype=np.int64), 0.0, 0.0
    zero = _to_dtype_directed(float(x.min()), dtype, -1)
    scale = _to_dtype_directed((float(x.max()) - zero) / levels, dtype, +1)
    if scale == 0:
        return np.zeros(x.size, dtype=np.int64), scale, zero
    codes = np.clip(np.rint((x - zero) / scale), 0, levels).astype(np.int64)
    return codes, scale, zero


def quantize(k, v, config, lengths):
    """float64 model of ``quantize_kv``: returns dict with stored-basis keys/values, norms, codes, scales, zeros."""
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    batch, heads, tokens, head_dim = k.shape
    dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[config.scale_dtype]
    r = rotation_matrix(config.rotation, head_dim)
    keys = k @ r.T  # the norms are those of k (equal to those of the rotated keys: r is orthogonal)
    values = v @ r.T if config.rotate_values else v.copy()
    norms = np.ones((batch, heads, tokens))
    for b in range(batch):
        for t in range(lengths[b]):
            if config.token_scaling == "l2":
                norms[b, :, t] = math.sqrt(sum(float(k[b, h, t] @ k[b, h, t]) for h in range(heads))) or 1.0
            elif config.token_scaling == "l2_per_head":
                for h in range(heads):
                    norms[b, h, t] = math.sqrt(float(k[b, h, t] @ k[b, h, t])) or 1.0
    keys = keys / norms[..., None]
    out = {
        "keys": keys, "values": values, "norms": norms,
        "k_codes": np.zeros(k.shape, np.int64), "v_codes": np.zeros(k.shape, np.int64),
        "k_scales": {}, "k_zeros": {}, "v_scales": {}, "v_zeros": {},
    }
    gk, gv = config.key_group, config.value_group
    for b in range(batch):
        for h in range(heads):
            for g in range(-(-lengths[b] // gk)):
                stop = min((g + 1) * gk, lengths[b])
                for c in range(head_dim):
                    codes, scale, zero = quantize_group(keys[b, h, g * gk : stop, c], config.bits, dtype)
                    out["k_codes"][b, h, g * gk : stop, c] = codes
                    out["k_scales"][b, h, g, c], out["k_zeros"][b, h, g, c] = scale, zero
            for t in range(lengths[b]):
                for g in range(head_dim // gv):
                    codes, scale, zero = quantize_group(values[b, h, t, g * gv : (g + 1) * gv], config.bits, dtype)
                    out["v_codes"][b, h, t, g * gv : (g + 1) * gv] = codes
                    out["v_scales"][b, h, t, g], out["v_zeros"][b, h, t, g] = scale, zero
    return out


def attention(q, keys, values, norms, packed_lengths, window_k, window_v, window_lengths, rotation, rotate_values,
              scale):
    """float64 attention, one query row at a time, with explicit softmax.

    ``keys``/``values``: stored-basis packed keys and values ``(B, Hk, T, D)`` (keys divided by ``norms``
    ``(B, Hk, T)``); ``window_k``/``window_v`` may be None.
    """
    q = np.asarray(q, dtype=np.float64)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = keys.shape[1]
    r = rotation_matrix(rotation, head_dim)
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:3], -np.inf)
    for b in range(batch):
        packed = int(packed_lengths[b])
        window = 0 if window_k is None else int(window_lengths[b])
        for i in range(q_heads):
            h = i // (q_heads // kv_heads)
            for j in range(q_len):
                position = packed + window - q_len + j
                logits, vectors = [], []
                for t in range(min(packed, position + 1)):
                    logits.append(scale * norms[b, h, t] * float((r @ q[b, i, j]) @ keys[b, h, t]))
                    vectors.append(r.T @ values[b, h, t] if rotate_values else values[b, h, t])
                for t in range(max(0, min(window, position + 1 - packed))):
                    logits.append(scale * float(q[b, i, j] @ window_k[b, h, t]))
                    vectors.append(np.asarray(window_v[b, h, t], dtype=np.float64))
                if logits:
                    logits = np.array(logits)
                    weights = np.exp(logits - logits.max())
                    out[b, i, j] = (weights[:, None] * np.array(vectors)).sum(0) / weights.sum()
                    lse[b, i, j] = logits.max() + math.log(weights.sum())
    return out, lse
