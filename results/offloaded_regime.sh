#!/usr/bin/env bash
# The offloaded regime of issues 14/15, as measured for docs/results.md: the verifier (default
# target, bf16, --max-memory cpu=1GiB, 24 of 28 layers streamed from the offload folder) inside
# ../shared/tools/capped (1800M cap counting the page cache, reads throttled to 500 MB/s, model
# files uncached first); the drafter beside it on the same machine, `bench --connect`.
#   results/offloaded_regime.sh OUT_PREFIX [bench options...]
# OFFLOAD=accelerate runs the same regime with accelerate's own disk offload instead of the disk
# streamer (the target-alone comparison of issue 14; then OFF defaults to /work/offload-accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?output prefix}; shift
M=$(.venv/bin/python -c "from specexec.launch import model_store as m; print(m.converted_dir(m.TARGET))")
OFFLOAD=${OFFLOAD:-disk}
if [ "$OFFLOAD" = accelerate ]; then OFF=${OFF:-/work/offload-accelerate}; mkdir -p "$OFF"; else OFF=${OFF:-/work/offload-target}; fi
PORT=${PORT:-5601}
VTHREADS=${VTHREADS:-2}
DTYPE=${DTYPE:-auto}  # the target's dtype (float32: the greedy-identity check; then OFF must be a folder of its own)
[ "$OFFLOAD" = accelerate ] || [ -f "$OFF/manifest.json" ] || .venv/bin/specexec profile --max-memory cpu=1GiB --offload-folder "$OFF" --dtype "$DTYPE" --sizes 1 --prefix 8
../shared/tools/capped --mem 1800M --read-bps 500000000 --path "$OFF" --path "$M" --uncache "$M" --uncache "$OFF" -- \
  .venv/bin/specexec serve --max-memory cpu=1GiB --offload-folder "$OFF" --offload "$OFFLOAD" --dtype "$DTYPE" --bind "tcp://127.0.0.1:$PORT" \
  --threads "$VTHREADS" ${SERVE_EXTRA:-} > "$out.serve.log" 2>&1 &
serve=$!
trap 'pkill -TERM -f "specexec serve .*127.0.0.1:$PORT"; wait $serve 2>/dev/null' EXIT  # (capped's background child ignores SIGINT)
until grep -q "listening on" "$out.serve.log"; do
  kill -0 $serve 2>/dev/null || { cat "$out.serve.log"; exit 1; }; sleep 2
done
.venv/bin/specexec bench --connect "tcp://127.0.0.1:$PORT" --no-warmup --out "$out.jsonl" "$@" 2>"$out.bench.err" | tee "$out.txt"
