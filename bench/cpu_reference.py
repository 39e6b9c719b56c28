"""Speed of the CPU reference backend on the SmolLM2-135M shape (30 layers, 9 query / 3 KV heads, head_dim 64).

Times, per layer, the quantization of a whole context (what a prefill flush costs) and one decode step of attention
over it, and extrapolates to the 30-layer model. Writes JSON and a markdown table to bench/results/.

Run: python bench/cpu_reference.py [--contexts 1024 2048 4096 8192] [--repeats 5]
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numba
import numpy as np

import oscar_cupy as oc

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def median_seconds(function, repeats):
    function()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for context in args.contexts:
        k, v = (rng.standard_normal((1, KV_HEADS, context, HEAD_DIM)).astype(np.float32) for _ in range(2))
        window = rng.standard_normal((1, KV_HEADS, 255, HEAD_DIM)).astype(np.float32)
        q = rng.standard_normal((1, Q_HEADS, 1, HEAD_DIM)).astype(np.float32)
        qkv = oc.quantize_kv(k, v)
        quantize = median_seconds(lambda: oc.quantize_kv(k, v), args.repeats)
        decode = median_seconds(lambda: oc.decode_attention(q, qkv, window, window), args.repeats)
        rows.append(dict(context=context, quantize_layer_ms=1e3 * quantize, decode_layer_ms=1e3 * decode,
                         quantize_model_s=LAYERS * quantize, decode_model_s_per_token=LAYERS * decode))
        print(f"context {context}: quantize {1e3 * quantize:.1f} ms/layer, decode {1e3 * decode:.2f} ms/layer/token")

    result = dict(
        benchmark="cpu_reference", date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                     python=platform.python_version()),
        versions=dict(oscar_cupy=oc.__version__, numpy=np.__version__, numba=numba.__version__),
        shape=dict(layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, batch=1, window=255),
        config="oscar-2", rows=rows,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_reference.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# CPU reference backend, SmolLM2-135M shape ({result['date']}, {result['machine']['cores']} cores)",
        "",
        f"`{result['command']}`; oscar-2, batch 1, 255-token full-precision window; medians of {args.repeats} runs.",
        "",
        "| context | quantize (ms/layer) | decode (ms/layer/token) | quantize, 30 layers (s) "
        "| decode, 30 layers (s/token) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['context']} | {row['quantize_layer_ms']:.1f} | {row['decode_layer_ms']:.2f} | "
                     f"{row['quantize_model_s']:.2f} | {row['decode_model_s_per_token']:.3f} |")
    (args.out / "cpu_reference.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
