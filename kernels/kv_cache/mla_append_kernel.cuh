// MLA latent append: writes each new token's c_kv and (rotated) k_pe into its slot of the
// latent cache, quantising c_kv to e4m3 with a per-token scale for an fp8 cache
// (kernels/params/kv_cache_params.h has the layouts and the math).
//
// One warp per new token: lane l holds c_kv channels 16l .. 16l + 15 and k_pe channels 2l,
// 2l + 1. Interleaved RoPE pairs (2i, 2i + 1) sit in one lane; half-split pairs (i, i + 32)
// sit in lanes l and l + 16, exchanged with one shuffle. The rotation is the RoPE kernel's
// forward: x' = x cos - y sin, y' = y cos + x sin, cos and sin of the shared angle code times
// the attention factor.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/fp8.cuh"
#include "params/kv_cache_params.h"
#include "params/rope_params.h"
#include "rope/angle.cuh"

namespace longctx {
namespace mla_append {

constexpr int kWarps = int(LONGCTX_MLA_APPEND_WARPS);
constexpr int kThreads = 32 * kWarps;
constexpr int kLat = 512;
constexpr int kRope = 64;
constexpr int kPerLane = kLat / 32;

__device__ __forceinline__ float2 cos_sin(const LongctxMlaAppendParams& p, int32_t pos, int pair) {
    const double inv = reinterpret_cast<const double*>(p.inv_freq)[pair];
    float s, c;
    rope::angle_sin_cos(p.angle_mode, pos, inv, &s, &c);
    return make_float2(c * p.attention_factor, s * p.attention_factor);
}

template <bool kFp8>
__device__ __forceinline__ void mla_append_body(const LongctxMlaAppendParams& p) {
    using T = __nv_bfloat16;
    const int lane = int(threadIdx.x) & 31;
    const int64_t token = int64_t(blockIdx.x) * kWarps + (int(threadIdx.x) >> 5);
    if (token >= int64_t(p.total_new)) return;  // the whole warp leaves together

    // The sequence b with cu_new[b] <= token < cu_new[b + 1] (empty sequences skipped).
    const int32_t* cu = reinterpret_cast<const int32_t*>(p.step.cu_new);
    int lo = 0, hi = int(p.step.batch);
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
    const int32_t page_size = int32_t(p.page_size);
    const int32_t page =
        reinterpret_cast<const int32_t*>(p.step.block_table)[int64_t(lo) * p.step.max_pages_per_seq + pos / page_size];
    const int64_t slot = int64_t(page) * page_size + pos % page_size;

    const T* c_src = reinterpret_cast<const T*>(p.c_kv) + token * p.c_kv_stride;
    float x[kPerLane];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) x[e] = DType<T>::to_f32(c_src[kPerLane * lane + e]);

    const T* r_src = reinterpret_cast<const T*>(p.k_pe) + token * p.k_pe_stride;
    float a = DType<T>::to_f32(r_src[2 * lane]);
    float b = DType<T>::to_f32(r_src[2 * lane + 1]);
    // The half-split partners of channels 2l, 2l + 1 (lane l ^ 16), read by every lane.
    const float oa = __shfl_xor_sync(0xFFFFFFFFu, a, 16);
    const float ob = __shfl_xor_sync(0xFFFFFFFFu, b, 16);
    if (p.inv_freq != 0) {
        if (p.rope_style == LONGCTX_ROPE_STYLE_INTERLEAVED) {
            const float2 t = cos_sin(p, pos, lane);
            const float na = a * t.x - b * t.y;
            const float nb = b * t.x + a * t.y;
            a = na;
            b = nb;
        } else {
            const int pair = (2 * lane) % (kRope / 2);  // pairs 2l mod 32 and 2l + 1 mod 32
            const float2 t0 = cos_sin(p, pos, pair);
            const float2 t1 = cos_sin(p, pos, pair + 1);
            if (lane < 16) {  // first elements of their pairs
                a = a * t0.x - oa * t0.y;
                b = b * t1.x - ob * t1.y;
            } else {  // second elements
                a = a * t0.x + oa * t0.y;
                b = b * t1.x + ob * t1.y;
            }
        }
    }

    if constexpr (kFp8) {
        float m = 0.f;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) m = fmaxf(m, fabsf(x[e]));
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
        float scale = m / kFp8E4m3Max;
        if (!(scale > 0.f)) scale = 1.f;  // an all-zero row (or one too small to scale)
        if (lane == 0) reinterpret_cast<float*>(p.scale)[slot] = scale;
        uint8_t* dst = reinterpret_cast<uint8_t*>(p.latent) + slot * kLat;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) dst[kPerLane * lane + e] = f32_to_e4m3(x[e] / scale);
        T* rdst = reinterpret_cast<T*>(p.rope) + slot * kRope;
        rdst[2 * lane] = DType<T>::from_f32(a);
        rdst[2 * lane + 1] = DType<T>::from_f32(b);
    } else {
        T* dst = reinterpret_cast<T*>(p.latent) + slot * (kLat + kRope);
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) dst[kPerLane * lane + e] = DType<T>::from_f32(x[e]);
        dst[kLat + 2 * lane] = DType<T>::from_f32(a);
        dst[kLat + 2 * lane + 1] = DType<T>::from_f32(b);
    }
}

}  // namespace mla_append
}  // namespace longctx
