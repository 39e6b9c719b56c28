"""torch tensors to and from the library's backend arrays, sharing memory (no copy).

CPU tensors become numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``, through an int16 view since numpy's DLPack has no
bfloat16); CUDA tensors become cupy arrays through DLPack on the tensor's own device.
"""

from __future__ import annotations

import numpy as np
import torch

from oscar_cupy.arrays import BFLOAT16


def tensor_to_array(tensor: torch.Tensor):
    """The numpy (CPU) or cupy (CUDA) array that views ``tensor``'s memory."""
    tensor = tensor.detach()
    if tensor.device.type not in ("cpu", "cuda"):
        raise TypeError(f"tensors on device {tensor.device} are not supported; use CPU or CUDA tensors")
    bfloat16 = tensor.dtype == torch.bfloat16
    if bfloat16:  # through int16: DLPack support for bfloat16 varies between versions
        tensor = tensor.view(torch.int16)
    if tensor.device.type == "cuda":
        import cupy

        array = cupy.from_dlpack(tensor)
    else:
        array = tensor.numpy()
    return array.view(BFLOAT16) if bfloat16 else array


def array_to_tensor(array) -> torch.Tensor:
    """The torch tensor that views ``array``'s memory (numpy -> CPU tensor, cupy -> CUDA tensor)."""
    bfloat16 = array.dtype == BFLOAT16
    if bfloat16:
        array = array.view(np.int16)
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else torch.from_dlpack(array)
    return tensor.view(torch.bfloat16) if bfloat16 else tensor
