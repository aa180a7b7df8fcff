/* Parameters of the MoE routing kernels (longctx_moe_*). Pure C, shared with Rust through
 * bindgen (src/sys/moe_params.rs is its committed output).
 *
 * Shapes, all dense and row-major:
 *   logits      T[tokens, experts]      T = float or bf16
 *   bias        float[experts]          DeepSeek-V3's e_score_correction_bias (selection only)
 *   ids         int32[tokens, top_k]    chosen experts, descending selection score
 *   weights     float[tokens, top_k]    their routing weights
 * An assignment is one (token t, rank j) pair, numbered a = t * top_k + j; there are
 * assignments = tokens * top_k of them. A slot is one row of the expert-ordered buffer fed to
 * a grouped GEMM: expert e owns slots [offsets[e], offsets[e + 1]), its kept assignments first
 * in token order, then padding up to a multiple of `block`. */
#ifndef LONGCTX_MOE_PARAMS_H
#define LONGCTX_MOE_PARAMS_H

#include <stdint.h>

/* Scoring function applied to the logits. */
#define LONGCTX_MOE_SCORING_SOFTMAX 0u /* softmax over all experts (Mixtral, Qwen-MoE, V2) */
#define LONGCTX_MOE_SCORING_SIGMOID 1u /* independent sigmoids (DeepSeek-V3)              */

/* Group-limited routing: how a group of experts is scored. */
#define LONGCTX_MOE_GROUP_NONE 0u      /* every expert eligible                           */
#define LONGCTX_MOE_GROUP_MAX 1u       /* group score = its best choice score (V2)        */
#define LONGCTX_MOE_GROUP_TOP2_SUM 2u  /* group score = sum of its two best (V3)          */

/* Most experts any kernel accepts, and most the one-warp-per-token gating kernel takes (it
 * holds 512 / 32 = 16 experts per lane in registers). */
#define LONGCTX_MOE_MAX_EXPERTS 4096u
#define LONGCTX_MOE_WARP_MAX_EXPERTS 512u
/* Most top_k of the one-warp-per-token gating kernel (one chosen expert per lane). */
#define LONGCTX_MOE_WARP_MAX_TOP_K 32u

/* Launch shapes of the MoE kernels (the reasons are in moe/traits.cuh). */
#define LONGCTX_MOE_GATE_WARPS 4u           /* gating, one warp per token                */
#define LONGCTX_MOE_GATE_BLOCK_THREADS 256u /* gating, one block per token               */
#define LONGCTX_MOE_BWD_WARPS 4u            /* gating backward, one warp per token       */
#define LONGCTX_MOE_STATS_THREADS 256u      /* router statistics, one block per chunk    */
#define LONGCTX_MOE_STATS_MAX_CHUNK_TOKENS 256u
#define LONGCTX_MOE_LOSS_THREADS 1024u      /* the loss kernel, one block                */
#define LONGCTX_MOE_SCAN_THREADS 1024u      /* the permutation scan, one block           */
#define LONGCTX_MOE_MAX_PERMUTE_WARPS 8u    /* count and scatter, warps per block        */
#define LONGCTX_MOE_ROW_THREADS 128u        /* gather / combine, one block per row       */
#define LONGCTX_MOE_BIAS_THREADS 1024u      /* bias update, one block                    */

/* "No capacity limit" for LongctxMoePermuteParams.capacity. */
#define LONGCTX_MOE_NO_CAPACITY 0xFFFFFFFFu

