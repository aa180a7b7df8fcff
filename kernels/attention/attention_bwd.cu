// Entry points of the attention backward family: the main kernel per storage type and
// head-dim pair (2 x 5 = 10), deterministic mode's dQ kernel per pair (10), and the two
// row-wise passes per storage type (2 x 2 = 4).
// Masks, softcap, GQA ratio, variable lengths and the accumulate/deterministic flags are
// runtime parameters. The names are listed once more in src/kernel_id.rs (KernelId).
#include "attention/attention_bwd_kernel.cuh"
#include "common/entry.cuh"

using longctx::attn::attn_bwd_body;
using longctx::attn::attn_bwd_dq_body;
using longctx::attn::attn_bwd_pre_body;
using longctx::attn::attn_bwd_dq_det_body;
using longctx::attn::BwdTraits;
using longctx::attn::DqShape;

#define LONGCTX_ATTN_BWD_ENTRY(NAME, T, D, DV)                                      \
    extern "C" __global__ void __launch_bounds__(BwdTraits<D, DV>::kThreads)        \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxAttnBwdParams p) {  \
        attn_bwd_body<T, D, DV>(p);                                                 \
    }

#define LONGCTX_ATTN_BWD_ROW_ENTRY(NAME, BODY, T)                                   \
    extern "C" __global__ void __launch_bounds__(32 * LONGCTX_ATTN_BWD_ROW_WARPS)   \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxAttnBwdParams p) {  \
        BODY<T>(p);                                                                 \
    }

LONGCTX_ATTN_BWD_ROW_ENTRY(longctx_attn_bwd_pre_f16, attn_bwd_pre_body, __half)
LONGCTX_ATTN_BWD_ROW_ENTRY(longctx_attn_bwd_pre_bf16, attn_bwd_pre_body, __nv_bfloat16)
LONGCTX_ATTN_BWD_ROW_ENTRY(longctx_attn_bwd_dq_f16, attn_bwd_dq_body, __half)
LONGCTX_ATTN_BWD_ROW_ENTRY(longctx_attn_bwd_dq_bf16, attn_bwd_dq_body, __nv_bfloat16)

LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_f16_hd64, __half, 64, 64)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_f16_hd96, __half, 96, 96)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_f16_hd128, __half, 128, 128)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_f16_hd192_dv128, __half, 192, 128)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_f16_hd256, __half, 256, 256)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_bf16_hd64, __nv_bfloat16, 64, 64)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_bf16_hd96, __nv_bfloat16, 96, 96)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_bf16_hd128, __nv_bfloat16, 128, 128)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_bf16_hd192_dv128, __nv_bfloat16, 192, 128)
LONGCTX_ATTN_BWD_ENTRY(longctx_attn_bwd_bf16_hd256, __nv_bfloat16, 256, 256)

// Deterministic mode's dQ kernel.
#define LONGCTX_ATTN_BWD_DQ_DET_ENTRY(NAME, T, D, DV)                               \
    extern "C" __global__ void __launch_bounds__(DqShape<D>::kThreads)              \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxAttnBwdParams p) {  \
        attn_bwd_dq_det_body<T, D, DV>(p);                                          \
    }

LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_f16_hd64, __half, 64, 64)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_f16_hd96, __half, 96, 96)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_f16_hd128, __half, 128, 128)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_f16_hd192_dv128, __half, 192, 128)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_f16_hd256, __half, 256, 256)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_bf16_hd64, __nv_bfloat16, 64, 64)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_bf16_hd96, __nv_bfloat16, 96, 96)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_bf16_hd128, __nv_bfloat16, 128, 128)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_bf16_hd192_dv128, __nv_bfloat16, 192, 128)
LONGCTX_ATTN_BWD_DQ_DET_ENTRY(longctx_attn_bwd_dq_det_bf16_hd256, __nv_bfloat16, 256, 256)
