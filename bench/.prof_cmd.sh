rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 /tmp/site/bin/pytest -p no:cacheprovider -q -x tests/test_cuda.py 2>&1 | tail -4
cat > /tmp/prof.py <<'PY'
import numpy as np, cupy, ml_dtypes, oscar_cupy as oc
from oscar_cupy import cuda_backend, layout
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
ncu --kernel-name regex:quantize --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis python3 /tmp/prof.py > $OUT/ncu.txt 2>&1
grep -E "quantize_|Duration|Throughput|Achieved Occupancy|Registers|Executed Ipc|Issue Slots|Stall|Theoretical Occ|Warp Cycles Per Issued|No Eligible|Block Limit" $OUT/ncu.txt | head -80
