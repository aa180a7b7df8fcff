#!/usr/bin/env bash
# Mutation check of the emulator-backed parity tests: plants one deliberate bug at a time in
# a copy of the kernel sources (a dropped barrier, an off-by-one mask bound, a wrong sign, a
# wrong swizzle, a biased LSE, a flipped tie rule, ...), runs the tests that should catch
# it through the CPU emulator, and fails if any bug survives. Needs no GPU and no nvcc.
#
#   scripts/emulator-mutants.sh            # every mutant
#   scripts/emulator-mutants.sh rope-sign  # the named ones
#
# Each mutant rebuilds the emulator library (about a minute on 2 cores); the whole list
# takes 10 to 20 minutes, so it is not part of `cargo test`. docs/NOTES.md records the
# last run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${LONGCTX_MUTANT_DIR:-$(mktemp -d)}"
mkdir -p "$work/tree"
tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -C "$work/tree" -xf -
export CARGO_TARGET_DIR="$work/target"
# The emulator needs no CUDA compiler; keep nvcc out so each rebuild stays short.
unset NVCC CUDA_HOME CUDA_PATH
export LONGCTX_CUDA_CACHE="$work/no-cuda"
export PATH="$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd: -)"

# name | file | sed program | cargo test arguments
MUTANTS=(
  "rope-dropped-barrier|kernels/rope/rope_kernel.cuh|0,/    __syncthreads();/s//    ;/|--test rope emu_parity"
  "rope-sign|kernels/rope/rope_kernel.cuh|0,/x \* t.x - y \* t.y/s//x * t.x + y * t.y/|--test rope emu_parity"
  "attn-dropped-barrier|kernels/attention/attention_kernel.cuh|s/        cp_async_wait<0>();\n        __syncthreads();/        cp_async_wait<0>();\n        ;/|--test attention emu_parity_edges_sm80"
  "attn-mask-off-by-one|kernels/attention/attention_kernel.cuh|s/j > j_hi)/j > j_hi + 1)/|--test attention emu_parity_edges_sm80"
  "attn-causal-diagonal|kernels/attention/block_info.cuh|s/diag = sk - sq;/diag = sk - sq + 1;/|--test attention emu_parity_edges_sm80"
  "attn-biased-lse|kernels/attention/attention_kernel.cuh|s/log2f(l)) \* kLn2;/log2f(l)) * kLn2 + 1e-4f;/|--test attention emu_parity_edges_sm80"
  "attn-softcap-sign|kernels/attention/attention_kernel.cuh|s/= fast_tanh(/= -fast_tanh(/|--test attention emu_parity_edges_sm80"
  "attn-wrong-swizzle|kernels/attention/attention_kernel.cuh|s/swz\[0\] = uint32_t(row0 \* kRowBytes + ((chunk ^ (row0 \& 7)) << 4));/swz[0] = uint32_t(row0 * kRowBytes + ((chunk ^ (row0 \& 3)) << 4));/|--test attention emu_parity_edges_sm80"
  "attn-bwd-mask-off-by-one|kernels/attention/attention_bwd_kernel.cuh|s/j <= i + diag + right;/j <= i + diag + right + 1;/|--test attention_backward emu_backward_edges"
  "attn-bwd-softcap-derivative|kernels/attention/attention_bwd_kernel.cuh|s/ds \* (1.f - t \* t)/ds/|--test attention_backward emu_backward_edges"
  "attn-bwd-dropped-ds-barrier|kernels/attention/attention_bwd_kernel.cuh|s/                    __syncthreads();\n                    \/\/ dQ tile/                    ;\n                    \/\/ dQ tile/|--test attention_backward emu_backward_edges"
  "attn-bwd-dq-scale|kernels/attention/attention_bwd_kernel.cuh|s/float a = x\[2 \* e\] \* p.scale;/float a = x[2 * e];/|--test attention_backward emu_backward_edges"
  "attn-bwd-gqa-group|kernels/attention/attention_bwd_kernel.cuh|s/hq < (head_kv + 1) \* group;/hq < head_kv * group + 1;/|--test attention_backward emu_backward_edges"
  "attn-bwd-no-key-lse|kernels/attention/attention_bwd_kernel.cuh|s/lse == -INFINITY ? INFINITY : lse \* kLog2e/lse * kLog2e/|--test attention_backward emu_backward_edges"
  "attn-bwd-det-mask-off-by-one|kernels/attention/attention_bwd_kernel.cuh|s/j > j_hi) s\[nj\]/j > j_hi + 1) s[nj]/|--test attention_backward emu_backward_edges"
  "kv-merge-reads-empty-part|kernels/kv_cache/merge_kernel.cuh|s/            if (l == -INFINITY) continue;/            ;/|--test kv_cache emu_merge_edges"
  "kv-merge-unnormalised|kernels/kv_cache/merge_kernel.cuh|s/expf(l - m) \* inv, lane, dim/expf(l - m), lane, dim/|--test kv_cache emu_merge_edges"
  "kv-merge-vec-chunk-stride|kernels/kv_cache/merge_kernel.cuh|0,/const int c = (32 \* k + lane) \* W;/s//const int c = (16 * k + lane) * W;/|--test kv_cache emu_merge_edges"
  "kv-decode-own-key|kernels/kv_cache/decode_kernel.cuh|s/            row_hi\[r\] = pos;/            row_hi[r] = pos - 1;/|--test kv_decode emu_decode_"
  "kv-decode-window-off-by-one|kernels/kv_cache/decode_kernel.cuh|s/max(0, pos - p.window_left)/max(0, pos - p.window_left + 1)/|--test kv_decode emu_decode_"
  "kv-decode-split-gap|kernels/kv_cache/decode_kernel.cuh|s/const int split_lo = split \* int(p.chunk);/const int split_lo = split * int(p.chunk) + (split > 0);/|--test kv_decode emu_decode_"
  "kv-decode-page-slot|kernels/kv_cache/decode_kernel.cuh|s/int64_t(table\[jj \/ page_size\]) \* page_size + jj % page_size/int64_t(table[jj \/ page_size]) * page_size + (jj + 1) % page_size/|--test kv_decode emu_decode_"
  "kv-decode-fp8-token-scale|kernels/kv_cache/decode_kernel.cuh|s/                ksc \*= smem_scale/                ksc += 0.f * smem_scale/|--test kv_decode emu_decode_"
  "kv-decode-dropped-barrier|kernels/kv_cache/decode_kernel.cuh|s/        __syncthreads();  \/\/ the next iteration/        ;  \/\/ the next iteration/|--test kv_decode emu_decode_"
  "kv-decode-short-reduce|kernels/kv_cache/decode_kernel.cuh|s/for (int off = kTx \/ 2; off > 0; off >>= 1)/for (int off = kTx \/ 4; off > 0; off >>= 1)/|--test kv_decode emu_decode_"
  "kv-decode-mma-own-key|kernels/kv_cache/decode_mma_kernel.cuh|s/            row_hi\[h\] = pos;/            row_hi[h] = pos - 1;/|--test kv_decode emu_decode_"
  "kv-decode-mma-k-chunk|kernels/kv_cache/decode_mma_kernel.cuh|s/ldmatrix_x4(bk, k_tile + swz<D>(kr, kc));/ldmatrix_x4(bk, k_tile + swz<D>(kr, kc ^ 1));/|--test kv_decode emu_decode_"
  "kv-decode-mma-p-pack|kernels/kv_cache/decode_mma_kernel.cuh|s/pa\[h + 2\] = MmaType<T>::pack(pv\[1\]\[0\], pv\[1\]\[1\]);/pa[h + 2] = MmaType<T>::pack(pv[1][1], pv[1][0]);/|--test kv_decode emu_decode_"
  "kv-decode-mma-no-rescale|kernels/kv_cache/decode_mma_kernel.cuh|s/                acc\[dj\]\[2 \* h\] \*= corr;/                ;/|--test kv_decode emu_decode_"
  "kv-decode-mma-fp8-vscale|kernels/kv_cache/decode_mma_kernel.cuh|s/pv\[nt\]\[e\] = pr \* vsc\[nt\]\[e\];/pv[nt][e] = pr;/|--test kv_decode emu_decode_"
  "kv-decode-mma-widen-barrier|kernels/kv_cache/decode_mma_kernel.cuh|s/            __syncthreads();\n            k_tile = s_base/            ;\n            k_tile = s_base/|--test kv_decode emu_decode_"
  "kv-extend-page-slot|kernels/attention/attention_kernel.cuh|s/const int slot = j - page_col \* page_size;/const int slot = (j + 1) % page_size;/|--test kv_extend emu_extend_"
  "kv-extend-table-row|kernels/attention/attention_kernel.cuh|s/int64_t(blockIdx.z) \* int64_t(p.step.max_pages_per_seq)/int64_t(blockIdx.z) * int64_t(p.step.max_pages_per_seq - 1)/|--test kv_extend emu_extend_"
  "kv-extend-short-seqlen|kernels/attention/block_info.cuh|s/        sk = seqlens\[batch\];/        sk = seqlens[batch] - (seqlens[batch] > 0);/|--test kv_extend emu_extend_"
  "kv-extend-fp8-v-scale|kernels/attention/attention_kernel.cuh|s/scale_next = paged.v_scale_of(k0, sk);/scale_next = 256.f;/|--test kv_extend emu_extend_fp8"
  "kv-extend-fp8-widen-barrier|kernels/attention/attention_kernel.cuh|s/smem + kOffV, tid);\n            __syncthreads();/smem + kOffV, tid);\n            ;/|--test kv_extend emu_extend_fp8"
  "kv-extend-rotate-k-position|kernels/attention/attention_kernel.cuh|s/smem + kOffK, k1,/smem + kOffK, k1 + 1,/|--test kv_rotating emu_extend_rotating_"
  "kv-extend-rotate-q-position|kernels/attention/attention_kernel.cuh|s/smem, bi.m0 + bi.diag,/smem, bi.m0 + bi.diag + 1,/|--test kv_rotating emu_extend_rotating_"
  "kv-append-slot-off-by-one|kernels/kv_cache/append_kernel.cuh|s/(int64_t(page) \* page_size + pos % page_size)/(int64_t(page) * page_size + (pos + 1) % page_size)/|--test kv_append emu_append"
  "kv-append-rope-position|kernels/kv_cache/append_kernel.cuh|s/rot, pos, lane);/rot, pos + 1, lane);/|--test kv_append emu_append"
  "kv-append-rope-sign|kernels/kv_cache/append_kernel.cuh|s/x\[e\] = xv \* t.x - y \* t.y;/x[e] = xv * t.x + y * t.y;/|--test kv_append emu_append"
  "kv-append-scale-not-written|kernels/kv_cache/append_kernel.cuh|s/if (lane == 0) scales\[scale_at\] = scale;/;/|--test kv_append emu_append"
  "kv-append-vec-chunk-stride|kernels/kv_cache/append_kernel.cuh|0,/const int c0 = (32 \* k + lane) \* W;/s//const int c0 = (16 * k + lane) * W;/|--test kv_append emu_append"
  "kv-decode-rotate-k-sign|kernels/kv_cache/rotate.cuh|s/\*ea = DType<T>::from_f32(xa \* cs - xb \* sn);/*ea = DType<T>::from_f32(xa * cs + xb * sn);/|--test kv_rotating emu_rotating_"
  "kv-decode-rotate-k-position|kernels/kv_cache/decode_mma_kernel.cuh|s/const int pos = lo + t \* kTileN + r;/const int pos = lo + t * kTileN + r + 1;/|--test kv_rotating emu_rotating_"
  "kv-decode-rotate-k-position-cuda-cores|kernels/kv_cache/decode_kernel.cuh|s/const int pos = lo + t \* kTileN + r;/const int pos = lo + t * kTileN + r + 1;/|--test kv_rotating emu_rotating_static"
  "kv-decode-rotate-fp8-partner|kernels/kv_cache/decode_kernel.cuh|s/const int xb = !rot ? 2 \* pair + 1 : neox ? pair + half : 2 \* pair + 1;/const int xb = !rot ? 2 * pair + 1 : neox ? (pair + 1) % half + half : 2 * pair + 1;/|--test kv_rotating emu_rotating_fp8"
  "kv-decode-rotate-fp8-part-row|kernels/kv_cache/decode_kernel.cuh|s/const int row = part \* kWideRows + r;/const int row = r;/|--test kv_rotating emu_rotating_fp8"
  "kv-decode-rotate-fp8-part-barrier|kernels/kv_cache/decode_kernel.cuh|s/if (part > 0) __syncthreads();/if (part > 0) ;/|--test kv_rotating emu_rotating_fp8"
  "kv-decode-rotate-q-factor|kernels/kv_cache/rotate.cuh|0,/    cs \*= factor;/s//    ;/|--test kv_rotating emu_rotating_"
  "mla-own-key|kernels/kv_cache/mla_decode_kernel.cuh|s/len - n_new + row \/ heads : -1;/len - n_new + row \/ heads - 1 : -1;/|--test mla emu_mla_decode_"
  "mla-warp-own-max|kernels/kv_cache/mla_decode_kernel.cuh|s/for (int w = 1; w < kColWarps; ++w) mx = fmaxf(mx, red_max\[w \* kRows + r\]);/mx = red_max[cw * kRows + r];/|--test mla emu_mla_decode_"
  "mla-fp8-vscale|kernels/kv_cache/mla_decode_kernel.cuh|s/MmaType<T>::pack(p0 \* vsc\[nt\]\[0\], p1 \* vsc\[nt\]\[1\]);/MmaType<T>::pack(p0, p1);/|--test mla emu_mla_decode_"
  "mla-r64-q-rows|kernels/kv_cache/mla_decode_kernel.cuh|s/const int qr = 16 \* rg + (lane \& 15);/const int qr = lane \& 15;/|--test mla emu_mla_decode_"
  "mla-r64-p-rows|kernels/kv_cache/mla_decode_kernel.cuh|s/(prow + lr0 \* kPStride);/(prow + g * kPStride);/|--test mla emu_mla_decode_"
  "mla-r64-idle-group|kernels/kv_cache/mla_decode_kernel.cuh|s/const bool rg_live = r0 + 16 \* rg < rows_total;/const bool rg_live = r0 + 16 * rg + 8 < rows_total;/|--test mla emu_mla_decode_"
  "mla-c2-push-after-arrive|kernels/kv_cache/mla_decode_kernel.cuh|s/                push_part((t + 1) % kStages);\n//;s/                LONGCTX_CLUSTER_ARRIVE();\n            }\n            run_tile/                LONGCTX_CLUSTER_ARRIVE();\n                push_part((t + 1) % kStages);\n            }\n            run_tile/|--test mla emu_mla_decode_"
  "mla-c2-two-stages|kernels/kv_cache/mla_decode_kernel.cuh|s/ % kStages/ % 2/g|--test mla emu_mla_decode_"
  "mla-c2-short-push|kernels/kv_cache/mla_decode_kernel.cuh|s/push(st \* L::kStageBytes + key0 \* kRowBytes, kOwnKeys \* kRowBytes);/push(st * L::kStageBytes + key0 * kRowBytes, kOwnKeys * kRowBytes \/ 2);/|--test mla emu_mla_decode_"
  "mla-c2-own-half|kernels/kv_cache/mla_decode_kernel.cuh|s/const int key0 = rank \* kOwnKeys;/const int key0 = 0;/|--test mla emu_mla_decode_"
  "mla-c2-cta-bounds|kernels/kv_cache/mla_decode_kernel.cuh|s/const int last = min(rc0 + kCluster \* kRows, rows_total) - 1;/const int last = min(r0 + kRows, rows_total) - 1;/|--test mla emu_mla_decode_"
  "mla-c2-leaves-alone|kernels/kv_cache/mla_decode_kernel.cuh|s/    if (rc0 >= rows_total) return; /    if (r0 >= rows_total) return; /|--test mla emu_mla_decode_"
  "mla-c2-fp8-scales|kernels/kv_cache/mla_decode_kernel.cuh|s/push(L::kScale + (st \* kTileN + key0) \* 4, kOwnKeys \* 4);/;/|--test mla emu_mla_decode_"
  "mla-page-slot|kernels/kv_cache/mla_decode_kernel.cuh|s/page_size + j % page_size; };/page_size + (j + 1) % page_size; };/|--test mla emu_mla_decode_"
  "kv-extend-wide-own-key|kernels/kv_cache/extend_wide_kernel.cuh|s/row_hi\[h\] = row < rows_total ? pos : -1;/row_hi[h] = row < rows_total ? pos - 1 : -1;/|--test kv_extend emu_extend_head_dim_512"
  "kv-extend-wide-window|kernels/kv_cache/extend_wide_kernel.cuh|s/row_lo\[h\] = max(0, pos - window);/row_lo[h] = max(0, pos - window + 1);/|--test kv_extend emu_extend_head_dim_512"
  "kv-extend-wide-v-wait|kernels/kv_cache/extend_wide_kernel.cuh|s/cp_async_wait<1>();  \/\/ V(t) landed/cp_async_wait<2>();  \/\/ V(t) landed/|--test kv_extend emu_extend_head_dim_512"
  "kv-extend-wide-k-barrier|kernels/kv_cache/extend_wide_kernel.cuh|s/__syncthreads();  \/\/ every warp is done with K(t)/;  \/\/ every warp is done with K(t)/|--test kv_extend emu_extend_head_dim_512"
  "kv-extend-wide-rotate-k-position|kernels/kv_cache/extend_wide_kernel.cuh|s/\[\&\](int r) { return j0 + r; }/[\&](int r) { return j0 + r + 1; }/|--test kv_rotating emu_extend_rotating_"
  "kv-extend-wide-rotate-q-position|kernels/kv_cache/extend_wide_kernel.cuh|s/return len - n_new + (r0 + r) \/ group; }/return len - n_new + (r0 + r) \/ group + 1; }/|--test kv_rotating emu_extend_rotating_"
  "kv-extend-wide-fp8-v-scale|kernels/kv_cache/extend_wide_kernel.cuh|s/load_codes(p.cache.v, p.cache.v_scale, j0);/load_codes(p.cache.v, p.cache.k_scale, j0);/|--test kv_extend emu_extend_fp8_"
  "kv-extend-wide-fp8-widen-barrier|kernels/kv_cache/extend_wide_kernel.cuh|s/__syncthreads();  \/\/ V(t) widened/;  \/\/ V(t) widened/|--test kv_extend emu_extend_fp8_"
  "kv-extend-wide-r64-p-rows|kernels/kv_cache/extend_wide_kernel.cuh|s/(prow + lr0 \* kPStride);/(prow + g * kPStride);/|--test kv_extend emu_extend_head_dim_512"
  "mla-append-neox-partner|kernels/kv_cache/mla_append_kernel.cuh|s/__shfl_xor_sync(0xFFFFFFFFu, a, 16);/__shfl_xor_sync(0xFFFFFFFFu, a, 8);/|--test mla emu_mla_append_"
  "mla-append-fp8-scale|kernels/kv_cache/mla_append_kernel.cuh|s/float scale = m \/ kFp8E4m3Max;/float scale = m \/ 440.f;/|--test mla emu_mla_append_"
  "moe-tie-rule|kernels/moe/reduce.cuh|s/(v == best_v \&\& id < best_id)/(v == best_v \&\& id > best_id)/|--test moe emu_route_edges"
  "moe-warp-lowest-slot|kernels/moe/gate_kernel.cuh|s/for (int j = kGateSlots - 1; j >= 0; --j) {/for (int j = 0; j < kGateSlots; ++j) {/|--test moe emu_route_edges"
  "moe-warp-group-butterfly|kernels/moe/gate_kernel.cuh|s/for (int off = gl >> 1; off > 0; off >>= 1) {/for (int off = gl >> 2; off > 0; off >>= 1) {/|--test moe emu_route_edges"
  "moe-block-gate-barrier|kernels/moe/gate_kernel.cuh|s/        avail\[e\] = grouped ? 0 : 1;\n    }\n    __syncthreads();/        avail[e] = grouped ? 0 : 1;\n    }\n    ;/|--test moe emu_route_edges"
  "moe-scan-barrier|kernels/moe/reduce.cuh|s/    if (lane == 31) scratch\[warp\] = incl;\n    __syncthreads();/    if (lane == 31) scratch[warp] = incl;\n    ;/|--test moe emu_permutation_edges"
  "moe-walk-syncwarp|kernels/moe/permute_kernel.cuh|0,/            __syncwarp();/s//            ;/|--test moe emu_permutation_edges"
  "moe-capacity-off-by-one|kernels/moe/permute_kernel.cuh|s/if (uint32_t(rank) < cap) {/if (uint32_t(rank) <= cap) {/|--test moe emu_permutation_edges"
  "moe-gather-no-padding|kernels/moe/hidden_kernel.cuh|s/for (int i = threadIdx.x; i < H; i += kRowThreads) dst\[i\] = DType<T>::from_f32(0.f);/;/|--test moe emu_gather_combine_parity_f32"
  "moe-combine-rank-skip|kernels/moe/hidden_kernel.cuh|s/for (int j = 0; j < K; ++j) {\n            const int s = slot_of\[j\];\n            if (s < 0) continue;/for (int j = 1; j < K; ++j) {\n            const int s = slot_of[j];\n            if (s < 0) continue;/|--test moe emu_gather_combine_parity_f32"
  "moe-stats-barrier|kernels/moe/loss_kernel.cuh|s/    __syncthreads();\n    float\* partial/    ;\n    float* partial/|--test moe emu_losses_and_backward_parity_f32"
  "moe-bwd-sign|kernels/moe/loss_kernel.cuh|s/pe \* (dpe - S)/pe * (dpe + S)/|--test moe emu_losses_and_backward_parity_f32"
  "moe-bias-sign-zero|kernels/moe/loss_kernel.cuh|s/(d < 0 ? -1.f : 0.f)/(d < 0 ? -1.f : 1.f)/|--test moe emu_identity_experts_and_bias_update"
)

