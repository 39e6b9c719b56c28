"""Quantize keys and values into the packed layout, and back: :func:`quantize_kv`, :func:`dequantize_kv`.

Keys: rotate each head (config.rotation), divide by the token norm (config.token_scaling), quantize per channel over
groups of ``key_group`` consecutive tokens. Values: rotate (when ``rotate_values``), quantize per token over groups of
``value_group`` consecutive channels. Codes and parameters follow :mod:`oscar_cupy.quantizer`; storage follows
:mod:`oscar_cupy.layout`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from oscar_cupy import cpu_kernels, layout, quantizer
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
from oscar_cupy.config import QuantConfig
from oscar_cupy.rotation import rotate, unrotate
from oscar_cupy.scaling import divide_by_norms, token_norms

KV_AXES = "(batch, kv_heads, tokens, head_dim)"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedKV:
    """Packed keys and values of ``batch`` sequences (arrays and bit order: :mod:`oscar_cupy.layout`).

    The arrays are backend arrays (numpy on the CPU, cupy on a GPU); torch users can view them with
    ``torch.from_dlpack``.

    Attributes:
        config: the :class:`QuantConfig` they were quantized with.
        k_codes, k_scales, k_zeros, v_codes, v_scales, v_zeros, norms: the packed arrays (``norms`` is ``None`` when
            token scaling is ``"none"``).
        lengths: int64 ``(batch,)``, valid tokens per sequence.
        num_tokens: token count of the arrays that were quantized (the capacity rounds it up to a key group).
        dtype: dtype of the keys and values that were quantized (what :meth:`dequantize` returns).
        kind: array kind of the caller's inputs (what :meth:`dequantize` returns).
    """

    config: QuantConfig
    k_codes: np.ndarray
    k_scales: np.ndarray
    k_zeros: np.ndarray
    v_codes: np.ndarray
    v_scales: np.ndarray
    v_zeros: np.ndarray
    norms: np.ndarray | None
    lengths: np.ndarray
    num_tokens: int
    dtype: np.dtype
    kind: Kind = Kind.NUMPY
    checked: bool = dataclasses.field(default=False, init=False, repr=False)  # see check()

    def check(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field unless the arrays form the packed layout of ``config``
        (:func:`oscar_cupy.layout.array_specs`: shapes and dtypes, ``norms`` present exactly with token scaling) on one
        device, with ``lengths`` int64 ``(batch,)`` in ``[0, num_tokens]`` and ``num_tokens`` within the capacity.
        :func:`dequantize_kv` and :func:`oscar_cupy.decode_attention` call it once per object (what ``quantize_kv``
        and the caches build is checked by construction; ``dataclasses.replace`` makes a new, unchecked object)."""
        if self.checked:
            return
        if not isinstance(self.config, QuantConfig):
            raise TypeError(f"QuantizedKV.config must be a QuantConfig, got {type(self.config).__name__}")
        for name in ("k_codes", "v_codes"):
            array = getattr(self, name)
            if getattr(array, "ndim", None) != 4:
                raise ValueError(f"QuantizedKV.{name} must be a 4-D array, got {type(array).__name__} of shape "
                                 f"{getattr(array, 'shape', None)}")
        batch, kv_heads, capacity, head_dim = (*self.k_codes.shape[:3], self.v_codes.shape[3])
        self.config.check_head_dim(head_dim)
        if kv_heads == 0:
            raise ValueError(f"QuantizedKV.k_codes has shape {tuple(self.k_codes.shape)}: no KV heads")
        specs = layout.array_specs(self.config, batch, kv_heads, capacity, head_dim)
        if self.norms is not None and "norms" not in specs:
            raise ValueError("QuantizedKV.norms must be None: the config has no token scaling")
        device = device_of(self.k_codes)
        for name, (shape, dtype) in specs.items():
            array = getattr(self, name)
            if array is None or tuple(array.shape) != shape or array.dtype != dtype:
                raise ValueError(f"QuantizedKV.{name} must be {np.dtype(dtype).name} of shape {shape} for its config "
                                 f"and k_codes {tuple(self.k_codes.shape)}, got "
                                 f"{'None' if array is None else f'{array.dtype} of shape {tuple(array.shape)}'}")
            if device_of(array) != device:
                raise ValueError(f"QuantizedKV.{name} is on {device_of(array)} but k_codes on {device}")
        if not 0 <= self.num_tokens <= capacity:
            raise ValueError(f"QuantizedKV.num_tokens must lie in [0, {capacity}], got {self.num_tokens}")
        lengths = np.asarray(self.lengths)
        if lengths.dtype != np.int64 or lengths.shape != (batch,):
            raise ValueError(f"QuantizedKV.lengths must be int64 of shape ({batch},), got {lengths.dtype} of shape "
                             f"{lengths.shape}")
        if lengths.min(initial=0) < 0 or lengths.max(initial=0) > self.num_tokens:
            raise ValueError(f"QuantizedKV.lengths must lie in [0, {self.num_tokens}], got {lengths.tolist()}")
        object.__setattr__(self, "checked", True)

    @property
    def batch(self) -> int:
        return self.k_codes.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k_codes.shape[1]

    @property
    def capacity(self) -> int:
        """Token capacity of the arrays (a multiple of the key group)."""
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.v_codes.shape[3]

    def arrays(self) -> dict:
        """``{name: array}`` of the packed arrays, in :func:`oscar_cupy.layout.array_specs` order."""
        names = layout.array_specs(self.config, self.batch, self.kv_heads, self.capacity, self.head_dim)
        return {name: getattr(self, name) for name in names}

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays (codes, scales, zeros and norms; ``lengths`` not counted)."""
        return sum(array.nbytes for array in self.arrays().values())

    @property
    def bits_per_element(self) -> float:
        """Stored bits per key or value element of the capacity: ``8 * nbytes / (2 * B * Hk * T * D)`` (NaN for an
        empty capacity)."""
        elements = 2 * self.batch * self.kv_heads * self.capacity * self.head_dim
        return 8 * self.nbytes / elements if elements else float("nan")

    def dequantize(self):
        """``(keys, values)`` as :func:`dequantize_kv` returns them."""
        return dequantize_kv(self)


def quantize_kv(k, v, config: QuantConfig | None = None, lengths=None) -> QuantizedKV:
    """Quantize keys and values into a :class:`QuantizedKV`.

    Args:
        k, v: ``(batch, kv_heads, tokens, head_dim)`` float16, bfloat16 or float32, finite, in the model's basis (after
            RoPE); numpy or cupy arrays, or CPU or CUDA torch tensors. Never modified. On a GPU the work runs on the
            inputs' device and current stream.
        config: a :class:`QuantConfig` (default: ``QuantConfig()``, the OScaR INT2 recipe).
        lengths: optional ``(batch,)`` integers, valid tokens per sequence (the first ``lengths[b]`` tokens of sequence
            ``b``; default: all). Tokens beyond never enter a group's min/max.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. QuantConfig.preset('oscar-2')), "
                        f"got {type(config).__name__}")
    (k_array, k_kind), (v_array, v_kind) = accept(k, "k"), accept(v, "v")
    kind = same_kind([(k_array, k_kind), (v_array, v_kind)], ["k", "v"])
    for array, name in ((k_array, "k"), (v_array, "v")):
        check_float(array, name)
        check_rank(array, name, 4, KV_AXES)
    if v_array.shape != k_array.shape:
        raise ValueError(f"v has shape {tuple(v_array.shape)} but k has {tuple(k_array.shape)}; they must match")
    if v_array.dtype != k_array.dtype:
        raise TypeError(f"v has dtype {v_array.dtype} but k has {k_array.dtype}; they must match")
    batch, kv_heads, tokens, head_dim = k_array.shape
    config.check_head_dim(head_dim)
    if kv_heads == 0:
        raise ValueError(f"k has shape {tuple(k_array.shape)}: no KV heads")
    lengths = check_lengths(lengths, "lengths", batch, tokens)
    capacity = layout.capacity(tokens, config)
    if on_gpu(k_array):
        from oscar_cupy import cuda_backend

        with cuda_backend.launch_context(k_array.device.id, torch_stream=kind is Kind.TORCH):
            arrays = cuda_backend.allocate(config, batch, kv_heads, capacity, head_dim)
            cuda_backend.quantize_into(k_array, v_array, config, lengths, arrays)
    else:
        arrays = _quantize_cpu(k_array, v_array, config, lengths, capacity)
    arrays.setdefault("norms", None)
    return checked(QuantizedKV(config=config, **arrays, lengths=lengths, num_tokens=tokens, dtype=k_array.dtype,
                               kind=kind))


