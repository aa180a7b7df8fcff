/* Parameters of the KV-cache family (longctx_kv_*). Pure C, shared with Rust through bindgen
 * (src/sys/kv_cache_params.rs is its committed output).
 *
 * merge_states: P partial attention states of the same rows, stacked along a leading part
 * dim, combined into one:
 *   O part p:   o_parts[p * o_part_stride + token * o_token_stride + head * o_head_stride + c]
 *   LSE part p: lse_parts[p * lse_part_stride + head * lse_head_stride + token]   (f32, ln)
 *   out:        out_o[token * out_token_stride + head * out_head_stride + c],
 *               out_lse[head * out_lse_head_stride + token]
 * LSE = log sum_p exp(LSE_p), O = sum_p exp(LSE_p - LSE) O_p; a part whose LSE is -inf is
 * empty and contributes nothing (its O is never read); a row with no nonempty part gets
 * O = 0, LSE = -inf. With LONGCTX_KV_MERGE_ACCUMULATE the output's own (O, LSE) is one more
 * part, read before it is overwritten (ring attention's running state). Strides in elements. */
#ifndef LONGCTX_KV_CACHE_PARAMS_H
#define LONGCTX_KV_CACHE_PARAMS_H

#include <stdint.h>

#include "attention_params.h"

/* flags */
#define LONGCTX_KV_MERGE_ACCUMULATE 1u /* the output state is merged in as an extra part */

/* Warps per block of the merge kernel; each warp merges one (token, head) row. */
#define LONGCTX_KV_MERGE_WARPS 4u
/* Largest head_dim_v of the merge kernel (16 f32 accumulators per lane). */
#define LONGCTX_KV_MERGE_MAX_HEAD_DIM 512u

/* The paged cache (src/kv_cache/paged.rs): K and V are each [pages, page_size, heads_kv,
 * head_dim], dense, in the storage type S (f16, bf16 or fp8 e4m3). Token t of sequence b is
 * slot t % page_size of page block_table[b * max_pages_per_seq + t / page_size]. An fp8
 * cache's value is code x scale, with f32 scales [pages, page_size, heads_kv] (one per
 * token and head, written by append) or [heads_kv] (one per head, fixed by the caller). */
#define LONGCTX_KV_SCALE_NONE 0u      /* f16 / bf16 cache                              */
#define LONGCTX_KV_SCALE_TOKEN_HEAD 1u /* fp8, scales [pages, page_size, heads_kv]     */
#define LONGCTX_KV_SCALE_HEAD 2u      /* fp8, scales [heads_kv]                        */

typedef struct LongctxKvCache {
    uint64_t k;               /* device S*                                              */
    uint64_t v;               /* device S*                                              */
    uint64_t k_scale;         /* device float*, 0 with LONGCTX_KV_SCALE_NONE             */
    uint64_t v_scale;         /* device float*                                          */
    uint32_t pages;
    uint32_t page_size;       /* 1 ..= 256                                              */
    uint32_t heads_kv;
    uint32_t head_dim;
    uint32_t scale_mode;      /* LONGCTX_KV_SCALE_*                                     */
    uint32_t pad0;
} LongctxKvCache;

/* One step of a batch (src/kv_cache/step.rs): sequence b holds seqlens[b] tokens after the
 * step; its last cu_new[b + 1] - cu_new[b] tokens are the step's new tokens, rows
 * cu_new[b] .. cu_new[b + 1] of the new K/V and of the queries. */
typedef struct LongctxKvStep {
    uint64_t block_table;     /* device int32 [batch, max_pages_per_seq]                */
    uint64_t seqlens;         /* device int32 [batch]                                   */
    uint64_t cu_new;          /* device int32 [batch + 1]                               */
    uint32_t batch;
    uint32_t max_pages_per_seq;
} LongctxKvStep;

