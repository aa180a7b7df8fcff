// Decode over a paged cache: the step's new tokens of each sequence (1 to 16) attend to the
// sequence's cached K/V (kernels/params/kv_cache_params.h has the layouts and the mask).
//
// One CTA per (split, KV head x row tile, sequence). The query heads of the KV head are
// packed as rows (GQA packing: every K/V byte the CTA reads serves all of them), kRows
// rows per CTA; a row is (query token, head) = (r / heads_per_kv, kv_head * heads_per_kv +
// r % heads_per_kv). The CTA walks its split's keys in tiles of kTileN, staged in shared
// memory with cp.async in two stages (K and V of tile t + 1 are in flight while tile t is
// computed). The page lookup happens per 16-byte chunk as the tile is loaded.
//
// Compute on CUDA cores, which decode's arithmetic intensity (2 x rows FLOPs per cached
// element) leaves far from the limit at 1-2 query tokens: a warp holds kKeysPerWarp key
// rows at a time, kTx lanes per key, each lane kVec channels of it. Each lane keeps its
// kVec channels of every query row in registers, forms partial dot products, and the kTx
// lanes of a key reduce them with xor shuffles. Every (warp, key slot) group runs its own
// online softmax over the keys it saw (state m, l in the exp2 domain and kVec output
// channels per row); at the end the groups' states are combined through shared memory.
//
// fp8 caches (S = uint8_t codes): an element is code x scale; the code is widened to f16
// bits (value / 256, exact), the 256 and the scale multiply the dot product (K) and the
// probability (V), once per key. Scales per (token, head) are staged with their tile.
//
// Keys stored un-rotated (p.rope_inv_freq != 0): an f16/bf16 tile is rotated in place once
// it lands. An fp8 tile is rotated as the tensor-core kernel does it: the codes widened to
// T (value / 256, exact), rotated in f32 and rounded to T (kv_rotate::rotate_pair), the 256
// and the scale applied to the dot product afterwards; rotation before the scale. The
// rotated keys do not fit the code stage, so they go to a T tile of half a stage's keys
// (kWideRows rows), filled twice per tile, each half read by the dot products in between.
#pragma once
#include <math.h>
#include <stdint.h>

#include "common/cp_async.cuh"
#include "common/dtype.cuh"
#include "common/fp8.cuh"
#include "common/smem.cuh"
#include "kv_cache/rotate.cuh"
#include "params/kv_cache_params.h"

