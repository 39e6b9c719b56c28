"""Canalized rotation: the normalized Walsh–Hadamard transform (or a user matrix) along head_dim.

The CPU definition of the Hadamard transform, which the GPU kernels reproduce bit for bit, is
:func:`oscar_cupy.cpu_kernels.fwht`: in float32, butterfly stages of stride 1, 2, 4, …, n/2 (``a, b -> a + b, a - b``),
then one multiplication by ``float32(1 / sqrt(n))`` (a power of two, hence exact, when n is a power of four). The matrix
is the natural-order (Sylvester) one, ``H[i, j] = (-1) ** popcount(i & j) / sqrt(n)``: symmetric, orthogonal and its own
inverse.
"""

from __future__ import annotations

import numpy as np

from oscar_cupy.arrays import Kind, accept, check_float, on_gpu
from oscar_cupy.cpu_kernels import fwht

HADAMARD_SIZES = tuple(1 << p for p in range(4, 9))  # 16 … 256


def hadamard_matrix(n: int) -> np.ndarray:
    """The normalized Sylvester Walsh–Hadamard matrix of order ``n`` (float64, ``(n, n)``)."""
    _check_size(n, "n")
    index = np.arange(n)
    parity = np.bitwise_count(index[:, None] & index[None, :]) & 1
    return (1.0 - 2.0 * parity) / np.sqrt(n)


def hadamard(x, axis: int = -1):
    """Normalized Walsh–Hadamard transform of ``x`` along ``axis`` (length a power of two from 16 to 256).

    ``x``: numpy array, cupy array or torch tensor of float16, bfloat16 or float32; the result has the same kind, shape
    and dtype (computed in float32). Applying it twice gives ``x`` back up to rounding. A pure transform: NaN and Inf
    propagate, and float16 results beyond its range become Inf (the quantizing functions refuse such values).
    """
    array, kind = accept(x, "x")
    check_float(array, "x")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -array.ndim <= axis < array.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {tuple(array.shape)}")
    _check_size(array.shape[axis], "x's length along axis")
    if on_gpu(array):
        import cupy

        from oscar_cupy import cuda_backend

        with cuda_backend.launch_context(array.device.id, torch_stream=kind is Kind.TORCH):
            rows = cupy.ascontiguousarray(cupy.moveaxis(array, axis, -1))
            result = cupy.ascontiguousarray(cupy.moveaxis(cuda_backend.hadamard_last_axis(rows), -1, axis))
        return kind.wrap(result)
    moved = np.moveaxis(array.astype(np.float32), axis, -1)
    result = np.moveaxis(fwht(moved), -1, axis).astype(array.dtype)
    return kind.wrap(np.ascontiguousarray(result))


def rotate(x: np.ndarray, rotation) -> np.ndarray:
    """``R @ x`` for each float32 vector ``x`` along the last axis; ``rotation`` as in :class:`QuantConfig`.

    Returns a new float32 array. A user matrix is applied with a float64 product rounded once to float32.
    """
    if isinstance(rotation, str):
        return fwht(x) if rotation == "hadamard" else np.array(x, dtype=np.float32, copy=True)
    return (x.astype(np.float64) @ rotation.T).astype(np.float32)


def unrotate(x: np.ndarray, rotation) -> np.ndarray:
    """``R^T @ x`` along the last axis (the inverse of :func:`rotate`); a new float32 array."""
    if isinstance(rotation, str):
        return fwht(x) if rotation == "hadamard" else np.array(x, dtype=np.float32, copy=True)
    return (x.astype(np.float64) @ rotation).astype(np.float32)


def _check_size(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {n!r}")
    if n not in HADAMARD_SIZES:
        raise ValueError(f"{what} is {n}; the Hadamard transform needs a power of two from 16 to 256")
