"""CUDA kernels of ``raw_kernels/`` run on the CPU, for tests of their logic without a GPU.

:class:`Module` compiles a kernel variant (the same source and ``-D`` parameters NVRTC gets) with g++ against
``tests/emulator/simt.h``, which runs every thread of a block as a fiber (see there for what is modelled), and launches
its kernels with numpy arrays for device pointers: ``Module(variant).launch(name, grid, block, args, shared_mem)``,
with ``args`` typed as the CUDA launches type them (numpy arrays, ``np.int32``, ``np.int64``, ``np.float32``,
``np.uint64(0)`` for a null pointer). The source changes only where the host cannot take it as it is: the
float16/bfloat16 conversions written in PTX, and the decode kernel's helpers written in PTX (``HOST_BODIES``, by
function name: tensor-core products and ``movmatrix`` become warp-wide operations of ``simt.h``, ``cp.async`` a copy,
``ex2.approx`` ``exp2f``), become host equivalents; ``__shared__`` variables and ``extern __shared__`` arrays live in
the block's shared memory. A module with other inline PTX is refused.

Needs g++ (C++17 with ``_Float16``); tests skip without it.
"""

import ctypes
import hashlib
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy as np

from oscar_cupy import kernels

HERE = pathlib.Path(__file__).parent / "emulator"
COMPILER = shutil.which("g++")
CONVERSIONS = {  # PTX statement -> host statement
    'asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));': "f = emu::half_to_float(h);",
    'asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));': "h = emu::float_to_half(f);",
    'asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));': "h = emu::float_to_bfloat16(f);",
}
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
STATIC_SHARED = re.compile(r"(?<!extern )__shared__ (\w+) (\w+);")
# decode.cu's helpers written in PTX, by function name: (a fragment of the kernel's body that must still be there, the
# host body); simt.h's warp-wide operations where the PTX is one. A changed helper stops the build with its name.
F16_SCALES, F16_INPUT = "SCALE_DTYPE == DTYPE_F16", "IN_DTYPE == DTYPE_F16"
HOST_BODIES = {
    "pack_pair": ('"cvt.rn." MMA_TYPE "x2.f32', f"return emu::pack(lo, hi, !({F16_SCALES}));"),
    "pack_in_pair": ('"cvt.rn." IN_MMA_TYPE "x2.f32', f"return emu::pack(lo, hi, !({F16_INPUT}));"),
    "mul_pair": ('"mul.rn.f16x2 %0, %1, %2;"', f"return emu::multiply_pairs(a, b, !({F16_SCALES}));"),
    "code_pair": ('"r"(word >> (BITS * DIRECT * (pair / DIRECT))), "r"(PAIR_MASK << (BITS * (pair % DIRECT)))',
                  "return ((word >> (BITS * DIRECT * (pair / DIRECT))) & (PAIR_MASK << (BITS * (pair % DIRECT)))) "
                  "| magic;"),
    "magic_register": ('"n"(MAGIC)', "return MAGIC;"),
    "mma": ('"{%0,%1,%2,%3};"', f"const float c[4] = {{d[0], d[1], d[2], d[3]}}; "
                                f"emu::mma(d, c, {{a0, a1, a2, a3}}, {{b0, b1}}, !({F16_SCALES}));"),
    "mma_low": ('"{%0,%1,%10,%10};"', f"float full[4]; const float c[4] = {{d[0], d[1], 0.f, 0.f}}; "
                                      f"emu::mma(full, c, {{a0, a1, a2, a3}}, {{b0, b1}}, !({F16_SCALES})); "
                                      "d[0] = full[0]; d[1] = full[1];"),
    "mma_in": ('IN_MMA_TYPE "." IN_MMA_TYPE', f"const float c[4] = {{d[0], d[1], d[2], d[3]}}; "
                                              f"emu::mma(d, c, {{a0, a1, a2, a3}}, {{b0, b1}}, !({F16_INPUT}));"),
    "fast_exp2": ('"ex2.approx.ftz.f32 %0, %1;"',
                  "const float r = exp2f(x); return std::fabs(r) < 1.17549435e-38f ? 0.f : r;"),
    "shared_address": ("cvta.to.shared.u64",
                       "return u32(reinterpret_cast<const unsigned char*>(pointer) - emu::shared_window());"),
    "copy_async": ('"l"(from + 16 * WARP * k)', "for (int k = 0; 4 * (lane + WARP * k) < words; ++k) std::memcpy("
                                                "emu::shared_window() + target + 16 * WARP * k, "
                                                "source + offset + 16 * WARP * k, 16);"),
    "commit_copies": ("cp.async.commit_group", ""),
    "wait_copies": ("cp.async.wait_group", ""),
    "prefetch_l2": ("prefetch.global.L2", ""),
    "transpose_pairs": ("movmatrix.sync.aligned.m8n8.trans.b16", "return emu::movmatrix(x);"),
    "load_acquire": ("ld.acquire.gpu.global.s32", "return *reinterpret_cast<const volatile int*>(address);"),
    "poison_pairs": ('"fma.rn.bf16x2 %0, %1, %2, %3;"',
                     "u32 out = bad; for (int half = 0; half < 2; ++half) { const u32 h = (pair >> (16 * half)) & "
                     f"0xffffu, inf = ({F16_INPUT}) ? 0x7c00u : 0x7f80u; if ((h & inf) == inf) out |= "
                     "(inf | 0x40u) << (16 * half); } return out;"),
    "multiply_add": ('"mad.lo.u32 %0, %1, %2, %3;"', "return a * b + c;"),
    "scale_pair_at": ("(lo % 2 ? 0x32u : 0x10u) | (hi % 2 ? 0x7600u : 0x5400u)",
                      "\n#if SCALE_DTYPE == DTYPE_F32\n    return pack_pair(__uint_as_float(raw[lo]), "
                      "__uint_as_float(raw[hi]));\n#else\n    return emu::prmt(raw[lo / 2], raw[hi / 2], "
                      "(lo % 2 ? 0x32u : 0x10u) | (hi % 2 ? 0x7600u : 0x5400u));\n#endif\n"),
}
KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(([^),]*)[^)]*\) )?(\w+)\((.*?)\)\s*\{', re.S)
C_TYPES = {"int": ctypes.c_int, "i64": ctypes.c_longlong, "float": ctypes.c_float, "double": ctypes.c_double,
           "u32": ctypes.c_uint, "unsigned": ctypes.c_uint}
NUMPY_TYPES = {ctypes.c_int: np.int32, ctypes.c_longlong: np.int64, ctypes.c_float: np.float32,
               ctypes.c_double: np.float64, ctypes.c_uint: np.uint32}
BUILDS = pathlib.Path(tempfile.gettempdir()) / "oscar_cupy_emulator"


def host_source(text: str) -> str:
    """Kernel source for the host compiler."""
    for ptx, host in CONVERSIONS.items():
        text = text.replace(ptx, host)
    for name, (fragment, body) in HOST_BODIES.items():
        text = replace_body(text, name, fragment, body)
    if "asm(" in text or "asm volatile(" in text:
        raise NotImplementedError("the emulator runs kernels without inline PTX beyond what tests/emulator.py lists")
    text = STATIC_SHARED.sub(r"\1& \2 = emu::static_shared<\1>(__COUNTER__);", text)
    return DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::shared_memory());", text)


