// Entry points of the KV-cache family: merge_states per storage type and access width,
// decode per (attention dtype, cache dtype, head dim), append_kv per (new K/V type, cache
// type, access width). The names are listed once more in src/kernel_id.rs (KernelId); keep
// the two in step. (Extend's entries live in attention/attention.cu: they are the
// attention forward's body.)
#include "kv_cache/append_kernel.cuh"
#include "kv_cache/decode_kernel.cuh"
#include "kv_cache/decode_mma_kernel.cuh"
#include "kv_cache/extend_wide_kernel.cuh"
#include "kv_cache/merge_kernel.cuh"
#include "kv_cache/mla_append_kernel.cuh"
#include "kv_cache/mla_decode_kernel.cuh"

using longctx::kv_cache::append_kernel_body;
using longctx::kv_cache::kAppendThreads;
using longctx::kv_cache::kThreads;
using longctx::kv_cache::merge_kernel_body;

#define LONGCTX_KV_MERGE_ENTRY(NAME, TIN, TOUT, W)                                       \
    extern "C" __global__ void __launch_bounds__(kThreads)                               \
        NAME(const __grid_constant__ LongctxKvMergeParams p) {                           \
        merge_kernel_body<TIN, TOUT, W>(p);                                              \
    }

LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_vec, float, float, 4)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_scalar, float, float, 1)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f16_vec, __half, __half, 8)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f16_scalar, __half, __half, 1)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_bf16_vec, __nv_bfloat16, __nv_bfloat16, 8)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_bf16_scalar, __nv_bfloat16, __nv_bfloat16, 1)
// f32 partial states (split-KV decode's workspace) into an f16 / bf16 output.
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_f16_vec, float, __half, 4)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_f16_scalar, float, __half, 1)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_bf16_vec, float, __nv_bfloat16, 4)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_bf16_scalar, float, __nv_bfloat16, 1)

#define LONGCTX_KV_DECODE_ENTRY(NAME, T, S, D)                                           \
    extern "C" __global__ void __launch_bounds__(longctx::kv_decode::kThreads)           \
        NAME(const __grid_constant__ LongctxKvDecodeParams p) {                          \
        longctx::kv_decode::decode_kernel_body<T, S, D>(p);                              \
    }

// Head dims 64 and 128: tensor cores; 256 and 512: CUDA cores (see the kernels' headers).
#define LONGCTX_KV_DECODE_MMA_ENTRY(NAME, T, S, D)                                       \
    extern "C" __global__ void __launch_bounds__(longctx::kv_decode_mma::Shape<T, S, D>::kThreads) \
        NAME(const __grid_constant__ LongctxKvDecodeParams p) {                          \
        longctx::kv_decode_mma::decode_mma_body<T, S, D>(p);                             \
    }

#define LONGCTX_KV_DECODE_DIMS(PREFIX, T, S)                                             \
    LONGCTX_KV_DECODE_MMA_ENTRY(PREFIX##_hd64, T, S, 64)                                 \
    LONGCTX_KV_DECODE_MMA_ENTRY(PREFIX##_hd128, T, S, 128)                               \
    LONGCTX_KV_DECODE_ENTRY(PREFIX##_hd256, T, S, 256)                                   \
    LONGCTX_KV_DECODE_ENTRY(PREFIX##_hd512, T, S, 512)

LONGCTX_KV_DECODE_DIMS(longctx_kv_decode_f16, __half, __half)
LONGCTX_KV_DECODE_DIMS(longctx_kv_decode_bf16, __nv_bfloat16, __nv_bfloat16)
LONGCTX_KV_DECODE_DIMS(longctx_kv_decode_f16_fp8, __half, uint8_t)
LONGCTX_KV_DECODE_DIMS(longctx_kv_decode_bf16_fp8, __nv_bfloat16, uint8_t)


// T: new K/V type; S: cache type (T itself, or uint8_t for fp8 e4m3 codes).
#define LONGCTX_KV_APPEND_ENTRY(NAME, T, S, W)                                           \
    extern "C" __global__ void __launch_bounds__(kAppendThreads, 1)                      \
        NAME(const __grid_constant__ LongctxKvAppendParams p) {                          \
        append_kernel_body<T, S, W>(p);                                                  \
    }

LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_f16_vec, __half, __half, 8)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_f16_scalar, __half, __half, 1)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_f16_fp8_vec, __half, uint8_t, 8)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_f16_fp8_scalar, __half, uint8_t, 1)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_bf16_vec, __nv_bfloat16, __nv_bfloat16, 8)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_bf16_scalar, __nv_bfloat16, __nv_bfloat16, 1)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_bf16_fp8_vec, __nv_bfloat16, uint8_t, 8)
LONGCTX_KV_APPEND_ENTRY(longctx_kv_append_bf16_fp8_scalar, __nv_bfloat16, uint8_t, 1)

