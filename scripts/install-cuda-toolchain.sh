#!/usr/bin/env bash
# Installs a pinned CUDA compiler (nvcc, ptxas, cicc, headers) from PyPI into a cache folder.
# Idempotent: a second run with the same pins does nothing. Prints the CUDA_HOME to use.
#
#   scripts/install-cuda-toolchain.sh            # installs into ${LONGCTX_CUDA_CACHE:-$HOME/.cache/longctx/cuda-13.0}
#   export CUDA_HOME=$(scripts/install-cuda-toolchain.sh | tail -n 1)
#
# The pins: CUDA 13.0 compiles bf16 mma.sync code for sm_80..sm_90a, and its PTX JITs on
# drivers >= 580. nvidia-nvvm is pinned on purpose: an unpinned one brings a newer cicc whose
# PTX ISA the 13.0 ptxas rejects. cuobjdump and nvdisasm (for the SASS check in
# tests/kernels.rs) have no 13.0 release on PyPI; 13.2's read CUDA 13.0 cubins.
set -euo pipefail

PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-cuobjdump==13.2.51
  nvidia-cuda-nvdisasm==13.2.51
)
PREFIX="${LONGCTX_CUDA_CACHE:-$HOME/.cache/longctx/cuda-13.0}"
PYTHON="${PYTHON:-python3}"
STAMP="$PREFIX/.installed"
want="$(printf '%s\n' "${PINS[@]}")"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "CUDA toolchain already installed in $PREFIX" >&2
else
  echo "Installing ${PINS[*]} into $PREFIX" >&2
  rm -rf "$PREFIX/site"
  mkdir -p "$PREFIX"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --target "$PREFIX/site" "${PINS[@]}" >&2
  printf '%s\n' "$want" > "$STAMP"
fi

ROOT="$PREFIX/site/nvidia/cu13"
if [ ! -x "$ROOT/bin/nvcc" ]; then
  echo "error: nvcc not found at $ROOT/bin/nvcc after install" >&2
  exit 1
fi
# The wheels keep cicc under nvvm/bin; nvcc finds it relative to its own folder.
chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
# A stable path build.rs also looks at.
ln -sfn "$ROOT" "$PREFIX/cuda"
echo "$PREFIX/cuda"
