// Tiled attention forward: O = softmax(mask(transform(Q K^T))) V and the row LSE, with
// FlashAttention-2's algorithm on the sm80 instruction set (mma.sync m16n8k16, ldmatrix,
// cp.async); it runs unchanged on sm86, sm89 and sm90.
//
// Layouts (params/attention_params.h): Q [total_q, heads_q, D], K [total_k, heads_kv, D],
// V [total_k, heads_kv, DV], O [total_q, heads_q, DV], last dim contiguous, strides in
// elements and multiples of 8; LSE float [heads_q, total_q].
//
// Grid (num_m_blocks, heads_q, batch). CTA (x, h, b) owns query rows
// [m0, m0 + kBlockM) of sequence b for head h, with m_block = num_m_blocks - 1 - x so the
// tiles with the most keys under a causal mask start first. It returns at once when the
// tile starts past its sequence's end. Warp w owns the kRowsPerWarp consecutive rows from
// w * kRowsPerWarp, as kMTiles m16 MMA tiles.
//
// Per CTA:
//   1. cp.async Q tile and the first visible K tile into shared memory; wait.
//   2. For each visible key tile n (ascending, range from BlockInfo):
//        issue V[n] (overlaps with 3-4)
//        3. S = Q K[n]^T per warp (ldmatrix A from sQ, B from sK; f32 accumulators)
//        4. softcap transform; mask only where BlockInfo::needs_mask says; online softmax
//           (row max in raw score units, exponentials 2^(t * exp_scale - max * exp_scale),
//           O and the row sum rescaled by 2^((old max - new max) * exp_scale))
//        wait V[n]; barrier (also: every warp is done reading sK)
//        issue K[n+1] into sK (overlaps with 5)
//        5. O += P V[n]: P goes from S's accumulator registers straight into A fragments
//           (rounded to T), V fragments by ldmatrix.trans from sV
//        wait K[n+1]; barrier (also: every warp is done reading sV)
//   3. O /= row sum, LSE = (max * exp_scale + log2(sum)) * ln 2; rows that saw no key give
//      O = 0 and LSE = -inf. O is staged through the warp's own rows of sQ and stored with
//      16-byte writes; rows past seqlen_q are not written.
//
// Shared memory: Q [kBlockM][kRowQK], K [kBlockN][kRowQK], V [kBlockN][kRowV] elements.
// Rows are kRow * 2 bytes (a multiple of 128); the 16-byte chunk c of row r lives at chunk
// c ^ (r % 8). Eight consecutive rows at one logical chunk then hit eight different bank
// groups, so every ldmatrix (8 rows x 16 bytes per matrix) and every O staging store is
// conflict-free. Loads of rows past the sequence (partial tiles) are zero-filled: masked
// keys are -inf before the softmax, and zero V rows keep 0 * garbage out of O.
//
// Indexing: element offsets are int64 (token * stride); sequence-local rows, keys and mask
// bounds are int32, which the host guarantees by admitting at most
// LONGCTX_ATTN_MAX_TOKENS tokens and clamping windows to LONGCTX_ATTN_WINDOW_UNBOUNDED.
#pragma once
#include <math.h>
#include <stdint.h>

#include "attention/block_info.cuh"
#include "attention/traits.cuh"
#include "common/cp_async.cuh"
#include "common/mma.cuh"
#include "params/attention_params.h"

namespace longctx {
namespace attn {

constexpr float kLn2 = 0.693147180559945309f;

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of ROW_ELEMS-element rows.
template <int ROW_ELEMS>
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
    return uint32_t(row * (ROW_ELEMS * 2) + ((chunk ^ (row & 7)) << 4));
}

// Issues the cp.async copies of a ROWS x DIM tile whose row r starts at g + r * stride
// (elements); rows >= valid_rows are zero-filled. Consecutive threads take consecutive
// 16-byte chunks of a row, so each warp's reads are coalesced. Requires valid_rows >= 1
// (the first row doubles as the dummy source of zero-filled chunks).
template <int ROWS, int DIM, int ROW_ELEMS, int THREADS, typename T>
__device__ __forceinline__ void load_tile(uint32_t s_tile, const T* g, int64_t stride, int valid_rows, int tid) {
    constexpr int kChunks = DIM / 8;
    constexpr int kIters = ROWS * kChunks / THREADS;
    static_assert(ROWS * kChunks % THREADS == 0, "tile splits evenly over the threads");
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
        const int idx = tid + it * THREADS;
        const int row = idx / kChunks;
        const int chunk = idx % kChunks;
        const bool valid = row < valid_rows;
        const T* src = valid ? g + int64_t(row) * stride + chunk * 8 : g;
        cp_async_16(s_tile + swizzle<ROW_ELEMS>(row, chunk), src, valid);
    }
}

