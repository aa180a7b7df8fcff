// Interface between kernel code compiled for the CPU emulator (through cuda_emu.h) and the
// emulator runtime (runtime.cpp). Nothing here is seen by nvcc builds.
//
// A launch runs its CTAs one after another on the calling OS thread (the CTAs of one
// thread-block cluster together); every CUDA thread is a fiber with its own stack. Fibers
// switch only at synchronisation points (barriers, cluster barriers, warp collectives,
// cp.async waits), in thread order, so a run is deterministic.
// Every load and store of the kernel code is reported to the runtime by the compiler's
// thread-sanitizer instrumentation (the runtime supplies the __tsan_* hooks), which is how
// the shared-memory race, initialisation and bounds checks and the global bounds checks see
// plain C++ memory accesses.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace longctx_emu {

struct Dim3 {
    unsigned x, y, z;
};

Dim3 thread_idx();
Dim3 block_idx();
Dim3 block_dim();
Dim3 grid_dim();

// Synchronisation. `file` and `line` name the call site: a barrier or warp collective is
// the same instruction for two threads only when the site is the same.
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);

enum ShflMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
uint64_t shfl_raw(const char* file, int line, int mode, unsigned mask, uint64_t value, int bytes, int c,
                  int width);
enum VoteMode : int { kVoteBallot = 0, kVoteAny = 1, kVoteAll = 2, kVoteMatchAny = 3 };
unsigned vote(const char* file, int line, int mode, unsigned mask, bool pred);
// __match_any_sync: the lanes of `mask` holding the same `value`.
unsigned match_any(const char* file, int line, unsigned mask, uint64_t value);
unsigned activemask();

[[noreturn]] void trap(const char* file, int line);

// Thread-block clusters: the CTA's rank, the cluster's size, a pointer into CTA `rank`'s
// shared memory at the offset `p` has in the caller's (mapa), and the cluster barrier
// (barrier.cluster.arrive and barrier.cluster.wait, by every thread of the cluster; a
// thread arrives once, then waits once, and so on; cluster_sync is both).
uint32_t cluster_ctarank();
uint32_t cluster_nctarank();
void* cluster_map_shared(const char* file, int line, const void* p, uint32_t rank);
void cluster_arrive(const char* file, int line);
void cluster_wait(const char* file, int line);
void cluster_sync(const char* file, int line);

// Shared memory. Addresses in the shared window are byte offsets into the CTA's arena.
uint32_t smem_addr(const void* p);
void* dynamic_smem(size_t align);
uint32_t dynamic_smem_size();
void* static_smem(const void* key, size_t bytes, size_t align, const char* file, int line);

// cp.async (16 bytes, .cg): see common/cp_async.cuh.
void cp_async_16(const char* file, int line, uint32_t dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// Tensor-core and ldmatrix (warp collectives): see common/mma.cuh.
enum MmaKind : int { kMmaF16 = 0, kMmaBf16 = 1 };
void mma_16816(const char* file, int line, int kind, float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
void ldmatrix(const char* file, int line, int count, bool trans, uint32_t* r, uint32_t addr);

// MUFU approximations (ftz).
float ex2_approx_ftz(float x);
float rcp_approx_ftz(float x);

// Atomics on global or shared memory: read-modify-write as one step.
float atomic_add_f32(float* p, float v);
int atomic_add_i32(int* p, int v);
unsigned atomic_add_u32(unsigned* p, unsigned v);
int atomic_max_i32(int* p, int v);
int atomic_cas_i32(int* p, int cmp, int v);

}  // namespace longctx_emu

extern "C" {

// One buffer a launch may touch (host memory standing in for device memory).
typedef struct LongctxEmuBuffer {
    uint64_t base;
    uint64_t bytes;
    uint32_t writable;
    uint32_t pad;
    const char* name;
} LongctxEmuBuffer;

// One launch: `tramp(entry, params)` is what every CUDA thread runs.
typedef struct LongctxEmuLaunch {
    const char* kernel;
    void (*tramp)(const void* entry, const void* params);
    const void* entry;
    const void* params;
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t cluster[3];  // CTAs per cluster in each dimension (1, 1, 1 without clusters)
    uint32_t dyn_smem;
    const LongctxEmuBuffer* buffers;
    uint64_t n_buffers;
} LongctxEmuLaunch;

// Runs the launch to completion. Returns 0, or 1 with a message (kernel, block, thread,
// what went wrong) in `err`, NUL-terminated and truncated to `err_len`.
int longctx_emu_launch(const LongctxEmuLaunch* launch, char* err, uint64_t err_len);
}
