"""The Hugging Face adapter on tiny random models (CPU): generation through prefill, decode steps and flushes; logits
against an unquantized cache; the value rotation folded into the weights and undone bit for bit."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from oscar_cupy.adapters.hf import disable_oscar, enable_oscar  # noqa: E402

import oscar_cupy as oc  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)


def tiny_model(family):
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(**TINY)
    elif family == "llama-mha":  # as many KV heads as query heads
        config = transformers.LlamaConfig(**{**TINY, "num_key_value_heads": TINY["num_attention_heads"]})
    elif family == "mistral":
        config = transformers.MistralConfig(**TINY, sliding_window=None)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**TINY)  # biases in q/k/v projections
    else:
        config = transformers.Qwen3Config(**TINY)  # q/k norms
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def teacher_forced_logits(model, tokens, cache, prompt_length):
    """Logits of each position after the prompt, feeding the given tokens one at a time through ``cache``."""
    with torch.no_grad():
        model(tokens[:, :prompt_length], past_key_values=cache)
        return torch.cat([model(tokens[:, t : t + 1], past_key_values=cache).logits
                          for t in range(prompt_length, tokens.shape[1])], dim=1)


@pytest.mark.parametrize("family", ["llama", "llama-mha", "mistral", "qwen2", "qwen3"])
def test_unpacked_tokens_give_the_unquantized_logits(family):
    """While every token sits in the full-precision window, the model computes what it computes without oscar_cupy
    (up to float32 rounding of the folded value rotation)."""
    model = tiny_model(family)
    tokens = torch.randint(0, 256, (2, 60))
    reference = teacher_forced_logits(model, tokens, transformers.DynamicCache(), 20)
    cache = enable_oscar(model, oc.QuantConfig(window=64))
    logits = teacher_forced_logits(model, tokens, cache, 20)
    disable_oscar(model)
    assert cache.layers[0].cache.packed_lengths.tolist() == [0, 0]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "llama-mha", "qwen3"])
def test_quantized_logits_stay_close(family):
    model = tiny_model(family)
    tokens = torch.randint(0, 256, (1, 200))
    reference = teacher_forced_logits(model, tokens, transformers.DynamicCache(), 100)
    errors = {}
    for preset in ("oscar-4", "oscar-2"):
        cache = enable_oscar(model, oc.QuantConfig.preset(preset, window=32))
        logits = teacher_forced_logits(model, tokens, cache, 100)
        disable_oscar(model)
        assert cache.layers[0].cache.packed_lengths.tolist() == [192]  # prefill packed 96, decode flushed 3 more
        errors[preset] = ((logits - reference).norm() / reference.norm()).item()
    assert errors["oscar-4"] < 0.1 and errors["oscar-4"] < errors["oscar-2"] < 0.5, errors


def test_generate_prefills_decodes_and_flushes():
    model = tiny_model("llama")
    prompt = torch.randint(0, 256, (2, 45))
    cache = enable_oscar(model, oc.QuantConfig.preset("oscar-2", window=32))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=70, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 115)
    for layer in cache.layers:  # the last generated token is never fed back
        assert layer.cache.lengths.tolist() == [114, 114]
        assert layer.cache.packed_lengths.tolist() == [96, 96] and (layer.cache.window_lengths < 32).all()
    assert cache.get_seq_length() == 114 and cache.nbytes > 0
    disable_oscar(model)


def test_capacity_allocates_up_front_and_never_grows():
    """With capacity for prompt plus new tokens, generate packs into storage allocated at the prefill (no growth copy,
    the same tokens as without it); without it the storage grows by doubling."""
    model = tiny_model("llama")
    prompt = torch.randint(0, 256, (2, 45))
    outputs = []
    for capacity in (0, 128):
        cache = enable_oscar(model, oc.QuantConfig.preset("oscar-2", window=32), capacity=capacity)
        with torch.no_grad():
            outputs.append(model.generate(prompt, max_new_tokens=70, do_sample=False, past_key_values=cache))
        reallocations = [layer.cache.reallocations for layer in cache.layers]
        assert all(layer.cache.capacity == max(capacity, 128) for layer in cache.layers)
        assert reallocations == [0, 0] if capacity else min(reallocations) > 0
    disable_oscar(model)
    assert torch.equal(outputs[0], outputs[1])


def test_disable_restores_the_weights_bit_for_bit():
    model = tiny_model("qwen2")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    enable_oscar(model)
    folded = model.model.layers[0].self_attn.v_proj.weight
    assert not torch.equal(folded, before["model.layers.0.self_attn.v_proj.weight"])
    disable_oscar(model)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.config._attn_implementation != "oscar_cupy"


def test_enabling_again_follows_the_new_config_alone():
    """enable_oscar on an enabled model undoes the first (its fold) before applying the second config."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 256, (2, 90))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    kivi = oc.QuantConfig.preset("kivi-2", window=32)
    enable_oscar(model, oc.QuantConfig(window=32))
    again = teacher_forced_logits(model, tokens, enable_oscar(model, kivi), 40)
    disable_oscar(model)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    fresh = teacher_forced_logits(model, tokens, enable_oscar(model, kivi), 40)
    disable_oscar(model)
    assert torch.equal(again, fresh)
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        enable_oscar(model, "oscar-2")
    with pytest.raises(TypeError, match="the model's weights are torch.float64"):
        enable_oscar(model.double())
    for capacity in (-100, 100.5, "100"):
        with pytest.raises(ValueError, match="capacity must be a non-negative integer"):
            enable_oscar(model.float(), capacity=capacity)


