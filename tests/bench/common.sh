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
