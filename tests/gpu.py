"""What the GPU test modules share: cupy (the importing module is skipped without it), the marker that skips them
without a GPU, the real K/V dump and the poisoning of fresh allocations.

    from gpu import REAL_KV, cupy, poison_memory_pool, pytestmark  # noqa: F401  (pytestmark marks the module)
"""

import os

import pytest

cupy = pytest.importorskip("cupy")
try:
    GPUS = cupy.cuda.runtime.getDeviceCount()
except cupy.cuda.runtime.CUDARuntimeError:
    GPUS = 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU")]

REAL_KV = os.environ.get("OSCAR_REAL_KV", ".assets/smollm2_kv.npz")  # made by bench/dump_kv.py


def poison_memory_pool():
    """Fill and release a large block so that the next allocations start as 0xFF bytes (NaN for floats)."""
    block = cupy.empty(1 << 28, dtype=cupy.uint8)
    block.fill(0xFF)
    del block
