"""Quantization settings: :class:`QuantConfig` and the named presets.

A config says *what* is computed; it holds no arrays of data and no device state. Every function of the library takes
one, and every invalid combination is refused here, when the config is built, with a ``ValueError`` that names the
field.
Checks that need the head dimension (value group and rotation size) run when the config meets data
(:meth:`QuantConfig.check_head_dim`).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

BITS = (2, 4)
GROUP_SIZES = (32, 64, 128)
HEAD_DIMS = (64, 128, 256)
TOKEN_SCALINGS = ("l2", "l2_per_head", "none")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
ORTHOGONALITY_TOLERANCE = 1e-4

RotationSpec = Union[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class QuantConfig:
    """How keys and values are rotated, scaled, grouped and quantized.

    Attributes:
        bits: bits per stored key/value element, 2 or 4.
        key_group: tokens per key group (keys are quantized per channel over ``key_group`` consecutive tokens):
            32, 64 or 128.
        value_group: channels per value group (values are quantized per token over ``value_group`` consecutive
            channels): 32, 64 or 128, at most ``head_dim``.
        rotation: ``"hadamard"`` (normalized Walsh–Hadamard of size ``head_dim``), ``"none"``, or a user-given
            orthogonal ``(head_dim, head_dim)`` matrix ``R``; a vector ``x`` is rotated to ``R @ x``. Queries and keys
            are rotated; values too when ``rotate_values`` is true (and the attention output is rotated back).
        token_scaling: ``"l2"`` (one norm per token over all KV heads, as in the OScaR paper), ``"l2_per_head"`` (one
            norm per token and KV head) or ``"none"``. Keys are divided by the norm before quantization and each
            attention logit is multiplied by it.
        rotate_values: rotate values before quantization and the attention output back. The Hugging Face adapter turns
            this off after folding the rotation into ``v_proj``/``o_proj`` (same numbers, less work).
        window: size of the full-precision window of recent tokens, which is also the flush block: a cache packs
            ``window`` tokens at a time. A positive multiple of ``key_group``.
        scale_dtype: dtype of the stored per-group scale and zero: ``"float16"`` (default), ``"bfloat16"`` or
            ``"float32"``.
    """

    bits: int = 2
    key_group: int = 32
    value_group: int = 32
    rotation: RotationSpec = "hadamard"
    token_scaling: str = "l2"
    rotate_values: bool = True
    window: int = 256
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_choice("bits", self.bits, BITS)
        _check_choice("key_group", self.key_group, GROUP_SIZES)
        _check_choice("value_group", self.value_group, GROUP_SIZES)
        _check_choice("token_scaling", self.token_scaling, TOKEN_SCALINGS)
        _check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if not isinstance(self.rotate_values, bool):
            raise ValueError(f"QuantConfig.rotate_values must be a bool, got {self.rotate_values!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer)) or self.window <= 0:
            raise ValueError(f"QuantConfig.window must be a positive int, got {self.window!r}")
        if self.window % self.key_group:
            raise ValueError(
                f"QuantConfig.window ({self.window}) must be a multiple of key_group ({self.key_group}), "
                "so that every flush packs whole key groups"
            )
        object.__setattr__(self, "rotation", _normalize_rotation(self.rotation))

    @property
    def levels(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def codes_per_word(self) -> int:
        """Codes held by one packed ``uint32`` word: 16 at 2 bits, 8 at 4 bits."""
        return 32 // self.bits

    @property
    def rotates(self) -> bool:
        """Whether queries and keys are rotated."""
        return not (isinstance(self.rotation, str) and self.rotation == "none")

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` if this config cannot quantize heads of ``head_dim`` channels."""
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim {head_dim} is not supported; supported head dims: {HEAD_DIMS}")
        if self.value_group > head_dim:
            raise ValueError(f"QuantConfig.value_group ({self.value_group}) exceeds head_dim ({head_dim})")
        if isinstance(self.rotation, np.ndarray) and self.rotation.shape != (head_dim, head_dim):
            raise ValueError(
                f"QuantConfig.rotation has shape {self.rotation.shape}, but head_dim is {head_dim}: "
                f"expected ({head_dim}, {head_dim})"
            )

    def replace(self, **changes) -> "QuantConfig":
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **changes) -> "QuantConfig":
        """The preset called ``name`` (see :data:`PRESETS`; ``_`` may stand for ``-``), with optional field changes."""
        key = name.replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[key].replace(**changes) if changes else PRESETS[key]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantConfig):
            return NotImplemented
        return all(
            _field_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    def __hash__(self) -> int:
        rotation = self.rotation if isinstance(self.rotation, str) else self.rotation.tobytes()
        fields = (rotation if f.name == "rotation" else getattr(self, f.name) for f in dataclasses.fields(self))
        return hash(tuple(fields))


def _check_choice(field: str, value, choices) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``, of the choices' own type (``2.0`` is not the int 2,
    ``np.dtype("float16")`` not the string ``"float16"``)."""
    kind = (int, np.integer) if isinstance(choices[0], int) else str
    if isinstance(value, bool) or not isinstance(value, kind) or value not in choices:
        raise ValueError(f"QuantConfig.{field} must be one of {choices}, got {value!r}")


def _normalize_rotation(rotation: RotationSpec) -> RotationSpec:
    if isinstance(rotation, str):
        if rotation not in ("hadamard", "none"):
            raise ValueError(f"QuantConfig.rotation must be 'hadamard', 'none' or a matrix, got {rotation!r}")
        return rotation
    matrix = np.array(rotation, dtype=np.float64)  # a private copy: later changes by the caller do not leak in
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"QuantConfig.rotation must be a square matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("QuantConfig.rotation contains NaN or Inf")
    deviation = np.abs(matrix @ matrix.T - np.eye(matrix.shape[0])).max()
    if deviation > ORTHOGONALITY_TOLERANCE:
        raise ValueError(
            f"QuantConfig.rotation is not orthogonal: max |R R^T - I| = {deviation:.2e} "
            f"(tolerance {ORTHOGONALITY_TOLERANCE})"
        )
    matrix.setflags(write=False)
    return matrix


def _field_equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


def _presets() -> dict:
    recipes = {
        "oscar": dict(rotation="hadamard", token_scaling="l2"),
        "kivi": dict(rotation="none", token_scaling="none"),
        "hadamard-only": dict(rotation="hadamard", token_scaling="none"),
        "scaling-only": dict(rotation="none", token_scaling="l2"),
    }
    return {f"{name}-{bits}": QuantConfig(bits=bits, **recipe) for name, recipe in recipes.items() for bits in BITS}


#: Named configs: ``oscar-2`` (the default, the paper's recipe), ``kivi-2`` (no rotation, no scaling),
#: ``hadamard-only-2``, ``scaling-only-2`` and the same four at 4 bits (``-4``); all with groups of 32.
PRESETS = _presets()
