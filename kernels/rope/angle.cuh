// sin and cos of one RoPE angle pos * inv_freq, shared by the RoPE kernel and the KV-cache
// append kernel (which rotates K on its way into the cache), so the two agree bit for bit.
//
// LONGCTX_ROPE_ANGLE_F64: theta = pos * inv_freq in f64, reduced to [-pi, pi] in f64, then
// an accurate f32 sincospi of r / pi; the error stays near 1e-7 rad at positions up to 2^31,
// where an f32 product is already off by ~3e-2 rad at 2^20. LONGCTX_ROPE_ANGLE_F32: HF's
// f32 product, then the same reduction and sincospi. See docs/NOTES.md.
#pragma once
#include <math.h>
#include <stdint.h>

#include "params/rope_params.h"

namespace longctx {
namespace rope {

__device__ __forceinline__ void angle_sin_cos(uint32_t angle_mode, int32_t pos, double inv, float* s,
                                              float* c) {
    // The angle: HF's f32 product (LONGCTX_ROPE_ANGLE_F32, exact in f64), or the f64 one.
    const double theta =
        angle_mode == LONGCTX_ROPE_ANGLE_F32 ? double(float(pos) * float(inv)) : double(pos) * inv;
    // Reduced to [-pi, pi] in f64: the fma forms theta - k * kTwoPiHi with one rounding
    // (|result| <= ~pi, so ~4e-16 off) and kTwoPiLo carries the rest of 2*pi's value.
    constexpr double kInvTwoPi = 0.15915494309189535;
    constexpr double kTwoPiHi = 6.283185307179586;
    constexpr double kTwoPiLo = 2.4492935982947064e-16;
    constexpr double kInvPi = 0.3183098861837907;
    const double k = rint(theta * kInvTwoPi);
    double r = fma(-k, kTwoPiHi, theta);
    r = fma(-k, kTwoPiLo, r);
    // sin and cos of pi (r / pi), whose argument needs no further reduction, so no
    // Payne-Hanek slow path (with its stack frame and call) is compiled in; rounding r / pi to
    // f32 errs by at most pi 2^-25 ~ 9.4e-8 rad. The f32 mode thus keeps HF's error, which is
    // the f32 product's (~3e-2 rad at position 2^20), and adds none of its own.
    sincospif(float(r * kInvPi), s, c);
}

}  // namespace rope
}  // namespace longctx
