"""The fused CUDA decode attention against the CPU reference (oscar_cupy.decode_attention on numpy arrays).

Outputs and log-sum-exps must agree within float tolerance on fresh random data and on real SmolLM2 K/V and queries,
for every supported combination of head_dim, bits, groups, dtypes, GQA ratio and query length, and on the edge cases
(length 1, lengths off the group and block grid, empty packed part, empty window, mixed lengths). Outputs are
poisoned (the memory pool is filled with 0xFF bytes, NaN) before each launch, so a value the kernels do not write fails.

Skipped without cupy and a GPU; run on the device machine (see bench/results/cuda_tests.md).
"""

import dataclasses
import os

import numpy as np
import pytest
from conftest import random_kv
from decode_cases import BF16, TOLERANCE, make_case, relative_error, tolerance

import oscar_cupy as oc

from gpu import REAL_KV, cupy, poison_memory_pool, pytestmark  # noqa: F401  (pytestmark marks the module)

from oscar_cupy.cuda_attention import DecodePlan  # noqa: E402  (needs cupy)


def to_gpu(qkv):
    """The same QuantizedKV with its arrays on the GPU."""
    arrays = {name: cupy.asarray(array) for name, array in qkv.arrays().items()}
    arrays.setdefault("norms", None)
    return dataclasses.replace(qkv, **arrays)


def check_case(q, qkv, window_k=None, window_v=None, lengths=None, scale=None):
    """GPU output and lse against the CPU reference on the same packed arrays; returns the relative error."""
    reference, reference_lse = oc.decode_attention(q, qkv, window_k, window_v, lengths=lengths, scale=scale,
                                                   return_lse=True)
    window = () if window_k is None else (cupy.asarray(window_k), cupy.asarray(window_v))
    poison_memory_pool()
    result, lse = oc.decode_attention(cupy.asarray(q), to_gpu(qkv), *window, lengths=lengths, scale=scale,
                                      return_lse=True)
    result, lse = cupy.asnumpy(result), cupy.asnumpy(lse)
    assert result.dtype == q.dtype and result.shape == q.shape
    assert np.isfinite(result.astype(np.float32)).all()
    error = relative_error(result, reference)
    assert error <= tolerance(q.dtype, qkv.config), error
    seen = np.isfinite(reference_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)
    lse_tolerance = 2e-2 if qkv.config.scale_dtype == "float16" else 6e-2
    np.testing.assert_allclose(lse[seen], reference_lse[seen], atol=lse_tolerance, rtol=1e-3)
    np.testing.assert_array_equal(result[~seen].astype(np.float32), 0)  # rows that see nothing are zero
    return error


CONFIGS = [
    oc.QuantConfig(),
    oc.QuantConfig(bits=4),
    oc.QuantConfig(key_group=128, value_group=128),
    oc.QuantConfig(bits=4, key_group=64, value_group=64, token_scaling="l2_per_head"),
    oc.QuantConfig(rotation="none", token_scaling="none"),  # KIVI
    oc.QuantConfig(rotate_values=False),
    oc.QuantConfig(scale_dtype="bfloat16"),
    oc.QuantConfig(bits=4, scale_dtype="float32", key_group=64),
]


def describe(config):
    return (f"{config.bits}b-k{config.key_group}-v{config.value_group}-{config.token_scaling}-{config.rotation}"
            f"-rv{int(config.rotate_values)}-{config.scale_dtype}")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("config", CONFIGS, ids=describe)
def test_matches_cpu(rng, dtype, head_dim, config):
    if config.value_group > head_dim:
        pytest.skip("value group larger than head_dim")
    check_case(*make_case(rng, head_dim=head_dim, dtype=dtype, config=config))


