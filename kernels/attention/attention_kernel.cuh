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
//           (reference max in raw score units, exponentials 2^(t * exp_scale - max *
//           exp_scale); the reference max moves, and O and the row sums are rescaled by
//           2^((old max - new max) * exp_scale), only when some row of the warp outgrew it
//           by more than LONGCTX_ATTN_RESCALE_THRESHOLD in the exp2 domain)
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
#include "common/smem.cuh"
#include <math.h>
#include <stdint.h>

#include "attention/block_info.cuh"
#include "attention/traits.cuh"
#include "common/cp_async.cuh"
#include "common/fast_math.cuh"
#include "common/fp8.cuh"
#include "common/mma.cuh"
#include "kv_cache/rotate.cuh"
#include "params/attention_params.h"
#include "params/kv_cache_params.h"

namespace longctx {
namespace attn {

constexpr float kLn2 = 0.693147180559945309f;

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of ROW_ELEMS-element rows.
template <int ROW_ELEMS>
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
    return uint32_t(row * (ROW_ELEMS * 2) + ((chunk ^ (row & 7)) << 4));
}

// Per-thread plan of the cp.async copies of a ROWS x DIM tile. Each row is kSlots 16-byte
// slots (its kChunks = DIM / 8 chunks rounded up to a power of two; slots past kChunks idle,
// which only happens for d = 96 and 192): thread tid copies slot tid % kSlots of rows
// row0 = tid / kSlots, row0 + kRowStep, ... Consecutive threads take consecutive chunks of
// a row, so global reads are coalesced. A thread's chunk is fixed and its rows advance by
// kRowStep, a multiple of 8 or exactly 4, so the swizzled shared-memory offset is one of
// two per-thread values plus a compile-time row offset, and the global address one pointer
// bumped by a fixed step: few live registers across the main loop.
template <int ROWS, int DIM, int ROW_ELEMS, int THREADS> struct TileLoader {
    static constexpr int kChunks = DIM / 8;
    static constexpr int kSlots = kChunks <= 8 ? 8 : (kChunks <= 16 ? 16 : (kChunks <= 32 ? 32 : 64));
    static constexpr int kRowStep = THREADS / kSlots;
    static constexpr int kIters = ROWS / kRowStep;
    static constexpr int kRowBytes = ROW_ELEMS * 2;
    static_assert(THREADS % kSlots == 0 && ROWS % kRowStep == 0, "tile splits evenly over the threads");
    static_assert(kRowStep % 8 == 0 || kRowStep == 4, "row % 8 of a thread's rows takes at most two values");

    int row0;
    int chunk;
    bool active;
    uint32_t swz[2];  // byte offset of (row0 + i * kRowStep, chunk) minus i * kRowStep rows, i even / odd

    __device__ __forceinline__ explicit TileLoader(int tid) {
        chunk = tid % kSlots;
        row0 = tid / kSlots;
        active = chunk < kChunks;
        // kRowStep % 8 == 0: every row has row0's swizzle. kRowStep == 4: row0 < 4, and odd
        // steps add 4 to row % 8.
        swz[0] = uint32_t(row0 * kRowBytes + ((chunk ^ (row0 & 7)) << 4));
        swz[1] = uint32_t(row0 * kRowBytes + ((chunk ^ ((row0 + kRowStep) & 7)) << 4));
    }

    // Element offset of this thread's first row and chunk in a tensor of the given stride.
    __device__ __forceinline__ int64_t thread_offset(int64_t stride) const { return int64_t(row0) * stride + chunk * 8; }

    // Issues the copies of a tile whose row r starts at tile + r * stride (elements); `src`
    // is tile + thread_offset(stride). Rows >= valid_rows are zero-filled, reading nothing:
    // their source operand is `dummy`, any valid address.
    template <typename T>
    __device__ __forceinline__ void load(uint32_t s_tile, const T* src, const T* dummy, int64_t stride,
                                         int valid_rows) const {
        if (!active) return;
        const int64_t step = int64_t(kRowStep) * stride;
        if (kChunks == kSlots && valid_rows >= ROWS) {
            // A whole tile (every tile but a sequence's last): no per-row predicate or
            // source select. The branch is uniform across the CTA. Not for d 96 (idle
            // slots), where the extra path cost ptxas 8 bytes of spill on sm_90a.
#pragma unroll
            for (int it = 0; it < kIters; ++it) {
                const uint32_t off = swz[(kRowStep % 8 == 0) ? 0 : (it & 1)] + uint32_t(it * kRowStep * kRowBytes);
                cp_async_16(s_tile + off, src, true);
                src += step;
            }
            return;
        }
        const int rows_left = valid_rows - row0;  // compared with immediates below
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const bool valid = it * kRowStep < rows_left;
            const uint32_t off = swz[(kRowStep % 8 == 0) ? 0 : (it & 1)] + uint32_t(it * kRowStep * kRowBytes);
            cp_async_16(s_tile + off, valid ? src : dummy, valid);
            src += step;
        }
    }

