// Permutation of the tokens x top_k assignments into expert order for a grouped GEMM, in
// three launches, deterministic and stable (token order within each expert), no atomics:
//
//  1. count:   assignments are cut into chunks of `chunk` (a multiple of 32), one warp per
//              chunk; the warp walks its chunk 32 at a time and counts each expert in a
//              private shared-memory array (__match_any_sync groups lanes with the same
//              expert; the lowest lane adds the group's size). Out: chunk_counts[c, e].
//  2. scan:    one block. For each expert (a thread, or up to a warp's lanes, each taking
//              a share of the chunks) the exclusive prefix of its counts over chunks, in
//              place: chunk_counts[c, e] becomes the expert-local rank of the chunk's first
//              assignment of e. Totals give routed[e], kept[e] = min(routed[e],
//              capacity) and padded segment lengths; a block scan over experts gives offsets.
//              The same block marks padding slots and the unused tail -1 and writes the
//              expert of every `block`-slot tile.
//  3. scatter: the count walk again; an assignment's expert-local rank is its chunk's base
//              plus the count of earlier same-expert lanes (running counter + popc of the
//              lower lanes of its match group). Rank < capacity: slot = offsets[e] + rank,
//              else dropped (slot -1). Later tokens are the ones dropped.
#pragma once
#include "common/smem.cuh"
#include <stdint.h>

#include "moe/reduce.cuh"
#include "moe/traits.cuh"
#include "params/moe_params.h"

