#!/usr/bin/env bash
# Runs inside gpu-bundle/ on a GPU machine (no Rust toolchain needed). Usage: ./run.sh LOGDIR
# Writes: env.txt, tests.log, sanitizer.log, sweep.log, bench.log, peers.log, summary.txt
#
# LONGCTX_STEPS picks the steps and their order (default "tests sanitizer sweep benches
# peers"); each step's wall time goes to summary.txt. For a short run that still records
# figures: LONGCTX_STEPS="tests sweep peers sanitizer" LONGCTX_SWEEP_ARGS=--quick
# LONGCTX_TEST_THREADS=8.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
LOG="${1:-$HERE/logs}"
mkdir -p "$LOG"
cd "$HERE"
export LONGCTX_REQUIRE_GPU=1
summary="$LOG/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
limit="${LONGCTX_STEP_TIMEOUT:-300}"

{ date -u; nvidia-smi; nvcc --version 2>/dev/null | tail -n 2; } > "$LOG/env.txt" 2>&1

# The binaries travel as one solid xz tar (scripts/gpu-bundle.sh); unpack them once.
python3 - <<'PY'
import lzma, os, tarfile
if os.path.exists("bins.tar.xz"):
    with lzma.open("bins.tar.xz", "rb") as f:
        with tarfile.open(fileobj=f, mode="r") as tar:
            tar.extractall(".")
    os.remove("bins.tar.xz")
    for sub in ("tests", "benches", "examples"):
        for name in os.listdir(sub):
            os.chmod(os.path.join(sub, name), 0o755)
PY

# Parity and unit tests, every test binary, GPU required. The GPU tests are #[ignore]d so a
# machine without a GPU reports them as ignored, never as passed: here they are enabled with
# --include-ignored (and LONGCTX_REQUIRE_GPU=1 makes a missing GPU a failure). The emulator's
# tests (emu_*) ran where the bundle was built and are skipped. LONGCTX_TEST_THREADS
# (default 1) runs tests of one binary concurrently: their CPU references then use more
# cores, and their GPU work shares the device.
step_tests() {
  : > "$LOG/tests.log"
  for t in tests/*; do
    echo "=== $t" >> "$LOG/tests.log"
    if timeout "$limit" "$t" --include-ignored --skip emu_ --test-threads="${LONGCTX_TEST_THREADS:-1}" >> "$LOG/tests.log" 2>&1; then
      note "PASS $t"
    else
      note "FAIL $t"
    fi
  done
}

# compute-sanitizer on small cases (LONGCTX_PARITY_CASES shrinks the GPU tests).
step_sanitizer() {
  : > "$LOG/sanitizer.log"
  for tool in memcheck racecheck; do
    for t in tests/rope tests/attention tests/attention_backward tests/moe tests/kv_cache tests/kv_decode tests/kv_append tests/kv_extend tests/kv_rotating tests/mla; do
      [ -x "$t" ] || continue
      echo "=== $tool $t" >> "$LOG/sanitizer.log"
      if LONGCTX_PARITY_CASES=6 timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 97 \
        "$t" --include-ignored --test-threads=1 gpu_ >> "$LOG/sanitizer.log" 2>&1; then
        note "SANITIZER-OK $tool $t"
      else
        note "SANITIZER-FAIL $tool $t"
      fi
    done
  done
}

# The sweep (main job). LONGCTX_SWEEP_ARGS passes flags to it (--quick, --attention, --moe).
step_sweep() {
  # shellcheck disable=SC2086
  if timeout "${LONGCTX_SWEEP_TIMEOUT:-600}" examples/sweep ${LONGCTX_SWEEP_ARGS:-} > "$LOG/sweep.log" 2>&1; then
    note "SWEEP-OK"
  else
    note "SWEEP-FAIL"
  fi
}

# The criterion benches; LONGCTX_SKIP_BENCHES=1 skips them (the sweep already times every
# kernel).
step_benches() {
  : > "$LOG/bench.log"
  [ "${LONGCTX_SKIP_BENCHES:-0}" = 1 ] && return
  for b in benches/*; do
    [ -x "$b" ] || continue
    echo "=== $b" >> "$LOG/bench.log"
    "$b" --bench >> "$LOG/bench.log" 2>&1 || note "BENCH-FAIL $b"
  done
}

# PyTorch peers on the same shapes, in the same run.
step_peers() {
  # shellcheck disable=SC2086
  if timeout "$limit" python3 peers.py ${LONGCTX_PEERS_ARGS:-} > "$LOG/peers.log" 2>&1; then
    note "PEERS-OK"
  else
    note "PEERS-FAIL"
  fi
}

for step in ${LONGCTX_STEPS:-tests sanitizer sweep benches peers}; do
  case "$step" in
    tests | sanitizer | sweep | benches | peers) ;;
    *) note "UNKNOWN-STEP $step"; continue ;;
  esac
  t0=$(date +%s)
  "step_$step"
  note "TIME $step $(($(date +%s) - t0)) s"
done

[ -f "$LOG/sweep.log" ] && cat "$LOG/sweep.log"
echo
[ -f "$LOG/peers.log" ] && cat "$LOG/peers.log"
echo
cat "$summary"
