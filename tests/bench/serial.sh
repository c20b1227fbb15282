#!/usr/bin/env bash
# How fast one agent takes readings from one serial port, and what a reading costs it in CPU.
#
#   tests/bench/serial.sh [samples_per_device=20000] [devices=8]
#
# A socat pseudo-terminal pair stands in for the cable; `tributary-sim serial` plays `devices`
# devices (3 readings a sample) into one end, the agent (as shipped, spool synchronous=FULL,
# forwarding to a real aggregator) reads the other. For each format (frames, lines), twice:
# - at 115200 baud: the simulator paces its writes to the wire rate (10 bits a byte), as a UART would;
#   a short run (samples / 100), since the wire, not the agent, sets the rate;
# - unthrottled: the simulator writes as fast as the pty takes bytes.
# Prints readings/s at the agent (first byte to last reading taken, from its metrics) and the agent's
# CPU time per reading (utime + stime from /proc, spool commits and forwarding included).
# Needs: socat, python3, curl. Builds the binaries first with tests/bench/build.sh (the agent as
# shipped), unless TRIBUTARY_BIN=<dir>.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
S=${1:-20000}; D=${2:-8}
cd "$ROOT"
# TRIBUTARY_BIN=dir uses binaries already built there (e.g. without LTO, faster to build).
BIN=${TRIBUTARY_BIN:-}
if [ -z "$BIN" ]; then
  BIN=$("$ROOT/tests/bench/build.sh")
fi
. "$ROOT/tests/bench/common.sh"

metric() { curl -fs "http://127.0.0.1:$HP/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
now() { date +%s.%N; }

start_aggregator

socat pty,raw,echo=0,link="$TMP/frames-agent" pty,raw,echo=0,link="$TMP/frames-device" 2>>"$TMP/socat.log" &
PIDS+=($!)
socat pty,raw,echo=0,link="$TMP/lines-agent" pty,raw,echo=0,link="$TMP/lines-device" 2>>"$TMP/socat.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -e "$TMP/frames-agent" ] && [ -e "$TMP/lines-agent" ] && break; sleep 0.05; done

start_agent '[spool]
sync = "full"
[[serial]]
path = "'"$TMP"'/frames-agent"
format = "frames"
[[serial]]
path = "'"$TMP"'/lines-agent"
format = "lines"'
for _ in $(seq 100); do [ "$(metric 'tributary_agent_serial_open{port="lines-agent"}')" = 1 ] && break; sleep 0.05; done

echo "tributary $(git -C "$ROOT" rev-parse --short HEAD), $D devices x 3 readings a sample, spool synchronous=FULL, $(nproc) cores"
run() { # format, samples, label, sim args...
  local format=$1 samples=$2 label=$3; shift 3
  local port="$format-agent" key before want c0 t0 t1 c1 got
  key="tributary_agent_serial_readings_total{port=\"$port\"}"
  before=$(metric "$key"); want=$((${before%.*} + samples * D * 3))
  c0=$(cpu_ticks "$AGENT"); t0=$(now)
  "$BIN/tributary-sim" serial --port "$TMP/$format-device" --format "$format" --devices "$D" --interval 0 \
    --count "$samples" "$@" >"$TMP/sim.out" 2>>"$TMP/sim.log"
  for _ in $(seq 6000); do got=$(metric "$key"); [ "${got%.*}" -ge "$want" ] && break; sleep 0.01; done
  t1=$(now); c1=$(cpu_ticks "$AGENT")
  python3 - "$format" "$label" "$((${got%.*} - ${before%.*}))" "$t0" "$t1" "$c0" "$c1" "$(getconf CLK_TCK)" <<'PY'
import sys
fmt, label, n, t0, t1, c0, c1, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:])
secs, cpu = t1 - t0, (c1 - c0) / hz
print(f"{fmt:6} {label:12} {n:8d} readings in {secs:6.2f} s: {n / secs:9.0f} readings/s, agent CPU {cpu * 1e6 / n:6.2f} us/reading ({100 * cpu / secs:3.0f}% of a core)")
PY
  sed 's/^/         sim: /' "$TMP/sim.out"
}
for format in frames lines; do
  run "$format" $((S / 100)) "115200 baud"
  run "$format" "$S" "unthrottled" --unpaced
done
rej=$(curl -fs "http://127.0.0.1:$HP/metrics" | awk '/^tributary_agent_serial_rejected_total/ && $2 != 0')
echo "rejections: ${rej:-none}"
