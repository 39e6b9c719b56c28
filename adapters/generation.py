"""Greedy and sampled generation whose decode steps replay a CUDA graph: ``model.generate`` at the GPU's speed.

    cache = enable_oscar(model, QuantConfig())
    sequences = generate(model, cache, **tokenizer(prompts, return_tensors="pt", padding=True).to("cuda"),
                         max_new_tokens=200)

The prompt goes through the model once, as ``generate`` does (full-precision attention, then whole flush blocks
packed); then each new token is one step of :class:`oscar_cupy.adapters.hf.CudaGraphDecoder`. The tokens are chosen as
transformers chooses them: the argmax, or with ``do_sample`` a draw after temperature, top-k and top-p, in that
order; sequences that emitted an end-of-sequence token continue with padding, and generation stops when all have.
"""

from __future__ import annotations

import torch

from oscar_cupy.adapters.hf import CudaGraphDecoder, OscarCache


def generate(model, cache: OscarCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id=None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt; returns int64 ``(batch, prompt + new)`` like
    ``model.generate`` (prompt included, finished sequences padded with ``pad_token_id``).

    Args:
        model: a transformers causal LM on one CUDA device, after :func:`oscar_cupy.adapters.hf.enable_oscar`.
        cache: the empty :class:`OscarCache` that ``enable_oscar`` returned; it holds the sequences afterwards.
        input_ids: int64 ``(batch, prompt)``; attention_mask: ``(batch, prompt)``, 0 at (left) padding, default all 1.
        do_sample: draw each token (``temperature`` > 0, ``top_k`` >= 0 with 0 for all, 0 < ``top_p`` <= 1) with
            ``generator``; otherwise the argmax.
        eos_token_id: an int or a list of ints ending a sequence; pad_token_id: what follows it (default the first
            end-of-sequence token).
    """
    steps = int(max_new_tokens)
    if steps < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if int(top_k) < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, prompt), got shape {tuple(input_ids.shape)}")
    if cache.get_seq_length():
        raise ValueError("generate needs an empty cache (a new one from enable_oscar, or cache.reset())")
    device = input_ids.device
    if device.type != "cuda":  # checked before the prefill: the decode steps replay a CUDA graph
        raise ValueError(f"generate runs on one CUDA device, got input_ids on {device}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # each sequence from its first token, as generate does
    end = torch.as_tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=device).view(-1)
    pad = int(end[0]) if pad_token_id is None and end.numel() else pad_token_id
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    decoder = CudaGraphDecoder(model, cache)
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
    new_tokens = []
    try:
        for step in range(steps):
            token = next_token(logits, do_sample, temperature, int(top_k), top_p, generator)
            if end.numel():
                token = torch.where(running, token, torch.full_like(token, pad))
                running &= ~torch.isin(token, end)
            new_tokens.append(token)
            if step + 1 == steps or (end.numel() and not running.any()):
                break
            logits = decoder.step(token.view(-1, 1))
    finally:
        decoder.close()
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, 1)], 1)


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 ``(batch,)``: the argmax of ``logits`` ``(batch, vocab)``, or a draw from the :func:`warp`-ed scores."""
    if not do_sample:
        return logits.argmax(-1)
    scores = warp(logits, temperature, top_k, top_p)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """float32 scores of ``logits`` ``(batch, vocab)`` after transformers' temperature, top-k and top-p warpers, in
    that order (``-inf`` for the tokens they remove; the most likely token always stays)."""
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ascending, order = torch.sort(scores)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores
