// Router training statistics and gradients.
//
// Notation per token t (logits z[0..E), chosen ids i_0..i_{k-1} with upstream gradients g_j of
// their weights, routed counts c[e] over the batch, T tokens):
//   p[e]   routing probability: softmax(z)[e], or sigmoid(z[e])
//   q[e]   balance probability: softmax(z)[e], or sigmoid(z[e]) / sum_e' sigmoid(z[e'])
//   lse    logsumexp(z)
// Forward losses (the loss kernel):
//   aux = alpha * E * sum_e f[e] P[e],  f[e] = c[e] / (T k),  P[e] = mean_t q[e]
//   zl  = beta * mean_t lse^2
// Backward (one warp per token, experts strided over lanes, any E):
//   weights w_j = c_s p[i_j] / D with D = sum_j p[i_j] + 1e-20 when renormalised (else w_j =
//   c_s p[i_j]), so dp[i_j] = (c_s / D) (g_j - G / D), G = sum_j g_j p[i_j]  (or c_s g_j).
//   softmax: dz[e] = p[e] (dp[e] - S), S = sum_j dp[i_j] p[i_j], dp = 0 off the chosen set;
//   sigmoid: dz[e] = dp[e] p[e] (1 - p[e]).
//   + aux:   alpha E / (T^2 k) * (softmax) p[e] (c[e] - sum c q)
//                               (sigmoid) p[e] (1 - p[e]) (c[e] - sum c q) / sum sigmoid
//   + z:     (2 beta / T) lse softmax(z)[e]
// Counts are constants (selection is not differentiable); the bias gets no gradient.
#pragma once
#include "common/smem.cuh"
#include <math.h>
#include <stdint.h>

#include "common/dtype.cuh"
#include "moe/gate_kernel.cuh"
#include "moe/reduce.cuh"
#include "moe/traits.cuh"
#include "params/moe_params.h"

