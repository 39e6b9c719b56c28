# Keys rotated on the tensor cores (2026-12-07; run on commit 8b31d30, reverted after it: results in
# bench/results/quantize_tensor_core_keys_ab.md): the write-path GPU tests (bit for bit against the CPU reference, or
# within the tensor cores' rotation bound), the write-path benchmark, and an A/B of this checkout against the kernels
# before it (ab_tmp/base: `git archive 437eab5 oscar_cupy raw_kernels adapters | tar -x -C ab_tmp/base`) in
# alternating rounds of one run (bench/ab.py), with candidates made here from the checkout (CANDIDATES= leaves them
# out): key blocks of 4 warps (their stash fits beside the partial extremes), and the stash up to 227 KiB.
# carry: .whl (oscar_cupy's wheel, `pip wheel --no-deps -w .whl .`), ab_tmp/base, .assets/smollm2_kv.npz
# (bench/dump_kv.py)
set -u
O=$(realpath "$OUT")
REPO=$(pwd)
export PYTHONUNBUFFERED=1 OSCAR_REAL_KV=$(realpath .assets/smollm2_kv.npz)
rm -rf /tmp/site  # a warm machine keeps the last install
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$O/info.log"
# from /tmp: the checkout's oscar_cupy/ lacks the adapters/ and raw_kernels/ that installing maps into the package
(cd /tmp && timeout 150 python3 -m pytest -p no:cacheprovider -q -ra "$REPO/tests/test_cuda.py" \
  --junitxml="$O/junit.xml" > "$O/tests.log" 2>&1; echo "pytest rc=$?")
tail -6 "$O/tests.log"
python3 bench/test_report.py "$O/junit.xml" "$O" "bash bench/device/stage_n.sh (tests/test_cuda.py)" > /dev/null 2>&1
timeout 100 python3 bench/quantize.py --out "$O" > "$O/bench_quantize.log" 2>&1; echo "bench rc=$?"
grep -A16 "^| batch" "$O/quantize.md" | head -16
rm -f "$O/junit.xml" "$O/info.log"  # at most 8 files come back
for candidate in kw4 s227; do
  rm -rf "/tmp/cand_$candidate" && mkdir -p "/tmp/cand_$candidate"
  cp -r oscar_cupy raw_kernels adapters "/tmp/cand_$candidate/"
done
sed -i 's/^KEY_BLOCK_WARPS = 8 /KEY_BLOCK_WARPS = 4 /' /tmp/cand_kw4/oscar_cupy/quantize_launch.py
sed -i 's/^STASH_LIMIT = 112 \* 1024 /STASH_LIMIT = 227 * 1024 /' /tmp/cand_s227/oscar_cupy/quantize_launch.py
(cd /tmp && timeout 170 python3 "$REPO/bench/ab.py" --rounds 2 --out "$O/ab_quantize" \
  --builds "base=$REPO/ab_tmp/base,new=$REPO${CANDIDATES-,kw4=/tmp/cand_kw4,s227=/tmp/cand_s227}" \
  --cases quantize:8:8:8192:128:oscar-2,quantize:8:8:8192:128:oscar-4,quantize:1:8:131072:128:oscar-2,\
quantize:32:3:16384:64:oscar-2,quantize:4:8:8192:256:oscar-2) 2>&1 | tail -12