def test_a_cache_used_without_oscar_attention_is_refused():
    """The prompt of a model whose attention is not oscar_cupy's never reaches the cache: its next step raises
    instead of attending to the new token alone."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 256, (1, 21))
    cache = enable_oscar(model)
    disable_oscar(model)
    with torch.no_grad():
        model(tokens[:, :20], past_key_values=cache)
        with pytest.raises(RuntimeError, match="does not store its prompt"):
            model(tokens[:, 20:], past_key_values=cache)


def test_left_padded_batch_gives_each_sequence_its_own_logits():
    model = tiny_model("llama")
    config = oc.QuantConfig.preset("oscar-2", window=32)
    short, long = torch.randint(1, 256, (1, 30)), torch.randint(1, 256, (1, 45))
    batch = torch.cat([torch.cat([torch.zeros(1, 15, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 15, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1),
                      torch.ones(1, 45, dtype=torch.long)])

    def logits(ids, attention_mask):
        cache = enable_oscar(model, config)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                                 past_key_values=cache, return_dict_in_generate=True, output_logits=True,
                                 pad_token_id=0)
        disable_oscar(model)
        return torch.stack(out.logits, 1), out.sequences, cache

    together, sequences, cache = logits(batch, mask)
    assert cache.layers[0].cache.packed_lengths.tolist() == [32, 32]  # 30 + 11 and 45 + 11 tokens: one block each
    assert cache.layers[0].cache.lengths.tolist() == [41, 56]  # no padding stored
    for row, ids in enumerate((short, long)):
        alone, alone_sequences, _ = logits(ids, torch.ones_like(ids))
        assert torch.equal(sequences[row, -12:], alone_sequences[0, -12:])
        torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-4)


def test_sliding_window_layers_stay_in_full_precision_with_one_warning():
    """A hybrid model (full and sliding-window layers): the sliding layers keep transformers' own full-precision cache
    layer, the full-attention layers the packed cache; while every token sits in the window, the logits are the
    unquantized cache's. A model of sliding layers only quantizes nothing, and says so."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**TINY, use_sliding_window=True, sliding_window=24,
                                      layer_types=["sliding_attention", "full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 256, (2, 60))
    reference = teacher_forced_logits(model, tokens, transformers.DynamicCache(config=model.config), 20)
    with pytest.warns(UserWarning, match=r"1 of 2 layers of this Qwen3Config \(DynamicSlidingWindowLayer\) stay"):
        cache = enable_oscar(model, oc.QuantConfig(window=64))
    logits = teacher_forced_logits(model, tokens, cache, 20)
    assert cache.full_precision_layers == [0] and cache.layers[1].cache.lengths.tolist() == [60, 60]
    assert "oscar_original" not in vars(model.model.layers[0].self_attn)  # nothing folded where nothing is quantized
    disable_oscar(model)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)

    mistral = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(**TINY, sliding_window=512))
    with pytest.warns(UserWarning, match="no layer is quantized"):
        enable_oscar(mistral)
    disable_oscar(mistral)


