"""quantize_kv / dequantize_kv against the float64 model, with mixed lengths, odd lengths and every config axis."""

import ml_dtypes
import numpy as np
import pytest
import torch
from checks import assert_matches_oracle
from conftest import DTYPES, random_kv

import oscar_cupy as oc

CONFIGS = [
    oc.QuantConfig(),
    oc.QuantConfig(bits=4, key_group=64, value_group=64),
    oc.QuantConfig(key_group=128, value_group=128, token_scaling="l2_per_head", scale_dtype="bfloat16"),
    oc.QuantConfig.preset("kivi-2", scale_dtype="float32"),
    oc.QuantConfig.preset("hadamard-only-4"),
    oc.QuantConfig.preset("scaling-only-2", rotate_values=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.bits}b-g{c.key_group}-{c.token_scaling}-{c.rotation}")
def test_matches_float64_model_with_mixed_and_odd_lengths(rng, config):
    k, v = random_kv(rng, batch=3, kv_heads=2, tokens=150, head_dim=128)
    lengths = [150, 97, 1]
    qkv = oc.quantize_kv(k, v, config, lengths=lengths)
    assert qkv.capacity == -(-150 // config.key_group) * config.key_group
    assert_matches_oracle(k, v, config, lengths, qkv)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error(rng, head_dim, dtype):
    k, v = random_kv(rng, tokens=64, head_dim=head_dim, dtype=dtype)
    for bits, tolerance in ((2, 0.45), (4, 0.1)):  # uniform error: range / (2**bits - 1) / sqrt(12)
        qkv = oc.quantize_kv(k, v, oc.QuantConfig(bits=bits))
        keys, values = qkv.dequantize()
        assert keys.dtype == k.dtype and keys.shape == k.shape
        for original, restored in ((k, keys), (v, values)):
            original, restored = original.astype(np.float32), restored.astype(np.float32)
            relative = np.linalg.norm(restored - original) / np.linalg.norm(original)
            assert relative < tolerance


def test_each_sequence_as_if_alone(rng):
    """A batch with mixed lengths stores, for each sequence, exactly what quantizing it alone stores."""
    k, v = random_kv(rng, batch=3, tokens=200)
    k[2, :, 120:] = 1e4  # garbage beyond a sequence's length never enters its groups
    v[1, :, 50:] = np.nan
    lengths = np.array([200, 50, 120])
    qkv = oc.quantize_kv(k, v, lengths=lengths)
    for b, n in enumerate(lengths):
        alone = oc.quantize_kv(k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        for name, array in alone.arrays().items():
            rows = array.shape[2]
            np.testing.assert_array_equal(qkv.arrays()[name][b : b + 1, :, :rows], array, err_msg=name)


def test_empty_and_single_token(rng):
    k, v = random_kv(rng, tokens=0)
    qkv = oc.quantize_kv(k, v)
    assert qkv.capacity == 0 and qkv.nbytes == 0
    keys, values = qkv.dequantize()
    assert keys.shape == (2, 2, 0, 64)
    k, v = random_kv(rng, tokens=1)
    keys, values = oc.dequantize_kv(oc.quantize_kv(k, v, oc.QuantConfig(bits=4)))
    assert np.linalg.norm(values - v) < 0.1 * np.linalg.norm(v)


def test_nbytes_and_bits_per_element(rng):
    k, v = random_kv(rng, batch=1, kv_heads=8, tokens=256, head_dim=128)
    qkv = oc.quantize_kv(k, v)
    # per token and KV head: K codes 32 B + K params 128 channels * 4 B / 32 tokens = 16 B; V 32 B + 4 groups * 4 B;
    # plus one float32 norm per token shared by the 8 heads
    assert qkv.nbytes == 256 * 8 * (32 + 16 + 32 + 16) + 256 * 4
    assert qkv.bits_per_element == pytest.approx(3 + 32 / (8 * 128 * 2))
    assert 16 / qkv.bits_per_element == pytest.approx(5.31, abs=0.01)
    wide = oc.quantize_kv(k, v, oc.QuantConfig(bits=4, key_group=128, value_group=128, token_scaling="none"))
    assert wide.bits_per_element == pytest.approx(4.25)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_torch_tensors_in_torch_tensors_out(rng, dtype):
    k, v = random_kv(rng, tokens=40)
    kt, vt = torch.from_numpy(k).to(dtype), torch.from_numpy(v).to(dtype)
    before = kt.clone()
    qkv = oc.quantize_kv(kt, vt, lengths=torch.tensor([40, 33]))
    keys, values = qkv.dequantize()
    assert isinstance(keys, torch.Tensor) and keys.dtype == dtype and keys.shape == kt.shape
    assert torch.equal(kt, before)
    reference = oc.quantize_kv(kt.float().numpy(), vt.float().numpy(), lengths=[40, 33])
    np.testing.assert_array_equal(qkv.k_codes, reference.k_codes)
    np.testing.assert_array_equal(qkv.v_scales, reference.v_scales)


def test_bfloat16_numpy_matches_float32_of_same_values(rng):
    k, v = random_kv(rng, tokens=64, dtype=ml_dtypes.bfloat16)
    a = oc.quantize_kv(k, v)
    b = oc.quantize_kv(k.astype(np.float32), v.astype(np.float32))
    for name, array in a.arrays().items():
        np.testing.assert_array_equal(array, b.arrays()[name])
    assert a.dequantize()[0].dtype == ml_dtypes.bfloat16
