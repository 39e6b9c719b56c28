# the end-to-end benchmark on the GPU: MODELS, TAG, EXTRA (arguments) from the environment
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OSCAR_CUPY_DATA_DIR=/tmp/oscar_data
O=$(realpath "$OUT")
timeout ${LIMIT:-570} python3 bench/e2e.py --models "$MODELS" --out "$O/e2e_$TAG" $EXTRA > "$O/e2e_$TAG.log" 2>&1; echo "e2e rc=$?"
grep -v "^{" "$O/e2e_$TAG.log" | tail -70
