"""Decode-attention error against the size of the logits, from the CPU emulation of the decode kernel (no GPU).

Keys whose token norms spread over 10^-s to 10^s (s = 0, 1, 2: |logit| up to ~10, ~60, ~500), normal values and
queries, head_dim 64, GQA 4, packed parts of 200 and 97 tokens and windows of 20 and 7; the kernel runs in
tests/emulator.py as tests/test_emulated_decode.py runs it, against the CPU reference. For each input dtype and scale
dtype: the median and largest relative output error over 8 seeds, and the median of the largest |logit|.
Writes bench/results/decode_large_logits_emulated.json and .md.

Run (CPU, about a minute): python bench/emulated_large_logits.py
"""

import datetime
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import oscar_cupy as oc  # noqa: E402
from decode_cases import BF16, relative_error  # noqa: E402
from test_emulated_decode import emulated_decode  # noqa: E402

COMBOS = [(np.dtype(np.float16), "float16"), (BF16, "float16"), (BF16, "bfloat16"), (BF16, "float32")]


def one(rng, spread, dtype, scale_dtype, batch=2, kv_heads=2, group=4, head_dim=64):
    sizes = 10.0 ** rng.uniform(-spread, spread, size=(batch, 1, 200, 1))
    k = (rng.standard_normal((batch, kv_heads, 200, head_dim)) * sizes).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, 200, head_dim)).astype(dtype)
    qkv = oc.quantize_kv(k, v, oc.QuantConfig(scale_dtype=scale_dtype), lengths=[200, 97])
    q = (rng.standard_normal((batch, kv_heads * group, 1, head_dim)) * 2).astype(dtype)
    window_k, window_v = (rng.standard_normal((batch, kv_heads, 23, head_dim)).astype(dtype) for _ in range(2))
    reference = oc.decode_attention(q, qkv, window_k, window_v, lengths=[20, 7])
    out, _ = emulated_decode(q, qkv, window_k, window_v, [20, 7])
    keys = np.repeat(k.astype(np.float32), group, axis=1)
    logits = np.einsum("bhd,bhtd->bht", q[:, :, 0].astype(np.float32), keys) / np.sqrt(head_dim)
    return float(np.abs(logits).max()), relative_error(out, reference)


def main():
    rows = []
    for spread in (0, 1, 2):
        for dtype, scale_dtype in COMBOS:
            runs = [one(np.random.default_rng(1000 * spread + seed), spread, dtype, scale_dtype) for seed in range(8)]
            logits, errors = np.array(runs).T
            rows.append(dict(norm_spread=f"10^-{spread}..10^{spread}", dtype=dtype.name, scale_dtype=scale_dtype,
                             median_max_logit=float(np.median(logits)), median_error=float(np.median(errors)),
                             max_error=float(errors.max())))
    out = ROOT / "bench" / "results"
    document = dict(benchmark="emulated_large_logits", device="CPU emulation of raw_kernels/decode.cu (tests/emulator.py)",
                    date=datetime.date.today().isoformat(), command="python bench/emulated_large_logits.py",
                    versions=dict(oscar_cupy=oc.__version__, numpy=np.__version__), rows=rows)
    (out / "decode_large_logits_emulated.json").write_text(json.dumps(document, indent=1) + "\n")
    lines = ["# Decode error against the size of the logits (CPU emulation of the decode kernel)", "",
             f"`{document['command']}` ({document['date']}). " + __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| token norms | input | scales | median max \\|logit\\| | median error | largest error |",
             "|---|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['norm_spread']} | {row['dtype']} | {row['scale_dtype']} | {row['median_max_logit']:.0f} | "
                     f"{100 * row['median_error']:.2f}% | {100 * row['max_error']:.2f}% |")
    (out / "decode_large_logits_emulated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
