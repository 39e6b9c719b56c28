import os
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

import oscar_cupy as oc

settings.register_profile("default", max_examples=30)
settings.register_profile("thorough", max_examples=600)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
# the configs the write path's kernels are checked with, on the GPU (test_cuda.py) and in the CPU emulation
# (test_emulated_kernels.py): both bit widths, every token scaling and scale dtype, groups of 32, 64 and 128
WRITE_PATH_CONFIGS = [
    oc.QuantConfig(),
    oc.QuantConfig(bits=4),
    oc.QuantConfig(key_group=64, value_group=64, token_scaling="l2_per_head", scale_dtype="bfloat16"),
    oc.QuantConfig(bits=4, key_group=128, value_group=32, scale_dtype="float32"),
    oc.QuantConfig.preset("kivi-2"),
    oc.QuantConfig.preset("hadamard-only-4", rotate_values=False),
    oc.QuantConfig.preset("scaling-only-2", value_group=64),
]


def config_id(config) -> str:
    """A short test id of a config."""
    return f"{config.bits}b-g{config.key_group}-{config.token_scaling}-{config.rotation}"


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh data per test, reproducible per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def random_kv(rng, batch=2, kv_heads=2, tokens=100, head_dim=64, dtype=np.float32):
    """Keys with a per-channel mean and a few outlier channels (as real keys have), and normal values."""
    mean = rng.standard_normal((1, kv_heads, 1, head_dim)) * 2
    outliers = rng.choice(head_dim, size=max(1, head_dim // 32), replace=False)
    keys = rng.standard_normal((batch, kv_heads, tokens, head_dim)) + mean
    keys[..., outliers] *= 8
    values = rng.standard_normal((batch, kv_heads, tokens, head_dim))
    return keys.astype(dtype), values.astype(dtype)
