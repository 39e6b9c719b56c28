"""The launch model of the decode kernel (``raw_kernels/decode.cu``), with no GPU: how many packed blocks share a
launch's packed steps, which of them are late (shorter), and how many window blocks it has (pure arithmetic on the
launch's shape and the GPU's resident block slots), and the kernel's arguments in its order (:func:`kernel_args`),
used by :class:`oscar_cupy.cuda_attention.DecodePlan` and by the tests that run the kernel on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

THREADS = 128  # threads of a decode block (THREADS of decode.cu)
WARPS = THREADS // 32
STEP = 32  # packed tokens per warp step
WINDOW_SPLIT = 32  # window tokens per window split (WINDOW_SPLIT of decode.cu)
MAX_ROW_TILES = 2  # ROW_TILES of decode.cu: 8 query rows of a KV head per tile

# relative durations of a decode step's parts, fitted to H100 measurements: a packed block costs BLOCK_COST per segment
# (query prologue, block merge, partial result) plus STEP_COST per 32-token step of each of its warps, a window block
# (a 32-token split per warp) WINDOW_COST, and a unit's merge COMBINE_COST per 32 partial rows (a round of loads)
STEP_COST, BLOCK_COST, WINDOW_COST, COMBINE_COST = 1.0, 3.0, 4.0, 3.0
MAX_PACKED_BLOCKS = 1023  # decode.cu's PackedPartition divides by the block count through a 32-bit reciprocal


def late_blocks(packed_blocks: int, window_blocks: int, slots: int, total_steps: int) -> tuple[int, int]:
    """``(late_blocks, late_steps)``: the last ``late_blocks`` packed blocks take ``late_steps`` steps fewer than the
    others (a window block's duration in steps of a block's four warps; fewer where a late block would be left no
    step). The window blocks, after the packed ones in the grid, take the free slots, then those that free up first:
    the late blocks' slots take the window blocks that find no free slot (one more each than the other packed blocks'
    slots)."""
    waiting = max(0, window_blocks - max(0, slots - packed_blocks))  # window blocks that wait for a packed block
    late = waiting % packed_blocks if packed_blocks else 0
    if not late:
        return 0, 0
    late_steps = min(round(WARPS * WINDOW_COST / STEP_COST), (total_steps - packed_blocks) // packed_blocks)
    return (late, late_steps) if late_steps > 0 else (0, 0)


def window_blocks(units: int, window_splits: int) -> int:
    """Window blocks of a launch: WARPS window splits (32 tokens, one per warp) per block, for each unit."""
    return units * -(-window_splits // WARPS)


@functools.lru_cache(maxsize=1024)  # the layers of a model plan the same shapes at every flush
def packed_blocks(units: int, slots: int, sms: int, steps: int, window_splits: int) -> int:
    """Packed blocks of a launch (they share the ``units * steps`` packed steps evenly, decode.cu).

    ``units`` (sequence, KV head, row block) triples of ``steps`` packed steps and ``window_splits`` 32-token window
    splits each (in window blocks of WARPS splits); ``slots`` blocks fit on the GPU at once, on ``sms``
    multiprocessors.

    Where the whole launch fits on the GPU at once (small batches): whole blocks per unit, at most two per
    multiprocessor (and leaving slots for the window and merge blocks), the fewest steps per warp, the fewest blocks
    among equals. A step there is a chain of dependent latencies as long as its warps' steps, which a third block on a
    multiprocessor lengthens (H100, forced counts in ``bench/results/decode_small_launch_blocks.json``: 4-11% faster
    than the estimate below at batch 1 and 1-2 x 4k; SmolLM2 8 x 4k 3% slower than 336 blocks).

    Otherwise the count with the shortest estimated step (the fewest among those within 1%), at most one per slot and
    one per step (and below ``MAX_PACKED_BLOCKS``). Estimate: a packed block costs ``BLOCK_COST`` per unit it touches
    plus ``STEP_COST`` per step of a warp, a window block ``WINDOW_COST``; the window blocks take the slots after the
    packed blocks, the late blocks (:func:`late_blocks`) ending with the others; then each unit's merge block adds its
    segments and window splits (``COMBINE_COST`` per 32). More blocks shorten them but add segments and the merges'
    work.
    """
    total = units * steps
    if not total:
        return 0
    windows = window_blocks(units, window_splits)
    best, best_time = 0, math.inf
    for blocks in range(1, min(slots, total, MAX_PACKED_BLOCKS) + 1):
        late, late_steps = late_blocks(blocks, windows, slots, total)
        block_steps = -(-(total + late_steps * late) // blocks)  # of an early block
        aligned = blocks % units == 0 and not late  # whole blocks per unit: one segment each
        segments = 1 if aligned else -(-(block_steps - 1) // steps) + 1
        duration = BLOCK_COST * segments + STEP_COST * (-(-block_steps // WARPS) + segments - 1)
        waiting = max(0, windows - max(0, slots - blocks))  # window blocks after the packed ones on every slot
        launch = max(duration + WINDOW_COST * (waiting // blocks), WINDOW_COST if window_splits else 0)
        unit_segments = blocks // units if aligned else -(-blocks // units) + 1
        time = launch + COMBINE_COST * -(-(unit_segments + window_splits) // 32)
        if time < best_time * 0.99:
            best, best_time = blocks, time
    if best + windows + units > slots:
        return best

    def warp_steps(blocks):  # of a warp of an early block
        return -(-(-(-total // blocks)) // WARPS)

    whole = range(units, min(2 * sms, slots - windows - units, total, MAX_PACKED_BLOCKS) + 1, units)
    return min(whole, key=lambda blocks: (warp_steps(blocks), blocks), default=best)


def row_tiles(rows: int) -> int:
    """The kernel variant's ROW_TILES for ``rows`` query rows per KV head (8 per tile, at most 16 per block)."""
    return 1 if rows <= 8 else MAX_ROW_TILES


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A decode launch's shape: ``rows`` query rows per KV head in ``row_blocks`` blocks of ``8 * row_tiles``;
    ``units`` (sequence, KV head, row block) triples of ``unit_steps`` packed 32-token steps and ``window_splits``
    32-token window splits; ``packed_blocks`` (the last ``late_blocks`` of them ``late_steps`` shorter),
    ``window_blocks``, and merge blocks one per row of each unit (``merge_rows`` 1) or one per unit."""

    rows: int
    row_tiles: int
    row_blocks: int
    units: int
    unit_steps: int
    window_splits: int
    window_blocks: int
    packed_blocks: int
    late_blocks: int
    late_steps: int
    merge_rows: int

    @property
    def merge_blocks(self) -> int:
        return self.units * (min(8 * self.row_tiles, self.rows) if self.merge_rows == 1 else 1)

    @property
    def partial_rows(self) -> int:
        """Rows of the partial-result workspace: packed segment (block i, unit u) at index i + u, then each unit's
        window splits."""
        return (self.packed_blocks + self.units * (1 + self.window_splits)) * 8 * self.row_tiles


def geometry(batch: int, q_heads: int, kv_heads: int, q_len: int, max_packed: int, max_window: int, slots: int,
             sms: int) -> Geometry:
    """The launch for ``max_packed`` packed and ``max_window`` window tokens of the longest sequence, on a GPU holding
    ``slots`` blocks of the kernel at once on ``sms`` multiprocessors. Raises ``ValueError`` for more packed steps
    than the kernel counts in 32 bits."""
    rows = q_heads // kv_heads * q_len
    tiles = row_tiles(rows)
    row_blocks = -(-rows // (8 * tiles))
    units = batch * kv_heads * row_blocks
    unit_steps = -(-max_packed // STEP)
    window_splits = -(-max_window // WINDOW_SPLIT)
    if units * unit_steps + WARPS * WINDOW_COST * MAX_PACKED_BLOCKS >= 2**31:
        raise ValueError(f"{units * unit_steps} packed steps of 32 tokens in one launch: the kernels count steps in "
                         "32 bits; split the batch")
    windows = window_blocks(units, window_splits)
    packed = packed_blocks(units, slots, sms, unit_steps, window_splits)
    late, late_steps = late_blocks(packed, windows, slots, units * unit_steps)
    # merge blocks: one per row of each unit where they fit on the GPU beside the others (their warps share the row's
    # loads), else one per unit (a warp per row)
    merge_rows = 1 if packed + windows + units * min(8 * tiles, rows) <= slots else 8 * tiles
    return Geometry(rows, tiles, row_blocks, units, unit_steps, window_splits, windows, packed, late, late_steps,
                    merge_rows)

def kernel_args(plan, q, q_strides, arrays: dict, capacity: int, packed_lengths, window, out) -> tuple:
    """The arguments of ``decode_attention``, in its order.

    ``plan``: the launch (a :class:`oscar_cupy.cuda_attention.DecodePlan`, or anything with its attributes
    ``config``, ``kv_heads``, ``q_len``, ``rows``, ``row_blocks``, ``units``, ``packed_blocks``, ``unit_steps``,
    ``late_blocks``, ``late_steps``, ``window_splits``, ``merge_rows``, ``rotation_args``, ``partial_o``,
    ``partial_ml``, ``unit_counts`` and ``lse``); ``q`` ``(batch, q_heads, q_len, head_dim)`` with element
    ``q_strides`` of its first three axes; ``arrays`` the packed arrays (``oscar_cupy.layout.array_specs`` names,
    ``norms`` optional) laid out in a storage of ``capacity`` tokens; ``packed_lengths`` int64 ``(batch,)``;
    ``window`` ``(window_k, k_strides, window_v, v_strides, window_lengths)`` or ``None``; ``out`` like ``q``.
    Device arrays (or numpy arrays for the CPU emulation)."""
    norms = arrays.get("norms")
    if window is None:
        window_args, window_lengths = [np.uint64(0), np.int64(0), np.int64(0), np.int64(0)] * 2, None
    else:
        window_k, k_strides, window_v, v_strides, window_lengths = window
        window_args = [window_k, *k_strides, window_v, *v_strides]
    return (q, *q_strides, arrays["k_codes"], arrays["k_scales"], arrays["k_zeros"], arrays["v_codes"],
            arrays["v_scales"], arrays["v_zeros"], norms if norms is not None else np.uint64(0),
            np.int32(0 if norms is None else norms.shape[1]), packed_lengths, np.int32(capacity),
            *window_args, window_lengths if window_lengths is not None else np.uint64(0),
            np.int32(plan.kv_heads), np.int32(plan.q_len), np.int32(plan.rows), np.int32(plan.row_blocks),
            np.int32(plan.units), np.int32(plan.config.key_group), np.int32(plan.packed_blocks),
            np.int32(plan.unit_steps), np.int32(plan.late_blocks), np.int32(plan.late_steps),
            np.int32(plan.window_splits), np.int32(plan.merge_rows), *plan.rotation_args, plan.partial_o,
            plan.partial_ml, plan.unit_counts, out, plan.lse)
