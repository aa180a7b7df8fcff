// append_kv: writes the new tokens' K and V rows of one step into their paged-cache slots,
// with RoPE fused on K and, for an fp8 cache, quantisation (kernels/params/kv_cache_params.h
// has the layouts and the math).
//
// One warp per (new token, head) row, LONGCTX_KV_APPEND_WARPS rows per block; the warp
// writes the row of K and then the row of V. Per row:
//   1. the token's sequence b: a binary search of cu_new (warp-uniform broadcast loads);
//      its position p = seqlens[b] - n_b + (token - cu_new[b]), page and slot from the table;
//   2. each lane owns kChunks W-element chunks of the row (chunk k of lane l covers channels
//      [(32k + l) W, (32k + l + 1) W), so a warp's loads and stores are contiguous), read
//      into f32 registers; K's channels below rotary_dim are rotated at position p exactly
//      as the RoPE kernel's forward does (same angle code, same f32 arithmetic): the lane
//      reads its chunk's partner chunk (NeoX: +-rotary_dim/2; interleaved: the same chunk
//      when W > 1, else the neighbouring channel);
//   3. f16 / bf16 cache: the values rounded to S (RNE) are stored. fp8 cache: per (token,
//      head) the warp's absmax (a butterfly) gives scale = absmax / 448 (1 for a zero row),
//      which lane 0 stores; per head the caller's scale is read; the codes are
//      f32_to_e4m3(x / scale), RNE, saturating at +-448.
// W = 16 bytes / sizeof(T) when the host proved every access aligned (new K/V rows on 16
// bytes, cache rows on W * sizeof(S) bytes, head_dim % W == 0, and for NeoX RoPE
// rotary_dim % 2W == 0), else 1.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/fp8.cuh"
#include "common/smem.cuh"
#include "common/vec.cuh"
#include "params/kv_cache_params.h"
#include "params/rope_params.h"
#include "rope/angle.cuh"

namespace longctx {
namespace kv_cache {

constexpr int kAppendWarps = int(LONGCTX_KV_APPEND_WARPS);
constexpr int kAppendThreads = 32 * kAppendWarps;
constexpr int kAppendMaxDim = int(LONGCTX_KV_APPEND_MAX_HEAD_DIM);
constexpr int kAppendMaxDimScalar = int(LONGCTX_KV_APPEND_MAX_HEAD_DIM_SCALAR);
static_assert(kAppendMaxDim % 256 == 0, "lanes split the row evenly at every vector width");
static_assert(kAppendMaxDimScalar % 32 == 0, "lanes split the row evenly");

// fp8 e4m3 codes travel as bytes.
template <typename S> struct IsFp8Code { static constexpr bool value = false; };
template <> struct IsFp8Code<uint8_t> { static constexpr bool value = true; };

__device__ __forceinline__ float append_warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
    return v;
}

// (attention_factor cos, attention_factor sin) of pair `pair` at position `pos`, formed as
// the RoPE kernel's pair_cos_sin forms them for the forward direction.
__device__ __forceinline__ float2 append_cos_sin(const LongctxKvAppendParams& p, int32_t pos, int pair) {
    const double inv = reinterpret_cast<const double*>(p.inv_freq)[pair];
    float s, c;
    rope::angle_sin_cos(p.angle_mode, pos, inv, &s, &c);
    return make_float2(c * p.attention_factor, s * p.attention_factor);
}

// Reads chunk `c0` of one row into f32 (rotating channels below `rot` when rot > 0).
template <typename T, int W>
__device__ __forceinline__ void load_chunk(const LongctxKvAppendParams& p, const T* src, int c0, int rot,
                                           const float2* cs, float (&x)[W]) {
    Vec<T, W> a;
    a.load(src + c0);
    float own[W];
#pragma unroll
    for (int e = 0; e < W; ++e) own[e] = DType<T>::to_f32(a.elt[e]);
    if (c0 >= rot) {
#pragma unroll
        for (int e = 0; e < W; ++e) x[e] = own[e];
        return;
    }
    float other[W];
    int pair0;
    bool first;  // NeoX: this chunk holds the pairs' first elements
    const bool neox = p.rope_style == LONGCTX_ROPE_STYLE_NEOX;
    if (neox) {
        const int half = rot / 2;
        first = c0 < half;
        pair0 = first ? c0 : c0 - half;
        Vec<T, W> b;
        b.load(src + (first ? c0 + half : c0 - half));
#pragma unroll
        for (int e = 0; e < W; ++e) other[e] = DType<T>::to_f32(b.elt[e]);
    } else {
        first = true;
        pair0 = 0;
        if (W == 1) {
            other[0] = DType<T>::to_f32(src[c0 ^ 1]);
        } else {
#pragma unroll
            for (int e = 0; e < W; ++e) other[e] = own[e ^ 1];
        }
    }
#pragma unroll
    for (int e = 0; e < W; ++e) {
        const int c = c0 + e;
        if (c >= rot) {
            x[e] = own[e];
            continue;
        }
        const bool is_x = neox ? first : (c & 1) == 0;  // the pair's first element
        const int pair = neox ? pair0 + e : c >> 1;
        const float2 t = cs[pair];
        if (is_x) {
            const float xv = own[e], y = other[e];
            x[e] = xv * t.x - y * t.y;
        } else {
            const float xv = other[e], y = own[e];
            x[e] = y * t.x + xv * t.y;
        }
    }
}

// Writes one (token, head) row of K or V: `src` is the new row, `dst` the cache row,
// `scale_at` its scale's index (per token and head, or per head).
template <typename T, typename S, int W>
__device__ __forceinline__ void append_row(const LongctxKvAppendParams& p, const T* src, S* dst,
                                           float* scales, int64_t scale_at, int rot, const float2* cs, int lane) {
    // Chunks per lane at the largest head dim of this width.
    constexpr int kChunks = (W == 1 ? kAppendMaxDimScalar : kAppendMaxDim) / (32 * W);
    const int dim = int(p.cache.head_dim);
    float x[kChunks][W];  // this lane's channels of the row, f32
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
        const int c0 = (32 * k + lane) * W;
        if (c0 < dim) {
            load_chunk<T, W>(p, src, c0, rot, cs, x[k]);
        } else {
#pragma unroll
            for (int e = 0; e < W; ++e) x[k][e] = 0.f;
        }
    }
    if constexpr (IsFp8Code<S>::value) {
        float scale;
        if (p.cache.scale_mode == LONGCTX_KV_SCALE_TOKEN_HEAD) {
            float m = 0.f;
#pragma unroll
            for (int k = 0; k < kChunks; ++k)
#pragma unroll
                for (int e = 0; e < W; ++e) m = fmaxf(m, fabsf(x[k][e]));
            m = append_warp_max(m);
            scale = m / kFp8E4m3Max;
            if (!(scale > 0.f)) scale = 1.f;  // an all-zero row (or one too small to scale)
            if (lane == 0) scales[scale_at] = scale;
        } else {
            scale = scales[scale_at];
        }
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
            const int c0 = (32 * k + lane) * W;
            if (c0 < dim) {
                if constexpr (W == 1) {
                    dst[c0] = f32_to_e4m3(x[k][0] / scale);
                } else {
                    Vec<uint8_t, W> y;
#pragma unroll
                    for (int e = 0; e < W; ++e) y.elt[e] = f32_to_e4m3(x[k][e] / scale);
                    y.store(dst + c0);
                }
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
            const int c0 = (32 * k + lane) * W;
            if (c0 < dim) {
                Vec<S, W> y;
#pragma unroll
                for (int e = 0; e < W; ++e) y.elt[e] = DType<S>::from_f32(x[k][e]);
                y.store(dst + c0);
            }
        }
    }
}

