"""The Hugging Face adapter on a GPU: a tiny random Llama in float16 generates through the fused decode kernel and
matches the CPU reference path (same model, same cache config, on the CPU) in logits and greedy tokens.

Skipped without cupy, torch with CUDA and a GPU; run on the device machine."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

from test_hf import teacher_forced_logits, tiny_model  # noqa: E402

import oscar_cupy as oc  # noqa: E402
from oscar_cupy.adapters.hf import disable_oscar, enable_oscar  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gpu_decode_matches_the_cpu_reference_path(family):
    model = tiny_model(family).to(torch.float16)
    config = oc.QuantConfig.preset("oscar-2", window=32)
    tokens = torch.randint(0, 256, (2, 150))
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        cache = enable_oscar(model, config)
        results[device] = teacher_forced_logits(model, tokens.to(device), cache, 70).float().cpu()
        assert cache.layers[0].cache.packed_lengths.tolist() == [128, 128]  # flushes happened during decode
        disable_oscar(model)
    cpu, gpu = results["cpu"], results["cuda"]
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 2e-2
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item() > 0.95


def test_gpu_greedy_generation_matches_the_cpu_tokens_where_the_cpu_is_decided():
    """Greedy tokens agree with the CPU's wherever the CPU's top two logits are apart by more than the float16 noise
    of the two paths (a random model has many near ties); the continuation is fed back, so generate runs its own loop."""
    model = tiny_model("llama").to(torch.float16)
    config = oc.QuantConfig.preset("oscar-4", window=32)
    prompt = torch.randint(0, 256, (1, 40))
    model.to("cuda")
    cache = enable_oscar(model, config)
    with torch.no_grad():
        generated = model.generate(prompt.cuda(), max_new_tokens=40, do_sample=False, past_key_values=cache)
    disable_oscar(model)
    model.to("cpu")
    cache = enable_oscar(model, config)
    logits = teacher_forced_logits(model, generated.cpu(), cache, 40).float()[0, :-1]  # predicts tokens 41 .. 79
    disable_oscar(model)
    top2 = logits.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.05 * logits.std()
    assert decided.sum() >= 20
    assert torch.equal(logits.argmax(-1)[decided], generated[0, 41:].cpu()[decided])
