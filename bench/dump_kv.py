"""Dump the real KV cache of SmolLM2-135M-Instruct on a Shakespeare passage, as test data for the quantizers.

Tokenizes a passage that starts at the first paragraph break after the middle of --text (plain text, e.g. a
Gutenberg play; starting mid-file skips any header), keeps its first --tokens tokens (no special tokens added),
runs ONE bf16 forward pass on CPU with use_cache=True and saves, from the returned cache, for every layer:

  keys    float32 (layers, 1, kv_heads, tokens, head_dim)  post-RoPE keys, exactly the bf16 values widened to float32
  values  float32 (layers, 1, kv_heads, tokens, head_dim)  values, likewise
  queries float32 (layers, 1, q_heads, query_tokens, head_dim)  post-RoPE queries of the last --query-tokens
          positions (bf16 projections, RoPE applied in float32 as the model does, then rounded to bf16)
  token_ids    int32 (tokens,)
  layer_names  str (layers,)
  metadata     str, JSON: model, transformers version, tokens, text file, character offset and span, ...

with np.savez_compressed. Read it back with np.load(path) and json.loads(str(data["metadata"])).

Run: python bench/dump_kv.py --model /tmp/smollm2/bf16 --text hamlet_gut.txt [--tokens 1024]
     [--out .assets/smollm2_kv.npz]
(--model is a saved transformers folder, or a .gguf file, which is dequantized on load.)
"""

import argparse
import json
import pathlib

import numpy as np
import torch
import transformers
from packaging import version
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def load(model_path):
    """Tokenizer and bf16 model from a folder or a .gguf file."""
    path = pathlib.Path(model_path)
    if path.suffix == ".gguf":
        folder, extra = path.parent, {"gguf_file": path.name}
    else:
        folder, extra = path, {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    # bf16 at load, not .to(bfloat16) afterwards: that would also round RoPE's float32 inv_freq buffer to bf16.
    dtype_arg = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(folder, **{dtype_arg: torch.bfloat16}, **extra).eval()
    return tokenizer, model


def cache_layers(cache):
    """(keys, values) per layer, for transformers 5.x (cache.layers) and 4.5x (cache.key_cache) DynamicCache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="transformers model folder or .gguf file")
    parser.add_argument("--text", required=True, help="plain-text file to take the passage from")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--out", default=".assets/smollm2_kv.npz")
    parser.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="recorded in the metadata")
    parser.add_argument("--query-tokens", type=int, default=256, help="how many of the last positions' queries to keep")
    args = parser.parse_args()

    text = pathlib.Path(args.text).read_text(encoding="utf-8")
    offset = text.index("\n\n", len(text) // 2) + 2
    tokenizer, model = load(args.model)
    encoding = tokenizer(text[offset:], add_special_tokens=False, return_offsets_mapping=True)
    if len(encoding["input_ids"]) < args.tokens:
        raise SystemExit(f"only {len(encoding['input_ids'])} tokens after offset {offset}, need {args.tokens}")
    token_ids = encoding["input_ids"][: args.tokens]
    span = encoding["offset_mapping"][args.tokens - 1][1]

    projections = []  # each layer's q_proj output, (1, tokens, q_heads * head_dim)
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda _, __, out: projections.append(out))
             for layer in model.model.layers]
    with torch.inference_mode():
        output = model(torch.tensor([token_ids]), use_cache=True)
        positions = torch.arange(args.tokens)[None]
        cos, sin = model.model.rotary_emb(projections[0], positions)
        head_dim = model.config.head_dim
        queries = []
        for projection in projections:  # RoPE as the attention layer applies it
            q = projection.view(1, args.tokens, -1, head_dim).transpose(1, 2)
            queries.append(apply_rotary_pos_emb(q, q, cos, sin)[0][:, :, -args.query_tokens :])
    for hook in hooks:
        hook.remove()
    layers = cache_layers(output.past_key_values)
    keys = torch.stack([k for k, _ in layers]).float().numpy()  # bf16 -> float32 is exact
    values = torch.stack([v for _, v in layers]).float().numpy()

    metadata = {
        "model": args.model_name,
        "model_path": str(args.model),
        "dtype": "bfloat16 (stored as exact float32)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokens": args.tokens,
        "special_tokens_added": False,
        "text_file": pathlib.Path(args.text).name,
        "char_offset": offset,
        "char_span": span,
        "keys": "post-RoPE, (layers, batch, kv_heads, tokens, head_dim)",
        "rope_parameters": getattr(model.config, "rope_parameters", None),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        keys=keys,
        values=values,
        queries=torch.stack(queries).float().numpy(),
        token_ids=np.array(token_ids, dtype=np.int32),
        layer_names=np.array([f"model.layers.{i}.self_attn" for i in range(len(layers))]),
        metadata=np.array(json.dumps(metadata)),
    )
    print(f"{out}: keys {keys.shape}, values {values.shape}, {out.stat().st_size / 1e6:.1f} MB, "
          f"text chars {offset}..{offset + span} of {metadata['text_file']}")


if __name__ == "__main__":
    main()