namespace longctx {
namespace kv_decode {

constexpr int kWarps = int(LONGCTX_KV_DECODE_WARPS);
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

// Widening of stored cache elements to f32. fp8 codes come out divided by 256.
template <typename S> struct Stored {
    static constexpr bool kFp8 = false;
    __device__ __forceinline__ static float widen(S x) { return DType<S>::to_f32(x); }
};
template <> struct Stored<uint8_t> {
    static constexpr bool kFp8 = true;
    __device__ __forceinline__ static float widen(uint8_t x) { return e4m3_to_f32_div256(x); }
};

template <typename S, int D> struct Shape {
    static constexpr int kVec = D / 32 > 8 ? D / 32 : 8;  // channels per lane and key row
    static constexpr int kTx = D / kVec;                  // lanes per key row: 8, 16 or 32
    static constexpr int kKeysPerWarp = 32 / kTx;
    static constexpr int kGroups = kWarps * kKeysPerWarp;  // key rows in flight per CTA
    static constexpr int kRows = int(LONGCTX_KV_DECODE_ROW_ELEMS) / kVec;  // query rows per CTA
    static constexpr int kRowBytes = D * int(sizeof(S));
    static constexpr int kTileN = int(LONGCTX_KV_DECODE_TILE_BYTES) / kRowBytes;  // keys per tile
    static constexpr int kChunksPerRow = kRowBytes / 16;
    static constexpr int kChunksPerThread = kTileN * kChunksPerRow / kThreads;
    static constexpr int kStageBytes = 2 * kTileN * kRowBytes;  // K then V
    // fp8 and rotating: the rotated keys of half a tile, as T (always 2 bytes), after the
    // stages. Half, because a whole tile's (16 KB) would take the static shared memory past
    // 48 KB.
    static constexpr int kWideParts = sizeof(S) == 1 ? 2 : 1;
    static constexpr int kWideRows = kTileN / kWideParts;
    static constexpr int kWideBytes = sizeof(S) == 1 ? kWideRows * D * 2 : 0;
    static constexpr int kStagingBytes = 2 * kStageBytes + kWideBytes;
    static constexpr int kCombineBytes = kGroups * kRows * (D + 2) * 4;
    static constexpr int kMainBytes = kStagingBytes > kCombineBytes ? kStagingBytes : kCombineBytes;
    static constexpr int kScaleFloats = 2 * 2 * kTileN;  // [stage][K, V][kTileN]

    static_assert(D % 32 == 0 && (D & (D - 1)) == 0, "head dims 64, 128, 256, 512");
    static_assert(kTx <= 32 && 32 % kTx == 0, "a key row spans whole lanes of one warp");
    static_assert(kVec * int(sizeof(S)) % 8 == 0, "a lane's slice is 8 or 16 bytes");
    static_assert(kRowBytes % 16 == 0, "rows are whole 16-byte chunks");
    static_assert(kTileN % kGroups == 0, "a tile is whole steps of the CTA's key groups");
    static_assert((kTileN * kChunksPerRow) % kThreads == 0, "tile loads split evenly");
    static_assert(kTileN <= kThreads, "one thread per key row stages the scales");
    static_assert(kWideRows % kGroups == 0, "a wide part is whole steps of the key groups");
};

// Raw load of a lane's kVec stored elements from shared memory.
template <typename S, int N> struct Slice {
    S elt[N];
};

template <typename S, int N>
__device__ __forceinline__ void load_slice(Slice<S, N>& x, const S* p) {
    constexpr int kBytes = N * int(sizeof(S));
    if constexpr (kBytes % 16 == 0) {
#pragma unroll
        for (int i = 0; i < kBytes / 16; ++i)
            reinterpret_cast<uint4*>(x.elt)[i] = reinterpret_cast<const uint4*>(p)[i];
    } else {
        static_assert(kBytes == 8, "8-byte slices otherwise");
        *reinterpret_cast<uint2*>(x.elt) = *reinterpret_cast<const uint2*>(p);
    }
}

template <typename T, typename S, int D>
__device__ __forceinline__ void decode_kernel_body(const LongctxKvDecodeParams& p) {
    using Sh = Shape<S, D>;
    constexpr int kVec = Sh::kVec;
    constexpr int kTx = Sh::kTx;
    constexpr int kRows = Sh::kRows;
    constexpr int kTileN = Sh::kTileN;
    constexpr int kGroups = Sh::kGroups;
    constexpr int kWideRows = Sh::kWideRows;
    constexpr bool kFp8 = Stored<S>::kFp8;

    LONGCTX_SHARED_ARRAY(uint4, smem_main, Sh::kMainBytes / 16);
    LONGCTX_SHARED_ARRAY(float, smem_scale, Sh::kScaleFloats);
    char* const staging = reinterpret_cast<char*>(smem_main);

    const int tid = int(threadIdx.x);
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int kslot = lane / kTx;  // which of the warp's key rows
    const int tx = lane % kTx;     // which kVec channels of it
    const int group = warp * Sh::kKeysPerWarp + kslot;

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

    // Each row's key range [lo_r, hi_r] (empty for rows past the sequence's).
    int row_lo[kRows], row_hi[kRows];
    int cta_lo = len, cta_hi = -1;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int row = r0 + r;
        if (row < rows_total) {
            const int pos = len - n_new + row / hpk;
            row_hi[r] = pos;
            row_lo[r] = max(0, pos - p.window_left);
            cta_lo = min(cta_lo, row_lo[r]);
            cta_hi = max(cta_hi, row_hi[r]);
        } else {
            row_lo[r] = 1;
            row_hi[r] = 0;
        }
    }
    const int split_lo = split * int(p.chunk);
    const int lo = max(split_lo, cta_lo);
    const int hi = min(min(split_lo + int(p.chunk), len), cta_hi + 1);  // exclusive

