"""oscar_cupy: 2- and 4-bit KV caches for LLMs with the OScaR method (rotation + omni-token scaling).

Data flows one way through the modules:
:mod:`~oscar_cupy.config` (what to compute) → :mod:`~oscar_cupy.rotation` and :mod:`~oscar_cupy.scaling` →
:mod:`~oscar_cupy.quantizer` and :mod:`~oscar_cupy.layout` (codes and their packed storage) →
:mod:`~oscar_cupy.quantized_kv` (quantize/dequantize) → :mod:`~oscar_cupy.cache` (a layer's cache: packed blocks plus a
full-precision window) → :mod:`~oscar_cupy.attention` (decode attention).
"""

from oscar_cupy.attention import decode_attention
from oscar_cupy.cache import LayerCache
from oscar_cupy.config import PRESETS, QuantConfig
from oscar_cupy.quantized_kv import QuantizedKV, dequantize_kv, quantize_kv
from oscar_cupy.rotation import hadamard, hadamard_matrix

__version__ = "0.1.0"

__all__ = [
    "LayerCache",
    "PRESETS",
    "QuantConfig",
    "QuantizedKV",
    "decode_attention",
    "dequantize_kv",
    "hadamard",
    "hadamard_matrix",
    "quantize_kv",
]
