"""Bad inputs raise a clear exception naming the argument, and no call changes the caller's arrays."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import random_kv

import oscar_cupy as oc


@pytest.fixture
def kv(rng):
    return random_kv(rng, batch=2, kv_heads=2, tokens=40, head_dim=64)


@pytest.mark.parametrize("change, error, message", [
    (lambda k, v: (k[0], v[0]), ValueError, "k must have 4 dimensions"),
    (lambda k, v: (k.astype(np.int32), v), TypeError, "k has dtype int32"),
    (lambda k, v: (k, v.astype(np.float64)), TypeError, "v has dtype float64"),
    (lambda k, v: (k, v.astype(np.float16)), TypeError, "v has dtype float16 but k has float32"),
    (lambda k, v: (k, v[:, :, :30]), ValueError, "v has shape"),
    (lambda k, v: (k[..., :48], v[..., :48]), ValueError, "head_dim 48 is not supported"),
    (lambda k, v: (np.concatenate([k, k[..., :32]], -1), np.concatenate([v, v[..., :32]], -1)), ValueError,
     "head_dim 96"),
    (lambda k, v: (k.tolist(), v), TypeError, "k: expected a numpy array"),
    (lambda k, v: (torch.from_numpy(k), v), TypeError, "mix array kinds"),
])
def test_quantize_kv_rejects(kv, change, error, message):
    k, v = change(*kv)
    with pytest.raises(error, match=message):
        oc.quantize_kv(k, v)


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(kv, where, bad):
    k, v = (a.copy() for a in kv)
    (k if where == "k" else v)[1, 0, 7, 3] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        oc.quantize_kv(k, v)
    oc.quantize_kv(k, v, lengths=[40, 7])  # ... unless it is padding


@pytest.mark.parametrize("lengths, error, message", [
    ([40], ValueError, r"lengths must have shape \(2,\)"),
    ([40, 41], ValueError, r"lengths must lie in \[0, 40\]"),
    ([-1, 3], ValueError, "lengths must lie in"),
    (np.array([1.5, 2.0]), TypeError, "lengths must hold integers"),
])
def test_bad_lengths(kv, lengths, error, message):
    with pytest.raises(error, match=message):
        oc.quantize_kv(*kv, lengths=lengths)


def test_values_beyond_the_scale_dtype(kv):
    k, v = kv
    with pytest.raises(ValueError, match="v holds .* beyond the range of scale_dtype float16"):
        oc.quantize_kv(k, v * 0 + 1e5)
    oc.quantize_kv(k, v * 0 + 1e5, oc.QuantConfig(scale_dtype="bfloat16"))
    with pytest.raises(ValueError, match="k holds"):
        oc.quantize_kv(k * 0 + 1e5, v, oc.QuantConfig.preset("kivi-2"))


@pytest.mark.parametrize("scaling", ["l2", "l2_per_head"])
def test_a_token_norm_beyond_float32(kv, scaling):
    """Finite keys whose token norm overflows float32 are refused, not scaled by an infinite norm; at padding tokens
    they are not looked at."""
    k, v = (a.copy() for a in kv)
    k[1, 0, 5, :2] = 3e38
    config = oc.QuantConfig(rotation="none", token_scaling=scaling, scale_dtype="float32")
    with pytest.raises(ValueError, match="k holds a token whose L2 norm exceeds float32's range"):
        oc.quantize_kv(k, v, config)
    oc.quantize_kv(k, v, config, lengths=[40, 5])


def test_an_inconsistent_quantized_kv_is_refused(kv, rng):
    """A QuantizedKV whose fields do not form its config's packed layout is refused before any kernel reads it."""
    qkv = oc.quantize_kv(*kv)
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    cases = [
        (dict(k_scales=qkv.k_scales[:, :, :1]), r"QuantizedKV.k_scales must be float16 of shape \(2, 2, 2, 64\)"),
        (dict(k_codes=qkv.k_codes.astype(np.float32)), "QuantizedKV.k_codes must be uint32"),
        (dict(config=oc.QuantConfig(bits=4)), "QuantizedKV.k_codes must be uint32 of shape"),
        (dict(norms=None), "QuantizedKV.norms must be float32"),
        (dict(lengths=np.array([1000, -5])), r"QuantizedKV.lengths must lie in \[0, 40\]"),
        (dict(lengths=np.array([40, 40], np.int32)), "QuantizedKV.lengths must be int64"),
        (dict(num_tokens=100), r"QuantizedKV.num_tokens must lie in \[0, 64\]"),
        (dict(config="oscar-2"), "QuantizedKV.config must be a QuantConfig"),
    ]
    for change, message in cases:
        bad = dataclasses.replace(qkv, **change)
        with pytest.raises((TypeError, ValueError), match=message):
            oc.dequantize_kv(bad)
        with pytest.raises((TypeError, ValueError), match=message):
            oc.decode_attention(q, bad)
    oc.decode_attention(q, dataclasses.replace(qkv))  # an unchanged copy is checked and passes
    with pytest.raises(TypeError, match="qkv must be a QuantizedKV"):
        oc.dequantize_kv(qkv.k_codes)


def test_arguments_of_the_wrong_type(kv):
    k, v = kv
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        oc.quantize_kv(k, v, "oscar-2")
    for field, value in (("bits", 2.0), ("key_group", 32.0), ("value_group", np.float64(32)),
                         ("scale_dtype", np.dtype("float16"))):
        with pytest.raises(ValueError, match=f"QuantConfig.{field} must be one of"):
            oc.QuantConfig(**{field: value})
    qkv = oc.quantize_kv(k, v)
    q = np.ones((2, 2, 1, 64), np.float32)
    for scale in ("a", np.array([1.0, 2.0]), 0.1 + 1j, True):
        with pytest.raises(TypeError, match="scale must be a real number"):
            oc.decode_attention(q, qkv, scale=scale)
    for axis in (0.0, "0", None):
        with pytest.raises(TypeError, match="axis must be an integer"):
            oc.hadamard(k, axis=axis)
    with pytest.raises(TypeError, match="n must be an integer, got 16.0"):
        oc.hadamard_matrix(16.0)