def checked(qkv: QuantizedKV) -> QuantizedKV:
    """``qkv`` marked as checked: for the library's own constructions, consistent by construction (no cost per
    decode step)."""
    object.__setattr__(qkv, "checked", True)
    return qkv


def _quantize_cpu(k_array, v_array, config: QuantConfig, lengths: np.ndarray, capacity: int) -> dict:
    """The packed arrays of numpy ``k_array``, ``v_array`` (the CPU reference)."""
    tokens = k_array.shape[2]
    valid = np.arange(capacity)[None, :] < lengths[:, None]  # (B, T)
    check_finite(k_array, "k", valid[:, None, :tokens, None])
    check_finite(v_array, "v", valid[:, None, :tokens, None])
    keys = _padded_float32(k_array, capacity, valid)
    values = _padded_float32(v_array, capacity, valid)

    norms = token_norms(keys, config.token_scaling)
    keys = divide_by_norms(rotate(keys, config.rotation), norms)
    if config.rotate_values:
        values = rotate(values, config.rotation)

    scales_dtype = quantizer.scale_dtype(config.scale_dtype)
    arrays = {}
    arrays["k_codes"], arrays["k_scales"], arrays["k_zeros"] = _quantize_keys(keys, valid, config, scales_dtype)
    arrays["v_codes"], arrays["v_scales"], arrays["v_zeros"] = _quantize_values(values, valid, config, scales_dtype)
    if norms is not None:
        arrays["norms"] = np.where(valid[:, None, :], norms, np.float32(0))
    return arrays


