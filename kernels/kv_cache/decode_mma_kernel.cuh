// Decode over a paged cache on tensor cores, head dims 64 and 128 (kernels/params/
// kv_cache_params.h has the layouts and the mask; decode_kernel.cuh is the CUDA-core
// kernel for head dims 256 and 512, with the same parameters and outputs).
//
// One CTA per (split, KV head x row tile, sequence). Its 16 rows are query (token, head)
// pairs of one KV head (GQA packing: row r is query token r / heads_per_kv of head
// kv_head * heads_per_kv + r % heads_per_kv); rows past the sequence's are masked out, so
// one m16 MMA tile serves group x tokens <= 16 with every K/V byte read once. The CTA walks
// its split in tiles of 16 x kWarps keys, double-buffered with cp.async (page lookup per
// 16-byte chunk); warp w takes keys 16w .. 16w + 15 of each tile:
//   S (16 x 16) = Q K^T: Q's A fragments stay in registers for the whole loop, K's B
//   fragments come from ldmatrix on the swizzled tile;
//   online softmax per row over the warp's keys (exp2 domain, the forward's constants);
//   O (16 x D) += P V: P packed from S's C fragments as the A operand, V through
//   ldmatrix.trans.
// Each warp ends with its own (max, sum, O) per row over the keys it saw; the warps' states
// are combined through shared memory, then O (normalised) and the LSE are written, or the
// f32 partial state of the split.
//
// fp8 caches: tiles land as codes in a staging buffer; every thread widens its chunks to
// the query dtype into the swizzled tile the MMAs read (f16 bits of value / 256, exact; for
// bf16 through f32, exact too), and the scales (times 256) multiply S's columns (K) and P's
// columns (V) per key.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/cp_async.cuh"
#include "common/dtype.cuh"
#include "common/fast_math.cuh"
#include "common/fp8.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"
#include "params/kv_cache_params.h"
#include "kv_cache/rotate.cuh"