// MLA absorbed decode (mla_decode_kernel.cuh): bf16 queries over a bf16 or fp8 latent cache,
// 16 rows (query token, head) per CTA, or 64 on parts with 160 KB of shared memory per block.
#define LONGCTX_MLA_DECODE_ENTRY(NAME, FP8, RG, MIN_BLOCKS)                              \
    extern "C" __global__ void __launch_bounds__(longctx::mla_decode::Shape<RG>::kThreads, MIN_BLOCKS) \
        NAME(const __grid_constant__ LongctxMlaDecodeParams p) {                         \
        longctx::mla_decode::mla_decode_body<FP8, RG>(p);                                \
    }

LONGCTX_MLA_DECODE_ENTRY(longctx_mla_decode_bf16, false, 1, 1)
LONGCTX_MLA_DECODE_ENTRY(longctx_mla_decode_bf16_fp8, true, 1, 1)
LONGCTX_MLA_DECODE_ENTRY(longctx_mla_decode_r64_bf16, false, 4, 1)
LONGCTX_MLA_DECODE_ENTRY(longctx_mla_decode_r64_bf16_fp8, true, 4, 1)

// The 64-row kernel in thread-block clusters of C = 2 or 4 CTAs (sm_90+): 128 or 256 rows
// share each latent byte read. The portable code keeps the entries (one symbol table for
// every arch) as traps; the host launches them only where the loaded code is sm_90a.
#if LONGCTX_HAS_CLUSTERS && !defined(LONGCTX_EMU)
#define LONGCTX_MLA_CLUSTER_DIMS(C) __cluster_dims__(1, C, 1)
#else
#define LONGCTX_MLA_CLUSTER_DIMS(C)
#endif
#if LONGCTX_HAS_CLUSTERS
#define LONGCTX_MLA_DECODE_CLUSTER_BODY(FP8, C) longctx::mla_decode::mla_decode_body<FP8, 4, C>(p);
#else
#define LONGCTX_MLA_DECODE_CLUSTER_BODY(FP8, C) __trap();
#endif
#define LONGCTX_MLA_DECODE_CLUSTER_ENTRY(NAME, FP8, C)                                           \
    extern "C" __global__ void __launch_bounds__(longctx::mla_decode::Shape<4>::kThreads, 1)     \
        LONGCTX_MLA_CLUSTER_DIMS(C) NAME(const __grid_constant__ LongctxMlaDecodeParams p) {     \
        LONGCTX_MLA_DECODE_CLUSTER_BODY(FP8, C)                                                  \
    }
LONGCTX_MLA_DECODE_CLUSTER_ENTRY(longctx_mla_decode_c2_bf16, false, 2)
LONGCTX_MLA_DECODE_CLUSTER_ENTRY(longctx_mla_decode_c2_bf16_fp8, true, 2)
LONGCTX_MLA_DECODE_CLUSTER_ENTRY(longctx_mla_decode_c4_bf16, false, 4)
LONGCTX_MLA_DECODE_CLUSTER_ENTRY(longctx_mla_decode_c4_bf16_fp8, true, 4)

// MLA latent append (mla_append_kernel.cuh): bf16 rows into a bf16 or fp8 latent cache.
#define LONGCTX_MLA_APPEND_ENTRY(NAME, FP8)                                              \
    extern "C" __global__ void __launch_bounds__(longctx::mla_append::kThreads)          \
        NAME(const __grid_constant__ LongctxMlaAppendParams p) {                         \
        longctx::mla_append::mla_append_body<FP8>(p);                                    \
    }

LONGCTX_MLA_APPEND_ENTRY(longctx_mla_append_bf16, false)
LONGCTX_MLA_APPEND_ENTRY(longctx_mla_append_bf16_fp8, true)

// Extend at head dim 512 (extend_wide_kernel.cuh): the forward's tiles stop at 256. 16 rows
// per CTA, or 64 on parts with 136 KB of shared memory per block.
#define LONGCTX_KV_EXTEND_WIDE_ENTRY(NAME, T, RG, ROT, FP8)                              \
    extern "C" __global__ void __launch_bounds__(longctx::extend_wide::Shape<RG>::kThreads, 1) \
        NAME(const __grid_constant__ LongctxKvExtendParams p) {                          \
        longctx::extend_wide::extend_wide_body<T, RG, ROT, FP8>(p);                      \
    }

LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_f16_hd512, __half, 1, false, false)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_bf16_hd512, __nv_bfloat16, 1, false, false)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_r64_f16_hd512, __half, 4, false, false)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_r64_bf16_hd512, __nv_bfloat16, 4, false, false)
// Keys stored un-rotated: rotation on load (extend_rotating).
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_rot_f16_hd512, __half, 1, true, false)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_rot_bf16_hd512, __nv_bfloat16, 1, true, false)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_rot_r64_f16_hd512, __half, 4, true, false)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_rot_r64_bf16_hd512, __nv_bfloat16, 4, true, false)
// fp8 e4m3 caches under f16 / bf16 queries.
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_f16_fp8_hd512, __half, 1, false, true)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_bf16_fp8_hd512, __nv_bfloat16, 1, false, true)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_r64_f16_fp8_hd512, __half, 4, false, true)
LONGCTX_KV_EXTEND_WIDE_ENTRY(longctx_kv_extend_r64_bf16_fp8_hd512, __nv_bfloat16, 4, false, true)
