"""The CPU backend's hot loops, compiled by numba: quantize-and-pack and unpack-and-dequantize in one pass.

Each function computes exactly what the numpy definitions compute (:func:`oscar_cupy.quantizer.encode` followed by
:func:`oscar_cupy.layout.pack_key_codes` / :func:`~oscar_cupy.layout.pack_value_codes`, and the reverse), without
their temporaries; the tests hold them to bit equality. Scales and zeros enter as float32 (an exact conversion) since
numba has no float16 or bfloat16 arithmetic.
"""

from __future__ import annotations

import numba
import numpy as np

from oscar_cupy import layout
from oscar_cupy.quantizer import inverse_scale

# Serial on purpose: numpy's BLAS already starts threads for the matrix products of the attention, and numba threads
# beside them oversubscribe small machines (3x slower decode on 2 cores, measured by bench/cpu_reference.py).
_JIT = dict(cache=True)


def encode_keys(keys, scales, zeros, valid, bits: int, key_group: int) -> np.ndarray:
    """``k_codes`` of float32 ``keys`` ``(B, Hk, T, D)``; ``scales``/``zeros`` ``(B, Hk, T // key_group, D)``;
    ``valid`` bool ``(B, T)`` (invalid tokens get code 0)."""
    batch, heads, tokens, head_dim = keys.shape
    out = np.empty((batch, heads, tokens, head_dim * bits // 32), dtype=layout.CODES_DTYPE)
    _encode_keys(keys, inverse_scale(scales), zeros.astype(np.float32), valid, _slots(bits), bits, key_group, out)
    return out


def encode_values(values, scales, zeros, valid, bits: int, value_group: int) -> np.ndarray:
    """``v_codes`` of float32 ``values`` ``(B, Hk, T, D)``; ``scales``/``zeros`` ``(B, Hk, T, D // value_group)``;
    ``valid`` bool ``(B, T)`` (invalid tokens get code 0)."""
    batch, heads, tokens, head_dim = values.shape
    out = np.empty((batch, heads, tokens * bits // 32, head_dim), dtype=layout.CODES_DTYPE)
    _encode_values(
        values, inverse_scale(scales), zeros.astype(np.float32), valid, _slots(bits), bits, value_group, out
    )
    return out


def dequantize_keys(k_codes, scales, zeros, bits: int, key_group: int) -> np.ndarray:
    """float32 ``(B, Hk, T, D)`` dequantized keys of ``k_codes`` (as stored: rotated, divided by the norm)."""
    batch, heads, tokens, words = k_codes.shape
    out = np.empty((batch, heads, tokens, words * 32 // bits), dtype=np.float32)
    _dequantize_keys(k_codes, scales.astype(np.float32), zeros.astype(np.float32), _slots(bits), bits, key_group, out)
    return out


def dequantize_values(v_codes, scales, zeros, bits: int, value_group: int) -> np.ndarray:
    """float32 ``(B, Hk, T, D)`` dequantized values of ``v_codes`` (as stored)."""
    batch, heads, rows, head_dim = v_codes.shape
    out = np.empty((batch, heads, rows * 32 // bits, head_dim), dtype=np.float32)
    _dequantize_values(
        v_codes, scales.astype(np.float32), zeros.astype(np.float32), _slots(bits), bits, value_group, out
    )
    return out


def fwht(x: np.ndarray) -> np.ndarray:
    """Normalized Walsh–Hadamard transform of float32 ``x`` along its last axis (a new float32 array).

    The definition the GPU kernels reproduce: butterfly stages of stride 1, 2, 4, …, n/2 (``a, b -> a + b, a - b``) in
    float32, then one multiplication by ``float32(1 / sqrt(n))``.
    """
    rows = np.array(x, dtype=np.float32, copy=True).reshape(-1, x.shape[-1])
    _fwht_rows(rows, np.float32(1.0 / np.sqrt(x.shape[-1])))
    return rows.reshape(x.shape)


def _slots(bits: int) -> np.ndarray:
    return layout.slot_of_element(bits).astype(np.uint32)


@numba.njit(inline="always")
def _code(x, zero, inverse, levels):
    scaled = (x - zero) * inverse
    if not scaled > 0:  # zero, negative, or NaN (zero times an infinite inverse): code 0, as quantizer.encode
        return np.uint32(0)
    return np.uint32(min(np.rint(scaled), np.float32(levels)))


@numba.njit(**_JIT)
def _encode_keys(keys, inverse, zeros, valid, slots, bits, key_group, out):
    batch, heads, tokens, head_dim = keys.shape
    per_word = 32 // bits
    levels = (1 << bits) - 1
    for bh in range(batch * heads):
        b, h = bh // heads, bh % heads
        for t in range(tokens):
            g = t // key_group
            for w in range(head_dim // per_word):
                word = np.uint32(0)
                if valid[b, t]:
                    for e in range(per_word):
                        c = w * per_word + e
                        code = _code(keys[b, h, t, c], zeros[b, h, g, c], inverse[b, h, g, c], levels)
                        word |= code << np.uint32(bits * slots[e])
                out[b, h, t, w] = word


@numba.njit(**_JIT)
def _encode_values(values, inverse, zeros, valid, slots, bits, value_group, out):
    batch, heads, tokens, head_dim = values.shape
    per_word = 32 // bits
    levels = (1 << bits) - 1
    for bh in range(batch * heads):
        b, h = bh // heads, bh % heads
        for r in range(tokens // per_word):
            for c in range(head_dim):
                g = c // value_group
                word = np.uint32(0)
                for e in range(per_word):
                    t = r * per_word + e
                    if valid[b, t]:
                        code = _code(values[b, h, t, c], zeros[b, h, t, g], inverse[b, h, t, g], levels)
                        word |= code << np.uint32(bits * slots[e])
                out[b, h, r, c] = word


@numba.njit(**_JIT)
def _dequantize_keys(k_codes, scales, zeros, slots, bits, key_group, out):
    batch, heads, tokens, words = k_codes.shape
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    for bh in range(batch * heads):
        b, h = bh // heads, bh % heads
        for t in range(tokens):
            g = t // key_group
            for w in range(words):
                word = k_codes[b, h, t, w]
                for e in range(per_word):
                    c = w * per_word + e
                    code = np.float32((word >> np.uint32(bits * slots[e])) & mask)
                    out[b, h, t, c] = code * scales[b, h, g, c] + zeros[b, h, g, c]


@numba.njit(**_JIT)
def _dequantize_values(v_codes, scales, zeros, slots, bits, value_group, out):
    batch, heads, rows, head_dim = v_codes.shape
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    for bh in range(batch * heads):
        b, h = bh // heads, bh % heads
        for r in range(rows):
            for c in range(head_dim):
                g = c // value_group
                word = v_codes[b, h, r, c]
                for e in range(per_word):
                    t = r * per_word + e
                    code = np.float32((word >> np.uint32(bits * slots[e])) & mask)
                    out[b, h, t, c] = code * scales[b, h, t, g] + zeros[b, h, t, g]


@numba.njit(**_JIT)
def _fwht_rows(rows, normalization):
    count, n = rows.shape
    for r in range(count):
        row = rows[r]
        stride = 1
        while stride < n:
            for start in range(0, n, 2 * stride):
                for i in range(start, start + stride):
                    low, high = row[i], row[i + stride]
                    row[i] = low + high
                    row[i + stride] = low - high
            stride *= 2
        for i in range(n):
            row[i] *= normalization