namespace longctx {
namespace moe {

// Steps of 32 assignments whose ids are loaded together, and chunk counts the scan loads
// together: enough independent loads in flight to hide global memory latency.
constexpr int kWalkBatch = 8;
constexpr int kScanBatch = 8;

// Walks chunk `c` of the assignments 32 at a time. For each valid lane calls
// f(assignment, expert, rank among this chunk's earlier same-expert assignments).
// `run` is the warp's private [experts] counter array, initialised by the caller; on return
// it holds initial + this chunk's count per expert.
template <typename F>
__device__ __forceinline__ void walk_chunk(const LongctxMoePermuteParams& p, int c, int* run, F&& f) {
    const int lane = threadIdx.x & 31;
    const int32_t* ids = reinterpret_cast<const int32_t*>(p.ids);
    const int64_t begin = int64_t(c) * p.chunk;
    const int64_t stop = begin + int64_t(p.chunk);
    const int64_t end = stop < int64_t(p.assignments) ? stop : int64_t(p.assignments);
    const unsigned lower = (1u << lane) - 1u;
    // kWalkBatch steps' ids are loaded up front so their latencies overlap.
    for (int64_t batch = begin; batch < end; batch += kWalkBatch * kWarp) {
        int ev[kWalkBatch];  // [steps]: this lane's expert id in each step, -1 past the end
#pragma unroll
        for (int i = 0; i < kWalkBatch; ++i) {
            const int64_t a = batch + i * kWarp + lane;
            ev[i] = a < end ? ids[a] : -1;
        }
#pragma unroll
        for (int i = 0; i < kWalkBatch; ++i) {
            const int64_t step = batch + i * kWarp;
            if (step >= end) break;  // uniform over the warp
            const int64_t a = step + lane;
            const bool valid = a < end;
            const int e = ev[i];
            const unsigned peers = __match_any_sync(kFullMask, e);
            const int leader = __ffs(peers) - 1;
            const int before = valid ? run[e] : 0;
            __syncwarp();
            if (valid) {
                f(a, e, before + __popc(peers & lower));
                if (lane == leader) run[e] = before + __popc(peers);
            }
            __syncwarp();
        }
    }
}

__device__ void count_body(const LongctxMoePermuteParams& p) {
    LONGCTX_DYNAMIC_SMEM(int, perm_smem, 16);  // [warps, experts]
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int E = int(p.experts);
    const int c = int(blockIdx.x) * int(p.warps) + warp;
    if (c >= int(p.chunks)) return;  // whole warps leave together; no block barrier below
    int* run = perm_smem + warp * E;
    for (int e = lane; e < E; e += kWarp) run[e] = 0;
    __syncwarp();
    walk_chunk(p, c, run, [](int64_t, int, int) {});
    int32_t* out = reinterpret_cast<int32_t*>(p.chunk_counts) + int64_t(c) * E;
    for (int e = lane; e < E; e += kWarp) out[e] = run[e];
}

// Rewrites chunk_counts[c, e] for chunks c in [c_begin, c_end) with the exclusive running
// sum starting at `rank` (kScanBatch independent loads per round trip) and returns the
// rank after the last chunk.
__device__ __forceinline__ int rank_chunks(int32_t* cc, int E, int e, int c_begin, int c_end, int rank) {
    for (int c = c_begin; c < c_end; c += kScanBatch) {
        int v[kScanBatch];  // [batch]: counts of chunks c .. c + kScanBatch - 1
#pragma unroll
        for (int i = 0; i < kScanBatch; ++i) v[i] = c + i < c_end ? cc[int64_t(c + i) * E + e] : 0;
#pragma unroll
        for (int i = 0; i < kScanBatch; ++i) {
            if (c + i < c_end) cc[int64_t(c + i) * E + e] = rank;
            rank += v[i];
        }
    }
    return rank;
}

// Threads the scan gives each expert: a power of two up to a warp, as many as the block
// has to spare (4 for 256 experts, 32 for 32 or fewer); 1 when experts > kScanThreads / 2.
__device__ __forceinline__ int scan_threads_per_expert(int experts) {
    int tpe = 1;
    while (tpe < kWarp && 2 * tpe * experts <= kScanThreads) tpe *= 2;
    return tpe;
}

__device__ void scan_body(const LongctxMoePermuteParams& p) {
    constexpr int kThreads = kScanThreads;
    LONGCTX_SHARED_ARRAY(int, scratch, 32);
    const int E = int(p.experts);
    const int B = int(p.block);
    const int C = int(p.chunks);
    int32_t* cc = reinterpret_cast<int32_t*>(p.chunk_counts);
    int32_t* routed = reinterpret_cast<int32_t*>(p.routed_counts);
    int32_t* kept = reinterpret_cast<int32_t*>(p.counts);
    int32_t* offsets = reinterpret_cast<int32_t*>(p.offsets);
    int32_t* slot_assignment = reinterpret_cast<int32_t*>(p.slot_assignment);
    int32_t* block_expert = reinterpret_cast<int32_t*>(p.block_expert);

    const int tpe = scan_threads_per_expert(E);
    int my_padded = 0;
    int my_dropped = 0;
    int total = 0;
    if (tpe == 1) {
        // Experts [per * tid, per * tid + per) belong to this thread, so the block scan over
        // threads is a scan over experts in order.
        const int per = (E + kThreads - 1) / kThreads;
        const int e0 = min(E, per * int(threadIdx.x));
        const int e1 = min(E, e0 + per);
        for (int e = e0; e < e1; ++e) {
            const int run = rank_chunks(cc, E, e, 0, C, 0);
            const int k = uint32_t(run) < p.capacity ? run : int(p.capacity);
            routed[e] = run;
            kept[e] = k;
            my_dropped += run - k;
            my_padded += (k + B - 1) / B * B;
        }
        int start = block_exclusive_scan<kThreads>(my_padded, total, scratch);
        for (int e = e0; e < e1; ++e) {
            const int len = (kept[e] + B - 1) / B * B;
            offsets[e] = start;
            for (int s = start + kept[e]; s < start + len; ++s) slot_assignment[s] = -1;
            for (int b = start / B; b < (start + len) / B; ++b) block_expert[b] = e;
            start += len;
        }
    } else {
        // tpe consecutive lanes of one warp per expert (tpe divides 32): lane part q scans
        // chunks [c0, c1), the parts' sums are prefixed with shuffles, and each part writes
        // its chunks' expert-local ranks. Every thread runs every shuffle (idle threads, past
        // the last expert, with zeros), so control flow stays warp-uniform around them.
        const int q = int(threadIdx.x) % tpe;
        const int e = int(threadIdx.x) / tpe;
        const bool has = e < E;
        const int cpp = (C + tpe - 1) / tpe;
        const int c0 = min(C, q * cpp);
        const int c1 = min(C, c0 + cpp);
        int local = 0;
        if (has) {
            for (int c = c0; c < c1; c += kScanBatch) {
                int v[kScanBatch];  // [batch]: counts of chunks c .. c + kScanBatch - 1
#pragma unroll
                for (int i = 0; i < kScanBatch; ++i) v[i] = c + i < c1 ? cc[int64_t(c + i) * E + e] : 0;
#pragma unroll
                for (int i = 0; i < kScanBatch; ++i) local += v[i];
            }
        }
        int incl = local;
        for (int off = 1; off < tpe; off <<= 1) {
            const int o = __shfl_up_sync(kFullMask, incl, off, tpe);
            if (q >= off) incl += o;
        }
        const int run = __shfl_sync(kFullMask, incl, tpe - 1, tpe);  // the expert's total
        // incl - local: the rank of the first assignment of e in chunk c0.
        if (has) rank_chunks(cc, E, e, c0, c1, incl - local);
        const int k = uint32_t(run) < p.capacity ? run : int(p.capacity);
        const int len = (k + B - 1) / B * B;
        if (has && q == 0) {
            routed[e] = run;
            kept[e] = k;
            my_dropped = run - k;
            my_padded = len;
        }
        // Only part 0 contributes, so a thread's prefix is its expert's offset.
        const int start = __shfl_sync(kFullMask, block_exclusive_scan<kThreads>(my_padded, total, scratch), 0, tpe);
        if (has) {
            if (q == 0) offsets[e] = start;
            for (int s = start + k + q; s < start + len; s += tpe) slot_assignment[s] = -1;
            for (int b = start / B + q; b < (start + len) / B; b += tpe) block_expert[b] = e;
        }
    }
    if (threadIdx.x == 0) offsets[E] = total;
    for (int s = total + int(threadIdx.x); s < int(p.max_slots); s += kThreads) slot_assignment[s] = -1;
    for (int b = total / B + int(threadIdx.x); b < int(p.max_blocks); b += kThreads) block_expert[b] = -1;
    const int dropped = block_sum<kThreads>(my_dropped, scratch);
    if (threadIdx.x == 0) reinterpret_cast<int32_t*>(p.dropped)[0] = dropped;
}

__device__ void scatter_body(const LongctxMoePermuteParams& p) {
    LONGCTX_DYNAMIC_SMEM(int, perm_smem, 16);  // [warps, experts]
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int E = int(p.experts);
    const int c = int(blockIdx.x) * int(p.warps) + warp;
    if (c >= int(p.chunks)) return;
    int* run = perm_smem + warp * E;
    const int32_t* base = reinterpret_cast<const int32_t*>(p.chunk_counts) + int64_t(c) * E;
    for (int e = lane; e < E; e += kWarp) run[e] = base[e];
    __syncwarp();
    const int32_t* offsets = reinterpret_cast<const int32_t*>(p.offsets);
    int32_t* slot_of = reinterpret_cast<int32_t*>(p.slot_of);
    int32_t* slot_assignment = reinterpret_cast<int32_t*>(p.slot_assignment);
    const uint32_t cap = p.capacity;
    walk_chunk(p, c, run, [&](int64_t a, int e, int rank) {
        if (uint32_t(rank) < cap) {
            const int slot = offsets[e] + rank;
            slot_of[a] = slot;
            slot_assignment[slot] = int32_t(a);
        } else {
            slot_of[a] = -1;
        }
    });
}

}  // namespace moe
}  // namespace longctx
