#!/usr/bin/env bash
# The agent's footprint under a steady gateway load: memory, CPU and flash writes per reading.
#
#   tests/bench/footprint.sh [seconds=60] [runs="mqtt mqtt1000 serial"]
#
# A fresh agent per run (forwarding to a real aggregator, its own health readings off, spool
# defaults) takes a steady 10,000 readings/s from about 1,000 sensors:
#   mqtt    `tributary-sim mqtt`: 1,000 devices, one reading per QoS-1 message (`--format object`),
#           a message every 100 ms each, over one MQTT connection (the simulator's default, as a
#           bridge of radio sensors would publish; FOOTPRINT_CONNECTIONS=k for k) to the agent's
#           embedded broker;
#   mqtt1000  the same over 1,000 connections: a connection per device, as sensors that speak
#           MQTT themselves connect;
#   serial  8 serial ports (socat pty pairs), each `tributary-sim serial --format frames` playing
#           42 devices of 3 sensors a sample every 100 ms at 921,600 baud: 8 x 42 x 3 x 10 = 10,080
#           readings/s from 1,008 sensors.
# After a warm-up (10 s: connections, the spool's start, the forwarder's first exchanges) it measures
# for `seconds`, then stops the load and waits for every reading at the aggregator. Prints, per run:
#   - peak RSS (VmHWM: over the whole run, start-up and warm-up included) and RSS at the end of the
#     window, with its split (smaps_rollup: anonymous, i.e. heap and stacks, and file-backed, i.e.
#     the binary's text and SQLite's shared memory);
#   - CPU per reading: the agent's utime + stime over the window / readings it accepted in it, and
#     by thread (where the time goes);
#   - bytes written to disk per reading (/proc/<pid>/io write_bytes over the window: what the flash sees);
#   - readings delivered: accepted by the agent in the window, and counted by the aggregator's API
#     over the run against what the simulators say they sent;
# and the stripped binary's size.
#
# The binaries: tests/bench/build.sh's (the agent as shipped: the `edge` profile, built for size),
# into target/bench (BENCH_TARGET_DIR), unless TRIBUTARY_BIN=<dir> names a directory holding
# tributary-agent, tributary-aggregator and tributary-sim. The size printed is the agent's after
# `strip`, whatever the build.
# Extra agent config lines: FOOTPRINT_AGENT_TOML (appended at the top level, before any table),
# e.g. FOOTPRINT_AGENT_TOML='[runtime]\nworker_threads = 4' (printf escapes).
# Needs: python3, curl, socat (serial run), binutils (strip).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SECS=${1:-60}; RUNS=${2:-mqtt mqtt1000 serial}
WARM=${FOOTPRINT_WARMUP:-10}
CONNS=${FOOTPRINT_CONNECTIONS:-1}
cd "$ROOT"
if [ -n "${TRIBUTARY_BIN:-}" ]; then
  BIN=$TRIBUTARY_BIN; BUILD="binaries from $BIN"
else
  BIN=$("$ROOT/tests/bench/build.sh" "${BENCH_TARGET_DIR:-$ROOT/target/bench}")
  BUILD="the agent in the edge profile, as shipped"
fi
. "$ROOT/tests/bench/common.sh"

