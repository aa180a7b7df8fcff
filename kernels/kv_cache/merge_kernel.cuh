// merge_states: combines P partial attention states (O_p, LSE_p) of the same rows into one
// (kernels/params/kv_cache_params.h has the layouts and the math). The primitive of
// split-KV decode (one part per KV split) and of ring / context-parallel attention (one
// part per KV shard, or the running state plus a new part with the ACCUMULATE flag).
//
// One warp per (token, head) row, LONGCTX_KV_MERGE_WARPS rows per block. Per row:
//   1. m = max_p LSE_p: lanes stride over the parts, then a warp butterfly;
//   2. s = sum_p exp(LSE_p - m) likewise; LSE = m + log s (all in f32, natural log);
//   3. O = sum_p exp(LSE_p - m) / s * O_p: each lane owns kChunks W-element chunks of the
//      row (chunk k of lane l covers channels [(32k + l) W, (32k + l + 1) W), so a warp's
//      loads of one part are contiguous), accumulated in f32 registers; a part whose LSE is
//      -inf is skipped without reading its O (it may hold anything, NaN included).
// A row whose every part is empty gets O = 0 and LSE = -inf. W = 16 bytes / sizeof(T) when
// the host proved every base address and stride 16-byte aligned and head_dim_v % W == 0,
// else 1. The LSE loads are warp-uniform broadcasts (one address per part and row).
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/vec.cuh"
#include "params/kv_cache_params.h"

namespace longctx {
namespace kv_cache {

constexpr int kWarps = int(LONGCTX_KV_MERGE_WARPS);
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxDim = int(LONGCTX_KV_MERGE_MAX_HEAD_DIM);
constexpr unsigned kFullMask = 0xFFFFFFFFu;
static_assert(kMaxDim % 32 == 0, "lanes split the row evenly");

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
}

// acc[k][e] += w * x[chunk k, element e] over this lane's chunks of one row.
template <typename T, int W, int kChunks>
__device__ __forceinline__ void add_part(float (&acc)[kChunks][W], const T* row, float w, int lane, int dim) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
        const int c = (32 * k + lane) * W;
        if (c < dim) {
            Vec<T, W> x;
            x.load(row + c);
#pragma unroll
            for (int e = 0; e < W; ++e) acc[k][e] += w * DType<T>::to_f32(x.elt[e]);
        }
    }
}

// Parts in TIn (T itself, or f32 partials of a split-KV decode), output in TOut.
template <typename TIn, typename TOut, int W>
__device__ __forceinline__ void merge_kernel_body(const LongctxKvMergeParams& p) {
    constexpr int kChunks = kMaxDim / (32 * W);  // chunks per lane at the largest head dim
    const int lane = int(threadIdx.x) & 31;
    const int64_t row = int64_t(blockIdx.x) * kWarps + (int(threadIdx.x) >> 5);
    const int64_t heads = p.heads;
    if (row >= int64_t(p.tokens) * heads) return;  // the whole warp leaves together
    const int64_t token = row / heads;
    const int64_t head = row - token * heads;
    const int dim = int(p.head_dim_v);
    const int parts = int(p.parts);
    const bool accumulate = (p.flags & LONGCTX_KV_MERGE_ACCUMULATE) != 0;

    const float* lse = reinterpret_cast<const float*>(p.lse_parts) + head * p.lse_head_stride + token;
    const TIn* o = reinterpret_cast<const TIn*>(p.o_parts) + token * p.o_token_stride + head * p.o_head_stride;
    float* out_lse = reinterpret_cast<float*>(p.out_lse) + head * p.out_lse_head_stride + token;
    TOut* out = reinterpret_cast<TOut*>(p.out_o) + token * p.out_token_stride + head * p.out_head_stride;

    // The running state, as one more part (read by every lane before anything is written).
    const float own = accumulate ? *out_lse : -INFINITY;

    float m = own;
    for (int q = lane; q < parts; q += 32) m = fmaxf(m, lse[int64_t(q) * p.lse_part_stride]);
    m = warp_max(m);

    float acc[kChunks][W];
#pragma unroll
    for (int k = 0; k < kChunks; ++k)
#pragma unroll
        for (int e = 0; e < W; ++e) acc[k][e] = 0.f;

    float merged = -INFINITY;
    if (m != -INFINITY) {
        float s = lane == 0 ? expf(own - m) : 0.f;
        for (int q = lane; q < parts; q += 32) s += expf(lse[int64_t(q) * p.lse_part_stride] - m);
        s = warp_sum(s);
        const float inv = 1.f / s;
        merged = m + logf(s);
        if (own != -INFINITY) add_part<TOut, W, kChunks>(acc, out, expf(own - m) * inv, lane, dim);
        for (int q = 0; q < parts; ++q) {
            const float l = lse[int64_t(q) * p.lse_part_stride];  // same value in every lane
            if (l == -INFINITY) continue;
            add_part<TIn, W, kChunks>(acc, o + int64_t(q) * p.o_part_stride, expf(l - m) * inv, lane, dim);
        }
    }

#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
        const int c = (32 * k + lane) * W;
        if (c < dim) {
            Vec<TOut, W> y;
#pragma unroll
            for (int e = 0; e < W; ++e) y.elt[e] = DType<TOut>::from_f32(acc[k][e]);
            y.store(out + c);
        }
    }
    if (lane == 0) *out_lse = merged;
}

}  // namespace kv_cache
}  // namespace longctx
