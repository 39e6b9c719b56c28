"""The write path's CUDA kernels (``raw_kernels/quantize.cu``, ``dequantize.cu``, ``rotate.cu``, ``window.cu``), run
on the CPU by ``tests/emulator.py``, against the CPU reference: identical codes, scales, zeros and norms (and
dequantized, rotated and appended values), every output written, through the launch geometry and arguments the CUDA
backend uses (``oscar_cupy/quantize_launch.py``). No GPU needed; skipped without g++. The same comparisons on the GPU
are ``tests/test_cuda.py``.
"""

import os

import ml_dtypes
import numpy as np
import pytest
from conftest import DTYPES, WRITE_PATH_CONFIGS, config_id, random_kv
from emulator import COMPILER, Module

import oscar_cupy as oc
from oscar_cupy import kernels, layout, quantize_launch, quantizer

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no g++ to build the kernels' host version")
REAL_KV = os.environ.get("OSCAR_REAL_KV", ".assets/smollm2_kv.npz")  # made by bench/dump_kv.py


def poisoned_like(shape, dtype) -> np.ndarray:
    """A new array of ``shape`` and ``dtype`` with every byte 0xFF (NaN for floats, all ones for codes)."""
    return np.frombuffer(b"\xff" * (int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype).reshape(shape).copy()


def rows(x: np.ndarray):
    """``x`` with contiguous, 16-byte aligned rows (as the CUDA backend's ``_rows_view``) and its element strides."""
    if x.strides[3] != x.itemsize or any(stride % 16 for stride in x.strides[:3]) or x.ctypes.data % 16:
        x = np.ascontiguousarray(x)
    return x, [np.int64(stride // x.itemsize) for stride in x.strides[:3]]


H100_SHARED_BYTES = 227 * 1024  # the opt-in maximum of dynamic shared memory per block


def emulated_quantize(k, v, config, lengths, source=None, max_shared_bytes=H100_SHARED_BYTES) -> tuple[dict, int]:
    """``(packed arrays, refusal flags)`` of numpy ``k``, ``v`` ``(B, H, T, D)`` quantized by the emulated kernels into
    outputs poisoned with 0xFF bytes, as on a GPU with ``max_shared_bytes``; ``source``: a replacement for
    quantize.cu."""
    batch, heads, tokens, head_dim = k.shape
    module = Module(kernels.quantize_variant(head_dim, config.bits, np.dtype(k.dtype).name, config.scale_dtype),
                    source)
    out = {name: poisoned_like(shape, dtype) for name, (shape, dtype) in
           layout.array_specs(config, batch, heads, layout.capacity(tokens, config), head_dim).items()}
    lengths = np.asarray(lengths, dtype=np.int64)
    refused = np.zeros(1, np.int32)
    (k, k_strides), (v, v_strides) = rows(k), rows(v)
    groups = out["k_codes"].shape[2] // config.key_group
    launch = quantize_launch.quantize_keys_launch(batch, heads, head_dim, groups, config, k.itemsize, max_shared_bytes)
    assert launch.shared_bytes <= max_shared_bytes
    module.launch("quantize_keys", launch.grid, launch.block,
                  quantize_launch.quantize_keys_args(k, k_strides, lengths, config, launch, out, refused),
                  launch.shared_bytes)
    grid, block = quantize_launch.quantize_values_launch(batch, heads, head_dim, out["v_scales"].shape[2], config)
    module.launch("quantize_values", grid, block,
                  quantize_launch.quantize_values_args(v, v_strides, lengths, config, out, refused))
    return out, int(refused[0])


def assert_same_as_cpu(k, v, config, lengths, max_shared_bytes=H100_SHARED_BYTES):
    cpu = oc.quantize_kv(k, v, config, lengths=lengths).arrays()
    emulated, refused = emulated_quantize(k, v, config, lengths, max_shared_bytes=max_shared_bytes)
    assert refused == 0
    assert set(emulated) == set(cpu)
    for name in cpu:
        assert emulated[name].shape == cpu[name].shape and emulated[name].dtype == cpu[name].dtype, name
        np.testing.assert_array_equal(emulated[name].view(np.uint8), cpu[name].view(np.uint8), err_msg=name)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("config", WRITE_PATH_CONFIGS, ids=config_id)
def test_quantize_kernels_equal_cpu(rng, head_dim, config):
    """Every config of the GPU tests at every head_dim; the input dtype goes round the three."""
    dtype = DTYPES[(WRITE_PATH_CONFIGS.index(config) + head_dim // 64) % len(DTYPES)]
    k, v = random_kv(rng, batch=2, kv_heads=3, tokens=100, head_dim=head_dim, dtype=dtype)
    assert_same_as_cpu(k, v, config, [100, 61])


@pytest.mark.parametrize("head_dim, key_lane_rows, value_lane_channels",
                         [(64, 2, 16), (64, 1, 32), (128, 2, 16), (128, 8, 32), (256, 8, 16)])
def test_other_lane_geometries(rng, monkeypatch, head_dim, key_lane_rows, value_lane_channels):
    """The kernels compiled and launched for other lane geometries (quantize_launch's KEY_LANE_ROWS and
    VALUE_LANE_CHANNELS): key groups of 32 to 128, both bit widths, all three scalings."""
    monkeypatch.setitem(quantize_launch.KEY_LANE_ROWS, head_dim, key_lane_rows)
    monkeypatch.setitem(quantize_launch.VALUE_LANE_CHANNELS, head_dim, value_lane_channels)
    k, v = random_kv(rng, batch=2, kv_heads=3, tokens=100, head_dim=head_dim, dtype=ml_dtypes.bfloat16)
    for config in WRITE_PATH_CONFIGS[:4]:
        assert_same_as_cpu(k, v, config, [100, 45])


def test_a_geometry_that_does_not_fit_is_refused(monkeypatch):
    monkeypatch.setitem(quantize_launch.KEY_LANE_ROWS, 256, 2)  # 32 warps for a key group of 128
    with pytest.raises(ValueError, match=r"KEY_LANE_ROWS\[256\] = 2 does not fit key groups of 128"):
        quantize_launch.quantize_keys_launch(1, 8, 256, 4, oc.QuantConfig(key_group=128), 2, H100_SHARED_BYTES)
    quantize_launch.quantize_keys_launch(1, 8, 256, 4, oc.QuantConfig(key_group=64), 2, H100_SHARED_BYTES)


@pytest.mark.parametrize("max_shared_kib", [99, 48])
def test_smaller_shared_memory(rng, max_shared_kib):
    """On GPUs with less shared memory per block (99 KiB on sm_86/sm_89) the raw rows that do not fit are read again
    instead of stashed, with the same results; what cannot fit at all is refused before the launch."""
    k, v = random_kv(rng, batch=2, kv_heads=8, tokens=64, head_dim=128, dtype=ml_dtypes.bfloat16)
    config = oc.QuantConfig()  # Llama-3-8B's keys: with the stash, 104 KiB per block on the H100 and the A100
    assert quantize_launch.quantize_keys_launch(2, 8, 128, 2, config, 2, H100_SHARED_BYTES).shared_bytes > 99 * 1024
    assert not quantize_launch.quantize_keys_launch(2, 8, 128, 2, config, 2, max_shared_kib * 1024).stash
    assert_same_as_cpu(k, v, config, [64, 50], max_shared_bytes=max_shared_kib * 1024)
    with pytest.raises(ValueError, match="needs .* bytes of shared memory per block; this GPU allows 8192"):
        quantize_launch.quantize_keys_launch(2, 8, 128, 2, config, 2, 8 * 1024)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_length_and_group_edge(rng, dtype):
    """Lengths around group and word-row edges, an empty sequence, one token."""
    k, v = random_kv(rng, batch=8, kv_heads=2, tokens=130, head_dim=64, dtype=dtype)
    for config in (oc.QuantConfig(), oc.QuantConfig(bits=4, key_group=128)):
        assert_same_as_cpu(k, v, config, [130, 129, 128, 97, 33, 32, 1, 0])


def boundary_groups(rng, scale_dtype: str, bits: int, shape, keys: bool) -> np.ndarray:
    """float32 ``(B, H, T, D)`` whose groups (``keys``: 32 tokens of a channel; else 32 channels of a token) have
    extremes on and next to the scale dtype's grid: a zero ``z`` of the grid (or the float32 above it) and a maximum
    ``z + c * L`` for a scale ``c`` of the grid (or the float32 next to it), ``c`` from the subnormals to the largest
    that keeps the group in range; the other elements lie between, four of them half a step above a code (ties of the
    rounding)."""
    dtype = quantizer.scale_dtype(scale_dtype)
    finfo, levels = ml_dtypes.finfo(dtype), (1 << bits) - 1
    exponents = np.arange(int(np.log2(float(finfo.smallest_subnormal))),
                          int(np.log2(float(finfo.max) / (4 * (levels + 1)))))
    x = np.moveaxis(np.zeros(shape, np.float32), 2, 3) if keys else np.zeros(shape, np.float32)
    groups = x.reshape(-1, 32)  # a view: keys' groups run along the tokens of the moved axes
    for cells in groups:
        scale = np.float32(np.asarray(2.0 ** rng.choice(exponents) * rng.uniform(1, 2)).astype(dtype))
        zero = np.float32(np.asarray(rng.choice([-1, 1]) * scale * rng.integers(0, levels + 1)).astype(dtype))
        low = [zero, np.nextafter(zero, np.float32(np.inf))][rng.integers(2)]
        high = np.float32(np.float64(zero) + np.float64(scale) * levels)
        high = max(low, [high, np.nextafter(high, np.float32(np.inf)), np.nextafter(high, np.float32(-np.inf))][
            rng.integers(3)])
        cells[:] = low + (high - low) * rng.uniform(0, 1, 32).astype(np.float32)
        ties = np.float32(np.float64(zero) + np.float64(scale) * (rng.integers(0, levels, 4) + 0.5))
        cells[rng.choice(32, 4, replace=False)] = np.clip(ties, low, high)  # half a step above a code: round to even
        cells[rng.integers(32)], cells[rng.integers(32)] = low, high
    return np.ascontiguousarray(np.moveaxis(x, 3, 2)) if keys else x


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits", [2, 4])
def test_group_parameters_on_the_scale_grid(rng, scale_dtype, bits):
    """Extremes on and next to the scale dtype's grid, ranges exactly a multiple of a scale or one float32 off, scales
    from the subnormals to the largest in range, elements at rounding ties: the one-step search of group_params
    (common.cuh) gives the CPU's scales and zeros, and the codes follow (half to even)."""
    config = oc.QuantConfig(bits=bits, rotation="none", token_scaling="none", scale_dtype=scale_dtype)
    k = boundary_groups(rng, scale_dtype, bits, (2, 2, 64, 64), keys=True)
    v = boundary_groups(rng, scale_dtype, bits, (2, 2, 64, 64), keys=False)
    assert_same_as_cpu(k, v, config, [64, 64])


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_token_norms_across_the_exponent_range(rng, dtype, scale_dtype):
    """The method end to end (rotation and L2 token scaling; per-head scaling; neither) on tokens whose sizes span
    10^-30 to 10^30, with all-zero tokens and subnormal elements among them: float64 norms, their inverses, the
    butterflies and the group parameters at the extremes of the exponent range, bit for bit as on the CPU."""
    batch, heads, tokens, head_dim = 2, 3, 96, 64
    sizes = 10.0 ** rng.uniform(-30, 30, size=(batch, 1, tokens, 1))
    sizes[:, :, rng.choice(tokens, 4, replace=False)] = 0.0  # tokens of zeros: norm 1 by definition
    k, v = (rng.standard_normal((batch, heads, tokens, head_dim)) * sizes for _ in range(2))
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    k[0, 0, 5, :8] = tiny * rng.integers(1, 4, size=8)  # subnormal elements in an otherwise normal token
    for bits, scaling, rotation in ((2, "l2", "hadamard"), (4, "l2_per_head", "hadamard"), (2, "none", "none")):
        config = oc.QuantConfig(bits=bits, token_scaling=scaling, rotation=rotation, scale_dtype=scale_dtype)
        assert_same_as_cpu(k.astype(dtype), v.astype(dtype), config, [tokens, 77])


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_groups_spanning_the_whole_scale_range(rng, scale_dtype):
    """Groups spanning as much as float32 allows (from minus half to half the scale dtype's largest value; for float16
    scales from its most negative to its largest), and from the smallest subnormal up; groups spanning more than
    float32's range, whose elements minus the zero would overflow, are refused (bits 5 and 6) as on the CPU."""
    finfo = ml_dtypes.finfo(quantizer.scale_dtype(scale_dtype))
    top, tiny = np.float32(finfo.max), np.float32(finfo.smallest_subnormal)
    edge = top if scale_dtype == "float16" else top / 2
    x = rng.uniform(-1, 1, size=(1, 2, 64, 64)).astype(np.float32)
    x[0, 0] *= edge
    x[0, 0, :, 0], x[0, 0, :, 63], x[0, 0, 0, :], x[0, 0, 63, :] = -edge, edge, -edge, edge
    x[0, 1] = np.abs(x[0, 1]) * tiny * 8
    x[0, 1, :, 0] = x[0, 1, 0, :] = tiny
    for bits in (2, 4):
        config = oc.QuantConfig(bits=bits, rotation="none", token_scaling="none", scale_dtype=scale_dtype)
        assert_same_as_cpu(x, x, config, [64])
    if scale_dtype != "float16":
        wide = x.copy()
        wide[0, 0, 5, 5], wide[0, 0, 6, 5] = -top, top  # a key group (channel 5) and two value groups (tokens 5, 6)
        assert emulated_quantize(wide, wide, config, [64])[1] == 32 | 64
        for name, k, v in (("k", wide, x), ("v", x, wide)):
            with pytest.raises(ValueError, match=f"{name} holds a group spanning .* beyond float32's range"):
                oc.quantize_kv(k, v, config, lengths=[64])


def test_strided_inputs_as_transformers_hands_them(rng):
    """(B, T, H, D) storage viewed as (B, H, T, D): token stride H * D, read in place."""
    k, v = random_kv(rng, batch=2, kv_heads=4, tokens=64, head_dim=128, dtype=np.float16)
    k_view, v_view = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for a in (k, v))
    assert rows(k_view)[0] is k_view  # no copy: the kernels get the strides
    assert_same_as_cpu(k_view, v_view, oc.QuantConfig(), [64, 50])


def test_real_model_kv():
    if not os.path.exists(REAL_KV):
        pytest.skip(f"{REAL_KV} not found (make it with bench/dump_kv.py)")
    dump = np.load(REAL_KV)
    keys, values = dump["keys"], dump["values"]  # (layers, 1, kv_heads, tokens, head_dim)
    for layer in range(0, keys.shape[0], 7):
        k, v = (x[layer][:, :, :300].astype(ml_dtypes.bfloat16) for x in (keys, values))
        assert_same_as_cpu(k, v, oc.QuantConfig(), [300])
        assert_same_as_cpu(k, v, oc.QuantConfig(bits=4), [295])


def test_refusal_flags(rng):
    """A non-finite valid element sets bit 1 (keys) or 2 (values), a group beyond the scale dtype's range 4 or 8 (and
    one spanning more than float32's 32 or 64), a token norm beyond float32's 16; padding is never read."""
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=64, head_dim=64, dtype=np.float32)
    config = oc.QuantConfig()
    bad = k.copy()
    bad[1, 0, 10, 3] = np.nan
    assert emulated_quantize(bad, v, config, [64, 64])[1] == 1
    assert emulated_quantize(bad, v, config, [64, 10])[1] == 0
    bad_v = v.copy()
    bad_v[0, 1, 5, 7] = np.inf
    assert emulated_quantize(k, bad_v, config, [64, 64])[1] == 2 | 8 | 64  # an infinite group is out of range, too wide
    assert emulated_quantize(k, v * 0 + 1e5, config, [64, 64])[1] == 8
    assert emulated_quantize(k * 1e5, v, oc.QuantConfig(token_scaling="none"), [64, 64])[1] == 4 | 32  # zero -Inf
    huge = k.copy()
    huge[0, 1, 7, :2] = 3e38  # finite keys whose norm is not
    for scaling in ("l2", "l2_per_head"):
        config = oc.QuantConfig(rotation="none", token_scaling=scaling, scale_dtype="float32")
        assert emulated_quantize(huge, v, config, [64, 64])[1] == 16
        assert emulated_quantize(huge, v, config, [7, 64])[1] == 0  # a padding token


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_refusal_flags_of_16_bit_values(rng, dtype):
    """16-bit values are checked for NaN and Inf two at a time (poison_pairs): either half of a pair, with and without
    rotation; padding is never read."""
    k, v = (x.astype(dtype) for x in random_kv(rng, batch=2, kv_heads=2, tokens=64, head_dim=64))
    for config in (oc.QuantConfig(), oc.QuantConfig.preset("kivi-2")):
        for channel, bad_value in ((6, np.nan), (7, np.nan), (25, np.nan), (40, np.inf), (41, -np.inf), (63, np.inf)):
            bad = v.copy()
            bad[1, 1, 20, channel] = bad_value
            assert emulated_quantize(k, bad, config, [64, 64])[1] & 2, (config, channel)
            assert emulated_quantize(k, bad, config, [64, 20])[1] == 0  # a padding token


def test_inputs_are_not_modified(rng):
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=40, head_dim=128, dtype=ml_dtypes.bfloat16)
    before = k.copy(), v.copy()
    emulated_quantize(k, v, oc.QuantConfig(), [40, 33])
    np.testing.assert_array_equal(k.view(np.uint16), before[0].view(np.uint16))
    np.testing.assert_array_equal(v.view(np.uint16), before[1].view(np.uint16))


def test_a_changed_kernel_is_caught(rng):
    """The comparison sees a one-constant change of the encoder (rounding at a shifted point): these tests can fail."""
    k, v = random_kv(rng, batch=1, kv_heads=2, tokens=64, head_dim=64, dtype=np.float32)
    config = oc.QuantConfig()
    source = kernels.read_source("quantize.cu")
    assert source.count("12582912.0f") == 1
    changed, _ = emulated_quantize(k, v, config, [64], source=source.replace("12582912.0f", "12582913.0f"))
    cpu = oc.quantize_kv(k, v, config).arrays()
    assert not np.array_equal(changed["k_codes"], cpu["k_codes"])
    assert not np.array_equal(changed["v_codes"], cpu["v_codes"])


def assert_dequantized_as_on_cpu(k, v, config, lengths):
    """The emulated dequantize kernels give the CPU reference's keys and values (bit for bit) for ``k``, ``v``
    ``(B, H, T, D)`` quantized on the CPU."""
    batch, heads, _, head_dim = k.shape
    dtype = k.dtype
    qkv = oc.quantize_kv(k, v, config, lengths=lengths)
    cpu_keys, cpu_values = qkv.dequantize()
    module = Module(kernels.dequantize_variant(head_dim, config.bits, np.dtype(dtype).name, config.scale_dtype))
    keys, values = (poisoned_like(cpu_keys.shape, dtype) for _ in range(2))
    grid, block = quantize_launch.dequantize_launch(batch, heads, qkv.num_tokens)
    rotate = config.rotation == "hadamard"
    module.launch("dequantize_keys", grid, block, quantize_launch.dequantize_keys_args(qkv, qkv.lengths, rotate, keys))
    module.launch("dequantize_values", grid, block,
                  quantize_launch.dequantize_values_args(qkv, qkv.lengths, rotate and config.rotate_values, values))
    np.testing.assert_array_equal(keys.view(np.uint8), cpu_keys.view(np.uint8))
    np.testing.assert_array_equal(values.view(np.uint8), cpu_values.view(np.uint8))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("config", [oc.QuantConfig(), oc.QuantConfig(bits=4, token_scaling="l2_per_head"),
                                    oc.QuantConfig.preset("kivi-2")], ids=["oscar-2", "per-head-4", "kivi-2"])
def test_dequantize_kernels_equal_cpu(rng, head_dim, config):
    dtype = DTYPES[head_dim // 64 % len(DTYPES)]
    k, v = random_kv(rng, batch=2, kv_heads=3, tokens=77, head_dim=head_dim, dtype=dtype)
    assert_dequantized_as_on_cpu(k, v, config, [77, 40])


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_dequantize_across_the_exponent_range(rng, scale_dtype):
    """Dequantizing (and rotating back) caches of tokens whose sizes span 10^-30 to 10^30, zero tokens among them."""
    sizes = 10.0 ** rng.uniform(-30, 30, size=(2, 1, 96, 1))
    sizes[:, :, rng.choice(96, 4, replace=False)] = 0.0
    k, v = (rng.standard_normal((2, 3, 96, 64)) * sizes for _ in range(2))
    for config in (oc.QuantConfig(scale_dtype=scale_dtype), oc.QuantConfig(bits=4, token_scaling="l2_per_head",
                                                                            scale_dtype=scale_dtype)):
        assert_dequantized_as_on_cpu(k.astype(np.float32), v.astype(np.float32), config, [96, 50])


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
def test_hadamard_kernel_equals_cpu(rng, size):
    dtype = DTYPES[size % 3]
    x = rng.standard_normal((5, 7, size)).astype(dtype)
    out = poisoned_like(x.shape, dtype)
    rows = x.size // size
    grid, block = quantize_launch.hadamard_launch(rows, size)
    Module(kernels.rotate_variant(size, np.dtype(dtype).name)).launch(
        "hadamard_rows", grid, block, (x, out, np.int64(rows), quantize_launch.hadamard_normalization(size)))
    np.testing.assert_array_equal(out.view(np.uint8), oc.hadamard(x).view(np.uint8))


def test_window_append_kernel(rng):
    """New tokens of strided keys and values go after each sequence's own window tokens; nothing else is written."""
    k, v = random_kv(rng, batch=3, kv_heads=2, tokens=5, head_dim=64, dtype=np.float16)
    k, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (k, v))  # token stride H * D
    lengths = np.array([0, 7, 11], np.int64)
    window_k, window_v = (poisoned_like((3, 2, 16, 64), np.float16) for _ in range(2))
    grid, block, args = quantize_launch.window_append_launch(k, v, window_k, window_v, lengths)
    Module(kernels.window_variant("float16")).launch("window_append", grid, block, args)
    for b, start in enumerate(lengths):
        for window, new in ((window_k, k), (window_v, v)):
            np.testing.assert_array_equal(window[b, :, start:start + 5], new[b])
            assert np.isnan(window[b, :, :start]).all() and np.isnan(window[b, :, start + 5:]).all()
