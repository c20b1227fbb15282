#!/usr/bin/env bash
# Bytes the agent writes to its flash per reading, at 1, 10, 100 and 10,000 readings/s.
#
#   tests/bench/wear.sh [seconds_at_1_per_s=60] [policies="old default"] [rates="1 10 100 10000"]
#
# For each spool policy and rate: a fresh agent (embedded broker, forwarding to a real aggregator,
# its own health readings off) takes `tributary-sim mqtt` devices publishing one reading per QoS-1
# message (1/s: one sensor; 10/s and 100/s: 10 and 100 sensors at 1/s; 10,000/s: 100 sensors at
# 100/s). After a warm-up (a sixth of the time, at least 5 s: the spool's start, the forwarder's
# first exchange), it measures for a fixed time: 60 s at 1/s, 30 s at 10/s, 20 s at 100/s, 10 s at
# 10,000/s by default, all scaled by the first argument. The figure is the agent's /proc/<pid>/io
# write_bytes over that window divided by the readings it took in it: every page the agent dirtied,
# WAL frames, fsyncs, checkpoints, the WAL index (-shm) and the deletes of acknowledged blocks
# included, which is what the flash sees. The kernel counts a 4 KiB page when it goes from clean to
# dirty, so a page rewritten before it is written back (or fsync'ed) counts once. Then the publisher
# stops and the script checks that every reading reached the aggregator.
#
# Policies ([spool] keys), run in the order given:
#   old      commit_interval = "5ms", max_commit_interval = "5ms", sync_interval = "0s": every commit
#            fsync'ed, every reading its own commit when idle (the agent before max_commit_interval)
#   default  the agent's defaults (see deploy/agent.toml)
#   anything else: WEAR_SPOOL_<name> holds the [spool] lines, e.g.
#            WEAR_SPOOL_slow='max_commit_interval = "5s"' tests/bench/wear.sh 60 slow
# Needs: python3, curl. Builds the binaries first with tests/bench/build.sh (into target/bench unless
# WEAR_TARGET_DIR says otherwise; WEAR_NO_BUILD=1 uses what is there).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SECS=${1:-60}; POLICIES=${2:-old default}; RATES=${3:-1 10 100 10000}
TARGET=${WEAR_TARGET_DIR:-$ROOT/target/bench}
cd "$ROOT"
if [ -z "${WEAR_NO_BUILD:-}" ]; then
  "$ROOT/tests/bench/build.sh" "$TARGET" >/dev/null
fi
BIN=$TARGET/bench-bin
. "$ROOT/tests/bench/common.sh"

api_count() { curl -fs "http://127.0.0.1:$AP/api/v1/agents" | python3 -c 'import json,sys; print(sum(a["readings"] for a in json.load(sys.stdin)))'; }
metric() { curl -fs "http://127.0.0.1:$HP/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }

spool_keys() {
  case "$1" in
    old) printf 'commit_interval = "5ms"\nmax_commit_interval = "5ms"\nsync_interval = "0s"\n' ;;
    default) ;;
    *) local var="WEAR_SPOOL_$1"; [ -n "${!var:-}" ] || { echo "unknown policy $1: set $var" >&2; exit 2; }
       printf '%s\n' "${!var}" ;;
  esac
}

start_aggregator

# policy, rate, devices, interval between one device's messages, seconds measured
run() {
  local policy=$1 rate=$2 devices=$3 interval=$4 secs=$5
  local warm count
  warm=$(python3 -c "print(max(5, $secs // 6))")
  # A few seconds more than warm-up + window, so that the window ends while they still publish.
  count=$(python3 -c "print(max(1, round(($warm + $secs + 3) * $rate / $devices)))")
  local n=$((count * devices))
  start_agent "[spool]
$(spool_keys "$policy")"
  local agent=$AGENT
  sleep 1
  local base
  base=$(api_count)
  "$BIN/tributary-sim" mqtt --broker "127.0.0.1:$MP" --devices "$devices" --interval "$interval" \
    --count "$count" --format object --client-id "wear-$policy-$rate" >/dev/null 2>>"$TMP/sim.log" &
  local sim=$!
  sleep "$warm"
  local b0 r0 c0 b1 r1 c1
  b0=$(write_bytes "$agent"); r0=$(metric tributary_agent_readings_accepted_total); c0=$(metric tributary_agent_spool_commits_total)
  sleep "$secs"
  b1=$(write_bytes "$agent"); r1=$(metric tributary_agent_readings_accepted_total); c1=$(metric tributary_agent_spool_commits_total)
  wait "$sim" || true
  for _ in $(seq 600); do [ "$(($(api_count) - base))" -ge "$n" ] && break; sleep 0.1; done
  local got=$(($(api_count) - base))
  python3 -c "
b, r, c = $b1 - $b0, ${r1%.*} - ${r0%.*}, ${c1%.*} - ${c0%.*}
print(f'{\"$policy\":<8} {$rate:>6}/s  {b:>9} B written in {$secs} s, {r:>7} readings: {b / max(r, 1):>7.1f} B/reading, '
      f'{r / max(c, 1):>6.1f} readings/commit; {$got} of {$n} arrived')"
  kill -TERM "$agent"; wait "$agent" 2>/dev/null || true
}

echo "tributary $(git -C "$ROOT" rev-parse --short HEAD) (+ working tree), $(nproc) cores, spool on $(df --output=source "$TMP" | tail -1)"
for policy in $POLICIES; do
  for rate in $RATES; do
    case $rate in
      1) run "$policy" 1 1 1s "$SECS" ;;
      10) run "$policy" 10 10 1s "$(python3 -c "print(max(1, $SECS // 2))")" ;;
      100) run "$policy" 100 100 1s "$(python3 -c "print(max(1, $SECS // 3))")" ;;
      10000) run "$policy" 10000 100 10ms "$(python3 -c "print(max(1, $SECS // 6))")" ;;
      *) echo "rates: 1, 10, 100 or 10000" >&2; exit 2 ;;
    esac
  done
done
