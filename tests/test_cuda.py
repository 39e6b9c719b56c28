"""The CUDA write path against the CPU reference: identical codes, scales, zeros and norms, every output written.

Skipped without cupy and a GPU; run on the device machine (see bench/results/cuda_tests.md).
"""

import itertools
import os

import ml_dtypes
import numpy as np
import pytest
from conftest import DTYPES, WRITE_PATH_CONFIGS, config_id, random_kv

import oscar_cupy as oc

from gpu import GPUS, REAL_KV, cupy, poison_memory_pool, pytestmark  # noqa: F401  (pytestmark marks the module)

from oscar_cupy import cuda_backend, layout  # noqa: E402  (needs cupy)


def poisoned(arrays: dict) -> dict:
    """The same arrays, every byte set to 0xFF (NaN for floats, all ones for codes)."""
    for array in arrays.values():
        array.view(cupy.uint8).fill(0xFF)
    return arrays



def gpu_quantize(k, v, config, lengths):
    """Quantize numpy k, v on the GPU into poisoned outputs; numpy results."""
    batch, heads, tokens, head_dim = k.shape
    capacity = layout.capacity(tokens, config)
    out = poisoned(cuda_backend.allocate(config, batch, heads, capacity, head_dim))
    cuda_backend.quantize_into(cupy.asarray(k), cupy.asarray(v), config, np.asarray(lengths, np.int64), out)
    return {name: cupy.asnumpy(array) for name, array in out.items()}


def assert_same_as_cpu(k, v, config, lengths):
    cpu = oc.quantize_kv(k, v, config, lengths=lengths).arrays()
    gpu = gpu_quantize(k, v, config, lengths)
    assert set(gpu) == set(cpu)
    for name in cpu:
        assert gpu[name].dtype == cpu[name].dtype and gpu[name].shape == cpu[name].shape, name
        np.testing.assert_array_equal(gpu[name].view(np.uint8), cpu[name].view(np.uint8), err_msg=name)




@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("config", WRITE_PATH_CONFIGS, ids=config_id)
def test_quantize_equals_cpu(rng, dtype, head_dim, config):
    if config.value_group > head_dim:
        pytest.skip("value group wider than the head")
    k, v = random_kv(rng, batch=3, kv_heads=3, tokens=300, head_dim=head_dim, dtype=dtype)
    assert_same_as_cpu(k, v, config, [300, 173, 1])


def test_custom_rotation_matrix_matches_cpu_closely(rng):
    rotation = np.linalg.qr(rng.standard_normal((128, 128)))[0]
    config = oc.QuantConfig(rotation=rotation)
    k, v = random_kv(rng, batch=2, tokens=96, head_dim=128)
    cpu = oc.quantize_kv(k, v, config)
    gpu = oc.quantize_kv(cupy.asarray(k), cupy.asarray(v), config)
    # a float64 product summed in another order: codes may move by one step at rounding ties
    for name in ("k_codes", "v_codes"):
        unpack = layout.unpack_key_codes if name == "k_codes" else layout.unpack_value_codes
        differ = np.abs(unpack(cupy.asnumpy(getattr(gpu, name)), 2).astype(int) - unpack(getattr(cpu, name), 2))
        assert differ.max() <= 1 and differ.mean() < 1e-3
    keys, values = gpu.dequantize()
    np.testing.assert_allclose(cupy.asnumpy(keys), cpu.dequantize()[0], rtol=1e-4, atol=1e-4)


def test_every_length_and_group_edge(rng):
    """Lengths around group and tile edges, empty sequences, one token."""
    k, v = random_kv(rng, batch=8, kv_heads=2, tokens=130, head_dim=64, dtype=ml_dtypes.bfloat16)
    for config in (oc.QuantConfig(), oc.QuantConfig(bits=4, key_group=128)):
        assert_same_as_cpu(k, v, config, [130, 129, 128, 97, 33, 32, 1, 0])


def test_real_model_kv():
    if not os.path.exists(REAL_KV):
        pytest.skip(f"{REAL_KV} not found (make it with bench/dump_kv.py)")
    dump = np.load(REAL_KV)
    keys, values = dump["keys"], dump["values"]  # (layers, 1, kv_heads, tokens, head_dim)
    for layer in range(keys.shape[0]):
        k, v = keys[layer].astype(ml_dtypes.bfloat16), values[layer].astype(ml_dtypes.bfloat16)
        assert_same_as_cpu(k, v, oc.QuantConfig(), [k.shape[2]])
        assert_same_as_cpu(k, v, oc.QuantConfig(bits=4), [k.shape[2] - 5])


