// Compile-time shape of one attention forward kernel (one per head-dim pair). The numbers
// come from kernels/params/attention_params.h, which src/attention/plan.rs checks against
// its own tile table, so host and device cannot disagree.
#pragma once
#include "params/attention_params.h"

namespace longctx {
namespace attn {

// Keys per K/V tile of the code being compiled: the sm90 column for compute_90 and up (and
// for the emulator's sm_90a build of the family).
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(LONGCTX_EMU_SM90)
#define LONGCTX_ATTN_ARCH_BLOCK_N(PREFIX) LONGCTX_ATTN_##PREFIX##_SM90_BLOCK_N
#else
#define LONGCTX_ATTN_ARCH_BLOCK_N(PREFIX) LONGCTX_ATTN_##PREFIX##_BLOCK_N
#endif

template <int D, int DV> struct TileShape;
#define LONGCTX_ATTN_TILE_SHAPE(D, DV, PREFIX)                   \
    template <> struct TileShape<D, DV> {                        \
        static constexpr int kBlockM = LONGCTX_ATTN_##PREFIX##_BLOCK_M; \
        static constexpr int kBlockN = LONGCTX_ATTN_ARCH_BLOCK_N(PREFIX); \
        static constexpr int kWarps = LONGCTX_ATTN_##PREFIX##_WARPS;    \
    };
LONGCTX_ATTN_TILE_SHAPE(64, 64, HD64)
LONGCTX_ATTN_TILE_SHAPE(96, 96, HD96)
LONGCTX_ATTN_TILE_SHAPE(128, 128, HD128)
LONGCTX_ATTN_TILE_SHAPE(192, 128, HD192)
LONGCTX_ATTN_TILE_SHAPE(256, 256, HD256)
#undef LONGCTX_ATTN_TILE_SHAPE

constexpr int round_up_64(int x) { return (x + 63) / 64 * 64; }

template <int D_, int DV_> struct Traits {
    static constexpr int D = D_;    // channels of Q and K
    static constexpr int DV = DV_;  // channels of V and O
    static constexpr int kBlockM = TileShape<D, DV>::kBlockM;  // query rows per CTA
    static constexpr int kBlockN = TileShape<D, DV>::kBlockN;  // keys per K/V tile
    static constexpr int kWarps = TileShape<D, DV>::kWarps;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRowsPerWarp = kBlockM / kWarps;  // consecutive query rows per warp
    static constexpr int kMTiles = kRowsPerWarp / 16;      // m16 MMA tiles per warp
    static constexpr int kNTiles = kBlockN / 8;            // n8 tiles of S per row block
    static constexpr int kDvTiles = DV / 8;                // n8 tiles of O per row block

    // Shared-memory rows, in elements: padded to 64 (128 bytes) so the XOR swizzle of the
    // 16-byte chunk index by row % 8 stays inside the row (only d = 96 is padded).
    static constexpr int kRowQK = round_up_64(D);
    static constexpr int kRowV = round_up_64(DV);
    static constexpr int kSmemQ = kBlockM * kRowQK * 2;  // bytes of the Q tile [kBlockM][kRowQK]
    static constexpr int kSmemK = kBlockN * kRowQK * 2;  // bytes of the K tile [kBlockN][kRowQK]
    static constexpr int kSmemV = kBlockN * kRowV * 2;   // bytes of the V tile [kBlockN][kRowV]
    static constexpr int kSmemBytes = kSmemQ + kSmemK + kSmemV;

    static_assert(D % 16 == 0 && DV % 16 == 0, "head dims are whole MMA k/n steps");
    static_assert(kBlockM % kWarps == 0 && kRowsPerWarp % 16 == 0, "each warp owns whole m16 tiles");
    static_assert(kBlockN % 16 == 0, "a K/V tile is whole k16 steps of P V");
    static_assert(DV <= D, "the O tile is staged in the Q tile's rows");
    static_assert((kBlockM * (D / 8)) % kThreads == 0, "Q tile loads split evenly over threads");
    static_assert((kBlockN * (D / 8)) % kThreads == 0, "K tile loads split evenly over threads");
    static_assert((kBlockN * (DV / 8)) % kThreads == 0, "V tile loads split evenly over threads");
    static_assert(kSmemBytes <= 99 * 1024, "fits the smallest per-block shared memory (sm86/sm89)");
};

}  // namespace attn
}  // namespace longctx
