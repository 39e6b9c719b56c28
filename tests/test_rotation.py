import numpy as np
import pytest
import torch
from conftest import DTYPES
from oracle import sylvester

import oscar_cupy as oc

SIZES = [16, 32, 64, 128, 256]


@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_textbook_orthogonal_and_self_inverse(n):
    h = oc.hadamard_matrix(n)
    np.testing.assert_array_equal(h, sylvester(n))
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("n", SIZES)
def test_transform_matches_matrix_product(rng, n):
    x = rng.standard_normal((3, 5, n)).astype(np.float32)
    np.testing.assert_allclose(oc.hadamard(x), x.astype(np.float64) @ sylvester(n).T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", SIZES)
def test_twice_is_identity_and_norm_is_kept(rng, n):
    x = rng.standard_normal((4, n)).astype(np.float32)
    np.testing.assert_allclose(oc.hadamard(oc.hadamard(x)), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(oc.hadamard(x), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)


def test_exact_at_power_of_four(rng):
    """For n = 4**k the normalization is a power of two: small integers transform exactly."""
    x = rng.integers(-8, 8, size=(10, 64)).astype(np.float32)
    np.testing.assert_array_equal(oc.hadamard(x), (x.astype(np.float64) @ sylvester(64)).astype(np.float32))


def test_axis(rng):
    x = rng.standard_normal((32, 3)).astype(np.float32)
    np.testing.assert_allclose(oc.hadamard(x, axis=0), oc.hadamard(x.T).T, atol=1e-6)
    with pytest.raises(ValueError, match="axis"):
        oc.hadamard(x, axis=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keeps_dtype_and_kind(rng, dtype):
    x = rng.standard_normal((2, 64)).astype(dtype)
    assert oc.hadamard(x).dtype == x.dtype
    t = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32)).to(torch.bfloat16)
    result = oc.hadamard(t)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.bfloat16
    expected = oc.hadamard(t.float().numpy())
    np.testing.assert_allclose(result.float().numpy(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [8, 48, 100, 512])
def test_unsupported_length_is_refused(n):
    with pytest.raises(ValueError, match="power of two from 16 to 256"):
        oc.hadamard(np.zeros((2, n), dtype=np.float32))


def test_bad_dtype_and_type():
    with pytest.raises(TypeError, match="x has dtype int64"):
        oc.hadamard(np.zeros((2, 64), dtype=np.int64))
    with pytest.raises(TypeError, match="x: expected a numpy array"):
        oc.hadamard([[0.0] * 64])


def test_input_untouched(rng):
    x = rng.standard_normal((3, 64)).astype(np.float32)
    before = x.copy()
    oc.hadamard(x)
    np.testing.assert_array_equal(x, before)
