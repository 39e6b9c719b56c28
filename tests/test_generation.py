"""Generation through the CUDA-graph decoder, the CPU side: transformers' token choice (argmax, temperature, top-k,
top-p) reproduced exactly, and the arguments refused before any work. The GPU runs are in test_cuda_hf.py."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import tiny_model  # noqa: E402

import oscar_cupy as oc  # noqa: E402
from oscar_cupy.adapters.generation import generate, next_token, warp  # noqa: E402
from oscar_cupy.adapters.hf import disable_oscar, enable_oscar  # noqa: E402


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9),
                                                       (1.3, 7, 0.5), (0.5, 300, 0.999), (1.0, 1, 1.0)])
def test_warp_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone())
    assert torch.equal(warp(logits, temperature, top_k, top_p), expected)


def test_next_token_greedy_and_sampled():
    logits = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    assert torch.equal(next_token(logits, False), logits.argmax(-1))
    assert torch.equal(next_token(logits, True, top_k=1), logits.argmax(-1))  # one token left
    draws = torch.stack([next_token(logits, True, top_k=3, generator=torch.Generator().manual_seed(s))
                         for s in range(50)])
    top3 = logits.topk(3).indices
    assert all((draws[:, b, None] == top3[b]).any(-1).all() for b in range(8))  # only the three most likely
    assert len({tuple(d.tolist()) for d in draws}) > 1  # and not always the same


def test_generate_refuses_bad_arguments_and_needs_a_gpu():
    model = tiny_model("llama")
    cache = enable_oscar(model, oc.QuantConfig(window=32))
    prompt = torch.randint(0, 256, (2, 10))
    cases = [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(do_sample=True, temperature=0.0), "temperature"),
             (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            generate(model, cache, prompt, **kwargs)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, prompt\)"):
        generate(model, cache, prompt[0])
    with pytest.raises(ValueError, match="one CUDA device, got input_ids on cpu"):  # before any prefill
        generate(model, cache, prompt)
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        model(prompt, past_key_values=cache)
    with pytest.raises(ValueError, match="empty cache"):  # the prefill above filled it
        generate(model, cache, prompt)
    disable_oscar(model)
