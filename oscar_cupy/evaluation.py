"""``oscar-cupy eval``: the accuracy of each cache on a real model and real text.

Three measurements, each for a bf16 cache (transformers' ``DynamicCache``) and every preset asked for:

* **perplexity** over contexts of several lengths from several books: the first ``prompt`` tokens of a context are the
  prompt (attended in full precision, as any prefill), the rest is fed through the cache ``chunk`` tokens at a time, as
  decoding reads it, so every scored token attends to the packed (quantized) past plus the window;
* **passkey retrieval**: a five-digit number hidden at several depths of a long text; the text is stored as a prompt,
  the question goes through the cache, and the greedy answer must hold the number;
* **generation agreement**: how many greedy tokens after a passage equal the bf16 cache's.

Writes ``eval.json``, ``eval.md`` and, with matplotlib, ``perplexity.png`` (perplexity against context per cache) and
``bits.png`` (bits per element against perplexity).
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import random

import numpy as np

from oscar_cupy import layout

PRESETS = ("bf16", "kivi-2", "hadamard-only-2", "scaling-only-2", "oscar-2", "kivi-4", "oscar-4")
PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


def run(args, progress) -> dict:
    """The evaluation for parsed command-line ``args`` (see :func:`oscar_cupy.cli.parser`); ``progress`` wraps
    iterables (a progress bar) and reports lines."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oscar_cupy.assets.models import resolve_model
    from oscar_cupy.config import QuantConfig
    from oscar_cupy.demo import config_changes, load_text, resolve_device

    device = resolve_device(args.device)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().to(device)
    texts = {spec: load_text(spec) for spec in args.texts}
    changes = config_changes(args)
    configs = {name: None if name == "bf16" else QuantConfig.preset(name, **changes) for name in args.presets}
    evaluator = _Evaluator(model, tokenizer, device, args.prompt_tokens, args.chunk)

    result = {
        "model": str(args.model or "SmolLM2-135M-Instruct"), "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "settings": {"texts": list(args.texts), "contexts": list(args.contexts), "presets": list(args.presets),
                     "window": args.window, "groups": args.groups, "prompt_tokens": args.prompt_tokens,
                     "chunk": args.chunk,
                     "passkey_contexts": list(args.passkey_contexts), "passkey_depths": list(args.passkey_depths),
                     "agreement_tokens": args.agreement_tokens},
        "versions": _versions(),
        "bits_per_element": {name: _bits(config, model) for name, config in configs.items()},
        "perplexity": [], "passkey": [], "agreement": [],
    }
    jobs = [(spec, context, name) for spec in texts for context in args.contexts for name in configs]
    for spec, context, name in progress(jobs, "perplexity"):
        ids = _tokens(tokenizer, texts[spec], context, f"--texts {spec}")
        result["perplexity"].append({"text": spec, "context": context, "preset": name,
                                     "perplexity": evaluator.perplexity(ids, configs[name])})
    filler = texts[args.texts[0]]
    jobs = [(context, depth, name) for context in args.passkey_contexts for depth in args.passkey_depths
            for name in configs]
    for context, depth, name in progress(jobs, "passkey"):
        key = random.Random(f"{context}-{depth}").randrange(10000, 100000)
        answer = evaluator.passkey(filler, context, depth, key, configs[name])
        result["passkey"].append({"text": args.texts[0], "context": context, "depth": depth, "preset": name, "key": key,
                                  "answer": answer, "found": str(key) in answer})
    if args.agreement_tokens:
        prompt = _tokens(tokenizer, filler, max(args.passkey_contexts + args.contexts), "--texts")
        continuations = {name: evaluator.greedy(prompt, args.agreement_tokens, configs[name])
                         for name in progress(list(configs), "agreement")}
        reference = continuations.get("bf16")
        for name, tokens in continuations.items():
            equal = len(tokens) if reference is None else _leading_equal(tokens, reference)
            result["agreement"].append({"text": args.texts[0], "preset": name, "leading_equal": equal,
                                        "of": args.agreement_tokens})
    return result


class _Evaluator:
    """A model and the way contexts go through a cache."""

    def __init__(self, model, tokenizer, device, prompt_tokens: int, chunk: int):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.prompt_tokens, self.chunk = prompt_tokens, chunk

    def cache(self, config):
        """A fresh cache for ``config`` (``None``: bf16)."""
        from transformers import DynamicCache

        from oscar_cupy.adapters.hf import disable_oscar, enable_oscar

        disable_oscar(self.model)
        return DynamicCache() if config is None else enable_oscar(self.model, config)

    def perplexity(self, ids, config) -> float:
        from oscar_cupy.demo import held_back_perplexity

        ids = ids.to(self.device)
        prompt, rest = ids[:, : self.prompt_tokens], ids[:, self.prompt_tokens :]
        return held_back_perplexity(self.model, prompt, rest, self.cache(config), self.chunk)

    def passkey(self, filler: str, context: int, depth: float, key: int, config) -> str:
        """The greedy answer after ``context`` tokens of ``filler`` holding the pass key at ``depth`` (0 to 1)."""
        import torch

        needle = self.tokenizer(PASSKEY.format(key=key), add_special_tokens=False).input_ids
        question = self.tokenizer(QUESTION, add_special_tokens=False).input_ids
        hay = _tokens(self.tokenizer, filler, context - len(needle) - len(question), "--texts")[0].tolist()
        at = int(depth * len(hay))
        stored = torch.tensor([hay[:at] + needle + hay[at:]], device=self.device)
        cache = self.cache(config)
        with torch.no_grad():
            self.model(stored, past_key_values=cache)  # the prompt: packed in whole flush blocks
            full = torch.cat([stored, torch.tensor([question], device=self.device)], dim=1)
            output = self.model.generate(full, max_new_tokens=8, do_sample=False, past_key_values=cache,
                                         attention_mask=torch.ones_like(full))
        return self.tokenizer.decode(output[0, full.shape[1] :])

    def greedy(self, prompt, tokens: int, config) -> list[int]:
        import torch

        prompt = prompt.to(self.device)
        with torch.no_grad():
            output = self.model.generate(prompt, max_new_tokens=tokens, do_sample=False,
                                         past_key_values=self.cache(config), attention_mask=torch.ones_like(prompt))
        return output[0, prompt.shape[1] :].tolist()


