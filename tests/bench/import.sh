#!/usr/bin/env bash
# `tributary-aggregator import` from CSV: readings per second into the log, and CPU per reading.
#
#   tests/bench/import.sh [readings=2000000] [sensors=1000]
#
# Writes a CSV like ../shared/peers/processing's (sensor_id,ts,value over 24 h, values with a few
# decimals), imports it into an empty data directory (timed, CPU from rusage), imports it again
# (every block a duplicate), and prints both with the log's bytes per reading.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${1:-2000000}; SENSORS=${2:-1000}
cd "$ROOT"
BIN=${TRIBUTARY_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release --bins --quiet
  BIN=$ROOT/target/release
fi
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
python3 - "$N" "$SENSORS" "$TMP/readings.csv" <<'PY'
import random, sys
n, sensors, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(1)
t0, span = 1_764_000_000_000, 86_400_000
with open(out, "w") as f:
    f.write("sensor_id,ts,value\n")
    for i in range(n):
        s = rng.randrange(sensors)
        f.write(f"s-{s:05d},{t0 + i * span // n},{20 + s % 7 + rng.random() * 5:.3f}\n")
PY
cat >"$TMP/aggregator.toml" <<EOF
data_dir = "$TMP/data"
[[agents]]
id = "gw-1"
token = "secret-gw-1"
EOF
run() { # label
  /usr/bin/time -f "%e %U %S %M" -o "$TMP/time" "$BIN/tributary-aggregator" import -c "$TMP/aggregator.toml" \
    --agent history "$TMP/readings.csv" >"$TMP/out"
  read -r wall user sys rss <"$TMP/time"
  python3 - "$1" "$N" "$wall" "$user" "$sys" "$rss" "$(cat "$TMP/out")" <<'PY'
import sys
label, n, wall, user, sys_, rss, out = sys.argv[1:]
n, wall, cpu = int(n), float(wall), float(user) + float(sys_)
print(f"{label}: {n:,} CSV readings in {wall:.2f} s = {n / wall / 1e6:.2f} M readings/s, "
      f"CPU {cpu * 1e6 / n:.2f} us/reading, peak RSS {int(rss) / 1024:.1f} MiB")
print("  " + out.splitlines()[0])
PY
}
run "first import"
run "same file again"
python3 -c "import os,sys; n=int(sys.argv[1]); b=os.path.getsize(sys.argv[2]); print(f'log: {b / n:.2f} B per reading')" "$N" "$TMP/data/log.db"
