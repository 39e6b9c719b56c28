"""Merge the eval.json files of several `oscar-cupy eval` runs over different texts (run side by side, e.g. on one GPU)
into one result: eval.json, eval.md and the plots.

    python bench/merge_eval.py OUT_DIR RUN1/eval.json RUN2/eval.json ...
"""

import json
import pathlib
import sys

from oscar_cupy import evaluation


def main():
    out, paths = pathlib.Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    merged = evaluation.merge([json.loads(pathlib.Path(path).read_text()) for path in paths])
    for path in evaluation.write(merged, out):
        print(path)


if __name__ == "__main__":
    main()
