#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) with cargo-fuzz on the nightly
# toolchain, each for SECONDS (default 600) or 1,000,000 executions, whichever
# comes first, and prints one line per target: executions, seconds, crashes.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# Working corpora live in target/fuzz-corpus/ (seeded from fuzz/corpus/, which
# stays as committed); a crash is written to fuzz/artifacts/TARGET/. Once fixed,
# copy it to fuzz/regressions/TARGET/: tests/fuzz_regressions.rs replays those.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(ir_text plan gguf safetensors_dir artifact)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
mkdir -p target/fuzz-logs
printf '%-16s %12s %8s %8s\n' target executions seconds crashes
for t in "${targets[@]}"; do
  corpus="target/fuzz-corpus/$t"
  mkdir -p "$corpus"
  cp -n fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
  log="target/fuzz-logs/$t.log"
  start=$(date +%s)
  set +e
  (cd fuzz && cargo +nightly fuzz run "$t" "../$corpus" -- \
      -runs=1000000 -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1) >"$log" 2>&1
  rc=$?
  set -e
  end=$(date +%s)
  runs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(ls fuzz/artifacts/"$t" 2>/dev/null | grep -c -E '^(crash|timeout|oom|leak)-' || true)
  printf '%-16s %12s %8s %8s\n' "$t" "${runs:-?}" "$((end - start))" "$crashes"
  if [ "$rc" -ne 0 ]; then
    echo "  $t stopped with exit code $rc; see $log" >&2
  fi
done