@pytest.mark.parametrize("group", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("q_len", [1, 2, 8])
def test_gqa_ratios_and_query_lengths(rng, group, q_len):
    check_case(*make_case(rng, group=group, q_len=q_len, head_dim=128, packed=(520, 257), window=(9, 3)))


@pytest.mark.parametrize("packed, window", [
    ((1, 1), (1, 1)),  # length 1
    ((33, 95), (0, 5)),  # off the group grid, one empty window
    ((0, 0), (12, 30)),  # empty packed part
    ((0, 64), (0, 3)),  # a sequence with nothing packed and an empty window
    ((256, 512), None),  # no window
    ((4096, 17), (1, 0)),  # very different lengths in one batch
    ((0, 0), None),  # nothing to attend to: only the merge blocks run
])
def test_edge_cases(rng, packed, window):
    check_case(*make_case(rng, packed=packed, window=window))


def test_causal_queries_that_reach_into_the_packed_part(rng):
    """q_len 8 with windows shorter than 8: the first queries must not see the last packed tokens."""
    check_case(*make_case(rng, q_len=8, packed=(64, 100), window=(3, 0)))


def test_long_context_many_splits(rng):
    check_case(*make_case(rng, batch=1, kv_heads=8, group=4, packed=(32768,), window=(200,)))


def test_scale(rng):
    check_case(*make_case(rng), scale=0.3)


def test_real_model_kv():
    if not os.path.exists(REAL_KV):
        pytest.skip(f"{REAL_KV} not found (make it with bench/dump_kv.py)")
    dump = np.load(REAL_KV)
    keys, values, queries = dump["keys"], dump["values"], dump["queries"]  # queries: the last 256 positions
    tokens, window = keys.shape[3], 256
    errors = []
    for layer in range(keys.shape[0]):
        k, v = keys[layer].astype(BF16), values[layer].astype(BF16)
        for config in (oc.QuantConfig(), oc.QuantConfig(bits=4), oc.QuantConfig(rotation="none", token_scaling="none")):
            qkv = oc.quantize_kv(k[:, :, : tokens - window], v[:, :, : tokens - window], config)
            q = queries[layer][:, :, -8:].astype(BF16)  # the last 8 positions: causal over the window's end
            errors.append(check_case(q, qkv, k[:, :, tokens - window :], v[:, :, tokens - window :]))
    assert max(errors) <= 1e-2


def test_layer_cache_views_and_torch_stream(rng):
    """LayerCache.attend on the GPU (storage larger than the tokens, window views) equals the CPU cache's; torch
    tensors come back as tensors, computed on torch's current stream."""
    torch = pytest.importorskip("torch")
    from oscar_cupy.cache import LayerCache

    config = oc.QuantConfig(window=64)
    k, v = random_kv(rng, batch=2, kv_heads=2, tokens=700, head_dim=128, dtype=np.float16)
    q = rng.standard_normal((2, 8, 1, 128)).astype(np.float16)
    cpu = LayerCache(config, 2, 2, 128, np.float16)
    gpu = LayerCache(config, 2, 2, 128, np.float16, like=cupy.asarray(k))
    for cache, convert in ((cpu, np.asarray), (gpu, cupy.asarray)):
        cache.prefill(convert(k[:, :, :600]), convert(v[:, :, :600]), lengths=[600, 333])
        cache.append(convert(k[:, :, 600:664]), convert(v[:, :, 600:664]))
        cache.flush()  # grows the storage by doubling
        cache.append(convert(k[:, :, 664:665]), convert(v[:, :, 664:665]))
    assert gpu.capacity > int(gpu.packed_lengths.max())  # a view into a larger storage
    reference = cpu.attend(q)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        result = gpu.attend(torch.from_numpy(q).cuda())
    stream.synchronize()
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float16
    assert relative_error(result.cpu().numpy(), reference) <= TOLERANCE[np.dtype(np.float16)]


@pytest.mark.parametrize("mixed", [False, True], ids=["equal-windows", "mixed-windows"])
def test_layer_cache_decode_loop_keeps_plans_and_device_lengths(rng, mixed):
    """Many decode steps through LayerCache on the GPU (append, attend, flush as the adapter does, across several
    flushes and a crop and a reorder): every step equals the CPU cache's; a plan is reused between flushes and the
    device's copy of the lengths follows every change."""
    from oscar_cupy.cache import LayerCache

    config = oc.QuantConfig(window=32)
    steps, prompt = 100, 70
    k, v = random_kv(rng, batch=3, kv_heads=2, tokens=prompt + steps, head_dim=64, dtype=BF16)
    queries = (rng.standard_normal((steps, 3, 6, 1, 64)) * 2).astype(BF16)
    cpu = LayerCache(config, 3, 2, 64, BF16)
    gpu = LayerCache(config, 3, 2, 64, BF16, like=cupy.asarray(k))
    lengths = [prompt, prompt - 30, prompt - 5] if mixed else None
    for cache, convert in ((cpu, np.asarray), (gpu, cupy.asarray)):
        cache.prefill(convert(k[:, :, :prompt]), convert(v[:, :, :prompt]), lengths=lengths)
    plans = {}
    for step in range(steps):
        token = slice(prompt + step, prompt + step + 1)
        if step == 40:  # drop the newest window token of every sequence (a rejected speculative token)
            for cache in (cpu, gpu):
                cache.crop(int(cache.lengths.max()) - 1)
        if step == 70:
            for cache in (cpu, gpu):
                cache.reorder([2, 0, 1])
            k, v, queries = k[[2, 0, 1]], v[[2, 0, 1]], queries[:, [2, 0, 1]]
        poison_memory_pool()
        outputs = []
        for cache, convert in ((cpu, np.asarray), (gpu, cupy.asarray)):
            cache.append(convert(k[:, :, token]), convert(v[:, :, token]))
            outputs.append(cache.attend(convert(queries[step])))
            cache.flush()
        assert relative_error(cupy.asnumpy(outputs[1]), outputs[0]) <= TOLERANCE[BF16], step
        plans.update({id(plan): plan for plan in gpu._plans._plans.values()})  # kept alive: ids stay unique
        np.testing.assert_array_equal(cupy.asnumpy(gpu._lengths_on_device()),
                                      np.stack([cpu.packed_lengths, cpu.window_lengths]))
    assert gpu.packed_lengths.max() >= 4 * config.window
    assert len(plans) < steps // 4  # re-planned at flushes, window splits and the reorder, not every step


def test_strided_queries_as_transformers_hands_them(rng):
    q, qkv, wk, wv, lengths = make_case(rng, group=3, q_len=2)
    q_bthd = cupy.asarray(np.ascontiguousarray(q.transpose(0, 2, 1, 3)))
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    result = oc.decode_attention(q_bthd.transpose(0, 2, 1, 3), to_gpu(qkv), cupy.asarray(wk), cupy.asarray(wv),
                                 lengths=lengths)
    assert relative_error(cupy.asnumpy(result), reference) <= TOLERANCE[BF16]


def test_plan_reuse_and_cuda_graph_capture(rng):
    """A plan runs again with other data and inside a captured CUDA graph, with no allocation or host sync."""
    q, qkv, wk, wv, lengths = make_case(rng, packed=(700, 300), window=(50, 60))
    gpu_qkv = to_gpu(qkv)
    plan = DecodePlan(qkv.config, batch=2, q_heads=8, kv_heads=2, q_len=1, head_dim=128, dtype=BF16,
                      max_packed=1024, max_window=64)
    q_gpu, wk_gpu, wv_gpu = cupy.asarray(q), cupy.asarray(wk), cupy.asarray(wv)
    packed_lengths = cupy.asarray(qkv.lengths)
    window_lengths = cupy.asarray(np.asarray(lengths, np.int64))
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        plan.run(q_gpu, gpu_qkv.arrays(), packed_lengths, wk_gpu, wv_gpu, window_lengths)  # warm: modules loaded
        plan.out.fill(cupy.nan)
        stream.begin_capture()
        plan.run(q_gpu, gpu_qkv.arrays(), packed_lengths, wk_gpu, wv_gpu, window_lengths)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    assert relative_error(cupy.asnumpy(plan.out), reference) <= TOLERANCE[BF16]
    q_gpu[...] = cupy.asarray(q[:, ::-1].copy())  # new data in the same buffers: the graph reads it
    with stream:
        graph.launch()
    stream.synchronize()
    reference = oc.decode_attention(q[:, ::-1].copy(), qkv, wk, wv, lengths=lengths)
    first = cupy.asnumpy(plan.out)
    assert relative_error(first, reference) <= TOLERANCE[BF16]
    with stream:
        graph.launch()
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(plan.out), first)  # the merge's order is fixed: the same bits
    assert not plan.unit_counts.any()  # the merge blocks leave the counts at zero for the next run


