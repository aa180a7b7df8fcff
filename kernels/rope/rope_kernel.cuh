// Fused RoPE, forward and backward, for Q and K in one launch, in place.
//
// Layout: x[token, head, channel] at data + token * token_stride + head * head_stride +
// channel (elements). Per token one block: it forms cos and sin of every pair's angle once
// (position from `positions`, inv_freq from the plan's f64 table), folds the attention
// factor (and, for backward, the sign of sin) into them, then rotates each head of Q and K.
//
// Work item: two W-element vectors a and b of one head.
//   NeoX (half-split):   a = channels [jW, jW+W),  b = channels [h + jW, h + jW + W), h = rotary_dim / 2;
//                        pair p = jW + e is (a[e], b[e]).
//   Interleaved:         a = channels [2jW, 2jW+W), b = [2jW+W, 2jW+2W): 2W consecutive channels,
//                        pair p = jW + e is (c[2e], c[2e+1]) of the concatenation c = [a, b].
// W = 16 bytes / sizeof(T) when the host proved 16-byte alignment of every access, else 1.
// Channels >= rotary_dim are never read or written.
//
// Angle precision: rope/angle.cuh (f64 product and reduction by default).
#pragma once
#include "common/smem.cuh"
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/vec.cuh"
#include "params/rope_params.h"
#include "rope/angle.cuh"
#include "rope/traits.cuh"

namespace longctx {
namespace rope {

// cos and sin (times the attention factor, sin negated for backward) of one pair's angle.
__device__ __forceinline__ float2 pair_cos_sin(const LongctxRopeParams& p, int32_t pos, int pair) {
    const double inv = reinterpret_cast<const double*>(p.inv_freq)[pair];
    float s, c;
    angle_sin_cos(p.angle_mode, pos, inv, &s, &c);
    if (p.direction == LONGCTX_ROPE_BACKWARD) s = -s;
    return make_float2(c * p.attention_factor, s * p.attention_factor);
}

// Rotates one work item (see the header comment) with cos/sin from shared memory.
template <typename T, int W>
__device__ __forceinline__ void rotate_item(T* base, int j, int half, bool neox, const float2* cs) {
    Vec<T, W> a, b;
    T* pa;
    T* pb;
    if (neox) {
        pa = base + j * W;
        pb = base + half + j * W;
    } else {
        pa = base + 2 * j * W;
        pb = pa + W;
    }
    a.load(pa);
    b.load(pb);
    if (neox) {
#pragma unroll
        for (int e = 0; e < W; ++e) {
            const float2 t = cs[j * W + e];
            const float x = DType<T>::to_f32(a.elt[e]);
            const float y = DType<T>::to_f32(b.elt[e]);
            a.elt[e] = DType<T>::from_f32(x * t.x - y * t.y);
            b.elt[e] = DType<T>::from_f32(y * t.x + x * t.y);
        }
    } else if (W == 1) {
        const float2 t = cs[j];
        const float x = DType<T>::to_f32(a.elt[0]);
        const float y = DType<T>::to_f32(b.elt[0]);
        a.elt[0] = DType<T>::from_f32(x * t.x - y * t.y);
        b.elt[0] = DType<T>::from_f32(y * t.x + x * t.y);
    } else {
#pragma unroll
        for (int e = 0; e < W / 2; ++e) {
            const float2 ta = cs[j * W + e];
            const float2 tb = cs[j * W + W / 2 + e];
            const float xa = DType<T>::to_f32(a.elt[2 * e]);
            const float ya = DType<T>::to_f32(a.elt[2 * e + 1]);
            const float xb = DType<T>::to_f32(b.elt[2 * e]);
            const float yb = DType<T>::to_f32(b.elt[2 * e + 1]);
            a.elt[2 * e] = DType<T>::from_f32(xa * ta.x - ya * ta.y);
            a.elt[2 * e + 1] = DType<T>::from_f32(ya * ta.x + xa * ta.y);
            b.elt[2 * e] = DType<T>::from_f32(xb * tb.x - yb * tb.y);
            b.elt[2 * e + 1] = DType<T>::from_f32(yb * tb.x + xb * tb.y);
        }
    }
    a.store(pa);
    b.store(pb);
}

template <typename T, int W>
__device__ __forceinline__ void rope_kernel_body(const LongctxRopeParams& p) {
    LONGCTX_SHARED_ARRAY(float2, cs, kMaxPairs);  // [rotary_dim / 2]: (f cos, +-f sin) of each pair

    const int64_t token = blockIdx.x;
    const int half = int(p.rotary_dim / 2);
    const int32_t pos = reinterpret_cast<const int32_t*>(p.positions)[token];
    for (int i = threadIdx.x; i < half; i += kThreads) cs[i] = pair_cos_sin(p, pos, i);
    __syncthreads();

    const bool neox = p.style == LONGCTX_ROPE_STYLE_NEOX;
    const int items_per_head = half / W;
    const int q_items = int(p.q.heads) * items_per_head;
    const int total = q_items + int(p.k.heads) * items_per_head;
    for (int it = threadIdx.x; it < total; it += kThreads) {
        const bool is_q = it < q_items;
        const LongctxRopeTensor& t = is_q ? p.q : p.k;
        const int local = is_q ? it : it - q_items;
        const int head = local / items_per_head;
        const int j = local - head * items_per_head;
        T* base = reinterpret_cast<T*>(t.data) + token * t.token_stride + int64_t(head) * t.head_stride;
        rotate_item<T, W>(base, j, half, neox, cs);
    }
}

}  // namespace rope
}  // namespace longctx
