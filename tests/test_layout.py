"""The packed layout: bit order, round trips, shapes, and the numba fast path against the numpy definition."""

import numpy as np
import pytest

from oscar_cupy import QuantConfig, cpu_kernels, layout, quantizer


@pytest.mark.parametrize("bits", [2, 4])
def test_bit_order_of_one_word(bits):
    per_word = 32 // bits
    codes = np.arange(per_word, dtype=np.uint8) % (1 << bits)
    word = int(layout.pack_words(codes, bits)[0])
    for element, code in enumerate(codes):
        slot = element // 2 + (per_word // 2) * (element % 2)
        assert (word >> (bits * slot)) & ((1 << bits) - 1) == code
    # one shift + mask gives neighbours 2i and 2i+1 in the low and high half-words
    for i in range(per_word // 2):
        pair = (word >> (bits * i)) & (0x00030003 if bits == 2 else 0x000F000F)
        assert (pair & 0xFFFF, pair >> 16) == (codes[2 * i], codes[2 * i + 1])


@pytest.mark.parametrize("bits", [2, 4])
def test_round_trips_are_bit_exact(rng, bits):
    codes = rng.integers(0, 1 << bits, size=(2, 3, 64, 128), dtype=np.uint8)
    k_codes = layout.pack_key_codes(codes, bits)
    v_codes = layout.pack_value_codes(codes, bits)
    assert k_codes.shape == (2, 3, 64, 128 * bits // 32) and v_codes.shape == (2, 3, 64 * bits // 32, 128)
    np.testing.assert_array_equal(layout.unpack_key_codes(k_codes, bits), codes)
    np.testing.assert_array_equal(layout.unpack_value_codes(v_codes, bits), codes)
    words = rng.integers(0, 2**32, size=(2, 3, 16, 8), dtype=np.uint32)
    np.testing.assert_array_equal(layout.pack_key_codes(layout.unpack_key_codes(words, bits), bits), words)


def test_value_words_run_along_tokens_and_key_words_along_channels():
    codes = np.zeros((1, 1, 32, 64), dtype=np.uint8)
    codes[0, 0, 17, 5] = 3
    k_codes = layout.pack_key_codes(codes, 2)
    v_codes = layout.pack_value_codes(codes, 2)
    assert np.argwhere(k_codes).tolist() == [[0, 0, 17, 0]]  # channel 5 is in the first word of token 17
    assert k_codes[0, 0, 17, 0] == 3 << (2 * (5 // 2 + 8))
    assert np.argwhere(v_codes).tolist() == [[0, 0, 1, 5]]  # token 17 is in the second word row of channel 5
    assert v_codes[0, 0, 1, 5] == 3 << (2 * (1 // 2 + 8))


@pytest.mark.parametrize("scaling, norm_heads", [("l2", 1), ("l2_per_head", 3), ("none", None)])
def test_array_specs(scaling, norm_heads):
    config = QuantConfig(bits=2, key_group=64, value_group=32, token_scaling=scaling)
    specs = layout.array_specs(config, 2, 3, 128, 128)
    assert specs["k_codes"] == ((2, 3, 128, 8), np.uint32)
    assert specs["k_scales"] == ((2, 3, 2, 128), np.float16)
    assert specs["v_codes"] == ((2, 3, 8, 128), np.uint32)
    assert specs["v_zeros"] == ((2, 3, 128, 4), np.float16)
    assert specs.get("norms", (None,))[0] == (None if norm_heads is None else (2, norm_heads, 128))
    with pytest.raises(ValueError, match="multiple of key_group"):
        layout.array_specs(config, 2, 3, 96, 128)
    assert layout.capacity(0, config) == 0 and layout.capacity(65, config) == 128


@pytest.mark.parametrize("bits, group", [(2, 32), (2, 128), (4, 64)])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_fast_path_equals_definition(rng, bits, group, scale_dtype):
    dtype = quantizer.scale_dtype(scale_dtype)
    x = (rng.standard_normal((2, 3, 256, 128)) * rng.uniform(0.01, 10, size=(1, 1, 1, 128))).astype(np.float32)
    valid = np.arange(256)[None, :] < np.array([256, 77])[:, None]
    mask = valid[:, None, :, None]
    levels = (1 << bits) - 1

    # keys: groups of `group` tokens per channel
    grouped = x.reshape(2, 3, 256 // group, group, 128)
    lo, hi = grouped.min(axis=3), grouped.max(axis=3)
    k_scales, k_zeros = quantizer.group_params(lo, hi, bits, dtype, np.ones(lo.shape, bool))
    expected = quantizer.encode(grouped, k_scales[:, :, :, None], k_zeros[:, :, :, None], bits).reshape(x.shape)
    expected = np.where(mask, expected, 0).astype(np.uint8)
    assert expected.max() <= levels
    k_codes = cpu_kernels.encode_keys(x, k_scales, k_zeros, valid, bits, group)
    np.testing.assert_array_equal(k_codes, layout.pack_key_codes(expected, bits))
    decoded = quantizer.decode(expected.reshape(grouped.shape), k_scales[:, :, :, None], k_zeros[:, :, :, None])
    np.testing.assert_array_equal(
        cpu_kernels.dequantize_keys(k_codes, k_scales, k_zeros, bits, group), decoded.reshape(x.shape))

    # values: groups of 32 channels per token
    grouped = x.reshape(2, 3, 256, 4, 32)
    everywhere = np.ones((2, 3, 256, 4), bool)
    v_scales, v_zeros = quantizer.group_params(grouped.min(-1), grouped.max(-1), bits, dtype, everywhere)
    expected = quantizer.encode(grouped, v_scales[..., None], v_zeros[..., None], bits).reshape(x.shape)
    expected = np.where(mask, expected, 0).astype(np.uint8)
    v_codes = cpu_kernels.encode_values(x, v_scales, v_zeros, valid, bits, 32)
    np.testing.assert_array_equal(v_codes, layout.pack_value_codes(expected, bits))
    decoded = quantizer.decode(expected.reshape(grouped.shape), v_scales[..., None], v_zeros[..., None])
    np.testing.assert_array_equal(
        cpu_kernels.dequantize_values(v_codes, v_scales, v_zeros, bits, 32), decoded.reshape(x.shape))
