// Warp- and block-scope reductions used by the MoE kernels. Every reduction combines values
// in a fixed pattern (xor butterflies, then warp totals in warp order), so results are
// bitwise reproducible run to run; none uses atomics.
//
// Argmax order: (value, id) beats (value', id') when value > value', or when the values are
// equal and id < id'. Ties therefore go to the lower id, on every path. Callers replace NaN
// by -inf before ranking, so the order is total. An empty candidate is (-inf, kNoId).
#pragma once
#include <stdint.h>

namespace longctx {
namespace moe {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kNoId = 0x7FFFFFFF;

__device__ __forceinline__ bool beats(float v, int id, float best_v, int best_id) {
    return v > best_v || (v == best_v && id < best_id);
}

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

// After the butterfly every lane holds the warp's best (v, id) and the payload w that came
// with it.
__device__ __forceinline__ void warp_argmax(float& v, int& id, float& w) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(kFullMask, v, off);
        const int oid = __shfl_xor_sync(kFullMask, id, off);
        const float ow = __shfl_xor_sync(kFullMask, w, off);
        if (beats(ov, oid, v, id)) {
            v = ov;
            id = oid;
            w = ow;
        }
    }
}

// Merges two descending pairs (a1 >= a2) and (b1 >= b2) into the two largest of the four.
__device__ __forceinline__ void merge_top2(float& a1, float& a2, float b1, float b2) {
    const float hi = fmaxf(a1, b1);
    const float lo = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
    a1 = hi;
    a2 = lo;
}

__device__ __forceinline__ void warp_top2(float& a1, float& a2) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float b1 = __shfl_xor_sync(kFullMask, a1, off);
        const float b2 = __shfl_xor_sync(kFullMask, a2, off);
        merge_top2(a1, a2, b1, b2);
    }
}

// Inserts v (not NaN) into the descending pair (a1 >= a2), without branches: the new
// second is the larger of the old second and the smaller of (old first, v).
__device__ __forceinline__ void push_top2(float& a1, float& a2, float v) {
    a2 = fmaxf(a2, fminf(a1, v));
    a1 = fmaxf(a1, v);
}

// Block-wide argmax; every thread gets the result. `scratch` holds 2 * 32 words; the call
// starts and ends with a barrier so it can be reused back to back.
template <int THREADS>
__device__ __forceinline__ void block_argmax(float& v, int& id, float* scratch_v, int* scratch_id) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
    constexpr int kWarps = THREADS / 32;
    float w = 0.f;
    warp_argmax(v, id, w);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch_v[warp] = v;
        scratch_id[warp] = id;
    }
    __syncthreads();
    v = -__int_as_float(0x7f800000);
    id = kNoId;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
        if (beats(scratch_v[i], scratch_id[i], v, id)) {
            v = scratch_v[i];
            id = scratch_id[i];
        }
    }
    __syncthreads();
}

// Block-wide max; every thread gets the result. `scratch` holds 32 values.
template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
    constexpr int kWarps = THREADS / 32;
    v = warp_max(v);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) m = fmaxf(m, scratch[i]);
    __syncthreads();
    return m;
}

// Block-wide sum in a fixed order (lane butterflies, then warp totals in warp order); every
// thread gets the result. `scratch` holds 32 values.
template <int THREADS, typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
    constexpr int kWarps = THREADS / 32;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    V total = V(0);
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += scratch[i];
    __syncthreads();
    return total;
}

// Block-wide exclusive prefix sum of one int per thread, in thread order; `total` gets the
// sum of all. `scratch` holds 32 ints.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_scan(int v, int& total, int* scratch) {
    constexpr int kWarps = THREADS / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(kFullMask, incl, off);
        if (lane >= off) incl += o;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    int before = 0;
    total = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
        const int s = scratch[i];
        if (i < warp) before += s;
        total += s;
    }
    __syncthreads();
    return before + incl - v;
}

}  // namespace moe
}  // namespace longctx
