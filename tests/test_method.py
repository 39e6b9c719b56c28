"""Why OScaR exists: on keys with a low-norm attention sink and a few massive channels, OScaR INT2 beats KIVI INT2.

The synthetic heads mimic what real LLM heads show: post-RoPE keys with a few massive channels (a large mean in a few
dimensions, rotated by RoPE across each 32-token group), tokens of unequal norm, and a sink token of small norm that the
queries attend to because they look away from the massive channels; values with a few outlier channels and a near-zero
sink value. Errors are averaged over several heads and draws; the comparison is at the same bits and groups.
"""

import numpy as np
import pytest

import oscar_cupy as oc

TOKENS, KV_HEADS, RATIO, HEAD_DIM = 1024, 4, 4, 128


def rope(x, positions, base=10000.0):
    inverse = base ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angles = positions[:, None] * inverse[None, :]
    cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)
    half = HEAD_DIM // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def sink_heads(rng, massive=12.0, sink_norm=0.15, spread=0.6):
    """``(k, v, q)``: float32 keys/values ``(1, KV_HEADS, TOKENS, HEAD_DIM)`` and one decode query per query head."""
    positions = np.arange(TOKENS, dtype=np.float64)
    k = np.empty((1, KV_HEADS, TOKENS, HEAD_DIM))
    q = np.empty((1, KV_HEADS * RATIO, 1, HEAD_DIM))
    for h in range(KV_HEADS):
        mean = rng.standard_normal(HEAD_DIM) * 0.7
        massive_dims = rng.choice(np.arange(HEAD_DIM // 4, HEAD_DIM // 2), 4, replace=False)
        mean[massive_dims] = massive * rng.choice([-1, 1], 4)
        base = (mean + rng.standard_normal((TOKENS, HEAD_DIM))) * np.exp(spread * rng.standard_normal((TOKENS, 1)))
        base[0] = rng.standard_normal(HEAD_DIM)  # the sink: another direction, a small norm
        base[0] *= sink_norm * np.linalg.norm(base[1:], axis=1).mean() / np.linalg.norm(base[0])
        k[0, h] = rope(base, positions)
        for i in range(RATIO):
            w = rng.standard_normal(HEAD_DIM) * 0.5
            w[massive_dims] = -np.sign(mean[massive_dims]) * massive * 0.5
            q[0, h * RATIO + i, 0] = rope(w[None], np.array([TOKENS - 1.0]))[0]
    v = rng.standard_normal((1, KV_HEADS, 1, HEAD_DIM)) + 0.5 * rng.standard_normal((1, KV_HEADS, TOKENS, HEAD_DIM))
    v[..., rng.choice(HEAD_DIM, 4, replace=False)] += rng.choice([-1, 1], 4) * 8
    v[:, :, 0] *= 0.05
    return k.astype(np.float32), v.astype(np.float32), q.astype(np.float32)


def exact_attention(q, k, v):
    keys = np.repeat(k, RATIO, axis=1).astype(np.float64)
    logits = q.astype(np.float64) @ keys.swapaxes(-1, -2) / np.sqrt(HEAD_DIM)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return weights @ np.repeat(v, RATIO, axis=1), weights[..., 0].mean()


PRESETS = ["kivi", "hadamard-only", "scaling-only", "oscar"]


@pytest.fixture(scope="module")
def errors():
    """Mean relative attention-output error and mean relative sink-key error per preset, over 8 draws."""
    rng = np.random.default_rng(2605_19660)
    output, sink, attention_to_sink = {}, {}, []
    for _ in range(8):
        k, v, q = sink_heads(rng)
        exact, to_sink = exact_attention(q, k, v)
        attention_to_sink.append(to_sink)
        for bits in (2, 4):
            for preset in PRESETS:
                name = f"{preset}-{bits}"
                qkv = oc.quantize_kv(k, v, oc.QuantConfig.preset(name))
                out = oc.decode_attention(q, qkv)
                output.setdefault(name, []).append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
                keys, _ = qkv.dequantize()
                sink.setdefault(name, []).append(
                    np.linalg.norm(keys[:, :, 0] - k[:, :, 0]) / np.linalg.norm(k[:, :, 0]))
    assert 0.2 < np.mean(attention_to_sink) < 0.8  # the sink matters, but is not everything
    return {n: np.mean(e) for n, e in output.items()}, {n: np.mean(e) for n, e in sink.items()}


def test_oscar_int2_clearly_beats_kivi_int2(errors):
    output, _ = errors
    assert output["oscar-2"] < 0.6 * output["kivi-2"], output


def test_rotation_helps(errors):
    output, _ = errors
    assert output["hadamard-only-2"] < 0.8 * output["kivi-2"], output
    assert output["oscar-2"] < 0.8 * output["scaling-only-2"], output


def test_scaling_helps(errors):
    output, sink = errors
    assert output["scaling-only-2"] < 0.9 * output["kivi-2"], output
    assert output["oscar-2"] < output["hadamard-only-2"], output
    # the mechanism: the sink's key, quantized with groups set by tokens of larger norm, loses all precision
    # unless tokens are scaled to one norm first
    assert sink["oscar-2"] < 0.2 * sink["hadamard-only-2"], sink
    assert sink["scaling-only-2"] < 0.2 * sink["kivi-2"], sink


def test_int4_oscar_is_near_lossless_and_beats_kivi(errors):
    output, _ = errors
    assert output["oscar-4"] < 0.5 * output["kivi-4"] and output["oscar-4"] < 0.08, output
