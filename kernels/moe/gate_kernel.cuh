// Fused MoE gating: scores, optional group limiting, top-k, renormalisation and scaling, for
// one token per warp (experts <= 512, top_k <= 32) or one token per block (any shape up to
// LONGCTX_MOE_MAX_EXPERTS).
//
// Per token t with logits z[0..E):
//   score[e]  = softmax(z)[e]  or  sigmoid(z[e])                      (the routing probability)
//   choice[e] = z[e] when select_on_logits (no bias and no top-2 group sums: both scorings are
//               strictly increasing in z, so ranking the logits themselves is the same order
//               and exact), else score[e] + bias[e]; NaN ranks as -inf.
//   Group limiting (n_group > 1): group g = experts [g E/n_group, (g+1) E/n_group); its score
//   is the max of its choices, or the sum of its two largest; the topk_group best groups
//   (ties to the lower group id) are eligible, the others are never chosen.
//   ids[t, r] = the r-th best eligible expert by (choice desc, id asc), r < top_k.
//   weights[t, r] = score[ids[t, r]] * s, s = routed_scaling_factor / (sum of the chosen
//   scores + 1e-20) when renormalize, else routed_scaling_factor.
//
// Warp kernel layout (chosen on the host, src/moe/plan.rs warp_layout): a token takes a
// segment of L lanes, a power of two (32 / L tokens per warp), and lane l of the segment
// holds experts [l S, l S + S), S = ceil(E / L) <= 16, in registers: any expert count, not
// only powers of two. L is the smallest that holds all experts, gives each of the top_k
// ranks a lane and fits the groups, so a warp routes as many tokens as it can. Group limiting
// on this path needs every group to cover whole lanes (E / n_group a multiple of S, a power
// of two lanes per group: DeepSeek-V3's 256 / 8 and V2's 160 / 8 qualify); the group score
// is then a butterfly over the group's lanes, all groups at once, and the kept groups are
// picked by segment maxima over 64-bit keys (group score, then ~group id). Each expert rank
// is a segment max over 32-bit order-preserving values, a ballot for the lowest lane holding
// it and that lane's lowest slot with it; the owner lane retires the winner. Rank r is
// kept by lane r and written at the end in one coalesced store.
#pragma once
#include "common/smem.cuh"
#include <math.h>
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/fast_math.cuh"
#include "common/vec.cuh"
#include "moe/reduce.cuh"
#include "moe/traits.cuh"
#include "params/moe_params.h"

