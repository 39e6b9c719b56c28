# max batch at the budget (16k) with the current cache: MODELS, CACHES from the environment
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
O=$(realpath "$OUT")
timeout ${LIMIT:-560} python3 bench/e2e.py --models "$MODELS" --caches "$CACHES" --batches "" --contexts "" --long 0 \
  --prefill-contexts "" --breakdown "" --steps 16 --out "$O/e2e_cap" > "$O/e2e_cap.log" 2>&1; echo "e2e rc=$?"
grep -v "^{" "$O/e2e_cap.log" | tail -30