def check_repeated_runs(plan, q, qkv, wk, wv, lengths, reference):
    """Two runs of `plan` with poisoned partial results, output and memory pool: both match `reference`, and each
    leaves the merge counters at zero for the next."""
    for _ in range(2):
        plan.partial_o.fill(cupy.nan)
        plan.out.fill(cupy.nan)
        poison_memory_pool()
        out, _ = plan.run(cupy.asarray(q), to_gpu(qkv).arrays(), cupy.asarray(qkv.lengths), cupy.asarray(wk),
                          cupy.asarray(wv), cupy.asarray(np.asarray(lengths, np.int64)))
        assert relative_error(cupy.asnumpy(out), reference) <= TOLERANCE[BF16]
        assert not plan.unit_counts.any()


def test_merge_blocks_wait_for_their_units(rng):
    """More blocks than the GPU holds at once, the merge blocks last: they start while packed and window blocks of
    their units are still running or waiting for a slot, and wait for them (mixed lengths); a second run finds the
    counts back at zero."""
    batch, kv_heads = 40, 8
    packed = tuple(int(n) for n in rng.integers(1, 700, batch))
    window = tuple(int(n) for n in rng.integers(0, 100, batch))
    q, qkv, wk, wv, lengths = make_case(rng, batch=batch, kv_heads=kv_heads, group=4, packed=packed, window=window)
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    plan = DecodePlan(qkv.config, batch=batch, q_heads=4 * kv_heads, kv_heads=kv_heads, q_len=1, head_dim=128,
                      dtype=BF16, max_packed=max(packed), max_window=max(window))
    grid = plan.packed_blocks + plan.window_blocks + plan.merge_blocks
    assert grid > 3 * cupy.cuda.Device().attributes["MultiProcessorCount"]
    check_repeated_runs(plan, q, qkv, wk, wv, lengths, reference)


