// Entry points of the RoPE family: one per storage type and access width. The names are
// listed once more in src/rope/cuda.rs (KernelId); keep the two in step.
#include "rope/rope_kernel.cuh"

using longctx::rope::kThreads;
using longctx::rope::rope_kernel_body;

#define LONGCTX_ROPE_ENTRY(NAME, T, W)                                                   \
    extern "C" __global__ void __launch_bounds__(kThreads)                               \
        NAME(const __grid_constant__ LongctxRopeParams p) {                              \
        rope_kernel_body<T, W>(p);                                                       \
    }

LONGCTX_ROPE_ENTRY(longctx_rope_f32_vec, float, 4)
LONGCTX_ROPE_ENTRY(longctx_rope_f32_scalar, float, 1)
LONGCTX_ROPE_ENTRY(longctx_rope_f16_vec, __half, 8)
LONGCTX_ROPE_ENTRY(longctx_rope_f16_scalar, __half, 1)
LONGCTX_ROPE_ENTRY(longctx_rope_bf16_vec, __nv_bfloat16, 8)
LONGCTX_ROPE_ENTRY(longctx_rope_bf16_scalar, __nv_bfloat16, 1)