template <typename T, int D, int DV>
__device__ __forceinline__ void attn_fwd_body(const LongctxAttnParams& p) {
    using Tr = Traits<D, DV>;
    constexpr int kBlockM = Tr::kBlockM;
    constexpr int kBlockN = Tr::kBlockN;
    constexpr int kThreads = Tr::kThreads;
    constexpr int kRowsPerWarp = Tr::kRowsPerWarp;
    constexpr int kMTiles = Tr::kMTiles;
    constexpr int kNTiles = Tr::kNTiles;
    constexpr int kDvTiles = Tr::kDvTiles;
    constexpr int kRowQK = Tr::kRowQK;
    constexpr int kRowV = Tr::kRowV;
    constexpr int kOutChunks = DV / 8;  // 16-byte chunks per output row
    constexpr float kNegInf = -INFINITY;

    extern __shared__ __align__(128) uint8_t smem[];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;   // MMA fragment group: rows g and g + 8 of each m16 tile
    const int t4 = lane & 3;   // thread in group: columns 2 * t4, 2 * t4 + 1 of each n8 tile
    const int head = blockIdx.y;
    const int m_block = int(p.num_m_blocks) - 1 - int(blockIdx.x);

    const BlockInfo<kBlockM, kBlockN> bi(p, blockIdx.z, m_block);
    if (!bi.has_rows()) return;
    const int rows_here = bi.m1 - bi.m0;  // existing rows of this tile, >= 1

    // Output row r of the tile (r < rows_here) is o_tile + r * o.token_stride.
    T* o_tile = reinterpret_cast<T*>(p.o.data) + (int64_t(bi.q_start) + bi.m0) * p.o.token_stride +
                int64_t(head) * p.o.head_stride;
    // LSE of tile row r is lse_tile[r]; null when the caller asked for no LSE.
    float* lse_tile = p.lse ? reinterpret_cast<float*>(p.lse) + int64_t(head) * p.lse_head_stride +
                                  (int64_t(bi.q_start) + bi.m0)
                            : nullptr;

    const int key_lo = bi.key_lo();
    const int key_hi = bi.key_hi();
    if (key_hi < key_lo) {
        // No row of the tile sees any key: O = 0, LSE = -inf.
        const uint4 zero = make_uint4(0, 0, 0, 0);
        for (int idx = tid; idx < kBlockM * kOutChunks; idx += kThreads) {
            const int r = idx / kOutChunks;
            if (r < rows_here) {
                *reinterpret_cast<uint4*>(o_tile + int64_t(r) * p.o.token_stride + (idx % kOutChunks) * 8) = zero;
            }
        }
        if (lse_tile) {
            for (int r = tid; r < rows_here; r += kThreads) lse_tile[r] = kNegInf;
        }
        return;
    }
    const int n_min = key_lo / kBlockN;
    const int n_max = key_hi / kBlockN + 1;

    const int head_kv = head / int(p.heads_per_kv);
    const T* q_tile = reinterpret_cast<const T*>(p.q.data) + (int64_t(bi.q_start) + bi.m0) * p.q.token_stride +
                      int64_t(head) * p.q.head_stride;
    // Key j of the sequence is k_seq + j * k.token_stride (likewise v_seq).
    const T* k_seq = reinterpret_cast<const T*>(p.k.data) + int64_t(bi.k_start) * p.k.token_stride +
                     int64_t(head_kv) * p.k.head_stride;
    const T* v_seq = reinterpret_cast<const T*>(p.v.data) + int64_t(bi.k_start) * p.v.token_stride +
                     int64_t(head_kv) * p.v.head_stride;

    const uint32_t sQ = uint32_t(__cvta_generic_to_shared(smem));
    const uint32_t sK = sQ + Tr::kSmemQ;
    const uint32_t sV = sK + Tr::kSmemK;

    load_tile<kBlockM, D, kRowQK, kThreads>(sQ, q_tile, p.q.token_stride, rows_here, tid);
    {
        const int k0 = n_min * kBlockN;
        load_tile<kBlockN, D, kRowQK, kThreads>(sK, k_seq + int64_t(k0) * p.k.token_stride, p.k.token_stride,
                                                bi.sk - k0, tid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // acc_o[mi][dj]: C fragment of rows (mi * 16 + g, + 8) and O columns dj * 8 + 2 * t4 (+1).
    float acc_o[kMTiles][kDvTiles][4];
    // Running max (raw score units) and this lane's partial row sum, for rows
    // mi * 16 + g + 8 * h of the warp, h = 0, 1. The four lanes of a group hold the same max.
    float row_max[kMTiles][2];
    float row_sum[kMTiles][2];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int dj = 0; dj < kDvTiles; ++dj) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mi][dj][e] = 0.f;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_max[mi][h] = kNegInf;
            row_sum[mi][h] = 0.f;
        }
    }

    const int warp_row0 = warp * kRowsPerWarp;  // first tile row of this warp
    const float exp_scale = p.exp_scale;
    const float softcap_in = p.softcap_in;

    for (int n = n_min; n < n_max; ++n) {
        const int k0 = n * kBlockN;
        load_tile<kBlockN, DV, kRowV, kThreads>(sV, v_seq + int64_t(k0) * p.v.token_stride, p.v.token_stride,
                                                bi.sk - k0, tid);
        cp_async_commit();

        // s[mi][nj]: C fragment of S for rows (mi * 16 + g, + 8), keys k0 + nj * 8 + 2 * t4 (+1).
        float s[kMTiles][kNTiles][4];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
            for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[mi][nj][e] = 0.f;
            }
        }

        // S = Q K^T over D in k16 steps.
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            // A fragments: matrices (rows 0-7 | 8-15) x (chunk 2ks | 2ks+1); lane l gives row
            // l % 16 of the m16 tile, chunk 2ks + l / 16.
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) {
                ldmatrix_x4(a[mi], sQ + swizzle<kRowQK>(warp_row0 + mi * 16 + (lane & 15), 2 * ks + (lane >> 4)));
            }
