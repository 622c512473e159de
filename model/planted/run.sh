#!/usr/bin/env bash
# Plants each bug of bugs.py in tether-proto, one at a time, runs the model's default check
# (and, with --tests, the tether-proto tests), and prints a table: caught means a non-zero
# exit. Restores every file afterwards. Needs a clean protocol/ (it refuses otherwise).
#   model/planted/run.sh [--tests] [NAME-SUBSTRING]
set -euo pipefail
cd "$(dirname "$0")/../.."
tests=false
if [ "${1:-}" = "--tests" ]; then tests=true; shift; fi
filter="${1:-}"
if ! git diff --quiet -- protocol/; then
  echo "protocol/ has uncommitted changes; commit or stash them first" >&2
  exit 2
fi
trap 'git checkout -- protocol/' EXIT
cargo build -p tether-model --release --locked -q
count=$(python3 -c "import sys; sys.path.insert(0,'model/planted'); from bugs import BUGS; print(len(BUGS))")
echo "| bug | model check | tether-proto tests |"
echo "| --- | --- | --- |"
caught=0; total=0
for k in $(seq 0 $((count - 1))); do
  name=$(python3 - "$k" <<'PY'
import sys; sys.path.insert(0, 'model/planted'); from bugs import BUGS
name, path, old, new = BUGS[int(sys.argv[1])]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"bug '{name}': its text occurs {text.count(old)} times in {path}")
open(path, 'w').write(text.replace(old, new))
print(name)
PY
)
  if [ -n "$filter" ] && [[ "$name" != *"$filter"* ]]; then git checkout -- protocol/; continue; fi
  total=$((total + 1))
  model="missed"
  if ! cargo build -p tether-model --release --locked -q 2>/dev/null; then
    model="does not build"
  elif ! timeout 1200 ./target/release/tether-model check > "/tmp/planted-$k.txt" 2>&1; then
    model="caught"; caught=$((caught + 1))
  fi
  unit="-"
  if $tests; then
    if timeout 1200 cargo test -p tether-proto --locked -q > "/tmp/planted-tests-$k.txt" 2>&1; then
      unit="missed"
    else
      unit="caught"
    fi
  fi
  echo "| $name | $model | $unit |"
  git checkout -- protocol/
done
echo
echo "model check caught $caught of $total"
