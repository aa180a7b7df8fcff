// Extend (chunked prefill) over a paged cache at head dim 512 on tensor cores (kernels/params/
// kv_cache_params.h has the layouts; src/kv_cache/extend.rs the host side).
//
// The attention forward's tile table stops at head dim 256: a 64-row tile's O at 512 columns
// is 256 f32 per lane. This kernel packs rows differently, as the MLA decode does: one CTA per
// (row tile, KV head, sequence); its R rows are (new token, query head of the KV head's
// group) pairs, row = token x group + head-in-group, each with its own causal (bottom-right)
// and window bounds, so a chunk of any length runs in ceil(tokens x group / R) row tiles and
// every query head of the group shares each K/V byte the CTA reads. Two shapes:
//   kRowGroups 1: R = 16, 4 warps, 84 KB of shared memory (every sm_80+ part);
//   kRowGroups 4: R = 64, 8 warps as 4 row groups (m16 tiles) x 2 column warps, 136 KB (A100 /
//     H100 class): each K/V tile serves 4x the rows.
// Per tile of 32 keys, warp (row group rg, column warp cw):
//   S (16 x keys of cw) = Q K^T, k = 512: Q's A fragments by ldmatrix from a swizzled shared
//   copy of Q (reused across the warp's n8 key tiles), K's B fragments by ldmatrix from the
//   swizzled K tile; softcap; the row group's column warps' row maxima meet in shared memory,
//   so they carry the same running max; each warp writes its P columns to shared memory;
//   O (16 x 512 / C) += P V: warp cw owns O's columns 512 / C x cw .. (64 f32 a lane at
//   C = 4 column warps, 128 at C = 2), V by ldmatrix.trans from the V tile.
// K and V have one shared-memory buffer each (32 KB) and are pipelined as FlashAttention-2
// does: V(t) is copied while S(t) is computed, K(t + 1) while P V(t) is.
// kRotate (keys stored un-rotated, exact dynamic scaling): Q's rows, once in shared memory,
// and each K tile, once landed, are rotated in place at their positions with the sequence's
// inv_freq row and attention factor (kv_cache/rotate.cuh, the rotating decode's and the
// forward's rotation), before any ldmatrix reads them.
// kFp8 (e4m3 caches): each K or V tile's codes land in one 16 KB staging tile and are widened
// to T(code x scale) in the K or V tile (the arithmetic of the forward's fp8 extend, so the
// result is the 16-bit kernel's over the dequantised cache, bit for bit); the staging tile
// alternates: K(t)'s codes are widened, then V(t)'s copied during S(t) and widened, then
// K(t + 1)'s copied during P V(t).
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/cp_async.cuh"
#include "common/dtype.cuh"
#include "common/fast_math.cuh"
#include "common/fp8.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"
#include "kv_cache/rotate.cuh"
#include "params/attention_params.h"
#include "params/kv_cache_params.h"