namespace longctx {
namespace kv_decode_mma {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kNegInf = -INFINITY;

template <int D> struct Warps {
    static constexpr int value =
        D == 64 ? int(LONGCTX_KV_DECODE_MMA_WARPS_HD64) : int(LONGCTX_KV_DECODE_MMA_WARPS_HD128);
};

template <typename T, typename S, int D> struct Shape {
    static constexpr bool kFp8 = sizeof(S) == 1;
    static constexpr int kWarps = Warps<D>::value;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kRows = int(LONGCTX_KV_DECODE_MMA_ROWS);
    static_assert(kRows == 16, "one m16 tile of rows");
    static constexpr int kTileN = 16 * kWarps;        // keys per tile
    static constexpr int kChunks = D / 8;             // 16-byte chunks of a T row
    static constexpr int kRowBytes = D * 2;           // bytes of a T row
    static constexpr int kTileBytes = kTileN * kRowBytes;  // one T tile (K or V)
    static constexpr int kRawRowBytes = D * int(sizeof(S));
    static constexpr int kRawChunks = kRawRowBytes / 16;   // 16-byte chunks of a stored row
    static constexpr int kRawTileBytes = kTileN * kRawRowBytes;
    // Stages of stored K and V; fp8 adds one widened K and V tile.
    static constexpr int kStageBytes = 2 * kRawTileBytes;
    static constexpr int kWideBytes = kFp8 ? 2 * kTileBytes : 0;
    static constexpr int kLoopBytes = 2 * kStageBytes + kWideBytes;
    static constexpr int kCombineBytes = kWarps * kRows * (D + 2) * 4;
    static constexpr int kSmemBytes = kLoopBytes > kCombineBytes ? kLoopBytes : kCombineBytes;
    static constexpr int kLoadIters = kTileN * kRawChunks / kThreads;

    static_assert(D == 64 || D == 128, "the tensor-core decode kernel covers head dims 64 and 128");
    static_assert(kChunks >= 8, "rows of at least 8 chunks keep the XOR swizzle inside a row");
    static_assert((kTileN * kRawChunks) % kThreads == 0, "tile copies split evenly");
    static_assert(kTileN <= kThreads, "one thread per key stages the scales");
};

// Byte offset of chunk `c` (8 T elements) of row `r` in a swizzled T tile.
template <int D>
__device__ __forceinline__ uint32_t swz(int r, int c) {
    return uint32_t(r * D * 2 + ((c ^ (r & 7)) << 4));
}

// Two stored elements at p, p + 1 widened and packed as one T pair (fp8: value / 256).
template <typename T>
__device__ __forceinline__ uint32_t widen_pair_fp8(uint32_t two_codes) {
    const float lo = e4m3_to_f32_div256(two_codes & 0xFFu);
    const float hi = e4m3_to_f32_div256((two_codes >> 8) & 0xFFu);
    return MmaType<T>::pack(lo, hi);
}

template <typename T, typename S, int D>
__device__ __forceinline__ void decode_mma_body(const LongctxKvDecodeParams& p) {
    using Sh = Shape<T, S, D>;
    constexpr int kWarps = Sh::kWarps;
    constexpr int kThreads = Sh::kThreads;
    constexpr int kTileN = Sh::kTileN;
    constexpr int kRows = Sh::kRows;
    constexpr bool kFp8 = Sh::kFp8;

    LONGCTX_SHARED_ARRAY(uint4, smem_main, Sh::kSmemBytes / 16);
    LONGCTX_SHARED_ARRAY(float, smem_scale, 2 * 2 * kTileN);  // [stage][K, V][key]
    char* const smem = reinterpret_cast<char*>(smem_main);

    const int tid = int(threadIdx.x);
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;

    const int split = int(blockIdx.x);
    const int kv_head = int(blockIdx.y / p.row_tiles);
    const int row_tile = int(blockIdx.y % p.row_tiles);
    const int b = int(blockIdx.z);
    const int* cu_new = reinterpret_cast<const int*>(p.step.cu_new);
    const int len = reinterpret_cast<const int*>(p.step.seqlens)[b];
    const int tok0 = cu_new[b];
    const int n_new = cu_new[b + 1] - tok0;
    const int hpk = int(p.heads_per_kv);
    const int rows_total = n_new * hpk;
    const int r0 = row_tile * kRows;
    if (r0 >= rows_total) return;  // the whole CTA leaves: no row of this tile exists

    // This lane's rows g and g + 8: key range [lo, hi] each (empty past the sequence's rows).
    int row_lo[2], row_hi[2];
    int cta_lo = len, cta_hi = -1;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r0 + g + 8 * h;
        if (row < rows_total) {
            const int pos = len - n_new + row / hpk;
            row_hi[h] = pos;
            row_lo[h] = max(0, pos - p.window_left);
        } else {
            row_lo[h] = 1;
            row_hi[h] = 0;
        }
    }
    // The CTA's key range from its first and last existing rows (positions grow with rows).
    {
        const int last = min(r0 + kRows, rows_total) - 1;
        const int pos_first = len - n_new + r0 / hpk;
        const int pos_last = len - n_new + last / hpk;
        cta_lo = max(0, pos_first - p.window_left);
        cta_hi = pos_last;
    }
    const int split_lo = split * int(p.chunk);
    const int lo = max(split_lo, cta_lo);
    const int hi = min(min(split_lo + int(p.chunk), len), cta_hi + 1);  // exclusive