def test_strided_inputs_as_transformers_hands_them(rng):
    """(B, T, H, D) storage viewed as (B, H, T, D): token stride H * D."""
    k, v = random_kv(rng, batch=2, kv_heads=4, tokens=64, head_dim=128, dtype=np.float16)
    k_bthd, v_bthd = (cupy.asarray(np.ascontiguousarray(a.transpose(0, 2, 1, 3))) for a in (k, v))
    strided = oc.quantize_kv(k_bthd.transpose(0, 2, 1, 3), v_bthd.transpose(0, 2, 1, 3))
    cpu = oc.quantize_kv(k, v)
    for name, array in cpu.arrays().items():
        np.testing.assert_array_equal(cupy.asnumpy(strided.arrays()[name]), array, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("config", [oc.QuantConfig(), oc.QuantConfig(bits=4, token_scaling="l2_per_head"),
                                    oc.QuantConfig.preset("kivi-2")], ids=["oscar-2", "per-head-4", "kivi-2"])
def test_dequantize_equals_cpu(rng, dtype, config):
    k, v = random_kv(rng, batch=2, kv_heads=3, tokens=77, head_dim=128, dtype=dtype)
    cpu_keys, cpu_values = oc.quantize_kv(k, v, config, lengths=[77, 40]).dequantize()
    qkv = oc.quantize_kv(cupy.asarray(k), cupy.asarray(v), config, lengths=[77, 40])
    poison_memory_pool()
    keys, values = qkv.dequantize()
    assert keys.dtype == cpu_keys.dtype
    np.testing.assert_array_equal(cupy.asnumpy(keys).view(np.uint8), cpu_keys.view(np.uint8))
    np.testing.assert_array_equal(cupy.asnumpy(values).view(np.uint8), cpu_values.view(np.uint8))


@pytest.mark.parametrize("size, dtype", itertools.product([16, 32, 64, 128, 256], DTYPES))
def test_hadamard_equals_cpu(rng, size, dtype):
    x = rng.standard_normal((5, 7, size)).astype(dtype)
    poison_memory_pool()
    result = oc.hadamard(cupy.asarray(x))
    np.testing.assert_array_equal(cupy.asnumpy(result).view(np.uint8), oc.hadamard(x).view(np.uint8))
    y = rng.standard_normal((size, 3)).astype(dtype)
    np.testing.assert_array_equal(cupy.asnumpy(oc.hadamard(cupy.asarray(y), axis=0)), oc.hadamard(y, axis=0))
    x_gpu = cupy.asarray(x)
    out = cupy.empty_like(x_gpu)  # into a given output (the capturable form), poisoned: the same bits
    out.view(cupy.uint8).fill(0xFF)
    assert cuda_backend.hadamard_last_axis(x_gpu, out) is out
    np.testing.assert_array_equal(cupy.asnumpy(out).view(np.uint8), oc.hadamard(x).view(np.uint8))


def test_refusals(rng):
    k, v = random_kv(rng, tokens=64)
    bad = k.copy()
    bad[1, 0, 10, 3] = np.nan
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        oc.quantize_kv(cupy.asarray(bad), cupy.asarray(v))
    oc.quantize_kv(cupy.asarray(bad), cupy.asarray(v), lengths=[64, 10])  # padding is never read
    with pytest.raises(ValueError, match="v holds values beyond the range of scale_dtype float16"):
        oc.quantize_kv(cupy.asarray(k), cupy.asarray(v * 0 + 1e5))
    huge = k.copy()
    huge[1, 0, 5, :2] = 3e38  # finite keys whose token norm overflows float32
    with pytest.raises(ValueError, match="k holds a token whose L2 norm exceeds float32's range"):
        oc.quantize_kv(cupy.asarray(huge), cupy.asarray(v), oc.QuantConfig(rotation="none", scale_dtype="float32"))
    for dtype in (np.float16, ml_dtypes.bfloat16):  # 16-bit values are checked two at a time, either half
        for channel in (6, 7):
            bad_v = v.astype(dtype)
            bad_v[1, 1, 20, channel] = np.inf
            with pytest.raises(ValueError, match="v contains NaN or Inf"):
                oc.quantize_kv(cupy.asarray(k.astype(dtype)), cupy.asarray(bad_v))
            oc.quantize_kv(cupy.asarray(k.astype(dtype)), cupy.asarray(bad_v), lengths=[64, 20])
    before = k.copy()
    oc.quantize_kv(cupy.asarray(k), cupy.asarray(v)).dequantize()
    np.testing.assert_array_equal(k, before)


def test_torch_tensors_on_torch_stream(rng):
    torch = pytest.importorskip("torch")
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=96, head_dim=128)
    kt = torch.from_numpy(k).to("cuda", torch.bfloat16)
    vt = torch.from_numpy(v).to("cuda", torch.bfloat16)
    before = kt.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        qkv = oc.quantize_kv(kt, vt, lengths=[96, 50])
        keys, values = qkv.dequantize()
    stream.synchronize()
    assert isinstance(keys, torch.Tensor) and keys.dtype == torch.bfloat16 and keys.device == kt.device
    assert torch.equal(kt, before)
    reference = oc.quantize_kv(kt.cpu(), vt.cpu(), lengths=[96, 50])
    for name, array in reference.arrays().items():
        np.testing.assert_array_equal(cupy.asnumpy(qkv.arrays()[name]), array, err_msg=name)
    assert torch.equal(keys.cpu(), reference.dequantize()[0])


