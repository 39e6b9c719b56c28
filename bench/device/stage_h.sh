# the whole test suite on a fresh device machine (no SmolLM2: its test skips; kernels compile on first use)
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export OSCAR_REAL_KV=$(realpath .assets/smollm2_kv.npz)
CHECK=0 TESTS="tests -s" BENCHES= OUT=$OUT bash bench/gpu_session.sh 2>&1 | grep -E "passed|failed|FAIL|rc=" | head -20
grep -E "^FAILED|Error" $OUT/tests.log | head -20
