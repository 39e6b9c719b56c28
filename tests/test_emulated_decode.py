"""The decode kernel (``raw_kernels/decode.cu``), run on the CPU by ``tests/emulator.py``, against the CPU reference
within the tolerance of the GPU tests (``tests/test_cuda_attention.py``): packed blocks sharing the units' steps
(stream-K, late blocks), window blocks, merge blocks (one per row or per unit), with the block counts of the launch
model (``oscar_cupy/decode_launch.py``) on a small emulated GPU. Its PTX helpers run as their host equivalents (the
tensor-core products and ``movmatrix`` as warp-wide operations of ``tests/emulator/simt.h``). No GPU needed; skipped
without g++.
"""

import dataclasses
import math
import types

import numpy as np
import pytest
from decode_cases import BF16, make_case, relative_error, tolerance
from emulator import COMPILER, Module, host_source

import oscar_cupy as oc
from oscar_cupy import decode_launch, kernels
from oscar_cupy.quantize_launch import hadamard_normalization

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no g++ to build the kernels' host version")


def strides(x: np.ndarray) -> list:
    return [np.int64(stride // x.itemsize) for stride in x.strides[:3]]


def emulated_decode(q, qkv, window_k=None, window_v=None, window_lengths=None, *, sms=4, slots=12,
                    packed_blocks=None, source=None):
    """``(out, lse)`` of the decode kernel for numpy arguments, launched as ``DecodePlan`` launches it on a GPU with
    ``sms`` multiprocessors and ``slots`` resident blocks (``decode_launch.geometry`` and ``kernel_args``;
    ``packed_blocks`` forces the packed block count, ``source`` replaces decode.cu)."""
    config = qkv.config
    batch, q_heads, q_len, head_dim = q.shape
    max_window = 0 if window_k is None else int(np.max(window_lengths))
    with pytest.MonkeyPatch.context() as patch:
        if packed_blocks is not None:  # forced, as bench/decode_timeline.py forces it
            patch.setattr(decode_launch, "packed_blocks", lambda *shape: packed_blocks)
        launch = decode_launch.geometry(batch, q_heads, qkv.kv_heads, q_len, int(qkv.lengths.max(initial=0)),
                                        max_window, slots, sms)
    rotate = config.rotation == "hadamard"
    plan = types.SimpleNamespace(  # what kernel_args reads of a DecodePlan
        config=config, kv_heads=qkv.kv_heads, q_len=q_len, **dataclasses.asdict(launch),
        rotation_args=(np.int32(rotate), np.int32(rotate and config.rotate_values), hadamard_normalization(head_dim),
                       np.float32(1.0 / math.sqrt(head_dim) * math.log2(math.e))),
        partial_o=np.full((launch.partial_rows, head_dim), np.nan, np.float32),
        partial_ml=np.full((launch.partial_rows, 2), np.nan, np.float32), unit_counts=np.zeros(launch.units, np.int32),
        lse=np.full(q.shape[:3], np.nan, np.float32))
    out = np.full(q.shape, np.nan, q.dtype)
    window = None if window_k is None else (window_k, strides(window_k), window_v, strides(window_v),
                                            np.asarray(window_lengths, np.int64))
    args = decode_launch.kernel_args(plan, q, strides(q), qkv.arrays(), qkv.capacity,
                                     np.asarray(qkv.lengths, np.int64), window, out)
    variant = kernels.decode_variant(head_dim, config.bits, q.dtype.name, config.scale_dtype, config.value_group,
                                     launch.row_tiles)
    shared = kernels.decode_shared_bytes(head_dim, config.bits, config.scale_dtype, config.value_group,
                                         launch.row_tiles)
    grid = launch.packed_blocks + launch.window_blocks + launch.merge_blocks
    Module(variant, source).launch("decode_attention", (grid,), (decode_launch.THREADS,), args, shared)
    assert not plan.unit_counts.any()  # the merge blocks leave the counts at zero for the next launch
    return out, plan.lse


def case(rng, **shape):
    """A decode case (``decode_cases.make_case``) sized for the emulation: head_dim 64, 200 and 97 packed tokens."""
    return make_case(rng, **{"head_dim": 64, "packed": (200, 97), **shape})


def check(q, qkv, window_k=None, window_v=None, lengths=None, **launch):
    """The emulated kernel's output and log-sum-exp against the CPU reference's, as the GPU tests check them."""
    reference, reference_lse = oc.decode_attention(q, qkv, window_k, window_v, lengths=lengths, return_lse=True)
    out, lse = emulated_decode(q, qkv, window_k, window_v, lengths, **launch)
    assert out.dtype == q.dtype and np.isfinite(out.astype(np.float32)).all()
    error = relative_error(out, reference)
    assert error <= tolerance(q.dtype, qkv.config), error
    seen = np.isfinite(reference_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)
    np.testing.assert_allclose(lse[seen], reference_lse[seen], atol=2e-2, rtol=1e-3)
    np.testing.assert_array_equal(out[~seen].astype(np.float32), 0)  # rows that see nothing are zero
    return error


@pytest.mark.parametrize("config", [oc.QuantConfig(), oc.QuantConfig(bits=4), oc.QuantConfig.preset("kivi-2"),
                                    oc.QuantConfig(key_group=128, value_group=128)],
                         ids=["oscar-2", "oscar-4", "kivi-2", "g128"])
def test_decode_kernel_matches_the_cpu(rng, config):
    check(*case(rng, config=config, head_dim=128))


@pytest.mark.parametrize("head_dim, group, q_len", [(128, 4, 1), (64, 3, 1), (64, 8, 2), (128, 1, 1)])
def test_shapes_gqa_and_query_lengths(rng, head_dim, group, q_len):
    """GQA ratios 1 to 8, two row tiles (16 query rows of a KV head), query lengths above 1 (causal within the
    window)."""
    check(*case(rng, head_dim=head_dim, group=group, q_len=q_len, packed=(130, 64), window=(33, 9)))


@pytest.mark.parametrize("packed_blocks", [1, 5, 7])
def test_packed_blocks_share_the_steps_of_all_units(rng, packed_blocks):
    """One packed block for everything, blocks straddling units, late blocks (as the launch model plans them on a
    GPU of few slots), merge blocks per unit."""
    check(*case(rng, batch=3, packed=(300, 33, 129), window=(20, 0, 40)), packed_blocks=packed_blocks, slots=8)


def test_edges(rng):
    """An empty window, an empty packed part, float16."""
    check(*case(rng, window=None))
    check(*case(rng, packed=(0, 0)))
    check(*case(rng, dtype=np.float16, config=oc.QuantConfig()))


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_large_logits_with_float16_scales(rng, dtype):
    """Token norms spread over two orders of magnitude (|logits| up to ~60, a peaked softmax) with float16 scales, the
    default: the operands' rounding (2^-11 relative per logit term) keeps the output within the usual bound. (With
    bfloat16 operands, for bfloat16 or float32 scales, it does not: bench/results/decode_large_logits_emulated.md.)"""
    batch, kv_heads, group, head_dim, tokens = 2, 2, 4, 64, 200
    spread = 10.0 ** rng.uniform(-1, 1, size=(batch, 1, tokens, 1))
    k = (rng.standard_normal((batch, kv_heads, tokens, head_dim)) * spread).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, tokens, head_dim)).astype(dtype)
    qkv = oc.quantize_kv(k, v, oc.QuantConfig(), lengths=[200, 97])
    q = (rng.standard_normal((batch, kv_heads * group, 1, head_dim)) * 2).astype(dtype)
    window_k, window_v = (rng.standard_normal((batch, kv_heads, 23, head_dim)).astype(dtype) for _ in range(2))
    check(q, qkv, window_k, window_v, [20, 7])