def dequantize_kv(qkv: QuantizedKV):
    """``(keys, values)``, each ``(batch, kv_heads, num_tokens, head_dim)``, back in the caller's basis.

    Same dtype and array kind as the quantized inputs; tokens beyond a sequence's length are zero. For tests,
    debugging and evaluation: attention never needs this (see :func:`oscar_cupy.decode_attention`).
    """
    if not isinstance(qkv, QuantizedKV):
        raise TypeError(f"qkv must be a QuantizedKV (from quantize_kv), got {type(qkv).__name__}")
    qkv.check()
    if on_gpu(qkv.k_codes):
        from oscar_cupy import cuda_backend

        with cuda_backend.launch_context(qkv.k_codes.device.id, torch_stream=qkv.kind is Kind.TORCH):
            keys, values = cuda_backend.dequantize(qkv, qkv.dtype)
        return qkv.kind.wrap(keys), qkv.kind.wrap(values)
    keys, values = dequantized_rotated(qkv)
    if qkv.norms is not None:
        keys = keys * qkv.norms[..., None]
    keys = unrotate(keys, qkv.config.rotation)
    if qkv.config.rotate_values:
        values = unrotate(values, qkv.config.rotation)
    valid = (np.arange(qkv.capacity)[None, :] < qkv.lengths[:, None])[:, None, :, None]
    keys = np.where(valid, keys, np.float32(0))[:, :, : qkv.num_tokens]
    values = np.where(valid, values, np.float32(0))[:, :, : qkv.num_tokens]
    return qkv.kind.wrap(keys.astype(qkv.dtype)), qkv.kind.wrap(values.astype(qkv.dtype))


def dequantized_rotated(qkv: QuantizedKV):
    """float32 ``(keys, values)`` ``(B, Hk, capacity, D)`` as stored: keys rotated and divided by their norms, values
    rotated when the config says so. Padding tokens hold whatever code 0 decodes to."""
    config = qkv.config
    keys = cpu_kernels.dequantize_keys(qkv.k_codes, qkv.k_scales, qkv.k_zeros, config.bits, config.key_group)
    values = cpu_kernels.dequantize_values(qkv.v_codes, qkv.v_scales, qkv.v_zeros, config.bits, config.value_group)
    return keys, values


def _padded_float32(array: np.ndarray, capacity: int, valid: np.ndarray) -> np.ndarray:
    """A new float32 ``(B, H, capacity, D)`` copy of ``array`` with zeros at the padding tokens."""
    batch, heads, tokens, head_dim = array.shape
    padded = np.zeros((batch, heads, capacity, head_dim), dtype=np.float32)
    padded[:, :, :tokens] = as_float32(array)
    padded[~np.broadcast_to(valid[:, None, :], padded.shape[:3])] = 0
    return padded


def _quantize_keys(keys: np.ndarray, valid: np.ndarray, config: QuantConfig, dtype: np.dtype):
    batch, kv_heads, capacity, head_dim = keys.shape
    groups = capacity // config.key_group
    grouped = keys.reshape(batch, kv_heads, groups, config.key_group, head_dim)
    valid_grouped = valid.reshape(batch, 1, groups, config.key_group, 1)
    minimum = grouped.min(axis=3, where=valid_grouped, initial=np.inf)
    maximum = grouped.max(axis=3, where=valid_grouped, initial=-np.inf)
    group_valid = np.broadcast_to(valid_grouped.any(axis=3), minimum.shape)
    for extreme in (minimum, maximum):
        quantizer.check_range(np.where(group_valid, extreme, 0), dtype, "k", " after rotation and token scaling")
    scales, zeros = quantizer.group_params(minimum, maximum, config.bits, dtype, group_valid)
    quantizer.check_span(maximum, zeros, group_valid, "k", " after rotation and token scaling")
    codes = cpu_kernels.encode_keys(keys, scales, zeros, valid, config.bits, config.key_group)
    return codes, scales, zeros


def _quantize_values(values: np.ndarray, valid: np.ndarray, config: QuantConfig, dtype: np.dtype):
    batch, kv_heads, capacity, head_dim = values.shape
    grouped = values.reshape(batch, kv_heads, capacity, head_dim // config.value_group, config.value_group)
    minimum, maximum = grouped.min(axis=-1), grouped.max(axis=-1)
    group_valid = np.broadcast_to(valid[:, None, :, None], minimum.shape)
    for extreme in (minimum, maximum):
        quantizer.check_range(np.where(group_valid, extreme, 0), dtype, "v", " after rotation")
    scales, zeros = quantizer.group_params(minimum, maximum, config.bits, dtype, group_valid)
    quantizer.check_span(maximum, zeros, group_valid, "v", " after rotation")
    codes = cpu_kernels.encode_values(values, scales, zeros, valid, config.bits, config.value_group)
    return codes, scales, zeros