/* Decode over the cache (longctx_kv_decode_*): each sequence's new tokens (1 to
 * LONGCTX_KV_DECODE_MAX_QUERIES, the last positions of its cache) attend to its cached keys,
 * causal among themselves (bottom-right aligned): query i of sequence b, at position
 * p = seqlens[b] - n_b + i, sees keys max(0, p - window_left) ..= p. One CTA per (split,
 * KV head x row tile, sequence) with the query heads of the KV head packed as rows: row r is
 * query token r / heads_per_kv of head kv_head * heads_per_kv + r % heads_per_kv. Split s
 * covers keys [s * chunk, (s + 1) * chunk). With one split the CTA writes O (T) and the LSE
 * (natural log, -inf for a row that saw no key); with several it writes f32 partial states
 * [splits, total_new, heads_q, head_dim] and [splits, heads_q, total_new] that merge_states
 * combines. Q and O are [total_new, heads_q, head_dim]; scores as the attention forward's. */
#define LONGCTX_KV_DECODE_WARPS 4u
#define LONGCTX_KV_DECODE_MAX_QUERIES 16u
/* Bytes of K (and of V) per pipeline stage: keys per tile = this / (head_dim x sizeof(S)). */
#define LONGCTX_KV_DECODE_TILE_BYTES 8192u
/* Query rows per CTA x elements per lane and key row: rows = this / max(8, head_dim / 32). */
#define LONGCTX_KV_DECODE_ROW_ELEMS 64u
/* Head dims 64 and 128 run on tensor cores (decode_mma_kernel.cuh): 16 query rows per CTA,
 * one m16 tile; warps per CTA by head dim, each taking 16 keys of a 16 x warps key tile.
 * Head dims 256 and 512 run on CUDA cores (decode_kernel.cuh, LONGCTX_KV_DECODE_WARPS). */
#define LONGCTX_KV_DECODE_MMA_ROWS 16u
#define LONGCTX_KV_DECODE_MMA_WARPS_HD64 4u
#define LONGCTX_KV_DECODE_MMA_WARPS_HD128 2u

typedef struct LongctxKvDecodeParams {
    LongctxKvCache cache;
    LongctxKvStep step;
    uint64_t q;               /* device T* [total_new, heads_q, head_dim]                  */
    int64_t q_token_stride;
    int64_t q_head_stride;
    uint64_t o;               /* device T*, one split                                     */
    int64_t o_token_stride;
    int64_t o_head_stride;
    uint64_t lse;             /* device float* [heads_q, total_new], one split; 0 to skip  */
    int64_t lse_head_stride;
    uint64_t part_o;          /* device float* [splits, total_new, heads_q, head_dim]      */
    uint64_t part_lse;        /* device float* [splits, heads_q, total_new]                */
    uint32_t heads_q;
    uint32_t heads_per_kv;
    uint32_t row_tiles;       /* gridDim.y = heads_kv x row_tiles                          */
    uint32_t splits;          /* gridDim.x                                                 */
    uint32_t chunk;           /* keys per split, a multiple of the kernel's key tile       */
    uint32_t total_new;
    int32_t window_left;      /* 0 .. LONGCTX_ATTN_WINDOW_UNBOUNDED                        */
    float exp_scale;          /* as the attention forward's                                */
    float softcap_in;
    /* Keys stored un-rotated (exact dynamic scaling): with rope_inv_freq != 0 the kernel
     * rotates every key j it reads at position j, and each query at its position, with
     * sequence b's inv_freq row and attention factor (cos and sin times the factor, as the
     * RoPE kernel), the first rotary_dim channels, pairing rope_style, angles as
     * rope_angle_mode. 0: the cache and Q hold rotated values. */
    uint32_t rotary_dim;
    uint64_t rope_inv_freq;   /* device double [batch, rotary_dim / 2], or 0               */
    uint64_t rope_factor;     /* device float [batch]                                      */
    uint32_t rope_style;      /* LONGCTX_ROPE_STYLE_*                                      */
    uint32_t rope_angle_mode; /* LONGCTX_ROPE_ANGLE_*                                      */
} LongctxKvDecodeParams;

