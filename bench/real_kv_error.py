"""Attention-output error of each quantizer on the real K/V and queries of SmolLM2-135M-Instruct (all 30 layers).

Reads the dump of bench/dump_kv.py (1024 tokens of Hamlet; queries of the last 256 positions). Each query attends, with
the causal mask, as during decoding with the cache policy: the first 768 tokens packed (three flush blocks of 256), the
later ones in the full-precision window. The error is ||out - exact|| / ||exact|| over a layer's 9 heads x 256 queries,
against float64 attention on the bf16 K/V as the model holds them. Writes bench/results/real_kv_error.{json,md}.

Run: python bench/real_kv_error.py [--dump .assets/smollm2_kv.npz]
"""

import argparse
import datetime
import json
import pathlib
import sys

import numpy as np

import oscar_cupy as oc

PRESETS = ["kivi-2", "hadamard-only-2", "scaling-only-2", "oscar-2", "kivi-4", "hadamard-only-4", "scaling-only-4",
           "oscar-4"]
PACKED = 768


def exact_attention(q, k, v, first_position):
    """float64 causal attention of queries at positions first_position.. over all keys (GQA by repetition)."""
    ratio = q.shape[1] // k.shape[1]
    k, v = (np.repeat(a, ratio, axis=1).astype(np.float64) for a in (k, v))
    logits = q.astype(np.float64) @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    positions = first_position + np.arange(q.shape[2])
    logits[..., np.arange(k.shape[2])[None, :] > positions[:, None]] = -np.inf
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=pathlib.Path, default=pathlib.Path(".assets/smollm2_kv.npz"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    dump = np.load(args.dump)
    keys, values, queries = dump["keys"], dump["values"], dump["queries"]
    metadata = json.loads(str(dump["metadata"]))
    layers, tokens = keys.shape[0], keys.shape[3]
    first_query = tokens - queries.shape[3]

    errors = {preset: [] for preset in PRESETS}
    for layer in range(layers):
        k, v, q = keys[layer], values[layer], queries[layer]
        exact = exact_attention(q, k, v, first_query)
        for preset in PRESETS:
            packed = oc.quantize_kv(k[:, :, :PACKED], v[:, :, :PACKED], oc.QuantConfig.preset(preset))
            out = oc.decode_attention(q, packed, k[:, :, PACKED:], v[:, :, PACKED:])
            errors[preset].append(float(np.linalg.norm(out - exact) / np.linalg.norm(exact)))
        print(f"layer {layer:2d}: " + ", ".join(f"{p} {errors[p][-1]:.4f}" for p in PRESETS))

    summary = {p: dict(mean=float(np.mean(e)), median=float(np.median(e)), worst=float(np.max(e)),
                       worst_layer=int(np.argmax(e))) for p, e in errors.items()}
    bits = {p: oc.quantize_kv(keys[0][:, :, :PACKED], values[0][:, :, :PACKED],
                              oc.QuantConfig.preset(p)).bits_per_element for p in PRESETS}
    result = dict(benchmark="real_kv_error", date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                  device="CPU (the numpy reference)", model=metadata["model"], text=metadata["text_file"],
                  tokens=tokens, packed_tokens=PACKED, queries=queries.shape[3],
                  versions=dict(oscar_cupy=oc.__version__, numpy=np.__version__,
                                transformers=metadata["transformers_version"]),
                  summary=summary, bits_per_element=bits, per_layer=errors)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_kv_error.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Attention-output error on real SmolLM2-135M K/V ({result['date']})", "",
             f"`{result['command']}`: {tokens} tokens of {result['text']}; queries at the last {queries.shape[3]} "
             f"positions attend causally to {PACKED} packed tokens plus the rest in full precision; relative error of "
             "each layer's output against float64 attention on the model's bf16 K/V, over the 30 layers.", "",
             "| preset | bits / element | mean error | median | worst (layer) |", "|---|---:|---:|---:|---:|"]
    for p in PRESETS:
        s = summary[p]
        lines.append(f"| {p} | {bits[p]:.2f} | {s['mean']:.4f} | {s['median']:.4f} | {s['worst']:.4f} "
                     f"({s['worst_layer']}) |")
    (args.out / "real_kv_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
