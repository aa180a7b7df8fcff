/* Parameters of the tiled attention forward kernels (longctx_attn_fwd_*). Pure C, shared
 * with Rust through bindgen (src/sys/attention_params.rs is its committed output).
 *
 * Tensors are [tokens, heads, dim] with the last dim contiguous and arbitrary token and
 * head strides in elements; every address the kernel forms is 16-byte aligned (the host
 * checks the pointers and that strides are multiples of 8 elements). Sequence b of the
 * variable-length batch owns query tokens cu_seqlens_q[b] .. cu_seqlens_q[b + 1] and key
 * tokens cu_seqlens_k[b] .. cu_seqlens_k[b + 1]. Query head h reads KV head
 * h / heads_per_kv. LSE is float [heads_q, total_q] (natural log), element (h, t) at
 * lse + h * lse_head_stride + t.
 *
 * Mask: with c = seqlen_k - seqlen_q of the sequence, query row i sees key j iff
 * i + c - window_left <= j <= i + c + window_right (causal is window_right = 0). Unbounded
 * sides are LONGCTX_ATTN_WINDOW_UNBOUNDED, which exceeds every admitted sequence length, so
 * all mask arithmetic stays inside int32.
 *
 * Scores: s = q . k; t = s without softcap, t = tanh(s * softcap_in) with it; the softmax
 * runs on 2^(t * exp_scale). See src/attention/plan.rs (SoftmaxConsts). */
#ifndef LONGCTX_ATTENTION_PARAMS_H
#define LONGCTX_ATTENTION_PARAMS_H

#include <stdint.h>

/* Most tokens in any of Q, K, V (2^29), and the window side meaning "unbounded". */
#define LONGCTX_ATTN_MAX_TOKENS 536870912u
#define LONGCTX_ATTN_WINDOW_UNBOUNDED 536870912

/* Lazy online-softmax rescaling: a warp keeps its rows' reference maxima (and skips
 * rescaling O and the row sums) until some row's max grows by more than this many units
 * of the exp2 domain, so every unnormalised probability stays <= 2^8. */
#define LONGCTX_ATTN_RESCALE_THRESHOLD 8.0f

/* Tile table of the mma.sync kernels, one row per (head_dim, head_dim_v): query rows per
 * CTA, keys per K/V tile, warps per CTA. src/attention/plan.rs holds the same table and
 * checks it against these at compile time; kernels/attention/traits.cuh static_asserts
 * them. Code compiled for compute_90 and up (the sm_90a cubin) takes the *_SM90_BLOCK_N
 * key tile instead: the same kernel with 64 keys per tile where it fits 255 registers
 * without spilling on sm_90a; the host reads which code was loaded from the function's
 * PTX arch. Query rows and warps never depend on the arch. */
#define LONGCTX_ATTN_HD64_BLOCK_M 128
#define LONGCTX_ATTN_HD64_BLOCK_N 64
#define LONGCTX_ATTN_HD64_WARPS 4
#define LONGCTX_ATTN_HD96_BLOCK_M 128
#define LONGCTX_ATTN_HD96_BLOCK_N 32
#define LONGCTX_ATTN_HD96_WARPS 4
#define LONGCTX_ATTN_HD128_BLOCK_M 128
#define LONGCTX_ATTN_HD128_BLOCK_N 32
#define LONGCTX_ATTN_HD128_WARPS 4
#define LONGCTX_ATTN_HD192_BLOCK_M 128
#define LONGCTX_ATTN_HD192_BLOCK_N 32
#define LONGCTX_ATTN_HD192_WARPS 4
#define LONGCTX_ATTN_HD256_BLOCK_M 64
#define LONGCTX_ATTN_HD256_BLOCK_N 64
#define LONGCTX_ATTN_HD256_WARPS 4
#define LONGCTX_ATTN_HD64_SM90_BLOCK_N 64
#define LONGCTX_ATTN_HD96_SM90_BLOCK_N 64
#define LONGCTX_ATTN_HD128_SM90_BLOCK_N 64
#define LONGCTX_ATTN_HD192_SM90_BLOCK_N 32
#define LONGCTX_ATTN_HD256_SM90_BLOCK_N 64