/* Extend over the cache (longctx_kv_extend_*, chunked prefill): each sequence's new tokens,
 * any number of them, attend to its cached keys (which already hold the new ones), causal
 * bottom-right: query i of the n new tokens of sequence b, at position p = seqlens[b] - n + i,
 * sees keys max(0, p - window_left) ..= p. The attention forward's kernel body with paged K/V
 * addressing: attn holds Q, O, the LSE, the heads, the window (window_right = 0) and the
 * softmax constants as for the forward, with cu_seqlens_q = step.cu_new and grid
 * (num_m_blocks, heads_q, batch); attn.k, attn.v and attn.cu_seqlens_k are unused (0): row j
 * of sequence b's K is cache.k + ((block_table[b * max_pages_per_seq + j / page_size] *
 * page_size + j % page_size) * heads_kv + head_kv) * head_dim, and its key count seqlens[b].
 * f16 / bf16 caches of the queries' type, or fp8 e4m3 caches (scale_mode TOKEN_HEAD or HEAD)
 * under f16 / bf16 queries; head_dim == head_dim_v.
 * Keys stored un-rotated (longctx_kv_extend_rot_*, exact dynamic scaling): the kernel rotates
 * every key j of sequence b it loads at position j, and each query at its position, with
 * sequence b's inv_freq row and attention factor, exactly as the rotating decode does
 * (LongctxKvDecodeParams: the first rotary_dim channels, pairing rope_style, angles as
 * rope_angle_mode, cos and sin times the factor, rounded to T). The other entries ignore
 * these fields (0). */
/* Extend at head dim 512 (longctx_kv_extend_*_hd512 and longctx_kv_extend_r64_*_hd512,
 * kernels/kv_cache/extend_wide_kernel.cuh): the same params, a different grid. One CTA per (row
 * tile, KV head, sequence): row r of tile y is new token (R y + r) / heads_per_kv of query head
 * head_kv * heads_per_kv + (R y + r) % heads_per_kv, R = 16 (4 warps) or 64 (8 warps, for
 * devices with 136 KB of shared memory per block; 151 KB with an fp8 cache, whose codes are
 * staged and widened in shared memory); attn.num_m_blocks is gridDim.x. */
#define LONGCTX_KV_EXTEND_WIDE_WARPS 4u
#define LONGCTX_KV_EXTEND_WIDE_ROWS 16u
#define LONGCTX_KV_EXTEND_WIDE_TILE_KEYS 32u
#define LONGCTX_KV_EXTEND_WIDE_SMEM 83712u
#define LONGCTX_KV_EXTEND_WIDE_R64_WARPS 8u
#define LONGCTX_KV_EXTEND_WIDE_R64_ROWS 64u
#define LONGCTX_KV_EXTEND_WIDE_R64_SMEM 137216u
#define LONGCTX_KV_EXTEND_WIDE_SMEM_FP8 100224u
#define LONGCTX_KV_EXTEND_WIDE_R64_SMEM_FP8 153728u

typedef struct LongctxKvExtendParams {
    LongctxAttnParams attn;
    LongctxKvCache cache;
    LongctxKvStep step;
    uint32_t rotary_dim;      /* even, 2 ..= head_dim                                     */
    uint32_t rope_style;      /* LONGCTX_ROPE_STYLE_*                                     */
    uint64_t rope_inv_freq;   /* device double [batch, rotary_dim / 2]                     */
    uint64_t rope_factor;     /* device float [batch]                                     */
    uint32_t rope_angle_mode; /* LONGCTX_ROPE_ANGLE_*                                     */
    uint32_t pad0;
} LongctxKvExtendParams;

