// Launch shape of the fused RoPE kernel. The numbers live in params/rope_params.h, which the
// host side reads through bindgen, so the two cannot drift.
#pragma once
#include "params/rope_params.h"

namespace longctx {
namespace rope {

// Threads per block. One block rotates every head of one token: 128 threads cover the 320
// 16-byte work items of a Llama-3-8B token (40 heads x 64 pairs / 8) in three rounds, and
// small blocks keep 16 resident per SM for enough bytes in flight.
constexpr int kThreads = int(LONGCTX_ROPE_THREADS);

// Pairs kept in shared memory per token (cos and sin for each).
constexpr int kMaxPairs = LONGCTX_ROPE_MAX_ROTARY_DIM / 2;
static_assert(kMaxPairs <= 2 * kThreads * 4, "cos/sin fill loop assumes few rounds");

}  // namespace rope
}  // namespace longctx
