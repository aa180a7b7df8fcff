// Entry points of the KV-cache family: merge_states per storage type and access width. The
// names are listed once more in src/kernel_id.rs (KernelId); keep the two in step.
#include "kv_cache/merge_kernel.cuh"

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
