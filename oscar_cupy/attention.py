"""Decode attention over a packed cache plus a full-precision window: :func:`decode_attention`.

The CPU reference of what the fused GPU kernel computes. For query row ``q`` (one query head, one query position) of a
sequence with ``P`` packed tokens and ``W`` valid window tokens:

* packed token ``t < P``: logit ``scale * n_t * (R q) . k_hat_t`` where ``R`` is the config's rotation, ``n_t`` the
  token norm (1 without token scaling) and ``k_hat_t`` the dequantized stored key (rotated, divided by ``n_t``);
* window token ``j < W``: logit ``scale * q . k_j`` on the full-precision key as given (the caller's basis);
* softmax over both parts in float32; output ``R^T (sum_t p_t v_hat_t) + sum_j p_j v_j`` (no ``R^T`` when values are
  not rotated).

GQA: query head ``i`` reads KV head ``i // (q_heads // kv_heads)``, as in transformers' ``repeat_kv``. With
``q_len > 1`` (speculative decoding, chunked evaluation) the queries are the last ``q_len`` tokens of the sequence and
the mask is causal: token positions run ``0 .. P - 1`` over the packed part and ``P .. P + W - 1`` over the window, and
query ``i`` sits at position ``P + W - q_len + i`` and sees positions up to its own. A query row that sees no token
outputs zeros (and log-sum-exp ``-inf``).
"""

from __future__ import annotations

import numpy as np

from oscar_cupy.arrays import (
    Kind,
    accept,
    as_float32,
    check_finite,
    check_float,
    check_lengths,
    check_rank,
    device_of,
    on_gpu,
    same_kind,
)
from oscar_cupy.quantized_kv import KV_AXES, QuantizedKV, dequantized_rotated
from oscar_cupy.rotation import rotate, unrotate

Q_AXES = "(batch, q_heads, q_len, head_dim)"


def decode_attention(q, qkv: QuantizedKV, window_k=None, window_v=None, lengths=None, scale=None, return_lse=False):
    """Attention of ``q`` over the packed tokens of ``qkv`` and an optional full-precision window.

    Args:
        q: ``(batch, q_heads, q_len, head_dim)`` float16, bfloat16 or float32, after RoPE, not rotated; ``q_heads`` a
            multiple of ``qkv.kv_heads``.
        qkv: the packed cache (:func:`oscar_cupy.quantize_kv`); its ``lengths`` say how many packed tokens each
            sequence has.
        window_k, window_v: ``(batch, kv_heads, window, head_dim)`` full-precision recent keys and values in the
            caller's basis (both or neither), same dtype as ``q``.
        lengths: ``(batch,)`` integers, valid window tokens per sequence (default: the whole window); only with a
            window.
        scale: softmax scale (default ``1 / sqrt(head_dim)``).
        return_lse: also return the float32 natural-log log-sum-exp of the scaled logits, ``(batch, q_heads, q_len)``.

    Returns:
        ``(batch, q_heads, q_len, head_dim)`` in ``q``'s dtype and array kind (and the log-sum-exp if asked).

    On a GPU (cupy arrays or CUDA tensors, on the current stream; torch's for tensors) the fused kernel of
    :mod:`oscar_cupy.cuda_attention` runs: float16 or bfloat16 queries and window, rotation ``"hadamard"`` or
    ``"none"``; queries and window are not checked for NaN/Inf there (no host synchronization). For repeated calls
    with a reusable workspace (CUDA graphs), use :class:`oscar_cupy.cuda_attention.DecodePlan`.
    """
    if not isinstance(qkv, QuantizedKV):
        raise TypeError(f"qkv must be a QuantizedKV (from quantize_kv), got {type(qkv).__name__}")
    qkv.check()
    q_array, kind = accept(q, "q")
    check_float(q_array, "q")
    check_rank(q_array, "q", 4, Q_AXES)
    batch, q_heads, q_len, head_dim = q_array.shape
    if (batch, head_dim) != (qkv.batch, qkv.head_dim):
        raise ValueError(
            f"q has batch {batch} and head_dim {head_dim}, but qkv has batch {qkv.batch} and head_dim {qkv.head_dim}"
        )
    if q_heads % qkv.kv_heads:
        raise ValueError(f"q has {q_heads} heads, not a multiple of qkv's {qkv.kv_heads} KV heads")
    if device_of(q_array) != device_of(qkv.k_codes):
        raise ValueError(f"q is on {device_of(q_array)} but qkv on {device_of(qkv.k_codes)}; move them to one device")
    window = _accept_window(window_k, window_v, lengths, q_array, kind, qkv)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if on_gpu(q_array):
        from oscar_cupy import cuda_attention, cuda_backend

        with cuda_backend.launch_context(q_array.device.id, torch_stream=kind is Kind.TORCH):
            output, lse = cuda_attention.decode_attention(q_array, qkv, window, scale)
    else:
        check_finite(q_array, "q")
        output, lse = _attend(as_float32(q_array), qkv, _window_float32(window), np.float32(scale))
        output = output.astype(q_array.dtype)
    output = kind.wrap(output)
    return (output, kind.wrap(lse)) if return_lse else output