namespace longctx {
namespace moe {

template <typename T>
__device__ void gate_bwd_body(const LongctxMoeGateBwdParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t token = int64_t(blockIdx.x) * kBwdWarps + (threadIdx.x >> 5);
    if (token >= p.tokens) return;  // whole warps leave together
    const int E = int(p.experts);
    const int K = int(p.top_k);
    const T* row = reinterpret_cast<const T*>(p.logits) + token * E;
    const int32_t* ids = reinterpret_cast<const int32_t*>(p.ids) + token * K;
    const float* dw = reinterpret_cast<const float*>(p.d_weights);
    const int32_t* counts = reinterpret_cast<const int32_t*>(p.counts);
    float* out = reinterpret_cast<float*>(p.d_logits) + token * E;
    const bool softmax = p.scoring == LONGCTX_MOE_SCORING_SOFTMAX;

    // Row statistics: max, sum of exp(z - max), sum of sigmoids.
    float m = neg_inf();
    for (int e = lane; e < E; e += kWarp) m = fmaxf(m, DType<T>::to_f32(row[e]));
    m = warp_max(m);
    float se = 0.f, ss = 0.f;
    for (int e = lane; e < E; e += kWarp) {
        const float z = DType<T>::to_f32(row[e]);
        se += expf(z - m);
        ss += sigmoid(z);
    }
    se = warp_sum(se);
    ss = warp_sum(ss);
    const float lse = m + logf(se);
    auto prob = [&](float z) { return softmax ? expf(z - m) / se : sigmoid(z); };
    auto balance = [&](float z) { return softmax ? expf(z - m) / se : sigmoid(z) / ss; };

    // Gating term: D, G, then S.
    float D = 0.f, G = 0.f;
    if (dw != nullptr) {
        for (int j = lane; j < K; j += kWarp) {
            const float pj = prob(DType<T>::to_f32(row[ids[j]]));
            D += pj;
            G += dw[token * K + j] * pj;
        }
        D = warp_sum(D) + kRenormEps;
        G = warp_sum(G);
    }
    const float cs = p.routed_scaling_factor;
    auto dprob = [&](int j) {
        const float g = dw[token * K + j];
        return p.renormalize ? (cs / D) * (g - G / D) : cs * g;
    };
    float S = 0.f;
    if (dw != nullptr && softmax) {
        for (int j = lane; j < K; j += kWarp) S += dprob(j) * prob(DType<T>::to_f32(row[ids[j]]));
        S = warp_sum(S);
    }
    // Load-balancing term: sum_e c[e] q[e].
    float A = 0.f;
    if (counts != nullptr) {
        for (int e = lane; e < E; e += kWarp) A += float(counts[e]) * balance(DType<T>::to_f32(row[e]));
        A = warp_sum(A);
    }

    for (int e = lane; e < E; e += kWarp) {
        const float z = DType<T>::to_f32(row[e]);
        const float pe = prob(z);
        float dz = 0.f;
        if (dw != nullptr) {
            float dpe = 0.f;
            for (int j = 0; j < K; ++j) {
                if (ids[j] == e) {
                    dpe = dprob(j);
                    break;
                }
            }
            dz = softmax ? pe * (dpe - S) : dpe * pe * (1.f - pe);
        }
        if (counts != nullptr) {
            const float d = float(counts[e]) - A;
            dz += p.aux_grad_scale * (softmax ? pe * d : pe * (1.f - pe) * d / ss);
        }
        if (p.z_grad_scale != 0.f) dz += p.z_grad_scale * lse * expf(z - lse);
        out[e] = dz;
    }
}

// One block per chunk of tokens: per-token max / sum-exp / sum-sigmoid into shared memory
// (a warp per token), then a thread per expert sums its balance probability over the chunk's
// tokens in token order.
template <typename T>
__device__ void stats_body(const LongctxMoeStatsParams& p) {
    constexpr int kThreads = kStatsThreads;
    LONGCTX_SHARED_ARRAY(float, t_max, kStatsMaxChunkTokens);  // [chunk_tokens]
    LONGCTX_SHARED_ARRAY(float, t_inv, kStatsMaxChunkTokens);  // [chunk_tokens]: 1 / (sum exp(z - max) or sum sigmoid)
    LONGCTX_SHARED_ARRAY(float, t_lse2, kStatsMaxChunkTokens); // [chunk_tokens]
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int E = int(p.experts);
    const int64_t t0 = int64_t(blockIdx.x) * p.chunk_tokens;
    const int64_t left = int64_t(p.tokens) - t0;
    const int n = int(left < int64_t(p.chunk_tokens) ? left : int64_t(p.chunk_tokens));
    const T* logits = reinterpret_cast<const T*>(p.logits);
    const bool softmax = p.scoring == LONGCTX_MOE_SCORING_SOFTMAX;

    for (int i = warp; i < n; i += kThreads / kWarp) {
        const T* row = logits + (t0 + i) * E;
        float m = neg_inf();
        for (int e = lane; e < E; e += kWarp) m = fmaxf(m, DType<T>::to_f32(row[e]));
        m = warp_max(m);
        float se = 0.f, ss = 0.f;
        for (int e = lane; e < E; e += kWarp) {
            const float z = DType<T>::to_f32(row[e]);
            se += expf(z - m);
            ss += sigmoid(z);
        }
        se = warp_sum(se);
        ss = warp_sum(ss);
        if (lane == 0) {
            const float lse = m + logf(se);
            t_max[i] = m;
            t_inv[i] = 1.f / (softmax ? se : ss);
            t_lse2[i] = lse * lse;
        }
    }
    __syncthreads();
    float* partial = reinterpret_cast<float*>(p.partial_probs) + int64_t(blockIdx.x) * E;
    for (int e = threadIdx.x; e < E; e += kThreads) {
        float acc = 0.f;
        for (int i = 0; i < n; ++i) {
            const float z = DType<T>::to_f32(logits[(t0 + i) * E + e]);
            acc += (softmax ? expf(z - t_max[i]) : sigmoid(z)) * t_inv[i];
        }
        partial[e] = acc;
    }
    if (threadIdx.x == 0) {
        float acc = 0.f;
        for (int i = 0; i < n; ++i) acc += t_lse2[i];
        reinterpret_cast<float*>(p.partial_lse2)[blockIdx.x] = acc;
    }
}

// A single block: P[e] = sum over chunks / T (chunk order), then the two losses.
__device__ void loss_body(const LongctxMoeLossParams& p) {
    constexpr int kThreads = kLossThreads;
    LONGCTX_SHARED_ARRAY(double, scratch, 32);
    const int E = int(p.experts);
    const float* partial = reinterpret_cast<const float*>(p.partial_probs);
    const int32_t* counts = reinterpret_cast<const int32_t*>(p.counts);
    float* mean_probs = reinterpret_cast<float*>(p.mean_probs);
    const double inv_t = 1.0 / double(p.tokens);
    double fp = 0.0;  // this thread's part of sum_e c[e] P[e]
    for (int e = threadIdx.x; e < E; e += kThreads) {
        double acc = 0.0;
        for (uint32_t c = 0; c < p.chunks; ++c) acc += double(partial[int64_t(c) * E + e]);
        const double P = acc * inv_t;
        mean_probs[e] = float(P);
        fp += double(counts[e]) * P;
    }
    fp = block_sum<kThreads>(fp, scratch);
    double l2 = 0.0;
    const float* lse2 = reinterpret_cast<const float*>(p.partial_lse2);
    for (uint32_t c = threadIdx.x; c < p.chunks; c += kThreads) l2 += double(lse2[c]);
    l2 = block_sum<kThreads>(l2, scratch);
    if (threadIdx.x == 0) {
        float* losses = reinterpret_cast<float*>(p.losses);
        const double f_norm = 1.0 / (double(p.tokens) * double(p.top_k));
        losses[0] = float(double(p.aux_coef) * double(E) * fp * f_norm);
        losses[1] = float(double(p.z_coef) * l2 * inv_t);
    }
}

// DeepSeek's auxiliary-loss-free balancing step: bias[e] += gamma * sign(mean load - load[e]),
// with the sign taken exactly in integers: mean - load[e] has the sign of total - E load[e].
__device__ void bias_update_body(const LongctxMoeBiasParams& p) {
    constexpr int kThreads = kBiasThreads;
    LONGCTX_SHARED_ARRAY(long long, scratch, 32);
    const int E = int(p.experts);
    const int32_t* counts = reinterpret_cast<const int32_t*>(p.counts);
    long long part = 0;
    for (int e = threadIdx.x; e < E; e += kThreads) part += counts[e];
    const long long total = block_sum<kThreads>(part, scratch);
    float* bias = reinterpret_cast<float*>(p.bias);
    for (int e = threadIdx.x; e < E; e += kThreads) {
        const long long d = total - (long long)E * counts[e];
        const float sign = d > 0 ? 1.f : (d < 0 ? -1.f : 0.f);
        bias[e] += p.gamma * sign;
    }
}

}  // namespace moe
}  // namespace longctx
