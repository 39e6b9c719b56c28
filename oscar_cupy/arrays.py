"""Array kinds and argument checks shared by every public function.

The public functions are numpy-style: they take numpy arrays, cupy arrays, or torch tensors (through DLPack, no copy)
and return the same kind. :func:`accept` turns an argument into the backend array that the computation uses (numpy on
the CPU) and remembers its kind; :meth:`Kind.wrap` turns a result back.

bfloat16 is ``ml_dtypes.bfloat16`` in numpy and ``torch.bfloat16`` in torch.
"""

from __future__ import annotations

import enum

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32))


class Kind(enum.Enum):
    """The kind of array a caller passed in, so that results go back as the same kind."""

    NUMPY = "numpy"
    CUPY = "cupy"
    TORCH = "torch"

    def wrap(self, array):
        """Return backend ``array`` (numpy or cupy) as this kind; ``None`` stays ``None``."""
        if array is None or self is not Kind.TORCH:
            return array
        from oscar_cupy.adapters.torch import array_to_tensor

        return array_to_tensor(array)


def kind_of(x) -> Kind:
    module = type(x).__module__.split(".")[0]
    if module == "torch" and hasattr(x, "is_conj"):
        if str(x.layout) != "torch.strided" or x.is_conj() or x.is_neg():
            raise TypeError("expected a dense torch tensor (no sparse layout, lazy conjugate or negative view); "
                            "call .to_dense(), .resolve_conj() or .resolve_neg() first")
        return Kind.TORCH
    if module == "cupy":
        return Kind.CUPY
    if isinstance(x, (np.ma.MaskedArray, np.matrix)):
        raise TypeError(f"expected a plain numpy array, got {type(x).__name__} (np.asarray it first)")
    if isinstance(x, np.ndarray):
        return Kind.NUMPY
    raise TypeError(f"expected a numpy array, cupy array or torch tensor, got {type(x).__name__}")


def accept(x, name: str):
    """``(backend_array, kind)`` for argument ``x``; raises ``TypeError`` naming ``name`` for other types.

    The backend array may share memory with ``x``: callers never write into it.
    """
    try:
        kind = kind_of(x)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from None
    if kind is Kind.TORCH:
        from oscar_cupy.adapters.torch import tensor_to_array

        return tensor_to_array(x), kind
    return x, kind


def on_gpu(array) -> bool:
    """Whether a backend array is a cupy array (else numpy)."""
    return not isinstance(array, np.ndarray)


def to_host(array) -> np.ndarray:
    """A numpy array of a numpy or cupy array (a device-to-host copy for cupy)."""
    return array if isinstance(array, np.ndarray) else array.get()


def same_kind(arrays_and_kinds, names) -> Kind:
    """The common kind of several accepted arguments; ``TypeError`` if they mix kinds or devices."""
    kinds = {kind for _, kind in arrays_and_kinds}
    if len(kinds) > 1:
        listed = ", ".join(f"{n}: {k.value}" for n, (_, k) in zip(names, arrays_and_kinds))
        raise TypeError(f"arguments mix array kinds ({listed}); pass all as the same kind")
    devices = {device_of(array) for array, _ in arrays_and_kinds}
    if len(devices) > 1:
        listed = ", ".join(f"{n}: {device_of(a)}" for n, (a, _) in zip(names, arrays_and_kinds))
        raise ValueError(f"arguments are on different devices ({listed}); move them to one device")
    return kinds.pop()


def device_of(array) -> str:
    """``"cpu"`` or ``"cuda:<id>"`` of a backend array."""
    return "cpu" if isinstance(array, np.ndarray) else f"cuda:{array.device.id}"


def check_float(x, name: str) -> None:
    """``TypeError`` unless ``x`` is float16, bfloat16 or float32."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32")


def check_rank(x, name: str, rank: int, axes: str) -> None:
    """``ValueError`` unless ``x`` has ``rank`` dimensions (``axes`` names them for the message)."""
    if x.ndim != rank:
        raise ValueError(f"{name} must have {rank} dimensions {axes}, got shape {tuple(x.shape)}")


def check_finite(x, name: str, where=True) -> None:
    """``ValueError`` if ``x`` holds NaN or Inf where ``where`` (a mask broadcast to ``x``) is true.

    The library's policy: non-finite keys, values and queries are refused; padding tokens are not looked at.
    """
    if not np.isfinite(x).all(where=where):
        raise ValueError(f"{name} contains NaN or Inf; non-finite keys, values and queries are refused")


def as_float32(x) -> np.ndarray:
    """A new C-contiguous float32 copy of ``x`` (never a view of the caller's memory; C order, so that results do not
    depend on the caller's memory layout)."""
    return np.array(x, dtype=np.float32, copy=True, order="C")


def check_lengths(lengths, name: str, batch: int, capacity: int) -> np.ndarray:
    """Per-sequence valid token counts as an int64 ``(batch,)`` array; ``None`` means all ``capacity`` tokens."""
    if lengths is None:
        return np.full(batch, capacity, dtype=np.int64)
    array = np.asarray(lengths) if isinstance(lengths, (list, tuple)) else to_host(accept(lengths, name)[0])
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(array.shape)}")
    array = array.astype(np.int64)
    if array.min(initial=0) < 0 or array.max(initial=0) > capacity:
        raise ValueError(f"{name} must lie in [0, {capacity}], got {array.tolist()}")
    return array