typedef struct LongctxKvMergeParams {
    uint64_t o_parts;            /* device T*: part 0, token 0, head 0, channel 0          */
    uint64_t lse_parts;          /* device float*: part 0, head 0, token 0                 */
    uint64_t out_o;              /* device T*                                              */
    uint64_t out_lse;            /* device float*                                          */
    int64_t o_part_stride;
    int64_t o_token_stride;
    int64_t o_head_stride;
    int64_t lse_part_stride;
    int64_t lse_head_stride;
    int64_t out_token_stride;
    int64_t out_head_stride;
    int64_t out_lse_head_stride;
    uint32_t parts;              /* may be 0                                               */
    uint32_t tokens;
    uint32_t heads;
    uint32_t head_dim_v;         /* 1..=LONGCTX_KV_MERGE_MAX_HEAD_DIM                      */
    uint32_t flags;              /* LONGCTX_KV_MERGE_*                                     */
    uint32_t pad0;
} LongctxKvMergeParams;

/* append_kv: writes every new token's K and V row (all heads) of a step into its cache slot.
 * New row r (0 <= r < total_new) of sequence b (cu_new[b] <= r < cu_new[b + 1]) is the
 * token at position p = seqlens[b] - (cu_new[b + 1] - cu_new[b]) + (r - cu_new[b]), stored
 * in slot p % page_size of page block_table[b * max_pages_per_seq + p / page_size]:
 *   new K:  new_k[r * k_token_stride + h * k_head_stride + c]   (T = f16 or bf16)
 *   cache:  cache.k[((page * page_size + slot) * heads_kv + h) * head_dim + c]   (S = T or fp8)
 * With inv_freq != 0, K's first rotary_dim channels are rotated at position p first (the RoPE
 * kernel's forward: pairing `rope_style`, angle `angle_mode`, cos and sin times
 * attention_factor); V is never rotated. fp8 codes are f32_to_e4m3(x / scale): with
 * LONGCTX_KV_SCALE_TOKEN_HEAD scale = absmax(row) / 448 (1 for an all-zero row), written to
 * k_scale / v_scale[(page * page_size + slot) * heads_kv + h]; with LONGCTX_KV_SCALE_HEAD
 * scale = k_scale / v_scale[h], read only. */

/* Warps per block of the append kernel; each warp writes one (token, head) row of K and V. */
#define LONGCTX_KV_APPEND_WARPS 4u
/* Largest head_dim of the append kernel: the cache's own limit with 16-byte access (32 f32
 * per lane); the scalar fallback (any alignment) keeps 16 f32 per lane, 512 channels, so its
 * fp8 rows stay in registers across the RoPE angle's sincosf calls. */
#define LONGCTX_KV_APPEND_MAX_HEAD_DIM 1024u
#define LONGCTX_KV_APPEND_MAX_HEAD_DIM_SCALAR 512u

typedef struct LongctxKvAppendParams {
    LongctxKvCache cache;
    LongctxKvStep step;
    uint64_t new_k;              /* device T*: new token 0, head 0, channel 0                */
    uint64_t new_v;              /* device T*                                                */
    int64_t k_token_stride;
    int64_t k_head_stride;
    int64_t v_token_stride;
    int64_t v_head_stride;
    uint64_t inv_freq;           /* device double[rotary_dim / 2]; 0 = no RoPE               */
    uint32_t total_new;          /* rows of new K / V, cu_new[batch]                         */
    uint32_t rotary_dim;         /* even, <= head_dim; 0 without RoPE                        */
    uint32_t rope_style;         /* LONGCTX_ROPE_STYLE_* (params/rope_params.h)              */
    uint32_t angle_mode;         /* LONGCTX_ROPE_ANGLE_*                                     */
    float attention_factor;      /* multiplies cos and sin                                   */
    uint32_t pad0;
} LongctxKvAppendParams;

