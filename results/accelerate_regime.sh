#!/usr/bin/env bash
# The target alone under the same cap as results/offloaded_regime.sh, with accelerate's own disk
# offload (`--offload accelerate`) instead of the disk streamer: the "before" of issue 14.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?output prefix}; shift
M=$(.venv/bin/python -c "from specexec.launch import model_store as m; print(m.converted_dir(m.TARGET))")
OFF=${OFF:-/work/offload-accelerate}; mkdir -p "$OFF"
PORT=${PORT:-5602}
../shared/tools/capped --mem 1800M --read-bps 500000000 --path "$OFF" --path "$M" --uncache "$M" --uncache "$OFF" -- \
  .venv/bin/specexec serve --max-memory cpu=1GiB --offload-folder "$OFF" --offload accelerate \
  --bind "tcp://127.0.0.1:$PORT" --threads "${VTHREADS:-1}" > "$out.serve.log" 2>&1 &
serve=$!
trap 'pkill -TERM -f "specexec serve .*127.0.0.1:$PORT"; wait $serve 2>/dev/null' EXIT  # (capped's background child ignores SIGINT)
until grep -q "listening on" "$out.serve.log"; do
  kill -0 $serve 2>/dev/null || { cat "$out.serve.log"; exit 1; }; sleep 2
done
.venv/bin/specexec bench --connect "tcp://127.0.0.1:$PORT" --no-warmup --out "$out.jsonl" "$@" 2>"$out.bench.err" | tee "$out.txt"
