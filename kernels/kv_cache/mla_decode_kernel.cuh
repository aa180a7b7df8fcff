// MLA absorbed decode over a paged latent cache on tensor cores (kernels/params/
// kv_cache_params.h has the layouts; src/mla/decode.rs the host side).
//
// Multi-query attention with one KV head of 576 channels (K = [c_kv | k_pe]) whose first 512
// channels are also V. One CTA per (split, row tile, sequence); its rows are (query token,
// head) pairs, so every head of the tile shares each latent byte read. Two shapes:
//   kRowGroups 1: 16 rows (one m16 MMA tile), 4 warps, each warp owning 8 keys of S and 128
//     columns of O (94-98 KB of shared memory: every sm_80+ part);
//   kRowGroups 4: 64 rows (four m16 tiles), 8 warps as 4 row groups x 2 column halves, each
//     warp owning 16 keys of S and 256 columns of O for its 16 rows (154-158 KB: A100 / H100
//     class parts). DeepSeek-V3's 128 heads read each latent byte in 2 CTAs instead of 8.
//   kCluster 2 or 4 (sm_90+, 64 rows per CTA): the CTAs of a thread-block cluster take
//     consecutive row tiles of a (split, sequence), so 128 (or 256: 128 heads x 2 MTP
//     tokens) rows share every latent byte read from global memory: each CTA copies
//     1 / kCluster of each key tile (its keys rank x 32 / kCluster ..) and pushes that part
//     into the other CTAs' shared memory (distributed shared memory) at the same offset;
//     one cluster barrier per tile publishes every part. (128 rows in one CTA do not fit:
//     O alone, 128 x 512 f32, is the whole register file.)
// The CTA walks its split in tiles of 32 keys, double-buffered with cp.async (a page lookup
// per 16-byte chunk). Per tile, for warp (row group rg, column warp cw):
//   S (16 x keys of cw) = Q K^T, k = 576: Q's A fragments by ldmatrix from a swizzled shared
//   copy of Q (reused across the warp's key tiles), K's B fragments by ldmatrix from the
//   swizzled tile;
//   the row maxima of a row group's column warps meet in shared memory, so they hold the same
//   running max; each warp writes its P columns (bf16) to shared memory;
//   O (16 x columns of cw) += P V over all 32 keys, V by ldmatrix.trans on the same tile.
// No cross-warp combine is needed at the end: the column warps share the max, own disjoint
// columns, and only their row sums (over their own keys) are added.
//
// fp8 caches: the latent codes and the bf16 k_pe land in a staging buffer; the codes are
// widened to bf16 (exact: every e4m3 value is a bf16 value) into the swizzled tile, k_pe
// copied beside them; the per-token scale multiplies the latent part of S (before k_pe's
// k-steps are added) and P's columns (for V).
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/cluster.cuh"
#include "common/cp_async.cuh"
#include "common/dtype.cuh"
#include "common/fast_math.cuh"
#include "common/fp8.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"
#include "params/kv_cache_params.h"