namespace longctx {
namespace extend_wide {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kNegInf = -INFINITY;

constexpr int kDim = 512;
constexpr int kTileN = int(LONGCTX_KV_EXTEND_WIDE_TILE_KEYS);
constexpr int kChunks = kDim / 8;               // 16-byte chunks of a row: 64
constexpr int kRowBytes = kDim * 2;             // 1024
constexpr int kTileBytes = kTileN * kRowBytes;  // one swizzled K or V tile
constexpr int kPStride = kTileN * 2 + 16;       // bytes per P row (padded)

static_assert(kTileN % 16 == 0, "P V runs whole k16 steps");

template <int kRowGroups> struct Shape {
    static constexpr int kColWarps = kRowGroups == 1 ? 4 : 2;
    static constexpr int kWarps = kRowGroups * kColWarps;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRows = 16 * kRowGroups;
    static constexpr int kKeysPerWarp = kTileN / kColWarps;  // S columns of one warp
    static constexpr int kNTiles = kKeysPerWarp / 8;
    static constexpr int kColsPerWarp = kDim / kColWarps;    // O columns of one warp
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + kTileBytes;
    static constexpr int kOffQ = kOffV + kTileBytes;
    static constexpr int kOffP = kOffQ + kRows * kRowBytes;
    static constexpr int kOffRed = kOffP + kRows * kPStride;
    static constexpr int kSmemBytes = kOffRed + 2 * kColWarps * kRows * 4;
    // fp8: the staging tile of codes and the tile rows' scales (x 256) after the rest.
    static constexpr int kOffStage = kSmemBytes;
    static constexpr int kOffScale = kOffStage + kTileN * kDim;
    static constexpr int kSmemBytesFp8 = kOffScale + kTileN * 4;
    static_assert(kKeysPerWarp % 8 == 0, "whole n8 tiles of S per warp");
    static_assert(kTileN * kChunks % kThreads == 0, "a tile's chunks split evenly over the threads");
    static_assert(kWarps == int(kRowGroups == 1 ? LONGCTX_KV_EXTEND_WIDE_WARPS : LONGCTX_KV_EXTEND_WIDE_R64_WARPS),
                  "warps as the host launches them");
    static_assert(kRows == int(kRowGroups == 1 ? LONGCTX_KV_EXTEND_WIDE_ROWS : LONGCTX_KV_EXTEND_WIDE_R64_ROWS),
                  "rows per tile as the host plans them");
    static_assert(kSmemBytes == int(kRowGroups == 1 ? LONGCTX_KV_EXTEND_WIDE_SMEM : LONGCTX_KV_EXTEND_WIDE_R64_SMEM),
                  "shared memory as the host computes it");
    static_assert(kSmemBytesFp8 == int(kRowGroups == 1 ? LONGCTX_KV_EXTEND_WIDE_SMEM_FP8 : LONGCTX_KV_EXTEND_WIDE_R64_SMEM_FP8),
                  "fp8 shared memory as the host computes it");
    static_assert(kRowGroups != 1 || kSmemBytesFp8 <= 99 * 1024, "16 rows fit sm_86 / sm_89's 99 KB per block");
    static_assert(kSmemBytesFp8 <= 163 * 1024, "64 rows fit sm_80's 163 KB per block");
};

// Byte offset of chunk `c` (8 elements) of row `r` in a swizzled 512-channel tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return uint32_t(r * kRowBytes + ((c ^ (r & 7)) << 4)); }

// Rotates rows r < valid of a swizzled 512-channel tile in place, row r at pos_of(r); each of
// a row's rotary_dim / 2 pairs by one thread (pairs are disjoint). Not unrolled: it runs
// while O's accumulators are live.
template <typename T, int kThreads, typename PosOf>
__device__ __forceinline__ void rotate_rows(const LongctxKvExtendParams& p, const double* inv, float factor,
                                            char* tile, int valid, int tid, PosOf pos_of) {
    const int half = int(p.rotary_dim) / 2;
    const bool neox = p.rope_style == LONGCTX_ROPE_STYLE_NEOX;
#pragma unroll 1
    for (int i = tid; i < valid * half; i += kThreads) {
        const int r = i / half;
        const int pair = i - r * half;
        const int ca = neox ? pair : 2 * pair;
        const int cb = neox ? pair + half : 2 * pair + 1;
        T* ea = reinterpret_cast<T*>(tile + swz(r, ca / 8)) + ca % 8;
        T* eb = reinterpret_cast<T*>(tile + swz(r, cb / 8)) + cb % 8;
        kv_rotate::rotate_pair(p, inv[pair], factor, pos_of(r), ea, eb);
    }
}

// Widens the staged codes of a tile (kTileN rows of kDim codes) into the swizzled T tile:
// element (r, c) = T(e4m3(code) / 256 x scale256[r]), one rounding from the f32 product.
template <typename T, int kThreads>
__device__ __forceinline__ void widen_tile(const char* stage, const float* scale256, char* tile, int tid) {
    constexpr int kRawChunks = kDim / 16;  // 16 codes each
#pragma unroll 1
    for (int i = tid; i < kTileN * kRawChunks; i += kThreads) {
        const int row = i / kRawChunks;
        const int col = i - row * kRawChunks;
        const uint4 x = *reinterpret_cast<const uint4*>(stage + row * kDim + col * 16);
        const float sc = scale256[row];
        const uint32_t w[4] = {x.x, x.y, x.z, x.w};
        uint32_t out[8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t two = w[q] >> (16 * h);
                out[2 * q + h] =
                    MmaType<T>::pack(e4m3_to_f32_div256(two & 0xFFu) * sc, e4m3_to_f32_div256((two >> 8) & 0xFFu) * sc);
            }
        }
        *reinterpret_cast<uint4*>(tile + swz(row, 2 * col)) = make_uint4(out[0], out[1], out[2], out[3]);
        *reinterpret_cast<uint4*>(tile + swz(row, 2 * col + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
    }
}

template <typename T, int kRowGroups, bool kRotate, bool kFp8>
__device__ __forceinline__ void extend_wide_body(const LongctxKvExtendParams& p) {
    using S = Shape<kRowGroups>;
    constexpr int kThreads = S::kThreads;
    constexpr int kRows = S::kRows;
    constexpr int kColWarps = S::kColWarps;
    constexpr int kNT = S::kNTiles;
    constexpr int kColsPerWarp = S::kColsPerWarp;

    LONGCTX_DYNAMIC_SMEM(uint4, smem_main, 16);
    char* const smem = reinterpret_cast<char*>(smem_main);
    float* const red_max = reinterpret_cast<float*>(smem + S::kOffRed);  // [column warp][row]
    float* const red_sum = red_max + kColWarps * kRows;                   // [column warp][row]

    const int tid = int(threadIdx.x);
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int rg = warp / kColWarps;  // row group: the CTA's rows 16 rg .. 16 rg + 15
    const int cw = warp % kColWarps;  // column warp: S keys and O columns of the row group

    const int row_tile = int(blockIdx.x);
    const int head_kv = int(blockIdx.y);
    const int b = int(blockIdx.z);
    const int* cu_new = reinterpret_cast<const int*>(p.step.cu_new);
    const int len = reinterpret_cast<const int*>(p.step.seqlens)[b];
    const int tok0 = cu_new[b];
    const int n_new = cu_new[b + 1] - tok0;
    const int group = int(p.attn.heads_per_kv);
    const int rows_total = n_new * group;
    const int r0 = row_tile * kRows;
    if (r0 >= rows_total) return;  // the whole CTA leaves: no row of this tile exists
    // A row group past the sequence's rows skips its MMAs (its rows are masked anyway) but
    // keeps to the barriers.
    const bool rg_live = r0 + 16 * rg < rows_total;
    const int window = p.attn.window_left;

    // This lane's rows (of the CTA) 16 rg + g and 16 rg + g + 8 see keys row_lo ..= row_hi
    // (none past the sequence's rows).
    const int lr0 = 16 * rg + g;
    int row_lo[2], row_hi[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r0 + lr0 + 8 * h;
        const int pos = len - n_new + row / group;
        row_hi[h] = row < rows_total ? pos : -1;
        row_lo[h] = max(0, pos - window);
    }
    const int last = min(r0 + kRows, rows_total) - 1;
    const int cta_hi = len - n_new + last / group;               // the last key any row sees
    const int lo = max(0, len - n_new + r0 / group - window);     // the first key any row sees
    const int hi = min(len, cta_hi + 1);                          // exclusive

    const uint32_t s_base = smem_addr_of(smem);
    const uint32_t q_s = s_base + uint32_t(S::kOffQ);

    // Q's rows into the swizzled shared copy (zeros for rows past the sequence's).
    const T* q = reinterpret_cast<const T*>(p.attn.q.data);
    for (int i = tid; i < kRows * kChunks; i += kThreads) {
        const int r = i / kChunks;
        const int c = i % kChunks;
        const int row = r0 + r;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row < rows_total) {
            const int head = head_kv * group + row % group;
            const T* src = q + int64_t(tok0 + row / group) * p.attn.q.token_stride +
                           int64_t(head) * p.attn.q.head_stride + 8 * c;
            x = *reinterpret_cast<const uint4*>(src);
        }
        *reinterpret_cast<uint4*>(smem + S::kOffQ + swz(r, c)) = x;
    }
    const double* rot_inv = nullptr;
    float rot_factor = 0.f;
    if constexpr (kRotate) {
        rot_inv = reinterpret_cast<const double*>(p.rope_inv_freq) + int64_t(b) * int64_t(p.rotary_dim / 2);
        rot_factor = reinterpret_cast<const float*>(p.rope_factor)[b];
        __syncthreads();  // Q's rows are in place; row r is query token (r0 + r) / group
        rotate_rows<T, kThreads>(p, rot_inv, rot_factor, smem + S::kOffQ, min(kRows, rows_total - r0), tid,
                                 [&](int r) { return len - n_new + (r0 + r) / group; });
        // The loop's first barrier publishes the rotated rows.
    }

    const int page_size = int(p.cache.page_size);
    const int heads_kv = int(p.cache.heads_kv);
    const int* table = reinterpret_cast<const int*>(p.step.block_table) + int64_t(b) * p.step.max_pages_per_seq;

    // fp8: copies the codes of keys j0 .. j0 + kTileN of K or V into the staging tile (rows
    // past hi zero-filled) and stores their scales x 256 (0 past hi).
    float* const scale256 = reinterpret_cast<float*>(smem + S::kOffScale);
    auto load_codes = [&](uint64_t base, uint64_t scales, int j0) {
        constexpr int kRawChunks = kDim / 16;
        const uint32_t dst = s_base + uint32_t(S::kOffStage);
#pragma unroll 1
        for (int i = tid; i < kTileN * kRawChunks; i += kThreads) {
            const int row = i / kRawChunks;
            const int col = i - row * kRawChunks;
            const int j = j0 + row;
            const bool valid = j < hi;
            const int jj = valid ? j : j0;
            const int64_t slot = int64_t(table[jj / page_size]) * page_size + jj % page_size;
            cp_async_16(dst + uint32_t(row * kDim + col * 16),
                        reinterpret_cast<const uint8_t*>(base) + (slot * heads_kv + head_kv) * kDim + col * 16, valid);
        }
        if (tid < kTileN) {
            const int j = j0 + tid;
            float sc = 0.f;
            if (j < hi) {
                const int64_t slot = int64_t(table[j / page_size]) * page_size + j % page_size;
                const int64_t at = p.cache.scale_mode == LONGCTX_KV_SCALE_TOKEN_HEAD ? slot * heads_kv + head_kv
                                                                                      : int64_t(head_kv);
                sc = reinterpret_cast<const float*>(scales)[at] * 256.f;
            }
            scale256[tid] = sc;
        }
    };

    // Copies keys j0 .. j0 + kTileN of K or V (rows past hi are zero-filled).
    auto load_tile = [&](uint64_t base, int j0, int off) {
        const uint32_t dst = s_base + uint32_t(off);
#pragma unroll 4
        for (int i = 0; i < kTileN * kChunks / kThreads; ++i) {
            const int chunk = i * kThreads + tid;
            const int row = chunk / kChunks;
            const int col = chunk % kChunks;
            const int j = j0 + row;
            const bool valid = j < hi;
            const int jj = valid ? j : j0;
            const int64_t slot = int64_t(table[jj / page_size]) * page_size + jj % page_size;
            cp_async_16(dst + swz(row, col),
                        reinterpret_cast<const T*>(base) + (slot * heads_kv + head_kv) * kDim + col * 8, valid);
        }
    };

    float acc[kColsPerWarp / 8][4];
#pragma unroll
    for (int dj = 0; dj < kColsPerWarp / 8; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dj][e] = 0.f;
    float row_max[2] = {kNegInf, kNegInf};  // transformed score units, shared by the row group
    float row_sum[2] = {0.f, 0.f};          // this lane's partial sums over its warp's keys

    const float exp_scale = p.attn.exp_scale;
    const float softcap_in = p.attn.softcap_in;
    const int n0 = cw * S::kKeysPerWarp;  // this warp's first key of a tile for S
    const int t0 = lo / kTileN;
    const int n_tiles = hi > lo ? (hi - 1) / kTileN - t0 + 1 : 0;
    // Groups in flight: K(t) then V(t) are committed in that order, K(t + 1) after S(t).
    if (n_tiles > 0) {
        if constexpr (kFp8) {
            load_codes(p.cache.k, p.cache.k_scale, t0 * kTileN);
        } else {
            load_tile(p.cache.k, t0 * kTileN, S::kOffK);
        }
        cp_async_commit();
    }
    for (int t = 0; t < n_tiles; ++t) {
        const int j0 = (t0 + t) * kTileN;
        __syncthreads();  // every warp is done with V(t - 1) and P (and Q landed)
        if constexpr (kFp8) {
            cp_async_wait<0>();  // K(t)'s codes landed
            __syncthreads();
            widen_tile<T, kThreads>(smem + S::kOffStage, scale256, smem + S::kOffK, tid);
            __syncthreads();  // K(t) widened: the staging tile and the scales are free
            load_codes(p.cache.v, p.cache.v_scale, j0);
            cp_async_commit();
        } else {
            load_tile(p.cache.v, j0, S::kOffV);
            cp_async_commit();
            cp_async_wait<1>();  // K(t) landed (V(t) may be in flight)
            __syncthreads();
        }
        if constexpr (kRotate) {
            rotate_rows<T, kThreads>(p, rot_inv, rot_factor, smem + S::kOffK, min(kTileN, hi - j0), tid,
                                     [&](int r) { return j0 + r; });
            __syncthreads();
        }

        // S = Q K^T for this warp's keys; s[nt][2h + e] is row lr0 + 8h, key n0 + 8 nt + 2 t4 + e.
        float s[kNT][4];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
        if (rg_live) {
            const int qr = 16 * rg + (lane & 15);
#pragma unroll 4
            for (int kk = 0; kk < kDim / 32; ++kk) {
                uint32_t qa0[4], qa1[4];
                ldmatrix_x4(qa0, q_s + swz(qr, 4 * kk + (lane >> 4)));
                ldmatrix_x4(qa1, q_s + swz(qr, 4 * kk + 2 + (lane >> 4)));
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) {
                    uint32_t bk[4];
                    ldmatrix_x4(bk, s_base + uint32_t(S::kOffK) + swz(n0 + 8 * nt + (lane & 7), 4 * kk + (lane >> 3)));
                    mma_16816<T>(s[nt], qa0, bk[0], bk[1]);
                    mma_16816<T>(s[nt], qa1, bk[2], bk[3]);
                }
            }
            if (softcap_in != 0.f) {
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[nt][e] = fast_tanh(s[nt][e] * softcap_in);
            }
        }

        // Mask; the tile's row maxima through shared memory.
        const int j_base = j0 + n0 + 2 * t4;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = kNegInf;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = j_base + 8 * nt + e;
                    if (j >= hi || j > row_hi[h] || j < row_lo[h]) s[nt][2 * h + e] = kNegInf;
                    mx = fmaxf(mx, s[nt][2 * h + e]);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
            if (t4 == 0) red_max[cw * kRows + lr0 + 8 * h] = mx;
        }
        __syncthreads();  // every warp is done with K(t): K(t + 1) may land there
        if constexpr (!kFp8) {
            if (t + 1 < n_tiles) {
                load_tile(p.cache.k, j0 + kTileN, S::kOffK);
            }
            cp_async_commit();  // possibly empty: keeps the group count uniform
        }

