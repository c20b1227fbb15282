#!/usr/bin/env bash
# Tributary's end-to-end benchmark, beside Fluent Bit's in the same run.
#
#   tests/bench/pipeline.sh [publishers=4] [messages_each=50000]
#
# 1. The same workload as ../shared/peers/fluent-bit/bench.sh: `mosquitto_pub -l` processes publish
#    QoS-1 messages, one reading each ({"seq": N, "value": V, "ts": T}), to the agent's embedded broker;
#    the agent spools them (SQLite, synchronous=FULL) and forwards them to the aggregator; the clock stops
#    when the aggregator's API counts the last one. Prints readings/s, the agent's peak RSS, bytes it wrote
#    per reading, and CPU per reading by process and by agent thread (where the time goes). Then the
#    ceiling: the same publishers against a Mosquitto that does nothing else, and the ratio.
# 2. The same outage + SIGKILL check as Fluent Bit's bench: aggregator down, 20,000 readings published,
#    agent SIGKILLed, both restarted: lost and doubled readings.
# 3. tributary-sim's own rate with multi-field messages (to the agent's broker), and the aggregator's
#    ingest rate from postcard batches (tributary-sim load).
# 4. Fluent Bit's bench (FLUENT_BIT_BENCH, default ../shared/peers/fluent-bit/bench.sh), then both side by side.
# Needs: mosquitto-clients, python3, curl. Builds the binaries first with tests/bench/build.sh (the
# agent as shipped), unless TRIBUTARY_BIN=<dir> names a directory holding tributary-agent,
# tributary-aggregator and tributary-sim.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
P=${1:-4}; M=${2:-50000}; N=$((P * M))
FB_BENCH=${FLUENT_BIT_BENCH:-$ROOT/../shared/peers/fluent-bit/bench.sh}
cd "$ROOT"
if [ -n "${TRIBUTARY_BIN:-}" ]; then
  BIN=$TRIBUTARY_BIN
else
  BIN=$("$ROOT/tests/bench/build.sh")
fi
. "$ROOT/tests/bench/common.sh"

api_count() { curl -fs "http://127.0.0.1:$AP/api/v1/agents" | python3 -c 'import json,sys; print(sum(a["readings"] for a in json.load(sys.stdin)))'; }
wait_count() { # n, seconds
  for _ in $(seq $(($2 * 20))); do [ "$(api_count)" -ge "$1" ] && return 0; sleep 0.05; done; return 1; }
cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat"; }
gen() { # first_seq, n: the peer bench's payloads
  python3 -c 'import sys
a, n = int(sys.argv[1]), int(sys.argv[2])
w = sys.stdout.write
for i in range(a, a + n): w("{\"seq\": %d, \"value\": %d.5, \"ts\": %d}\n" % (i, i % 100, 1764000000000 + i))' "$1" "$2"; }

start_pipeline_agent() { # common.sh's, but on fixed ports (restarted for the outage) and retrying every second
  cat >"$TMP/agent.toml" <<EOF
agent_id = "gw-1"
data_dir = "$TMP/agent"
[http]
listen = "127.0.0.1:$HP"
[upstream]
url = "http://127.0.0.1:$AP"
token = "secret-gw-1"
retry_max = "1s"
# The agent's own health readings would be counted with the load.
[health]
interval = "0s"
[mqtt]
mode = "embedded"
listen = "127.0.0.1:$MP"
[spool]
sync = "full"
EOF
  "$BIN/tributary-agent" --config "$TMP/agent.toml" >>"$TMP/agent.log" 2>&1 &
  AGENT=$!; PIDS+=("$AGENT"); wait_http "http://127.0.0.1:$HP/healthz"
}

echo "tributary $(git -C "$ROOT" rev-parse --short HEAD), spool synchronous=FULL, $P publishers x $M QoS-1 messages, $(nproc) cores"
AP=$(free_port); HP=$(free_port); MP=$(free_port)
start_aggregator; start_pipeline_agent
for p in $(seq "$P"); do gen $((p * 1000000)) "$M" >"$TMP/pub$p"; done
t0=$(date +%s.%N)
PUBS=()
for p in $(seq "$P"); do mosquitto_pub -h 127.0.0.1 -p "$MP" -q 1 -t "sensors/room$p/temp" -l <"$TMP/pub$p" & PUBS+=($!); done
wait_count "$N" 300 || echo "only $(api_count) of $N arrived"
t1=$(date +%s.%N)
wait "${PUBS[@]}" 2>/dev/null || true
got=$(api_count)
T_RATE=$(python3 -c "print(round($got / ($t1 - $t0)))")
T_RSS=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$AGENT/status")
T_BPR=$(awk -v n="$N" '/^write_bytes/ {printf "%.1f", $2/n}' "/proc/$AGENT/io")
A_BPR=$(awk -v n="$N" '/^write_bytes/ {printf "%.1f", $2/n}' "/proc/$AGG/io")
echo "throughput: $got readings in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s = $T_RATE readings/s end to end (publish -> agent spool -> aggregator log -> API)"
# The ceiling: the same publishers and messages against a broker that does nothing else (Mosquitto,
# no subscriber), timed until every publisher has its last PUBACK and exits.
CP=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$CP" >"$TMP/ceiling.conf"
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$TMP/ceiling.conf" >"$TMP/ceiling.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do mosquitto_pub -h 127.0.0.1 -p "$CP" -t probe -m 1 2>/dev/null && break; sleep 0.05; done
c0=$(date +%s.%N)
PUBS=()
for p in $(seq "$P"); do mosquitto_pub -h 127.0.0.1 -p "$CP" -q 1 -t "sensors/room$p/temp" -l <"$TMP/pub$p" & PUBS+=($!); done
wait "${PUBS[@]}"
c1=$(date +%s.%N)
C_RATE=$(python3 -c "print(round($N / ($c1 - $c0)))")
echo "ceiling: the same publishers against a Mosquitto that does nothing else: $C_RATE messages/s; Tributary end to end is $(python3 -c "print(f'{$T_RATE / $C_RATE:.2f}')") of it"
echo "agent: peak RSS $T_RSS MiB, $T_BPR B written per reading; aggregator: $A_BPR B written per reading (log + serving store)"
T_CPU=$(python3 -c "print(f'{$(cpu_s "$AGENT") / $N * 1e6:.1f}')")
echo "CPU per reading: agent $T_CPU us, aggregator $(python3 -c "print(f'{$(cpu_s "$AGG") / $N * 1e6:.1f}')") us"
echo "agent CPU by thread (where the time goes):"
for t in /proc/"$AGENT"/task/*; do
  printf '%s %s\n' "$(tr ' ' '_' <"$t/comm")" "$(awk '{print $14+$15}' "$t/stat")"
done | awk '{c[$1]+=$2} END {for (k in c) if (c[k] > 0) printf "  %-22s %6.2f s\n", k, c[k]/100}' | sort -k2 -nr
echo "spool: $(curl -fs "http://127.0.0.1:$HP/metrics" | awk '/^tributary_agent_spool_commits_total/ {c=$2} /^tributary_agent_readings_spooled_total/ {r=$2} END {printf "%d commits, %.0f readings per block on average", c, r/c}')"
kill -TERM "$AGENT" "$AGG"; wait "$AGENT" "$AGG" 2>/dev/null || true

# Outage + SIGKILL, as in the peer's bench: every acknowledged reading should arrive exactly once.
rm -rf "$TMP/agent" "$TMP/aggregator"
AP=$(free_port); HP=$(free_port); MP=$(free_port)
start_pipeline_agent
gen 0 20000 | mosquitto_pub -h 127.0.0.1 -p "$MP" -q 1 -t sensors/crash/temp -l
sleep 0.5
kill -9 "$AGENT"; wait "$AGENT" 2>/dev/null || true
start_aggregator; start_pipeline_agent
wait_count 20000 60 || true
sleep 2
got=$(api_count)
T_LOST=$((20000 > got ? 20000 - got : 0)); T_DOUBLED=$((got > 20000 ? got - 20000 : 0))
echo "outage + SIGKILL: 20000 acknowledged, $got arrived, $T_LOST lost, $T_DOUBLED doubled"

echo "simulator, multi-field messages (3 readings each, one rumqttc connection, 1,000 in flight) to the agent's broker:"
base=$(api_count); t0=$(date +%s.%N)
SIM_LINE=$("$BIN/tributary-sim" mqtt --broker "127.0.0.1:$MP" --devices 4 --interval 0 --count 50000 --format multi 2>/dev/null | tail -n 1)
echo "  $SIM_LINE"
wait_count $((base + 600000)) 120 || echo "  only $(($(api_count) - base)) of 600000 arrived"
t1=$(date +%s.%N)
echo "  end to end (to the API): $(python3 -c "print(f'{($(api_count) - $base) / ($t1 - $t0):,.0f}')") readings/s"
kill -TERM "$AGENT" "$AGG"; wait "$AGENT" "$AGG" 2>/dev/null || true

rm -rf "$TMP/aggregator"; AP=$(free_port); start_aggregator
echo "aggregator ingest, postcard batches (4 connections, 4 x 5,000-reading blocks per request):"
LOAD_LINE=$("$BIN/tributary-sim" load --url "http://127.0.0.1:$AP" --readings 2000000 2>/dev/null | tail -n 1)
echo "  $LOAD_LINE"
kill -TERM "$AGG"; wait "$AGG" 2>/dev/null || true

echo
if [ ! -x "$FB_BENCH" ]; then echo "no Fluent Bit bench at $FB_BENCH: set FLUENT_BIT_BENCH"; exit 0; fi
echo "--- Fluent Bit, same workload, same machine, same run ---"
"$FB_BENCH" "" full "$P" "$M" | tee "$TMP/fb.out"
F_RATE=$(sed -n 's/.*= \([0-9,]*\) readings\/s.*/\1/p' "$TMP/fb.out" | tr -d ,)
F_RSS=$(sed -n 's/.*peak RSS \([0-9.]*\) MiB.*/\1/p' "$TMP/fb.out")
F_BPR=$(sed -n 's/.*(\([0-9.]*\) B\/reading).*/\1/p' "$TMP/fb.out")
F_OUT=$(sed -n 's/^outage + SIGKILL: .*arrived, \(.*\)$/\1/p' "$TMP/fb.out")
F_CPU=$(sed -n 's/^CPU: fluent-bit \([0-9.]*\) s.*/\1/p' "$TMP/fb.out" | python3 -c "import sys; print(f'{float(sys.stdin.read()) / $N * 1e6:.1f}')")
echo
printf '%-34s %16s %16s %10s\n' "" "Tributary" "Fluent Bit" "ratio"
printf '%-34s %16s %16s %10s\n' "readings/s end to end" "$T_RATE" "$F_RATE" "$(python3 -c "print(f'{$T_RATE / $F_RATE:.2f}x')")"
printf '%-34s %16s %16s\n' "  of the ceiling ($C_RATE/s)" "$(python3 -c "print(f'{$T_RATE / $C_RATE:.2f}')")" "$(python3 -c "print(f'{$F_RATE / $C_RATE:.2f}')")"
printf '%-34s %16s %16s %10s\n' "agent peak RSS (MiB)" "$T_RSS" "$F_RSS" "$(python3 -c "print(f'{$T_RSS / $F_RSS:.2f}x')")"
printf '%-34s %16s %16s %10s\n' "bytes written per reading" "$T_BPR" "$F_BPR" "$(python3 -c "print(f'{$T_BPR / $F_BPR:.2f}x')")"
printf '%-34s %16s %16s %10s\n' "agent CPU per reading (us)" "$T_CPU" "$F_CPU" "$(python3 -c "print(f'{$T_CPU / $F_CPU:.2f}x')")"
printf '%-34s %16s %16s\n' "outage + SIGKILL (of 20,000)" "$T_LOST lost, $T_DOUBLED doubled" "$F_OUT"