namespace longctx {
namespace mla_decode {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kNegInf = -INFINITY;

constexpr int kLat = 512;                         // latent channels (and V's)
constexpr int kRope = 64;                         // k_pe channels
constexpr int kDim = kLat + kRope;                // 576
constexpr int kTileN = int(LONGCTX_MLA_DECODE_TILE_KEYS);
constexpr int kChunks = kDim / 8;                 // 16-byte chunks of a bf16 row: 72
constexpr int kRowBytes = kDim * 2;               // 1152
constexpr int kTileBytes = kTileN * kRowBytes;    // one swizzled bf16 tile
constexpr int kPStride = kTileN * 2 + 16;         // bytes per P row (padded)

static_assert(kTileN % 16 == 0, "P V runs whole k16 steps");
static_assert(kChunks % 8 == 0, "the XOR swizzle stays inside a row");

// The CTA's shape: kRowGroups m16 row tiles, each computed by kColWarps warps.
template <int kRowGroups> struct Shape {
    static constexpr int kColWarps = kRowGroups == 1 ? 4 : 2;
    static constexpr int kWarps = kRowGroups * kColWarps;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRows = 16 * kRowGroups;
    static constexpr int kKeysPerWarp = kTileN / kColWarps;  // S columns of one warp
    static constexpr int kNTiles = kKeysPerWarp / 8;         // n8 tiles of S per warp
    static constexpr int kColsPerWarp = kLat / kColWarps;    // O columns of one warp
    static constexpr int kQBytes = kRows * kRowBytes;
    static constexpr int kPBytes = kRows * kPStride;
    static constexpr int kRedBytes = 2 * kColWarps * kRows * 4;  // row maxima and sums
    static_assert(kKeysPerWarp % 8 == 0, "whole n8 tiles of S per warp");
    static_assert(kColsPerWarp % 16 == 0, "whole ldmatrix.x4.trans pairs of V per warp");
    static_assert(kWarps == int(kRowGroups == 1 ? LONGCTX_MLA_DECODE_WARPS : LONGCTX_MLA_DECODE_R64_WARPS),
                  "warps as the host launches them");
    static_assert(kRows == int(kRowGroups == 1 ? LONGCTX_MLA_DECODE_ROWS : LONGCTX_MLA_DECODE_R64_ROWS),
                  "rows per tile as the host plans them");
};

// kStages tiles in flight: 2 (double buffering), or 3 for the clustered kernels (a stage the
// other CTAs push into while this CTA reads the previous one; see the main loop).
template <bool kFp8, int kRowGroups, int kStages = 2> struct Layout {
    using S = Shape<kRowGroups>;
    // fp8 stage: codes [kTileN][512] then k_pe [kTileN][64] bf16.
    static constexpr int kStageBytes = kFp8 ? kTileN * (kLat + 2 * kRope) : kTileBytes;
    static constexpr int kScaleBytes = kStages * kTileN * 4;       // fp8 scales per stage
    static constexpr int kWide = kStages * kStageBytes;           // fp8: the widened tile
    static constexpr int kQ = kWide + (kFp8 ? kTileBytes : 0);
    static constexpr int kP = kQ + S::kQBytes;
    static constexpr int kRed = kP + S::kPBytes;
    static constexpr int kScale = kRed + S::kRedBytes;
    static constexpr int kBytes = kScale + kScaleBytes;
    static constexpr int kLoadIters =
        kFp8 ? kTileN * (kLat / 16) / S::kThreads : kTileN * kChunks / S::kThreads;
    static_assert(kLoadIters * S::kThreads == (kFp8 ? kTileN * (kLat / 16) : kTileN * kChunks),
                  "the tile's chunks split evenly over the threads");
    static constexpr int kHostBytes =
        kRowGroups == 1 ? int(kFp8 ? LONGCTX_MLA_DECODE_SMEM_FP8 : LONGCTX_MLA_DECODE_SMEM_BF16)
        : kStages == 2  ? int(kFp8 ? LONGCTX_MLA_DECODE_R64_SMEM_FP8 : LONGCTX_MLA_DECODE_R64_SMEM_BF16)
                        : int(kFp8 ? LONGCTX_MLA_DECODE_CLUSTER_SMEM_FP8 : LONGCTX_MLA_DECODE_CLUSTER_SMEM_BF16);
    static_assert(kBytes == kHostBytes, "shared memory size as the host computes it");
    static_assert(kRowGroups != 1 || kBytes <= 99 * 1024, "16 rows fit sm_86 / sm_89's 99 KB per block");
    static_assert(kStages != 2 || kBytes <= 163 * 1024, "64 rows fit sm_80's 163 KB per block");
    static_assert(kBytes <= 227 * 1024, "the clustered kernels fit sm_90's 227 KB per block");
};

// Byte offset of chunk `c` (8 bf16) of row `r` in a swizzled 576-channel tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return uint32_t(r * kRowBytes + ((c ^ (r & 7)) << 4)); }

template <bool kFp8, int kRowGroups, int kCluster = 1>
__device__ __forceinline__ void mla_decode_body(const LongctxMlaDecodeParams& p) {
    static_assert(kCluster == 1 || ((kCluster == 2 || kCluster == 4) && kRowGroups == 4),
                  "clusters group 64-row tiles");
    static_assert(kCluster <= int(LONGCTX_MLA_DECODE_MAX_CLUSTER), "cluster as the host plans it");
    static_assert(kTileN % kCluster == 0, "the cluster's CTAs copy equal parts of a tile");
    using T = __nv_bfloat16;
    using S = Shape<kRowGroups>;
    constexpr int kStages = kCluster > 1 ? 3 : 2;
    using L = Layout<kFp8, kRowGroups, kStages>;
    constexpr int kThreads = S::kThreads;
    constexpr int kRows = S::kRows;
    constexpr int kColWarps = S::kColWarps;
    constexpr int kNT = S::kNTiles;
    constexpr int kColsPerWarp = S::kColsPerWarp;

    LONGCTX_DYNAMIC_SMEM(uint4, smem_main, 16);
    char* const smem = reinterpret_cast<char*>(smem_main);
    float* const red_max = reinterpret_cast<float*>(smem + L::kRed);  // [column warp][row]
    float* const red_sum = red_max + kColWarps * kRows;                // [column warp][row]
    float* const smem_scale = reinterpret_cast<float*>(smem + L::kScale);  // [stage][key]

    const int tid = int(threadIdx.x);
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int rg = warp / kColWarps;  // row group: the CTA's rows 16 rg .. 16 rg + 15
    const int cw = warp % kColWarps;  // column warp: S keys and O columns of the row group

    const int split = int(blockIdx.x);
    const int row_tile = int(blockIdx.y);
    const int b = int(blockIdx.z);
    const int* cu_new = reinterpret_cast<const int*>(p.step.cu_new);
    const int len = reinterpret_cast<const int*>(p.step.seqlens)[b];
    const int tok0 = cu_new[b];
    const int n_new = cu_new[b + 1] - tok0;
    const int heads = int(p.heads);
    const int rows_total = n_new * heads;
    const int r0 = row_tile * kRows;
    // The cluster's CTAs take consecutive row tiles (cluster dims (1, kCluster, 1): the rank
    // is the row tile's place in its pair) and load each key tile together, so they run the
    // same tiles: they leave together, and the keys they walk cover all their rows.
    int rank = 0;
    if constexpr (kCluster > 1) rank = int(cluster_ctarank());
    const int rc0 = r0 - rank * kRows;  // the cluster's first row
    if (rc0 >= rows_total) return;      // no row of the cluster exists: every CTA leaves
    // A row group past the sequence's rows skips its MMAs (its rows are masked anyway) but
    // keeps to the barriers.
    const bool rg_live = r0 + 16 * rg < rows_total;

    // This lane's rows (of the CTA) 16 rg + g and 16 rg + g + 8 see keys 0 ..= row_hi (none
    // past the sequence's rows).
    int row_hi[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r0 + 16 * rg + g + 8 * h;
        row_hi[h] = row < rows_total ? len - n_new + row / heads : -1;
    }
    const int last = min(rc0 + kCluster * kRows, rows_total) - 1;
    const int cta_hi = len - n_new + last / heads;  // the last key any row of the cluster sees
    const int lo = split * int(p.chunk);
    const int hi = min(min(lo + int(p.chunk), len), cta_hi + 1);  // exclusive

    const uint32_t s_base = smem_addr_of(smem);
    const uint32_t q_s = s_base + uint32_t(L::kQ);

    // Q's rows into the swizzled shared copy (zeros for rows past the sequence's).
    for (int i = tid; i < kRows * kChunks; i += kThreads) {
        const int r = i / kChunks;
        const int c = i % kChunks;
        const int row = r0 + r;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row < rows_total) {
            const T* src = reinterpret_cast<const T*>(p.q) + int64_t(tok0 + row / heads) * p.q_token_stride +
                           int64_t(row % heads) * p.q_head_stride + 8 * c;
            x = *reinterpret_cast<const uint4*>(src);
        }
        *reinterpret_cast<uint4*>(smem + L::kQ + swz(r, c)) = x;
    }