def test_array_kinds_that_are_not_plain_arrays(kv):
    k, v = kv
    with pytest.raises(TypeError, match="got MaskedArray"):
        oc.quantize_kv(np.ma.masked_array(k), v)
    with pytest.raises(TypeError, match="expected a dense torch tensor"):
        oc.hadamard(torch.from_numpy(k).to_sparse())
    with pytest.raises(TypeError, match="expected a dense torch tensor"):
        oc.hadamard(torch._neg_view(torch.from_numpy(k)))  # a lazy negative view (as .conj().imag makes)
    with pytest.raises(TypeError, match="expected a numpy array, cupy array or torch tensor, got dtype"):
        oc.hadamard(torch.float16)


def test_the_cpu_reference_does_not_depend_on_memory_layout(kv, rng):
    """Fortran-ordered or transposed inputs give the same bits as contiguous ones."""
    qkv = oc.quantize_kv(*kv)
    q = rng.standard_normal((2, 4, 3, 64)).astype(np.float32)
    contiguous = oc.decode_attention(q, qkv)
    np.testing.assert_array_equal(oc.decode_attention(np.asfortranarray(q), qkv), contiguous)
    transposed = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(oc.decode_attention(transposed, qkv), contiguous)


def test_empty_shapes(kv):
    k, v = kv
    empty = oc.quantize_kv(k[:, :, :0], v[:, :, :0])
    assert np.isnan(empty.bits_per_element) and empty.dequantize()[0].shape == (2, 2, 0, 64)
    with pytest.raises(ValueError, match="no KV heads"):
        oc.quantize_kv(k[:, :0], v[:, :0])


def test_value_group_wider_than_the_head(kv):
    with pytest.raises(ValueError, match="value_group \\(128\\) exceeds head_dim \\(64\\)"):
        oc.quantize_kv(*kv, oc.QuantConfig(value_group=128))


@pytest.fixture
def attention_case(rng, kv):
    qkv = oc.quantize_kv(*kv)
    window = random_kv(rng, batch=2, kv_heads=2, tokens=5, head_dim=64)
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    return q, qkv, window


@pytest.mark.parametrize("call, error, message", [
    (lambda q, c, w: oc.decode_attention(q[0], c), ValueError, "q must have 4 dimensions"),
    (lambda q, c, w: oc.decode_attention(q[:, :3], c), ValueError, "q has 3 heads, not a multiple of qkv's 2"),
    (lambda q, c, w: oc.decode_attention(q[:1], c), ValueError, "q has batch 1"),
    (lambda q, c, w: oc.decode_attention(q.astype(np.int8), c), TypeError, "q has dtype int8"),
    (lambda q, c, w: oc.decode_attention(q, "cache"), TypeError, "qkv must be a QuantizedKV"),
    (lambda q, c, w: oc.decode_attention(q, c, w[0]), ValueError, "window_k and window_v must be given together"),
    (lambda q, c, w: oc.decode_attention(q, c, w[0][:, :1], w[1][:, :1]), ValueError, "window_k has shape"),
    (lambda q, c, w: oc.decode_attention(q, c, w[0], w[1][:, :, :4]), ValueError, "window_v has shape"),
    (lambda q, c, w: oc.decode_attention(q, c, w[0].astype(np.float16), w[1]), TypeError, "window_k has dtype"),
    (lambda q, c, w: oc.decode_attention(q, c, lengths=[1, 1]), ValueError, "no window_k/window_v"),
    (lambda q, c, w: oc.decode_attention(q, c, *w, lengths=[6, 1]), ValueError, "lengths must lie in"),
    (lambda q, c, w: oc.decode_attention(q * np.nan, c), ValueError, "q contains NaN or Inf"),
    (lambda q, c, w: oc.decode_attention(q, c, w[0] * np.inf, w[1]), ValueError, "window_k contains NaN"),
    (lambda q, c, w: oc.decode_attention(q, c, scale=float("nan")), ValueError, "scale must be finite"),
    (lambda q, c, w: oc.decode_attention(torch.from_numpy(q), c, *w), TypeError, "mix array kinds"),
])
def test_decode_attention_rejects(attention_case, call, error, message):
    with pytest.raises(error, match=message):
        call(*attention_case)


def test_nothing_passed_in_is_modified(rng):
    k, v = random_kv(rng, tokens=50)
    wk, wv = random_kv(rng, tokens=6)
    q = rng.standard_normal((2, 4, 2, 64)).astype(np.float32)
    lengths, window_lengths = np.array([50, 20]), np.array([6, 2])
    arrays = [k, v, wk, wv, q, lengths, window_lengths]
    copies = [a.copy() for a in arrays]
    rotation = oc.hadamard_matrix(64)
    for config in (oc.QuantConfig(), oc.QuantConfig(rotation=rotation, token_scaling="l2_per_head")):
        qkv = oc.quantize_kv(k, v, config, lengths=lengths)
        qkv.dequantize()
        oc.decode_attention(q, qkv, wk, wv, lengths=window_lengths)
        oc.hadamard(q)
    for array, copy in zip(arrays, copies):
        np.testing.assert_array_equal(array, copy)
    np.testing.assert_array_equal(rotation, oc.hadamard_matrix(64))
