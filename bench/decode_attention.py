"""GPU speed of the fused decode attention against torch SDPA bf16, with the copy bandwidth of the same run.

Shapes: batch 1, 8, 32, 64 x context 4k, 16k, 32k, 128k with 32 query / 8 KV heads of head_dim 128 (Llama-3.1-8B),
and the SmolLM2-135M shape (9 / 3 heads, head_dim 64). Our cache holds the context as packed tokens plus a bf16 window
of 128 tokens (the average fill of a 256-token window); SDPA reads the whole context in bf16 (K and V), with its best
backend among flash, cuDNN and memory-efficient (math would materialize the repeated KV heads).

Per shape and cache: median time of a decode step, replayed from a CUDA graph (torch.cuda.CUDAGraph for SDPA, a CuPy
stream capture of DecodePlan.run for ours: the GPU time a graph-captured decode loop pays), with CUDA events around
back-to-back replays; the eager time (Python launch overhead included) is reported beside it. GB/s on the bytes the step must read (packed arrays of the
tokens held, window, queries), % of the copy bandwidth (device-to-device copy of 1 GiB, read + written bytes per
second), and the speedup over SDPA bf16. Writes bench/results/decode_attention.json and .md.

Run on a GPU: python bench/decode_attention.py [--quick]
"""

import argparse
import datetime
import json
import math
import pathlib
import statistics

import cupy
import numpy as np
import torch

import oscar_cupy as oc
from oscar_cupy import layout
from oscar_cupy.cuda_attention import DecodePlan

WINDOW = 128
CACHES = {
    "INT2 g32 (oscar-2)": oc.QuantConfig(),
    "INT2 g128": oc.QuantConfig(key_group=128, value_group=128),
    "INT4 g32 (oscar-4)": oc.QuantConfig(bits=4),
}
LLAMA = dict(q_heads=32, kv_heads=8, head_dim=128)
SMOLLM2 = dict(q_heads=9, kv_heads=3, head_dim=64)


def time_ms(function, stream=None, target_ms=20.0, trials=7):
    """Median milliseconds per call over `trials` runs of back-to-back calls lasting about `target_ms` each, timed
    with CUDA events on `stream` (a cupy stream; default: torch's current stream)."""
    if stream is None:
        event, record = (lambda: torch.cuda.Event(enable_timing=True)), (lambda e: e.record())
        elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
    else:
        event, record = cupy.cuda.Event, (lambda e: e.record(stream))
        elapsed = cupy.cuda.get_elapsed_time
    function()
    start, end = event(), event()
    record(start)
    function()
    record(end)
    end.synchronize()
    calls = max(1, min(2000, int(target_ms / max(elapsed(start, end), 1e-3))))
    times = []
    for _ in range(trials):
        record(start)
        for _ in range(calls):
            function()
        record(end)
        end.synchronize()
        times.append(elapsed(start, end) / calls)
    return statistics.median(times)


def replayed(run):
    """``(graph, stream)``: ``run`` captured in a CUDA graph on a stream of its own (after one run outside it)."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        run()
        stream.begin_capture()
        run()
        graph = stream.end_capture()
    return graph, stream


def copy_gbps() -> float:
    """Device-to-device copy bandwidth: (read + written bytes) / time."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source))
    return 2 * source.numel() / ms / 1e6


