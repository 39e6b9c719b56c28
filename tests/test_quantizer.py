"""The scalar quantizer's invariants."""

import ml_dtypes
import numpy as np
import pytest

from oscar_cupy import cpu_kernels, layout, quantizer

SCALE_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)]


def quantize(x, bits, dtype):
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    scale, zero = quantizer.group_params(lo, hi, bits, dtype, np.ones(lo.shape, bool))
    codes = quantizer.encode(x, scale[..., None], zero[..., None], bits)
    return codes, scale, zero, quantizer.decode(codes, scale[..., None], zero[..., None])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", SCALE_DTYPES)
def test_codes_in_range_and_error_within_half_a_scale(rng, bits, dtype):
    spread = rng.uniform(1e-3, 1e3, size=(500, 1)) * rng.choice([1, 1e-4], size=(500, 1))
    x = (rng.standard_normal((500, 32)) * spread + rng.standard_normal((500, 1)) * spread * 0.1).astype(np.float32)
    codes, scale, zero, decoded = quantize(x, bits, dtype)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    scale, zero = scale.astype(np.float64), zero.astype(np.float64)
    assert np.all(zero <= x.min(-1)) and np.all(zero + (2**bits - 1) * scale >= x.max(-1))
    slack = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(x), np.abs(zero[:, None]) + 3 * scale[:, None])
    assert np.all(np.abs(decoded - x) <= scale[:, None] / 2 + slack)
    # the extremes use the whole code range
    assert np.all(codes.min(-1) == 0) and np.mean(codes.max(-1) == 2**bits - 1) > 0.95


@pytest.mark.parametrize("dtype", SCALE_DTYPES)
def test_constant_groups_are_exact(dtype):
    x = np.array([[0.5] * 32, [-3.25] * 32, [0.0] * 32, [1024.0] * 32], dtype=np.float32)
    codes, scale, zero, decoded = quantize(x, 2, dtype)
    np.testing.assert_array_equal(decoded, x)
    np.testing.assert_array_equal(scale.astype(np.float32), 0)
    np.testing.assert_array_equal(codes, 0)


def test_round_half_to_even():
    # zero 0 and scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even), 3 sets the range
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.0]], dtype=np.float32)
    codes, scale, zero, _ = quantize(x, 2, np.dtype(np.float16))
    assert float(scale[0]) == 1.0 and float(zero[0]) == 0.0
    assert codes.tolist() == [[0, 0, 2, 2, 3]]


def test_directed_rounding():
    x = np.array([0.1, -0.1, 1e-9, -1e-9, 3.0], dtype=np.float32)
    for dtype in SCALE_DTYPES:
        down, up = quantizer.round_down(x, dtype), quantizer.round_up(x, dtype)
        assert np.all(down.astype(np.float64) <= x) and np.all(up.astype(np.float64) >= x)
        assert np.all(np.nextafter(down, np.array(np.inf, dtype=dtype)).astype(np.float64) > x)
    assert float(quantizer.round_down(np.float32(3.0), np.dtype(np.float16))) == 3.0


def test_empty_groups_get_zero_parameters():
    lo = np.array([1.0, np.inf], dtype=np.float32)
    hi = np.array([2.0, -np.inf], dtype=np.float32)
    scale, zero = quantizer.group_params(lo, hi, 2, np.dtype(np.float16), np.array([True, False]))
    assert float(scale[1]) == 0.0 and float(zero[1]) == 0.0 and float(scale[0]) > 0


def test_out_of_range_is_refused():
    with pytest.raises(ValueError, match="v holds 7e\\+04.*scale_dtype"):
        quantizer.check_range(np.array([70000.0], np.float32), np.dtype(np.float16), "v", "")


@pytest.mark.parametrize("dtype", SCALE_DTYPES[1:], ids=["bfloat16", "float32"])
def test_scales_whose_inverse_overflows(dtype):
    """A group spanning a few subnormal steps gets a scale below 2^-128, whose float32 inverse is infinite: the zero
    gets code 0 (zero times infinity is NaN), every element above it the top code; the numba path agrees."""
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    x = np.array([[0.0, tiny, 2 * tiny, 3 * tiny, 0.0, tiny] + [0.0] * 26], dtype=np.float32)
    codes, scale, zero, _ = quantize(x, 2, dtype)
    assert np.isinf(quantizer.inverse_scale(scale)).all()
    assert codes[0, :6].tolist() == [0, 3, 3, 3, 0, 3]
    valid = np.ones((1, 32), bool)
    numba_codes = cpu_kernels.encode_keys(x.reshape(1, 1, 32, 1).repeat(16, axis=3), scale.reshape(1, 1, 1, 1).repeat(
        16, axis=3), zero.reshape(1, 1, 1, 1).repeat(16, axis=3), valid, 2, 32)
    packed = layout.pack_key_codes(np.broadcast_to(codes.reshape(1, 1, 32, 1), (1, 1, 32, 16)), 2)
    np.testing.assert_array_equal(numba_codes, packed)
