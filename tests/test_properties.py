"""Property tests: random shapes and configs against the float64 model (tests/oracle.py).

30 examples per test by default; ``HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py`` runs 600.
"""

import numpy as np
from checks import assert_matches_oracle, reference
from conftest import DTYPES, random_kv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oscar_cupy as oc

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    head_dim = draw(st.sampled_from([64, 128]))
    rotation = draw(st.sampled_from(["hadamard", "none", "random"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if rotation == "random":
        rotation = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))[0]
    config = oc.QuantConfig(
        bits=draw(st.sampled_from([2, 4])),
        key_group=draw(st.sampled_from([32, 64, 128])),
        value_group=draw(st.sampled_from([32, 64])),
        rotation=rotation,
        token_scaling=draw(st.sampled_from(["l2", "l2_per_head", "none"])),
        rotate_values=draw(st.booleans()),
        scale_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    tokens = draw(st.integers(0, 160))
    lengths = draw(st.lists(st.integers(0, tokens), min_size=batch, max_size=batch))
    window = draw(st.integers(0, 24))
    window_lengths = draw(st.lists(st.integers(0, window), min_size=batch, max_size=batch))
    shape = dict(
        batch=batch, kv_heads=kv_heads, ratio=draw(st.sampled_from([1, 2, 3, 4])), q_len=draw(st.integers(1, 3)),
        tokens=tokens, window=window, head_dim=head_dim, dtype=draw(st.sampled_from(DTYPES)),
    )
    return rng, config, shape, lengths, window_lengths


@SETTINGS
@given(cases())
def test_quantize_matches_model(case):
    rng, config, shape, lengths, _ = case
    k, v = random_kv(rng, shape["batch"], shape["kv_heads"], shape["tokens"], shape["head_dim"], shape["dtype"])
    qkv = oc.quantize_kv(k, v, config, lengths=lengths)
    assert qkv.capacity % config.key_group == 0 and qkv.capacity >= shape["tokens"]
    assert_matches_oracle(k.astype(np.float32), v.astype(np.float32), config, lengths, qkv)


@SETTINGS
@given(cases())
def test_attention_matches_model(case):
    rng, config, shape, lengths, window_lengths = case
    batch, kv_heads, head_dim, dtype = shape["batch"], shape["kv_heads"], shape["head_dim"], shape["dtype"]
    k, v = random_kv(rng, batch, kv_heads, shape["tokens"], head_dim, dtype)
    window_k, window_v = random_kv(rng, batch, kv_heads, shape["window"], head_dim, dtype)
    q = rng.standard_normal((batch, kv_heads * shape["ratio"], shape["q_len"], head_dim)).astype(dtype)
    qkv = oc.quantize_kv(k, v, config, lengths=lengths)
    out, lse = oc.decode_attention(q, qkv, window_k, window_v, lengths=window_lengths, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    expected, expected_lse = reference(q.astype(np.float32), qkv, window_k.astype(np.float32),
                                       window_v.astype(np.float32), window_lengths)
    tolerance = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-4, atol=1e-4)
