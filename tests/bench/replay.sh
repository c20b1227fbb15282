#!/usr/bin/env bash
# Reprocessing by replay: what switching pipeline versions costs while live data keeps flowing.
#
#   tests/bench/replay.sh [readings=2000000] [live_rate=100000] [sensors=1000] [windows='"10s", "1m", "1h"']
#
# 1. Version 1 (windows as given): `tributary-sim load` sends `readings` (postcard batches, 4
#    connections) into a release aggregator; wait until they are all processed; stop it.
# 2. Version 2 (the same windows plus 5m): restart. The old version serves while the new one
#    replays the log from offset 0. Meanwhile `tributary-sim load` sends `live_rate` readings every
#    second (a burst per second), and a probe reads one sensor's day of 1-minute windows every
#    50 ms. When /api/v1/pipeline says version 2 serves: how long the replay took, its rate (log
#    offset at the switch / time), the live ingest rate reached meanwhile, the probe's p50/p99 and
#    errors, the aggregator's peak RSS and CPU per replayed reading.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${1:-2000000}; RATE=${2:-100000}; SENSORS=${3:-1000}; WINDOWS=${4:-'"10s", "1m", "1h"'}
cd "$ROOT"
# TRIBUTARY_BIN=dir uses binaries already built there (e.g. without LTO, faster to build).
BIN=${TRIBUTARY_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --bins --quiet
  BIN=$ROOT/target/release
fi
TMP=$(mktemp -d); AGG=""; PIDS=()
cleanup() { for p in "${PIDS[@]}" $AGG; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

config() { # version, windows
  cat >"$TMP/aggregator.toml" <<EOF
data_dir = "$TMP/data"
[http]
listen = "127.0.0.1:$PORT"
[[agents]]
id = "gw-1"
token = "secret-gw-1"
[pipeline]
version = $1
windows = [$2]
EOF
}
start() {
  RUST_LOG=info "$BIN/tributary-aggregator" --config "$TMP/aggregator.toml" 2>>"$TMP/aggregator.log" &
  AGG=$!
  for _ in $(seq 200); do curl -fs "$URL/healthz" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "the aggregator did not start"; cat "$TMP/aggregator.log"; exit 1
}
stop() { kill -TERM "$AGG"; wait "$AGG" 2>/dev/null || true; AGG=""; }
metric() { curl -fs "$URL/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
load() { "$BIN/tributary-sim" load --url "$URL" --readings "$1" --sensors "$SENSORS" --seed "$2" --connections "$3" >/dev/null 2>&1; }

config 1 "$WINDOWS"
start
t=$(date +%s.%N)
load "$N" 1 4
while [ "$(metric tributary_processor_offset)" != "$(metric tributary_log_end_offset)" ]; do sleep 0.1; done
echo "version 1 ($WINDOWS): $N readings loaded and processed in $(python3 -c "print(round($(date +%s.%N) - $t, 1))") s"
SENSOR=$(curl -fs "$URL/api/v1/sensors?limit=1" | python3 -c 'import json,sys,urllib.parse; print(urllib.parse.quote(json.load(sys.stdin)[0]["id"], safe=""))')
stop

config 2 "$WINDOWS, \"5m\""
start
t0=$(date +%s.%N)
cpu0=$(awk '{print $14+$15}' "/proc/$AGG/stat")
head0=$(metric tributary_log_end_offset)
# Live ingest: a burst of RATE readings every second.
( i=100; while true; do
    s=$(date +%s.%N); load "$RATE" "$i" 2 && echo "$RATE" >>"$TMP/live"; i=$((i + 1))
    python3 -c "import time; time.sleep(max(0, 1 - (time.time() - $s)))"
  done ) & PIDS+=($!)
# The probe: one sensor's day of 1-minute windows, every 50 ms.
now_ms=$(($(date +%s) * 1000))
( while true; do
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' \
      "$URL/api/v1/sensors/$SENSOR/windows?size=1m&from=$((now_ms - 86400000))&to=$now_ms" >>"$TMP/probe"
    sleep 0.05
  done ) & PIDS+=($!)
rss_peak=0
while true; do
  p=$(curl -fs "$URL/api/v1/pipeline" || true)
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$AGG/status"); [ "$rss" -gt "$rss_peak" ] && rss_peak=$rss
  serving=$(echo "$p" | python3 -c 'import json,sys; print(json.load(sys.stdin)["serving"])' 2>/dev/null || echo 0)
  [ "$serving" = 2 ] && break
  sleep 0.2
done
t1=$(date +%s.%N)
cpu1=$(awk '{print $14+$15}' "/proc/$AGG/stat")
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; PIDS=()
# A probe request in flight when its loop is killed finishes on its own: not cut by the stop.
sleep 0.5
promoted=$(grep 'promoted the new pipeline version' "$TMP/aggregator.log" | tail -1)
stop
python3 - "$t0" "$t1" "$head0" "$cpu0" "$cpu1" "$rss_peak" "$TMP/live" "$TMP/probe" "$promoted" <<'PY'
import re, sys
t0, t1, head0, c0, c1, rss, live, probe, promoted = sys.argv[1:]
t0, t1, head0 = float(t0), float(t1), int(head0)
secs = t1 - t0
offset = int(re.search(r"offset=(\d+)", promoted).group(1)) if "offset=" in promoted else head0
took = float(re.search(r"took_s=([\d.]+)", promoted).group(1)) if "took_s=" in promoted else secs
try:
    sent = sum(int(l) for l in open(live))
except FileNotFoundError:
    sent = 0
lat, errors = [], 0
for line in open(probe):
    code, t = line.split()
    if code != "200":
        errors += 1
        print(f"probe error: HTTP {code} after {t} s", file=sys.stderr)
    else:
        lat.append(float(t) * 1000)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
cpu = (float(c1) - float(c0)) / 100
print(f"version 2 (+5m): replayed {offset:,} readings (log at restart: {head0:,}) and switched in {took:.1f} s: "
      f"{offset / took / 1e6:.2f} M readings/s; aggregator CPU {cpu * 1e6 / max(offset, 1):.2f} us per replayed reading "
      f"(live ingest and the serving version included)")
print(f"live ingest meanwhile: {sent:,} readings acknowledged, {sent / secs / 1e3:.0f} k readings/s")
print(f"API probe (one sensor-day of 1-minute windows): {len(lat)} answers, p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, "
      f"{errors} errors")
print(f"aggregator RSS peak during the replay: {int(rss) / 1024:.1f} MiB")
PY
