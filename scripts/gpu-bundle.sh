#!/usr/bin/env bash
# Builds stripped release test, bench and example binaries (kernels embedded) into
# gpu-bundle/ (git-ignored), with run.sh to execute them on a GPU machine that has no Rust
# toolchain:
#
#   scripts/gpu-bundle.sh            # here: build the bundle (sm_90a; LONGCTX_CUDA_ARCHS overrides)
#   gpu-bundle/run.sh LOGDIR         # there: unpack, then parity (LONGCTX_REQUIRE_GPU=1), compute-sanitizer,
#                                    # the sweep, the criterion benches, the PyTorch peers
set -euo pipefail
cd "$(dirname "$0")/.."
# Hopper cubins only by default (H100/H200): every binary embeds every fatbin, and four
# archs of the attention family would push the bundle past its size limit. Override with
# LONGCTX_CUDA_ARCHS=80 (A100) etc. for other GPUs.
export LONGCTX_CUDA_ARCHS="${LONGCTX_CUDA_ARCHS:-90a}"
OUT=gpu-bundle
rm -rf "$OUT"
mkdir -p "$OUT/tests" "$OUT/benches" "$OUT/examples"

collect() { # reads cargo's JSON messages, prints "kind name path" per executable
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(t["kind"][0], t["name"], m["executable"])
'
}

{
  cargo test --release --no-run --message-format=json
  cargo bench --no-run --message-format=json
  cargo build --release --examples --message-format=json
} 2> >(grep -v '^\s*$' >&2) | collect | while read -r kind name path; do
  case "$kind" in
    test) case "$name" in
            bindings) continue ;;          # needs libclang and sources, not a GPU
            emulator | rope_plan | adversarial) continue ;;  # CPU-only: they ran where the bundle was built
          esac
          dest="$OUT/tests/$name" ;;
    bench) dest="$OUT/benches/$name" ;;
    example) dest="$OUT/examples/$name" ;;
    lib) dest="$OUT/tests/lib-unit" ;;
    *) continue ;;
  esac
  cp "$path" "$dest"
  strip "$dest" 2>/dev/null || true
done

# Every binary embeds every fatbin, so the binaries are mostly the same bytes: one solid xz
# stream with a dictionary larger than a binary stores each fatbin about once. run.sh
# unpacks it (Python's tarfile and lzma, so the GPU machine needs no xz).
python3 - "$OUT" <<'PY'
import lzma, os, shutil, sys, tarfile
out = sys.argv[1]
filters = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 256 << 20}]
with lzma.open(os.path.join(out, "bins.tar.xz"), "wb", format=lzma.FORMAT_XZ, filters=filters) as f:
    with tarfile.open(fileobj=f, mode="w") as tar:
        for sub in ("tests", "benches", "examples"):
            for name in sorted(os.listdir(os.path.join(out, sub))):
                tar.add(os.path.join(out, sub, name), arcname=os.path.join(sub, name))
for sub in ("tests", "benches", "examples"):
    shutil.rmtree(os.path.join(out, sub))
PY

cp scripts/peers.py "$OUT/peers.py"
cp scripts/bundle-run.sh "$OUT/run.sh"
chmod +x "$OUT/run.sh"
du -sh "$OUT"
size=$(du -sb "$OUT" | cut -f1)
if [ "$size" -gt $((48 * 1024 * 1024)) ]; then
  echo "error: bundle is $size bytes, over 48 MiB" >&2
  exit 1
fi
ls -R "$OUT"
