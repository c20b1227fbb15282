#!/usr/bin/env bash
# Live ingest and processing together, from postcard batches (tributary-sim load, 4 connections unless told),
# into a release aggregator with the default pipeline (10s, 1m, 1h windows with sketches).
#
#   tests/bench/live.sh [first=10000000] [then=40000000] [sensors=1000] [rate] [period_ms=1000] [connections=4]
#
# Phase 1 sends `first` readings, phase 2 `then` more: as fast as the acks come back, or at a
# steady `rate` readings/s (does the processor keep up, and in how much memory?). Each sensor
# reports once per `period_ms` of event time. The default second makes a run at 1 M readings/s
# a backlog (1,000 sensors' hours arrive in minutes, windows close a thousand times faster
# than in life); sensors * 1000 / rate (1 ms for 1,000 sensors at 1 M/s) makes event time pass
# as fast as the clock, as a live fleet's does. Phase 2's event times follow phase 1's, as a log
# that grows with time would (not the same hours again, which would make every reading late
# data). For each phase: the rate at which readings become visible (ingest start -> processor
# caught up), the rate the batches were acknowledged,
# the largest processing lag seen (sampled every 0.2 s from /metrics), the aggregator's RSS (peak
# and at the end) and CPU per reading. At the end: bytes on disk per reading for the log and
# the store.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIRST=${1:-10000000}; THEN=${2:-40000000}; SENSORS=${3:-1000}; RATE=${4:-}; PERIOD_MS=${5:-1000}; CONNECTIONS=${6:-4}
cd "$ROOT"
# TRIBUTARY_BIN=dir uses binaries already built there (e.g. without LTO, faster to build).
BIN=${TRIBUTARY_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --bins --quiet
  BIN=$ROOT/target/release
fi
. "$ROOT/tests/bench/common.sh"
RUST_LOG=warn start_aggregator
PORT=$AP

metric() { curl -fs "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$AGG/status"; }
cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$AGG/stat"; }

phase() { # name, readings, seed, seconds before now at which its event times end
  local start_end; start_end=$(metric tributary_log_end_offset)
  local cpu0; cpu0=$(cpu_s)
  : >"$TMP/samples"
  ( while true; do
      echo "$(metric tributary_processor_lag_readings) $(rss_kib)" >>"$TMP/samples"; sleep 0.2
    done ) & local sampler=$!
  RUST_LOG=info "$BIN/tributary-sim" load --url "http://127.0.0.1:$PORT" --readings "$2" --sensors "$SENSORS" \
    --seed "$3" --ago-s "$4" --period-ms "$PERIOD_MS" --connections "$CONNECTIONS" ${RATE:+--rate "$RATE"} >"$TMP/load.out" 2>&1 &
  local sim=$!
  # The simulator encodes every batch before it sends the first (6 s for 10 M readings), then logs
  # "batches encoded; sending" (hence RUST_LOG=info whatever the environment says): the
  # clock starts when it starts sending, or the rates count its preparation.
  until grep -q 'batches encoded; sending' "$TMP/load.out" || ! kill -0 "$sim" 2>/dev/null; do sleep 0.02; done
  local t0; t0=$(date +%s.%N)
  wait "$sim"
  local t_acked; t_acked=$(date +%s.%N)
  local target=$((start_end + $2))
  while [ "$(metric tributary_processor_offset)" -lt "$target" ]; do sleep 0.05; done
  local t1; t1=$(date +%s.%N)
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  local cpu1; cpu1=$(cpu_s)
  python3 - "$1" "$2" "$t0" "$t_acked" "$t1" "$cpu0" "$cpu1" "$(rss_kib)" "$TMP/samples" <<'PY'
import sys
name, n, t0, ta, t1, c0, c1, rss_end, samples = sys.argv[1:]
n, t0, ta, t1 = int(n), float(t0), float(ta), float(t1)
lags, rss = [], []
for line in open(samples):
    parts = line.split()
    if len(parts) == 2:
        lags.append(int(parts[0])); rss.append(int(parts[1]))
print(f"{name}: {n:,} readings; visible in the API at {n / (t1 - t0) / 1e6:.2f} M readings/s "
      f"(acknowledged at {n / (ta - t0) / 1e6:.2f} M/s; caught up {t1 - ta:.2f} s after the last ack); "
      f"max lag {max(lags, default=0):,} readings; aggregator RSS peak {max(rss, default=0) / 1024:.1f} MiB, "
      f"at the end {int(rss_end) / 1024:.1f} MiB; aggregator CPU {(float(c1) - float(c0)) * 1e6 / n:.2f} us/reading")
PY
}

phase "phase 1" "$FIRST" 1 $(((THEN / SENSORS * PERIOD_MS + 999) / 1000))
phase "phase 2" "$THEN" 2 0
TOTAL=$((FIRST + THEN))
python3 - "$TOTAL" "$TMP/aggregator" <<'PY'
import os, sys
n, d = int(sys.argv[1]), sys.argv[2]
size = lambda base: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith(base))
log, store = size("log.db"), size("store.db")
print(f"disk after {n:,} readings: log {log / n:.2f} B/reading ({log / 2**20:.0f} MiB), "
      f"store {store / n:.2f} B/reading ({store / 2**20:.0f} MiB)")
PY