@pytest.mark.parametrize("merge_rows", [1, 16])
def test_merge_blocks_one_per_row_or_per_unit(rng, merge_rows):
    """Both merge layouts (the plan forced each way): a merge block per row of each unit, its warps sharing the row's
    partial results (a second row block with fewer rows, whose surplus merge blocks exit), or one per unit with a warp
    per row; mixed lengths, causal rows, two runs (the counts back at zero in between)."""
    q, qkv, wk, wv, lengths = make_case(rng, batch=2, kv_heads=2, group=4, q_len=6, packed=(1500, 333),
                                        window=(70, 9))
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    plan = DecodePlan(qkv.config, batch=2, q_heads=8, kv_heads=2, q_len=6, head_dim=128, dtype=BF16, max_packed=1500,
                      max_window=96)
    assert (plan.rows, plan.row_blocks) == (24, 2)
    plan.merge_rows = merge_rows
    assert plan.merge_blocks == plan.units * (16 if merge_rows == 1 else 1)
    check_repeated_runs(plan, q, qkv, wk, wv, lengths, reference)


def test_plan_sized_for_fewer_tokens_still_reads_everything(rng):
    q, qkv, wk, wv, lengths = make_case(rng, packed=(2000, 1500), window=(100, 130))
    plan = DecodePlan(qkv.config, batch=2, q_heads=8, kv_heads=2, q_len=1, head_dim=128, dtype=BF16, max_packed=256,
                      max_window=64)
    out, _ = plan.run(cupy.asarray(q), to_gpu(qkv).arrays(), cupy.asarray(qkv.lengths), cupy.asarray(wk),
                      cupy.asarray(wv), cupy.asarray(np.asarray(lengths, np.int64)))
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    assert relative_error(cupy.asnumpy(out), reference) <= TOLERANCE[BF16]


