// Special functions on the MUFU unit, for the places whose error budget allows them (each
// use says why). Relative errors about 2^-22 (exp2) and 2^-23 (rcp); denormal inputs and
// results flush to zero.
#pragma once

namespace longctx {

// 2^x: 2^-inf = +0, 2^+inf = +inf.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef LONGCTX_EMU
    return ::longctx_emu::ex2_approx_ftz(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// 1 / x: 1 / inf = +0.
__device__ __forceinline__ float fast_rcp(float x) {
#ifdef LONGCTX_EMU
    return ::longctx_emu::rcp_approx_ftz(x);
#else
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// tanh(x) = 1 - 2 / (e^(2x) + 1). Absolute error below 5e-7 for every x (the exp2 error
// enters scaled by 2 e / (e + 1)^2 <= 1/2, the reciprocal's by 2 / (e + 1) <= 2), and it
// saturates to exactly +-1 (2^+inf = inf, 1 / inf = 0). Its relative error near 0 is
// larger, which the softcap does not mind: the softmax sees cap * tanh, whose error is
// absolute.
__device__ __forceinline__ float fast_tanh(float x) {
    return 1.f - 2.f * fast_rcp(fast_exp2(x * 2.88539008177792681f) + 1.f);
}

}  // namespace longctx
