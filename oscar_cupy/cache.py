"""The quantized KV cache of one attention layer: packed flush blocks plus a full-precision window.

The method's cache policy: prefill attends in full precision and then packs each sequence's whole flush blocks of
``config.window`` tokens, keeping the rest in the window; each decode step appends to the window and attends over both
parts; after the step's attention, :meth:`LayerCache.flush` packs every window that is full. Sequences of one batch
keep their own lengths: sequence ``b`` holds ``packed_lengths[b]`` packed tokens (always whole flush blocks, so key
groups stay aligned) followed by ``window_lengths[b]`` window tokens.

Storage grows by doubling (amortized O(1) per token): the packed arrays of :mod:`oscar_cupy.layout` are allocated for a
token capacity and copied once when a flush needs more. Packing a block on its own gives the same bytes as packing all
tokens at once (groups never straddle blocks), so the cache stores exactly what :func:`oscar_cupy.quantize_kv` of the
sequence's packed tokens would.
"""

from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np

from oscar_cupy import layout
from oscar_cupy.arrays import (
    FLOAT_DTYPES,
    Kind,
    accept,
    check_finite,
    check_float,
    check_lengths,
    check_rank,
    device_of,
    kind_of,
    on_gpu,
    same_kind,
)
from oscar_cupy.attention import decode_attention
from oscar_cupy.config import QuantConfig
from oscar_cupy.quantized_kv import KV_AXES, QuantizedKV, checked, quantize_kv


WINDOW_GROWTH = 64  # the window buffers hold one window (all decode steps need) and grow by this many tokens for chunks


