"""The CUDA C++ sources of oscar_cupy, installed as package data of ``oscar_cupy.raw_kernels``.

``common.cuh`` (conversions, directed rounding, the quantizer, the warp Hadamard transform, the bit order),
``quantize.cu`` (keys and values into the packed layout), ``dequantize.cu`` (back to the caller's basis) and
``rotate.cu`` (the Hadamard transform of rows). :mod:`oscar_cupy.kernels` compiles them with NVRTC.
"""

import importlib.resources


def read_source(name: str) -> str:
    """The text of source file ``name`` (for example ``"quantize.cu"``)."""
    return importlib.resources.files(__name__).joinpath(name).read_text()