/* MLA absorbed decode (longctx_mla_decode_*, src/mla/decode.rs): DeepSeek's multi-head latent
 * attention as multi-query attention over one latent KV head. The cache keeps, per token, the
 * latent c_kv (512 channels, also the value) and the rotated k_pe (64 channels):
 *   bf16:  latent[(page * page_size + slot) * 576 + c], c < 512 latent, 512 <= c < 576 k_pe
 *   fp8:   latent[(page * page_size + slot) * 512 + c] e4m3 codes of c_kv, value code x
 *          scale[page * page_size + slot] (f32), and rope[(page * page_size + slot) * 64 + c]
 *          bf16 k_pe (unquantised)
 * Token t of sequence b is slot t % page_size of page block_table[b * max_pages_per_seq +
 * t / page_size]. Q is [total_new, heads, 576] bf16 ([q_abs | q_pe] per head); query i of the
 * n new tokens of sequence b, at position p = seqlens[b] - n + i, sees keys 0 ..= p. One CTA per
 * (split, row tile, sequence): row r of tile y is query token (R y + r) / heads of head
 * (R y + r) % heads, R the kernel's rows per tile: 16 (longctx_mla_decode_bf16*, 4 warps) or
 * 64 (longctx_mla_decode_r64_bf16*, 8 warps, for devices with 160 KB of shared memory per block).
 * Split s covers keys [s * chunk, (s + 1) * chunk). One split writes O
 * [total_new, heads, 512] bf16 and the LSE (natural log, -inf for a row that saw no key); several
 * write f32 partial states [splits, total_new, heads, 512] and [splits, heads, total_new] that
 * merge_states combines. Dynamic shared memory: LONGCTX_MLA_DECODE_SMEM_*. */
#define LONGCTX_MLA_DECODE_WARPS 4u
#define LONGCTX_MLA_DECODE_ROWS 16u
#define LONGCTX_MLA_DECODE_TILE_KEYS 32u
#define LONGCTX_MLA_DECODE_SMEM_BF16 94208u
#define LONGCTX_MLA_DECODE_SMEM_FP8 98304u
#define LONGCTX_MLA_DECODE_R64_WARPS 8u
#define LONGCTX_MLA_DECODE_R64_ROWS 64u
#define LONGCTX_MLA_DECODE_R64_SMEM_BF16 153856u
#define LONGCTX_MLA_DECODE_R64_SMEM_FP8 157952u
/* sm_90+: the clustered 64-row kernels run thread-block clusters of 2 or 4 CTAs
 * (longctx_mla_decode_c2_*, _c4_*; cluster dims (1, C, 1)): the cluster's CTAs take
 * consecutive row tiles, so the grid's row tiles are a multiple of C; same shared memory as
 * the 64-row kernel. */
#define LONGCTX_MLA_DECODE_MAX_CLUSTER 4u
/* Their dynamic shared memory (three key-tile stages). */
#define LONGCTX_MLA_DECODE_CLUSTER_SMEM_BF16 190848u
#define LONGCTX_MLA_DECODE_CLUSTER_SMEM_FP8 178560u

typedef struct LongctxMlaDecodeParams {
    LongctxKvStep step;
    uint64_t latent;          /* device bf16* [pages, page_size, 576], or uint8 codes [.., 512] */
    uint64_t rope;            /* fp8: device bf16* [pages, page_size, 64]; 0 for bf16            */
    uint64_t scale;           /* fp8: device float* [pages, page_size]; 0 for bf16               */
    uint64_t q;               /* device bf16* [total_new, heads, 576], 16-byte aligned rows      */
    int64_t q_token_stride;
    int64_t q_head_stride;
    uint64_t o;               /* device bf16* [total_new, heads, 512], one split                 */
    int64_t o_token_stride;
    int64_t o_head_stride;
    uint64_t lse;             /* device float* [heads, total_new], one split; 0 to skip          */
    int64_t lse_head_stride;
    uint64_t part_o;          /* device float* [splits, total_new, heads, 512]                   */
    uint64_t part_lse;        /* device float* [splits, heads, total_new]                        */
    uint32_t page_size;
    uint32_t heads;
    uint32_t row_tiles;       /* gridDim.y                                                       */
    uint32_t splits;          /* gridDim.x                                                       */
    uint32_t chunk;           /* keys per split, a multiple of LONGCTX_MLA_DECODE_TILE_KEYS      */
    uint32_t total_new;
    float exp_scale;          /* softmax scale x log2(e)                                         */
    uint32_t pad0;
} LongctxMlaDecodeParams;

