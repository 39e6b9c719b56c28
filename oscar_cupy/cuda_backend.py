"""The CUDA backend of the write path: launches the kernels of ``raw_kernels/`` on cupy arrays.

Every launch goes to the device that holds the inputs and onto the current stream of that device (for torch tensors,
torch's current stream: see :func:`launch_context`); the value kernel of a quantization runs on a second stream beside
the key kernel, forked from and joined back into the current one (:func:`launch_quantize`). Results equal the CPU
reference's bit for bit (see ``raw_kernels/common.cuh``), except token norms, whose float64 sums may round differently
once in ~1e15 cases, and user-given rotation matrices, applied with a float64 matrix product whose summation order
differs from numpy's.
"""

from __future__ import annotations

import contextlib
import functools

import cupy
import numpy as np

from oscar_cupy import kernels, layout
from oscar_cupy.config import QuantConfig
from oscar_cupy.quantize_launch import (
    dequantize_keys_args,
    dequantize_launch,
    dequantize_values_args,
    hadamard_launch,
    hadamard_normalization,
    quantize_keys_args,
    quantize_keys_launch,
    quantize_values_args,
    quantize_values_launch,
    uses_hadamard,
    window_append_launch,
)
from oscar_cupy.scaling import NORM_OVERFLOW

STATIC_SHARED_LIMIT = 48 * 1024  # dynamic shared memory beyond this needs the function attribute raised
DTYPE_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}


@contextlib.contextmanager
def launch_context(device_id: int, torch_stream: bool):
    """Make ``device_id`` current and, for torch callers, torch's current stream on it cupy's current stream."""
    with cupy.cuda.Device(device_id):
        if not torch_stream:
            yield
            return
        import torch

        stream = torch.cuda.current_stream(device_id)
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14: the CUDA stream protocol
            external = cupy.cuda.Stream.from_external(stream)
        else:
            external = cupy.cuda.ExternalStream(stream.cuda_stream, device_id)
        with external:
            yield


def dtype_name(dtype) -> str:
    """Kernel dtype name of an array dtype (bfloat16 is ``ml_dtypes.bfloat16``, as in numpy)."""
    dtype = np.dtype(dtype)
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    if dtype.name == "bfloat16":
        return "bfloat16"
    raise TypeError(f"dtype {dtype} has no CUDA kernels")