namespace longctx {
namespace moe {

constexpr float kRenormEps = 1e-20f;

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float no_nan(float v) { return v != v ? neg_inf() : v; }

// Ranking keys: a 64-bit integer whose order is (choice desc, id asc), so one integer max
// picks the best candidate and breaks ties to the lower id. 0 is "no candidate" (below the
// key of any value, -inf included). -0 is keyed as +0, which it equals.
// Order-preserving bits of a float that is not NaN: a > b as floats iff ordered(a) >
// ordered(b) as unsigned integers, -0 and +0 map alike, and every value maps above 0
// (ordered(-inf) = 0x007fffff), so 0 can mean "no candidate".
__device__ __forceinline__ uint32_t ordered_bits(float v) {
    const uint32_t u = __float_as_uint(v == 0.f ? 0.f : v);
    return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}

__device__ __forceinline__ uint64_t rank_key(float v, int id) {
    return (uint64_t(ordered_bits(v)) << 32) | uint64_t(~uint32_t(id));
}

__device__ __forceinline__ int key_id(uint64_t key) { return int(~uint32_t(key)); }

__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ uint32_t max_of(uint32_t a, uint32_t b) { return max(a, b); }
__device__ __forceinline__ uint64_t max_of(uint64_t a, uint64_t b) { return a > b ? a : b; }

// Max over the `lanes`-lane segment holding this lane (xor butterflies stay inside aligned
// power-of-two segments); every lane of the segment gets the result.
template <typename V>
__device__ __forceinline__ V segment_max(V x, int lanes) {
    for (int off = lanes >> 1; off > 0; off >>= 1) x = max_of(x, __shfl_xor_sync(kFullMask, x, off));
    return x;
}

__device__ __forceinline__ float segment_sum(float x, int lanes) {
    for (int off = lanes >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
    return x;
}

template <typename T>
__device__ void gate_warp_body(const LongctxMoeGateParams& p) {
    const int L = int(p.lanes);   // lanes per token, a power of two
    const int S = int(p.slots);   // experts per lane, 1..16
    const int lane = threadIdx.x & 31;
    const int sl = lane & (L - 1);  // lane within the token's segment
    const int seg = lane - sl;      // the segment's first lane
    const int64_t warp_token0 = (int64_t(blockIdx.x) * kGateWarps + (threadIdx.x >> 5)) * (kWarp / L);
    if (warp_token0 >= p.tokens) return;  // whole warps leave together
    // Segments past the last token run along with no candidates: shuffles need the full warp.
    const int64_t token = warp_token0 + lane / L;
    const bool live = token < p.tokens;
    const int E = int(p.experts);
    const int e0 = sl * S;  // this lane's experts are e0 .. e0 + S - 1
    const T* row = reinterpret_cast<const T*>(p.logits) + (live ? token : 0) * E;
    const float* bias = reinterpret_cast<const float*>(p.bias);

    float score[kGateSlots];   // [16]: routing probability of expert e0 + j, 0 if absent
    float choice[kGateSlots];  // [16]: ranking value of expert e0 + j, -inf if absent
    uint32_t avail = 0;        // bit j: expert e0 + j exists (and, below, is eligible)
#pragma unroll
    for (int j = 0; j < kGateSlots; ++j) {
        choice[j] = neg_inf();
        score[j] = 0.f;
        if (j < S && live && e0 + j < E) avail |= 1u << j;
    }
    if (p.vec_loads) {
        // The lane's S experts are whole 16-byte vectors (host-checked: 16-byte aligned
        // logits, S x sizeof(T) a multiple of 16, E a multiple of S): S x sizeof(T) / 16
        // loads instead of S, a quarter (f32) or an eighth (bf16) of the L1 wavefronts.
        constexpr int kW = 16 / int(sizeof(T));
        const bool lane_has = live && e0 < E;
#pragma unroll
        for (int v = 0; v < kGateSlots / kW; ++v) {
            if (lane_has && v * kW < S) {
                Vec<T, kW> x;
                x.load(row + e0 + v * kW);
#pragma unroll
                for (int k = 0; k < kW; ++k) choice[v * kW + k] = DType<T>::to_f32(x.elt[k]);
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) {
            if ((avail >> j) & 1u) choice[j] = DType<T>::to_f32(row[e0 + j]);
        }
    }
    // choice[] holds the logits until the ranking values replace them below. Scores are
    // computed for all 16 slots without branches (absent slots hold -inf, which both
    // formulas map to 0, and are then zeroed by a select anyway), with the MUFU exp2 and
    // reciprocal: a few ulp (< 1e-6 relative) from the correctly rounded value, well inside
    // the 2e-5 the parity tests allow, and equal inputs still give equal scores, so ties
    // keep their order. The accurate expf and __frcp_rn took about 40 instructions and a
    // divergent branch per slot.
    if (p.scoring == LONGCTX_MOE_SCORING_SOFTMAX) {
        float m = neg_inf();
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) m = fmaxf(m, choice[j]);
        m = segment_max(m, L);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) {
            // The difference first: z - m is exact for nearby z, so large logits lose
            // nothing to two separately rounded products z log2 e and m log2 e.
            const float e = fast_exp2((choice[j] - m) * kLog2e);
            score[j] = ((avail >> j) & 1u) ? e : 0.f;
            s += score[j];
        }
        const float inv = 1.f / segment_sum(s, L);
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) score[j] *= inv;
    } else {
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) {
            const float sg = fast_rcp(1.f + fast_exp2(-kLog2e * choice[j]));
            score[j] = ((avail >> j) & 1u) ? sg : 0.f;
        }
    }
    if (!p.select_on_logits) {  // uniform; branch-free inside (predicated bias loads)
        const bool has_bias = bias != nullptr;
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) {
            const bool here = (avail >> j) & 1u;
            float b = 0.f;
            if (has_bias && here) b = bias[e0 + j];
            choice[j] = here ? score[j] + b : neg_inf();
        }
    }