def _bits(config, model) -> float:
    """Stored bits per key/value element of a long sequence (16 for bf16)."""
    if config is None:
        return 16.0
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    specs = layout.array_specs(config, 1, heads, config.window, head_dim)
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs.values())
    return 8 * total / (2 * config.window * heads * head_dim)


def _tokens(tokenizer, text: str, count: int, option: str):
    """``(1, count)`` token ids from the middle third of ``text`` on."""
    start = text.find("\n\n", len(text) // 3) + 2
    ids = tokenizer(text[start:], return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < count:
        raise ValueError(f"{option}: the text holds {ids.shape[1]} tokens after its first third; {count} are needed")
    return ids[:, :count]


def _leading_equal(tokens: list[int], reference: list[int]) -> int:
    equal = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        equal += 1
    return equal


def _versions() -> dict:
    import torch
    import transformers

    import oscar_cupy

    return {"oscar_cupy": oscar_cupy.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def write(result: dict, out: pathlib.Path, plots: bool = True) -> list[pathlib.Path]:
    """Write ``eval.json``, ``eval.md`` and (with matplotlib, unless ``plots`` is false) the plots into ``out``;
    returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md"]
    written[0].write_text(json.dumps(result, indent=1))
    written[1].write_text(markdown(result))
    if plots:
        try:
            written += _plots(result, out)
        except ImportError:
            pass  # no matplotlib: the tables are complete without the plots
    return written


def merge(results: list[dict]) -> dict:
    """One result of several runs over different texts (same presets and settings otherwise): rows concatenated,
    texts listed together, each run's passkey and agreement rows labelled with the text they used."""
    merged = {**results[0], "perplexity": [], "passkey": [], "agreement": []}
    merged["settings"] = {**results[0]["settings"], "texts": [t for r in results for t in r["settings"]["texts"]]}
    merged["command"] = " && ".join(r.get("command", "") for r in results)
    for result in results:
        for key in ("perplexity", "passkey", "agreement"):
            merged[key] += [{"text": result["settings"]["texts"][0], **row} for row in result[key]]
    return merged


def markdown(result: dict) -> str:
    """The tables of ``result``: perplexity per (text, context) and cache, passkey hits, agreement."""
    presets = result["settings"]["presets"]
    lines = [f"# Evaluation of {result['model']} ({result['device']}, {result['date'][:10]})", "",
             f"Settings: `{json.dumps(result['settings'])}`; versions `{json.dumps(result['versions'])}`.", "",
             "## Perplexity", "", "| text | context | " + " | ".join(presets) + " |",
             "|---|---:|" + "---:|" * len(presets), ]
    cells = {(r["text"], r["context"], r["preset"]): r["perplexity"] for r in result["perplexity"]}
    for text, context in dict.fromkeys((r["text"], r["context"]) for r in result["perplexity"]):
        lines.append(f"| {text} | {context} | "
                     + " | ".join(f"{cells.get((text, context, p), math.nan):.3f}" for p in presets) + " |")
    lines.append("| bits per element | | " + " | ".join(f"{result['bits_per_element'][p]:.2f}" for p in presets) + " |")
    if result["passkey"]:
        found = {}
        for r in result["passkey"]:
            hits, total = found.get((r["context"], r["preset"]), (0, 0))
            found[(r["context"], r["preset"])] = (hits + r["found"], total + 1)
        lines += ["", "## Passkey retrieval (found / tries: depths x filler texts)", "",
                  "| context | " + " | ".join(presets) + " |",
                  "|---:|" + "---:|" * len(presets)]
        for context in dict.fromkeys(r["context"] for r in result["passkey"]):
            lines.append(f"| {context} | " + " | ".join("{}/{}".format(*found[(context, p)]) for p in presets) + " |")
    if result["agreement"]:
        equal = {(r.get("text", ""), r["preset"]): f"{r['leading_equal']}/{r['of']}" for r in result["agreement"]}
        lines += ["", "## Greedy tokens equal to the bf16 cache's (leading)", "",
                  "| prompt text | " + " | ".join(presets) + " |", "|---|" + "---:|" * len(presets)]
        for text in dict.fromkeys(text for text, _ in equal):
            lines.append(f"| {text} | " + " | ".join(equal.get((text, p), "") for p in presets) + " |")
    return "\n".join(lines) + "\n"


def _plots(result: dict, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = result["settings"]["presets"]
    paths = [out / "perplexity.png", out / "bits.png"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for preset in presets:
        by_context = {}
        for r in result["perplexity"]:
            if r["preset"] == preset:
                by_context.setdefault(r["context"], []).append(r["perplexity"])
        contexts = sorted(by_context)
        axis.plot(contexts, [sum(by_context[c]) / len(by_context[c]) for c in contexts], marker="o", label=preset)
    axis.set(xscale="log", xlabel="context (tokens)", ylabel="perplexity (mean over texts)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for preset in presets:
        values = [r["perplexity"] for r in result["perplexity"] if r["preset"] == preset]
        axis.scatter(result["bits_per_element"][preset], sum(values) / len(values), label=preset)
    axis.set(xlabel="bits per key/value element", ylabel="perplexity (mean over texts and contexts)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close("all")
    return paths
