"""Omni-token scaling: one L2 norm per token of the keys, which the rotated keys are divided by before quantization.

Definition (the GPU kernels reproduce it): the squares of the keys as given (widened to float32, before the rotation)
are summed in float64 (over all KV heads and channels for ``"l2"``, over the channels of each head for
``"l2_per_head"``), the square root is taken in float64 and rounded once to float32. A norm that is zero becomes 1.
The rotated keys are then scaled by ``float32(1 / norm)`` (one float32 division per token, one float32 multiplication
per element). The rotation is orthogonal, so this is the norm of the rotated keys of the paper; taking it before the
rotation spares the GPU kernel a second Hadamard transform of every key.

Because the float64 sum is rounded once, a kernel that sums in another order gets the same float32 norm unless the
float64 sums straddle a float32 rounding boundary (relative distance below 1e-15; never observed in testing).
"""

from __future__ import annotations

import numpy as np

NORM_OVERFLOW = ("k holds a token whose L2 norm exceeds float32's range (keys near float32's largest values); "
                 "its keys cannot be scaled")


def token_norms(keys: np.ndarray, token_scaling: str) -> np.ndarray | None:
    """Norms of float32 ``keys`` ``(batch, kv_heads, tokens, head_dim)``.

    Returns float32 ``(batch, 1, tokens)`` for ``"l2"``, ``(batch, kv_heads, tokens)`` for ``"l2_per_head"`` and
    ``None`` for ``"none"``. Raises ``ValueError`` for a norm beyond float32's range.
    """
    if token_scaling == "none":
        return None
    squares = np.square(keys.astype(np.float64)).sum(axis=-1)
    if token_scaling == "l2":
        squares = squares.sum(axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        norms = np.sqrt(squares).astype(np.float32)
    if not np.isfinite(norms).all():
        raise ValueError(NORM_OVERFLOW)
    norms[norms == 0] = 1.0
    return norms


def divide_by_norms(rotated_keys: np.ndarray, norms: np.ndarray | None) -> np.ndarray:
    """``rotated_keys * float32(1 / norm)`` per token (a new float32 array); unchanged copy when ``norms`` is None."""
    if norms is None:
        return np.array(rotated_keys, dtype=np.float32, copy=True)
    inverse = np.float32(1.0) / norms
    return rotated_keys * inverse[..., None]
