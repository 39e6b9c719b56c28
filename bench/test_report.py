"""Summarize a pytest JUnit XML report of a device run as bench/results/cuda_tests.{json,md}.

Run on the device machine after the tests: python bench/test_report.py JUNIT_XML OUT_DIR "COMMAND"
"""

import datetime
import json
import pathlib
import sys
import xml.etree.ElementTree as ET

import cupy
import numpy as np

import oscar_cupy
from oscar_cupy import nvrtc


def main():
    junit, out, command = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    outcomes = {}
    for case in suite.iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes.setdefault(module, {}).setdefault(kind, 0)
        outcomes[module][kind] += 1
    result = dict(
        report="tests", device=cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        date=datetime.date.today().isoformat(), command=command,
        versions=dict(oscar_cupy=oscar_cupy.__version__, cupy=cupy.__version__, numpy=np.__version__,
                      nvrtc=".".join(map(str, nvrtc.version())),
                      cuda_runtime=cupy.cuda.runtime.runtimeGetVersion()),
        totals={key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")},
        by_module=outcomes,
    )
    (out / "cuda_tests.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Test suite on {result['device']} ({result['date']})", "", f"`{command}`", "",
             "| module | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
    for module, counts in sorted(outcomes.items()):
        lines.append(f"| {module} | {counts.get('passed', 0)} | {counts.get('failure', 0)} | {counts.get('error', 0)} "
                     f"| {counts.get('skipped', 0)} |")
    (out / "cuda_tests.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
