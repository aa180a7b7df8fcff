// Entry points of the MoE routing family. Router logits come in f32 or bf16, hidden states in
// f32, bf16 or f16 (f16 only for gather, combine and combine_dw, to bound the instantiation
// matrix: fp16 activations are common in trainers, fp16 router logits are not); everything
// else (ids, counts, slots, weights) has one type. The names are listed once more in
// src/kernel_id.rs (KernelId); keep the two in step.
#include "moe/gate_kernel.cuh"
#include "moe/hidden_kernel.cuh"
#include "moe/loss_kernel.cuh"
#include "moe/permute_kernel.cuh"

using namespace longctx::moe;

#define LONGCTX_MOE_ENTRY(NAME, THREADS, PARAMS, BODY)                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const __grid_constant__ PARAMS p) { \
        BODY(p);                                                                          \
    }

LONGCTX_MOE_ENTRY(longctx_moe_gate_warp_f32, kGateWarps * kWarp, LongctxMoeGateParams, gate_warp_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_gate_warp_bf16, kGateWarps * kWarp, LongctxMoeGateParams, gate_warp_body<__nv_bfloat16>)
LONGCTX_MOE_ENTRY(longctx_moe_gate_block_f32, kGateBlockThreads, LongctxMoeGateParams, gate_block_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_gate_block_bf16, kGateBlockThreads, LongctxMoeGateParams, gate_block_body<__nv_bfloat16>)

LONGCTX_MOE_ENTRY(longctx_moe_gate_bwd_f32, kBwdWarps * kWarp, LongctxMoeGateBwdParams, gate_bwd_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_gate_bwd_bf16, kBwdWarps * kWarp, LongctxMoeGateBwdParams, gate_bwd_body<__nv_bfloat16>)
LONGCTX_MOE_ENTRY(longctx_moe_stats_f32, kStatsThreads, LongctxMoeStatsParams, stats_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_stats_bf16, kStatsThreads, LongctxMoeStatsParams, stats_body<__nv_bfloat16>)
LONGCTX_MOE_ENTRY(longctx_moe_loss, kLossThreads, LongctxMoeLossParams, loss_body)
LONGCTX_MOE_ENTRY(longctx_moe_bias_update, kBiasThreads, LongctxMoeBiasParams, bias_update_body)

LONGCTX_MOE_ENTRY(longctx_moe_count, kMaxPermuteWarps * kWarp, LongctxMoePermuteParams, count_body)
LONGCTX_MOE_ENTRY(longctx_moe_scan, kScanThreads, LongctxMoePermuteParams, scan_body)
LONGCTX_MOE_ENTRY(longctx_moe_scatter, kMaxPermuteWarps * kWarp, LongctxMoePermuteParams, scatter_body)

LONGCTX_MOE_ENTRY(longctx_moe_gather_f32, kRowThreads, LongctxMoeGatherParams, gather_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_gather_bf16, kRowThreads, LongctxMoeGatherParams, gather_body<__nv_bfloat16>)
LONGCTX_MOE_ENTRY(longctx_moe_gather_f16, kRowThreads, LongctxMoeGatherParams, gather_body<__half>)
LONGCTX_MOE_ENTRY(longctx_moe_combine_f32, kRowThreads, LongctxMoeCombineParams, combine_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_combine_bf16, kRowThreads, LongctxMoeCombineParams, combine_body<__nv_bfloat16>)
LONGCTX_MOE_ENTRY(longctx_moe_combine_f16, kRowThreads, LongctxMoeCombineParams, combine_body<__half>)
LONGCTX_MOE_ENTRY(longctx_moe_combine_dw_f32, kRowThreads, LongctxMoeCombineDwParams, combine_dw_body<float>)
LONGCTX_MOE_ENTRY(longctx_moe_combine_dw_bf16, kRowThreads, LongctxMoeCombineDwParams, combine_dw_body<__nv_bfloat16>)
LONGCTX_MOE_ENTRY(longctx_moe_combine_dw_f16, kRowThreads, LongctxMoeCombineDwParams, combine_dw_body<__half>)
