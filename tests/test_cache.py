"""The layer cache: the method's policy (prefill packs whole blocks, decode appends and flushes), storage growth, byte
accounting, mixed lengths and batch editing."""

import numpy as np
import pytest
from conftest import random_kv

import oscar_cupy as oc
from oscar_cupy.cache import LayerCache

CONFIG = oc.QuantConfig(window=64)  # a small flush block, so that tests flush often


def reference(k, v, lengths, packed_lengths, q):
    """decode_attention over quantize_kv of each sequence's packed tokens plus the rest in full precision."""
    packed = oc.quantize_kv(k[:, :, : packed_lengths.max()], v[:, :, : packed_lengths.max()], CONFIG,
                            lengths=packed_lengths)
    window = int((lengths - packed_lengths).max())
    wk = np.zeros(k.shape[:2] + (max(window, 1),) + k.shape[3:], k.dtype)
    wv = np.zeros_like(wk)
    for b in range(k.shape[0]):
        rest = lengths[b] - packed_lengths[b]
        wk[b, :, :rest] = k[b, :, packed_lengths[b] : lengths[b]]
        wv[b, :, :rest] = v[b, :, packed_lengths[b] : lengths[b]]
    return packed, oc.decode_attention(q, packed, wk, wv, lengths=lengths - packed_lengths)


def test_prefill_then_decode_matches_quantizing_the_same_tokens(rng):
    k, v = random_kv(rng, batch=3, kv_heads=2, tokens=300, head_dim=64)
    prompt = np.array([150, 64, 7])
    cache = LayerCache(CONFIG, 3, 2, 64, np.float32)
    cache.prefill(k[:, :, :150], v[:, :, :150], lengths=prompt)
    assert cache.packed_lengths.tolist() == [128, 64, 0] and cache.window_lengths.tolist() == [22, 0, 7]
    lengths = prompt.copy()
    for step in range(140):  # every sequence gets one token per step, at its own position
        new_k = np.stack([k[b, :, lengths[b]] for b in range(3)])[:, :, None]
        new_v = np.stack([v[b, :, lengths[b]] for b in range(3)])[:, :, None]
        cache.append(new_k, new_v)
        lengths += 1
        q = rng.standard_normal((3, 4, 1, 64)).astype(np.float32)
        out = cache.attend(q)
        packed, expected = reference(k, v, lengths, cache.packed_lengths, q)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        cache.flush()
        assert (cache.window_lengths < CONFIG.window).all()
        assert (cache.packed_lengths % CONFIG.window == 0).all()
        np.testing.assert_array_equal(cache.lengths, lengths)
    stored = cache.packed().arrays()
    for name, array in packed.arrays().items():
        for b in range(3):  # each sequence's packed rows equal quantize_kv's, bit for bit
            rows = array.shape[2] * int(cache.packed_lengths[b]) // packed.capacity
            np.testing.assert_array_equal(stored[name][b, :, :rows], array[b, :, :rows], err_msg=name)


def test_growth_is_amortized(rng):
    cache = LayerCache(CONFIG, 1, 1, 64, np.float32)
    k, v = random_kv(rng, batch=1, kv_heads=1, tokens=64 * 40, head_dim=64)
    for block in range(40):
        cache.append(k[:, :, 64 * block : 64 * (block + 1)], v[:, :, 64 * block : 64 * (block + 1)])
        cache.flush()
    assert cache.packed_lengths[0] == 64 * 40 and cache.capacity >= 64 * 40
    assert cache.reallocations <= 7  # doubling: log2(40 blocks) + 1, not one copy per flush


def test_capacity_counts_the_whole_flush_blocks_only(rng):
    """A cache made for 232 tokens per sequence allocates packed room for 3 flush blocks of 64 (the last 40 tokens stay
    in the window) and holds 232 tokens, decoded one at a time, without growing."""
    cache = LayerCache(CONFIG, 2, 1, 64, np.float32, capacity=3 * 64 + 40)
    assert cache.capacity == 3 * 64
    k, v = random_kv(rng, batch=2, kv_heads=1, tokens=232, head_dim=64)
    cache.prefill(k[:, :, :100], v[:, :, :100])
    for t in range(100, 232):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        cache.flush()
    assert cache.packed_lengths.tolist() == [192, 192] and cache.window_lengths.tolist() == [40, 40]
    assert cache.reallocations == 0 and cache.capacity == 3 * 64 and cache._window_k.shape[2] == 64


def test_byte_accounting():
    cache = LayerCache(oc.QuantConfig(), 1, 8, 128, np.float16)
    # oscar-2, head_dim 128, 8 KV heads: K 32 + 16 and V 32 + 16 bytes per head, one float32 norm per token
    assert cache.packed_bytes_per_token() == 8 * 96 + 4 == 772
    cache.packed_lengths[:] = 512
    cache.window_lengths[:] = 10
    assert cache.stored_nbytes() == 512 * 772 + 10 * 2 * 8 * 128 * 2
    assert cache.bf16_nbytes() == 522 * 2 * 8 * 128 * 2
    assert cache.nbytes == cache._window_k.nbytes * 2 + sum(a.nbytes for a in cache._packed.values())


def test_mixed_lengths_equal_each_sequence_alone(rng):
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=200, head_dim=64)
    q = rng.standard_normal((2, 2, 1, 64)).astype(np.float32)
    together = LayerCache(CONFIG, 2, 2, 64, np.float32)
    together.prefill(k, v, lengths=[200, 90])
    out = together.attend(q)
    for b, length in enumerate((200, 90)):
        alone = LayerCache(CONFIG, 1, 2, 64, np.float32)
        alone.prefill(k[b : b + 1, :, :length], v[b : b + 1, :, :length])
        np.testing.assert_allclose(out[b : b + 1], alone.attend(q[b : b + 1]), rtol=1e-6, atol=1e-6)