template <typename T, typename S, int W>
__device__ __forceinline__ void append_kernel_body(const LongctxKvAppendParams& p) {
    // Per warp: (factor cos, factor sin) of every rotated pair of its row's position, formed
    // before the row is loaded (as the RoPE kernel does), so no sincosf call sits between
    // loads with the row's values live in registers.
    constexpr int kMaxPairs = int(LONGCTX_ROPE_MAX_ROTARY_DIM) / 2;
    LONGCTX_SHARED_ARRAY(float2, cs_all, kAppendWarps * kMaxPairs);
    const int lane = int(threadIdx.x) & 31;
    const int64_t heads = p.cache.heads_kv;
    const int64_t row = int64_t(blockIdx.x) * kAppendWarps + (int(threadIdx.x) >> 5);
    if (row >= int64_t(p.total_new) * heads) return;  // the whole warp leaves together
    const int64_t token = row / heads;
    const int64_t head = row - token * heads;

    // The sequence b with cu_new[b] <= token < cu_new[b + 1] (empty sequences skipped).
    const int32_t* cu = reinterpret_cast<const int32_t*>(p.step.cu_new);
    int lo = 0, hi = int(p.step.batch);  // cu[lo] <= token < cu[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (int64_t(cu[mid]) <= token) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    const int32_t start = cu[lo];
    const int32_t n_new = cu[lo + 1] - start;
    const int32_t len = reinterpret_cast<const int32_t*>(p.step.seqlens)[lo];
    const int32_t pos = len - n_new + int32_t(token - start);
    const int32_t page_size = int32_t(p.cache.page_size);
    const int32_t page = reinterpret_cast<const int32_t*>(
        p.step.block_table)[int64_t(lo) * p.step.max_pages_per_seq + pos / page_size];
    const int64_t cache_row = (int64_t(page) * page_size + pos % page_size) * heads + head;
    const int64_t dst = cache_row * int64_t(p.cache.head_dim);
    const int64_t scale_at = p.cache.scale_mode == LONGCTX_KV_SCALE_HEAD ? head : cache_row;
    const int rot = p.inv_freq != 0 ? int(p.rotary_dim) : 0;
    float2* cs = cs_all + (int(threadIdx.x) >> 5) * kMaxPairs;
    if (rot > 0) {
        for (int i = lane; i < rot / 2; i += 32) cs[i] = append_cos_sin(p, pos, i);
        __syncwarp();
    }

    append_row<T, S, W>(p, reinterpret_cast<const T*>(p.new_k) + token * p.k_token_stride + head * p.k_head_stride,
                        reinterpret_cast<S*>(p.cache.k) + dst, reinterpret_cast<float*>(p.cache.k_scale), scale_at,
                        rot, cs, lane);
    append_row<T, S, W>(p, reinterpret_cast<const T*>(p.new_v) + token * p.v_token_stride + head * p.v_head_stride,
                        reinterpret_cast<S*>(p.cache.v) + dst, reinterpret_cast<float*>(p.cache.v_scale), scale_at, 0,
                        cs, lane);
}

}  // namespace kv_cache
}  // namespace longctx
