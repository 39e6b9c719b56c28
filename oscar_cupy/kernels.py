"""The one kernel loader: compile a ``.cu`` module of ``raw_kernels/`` for a set of compile-time parameters with NVRTC,
cache the cubin on disk, load it with CuPy and hand out its functions.

A :class:`Variant` names a module and its parameters (``HEAD_DIM``, ``BITS``, dtypes, ...), which become ``-D`` defines.
Compiled cubins are cached in ``$OSCAR_CUPY_CACHE_DIR`` (default ``~/.cache/oscar_cupy/kernels``) under a key made of
the sources, the options, the NVRTC version and the GPU architecture, so a second process starts warm; files are written
to a temporary name and renamed, so processes that compile at once never see a partial file. Loaded modules are kept per
(variant, device) in memory behind a lock, so threads that ask at once compile once.

``python -m oscar_cupy check-kernels --arch sm_80,sm_90`` compiles every variant the library can launch, with no GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import pathlib
import tempfile
import threading

from oscar_cupy import nvrtc, quantize_launch
from oscar_cupy.config import BITS, GROUP_SIZES, HEAD_DIMS, SCALE_DTYPES
from oscar_cupy.raw_kernels import read_source

DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
OPTIONS = ("-std=c++17", "--fmad=false", "-default-device")
CONTRACTED = ("decode",)  # modules free to fuse multiply-adds (not bit-exact definitions, float tolerance)
HADAMARD_SIZES = (16, 32, 64, 128, 256)
# decode: the register budget of decode_attention's launch bounds (3 blocks of 128 threads per SM for ROW_TILES 1, 2 for
# ROW_TILES 2), also given as --maxrregcount. Without it (or with the window path inlined) the compiler recomputes the
# packed loop's lane offsets and constants in every step: 743-748 instead of 686 instructions (sm_90, measured
# before the stream-K rework; the loop is 691 now).
DECODE_REGISTERS = {1: 168, 2: 255}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel module: ``module`` (file name without ``.cu``) and its ``-D`` parameters."""

    module: str
    params: tuple  # sorted (name, value) pairs

    @classmethod
    def of(cls, module: str, **params) -> "Variant":
        return cls(module, tuple(sorted(params.items())))

    def describe(self) -> str:
        return f"{self.module}({', '.join(f'{k}={v}' for k, v in self.params)})"

    def source(self) -> str:
        return read_source(f"{self.module}.cu")

    def options(self, arch: str) -> list[str]:
        defines = [f"-D{name}={DTYPE_CODES.get(value, value)}" for name, value in self.params]
        options = OPTIONS if self.module not in CONTRACTED else tuple(o for o in OPTIONS if o != "--fmad=false")
        if self.module == "decode":
            options = (*options, f"--maxrregcount={DECODE_REGISTERS[dict(self.params)['ROW_TILES']]}")
        return [*options, f"--gpu-architecture={arch}", *defines]


def quantize_variant(head_dim: int, bits: int, in_dtype: str, scale_dtype: str) -> Variant:
    """The write path's kernels, with the lane geometry that :mod:`oscar_cupy.quantize_launch` launches them for."""
    return Variant.of("quantize", HEAD_DIM=head_dim, BITS=bits, IN_DTYPE=in_dtype, SCALE_DTYPE=scale_dtype,
                      KEY_LANE_ROWS=quantize_launch.KEY_LANE_ROWS[head_dim],
                      VAL_PER=quantize_launch.VALUE_LANE_CHANNELS[head_dim])


def dequantize_variant(head_dim: int, bits: int, out_dtype: str, scale_dtype: str) -> Variant:
    return Variant.of("dequantize", HEAD_DIM=head_dim, BITS=bits, IN_DTYPE=out_dtype, SCALE_DTYPE=scale_dtype)


def rotate_variant(size: int, dtype: str) -> Variant:
    return Variant.of("rotate", HEAD_DIM=size, IN_DTYPE=dtype)


def window_variant(dtype: str) -> Variant:
    return Variant.of("window", IN_DTYPE=dtype)


DECODE_DTYPES = ("float16", "bfloat16")
ROW_TILES = (1, 2)  # up to 8 or 16 query rows per KV head in one block


def decode_variant(head_dim: int, bits: int, dtype: str, scale_dtype: str, value_group: int, row_tiles: int) -> Variant:
    return Variant.of("decode", HEAD_DIM=head_dim, BITS=bits, IN_DTYPE=dtype, SCALE_DTYPE=scale_dtype,
                      VALUE_GROUP=value_group, ROW_TILES=row_tiles,
                      STAGES=decode_stages(decode_stage_bytes(head_dim, bits, scale_dtype, value_group)))


