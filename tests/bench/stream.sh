#!/usr/bin/env bash
# The live stream under load: what 100 Server-Sent-Events clients cost the aggregator.
#
#   tests/bench/stream.sh [clients=100] [devices=3334] [seconds=30] [max_readings=2000000]
#
# Part 1, paced (the issue's case): `tributary-sim mqtt` plays `devices` devices, one message of 3
# readings per device and second (10,000 readings/s), into an agent's embedded broker; the agent
# forwards to a release aggregator. Measured over `seconds` once warm, with 0 and then `clients`
# unfiltered `curl -N /api/v1/stream` clients: readings/s made visible, aggregator CPU per reading,
# and the readings each client received.
# Part 2, unpaced: `tributary-sim load` sends `max_readings` as fast as the aggregator takes them,
# with 0 and `clients` clients: the rate at which they become visible (ingest start -> processor
# caught up), so the ratio is how much the clients slow ingest at its limit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CLIENTS=${1:-100}; DEVICES=${2:-3334}; SECONDS_=${3:-30}; MAX=${4:-2000000}
cd "$ROOT"
BIN=${TRIBUTARY_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --bins --quiet
  BIN=$ROOT/target/release
fi
TMP=$(mktemp -d); PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap 'stop_all; rm -rf "$TMP"' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

start_aggregator() { # dir -> sets PORT, AGG
  PORT=$(free_port)
  mkdir -p "$1"
  cat >"$1/aggregator.toml" <<EOF
data_dir = "$1/data"
[http]
listen = "127.0.0.1:$PORT"
[[agents]]
id = "gw-1"
token = "secret-gw-1"
EOF
  RUST_LOG=warn "$BIN/tributary-aggregator" --config "$1/aggregator.toml" 2>"$1/aggregator.log" &
  AGG=$!; PIDS+=("$AGG")
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
}
metric() { curl -fs "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$AGG/stat"; }
start_clients() { # n, dir
  for i in $(seq 1 "$1"); do
    curl -sN "http://127.0.0.1:$PORT/api/v1/stream" -o "$2/client-$i.out" &
    PIDS+=("$!")
  done
  sleep 1
}
received() { # file -> readings in its reading events
  python3 - "$1" <<'PY'
import json, sys
n, kind = 0, None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("event:"):
        kind = line[6:].strip()
    elif line.startswith("data:") and kind == "reading":
        try: n += len(json.loads(line[5:])["readings"])
        except ValueError: pass
print(n)
PY
}

paced() { # clients
  local dir="$TMP/paced-$1"; start_aggregator "$dir"
  local mqtt; mqtt=$(free_port)
  cat >"$dir/agent.toml" <<EOF
agent_id = "gw-1"
data_dir = "$dir/agent-data"
[http]
listen = "127.0.0.1:$(free_port)"
[upstream]
url = "http://127.0.0.1:$PORT"
token = "secret-gw-1"
# The agent's own health readings would be counted with the load.
[health]
interval = "0s"
[mqtt]
mode = "embedded"
listen = "127.0.0.1:$mqtt"
EOF
  RUST_LOG=warn "$BIN/tributary-agent" --config "$dir/agent.toml" 2>"$dir/agent.log" & PIDS+=("$!")
  sleep 1
  [ "$1" -gt 0 ] && start_clients "$1" "$dir"
  RUST_LOG=warn "$BIN/tributary-sim" mqtt --broker "127.0.0.1:$mqtt" --devices "$DEVICES" --interval 1s \
    --connections 4 >"$dir/sim.log" 2>&1 & PIDS+=("$!")
  sleep 10  # warm: every device publishing, the pipeline caught up
  local o0 c0 t0 o1 c1 t1
  o0=$(metric tributary_processor_offset); c0=$(cpu_s); t0=$(date +%s.%N)
  sleep "$SECONDS_"
  o1=$(metric tributary_processor_offset); c1=$(cpu_s); t1=$(date +%s.%N)
  local lag; lag=$(metric tributary_processor_lag_readings)
  local got=0
  [ "$1" -gt 0 ] && got=$(received "$dir/client-1.out")
  local total; total=$(metric tributary_processor_offset)
  python3 - "$1" "$o0" "$o1" "$c0" "$c1" "$t0" "$t1" "$lag" "$got" "$total" <<'PY'
import sys
k, o0, o1, c0, c1, t0, t1, lag, got, total = sys.argv[1:]
n = int(o1) - int(o0)
print(f"paced, {k:>3} clients: {n / (float(t1) - float(t0)):,.0f} readings/s visible, aggregator CPU "
      f"{(float(c1) - float(c0)) * 1e6 / max(n, 1):.2f} us/reading, lag at the end {int(lag):,}"
      + (f", client 1 received {int(got):,} of the {int(total):,} readings processed while it listened" if int(k) else ""))
PY
  stop_all
}

unpaced() { # clients
  local dir="$TMP/unpaced-$1"; start_aggregator "$dir"
  [ "$1" -gt 0 ] && start_clients "$1" "$dir"
  local c0 t0 t1 c1
  c0=$(cpu_s); t0=$(date +%s.%N)
  "$BIN/tributary-sim" load --url "http://127.0.0.1:$PORT" --readings "$MAX" --sensors 1000 --connections 4 \
    >"$dir/load.out" 2>&1
  while [ "$(metric tributary_processor_offset)" -lt "$MAX" ]; do sleep 0.05; done
  t1=$(date +%s.%N); c1=$(cpu_s)
  local got=0
  [ "$1" -gt 0 ] && got=$(received "$dir/client-1.out")
  python3 - "$1" "$MAX" "$t0" "$t1" "$c0" "$c1" "$got" <<'PY'
import sys
k, n, t0, t1, c0, c1, got = sys.argv[1:]
n = int(n)
print(f"unpaced, {k:>3} clients: {n / (float(t1) - float(t0)) / 1e6:.3f} M readings/s visible, aggregator CPU "
      f"{(float(c1) - float(c0)) * 1e6 / n:.2f} us/reading" + (f", client 1 received {int(got):,} readings" if int(k) else ""))
PY
  stop_all
}

paced 0
paced "$CLIENTS"
unpaced 0
unpaced "$CLIENTS"
