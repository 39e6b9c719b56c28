"""A/B of builds of oscar_cupy on one GPU: decode-step and write-path times of each build, in alternating rounds.

A build is a wheel (``pip wheel --no-deps -w DIR <checkout>``) or a checkout (a folder with ``oscar_cupy/``,
``raw_kernels/`` and ``adapters/``, mapped as installing maps them: nothing to build, so a candidate is a copy of the
checkout with its change), installed into a folder of its own. Every round runs
each build in a fresh process with its own kernel cache, in the order given, and times the cases; the summary is each
case's mean over the rounds per build and its ratio to the first build. The machine's speed drifts by several percent
from one start to the next and a little within a run, so compare only builds timed in the same run, alternating.

Cases (comma-separated):
  decode:MODEL:PRESET:BATCH:CONTEXT   one graph-replayed decode step on the decode benchmark's inputs (MODEL llama or
                                      smollm2; bench/decode_timeline.py, step), in microseconds
  quantize:BATCH:HEADS:TOKENS:DIM:PRESET   the fused key + value quantize-and-pack of bf16 input (bench/quantize.py,
                                      quantize_row), in microseconds, with GB/s and the keys and values alone

Writes ab.json (every timing, the summary, device, date, command) into --out.

Run on a GPU: python bench/ab.py --builds base=.,new=ab/new --cases decode:llama:oscar-2:8:32768 --rounds 3
"""

import argparse
import collections
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent


def time_case(case: str) -> dict:
    """One case's timing with the oscar_cupy this process imports."""
    import oscar_cupy as oc

    kind, *fields = case.split(":")
    if kind == "decode":
        from decode_attention import replayed, time_ms
        from decode_timeline import SHAPES, step

        model, preset, batch, context = fields
        plan, run = step(oc.QuantConfig.preset(preset), int(batch), int(context), SHAPES[model])
        graph, stream = replayed(run)
        return dict(us=1000 * time_ms(lambda: graph.launch(stream), stream=stream, trials=9),
                    packed_blocks=plan.packed_blocks)
    if kind == "quantize":
        from quantize import quantize_row

        batch, heads, tokens, head_dim, preset = fields
        row = quantize_row(int(batch), int(heads), int(tokens), int(head_dim), oc.QuantConfig.preset(preset))
        return dict(us=1000 * row["quantize_ms"], gbs=row["quantize_gbs"], fraction_of_copy=row["fraction_of_copy"],
                    keys_us=1000 * row["keys_ms"], values_us=1000 * row["values_ms"])
    raise SystemExit(f"unknown case kind {kind!r} in {case!r}: decode or quantize")


def child(tag: str, cases: list[str]) -> None:
    sys.path.insert(0, str(BENCH))
    for case in cases:
        print(json.dumps(dict(tag=tag, case=case, **time_case(case))), flush=True)


def install(tag: str, build: str, root: pathlib.Path) -> pathlib.Path:
    """The build (a .whl file, a folder holding one, or a checkout) installed into a folder of its own."""
    target, source = root / f"site_{tag}", pathlib.Path(build)
    if (source / "oscar_cupy").is_dir() and (source / "raw_kernels").is_dir():  # a checkout: map it (setup.cfg)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source / "oscar_cupy", target / "oscar_cupy")
        for folder in ("raw_kernels", "adapters"):
            shutil.copytree(source / folder, target / "oscar_cupy" / folder)
        return target
    wheels = [source] if build.endswith(".whl") else sorted(source.glob("oscar_cupy-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"build {tag}: expected a checkout or one oscar_cupy wheel at {build}, found {len(wheels)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(target), str(wheels[0])], check=True)
    return target


def summary(rows: list[dict], tags: list[str]) -> list[dict]:
    """Per case, the mean time of each build over the rounds and its ratio to the first build's."""
    times = collections.defaultdict(list)
    for row in rows:
        times[row["case"], row["tag"]].append(row["us"])
    result = []
    for case in dict.fromkeys(row["case"] for row in rows):
        means = {tag: statistics.mean(times[case, tag]) for tag in tags if times[case, tag]}
        first = means.get(tags[0])
        result.append(dict(case=case, mean_us=means,
                           ratio={tag: mean / first for tag, mean in means.items()} if first else {}))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", required=True, help="TAG=WHEEL_OR_FOLDER, comma-separated; the first is the base")
    parser.add_argument("--cases", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("ab-out"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: time the cases in this process
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.child:
        child(args.child, cases)
        return
    builds = dict(item.split("=", 1) for item in args.builds.split(","))
    tags = list(builds)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="ab_"))  # the builds' installs and kernel caches (not results)
    sites = {tag: install(tag, build, work) for tag, build in builds.items()}
    rows = []
    for round_ in range(args.rounds):
        for tag in tags:
            env = dict(os.environ, PYTHONPATH=str(sites[tag]), OSCAR_CUPY_CACHE_DIR=str(work / f"kernels_{tag}"))
            done = subprocess.run([sys.executable, str(BENCH / "ab.py"), "--builds", args.builds, "--cases", args.cases,
                                   "--child", tag], env=env, cwd="/tmp", capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"build {tag}, round {round_ + 1} failed:\n{done.stderr[-4000:]}")
            rows += [dict(json.loads(line), round=round_ + 1) for line in done.stdout.splitlines()
                     if line.startswith("{")]
    shutil.rmtree(work, ignore_errors=True)
    import cupy

    result = dict(device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(), command=" ".join(sys.argv),
                  builds=builds, rows=rows, summary=summary(rows, tags))
    (args.out / "ab.json").write_text(json.dumps(result, indent=1) + "\n")
    print("case".ljust(44) + "".join(f"{tag:>20}" for tag in tags))
    for line in result["summary"]:
        cells = [f"{line['mean_us'][tag]:.1f} ({line['ratio'].get(tag, float('nan')):.3f})" if tag in line["mean_us"]
                 else "-" for tag in tags]
        print(line["case"].ljust(44) + "".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()
