#!/usr/bin/env bash
# One device-machine session: install the carried wheels, check the kernels, run the test suite (GPU tests included)
# and the benchmarks. Logs and results go to $OUT (default ./gpu-out).
#   TESTS: pytest arguments (default: tests, the whole suite); BENCHES: bench scripts to run (empty: none; default: quantize
#   decode_attention); BENCH_ARGS: extra arguments for them (e.g. --quick); CHECK=0 skips check-kernels.
#   carried: .whl/ (oscar_cupy's wheel from `pip wheel --no-deps -w .whl .` plus pytest/hypothesis wheels)
#            .assets/smollm2_kv.npz (real K/V, from bench/dump_kv.py)
set -uo pipefail
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=$(realpath "$OUT")
cli() { (cd /tmp && python3 -m oscar_cupy "$@"); }  # not from the checkout, whose oscar_cupy/ lacks the mapped parts
cli info 2>&1 | tee "$OUT/info.log"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/info.log"
arch=$(python3 -c "import cupy; print('sm_' + cupy.cuda.Device(0).compute_capability)")
if [ "${CHECK:-1}" != 0 ]; then
  cli check-kernels --arch "$arch" --resources > "$OUT/check_kernels.log" 2>&1; echo "check-kernels rc=$?"
  tail -1 "$OUT/check_kernels.log"
fi
TESTS=${TESTS:-tests}
# shellcheck disable=SC2086
python3 /tmp/site/bin/pytest -p no:cacheprovider -q -ra $TESTS --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/tests.log"
python3 bench/test_report.py "$OUT/junit.xml" "$OUT" "TESTS='$TESTS' bash bench/gpu_session.sh"
for bench in ${BENCHES-quantize decode_attention}; do
  # shellcheck disable=SC2086
  python3 "bench/$bench.py" --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench_$bench.log" 2>&1; echo "bench $bench rc=$?"
  tail -40 "$OUT/bench_$bench.log"
done
