// Where one CTA's query tile sits in the variable-length batch, which key tiles it visits,
// and which of those need element-wise masking. Mirrors TileConfig::key_blocks and
// TileConfig::needs_mask in src/attention/plan.rs, which the CPU tiled implementation uses
// and the test suite checks against naive attention on every mask.
#pragma once
#include "params/attention_params.h"
#include "params/kv_cache_params.h"

namespace longctx {
namespace attn {

template <int kBlockM, int kBlockN> struct BlockInfo {
    int q_start;  // first query token of the sequence (index into total_q)
    int k_start;  // first key token of the sequence
    int sq;       // seqlen_q
    int sk;       // seqlen_k
    int m0;       // first query row of the tile (sequence-local)
    int m1;       // one past its last existing row: min(m0 + kBlockM, sq)
    int diag;     // sk - sq: row i's diagonal key is i + diag (bottom-right alignment)
    int left;     // window sides, 0 .. LONGCTX_ATTN_WINDOW_UNBOUNDED
    int right;

    // P is LongctxAttnParams or LongctxAttnBwdParams (same offsets and window fields).
    template <typename P>
    __device__ __forceinline__ BlockInfo(const P& p, int batch, int m_block) {
        const int* cu_q = reinterpret_cast<const int*>(p.cu_seqlens_q);
        const int* cu_k = reinterpret_cast<const int*>(p.cu_seqlens_k);
        q_start = cu_q[batch];
        sq = cu_q[batch + 1] - q_start;
        k_start = cu_k[batch];
        sk = cu_k[batch + 1] - k_start;
        m0 = m_block * kBlockM;
        m1 = min(m0 + kBlockM, sq);
        diag = sk - sq;
        left = p.window_left;
        right = p.window_right;
    }

    // Extend over a paged cache: the queries are rows cu_new[b] .. cu_new[b + 1], the keys
    // the seqlens[b] cached tokens of the sequence (k_start is unused: keys are paged).
    __device__ __forceinline__ BlockInfo(const LongctxKvExtendParams& p, int batch, int m_block) {
        const int* cu_new = reinterpret_cast<const int*>(p.step.cu_new);
        const int* seqlens = reinterpret_cast<const int*>(p.step.seqlens);
        q_start = cu_new[batch];
        sq = cu_new[batch + 1] - q_start;
        k_start = 0;
        sk = seqlens[batch];
        m0 = m_block * kBlockM;
        m1 = min(m0 + kBlockM, sq);
        diag = sk - sq;
        left = p.attn.window_left;
        right = p.attn.window_right;
    }

    // Whether the tile has rows at all (CTAs past a short sequence's end exit).
    __device__ __forceinline__ bool has_rows() const { return m0 < sq; }

    // Union of the keys the tile's rows see: [key_lo, key_hi], empty when key_hi < key_lo
    // (always so when sk == 0).
    __device__ __forceinline__ int key_lo() const { return max(0, m0 + diag - left); }
    __device__ __forceinline__ int key_hi() const { return min(sk - 1, m1 - 1 + diag + right); }

    // Key tile n_block needs masking unless it is whole (inside sk) and every existing row
    // sees all of its keys: the last row's lower bound and the first row's upper bound
    // are the binding ones.
    __device__ __forceinline__ bool needs_mask(int n_block) const {
        const int k0 = n_block * kBlockN;
        const int k_last = k0 + kBlockN - 1;
        if (k_last >= sk) return true;
        return !(m1 - 1 + diag - left <= k0 && m0 + diag + right >= k_last);
    }

    // needs_mask in interval form: tile n needs no mask iff unmasked_lo() <= n <
    // unmasked_hi(). From needs_mask: no mask iff A <= k0 <= U with A = m1 - 1 + diag - left
    // and U = min(sk - kBlockN, m0 + diag + right - kBlockN + 1), k0 = n * kBlockN >= 0.
    __device__ __forceinline__ int unmasked_lo() const {
        const int a = m1 - 1 + diag - left;
        return a <= 0 ? 0 : (a + kBlockN - 1) / kBlockN;
    }
    __device__ __forceinline__ int unmasked_hi() const {
        const int u = min(sk - kBlockN, m0 + diag + right - kBlockN + 1);
        return u < 0 ? 0 : u / kBlockN + 1;
    }
};

}  // namespace attn
}  // namespace longctx
