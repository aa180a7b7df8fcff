// Tiled attention backward: dQ, dK, dV from Q, K, V, O, dO and the forward's LSE, with
// FlashAttention-2's decomposition (Dao, "FlashAttention-2", 2023, section 3.1 and
// algorithm 2) on the sm80 instruction set. Three kernels:
//
//   1. attn_bwd_pre_body, one warp per (token, head) row: dot = rowsum(dO * O) (the D of
//      the paper), lse_log2 = LSE * log2(e) with -inf (a row that saw no key) mapped to
//      +inf so that every probability of that row recomputes as 2^-inf = 0, and the row's
//      f32 dQ accumulator zeroed.
//   2. attn_bwd_body, one CTA per (key tile, KV head, sequence): dK and dV of its BLOCK_N
//      keys stay in registers while it visits every query tile of every query head of the
//      group that sees them (so GQA's sum over the group needs no atomics), recomputing
//      P from Q, K and the LSE; dQ's contributions go to the f32 accumulator by atomicAdd.
//   3. attn_bwd_dq_body, one warp per (token, head) row: dQ = scale * accumulator, rounded
//      to the storage type (added to the caller's dQ when accumulating).
//
// Math, for one row i and key j (s = q . k unscaled, t = s or tanh(s * softcap_in), the
// forward's softmax on 2^(t * exp_scale)):
//   P_ij = 2^(t_ij exp_scale - lse_log2_i),  dP_ij = dO_i . v_j,
//   dS_ij = P_ij (dP_ij - dot_i) (1 - t_ij^2 with softcap),
//   dV_j += P_ij dO_i,  dK_j += scale dS_ij q_i,  dQ_i += scale dS_ij k_j.
// (With softcap the logit is cap tanh(scale s / cap), whose derivative in s is
// scale (1 - t^2); without it the logit is scale s.)
//
// Main kernel, per query tile (m0 .. m0 + BLOCK_M of query head hq):
//   cp.async Q and dO tiles; lse_log2 and dot of the rows; barrier.
//   Each warp, for its 16 keys (rows of the MMA: the products are transposed, S^T = K Q^T,
//   so the accumulators of dK and dV are plain C fragments):
//     S^T = K Q^T            A: K (ldmatrix), B: Q rows (ldmatrix)
//     softcap, mask, P^T = 2^(t exp_scale - lse_log2)
//     dP^T = V dO^T          A: V (ldmatrix), B: dO rows (ldmatrix)
//     dS^T = P^T (dP^T - dot) (1 - t^2)
//     dV += P^T dO           A: P^T from the C registers, B: dO (ldmatrix.trans)
//     dK += dS^T Q           A: dS^T from the C registers, B: Q (ldmatrix.trans)
//     dS^T (rounded to T) to shared memory (warps of column slice 0)
//   barrier
//   dQ_tile = dS K: warps split the tile's rows (m16 tiles) and D's columns; A: dS^T
//   (ldmatrix.trans), B: K (ldmatrix.trans); atomicAdd into the accumulator.
//   barrier (every warp is done with the Q, dO and dS tiles)
// Then dK * scale and dV are rounded to T and stored (or added to the caller's).
//
// Shared memory: K [BLOCK_N][kRowQK], V [BLOCK_N][kRowV], Q [BLOCK_M][kRowQK],
// dO [BLOCK_M][kRowV], dS^T [BLOCK_N][kRowS] elements with the forward's XOR swizzle
// (16-byte chunk c of row r at chunk c ^ (r % 8)), then lse_log2 and dot [BLOCK_M] floats.
// Rows past the sequence are zero-filled; keys past it are masked; query rows past it have
// lse_log2 = +inf, so their P is 0.
#pragma once
#include "attention/attention_kernel.cuh"
#include "common/dtype.cuh"