def test_beam_search_reorders_the_cache():
    """Beam search expands the prompt to the beams and reorders the cache each step (reorder_cache)."""
    model = tiny_model("llama")
    prompt = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        reference = model.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False,
                                   past_key_values=transformers.DynamicCache())
        window_only = enable_oscar(model, oc.QuantConfig(window=64))  # every token stays in full precision
        same = model.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False, past_key_values=window_only)
        disable_oscar(model)
        packed = enable_oscar(model, oc.QuantConfig.preset("oscar-4", window=32))
        beams = model.generate(prompt, num_beams=3, max_new_tokens=12, do_sample=False, past_key_values=packed)
        disable_oscar(model)
    assert torch.equal(same, reference)
    assert beams.shape == reference.shape
    assert packed.layers[0].cache.batch == 3 and (packed.layers[0].cache.packed_lengths == 32).all()


def test_assisted_generation_crops_within_the_window():
    """Assisted (speculative) generation verifies several draft tokens per step and crops the rejected ones: with a
    window that holds everything it equals the unquantized cache's generation token for token; with many flushes it
    runs through, the candidates of a step never get packed, and the cache ends at the generated length."""
    model, draft = tiny_model("llama"), tiny_model("qwen2")
    prompt = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        reference = model.generate(prompt, assistant_model=draft, max_new_tokens=40, do_sample=False,
                                   past_key_values=transformers.DynamicCache())
        window_only = enable_oscar(model, oc.QuantConfig(window=128))
        same = model.generate(prompt, assistant_model=draft, max_new_tokens=40, do_sample=False,
                              past_key_values=window_only)
        disable_oscar(model)
        packed = enable_oscar(model, oc.QuantConfig.preset("oscar-4", window=32))
        out = model.generate(prompt, assistant_model=draft, max_new_tokens=40, do_sample=False, past_key_values=packed)
        disable_oscar(model)
    assert torch.equal(same, reference)
    assert out.shape == (1, 70)
    layer = packed.layers[0].cache
    assert layer.lengths.tolist() == [69] and layer.packed_lengths.tolist()[0] % 32 == 0
    assert layer.packed_lengths.tolist()[0] >= 32



def test_cache_invariants_after_every_step():
    """After the prompt and after every decode step: lengths count every token fed, the window stays under a flush
    block (flushes come right after attention), packed tokens are whole blocks, and the byte counts add up."""
    model = tiny_model("qwen3")
    config = oc.QuantConfig.preset("oscar-2", window=32)
    cache = enable_oscar(model, config)
    tokens = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        model(tokens[:, :45], past_key_values=cache)
        for fed in range(45, 151):
            for layer in cache.layers:
                store = layer.cache
                assert store.lengths.tolist() == [fed, fed]
                assert (store.window_lengths < config.window).all()
                assert (store.packed_lengths % config.window == 0).all()
                per_token = store.packed_bytes_per_token()
                window_bytes = 2 * store.kv_heads * store.head_dim * store.dtype.itemsize
                assert store.stored_nbytes() == int(store.packed_lengths.sum()) * per_token + int(
                    store.window_lengths.sum()) * window_bytes
                bf16_per_token = 2 * store.kv_heads * store.head_dim * 2
                assert store.nbytes >= store.stored_nbytes() and store.bf16_nbytes() == 2 * fed * bf16_per_token
            if fed < 150:
                model(tokens[:, fed : fed + 1], past_key_values=cache)
    disable_oscar(model)
    assert cache.layers[0].cache.packed_lengths.tolist() == [128, 128]


def test_crop_takes_the_counts_transformers_passes():
    """crop(-n) removes n tokens, crop(n) keeps n, crop(0) does nothing; transformers >= 5.17 passes the count as a 0-d
    tensor, older ones as an int."""
    model = tiny_model("llama")
    cache = enable_oscar(model, oc.QuantConfig(window=32))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 40)), past_key_values=cache)  # 32 packed, 8 in the window
    disable_oscar(model)
    layer = cache.layers[0]
    layer.crop(torch.tensor(-3))
    assert layer.get_seq_length() == 37
    layer.crop(0)
    assert layer.get_seq_length() == 37
    layer.crop(35)
    assert layer.get_seq_length() == 35 and layer.cache.packed_lengths.tolist() == [32]
    with pytest.raises(ValueError, match="cannot crop"):
        layer.crop(torch.tensor(-5))


def test_cuda_graph_decoder_refuses_what_it_cannot_replay():
    from oscar_cupy.adapters.hf import CudaGraphDecoder

    model = tiny_model("llama")
    cache = enable_oscar(model, oc.QuantConfig(window=32))
    with pytest.raises(ValueError, match="prefilled"):
        CudaGraphDecoder(model, cache)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 10)), past_key_values=cache)
    disable_oscar(model)
    with pytest.raises(ValueError, match="one CUDA device, got cpu"):
        CudaGraphDecoder(model, cache)
