"""decode_attention against the float64 model, and its edge cases."""

import ml_dtypes
import numpy as np
import pytest
import torch
from checks import reference
from conftest import random_kv

import oscar_cupy as oc


def make_case(rng, batch=2, kv_heads=2, ratio=2, packed=100, window=20, q_len=1, head_dim=64, config=None,
              lengths=None, window_lengths=None):
    k, v = random_kv(rng, batch, kv_heads, packed, head_dim)
    qkv = oc.quantize_kv(k, v, config or oc.QuantConfig(), lengths=lengths)
    wk, wv = random_kv(rng, batch, kv_heads, window, head_dim)
    q = rng.standard_normal((batch, kv_heads * ratio, q_len, head_dim)).astype(np.float32)
    return q, qkv, wk, wv


CONFIGS = [
    oc.QuantConfig(),
    oc.QuantConfig(bits=4, key_group=64, value_group=64, token_scaling="l2_per_head"),
    oc.QuantConfig.preset("kivi-2"),
    oc.QuantConfig.preset("scaling-only-2", rotate_values=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.bits}b-{c.token_scaling}-{c.rotation}-{c.rotate_values}")
@pytest.mark.parametrize("ratio", [1, 3, 4, 8, 16])
def test_matches_float64_model(rng, config, ratio):
    q, qkv, wk, wv = make_case(rng, ratio=ratio, config=config, lengths=[100, 37])
    out, lse = oc.decode_attention(q, qkv, wk, wv, lengths=[20, 5], return_lse=True)
    expected, expected_lse = reference(q, qkv, wk, wv, [20, 5])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("q_len", [1, 3, 8])
def test_head_dims_and_query_lengths(rng, head_dim, q_len):
    q, qkv, wk, wv = make_case(rng, head_dim=head_dim, q_len=q_len, packed=70, window=12, lengths=[70, 64])
    out = oc.decode_attention(q, qkv, wk, wv, lengths=[12, 3], scale=0.3)
    np.testing.assert_allclose(out, reference(q, qkv, wk, wv, [12, 3], scale=0.3)[0], rtol=1e-4, atol=1e-4)


def test_causal_queries_equal_one_at_a_time(rng):
    """q_len queries are the last q_len tokens: query i equals a single-query call with the window cut after it."""
    q, qkv, wk, wv = make_case(rng, q_len=4, window=10)
    out = oc.decode_attention(q, qkv, wk, wv, lengths=[10, 6])
    for i in range(4):
        cut = np.array([10, 6]) - (3 - i)
        single = oc.decode_attention(q[:, :, i : i + 1], qkv, wk, wv, lengths=cut)
        np.testing.assert_allclose(out[:, :, i : i + 1], single, rtol=1e-6, atol=1e-6)


def test_mixed_lengths_equal_each_sequence_alone(rng):
    k, v = random_kv(rng, batch=3, tokens=90)
    wk, wv = random_kv(rng, batch=3, tokens=16)
    wk[1, :, 4:] = np.nan  # window padding is never read
    q = rng.standard_normal((3, 4, 1, 64)).astype(np.float32)
    lengths, window_lengths = [90, 33, 0], [16, 4, 9]
    out = oc.decode_attention(q, oc.quantize_kv(k, v, lengths=lengths), wk, wv, lengths=window_lengths)
    for b in range(3):
        alone = oc.quantize_kv(k[b : b + 1, :, : lengths[b]], v[b : b + 1, :, : lengths[b]])
        single = oc.decode_attention(q[b : b + 1], alone, wk[b : b + 1, :, : window_lengths[b]],
                                     wv[b : b + 1, :, : window_lengths[b]])
        np.testing.assert_allclose(out[b : b + 1], single, rtol=1e-6, atol=1e-6)


def test_empty_packed_part_is_plain_attention(rng):
    q, qkv, wk, wv = make_case(rng, packed=0, window=30)
    out = oc.decode_attention(q, qkv, wk, wv)
    k = np.repeat(wk, 2, axis=1).astype(np.float64)
    weights = np.exp(q @ k.swapaxes(-1, -2) / 8)
    expected = (weights / weights.sum(-1, keepdims=True)) @ np.repeat(wv, 2, axis=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_empty_window_and_no_window(rng):
    q, qkv, wk, wv = make_case(rng, window=0)
    np.testing.assert_array_equal(oc.decode_attention(q, qkv, wk, wv), oc.decode_attention(q, qkv))
    np.testing.assert_allclose(oc.decode_attention(q, qkv), reference(q, qkv)[0], rtol=1e-4, atol=1e-4)


def test_nothing_visible_gives_zeros(rng):
    q, qkv, wk, wv = make_case(rng, packed=0, window=4)
    out, lse = oc.decode_attention(q, qkv, wk, wv, lengths=[0, 2], return_lse=True)
    assert not out[0].any() and np.all(lse[0] == -np.inf)
    assert out[1].any() and np.all(np.isfinite(lse[1]))


def test_single_token(rng):
    q, qkv, wk, wv = make_case(rng, packed=1, window=0)
    out = oc.decode_attention(q, qkv)
    keys, values = qkv.dequantize()  # one token: the output is its dequantized value
    np.testing.assert_allclose(out, np.repeat(values, 2, axis=1), rtol=1e-4, atol=1e-4)


def test_lse_merges_packed_and_window(rng):
    q, qkv, wk, wv = make_case(rng)
    both, lse = oc.decode_attention(q, qkv, wk, wv, return_lse=True)
    packed, lse_p = oc.decode_attention(q, qkv, return_lse=True)
    empty = oc.quantize_kv(*random_kv(rng, tokens=0))
    window, lse_w = oc.decode_attention(q, empty, wk, wv, return_lse=True)
    merged_lse = np.logaddexp(lse_p, lse_w)
    merged = packed * np.exp(lse_p - merged_lse)[..., None] + window * np.exp(lse_w - merged_lse)[..., None]
    np.testing.assert_allclose(both, merged, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, merged_lse, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_inputs(rng, dtype):
    q, qkv, wk, wv = make_case(rng)
    out = oc.decode_attention(q.astype(dtype), qkv, wk.astype(dtype), wv.astype(dtype))
    assert out.dtype == dtype
    expected = reference(q.astype(dtype).astype(np.float32), qkv, wk.astype(dtype), wv.astype(dtype))[0]
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_torch_in_torch_out(rng):
    q, qkv, wk, wv = make_case(rng)
    tq, twk, twv = (torch.from_numpy(a).to(torch.bfloat16) for a in (q, wk, wv))
    before = tq.clone()
    out = oc.decode_attention(tq, qkv, twk, twv, lengths=torch.tensor([20, 1]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == tq.shape
    assert torch.equal(tq, before)
    expected = oc.decode_attention(tq.float().numpy(), qkv, twk.float().numpy(), twv.float().numpy(), lengths=[20, 1])
    np.testing.assert_allclose(out.float().numpy(), expected, rtol=1e-2, atol=1e-2)
