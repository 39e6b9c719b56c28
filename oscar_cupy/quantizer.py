"""The scalar quantizer: asymmetric min/max, one scale and one zero per group, round half to even.

Definition for one group ``X`` of float32 values (the valid elements that share parameters), ``b`` bits,
``L = 2**b - 1`` and scale dtype ``S`` (float16, bfloat16 or float32):

1. ``mn = min X + 0``, ``mx = max X + 0`` (float32; adding zero turns -0 into +0, so that which zero the extreme of a
   group holding both is does not matter).
2. ``zero = round_down_S(mn)``: the largest ``S`` value not above ``mn``.
3. ``scale = round_up_S((float64(mx) - float64(zero)) / L)``: the smallest ``S`` value not below the float64 quotient.
4. ``inverse = float32(1) / float32(scale)`` if ``scale > 0`` else ``0``.
5. ``code = clamp(rint(float32(float32(x - zero) * inverse)), 0, L)``, ``rint`` rounding half to even; a NaN product
   (zero times an infinite inverse: an element equal to the zero of a group whose bfloat16 or float32 scale is so
   small, below about 2^-128, that its float32 inverse overflows) gives code 0, as the clamp of the GPU kernels does.
6. Dequantized: ``x_hat = float32(float32(code) * scale) + zero`` (two float32 roundings, no fused multiply-add).

Rounding the zero down and the scale up makes ``[zero, zero + L * scale]`` cover ``[mn, mx]``, so every element is
within ``scale / 2`` of its dequantized value (plus float32 rounding of a few ulps; in the groups of step 5 with an
infinite inverse, within ``L * scale``, below 2^-124), and a constant group whose value
is representable in ``S`` dequantizes exactly (scale 0). Groups with no valid element get scale 0 and zero 0.
Every step is an IEEE operation with one rounding, so a GPU kernel that performs the same steps gets the same codes,
scales and zeros bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from oscar_cupy.arrays import BFLOAT16

SCALE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BFLOAT16, "float32": np.dtype(np.float32)}


def scale_dtype(name: str) -> np.dtype:
    """The numpy dtype of scale dtype ``name``."""
    return SCALE_DTYPES[name]


def round_down(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The largest value of ``dtype`` not above each element of ``x`` (float32 or float64)."""
    nearest = x.astype(dtype)
    too_high = nearest.astype(np.float64) > x
    with np.errstate(over="ignore"):  # a step beyond the largest value is Inf (a group that check_range refuses)
        return np.where(too_high, np.nextafter(nearest, np.array(-np.inf, dtype=dtype)), nearest)


def round_up(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The smallest value of ``dtype`` not below each element of ``x`` (float32 or float64)."""
    nearest = x.astype(dtype)
    too_low = nearest.astype(np.float64) < x
    with np.errstate(over="ignore"):
        return np.where(too_low, np.nextafter(nearest, np.array(np.inf, dtype=dtype)), nearest)


def group_params(minimum: np.ndarray, maximum: np.ndarray, bits: int, dtype: np.dtype, valid: np.ndarray):
    """``(scale, zero)`` in ``dtype`` for groups with float32 ``minimum``/``maximum``.

    ``valid`` (bool, same shape) marks groups that hold at least one valid element; the others get scale 0, zero 0.
    """
    levels = (1 << bits) - 1
    minimum = np.where(valid, minimum, np.float32(0)) + np.float32(0)  # -0 + 0 = +0 (step 1)
    maximum = np.where(valid, maximum, np.float32(0)) + np.float32(0)
    zero = round_down(minimum, dtype)
    scale = round_up((maximum.astype(np.float64) - zero.astype(np.float64)) / levels, dtype)
    return scale, zero


def inverse_scale(scale: np.ndarray) -> np.ndarray:
    """float32 ``1 / scale`` where ``scale > 0``, else 0 (step 4 above; infinite for scales below about 2^-128)."""
    scale32 = scale.astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(scale32 > 0, np.float32(1) / scale32, np.float32(0))


def encode(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes of float32 ``x`` with ``scale``/``zero`` broadcast to ``x``'s shape (steps 4 and 5 above)."""
    with np.errstate(invalid="ignore"):
        scaled = (x - zero.astype(np.float32)) * inverse_scale(scale)
    scaled = np.where(np.isnan(scaled), np.float32(0), scaled)
    return np.clip(np.rint(scaled), 0, (1 << bits) - 1).astype(np.uint8)


def decode(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """float32 dequantized values of ``codes`` with ``scale``/``zero`` broadcast to their shape (step 6 above)."""
    return codes.astype(np.float32) * scale.astype(np.float32) + zero.astype(np.float32)


def check_range(x: np.ndarray, dtype: np.dtype, name: str, hint: str) -> None:
    """``ValueError`` naming ``name`` if some value of float32 ``x`` does not fit the scale dtype's finite range."""
    limit = float(ml_dtypes.finfo(dtype).max)
    largest = float(np.abs(x).max(initial=0.0))
    if largest > limit:
        raise ValueError(
            f"{name} holds {largest:.4g}, beyond the range of scale_dtype {dtype} (max {limit:.4g}){hint}; "
            "use QuantConfig(scale_dtype='bfloat16') or 'float32'"
        )


def check_span(maximum: np.ndarray, zero: np.ndarray, valid: np.ndarray, name: str, hint: str) -> None:
    """``ValueError`` naming ``name`` if a valid group's ``float64(max) - float64(zero)`` exceeds float32's range: its
    elements minus the zero would overflow to Inf (float32 ``maximum``, ``zero`` in the scale dtype, bool ``valid``)."""
    span = np.where(valid, maximum.astype(np.float64) - zero.astype(np.float64), 0.0)
    if span.max(initial=0.0) > float(np.finfo(np.float32).max):
        raise ValueError(f"{name} holds a group spanning {span.max():.4g}{hint}, beyond float32's range "
                         f"({float(np.finfo(np.float32).max):.4g}): its codes would overflow")
