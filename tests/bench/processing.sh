#!/usr/bin/env bash
# The processing benchmark, beside DuckDB in the same run (../shared/peers/processing, its README).
#
#   tests/bench/processing.sh [readings=2000000]
#
# 1. Generates the workload if missing: N readings of 1,000 sensors over 24 h, 1 % late by 1-3 h
#    (and the same with 10,000 sensors).
# 2. DuckDB: 1-minute windows (count, min, max, mean) as one GROUP BY over the Parquet copy.
# 3. Tributary (aggregator/examples/process_bench.rs): the readings go into a real aggregator's log
#    through its ingest API as postcard batches from 4 senders; then the pipeline folds the whole
#    log from offset 0 into a fresh store, timed, and its 1-minute windows are exported and checked
#    with check.py. Runs: only 1-minute windows; the default pipeline (10s, 1m, 1h windows with
#    sketches: what a default aggregator.toml runs); the full pipeline (the same, an anomaly model
#    on every sensor, 10 alert rules); all three again on 10,000 sensors.
# Prints each RESULT line, check.py's verdict, and the rates as a ratio of DuckDB's (also with the
# checkpoint of the store the fold left: process_bench.rs).
# Needs python3 with venv (the peer's setup.sh installs duckdb, pyarrow, numpy into a venv).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${1:-2000000}
PEER=${PROCESSING_PEER:-$ROOT/../shared/peers/processing}
cd "$ROOT"
V=$("$PEER/setup.sh" | tail -1)
PY=$V/bin/python
DATA=$PEER/data
[ -f "$DATA/readings_$N.csv" ] || "$PY" "$PEER/gen.py" -n "$N" -s 1000 >/dev/null
[ -f "$DATA/readings_${N}_10k.csv" ] || "$PY" "$PEER/gen.py" -n "$N" -s 10000 --suffix _10k >/dev/null

# PROCESS_BENCH=path uses an already built bench binary (e.g. one built without LTO, faster to build).
BENCH=${PROCESS_BENCH:-}
if [ -z "$BENCH" ]; then
  cargo build --release -p tributary-aggregator --example process_bench --quiet
  BENCH=$ROOT/target/release/examples/process_bench
fi
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT

echo "== DuckDB (batch limit), 1-minute windows, $N readings"
mkdir -p "$PEER/out"
DUCK=$(cd "$PEER" && "$PY" run_duckdb.py -n "$N" | grep '^RESULT')
echo "$DUCK"
duck_rate=$(echo "${DUCK#RESULT }" | python3 -c 'import json,sys; print(json.load(sys.stdin)["readings_per_s"])')

run() { # label, csv, pipeline, check(yes/no) [n-for-check suffix]
  echo "== Tributary: $1"
  local line
  line=$("$BENCH" "$2" "$OUT/windows.csv" "$3" | grep '^RESULT')
  echo "$line"
  echo "${line#RESULT }" | python3 -c '
import json, sys
r, d = json.load(sys.stdin), float(sys.argv[1])
rate, with_checkpoint, checkpoint = r["readings_per_s"], r["readings_per_s_with_checkpoint"], r["checkpoint_s"]
print(f"   {rate/1e6:.2f} M readings/s = {rate/d:.2f}x DuckDB ({d/1e6:.2f} M/s); with the checkpoint the fold "
      f"left ({checkpoint:.3f} s): {with_checkpoint/1e6:.2f} M/s = {with_checkpoint/d:.2f}x")' "$duck_rate"
  if [ "$4" = yes ]; then
    (cd "$PEER" && "$PY" check.py -n "$N" "$OUT/windows.csv" | grep '^CHECK')
  fi
}
run "1-minute windows only, 1,000 sensors" "$DATA/readings_$N.csv" 1m yes
run "default pipeline (10 s, 1 m, 1 h windows), 1,000 sensors" "$DATA/readings_$N.csv" 10s,1m,1h yes
run "full pipeline (the default windows, anomaly model, 10 alert rules), 1,000 sensors" "$DATA/readings_$N.csv" full yes
run "1-minute windows only, 10,000 sensors" "$DATA/readings_${N}_10k.csv" 1m no
run "default pipeline, 10,000 sensors" "$DATA/readings_${N}_10k.csv" 10s,1m,1h no
run "full pipeline, 10,000 sensors" "$DATA/readings_${N}_10k.csv" full no
