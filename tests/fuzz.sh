#!/usr/bin/env bash
# Fuzzes every decoder of outside input with cargo-fuzz (libFuzzer), SECONDS_PER_TARGET each
# (default 60): block decode, postcard batch, JSON batch, the aggregator's ingest decoders and the
# agent's MQTT payload decoder. Not part of `cargo test --workspace` or .ci/run.
#
#   tests/fuzz.sh [seconds-per-target] [target...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz passes -Z flags to rustc;
# RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them. Built with --sanitizer none: the code is
# safe Rust and the fuzzers look for panics and broken invariants (the asserts in
# fuzz/fuzz_targets/), and a sanitizer would only slow every run down. Overflow checks stay on (-a).
# A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a --sanitizer none <target> fuzz/artifacts/<target>/<file>
# and turn it into a regression test named after the behaviour. The corpus grows in
# fuzz/corpus/<target>/ (ignored by git); fuzz/seeds/<target>/ holds the committed starting points.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(block_decode postcard_batch json_batch ingest_decode mqtt_payload)

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2; exit 2; }
export RUSTC_BOOTSTRAP=1
flags=(-O -a --sanitizer none)

cargo fuzz build "${flags[@]}"
failed=()
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  echo "== $target: ${seconds}s"
  log="fuzz/logs/$target.log"
  mkdir -p fuzz/logs
  status=0
  # -max_len: the decoders' interesting structure fits in 64 KiB; -rss_limit_mb bounds a
  # decoder that allocates without limit (that is a finding too).
  cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== ERROR|SUMMARY)|panicked|Test unit written" "$log" || true
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    tail -n 30 "$log"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crashes in ${targets[*]} (${seconds}s each)"
