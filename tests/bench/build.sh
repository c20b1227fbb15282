#!/usr/bin/env bash
# Builds the binaries the agent benches run and prints the directory that holds all three.
#
#   BIN=$(tests/bench/build.sh [target_dir=target/bench])
#
# The agent as gateways get it: built alone (as `cargo deb` and the ARM builds make it; built together
# with the aggregator, Cargo would unify the features of the dependencies they share) in the `edge`
# profile, for size, with fat LTO as shipped. The aggregator and the simulator only feed and count
# its readings: release builds without LTO (16 codegen units), minutes faster to make. Their own
# target directory keeps these builds from replacing the release builds the demo runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${1:-$ROOT/target/bench}
cd "$ROOT"
cargo build --profile edge --bins --quiet --target-dir "$TARGET" -p tributary-agent >&2
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release --bins --quiet --target-dir "$TARGET" -p tributary-aggregator -p tributary-sim >&2
BIN=$TARGET/bench-bin
mkdir -p "$BIN"
ln -sf "$TARGET/edge/tributary-agent" "$BIN/tributary-agent"
ln -sf "$TARGET/release/tributary-aggregator" "$TARGET/release/tributary-sim" "$BIN/"
echo "$BIN"