def test_merge_blocks_per_row(rng):
    """Where the whole launch fits on the GPU (an H100's 132 multiprocessors), a merge block per row of each unit."""
    check(*case(rng, head_dim=128), sms=132, slots=396)
    check(*case(rng, head_dim=64, group=8, q_len=2), sms=132, slots=396)


def test_a_changed_kernel_is_caught(rng):
    """The comparison sees the token norms left out of the packed logits: these tests can fail."""
    source = kernels.read_source("decode.cu")
    scaled = "logits[rt][t][e] = norm[t] * (st[rt][t / 2][2 * (t % 2) + e] + bias[rt][e]);"
    assert source.count(scaled) == 1
    changed = source.replace(scaled, "logits[rt][t][e] = st[rt][t / 2][2 * (t % 2) + e] + bias[rt][e];")
    q, qkv, window_k, window_v, lengths = case(rng)
    reference = oc.decode_attention(q, qkv, window_k, window_v, lengths=lengths)
    out, _ = emulated_decode(q, qkv, window_k, window_v, lengths, source=changed)
    assert relative_error(out, reference) > 10 * tolerance(BF16, qkv.config)
    with pytest.raises(NotImplementedError, match="code_pair changed in the kernel source"):
        host_source(source.replace("(pair / DIRECT)))", "(pair / 2)))"))  # a PTX helper's host body would be stale
