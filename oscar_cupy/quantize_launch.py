"""How the write path's kernels are launched: the geometry and the arguments of ``quantize_keys`` and
``quantize_values`` (``raw_kernels/quantize.cu``), of their inverses ``dequantize_keys`` and ``dequantize_values``
(``dequantize.cu``), of ``hadamard_rows`` (``rotate.cu``) and of ``window_append`` (``window.cu``), with numpy only.

:mod:`oscar_cupy.cuda_backend` launches them on the GPU with cupy arrays; the tests run the same launches, with numpy
arrays, through a CPU emulation of the kernels (``tests/emulator.py``), so the launches' arithmetic is tested without a
GPU too. ``KEY_LANE_ROWS`` and ``VALUE_LANE_CHANNELS`` (per head_dim) are the lane geometry: the kernels are compiled
for it (:func:`oscar_cupy.kernels.quantize_variant` passes them as ``KEY_LANE_ROWS`` and ``VAL_PER``) and launched for
it here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from oscar_cupy.config import QuantConfig

# key rows of 16 channels a lane of quantize_keys holds, per head_dim: a warp holds 32 // (head_dim // 16) times as
# many rows, at most 32 (the smallest key group); key groups of 128 take 128 / that many warps, at most 16 (KEY_THREADS)
KEY_LANE_ROWS = {64: 4, 128: 4, 256: 4}
KEY_BLOCK_WARPS = 8  # a quantize_keys block takes heads until it has this many warps
KEY_THREADS = 512  # the launch bounds of quantize_keys
VALUE_WARPS = 4  # VAL_WARPS: warps of a quantize_values block
VALUE_LANE_CHANNELS = {64: 32, 128: 32, 256: 32}  # value channels per lane of quantize_values (16 or 32), per head_dim
ROW_THREADS = 256  # THREADS of dequantize.cu, rotate.cu and window.cu
STASH_LIMIT = 112 * 1024  # quantize_keys keeps its rows in shared memory up to this much (two blocks per H100 SM)
SCALINGS = {"none": 0, "l2": 1, "l2_per_head": 2}


def hadamard_normalization(head_dim: int) -> np.float32:
    """The float32 normalization of the CPU definition, ``float32(1 / sqrt(n))``."""
    return np.float32(1.0 / np.sqrt(head_dim))


def uses_hadamard(config: QuantConfig) -> bool:
    """Whether the kernels rotate (a user matrix is applied before them, by the caller)."""
    return isinstance(config.rotation, str) and config.rotation == "hadamard"


@dataclasses.dataclass(frozen=True)
class KeyLaunch:
    """A launch of ``quantize_keys``: ``grid``, ``block``, dynamic ``shared_bytes``, the heads a block quantizes at
    once (``heads_per_round``) and whether it keeps the raw rows in shared memory (``stash``)."""

    grid: tuple
    block: tuple
    shared_bytes: int
    heads_per_round: int
    stash: bool


def quantize_keys_launch(batch: int, heads: int, head_dim: int, groups: int, config: QuantConfig, itemsize: int,
                         max_shared_bytes: int) -> KeyLaunch:
    """The launch over ``groups`` key groups of ``batch`` sequences of ``heads`` heads (``itemsize``: bytes per input
    element) on a device whose blocks may have up to ``max_shared_bytes`` of dynamic shared memory (the opt-in
    maximum: 227 KiB on the H100, 163 KiB on the A100, 99 KiB on sm_86/sm_89). A block takes one key group of one
    sequence; a warp holds ``32 // (head_dim // 16) * KEY_LANE_ROWS`` rows of one head; the raw rows are stashed in
    shared memory when they fit. Raises ``ValueError`` for a lane geometry the key group does not fit, or shared
    memory the device does not have."""
    group, l2, lane_rows = config.key_group, config.token_scaling == "l2", KEY_LANE_ROWS[head_dim]
    warps_per_head = group // (32 // (head_dim // 16) * lane_rows)
    if not 1 <= warps_per_head <= KEY_THREADS // 32:
        raise ValueError(f"quantize_launch.KEY_LANE_ROWS[{head_dim}] = {lane_rows} does not fit key groups of {group}: "
                         f"{warps_per_head} warps per head, where a block holds 1 to {KEY_THREADS // 32}")
    heads_per_round = max(1, min(heads, KEY_BLOCK_WARPS // warps_per_head))
    padded = head_dim + head_dim // 8  # SPREAD_DIM: per-channel floats, padded against bank conflicts
    shared = (
        (heads * group * 8 + group * 4 if l2 else 0)  # float64 squares and inverse norms
        + heads_per_round * 2 * (group // lane_rows) * padded * 4  # partial extremes
        + heads_per_round * 2 * padded * 4  # group parameters
    )
    if shared > max_shared_bytes:
        raise ValueError(f"quantizing keys of {heads} heads in groups of {group} needs {shared} bytes of shared memory "
                         f"per block; this GPU allows {max_shared_bytes}")
    stash_bytes = heads * group * head_dim * itemsize
    stash = l2 and shared + stash_bytes <= min(STASH_LIMIT, max_shared_bytes)
    return KeyLaunch(grid=(groups, batch), block=(32 * warps_per_head * heads_per_round,),
                     shared_bytes=shared + (stash_bytes if stash else 0), heads_per_round=heads_per_round, stash=stash)


def quantize_keys_args(k, strides, lengths, config: QuantConfig, launch: KeyLaunch, out: dict, refused) -> tuple:
    """The arguments of ``quantize_keys``: ``k`` ``(B, H, T, D)`` with element ``strides`` of its first three axes
    (channels contiguous), ``lengths`` int64 ``(B,)``, ``out`` the packed arrays (``layout.array_specs``), ``refused``
    one int32 (device arrays, or numpy arrays for the emulation)."""
    heads, head_dim = k.shape[1], k.shape[3]
    norms = out.get("norms")
    return (k, *strides, lengths, np.int32(heads), np.int32(launch.grid[0]), np.int32(config.key_group),
            np.int32(uses_hadamard(config)), np.int32(SCALINGS[config.token_scaling]), hadamard_normalization(head_dim),
            np.int32(launch.heads_per_round), np.int32(launch.stash), out["k_codes"], out["k_scales"], out["k_zeros"],
            norms if norms is not None else np.uint64(0), refused)


def quantize_values_launch(batch: int, heads: int, head_dim: int, capacity: int, config: QuantConfig) -> tuple:
    """``(grid, block)`` over ``capacity`` tokens: a row slot of a warp packs one word row, a row spanning
    ``head_dim // VALUE_LANE_CHANNELS`` lanes."""
    word_rows_per_block = VALUE_WARPS * 32 // (head_dim // VALUE_LANE_CHANNELS[head_dim])
    word_rows = capacity // config.codes_per_word
    return (-(-word_rows // word_rows_per_block), batch * heads), (32 * VALUE_WARPS,)


def quantize_values_args(v, strides, lengths, config: QuantConfig, out: dict, refused) -> tuple:
    """The arguments of ``quantize_values`` (as :func:`quantize_keys_args`)."""
    heads, head_dim = v.shape[1], v.shape[3]
    rotate = uses_hadamard(config) and config.rotate_values
    return (v, *strides, lengths, np.int32(heads), np.int32(out["v_scales"].shape[2]), np.int32(config.value_group),
            np.int32(rotate), hadamard_normalization(head_dim), out["v_codes"], out["v_scales"], out["v_zeros"],
            refused)


def dequantize_launch(batch: int, heads: int, tokens: int) -> tuple:
    """``(grid, block)`` of ``dequantize_keys`` and ``dequantize_values``: a warp per token row."""
    return (max(1, -(-tokens // (ROW_THREADS // 32))), batch * heads), (ROW_THREADS,)


def dequantize_keys_args(qkv, lengths, rotate: bool, out) -> tuple:
    """The arguments of ``dequantize_keys``: the packed arrays of ``qkv`` (a :class:`oscar_cupy.QuantizedKV`),
    ``lengths`` int64 ``(B,)``, whether to rotate back, ``out`` ``(B, H, num_tokens, D)``."""
    norms = qkv.norms
    return (qkv.k_codes, qkv.k_scales, qkv.k_zeros, norms if norms is not None else np.uint64(0),
            np.int32(0 if norms is None else norms.shape[1]), lengths, np.int32(qkv.kv_heads),
            np.int32(qkv.capacity), np.int32(qkv.num_tokens), np.int32(qkv.config.key_group), np.int32(rotate),
            hadamard_normalization(qkv.head_dim), out)


def dequantize_values_args(qkv, lengths, rotate: bool, out) -> tuple:
    """The arguments of ``dequantize_values`` (as :func:`dequantize_keys_args`)."""
    return (qkv.v_codes, qkv.v_scales, qkv.v_zeros, lengths, np.int32(qkv.kv_heads), np.int32(qkv.capacity),
            np.int32(qkv.num_tokens), np.int32(qkv.config.value_group), np.int32(rotate),
            hadamard_normalization(qkv.head_dim), out)


def hadamard_launch(rows: int, size: int) -> tuple:
    """``(grid, block)`` of ``hadamard_rows`` over ``rows`` rows of ``size``: a row spans ``min(32, size)`` lanes."""
    rows_per_block = ROW_THREADS // 32 * (32 // min(32, size))
    return (-(-rows // rows_per_block),), (ROW_THREADS,)


def window_append_launch(k, v, window_k, window_v, window_lengths) -> tuple:
    """``(grid, block, args)`` of ``window_append``: ``k``, ``v`` ``(batch, heads, count, head_dim)`` with contiguous
    channels written after the first ``window_lengths[b]`` (int64, read on the device) tokens of each sequence of the
    contiguous window buffers ``window_k``, ``window_v`` ``(batch, heads, capacity, head_dim)``; a thread per
    element."""
    batch, heads, count, head_dim = k.shape
    elements = batch * heads * count * head_dim
    strides = [[np.int64(stride // x.itemsize) for stride in x.strides[:3]] for x in (k, v)]
    args = (k, *strides[0], v, *strides[1], window_lengths, window_k, window_v, np.int32(heads), np.int32(count),
            np.int32(head_dim), np.int32(window_k.shape[2]), np.int64(elements))
    return (max(1, -(-elements // ROW_THREADS)),), (ROW_THREADS,), args
