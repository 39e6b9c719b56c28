"""The decode kernel's launch model (``oscar_cupy/decode_launch.py``): pure arithmetic, tested without a GPU; the
launches it plans are tested on the GPU in ``test_cuda_attention.py``."""

from oscar_cupy.decode_launch import late_blocks, packed_blocks


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