#pragma unroll
    for (int j = 0; j < kGateSlots; ++j) choice[j] = no_nan(choice[j]);

    if (p.group_lanes != 0) {
        // Every lane's experts lie in one group of group_lanes whole lanes (host-checked).
        const int gl = int(p.group_lanes);
        float a1 = neg_inf(), a2 = neg_inf();
        // Absent slots hold -inf, which changes neither.
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) push_top2(a1, a2, choice[j]);
        for (int off = gl >> 1; off > 0; off >>= 1) {
            const float b1 = __shfl_xor_sync(kFullMask, a1, off);
            const float b2 = __shfl_xor_sync(kFullMask, a2, off);
            merge_top2(a1, a2, b1, b2);
        }
        const float gs = no_nan(p.group_mode == LONGCTX_MOE_GROUP_TOP2_SUM ? a1 + a2 : a1);
        const int my_group = sl / gl;
        uint64_t gkey = (live && my_group < int(p.n_group)) ? rank_key(gs, my_group) : 0;
        bool eligible = false;
        for (int r = 0; r < int(p.topk_group); ++r) {
            const uint64_t best = segment_max(gkey, L);
            if (best != 0 && key_id(best) == my_group) {
                eligible = true;
                gkey = 0;
            }
        }
        if (!eligible) avail = 0;
    }

    // ord[j]: ordered_bits of expert e0 + j's choice while it may be chosen, else 0.
    uint32_t ord[kGateSlots];  // [16]
#pragma unroll
    for (int j = 0; j < kGateSlots; ++j) ord[j] = ((avail >> j) & 1u) ? ordered_bits(choice[j]) : 0u;
    // This lane's segment within the warp's ballot.
    const uint32_t seg_bits = (L == kWarp ? kFullMask : ((1u << L) - 1u)) << seg;

    // Each rank: the best value of the segment (a 32-bit max), then the lowest lane holding
    // it and that lane's lowest slot with it. Lanes hold ascending id ranges and slots
    // ascending ids, so this is the best (choice desc, id asc) expert, ties to the lower id.
    // The owner retires it.
    int my_id = 0;     // lane r of the segment: the rank-r expert
    float my_w = 0.f;  // and its unscaled weight
    float wsum = 0.f;  // sum of the chosen scores, the same on every lane of the segment
    for (int r = 0; r < int(p.top_k); ++r) {
        uint32_t lane_best = 0;
#pragma unroll
        for (int j = 0; j < kGateSlots; ++j) lane_best = max(lane_best, ord[j]);
        const uint32_t best = segment_max(lane_best, L);
        // top_k <= eligible experts (host-checked), so a live segment's best is nonzero.
        const uint32_t holders = __ballot_sync(kFullMask, lane_best == best) & seg_bits;
        const int owner = __ffs(holders) - 1;  // a lane of the warp
        int slot = 0;
        float mine = 0.f;
#pragma unroll
        for (int j = kGateSlots - 1; j >= 0; --j) {
            if (ord[j] == best) {
                slot = j;
                mine = score[j];
            }
        }
        if (lane == owner) {
#pragma unroll
            for (int j = 0; j < kGateSlots; ++j) ord[j] = j == slot ? 0u : ord[j];
        }
        const float w = __shfl_sync(kFullMask, mine, owner);
        const int id = (owner - seg) * S + __shfl_sync(kFullMask, slot, owner);
        wsum += w;
        if (sl == r) {
            my_id = id;
            my_w = w;
        }
    }
    const float s = p.renormalize ? p.routed_scaling_factor / (wsum + kRenormEps) : p.routed_scaling_factor;
    if (live && sl < int(p.top_k)) {
        const int64_t o = token * p.top_k + sl;
        reinterpret_cast<int32_t*>(p.ids)[o] = my_id;
        reinterpret_cast<float*>(p.weights)[o] = my_w * s;
    }
}

// Dynamic shared memory of the block kernel, in bytes (src/moe/plan.rs mirrors it).
__host__ __device__ constexpr uint32_t gate_block_smem_bytes(uint32_t experts, uint32_t n_group) {
    return 4u * (experts + n_group) + experts + n_group;
}

template <typename T>
__device__ __forceinline__ float routing_score(const LongctxMoeGateParams& p, float z, float m, float s) {
    return p.scoring == LONGCTX_MOE_SCORING_SOFTMAX ? expf(z - m) / s : sigmoid(z);
}

