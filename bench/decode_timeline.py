"""Where a decode step's time goes at small launches: per-block timelines of one step, and forced packed block counts.

The kernel is compiled from an instrumented copy of ``raw_kernels/decode.cu``: thread 0 of every block writes
``%globaltimer`` (ns) at fixed points into a ``__device__`` array, read back after the last of ``--replays`` CUDA-graph
replays of the step. Per kind of block, each mark is reported as the minimum, median and maximum over the blocks, in ns
after the first block started:

- packed blocks: 0 start, 1 first copies issued, 2 query rows staged, 3 query rows rotated, 4 every warp's run done,
  5 partial rows written, 6 counted;
- window blocks: 0 start, 2 query rows staged, 3 query pairs made, 4 split counted (warp 0);
- merge blocks: 0 start, 1 count seen, 3 its partial rows loaded and added (warp 0), 4 the team's parts merged,
  5 rotated back, 2 done.

The marks change the code a little (a global store each); the graph-replay time of the instrumented step is
reported beside them, and with ``--blocks`` the uninstrumented step's time for each forced packed block count (the
launch model's own choice first). The edits are anchored on lines of ``decode.cu``: a changed line stops the tool
with the anchor that no longer matches. Writes ``decode_timeline.json``.

Run on a GPU: python bench/decode_timeline.py [--blocks 224,248,256]
"""

import argparse
import datetime
import json
import pathlib

import cupy
import ml_dtypes
import numpy as np
from decode_attention import LLAMA, SMOLLM2, WINDOW, random_packed, replayed, time_ms

import oscar_cupy as oc
import oscar_cupy.cuda_attention as cuda_attention
from oscar_cupy import decode_launch, kernels, layout

HEADER = r"""
__device__ unsigned long long timeline[8192 * 8];
#define MARK(slot) do { if (threadIdx.x == 0) { unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" \
    : "=l"(t)); timeline[blockIdx.x * 8 + (slot)] = t; } } while (0)
"""
def _after(anchor: str, mark: str) -> tuple:
    return anchor, anchor + mark


def _before(anchor: str, mark: str) -> tuple:
    return anchor, mark + anchor


SYNC = "    __syncthreads();\n"
MARKS = [  # (anchor, the anchor with its mark)
    _after('#include "common.cuh"\n', HEADER),
    _after("    extern __shared__ __align__(128) StepBuffer step_buffers[];\n", "    MARK(0);\n"),
    _after("    start_copies(buffers, args, my_steps, lane);\n", "    MARK(1);\n"),
    (SYNC + "\n    // rotate the query rows", SYNC + "    MARK(2);\n\n    // rotate the query rows"),
    (SYNC + "\n    // the exclusive token limit", SYNC + "    MARK(3);\n\n    // the exclusive token limit"),
    _after("    __syncthreads();  // every warp's copies are done: the step buffers take the warps' output rows\n",
           "    MARK(4);\n"),
    _after("    store_block_partials(shared, scratch, partial_index, block_rows, partial_o, partial_ml);\n",
           "    MARK(5);\n"),
    _after("    if (threadIdx.x == 0) atomicAdd(unit_count, 1);  // the block's partial rows are written\n",
           "    MARK(6);\n"),
    (SYNC + "    window_query_pairs(shared, scale_log2);\n" + SYNC,
     SYNC + "    MARK(2);\n    window_query_pairs(shared, scale_log2);\n" + SYNC + "    MARK(3);\n"),
    ("partial_o, partial_ml, unit_counts + u);\n}\n", "partial_o, partial_ml, unit_counts + u);\n    MARK(4);\n}\n"),
    _before("        write_unit_outputs(", "        MARK(1);\n"),
    _before("        if (team > 1) {", "        MARK(3);\n"),
    _before("        if (unrotate) fwht_row<HEAD_DIM, LANE_ELEMENTS>", "        MARK(4);\n"),
    _before("        const float inverse = sum > 0.f ? __fdividef(1.f, sum) : 0.f;\n", "        MARK(5);\n"),
    _before("        return;\n    }\n    if (blockIdx.x < (unsigned)packed_blocks) {", "        MARK(2);\n"),
]
SLOTS = {"packed": (0, 1, 2, 3, 4, 5, 6), "window": (0, 2, 3, 4), "merge": (0, 1, 3, 4, 5, 2)}
SHAPES = {"llama": LLAMA, "smollm2": SMOLLM2}


def instrumented(source: str) -> str:
    """``decode.cu`` with the marks at their anchors (each anchor must occur exactly once)."""
    for anchor, marked in MARKS:
        if source.count(anchor) != 1:
            raise SystemExit(f"decode.cu changed: the timeline anchor {anchor!r} occurs {source.count(anchor)} times")
        source = source.replace(anchor, marked)
    return source