want=("$@")
survived=0
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r name file prog args <<<"$m"
  if [ ${#want[@]} -gt 0 ] && ! printf '%s\n' "${want[@]}" | grep -qx "$name"; then continue; fi
  cp "$root/$file" "$work/tree/$file"
  sed -i -z "$prog" "$work/tree/$file"
  if cmp -s "$root/$file" "$work/tree/$file"; then
    echo "MUTANT $name: the sed program did not change $file (stale mutant)"
    survived=1
    continue
  fi
  start=$(date +%s)
  # A mutant that does not build proves nothing: report it instead of counting it caught.
  # shellcheck disable=SC2086
  if ! (cd "$work/tree" && cargo test --release --no-run $args >"$work/$name.log" 2>&1); then
    echo "MUTANT $name: BROKEN (does not build; log $work/$name.log)"
    survived=1
  # shellcheck disable=SC2086
  elif (cd "$work/tree" && cargo test --release $args >>"$work/$name.log" 2>&1); then
    echo "MUTANT $name: SURVIVED (tests passed; log $work/$name.log)"
    survived=1
  else
    reason="$(grep -m1 -o -E 'emulator: [^.]*|Test failed: [^\n]{0,160}|panicked at [^ ]*' "$work/$name.log" | head -c 200 || true)"
    echo "MUTANT $name: caught in $(( $(date +%s) - start ))s (${reason:-see $work/$name.log})"
  fi
  cp "$root/$file" "$work/tree/$file"
done
exit $survived