    const int page_size = int(p.page_size);
    const int* table = reinterpret_cast<const int*>(p.step.block_table) + int64_t(b) * p.step.max_pages_per_seq;
    const float* scale = reinterpret_cast<const float*>(p.scale);

    auto slot_of = [&](int j) -> int64_t { return int64_t(table[j / page_size]) * page_size + j % page_size; };

    // Keys of a tile this CTA copies: all of them, or its part in a cluster.
    constexpr int kOwnKeys = kTileN / kCluster;
    const int key0 = rank * kOwnKeys;
    auto load_tile = [&](int j0, int st) {
        const uint32_t dst = s_base + uint32_t(st * L::kStageBytes);
        if constexpr (kFp8) {
            constexpr int kCodeChunks = kLat / 16;  // 32 chunks of codes per key
            static_assert(kOwnKeys * kCodeChunks % kThreads == 0, "the codes split evenly over the threads");
#pragma unroll
            for (int i = 0; i < kOwnKeys * kCodeChunks / kThreads; ++i) {
                const int chunk = i * kThreads + tid;
                const int row = key0 + chunk / kCodeChunks;
                const int col = chunk % kCodeChunks;
                const int j = j0 + row;
                const bool valid = j < hi;
                const int64_t slot = slot_of(valid ? j : j0);
                cp_async_16(dst + uint32_t(row * kLat + col * 16),
                            reinterpret_cast<const uint8_t*>(p.latent) + slot * kLat + col * 16, valid);
            }
            constexpr int kRopeChunks = kRope * 2 / 16;  // 8 chunks of k_pe per key
            for (int chunk = tid; chunk < kOwnKeys * kRopeChunks; chunk += kThreads) {
                const int row = key0 + chunk / kRopeChunks;
                const int col = chunk % kRopeChunks;
                const int j = j0 + row;
                const bool valid = j < hi;
                const int64_t slot = slot_of(valid ? j : j0);
                cp_async_16(dst + uint32_t(kTileN * kLat + row * kRope * 2 + col * 16),
                            reinterpret_cast<const T*>(p.rope) + slot * kRope + col * 8, valid);
            }
            if (tid < kOwnKeys) {
                const int j = j0 + key0 + tid;
                smem_scale[st * kTileN + key0 + tid] = j < hi ? scale[slot_of(j)] : 0.f;
            }
        } else {
            constexpr int kItems = kOwnKeys * kChunks;
#pragma unroll 2
            for (int i = 0; i < (kItems + kThreads - 1) / kThreads; ++i) {
                const int chunk = i * kThreads + tid;
                if (kItems % kThreads != 0 && chunk >= kItems) break;
                const int row = key0 + chunk / kChunks;
                const int col = chunk % kChunks;
                const int j = j0 + row;
                const bool valid = j < hi;
                const int64_t slot = slot_of(valid ? j : j0);
                cp_async_16(dst + swz(row, col), reinterpret_cast<const T*>(p.latent) + slot * kDim + col * 8, valid);
            }
        }
    };

