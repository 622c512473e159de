#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each on stable (no sanitizer), writing new inputs to a
# scratch folder so the committed seeds stay untouched. Exits non-zero if any target crashed,
# and prints execs/s per target.
#
#   fuzz/run.sh 20          # the CI budget
#   fuzz/run.sh 600         # a 10-minute campaign per target
set -euo pipefail
secs="${1:-20}"
cd "$(dirname "$0")"
targets=(${TARGETS:-frame_decode frame_roundtrip codec_chunks session_ops session_pair connect_head grpc_authority})
scratch="$(mktemp -d -t tether-fuzz.XXXXXX)"
echo "scratch corpus and artifacts: $scratch"

cargo fuzz build -s none

failed=()
printf '%-16s %12s %10s %8s %s\n' target execs execs/s corpus result
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  # The first folder gets new inputs; the committed folders are only read.
  if cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" "regressions/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$scratch/$t-" \
      >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log and $scratch/$t-*)"
    failed+=("$t")
  fi
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
  corpus=$(find "$scratch/$t" -type f | wc -l)
  printf '%-16s %12s %10s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "$corpus" "$result"
done

if ((${#failed[@]})); then
  echo "crashed: ${failed[*]}"
  for t in "${failed[@]}"; do tail -40 "$scratch/$t.log"; done
  exit 1
fi