namespace longctx {
namespace attn {

template <int D, int DV> struct BwdShape;
#define LONGCTX_ATTN_BWD_SHAPE(D, DV, PREFIX)                                   \
    template <> struct BwdShape<D, DV> {                                        \
        static constexpr int kBlockM = LONGCTX_ATTN_BWD_##PREFIX##_BLOCK_M;      \
        static constexpr int kBlockN = LONGCTX_ATTN_BWD_##PREFIX##_BLOCK_N;      \
        static constexpr int kSplit = LONGCTX_ATTN_BWD_##PREFIX##_DIM_SPLIT;     \
    };
LONGCTX_ATTN_BWD_SHAPE(64, 64, HD64)
LONGCTX_ATTN_BWD_SHAPE(96, 96, HD96)
LONGCTX_ATTN_BWD_SHAPE(128, 128, HD128)
LONGCTX_ATTN_BWD_SHAPE(192, 128, HD192)
LONGCTX_ATTN_BWD_SHAPE(256, 256, HD256)
#undef LONGCTX_ATTN_BWD_SHAPE

constexpr int cmin(int a, int b) { return a < b ? a : b; }

template <int D_, int DV_> struct BwdTraits {
    static constexpr int D = D_;
    static constexpr int DV = DV_;
    static constexpr int kBlockM = BwdShape<D, DV>::kBlockM;  // query rows per step
    static constexpr int kBlockN = BwdShape<D, DV>::kBlockN;  // keys per CTA
    static constexpr int kSplit = BwdShape<D, DV>::kSplit;    // column slices of dK, dV
    static constexpr int kKeyWarps = kBlockN / 16;
    static constexpr int kWarps = kKeyWarps * kSplit;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kMTilesQ = kBlockM / 8;  // n8 tiles of S^T's query columns
    // Column slices: warp slice c owns columns [c * kSlice, c * kSlice + kSlice) clipped
    // to the dim. Slices start on multiples of 64 elements, so a slice's swizzled chunks
    // are the first slice's plus a whole 128-byte offset.
    static constexpr int kSliceQK = cmin(round_up_64((D + kSplit - 1) / kSplit), D);
    static constexpr int kSliceV = cmin(round_up_64((DV + kSplit - 1) / kSplit), DV);
    // dQ of one query tile: warps split its m16 row tiles, then D's columns.
    static constexpr int kDqRowTiles = kBlockM / 16;
    static constexpr int kDqSplit = kWarps / kDqRowTiles;
    static constexpr int kDqSlice = cmin(round_up_64((D + kDqSplit - 1) / kDqSplit), D);

    static constexpr int kRowQK = round_up_64(D);
    static constexpr int kRowV = round_up_64(DV);
    static constexpr int kRowS = round_up_64(kBlockM);
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + kBlockN * kRowQK * 2;
    static constexpr int kOffQ = kOffV + kBlockN * kRowV * 2;
    static constexpr int kOffDo = kOffQ + kBlockM * kRowQK * 2;
    static constexpr int kOffDs = kOffDo + kBlockM * kRowV * 2;
    static constexpr int kOffLse = kOffDs + kBlockN * kRowS * 2;
    static constexpr int kOffDot = kOffLse + kBlockM * 4;
    static constexpr int kSmemBytes = kOffDot + kBlockM * 4;

    static_assert(D % 16 == 0 && DV % 16 == 0, "head dims are whole MMA steps");
    static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "tiles are whole m16/k16 steps");
    static_assert(kSplit == 1 || kSplit == 2, "one or two column slices");
    static_assert(kSliceQK % 16 == 0 && kSliceV % 16 == 0 && kDqSlice % 16 == 0, "slices are whole n16 pairs");
    static_assert(kSliceQK * kSplit >= D && kSliceV * kSplit >= DV, "the slices cover the dims");
    static_assert(kSplit == 1 || (kSliceQK % 64 == 0 && kSliceV % 64 == 0), "slices start on 64 elements");
    static_assert(kWarps % kDqRowTiles == 0 && kDqSplit >= 1, "dQ's row tiles split evenly over the warps");
    static_assert(kDqSplit == 1 || kDqSlice % 64 == 0, "dQ slices start on 64 elements");
    static_assert(kDqSlice * kDqSplit >= D, "dQ's slices cover the dim");
    static_assert(kBlockM <= kThreads, "one thread per query row loads its statistics");
    static_assert(kSmemBytes <= 99 * 1024, "fits the smallest per-block shared memory (sm86/sm89)");
};

constexpr float kLog2e = 1.44269504088896341f;

// ---------------------------------------------------------------------------------------
// Pieces shared by the main and the deterministic dQ kernel.

template <int N>
__device__ __forceinline__ void zero_tiles(float (&x)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[j][e] = 0.f;
    }
}

// acc = A B^T for one warp: A is the 16 rows at a_addr (ldmatrix "A" pattern), B the
// 8 * N rows at b_addr ("B" pattern, rows are the n8 tiles), both KDIM channels wide, at
// byte offsets OFF_A and OFF_B from the addresses' base.
template <typename T, int KDIM, int N, int OFF_A, int OFF_B, int ROW_A, int ROW_B>
__device__ __forceinline__ void mma_abt(float (&acc)[N][4], const LdsmAddr<ROW_A>& a_addr,
                                        const LdsmAddr<ROW_B>& b_addr) {
    static_assert(N % 2 == 0, "B rows come in pairs of n8 tiles");
    zero_tiles(acc);
#pragma unroll
    for (int ks = 0; ks < KDIM / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, a_addr.template at<OFF_A>(0, ks));
#pragma unroll
        for (int np = 0; np < N / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, b_addr.template at<OFF_B>(np, ks));
            mma_16816<T>(acc[2 * np], a, b[0], b[1]);
            mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Scores to t = tanh(s * softcap_in) (with softcap).
template <int N>
__device__ __forceinline__ void apply_softcap(float (&s)[N][4], float softcap_in) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = fast_tanh(s[j][e] * softcap_in);
    }
}

// P and dS of one (row, key) from its transformed score t (-inf when masked), dP, the
// row's lse_log2 and dot: P = 2^(t exp_scale - lse_log2), dS = P (dP - dot), times
// 1 - t^2 with softcap. A masked t gives P = 0 and dS exactly 0.
__device__ __forceinline__ float p_and_ds(float t, float dp, float lse2, float dot, float exp_scale,
                                          float softcap_in, float& ds) {
    const float pr = fast_exp2(fmaf(t, exp_scale, -lse2));
    ds = pr * (dp - dot);
    if (softcap_in != 0.f) ds = pr == 0.f ? 0.f : ds * (1.f - t * t);
    return pr;
}

