// fp8 e4m3 (the OCP "E4M3FN" format of H100's tensor cores and of vLLM / FlashInfer fp8
// caches): 1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities, 0x7F / 0xFF
// NaN, largest finite 448 = 1.75 x 2^8, subnormals m/8 x 2^-6. Written with integer and
// f16 bit operations so the same code runs on sm_80 (which has no fp8 conversion
// instruction) and in the emulator. src/kv_cache/fp8.rs is the host twin; a test checks the
// two on all 256 codes and on rounding ties.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/dtype.cuh"

namespace longctx {

// The largest finite e4m3 value; quantisation saturates to it.
constexpr float kFp8E4m3Max = 448.0f;

// Rounds x to the nearest e4m3 value (ties to even), saturating at +-448; NaN -> 0x7F.
__device__ __forceinline__ uint8_t f32_to_e4m3(float x) {
    const uint32_t u = __float_as_uint(x);
    const uint32_t sign = (u >> 24) & 0x80u;
    const float a = fabsf(x);
    if (!(a == a)) return 0x7Fu;
    if (a >= kFp8E4m3Max) return uint8_t(sign | 0x7Eu);
    if (a < 0.015625f) {
        // Below the smallest normal 2^-6: multiples of 2^-9 (the product is exact); a result
        // of 8 is the smallest normal, whose code is 0x08, so the carry needs no care.
        return uint8_t(sign | uint32_t(rintf(a * 512.0f)));
    }
    const uint32_t ua = __float_as_uint(a);
    const uint32_t e = (ua >> 23) - 127u + 7u;  // 1 .. 15
    uint32_t keep = (ua >> 20) & 7u;
    const uint32_t rest = ua & 0xFFFFFu;
    if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) ++keep;
    uint32_t bits = (e << 3) + keep;  // a mantissa carry moves into the exponent
    if (bits > 0x7Eu) bits = 0x7Eu;  // unreachable below 448; never produce the NaN code
    return uint8_t(sign | bits);
}

// The f16 whose value is the e4m3 code's value times 2^-8 (exact for every finite code): the
// exponent and mantissa bits moved up by 7 land in f16's fields with bias 15 instead of 7.
// Callers fold the 2^8 into their scale.
__device__ __forceinline__ float e4m3_to_f32_div256(uint32_t b) {
    const uint32_t h = ((b & 0x80u) << 8) | ((b & 0x7Fu) << 7);
    return __half2float(__ushort_as_half((unsigned short)h));
}

__device__ __forceinline__ float e4m3_to_f32(uint32_t b) { return e4m3_to_f32_div256(b) * 256.0f; }

}  // namespace longctx