    // Issues the copies of tile rows k0 .. k0 + ROWS of a sequence in a paged cache: row j
    // starts at base + (table[j / page_size] * page_size + j % page_size) * slot_stride,
    // where `base` is this thread's (head, chunk) element of slot 0 of page 0. Every row's
    // page is looked up on its own. Rows >= valid_rows (relative to k0) are zero-filled,
    // reading neither the table nor the cache; their source operand is `base`.
    template <typename T>
    __device__ __forceinline__ void load_paged(uint32_t s_tile, const T* base, const int* table, int page_size,
                                               int64_t slot_stride, int k0, int valid_rows) const {
        if (!active) return;
        const int rows_left = valid_rows - row0;
        const int j0 = k0 + row0;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const bool valid = it * kRowStep < rows_left;
            const uint32_t off = swz[(kRowStep % 8 == 0) ? 0 : (it & 1)] + uint32_t(it * kRowStep * kRowBytes);
            const T* src = base;
            if (valid) {
                const int j = j0 + it * kRowStep;
                const int page_col = j / page_size;
                const int slot = j - page_col * page_size;
                src = base + (int64_t(table[page_col]) * page_size + slot) * slot_stride;
            }
            cp_async_16(s_tile + off, src, valid);
        }
    }
};

// Where the forward's K and V rows come from: a source names its params type (BlockInfo
// has a constructor for each: the sequence geometry of a CTA), gives the attention params
// the body reads (Q, O, LSE, heads, window, softmax constants), and says whether rows are
// paged. Dense sources use the body's strided TileLoader copies; paged ones a Loader that
// issues the copies of key rows [k0, k0 + kBlockN) of K and of V (load_k, load_v) by page
// lookup, zero-filling rows from the sequence's key count sk on. The dense path is written
// out in the body itself, so the attention forward's entries compile to the same code as
// before paged sources existed.

// Dense K and V tensors with token strides (the attention forward).
struct DenseKv {
    using Params = LongctxAttnParams;
    static constexpr bool kPaged = false;
    static constexpr bool kFp8 = false;
    static constexpr bool kRotate = false;
    static __device__ __forceinline__ const LongctxAttnParams& attn(const Params& p) { return p; }

    // No paged loader: the body's strided copies serve.
    template <typename T, int ROWS, int D, int ROW_ELEMS, int THREADS> struct Loader {
        __device__ __forceinline__ Loader(const Params&, int, int) {}
    };
};

// A paged KV cache (params/kv_cache_params.h): sequence b's queries are rows
// cu_new[b] .. cu_new[b + 1] of Q and O, its keys the seqlens[b] tokens of its pages, and
// its new tokens the last of them (bottom-right alignment places query i at key position
// seqlens[b] - n + i). K and V rows are head_dim wide (D == DV).
struct PagedKv {
    using Params = LongctxKvExtendParams;
    static constexpr bool kPaged = true;
    static constexpr bool kFp8 = false;
    static constexpr bool kRotate = false;
    static __device__ __forceinline__ const LongctxAttnParams& attn(const Params& p) { return p.attn; }

    template <typename T, int ROWS, int D, int ROW_ELEMS, int THREADS> struct Loader {
        TileLoader<ROWS, D, ROW_ELEMS, THREADS> loader;  // K's and V's copy plans are the same
        const T* k_thread;  // this thread's (head, chunk) element of K's slot 0 of page 0
        const T* v_thread;
        const int* table;   // the sequence's block table row
        int page_size;
        int64_t slot_stride;  // elements between consecutive slots: heads_kv x head_dim

        __device__ __forceinline__ Loader(const Params& p, int head_kv, int tid) : loader(tid) {
            slot_stride = int64_t(p.cache.heads_kv) * D;
            const int64_t off = int64_t(head_kv) * D + loader.chunk * 8;
            k_thread = reinterpret_cast<const T*>(p.cache.k) + off;
            v_thread = reinterpret_cast<const T*>(p.cache.v) + off;
            table = reinterpret_cast<const int*>(p.step.block_table) +
                    int64_t(blockIdx.z) * int64_t(p.step.max_pages_per_seq);
            page_size = int(p.cache.page_size);
        }
        __device__ __forceinline__ void load_k(uint32_t s_tile, int k0, int sk) const {
            loader.load_paged(s_tile, k_thread, table, page_size, slot_stride, k0, sk - k0);
        }
        __device__ __forceinline__ void load_v(uint32_t s_tile, int k0, int sk) const {
            loader.load_paged(s_tile, v_thread, table, page_size, slot_stride, k0, sk - k0);
        }
    };
};

