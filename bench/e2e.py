"""End-to-end decoding of transformers models with a bf16 cache and with the OScaR caches, side by side.

Models: a Llama-3.1-8B shape (32 layers, 32/8 heads, head_dim 128) and a Qwen3-8B shape (q/k norms), both with random
bf16 weights (speed does not depend on them), and the real SmolLM2-135M-Instruct. Caches: transformers' DynamicCache
with SDPA (bf16), oscar-2 and oscar-4 through the Hugging Face adapter, and transformers' own quantized cache when its
backend (quanto or hqq) is installed. For each batch x context: prefill time, then greedy decode steps timed one by
one (median and p90 latency, tokens/s = batch / median), KV-cache bytes (exact, window included) and peak GPU memory;
then, at a fixed memory budget, the largest batch each cache fits at one context and its throughput there.

Writes bench/results/e2e.json, e2e.md and e2e.png. `--tiny --device cpu` runs the whole path on a tiny model (a smoke
test of this script, not a measurement).

Run on a GPU: python bench/e2e.py [--models llama8b,qwen3-8b,smollm2] [--budget-gb 60]
"""

import argparse
import datetime
import json
import pathlib
import statistics
import time

import torch
import transformers

import oscar_cupy as oc
from oscar_cupy.adapters.hf import disable_oscar, enable_oscar

SHAPES = {
    "llama8b": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072),
    "qwen3-8b": lambda: transformers.Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072),
    "tiny": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096),
}
CACHES = ("bf16", "oscar-2", "oscar-4", "hf-quantized")


def load(name: str, device: str):
    """A model in bf16 on ``device``: random weights for the shapes, the real SmolLM2 for ``smollm2``."""
    if name == "smollm2":
        from oscar_cupy.assets.models import resolve_model

        return transformers.AutoModelForCausalLM.from_pretrained(resolve_model(), dtype=torch.bfloat16).to(device)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(SHAPES[name](), dtype=torch.bfloat16).eval()


def make_cache(model, cache: str):
    """The cache object for ``cache``, the model set up for it; ``None`` when it cannot be made here."""
    disable_oscar(model)
    if cache == "bf16":
        return transformers.DynamicCache()
    if cache == "hf-quantized":
        for backend in ("quanto", "HQQ"):
            try:
                return transformers.QuantizedCache(backend=backend, config=model.config, nbits=2)
            except (ImportError, ValueError, TypeError):
                continue
        return None
    return enable_oscar(model, oc.QuantConfig.preset(cache))


def kv_bytes(model, cache, tokens: int, batch: int) -> int:
    """Bytes the cache holds for ``batch`` sequences of ``tokens`` tokens."""
    if isinstance(cache, oc.adapters.hf.OscarCache):
        return sum(layer.cache.stored_nbytes() for layer in cache.layers if hasattr(layer, "cache"))
    config = model.config
    heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * 2
    return batch * tokens * per_token if cache is not None else 0


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, cache_name: str, batch: int, context: int, steps: int, device: str) -> dict | None:
    """Prefill ``context`` random tokens for ``batch`` sequences, then ``steps`` greedy decode steps."""
    cache = make_cache(model, cache_name)
    if cache is None:
        return None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    with torch.no_grad():
        sync(device)
        began = time.perf_counter()
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        sync(device)
        prefill = time.perf_counter() - began
        latencies = []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            began = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            sync(device)
            latencies.append(time.perf_counter() - began)
    median = statistics.median(latencies)
    row = dict(cache=cache_name, batch=batch, context=context, prefill_s=prefill, step_median_ms=1e3 * median,
               step_p90_ms=1e3 * sorted(latencies)[int(0.9 * (len(latencies) - 1))],
               tokens_per_s=batch / median, kv_bytes=kv_bytes(model, cache, context + steps, batch))
    if device == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        try:
            import cupy

            row["peak_gpu_bytes"] += cupy.get_default_memory_pool().total_bytes()
        except ImportError:
            pass
    disable_oscar(model)
    return row


def max_batch(model, cache_name: str, context: int, budget: int, device: str) -> int:
    """The largest batch whose KV cache at ``context`` tokens fits the budget beside the weights (exact bytes of a
    one-sequence probe, scaled; 10% kept for activations)."""
    probe = measure(model, cache_name, 1, context, 2, device)
    if probe is None:
        return 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(0, int((0.9 * budget - weights) // max(probe["kv_bytes"], 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama8b,qwen3-8b,smollm2")
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--long", type=int, default=131072, help="the extra context at batch 1 (0: none)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--budget-gb", type=float, default=60.0)
    parser.add_argument("--budget-context", type=int, default=16384)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and small sizes: a smoke test of the script")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.tiny:
        args.models, args.batches, args.contexts, args.long, args.steps = "tiny", "1,2", "64,300", 0, 3
        args.budget_context, args.budget_gb = 300, 0.05
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]

    rows, capacity = [], []
    for name in args.models.split(","):
        model = load(name, args.device)
        shapes = [(b, c) for b in batches for c in contexts] + ([(1, args.long)] if args.long else [])
        for batch, context in shapes:
            for cache in CACHES:
                try:
                    row = measure(model, cache, batch, context, args.steps, args.device)
                except torch.OutOfMemoryError:
                    row = dict(cache=cache, batch=batch, context=context, error="out of memory")
                if row is None:
                    print(f"{cache}: cannot be made here (no quanto or hqq backend), skipped", flush=True)
                    continue
                rows.append(dict(model=name, **row))
                print(rows[-1], flush=True)
        for cache in CACHES:
            fits = max_batch(model, cache, args.budget_context, int(args.budget_gb * 2**30), args.device)
            if fits:
                row = measure(model, cache, fits, args.budget_context, args.steps, args.device)
                capacity.append(dict(model=name, cache=cache, context=args.budget_context, max_batch=fits,
                                     tokens_per_s=row["tokens_per_s"]))
                print(capacity[-1], flush=True)
        del model
    result = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), command="python bench/e2e.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "tiny")),
        versions=dict(oscar_cupy=oc.__version__, torch=torch.__version__, transformers=transformers.__version__),
        budget_gb=args.budget_gb, rows=rows, capacity=capacity,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "e2e_tiny" if args.tiny else "e2e"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"# End-to-end decoding, {result['device']}, {result['date'][:10]}", "", f"`{result['command']}`", "",
             "| model | batch | context | cache | prefill (s) | step median (ms) | step p90 (ms) | tokens/s | KV bytes |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['cache']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['cache']} | {r['prefill_s']:.2f} | "
                     f"{r['step_median_ms']:.1f} | {r['step_p90_ms']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['kv_bytes']:,} |")
    lines += ["", f"At a {result['budget_gb']:g} GB budget:", "", "| model | cache | context | max batch | tokens/s |",
              "|---|---|---:|---:|---:|"]
    for r in result["capacity"]:
        lines.append(f"| {r['model']} | {r['cache']} | {r['context']} | {r['max_batch']} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
