"""Hugging Face transformers adapter: OScaR's quantized KV cache for ``model.generate``, with public APIs only.

    cache = enable_oscar(model, QuantConfig())      # fold the value rotation into the weights, register attention
    model.generate(**inputs, past_key_values=cache)
    disable_oscar(model)                            # the original weights, bit for bit

The cache is a transformers ``Cache`` whose layers (``CacheLayerMixin``) hold an :class:`oscar_cupy.LayerCache`. The
model's attention runs through a registered attention function (``AttentionInterface``): the prefill attends in full
precision with transformers' SDPA function and then the layer packs whole flush blocks; a decode step appends to the
window, attends with :meth:`LayerCache.attend` and flushes full windows.

CPU tensors use the reference backend; CUDA tensors (float16 or bfloat16 models) the fused decode kernel, on torch's
current stream. Layers that are not full attention (sliding-window, chunked, linear or hybrid) stay in transformers'
full-precision cache layers, with one warning. Left-padded batches (as ``generate`` makes them) are stored without
their padding, each sequence from its own first token. :class:`CudaGraphDecoder` replays decode steps from a CUDA graph
(a step loop of its own, beside ``generate``; :mod:`oscar_cupy.adapters.generation` builds generation on it).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from oscar_cupy.cache import LayerCache
from oscar_cupy.config import QuantConfig
from oscar_cupy.rotation import hadamard_matrix

ATTENTION = "oscar_cupy"
SUPPORTED_TRANSFORMERS = (5,)  # major versions


class OscarLayer(CacheLayerMixin):
    """One layer of :class:`OscarCache`: a :class:`LayerCache` created at the first update, with room for ``capacity``
    packed tokens per sequence."""

    is_croppable = True

    def __init__(self, config: QuantConfig, capacity: int = 0):
        super().__init__()
        self.config, self.capacity = config, capacity
        self.cache: LayerCache | None = None
        self.prefilled = False  # whether the last update was a prefill (attention then runs in full precision)
        self.prompt_pending = False  # a prefill's update came, its store_prompt not yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.cache = LayerCache(self.config, batch, heads, head_dim, _numpy_dtype(key_states.dtype), like=key_states,
                                capacity=self.capacity)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A prompt is stored by the attention function (:meth:`store_prompt`), which sees the padding mask; a decode
        step's tokens are appended here."""
        if self.prompt_pending:
            raise RuntimeError("an OscarCache was used by a model whose attention does not store its prompt: pass it "
                               "only to the model that enable_oscar(model, config) returned it for, while enabled")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.prefilled = self.prompt_pending = not self.cache.lengths.any() and key_states.shape[2] > 1
        if not self.prefilled:
            self.cache.append(key_states, value_states)
        return key_states, value_states

    def store_prompt(self, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Store a (left-padded) prompt: padding never enters the cache; each sequence's tokens start at its slot 0."""
        tokens = key.shape[2]
        self.prompt_pending = False
        if attention_mask is None:
            self.cache.prefill(key, value)
            return
        allowed = attention_mask[:, 0, -1, :tokens]  # what the last prompt position may attend to
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0  # boolean or additive masks
        pads = (~allowed).sum(-1)
        positions = torch.arange(tokens, device=allowed.device)
        if not torch.equal(allowed, positions[None, :] >= pads[:, None]):
            raise NotImplementedError("oscar_cupy's cache takes left-padded prompts only (as generate makes them)")
        index = (positions[None, :] + pads[:, None]).clamp(max=tokens - 1)  # shift each row left
        index = index[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
        self.cache.prefill(key.gather(2, index), value.gather(2, index), lengths=(tokens - pads).cpu().numpy())

    def get_seq_length(self) -> int:
        return int(self.cache.lengths.max()) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.prompt_pending = False
        if self.is_initialized:
            self.cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            indices = beam_idx.cpu().numpy()
            with _torch_stream(self.device):
                self.cache.reorder(indices)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def crop(self, tokens: int) -> None:
        """Remove ``-tokens`` tokens when ``tokens`` is negative (transformers 5's convention; 0 removes none) or keep
        ``tokens`` tokens when it is positive (the older one); only window tokens can be cropped."""
        tokens = int(tokens)  # transformers >= 5.17 passes a 0-d tensor
        if self.is_initialized and tokens:
            self.cache.crop(tokens if tokens > 0 else self.get_seq_length() + tokens)


class OscarCache(Cache):
    """A transformers ``Cache`` with an :class:`OscarLayer` for each full-attention layer.

    With ``model_config``, the layers are those transformers' ``DynamicCache(config=model_config)`` would make, its
    full-attention layers replaced by :class:`OscarLayer`; the others (sliding-window, chunked, linear or hybrid
    attention) stay transformers' full-precision layers. Without it, ``num_layers`` layers, all :class:`OscarLayer`.
    ``capacity``: tokens per sequence each layer allocates packed room for up front (see :func:`enable_oscar`).
    """

    def __init__(self, config: QuantConfig, num_layers: int | None = None, model_config=None, capacity: int = 0):
        if model_config is not None:
            layers = [OscarLayer(config, capacity) if type(layer) is DynamicLayer else layer
                      for layer in DynamicCache(config=model_config).layers]
        else:
            layers = [OscarLayer(config, capacity) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.config = config

    @property
    def full_precision_layers(self) -> list[int]:
        """Indices of the layers kept in full precision (not full attention)."""
        return [i for i, layer in enumerate(self.layers) if not isinstance(layer, OscarLayer)]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers."""
        return sum(layer.cache.nbytes for layer in self.layers if layer.is_initialized)


def oscar_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function: full precision at prefill, the packed cache at decode; layers kept in full
    precision attend as transformers' SDPA does."""
    layer = module.oscar_cache.layers[module.layer_idx]
    if not isinstance(layer, OscarLayer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if layer.prefilled:
        layer.store_prompt(key, value, attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    output = layer.cache.attend(query, scale=scaling)  # (batch, q_heads, q_len, head_dim)
    if not layer.cache.capturable:  # a CudaGraphDecoder flushes between its steps
        with _torch_stream(query.device):
            # after the step's attention, as the method prescribes; a step of several tokens (assisted generation's
            # verification) keeps all but the first in the window, so that rejecting them is a crop of the window
            layer.cache.flush(keep=query.shape[2] - 1)
    return output.transpose(1, 2).contiguous(), None


class CudaGraphDecoder:
    """Decode steps of a model with a prefilled :class:`OscarCache`, replayed from a captured CUDA graph, so that a
    step costs the GPU's time rather than Python's (no launch of each layer's kernels from the host).

        cache = enable_oscar(model, config)
        logits = model(prompt, past_key_values=cache).logits[:, -1]   # the prefill, as usual
        decoder = CudaGraphDecoder(model, cache)
        for _ in range(steps):
            logits = decoder.step(logits.argmax(-1, keepdim=True))     # (batch, vocab)

    One token per sequence per step, each sequence continuing from its own length (left padding of the prompt is not
    stored). The first step, and the first after each flush, runs eagerly (it makes the attention plans for the new
    packed length); the next is captured and the following ones replay it; flushes run between steps, outside the
    graph. Every layer must be an :class:`OscarLayer` (no full-precision layers) on one CUDA device. Do not use the
    cache with the model directly while a decoder drives it; :meth:`close` hands it back (the model's own decode steps
    flush after their attention again). :func:`oscar_cupy.adapters.generation.generate` is ``generate`` on top of it.
    """

    def __init__(self, model, cache: OscarCache):
        if not all(isinstance(layer, OscarLayer) and layer.is_initialized for layer in cache.layers):
            raise ValueError("CudaGraphDecoder needs a prefilled OscarCache whose layers are all quantized; run the "
                             "prompt through the model first")
        devices = sorted({str(layer.device) for layer in cache.layers})
        if len(devices) != 1 or not devices[0].startswith("cuda"):
            raise ValueError(f"CudaGraphDecoder needs every layer on one CUDA device, got {', '.join(devices)}")
        device = cache.layers[0].device
        self.model, self.cache = model, cache
        self._stores = [layer.cache for layer in cache.layers]
        for store in self._stores:
            store.capturable = True
        self._tokens = torch.zeros(self._stores[0].batch, 1, dtype=torch.long, device=device)
        self._positions = torch.as_tensor(self._stores[0].lengths, device=device).view(-1, 1)  # next position
        self._graph, self._logits, self._eager_next = None, None, True
        self.replays = 0  # steps run by replaying a graph so far

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``(batch, 1)``; return the next-token logits ``(batch, vocab)`` (a new tensor)."""
        self._tokens.copy_(tokens)
        if self._eager_next:
            logits, self._eager_next = self._forward(), False
        elif self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, capture_error_mode="relaxed"):
                self._logits = self._forward()  # recorded, not run; the host side of the step is done
            self._graph.replay()
            logits = self._logits
        else:
            for store in self._stores:
                store.advance_window(1)  # the host side of a replayed step
            self._graph.replay()
            logits = self._logits
            self.replays += 1
        logits = logits.clone()
        self._positions += 1
        first = self._stores[0]  # every layer holds the same tokens, so the same lengths
        if (first.window_lengths >= first.config.window).any():
            with _torch_stream(self._tokens.device):
                for store in self._stores:
                    store.flush()
            self._graph, self._logits, self._eager_next = None, None, True
        return logits

    def close(self) -> None:
        """Stop driving the cache: drop the graph and let the model's eager steps flush after their attention again."""
        for store in self._stores:
            store.capturable = False
        self._graph, self._logits, self._eager_next = None, None, True

    def _forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=self._tokens, position_ids=self._positions, past_key_values=self.cache,
                              use_cache=True).logits[:, -1]


def enable_oscar(model, config: QuantConfig | None = None, capacity: int = 0) -> OscarCache:
    """Make ``model`` an OScaR model and return the cache to pass to ``generate(past_key_values=...)``.

    With a Hadamard rotation, the value rotation is folded into each layer's ``v_proj`` (output blocks, and bias) and
    ``o_proj`` (input blocks) once, in float32; :func:`disable_oscar` restores the original weights bit for bit.

    ``capacity`` (tokens per sequence, prompt plus new tokens) allocates the packed storage up front (room for its
    whole flush blocks; the rest stays in the window): no growth, and none of the transient memory a growth copy
    needs, until a sequence outgrows it (then it doubles, as without it).
    Use it to fill a GPU close to its memory; the default grows from what the prompt needs.

    On a model that is already enabled, the previous :func:`enable_oscar` is undone first (its weights restored), so
    the model follows ``config`` alone; caches returned before no longer apply to it.
    """
    major = int(transformers.__version__.split(".")[0])
    if major not in SUPPORTED_TRANSFORMERS:
        raise ImportError(f"oscar_cupy.adapters.hf supports transformers 5.x; this is {transformers.__version__}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (e.g. QuantConfig.preset('oscar-2')), "
                        f"got {type(config).__name__}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be a non-negative integer (tokens per sequence), got {capacity!r}")
    if hasattr(model, "oscar_attn_implementation"):
        disable_oscar(model)
    attentions = _attention_modules(model)
    head_dim = attentions[0].head_dim
    config.check_head_dim(head_dim)
    dtype = attentions[0].v_proj.weight.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the model's weights are {dtype}; oscar_cupy caches float16, bfloat16 and float32 models")
    fold = config.rotates and config.rotate_values
    rotation = _rotation_matrix(config, head_dim)
    cache = OscarCache(config.replace(rotate_values=False) if fold else config, model_config=model.config,
                       capacity=capacity)
    _warn_full_precision(cache, model.config)
    AttentionInterface.register(ATTENTION, oscar_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    for module in attentions:
        quantized = isinstance(cache.layers[module.layer_idx], OscarLayer)
        if fold and quantized:
            module.oscar_original = {name: getattr(module, name).weight.detach().clone()
                                     for name in ("v_proj", "o_proj")}
            if module.v_proj.bias is not None:
                module.oscar_original["v_proj.bias"] = module.v_proj.bias.detach().clone()
            _fold_value_rotation(module, rotation, head_dim)
        module.oscar_cache = cache
    model.oscar_attn_implementation = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    return cache


def disable_oscar(model) -> None:
    """Undo :func:`enable_oscar`: the original ``v_proj``/``o_proj`` weights and attention implementation."""
    for module in _attention_modules(model):
        original = getattr(module, "oscar_original", None)
        if original is not None:
            with torch.no_grad():
                module.v_proj.weight.copy_(original["v_proj"])
                module.o_proj.weight.copy_(original["o_proj"])
                if "v_proj.bias" in original:
                    module.v_proj.bias.copy_(original["v_proj.bias"])
            del module.oscar_original
        if hasattr(module, "oscar_cache"):
            del module.oscar_cache
    if hasattr(model, "oscar_attn_implementation"):
        model.set_attn_implementation(model.oscar_attn_implementation)
        del model.oscar_attn_implementation


def _warn_full_precision(cache: OscarCache, model_config) -> None:
    """One warning naming the layers that stay in full precision (sliding-window, chunked, linear or hybrid)."""
    kept = cache.full_precision_layers
    if not kept:
        return
    kinds = sorted({type(cache.layers[i]).__name__ for i in kept})
    quantized = len(cache.layers) - len(kept)
    warnings.warn(
        f"oscar_cupy quantizes full-attention layers only: {len(kept)} of {len(cache.layers)} layers of this "
        f"{type(model_config).__name__} ({', '.join(kinds)}) stay in full precision"
        + ("; no layer is quantized" if not quantized else f"; {quantized} are quantized"),
        stacklevel=3,
    )


def _attention_modules(model) -> list:
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "v_proj") and hasattr(m, "o_proj")]
    if not modules:
        raise TypeError(f"{type(model).__name__} has no attention layers with v_proj and o_proj that oscar_cupy knows")
    return sorted(modules, key=lambda m: m.layer_idx)


def _rotation_matrix(config: QuantConfig, head_dim: int) -> torch.Tensor:
    matrix = hadamard_matrix(head_dim) if isinstance(config.rotation, str) else config.rotation
    return torch.from_numpy(np.asarray(matrix, dtype=np.float32))


def _fold_value_rotation(module, rotation: torch.Tensor, head_dim: int) -> None:
    """v_proj output blocks (and bias) become R @ block, o_proj input blocks block @ R^T: values are stored rotated and
    the attention output is rotated back, in the weights."""
    with torch.no_grad():
        weight = module.v_proj.weight
        rotation = rotation.to(weight.device)  # each layer where it lives (device_map="auto")
        blocks = weight.float().view(-1, head_dim, weight.shape[1])
        weight.copy_((rotation @ blocks).view_as(weight).to(weight.dtype))
        if module.v_proj.bias is not None:
            bias = module.v_proj.bias
            bias.copy_((bias.float().view(-1, head_dim) @ rotation.T).view_as(bias).to(bias.dtype))
        weight = module.o_proj.weight
        blocks = weight.float().view(weight.shape[0], -1, head_dim)
        weight.copy_((blocks @ rotation.T).view_as(weight).to(weight.dtype))


def _torch_stream(device: torch.device):
    """On a GPU, make ``device`` CuPy's current device and torch's current stream on it CuPy's, for the work inside."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from oscar_cupy.cuda_backend import launch_context

    return launch_context(device.index, torch_stream=True)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    from oscar_cupy.arrays import BFLOAT16

    return BFLOAT16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
