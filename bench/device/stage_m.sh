# Write-path instruction cuts (2026-12-07): the write-path GPU tests (bit for bit against the CPU reference), the
# write-path benchmark, and an A/B of this checkout against the kernels before the cuts (ab_tmp/base: `git archive
# 91b9a20 oscar_cupy raw_kernels adapters | tar -x -C ab_tmp/base`) in alternating rounds of one run (bench/ab.py),
# with two candidates made here from the checkout (CANDIDATES= leaves them out): 16 value channels per lane, and key
# blocks of up to 16 warps with the stash up to 227 KiB (quantize_launch.py edited in copies). About 5 minutes on an
# H100.
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
(cd /tmp && timeout 120 python3 -m pytest -p no:cacheprovider -q -ra "$REPO/tests/test_cuda.py" \
  --junitxml="$O/junit.xml" > "$O/tests.log" 2>&1; echo "pytest rc=$?")
tail -6 "$O/tests.log"
python3 bench/test_report.py "$O/junit.xml" "$O" "bash bench/device/stage_m.sh (tests/test_cuda.py)" > /dev/null 2>&1
timeout 100 python3 bench/quantize.py --out "$O" > "$O/bench_quantize.log" 2>&1; echo "bench rc=$?"
grep -A16 "^| batch" "$O/quantize.md" | head -16
rm -f "$O/junit.xml" "$O/info.log"  # at most 8 files come back
for candidate in v16 kw16; do
  rm -rf "/tmp/cand_$candidate" && mkdir -p "/tmp/cand_$candidate"
  cp -r oscar_cupy raw_kernels adapters "/tmp/cand_$candidate/"
done
sed -i 's/^VALUE_LANE_CHANNELS = .*/VALUE_LANE_CHANNELS = {64: 16, 128: 16, 256: 16}/' \
  /tmp/cand_v16/oscar_cupy/quantize_launch.py
sed -i 's/^KEY_BLOCK_WARPS = 8 /KEY_BLOCK_WARPS = 16 /; s/^STASH_LIMIT = 112 \* 1024 /STASH_LIMIT = 227 * 1024 /' \
  /tmp/cand_kw16/oscar_cupy/quantize_launch.py
(cd /tmp && timeout 150 python3 "$REPO/bench/ab.py" --rounds 2 --out "$O/ab_quantize" \
  --builds "base=$REPO/ab_tmp/base,new=$REPO${CANDIDATES-,v16=/tmp/cand_v16,kw16=/tmp/cand_kw16}" \
  --cases quantize:8:8:8192:128:oscar-2,quantize:8:8:8192:128:oscar-4,quantize:1:8:131072:128:oscar-2,\
quantize:32:3:16384:64:oscar-2,quantize:4:8:8192:256:oscar-2) 2>&1 | tail -12
