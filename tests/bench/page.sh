#!/usr/bin/env bash
# The dashboard page with a large fleet: 10,000 sensors of 100 agents, and 1,000 of 10 for scale.
#
#   tests/bench/page.sh [loads=10] [agents=100] [small_agents=10]
#
# For each fleet size, a release aggregator whose config lists the agents (gw-001 ...) gets 100
# sensors per agent, 6 readings each over the last hour, posted as JSON batches with each agent's
# token; readings keep coming while it measures (each sensor every 10 s). Headless Chromium
# (Debian's, via playwright-core: `npm ci --prefix tests/browser`) then loads the fleet view and
# the sensor list `loads` times each, cold (a new browser context: empty cache), and prints p50
# and max of: navigation start -> all agents listed / the first page of sensors shown with values
# (the bar: under 1 s), -> network quiet (500 ms without a request besides the event stream),
# bytes transferred, JS heap after a GC, DOM nodes; then main-thread time and event-stream bytes
# per second while each view follows the live readings. See tests/browser/page_bench.mjs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOADS=${1:-10}; AGENTS=${2:-100}; SMALL=${3:-10}
cd "$ROOT"
[ -d tests/browser/node_modules/playwright-core ] || npm ci --prefix tests/browser --silent
# TRIBUTARY_BIN=dir uses binaries already built there (e.g. without LTO, faster to build).
BIN=${TRIBUTARY_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --bins --quiet
  BIN=$ROOT/target/release
fi
TMP=$(mktemp -d); AGG=""
cleanup() { [ -n "$AGG" ] && kill "$AGG" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

run() { # agents
  local dir="$TMP/fleet-$1"; mkdir -p "$dir"
  local port; port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  {
    echo "data_dir = \"$dir/data\""
    echo "[http]"
    echo "listen = \"127.0.0.1:$port\""
    node --input-type=module -e "import { agentsToml } from './tests/browser/fleet.mjs'; process.stdout.write(agentsToml($1));"
  } >"$dir/aggregator.toml"
  RUST_LOG=warn "$BIN/tributary-aggregator" --config "$dir/aggregator.toml" 2>"$dir/aggregator.log" &
  AGG=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  node tests/browser/page_bench.mjs "http://127.0.0.1:$port" "$1" "$LOADS"
  kill "$AGG"; wait "$AGG" 2>/dev/null || true; AGG=""
  echo
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run "$AGENTS"
run "$SMALL"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
