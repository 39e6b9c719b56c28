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
    if tensor.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(tensor)
    if tensor.device.type != "cpu":
        raise TypeError(f"tensors on device {tensor.device} are not supported; use CPU or CUDA tensors")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def array_to_tensor(array) -> torch.Tensor:
    """The torch tensor that views ``array``'s memory (numpy -> CPU tensor, cupy -> CUDA tensor)."""
    if isinstance(array, np.ndarray):
        if array.dtype == BFLOAT16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
    return torch.from_dlpack(array)
