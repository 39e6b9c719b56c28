"""The CUDA decode attention over a packed cache and a full-precision window (``raw_kernels/decode.cu``).

One launch of ``decode_attention`` per call: split-KV, window blocks each read window splits of 32 tokens, and packed
blocks share the packed steps of all (sequence, KV head, row block) units evenly, stream-K, each writing a partial
result per unit it touches (unnormalized outputs for up to 16 query rows of one KV head with their log-sum-exp
statistics) and counting it in the unit's counter of the workspace; the last blocks of the grid, one per unit (or one
per row of each unit where they fit on the GPU beside the others), wait for their unit's count, merge its partial
results exactly, rotate the packed part back, add the window part and write the outputs. Nothing dequantized is ever
written to memory.

:class:`DecodePlan` is the plan/run split: a plan fixes the shapes, chooses the packed block count from the GPU's
resident blocks and the longest sequence (:func:`oscar_cupy.decode_launch.packed_blocks`), and owns a reusable
workspace and output, so :meth:`DecodePlan.run` allocates nothing, never synchronizes with the host and can be
captured in a CUDA graph. Sequences longer than the plan's ``max_packed`` are still read whole (each unit's last
segment runs to its sequence's end), only less evenly spread.

Precision: keys and values enter the tensor cores as exact integer codes; the query times the key scales, and the
probabilities times the value scales, are rounded to float16 (bfloat16 when the scales are bfloat16 or float32);
the window's keys and values enter as they are, the query as a high and a low half in the window's dtype, the window's
probabilities rounded to that dtype (as in FlashAttention); products accumulate and the softmax runs in float32.
Non-finite queries or window entries are not checked on the GPU (that would cost a host synchronization per step):
they give NaN outputs, never a crash.
"""

from __future__ import annotations

import functools
import math

import cupy
import numpy as np

from oscar_cupy import decode_launch, kernels, layout
from oscar_cupy.config import QuantConfig
from oscar_cupy.cuda_backend import dtype_name, hadamard_normalization
from oscar_cupy.decode_launch import THREADS, WINDOW_SPLIT

FUNC_SHARED_SIZE_BYTES, FUNC_NUM_REGS = 1, 4  # CUfunction_attribute