def sdpa_ms(batch, tokens, q_heads, kv_heads, head_dim):
    """(graph time, eager time, backend) of the best SDPA bf16 backend for a decode step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    best = (math.inf, math.inf, None)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
                eager = time_ms(run)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()  # warm up outside the capture
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                replay = time_ms(graph.replay)
        except RuntimeError:
            continue
        best = min(best, (replay, eager, backend.name.lower()))
    return best


def random_packed(config, batch, kv_heads, tokens, head_dim):
    """Packed arrays of `tokens` tokens with random codes and plausible scales (speed does not depend on values)."""
    specs = layout.array_specs(config, batch, kv_heads, tokens, head_dim)
    arrays = {}
    for name, (shape, dtype) in specs.items():
        array = cupy.empty(shape, dtype=dtype)
        if name.endswith("codes"):
            array[...] = cupy.random.randint(0, 2**31 - 1, shape, dtype=cupy.int32).view(cupy.uint32)
        elif name == "norms":
            array[...] = cupy.random.uniform(1, 10, shape, dtype=cupy.float32)
        else:
            low, high = (0.01, 0.1) if name.endswith("scales") else (-1.0, 0.0)
            array[...] = cupy.random.uniform(low, high, shape, dtype=cupy.float32).astype(dtype)
        arrays[name] = array
    return arrays


def ours_ms(config, batch, tokens, q_heads, kv_heads, head_dim):
    """(time of a decode step, bytes it reads) for `tokens` of context: packed tokens plus a window of WINDOW."""
    import ml_dtypes

    packed_tokens = tokens - WINDOW
    arrays = random_packed(config, batch, kv_heads, layout.capacity(packed_tokens, config), head_dim)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q = cupy.asarray(np.random.default_rng(0).standard_normal((batch, q_heads, 1, head_dim)).astype(bf16))
    window_k, window_v = (cupy.asarray(np.random.default_rng(i).standard_normal((batch, kv_heads, 2 * WINDOW, head_dim))
                                       .astype(bf16)) for i in (1, 2))
    packed_lengths = cupy.full(batch, packed_tokens, dtype=cupy.int64)
    window_lengths = cupy.full(batch, WINDOW, dtype=cupy.int64)
    plan = DecodePlan(config, batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=1, head_dim=head_dim, dtype=bf16,
                      max_packed=packed_tokens, max_window=WINDOW)
    run = lambda: plan.run(q, arrays, packed_lengths, window_k, window_v, window_lengths)  # noqa: E731
    eager = time_ms(run)
    graph, stream = replayed(run)
    ms = time_ms(lambda: graph.launch(stream), stream=stream)
    per_token = sum(int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                    for shape, dtype in layout.array_specs(config, 1, kv_heads, config.window, head_dim).values())
    read = batch * (packed_tokens * per_token // config.window + WINDOW * kv_heads * head_dim * 2 * 2) + q.nbytes
    return ms, eager, read, plan.packed_blocks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    args = parser.parse_args()
    batches, contexts = ([1, 8], [4096, 32768]) if args.quick else ([1, 8, 32, 64], [4096, 16384, 32768, 131072])
    copy = copy_gbps()
    print(f"copy bandwidth {copy:.0f} GB/s")
    rows = []
    for model, shape in (("Llama-3.1-8B", LLAMA), ("SmolLM2-135M", SMOLLM2)):
        for batch in batches:
            for tokens in contexts:
                baseline, baseline_eager, backend = sdpa_ms(batch, tokens, **shape)
                torch.cuda.empty_cache()  # the bf16 K/V of the baseline go before our arrays come
                kv_bytes = batch * shape["kv_heads"] * tokens * shape["head_dim"] * 2 * 2
                rows.append(dict(model=model, batch=batch, context=tokens, cache="SDPA bf16", backend=backend,
                                 ms=baseline, eager_ms=baseline_eager, read_bytes=kv_bytes,
                                 gbps=kv_bytes / baseline / 1e6, copy_fraction=kv_bytes / baseline / 1e6 / copy,
                                 speedup=1.0))
                print(_line(rows[-1]))
                for name, config in CACHES.items():
                    if config.value_group > shape["head_dim"]:
                        continue
                    ms, eager, read, blocks = ours_ms(config, batch, tokens, **shape)
                    cupy.get_default_memory_pool().free_all_blocks()
                    rows.append(dict(model=model, batch=batch, context=tokens, cache=name, packed_blocks=blocks, ms=ms,
                                     eager_ms=eager, read_bytes=read, gbps=read / ms / 1e6,
                                     copy_fraction=read / ms / 1e6 / copy, speedup=baseline / ms))
                    print(_line(rows[-1]))
    result = dict(
        device=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        command="python bench/decode_attention.py" + (" --quick" if args.quick else ""),
        versions=dict(oscar_cupy=oc.__version__, torch=torch.__version__, cupy=cupy.__version__,
                      cuda_driver=cupy.cuda.runtime.driverGetVersion()),
        copy_gbps=copy, window_tokens=WINDOW, rows=rows,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention.json").write_text(json.dumps(result, indent=1))
    (out / "decode_attention.md").write_text(_markdown(result))
    print(_markdown(result))


def _line(row):
    return (f"{row['model']:13s} B={row['batch']:3d} T={row['context']:6d} {row['cache']:20s} {row['ms'] * 1e3:8.1f} us "
            f"(eager {row['eager_ms'] * 1e3:7.1f}) {row['gbps']:6.0f} GB/s {100 * row['copy_fraction']:5.1f}% copy "
            f"x{row['speedup']:.2f}")


def _markdown(result):
    lines = [
        f"# Decode attention, {result['device']}, {result['date'][:10]}",
        "",
        f"`{result['command']}`; copy bandwidth {result['copy_gbps']:.0f} GB/s (read + write); versions "
        f"{result['versions']}. Our caches hold the context as packed tokens plus a {result['window_tokens']}-token "
        "bf16 window; GB/s counts the bytes a step must read; speedup is over the best SDPA bf16 backend of the "
        "same run.",
        "",
        "| model | batch | context | cache | time (us), graph | eager (us) | GB/s | % of copy | speedup vs SDPA |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cache = row["cache"] + (f" ({row['backend']})" if row.get("backend") else "")
        lines.append(f"| {row['model']} | {row['batch']} | {row['context']} | {cache} | {row['ms'] * 1e3:.1f} | "
                     f"{row['eager_ms'] * 1e3:.1f} | {row['gbps']:.0f} | {100 * row['copy_fraction']:.1f} | "
                     f"{row['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
