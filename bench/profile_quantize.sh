#!/usr/bin/env bash
# Nsight Compute profile of the two quantize kernels on the bench shape (8 x 8 x 8192 x 128, bf16, oscar-2) on the
# device machine; carries .whl/ like gpu_session.sh. Prints the speed-of-light, occupancy and instruction summary.
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cat > /tmp/prof.py <<'PY'
import numpy as np, cupy, ml_dtypes, oscar_cupy as oc
from oscar_cupy import cuda_backend
rng = np.random.default_rng(0)
shape = (8, 8, 8192, 128)
k, v = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)) for _ in range(2))
config = oc.QuantConfig()
out = cuda_backend.allocate(config, 8, 8, 8192, 128)
lengths = cupy.full(8, 8192, dtype=cupy.int64)
for _ in range(3):
    cuda_backend.launch_quantize(k, v, config, lengths, out)
cupy.cuda.Device().synchronize()
PY
ncu --kernel-name regex:quantize --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis --section SchedulerStats --section LaunchStats python3 /tmp/prof.py > $OUT/ncu.txt 2>&1
grep -E "quantize_|Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Executed Ipc A|Issue Slots Busy|Warp Cycles Per Issued|Theoretical Occ|Executed Instructions  |Stall|Pipe|Mem Busy|L2 Hit" $OUT/ncu.txt | head -60
grep -B2 -A12 "Section: Warp State Statistics" $OUT/ncu.txt | grep -iE "stall|cycles" | head -20
