// Kernels that exercise the CPU emulator itself (compiled only into emulator builds): the
// mma.sync and ldmatrix forms against naive products, and small programs that are correct
// (mode 0) or carry one deliberate bug each, which the emulator must report. They use the
// same common/ wrappers as the crate's kernels. src/emulator/selftest.rs drives them.
#include <stdint.h>

#include "common/cluster.cuh"
#include "common/cp_async.cuh"
#include "common/mma.cuh"
#include "common/smem.cuh"

typedef struct LongctxEmuSelftestParams {
    uint64_t in;   // const words
    uint64_t out;  // words
    int32_t n;     // words of `in` and `out`
    int32_t mode;  // which program (kernel-specific)
} LongctxEmuSelftestParams;

using namespace longctx;

// One warp. in: A [16][16] then B [16 (k)][8 (n)] as f16 or bf16 bits (mode 0 or 1), row
// major; out: C [16][8] f32 on entry, D = A B + C on exit. A by ldmatrix.x4, B by
// ldmatrix.x2.trans, both from shared memory, then one mma.
template <typename T>
__device__ void mma_test(const LongctxEmuSelftestParams& p) {
    LONGCTX_SHARED_ARRAY(uint16_t, sA, 256);
    LONGCTX_SHARED_ARRAY(uint16_t, sB, 128);
    const int lane = threadIdx.x;
    const uint16_t* in = reinterpret_cast<const uint16_t*>(p.in);
    float* out = reinterpret_cast<float*>(p.out);
    for (int i = lane; i < 256; i += 32) sA[i] = in[i];
    for (int i = lane; i < 128; i += 32) sB[i] = in[256 + i];
    __syncwarp();
    // Matrix i = lane / 8 of A: rows 8 (i % 2) .. +8, columns 8 (i / 2) .. +8.
    const int i = lane / 8, r = lane % 8;
    uint32_t a[4];
    ldmatrix_x4(a, smem_addr_of(&sA[(8 * (i % 2) + r) * 16 + 8 * (i / 2)]));
    uint32_t b[2];
    ldmatrix_x2_trans(b, smem_addr_of(&sB[(lane % 16) * 8]));
    const int g = lane / 4, t = lane % 4;
    float d[4] = {out[g * 8 + 2 * t], out[g * 8 + 2 * t + 1], out[(g + 8) * 8 + 2 * t], out[(g + 8) * 8 + 2 * t + 1]};
    mma_16816<T>(d, a, b[0], b[1]);
    out[g * 8 + 2 * t] = d[0];
    out[g * 8 + 2 * t + 1] = d[1];
    out[(g + 8) * 8 + 2 * t] = d[2];
    out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

extern "C" __global__ void longctx_emu_selftest_mma(const __grid_constant__ LongctxEmuSelftestParams p) {
    if (p.mode == 0) {
        mma_test<__half>(p);
    } else {
        mma_test<__nv_bfloat16>(p);
    }
}

// One warp. in: four 8x8 b16 matrices, matrix i row r at word offset (8 i + r) * 4. mode:
// matrices (1, 2 or 4) plus 8 for .trans. out[lane * 4 + j] = register j of the lane.
extern "C" __global__ void longctx_emu_selftest_ldmatrix(const __grid_constant__ LongctxEmuSelftestParams p) {
    LONGCTX_SHARED_ARRAY(uint32_t, s, 128);
    const int lane = threadIdx.x;
    const uint32_t* in = reinterpret_cast<const uint32_t*>(p.in);
    uint32_t* out = reinterpret_cast<uint32_t*>(p.out);
    for (int i = lane; i < 128; i += 32) s[i] = in[i];
    __syncwarp();
    const uint32_t addr = smem_addr_of(&s[lane * 4]);  // matrix lane / 8, row lane % 8
    uint32_t r[4] = {0, 0, 0, 0};
    const bool trans = (p.mode & 8) != 0;
    switch (p.mode & 7) {
        case 1: {
            uint32_t x[1];
            if (trans) ldmatrix_x1_trans(x, addr); else ldmatrix_x1(x, addr);
            r[0] = x[0];
            break;
        }
        case 2: {
            uint32_t x[2];
            if (trans) ldmatrix_x2_trans(x, addr); else ldmatrix_x2(x, addr);
            r[0] = x[0];
            r[1] = x[1];
            break;
        }
        default: {
            uint32_t x[4];
            if (trans) ldmatrix_x4_trans(x, addr); else ldmatrix_x4(x, addr);
            for (int j = 0; j < 4; ++j) r[j] = x[j];
        }
    }
    for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

// 64 threads (two warps), 1024 bytes of dynamic shared memory as s[256] words, n >= 256.
// Mode 0 is correct; every other mode is one deliberate bug (see src/emulator/selftest.rs).
extern "C" __global__ void longctx_emu_selftest_bugs(const __grid_constant__ LongctxEmuSelftestParams p) {
    LONGCTX_DYNAMIC_SMEM(uint32_t, s, 16);
    const int t = threadIdx.x;
    const int lane = t & 31;
    const uint32_t* in = reinterpret_cast<const uint32_t*>(p.in);
    uint32_t* out = reinterpret_cast<uint32_t*>(p.out);
    switch (p.mode) {
        case 0: {
            // cp.async of s[4t .. 4t+4), waited; a barrier; values crossing warps, a
            // shuffle, a ballot, and a per-warp exchange behind __syncwarp.
            cp_async_16(smem_addr_of(&s[4 * t]), &in[4 * t], true);
            cp_async_commit();
            cp_async_wait<0>();
            __syncthreads();
            uint32_t v = s[(4 * t + 128) % 256];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            const uint32_t odd = __ballot_sync(0xffffffffu, v & 1u);
            __syncthreads();
            s[t] = v;
            __syncwarp();
            const uint32_t w = s[(t & ~31) | ((lane + 1) & 31)];
            out[t] = w + odd;
            break;
        }
        case 1: {  // missing __syncthreads between warps
            s[t] = in[t];
            const uint32_t x = __shfl_xor_sync(0xffffffffu, s[t], 1);
            out[t] = s[(t + 32) % 64] + x;
            break;
        }
        case 2: {  // missing __syncwarp within a warp
            s[t] = in[t];
            out[t] = s[t == 0 ? 0 : t - 1];
            break;
        }
        case 3: {  // off-by-one loop bound
            for (int i = t; i <= p.n; i += 64) out[i] = in[i];
            break;
        }
        case 4: {  // wrong swizzle: rows of 8 chunks XORed with a 4-bit row value
            const int r = t / 8, c = t % 8;
            const int off = r * 32 + ((c ^ ((r * 3) & 15)) * 4);
            s[off] = in[t];
            __syncthreads();
            out[t] = s[r * 32 + ((c ^ ((r * 3) & 15)) * 4)];
            break;
        }
        case 5: {  // reads a cp.async destination before waiting for it
            cp_async_16(smem_addr_of(&s[4 * t]), &in[4 * t], true);
            cp_async_commit();
            __syncthreads();
            out[t] = s[4 * t];
            cp_async_wait<0>();
            break;
        }
        case 6: {  // store past the end of the output
            out[p.n + t] = 1u;
            break;
        }
        case 7: {  // half the warp skips a shuffle the mask says it joins
            uint32_t v = in[t];
            if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
            out[t] = v;
            break;
        }
        case 8: {  // a barrier only the first warp reaches
            if (t < 32) __syncthreads();
            out[t] = in[t];
            break;
        }
        case 9: {  // writes its input
            const_cast<uint32_t*>(in)[t] = 0u;
            break;
        }
        case 10: {  // shuffles from a lane outside the mask
            if (lane < 16) out[t] = __shfl_sync(0x0000ffffu, in[t], 20);
            break;
        }
        case 11: {  // traps
            if (t == 5) __trap();
            __syncthreads();
            break;
        }
        case 12: {  // reads shared memory nobody wrote
            out[t] = s[t];
            break;
        }
        case 13: {  // two different barriers
            if (t < 32) {
                __syncthreads();
            } else {
                __syncthreads();
            }
            out[t] = in[t];
            break;
        }
        case 14: {  // shared access past the dynamic allocation
            s[256 + t] = in[t];
            break;
        }
        default:
            __trap();
    }
}

// A cluster of two CTAs of 64 threads (grid (2, 1, 1), cluster (2, 1, 1)), 1024 bytes of
// dynamic shared memory as s[256] words; in and out 256 words. Mode 0 is correct: each CTA
// pushes its 64 input words into the other's s[64 ..), arrives at the cluster barrier, works
// on its own words, waits, reads the pushed words back, pulls the other's s[0 ..) and passes
// a last cluster barrier before leaving: out[64 r + t] = in[64 (r ^ 1) + t] and
// out[128 + 64 r + t] = in[64 (r ^ 1) + t] for rank r.
// Every other mode is one deliberate bug (see src/emulator/selftest.rs).
extern "C" __global__ void longctx_emu_selftest_cluster(const __grid_constant__ LongctxEmuSelftestParams p) {
    LONGCTX_DYNAMIC_SMEM(uint32_t, s, 16);
    const int t = threadIdx.x;
    const uint32_t r = cluster_ctarank();
    const uint32_t* in = reinterpret_cast<const uint32_t*>(p.in);
    uint32_t* out = reinterpret_cast<uint32_t*>(p.out);
    uint32_t* peer = cluster_map_shared(s, r ^ 1u);
    switch (p.mode) {
        case 0: {
            s[t] = in[64 * r + t];
            peer[64 + t] = in[64 * r + t];
            LONGCTX_CLUSTER_ARRIVE();
            s[128 + t] = s[t] + 1u;  // between arrival and wait: this thread's own words
            LONGCTX_CLUSTER_WAIT();
            if (s[128 + t] != in[64 * r + t] + 1u) __trap();
            out[64 * r + t] = s[64 + t];
            out[128 + 64 * r + t] = peer[t];
            LONGCTX_CLUSTER_SYNC();  // the other CTA reads this one's s until here
            break;
        }
        case 1: {  // reads what the other CTA pushed with only a CTA barrier between
            peer[64 + t] = in[64 * r + t];
            __syncthreads();
            out[64 * r + t] = s[64 + t];
            LONGCTX_CLUSTER_SYNC();
            break;
        }
        case 2: {  // overwrites the other CTA's buffer while it may still read it
            s[64 + t] = in[t];
            LONGCTX_CLUSTER_SYNC();
            out[64 * r + t] = s[64 + t];
            peer[64 + t] = in[64 + t];
            LONGCTX_CLUSTER_SYNC();
            break;
        }
        case 3: {  // maps to a rank outside the cluster
            uint32_t* far = cluster_map_shared(s, 2u);
            far[t] = in[t];
            break;
        }
        case 4: {  // rank 0 leaves while rank 1 still reads its shared memory
            s[t] = in[t];
            if (r == 1) {
                __syncthreads();
                out[64 + t] = peer[t];
            }
            break;
        }
        case 5: {  // only rank 0 reaches the cluster barrier
            s[t] = in[t];
            if (r == 0) LONGCTX_CLUSTER_SYNC();
            out[64 * r + t] = s[t];
            break;
        }
        case 6: {  // pushes after arriving: the wait for that phase does not cover the push
            LONGCTX_CLUSTER_ARRIVE();
            peer[64 + t] = in[64 * r + t];
            LONGCTX_CLUSTER_WAIT();
            out[64 * r + t] = s[64 + t];
            LONGCTX_CLUSTER_SYNC();
            break;
        }
        case 7: {  // arrives twice without waiting
            LONGCTX_CLUSTER_ARRIVE();
            LONGCTX_CLUSTER_ARRIVE();
            LONGCTX_CLUSTER_WAIT();
            break;
        }
        default:
            __trap();
    }
}