    // Cluster: this CTA's part of stage `st` (its keys' rows of the tile, and for fp8 their
    // k_pe rows and scales: contiguous byte ranges) into the other CTAs' shared memory at
    // the same offsets. The caller has waited for its copies and passed a CTA barrier.
    auto push_part = [&](int st) {
        if constexpr (kCluster > 1) {
            auto push = [&](int off, int bytes) {
                const uint4* src = reinterpret_cast<const uint4*>(smem + off);
#pragma unroll
                for (int q = 1; q < kCluster; ++q) {
                    const uint32_t peer = uint32_t((rank + q) % kCluster);
                    uint4* dst = reinterpret_cast<uint4*>(cluster_map_shared(smem + off, peer));
                    for (int i = tid; i < bytes / 16; i += kThreads) dst[i] = src[i];
                }
            };
            if constexpr (kFp8) {
                push(st * L::kStageBytes + key0 * kLat, kOwnKeys * kLat);
                push(st * L::kStageBytes + kTileN * kLat + key0 * kRope * 2, kOwnKeys * kRope * 2);
                push(L::kScale + (st * kTileN + key0) * 4, kOwnKeys * 4);
            } else {
                push(st * L::kStageBytes + key0 * kRowBytes, kOwnKeys * kRowBytes);
            }
        }
    };

