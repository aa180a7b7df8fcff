// Launch shapes of the MoE routing kernels. The host side (src/moe/plan.rs) uses the same
// numbers; keep the two in step.
#pragma once
#include "params/moe_params.h"

namespace longctx {
namespace moe {

constexpr int kWarp = 32;

// Gating, one warp per token: 4 warps (4 tokens) per block. Small blocks keep many tokens in
// flight per SM; a token's work is a handful of shuffles per chosen expert, so latency of the
// logit loads dominates and more resident warps hide it.
constexpr int kGateWarps = 4;
// Most experts a lane holds in registers (consecutive ids; see gate_kernel.cuh).
constexpr int kGateSlots = LONGCTX_MOE_WARP_MAX_EXPERTS / kWarp;
static_assert(kGateSlots == 16, "slot count is part of the register budget");
static_assert(LONGCTX_MOE_WARP_MAX_TOP_K == kWarp, "one chosen expert per lane");

// Gating, one block per token (experts > 512 or top_k > 32): choice scores live in dynamic
// shared memory (5 bytes per expert plus 5 per group; 20 KB at the 4096-expert limit, at
// most 40 KB with one expert per group).
constexpr int kGateBlockThreads = 256;

// Gating backward, one warp per token, experts strided over the lanes (any count).
constexpr int kBwdWarps = 4;

// Router statistics: one block per chunk of tokens.
constexpr int kStatsThreads = 256;
constexpr int kStatsMaxChunkTokens = 256;
// The loss kernel is a single block.
constexpr int kLossThreads = 1024;

// Permutation: count and scatter run one warp per chunk of assignments with a private
// [experts] int32 counter array in dynamic shared memory; the host picks warps per block so
// that warps * experts * 4 bytes stays within 32 KB. The scan is a single block.
constexpr int kScanThreads = 1024;
constexpr int kMaxPermuteWarps = 8;

// Gather / combine: one block per row, 16-byte vectors along hidden.
constexpr int kRowThreads = 128;

// Bias update: a single block.
constexpr int kBiasThreads = 1024;

}  // namespace moe
}  // namespace longctx
