"""Decode-attention cases shared by the GPU tests (test_cuda_attention.py) and the CPU emulation of the kernel
(test_emulated_decode.py): random inputs, the relative error of an output and its tolerance."""

import ml_dtypes
import numpy as np
from conftest import random_kv

import oscar_cupy as oc

BF16 = np.dtype(ml_dtypes.bfloat16)
# relative error of the output (Frobenius norm over a whole case): the bound of the issue in bfloat16, tighter in
# float16 with float16 scales (the tensor-core operands are float16 then; bfloat16 with bfloat16 or float32 scales)
TOLERANCE = {np.dtype(np.float16): 4e-3, BF16: 1e-2}
BF16_OPERANDS = 2e-2  # bfloat16 or float32 scales: bfloat16 operands (8 significant bits), for their range


def tolerance(dtype, config) -> float:
    return TOLERANCE[np.dtype(dtype)] if config.scale_dtype == "float16" else BF16_OPERANDS


def relative_error(result, reference) -> float:
    result, reference = result.astype(np.float64), reference.astype(np.float64)
    return float(np.linalg.norm(result - reference) / max(np.linalg.norm(reference), 1e-30))


def make_case(rng, *, batch=2, kv_heads=2, group=4, q_len=1, head_dim=128, packed=(300, 129), window=(20, 7),
              dtype=BF16, config=None):
    """Random queries, a packed cache of `packed[b]` tokens and a window of `window[b]` tokens (capacity max + 3)."""
    config = config or oc.QuantConfig()
    tokens = max(max(packed), 1)
    k, v = random_kv(rng, batch=batch, kv_heads=kv_heads, tokens=tokens, head_dim=head_dim, dtype=dtype)
    qkv = oc.quantize_kv(k, v, config, lengths=list(packed))
    q = (rng.standard_normal((batch, kv_heads * group, q_len, head_dim)) * 2).astype(dtype)
    if window is None:
        return q, qkv, None, None, None
    window_k, window_v = random_kv(rng, batch=batch, kv_heads=kv_heads, tokens=max(window) + 3, head_dim=head_dim,
                                   dtype=dtype)
    window_k[:, :, max(window):] = np.nan  # padding of the window is never read
    return q, qkv, window_k, window_v, list(window)
