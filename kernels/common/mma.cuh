// Tensor-core helpers of the sm80 instruction set: mma.sync m16n8k16 with f32 accumulation,
// ldmatrix to fill its operand fragments from shared memory, and packing two f32 into one
// 32-bit register of f16/bf16 pairs.
//
// Fragments of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), per lane,
// with g = lane / 4 (the group) and t = lane % 4 (the thread within the group). A register
// of f16/bf16 holds two elements, the lower column (or row, for B) in the low 16 bits.
//   A (16 x 16, row-major), 4 registers:
//     a0 = A[g    ][2t, 2t+1]     a1 = A[g + 8][2t, 2t+1]
//     a2 = A[g    ][2t+8, 2t+9]   a3 = A[g + 8][2t+8, 2t+9]
//   B (16 x 8, "col": element pairs run along k), 2 registers:
//     b0 = B[2t, 2t+1][g]         b1 = B[2t+8, 2t+9][g]
//   C and D (16 x 8, f32), 4 registers:
//     c0, c1 = C[g][2t, 2t+1]     c2, c3 = C[g + 8][2t, 2t+1]
// A C fragment pair covering 16 columns is therefore exactly an A fragment of the next MMA
// (c0c1 of the left 8 columns -> a0, c2c3 -> a1, the right 8 columns -> a2, a3), which is
// how attention feeds P = softmax(S) into P V without touching shared memory.
//
// ldmatrix.x4: lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes each) of matrix
// i; register i of lane l then holds row l / 4, elements 2(l % 4) and 2(l % 4) + 1 of
// matrix i. With .trans it holds column l / 4, rows 2(l % 4) and 2(l % 4) + 1 instead.
#pragma once
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace longctx {

template <typename T> struct MmaType;
template <> struct MmaType<__half> {
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};
template <> struct MmaType<__nv_bfloat16> {
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

#ifdef LONGCTX_EMU
// The emulator's twins: warp collectives of the runtime, each call site named (file:line)
// so that lanes reaching different instructions are told apart.
template <typename T> struct MmaKindOf;
template <> struct MmaKindOf<__half> { static constexpr int value = ::longctx_emu::kMmaF16; };
template <> struct MmaKindOf<__nv_bfloat16> { static constexpr int value = ::longctx_emu::kMmaBf16; };
struct MmaSite {
    const char* file;
    int line;
    template <typename T>
    void call(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) const {
        ::longctx_emu::mma_16816(file, line, MmaKindOf<T>::value, d, a, b0, b1);
    }
};
#define mma_16816 ::longctx::MmaSite{__FILE__, __LINE__}.call
#define ldmatrix_x1(r, addr) ::longctx_emu::ldmatrix(__FILE__, __LINE__, 1, false, (r), (addr))
#define ldmatrix_x1_trans(r, addr) ::longctx_emu::ldmatrix(__FILE__, __LINE__, 1, true, (r), (addr))
#define ldmatrix_x2(r, addr) ::longctx_emu::ldmatrix(__FILE__, __LINE__, 2, false, (r), (addr))
#define ldmatrix_x2_trans(r, addr) ::longctx_emu::ldmatrix(__FILE__, __LINE__, 2, true, (r), (addr))
#define ldmatrix_x4(r, addr) ::longctx_emu::ldmatrix(__FILE__, __LINE__, 4, false, (r), (addr))
#define ldmatrix_x4_trans(r, addr) ::longctx_emu::ldmatrix(__FILE__, __LINE__, 4, true, (r), (addr))
#else
// d = a * b + d, one 16x8x16 tile (fragments as in the header comment).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One 8x8 b16 matrix (lanes 0-7 give the row addresses), plain and transposed.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr));
}

// Two 8x8 b16 matrices (lanes 0-15 give the row addresses), plain and transposed.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr));
}

// Four 8x8 b16 matrices from shared memory (address: this lane's row, see the header).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

// As ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
}

#endif  // LONGCTX_EMU

}  // namespace longctx