    float acc[kColsPerWarp / 8][4];
#pragma unroll
    for (int dj = 0; dj < kColsPerWarp / 8; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dj][e] = 0.f;
    float row_max[2] = {kNegInf, kNegInf};  // raw score units, the same in the row group's warps
    float row_sum[2] = {0.f, 0.f};          // this lane's partial sums over its warp's keys

    const float exp_scale = p.exp_scale;
    const int n0 = cw * S::kKeysPerWarp;  // this warp's first key of a tile for S
    const int lr0 = 16 * rg + g;          // this lane's first row of the CTA (the other: + 8)
    const int n_tiles = hi > lo ? (hi - lo + kTileN - 1) / kTileN : 0;
    // Tile t's work once all of it is in stage `st`: widen (fp8), S, softmax, P V.
    auto run_tile = [&](int t, int st) {
        uint32_t tile = s_base + uint32_t(st * L::kStageBytes);
        if constexpr (kFp8) {
            const char* raw = smem + st * L::kStageBytes;
            char* wide = smem + L::kWide;
            constexpr int kCodeChunks = kLat / 16;
            for (int i = tid; i < kTileN * kCodeChunks; i += kThreads) {
                const int row = i / kCodeChunks;
                const int col = i % kCodeChunks;  // 16 codes = bf16 chunks 2 col, 2 col + 1
                const uint4 x = *reinterpret_cast<const uint4*>(raw + row * kLat + col * 16);
                const uint32_t w[4] = {x.x, x.y, x.z, x.w};
                uint32_t out[8];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    out[2 * q] = MmaType<T>::pack(e4m3_to_f32(w[q] & 0xFFu), e4m3_to_f32((w[q] >> 8) & 0xFFu));
                    out[2 * q + 1] =
                        MmaType<T>::pack(e4m3_to_f32((w[q] >> 16) & 0xFFu), e4m3_to_f32(w[q] >> 24));
                }
                *reinterpret_cast<uint4*>(wide + swz(row, 2 * col)) = make_uint4(out[0], out[1], out[2], out[3]);
                *reinterpret_cast<uint4*>(wide + swz(row, 2 * col + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
            }
            constexpr int kRopeChunks = kRope * 2 / 16;
            for (int i = tid; i < kTileN * kRopeChunks; i += kThreads) {
                const int row = i / kRopeChunks;
                const int col = i % kRopeChunks;
                *reinterpret_cast<uint4*>(wide + swz(row, kLat / 8 + col)) =
                    *reinterpret_cast<const uint4*>(raw + kTileN * kLat + row * kRope * 2 + col * 16);
            }
            __syncthreads();
            tile = s_base + uint32_t(L::kWide);
        }

        // S = Q K^T for this warp's keys; s[nt][2h + e] is row lr0 + 8h, key n0 + 8 nt + 2 t4 + e.
        float s[kNT][4];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
        const int qr = 16 * rg + (lane & 15);
        auto s_steps = [&](int kk0, int kk1) {
#pragma unroll 4
            for (int kk = kk0; kk < kk1; ++kk) {
                // Two k16 steps: Q's A fragments (rows of the group, chunks 4kk .. 4kk + 3),
                // then per n8 tile the K matrices (8 keys, the same chunks).
                uint32_t qa0[4], qa1[4];
                ldmatrix_x4(qa0, q_s + swz(qr, 4 * kk + (lane >> 4)));
                ldmatrix_x4(qa1, q_s + swz(qr, 4 * kk + 2 + (lane >> 4)));
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) {
                    uint32_t bk[4];
                    ldmatrix_x4(bk, tile + swz(n0 + 8 * nt + (lane & 7), 4 * kk + (lane >> 3)));
                    mma_16816<T>(s[nt], qa0, bk[0], bk[1]);
                    mma_16816<T>(s[nt], qa1, bk[2], bk[3]);
                }
            }
        };
        const int j_base = lo + t * kTileN + n0 + 2 * t4;
        float vsc[kNT][2];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) vsc[nt][0] = vsc[nt][1] = 1.f;
        if (rg_live) {
            if constexpr (kFp8) {
                s_steps(0, kLat / 32);
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        vsc[nt][e] = smem_scale[st * kTileN + n0 + 8 * nt + 2 * t4 + e];
                        s[nt][e] *= vsc[nt][e];
                        s[nt][2 + e] *= vsc[nt][e];
                    }
                }
                s_steps(kLat / 32, kDim / 32);
            } else {
                s_steps(0, kDim / 32);
            }
        }

        // Mask; the tile's row maxima through shared memory.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = kNegInf;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = j_base + 8 * nt + e;
                    if (j >= hi || j > row_hi[h]) s[nt][2 * h + e] = kNegInf;
                    mx = fmaxf(mx, s[nt][2 * h + e]);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
            if (t4 == 0) red_max[cw * kRows + lr0 + 8 * h] = mx;
        }
        __syncthreads();

        // Online softmax with the row group's max; P (times the fp8 scale) to shared memory.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = lr0 + 8 * h;
            float mx = red_max[r];
