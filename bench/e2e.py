"""End-to-end decoding of transformers models with a bf16 cache and with the OScaR caches, side by side.

Models: a Llama-3.1-8B shape (32 layers, 32/8 heads, head_dim 128) and a Qwen3-8B shape (q/k norms), both with random
bf16 weights (speed does not depend on them), and the real SmolLM2-135M-Instruct. Caches: transformers' DynamicCache
with SDPA (bf16), oscar-2 and oscar-4 through the Hugging Face adapter, and transformers' own quantized cache when its
backend (quanto or hqq) is installed. Each also as ``+graph``: its decode steps replayed from a CUDA graph (ours through
``oscar_cupy.adapters.hf.CudaGraphDecoder``; for bf16, transformers' StaticCache in a graph), which removes the host
overhead of launching every layer's kernels from Python.

For each batch x context, every layer's cache is filled with ``context`` random bf16 keys and values per sequence, as
a prefill leaves it (the OScaR caches quantize and pack them with their own kernels; decode speed does not depend on the
values, and a real prefill of 32 x 32k tokens would not fit beside its activations); then greedy decode steps run
through the model and are timed one by one (median and p90 latency, tokens/s = batch / median); KV-cache bytes (exact,
window included) and peak GPU memory (torch's and CuPy's pools). Prefill time is measured apart, by the model's own
forward over a batch-1 prompt (SDPA, then packing for OScaR). Where the time of a step goes: a profile of a few steps
splits GPU kernel time into attention (SDPA or our decode kernels), the cache's writes, and the rest of the model, and
the remainder of the step's wall time is host overhead. At a fixed memory budget: the largest batch each cache fits at
one context (the cache's allocated bytes per sequence, 10% kept for activations) and its throughput there.

Writes e2e.json, e2e.md and (with matplotlib) e2e.png. `--tiny --device cpu` runs the whole path on a tiny model (a
smoke test of this script, not a measurement); `--from-json e2e.json` writes the table and plots again.

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
from oscar_cupy.adapters.hf import CudaGraphDecoder, OscarCache, OscarLayer, disable_oscar, enable_oscar

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
CACHES = ("bf16", "bf16+graph", "oscar-2", "oscar-2+graph", "oscar-4", "oscar-4+graph", "oscar-2-g128",
          "oscar-2-g128+graph", "hf-quantized")


def load(name: str, device: str):
    """A model in bf16 on ``device``: random weights for the shapes, the real SmolLM2 for ``smollm2``."""
    if name == "smollm2":
        from oscar_cupy.assets.models import resolve_model

        return transformers.AutoModelForCausalLM.from_pretrained(resolve_model(), dtype=torch.bfloat16).to(device)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(SHAPES[name](), dtype=torch.bfloat16).eval()


def make_cache(model, cache: str, tokens: int = 0):
    """The cache object for ``cache`` (``+graph``: the same cache, its decode steps replayed from a CUDA graph; for
    bf16 that is transformers' StaticCache of ``tokens`` tokens), the model set up for it; ``None`` when it cannot be
    made here."""
    disable_oscar(model)
    if cache == "bf16":
        return transformers.DynamicCache(config=model.config)
    if cache == "bf16+graph":
        return transformers.StaticCache(config=model.config, max_cache_len=tokens)
    if cache == "hf-quantized":  # transformers' own INT2 cache, where optimum-quanto or hqq is installed
        for backend in ("quanto", "hqq"):
            try:
                return transformers.QuantizedCache(backend=backend, config=model.config, nbits=2)
            except (ImportError, ValueError, TypeError):
                continue
        return None
    name = cache.removesuffix("+graph")
    if name.endswith("-g128"):  # groups of 128 tokens (keys) and 128 channels (values)
        return enable_oscar(model, oc.QuantConfig.preset(name.removesuffix("-g128"), key_group=128, value_group=128))
    return enable_oscar(model, oc.QuantConfig.preset(name))


def kv_shape(model) -> tuple[int, int]:
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def fill(model, cache, batch: int, context: int, device: str) -> None:
    """Every layer of ``cache`` holding ``context`` random bf16 tokens per sequence, as after a prefill."""
    heads, head_dim = kv_shape(model)
    generator = torch.Generator(device).manual_seed(0)
    for index, layer in enumerate(cache.layers):
        k, v = (torch.randn(batch, heads, context, head_dim, generator=generator, device=device,
                            dtype=torch.bfloat16) for _ in range(2))
        if isinstance(layer, OscarLayer):
            layer.lazy_initialization(k, v)
            layer.cache.prefill(k, v)
        else:  # DynamicCache, or StaticCache (transformers 5.17 reads the positions from the cache kwargs)
            cache.update(k, v, index, {"cache_position": torch.arange(context, device=device)})
        del k, v


def kv_bytes(model, cache, tokens: int, batch: int, allocated: bool = False) -> int:
    """Bytes the cache holds for ``batch`` sequences of ``tokens`` tokens (``allocated``: the OScaR cache's allocated
    storage, window buffers and spare capacity included)."""
    if isinstance(cache, OscarCache):
        return sum(layer.cache.nbytes if allocated else layer.cache.stored_nbytes() for layer in cache.layers)
    if isinstance(cache, transformers.QuantizedCache):
        return None  # its backend's packed tensors: not accounted here (peak GPU memory shows the saving)
    return bf16_bytes(model, tokens, batch)


def bf16_bytes(model, tokens: int, batch: int) -> int:
    """Bytes of a bf16 cache of ``batch`` sequences of ``tokens`` tokens."""
    heads, head_dim = kv_shape(model)
    return batch * tokens * 2 * model.config.num_hidden_layers * heads * head_dim * 2


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str):
    """Return cached blocks of torch's and CuPy's pools, so that every run starts from the same memory."""
    if device != "cuda":
        return
    torch.cuda.empty_cache()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except ImportError:
        pass
    torch.cuda.reset_peak_memory_stats()


class StaticCacheGraph:
    """The bf16 baseline without Python overhead: transformers' StaticCache, decode steps replayed from a CUDA graph
    (the first step eager, the second captured)."""

    def __init__(self, model, cache, batch: int, context: int):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.positions = torch.full((batch, 1), context, dtype=torch.long, device=model.device)
        self.cache_position = torch.full((1,), context, dtype=torch.long, device=model.device)
        self.graph, self.logits, self.warm = None, None, False

    def step(self, token):
        self.tokens.copy_(token)
        if not self.warm:
            logits, self.warm = self.forward(), True
        elif self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="relaxed"):
                self.logits = self.forward()
            self.graph.replay()
            logits = self.logits
        else:
            self.graph.replay()
            logits = self.logits
        self.positions += 1
        self.cache_position += 1
        return logits.clone()

    def forward(self):
        return self.model(input_ids=self.tokens, position_ids=self.positions, cache_position=self.cache_position,
                          past_key_values=self.cache, use_cache=True).logits[:, -1]


def stepper(model, cache, cache_name: str, batch: int, context: int):
    """The decode step of ``cache_name`` as a function of the tokens ``(batch, 1)``, returning logits: the model's
    forward, or for ``+graph`` a replayed CUDA graph (oscar_cupy's CudaGraphDecoder; StaticCacheGraph for bf16)."""
    if cache_name == "bf16+graph":
        return StaticCacheGraph(model, cache, batch, context).step
    if cache_name.endswith("+graph"):
        return CudaGraphDecoder(model, cache).step
    return lambda token: model(token, past_key_values=cache, use_cache=True).logits[:, -1]


def decode_steps(step, token, steps: int, device: str) -> tuple[list[float], torch.Tensor]:
    """Wall seconds of ``steps`` greedy decode steps from ``token`` ``(batch, 1)``, each synchronized."""
    latencies = []
    for _ in range(steps):
        began = time.perf_counter()
        token = step(token).argmax(-1, keepdim=True)
        sync(device)
        latencies.append(time.perf_counter() - began)
    return latencies, token


def measure(model, cache_name: str, batch: int, context: int, steps: int, device: str,
            breakdown: bool = False) -> dict | None:
    """Fill the cache with ``context`` tokens for ``batch`` sequences, then time ``steps`` greedy decode steps (after
    three untimed ones)."""
    free(device)
    if cache_name.endswith("+graph") and device != "cuda":
        return None
    cache = make_cache(model, cache_name, tokens=context + steps + 16)
    if cache is None:
        return None
    with torch.no_grad():
        fill(model, cache, batch, context, device)
        step = stepper(model, cache, cache_name, batch, context)
        token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
        _, token = decode_steps(step, token, 3, device)
        latencies, token = decode_steps(step, token, steps, device)
        split = step_breakdown(step, token, device) if breakdown and device == "cuda" else None
    median = statistics.median(latencies)
    row = dict(cache=cache_name, batch=batch, context=context, step_median_ms=1e3 * median,
               step_p90_ms=1e3 * sorted(latencies)[int(0.9 * (len(latencies) - 1))], tokens_per_s=batch / median,
               kv_bytes=kv_bytes(model, cache, context + steps + 3, batch),
               kv_bytes_bf16=bf16_bytes(model, context + steps + 3, batch),
               kv_bytes_allocated=kv_bytes(model, cache, context + steps + 3, batch, allocated=True))
    if split:
        row["breakdown_ms"] = split
    if device == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        try:
            import cupy

            row["peak_gpu_bytes"] += cupy.get_default_memory_pool().total_bytes()
        except ImportError:
            pass
    disable_oscar(model)
    return row


KERNEL_KINDS = (("attention", ("decode_attention", "flash", "fmha", "attention", "sdpa", "softmax")),
                ("cache writes", ("quantize", "pack", "copy", "memcpy", "memset", "cat", "index", "scatter", "fill")))


def step_breakdown(step, token, device: str, steps: int = 5) -> dict:
    """Per decode step (mean of ``steps``): wall ms, GPU kernel ms by kind (attention, cache writes, the rest of the
    model) and the host overhead left over (wall minus all kernel time: launches, Python, synchronization)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        decode_steps(step, token, steps, device)
        wall = (time.perf_counter() - began) / steps
    kinds = {"attention": 0.0, "cache writes": 0.0, "model": 0.0}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:  # kernels, copies and sets only (not the host ops that launch them)
            continue
        microseconds = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        name = event.key.lower()
        kind = next((k for k, needles in KERNEL_KINDS if any(n in name for n in needles)), "model")
        kinds[kind] += microseconds / 1e3 / steps
    kernels = sum(kinds.values())
    return dict(wall=1e3 * wall, **kinds, host_overhead=max(0.0, 1e3 * wall - kernels))


def prefill_time(model, cache_name: str, context: int, device: str) -> float | None:
    """Seconds of the model's forward over a batch-1 prompt of ``context`` tokens into a fresh cache."""
    free(device)
    if cache_name.endswith("+graph") or make_cache(model, cache_name) is None:  # prefill runs eagerly either way
        return None
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    with torch.no_grad():
        model(prompt[:, :256], past_key_values=make_cache(model, cache_name), logits_to_keep=1)  # warm
        cache = make_cache(model, cache_name)
        sync(device)
        began = time.perf_counter()
        model(prompt, past_key_values=cache, logits_to_keep=1)
        sync(device)
    disable_oscar(model)
    return time.perf_counter() - began


def max_batch(model, cache_name: str, context: int, budget: int, device: str) -> int:
    """The largest batch whose KV cache at ``context`` tokens fits the budget beside the weights: the allocated bytes
    of a one-sequence cache (window buffers included) scaled; 10% kept for activations."""
    free(device)
    if cache_name.endswith("+graph") and device != "cuda":
        return 0
    cache = make_cache(model, cache_name, tokens=context + 64)
    if cache is None:
        return 0
    with torch.no_grad():
        fill(model, cache, 1, context, device)
    per_sequence = kv_bytes(model, cache, context, 1, allocated=True)
    disable_oscar(model)
    if per_sequence is None:
        return 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(0, int((0.9 * budget - weights) // max(per_sequence, 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama8b,qwen3-8b,smollm2")
    parser.add_argument("--caches", default=",".join(CACHES))
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--contexts", default="4096,16384,32768")
    parser.add_argument("--long", type=int, default=131072, help="the extra context at batch 1 (0: none)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--prefill-contexts", default="4096,16384,32768", help="batch-1 prefills timed (empty: none)")
    parser.add_argument("--breakdown", default="1x4096,16x16384", help="batch x context shapes profiled per step")
    parser.add_argument("--budget-gb", type=float, default=60.0)
    parser.add_argument("--budget-context", type=int, default=16384)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and small sizes: a smoke test of the script")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--from-json", help="write the table and plots of an earlier run's e2e.json, run nothing")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write(json.loads(pathlib.Path(args.from_json).read_text()), out, "e2e")
        return
    if args.tiny:
        args.models, args.batches, args.contexts, args.long, args.steps = "tiny", "1,2", "64,300", 0, 3
        args.prefill_contexts, args.breakdown, args.budget_context, args.budget_gb = "300", "", 300, 0.05
    command = "python bench/e2e.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "tiny", "from_json"))
    batches, contexts, caches = _ints(args.batches), _ints(args.contexts), args.caches.split(",")
    breakdown = {tuple(int(x) for x in shape.split("x")) for shape in args.breakdown.split(",") if shape}

    rows, prefills, capacity = [], [], []
    for name in args.models.split(","):
        model = load(name, args.device)
        shapes = [(b, c) for b in batches for c in contexts] + ([(1, args.long)] if args.long else [])
        for batch, context in shapes:
            for cache in caches:
                row = _guarded(measure, model, cache, batch, context, args.steps, args.device,
                               breakdown=(batch, context) in breakdown)
                if row is None:
                    continue
                rows.append({"model": name, "cache": cache, "batch": batch, "context": context, **row})
                print(rows[-1], flush=True)
        for context in _ints(args.prefill_contexts):
            for cache in caches:
                seconds = _guarded(prefill_time, model, cache, context, args.device)
                if seconds is not None:
                    prefills.append({"model": name, "cache": cache, "context": context,
                                     **(seconds if isinstance(seconds, dict) else {"prefill_s": seconds})})
                    print(prefills[-1], flush=True)
        for cache in caches:
            fits = max_batch(model, cache, args.budget_context, int(args.budget_gb * 2**30), args.device)
            if fits:
                row = _guarded(measure, model, cache, fits, args.budget_context, args.steps, args.device)
                capacity.append(dict(model=name, cache=cache, context=args.budget_context, max_batch=fits,
                                     **{k: row[k] for k in ("tokens_per_s", "error") if k in row}))
                print(capacity[-1], flush=True)
        del model
        free(args.device)
    result = dict(
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), command=command,
        versions=_versions(), budget_gb=args.budget_gb, rows=rows, prefill=prefills, capacity=capacity,
    )
    stem = "e2e_tiny" if args.tiny else "e2e"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write(result, out, stem)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _guarded(function, *args, **kwargs):
    """``function(*args, **kwargs)``, or ``{"error": ...}`` when the GPU runs out of memory or a cache that is not ours
    (transformers' quantized cache and its backend) fails; the error goes into the results."""
    try:
        return function(*args, **kwargs)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:  # noqa: BLE001  (failures of our own caches are re-raised)
        if not (args and args[1] in ("hf-quantized", "bf16+graph")):
            raise
        return {"error": f"{type(error).__name__}: {str(error)[:120]}"}


def _versions() -> dict:
    versions = dict(oscar_cupy=oc.__version__, torch=torch.__version__, transformers=transformers.__version__)
    try:
        import cupy

        versions["cupy"] = cupy.__version__
    except ImportError:
        pass
    return versions


def write(result: dict, out: pathlib.Path, stem: str) -> None:
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    try:
        if any("error" not in r for r in result["rows"]):  # a capacity-only run has no decode rows to plot
            plot(result, out / f"{stem}.png")
    except ImportError:
        print("no matplotlib: no plot")


def _baseline(result: dict, row: dict, key: str = "rows", baseline: str = "bf16") -> dict | None:
    """The ``baseline`` row of the same model and shape."""
    return next((r for r in result[key] if r["cache"] == baseline and "error" not in r and
                 all(r.get(k) == row.get(k) for k in ("model", "batch", "context"))), None)


def markdown(result: dict) -> str:
    lines = [f"# End-to-end decoding, {result['device']}, {result['date'][:10]}", "", f"`{result['command']}`", "",
             "Decode steps over caches filled with `context` tokens per sequence (tokens/s = batch / median step).", "",
             "| model | batch | context | cache | step median (ms) | step p90 (ms) | tokens/s | vs bf16 | "
             "vs bf16+graph | "
             "KV bytes | KV vs bf16 | peak GPU (GB) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['cache']} | {r['error']} "
                         "| | | | | | | |")
            continue
        base, graph_base = _baseline(result, r), _baseline(result, r, baseline="bf16+graph")
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        graph_speed = f"{r['tokens_per_s'] / graph_base['tokens_per_s']:.2f}x" if graph_base else ""
        smaller = f"{r['kv_bytes_bf16'] / r['kv_bytes']:.2f}x smaller" if r["cache"] != "bf16" and r["kv_bytes"] else ""
        stored = f"{r['kv_bytes']:,}" if r["kv_bytes"] else "n/a"
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['cache']} | {r['step_median_ms']:.2f} | "
                     f"{r['step_p90_ms']:.2f} | {r['tokens_per_s']:.1f} | {speed} | {graph_speed} | {stored} | "
                     f"{smaller} | "
                     f"{r.get('peak_gpu_bytes', 0) / 1e9:.1f} |")
    split = [r for r in result["rows"] if "breakdown_ms" in r]
    if split:
        lines += ["", "Where a decode step's time goes (ms per step; GPU kernel time by kind, host overhead = wall "
                  "minus all kernel time):", "",
                  "| model | batch | context | cache | wall | attention | cache writes | "
                  "rest of the model | host overhead |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in split:
            b = r["breakdown_ms"]
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['cache']} | {b['wall']:.2f} | "
                         f"{b['attention']:.2f} | {b['cache writes']:.2f} | {b['model']:.2f} | "
                         f"{b['host_overhead']:.2f} |")
    if result.get("prefill"):
        lines += ["", "Prefill, batch 1 (the model's forward over the prompt into a fresh cache):", "",
                  "| model | context | cache | prefill (s) |", "|---|---:|---|---:|"]
        for r in result["prefill"]:
            value = r["error"] if "error" in r else f"{r['prefill_s']:.3f}"
            lines.append(f"| {r['model']} | {r['context']} | {r['cache']} | {value} |")
    lines += ["", f"At a {result['budget_gb']:g} GB budget (weights + allocated cache bytes, 10% kept for "
              "activations):", "", "| model | cache | context | max batch | vs bf16 | tokens/s | vs bf16 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["capacity"]:
        base = _baseline(result, r, "capacity")
        batch_ratio = f"{r['max_batch'] / base['max_batch']:.2f}x" if base else ""
        tokens = r.get("tokens_per_s")
        speed = f"{tokens / base['tokens_per_s']:.2f}x" if base and tokens and base.get("tokens_per_s") else ""
        lines.append(f"| {r['model']} | {r['cache']} | {r['context']} | {r['max_batch']} | {batch_ratio} | "
                     f"{r.get('error') or f'{tokens:.1f}'} | {speed} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
    """Tokens/s against context per cache (one panel per batch, first model) and max batch and throughput at the
    budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    model = rows[0]["model"]
    batches = sorted({r["batch"] for r in rows if r["model"] == model})
    figure, axes = plt.subplots(1, len(batches) + 1, figsize=(4 * (len(batches) + 1), 3.6))
    for axis, batch in zip(axes, batches):
        for cache in dict.fromkeys(r["cache"] for r in rows):
            points = sorted((r["context"], r["tokens_per_s"]) for r in rows
                            if r["model"] == model and r["batch"] == batch and r["cache"] == cache)
            if points:
                axis.plot(*zip(*points), marker="o", label=cache)
        axis.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s", title=f"{model}, batch {batch}")
        axis.legend(fontsize=8)
    axis = axes[-1]
    fits = [r for r in result["capacity"] if r["model"] == model and r.get("tokens_per_s")]
    axis.bar([r["cache"] for r in fits], [r["tokens_per_s"] for r in fits])
    for i, r in enumerate(fits):
        axis.annotate(f"batch {r['max_batch']}", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    axis.set(ylabel="tokens/s at the max batch", title=f"{result['budget_gb']:g} GB budget, {model}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
