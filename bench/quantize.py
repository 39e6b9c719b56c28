"""GPU speed of the write path: fused key + value quantize-and-pack, and the query rotation of a decode step.

For each shape, times the kernels (CUDA events, median of many runs, outputs preallocated, no host synchronization
inside the timed region) and reports GB/s on the bytes actually moved (bf16 keys and values read, codes, scales, zeros
and norms written) against a device-to-device copy of the same input measured in the same run (bytes read + written).
The query rotation is compared with torch SDPA bf16 decode attention (best backend) over the same context, the step
it precedes. Writes bench/results/quantize.json and quantize.md.

Run on a GPU: python bench/quantize.py
"""

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import cupy
import numpy as np

import oscar_cupy as oc
from oscar_cupy import cuda_backend, layout


def time_ms(function, repeats=50, warmup=5):
    """Median milliseconds of ``function`` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        function()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def quantize_row(batch, kv_heads, tokens, head_dim, config):
    import ml_dtypes

    rng = np.random.default_rng(0)
    shape = (batch, kv_heads, tokens, head_dim)
    k, v = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)) for _ in range(2))
    lengths = cupy.full(batch, tokens, dtype=cupy.int64)
    out = cuda_backend.allocate(config, batch, kv_heads, layout.capacity(tokens, config), head_dim)
    cuda_backend.raise_refusals(cuda_backend.launch_quantize(k, v, config, lengths, out), config)  # compile, check

    quantize = time_ms(lambda: cuda_backend.launch_quantize(k, v, config, lengths, out))
    refused = cupy.zeros(1, dtype=cupy.int32)
    keys = time_ms(lambda: cuda_backend.launch_quantize_keys(k, config, lengths, out, refused))
    values = time_ms(lambda: cuda_backend.launch_quantize_values(v, config, lengths, out, refused))
    source = cupy.concatenate([k.view(cupy.uint16).ravel(), v.view(cupy.uint16).ravel()])
    target = cupy.empty_like(source)
    copy = time_ms(lambda: target.__setitem__(Ellipsis, source))
    read = k.nbytes + v.nbytes
    written = sum(array.nbytes for array in out.values())
    key_bytes = k.nbytes + sum(out[name].nbytes for name in ("k_codes", "k_scales", "k_zeros", "norms"))
    value_bytes = v.nbytes + sum(out[name].nbytes for name in ("v_codes", "v_scales", "v_zeros"))
    quantize_gbs = (read + written) / quantize / 1e6
    copy_gbs = 2 * source.nbytes / copy / 1e6
    return dict(
        batch=batch, kv_heads=kv_heads, tokens=tokens, head_dim=head_dim, bits=config.bits,
        key_group=config.key_group, input_mb=read / 1e6, written_mb=written / 1e6,
        quantize_ms=quantize, quantize_gbs=quantize_gbs, copy_ms=copy, copy_gbs=copy_gbs,
        fraction_of_copy=quantize_gbs / copy_gbs,
        keys_ms=keys, keys_gbs=key_bytes / keys / 1e6, values_ms=values, values_gbs=value_bytes / values / 1e6,
    )


def rotation_row(batch, q_heads, kv_heads, context, head_dim):
    """The query rotation of a decode step: the standalone kernel (100 launches replayed from one CUDA graph, so no
    host launch overhead), one call of the public function (Python included), and its cost inside our decode step (the
    fused kernel rotates the queries in its prologue and the output back at the end: the step with the Hadamard
    config minus the same step without rotation), against torch SDPA bf16 (best backend, graph-replayed) and our step.
    """
    import torch
    from decode_attention import ours_ms, sdpa_ms
    from decode_attention import time_ms as graph_ms

    q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    api = time_ms(lambda: oc.hadamard(q), repeats=200)  # through DLPack and the public function
    rows = cupy.from_dlpack(q.view(torch.int16)).view(q_dtype())
    out = cupy.empty_like(rows)
    launch = lambda: cuda_backend.hadamard_last_axis(rows, out)  # noqa: E731
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        launch()
        stream.begin_capture()
        for _ in range(100):
            launch()
        graph = stream.end_capture()
    kernel = graph_ms(lambda: graph.launch(stream), stream=stream) / 100
    shape = dict(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)
    sdpa, _, backend = sdpa_ms(batch, context, **shape)
    torch.cuda.empty_cache()
    step = ours_ms(oc.QuantConfig(), batch, context, **shape)[0]
    unrotated = ours_ms(oc.QuantConfig(rotation="none"), batch, context, **shape)[0]
    cupy.get_default_memory_pool().free_all_blocks()
    return dict(batch=batch, q_heads=q_heads, kv_heads=kv_heads, context=context, head_dim=head_dim,
                rotation_kernel_ms=kernel, rotation_api_ms=api, sdpa_ms=sdpa, sdpa_backend=backend,
                step_ms=step, step_unrotated_ms=unrotated, fused_ms=step - unrotated,
                kernel_fraction=kernel / sdpa, fused_fraction=(step - unrotated) / step, api_fraction=api / sdpa)


def q_dtype():
    import ml_dtypes

    return ml_dtypes.bfloat16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    import torch

    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    shapes = [  # (batch, kv_heads, tokens, head_dim): bf16 K + V of 256 MB and more
        (8, 8, 8192, 128),
        (1, 8, 131072, 128),
        (32, 3, 16384, 64),
        (4, 8, 8192, 256),
    ]
    rows = []
    for shape in shapes:
        for config in (oc.QuantConfig(), oc.QuantConfig(bits=4), oc.QuantConfig(key_group=128)):
            row = quantize_row(*shape, config)
            rows.append(row)
            print(f"quantize {shape} {config.bits}b g{config.key_group}: {row['quantize_ms']:.3f} ms, "
                  f"{row['quantize_gbs']:.0f} GB/s = {100 * row['fraction_of_copy']:.0f}% of copy")
    rotations = [rotation_row(*shape) for shape in [(1, 32, 8, 4096, 128), (8, 32, 8, 16384, 128),
                                                    (1, 9, 3, 4096, 64), (32, 32, 8, 32768, 128)]]
    for row in rotations:
        print(f"rotate q {row}")

    result = dict(
        benchmark="quantize", device=device, date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
        versions=dict(oscar_cupy=oc.__version__, cupy=cupy.__version__, torch=torch.__version__,
                      cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(), nvrtc=".".join(map(str, oc.nvrtc.version()))),
        quantize=rows, query_rotation=rotations,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Write path on {device} ({result['date']})",
        "",
        f"`{result['command']}`. Fused key + value quantize-and-pack of bf16 input (oscar recipe: Hadamard, L2 token "
        "scaling); GB/s on bytes read + written; copy = device-to-device copy of the same input in the same run.",
        "",
        "| batch | KV heads | tokens | head_dim | bits | key group | input MB | ms | GB/s | copy GB/s | % of copy "
        "| keys GB/s | values GB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['kv_heads']} | {r['tokens']} | {r['head_dim']} | {r['bits']} | "
                     f"{r['key_group']} | {r['input_mb']:.0f} | {r['quantize_ms']:.3f} | {r['quantize_gbs']:.0f} | "
                     f"{r['copy_gbs']:.0f} | {100 * r['fraction_of_copy']:.0f}% | {r['keys_gbs']:.0f} | "
                     f"{r['values_gbs']:.0f} |")
    lines += ["", "Query rotation of one decode step against the decode attention it precedes. Standalone: the rotation "
              "kernel alone (100 launches replayed from one CUDA graph) and one call of `oscar_cupy.hadamard` on a "
              "torch tensor (Python included), both against torch SDPA bf16 (best backend, graph-replayed). Fused: "
              "what our decode step actually pays, the rotation of the queries in the fused kernel's prologue and "
              "of its output at the end (step with the Hadamard config minus the same step without rotation), "
              "against that step (graph-replayed).", "",
              "| batch | q heads | KV heads | context | head_dim | kernel ms | API call ms | SDPA ms (backend) "
              "| kernel / SDPA | API / SDPA | our step ms | fused rotation ms | fused / our step |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rotations:
        lines.append(f"| {r['batch']} | {r['q_heads']} | {r['kv_heads']} | {r['context']} | {r['head_dim']} | "
                     f"{r['rotation_kernel_ms']:.4f} | {r['rotation_api_ms']:.4f} | {r['sdpa_ms']:.4f} "
                     f"({r['sdpa_backend']}) | {100 * r['kernel_fraction']:.1f}% | {100 * r['api_fraction']:.1f}% | "
                     f"{r['step_ms']:.4f} | {r['fused_ms']:.4f} | {100 * r['fused_fraction']:.1f}% |")
    (args.out / "quantize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
