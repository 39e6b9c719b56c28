# two GPUs: the device_map test (and the other adapter GPU tests) on an H200 x2
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=index,name --format=csv
CHECK=0 TESTS="tests/test_cuda_hf.py tests/test_hf.py -s" BENCHES= OUT=$OUT bash bench/gpu_session.sh 2>&1 | grep -E "passed|failed|FAIL|rc=" | head
grep -E "^FAILED|Error|SKIPPED" $OUT/tests.log | head
