"""Adapters from other frameworks to oscar_cupy, installed as ``oscar_cupy.adapters``.

- :mod:`oscar_cupy.adapters.torch`: torch tensors to and from the library's arrays (DLPack, no copy).
- :mod:`oscar_cupy.adapters.hf`: the OScaR cache for Hugging Face transformers models (``enable_oscar``).
- :mod:`oscar_cupy.adapters.generation`: ``generate`` with decode steps replayed from a CUDA graph.
"""
