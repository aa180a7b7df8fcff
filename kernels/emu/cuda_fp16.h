// f16 storage type of the CPU emulator (stands in for the CUDA toolkit's header): IEEE
// binary16 with round-to-nearest-even conversion from f32, subnormals kept, NaN quieted.
#pragma once
#include <stdint.h>
#include <string.h>

struct __half {
    uint16_t __x;
};
struct alignas(4) __half2 {
    __half x, y;
};

inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
    const uint32_t exp = (h.__x >> 10) & 0x1fu;
    uint32_t man = h.__x & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // Subnormal: value man * 2^-24; normalise.
        int e = -1;
        do {
            man <<= 1;
            ++e;
        } while ((man & 0x400u) == 0);
        bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t abs = u & 0x7fffffffu;
    __half h;
    if (abs > 0x7f800000u) {  // NaN: keep the top payload bits, force quiet
        h.__x = uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
        return h;
    }
    if (abs >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
        h.__x = uint16_t(sign | 0x7c00u);
        return h;
    }
    if (abs < 0x38800000u) {  // below 2^-14: subnormal or zero, step 2^-24
        // abs as a value times 2^24, rounded to nearest even.
        const uint32_t e = abs >> 23;
        if (e < 102) {  // below 2^-25: rounds to zero (2^-25 itself is a tie to even 0)
            h.__x = sign;
            return h;
        }
        const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // value * 2^24 = man >> shift
        uint32_t q = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1u);
        const uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
        h.__x = uint16_t(sign | q);
        return h;
    }
    // Normal: rebias the exponent, round 13 dropped bits to nearest even (a carry into the
    // exponent is the correct result).
    uint32_t r = abs - 0x38000000u;  // exponent bias 127 -> 15
    const uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    h.__x = uint16_t(sign | r);
    return h;
}

inline __half __ushort_as_half(unsigned short x) { return __half{uint16_t(x)}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
