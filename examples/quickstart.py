"""Quantize a KV cache to INT2 with OScaR and decode from it; compare with KIVI-style INT2 and exact attention.

Run: python examples/quickstart.py   (CPU, numpy only, a few seconds)

The keys mimic a real attention head: post-RoPE keys with a few massive channels, tokens of unequal norm and a
low-norm attention-sink token that the query attends to.
"""

import numpy as np

import oscar_cupy as oc

BATCH, KV_HEADS, Q_HEADS, TOKENS, HEAD_DIM = 1, 8, 32, 4096, 128


def rope(x, positions):
    inverse = 10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angles = positions[:, None] * inverse[None, :]
    half = HEAD_DIM // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.tile(np.cos(angles), 2) + rotated * np.tile(np.sin(angles), 2)


def synthetic_head(rng):
    """Keys (tokens, head_dim) and one query per query head of this KV head."""
    mean = rng.standard_normal(HEAD_DIM) * 0.7
    massive = rng.choice(np.arange(HEAD_DIM // 4, HEAD_DIM // 2), 4, replace=False)
    mean[massive] = 12.0 * rng.choice([-1, 1], 4)
    base = (mean + rng.standard_normal((TOKENS, HEAD_DIM))) * np.exp(0.6 * rng.standard_normal((TOKENS, 1)))
    base[0] = rng.standard_normal(HEAD_DIM) * 0.15 * np.linalg.norm(base, axis=1).mean() / np.sqrt(HEAD_DIM)
    keys = rope(base, np.arange(TOKENS, dtype=np.float64))
    queries = rng.standard_normal((Q_HEADS // KV_HEADS, HEAD_DIM)) * 0.5
    queries[:, massive] = -np.sign(mean[massive]) * 3.0
    return keys, rope(queries, np.full(len(queries), TOKENS - 1.0))


def exact_attention(q, k, v):
    k = np.repeat(k, Q_HEADS // KV_HEADS, axis=1).astype(np.float64)
    v = np.repeat(v, Q_HEADS // KV_HEADS, axis=1).astype(np.float64)
    logits = q.astype(np.float64) @ k.swapaxes(-1, -2) / np.sqrt(HEAD_DIM)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def main():
    rng = np.random.default_rng(0)
    heads = [synthetic_head(rng) for _ in range(KV_HEADS)]
    k = np.stack([keys for keys, _ in heads])[None].astype(np.float32)  # (batch, kv_heads, tokens, head_dim)
    q = np.concatenate([queries for _, queries in heads])[None, :, None].astype(np.float32)  # (batch, q_heads, 1, D)
    v = rng.standard_normal((BATCH, KV_HEADS, 1, HEAD_DIM))  # values: a per-head mean plus noise
    v = v + 0.5 * rng.standard_normal((BATCH, KV_HEADS, TOKENS, HEAD_DIM))
    v = v.astype(np.float32)
    exact = exact_attention(q, k, v)
    bf16_bytes = 2 * k.size * 2

    print(f"{'cache':<16}{'bytes':>12}{'vs bf16':>9}{'bits/elem':>11}{'attention error':>17}")
    print(f"{'bf16':<16}{bf16_bytes:>12,}{1.0:>8.2f}x{16.0:>11.2f}{0.0:>17.4f}")
    for preset in ("kivi-2", "oscar-2", "kivi-4", "oscar-4"):
        qkv = oc.quantize_kv(k, v, oc.QuantConfig.preset(preset))
        out = oc.decode_attention(q, qkv)
        error = np.linalg.norm(out - exact) / np.linalg.norm(exact)
        ratio = bf16_bytes / qkv.nbytes
        print(f"{preset:<16}{qkv.nbytes:>12,}{ratio:>8.2f}x{qkv.bits_per_element:>11.2f}{error:>17.4f}")


if __name__ == "__main__":
    main()