class DecodePlan:
    """Launch shape, kernels, workspace and outputs of decode attention for fixed shapes.

    Args:
        config: the packed cache's :class:`QuantConfig` (rotation ``"hadamard"`` or ``"none"``).
        batch, q_heads, kv_heads, q_len, head_dim: the shapes; ``q_heads`` a multiple of ``kv_heads``.
        dtype: ``float16`` or ``bfloat16``, the dtype of the queries, the window and the output.
        max_packed: packed tokens of the longest sequence the plan is sized for.
        max_window: window tokens of the longest window the plan is sized for (0: no window).
        device_id: the CUDA device (default: the current one).
        scale: softmax scale (default ``1 / sqrt(head_dim)``).

    The runs of one plan share its workspace: issue them on one stream (or order them), as a CUDA graph does.
    """

    def __init__(self, config: QuantConfig, *, batch: int, q_heads: int, kv_heads: int, q_len: int, head_dim: int,
                 dtype, max_packed: int, max_window: int = 0, device_id: int | None = None, scale=None):
        if isinstance(config.rotation, np.ndarray):
            raise NotImplementedError(
                "decode attention on the GPU supports rotation='hadamard' or 'none'; a user rotation matrix runs on "
                "the CPU reference only"
            )
        config.check_head_dim(head_dim)
        name = dtype_name(dtype)
        if name not in kernels.DECODE_DTYPES:
            raise TypeError(f"q has dtype {np.dtype(dtype)}; decode attention on the GPU takes float16 or bfloat16")
        if q_heads % kv_heads:
            raise ValueError(f"q has {q_heads} heads, not a multiple of the cache's {kv_heads} KV heads")
        self.config, self.dtype = config, np.dtype(dtype)
        self.max_packed, self.max_window = max_packed, max_window
        self.batch, self.q_heads, self.kv_heads, self.q_len, self.head_dim = batch, q_heads, kv_heads, q_len, head_dim
        self.row_tiles = decode_launch.row_tiles(q_heads // kv_heads * q_len)
        self.device_id = cupy.cuda.Device().id if device_id is None else device_id
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {scale}")
        rotate = isinstance(config.rotation, str) and config.rotation == "hadamard"
        # the kernel's rotate, unrotate, hadamard_normalization and scale_log2 arguments
        self.rotation_args = (np.int32(rotate), np.int32(rotate and config.rotate_values),
                              hadamard_normalization(head_dim), np.float32(self.scale * math.log2(math.e)))

        variant = kernels.decode_variant(head_dim, config.bits, name, config.scale_dtype, config.value_group,
                                         self.row_tiles)
        self.shared_bytes = kernels.decode_shared_bytes(head_dim, config.bits, config.scale_dtype, config.value_group,
                                                        self.row_tiles)
        with cupy.cuda.Device(self.device_id):
            self._kernel = kernels.function(variant, "decode_attention", self.device_id)
            static_shared = cupy.cuda.driver.funcGetAttribute(FUNC_SHARED_SIZE_BYTES, self._kernel.ptr)
            allowed = cupy.cuda.Device(self.device_id).attributes["MaxSharedMemoryPerBlockOptin"]
            if self.shared_bytes + static_shared > allowed:
                raise ValueError(
                    f"decode attention at head_dim {head_dim} with {config.bits}-bit codes, {config.scale_dtype} "
                    f"scales and value groups of {config.value_group} needs {self.shared_bytes + static_shared} bytes "
                    f"of shared memory per block; this GPU allows {allowed}")
            cupy.cuda.driver.funcSetAttribute(
                self._kernel.ptr, cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.shared_bytes
            )
            slots, sms = _resident_blocks(self._kernel.ptr, self.shared_bytes, self.device_id)
        launch = decode_launch.geometry(batch, q_heads, kv_heads, q_len, max_packed, max_window, slots, sms)
        # the launch's shape as the plan's attributes (kernel_args reads them; tests force some of them)
        self.rows, self.row_blocks, self.units, self.unit_steps = (launch.rows, launch.row_blocks, launch.units,
                                                                   launch.unit_steps)
        self.window_splits, self.window_blocks, self.packed_blocks = (launch.window_splits, launch.window_blocks,
                                                                      launch.packed_blocks)
        self.late_blocks, self.late_steps, self.merge_rows = launch.late_blocks, launch.late_steps, launch.merge_rows
        with cupy.cuda.Device(self.device_id):
            partial_rows = launch.partial_rows
            self.partial_o = cupy.empty((partial_rows, head_dim), dtype=cupy.float32)
            self.partial_ml = cupy.empty((partial_rows, 2), dtype=cupy.float32)
            self.unit_counts = cupy.zeros(self.units, dtype=cupy.int32)  # zero between launches (decode.cu)
            self.out = cupy.empty((batch, q_heads, q_len, head_dim), dtype=self.dtype)
            self.lse = cupy.empty((batch, q_heads, q_len), dtype=cupy.float32)

    @property
    def merge_blocks(self) -> int:
        """Merge blocks of a launch: one per unit, or one per row of each unit (``merge_rows`` 1, decode.cu)."""
        return self.units * (min(8 * self.row_tiles, self.rows) if self.merge_rows == 1 else 1)

    def run(self, q, packed: dict, packed_lengths, window_k=None, window_v=None, window_lengths=None, out=None):
        """Attention of ``q`` over the packed tokens and the window; returns ``(out, lse)``.

        Args:
            q: cupy ``(batch, q_heads, q_len, head_dim)`` of the plan's dtype, any strides with contiguous channels.
            packed: the packed arrays (``k_codes`` ... ``norms``; :func:`oscar_cupy.layout.array_specs`), whole or
                sliced along tokens from a larger storage (as :meth:`oscar_cupy.LayerCache.packed` hands them out).
            packed_lengths: cupy int64 ``(batch,)``, packed tokens per sequence.
            window_k, window_v: cupy ``(batch, kv_heads, window, head_dim)`` of the plan's dtype, or ``None``.
            window_lengths: cupy int64 ``(batch,)``, valid window tokens per sequence (with a window).
            out: a contiguous cupy ``(batch, q_heads, q_len, head_dim)`` array of the plan's dtype to write the output
                into (default: the plan's own ``out``, overwritten by the next run).

        ``lse`` is the plan's float32 ``(batch, q_heads, q_len)`` (natural log), overwritten by the next run.
        """
        out = self.out if out is None else out
        arrays, capacity = _storage(packed, self.config, self.head_dim)
        q, q_strides = _row_strides(q)
        window = None
        if window_k is not None:
            window_k, k_strides = _row_strides(window_k)
            window_v, v_strides = _row_strides(window_v)
            window = (window_k, k_strides, window_v, v_strides, window_lengths)
        self._kernel((self.packed_blocks + self.window_blocks + self.merge_blocks,), (THREADS,),
                     decode_launch.kernel_args(self, q, q_strides, arrays, capacity, packed_lengths, window, out),
                     shared_mem=self.shared_bytes)
        return out, self.lse


class PlanCache:
    """The plans of one cache's decode steps, reused from step to step: a plan is made again only when the query shape,
    dtype or scale changes, when the longest packed sequence changes (once per flush block) or when the window needs
    another split (``WINDOW_SPLIT`` tokens each). A decode step therefore allocates and queries nothing.

    Args:
        config: the cache's :class:`QuantConfig`.
        kv_heads: the cache's KV heads.
        device_id: the CUDA device of the cache.
    """

    def __init__(self, config: QuantConfig, kv_heads: int, device_id: int):
        self.config, self.kv_heads, self.device_id = config, kv_heads, device_id
        self._plans: dict[tuple, DecodePlan] = {}

    def plan(self, q, max_packed: int, max_window: int, scale) -> DecodePlan:
        """A plan for cupy queries ``q`` ``(batch, q_heads, q_len, head_dim)`` over at most ``max_packed`` packed and
        ``max_window`` window tokens per sequence."""
        window_splits = -(-max_window // WINDOW_SPLIT)
        key = (*q.shape, q.dtype, scale, window_splits)
        plan = self._plans.get(key)
        if plan is None or plan.max_packed != max_packed:
            batch, q_heads, q_len, head_dim = q.shape
            plan = DecodePlan(self.config, batch=batch, q_heads=q_heads, kv_heads=self.kv_heads, q_len=q_len,
                              head_dim=head_dim, dtype=q.dtype, max_packed=max_packed,
                              max_window=window_splits * WINDOW_SPLIT, device_id=self.device_id, scale=scale)
            self._plans[key] = plan
        return plan


@functools.lru_cache(maxsize=None)
def _resident_blocks(function_ptr: int, shared_bytes: int, device_id: int) -> tuple[int, int]:
    """``(slots, SMs)``: blocks of the ``decode_attention`` function at ``function_ptr`` that the whole GPU holds at
    once (registers and shared memory permitting), and its multiprocessors."""
    attributes = cupy.cuda.Device(device_id).attributes
    registers = -(-cupy.cuda.driver.funcGetAttribute(FUNC_NUM_REGS, function_ptr) // 8) * 8 * THREADS
    static_shared = cupy.cuda.driver.funcGetAttribute(FUNC_SHARED_SIZE_BYTES, function_ptr)
    shared = shared_bytes + static_shared + 1024  # the driver reserves 1 KiB per block
    per_sm = min(attributes["MaxRegistersPerMultiprocessor"] // registers,
                 attributes["MaxSharedMemoryPerMultiprocessor"] // shared,
                 attributes["MaxThreadsPerMultiProcessor"] // THREADS)
    sms = attributes["MultiProcessorCount"]
    return max(1, per_sm) * sms, sms


def _row_strides(x):
    """``(x, element strides of its first three axes)``; a contiguous copy when the rows are not contiguous or not
    aligned to 16 bytes."""
    aligned = x.data.ptr % 16 == 0 and all(stride % 16 == 0 for stride in x.strides[:3])
    if x.strides[3] != x.itemsize or not aligned:
        x = cupy.ascontiguousarray(x)
    return x, [np.int64(stride // x.itemsize) for stride in x.strides[:3]]


def _storage(packed: dict, config: QuantConfig, head_dim: int):
    """``(arrays, capacity)``: the packed arrays as laid out in a storage of ``capacity`` tokens (the kernels address
    ``(sequence, head, token)`` through it); arrays laid out otherwise are copied."""
    codes = packed["k_codes"]
    batch, heads = codes.shape[:2]
    capacity = codes.strides[1] // codes.strides[2] if codes.shape[2] else 0
    if capacity and capacity % config.key_group == 0:
        specs = layout.array_specs(config, batch, heads, capacity, head_dim)
        if all(array.dtype == specs[name][1] and array.strides == _contiguous_strides(specs[name][0], array.itemsize)
               for name, array in packed.items() if array is not None):
            return {name: array for name, array in packed.items() if array is not None}, capacity
    arrays = {name: cupy.ascontiguousarray(array) for name, array in packed.items() if array is not None}
    return arrays, codes.shape[2]


def _contiguous_strides(shape, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def decode_attention(q, qkv, window, scale):
    """cupy ``(out, lse)`` of :func:`oscar_cupy.decode_attention` for cupy arguments (checked by the caller).

    ``window`` is ``(window_k, window_v, lengths)`` with host int64 lengths, or ``None``.
    """
    batch, q_heads, q_len, head_dim = q.shape
    max_window = 0 if window is None else int(window[2].max(initial=0))
    plan = DecodePlan(qkv.config, batch=batch, q_heads=q_heads, kv_heads=qkv.kv_heads, q_len=q_len,
                      head_dim=head_dim, dtype=q.dtype, max_packed=int(qkv.lengths.max(initial=0)),
                      max_window=max_window, device_id=q.device.id, scale=scale)
    packed_lengths = cupy.asarray(qkv.lengths, dtype=cupy.int64)
    if window is None:
        return plan.run(q, qkv.arrays(), packed_lengths)
    window_k, window_v, lengths = window
    return plan.run(q, qkv.arrays(), packed_lengths, window_k, window_v, cupy.asarray(lengths, dtype=cupy.int64))
