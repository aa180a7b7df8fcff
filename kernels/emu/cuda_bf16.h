// bf16 storage type of the CPU emulator (stands in for the CUDA toolkit's header): the top
// 16 bits of an f32, converted with round-to-nearest-even, NaN quieted.
#pragma once
#include <stdint.h>
#include <string.h>

#include "cuda_fp16.h"

struct __nv_bfloat16 {
    uint16_t __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t bits = uint32_t(h.__x) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.__x = uint16_t((u >> 16) | 0x0040u);
        return h;
    }
    const uint32_t rem = u & 0xffffu;
    uint32_t r = u >> 16;
    if (rem > 0x8000u || (rem == 0x8000u && (r & 1u))) ++r;
    h.__x = uint16_t(r);
    return h;
}

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