        // Online softmax with the row group's max; P to shared memory.
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
                *reinterpret_cast<uint32_t*>(smem + S::kOffP + r * kPStride + (n0 + 8 * nt + 2 * t4) * 2) =
                    MmaType<T>::pack(p0, p1);
            }
        }
        if constexpr (kFp8) {
            cp_async_wait<0>();  // V(t)'s codes landed
            __syncthreads();     // and P is complete
            widen_tile<T, kThreads>(smem + S::kOffStage, scale256, smem + S::kOffV, tid);
            __syncthreads();  // V(t) widened: the staging tile and the scales are free
            if (t + 1 < n_tiles) {
                load_codes(p.cache.k, p.cache.k_scale, j0 + kTileN);
                cp_async_commit();
            }
        } else {
            cp_async_wait<1>();  // V(t) landed (K(t + 1) may be in flight)
            __syncthreads();     // and P is complete
        }

        // O[rows of rg, columns of cw] += P V over the tile's 32 keys.
        if (rg_live) {
#pragma unroll
            for (int ks = 0; ks < kTileN / 16; ++ks) {
                uint32_t pa[4];
                const char* prow = smem + S::kOffP + (16 * ks + 2 * t4) * 2;
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
                    ldmatrix_x4_trans(bv, s_base + uint32_t(S::kOffV) + swz(vr, vc));
                    mma_16816<T>(acc[2 * dp], pa, bv[0], bv[1]);
                    mma_16816<T>(acc[2 * dp + 1], pa, bv[2], bv[3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // Row sums: over the lane quad, then over the row group's column warps.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = row_sum[h];
        l += __shfl_xor_sync(kFullMask, l, 1);
        l += __shfl_xor_sync(kFullMask, l, 2);
        if (t4 == 0) red_sum[cw * kRows + lr0 + 8 * h] = l;
    }
    __syncthreads();

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
        const int64_t token = tok0 + row / group;
        const int64_t head = int64_t(head_kv) * group + row % group;
        T* out = reinterpret_cast<T*>(p.attn.o.data) + token * p.attn.o.token_stride + head * p.attn.o.head_stride;
#pragma unroll
        for (int dj = 0; dj < kColsPerWarp / 8; ++dj) {
            const int c = cw * kColsPerWarp + 8 * dj + 2 * t4;
            *reinterpret_cast<uint32_t*>(out + c) =
                MmaType<T>::pack(acc[dj][2 * h] * inv, acc[dj][2 * h + 1] * inv);
        }
        if (cw == 0 && t4 == 0 && p.attn.lse != 0) {
            const float lse = seen ? (row_max[h] * exp_scale + log2f(sum)) * 0.6931471805599453f : kNegInf;
            reinterpret_cast<float*>(p.attn.lse)[head * p.attn.lse_head_stride + token] = lse;
        }
    }
}

}  // namespace extend_wide
}  // namespace longctx