def _accept_window(window_k, window_v, lengths, q_array, kind, qkv):
    """``(keys, values, lengths)`` checked (backend arrays, host int64 lengths), or ``None`` without a window."""
    if window_k is None and window_v is None:
        if lengths is not None:
            raise ValueError("lengths counts window tokens, but no window_k/window_v was given")
        return None
    if window_k is None or window_v is None:
        raise ValueError("window_k and window_v must be given together")
    (k_array, k_kind), (v_array, v_kind) = accept(window_k, "window_k"), accept(window_v, "window_v")
    same_kind([(q_array, kind), (k_array, k_kind), (v_array, v_kind)], ["q", "window_k", "window_v"])
    expected = (qkv.batch, qkv.kv_heads)
    for array, name in ((k_array, "window_k"), (v_array, "window_v")):
        check_rank(array, name, 4, KV_AXES)
        if array.dtype != q_array.dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but q has {q_array.dtype}; they must match")
        if array.shape[:2] != expected or array.shape[3] != qkv.head_dim:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)}; "
                f"expected ({expected[0]}, {expected[1]}, window, {qkv.head_dim})"
            )
    if v_array.shape != k_array.shape:
        raise ValueError(f"window_v has shape {tuple(v_array.shape)} but window_k has {tuple(k_array.shape)}")
    return k_array, v_array, check_lengths(lengths, "lengths", qkv.batch, k_array.shape[2])


def _window_float32(window):
    """The CPU window as float32 ``(keys, values, lengths)`` with padding zeroed, after the finiteness checks."""
    if window is None:
        return None
    k_array, v_array, window_lengths = window
    valid = (np.arange(k_array.shape[2])[None, :] < window_lengths[:, None])[:, None, :, None]
    check_finite(k_array, "window_k", valid)
    check_finite(v_array, "window_v", valid)
    # padding may hold anything: zero it so that it cannot reach the output through 0 * NaN
    keys = np.where(valid, as_float32(k_array), np.float32(0))
    values = np.where(valid, as_float32(v_array), np.float32(0))
    return keys, values, window_lengths


def _attend(q, qkv: QuantizedKV, window, scale: np.float32):
    """float32 ``(output, lse)`` of float32 ``q`` ``(B, Hq, L, D)``; see the module docstring."""
    config = qkv.config
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = qkv.kv_heads
    rows = (q_heads // kv_heads) * q_len
    grouped = q.reshape(batch, kv_heads, rows, head_dim)  # row = (query head within the group, query position)
    query_position = np.tile(np.arange(q_len), q_heads // kv_heads)  # (rows,), counted back from the last token

    window_len = np.zeros(batch, dtype=np.int64) if window is None else window[2]
    total = qkv.lengths + window_len  # (B,)
    last_visible = total[:, None] - q_len + query_position[None, :]  # (B, rows): absolute position of each row

    keys, values = dequantized_rotated(qkv)
    logits = np.matmul(rotate(grouped, config.rotation), keys.swapaxes(-1, -2))  # (B, Hk, rows, T)
    if qkv.norms is not None:
        logits *= qkv.norms[:, :, None, :]
    logits *= scale
    packed_position = np.arange(qkv.capacity)
    visible = (packed_position[None, :] < qkv.lengths[:, None])[:, None, :]  # (B, 1, T)
    visible = visible & (packed_position[None, None, :] <= last_visible[:, :, None])  # (B, rows, T)
    parts = [(np.where(visible[:, None], logits, -np.inf), values, True)]

    if window is not None:
        window_keys, window_values, _ = window
        window_logits = np.matmul(grouped, window_keys.swapaxes(-1, -2)) * scale
        window_position = qkv.lengths[:, None] + np.arange(window_keys.shape[2])[None, :]  # (B, W)
        window_visible = (np.arange(window_keys.shape[2])[None, :] < window_len[:, None])[:, None, :]
        window_visible = window_visible & (window_position[:, None, :] <= last_visible[:, :, None])
        parts.append((np.where(window_visible[:, None], window_logits, -np.inf), window_values, False))

    row_max = np.max([part[0].max(axis=-1, initial=-np.inf) for part in parts], axis=0)  # (B, Hk, rows)
    safe_max = np.where(np.isfinite(row_max), row_max, np.float32(0))[..., None]
    total_weight = np.zeros_like(row_max)
    output = np.zeros_like(grouped)
    for part_logits, part_values, rotated in parts:
        weights = np.exp(part_logits - safe_max)
        total_weight += weights.sum(axis=-1)
        part_output = np.matmul(weights, part_values)
        if rotated and config.rotate_values:
            part_output = unrotate(part_output, config.rotation)
        output += part_output
    with np.errstate(divide="ignore", invalid="ignore"):
        output = np.where(total_weight[..., None] > 0, output / total_weight[..., None], np.float32(0))
        lse = (row_max + np.log(total_weight)).astype(np.float32)
    return (
        output.reshape(batch, q_heads, q_len, head_dim),
        lse.reshape(batch, q_heads, q_len),
    )