#pragma unroll
            for (int w = 1; w < kColWarps; ++w) mx = fmaxf(mx, red_max[w * kRows + r]);
            const float m_new = fmaxf(row_max[h], mx);
            // A row with no visible key so far keeps max -inf: 0 stands in for it, so the
            // factors are 2^-inf = 0 instead of NaN.
            const float m_use = m_new == kNegInf ? 0.f : m_new;
            const float corr = fast_exp2((row_max[h] - m_use) * exp_scale);
            row_max[h] = m_new;
            row_sum[h] *= corr;
#pragma unroll
            for (int dj = 0; dj < kColsPerWarp / 8; ++dj) {
                acc[dj][2 * h] *= corr;
                acc[dj][2 * h + 1] *= corr;
            }
            const float m_scaled = m_use * exp_scale;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                const float p0 = fast_exp2(fmaf(s[nt][2 * h], exp_scale, -m_scaled));
                const float p1 = fast_exp2(fmaf(s[nt][2 * h + 1], exp_scale, -m_scaled));
                row_sum[h] += p0 + p1;
                *reinterpret_cast<uint32_t*>(smem + L::kP + r * kPStride + (n0 + 8 * nt + 2 * t4) * 2) =
                    MmaType<T>::pack(p0 * vsc[nt][0], p1 * vsc[nt][1]);
            }
        }
        __syncthreads();

        // O[rows of rg, columns of cw] += P V over the tile's 32 keys.
        if (rg_live) {
#pragma unroll
            for (int ks = 0; ks < kTileN / 16; ++ks) {
                uint32_t pa[4];
                const char* prow = smem + L::kP + (16 * ks + 2 * t4) * 2;
                pa[0] = *reinterpret_cast<const uint32_t*>(prow + lr0 * kPStride);
                pa[1] = *reinterpret_cast<const uint32_t*>(prow + (lr0 + 8) * kPStride);
                pa[2] = *reinterpret_cast<const uint32_t*>(prow + lr0 * kPStride + 16);
                pa[3] = *reinterpret_cast<const uint32_t*>(prow + (lr0 + 8) * kPStride + 16);
#pragma unroll
                for (int dp = 0; dp < kColsPerWarp / 16; ++dp) {
                    // Matrices: (keys 0-7, cols lo), (keys 8-15, cols lo), (keys 0-7, cols hi),
                    // (keys 8-15, cols hi).
                    const int vr = 16 * ks + (lane & 15);
                    const int vc = cw * (kColsPerWarp / 8) + 2 * dp + (lane >> 4);
                    uint32_t bv[4];
                    ldmatrix_x4_trans(bv, tile + swz(vr, vc));
                    mma_16816<T>(acc[2 * dp], pa, bv[0], bv[1]);
                    mma_16816<T>(acc[2 * dp + 1], pa, bv[2], bv[3]);
                }
            }
        }
    };

    if constexpr (kCluster == 1) {
        if (n_tiles > 0) {
            load_tile(lo, 0);
            cp_async_commit();
        }
        for (int t = 0; t < n_tiles; ++t) {
            const int st = t & 1;
            cp_async_wait<0>();
            __syncthreads();  // tile t (and Q) landed; every warp is done with tile t - 1 and P
            if (t + 1 < n_tiles) {
                load_tile(lo + (t + 1) * kTileN, st ^ 1);
                cp_async_commit();
            }
            run_tile(t, st);
        }
    } else {
        // Three stages and one cluster-barrier phase per tile. Phase t covers the pushes of
        // tile t (before each CTA's arrival); a CTA waits for it just before tile t's work,
        // then pushes its part of tile t + 1, issues its copy of tile t + 2 and arrives, so
        // the barrier and the pushes overlap tile t's MMAs. A push into stage (t + 1) % 3 of
        // another CTA follows that CTA's arrival for phase t, made after its tile t - 2
        // (the stage's previous contents); a copy into this CTA's own part of a stage
        // follows its own CTA barrier.
        if (n_tiles > 0) {
            load_tile(lo, 0);
            cp_async_commit();
        }
        if (n_tiles > 1) {
            load_tile(lo + kTileN, 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this CTA's part of tile 0 (and Q) landed
        if (n_tiles > 0) {
            push_part(0);
            LONGCTX_CLUSTER_ARRIVE();
        }
        for (int t = 0; t < n_tiles; ++t) {
            const int st = t % kStages;
            cp_async_wait<0>();
            __syncthreads();         // this CTA's part of tile t + 1 landed; its warps are done with tile t - 1
            LONGCTX_CLUSTER_WAIT();  // every part of tile t is here
            if (t + 1 < n_tiles) {
                push_part((t + 1) % kStages);
                if (t + 2 < n_tiles) {
                    load_tile(lo + (t + 2) * kTileN, (t + 2) % kStages);
                    cp_async_commit();
                }
                LONGCTX_CLUSTER_ARRIVE();
            }
            run_tile(t, st);
        }
    }

    // Row sums: over the lane quad, then over the row group's column warps.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = row_sum[h];
        l += __shfl_xor_sync(kFullMask, l, 1);
        l += __shfl_xor_sync(kFullMask, l, 2);
        if (t4 == 0) red_sum[cw * kRows + lr0 + 8 * h] = l;
    }
    __syncthreads();

    const bool one_split = p.splits == 1;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = lr0 + 8 * h;
        const int row = r0 + r;
        if (row >= rows_total) continue;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kColWarps; ++w) sum += red_sum[w * kRows + r];
        const bool seen = row_max[h] != kNegInf && sum > 0.f;
        const float inv = seen ? 1.f / sum : 0.f;
        const float lse = seen ? (row_max[h] * exp_scale + log2f(sum)) * 0.6931471805599453f : kNegInf;
        const int64_t token = tok0 + row / heads;
        const int64_t head = row % heads;
        if (one_split) {
            T* out = reinterpret_cast<T*>(p.o) + token * p.o_token_stride + head * p.o_head_stride;
#pragma unroll
            for (int dj = 0; dj < kColsPerWarp / 8; ++dj) {
                const int c = cw * kColsPerWarp + 8 * dj + 2 * t4;
                out[c] = DType<T>::from_f32(acc[dj][2 * h] * inv);
                out[c + 1] = DType<T>::from_f32(acc[dj][2 * h + 1] * inv);
            }
            if (cw == 0 && t4 == 0 && p.lse != 0)
                reinterpret_cast<float*>(p.lse)[head * p.lse_head_stride + token] = lse;
        } else {
            float* out = reinterpret_cast<float*>(p.part_o) + ((int64_t(split) * p.total_new + token) * heads + head) * kLat;
#pragma unroll
            for (int dj = 0; dj < kColsPerWarp / 8; ++dj) {
                const int c = cw * kColsPerWarp + 8 * dj + 2 * t4;
                out[c] = acc[dj][2 * h] * inv;
                out[c + 1] = acc[dj][2 * h + 1] * inv;
            }
            if (cw == 0 && t4 == 0)
                reinterpret_cast<float*>(p.part_lse)[(int64_t(split) * heads + head) * p.total_new + token] = lse;
        }
    }
}

}  // namespace mla_decode
}  // namespace longctx