/* Backward (longctx_attn_bwd_*). One CTA owns BLOCK_N keys of one KV head and loops over
 * the query heads of its group and the query tiles of BLOCK_M rows that see those keys.
 * Its warps are (BLOCK_N / 16) key groups x DIM_SPLIT column slices: warp w owns keys
 * 16 (w % (BLOCK_N / 16)) .. + 16 and slice w / (BLOCK_N / 16) of dK's and dV's columns.
 * Every warp count is BLOCK_N / 16 x DIM_SPLIT. */
#define LONGCTX_ATTN_BWD_HD64_BLOCK_M 64
#define LONGCTX_ATTN_BWD_HD64_BLOCK_N 64
#define LONGCTX_ATTN_BWD_HD64_DIM_SPLIT 1
#define LONGCTX_ATTN_BWD_HD96_BLOCK_M 64
#define LONGCTX_ATTN_BWD_HD96_BLOCK_N 64
#define LONGCTX_ATTN_BWD_HD96_DIM_SPLIT 1
#define LONGCTX_ATTN_BWD_HD128_BLOCK_M 64
#define LONGCTX_ATTN_BWD_HD128_BLOCK_N 64
#define LONGCTX_ATTN_BWD_HD128_DIM_SPLIT 1
#define LONGCTX_ATTN_BWD_HD192_BLOCK_M 64
#define LONGCTX_ATTN_BWD_HD192_BLOCK_N 64
#define LONGCTX_ATTN_BWD_HD192_DIM_SPLIT 2
#define LONGCTX_ATTN_BWD_HD256_BLOCK_M 32
#define LONGCTX_ATTN_BWD_HD256_BLOCK_N 32
#define LONGCTX_ATTN_BWD_HD256_DIM_SPLIT 2
/* Deterministic mode's dQ kernel: one CTA per (query tile of BLOCK_M rows, query head,
 * sequence), 4 warps of 16 rows, key tiles of BLOCK_N keys (HD256_BLOCK_N for d = 256). */
#define LONGCTX_ATTN_BWD_DQ_BLOCK_M 64
#define LONGCTX_ATTN_BWD_DQ_BLOCK_N 64
#define LONGCTX_ATTN_BWD_DQ_HD256_BLOCK_N 32
/* Warps per CTA of the row-wise passes (preprocess, dQ conversion): one warp per
 * (token, head) row. */
#define LONGCTX_ATTN_BWD_ROW_WARPS 4
/* flags: add the gradients to dq, dk, dv instead of overwriting them. */
#define LONGCTX_ATTN_BWD_ACCUMULATE 1u
/* flags: the main kernel leaves dQ to the separate dQ kernel (deterministic mode). */
#define LONGCTX_ATTN_BWD_SKIP_DQ 2u

typedef struct LongctxAttnTensor {
    uint64_t data;         /* device address of element [0, 0, 0]               */
    int64_t token_stride;  /* elements between consecutive tokens (multiple of 8) */
    int64_t head_stride;   /* elements between consecutive heads (multiple of 8)  */
} LongctxAttnTensor;

