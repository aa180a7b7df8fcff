// The CUDA builtins the kernels use, defined for the host C++ compiler, so that the kernel
// sources in kernels/ compile unmodified into the CPU emulator (force-included before every
// .cu file of an emulator build, with -DLONGCTX_EMU). Thread and block indices, barriers,
// warp collectives and traps go to the runtime (runtime.h); the inline-PTX wrappers of
// kernels/common/ have their own emulated branch. Math functions are the host's: the
// emulator does not model nvcc's FMA contraction or the device libm's last-bit behaviour.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "emu/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// `__shared__` is deliberately not defined: kernels declare shared memory through
// common/smem.cuh, whose emulated branch places it in the CTA's checked arena.

typedef longctx_emu::Dim3 uint3;
typedef longctx_emu::Dim3 dim3;
#define threadIdx (::longctx_emu::thread_idx())
#define blockIdx (::longctx_emu::block_idx())
#define blockDim (::longctx_emu::block_dim())
#define gridDim (::longctx_emu::grid_dim())
#define warpSize 32

struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }

// CUDA's overloaded integer min/max.
#define LONGCTX_EMU_MINMAX(T)                              \
    inline T min(T a, T b) { return a < b ? a : b; }       \
    inline T max(T a, T b) { return a > b ? a : b; }
LONGCTX_EMU_MINMAX(int)
LONGCTX_EMU_MINMAX(unsigned)
LONGCTX_EMU_MINMAX(long)
LONGCTX_EMU_MINMAX(unsigned long)
LONGCTX_EMU_MINMAX(long long)
LONGCTX_EMU_MINMAX(unsigned long long)
#undef LONGCTX_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Bit casts and bit counts.
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; memcpy(&x, &d, 8); return x; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}

// Rounding-explicit and fast math (the host's IEEE operations; the fast variants are
// held to the accurate result, which is within their documented error).
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.f : fminf(fmaxf(x, 0.f), 1.f); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
// sin(pi x) and cos(pi x), rounded from f64 after an exact reduction of x modulo 2.
inline void sincospif(float x, float* s, float* c) {
    double r = fmod(double(x), 2.0);  // exact
    if (r > 1.0) r -= 2.0;
    if (r < -1.0) r += 2.0;
    *s = float(sin(3.141592653589793 * r));
    *c = float(cos(3.141592653589793 * r));
}

template <typename T> inline T __ldg(const T* p) { return *p; }
inline void __threadfence() {}
inline void __threadfence_block() {}

#define __syncthreads() ::longctx_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::longctx_emu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __trap() ::longctx_emu::trap(__FILE__, __LINE__)
#define __activemask() ::longctx_emu::activemask()
#define __ballot_sync(mask, pred) ::longctx_emu::vote(__FILE__, __LINE__, ::longctx_emu::kVoteBallot, (mask), bool(pred))
#define __any_sync(mask, pred) (int(::longctx_emu::vote(__FILE__, __LINE__, ::longctx_emu::kVoteAny, (mask), bool(pred))))
#define __all_sync(mask, pred) (int(::longctx_emu::vote(__FILE__, __LINE__, ::longctx_emu::kVoteAll, (mask), bool(pred))))

namespace longctx_emu {
template <typename T>
inline T shfl_t(const char* file, int line, int mode, unsigned mask, T v, int c, int width = 32) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof(T));
    raw = shfl_raw(file, line, mode, mask, raw, int(sizeof(T)), c, width);
    T out;
    memcpy(&out, &raw, sizeof(T));
    return out;
}
}  // namespace longctx_emu
#define __shfl_sync(mask, v, ...) ::longctx_emu::shfl_t(__FILE__, __LINE__, ::longctx_emu::kShflIdx, (mask), (v), __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::longctx_emu::shfl_t(__FILE__, __LINE__, ::longctx_emu::kShflUp, (mask), (v), __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ::longctx_emu::shfl_t(__FILE__, __LINE__, ::longctx_emu::kShflDown, (mask), (v), __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ::longctx_emu::shfl_t(__FILE__, __LINE__, ::longctx_emu::kShflXor, (mask), (v), __VA_ARGS__)

namespace longctx_emu {
template <typename T>
inline unsigned match_any_t(const char* file, int line, unsigned mask, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "match compares 32- or 64-bit values");
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof(T));
    return match_any(file, line, mask, raw);
}
}  // namespace longctx_emu
#define __match_any_sync(mask, v) ::longctx_emu::match_any_t(__FILE__, __LINE__, (mask), (v))

inline size_t __cvta_generic_to_shared(const void* p) { return ::longctx_emu::smem_addr(p); }

inline float atomicAdd(float* p, float v) { return ::longctx_emu::atomic_add_f32(p, v); }
inline int atomicAdd(int* p, int v) { return ::longctx_emu::atomic_add_i32(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::longctx_emu::atomic_add_u32(p, v); }
inline int atomicMax(int* p, int v) { return ::longctx_emu::atomic_max_i32(p, v); }
inline int atomicCAS(int* p, int cmp, int v) { return ::longctx_emu::atomic_cas_i32(p, cmp, v); }