// ---------------------------------------------------------------------------------------
// 1. Preprocess: one warp per (token, head) row; lanes own 16-byte chunks of the row.
template <typename T>
__device__ __forceinline__ void attn_bwd_pre_body(const LongctxAttnBwdParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t row = int64_t(blockIdx.x) * LONGCTX_ATTN_BWD_ROW_WARPS + (threadIdx.x >> 5);
    const int64_t rows = int64_t(p.total_q) * p.heads_q;
    if (row >= rows) return;
    const int64_t t = row / p.heads_q;
    const int h = int(row % p.heads_q);
    const T* o = reinterpret_cast<const T*>(p.o.data) + t * p.o.token_stride + h * p.o.head_stride;
    const T* dout = reinterpret_cast<const T*>(p.dout.data) + t * p.dout.token_stride + h * p.dout.head_stride;
    float acc = 0.f;
    for (int c = lane; c < int(p.head_dim_v) / 8; c += 32) {
        const uint4 a = *reinterpret_cast<const uint4*>(o + c * 8);
        const uint4 b = *reinterpret_cast<const uint4*>(dout + c * 8);
        const T* ea = reinterpret_cast<const T*>(&a);
        const T* eb = reinterpret_cast<const T*>(&b);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(DType<T>::to_f32(ea[e]), DType<T>::to_f32(eb[e]), acc);
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        const float lse = reinterpret_cast<const float*>(p.lse)[int64_t(h) * p.lse_head_stride + t];
        const int64_t at = int64_t(h) * p.total_q + t;
        reinterpret_cast<float*>(p.dot)[at] = acc;
        reinterpret_cast<float*>(p.lse_log2)[at] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    }
    if ((p.flags & LONGCTX_ATTN_BWD_SKIP_DQ) == 0) {
        float4* acc_row = reinterpret_cast<float4*>(p.dq_accum) + row * (p.head_dim / 4);
        for (int c = lane; c < int(p.head_dim) / 4; c += 32) acc_row[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// ---------------------------------------------------------------------------------------
// 3. dQ conversion: one warp per (token, head) row; lanes own 8 channels.
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_body(const LongctxAttnBwdParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t row = int64_t(blockIdx.x) * LONGCTX_ATTN_BWD_ROW_WARPS + (threadIdx.x >> 5);
    const int64_t rows = int64_t(p.total_q) * p.heads_q;
    if (row >= rows) return;
    const int64_t t = row / p.heads_q;
    const int h = int(row % p.heads_q);
    T* dq = reinterpret_cast<T*>(p.dq.data) + t * p.dq.token_stride + h * p.dq.head_stride;
    const float* acc = reinterpret_cast<const float*>(p.dq_accum) + row * p.head_dim;
    const bool add = (p.flags & LONGCTX_ATTN_BWD_ACCUMULATE) != 0;
    for (int c = lane; c < int(p.head_dim) / 8; c += 32) {
        const float4 lo = *reinterpret_cast<const float4*>(acc + c * 8);
        const float4 hi = *reinterpret_cast<const float4*>(acc + c * 8 + 4);
        float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        uint4 old = make_uint4(0, 0, 0, 0);
        if (add) old = *reinterpret_cast<const uint4*>(dq + c * 8);
        const T* eo = reinterpret_cast<const T*>(&old);
        uint32_t out[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float a = x[2 * e] * p.scale;
            float b = x[2 * e + 1] * p.scale;
            if (add) {
                a += DType<T>::to_f32(eo[2 * e]);
                b += DType<T>::to_f32(eo[2 * e + 1]);
            }
            out[e] = MmaType<T>::pack(a, b);
        }
        *reinterpret_cast<uint4*>(dq + c * 8) = make_uint4(out[0], out[1], out[2], out[3]);
    }
}

// ---------------------------------------------------------------------------------------
// 2. Main kernel.
template <typename T, int D, int DV>
__device__ __forceinline__ void attn_bwd_body(const LongctxAttnBwdParams& p) {
    using Tr = BwdTraits<D, DV>;
    constexpr int kBlockM = Tr::kBlockM;
    constexpr int kBlockN = Tr::kBlockN;
    constexpr int kThreads = Tr::kThreads;
    constexpr int kKeyWarps = Tr::kKeyWarps;
    constexpr int kQTiles = Tr::kMTilesQ;  // n8 tiles of query columns
    constexpr int kRowQK = Tr::kRowQK;
    constexpr int kRowV = Tr::kRowV;
    constexpr int kRowS = Tr::kRowS;
    constexpr int kSliceQK = Tr::kSliceQK;
    constexpr int kSliceV = Tr::kSliceV;
    constexpr int kDqSlice = Tr::kDqSlice;
    constexpr float kNegInf = -INFINITY;

    LONGCTX_DYNAMIC_SMEM(uint8_t, smem, 128);
    if (dynamic_smem_size() < uint32_t(Tr::kSmemBytes)) __trap();
    float* s_lse = reinterpret_cast<float*>(smem + Tr::kOffLse);
    float* s_dot = reinterpret_cast<float*>(smem + Tr::kOffDot);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int kw = warp % kKeyWarps;   // key group: keys 16 kw .. + 16 of the tile
    const int slice = warp / kKeyWarps;  // column slice of dK and dV
    const int n_block = blockIdx.x;
    const int head_kv = blockIdx.y;
    const int batch = blockIdx.z;

    const int* cu_q = reinterpret_cast<const int*>(p.cu_seqlens_q);
    const int* cu_k = reinterpret_cast<const int*>(p.cu_seqlens_k);
    const int q_start = cu_q[batch];
    const int sq = cu_q[batch + 1] - q_start;
    const int k_start = cu_k[batch];
    const int sk = cu_k[batch + 1] - k_start;
    const int n0 = n_block * kBlockN;
    if (n0 >= sk) return;
    const int keys_here = min(kBlockN, sk - n0);
    const int diag = sk - sq;
    const int left = p.window_left;
    const int right = p.window_right;
    // Query rows that see some key of the tile: i + diag - left <= j <= i + diag + right
    // for some j in [n0, n0 + keys_here).
    const int row_lo = max(0, n0 - diag - right);
    const int row_hi = min(sq - 1, n0 + keys_here - 1 - diag + left);

    const uint32_t s_base = smem_addr_of(smem);
    const TileLoader<kBlockN, D, kRowQK, kThreads> k_loader(tid);
    const TileLoader<kBlockN, DV, kRowV, kThreads> v_loader(tid);
    const TileLoader<kBlockM, D, kRowQK, kThreads> q_loader(tid);
    const TileLoader<kBlockM, DV, kRowV, kThreads> do_loader(tid);
    {
        const T* k_base = reinterpret_cast<const T*>(p.k.data);
        const T* v_base = reinterpret_cast<const T*>(p.v.data);
        k_loader.load(s_base + Tr::kOffK,
                      k_base + int64_t(k_start + n0) * p.k.token_stride + int64_t(head_kv) * p.k.head_stride +
                          k_loader.thread_offset(p.k.token_stride),
                      k_base, p.k.token_stride, keys_here);
        v_loader.load(s_base + Tr::kOffV,
                      v_base + int64_t(k_start + n0) * p.v.token_stride + int64_t(head_kv) * p.v.head_stride +
                          v_loader.thread_offset(p.v.token_stride),
                      v_base, p.v.token_stride, keys_here);
        cp_async_commit();
    }

    // dK and dV accumulators of this warp's 16 keys and column slice: C fragments, rows
    // (g, g + 8), columns slice * kSlice + j * 8 + 2 t4 (+1).
    float acc_dk[kSliceQK / 8][4];
    float acc_dv[kSliceV / 8][4];
    zero_tiles(acc_dk);
    zero_tiles(acc_dv);
    // Columns of this warp's slice (the last slice may be narrower).
    const int cols_qk = min(kSliceQK, D - slice * kSliceQK);
    const int cols_v = min(kSliceV, DV - slice * kSliceV);

    // ldmatrix addresses (see attention_kernel.cuh for the two lane patterns). "A" pattern:
    // lane l gives row l % 16, chunk 2k + l / 16. "B" pattern: row l % 8 + 8 (l / 16),
    // chunk 2k + (l / 8) % 2.
    const int a_row = lane & 15, a_hi = lane >> 4;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_hi = (lane >> 3) & 1;
    const LdsmAddr<kRowQK> k_as_a(s_base + uint32_t(kw * 16 * kRowQK * 2), a_row, a_hi, lane);
    const LdsmAddr<kRowV> v_as_a(s_base + uint32_t(kw * 16 * kRowV * 2), a_row, a_hi, lane);
    const LdsmAddr<kRowQK> q_as_b(s_base, b_row, b_hi, lane);
    const LdsmAddr<kRowV> do_as_b(s_base, b_row, b_hi, lane);
    // Transposed B operands (k along rows): dO and Q for dV and dK, offset to the warp's
    // column slice (a whole number of 128-byte row segments).
    const LdsmAddr<kRowV> do_as_bt(s_base + uint32_t(slice * kSliceV * 2), a_row, a_hi, lane);
    const LdsmAddr<kRowQK> q_as_bt(s_base + uint32_t(slice * kSliceQK * 2), a_row, a_hi, lane);
    // dQ step: warp w takes m16 row tile w % kDqRowTiles and column slice w / kDqRowTiles.
    const int dq_rt = warp % Tr::kDqRowTiles;
    const int dq_slice = warp / Tr::kDqRowTiles;
    const int dq_cols = min(kDqSlice, D - dq_slice * kDqSlice);
    // dS^T as the transposed A operand of dS K: rows are keys (16 per k16 step), chunk
    // 2 dq_rt + b_hi (< 8, inside the 128-byte row).
    static_assert(kRowS == 64 && Tr::kDqRowTiles <= 4, "dS rows are one 128-byte swizzle span");
    const uint32_t ds_addr =
        s_base + Tr::kOffDs + uint32_t(b_row * kRowS * 2 + (((2 * dq_rt + b_hi) ^ (b_row & 7)) << 4));
    const LdsmAddr<kRowQK> k_as_bt(s_base + uint32_t(dq_slice * kDqSlice * 2), a_row, a_hi, lane);

    const float exp_scale = p.exp_scale;
    const float softcap_in = p.softcap_in;
    const bool do_dq = (p.flags & LONGCTX_ATTN_BWD_SKIP_DQ) == 0;
    const int group = int(p.heads_per_kv);
    // This lane's two keys (sequence-local) in the tile: n0 + 16 kw + g + 8 h.
    const int key0 = n0 + kw * 16 + g;

    if (row_lo <= row_hi) {
        const int m_first = row_lo / kBlockM;
        const int m_last = row_hi / kBlockM;
        for (int hq = head_kv * group; hq < (head_kv + 1) * group; ++hq) {
            const T* q_base = reinterpret_cast<const T*>(p.q.data);
            const T* do_base = reinterpret_cast<const T*>(p.dout.data);
            const T* q_head = q_base + int64_t(q_start) * p.q.token_stride + int64_t(hq) * p.q.head_stride +
                              q_loader.thread_offset(p.q.token_stride);
            const T* do_head = do_base + int64_t(q_start) * p.dout.token_stride +
                               int64_t(hq) * p.dout.head_stride + do_loader.thread_offset(p.dout.token_stride);
            const float* lse_row = reinterpret_cast<const float*>(p.lse_log2) + int64_t(hq) * p.total_q + q_start;
            const float* dot_row = reinterpret_cast<const float*>(p.dot) + int64_t(hq) * p.total_q + q_start;
            for (int m = m_first; m <= m_last; ++m) {
                const int m0 = m * kBlockM;
                const int rows_here = min(kBlockM, sq - m0);
                q_loader.load(s_base + Tr::kOffQ, q_head + int64_t(m0) * p.q.token_stride, q_base,
                              p.q.token_stride, rows_here);
                do_loader.load(s_base + Tr::kOffDo, do_head + int64_t(m0) * p.dout.token_stride, do_base,
                               p.dout.token_stride, rows_here);
                cp_async_commit();
                if (tid < kBlockM) {
                    s_lse[tid] = tid < rows_here ? lse_row[m0 + tid] : INFINITY;
                    s_dot[tid] = tid < rows_here ? dot_row[m0 + tid] : 0.f;
                }
                cp_async_wait<0>();
                __syncthreads();

                // S^T = K Q^T and dP^T = V dO^T: rows the warp's 16 keys, columns the tile's
                // query rows.
                float st[kQTiles][4];
                float dpt[kQTiles][4];
                mma_abt<T, D, kQTiles, Tr::kOffK, Tr::kOffQ>(st, k_as_a, q_as_b);
                mma_abt<T, DV, kQTiles, Tr::kOffV, Tr::kOffDo>(dpt, v_as_a, do_as_b);
                if (softcap_in != 0.f) apply_softcap(st, softcap_in);
                // Mask unless every (row, key) pair of the step is visible and inside both
                // sequences: the last row's lower bound and the first row's upper bound bind.
                const bool whole = keys_here == kBlockN && rows_here == kBlockM &&
                                   m0 + kBlockM - 1 + diag - left <= n0 && m0 + diag + right >= n0 + kBlockN - 1;
                if (!whole) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int j = key0 + 8 * h;
#pragma unroll
                        for (int nj = 0; nj < kQTiles; ++nj) {
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int i = m0 + nj * 8 + 2 * t4 + e;
                                const bool seen = j < sk && i < sq && i + diag - left <= j && j <= i + diag + right;
                                if (!seen) st[nj][2 * h + e] = kNegInf;
                            }
                        }
                    }
                }
                // P^T and dS^T in place of S^T and dP^T; both packed as A fragments.
                uint32_t p_frag[kBlockM / 16][4];
                uint32_t ds_frag[kBlockM / 16][4];
#pragma unroll
                for (int nj = 0; nj < kQTiles; ++nj) {
                    const int c = nj * 8 + 2 * t4;
                    const float2 l2 = *reinterpret_cast<const float2*>(s_lse + c);
                    const float2 dd = *reinterpret_cast<const float2*>(s_dot + c);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        float pv[2], dsv[2];
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            pv[e] = p_and_ds(st[nj][2 * h + e], dpt[nj][2 * h + e], e == 0 ? l2.x : l2.y,
                                             e == 0 ? dd.x : dd.y, exp_scale, softcap_in, dsv[e]);
                        }
                        p_frag[nj / 2][(nj & 1) * 2 + h] = MmaType<T>::pack(pv[0], pv[1]);
                        ds_frag[nj / 2][(nj & 1) * 2 + h] = MmaType<T>::pack(dsv[0], dsv[1]);
                    }
                }

                // dV += P^T dO and dK += dS^T Q over this warp's column slice.
#pragma unroll
                for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
                    for (int dp = 0; dp < kSliceV / 16; ++dp) {
                        if (dp * 16 < cols_v) {
                            uint32_t b[4];
                            ldmatrix_x4_trans(b, do_as_bt.template at<Tr::kOffDo>(kk, dp));
                            mma_16816<T>(acc_dv[2 * dp], p_frag[kk], b[0], b[1]);
                            mma_16816<T>(acc_dv[2 * dp + 1], p_frag[kk], b[2], b[3]);
                        }
                    }
#pragma unroll
                    for (int dp = 0; dp < kSliceQK / 16; ++dp) {
                        if (dp * 16 < cols_qk) {
                            uint32_t b[4];
                            ldmatrix_x4_trans(b, q_as_bt.template at<Tr::kOffQ>(kk, dp));
                            mma_16816<T>(acc_dk[2 * dp], ds_frag[kk], b[0], b[1]);
                            mma_16816<T>(acc_dk[2 * dp + 1], ds_frag[kk], b[2], b[3]);
                        }
                    }
                }

                if (do_dq) {
                    // dS^T to shared memory: row = key (tile-local), chunk = 8 query columns.
                    if (slice == 0) {
#pragma unroll
                        for (int kk = 0; kk < kBlockM / 16; ++kk) {
#pragma unroll
                            for (int r = 0; r < 4; ++r) {
                                const int row = kw * 16 + g + 8 * (r & 1);
                                const int chunk = 2 * kk + (r >> 1);
                                *reinterpret_cast<uint32_t*>(smem + Tr::kOffDs + swizzle<kRowS>(row, chunk) + 4 * t4) =
                                    ds_frag[kk][r];
                            }
                        }
                    }
                    __syncthreads();
                    // dQ tile rows 16 dq_rt .. + 16, columns of slice dq_slice: dS K.
                    float acc_dq[kDqSlice / 8][4];
                    zero_tiles(acc_dq);
#pragma unroll
                    for (int kk = 0; kk < kBlockN / 16; ++kk) {
                        uint32_t a[4];
                        ldmatrix_x4_trans(a, ds_addr + uint32_t(kk * 16 * kRowS * 2));
#pragma unroll
                        for (int dp = 0; dp < kDqSlice / 16; ++dp) {
                            if (dp * 16 < dq_cols) {
                                uint32_t b[4];
                                ldmatrix_x4_trans(b, k_as_bt.template at<Tr::kOffK>(kk, dp));
                                mma_16816<T>(acc_dq[2 * dp], a, b[0], b[1]);
                                mma_16816<T>(acc_dq[2 * dp + 1], a, b[2], b[3]);
                            }
                        }
                    }
                    float* dq_acc = reinterpret_cast<float*>(p.dq_accum);
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int r = dq_rt * 16 + g + 8 * h;
                        if (r < rows_here) {
                            float* dst = dq_acc + (int64_t(q_start) + m0 + r) * (int64_t(p.heads_q) * D) +
                                         int64_t(hq) * D + dq_slice * kDqSlice + 2 * t4;
#pragma unroll
                            for (int j = 0; j < kDqSlice / 8; ++j) {
                                if (j * 8 < dq_cols) {
                                    atomicAdd(dst + j * 8, acc_dq[j][2 * h]);
                                    atomicAdd(dst + j * 8 + 1, acc_dq[j][2 * h + 1]);
                                }
                            }
                        }
                    }
                }
                __syncthreads();
            }
        }
    } else {
        cp_async_wait<0>();
    }

    // Store dK (times the scale) and dV: rows of keys past the sequence are not written.
    const bool add = (p.flags & LONGCTX_ATTN_BWD_ACCUMULATE) != 0;
    const float scale = p.scale;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j = key0 + 8 * h;
        if (j < sk) {
            T* dk = reinterpret_cast<T*>(p.dk.data) + int64_t(k_start + j) * p.dk.token_stride +
                    int64_t(head_kv) * p.dk.head_stride + slice * kSliceQK + 2 * t4;
            T* dv = reinterpret_cast<T*>(p.dv.data) + int64_t(k_start + j) * p.dv.token_stride +
                    int64_t(head_kv) * p.dv.head_stride + slice * kSliceV + 2 * t4;
#pragma unroll
            for (int c = 0; c < kSliceQK / 8; ++c) {
                if (c * 8 < cols_qk) {
                    float a = acc_dk[c][2 * h] * scale, b = acc_dk[c][2 * h + 1] * scale;
                    if (add) {
                        a += DType<T>::to_f32(dk[c * 8]);
                        b += DType<T>::to_f32(dk[c * 8 + 1]);
                    }
                    *reinterpret_cast<uint32_t*>(dk + c * 8) = MmaType<T>::pack(a, b);
                }
            }
#pragma unroll
            for (int c = 0; c < kSliceV / 8; ++c) {
                if (c * 8 < cols_v) {
                    float a = acc_dv[c][2 * h], b = acc_dv[c][2 * h + 1];
                    if (add) {
                        a += DType<T>::to_f32(dv[c * 8]);
                        b += DType<T>::to_f32(dv[c * 8 + 1]);
                    }
                    *reinterpret_cast<uint32_t*>(dv + c * 8) = MmaType<T>::pack(a, b);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Deterministic mode's dQ: one CTA per (query tile, query head, sequence), the
//    forward's structure. Each warp keeps dQ of its 16 rows in registers while the key
//    tiles pass in ascending order, recomputing S, P, dP and dS:
//      S = Q K^T, dP = dO V^T (A: Q / dO rows, B: K / V rows), P, dS as above,
//      dQ += dS K (A: dS from the C registers, B: K by ldmatrix.trans),
//    then writes dQ = scale * acc once. Every element has one writer and a fixed order of
//    additions, so the result is bit-stable; the main kernel skips dQ in this mode.
template <int D> struct DqShape {
    static constexpr int kBlockM = LONGCTX_ATTN_BWD_DQ_BLOCK_M;
    static constexpr int kBlockN = D >= 256 ? LONGCTX_ATTN_BWD_DQ_HD256_BLOCK_N : LONGCTX_ATTN_BWD_DQ_BLOCK_N;
    static constexpr int kWarps = kBlockM / 16;
    static constexpr int kThreads = 32 * kWarps;
};

template <int D, int DV> struct DqTraits {
    static constexpr int kBlockM = DqShape<D>::kBlockM;
    static constexpr int kBlockN = DqShape<D>::kBlockN;
    static constexpr int kThreads = DqShape<D>::kThreads;
    static constexpr int kRowQK = round_up_64(D);
    static constexpr int kRowV = round_up_64(DV);
    static constexpr int kOffQ = 0;
    static constexpr int kOffDo = kOffQ + kBlockM * kRowQK * 2;
    static constexpr int kOffK = kOffDo + kBlockM * kRowV * 2;
    static constexpr int kOffV = kOffK + kBlockN * kRowQK * 2;
    static constexpr int kOffLse = kOffV + kBlockN * kRowV * 2;
    static constexpr int kOffDot = kOffLse + kBlockM * 4;
    static constexpr int kSmemBytes = kOffDot + kBlockM * 4;
    static_assert(kSmemBytes <= 99 * 1024, "fits the smallest per-block shared memory (sm86/sm89)");
    static_assert(kBlockN % 16 == 0, "key tiles are whole k16 steps");
};

template <typename T, int D, int DV>
__device__ __forceinline__ void attn_bwd_dq_det_body(const LongctxAttnBwdParams& p) {
    using Tr = DqTraits<D, DV>;
    constexpr int kBlockM = Tr::kBlockM;
    constexpr int kBlockN = Tr::kBlockN;
    constexpr int kThreads = Tr::kThreads;
    constexpr int kRowQK = Tr::kRowQK;
    constexpr int kRowV = Tr::kRowV;
    constexpr int kNTiles = kBlockN / 8;
    constexpr float kNegInf = -INFINITY;

    LONGCTX_DYNAMIC_SMEM(uint8_t, smem, 128);
    if (dynamic_smem_size() < uint32_t(Tr::kSmemBytes)) __trap();
    float* s_lse = reinterpret_cast<float*>(smem + Tr::kOffLse);
    float* s_dot = reinterpret_cast<float*>(smem + Tr::kOffDot);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const int head = blockIdx.y;
    const int m_block = int(p.num_m_blocks) - 1 - int(blockIdx.x);
    const BlockInfo<kBlockM, kBlockN> bi(p, blockIdx.z, m_block);
    if (!bi.has_rows()) return;
    const int rows_here = bi.m1 - bi.m0;
    const bool add = (p.flags & LONGCTX_ATTN_BWD_ACCUMULATE) != 0;
    T* dq_tile = reinterpret_cast<T*>(p.dq.data) + (int64_t(bi.q_start) + bi.m0) * p.dq.token_stride +
                 int64_t(head) * p.dq.head_stride;

    float acc[D / 8][4];
    zero_tiles(acc);

    const int key_lo = bi.key_lo();
    const int key_hi = bi.key_hi();
    if (key_hi >= key_lo) {
        const int n_min = key_lo / kBlockN;
        const int n_max = key_hi / kBlockN + 1;
        const int sk = bi.sk;
        const int head_kv = head / int(p.heads_per_kv);
        const uint32_t s_base = smem_addr_of(smem);
        const TileLoader<kBlockM, D, kRowQK, kThreads> q_loader(tid);
        const TileLoader<kBlockM, DV, kRowV, kThreads> do_loader(tid);
        const TileLoader<kBlockN, D, kRowQK, kThreads> k_loader(tid);
        const TileLoader<kBlockN, DV, kRowV, kThreads> v_loader(tid);
        const T* q_base = reinterpret_cast<const T*>(p.q.data);
        const T* do_base = reinterpret_cast<const T*>(p.dout.data);
        const T* k_base = reinterpret_cast<const T*>(p.k.data);
        const T* v_base = reinterpret_cast<const T*>(p.v.data);
        q_loader.load(s_base + Tr::kOffQ,
                      q_base + (int64_t(bi.q_start) + bi.m0) * p.q.token_stride + int64_t(head) * p.q.head_stride +
                          q_loader.thread_offset(p.q.token_stride),
                      q_base, p.q.token_stride, rows_here);
        do_loader.load(s_base + Tr::kOffDo,
                       do_base + (int64_t(bi.q_start) + bi.m0) * p.dout.token_stride +
                           int64_t(head) * p.dout.head_stride + do_loader.thread_offset(p.dout.token_stride),
                       do_base, p.dout.token_stride, rows_here);
        const T* k_thread = k_base + int64_t(bi.k_start) * p.k.token_stride + int64_t(head_kv) * p.k.head_stride +
                            k_loader.thread_offset(p.k.token_stride);
        const T* v_thread = v_base + int64_t(bi.k_start) * p.v.token_stride + int64_t(head_kv) * p.v.head_stride +
                            v_loader.thread_offset(p.v.token_stride);
        if (tid < kBlockM) {
            const int64_t at = int64_t(head) * p.total_q + bi.q_start + bi.m0 + tid;
            s_lse[tid] = tid < rows_here ? reinterpret_cast<const float*>(p.lse_log2)[at] : INFINITY;
            s_dot[tid] = tid < rows_here ? reinterpret_cast<const float*>(p.dot)[at] : 0.f;
        }

        const int a_row = lane & 15, a_hi = lane >> 4;
        const int b_row = (lane & 7) + ((lane >> 4) << 3), b_hi = (lane >> 3) & 1;
        const LdsmAddr<kRowQK> q_as_a(s_base + uint32_t(warp * 16 * kRowQK * 2), a_row, a_hi, lane);
        const LdsmAddr<kRowV> do_as_a(s_base + uint32_t(warp * 16 * kRowV * 2), a_row, a_hi, lane);
        const LdsmAddr<kRowQK> k_as_b(s_base, b_row, b_hi, lane);
        const LdsmAddr<kRowV> v_as_b(s_base, b_row, b_hi, lane);
        const LdsmAddr<kRowQK> k_as_bt(s_base, a_row, a_hi, lane);
        const float exp_scale = p.exp_scale;
        const float softcap_in = p.softcap_in;
        // Row mask as in the forward: tile row 16 warp + g + 8h sees keys
        // [lane_key_lo + 8h, min(lane_key_lo + 8h + span, sk - 1)].
        const int lane_key_lo = bi.m0 + warp * 16 + g + bi.diag - bi.left;
        const int span = p.window_left + p.window_right;
        const int unmasked_lo = bi.unmasked_lo();
        const int unmasked_hi = bi.unmasked_hi();

        for (int n = n_min; n < n_max; ++n) {
            const int k0 = n * kBlockN;
            k_loader.load(s_base + Tr::kOffK, k_thread + int64_t(k0) * p.k.token_stride, k_base, p.k.token_stride,
                          sk - k0);
            v_loader.load(s_base + Tr::kOffV, v_thread + int64_t(k0) * p.v.token_stride, v_base, p.v.token_stride,
                          sk - k0);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();
            float lse2[2], dot[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                lse2[h] = s_lse[warp * 16 + g + 8 * h];
                dot[h] = s_dot[warp * 16 + g + 8 * h];
            }

            float s[kNTiles][4];
            float dp[kNTiles][4];
            mma_abt<T, D, kNTiles, Tr::kOffQ, Tr::kOffK>(s, q_as_a, k_as_b);
            mma_abt<T, DV, kNTiles, Tr::kOffDo, Tr::kOffV>(dp, do_as_a, v_as_b);
            if (softcap_in != 0.f) apply_softcap(s, softcap_in);
            if (n < unmasked_lo || n >= unmasked_hi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int j_lo = lane_key_lo + 8 * h;
                    const int j_hi = min(j_lo + span, sk - 1);
#pragma unroll
                    for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = k0 + nj * 8 + 2 * t4 + e;
                            if (j < j_lo || j > j_hi) s[nj][2 * h + e] = kNegInf;
                        }
                    }
                }
            }
            uint32_t ds_frag[kBlockN / 16][4];
#pragma unroll
            for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float dsv[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        p_and_ds(s[nj][2 * h + e], dp[nj][2 * h + e], lse2[h], dot[h], exp_scale, softcap_in, dsv[e]);
                    }
                    ds_frag[nj / 2][(nj & 1) * 2 + h] = MmaType<T>::pack(dsv[0], dsv[1]);
                }
            }
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
                for (int dpair = 0; dpair < D / 16; ++dpair) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, k_as_bt.template at<Tr::kOffK>(kk, dpair));
                    mma_16816<T>(acc[2 * dpair], ds_frag[kk], b[0], b[1]);
                    mma_16816<T>(acc[2 * dpair + 1], ds_frag[kk], b[2], b[3]);
                }
            }
            __syncthreads();
        }
    }

    // dQ = scale * acc (plus the caller's when accumulating); rows past the sequence are not
    // written. Rows that saw no key store 0 (or leave the caller's value).
    const float scale = p.scale;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = warp * 16 + g + 8 * h;
        if (r < rows_here) {
            T* dst = dq_tile + int64_t(r) * p.dq.token_stride + 2 * t4;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                float a = acc[j][2 * h] * scale, b = acc[j][2 * h + 1] * scale;
                if (add) {
                    a += DType<T>::to_f32(dst[j * 8]);
                    b += DType<T>::to_f32(dst[j * 8 + 1]);
                }
                *reinterpret_cast<uint32_t*>(dst + j * 8) = MmaType<T>::pack(a, b);
            }
        }
    }
}

}  // namespace attn
}  // namespace longctx