class LayerCache:
    """One layer's cache for ``batch`` sequences of ``kv_heads`` heads of ``head_dim`` channels.

    Args:
        config: the :class:`QuantConfig` (its ``window`` is the window size and the flush block).
        batch, kv_heads, head_dim: the shape of the layer's keys and values.
        dtype: dtype of the full-precision window (the model's dtype).
        like: an array whose kind and device the storage follows (numpy for the CPU, cupy for a GPU); default numpy.
        capacity: tokens per sequence to allocate the packed storage for up front: its whole flush blocks (the tokens
            beyond the last whole block of a sequence of ``capacity`` tokens stay in the window and need no packed room).

    On a GPU, a decode step (:meth:`append`, :meth:`attend`) copies nothing from the host and allocates only its output:
    plans are kept from step to step and the lengths live on the device too. With ``capturable`` set, :meth:`attend`
    returns the plan's own output (overwritten by the next call) and sizes plans for the whole window buffer, so a
    step allocates nothing and can be captured in a CUDA graph (:class:`oscar_cupy.adapters.hf.CudaGraphDecoder`).
    """

    def __init__(self, config: QuantConfig, batch: int, kv_heads: int, head_dim: int, dtype, like=None,
                 capacity: int = 0):
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
        config.check_head_dim(head_dim)
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (name != "capacity"):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'capacity' else 'positive'} integer, "
                                 f"got {value!r}")
        self.config = config
        self.batch, self.kv_heads, self.head_dim = int(batch), int(kv_heads), head_dim
        self._xp, self._device_id = _storage_of(like)
        self.dtype = _window_dtype(dtype)
        self.packed_lengths = np.zeros(batch, dtype=np.int64)
        self.window_lengths = np.zeros(batch, dtype=np.int64)
        window_shape = (batch, kv_heads, config.window, head_dim)  # grown for appends of more than one token at a time
        with self._stream(Kind.CUPY):
            self._window_k = self._xp.zeros(window_shape, dtype=self.dtype)
            self._window_v = self._xp.zeros(window_shape, dtype=self.dtype)
            self._packed = self._allocate(capacity // config.window * config.window)
        self.reallocations = 0
        # GPU only: the lengths as the device holds them (int64 (2, batch): packed, window), the host copy of what was
        # last written there, and the decode plans; a decode step then neither allocates nor waits for the host
        self._device_lengths = None
        self._device_lengths_host = None
        self._plans = None
        self.capturable = False  # GPU: see the class docstring

    # -- sizes --------------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Packed capacity in tokens (whole flush blocks)."""
        return self._packed["k_codes"].shape[2]

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(batch,)``: tokens held per sequence, packed and in the window."""
        return self.packed_lengths + self.window_lengths

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the packed arrays at their capacity and the window buffers."""
        return sum(a.nbytes for a in self._packed.values()) + self._window_k.nbytes + self._window_v.nbytes

    def stored_nbytes(self) -> int:
        """Bytes that the tokens held occupy: packed tokens at the layout's bytes per token, window tokens at the
        window dtype's."""
        per_token = self.packed_bytes_per_token()
        window_bytes = 2 * self.kv_heads * self.head_dim * self.dtype.itemsize
        return int(self.packed_lengths.sum()) * per_token + int(self.window_lengths.sum()) * window_bytes

    def packed_bytes_per_token(self) -> int:
        """Bytes of one packed token of one sequence (codes, scales, zeros and norm, all heads)."""
        block = layout.array_specs(self.config, 1, self.kv_heads, self.config.window, self.head_dim)
        total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in block.values())
        return total // self.config.window

    def bf16_nbytes(self) -> int:
        """Bytes the same tokens would take in a bf16 cache."""
        return int(self.lengths.sum()) * 2 * self.kv_heads * self.head_dim * 2

    # -- writing ------------------------------------------------------------------------------------------------

    def prefill(self, k, v, lengths=None) -> None:
        """Store a prompt: ``k``, ``v`` ``(batch, kv_heads, tokens, head_dim)``, the first ``lengths[b]`` tokens of
        sequence ``b`` valid (default all). Whole flush blocks are packed, the rest goes to the window. The cache must
        be empty (see :meth:`reset`); attend over the prompt in full precision before or after, as the model does.
        Non-finite valid tokens are refused (``ValueError``): on the CPU here, on a GPU when they are packed (no host
        synchronization for the window's tokens), as in :meth:`append`."""
        if self.lengths.any():
            raise ValueError("prefill needs an empty cache; call reset() first, or append() to add tokens")
        with self._stream_for(k):
            k_array, v_array = self._accept_kv(k, v)
            tokens = k_array.shape[2]
            lengths = check_lengths(lengths, "lengths", self.batch, tokens)
            if not on_gpu(k_array):
                valid = (np.arange(tokens)[None, :] < lengths[:, None])[:, None, :, None]
                check_finite(k_array, "k", valid)
                check_finite(v_array, "v", valid)
            packed = lengths // self.config.window * self.config.window
            if packed.any():
                self._reserve(int(packed.max()))
                prompt = quantize_kv(k_array[:, :, : packed.max()], v_array[:, :, : packed.max()], self.config,
                                     lengths=packed)
                self._write_packed(prompt, np.arange(self.batch), np.zeros_like(packed))
            self.packed_lengths = packed
            for b in range(self.batch):
                rest = int(lengths[b] - packed[b])
                self._window_k[b, :, :rest] = k_array[b, :, packed[b] : lengths[b]]
                self._window_v[b, :, :rest] = v_array[b, :, packed[b] : lengths[b]]
            self.window_lengths = lengths - packed

    def append(self, k, v) -> None:
        """Append ``k``, ``v`` ``(batch, kv_heads, n, head_dim)`` (n <= window tokens) after each sequence's tokens.

        A window that is full is packed first (normally :meth:`flush` did that after the previous step's attention).
        Non-finite tokens are refused (``ValueError``): on the CPU here, on a GPU when their block is packed.
        """
        with self._stream_for(k):
            k_array, v_array = self._accept_kv(k, v)
            if not on_gpu(k_array):
                check_finite(k_array, "k")
                check_finite(v_array, "v")
            count = k_array.shape[2]
            if count > self.config.window:
                raise ValueError(f"append takes at most window={self.config.window} tokens at a time, got {count}")
            if (self.window_lengths + count > 2 * self.config.window).any():
                self.flush()
            self._reserve_window(int((self.window_lengths + count).max()))
            if self._xp is np:  # each sequence at its own window position: (B, count, Hk, D)
                slots = self.window_lengths[:, None] + np.arange(count)[None, :]
                self._window_k[np.arange(self.batch)[:, None], :, slots] = k_array.swapaxes(1, 2)
                self._window_v[np.arange(self.batch)[:, None], :, slots] = v_array.swapaxes(1, 2)
            else:  # positions read on the device, lengths advanced there: no copy from the host, capturable
                from oscar_cupy import cuda_backend

                for array, name in ((k_array, "k"), (v_array, "v")):
                    if array.dtype != self.dtype:
                        raise TypeError(f"{name} has dtype {array.dtype} but the cache's window holds {self.dtype}")
                lengths = self._lengths_on_device()
                cuda_backend.append_window(k_array, v_array, self._window_k, self._window_v, lengths[1])
                lengths[1] += count
            self.advance_window(count)

    def advance_window(self, count: int) -> None:
        """Count ``count`` more window tokens per sequence: what :meth:`append` does after writing them, and all a
        replayed CUDA graph of a decode step leaves to the host (the device's copy of the lengths advanced in it)."""
        self.window_lengths = self.window_lengths + count
        if self._device_lengths_host is not None:
            self._device_lengths_host[1] += count  # the device's copy was advanced by the same count

    def flush(self, keep: int = 0) -> None:
        """Pack the oldest ``window`` tokens of every sequence whose window holds at least ``window + keep``: the
        ``keep`` newest tokens stay in full precision (a speculative step's candidates, which a crop may remove)."""
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 0:
            raise ValueError(f"keep must be a non-negative integer, got {keep!r}")
        window = self.config.window
        full = np.flatnonzero(self.window_lengths >= window + keep)
        if not full.size:
            return
        self._reserve(int(self.packed_lengths[full].max()) + window)
        block = quantize_kv(self._window_k[full, :, :window], self._window_v[full, :, :window], self.config)
        self._write_packed(block, full, self.packed_lengths[full])
        for b in full:
            rest = int(self.window_lengths[b] - window)
            self._window_k[b, :, :rest] = self._window_k[b, :, window : window + rest].copy()
            self._window_v[b, :, :rest] = self._window_v[b, :, window : window + rest].copy()
        self.packed_lengths[full] += window
        self.window_lengths[full] -= window

    # -- reading ------------------------------------------------------------------------------------------------

    def packed(self) -> QuantizedKV:
        """The packed part as a :class:`QuantizedKV`: a view of the storage up to the longest sequence's packed tokens
        (no copy; attention reads no unused capacity)."""
        tokens = int(self.packed_lengths.max(initial=0))
        views = {name: array[:, :, : array.shape[2] * tokens // max(self.capacity, 1)]
                 for name, array in self._packed.items()}  # whole flush blocks: exact row counts
        views.setdefault("norms", None)
        packed = QuantizedKV(config=self.config, **views, lengths=self.packed_lengths.copy(), num_tokens=tokens,
                             dtype=self.dtype)
        return checked(packed)

    def attend(self, q, scale=None, return_lse=False):
        """Decode attention of ``q`` ``(batch, q_heads, q_len, head_dim)`` over the packed part and the window
        (:func:`oscar_cupy.decode_attention`): the queries are the last ``q_len`` tokens held, so append them first."""
        window = int(self.window_lengths.max(initial=0))
        with self._stream_for(q):  # torch tensors convert on torch's stream (no cross-stream wait, capturable)
            q_array, kind = accept(q, "q")
            if getattr(q_array, "dtype", None) != self.dtype:
                raise TypeError(f"q has dtype {q_array.dtype} but the cache's window holds {self.dtype}; "
                                "they must match")
            if self._xp is np:
                result = decode_attention(q_array, self.packed(), self._window_k[:, :, :window],
                                          self._window_v[:, :, :window], lengths=self.window_lengths, scale=scale,
                                          return_lse=return_lse)
            else:
                result = self._attend_gpu(q_array, scale)
                result = result if return_lse else result[0]
            return tuple(kind.wrap(r) for r in result) if return_lse else kind.wrap(result)

    def _attend_gpu(self, q, scale):
        """cupy ``(out, lse)`` of the fused kernel for cupy ``q``, through a plan kept from step to step (a new ``out``
        each call, or the plan's own when :attr:`capturable`; ``lse`` is the plan's, overwritten by the next call)."""
        import cupy

        from oscar_cupy import cuda_attention

        check_rank(q, "q", 4, "(batch, q_heads, q_len, head_dim)")
        if (q.shape[0], q.shape[3]) != (self.batch, self.head_dim) or q.shape[1] % self.kv_heads:
            raise ValueError(f"q has shape {tuple(q.shape)}; expected ({self.batch}, a multiple of {self.kv_heads} "
                             f"heads, q_len, {self.head_dim})")
        if q.device.id != self._device_id:
            raise ValueError(f"q is on cuda:{q.device.id} but the cache on cuda:{self._device_id}")
        scale = 1.0 / np.sqrt(self.head_dim) if scale is None else float(scale)
        if self._plans is None:
            self._plans = cuda_attention.PlanCache(self.config, self.kv_heads, self._device_id)
        window = self._window_k.shape[2] if self.capturable else int(self.window_lengths.max(initial=0))
        plan = self._plans.plan(q, int(self.packed_lengths.max(initial=0)), window, scale)
        lengths = self._lengths_on_device()
        out = None if self.capturable else cupy.empty(q.shape, dtype=q.dtype)
        return plan.run(q, self._packed, lengths[0], self._window_k, self._window_v, lengths[1], out=out)

    # -- batch editing ------------------------------------------------------------------------------------------

    def reorder(self, indices) -> None:
        """Keep sequences ``indices`` (beam search's ``reorder_cache``/``batch_select_indices``), in that order."""
        indices = np.asarray(indices)
        if indices.dtype.kind not in "iu" and indices.size:
            raise TypeError(f"indices must hold integers (sequence numbers), got dtype {indices.dtype}")
        indices = indices.astype(np.int64)
        if indices.ndim != 1 or indices.min(initial=0) < 0 or indices.max(initial=0) >= self.batch:
            raise ValueError(f"indices must be a 1-D array of sequence numbers below {self.batch}")
        with self._stream(Kind.CUPY):  # the storage's device, on the current stream
            take = self._xp.asarray(indices)
            self._packed = {name: array[take] for name, array in self._packed.items()}
            self._window_k, self._window_v = self._window_k[take], self._window_v[take]
        self.packed_lengths, self.window_lengths = self.packed_lengths[indices], self.window_lengths[indices]
        self.batch = len(indices)

    def crop(self, length: int) -> None:
        """Drop every token at or after position ``length`` of each sequence. Packed tokens cannot be cropped: a crop
        into the packed part raises ``ValueError``."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"length must be a non-negative integer (tokens to keep), got {length!r}")
        length = int(length)
        if (self.packed_lengths > length).any():
            raise ValueError(
                f"cannot crop to {length} tokens: packed tokens (up to {int(self.packed_lengths.max())}) are "
                "quantized in whole flush blocks and cannot be cut; crop within the full-precision window"
            )
        self.window_lengths = np.minimum(self.window_lengths, np.maximum(length - self.packed_lengths, 0))

    def reset(self) -> None:
        """Forget every token (the storage stays allocated)."""
        self.packed_lengths[:] = 0
        self.window_lengths[:] = 0

    # -- storage ------------------------------------------------------------------------------------------------

    def _stream_for(self, argument):
        """:meth:`_stream` for the kind of ``argument`` (checked later, by :func:`accept`)."""
        try:
            kind = kind_of(argument)
        except TypeError:
            kind = Kind.NUMPY
        return self._stream(kind)

    def _stream(self, kind: Kind):
        """For a GPU cache, its device and the stream to work on: torch's current one for torch callers, else the
        current one."""
        if self._xp is np:
            return contextlib.nullcontext()
        from oscar_cupy import cuda_backend

        return cuda_backend.launch_context(self._device_id, torch_stream=kind is Kind.TORCH)

    def _host_lengths(self) -> np.ndarray:
        return np.stack([self.packed_lengths, self.window_lengths])

    def _lengths_on_device(self):
        """cupy int64 ``(2, batch)``: packed and window lengths, copied to the device only when they changed other than
        by :meth:`append` (prefill, flush, crop, reorder, reset: not every step)."""
        lengths = self._host_lengths()
        if self._device_lengths_host is None or not np.array_equal(lengths, self._device_lengths_host):
            self._device_lengths = self._xp.asarray(lengths)
            self._device_lengths_host = lengths
        return self._device_lengths

    def _accept_kv(self, k, v):
        (k_array, k_kind), (v_array, v_kind) = accept(k, "k"), accept(v, "v")
        same_kind([(k_array, k_kind), (v_array, v_kind)], ["k", "v"])
        for array, name in ((k_array, "k"), (v_array, "v")):
            check_float(array, name)
            if array.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {array.dtype} but the cache's window holds {self.dtype}")
            check_rank(array, name, 4, KV_AXES)
            expected = (self.batch, self.kv_heads, self.head_dim)
            if (array.shape[0], array.shape[1], array.shape[3]) != expected:
                raise ValueError(f"{name} has shape {tuple(array.shape)}; expected "
                                 f"({self.batch}, {self.kv_heads}, tokens, {self.head_dim})")
            if on_gpu(array) != (self._xp is not np) or (on_gpu(array) and array.device.id != self._device_id):
                where = "the CPU" if self._xp is np else f"cuda:{self._device_id}"
                raise ValueError(f"{name} is on {device_of(array)} but the cache's storage on {where}")
        if k_array.shape != v_array.shape:
            raise ValueError(f"k has shape {tuple(k_array.shape)} but v {tuple(v_array.shape)}: they must be equal")
        return k_array, v_array

    def _allocate(self, tokens: int) -> dict:
        specs = layout.array_specs(self.config, self.batch, self.kv_heads, tokens, self.head_dim)
        return {name: self._xp.zeros(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}

    def _reserve_window(self, tokens: int) -> None:
        """Grow the window buffers (by whole :data:`WINDOW_GROWTH` chunks, up to two windows) to hold ``tokens``."""
        if tokens <= self._window_k.shape[2]:
            return
        size = min(2 * self.config.window, _blocks(tokens, WINDOW_GROWTH) * WINDOW_GROWTH)
        for name in ("_window_k", "_window_v"):
            old = getattr(self, name)
            grown = self._xp.zeros((*old.shape[:2], size, old.shape[3]), dtype=old.dtype)
            grown[:, :, : old.shape[2]] = old
            setattr(self, name, grown)

    def _reserve(self, tokens: int) -> None:
        """Grow the packed storage, by doubling, until it holds ``tokens`` tokens per sequence."""
        if tokens <= self.capacity:
            return
        blocks = max(_blocks(tokens, self.config.window), 2 * _blocks(self.capacity, self.config.window))
        grown = self._allocate(blocks * self.config.window)
        for name, array in self._packed.items():
            grown[name][:, :, : array.shape[2]] = array
        self._packed = grown
        self.reallocations += 1

    def _write_packed(self, block: QuantizedKV, sequences: np.ndarray, offsets: np.ndarray) -> None:
        """Copy ``block``'s arrays: its sequence i into sequence ``sequences[i]``, from token ``offsets[i]`` on."""
        for name, array in block.arrays().items():
            rows = self._packed[name].shape[2]  # token rows of this array for the whole capacity
            for i, (b, offset) in enumerate(zip(sequences, offsets)):
                start = int(offset) * rows // self.capacity  # offsets are whole flush blocks: exact
                self._packed[name][b, :, start : start + array.shape[2]] = array[i]


def _blocks(tokens: int, window: int) -> int:
    return -(-tokens // window)


def _window_dtype(dtype) -> np.dtype:
    """The window dtype (float16, bfloat16 or float32; numpy, ml_dtypes or torch dtypes)."""
    torch_names = {"torch.float16": np.float16, "torch.bfloat16": ml_dtypes.bfloat16, "torch.float32": np.float32}
    dtype = torch_names.get(str(dtype), dtype)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}") from None
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return dtype


def _storage_of(like):
    """``(numpy, None)``, or ``(cupy, device id)`` when ``like`` is on a GPU."""
    if like is None:
        return np, None
    array, _ = accept(like, "like")
    if on_gpu(array):
        import cupy

        return cupy, array.device.id
    return np, None