    // Q's A fragments: qa[ks] for k-step ks (channels 16 ks ..), rows g and g + 8.
    uint32_t qa[D / 16][4];
    {
        const T* qrow[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + g + 8 * h;
            qrow[h] = row < rows_total
                          ? reinterpret_cast<const T*>(p.q) + int64_t(tok0 + row / hpk) * p.q_token_stride +
                                int64_t(kv_head * hpk + row % hpk) * p.q_head_stride
                          : nullptr;
        }
        const bool rotate = p.rope_inv_freq != 0;
        const double* inv = rotate ? reinterpret_cast<const double*>(p.rope_inv_freq) + int64_t(b) * (p.rotary_dim / 2)
                                   : nullptr;
        const float factor = rotate ? reinterpret_cast<const float*>(p.rope_factor)[b] : 1.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int hi8 = 0; hi8 < 2; ++hi8) {
                    const int c = 16 * ks + 8 * hi8 + 2 * t4;
                    float x0 = 0.f, x1 = 0.f;
                    if (qrow[h] != nullptr) {
                        const T* qr = qrow[h];
                        auto get = [qr](int ch) { return DType<T>::to_f32(qr[ch]); };
                        if (rotate) {
                            // The query's position: its token's place among the new tokens.
                            const int pos = len - n_new + (r0 + g + 8 * h) / hpk;
                            // Rounded to T, as the RoPE kernel stores a rotated query.
                            x0 = DType<T>::to_f32(DType<T>::from_f32(kv_rotate::rotated_channel(p, inv, factor, pos, c, get)));
                            x1 = DType<T>::to_f32(DType<T>::from_f32(kv_rotate::rotated_channel(p, inv, factor, pos, c + 1, get)));
                        } else {
                            x0 = get(c);
                            x1 = get(c + 1);
                        }
                    }
                    // Exact: x0, x1 are values of T.
                    qa[ks][h + 2 * hi8] = MmaType<T>::pack(x0, x1);
                }
            }
        }
    }

    const LongctxKvCache& c = p.cache;
    const int page_size = int(c.page_size);
    const int* table = reinterpret_cast<const int*>(p.step.block_table) + int64_t(b) * p.step.max_pages_per_seq;
    const float* k_scale = reinterpret_cast<const float*>(c.k_scale);
    const float* v_scale = reinterpret_cast<const float*>(c.v_scale);
    const bool per_token_scale = kFp8 && c.scale_mode == LONGCTX_KV_SCALE_TOKEN_HEAD;
    float head_k_scale = kFp8 ? 256.f : 1.f, head_v_scale = head_k_scale;
    if (kFp8 && c.scale_mode == LONGCTX_KV_SCALE_HEAD) {
        head_k_scale *= k_scale[kv_head];
        head_v_scale *= v_scale[kv_head];
    }

    const uint32_t s_base = smem_addr_of(smem);
    // Stage st holds stored K at st * kStageBytes, V kRawTileBytes after it. For T caches the
    // stage is the swizzled tile itself; fp8 stages are plain rows, widened into the tiles at
    // 2 * kStageBytes.
    auto load_tile = [&](int j0, int st) {
        const uint32_t kdst = s_base + uint32_t(st * Sh::kStageBytes);
        const uint32_t vdst = kdst + uint32_t(Sh::kRawTileBytes);
#pragma unroll
        for (int i = 0; i < Sh::kLoadIters; ++i) {
            const int chunk = i * kThreads + tid;
            const int row = chunk / Sh::kRawChunks;
            const int col = chunk % Sh::kRawChunks;
            const int j = j0 + row;
            const bool valid = j < hi;
            const int jj = valid ? j : j0;
            const int64_t slot = int64_t(table[jj / page_size]) * page_size + jj % page_size;
            const int64_t elem = (slot * c.heads_kv + kv_head) * D + col * (16 / int(sizeof(S)));
            const uint32_t off = kFp8 ? uint32_t(row * Sh::kRawRowBytes + col * 16) : swz<D>(row, col);
            cp_async_16(kdst + off, reinterpret_cast<const S*>(c.k) + elem, valid);
            cp_async_16(vdst + off, reinterpret_cast<const S*>(c.v) + elem, valid);
        }
        if (per_token_scale && tid < kTileN) {
            const int j = j0 + tid;
            float ks = 0.f, vs = 0.f;
            if (j < hi) {
                const int64_t slot = int64_t(table[j / page_size]) * page_size + j % page_size;
                ks = k_scale[slot * c.heads_kv + kv_head];
                vs = v_scale[slot * c.heads_kv + kv_head];
            }
            smem_scale[(st * 2) * kTileN + tid] = ks;
            smem_scale[(st * 2 + 1) * kTileN + tid] = vs;
        }
    };

    float acc[D / 8][4];
