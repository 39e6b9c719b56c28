"""The packed layout of a quantized KV cache: the one place that defines it.

The numpy functions of this module *are* the definition: every other piece (the numba fast path, the CUDA kernels,
the cache) must produce and read exactly what :func:`pack_key_codes`/:func:`pack_value_codes` write, and the tests
check that each of them does.

Notation: ``B`` batch, ``Hk`` KV heads, ``D`` head_dim, ``b`` bits, ``E = 32 // b`` codes per ``uint32`` word (16 at
2 bits, 8 at 4 bits), ``Gk`` key group (tokens), ``Gv`` value group (channels), ``T`` token capacity (a multiple of
``Gk``; tokens at or beyond a sequence's length are padding), ``Hn`` = 1 for ``"l2"`` token scaling and ``Hk`` for
``"l2_per_head"``. Keys are stored rotated and divided by their token norm; values rotated when the config says so.

=============  ==========================  ===========  ===================================================
array          shape                       dtype        holds
=============  ==========================  ===========  ===================================================
``k_codes``    ``(B, Hk, T, D // E)``      uint32       key codes; a word = E consecutive *channels* of one token
``k_scales``   ``(B, Hk, T // Gk, D)``     scale dtype  per (key group of Gk tokens, channel)
``k_zeros``    ``(B, Hk, T // Gk, D)``     scale dtype  per (key group, channel)
``v_codes``    ``(B, Hk, T // E, D)``      uint32       value codes; a word = E consecutive *tokens* of one channel
``v_scales``   ``(B, Hk, T, D // Gv)``     scale dtype  per (token, value group of Gv channels)
``v_zeros``    ``(B, Hk, T, D // Gv)``     scale dtype  per (token, value group)
``norms``      ``(B, Hn, T)``              float32      token norms (absent when token scaling is ``"none"``)
``lengths``    ``(B,)``                    int64        valid tokens per sequence
=============  ==========================  ===========  ===================================================

Bit order inside a word. The E elements of a word are consecutive along its packing axis (channels for keys, tokens
for values); element ``e`` sits in slot ``e // 2 + (E // 2) * (e % 2)``, i.e. bits ``[b * slot, b * slot + b)``, slot 0
in the least significant bits. Even elements fill the low half-word, odd elements the high half-word, so
``(word >> (b * i)) & mask16`` (``mask16 = 0x00030003`` at 2 bits, ``0x000F000F`` at 4) yields elements ``2i`` and
``2i + 1`` in the two 16-bit halves: one shift and one ``lop3`` give a half2 pair of neighbours along the reduction axis
of the tensor-core product that reads it (channels for Q·Kᵀ, tokens for P·V), exactly the pair a ``mma.m16n8k16``
operand register holds.

Why these shapes. Every array is token-major after ``(B, Hk)``, so a tile of tokens of one (sequence, head) is one
contiguous stretch of each array, read with 16-byte loads: a 2-bit key row of D = 128 channels is 32 bytes, a value
word row of 16 tokens is ``4 D`` bytes. Key parameters are per channel and shared by Gk tokens; value parameters are per
token and shared by Gv channels. Padding tokens hold code 0, scale 0, zero 0 and norm 0; key groups with no valid token
hold scale 0 and zero 0.

Pages. A page is ``window`` tokens (the flush block, a multiple of Gk, hence of E): the token axis of every array splits
into whole pages (``window`` key rows, ``window // Gk`` key-parameter rows, ``window // E`` value word rows, ``window``
value-parameter rows and norms), so a paged cache can hold the same bytes page by page.
"""

from __future__ import annotations

import numpy as np

from oscar_cupy.config import QuantConfig
from oscar_cupy.quantizer import scale_dtype

CODES_DTYPE = np.dtype(np.uint32)
NORMS_DTYPE = np.dtype(np.float32)


def slot_of_element(bits: int) -> np.ndarray:
    """Slot of each of the ``32 // bits`` elements of a word (see the bit order above)."""
    per_word = 32 // bits
    element = np.arange(per_word)
    return element // 2 + (per_word // 2) * (element % 2)


def capacity(tokens: int, config: QuantConfig) -> int:
    """Token capacity that holds ``tokens``: the next multiple of the key group."""
    return -(-tokens // config.key_group) * config.key_group


def array_specs(config: QuantConfig, batch: int, kv_heads: int, tokens: int, head_dim: int) -> dict:
    """``{name: (shape, dtype)}`` of every packed array for ``tokens`` of capacity (a multiple of the key group)."""
    if tokens % config.key_group:
        raise ValueError(f"token capacity {tokens} is not a multiple of key_group {config.key_group}")
    per_word = config.codes_per_word
    scales = scale_dtype(config.scale_dtype)
    specs = {
        "k_codes": ((batch, kv_heads, tokens, head_dim // per_word), CODES_DTYPE),
        "k_scales": ((batch, kv_heads, tokens // config.key_group, head_dim), scales),
        "k_zeros": ((batch, kv_heads, tokens // config.key_group, head_dim), scales),
        "v_codes": ((batch, kv_heads, tokens // per_word, head_dim), CODES_DTYPE),
        "v_scales": ((batch, kv_heads, tokens, head_dim // config.value_group), scales),
        "v_zeros": ((batch, kv_heads, tokens, head_dim // config.value_group), scales),
    }
    if config.token_scaling != "none":
        norm_heads = 1 if config.token_scaling == "l2" else kv_heads
        specs["norms"] = ((batch, norm_heads, tokens), NORMS_DTYPE)
    return specs


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``codes`` along their last axis (a multiple of ``32 // bits``) into uint32 words."""
    per_word = 32 // bits
    runs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_word, per_word).astype(np.uint32)
    shifts = (bits * slot_of_element(bits)).astype(np.uint32)
    return np.bitwise_or.reduce(runs << shifts, axis=-1)


def unpack_words(words: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes of uint32 ``words``, unpacked along a new last axis that is then merged into the last axis."""
    shifts = (bits * slot_of_element(bits)).astype(np.uint32)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * (32 // bits)).astype(np.uint8)


def pack_key_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``k_codes`` of uint8 key codes ``(B, Hk, T, D)``."""
    return pack_words(codes, bits)


def unpack_key_codes(k_codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 key codes ``(B, Hk, T, D)`` of ``k_codes``."""
    return unpack_words(k_codes, bits)


def pack_value_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``v_codes`` of uint8 value codes ``(B, Hk, T, D)`` (T a multiple of ``32 // bits``)."""
    return np.ascontiguousarray(pack_words(codes.swapaxes(-1, -2), bits).swapaxes(-1, -2))


def unpack_value_codes(v_codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 value codes ``(B, Hk, T, D)`` of ``v_codes``."""
    return np.ascontiguousarray(unpack_words(v_codes.swapaxes(-1, -2), bits).swapaxes(-1, -2))