typedef struct LongctxMoeGateParams {
    uint64_t logits;        /* T[tokens, experts]                                          */
    uint64_t bias;          /* float[experts], or 0 for none                              */
    uint64_t ids;           /* out: int32[tokens, top_k]                                   */
    uint64_t weights;       /* out: float[tokens, top_k]                                   */
    uint32_t tokens;
    uint32_t experts;       /* 1..LONGCTX_MOE_MAX_EXPERTS                                  */
    uint32_t top_k;         /* 1..experts eligible after group limiting                    */
    uint32_t scoring;       /* LONGCTX_MOE_SCORING_*                                       */
    uint32_t group_mode;    /* LONGCTX_MOE_GROUP_*                                         */
    uint32_t n_group;       /* divides experts; 1 when group_mode is NONE                  */
    uint32_t topk_group;    /* 1..n_group                                                  */
    uint32_t renormalize;   /* 1: weights /= (sum of chosen scores + 1e-20)                */
    uint32_t select_on_logits; /* 1: rank by the raw logits (no bias, no top-2 sums; exact) */
    float routed_scaling_factor;
    /* Warp kernel layout (src/moe/plan.rs): a token's experts are spread over `lanes` lanes
     * (a power of two; 32 / lanes tokens per warp), `slots` consecutive experts per lane, and
     * with group limiting each group covers `group_lanes` whole lanes (a power of two). */
    uint32_t lanes;
    uint32_t slots;
    uint32_t group_lanes;
    /* 1: each lane's experts are whole 16-byte vectors (logits 16-byte aligned, slots x
     * sizeof(T) a multiple of 16, experts a multiple of slots), loaded as such. */
    uint32_t vec_loads;
} LongctxMoeGateParams;

typedef struct LongctxMoeGateBwdParams {
    uint64_t logits;        /* T[tokens, experts], the forward's input                     */
    uint64_t ids;           /* int32[tokens, top_k], the forward's output                  */
    uint64_t d_weights;     /* float[tokens, top_k], or 0: no gating term                  */
    uint64_t counts;        /* int32[experts] routed counts, or 0: no load-balancing term  */
    uint64_t d_logits;      /* out: float[tokens, experts]                                 */
    uint32_t tokens;
    uint32_t experts;
    uint32_t top_k;
    uint32_t scoring;
    uint32_t renormalize;
    float routed_scaling_factor;
    float aux_grad_scale;   /* alpha * experts / (tokens^2 * top_k)                        */
    float z_grad_scale;     /* 2 * beta / tokens, or 0: no z-loss term                     */
} LongctxMoeGateBwdParams;

typedef struct LongctxMoeStatsParams {
    uint64_t logits;        /* T[tokens, experts]                                          */
    uint64_t partial_probs; /* out: float[chunks, experts], sum of router probs per chunk  */
    uint64_t partial_lse2;  /* out: float[chunks], sum of logsumexp(logits)^2 per chunk    */
    uint32_t tokens;
    uint32_t experts;
    uint32_t scoring;
    uint32_t chunk_tokens;  /* tokens per chunk (one block each)                           */
} LongctxMoeStatsParams;

typedef struct LongctxMoeLossParams {
    uint64_t partial_probs; /* float[chunks, experts] from the stats kernel                */
    uint64_t partial_lse2;  /* float[chunks]                                               */
    uint64_t counts;        /* int32[experts] routed counts                                */
    uint64_t losses;        /* out: float[2] = {aux loss, z-loss}, coefficients applied    */
    uint64_t mean_probs;    /* out: float[experts], P_i = mean router probability          */
    uint32_t chunks;
    uint32_t experts;
    uint32_t tokens;
    uint32_t top_k;
    float aux_coef;         /* alpha                                                       */
    float z_coef;           /* beta                                                        */
} LongctxMoeLossParams;