def test_quantize_captured_in_a_cuda_graph(rng):
    """The write path's two kernels (the value kernel on a second stream, forked from and joined back into the
    current one) capture into a CUDA graph; a replay writes what the CPU reference writes, before the stream's next
    work (copies made on the stream right after it)."""
    batch, heads, tokens = 4, 8, 2048
    k, v = random_kv(rng, batch=batch, kv_heads=heads, tokens=tokens, head_dim=128)
    config = oc.QuantConfig()
    cpu = oc.quantize_kv(k, v, config).arrays()
    k_gpu, v_gpu = cupy.asarray(k), cupy.asarray(v)
    lengths = cupy.full(batch, tokens, dtype=cupy.int64)
    out = cuda_backend.allocate(config, batch, heads, layout.capacity(tokens, config), 128)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cuda_backend.launch_quantize(k_gpu, v_gpu, config, lengths, out)  # compiles
        stream.begin_capture()
        refused = cuda_backend.launch_quantize(k_gpu, v_gpu, config, lengths, out)
        graph = stream.end_capture()
        poisoned(out)
        graph.launch(stream)
        copies = {name: array.copy() for name, array in out.items()}
    stream.synchronize()
    assert int(refused.get()[0]) == 0
    for name, array in cpu.items():
        np.testing.assert_array_equal(cupy.asnumpy(copies[name]).view(np.uint8), array.view(np.uint8), err_msg=name)


@pytest.mark.skipif(GPUS < 2, reason="one GPU")
def test_launches_on_the_inputs_device(rng):
    k, v = random_kv(rng, tokens=64)
    with cupy.cuda.Device(1):
        k1, v1 = cupy.asarray(k), cupy.asarray(v)
    qkv = oc.quantize_kv(k1, v1)
    assert qkv.k_codes.device.id == 1
    np.testing.assert_array_equal(cupy.asnumpy(qkv.k_codes), oc.quantize_kv(k, v).k_codes)


def test_layer_cache_on_the_gpu_stores_what_the_cpu_cache_stores(rng):
    from oscar_cupy.cache import LayerCache

    config = oc.QuantConfig(window=64)
    k, v = random_kv(rng, batch=2, kv_heads=3, tokens=260, head_dim=128, dtype=np.float16)
    caches = [LayerCache(config, 2, 3, 128, np.float16, like=like) for like in (k, cupy.asarray(k))]
    for cache, convert in zip(caches, (np.asarray, cupy.asarray)):
        cache.prefill(convert(k[:, :, :100]), convert(v[:, :, :100]), lengths=[100, 70])
        for t in range(100, 260, 8):  # chunks of 8 tokens, flushed after each step as after attention
            cache.append(convert(k[:, :, t : t + 8]), convert(v[:, :, t : t + 8]))
            cache.flush()
    cpu, gpu = caches
    np.testing.assert_array_equal(gpu.packed_lengths, cpu.packed_lengths)
    np.testing.assert_array_equal(gpu.window_lengths, cpu.window_lengths)
    for name, array in cpu.packed().arrays().items():
        np.testing.assert_array_equal(cupy.asnumpy(gpu.packed().arrays()[name]), array, err_msg=name)
    np.testing.assert_array_equal(cupy.asnumpy(gpu._window_k), cpu._window_k)
