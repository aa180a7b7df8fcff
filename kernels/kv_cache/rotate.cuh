// Keys and queries stored un-rotated (LongctxKvDecodeParams::rope_inv_freq != 0): the
// rotation the decode kernels apply on load, with the RoPE kernel's arithmetic
// (rope/rope_kernel.cuh, rotate_item: cos and sin times the attention factor, the pair's
// first element x c - y s, its second y c + x s, in f32, rounded to the storage type), so a
// key rotated here equals the same key rotated by append's fused RoPE, bit for bit.
#pragma once
#include <stdint.h>

#include "common/dtype.cuh"
#include "params/kv_cache_params.h"
#include "rope/angle.cuh"

namespace longctx {
namespace kv_rotate {

// P is the decode's or the extend's params (LongctxKvDecodeParams, LongctxKvExtendParams):
// both name the rotation fields rotary_dim, rope_style and rope_angle_mode.

// The value of channel `ch` of a row after RoPE at `pos` with inverse frequencies `inv` (f64)
// and attention `factor`; `x(c)` reads channel c of the un-rotated row as f32.
template <typename P, typename GetX>
__device__ __forceinline__ float rotated_channel(const P& p, const double* inv, float factor, int pos, int ch,
                                                 GetX x) {
    const int rot = int(p.rotary_dim);
    if (ch >= rot) return x(ch);
    const int half = rot / 2;
    const bool neox = p.rope_style == LONGCTX_ROPE_STYLE_NEOX;
    const int pair = neox ? (ch < half ? ch : ch - half) : ch / 2;
    const int a = neox ? pair : 2 * pair;
    const int b = neox ? pair + half : 2 * pair + 1;
    float sn, cs;
    rope::angle_sin_cos(p.rope_angle_mode, pos, inv[pair], &sn, &cs);
    cs *= factor;
    sn *= factor;
    const float xa = x(a);
    const float xb = x(b);
    return ch == a ? xa * cs - xb * sn : xb * cs + xa * sn;
}

// Rotates the pair (*ea, *eb) (first, second element) in place at `pos`.
template <typename P, typename T>
__device__ __forceinline__ void rotate_pair(const P& p, double inv, float factor, int pos, T* ea, T* eb) {
    float sn, cs;
    rope::angle_sin_cos(p.rope_angle_mode, pos, inv, &sn, &cs);
    cs *= factor;
    sn *= factor;
    const float xa = DType<T>::to_f32(*ea);
    const float xb = DType<T>::to_f32(*eb);
    *ea = DType<T>::from_f32(xa * cs - xb * sn);
    *eb = DType<T>::from_f32(xb * cs + xa * sn);
}

}  // namespace kv_rotate
}  // namespace longctx
