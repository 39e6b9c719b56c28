"""NVRTC through ctypes: compile CUDA C++ source to a cubin for one GPU architecture, with no GPU and no nvcc.

The library is looked up in this order: ``OSCAR_CUPY_NVRTC`` (a path), the NVIDIA pip wheels
(``nvidia-cuda-nvrtc`` for CUDA 13, ``nvidia-cuda-nvrtc-cu12`` for CUDA 12), ``CUDA_HOME``/``CUDA_PATH``, then the
system loader.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import site
import sys

SONAMES = ("libnvrtc.so.13", "libnvrtc.so.12")
WHEEL_DIRS = ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib")


class NVRTCNotFound(RuntimeError):
    """No NVRTC library could be loaded."""


class CompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the kernel, its parameters and the NVRTC log."""


def _candidates():
    if os.environ.get("OSCAR_CUPY_NVRTC"):
        yield os.environ["OSCAR_CUPY_NVRTC"]
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in dict.fromkeys(roots):
        for folder in WHEEL_DIRS:
            for soname in SONAMES:
                yield from glob.glob(os.path.join(root, folder, soname))
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            for soname in SONAMES:
                yield os.path.join(os.environ[variable], "lib64", soname)
    yield from SONAMES


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The loaded NVRTC library (cached)."""
    tried = []
    for candidate in _candidates():
        # NVRTC opens its builtins library by name at the first compile: load it first from the same folder
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(candidate), "libnvrtc-builtins.so.*"))):
            try:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                pass
        try:
            return ctypes.CDLL(candidate)
        except OSError as error:
            tried.append(f"{candidate}: {error}")
    raise NVRTCNotFound(
        "NVRTC was not found; install it with `pip install oscar-cupy[cuda13]` (or [cuda12]). Tried:\n  "
        + "\n  ".join(tried)
    )


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs() -> list[int]:
    """Compute capabilities this NVRTC can compile for, as integers (90 for sm_90)."""
    count = ctypes.c_int()
    _check(library().nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(library().nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return list(archs)


def compile_cubin(source: str, name: str, options: list[str], headers: dict[str, str]) -> tuple[bytes, str]:
    """``(cubin, log)`` of ``source``; ``options`` must name a real architecture (``--gpu-architecture=sm_90``).

    Raises :class:`CompileError` with the log when NVRTC rejects the source.
    """
    lib = library()
    program = ctypes.c_void_p()
    header_names = (ctypes.c_char_p * len(headers))(*(n.encode() for n in headers))
    header_sources = (ctypes.c_char_p * len(headers))(*(s.encode() for s in headers.values()))
    _check(
        lib.nvrtcCreateProgram(
            ctypes.byref(program), source.encode(), name.encode(), len(headers), header_sources, header_names
        ),
        "nvrtcCreateProgram",
    )
    try:
        encoded = [option.encode() for option in options]
        result = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        log = _read(lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog, program).decode(errors="replace").strip("\0")
        if result != 0:
            raise CompileError(f"{name}: {_error_string(result)}\n{log}")
        return _read(lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN, program), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _read(size_function, read_function, program) -> bytes:
    size = ctypes.c_size_t()
    _check(size_function(program, ctypes.byref(size)), size_function.__name__)
    buffer = ctypes.create_string_buffer(size.value)
    _check(read_function(program, buffer), read_function.__name__)
    return buffer.raw


def _error_string(result: int) -> str:
    function = library().nvrtcGetErrorString
    function.restype = ctypes.c_char_p
    return function(result).decode()


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} failed: {_error_string(result)}")
