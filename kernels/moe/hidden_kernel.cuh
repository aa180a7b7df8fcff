// Moving hidden-state rows between token order and expert order.
//
//   gather:     dst[s, :] = scale[a] * src[a / top_k, :] for each slot s holding assignment
//               a = slot_assignment[s]; padding slots (a = -1) get zeros; slots at or past
//               the padded total (the unused tail of max_slots) are not written. scale = 1 when
//               absent. Forward: hidden states into expert order. With scale = the routing
//               weights it is also the combine's gradient with respect to the expert outputs.
//   combine:    dst[t, :] = sum_j w[t, j] * src[slot_of[t, j], :] over kept assignments (slot
//               >= 0), in rank order j, accumulated in f32. w = 1 when absent: that is the
//               gather's gradient (a scatter-add through the inverse map: no atomics).
//   combine_dw: d_weights[t, j] = <d_out[t, :], expert_out[slot_of[t, j], :]>, 0 when dropped.
//
// One block per output row; 16-byte vectors along hidden when `vec` (hidden a multiple of
// 16 / sizeof(T), so every row start is 16-byte aligned in a CUDA allocation), else scalars.
#pragma once
#include "common/smem.cuh"
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/vec.cuh"
#include "moe/reduce.cuh"
#include "moe/traits.cuh"
#include "params/moe_params.h"

namespace longctx {
namespace moe {

template <typename T, int W>
__device__ __forceinline__ void gather_row(const T* src, T* dst, int hidden, bool scaled, float sc) {
    for (int i = threadIdx.x; i < hidden / W; i += kRowThreads) {
        Vec<T, W> v;
        v.load(src + i * W);
        if (scaled) {
#pragma unroll
            for (int e = 0; e < W; ++e) v.elt[e] = DType<T>::from_f32(sc * DType<T>::to_f32(v.elt[e]));
        }
        v.store(dst + i * W);
    }
}

template <typename T>
__device__ void gather_body(const LongctxMoeGatherParams& p) {
    constexpr int kW = 16 / int(sizeof(T));
    const int64_t row = blockIdx.x;
    if (p.total != 0 && row >= *reinterpret_cast<const int32_t*>(p.total)) return;  // unused tail
    const int H = int(p.hidden);
    const int a = reinterpret_cast<const int32_t*>(p.slot_assignment)[row];
    T* dst = reinterpret_cast<T*>(p.dst) + row * H;
    if (a < 0) {
        for (int i = threadIdx.x; i < H; i += kRowThreads) dst[i] = DType<T>::from_f32(0.f);
        return;
    }
    const T* src = reinterpret_cast<const T*>(p.src) + int64_t(a / int(p.top_k)) * H;
    const float* scale = reinterpret_cast<const float*>(p.scale);
    const bool scaled = scale != nullptr;
    const float sc = scaled ? scale[a] : 1.f;
    if (p.vec) {
        gather_row<T, kW>(src, dst, H, scaled, sc);
    } else {
        gather_row<T, 1>(src, dst, H, scaled, sc);
    }
}

template <typename T, int W>
__device__ __forceinline__ void combine_row(const LongctxMoeCombineParams& p, int64_t t) {
    const int H = int(p.hidden);
    const int K = int(p.top_k);
    const int32_t* slot_of = reinterpret_cast<const int32_t*>(p.slot_of) + t * K;
    const float* w = p.weights != 0 ? reinterpret_cast<const float*>(p.weights) + t * K : nullptr;
    const T* src = reinterpret_cast<const T*>(p.src);
    T* dst = reinterpret_cast<T*>(p.dst) + t * H;
    for (int i = threadIdx.x; i < H / W; i += kRowThreads) {
        float acc[W];  // [W]: f32 sums of this vector's elements
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] = 0.f;
        for (int j = 0; j < K; ++j) {
            const int s = slot_of[j];
            if (s < 0) continue;
            const float wj = w != nullptr ? w[j] : 1.f;
            Vec<T, W> v;
            v.load(src + int64_t(s) * H + i * W);
#pragma unroll
            for (int e = 0; e < W; ++e) acc[e] += wj * DType<T>::to_f32(v.elt[e]);
        }
        Vec<T, W> o;
#pragma unroll
        for (int e = 0; e < W; ++e) o.elt[e] = DType<T>::from_f32(acc[e]);
        o.store(dst + i * W);
    }
}

template <typename T>
__device__ void combine_body(const LongctxMoeCombineParams& p) {
    constexpr int kW = 16 / int(sizeof(T));
    const int64_t t = blockIdx.x;
    if (p.vec) {
        combine_row<T, kW>(p, t);
    } else {
        combine_row<T, 1>(p, t);
    }
}

template <typename T, int W>
__device__ __forceinline__ float dot_rows(const T* a, const T* b, int hidden) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < hidden / W; i += kRowThreads) {
        Vec<T, W> x, y;
        x.load(a + i * W);
        y.load(b + i * W);
#pragma unroll
        for (int e = 0; e < W; ++e) acc += DType<T>::to_f32(x.elt[e]) * DType<T>::to_f32(y.elt[e]);
    }
    return acc;
}

template <typename T>
__device__ void combine_dw_body(const LongctxMoeCombineDwParams& p) {
    constexpr int kW = 16 / int(sizeof(T));
    LONGCTX_SHARED_ARRAY(float, scratch, 32);
    const int64_t t = blockIdx.x;
    const int H = int(p.hidden);
    const int K = int(p.top_k);
    const int32_t* slot_of = reinterpret_cast<const int32_t*>(p.slot_of) + t * K;
    const T* g = reinterpret_cast<const T*>(p.d_out) + t * H;
    float* dw = reinterpret_cast<float*>(p.d_weights) + t * K;
    for (int j = 0; j < K; ++j) {
        const int s = slot_of[j];  // the same for every thread: uniform branch
        if (s < 0) {
            if (threadIdx.x == 0) dw[j] = 0.f;
            continue;
        }
        const T* x = reinterpret_cast<const T*>(p.expert_out) + int64_t(s) * H;
        const float part = p.vec ? dot_rows<T, kW>(g, x, H) : dot_rows<T, 1>(g, x, H);
        const float total = block_sum<kRowThreads>(part, scratch);
        if (threadIdx.x == 0) dw[j] = total;
    }
}

}  // namespace moe
}  // namespace longctx
