# Sourced by the bench scripts: a temporary directory removed on exit with every process whose pid
# the script adds to PIDS (SIGKILLed and reaped), and the small probes they share.
TMP=$(mktemp -d); PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && { kill -9 "$p"; wait "$p"; } 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "$1 not up"; exit 1; }
# Bytes a process has caused to be written to storage, and its CPU time in clock ticks.
write_bytes() { awk '/^write_bytes/ { print $2 }' "/proc/$1/io"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# An aggregator from $BIN for agent gw-1 (token secret-gw-1), data in $TMP/aggregator, on port $AP
# (a free one unless set); sets AGG to its pid, once it answers.
start_aggregator() {
  AP=${AP:-$(free_port)}
  cat >"$TMP/aggregator.toml" <<EOT
data_dir = "$TMP/aggregator"
[http]
listen = "127.0.0.1:$AP"
[[agents]]
id = "gw-1"
token = "secret-gw-1"
EOT
  "$BIN/tributary-aggregator" --config "$TMP/aggregator.toml" >>"$TMP/aggregator.log" 2>&1 &
  AGG=$!; PIDS+=("$AGG"); wait_http "http://127.0.0.1:$AP/healthz"
}

# A fresh agent from $BIN (gw-1, embedded broker on $MP, HTTP on $HP: free ports chosen here),
# forwarding to the aggregator on $AP, its own health readings off (they would be counted with the
# load), data in $TMP/agent (removed first). $1: tables appended to its configuration; $2: top-level
# keys (before any table). Sets AGENT to its pid once it answers.
start_agent() {
  HP=$(free_port); MP=$(free_port)
  rm -rf "$TMP/agent"
  cat >"$TMP/agent.toml" <<EOT
agent_id = "gw-1"
data_dir = "$TMP/agent"
${2:-}
[http]
listen = "127.0.0.1:$HP"
[upstream]
url = "http://127.0.0.1:$AP"
token = "secret-gw-1"
[health]
interval = "0s"
[mqtt]
mode = "embedded"
listen = "127.0.0.1:$MP"
${1:-}
EOT
  "$BIN/tributary-agent" --config "$TMP/agent.toml" >>"$TMP/agent.log" 2>&1 &
  AGENT=$!; PIDS+=("$AGENT"); wait_http "http://127.0.0.1:$HP/healthz"
}
