// Launch shapes of the MoE routing kernels. The numbers live in params/moe_params.h, which
// the host side reads through bindgen, so the two cannot drift; the reasons are here.
#pragma once
#include "params/moe_params.h"

namespace longctx {
namespace moe {

constexpr int kWarp = 32;

// Gating, one warp per token: 4 warps (4 tokens) per block. Small blocks keep many tokens in
// flight per SM; a token's work is a handful of shuffles per chosen expert, so latency of the
// logit loads dominates and more resident warps hide it.
constexpr int kGateWarps = int(LONGCTX_MOE_GATE_WARPS);
// Most experts a lane holds in registers (consecutive ids; see gate_kernel.cuh).
constexpr int kGateSlots = LONGCTX_MOE_WARP_MAX_EXPERTS / kWarp;
static_assert(kGateSlots == 16, "slot count is part of the register budget");
static_assert(LONGCTX_MOE_WARP_MAX_TOP_K == kWarp, "one chosen expert per lane");

// Gating, one block per token (experts > 512 or top_k > 32): choice scores live in dynamic
// shared memory (5 bytes per expert plus 5 per group; 20 KB at the 4096-expert limit, at
// most 40 KB with one expert per group).
constexpr int kGateBlockThreads = int(LONGCTX_MOE_GATE_BLOCK_THREADS);

// Gating backward, one warp per token, experts strided over the lanes (any count).
constexpr int kBwdWarps = int(LONGCTX_MOE_BWD_WARPS);

// Router statistics: one block per chunk of tokens.
constexpr int kStatsThreads = int(LONGCTX_MOE_STATS_THREADS);
constexpr int kStatsMaxChunkTokens = int(LONGCTX_MOE_STATS_MAX_CHUNK_TOKENS);
// The loss kernel is a single block.
constexpr int kLossThreads = int(LONGCTX_MOE_LOSS_THREADS);

// Permutation: count and scatter run one warp per chunk of assignments with a private
// [experts] int32 counter array in dynamic shared memory; the host picks warps per block so
// that warps * experts * 4 bytes stays within 32 KB. The scan is a single block.
constexpr int kScanThreads = int(LONGCTX_MOE_SCAN_THREADS);
constexpr int kMaxPermuteWarps = int(LONGCTX_MOE_MAX_PERMUTE_WARPS);

// Gather / combine: one block per row, 16-byte vectors along hidden.
constexpr int kRowThreads = int(LONGCTX_MOE_ROW_THREADS);

// Bias update: a single block.
constexpr int kBiasThreads = int(LONGCTX_MOE_BIAS_THREADS);

}  // namespace moe
}  // namespace longctx
