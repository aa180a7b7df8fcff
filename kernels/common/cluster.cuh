// Thread-block clusters (sm_90+, PTX ISA 7.8): the CTA's rank in its cluster, distributed
// shared memory (a generic pointer into another CTA's shared memory, at the offset a pointer
// into this CTA's has: `mapa`), and the cluster-wide barrier (`barrier.cluster.arrive`,
// release by default, then `barrier.cluster.wait`, acquire by default: every thread of every
// CTA of the cluster; what any of them did before its arrival is visible to all after their
// wait for that phase; a thread must wait before it arrives again).
//   cluster_ctarank()                 this CTA's rank (%cluster_ctarank)
//   cluster_map_shared(p, rank)       p (into this CTA's shared memory) in CTA `rank`'s
//   LONGCTX_CLUSTER_ARRIVE()          arrive at the cluster barrier (does not block)
//   LONGCTX_CLUSTER_WAIT()            wait until every thread has arrived for this phase
//   LONGCTX_CLUSTER_SYNC()            both
// Only code compiled for sm_90+ (or the emulator) may use them; entries that do are guarded
// with LONGCTX_HAS_CLUSTERS.
#pragma once
#include <stdint.h>

#if defined(LONGCTX_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define LONGCTX_HAS_CLUSTERS 1
#else
#define LONGCTX_HAS_CLUSTERS 0
#endif

namespace longctx {

#ifdef LONGCTX_EMU
__device__ __forceinline__ uint32_t cluster_ctarank() { return ::longctx_emu::cluster_ctarank(); }
#define cluster_map_shared(p, rank)                                                                         \
    static_cast<decltype(p)>(::longctx_emu::cluster_map_shared(__FILE__, __LINE__, (p), (rank)))
#define LONGCTX_CLUSTER_ARRIVE() ::longctx_emu::cluster_arrive(__FILE__, __LINE__)
#define LONGCTX_CLUSTER_WAIT() ::longctx_emu::cluster_wait(__FILE__, __LINE__)
#define LONGCTX_CLUSTER_SYNC() ::longctx_emu::cluster_sync(__FILE__, __LINE__)
#elif LONGCTX_HAS_CLUSTERS
__device__ __forceinline__ uint32_t cluster_ctarank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
template <typename T>
__device__ __forceinline__ T* cluster_map_shared(T* p, uint32_t rank) {
    uint64_t out;
    asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(out) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
    return reinterpret_cast<T*>(out);
}
__device__ __forceinline__ void cluster_arrive_hw() { asm volatile("barrier.cluster.arrive.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait_hw() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }
#define LONGCTX_CLUSTER_ARRIVE() ::longctx::cluster_arrive_hw()
#define LONGCTX_CLUSTER_WAIT() ::longctx::cluster_wait_hw()
#define LONGCTX_CLUSTER_SYNC()          \
    do {                                \
        ::longctx::cluster_arrive_hw(); \
        ::longctx::cluster_wait_hw();   \
    } while (0)
#else
// Pre-sm_90 code: declarations for name lookup in templates whose cluster branches are
// discarded; reaching one is a bug, and traps.
__device__ __forceinline__ uint32_t cluster_ctarank() {
    __trap();
    return 0;
}
template <typename T>
__device__ __forceinline__ T* cluster_map_shared(T* p, uint32_t) {
    __trap();
    return p;
}
__device__ __forceinline__ void cluster_arrive_hw() { __trap(); }
__device__ __forceinline__ void cluster_wait_hw() { __trap(); }
#define LONGCTX_CLUSTER_ARRIVE() ::longctx::cluster_arrive_hw()
#define LONGCTX_CLUSTER_WAIT() ::longctx::cluster_wait_hw()
#define LONGCTX_CLUSTER_SYNC() ::longctx::cluster_arrive_hw()
#endif

}  // namespace longctx