def replace_body(text: str, name: str, fragment: str, body: str) -> str:
    """``text`` with the body of the ``__device__`` function ``name`` (if defined there) replaced by ``body``; the old
    body must contain ``fragment`` (a changed helper needs its host body checked)."""
    match = re.search(r"__device__ __forceinline__ [\w:]+ " + name + r"\(", text)
    if not match:
        return text
    start = text.index("{", match.end())
    depth, end = 0, start
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    if fragment not in " ".join(text[start:end].split()):
        raise NotImplementedError(f"{name} changed in the kernel source: check its host body in tests/emulator.py")
    return text[: start + 1] + " " + body + " " + text[end:]


def parameters(text: str) -> list[tuple[str, str]]:
    """``(type, name)`` of each parameter of a kernel's parameter list."""
    pairs = []
    for parameter in " ".join(text.split()).split(","):
        declaration = parameter.replace("__restrict__", "").split()
        pairs.append((" ".join(declaration[:-1]), declaration[-1]))
    return pairs


class Module:
    """A kernel variant compiled for the host (cached by source, parameters and simt.h); ``source`` replaces the
    variant's module source (a test's deliberately changed kernel)."""

    def __init__(self, variant: kernels.Variant, source: str | None = None):
        source = host_source(variant.source() if source is None else source)
        header = host_source(kernels.read_source("common.cuh"))
        defines = [option for option in variant.options("sm_90") if option.startswith("-D")]
        found = KERNEL.findall(source)
        self.kernels = {name: parameters(params) for _, name, params in found}
        wrappers = "".join(self._wrapper(name, parameters(params), bound or "1024") for bound, name, params in found)
        simt = (HERE / "simt.h").read_text()
        key = hashlib.sha256("\0".join([source, wrappers, header, simt, *defines]).encode()).hexdigest()[:24]
        library = BUILDS / f"{variant.module}-{key}.so"
        if not library.exists():
            self._build(library, source + wrappers, header, defines)
        self.library = ctypes.CDLL(str(library))

    @staticmethod
    def _wrapper(name: str, params: list[tuple[str, str]], max_threads: str) -> str:
        """``emulate_NAME(grid, block, shared bytes, the kernel's parameters)`` and ``max_threads_NAME()`` (its
        launch bounds' thread count)."""
        declared = ", ".join(f"{kind} {param}" for kind, param in params)
        passed = ", ".join(param for _, param in params)
        return (f'\nextern "C" void emulate_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                f"unsigned bz, unsigned long shared, {declared}) {{\n"
                f"    emu::launch({{gx, gy, gz}}, {{bx, by, bz}}, shared, [&] {{ {name}({passed}); }});\n}}\n"
                f'extern "C" int max_threads_{name}() {{ return {max_threads}; }}\n')

    @staticmethod
    def _build(library: pathlib.Path, source: str, header: str, defines: list[str]) -> None:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            folder = pathlib.Path(folder)
            (folder / "common.cuh").write_text(header)
            (folder / "kernel.cpp").write_text(source)
            partial = folder / library.name
            done = subprocess.run(
                [COMPILER, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
                 "-Wno-unknown-pragmas", "-include", str(HERE / "simt.h"), *defines, "-o", str(partial),
                 str(folder / "kernel.cpp")],
                capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"g++ failed on the host version of {library.stem}:\n{done.stderr[-6000:]}")
            shutil.move(partial, library)  # whole files only, for concurrent test processes

    def launch(self, name: str, grid, block, args, shared_mem: int = 0) -> None:
        """Run kernel ``name`` over ``grid`` x ``block`` threads with ``args`` (numpy arrays as pointers)."""
        params = self.kernels[name]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        converted = []
        for (kind, param), value in zip(params, args):
            if "*" in kind:
                if isinstance(value, np.ndarray):
                    converted.append(ctypes.c_void_p(value.ctypes.data))
                elif isinstance(value, np.uint64) and value == 0:
                    converted.append(ctypes.c_void_p(0))
                else:
                    raise TypeError(f"{name}: {param} is a pointer, got {type(value).__name__}")
            else:
                c_type = C_TYPES[kind]
                if not isinstance(value, NUMPY_TYPES[c_type]):
                    raise TypeError(f"{name}: {param} is {kind}, got {type(value).__name__}")
                converted.append(c_type(value.item()))
        grid, block = (tuple(dims) + (1,) * (3 - len(dims)) for dims in (grid, block))
        threads, bound = int(np.prod(block)), getattr(self.library, f"max_threads_{name}")()
        if threads > bound or threads % 32:
            raise ValueError(f"{name}: a block of {threads} threads, where its launch bounds allow {bound} "
                             "(whole warps): the GPU would refuse the launch")
        getattr(self.library, f"emulate_{name}")(*map(ctypes.c_uint, grid), *map(ctypes.c_uint, block),
                                                  ctypes.c_ulong(shared_mem), *converted)