// A paged fp8 e4m3 cache (LONGCTX_KV_SCALE_TOKEN_HEAD or LONGCTX_KV_SCALE_HEAD): the value of
// an element is code x scale. Key rows [k0, k0 + kBlockN) land as codes (D bytes per row,
// dense, unswizzled) in a staging tile after the V tile; each row's scale x 256 goes to a
// float array after the staging tile. The body then widens the staged rows into its
// swizzled T tile (widen_fp8_tile): element = T(code x scale), so the main loop is the 16-bit
// path's, unchanged, on the cache's dequantised values rounded to T (docs/NOTES.md, "fp8
// extend", has the reasons).
struct PagedKvFp8 {
    using Params = LongctxKvExtendParams;
    static constexpr bool kPaged = true;
    static constexpr bool kFp8 = true;
    static constexpr bool kRotate = false;
    static __device__ __forceinline__ const LongctxAttnParams& attn(const Params& p) { return p.attn; }

    template <typename T, int ROWS, int D, int ROW_ELEMS, int THREADS> struct Loader {
        static constexpr int kRawChunks = D / 16;  // 16-byte chunks of a row of codes
        static constexpr int kTotal = ROWS * kRawChunks;
        static constexpr int kIters = (kTotal + THREADS - 1) / THREADS;
        static_assert(D % 16 == 0, "rows of codes are whole 16-byte chunks");
        static_assert(ROWS <= THREADS, "one thread per row fetches the scales");

        // Few registers live across the main loop (the 16-bit path's loader keeps its
        // pointers in registers; here the spill-free budget of d 128 on sm_90a and d 256 has
        // no room for them): the cache's fields are read from the kernel's parameter space
        // where they are used.
        const Params& p;
        const int* table;  // the sequence's block table row
        int head_kv;
        int tid;

        __device__ __forceinline__ Loader(const Params& p_, int head_kv_, int tid_)
            : p(p_), head_kv(head_kv_), tid(tid_) {
            table = reinterpret_cast<const int*>(p.step.block_table) +
                    int64_t(blockIdx.z) * int64_t(p.step.max_pages_per_seq);
        }

        // (Slot x heads_kv + head_kv) of the sequence's key j: its row among the cache's
        // [slots, heads_kv] rows.
        __device__ __forceinline__ int64_t row_of(int j) const {
            const int page_size = int(p.cache.page_size);
            const int page_col = j / page_size;
            const int64_t slot = int64_t(table[page_col]) * page_size + (j - page_col * page_size);
            return slot * p.cache.heads_kv + head_kv;
        }

        // Issues the copies of the codes of keys [k0, k0 + ROWS) of `cache` into the staging
        // tile at s_stage (row r at r * D bytes); rows from sk - k0 on are zero-filled,
        // reading nothing (their source operand is the cache's first byte).
        __device__ __forceinline__ void load(uint32_t s_stage, uint64_t cache, int k0, int sk) const {
            const uint8_t* base = reinterpret_cast<const uint8_t*>(cache);
#pragma unroll
            for (int it = 0; it < kIters; ++it) {
                const int idx = it * THREADS + tid;
                if (kTotal % THREADS == 0 || idx < kTotal) {
                    const int row = idx / kRawChunks;
                    const int col = idx - row * kRawChunks;
                    const int j = k0 + row;
                    const bool valid = j < sk;
                    const uint8_t* src = base;
                    if (valid) src = base + row_of(j) * D + col * 16;
                    cp_async_16(s_stage + uint32_t(row * D + col * 16), src, valid);
                }
            }
        }
        __device__ __forceinline__ void load_k(uint32_t s_stage, int k0, int sk) const { load(s_stage, p.cache.k, k0, sk); }
        __device__ __forceinline__ void load_v(uint32_t s_stage, int k0, int sk) const { load(s_stage, p.cache.v, k0, sk); }

        // Scale x 256 of row `tid` of the tile at k0 (threads tid < ROWS), 0 for rows past
        // the sequence (their codes are zero-filled). The caller stores it to shared memory
        // later, so the global load's latency hides under the main loop's work.
        __device__ __forceinline__ float scale(uint64_t scales, int k0, int sk) const {
            const int j = k0 + tid;
            if (tid >= ROWS || j >= sk) return 0.f;
            const float* s = reinterpret_cast<const float*>(scales);
            const int64_t at = p.cache.scale_mode == LONGCTX_KV_SCALE_TOKEN_HEAD ? row_of(j) : int64_t(head_kv);
            return s[at] * 256.f;
        }
        __device__ __forceinline__ float k_scale_of(int k0, int sk) const { return scale(p.cache.k_scale, k0, sk); }
        __device__ __forceinline__ float v_scale_of(int k0, int sk) const { return scale(p.cache.v_scale, k0, sk); }
    };
};