api_count() { curl -fs "http://127.0.0.1:$AP/api/v1/agents" | python3 -c 'import json,sys; print(sum(a["readings"] for a in json.load(sys.stdin)))'; }
metric() { curl -fs "http://127.0.0.1:$HP/metrics" | awk -v k="$1" '$1 == k { printf "%d", $2 }'; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
rollup_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/smaps_rollup"; }
threads() { # pid: "comm ticks" per thread
  for t in /proc/"$1"/task/*; do printf '%s %s\n' "$(tr ' ' '_' <"$t/comm")" "$(awk '{print $14+$15}' "$t/stat")"; done; }

cp "$(readlink -f "$BIN/tributary-agent")" "$TMP/agent-stripped"
SIZE=$(strip "$TMP/agent-stripped" 2>/dev/null && stat -c %s "$TMP/agent-stripped" || echo 0); rm "$TMP/agent-stripped"

start_aggregator

# Each run's agent (common.sh's start_agent) with FOOTPRINT_AGENT_TOML at its top level.
agent_top() { printf '%b' "${FOOTPRINT_AGENT_TOML:-}"; }

# Samples per device for warm-up + window + a few seconds more, at 10 a second.
COUNT=$(((WARM + SECS + 3) * 10))

measure() { # label, readings the load sends in all, the load's pids...
  local label=$1 sent=$2; shift 2
  local base=$BASE
  sleep "$WARM"
  local b0 r0 c0 t0 b1 r1 c1 t1
  threads "$AGENT" >"$TMP/threads0"
  b0=$(write_bytes "$AGENT"); r0=$(metric tributary_agent_readings_accepted_total); c0=$(cpu_ticks "$AGENT"); t0=$(date +%s.%N)
  sleep "$SECS"
  b1=$(write_bytes "$AGENT"); r1=$(metric tributary_agent_readings_accepted_total); c1=$(cpu_ticks "$AGENT"); t1=$(date +%s.%N)
  threads "$AGENT" >"$TMP/threads1"
  local hwm rss anon file
  hwm=$(status_kib "$AGENT" VmHWM); rss=$(status_kib "$AGENT" VmRSS)
  anon=$(rollup_kib "$AGENT" Anonymous); file=$(python3 -c "print($(rollup_kib "$AGENT" Rss) - $anon)")
  local nthreads; nthreads=$(ls "/proc/$AGENT/task" | wc -l)
  # FOOTPRINT_SMAPS=<prefix>: keep the agent's memory map at the end (<prefix>-<run>.smaps), to see
  # which mappings hold the RSS.
  [ -z "${FOOTPRINT_SMAPS:-}" ] || cat "/proc/$AGENT/smaps" >"$FOOTPRINT_SMAPS-${label%%:*}.smaps"
  wait "$@" 2>/dev/null || true
  for _ in $(seq 600); do [ "$(($(api_count) - base))" -ge "$sent" ] && break; sleep 0.1; done
  local got=$(($(api_count) - base))
  local waits rejected
  waits=$(metric tributary_agent_broker_backlog_waits_total)
  rejected=$(curl -fs "http://127.0.0.1:$HP/metrics" | awk '/^tributary_agent_(serial_)?rejected_total/ {n += $2} END {printf "%d", n}')
  python3 - "$label" "$hwm" "$rss" "$anon" "$file" "$((r1 - r0))" "$((c1 - c0))" "$(getconf CLK_TCK)" "$((b1 - b0))" \
    "$t0" "$t1" "$got" "$sent" "$nthreads" "${waits:-0}" "${rejected:-0}" <<'PY'
import sys
a = sys.argv[1:]
label = a[0]; hwm, rss, anon, file, n, ticks, hz, wb = map(int, a[1:9]); t0, t1 = map(float, a[9:11])
got, sent, nthreads, waits, rejected = map(int, a[11:16])
n = max(n, 1)
print(f"{label}: {n} readings in {t1 - t0:.1f} s ({n / (t1 - t0):,.0f}/s), {nthreads} threads")
print(f"  peak RSS (VmHWM)      {hwm / 1024:6.2f} MiB")
print(f"  RSS at the end        {rss / 1024:6.2f} MiB  (anonymous {anon / 1024:.2f}, file-backed {file / 1024:.2f})")
print(f"  CPU per reading       {ticks / hz / n * 1e6:6.2f} us  ({100 * ticks / hz / (t1 - t0):.0f}% of a core)")
print(f"  written per reading   {wb / n:6.1f} B")
print(f"  delivered             {got} of {sent} sent reached the aggregator; clients slowed by the agent (broker waits) {waits}, rejected {rejected}")
PY
  echo "  agent CPU by thread over the window:"
  join -a2 <(awk '{c[$1]+=$2} END {for (k in c) print k, c[k]}' "$TMP/threads0" | sort) \
    <(awk '{c[$1]+=$2} END {for (k in c) print k, c[k]}' "$TMP/threads1" | sort) \
    | awk -v n="$((r1 - r0))" -v hz="$(getconf CLK_TCK)" '{d = $NF - (NF == 3 ? $2 : 0); if (d > 0) printf "    %-20s %6.2f s %6.2f us/reading\n", $1, d / hz, d / hz / n * 1e6}' \
    | sort -k2 -nr
  kill -TERM "$AGENT"; wait "$AGENT" 2>/dev/null || true
}

run_mqtt() { # connections
  local conns=$1
  start_agent "" "$(agent_top)"
  BASE=$(api_count)
  "$BIN/tributary-sim" mqtt --broker "127.0.0.1:$MP" --devices 1000 --interval 100ms --count "$COUNT" \
    --format object --connections "$conns" --client-id footprint >"$TMP/sim-mqtt.out" 2>>"$TMP/sim.log" &
  local sim=$!; PIDS+=("$sim")
  measure "mqtt: 1000 devices x 10 msg/s, $conns connection(s)" $((1000 * COUNT)) "$sim"
}

run_serial() {
  local ports="" p pids=()
  for p in $(seq 8); do
    socat pty,raw,echo=0,link="$TMP/tty$p-agent" pty,raw,echo=0,link="$TMP/tty$p-device" 2>>"$TMP/socat.log" &
    PIDS+=($!)
    ports+=$(printf '[[serial]]\npath = "%s"\nformat = "frames"\nbaud = 921600\n' "$TMP/tty$p-agent")$'\n'
  done
  for _ in $(seq 100); do [ -e "$TMP/tty8-agent" ] && break; sleep 0.05; done
  start_agent "$ports" "$(agent_top)"
  for _ in $(seq 100); do [ "$(metric 'tributary_agent_serial_open{port="tty8-agent"}')" = 1 ] && break; sleep 0.05; done
  BASE=$(api_count)
  for p in $(seq 8); do
    "$BIN/tributary-sim" serial --port "$TMP/tty$p-device" --format frames --baud 921600 --devices 42 \
      --interval 100ms --count "$COUNT" --seed "$p" >"$TMP/sim-serial$p.out" 2>>"$TMP/sim.log" &
    pids+=($!); PIDS+=($!)
  done
  measure "serial: 8 ports x 42 devices x 3 readings x 10/s" $((8 * 42 * 3 * COUNT)) "${pids[@]}"
}

echo "tributary $(git -C "$ROOT" rev-parse --short HEAD) (+ working tree), $BUILD, $(nproc) cores, $(date -u +%F)"
echo "agent binary, stripped: $(python3 -c "print(f'{$SIZE / 1048576:.2f}')") MiB"
for r in $RUNS; do
  case $r in
    mqtt) run_mqtt "$CONNS" ;;
    mqtt1000) run_mqtt 1000 ;;
    serial) run_serial ;;
    *) echo "runs: mqtt, mqtt1000, serial" >&2; exit 2 ;;
  esac
done
