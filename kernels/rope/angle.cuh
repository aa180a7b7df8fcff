// sin and cos of one RoPE angle pos * inv_freq, shared by the RoPE kernel and the KV-cache
// append kernel (which rotates K on its way into the cache), so the two agree bit for bit.
//
// LONGCTX_ROPE_ANGLE_F64: theta = pos * inv_freq in f64 and reduced to [-pi, pi] in f64
// before an accurate f32 sincosf; the error stays near 1e-7 rad at positions up to 2^31,
// where an f32 product is already off by ~3e-2 rad at 2^20. LONGCTX_ROPE_ANGLE_F32: the f32
// product and sincosf, HF's precision. See docs/NOTES.md.
#pragma once
#include <math.h>
#include <stdint.h>

#include "params/rope_params.h"

namespace longctx {
namespace rope {

__device__ __forceinline__ void angle_sin_cos(uint32_t angle_mode, int32_t pos, double inv, float* s,
                                              float* c) {
    if (angle_mode == LONGCTX_ROPE_ANGLE_F32) {
        const float theta = float(pos) * float(inv);
        sincosf(theta, s, c);
    } else {
        // 2*pi split so that k * kTwoPiHi is exact for |k| < 2^20 and the remainder carries
        // the rest of 2*pi's value.
        constexpr double kInvTwoPi = 0.15915494309189535;
        constexpr double kTwoPiHi = 6.283185307179586;
        constexpr double kTwoPiLo = 2.4492935982947064e-16;
        const double theta = double(pos) * inv;
        const double k = rint(theta * kInvTwoPi);
        double r = fma(-k, kTwoPiHi, theta);
        r = fma(-k, kTwoPiLo, r);
        sincosf(float(r), s, c);
    }
}

}  // namespace rope
}  // namespace longctx