// A paged source (PagedKv, PagedKvFp8) whose keys are stored un-rotated (exact dynamic
// scaling, params/kv_cache_params.h): after each K tile is in shared memory as T (after
// the fp8 widening), and after the Q tile lands, every row is rotated in place at its
// position with the sequence's inv_freq row and attention factor (rotate_tile_rows), before
// any ldmatrix reads it. The rotation is the rotating decode's (kv_cache/rotate.cuh).
template <typename Base> struct Rotating : Base {
    static constexpr bool kRotate = true;
};

// Rotates rows r < valid of a swizzled T tile (rows of ROW_ELEMS elements) in place: row r
// at position pos0 + r, each of its rotary_dim / 2 pairs by one thread (pairs are disjoint:
// no element is touched twice). Not unrolled: it runs while O's accumulators are live.
template <typename T, int ROWS, int ROW_ELEMS, int THREADS>
__device__ __forceinline__ void rotate_tile_rows(const LongctxKvExtendParams& p, const double* inv, float factor,
                                                 uint8_t* tile, int pos0, int valid, int tid) {
    const int half = int(p.rotary_dim) / 2;
    const bool neox = p.rope_style == LONGCTX_ROPE_STYLE_NEOX;
    const int rows = min(valid, ROWS);
#pragma unroll 1
    for (int i = tid; i < rows * half; i += THREADS) {
        const int r = i / half;
        const int pair = i - r * half;
        const int ca = neox ? pair : 2 * pair;
        const int cb = neox ? pair + half : 2 * pair + 1;
        T* ea = reinterpret_cast<T*>(tile + swizzle<ROW_ELEMS>(r, ca / 8)) + ca % 8;
        T* eb = reinterpret_cast<T*>(tile + swizzle<ROW_ELEMS>(r, cb / 8)) + cb % 8;
        kv_rotate::rotate_pair(p, inv[pair], factor, pos0 + r, ea, eb);
    }
}

// Widens a staged tile of fp8 codes (ROWS rows of D codes at stage + r * D) into the
// swizzled T tile at `tile` (rows of ROW_ELEMS elements): element (r, c) becomes
// T(e4m3(code) x scale256[r] / 256), rounded once to T from the f32 product code x scale
// (code / 256 and scale x 256 are exact, so their product is the same f32). Thread tid
// takes 16-byte chunks tid, tid + THREADS, ... of the staged tile: 16 codes, two T chunks.
template <typename T, int ROWS, int D, int ROW_ELEMS, int THREADS>
__device__ __forceinline__ void widen_fp8_tile(const uint8_t* stage, const float* scale256, uint8_t* tile, int tid) {
    constexpr int kRawChunks = D / 16;
    constexpr int kTotal = ROWS * kRawChunks;
    // Not unrolled: the widening runs while O's accumulators and P's fragments are live, and
    // an unrolled loop's hoisted loads cost registers there.
#pragma unroll 1
    for (int it = 0; it < (kTotal + THREADS - 1) / THREADS; ++it) {
        const int idx = it * THREADS + tid;
        if (kTotal % THREADS == 0 || idx < kTotal) {
            const int row = idx / kRawChunks;
            const int col = idx - row * kRawChunks;
            const uint4 x = *reinterpret_cast<const uint4*>(stage + row * D + col * 16);
            const float sc = scale256[row];
            const uint32_t w[4] = {x.x, x.y, x.z, x.w};
            uint32_t out[8];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t two = w[q] >> (16 * h);
                    out[2 * q + h] = MmaType<T>::pack(e4m3_to_f32_div256(two & 0xFFu) * sc,
                                                      e4m3_to_f32_div256((two >> 8) & 0xFFu) * sc);
                }
            }
            *reinterpret_cast<uint4*>(tile + swizzle<ROW_ELEMS>(row, 2 * col)) = make_uint4(out[0], out[1], out[2], out[3]);
            *reinterpret_cast<uint4*>(tile + swizzle<ROW_ELEMS>(row, 2 * col + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
        }
    }
}