@pytest.mark.parametrize("group,q_len,head_dim", [(3, 1, 64), (4, 2, 128), (16, 1, 128), (8, 2, 256)])
def test_window_splits_on_tensor_cores(rng, group, q_len, head_dim):
    """The window's 32-token splits on the tensor cores (a warp each, all query rows of its block): windows of 1 to 2.5
    splits, one and two row tiles, causal rows, and windows longer than the plan's (the last split runs to the end)."""
    q, qkv, wk, wv, lengths = make_case(rng, group=group, q_len=q_len, head_dim=head_dim, packed=(200, 96),
                                        window=(80, 1))
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    for max_window in (96, 32):
        plan = DecodePlan(qkv.config, batch=2, q_heads=2 * group, kv_heads=2, q_len=q_len, head_dim=head_dim,
                          dtype=BF16, max_packed=200, max_window=max_window)
        poison_memory_pool()
        plan.partial_o.fill(cupy.nan)
        out, _ = plan.run(cupy.asarray(q), to_gpu(qkv).arrays(), cupy.asarray(qkv.lengths), cupy.asarray(wk),
                          cupy.asarray(wv), cupy.asarray(np.asarray(lengths, np.int64)))
        assert relative_error(cupy.asnumpy(out), reference) <= TOLERANCE[BF16]


@pytest.mark.parametrize("packed_blocks, late_blocks, late_steps", [(1, 0, 0), (5, 0, 0), (7, 2, 3), (30, 11, 2)])
def test_packed_blocks_share_the_steps_of_all_units(rng, packed_blocks, late_blocks, late_steps):
    """The packed blocks share the steps of all units in a row (stream-K): one block for everything, blocks that
    straddle units, late blocks that take fewer steps (the plan forced each way) - the same attention, with sequences
    of different lengths and the longest one beyond the plan's."""
    q, qkv, wk, wv, lengths = make_case(rng, batch=3, kv_heads=2, group=4, packed=(900, 130, 333), window=(20, 7, 40))
    reference = oc.decode_attention(q, qkv, wk, wv, lengths=lengths)
    plan = DecodePlan(qkv.config, batch=3, q_heads=8, kv_heads=2, q_len=1, head_dim=128, dtype=BF16, max_packed=700,
                      max_window=64)
    plan.packed_blocks, plan.late_blocks, plan.late_steps = packed_blocks, late_blocks, late_steps
    partial_rows = (packed_blocks + plan.units * (1 + plan.window_splits)) * 8
    plan.partial_o = cupy.full((partial_rows, 128), cupy.nan, dtype=cupy.float32)
    plan.partial_ml = cupy.full((partial_rows, 2), cupy.nan, dtype=cupy.float32)
    poison_memory_pool()
    out, _ = plan.run(cupy.asarray(q), to_gpu(qkv).arrays(), cupy.asarray(qkv.lengths), cupy.asarray(wk),
                      cupy.asarray(wv), cupy.asarray(np.asarray(lengths, np.int64)))
    assert relative_error(cupy.asnumpy(out), reference) <= TOLERANCE[BF16]


def test_inputs_untouched_and_clear_errors(rng):
    q, qkv, wk, wv, lengths = make_case(rng)
    gpu_qkv = to_gpu(qkv)
    q_gpu, wk_gpu = cupy.asarray(q), cupy.asarray(wk)
    before = [cupy.asnumpy(a).copy() for a in (q_gpu, wk_gpu, gpu_qkv.k_codes, gpu_qkv.v_scales)]
    oc.decode_attention(q_gpu, gpu_qkv, wk_gpu, cupy.asarray(wv), lengths=lengths)
    for array, saved in zip((q_gpu, wk_gpu, gpu_qkv.k_codes, gpu_qkv.v_scales), before):
        np.testing.assert_array_equal(cupy.asnumpy(array).view(np.uint8), saved.view(np.uint8))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        oc.decode_attention(q_gpu.astype(cupy.float32), gpu_qkv)
    with pytest.raises(ValueError, match="q is on cpu but qkv on cuda"):
        oc.decode_attention(q, gpu_qkv)
    rotated = oc.quantize_kv(*random_kv(rng, head_dim=128), oc.QuantConfig(rotation=np.eye(128)))
    with pytest.raises(NotImplementedError, match="user rotation matrix"):
        oc.decode_attention(q_gpu[:, :2], to_gpu(rotated))
