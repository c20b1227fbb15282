#!/usr/bin/env bash
# Builds Tributary and starts the whole pipeline on its embedded defaults, in a fresh data dir:
# the aggregator, an agent with its embedded MQTT broker, and simulated sensors publishing to it.
# Prints the dashboard URL. Ctrl-C stops everything cleanly (sensors, then agent, then aggregator).
#
#   deploy/demo.sh                 # default ports 8080 (dashboard/API), 1883 (MQTT), 9101 (agent)
#   DEVICES=20 INTERVAL=200ms deploy/demo.sh
#
# A default port that is taken (say, by a system Mosquitto on 1883) is replaced by a free one.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-8}
INTERVAL=${INTERVAL:-1s}

echo "building (release)..."
cargo build --release --bins --quiet
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release

DIR=$(mktemp -d "${TMPDIR:-/tmp}/tributary-demo.XXXXXX")
PIDS=()

port_or_free() { # preferred port -> that port if free, else a free one
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
# As the servers bind (tokio sets SO_REUSEADDR): a port whose last connections are in TIME_WAIT,
# after a restart within a minute, is free, not taken.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}
wait_http() { # url, name, pid
  for _ in $(seq 100); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    kill -0 "$3" 2>/dev/null || { echo "$2 failed to start; its log:"; tail -n 20 "$DIR/$2.log"; exit 1; }
    sleep 0.1
  done
  echo "$2 did not become healthy; see $DIR/$2.log"; exit 1
}
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  # Sensors first, then the agent (it commits what it received), then the aggregator.
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "stopped; data and logs are in $DIR"
  exit 0
}
trap stop INT TERM EXIT

HTTP=$(port_or_free 8080); MQTT=$(port_or_free 1883); AGENT_HTTP=$(port_or_free 9101)

cat >"$DIR/aggregator.toml" <<EOF
data_dir = "$DIR/aggregator"
[http]
listen = "127.0.0.1:$HTTP"
[[agents]]
id = "gw-1"
token = "secret-gw-1"
EOF
cat >"$DIR/agent.toml" <<EOF
agent_id = "gw-1"
data_dir = "$DIR/agent"
[http]
listen = "127.0.0.1:$AGENT_HTTP"
[upstream]
url = "http://127.0.0.1:$HTTP"
token = "secret-gw-1"
[mqtt]
mode = "embedded"
listen = "127.0.0.1:$MQTT"
topics = ["sensors/#"]
EOF

# Each component runs in its own session, so Ctrl-C reaches only this script, which then stops them
# in order (a terminal would otherwise signal all of them at once).
setsid "$BIN/tributary-aggregator" --config "$DIR/aggregator.toml" >"$DIR/aggregator.log" 2>&1 &
AGGREGATOR=$!
wait_http "http://127.0.0.1:$HTTP/healthz" aggregator "$AGGREGATOR"
setsid "$BIN/tributary-agent" --config "$DIR/agent.toml" >"$DIR/agent.log" 2>&1 &
AGENT=$!
wait_http "http://127.0.0.1:$AGENT_HTTP/healthz" agent "$AGENT"
setsid "$BIN/tributary-sim" mqtt --broker "127.0.0.1:$MQTT" --devices "$DEVICES" --interval "$INTERVAL" >"$DIR/sim.log" 2>&1 &
SIM=$!
PIDS=("$SIM" "$AGENT" "$AGGREGATOR")

cat <<EOF

Tributary is running ($DEVICES simulated devices publishing every $INTERVAL).
  Dashboard:      http://127.0.0.1:$HTTP/
  API:            http://127.0.0.1:$HTTP/api/v1/sensors
  MQTT broker:    127.0.0.1:$MQTT  (try: mosquitto_pub -p $MQTT -t sensors/desk/temp -m 21.5)
  Agent metrics:  http://127.0.0.1:$AGENT_HTTP/metrics
  Data and logs:  $DIR
Press Ctrl-C to stop.
EOF

# Stay until Ctrl-C, or until a component exits on its own.
while kill -0 "$AGGREGATOR" 2>/dev/null && kill -0 "$AGENT" 2>/dev/null && kill -0 "$SIM" 2>/dev/null; do
  sleep 1
done
echo "a component stopped on its own; see the logs in $DIR"
