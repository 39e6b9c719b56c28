# demo and eval on the GPU (after stage_c installed the wheel and assembled SmolLM2)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OSCAR_CUPY_DATA_DIR=/tmp/oscar_data
O=$(realpath "$OUT")
cd /tmp
timeout 120 python3 -m oscar_cupy demo --device cuda > "$O/demo_gpu.log" 2>&1; echo "demo rc=$?"
tail -30 "$O/demo_gpu.log"
timeout 500 python3 -m oscar_cupy eval --device cuda --no-plots --out "$O/eval_gpu" > "$O/eval_gpu.log" 2>&1; echo "eval rc=$?"
tail -5 "$O/eval_gpu.log"; cat "$O/eval_gpu/eval.md" 2>/dev/null | head -60