typedef struct LongctxAttnParams {
    LongctxAttnTensor q;      /* [total_q, heads_q, head_dim]                                */
    LongctxAttnTensor k;      /* [total_k, heads_kv, head_dim]                               */
    LongctxAttnTensor v;      /* [total_k, heads_kv, head_dim_v]                             */
    LongctxAttnTensor o;      /* [total_q, heads_q, head_dim_v], written                     */
    uint64_t lse;             /* float [heads_q, total_q], written; 0 to skip               */
    int64_t lse_head_stride;  /* elements between heads of lse                              */
    uint64_t cu_seqlens_q;    /* int32 [batch + 1], 0 .. total_q, nondecreasing             */
    uint64_t cu_seqlens_k;    /* int32 [batch + 1], 0 .. total_k, nondecreasing             */
    uint32_t batch;           /* sequences (gridDim.z)                                       */
    uint32_t heads_q;         /* query heads (gridDim.y)                                     */
    uint32_t heads_per_kv;    /* heads_q / heads_kv                                          */
    uint32_t num_m_blocks;    /* ceil(max seqlen_q / BLOCK_M) (gridDim.x)                    */
    int32_t window_left;      /* 0 .. LONGCTX_ATTN_WINDOW_UNBOUNDED                          */
    int32_t window_right;     /* 0 .. LONGCTX_ATTN_WINDOW_UNBOUNDED; 0 when causal           */
    float exp_scale;          /* transformed score -> log2 domain                            */
    float softcap_in;         /* scale / softcap, or 0 for no softcap                        */
} LongctxAttnParams;

/* Backward. Inputs q, k, v, o, dout (dO, O's layout), lse (the forward's, -inf for rows
 * that saw no key); outputs dq, dk, dv (Q's, K's, V's layouts). Workspace, dense f32:
 * dq_accum [total_q, heads_q, head_dim], lse_log2 and dot [heads_q, total_q]. */
typedef struct LongctxAttnBwdParams {
    LongctxAttnTensor q;
    LongctxAttnTensor k;
    LongctxAttnTensor v;
    LongctxAttnTensor o;
    LongctxAttnTensor dout;
    LongctxAttnTensor dq;
    LongctxAttnTensor dk;
    LongctxAttnTensor dv;
    uint64_t lse;             /* float [heads_q, total_q], read                              */
    int64_t lse_head_stride;  /* elements between heads of lse                              */
    uint64_t dq_accum;        /* float [total_q, heads_q, head_dim]                         */
    uint64_t lse_log2;        /* float [heads_q, total_q]: LSE * log2(e), +inf for no key   */
    uint64_t dot;             /* float [heads_q, total_q]: rowsum(dO * O)                    */
    uint64_t cu_seqlens_q;
    uint64_t cu_seqlens_k;
    uint32_t batch;           /* sequences (gridDim.z of the main kernel)                    */
    uint32_t heads_q;
    uint32_t heads_per_kv;
    uint32_t num_n_blocks;    /* ceil(max seqlen_k / BLOCK_N) (gridDim.x of the main kernel) */
    uint32_t total_q;
    uint32_t head_dim;        /* D, for the row-wise passes                                  */
    uint32_t head_dim_v;      /* DV, for the row-wise passes                                 */
    uint32_t flags;           /* LONGCTX_ATTN_BWD_*                                          */
    int32_t window_left;
    int32_t window_right;
    float exp_scale;          /* as the forward's                                            */
    float softcap_in;         /* as the forward's                                            */
    float scale;              /* d(logit) / d(q . k) without softcap: the softmax scale      */
    uint32_t num_m_blocks;    /* ceil(max seqlen_q / DQ_BLOCK_M) (gridDim.x of the dQ kernel)  */
} LongctxAttnBwdParams;

#ifdef __cplusplus
static_assert(sizeof(LongctxAttnTensor) == 24, "LongctxAttnTensor layout");
static_assert(sizeof(LongctxAttnParams) == 160, "LongctxAttnParams layout");
static_assert(sizeof(LongctxAttnBwdParams) == 304, "LongctxAttnBwdParams layout");
#else
_Static_assert(sizeof(LongctxAttnTensor) == 24, "LongctxAttnTensor layout");
_Static_assert(sizeof(LongctxAttnParams) == 160, "LongctxAttnParams layout");
_Static_assert(sizeof(LongctxAttnBwdParams) == 304, "LongctxAttnBwdParams layout");
#endif

#endif