def test_reorder_crop_reset(rng):
    k, v = random_kv(rng, batch=3, kv_heads=1, tokens=100, head_dim=64)
    cache = LayerCache(CONFIG, 3, 1, 64, np.float32)
    cache.prefill(k, v, lengths=[100, 80, 30])
    q = rng.standard_normal((3, 1, 1, 64)).astype(np.float32)
    before = cache.attend(q)
    cache.reorder([2, 0, 0])
    assert cache.batch == 3 and cache.lengths.tolist() == [30, 100, 100]
    np.testing.assert_allclose(cache.attend(q[[2, 0, 0]]), before[[2, 0, 0]], rtol=1e-6, atol=1e-6)
    cache.crop(70)
    assert cache.lengths.tolist() == [30, 70, 70]
    with pytest.raises(ValueError, match="cannot crop to 50 tokens"):
        cache.crop(50)
    with pytest.raises(ValueError, match="indices must be"):
        cache.reorder([3])
    cache.reset()
    assert not cache.lengths.any()
    cache.prefill(k, v)  # usable again
    assert cache.lengths.tolist() == [100, 100, 100]


def test_bad_inputs(rng):
    cache = LayerCache(CONFIG, 2, 2, 64, np.float32)
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=10, head_dim=64)
    with pytest.raises(ValueError, match=r"k has shape \(2, 3, 10, 64\)"):
        cache.append(np.zeros((2, 3, 10, 64), np.float32), v)
    with pytest.raises(ValueError, match="at most window=64 tokens"):
        cache.append(*random_kv(rng, batch=2, kv_heads=2, tokens=65, head_dim=64))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 10\]"):
        cache.prefill(k, v, lengths=[11, 3])
    with pytest.raises(TypeError, match="lengths must hold integers"):
        cache.prefill(k, v, lengths=[9.5, 3.2])
    with pytest.raises(TypeError, match="lengths must hold integers"):
        cache.prefill(k, v, lengths=[True, True])
    with pytest.raises(ValueError, match=r"k has shape \(2, 2, 10, 64\) but v \(2, 2, 5, 64\)"):
        cache.prefill(k, v[:, :, :5])
    with pytest.raises(TypeError, match="v has dtype float16 but the cache's window holds float32"):
        cache.append(k, v.astype(np.float16))
    bad = k.copy()
    bad[1, 0, 3, 5] = np.nan
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        cache.append(bad, v)
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        cache.prefill(bad, v, lengths=[10, 4])
    assert not cache.lengths.any()  # nothing stored by the refused calls
    cache.prefill(bad, v, lengths=[10, 3])  # a padding token is not looked at
    cache.reset()
    cache.append(k, v)
    with pytest.raises(ValueError, match="needs an empty cache"):
        cache.prefill(k, v)
    with pytest.raises(TypeError, match="indices must hold integers"):
        cache.reorder(np.array([False, True]))
    with pytest.raises(ValueError, match="keep must be a non-negative integer, got -20"):
        cache.flush(keep=-20)
    cache.flush(keep=500)  # more than a window (a long chunk's tokens): nothing to pack
    with pytest.raises(ValueError, match="length must be a non-negative integer"):
        cache.crop(-2)
    with pytest.raises(TypeError, match="q has dtype float16 but the cache's window holds float32"):
        cache.attend(np.ones((2, 2, 1, 64), np.float16))
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        LayerCache(CONFIG, 1, 1, 96, np.float32)
    for dtype in (np.int32, np.float64, "float8"):
        with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
            LayerCache(CONFIG, 1, 1, 64, dtype)
    with pytest.raises(ValueError, match="capacity must be a non-negative integer, got -300"):
        LayerCache(CONFIG, 1, 1, 64, np.float32, capacity=-300)
    with pytest.raises(ValueError, match="batch must be a positive integer, got 2.0"):
        LayerCache(CONFIG, 2.0, 1, 64, np.float32)
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        LayerCache("oscar-2", 1, 1, 64, np.float32)


def test_window_buffer_holds_one_window_and_grows_only_for_chunks(rng):
    """The window buffers hold exactly one window (decode steps of one token never grow them: no per-sequence memory
    beyond the method's window); a chunk that needs more grows them by WINDOW_GROWTH tokens, up to two windows,
    keeping the tokens held."""
    config = CONFIG.replace(window=128)  # same groups as CONFIG, so reference() applies
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=400, head_dim=64)
    cache = LayerCache(config, 2, 2, 64, np.float32)
    assert cache._window_k.shape[2] == 128
    cache.prefill(k[:, :, :100], v[:, :, :100])
    for t in range(100, 150):  # one flush at 128 tokens (the window full: 128 of 128); 22 left in the window
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        cache.flush()
    assert cache._window_k.shape[2] == 128 and cache.packed_lengths.tolist() == [128, 128]
    cache.append(k[:, :, 150:250], v[:, :, 150:250])  # 122 tokens: still within one window
    assert cache._window_k.shape[2] == 128 and cache.window_lengths.tolist() == [122, 122]
    cache.append(k[:, :, 250:330], v[:, :, 250:330])  # 202 tokens: grows to 256 (no flush: it fits two windows)
    assert cache._window_k.shape[2] == 256 and cache.packed_lengths.tolist() == [128, 128]
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    _, expected = reference(k, v, np.full(2, 330), cache.packed_lengths, q)
    np.testing.assert_allclose(cache.attend(q), expected, rtol=1e-5, atol=1e-6)
