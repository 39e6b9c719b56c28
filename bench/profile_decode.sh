#!/usr/bin/env bash
# Nsight Compute profile of decode_attention on one benchmark shape (default: batch 8, 32k context, 32/8 heads, head_dim
# 128, oscar-2) on the device machine; carries .whl/ like gpu_session.sh. Prints speed of light, occupancy, stalls.
#   SHAPE="batch tokens" (default "8 32768"); CONFIG: a preset name (default oscar-2)
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site:$PWD/bench PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
cat > /tmp/prof_decode.py <<PY
import cupy, numpy as np, ml_dtypes, oscar_cupy as oc
from oscar_cupy.cuda_attention import DecodePlan
from decode_attention import random_packed
from oscar_cupy import layout
batch, tokens = map(int, "${SHAPE:-8 32768}".split())
config = oc.PRESETS["${CONFIG:-oscar-2}"]
bf16 = np.dtype(ml_dtypes.bfloat16)
arrays = random_packed(config, batch, 8, layout.capacity(tokens, config), 128)
q = cupy.asarray(np.random.default_rng(0).standard_normal((batch, 32, 1, 128)).astype(bf16))
lengths = cupy.full(batch, tokens, dtype=cupy.int64)
plan = DecodePlan(config, batch=batch, q_heads=32, kv_heads=8, q_len=1, head_dim=128, dtype=bf16, max_packed=tokens)
for _ in range(3):
    plan.run(q, arrays, lengths)
cupy.cuda.Device().synchronize()
PY
ncu --kernel-name decode_attention --launch-skip 2 --launch-count 1 --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis --section SchedulerStats python3 /tmp/prof_decode.py > "$OUT/ncu_decode.txt" 2>&1
grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Executed Ipc A|Issue Slots Busy|Warp Cycles Per Issued|Theoretical Occ|Executed Instructions  |Grid Size|No Eligible|Active Warps Per|Eligible Warps|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth" "$OUT/ncu_decode.txt" | head -40
grep -iE "^ +(Stall|Warp Cycles)|smsp__pcsamp" "$OUT/ncu_decode.txt" | head -5
grep -A30 "Section: Warp State Statistics" "$OUT/ncu_decode.txt" | head -40
grep -E "smsp__average_warps_issue_stalled" "$OUT/ncu_decode.txt" | sort -k3 -g -r | head -14