/* MLA latent append (longctx_mla_append_*, src/mla/append.rs): writes each new token's c_kv
 * (512) and k_pe (64) into its slot of the latent cache (layouts as the MLA decode's). New row
 * r of sequence b is the token at position p = seqlens[b] - n_b + (r - cu_new[b]), slot
 * p % page_size of page block_table[b * max_pages_per_seq + p / page_size]. With inv_freq != 0
 * k_pe is rotated forward at p first (pairing rope_style over its 64 channels, angle
 * angle_mode, cos and sin times attention_factor, as the RoPE kernel's forward). fp8: codes
 * f32_to_e4m3(c / scale) with scale = absmax(c_kv row) / 448 (1 for an all-zero row) written to
 * scale[slot]; k_pe stays bf16. One warp per new token. */
#define LONGCTX_MLA_APPEND_WARPS 4u

typedef struct LongctxMlaAppendParams {
    LongctxKvStep step;
    uint64_t c_kv;            /* device bf16*: new row r at c_kv + r * c_kv_stride (512)        */
    uint64_t k_pe;            /* device bf16*: new row r at k_pe + r * k_pe_stride (64)         */
    int64_t c_kv_stride;
    int64_t k_pe_stride;
    uint64_t latent;          /* bf16 cache [slots, 576], or fp8 codes [slots, 512]              */
    uint64_t rope;            /* fp8: bf16 [slots, 64]; 0 for bf16                               */
    uint64_t scale;           /* fp8: float [slots]; 0 for bf16                                  */
    uint64_t inv_freq;        /* device double[32]; 0 = k_pe stored as given                     */
    uint32_t page_size;
    uint32_t total_new;
    uint32_t rope_style;      /* LONGCTX_ROPE_STYLE_*                                            */
    uint32_t angle_mode;      /* LONGCTX_ROPE_ANGLE_*                                            */
    float attention_factor;
    uint32_t pad0;
} LongctxMlaAppendParams;

#ifdef __cplusplus
static_assert(sizeof(LongctxKvMergeParams) == 120, "LongctxKvMergeParams layout");
static_assert(sizeof(LongctxKvCache) == 56, "LongctxKvCache layout");
static_assert(sizeof(LongctxKvStep) == 32, "LongctxKvStep layout");
static_assert(sizeof(LongctxKvDecodeParams) == 232, "LongctxKvDecodeParams layout");
static_assert(sizeof(LongctxKvExtendParams) == 280, "LongctxKvExtendParams layout");
static_assert(sizeof(LongctxKvAppendParams) == 168, "LongctxKvAppendParams layout");
static_assert(sizeof(LongctxMlaDecodeParams) == 168, "LongctxMlaDecodeParams layout");
static_assert(sizeof(LongctxMlaAppendParams) == 120, "LongctxMlaAppendParams layout");
#else
_Static_assert(sizeof(LongctxKvMergeParams) == 120, "LongctxKvMergeParams layout");
_Static_assert(sizeof(LongctxKvCache) == 56, "LongctxKvCache layout");
_Static_assert(sizeof(LongctxKvStep) == 32, "LongctxKvStep layout");
_Static_assert(sizeof(LongctxKvDecodeParams) == 232, "LongctxKvDecodeParams layout");
_Static_assert(sizeof(LongctxKvExtendParams) == 280, "LongctxKvExtendParams layout");
_Static_assert(sizeof(LongctxKvAppendParams) == 168, "LongctxKvAppendParams layout");
_Static_assert(sizeof(LongctxMlaDecodeParams) == 168, "LongctxMlaDecodeParams layout");
_Static_assert(sizeof(LongctxMlaAppendParams) == 120, "LongctxMlaAppendParams layout");
#endif

#endif