    // This lane's channels of every query row, in f32.
    float q[kRows][kVec];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        const int row = r0 + r;
        if (row < rows_total) {
            const T* qrow = reinterpret_cast<const T*>(p.q) + int64_t(tok0 + row / hpk) * p.q_token_stride +
                            int64_t(kv_head * hpk + row % hpk) * p.q_head_stride;
            if (p.rope_inv_freq != 0) {
                // Un-rotated queries: rotated at their position, rounded to T as the RoPE
                // kernel stores them.
                const double* inv = reinterpret_cast<const double*>(p.rope_inv_freq) + int64_t(b) * (p.rotary_dim / 2);
                const float factor = reinterpret_cast<const float*>(p.rope_factor)[b];
                const int pos = len - n_new + row / hpk;
                auto get = [qrow](int ch) { return DType<T>::to_f32(qrow[ch]); };
#pragma unroll
                for (int e = 0; e < kVec; ++e)
                    q[r][e] = DType<T>::to_f32(
                        DType<T>::from_f32(kv_rotate::rotated_channel(p, inv, factor, pos, tx * kVec + e, get)));
            } else {
#pragma unroll
                for (int e = 0; e < kVec; ++e) q[r][e] = DType<T>::to_f32(qrow[tx * kVec + e]);
            }
        } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) q[r][e] = 0.f;
        }
    }

    const LongctxKvCache& c = p.cache;
    const int page_size = int(c.page_size);
    const int* table = reinterpret_cast<const int*>(p.step.block_table) + int64_t(b) * p.step.max_pages_per_seq;
    const float* k_scale = reinterpret_cast<const float*>(c.k_scale);
    const float* v_scale = reinterpret_cast<const float*>(c.v_scale);
    const bool per_token_scale = c.scale_mode == LONGCTX_KV_SCALE_TOKEN_HEAD;
    // fp8 codes widen to value / 256: the 256 joins every scale.
    float head_k_scale = kFp8 ? 256.f : 1.f, head_v_scale = head_k_scale;
    if (kFp8 && c.scale_mode == LONGCTX_KV_SCALE_HEAD) {
        head_k_scale *= k_scale[kv_head];
        head_v_scale *= v_scale[kv_head];
    }

    // Issues the copies of the tile starting at key j0 into stage `st`; rows at or past `hi`
    // are zero-filled (their address is the tile's first row, which exists).
    auto load_tile = [&](int j0, int st) {
        char* kdst = staging + st * Sh::kStageBytes;
        char* vdst = kdst + kTileN * Sh::kRowBytes;
#pragma unroll
        for (int i = 0; i < Sh::kChunksPerThread; ++i) {
            const int chunk = i * kThreads + tid;
            const int row = chunk / Sh::kChunksPerRow;
            const int col = chunk % Sh::kChunksPerRow;
            const int j = j0 + row;
            const bool valid = j < hi;
            const int jj = valid ? j : j0;
            const int64_t slot = int64_t(table[jj / page_size]) * page_size + jj % page_size;
            const int64_t elem = (slot * c.heads_kv + kv_head) * D + col * (16 / int(sizeof(S)));
            cp_async_16(smem_addr_of(kdst + chunk * 16), reinterpret_cast<const S*>(c.k) + elem, valid);
            cp_async_16(smem_addr_of(vdst + chunk * 16), reinterpret_cast<const S*>(c.v) + elem, valid);
        }
        if (kFp8 && per_token_scale && tid < kTileN) {
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

    float m[kRows], l[kRows], acc[kRows][kVec];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[r][e] = 0.f;
    }

    const int n_tiles = hi > lo ? (hi - lo + kTileN - 1) / kTileN : 0;
    if (n_tiles > 0) {
        load_tile(lo, 0);
        cp_async_commit();
    }
    for (int t = 0; t < n_tiles; ++t) {
        const int st = t & 1;
        if (t + 1 < n_tiles) {
            load_tile(lo + (t + 1) * kTileN, st ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const bool rotating = p.rope_inv_freq != 0;
        const int half = int(p.rotary_dim) / 2;
        const bool neox = p.rope_style == LONGCTX_ROPE_STYLE_NEOX;
        const double* inv = rotating ? reinterpret_cast<const double*>(p.rope_inv_freq) + int64_t(b) * half : nullptr;
        const float factor = rotating ? reinterpret_cast<const float*>(p.rope_factor)[b] : 1.f;
        if constexpr (!kFp8) {
            if (rotating) {
                // Rotate the tile's keys in place: key row r at position lo + t * kTileN + r,
                // every pair once.
                S* ktile = reinterpret_cast<S*>(staging + st * Sh::kStageBytes);
                for (int i = tid; i < kTileN * half; i += kThreads) {
                    const int r = i / half;
                    const int pair = i % half;
                    const int pos = lo + t * kTileN + r;
                    if (pos >= hi) continue;  // a zero-filled row past the split
                    const int ca = neox ? pair : 2 * pair;
                    const int cb = neox ? pair + half : 2 * pair + 1;
                    kv_rotate::rotate_pair(p, inv[pair], factor, pos, ktile + r * D + ca, ktile + r * D + cb);
                }
                __syncthreads();
            }
        }

        const S* ks_tile = reinterpret_cast<const S*>(staging + st * Sh::kStageBytes);
        const S* vs_tile = ks_tile + kTileN * D;
        // fp8 and rotating: the rotated T keys of the current part (rows part * kWideRows ..).
        T* const wide = reinterpret_cast<T*>(staging + 2 * Sh::kStageBytes);
#pragma unroll 1
        for (int part = 0; part < Sh::kWideParts; ++part) {
            if (kFp8 && rotating) {
                if (part > 0) __syncthreads();  // every thread is done with the previous part
                // Pair i of row r: the rotary pairs (i < half) as RoPE pairs them, then the
                // remaining channels two by two, copied widened; every element written once.
                for (int i = tid; i < kWideRows * (D / 2); i += kThreads) {
                    const int r = i / (D / 2);
                    const int pair = i % (D / 2);
                    const int row = part * kWideRows + r;
                    const int pos = lo + t * kTileN + row;
                    const bool rot = pair < half;
                    const int xa = !rot ? 2 * pair : neox ? pair : 2 * pair;
                    const int xb = !rot ? 2 * pair + 1 : neox ? pair + half : 2 * pair + 1;
                    T* ea = wide + r * D + xa;
                    T* eb = wide + r * D + xb;
                    *ea = DType<T>::from_f32(Stored<S>::widen(ks_tile[row * D + xa]));
                    *eb = DType<T>::from_f32(Stored<S>::widen(ks_tile[row * D + xb]));
                    // Rows past the split are zero-filled and never scored: left unrotated.
                    if (rot && pos < hi) kv_rotate::rotate_pair(p, inv[pair], factor, pos, ea, eb);
                }
                __syncthreads();
            }
#pragma unroll 1
            for (int u = part * (kWideRows / kGroups); u < (part + 1) * (kWideRows / kGroups); ++u) {
                const int row = u * kGroups + group;
                const int j = lo + t * kTileN + row;
                float ksc = head_k_scale, vsc = head_v_scale;
                if (kFp8 && per_token_scale) {
                    ksc *= smem_scale[(st * 2) * kTileN + row];
                    vsc *= smem_scale[(st * 2 + 1) * kTileN + row];
                }
                float kf[kVec];
                if (kFp8 && rotating) {
                    Slice<T, kVec> kw;
                    load_slice(kw, wide + (row - part * kWideRows) * D + tx * kVec);
#pragma unroll
                    for (int e = 0; e < kVec; ++e) kf[e] = DType<T>::to_f32(kw.elt[e]);
                } else {
                    Slice<S, kVec> kx;
                    load_slice(kx, ks_tile + row * D + tx * kVec);
#pragma unroll
                    for (int e = 0; e < kVec; ++e) kf[e] = Stored<S>::widen(kx.elt[e]);
                }
                float s[kRows];
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    float a = 0.f;
#pragma unroll
                    for (int e = 0; e < kVec; ++e) a = fmaf(q[r][e], kf[e], a);
                    s[r] = a;
                }
#pragma unroll
                for (int off = kTx / 2; off > 0; off >>= 1)
#pragma unroll
                    for (int r = 0; r < kRows; ++r) s[r] += __shfl_xor_sync(kFullMask, s[r], off);

                Slice<S, kVec> vx;
                load_slice(vx, vs_tile + row * D + tx * kVec);
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                    if (j >= hi || j < row_lo[r] || j > row_hi[r]) continue;
                    float x = s[r] * ksc;
                    if (p.softcap_in != 0.f) x = tanhf(x * p.softcap_in);
                    x *= p.exp_scale;
                    const float m_new = fmaxf(m[r], x);
                    const float corr = exp2f(m[r] - m_new);  // 0 on the row's first key
                    const float pr = exp2f(x - m_new);
                    m[r] = m_new;
                    l[r] = l[r] * corr + pr;
                    const float w = pr * vsc;
#pragma unroll
                    for (int e = 0; e < kVec; ++e) acc[r][e] = fmaf(w, Stored<S>::widen(vx.elt[e]), acc[r][e] * corr);
                }
            }
        }
        __syncthreads();  // the next iteration's copies overwrite this stage
    }

    // Combine the kGroups partial states of every row through shared memory (the staging
    // area is free: the last barrier of the loop, or no tile at all, precedes this).
    float* red_acc = reinterpret_cast<float*>(staging);  // [kGroups][kRows][D]
    float* red_ml = red_acc + kGroups * kRows * D;       // [kGroups][kRows][2]
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) red_acc[(group * kRows + r) * D + tx * kVec + e] = acc[r][e];
        if (tx == 0) {
            red_ml[(group * kRows + r) * 2] = m[r];
            red_ml[(group * kRows + r) * 2 + 1] = l[r];
        }
    }
    __syncthreads();

    const bool one_split = p.splits == 1;
    for (int idx = tid; idx < kRows * D; idx += kThreads) {
        const int r = idx / D;
        const int ch = idx % D;
        const int row = r0 + r;
        if (row >= rows_total) continue;
        float mx = -INFINITY;
#pragma unroll
        for (int g = 0; g < kGroups; ++g) mx = fmaxf(mx, red_ml[(g * kRows + r) * 2]);
        float o = 0.f, lse = -INFINITY;
        if (mx != -INFINITY) {
            float sum = 0.f, num = 0.f;
#pragma unroll
            for (int g = 0; g < kGroups; ++g) {
                const float mg = red_ml[(g * kRows + r) * 2];
                if (mg == -INFINITY) continue;  // the group saw no key of this row
                const float w = exp2f(mg - mx);
                sum += red_ml[(g * kRows + r) * 2 + 1] * w;
                num += red_acc[(g * kRows + r) * D + ch] * w;
            }
            o = num / sum;
            lse = (mx + log2f(sum)) * 0.6931471805599453f;  // exp2 domain -> natural log
        }
        const int64_t token = tok0 + row / hpk;
        const int64_t head = int64_t(kv_head) * hpk + row % hpk;
        if (one_split) {
            T* out = reinterpret_cast<T*>(p.o) + token * p.o_token_stride + head * p.o_head_stride;
            out[ch] = DType<T>::from_f32(o);
            if (ch == 0 && p.lse != 0)
                reinterpret_cast<float*>(p.lse)[head * p.lse_head_stride + token] = lse;
        } else {
            const int64_t part_row = (int64_t(split) * p.total_new + token) * p.heads_q + head;
            reinterpret_cast<float*>(p.part_o)[part_row * D + ch] = o;
            if (ch == 0)
                reinterpret_cast<float*>(p.part_lse)[(int64_t(split) * p.heads_q + head) * p.total_new + token] = lse;
        }
    }
}

}  // namespace kv_decode
}  // namespace longctx
