# After the CPU-only session of 2026-11-23: the GPU tests of what changed without a GPU (write-path launches, input
# checks, the decode launch model, the key kernel's norm flag), the write-path benchmark, then the lane-geometry
# candidates of quantize_profile.md against this checkout in alternating rounds (bench/ab.py). About 8 minutes on an H100.
# carry: .whl (oscar_cupy's wheel and the test wheels), .assets/smollm2_kv.npz
set -u
O=$(realpath "$OUT")
REPO=$(pwd)
export OSCAR_REAL_KV=$(realpath .assets/smollm2_kv.npz)
TESTS="tests/test_cuda.py tests/test_cuda_attention.py tests/test_generation.py tests/test_errors.py tests/test_cache.py \
tests/test_decode_launch.py tests/test_emulated_kernels.py" BENCHES=quantize OUT=$O bash bench/gpu_session.sh 2>&1 | tail -25
for candidate in values16 keyrows2 both; do
  rm -rf /tmp/cand_$candidate && mkdir -p /tmp/cand_$candidate && cp -r oscar_cupy raw_kernels adapters /tmp/cand_$candidate/
done
for candidate in values16 both; do
  sed -i 's/^VALUE_LANE_CHANNELS = .*/VALUE_LANE_CHANNELS = {64: 16, 128: 16, 256: 16}/' \
    /tmp/cand_$candidate/oscar_cupy/quantize_launch.py
done
for candidate in keyrows2 both; do
  sed -i 's/^KEY_LANE_ROWS = .*/KEY_LANE_ROWS = {64: 2, 128: 2, 256: 4}/' /tmp/cand_$candidate/oscar_cupy/quantize_launch.py
done
grep -h "^VALUE_LANE_CHANNELS\|^KEY_LANE_ROWS" /tmp/cand_*/oscar_cupy/quantize_launch.py
(cd /tmp && timeout 300 python3 "$REPO/bench/ab.py" --rounds 3 --out "$O/ab_quantize" \
  --builds base=$REPO,values16=/tmp/cand_values16,keyrows2=/tmp/cand_keyrows2,both=/tmp/cand_both \
  --cases quantize:8:8:8192:128:oscar-2,quantize:8:8:8192:128:oscar-4,quantize:1:8:131072:128:oscar-2,\
quantize:32:3:16384:64:oscar-2,quantize:4:8:8192:256:oscar-2) 2>&1 | tail -8
