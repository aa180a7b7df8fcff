#!/usr/bin/env bash
# Builds fresh crates outside the repository that depend on longctx the way users do, with
# no environment variable set: (1) longctx alone; (2) longctx next to cudarc with
# `dynamic-linking` (candle's choice); (3) longctx next to cudarc pinned to `cuda-12040`.
# Library crates, so nothing links against a driver this machine may not have.
#
#   scripts/check-downstream.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
# The repository's .cargo/config.toml must not help: build from outside it, with the
# variables it sets cleared.
unset CUDARC_CUDA_VERSION
export CARGO_TARGET_DIR="$work/target"
fail=0
make_crate() {
  local name="$1" extra="$2"
  rm -rf "${work:?}/$name"
  mkdir -p "$work/$name/src"
  cat > "$work/$name/Cargo.toml" <<TOML
[package]
name = "$name"
version = "0.0.0"
edition = "2021"

[dependencies]
longctx = { path = "$root" }
$extra
TOML
  cat > "$work/$name/src/lib.rs" <<'RS'
//! Uses longctx's types the way a trainer would name them.
pub fn table_len(config: &longctx::rope::RopeConfig) -> usize {
    config.inv_freq_f64(4096).len()
}
pub fn kernels() -> bool {
    longctx::device::kernels_compiled()
}
RS
  if (cd "$work/$name" && cargo build --quiet >"$work/$name.log" 2>&1); then
    echo "OK   $name"
  else
    echo "FAIL $name (log: $work/$name.log)"
    tail -n 20 "$work/$name.log"
    fail=1
  fi
}
make_crate plain ""
make_crate with-dynamic-linking 'cudarc = { version = "0.19", default-features = false, features = ["std", "driver", "nvrtc", "f16", "dynamic-linking", "cuda-version-from-build-system"] }'
make_crate with-pinned-cuda 'cudarc = { version = "0.19", default-features = false, features = ["std", "driver", "cuda-12040"] }'
exit $fail