def decode_stage_bytes(head_dim: int, bits: int, scale_dtype: str, value_group: int) -> int:
    """Bytes of one step buffer of the decode kernel (``StepBuffer`` in ``raw_kernels/decode.cu``): 32 tokens' key rows,
    value word rows, value scales and zeros, the key group's scales and the token norms."""
    step, per_word, scale_bytes = 32, 32 // bits, 4 if scale_dtype == "float32" else 2
    words = (step * head_dim // per_word + step // per_word * head_dim
             + 2 * step * (head_dim // value_group) * scale_bytes // 4 + head_dim * scale_bytes // 4 + step)
    return 4 * words


def decode_shared_bytes(head_dim: int, bits: int, scale_dtype: str, value_group: int, row_tiles: int) -> int:
    """Dynamic shared memory of a decode block: the copy pipeline's step buffers (``WARPS * STAGES`` of
    :func:`decode_stage_bytes`), which then take the four warps' output rows for the block's merge (``SCRATCH_ROW`` of
    ``raw_kernels/decode.cu``: ``head_dim + 4`` floats per row, ``8 * row_tiles`` rows per warp); a merge block uses
    them for its warps' parts of a row (``MEMBER_FLOATS``, less)."""
    warps, stage_bytes = 4, decode_stage_bytes(head_dim, bits, scale_dtype, value_group)
    return max(warps * decode_stages(stage_bytes) * stage_bytes, warps * 8 * row_tiles * (head_dim + 4) * 4)


def decode_stages(stage_bytes: int) -> int:
    """Pipeline depth of the decode kernel: buffers per warp (three, two for the largest steps; four measured no faster
    on the H100, bench/results/decode_attention.md)."""
    return 3 if stage_bytes <= 5120 else 2


def all_variants() -> list[Variant]:
    """Every variant the library can launch."""
    dtypes = list(DTYPE_CODES)
    variants = []
    for head_dim, bits, dtype, scale in itertools.product(HEAD_DIMS, BITS, dtypes, SCALE_DTYPES):
        variants += [quantize_variant(head_dim, bits, dtype, scale), dequantize_variant(head_dim, bits, dtype, scale)]
    variants += [rotate_variant(size, dtype) for size in HADAMARD_SIZES for dtype in dtypes]
    variants += [window_variant(dtype) for dtype in dtypes]
    for head_dim, bits, dtype, scale, group, tiles in itertools.product(
        HEAD_DIMS, BITS, DECODE_DTYPES, SCALE_DTYPES, GROUP_SIZES, ROW_TILES
    ):
        if group <= head_dim:
            variants.append(decode_variant(head_dim, bits, dtype, scale, group, tiles))
    return variants


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "oscar_cupy" / "kernels"
    return pathlib.Path(os.environ.get("OSCAR_CUPY_CACHE_DIR", default))


def compile_variant(variant: Variant, arch: str) -> tuple[bytes, str]:
    """``(cubin, log)`` of ``variant`` for ``arch`` (``"sm_90"``), from the disk cache when it is there.

    Raises :class:`oscar_cupy.nvrtc.CompileError` naming the variant, with NVRTC's log.
    """
    source = variant.source()
    headers = {"common.cuh": read_source("common.cuh")}
    options = variant.options(arch)
    key = hashlib.sha256(
        "\0".join([source, *headers.values(), *options, "nvrtc %d.%d" % nvrtc.version()]).encode()
    ).hexdigest()
    path = cache_dir() / f"{variant.module}-{arch}-{key[:32]}.cubin"
    if path.exists():
        return path.read_bytes(), ""
    try:
        cubin, log = nvrtc.compile_cubin(source, f"{variant.module}.cu", options, headers)
    except nvrtc.CompileError as error:
        raise nvrtc.CompileError(f"kernel {variant.describe()} for {arch} failed to compile:\n{error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as partial:
        partial.write(cubin)
    os.replace(partial.name, path)  # atomic: concurrent writers leave one complete file
    return cubin, log


_modules: dict = {}
_lock = threading.Lock()


def function(variant: Variant, name: str, device_id: int):
    """The CuPy function ``name`` of ``variant`` compiled for, and loaded on, device ``device_id``."""
    import cupy

    key = (variant, device_id)
    with _lock:
        module = _modules.get(key)
        if module is None:
            with cupy.cuda.Device(device_id):
                cubin, _ = compile_variant(variant, f"sm_{cupy.cuda.Device(device_id).compute_capability}")
                module = cupy.cuda.function.Module()
                module.load(cubin)
            _modules[key] = module
    return module.get_function(name)