typedef struct LongctxMoePermuteParams {
    uint64_t ids;           /* int32[assignments], each in [0, experts)                    */
    uint64_t chunk_counts;  /* workspace int32[chunks, experts]                            */
    uint64_t routed_counts; /* out: int32[experts], assignments routed to each expert      */
    uint64_t counts;        /* out: int32[experts], min(routed, capacity)                  */
    uint64_t offsets;       /* out: int32[experts + 1], padded segment starts, then total  */
    uint64_t slot_of;       /* out: int32[assignments], its slot, or -1 when dropped       */
    uint64_t slot_assignment; /* out: int32[max_slots], assignment in each slot, -1 = pad  */
    uint64_t block_expert;  /* out: int32[max_blocks], expert owning each block, -1 = past */
    uint64_t dropped;       /* out: int32[1], assignments dropped by the capacity          */
    uint32_t assignments;
    uint32_t experts;
    uint32_t block;         /* segment padding multiple, >= 1                              */
    uint32_t capacity;      /* per-expert limit, or LONGCTX_MOE_NO_CAPACITY                */
    uint32_t chunk;         /* assignments per warp chunk, a multiple of 32                */
    uint32_t chunks;        /* ceil(assignments / chunk)                                   */
    uint32_t warps;         /* warp chunks per block of the count and scatter kernels      */
    uint32_t max_slots;     /* the plan's padded-slot bound (PermutePlan::max_slots)     */
    uint32_t max_blocks;    /* ceil(max_slots / block)                                     */
    uint32_t pad0;
} LongctxMoePermuteParams;

typedef struct LongctxMoeGatherParams {
    uint64_t src;           /* T[tokens, hidden]                                           */
    uint64_t dst;           /* out: T[rows, hidden], rows = max_slots                      */
    uint64_t slot_assignment; /* int32[rows]                                               */
    uint64_t scale;         /* float[assignments] multiplying each row, or 0 for 1         */
    uint64_t total;         /* int32* to the padded total (offsets[experts]): rows at or past
                               it are left untouched; 0 writes every row                   */
    uint32_t rows;
    uint32_t hidden;
    uint32_t top_k;
    uint32_t vec;           /* 1: hidden is a multiple of the 16-byte vector width         */
} LongctxMoeGatherParams;

typedef struct LongctxMoeCombineParams {
    uint64_t src;           /* T[rows, hidden], expert order                               */
    uint64_t dst;           /* out: T[tokens, hidden]                                      */
    uint64_t slot_of;       /* int32[assignments]                                          */
    uint64_t weights;       /* float[assignments], or 0 for 1                              */
    uint32_t tokens;
    uint32_t hidden;
    uint32_t top_k;
    uint32_t vec;
} LongctxMoeCombineParams;

typedef struct LongctxMoeCombineDwParams {
    uint64_t d_out;         /* T[tokens, hidden]                                           */
    uint64_t expert_out;    /* T[rows, hidden]                                             */
    uint64_t slot_of;       /* int32[assignments]                                          */
    uint64_t d_weights;     /* out: float[assignments]                                     */
    uint32_t tokens;
    uint32_t hidden;
    uint32_t top_k;
    uint32_t vec;
} LongctxMoeCombineDwParams;

typedef struct LongctxMoeBiasParams {
    uint64_t counts;        /* int32[experts] routed counts                                */
    uint64_t bias;          /* in/out: float[experts]                                      */
    uint32_t experts;
    float gamma;            /* bias_i += gamma * sign(mean load - load_i)                  */
} LongctxMoeBiasParams;

#ifdef __cplusplus
#define LONGCTX_MOE_STATIC_ASSERT static_assert
#else
#define LONGCTX_MOE_STATIC_ASSERT _Static_assert
#endif
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeGateParams) == 88, "LongctxMoeGateParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeGateBwdParams) == 72, "LongctxMoeGateBwdParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeStatsParams) == 40, "LongctxMoeStatsParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeLossParams) == 64, "LongctxMoeLossParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoePermuteParams) == 112, "LongctxMoePermuteParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeGatherParams) == 56, "LongctxMoeGatherParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeCombineParams) == 48, "LongctxMoeCombineParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeCombineDwParams) == 48, "LongctxMoeCombineDwParams layout");
LONGCTX_MOE_STATIC_ASSERT(sizeof(LongctxMoeBiasParams) == 24, "LongctxMoeBiasParams layout");
#undef LONGCTX_MOE_STATIC_ASSERT

#endif