def _rows_view(x):
    """``(x, element strides of its first three axes)``, or a contiguous copy of ``x`` when its rows are not contiguous
    or not aligned to the kernels' 16-byte loads."""
    aligned = x.data.ptr % 16 == 0 and all(stride % 16 == 0 for stride in x.strides[:3])
    if x.strides[3] != x.itemsize or not aligned:
        x = cupy.ascontiguousarray(x)
    return x, [np.int64(stride // x.itemsize) for stride in x.strides[:3]]


def _times_matrix(x, matrix):
    """float32 ``x @ matrix`` (a float64 product rounded once, as the CPU's ``rotate`` and ``unrotate``)."""
    return (x.astype(cupy.float64) @ cupy.asarray(matrix)).astype(cupy.float32)


def allocate(config: QuantConfig, batch: int, kv_heads: int, capacity: int, head_dim: int) -> dict:
    """Uninitialized device arrays of the packed layout (:func:`oscar_cupy.layout.array_specs`)."""
    specs = layout.array_specs(config, batch, kv_heads, capacity, head_dim)
    return {name: cupy.empty(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}


def quantize_into(k, v, config: QuantConfig, lengths: np.ndarray, out: dict) -> None:
    """Quantize cupy ``k``, ``v`` ``(B, Hk, T, D)`` into the device arrays ``out`` (from :func:`allocate`).

    Raises ``ValueError`` naming ``k`` or ``v`` when a valid element is NaN or Inf, or when a group exceeds the range
    of the scale dtype (the CPU reference's policy); checking costs one host synchronization.
    """
    raise_refusals(launch_quantize(k, v, config, cupy.asarray(lengths, dtype=cupy.int64), out), config)


def launch_quantize(k, v, config: QuantConfig, lengths, out: dict):
    """Enqueue the quantization of ``k``, ``v`` into ``out`` (``lengths``: int64 device array) on the current stream,
    without synchronizing; returns the device flags that :func:`raise_refusals` reads."""
    refused = cupy.zeros(1, dtype=cupy.int32)
    if out["k_codes"].shape[2]:
        if isinstance(config.rotation, np.ndarray):
            k = _times_matrix(k, config.rotation.T)  # R @ x for each row x
            v = _times_matrix(v, config.rotation.T) if config.rotate_values else v
        # both kernels are bound by instruction issue and latency: the value blocks fill the SMs beside the key blocks
        # (H100: 3-10% faster than one after the other, bench/results/quantize_profile.md); the current stream waits
        # for both, so what follows on it (and a CUDA graph being captured) sees one step
        current, beside = cupy.cuda.get_current_stream(), _side_stream(k.device.id)
        fork = cupy.cuda.Event(disable_timing=True)
        fork.record(current)
        beside.wait_event(fork)
        launch_quantize_keys(k, config, lengths, out, refused)
        with beside:
            launch_quantize_values(v, config, lengths, out, refused)
        join = cupy.cuda.Event(disable_timing=True)
        join.record(beside)
        current.wait_event(join)
    return refused


_side_streams: dict = {}


def _side_stream(device_id: int):
    """The second stream of device ``device_id`` that :func:`launch_quantize` runs the value kernel on."""
    stream = _side_streams.get(device_id)
    if stream is None:
        with cupy.cuda.Device(device_id):
            stream = _side_streams.setdefault(device_id, cupy.cuda.Stream(non_blocking=True))
    return stream


def launch_quantize_keys(k, config: QuantConfig, lengths, out: dict, refused) -> None:
    """Enqueue ``quantize_keys`` (k already rotated by a user matrix, if the config has one)."""
    batch, heads, _, head_dim = k.shape
    k, strides = _rows_view(k)
    function = kernels.function(
        kernels.quantize_variant(head_dim, config.bits, dtype_name(k.dtype), config.scale_dtype), "quantize_keys",
        k.device.id,
    )
    launch = quantize_keys_launch(batch, heads, head_dim, out["k_codes"].shape[2] // config.key_group, config,
                                  k.itemsize, _max_shared_bytes(k.device.id))
    if launch.shared_bytes > STATIC_SHARED_LIMIT:
        cupy.cuda.driver.funcSetAttribute(
            function.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, launch.shared_bytes
        )
    function(launch.grid, launch.block, quantize_keys_args(k, strides, lengths, config, launch, out, refused),
             shared_mem=launch.shared_bytes)


@functools.lru_cache(maxsize=None)
def _max_shared_bytes(device_id: int) -> int:
    """The most dynamic shared memory a block of device ``device_id`` may opt in to."""
    return cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"]


def launch_quantize_values(v, config: QuantConfig, lengths, out: dict, refused) -> None:
    """Enqueue ``quantize_values`` (v already rotated by a user matrix, if the config has one)."""
    batch, heads, _, head_dim = v.shape
    v, strides = _rows_view(v)
    function = kernels.function(
        kernels.quantize_variant(head_dim, config.bits, dtype_name(v.dtype), config.scale_dtype), "quantize_values",
        v.device.id,
    )
    grid, block = quantize_values_launch(batch, heads, head_dim, out["v_scales"].shape[2], config)
    function(grid, block, quantize_values_args(v, strides, lengths, config, out, refused))


def raise_refusals(refused, config: QuantConfig) -> None:
    """Raise what the kernels refused (flags from :func:`launch_quantize`); synchronizes with the device."""
    flags = int(refused.get()[0])
    for bit, name in ((1, "k"), (2, "v")):
        if flags & bit:
            raise ValueError(f"{name} contains NaN or Inf; non-finite keys, values and queries are refused")
    if flags & 16:
        raise ValueError(NORM_OVERFLOW)
    for bit, name, after in ((4, "k", " after rotation and token scaling"), (8, "v", " after rotation")):
        if flags & bit:
            raise ValueError(
                f"{name} holds values beyond the range of scale_dtype {config.scale_dtype}{after}; "
                "use QuantConfig(scale_dtype='bfloat16') or 'float32'"
            )
    for bit, name, after in ((32, "k", " after rotation and token scaling"), (64, "v", " after rotation")):
        if flags & bit:
            raise ValueError(f"{name} holds a group spanning more than float32's range{after}: "
                             "its codes would overflow")


def dequantize(qkv, dtype):
    """cupy ``(keys, values)`` ``(B, Hk, num_tokens, D)`` of ``dtype`` in the caller's basis (``dequantize_kv``)."""
    config = qkv.config
    batch, heads, head_dim = qkv.batch, qkv.kv_heads, qkv.head_dim
    tokens = qkv.num_tokens
    matrix = config.rotation if isinstance(config.rotation, np.ndarray) else None
    kernel_dtype = "float32" if matrix is not None else dtype_name(dtype)
    variant = kernels.dequantize_variant(head_dim, config.bits, kernel_dtype, config.scale_dtype)
    device_id = qkv.k_codes.device.id
    lengths = cupy.asarray(qkv.lengths, dtype=cupy.int64)
    grid, block = dequantize_launch(batch, heads, tokens)
    out_dtype = np.float32 if matrix is not None else dtype
    keys = cupy.empty((batch, heads, tokens, head_dim), dtype=out_dtype)
    values = cupy.empty((batch, heads, tokens, head_dim), dtype=out_dtype)
    if tokens:
        rotate = uses_hadamard(config)
        kernels.function(variant, "dequantize_keys", device_id)(
            grid, block, dequantize_keys_args(qkv, lengths, rotate, keys))
        kernels.function(variant, "dequantize_values", device_id)(
            grid, block, dequantize_values_args(qkv, lengths, rotate and config.rotate_values, values))
    if matrix is not None:
        keys = _times_matrix(keys, matrix)  # R^T @ x for each row x
        if config.rotate_values:
            values = _times_matrix(values, matrix)
        return keys.astype(dtype), values.astype(dtype)
    return keys, values


def hadamard_last_axis(x, out=None):
    """The Hadamard transform of contiguous cupy ``x`` along its last axis, into ``out`` (a contiguous array like ``x``;
    default a new one), which it returns. With ``out`` given it allocates nothing (CUDA-graph capturable)."""
    size = x.shape[-1]
    rows = x.size // size if size else 0
    out = cupy.empty_like(x) if out is None else out
    if rows:
        function = kernels.function(kernels.rotate_variant(size, dtype_name(x.dtype)), "hadamard_rows", x.device.id)
        grid, block = hadamard_launch(rows, size)
        function(grid, block, (x, out, np.int64(rows), hadamard_normalization(size)))
    return out


def append_window(k, v, window_k, window_v, window_lengths) -> None:
    """Enqueue ``window_append``: ``k``, ``v`` ``(batch, heads, count, head_dim)`` (channels contiguous, the windows'
    dtype) written after the first ``window_lengths[b]`` tokens of each sequence of the contiguous window buffers
    ``(batch, heads, capacity, head_dim)``; ``window_lengths`` is a cupy int64 ``(batch,)`` read on the device."""
    k, v = (x if x.strides[3] == x.itemsize else cupy.ascontiguousarray(x) for x in (k, v))
    function = kernels.function(kernels.window_variant(dtype_name(window_k.dtype)), "window_append",
                                window_k.device.id)
    grid, block, args = window_append_launch(k, v, window_k, window_v, window_lengths)
    function(grid, block, args)
