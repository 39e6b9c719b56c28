"""The decode kernel's launch model (``oscar_cupy/decode_launch.py``): pure arithmetic, tested without a GPU; the
launches it plans are tested on the GPU in ``test_cuda_attention.py``."""

import pytest

from oscar_cupy.decode_launch import geometry, late_blocks, packed_blocks


def test_packed_block_model():
    """The launch model: at most one packed block per slot and per step; the late packed blocks (whose slots take the
    window blocks that find no free slot) take a window block's worth of steps fewer; at batch 1 whole blocks per unit
    (one segment each)."""
    for units, steps in ((8, 3), (8, 128), (8, 1020), (64, 124), (512, 4092)):
        for window_splits in (0, 1, 2, 4):
            blocks = packed_blocks(units, 396, 132, steps, window_splits)
            assert 1 <= blocks <= min(396, units * steps)
    assert packed_blocks(8, 396, 132, 0, 4) == 0  # nothing packed
    # the whole launch fits on the GPU at once: whole blocks per unit, at most two per SM, the fewest steps per warp,
    # then the fewest blocks. Batch 1 x 4k of 8 KV heads (992 steps): a step per warp, 31 blocks per unit; 1 x 32k
    # (8160 steps): 256 and 264 blocks both leave a warp 8 steps; SmolLM2 1 x 128k (3 KV heads, 12276 steps): 12
    # steps per warp from 258 blocks on
    assert packed_blocks(8, 396, 132, 124, 4) == 248
    assert packed_blocks(8, 396, 132, 1020, 4) == 256
    assert packed_blocks(3, 396, 132, 4092, 4) == 258
    # one block per SM (large shared memory), a launch that fits: the slots bound it, with room for the window and
    # merge blocks (a step per warp would take 248)
    assert packed_blocks(8, 132, 132, 124, 4) <= 132 - 8 - 8
    # large sizes: the fewest within 1%
    assert 385 <= packed_blocks(256, 396, 132, 508, 4) <= 396
    # 64 window blocks after 396 packed blocks: the last 64 packed blocks take 16 steps (4 per warp) fewer
    assert late_blocks(396, 64, 396, 64 * 4092) == (64, 16)
    assert late_blocks(332, 64, 396, 64 * 4092) == (0, 0)
    # 512 window blocks after 396 packed blocks: 116 slots take two, so the last 116 packed blocks are the shorter ones
    assert late_blocks(396, 512, 396, 512 * 124) == (116, 16)
    # never so few steps that a late block would have none
    late, late_steps = late_blocks(396, 64, 396, 800)
    assert late == 0 or (800 + late_steps * late) // 396 - late_steps >= 1


def test_geometry_of_the_benchmark_shapes():
    """The launches of the H100 benchmark (396 slots on 132 multiprocessors): Llama-3.1-8B's 32 query / 8 KV heads at
    1 x 4k fit at once (merge blocks per row), 64 x 32k does not (merge blocks per unit, late blocks); SmolLM2's 9 / 3
    heads at 1 x 4k; 16 query rows per KV head take two row tiles."""
    small = geometry(1, 32, 8, 1, 4096 - 128, 128, 396, 132)
    assert (small.units, small.unit_steps, small.packed_blocks, small.window_blocks, small.merge_rows) == \
        (8, 124, 248, 8, 1)
    assert small.merge_blocks == 32 and small.partial_rows == (248 + 8 * 5) * 8
    large = geometry(64, 32, 8, 1, 32768 - 128, 128, 396, 132)
    assert (large.packed_blocks, large.late_blocks, large.late_steps, large.merge_rows) == (395, 116, 16, 8)
    assert large.merge_blocks == 512
    assert geometry(1, 9, 3, 1, 4096 - 128, 128, 396, 132).packed_blocks == 93
    tiles = geometry(2, 32, 2, 1, 1000, 0, 396, 132)  # 16 rows per KV head
    assert (tiles.row_tiles, tiles.row_blocks, tiles.window_blocks) == (2, 1, 0)
    with pytest.raises(ValueError, match="count steps in 32 bits"):
        geometry(1024, 64, 64, 1, 2**20, 0, 396, 132)