def step(config, batch, tokens, shape, blocks=None):
    """``(plan, run)``: a decode step of ``batch`` sequences of ``tokens`` (the benchmark's inputs: packed tokens plus a
    window of WINDOW), its plan made with ``blocks`` packed blocks when given."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    kv_heads, head_dim = shape["kv_heads"], shape["head_dim"]
    packed_tokens = tokens - WINDOW
    arrays = random_packed(config, batch, kv_heads, layout.capacity(packed_tokens, config), head_dim)
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((batch, shape["q_heads"], 1, head_dim)).astype(bf16))
    window_k, window_v = (cupy.asarray(rng.standard_normal((batch, kv_heads, WINDOW, head_dim)).astype(bf16))
                          for _ in range(2))
    packed_lengths = cupy.full(batch, packed_tokens, dtype=cupy.int64)
    window_lengths = cupy.full(batch, WINDOW, dtype=cupy.int64)
    model = decode_launch.packed_blocks
    if blocks:
        decode_launch.packed_blocks = lambda *args: blocks
    try:
        plan = cuda_attention.DecodePlan(config, batch=batch, q_heads=shape["q_heads"], kv_heads=kv_heads, q_len=1,
                                         head_dim=head_dim, dtype=bf16, max_packed=packed_tokens, max_window=WINDOW)
    finally:
        decode_launch.packed_blocks = model
    return plan, lambda: plan.run(q, arrays, packed_lengths, window_k, window_v, window_lengths)


def timeline(config, batch, tokens, shape, replays):
    plan, run = step(config, batch, tokens, shape)
    graph, stream = replayed(run)
    with stream:
        for _ in range(replays):
            graph.launch(stream)
    stream.synchronize()
    variant = kernels.decode_variant(shape["head_dim"], config.bits, "bfloat16", config.scale_dtype,
                                     config.value_group, plan.row_tiles)
    module = next(m for (key, _), m in kernels._modules.items() if key == variant)
    pointer = module.get_global_var("timeline")
    pointer = pointer[0] if isinstance(pointer, tuple) else pointer
    grid = plan.packed_blocks + plan.window_blocks + plan.merge_blocks
    memory = cupy.cuda.UnownedMemory(int(pointer), grid * 64, None)
    marks = cupy.ndarray((grid, 8), dtype=cupy.uint64, memptr=cupy.cuda.MemoryPointer(memory, 0)).get()
    marks = marks.astype(np.int64) - int(marks[:, 0].min())
    kinds = {"packed": marks[:plan.packed_blocks],
             "window": marks[plan.packed_blocks:plan.packed_blocks + plan.window_blocks],
             "merge": marks[plan.packed_blocks + plan.window_blocks:]}
    result = dict(packed_blocks=plan.packed_blocks, window_blocks=plan.window_blocks, merge_blocks=plan.merge_blocks,
                  replay_us=time_ms(lambda: graph.launch(stream), stream=stream) * 1000)
    for kind, rows in kinds.items():
        result[kind] = {slot: [int(np.percentile(rows[:, slot], p)) for p in (0, 50, 100)] for slot in SLOTS[kind]
                        if len(rows)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--cases", default="llama:oscar-2:1:4096,llama:oscar-4:1:4096,smollm2:oscar-2:1:4096",
                        help="model:preset:batch:context, comma-separated")
    parser.add_argument("--blocks", default="", help="packed block counts to time besides the model's, comma-separated")
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    cases = [case.split(":") for case in args.cases.split(",")]
    forced = [int(n) for n in args.blocks.split(",") if n]
    rows = []
    for model, preset, batch, tokens in cases:  # uninstrumented first: the kernel cache holds the plain module
        config, shape = oc.QuantConfig.preset(preset), SHAPES[model]
        for blocks in [None, *forced]:
            plan, run = step(config, int(batch), int(tokens), shape, blocks)
            graph, stream = replayed(run)
            us = time_ms(lambda: graph.launch(stream), stream=stream) * 1000
            rows.append(dict(model=model, preset=preset, batch=int(batch), context=int(tokens), forced=blocks,
                             packed_blocks=plan.packed_blocks, replay_us=us))
            print(json.dumps(rows[-1]), flush=True)
    source = kernels.Variant.source
    kernels.Variant.source = lambda variant: instrumented(source(variant)) if variant.module == "decode" else \
        source(variant)
    kernels._modules.clear()
    timelines = []
    for model, preset, batch, tokens in cases:
        result = timeline(oc.QuantConfig.preset(preset), int(batch), int(tokens), SHAPES[model], args.replays)
        timelines.append(dict(model=model, preset=preset, batch=int(batch), context=int(tokens), **result))
        medians = {kind: [values[1] for values in result[kind].values()] for kind in SLOTS if kind in result}
        print(f"{model} {preset} {batch} x {tokens}: instrumented replay {result['replay_us']:.1f} us; medians (ns) "
              f"{json.dumps(medians)}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_timeline.json").write_text(json.dumps(dict(
        device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        command=f"python bench/decode_timeline.py --cases {args.cases} --blocks {args.blocks}",
        versions=dict(oscar_cupy=oc.__version__, cupy=cupy.__version__),
        slots={kind: list(slots) for kind, slots in SLOTS.items()}, block_counts=rows, timelines=timelines), indent=1))


if __name__ == "__main__":
    main()