// Per-lane ldmatrix.x4 addresses into a tile of ROW_ELEMS-element rows. For k16 step k,
// lane l addresses row `row` of a 16-row block (row % 8 == l % 8) and chunk 2k + hi
// (hi in {0, 1}). Since 2 (k % 4) + hi < 8 and blocks start on multiples of 8 rows, the
// swizzled chunk is 8 (k / 4) + ((2 (k % 4)) ^ hi ^ (l % 8)): four per-lane addresses, the
// rest (block row, k / 4, tile offset) compile-time immediates of the instruction.
template <int ROW_ELEMS> struct LdsmAddr {
    uint32_t addr[4];
    __device__ __forceinline__ LdsmAddr(uint32_t base, int row, int hi, int lane) {
        const int x = hi ^ (lane & 7);
#pragma unroll
        for (int k = 0; k < 4; ++k) addr[k] = base + uint32_t(row * ROW_ELEMS * 2 + (((2 * k) ^ x) << 4));
    }
    // Address for k16 step k of 16-row block `block` of the tile TILE_BYTES after the base.
    template <int TILE_BYTES>
    __device__ __forceinline__ uint32_t at(int block, int k) const {
        return addr[k & 3] + uint32_t(TILE_BYTES + block * 16 * ROW_ELEMS * 2 + (k >> 2) * 128);
    }
};

// Bytes of shared memory a source adds after the forward's Q, K and V tiles of ROWS-key
// tiles: none for 16-bit sources; for fp8 the staged codes of one K or V tile (never both
// at once) and the scales of its rows.
template <typename Kv, int ROWS, int D, bool FP8 = Kv::kFp8> struct SourceExtraSmem {
    static constexpr int value = 0;
};
template <typename Kv, int ROWS, int D> struct SourceExtraSmem<Kv, ROWS, D, true> {
    static constexpr int value = ROWS * D + ROWS * 4;
};

