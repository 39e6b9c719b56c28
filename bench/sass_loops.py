"""Static instruction counts of the decode kernel's loops (SASS), to check a kernel change without a GPU.

Compiles a variant of ``raw_kernels/decode.cu`` with NVRTC for an architecture, disassembles the cubin with
``nvdisasm`` and reports, for every loop (a backward branch) with at least 16 tensor-core instructions, its length and
its instruction mix. The packed path's loop body is one 32-token warp step; the counts include its rarely taken
branches (a new block of key-group biases every 8 groups, the masked last step, the rescale of the output when a row's
maximum grows, the packed part's tail), so the instructions a step issues are a little fewer. ``--listing`` prints the
loops' instructions, ``--by-line`` each loop's instruction count per source line of ``decode.cu`` (compiled with
``-lineinfo``, which leaves the code as it is; an inlined function's instructions count at its own lines).
``--source DIR`` compiles another checkout's ``raw_kernels`` (an A/B of a change without a GPU).

Needs NVRTC (``pip install nvidia-cuda-nvrtc==13.0.*``) and nvdisasm (``pip install nvidia-cuda-nvdisasm``: its
disassembler reads cubins of older compilers; or ``--nvdisasm PATH``).

Run: python bench/sass_loops.py [--head-dim 128 --bits 2 --group 32 --row-tiles 1 --arch sm_90]
"""

import argparse
import collections
import glob
import pathlib
import re
import shutil
import site
import subprocess
import tempfile

from oscar_cupy import kernels, nvrtc

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*\.(L_x_\d+):")
LINE = re.compile(r'//## File "(.*?)", line (\d+)')
BRANCH = re.compile(r"\bBRA\b.*`\(\.(L_x_\d+)\)")


def find_nvdisasm() -> str:
    """nvdisasm from PATH or from the NVIDIA pip wheel."""
    found = shutil.which("nvdisasm")
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    found = found or next(iter(sorted(p for root in roots for p in glob.glob(f"{root}/nvidia/*/bin/nvdisasm"))), None)
    if not found:
        raise SystemExit("nvdisasm was not found: pip install nvidia-cuda-nvdisasm, or pass --nvdisasm")
    return found


def disassemble(cubin: bytes, nvdisasm: str) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([nvdisasm, "-c", "-g", file.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()


def loops(lines: list[str], min_mma: int = 16) -> list[tuple[int, int, list[tuple[str, int]]]]:
    """``(start, end, body)`` of every backward branch's body with at least ``min_mma`` HMMA; ``body`` holds
    ``(instruction, source line)`` pairs (line 0 without line information)."""
    instructions, labels, pending, source_line = [], {}, [], 0
    for line in lines:
        label, located = LABEL.match(line), LINE.search(line)
        if label:
            pending.append(label.group(1))
        elif located:
            source_line = int(located.group(2))
        else:
            match = INSTRUCTION.search(line)
            if match:
                address = int(match.group(1), 16)
                labels.update((name, address) for name in pending)
                pending = []
                instructions.append((address, match.group(2), source_line))
    found = []
    for address, text, _ in instructions:
        branch = BRANCH.search(text)
        if branch and labels.get(branch.group(1), address) < address:
            start = labels[branch.group(1)]
            body = [(t, n) for a, t, n in instructions if start <= a <= address]
            if sum(opcode(t) == "HMMA" for t, _ in body) >= min_mma:
                found.append((start, address, body))
    return found


def opcode(instruction: str) -> str:
    """The opcode without predicate and modifiers: ``@!P0 LDS.128 R4, [R2]`` -> ``LDS``."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=32, help="value group (the variant's VALUE_GROUP)")
    parser.add_argument("--row-tiles", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--scale-dtype", default="float16")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--source", help="a checkout whose raw_kernels/ to compile instead of the installed ones")
    parser.add_argument("--nvdisasm", default=None)
    parser.add_argument("--listing", action="store_true")
    parser.add_argument("--by-line", action="store_true")
    args = parser.parse_args()
    variant = kernels.decode_variant(args.head_dim, args.bits, args.dtype, args.scale_dtype, args.group,
                                     args.row_tiles)
    read = kernels.read_source if args.source is None else (
        lambda name: pathlib.Path(args.source, "raw_kernels", name).read_text())
    source = read("decode.cu")
    cubin, _ = nvrtc.compile_cubin(source, "decode.cu", [*variant.options(args.arch), "-lineinfo"],
                                   {"common.cuh": read("common.cuh")})
    source_lines = source.splitlines()
    print(f"{variant.describe()} for {args.arch} (NVRTC {'.'.join(map(str, nvrtc.version()))})")
    for start, end, body in loops(disassemble(cubin, args.nvdisasm or find_nvdisasm())):
        mix = collections.Counter(opcode(t) for t, _ in body)
        print(f"loop {start:#x}-{end:#x}: {len(body)} instructions: "
              + ", ".join(f"{name} {count}" for name, count in mix.most_common()))
        if args.listing:
            print("\n".join(f"    {n:5d}  {t}" for t, n in body))
        if args.by_line:
            for n, count in sorted(collections.Counter(n for _, n in body).items()):
                text = source_lines[n - 1].strip() if 0 < n <= len(source_lines) else ""
                print(f"    {count:4d}  decode.cu:{n:<5d} {text[:100]}")


if __name__ == "__main__":
    main()