#pragma unroll
            for (int np = 0; np < kNTiles / 2; ++np) {
                // B fragments of key tiles 2np and 2np+1: matrices (keys 0-7, chunk 2ks),
                // (keys 0-7, chunk 2ks+1), (keys 8-15, chunk 2ks), (keys 8-15, chunk 2ks+1) of
                // the 16 keys from np * 16; K rows are B's columns, so no transpose.
                uint32_t b[4];
                ldmatrix_x4(b, sK + swizzle<kRowQK>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                    2 * ks + ((lane >> 3) & 1)));
#pragma unroll
                for (int mi = 0; mi < kMTiles; ++mi) {
                    mma_16816<T>(s[mi][2 * np], a[mi], b[0], b[1]);
                    mma_16816<T>(s[mi][2 * np + 1], a[mi], b[2], b[3]);
                }
            }
        }

        if (softcap_in != 0.f) {
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
                for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mi][nj][e] = tanhf(s[mi][nj][e] * softcap_in);
                }
            }
        }

        if (bi.needs_mask(n)) {
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = bi.m0 + warp_row0 + mi * 16 + g + 8 * h;  // sequence-local
                    const int j_lo = row + bi.diag - bi.left;
                    const int j_hi = min(row + bi.diag + bi.right, bi.sk - 1);
#pragma unroll
                    for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = k0 + nj * 8 + 2 * t4 + e;
                            if (j < j_lo || j > j_hi) s[mi][nj][2 * h + e] = kNegInf;
                        }
                    }
                }
            }
        }

        // Online softmax; s becomes P (unnormalised, f32).
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[mi][h];
#pragma unroll
                for (int nj = 0; nj < kNTiles; ++nj) mx = fmaxf(mx, fmaxf(s[mi][nj][2 * h], s[mi][nj][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // A row with no visible key so far keeps max -inf; subtracting 0 then maps
                // its -inf scores to 2^-inf = 0 instead of NaN.
                const float m_scaled = mx == kNegInf ? 0.f : mx * exp_scale;
                const float corr = fast_exp2(row_max[mi][h] * exp_scale - m_scaled);
                row_max[mi][h] = mx;
                row_sum[mi][h] *= corr;
#pragma unroll
                for (int dj = 0; dj < kDvTiles; ++dj) {
                    acc_o[mi][dj][2 * h] *= corr;
                    acc_o[mi][dj][2 * h + 1] *= corr;
                }
#pragma unroll
                for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pe = fast_exp2(fmaf(s[mi][nj][2 * h + e], exp_scale, -m_scaled));
                        s[mi][nj][2 * h + e] = pe;
                        row_sum[mi][h] += pe;
                    }
                }
            }
        }

        cp_async_wait<0>();
        __syncthreads();
        if (n + 1 < n_max) {
            const int k1 = k0 + kBlockN;
            load_tile<kBlockN, D, kRowQK, kThreads>(sK, k_seq + int64_t(k1) * p.k.token_stride, p.k.token_stride,
                                                    bi.sk - k1, tid);
            cp_async_commit();
        }

        // O += P V over the tile's keys in k16 steps.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            // P's C fragments of key tiles 2kk and 2kk+1 are the A fragment of this step.
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) {
                a[mi][0] = MmaType<T>::pack(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                a[mi][1] = MmaType<T>::pack(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                a[mi][2] = MmaType<T>::pack(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                a[mi][3] = MmaType<T>::pack(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DV / 16; ++dp) {
                // B fragments of O column tiles 2dp and 2dp+1: matrices (keys 0-7 | 8-15) x
                // (chunk 2dp | 2dp+1), transposed, since V's rows are B's k dimension.
                uint32_t b[4];
                ldmatrix_x4_trans(b, sV + swizzle<kRowV>(kk * 16 + (lane & 15), 2 * dp + (lane >> 4)));
#pragma unroll
                for (int mi = 0; mi < kMTiles; ++mi) {
                    mma_16816<T>(acc_o[mi][2 * dp], a[mi], b[0], b[1]);
                    mma_16816<T>(acc_o[mi][2 * dp + 1], a[mi], b[2], b[3]);
                }
            }
        }

        cp_async_wait<0>();
        __syncthreads();
    }

    // Normalise, write LSE, stage O (rounded to T) in this warp's own rows of sQ. Only this
    // warp ever read those rows, and the loop's last barrier ordered all reads before here.
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = row_sum[mi][h];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l == 0.f ? 0.f : 1.f / l;
            const int r = warp_row0 + mi * 16 + g + 8 * h;  // tile row
            if (lse_tile != nullptr && t4 == 0 && r < rows_here) {
                lse_tile[r] = l == 0.f ? kNegInf : (row_max[mi][h] * exp_scale + log2f(l)) * kLn2;
            }
#pragma unroll
            for (int dj = 0; dj < kDvTiles; ++dj) {
                const uint32_t packed =
                    MmaType<T>::pack(acc_o[mi][dj][2 * h] * inv, acc_o[mi][dj][2 * h + 1] * inv);
                *reinterpret_cast<uint32_t*>(smem + swizzle<kRowQK>(r, dj) + 4 * t4) = packed;
            }
        }
    }
    __syncwarp();
    static_assert(kRowsPerWarp * kOutChunks % 32 == 0, "output rows split evenly over a warp");
#pragma unroll
    for (int it = 0; it < kRowsPerWarp * kOutChunks / 32; ++it) {
        const int idx = lane + it * 32;
        const int r = warp_row0 + idx / kOutChunks;
        const int chunk = idx % kOutChunks;
        if (r < rows_here) {
            const uint4 v = *reinterpret_cast<const uint4*>(smem + swizzle<kRowQK>(r, chunk));
            *reinterpret_cast<uint4*>(o_tile + int64_t(r) * p.o.token_stride + chunk * 8) = v;
        }
    }
}

}  // namespace attn
}  // namespace longctx