// Kv: where K and V come from (DenseKv, PagedKv, PagedKvFp8); P is its Params.
template <typename T, int D, int DV, typename Kv = DenseKv>
__device__ __forceinline__ void attn_fwd_body(const typename Kv::Params& kv_params) {
    const LongctxAttnParams& p = Kv::attn(kv_params);
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

    LONGCTX_DYNAMIC_SMEM(uint8_t, smem, 128);
    // The host sizes shared memory from the tile shape it believes the loaded code has;
    // a launch that gave less than this code's tiles need stops here with an error instead
    // of touching memory past the allocation.
    const uint32_t dyn_smem = dynamic_smem_size();
    constexpr int kSmemNeed = Tr::kSmemBytes + SourceExtraSmem<Kv, kBlockN, D>::value;
    if (dyn_smem < uint32_t(kSmemNeed)) __trap();

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;   // MMA fragment group: rows g and g + 8 of each m16 tile
    const int t4 = lane & 3;   // thread in group: columns 2 * t4, 2 * t4 + 1 of each n8 tile
    const int head = blockIdx.y;
    const int m_block = int(p.num_m_blocks) - 1 - int(blockIdx.x);

    const BlockInfo<kBlockM, kBlockN> bi(kv_params, blockIdx.z, m_block);
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
    // Key tiles n in [unmasked_lo, unmasked_hi) need no mask (BlockInfo::needs_mask in
    // interval form, so the loop keeps two integers instead of the mask geometry).
    const int unmasked_lo = bi.unmasked_lo();
    const int unmasked_hi = bi.unmasked_hi();
    // Row mask: tile row mi * 16 + 8h of this lane sees keys
    // [lane_key_lo + 16 mi + 8h, min(lane_key_lo + span + 16 mi + 8h, sk - 1)].
    const int lane_key_lo = bi.m0 + warp * kRowsPerWarp + g + bi.diag - bi.left;
    const int sk = bi.sk;

    const int head_kv = head / int(p.heads_per_kv);
    const int64_t k_ts = p.k.token_stride;
    const int64_t v_ts = p.v.token_stride;
    const T* k_base = reinterpret_cast<const T*>(p.k.data);  // valid dummy source of zero-fills
    const T* v_base = reinterpret_cast<const T*>(p.v.data);

    const uint32_t sQ = uint32_t(__cvta_generic_to_shared(smem));
    constexpr int kOffK = Tr::kSmemQ;              // K tile, bytes after sQ
    constexpr int kOffV = Tr::kSmemQ + Tr::kSmemK;  // V tile, bytes after sQ
    // fp8 sources: the staged codes of one K or V tile [kBlockN][D] (bytes), then the
    // scales x 256 of its rows [kBlockN] (f32).
    constexpr int kOffStage = Tr::kSmemBytes;
    constexpr int kOffScale = kOffStage + kBlockN * D;
    [[maybe_unused]] uint8_t* const stage = smem + kOffStage;
    [[maybe_unused]] float* const scale256 = reinterpret_cast<float*>(smem + kOffScale);

    // Rotating sources: the sequence's inv_freq row and attention factor.
    [[maybe_unused]] const double* rot_inv = nullptr;
    [[maybe_unused]] float rot_factor = 0.f;
    const TileLoader<kBlockN, D, kRowQK, kThreads> k_loader(tid);
    const TileLoader<kBlockN, DV, kRowV, kThreads> v_loader(tid);
    // This thread's copy source in key tile 0 of the sequence; tile n adds n * kBlockN rows.
    // (A paged source leaves these unused: its loader below addresses every row.)
    const T* k_thread = k_base + int64_t(bi.k_start) * k_ts + int64_t(head_kv) * p.k.head_stride +
                        k_loader.thread_offset(k_ts);
    const T* v_thread = v_base + int64_t(bi.k_start) * v_ts + int64_t(head_kv) * p.v.head_stride +
                        v_loader.thread_offset(v_ts);
    static_assert(!Kv::kPaged || (D == DV && kRowQK == kRowV), "paged K and V rows have one width");
    const typename Kv::template Loader<T, kBlockN, D, kRowQK, kThreads> paged(kv_params, head_kv, tid);
    {
        const TileLoader<kBlockM, D, kRowQK, kThreads> q_loader(tid);
        const T* q_base = reinterpret_cast<const T*>(p.q.data);
        const T* q_thread = q_base + (int64_t(bi.q_start) + bi.m0) * p.q.token_stride +
                            int64_t(head) * p.q.head_stride + q_loader.thread_offset(p.q.token_stride);
        q_loader.load(sQ, q_thread, q_base, p.q.token_stride, rows_here);
        const int k0 = n_min * kBlockN;
        if constexpr (Kv::kFp8) {
            paged.load_k(sQ + kOffStage, k0, sk);
            if (tid < kBlockN) scale256[tid] = paged.k_scale_of(k0, sk);
        } else if constexpr (Kv::kPaged) {
            paged.load_k(sQ + kOffK, k0, sk);
        } else {
            k_loader.load(sQ + kOffK, k_thread + int64_t(k0) * k_ts, k_base, k_ts, sk - k0);
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (Kv::kFp8) {
        widen_fp8_tile<T, kBlockN, D, kRowQK, kThreads>(stage, scale256, smem + kOffK, tid);
        __syncthreads();
    }
    if constexpr (Kv::kRotate) {
        // Query row r of the tile sits at key position m0 + r + diag (bottom-right); rows
        // past the chunk are zero-filled and stay so. Then the first key tile.
        rot_inv = reinterpret_cast<const double*>(kv_params.rope_inv_freq) +
                  int64_t(blockIdx.z) * int64_t(kv_params.rotary_dim / 2);
        rot_factor = reinterpret_cast<const float*>(kv_params.rope_factor)[blockIdx.z];
        rotate_tile_rows<T, kBlockM, kRowQK, kThreads>(kv_params, rot_inv, rot_factor, smem, bi.m0 + bi.diag,
                                                       rows_here, tid);
        const int k0 = n_min * kBlockN;
        rotate_tile_rows<T, kBlockN, kRowQK, kThreads>(kv_params, rot_inv, rot_factor, smem + kOffK, k0, sk - k0,
                                                       tid);
        __syncthreads();
    }

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
    // ldmatrix addresses. Q (A operand) and V (B operand, .trans: V's rows are k): lane l
    // gives row l % 16 and chunk 2k + l / 16, so matrices 0..3 are (rows 0-7, k lo),
    // (rows 8-15, k lo), (rows 0-7, k hi), (rows 8-15, k hi). K (B operand, K's rows are n):
    // lane l gives row l % 8 + 8 (l / 16) and chunk 2k + (l / 8) % 2, so matrices 0..3 are
    // (keys 0-7, k lo), (keys 0-7, k hi), (keys 8-15, k lo), (keys 8-15, k hi): each key tile's
    // b0, b1 land in consecutive registers, as mma wants them.
    const LdsmAddr<kRowQK> q_ldsm(sQ + uint32_t(warp_row0 * kRowQK * 2), lane & 15, lane >> 4, lane);
    const LdsmAddr<kRowQK> k_ldsm(sQ, (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1, lane);
    const LdsmAddr<kRowV> v_ldsm(sQ, lane & 15, lane >> 4, lane);
    const float exp_scale = p.exp_scale;
    const float softcap_in = p.softcap_in;

    // fp8: this thread's scale of the tile row it fetched, stored to scale256 once every
    // reader of the previous tile's scales has passed a barrier.
    [[maybe_unused]] float scale_next = 0.f;
    for (int n = n_min; n < n_max; ++n) {
        const int k0 = n * kBlockN;
        if constexpr (Kv::kFp8) {
            paged.load_v(sQ + kOffStage, k0, sk);
            scale_next = paged.v_scale_of(k0, sk);
        } else if constexpr (Kv::kPaged) {
            paged.load_v(sQ + kOffV, k0, sk);
        } else {
            v_loader.load(sQ + kOffV, v_thread + int64_t(k0) * v_ts, v_base, v_ts, sk - k0);
        }
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
            // A fragments of this warp's m16 tiles (matrices 0..3 are a0..a3).
            uint32_t a[kMTiles][4];
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) ldmatrix_x4(a[mi], q_ldsm.template at<0>(mi, ks));
#pragma unroll
            for (int np = 0; np < kNTiles / 2; ++np) {
                // B fragments of the 16 keys from np * 16: b0, b1 of key tile 2np, then of 2np+1.
                uint32_t b[4];
                ldmatrix_x4(b, k_ldsm.template at<kOffK>(np, ks));
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
                    for (int e = 0; e < 4; ++e) s[mi][nj][e] = fast_tanh(s[mi][nj][e] * softcap_in);
                }
            }
        }

        if (n < unmasked_lo || n >= unmasked_hi) {
            const int span = p.window_left + p.window_right;
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int j_lo = lane_key_lo + mi * 16 + 8 * h;
                    const int j_hi = min(j_lo + span, sk - 1);
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

        // Online softmax with lazy rescaling; s becomes P (unnormalised, f32).
        // m_new: the running max including this tile (raw units); the four lanes of a group
        // agree on it after the two shuffles.
        float m_new[kMTiles][2];
        bool grow = false;
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[mi][h];
#pragma unroll
                for (int nj = 0; nj < kNTiles; ++nj) mx = fmaxf(mx, fmaxf(s[mi][nj][2 * h], s[mi][nj][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                m_new[mi][h] = mx;
                // True when the first visible key arrives (-inf -> finite gives +inf) or the
                // max grew by more than the threshold; false while the row sees no key
                // (-inf - -inf is NaN) or the growth is small.
                grow |= (mx - row_max[mi][h]) * exp_scale > LONGCTX_ATTN_RESCALE_THRESHOLD;
            }
        }
        // The reference max of a row only moves when some row of the warp outgrew it by
        // more than 2^LONGCTX_ATTN_RESCALE_THRESHOLD in the exp2 domain; otherwise every
        // exponential below stays <= 2^threshold and O and the row sums need no rescale
        // (FlashAttention 4's conditional rescaling). The branch is warp-uniform, and a
        // skipped rescale is exact: nothing is multiplied.
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
            for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // A row with no visible key yet keeps max -inf; 0 in its place maps the
                    // factor to 2^-inf = 0 (its sum and O are 0) instead of NaN. The factor
                    // is formed from the difference of raw maxima: a factor
                    // 2^(fl(m e) - fl(m' e)) from two separately rounded products can sit
                    // just below 1 and biased the LSE of a 1M-token row by 2e-3.
                    const float m_use = m_new[mi][h] == kNegInf ? 0.f : m_new[mi][h];
                    const float corr = fast_exp2((row_max[mi][h] - m_use) * exp_scale);
                    row_max[mi][h] = m_new[mi][h];
                    row_sum[mi][h] *= corr;
#pragma unroll
                    for (int dj = 0; dj < kDvTiles; ++dj) {
                        acc_o[mi][dj][2 * h] *= corr;
                        acc_o[mi][dj][2 * h + 1] *= corr;
                    }
                }
            }
        }
        // p[mi][kk]: P rounded to T as the A fragment of k16 step kk of P V: the C fragments
        // of key tiles 2kk and 2kk+1 (registers a0 a1 from the first, a2 a3 from the second).
        uint32_t p_frag[kMTiles][kBlockN / 16][4];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                // Scores here are <= m_new <= row_max + threshold / exp_scale, so every
                // exponential is <= 2^threshold; -inf scores (masked) give 0.
                const float m_scaled = (row_max[mi][h] == kNegInf ? 0.f : row_max[mi][h]) * exp_scale;
#pragma unroll
                for (int nj = 0; nj < kNTiles; ++nj) {
                    const float p0 = fast_exp2(fmaf(s[mi][nj][2 * h], exp_scale, -m_scaled));
                    const float p1 = fast_exp2(fmaf(s[mi][nj][2 * h + 1], exp_scale, -m_scaled));
                    row_sum[mi][h] += p0 + p1;
                    p_frag[mi][nj / 2][(nj & 1) * 2 + h] = MmaType<T>::pack(p0, p1);
                }
            }
        }

        if constexpr (Kv::kFp8) {
            // The last reader of scale256 (K's widening) passed the barrier after it.
            if (tid < kBlockN) scale256[tid] = scale_next;
        }
        cp_async_wait<0>();
        __syncthreads();
        if constexpr (Kv::kFp8) {
            // V[n]'s codes landed and every warp is done with sK; the staging tile is free
            // for K[n+1] after this widening's barrier.
            widen_fp8_tile<T, kBlockN, D, kRowV, kThreads>(stage, scale256, smem + kOffV, tid);
            __syncthreads();
        }
        if (n + 1 < n_max) {
            const int k1 = k0 + kBlockN;
            if constexpr (Kv::kFp8) {
                paged.load_k(sQ + kOffStage, k1, sk);
                scale_next = paged.k_scale_of(k1, sk);
            } else if constexpr (Kv::kPaged) {
                paged.load_k(sQ + kOffK, k1, sk);
            } else {
                k_loader.load(sQ + kOffK, k_thread + int64_t(k1) * k_ts, k_base, k_ts, sk - k1);
            }
            cp_async_commit();
        }

        // O += P V over the tile's keys in k16 steps.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
            for (int dp = 0; dp < DV / 16; ++dp) {
                // B fragments of O column tiles 2dp and 2dp+1 (transposed matrices (keys 0-7,
                // cols lo), (keys 8-15, cols lo), (keys 0-7, cols hi), (keys 8-15, cols hi) are
                // b0, b1 of tile 2dp, then b0, b1 of tile 2dp+1).
                uint32_t b[4];
                ldmatrix_x4_trans(b, v_ldsm.template at<kOffV>(kk, dp));
#pragma unroll
                for (int mi = 0; mi < kMTiles; ++mi) {
                    mma_16816<T>(acc_o[mi][2 * dp], p_frag[mi][kk], b[0], b[1]);
                    mma_16816<T>(acc_o[mi][2 * dp + 1], p_frag[mi][kk], b[2], b[3]);
                }
            }
        }

        if constexpr (Kv::kFp8) {
            if (n + 1 < n_max && tid < kBlockN) scale256[tid] = scale_next;
        }
        cp_async_wait<0>();
        __syncthreads();
        if constexpr (Kv::kFp8) {
            // K[n+1]'s codes landed and every warp is done with sV.
            if (n + 1 < n_max) {
                widen_fp8_tile<T, kBlockN, D, kRowQK, kThreads>(stage, scale256, smem + kOffK, tid);
                __syncthreads();
            }
        }
        if constexpr (Kv::kRotate) {
            if (n + 1 < n_max) {
                const int k1 = k0 + kBlockN;
                rotate_tile_rows<T, kBlockN, kRowQK, kThreads>(kv_params, rot_inv, rot_factor, smem + kOffK, k1,
                                                               sk - k1, tid);
                __syncthreads();
            }
        }
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
