#!/usr/bin/env bash
# Runs inside gpu-bundle/ on a GPU machine (no Rust toolchain needed). Usage: ./run.sh LOGDIR
# Writes: env.txt, tests.log, sanitizer.log, sweep.log, bench.log, peers.log, summary.txt
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
LOG="${1:-$HERE/logs}"
mkdir -p "$LOG"
cd "$HERE"
export LONGCTX_REQUIRE_GPU=1
summary="$LOG/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

{ date -u; nvidia-smi; nvcc --version 2>/dev/null | tail -n 2; } > "$LOG/env.txt" 2>&1

# 1. Parity and unit tests, every test binary, GPU required.
: > "$LOG/tests.log"
for t in tests/*; do
  echo "=== $t" >> "$LOG/tests.log"
  if timeout "${LONGCTX_STEP_TIMEOUT:-300}" "$t" --test-threads=1 >> "$LOG/tests.log" 2>&1; then note "PASS $t"; else note "FAIL $t"; fi
done

# 2. compute-sanitizer on small cases.
: > "$LOG/sanitizer.log"
for tool in memcheck racecheck; do
  for t in tests/rope tests/attention tests/moe; do
    [ -x "$t" ] || continue
    echo "=== $tool $t" >> "$LOG/sanitizer.log"
    if LONGCTX_PARITY_CASES=6 timeout "${LONGCTX_STEP_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 97 "$t" --test-threads=1 gpu_ >> "$LOG/sanitizer.log" 2>&1; then
      note "SANITIZER-OK $tool $t"
    else
      note "SANITIZER-FAIL $tool $t"
    fi
  done
done

# 3. The sweep (main job) and the criterion benches.
# LONGCTX_SWEEP_ARGS passes flags to the sweep (--quick, --attention, --moe).
if timeout "${LONGCTX_SWEEP_TIMEOUT:-600}" examples/sweep ${LONGCTX_SWEEP_ARGS:-} > "$LOG/sweep.log" 2>&1; then note "SWEEP-OK"; else note "SWEEP-FAIL"; fi
: > "$LOG/bench.log"
# LONGCTX_SKIP_BENCHES=1 skips criterion (the sweep already times every kernel).
[ "${LONGCTX_SKIP_BENCHES:-0}" = 1 ] || for b in benches/*; do
  echo "=== $b" >> "$LOG/bench.log"
  "$b" --bench >> "$LOG/bench.log" 2>&1 || note "BENCH-FAIL $b"
done

# 4. PyTorch peers on the same shapes, in the same run.
if timeout "${LONGCTX_STEP_TIMEOUT:-300}" python3 peers.py ${LONGCTX_PEERS_ARGS:-} > "$LOG/peers.log" 2>&1; then note "PEERS-OK"; else note "PEERS-FAIL"; fi

cat "$LOG/sweep.log"
echo
cat "$LOG/peers.log"
echo
cat "$summary"