// One block per token; the same rule as the warp kernel, with choices in shared memory.
template <typename T>
__device__ void gate_block_body(const LongctxMoeGateParams& p) {
    constexpr int kThreads = kGateBlockThreads;
    LONGCTX_DYNAMIC_SMEM(unsigned char, gate_smem, 16);
    LONGCTX_SHARED_ARRAY(float, red_v, 32);
    LONGCTX_SHARED_ARRAY(int, red_id, 32);

    const int E = int(p.experts);
    const int n_group = (p.group_mode != LONGCTX_MOE_GROUP_NONE && p.n_group > 1) ? int(p.n_group) : 1;
    float* choice = reinterpret_cast<float*>(gate_smem);                  // [E]
    float* gscore = choice + E;                                           // [n_group]
    unsigned char* avail = reinterpret_cast<unsigned char*>(gscore + n_group);  // [E]: 1 = may be chosen
    unsigned char* gavail = avail + E;                                    // [n_group]

    const int tid = threadIdx.x;
    const int64_t token = blockIdx.x;
    const T* row = reinterpret_cast<const T*>(p.logits) + token * E;
    const float* bias = reinterpret_cast<const float*>(p.bias);

    float m = 0.f, s = 1.f;
    if (p.scoring == LONGCTX_MOE_SCORING_SOFTMAX) {
        float lm = neg_inf();
        for (int e = tid; e < E; e += kThreads) lm = fmaxf(lm, DType<T>::to_f32(row[e]));
        m = block_max<kThreads>(lm, red_v);
        float ls = 0.f;
        for (int e = tid; e < E; e += kThreads) ls += expf(DType<T>::to_f32(row[e]) - m);
        s = block_sum<kThreads>(ls, red_v);
    }
    const bool grouped = n_group > 1;
    for (int e = tid; e < E; e += kThreads) {
        const float z = DType<T>::to_f32(row[e]);
        const float c = p.select_on_logits ? z : routing_score<T>(p, z, m, s) + (bias != nullptr ? bias[e] : 0.f);
        choice[e] = no_nan(c);
        avail[e] = grouped ? 0 : 1;
    }
    __syncthreads();

    if (grouped) {
        const int gsize = E / n_group;
        for (int g = tid; g < n_group; g += kThreads) {
            float a1 = neg_inf(), a2 = neg_inf();
            for (int e = g * gsize; e < (g + 1) * gsize; ++e) push_top2(a1, a2, choice[e]);
            gscore[g] = no_nan(p.group_mode == LONGCTX_MOE_GROUP_TOP2_SUM ? a1 + a2 : a1);
            gavail[g] = 1;
        }
        __syncthreads();
        for (int r = 0; r < int(p.topk_group); ++r) {
            float bv = neg_inf();
            int bid = kNoId;
            for (int g = tid; g < n_group; g += kThreads) {
                if (gavail[g] && beats(gscore[g], g, bv, bid)) {
                    bv = gscore[g];
                    bid = g;
                }
            }
            block_argmax<kThreads>(bv, bid, red_v, red_id);
            if (bid == kNoId) break;  // unreachable after host validation; uniform
            if (tid == 0) gavail[bid] = 0;
            for (int e = bid * gsize + tid; e < (bid + 1) * gsize; e += kThreads) avail[e] = 1;
            __syncthreads();
        }
    }

    int32_t* ids = reinterpret_cast<int32_t*>(p.ids) + token * p.top_k;
    float* weights = reinterpret_cast<float*>(p.weights) + token * p.top_k;
    float wsum = 0.f;
    for (int r = 0; r < int(p.top_k); ++r) {
        float bv = neg_inf();
        int bid = kNoId;
        for (int e = tid; e < E; e += kThreads) {
            if (avail[e] && beats(choice[e], e, bv, bid)) {
                bv = choice[e];
                bid = e;
            }
        }
        block_argmax<kThreads>(bv, bid, red_v, red_id);
        if (bid == kNoId) break;  // unreachable after host validation; uniform
        const float w = routing_score<T>(p, DType<T>::to_f32(row[bid]), m, s);
        wsum += w;
        if (tid == 0) {
            avail[bid] = 0;
            ids[r] = bid;
            weights[r] = w;
        }
        __syncthreads();
    }
    const float scale = p.renormalize ? p.routed_scaling_factor / (wsum + kRenormEps) : p.routed_scaling_factor;
    for (int r = tid; r < int(p.top_k); r += kThreads) weights[r] *= scale;
}

}  // namespace moe
}  // namespace longctx
