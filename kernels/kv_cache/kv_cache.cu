// Entry points of the KV-cache family: merge_states per storage type and access width, and
// append_kv per (new K/V type, cache type, access width). The names are listed once more in
// src/kernel_id.rs (KernelId); keep the two in step.
#include "kv_cache/append_kernel.cuh"
#include "kv_cache/merge_kernel.cuh"

using longctx::kv_cache::append_kernel_body;
using longctx::kv_cache::kAppendThreads;
using longctx::kv_cache::kThreads;
using longctx::kv_cache::merge_kernel_body;

#define LONGCTX_KV_MERGE_ENTRY(NAME, T, W)                                               \
    extern "C" __global__ void __launch_bounds__(kThreads)                               \
        NAME(const __grid_constant__ LongctxKvMergeParams p) {                           \
        merge_kernel_body<T, W>(p);                                                      \
    }

LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_vec, float, 4)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f32_scalar, float, 1)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f16_vec, __half, 8)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_f16_scalar, __half, 1)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_bf16_vec, __nv_bfloat16, 8)
LONGCTX_KV_MERGE_ENTRY(longctx_kv_merge_bf16_scalar, __nv_bfloat16, 1)

// T: new K/V type; S: cache type (T itself, or uint8_t for fp8 e4m3 codes).
#define LONGCTX_KV_APPEND_ENTRY(NAME, T, S, W)                                           \
    extern "C" __global__ void __launch_bounds__(kAppendThreads)                         \
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