#pragma unroll
    for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dj][e] = 0.f;
    float row_max[2] = {kNegInf, kNegInf};  // raw score units
    float row_sum[2] = {0.f, 0.f};          // this lane's partial sums

    const float exp_scale = p.exp_scale;
    const float softcap_in = p.softcap_in;
    const int n0 = warp * 16;  // this warp's first key of a tile

    const int n_tiles = hi > lo ? (hi - lo + kTileN - 1) / kTileN : 0;
    if (n_tiles > 0) {
        load_tile(lo, 0);
        cp_async_commit();
    }
    for (int t = 0; t < n_tiles; ++t) {
        const int st = t & 1;
        cp_async_wait<0>();
        __syncthreads();  // tile t landed for every thread; every warp is done with tile t - 1
        if (t + 1 < n_tiles) {
            load_tile(lo + (t + 1) * kTileN, st ^ 1);
            cp_async_commit();
        }
        uint32_t k_tile = s_base + uint32_t(st * Sh::kStageBytes);
        uint32_t v_tile = k_tile + uint32_t(Sh::kRawTileBytes);
        if constexpr (kFp8) {
            // Widen the stored codes into the swizzled T tiles (value / 256).
            const char* raw = smem + st * Sh::kStageBytes;
            char* wide = smem + 2 * Sh::kStageBytes;
            for (int i = tid; i < 2 * kTileN * Sh::kRawChunks; i += kThreads) {
                const int which = i / (kTileN * Sh::kRawChunks);  // 0: K, 1: V
                const int rc = i % (kTileN * Sh::kRawChunks);
                const int row = rc / Sh::kRawChunks;
                const int col = rc % Sh::kRawChunks;  // 16 codes = T chunks 2 col, 2 col + 1
                const uint4 x = *reinterpret_cast<const uint4*>(raw + which * Sh::kRawTileBytes + row * Sh::kRawRowBytes +
                                                                 col * 16);
                const uint32_t w[4] = {x.x, x.y, x.z, x.w};
                uint32_t out[8];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    out[2 * q] = widen_pair_fp8<T>(w[q] & 0xFFFFu);
                    out[2 * q + 1] = widen_pair_fp8<T>(w[q] >> 16);
                }
                char* dst = wide + which * Sh::kTileBytes;
                *reinterpret_cast<uint4*>(dst + swz<D>(row, 2 * col)) = make_uint4(out[0], out[1], out[2], out[3]);
                *reinterpret_cast<uint4*>(dst + swz<D>(row, 2 * col + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
            }
            __syncthreads();
            k_tile = s_base + uint32_t(2 * Sh::kStageBytes);
            v_tile = k_tile + uint32_t(Sh::kTileBytes);
        }

        if (p.rope_inv_freq != 0) {
            // Rotate the tile's keys in place: key row r at position lo + t * kTileN + r, every
            // pair once (pairs are disjoint, so no two threads touch one element).
            const int half = int(p.rotary_dim) / 2;
            const bool neox = p.rope_style == LONGCTX_ROPE_STYLE_NEOX;
            const double* inv = reinterpret_cast<const double*>(p.rope_inv_freq) + int64_t(b) * half;
            const float factor = reinterpret_cast<const float*>(p.rope_factor)[b];
            char* ktile = smem + (k_tile - s_base);
            for (int i = tid; i < kTileN * half; i += kThreads) {
                const int r = i / half;
                const int pair = i % half;
                const int pos = lo + t * kTileN + r;
                if (pos >= hi) continue;  // a zero-filled row past the split
                const int ca = neox ? pair : 2 * pair;
                const int cb = neox ? pair + half : 2 * pair + 1;
                T* ea = reinterpret_cast<T*>(ktile + swz<D>(r, ca / 8)) + ca % 8;
                T* eb = reinterpret_cast<T*>(ktile + swz<D>(r, cb / 8)) + cb % 8;
                kv_rotate::rotate_pair(p, inv[pair], factor, pos, ea, eb);
            }
            __syncthreads();
        }

        // S = Q K^T for this warp's 16 keys: s[nt] is key tile nt (8 keys).
        float s[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            // Matrices: (keys 0-7, k lo), (keys 0-7, k hi), (keys 8-15, k lo), (keys 8-15, k hi).
            const int kr = n0 + (lane & 7) + ((lane >> 4) << 3);
            const int kc = 2 * ks + ((lane >> 3) & 1);
            uint32_t bk[4];
            ldmatrix_x4(bk, k_tile + swz<D>(kr, kc));
            mma_16816<T>(s[0], qa[ks], bk[0], bk[1]);
            mma_16816<T>(s[1], qa[ks], bk[2], bk[3]);
        }

        // Scale, softcap, mask; s[nt][2h + e] is row g + 8h, key n0 + 8 nt + 2 t4 + e.
        const int j_base = lo + t * kTileN + n0 + 2 * t4;
        float vsc[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int kt = n0 + 8 * nt + 2 * t4 + e;  // key within the tile
                float ksc = head_k_scale;
                vsc[nt][e] = head_v_scale;
                if (per_token_scale) {
                    ksc *= smem_scale[(st * 2) * kTileN + kt];
                    vsc[nt][e] *= smem_scale[(st * 2 + 1) * kTileN + kt];
                }
                const int j = j_base + 8 * nt + e;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float x = s[nt][2 * h + e] * ksc;
                    if (softcap_in != 0.f) x = fast_tanh(x * softcap_in);
                    if (j >= hi || j < row_lo[h] || j > row_hi[h]) x = kNegInf;
                    s[nt][2 * h + e] = x;
                }
            }
        }

        // Online softmax per row; P packed as the A fragment of the 16-key step.
        uint32_t pa[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
            const float m_new = fmaxf(row_max[h], mx);
            // A row with no visible key so far keeps max -inf: 0 stands in for it, so the
            // factors are 2^-inf = 0 instead of NaN.
            const float m_use = m_new == kNegInf ? 0.f : m_new;
            const float corr = fast_exp2((row_max[h] - m_use) * exp_scale);
            row_max[h] = m_new;
            row_sum[h] *= corr;
#pragma unroll
            for (int dj = 0; dj < D / 8; ++dj) {
                acc[dj][2 * h] *= corr;
                acc[dj][2 * h + 1] *= corr;
            }
            const float m_scaled = m_use * exp_scale;
            float pv[2][2];
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pr = fast_exp2(fmaf(s[nt][2 * h + e], exp_scale, -m_scaled));
                    row_sum[h] += pr;
                    pv[nt][e] = pr * vsc[nt][e];
                }
            }
            pa[h] = MmaType<T>::pack(pv[0][0], pv[0][1]);      // keys 2t4, 2t4 + 1
            pa[h + 2] = MmaType<T>::pack(pv[1][0], pv[1][1]);  // keys 2t4 + 8, + 9
        }

        // O += P V over the warp's 16 keys.
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            // Matrices: (keys 0-7, cols lo), (keys 8-15, cols lo), (keys 0-7, cols hi), (keys 8-15, cols hi).
            const int vr = n0 + (lane & 15);
            const int vc = 2 * dp + (lane >> 4);
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, v_tile + swz<D>(vr, vc));
            mma_16816<T>(acc[2 * dp], pa, bv[0], bv[1]);
            mma_16816<T>(acc[2 * dp + 1], pa, bv[2], bv[3]);
        }
    }
    __syncthreads();  // every warp is done with the tiles: the shared memory is free

    // Combine the warps' states: red_acc[warp][row][ch], red_ml[warp][row][max, sum].
    float* red_acc = reinterpret_cast<float*>(smem);
    float* red_ml = red_acc + kWarps * kRows * D;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = row_sum[h];
        l += __shfl_xor_sync(kFullMask, l, 1);
        l += __shfl_xor_sync(kFullMask, l, 2);
        const int r = g + 8 * h;
        if (t4 == 0) {
            red_ml[(warp * kRows + r) * 2] = row_max[h];
            red_ml[(warp * kRows + r) * 2 + 1] = l;
        }
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
            red_acc[(warp * kRows + r) * D + dj * 8 + 2 * t4] = acc[dj][2 * h];
            red_acc[(warp * kRows + r) * D + dj * 8 + 2 * t4 + 1] = acc[dj][2 * h + 1];
        }
    }
    __syncthreads();

    const bool one_split = p.splits == 1;
    for (int idx = tid; idx < kRows * D; idx += kThreads) {
        const int r = idx / D;
        const int ch = idx % D;
        const int row = r0 + r;
        if (row >= rows_total) continue;
        float mx = kNegInf;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_ml[(w * kRows + r) * 2]);
        float o = 0.f, lse = kNegInf;
        if (mx != kNegInf) {
            float sum = 0.f, num = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float mw = red_ml[(w * kRows + r) * 2];
                if (mw == kNegInf) continue;  // the warp saw no key of this row
                const float f = fast_exp2((mw - mx) * exp_scale);
                sum += red_ml[(w * kRows + r) * 2 + 1] * f;
                num += red_acc[(w * kRows + r) * D + ch] * f;
            }
            o = num / sum;
            lse = (mx * exp_scale + log2f(sum)) * 0.6931471805599453f;
        }
        const int64_t token = tok0 + row / hpk;
        const int64_t head = int64_t(kv_head) * hpk + row % hpk;
        if (one_split) {
            T* out = reinterpret_cast<T*>(p.o) + token * p.o_token_stride + head * p.o_head_stride;
            out[ch] = DType<T>::from_f32(o);
            if (ch == 0 && p.lse != 0) reinterpret_cast<float*>(p.lse)[head * p.lse_head_stride + token] = lse;
        } else {
            const int64_t part_row = (int64_t(split) * p.total_new + token) * p.heads_q + head;
            reinterpret_cast<float*>(p.part_o)[part_row * D + ch] = o;
            if (ch == 0)
                reinterpret_cast<float*>(p.part_lse)[(int64_t(split) * p.heads_q + head) * p.total_new + token] = lse;
        }
    }
}

}  // namespace kv_decode_mma
}  // namespace longctx
