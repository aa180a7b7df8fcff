// Entry points of the attention forward family: one per storage type and head-dim pair
// (2 x 5 = 10), and the same body over a paged KV cache (chunked prefill, "extend") per
// storage type and head dim (2 x 4 = 8), and per query type and head dim over an fp8 e4m3
// cache (2 x 4 = 8). Masks, softcap, GQA ratio and variable lengths are runtime parameters. The
// names are listed once more in src/kernel_id.rs (KernelId); keep the two in step.
#include "attention/attention_kernel.cuh"
#include "common/entry.cuh"

using longctx::attn::attn_fwd_body;
using longctx::attn::Traits;

#define LONGCTX_ATTN_ENTRY(NAME, T, D, DV)                                       \
    extern "C" __global__ void __launch_bounds__(Traits<D, DV>::kThreads)        \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxAttnParams p) {  \
        attn_fwd_body<T, D, DV>(p);                                              \
    }

LONGCTX_ATTN_ENTRY(longctx_attn_fwd_f16_hd64, __half, 64, 64)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_f16_hd96, __half, 96, 96)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_f16_hd128, __half, 128, 128)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_f16_hd192_dv128, __half, 192, 128)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_f16_hd256, __half, 256, 256)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_bf16_hd64, __nv_bfloat16, 64, 64)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_bf16_hd96, __nv_bfloat16, 96, 96)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_bf16_hd128, __nv_bfloat16, 128, 128)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_bf16_hd192_dv128, __nv_bfloat16, 192, 128)
LONGCTX_ATTN_ENTRY(longctx_attn_fwd_bf16_hd256, __nv_bfloat16, 256, 256)

// Extend over a paged cache: the forward's body with PagedKv addressing (D == DV).
#define LONGCTX_KV_EXTEND_ENTRY(NAME, T, D)                                           \
    extern "C" __global__ void __launch_bounds__(Traits<D, D>::kThreads)              \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxKvExtendParams p) {   \
        attn_fwd_body<T, D, D, longctx::attn::PagedKv>(p);                            \
    }

LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_f16_hd64, __half, 64)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_f16_hd96, __half, 96)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_f16_hd128, __half, 128)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_f16_hd256, __half, 256)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_bf16_hd64, __nv_bfloat16, 64)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_bf16_hd96, __nv_bfloat16, 96)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_bf16_hd128, __nv_bfloat16, 128)
LONGCTX_KV_EXTEND_ENTRY(longctx_kv_extend_bf16_hd256, __nv_bfloat16, 256)

// Extend over an fp8 e4m3 cache: codes staged and widened to the query type T in shared
// memory (PagedKvFp8). Head dims 64, 96 and 128 fit 99 KB of shared memory (every sm80+
// part); 256 needs 112 KB (sm80, sm90; the host refuses it on sm86 / sm89).
#define LONGCTX_KV_EXTEND_FP8_ENTRY(NAME, T, D)                                       \
    extern "C" __global__ void __launch_bounds__(Traits<D, D>::kThreads)              \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxKvExtendParams p) {   \
        attn_fwd_body<T, D, D, longctx::attn::PagedKvFp8>(p);                         \
    }

LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_f16_fp8_hd64, __half, 64)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_f16_fp8_hd96, __half, 96)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_f16_fp8_hd128, __half, 128)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_f16_fp8_hd256, __half, 256)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_bf16_fp8_hd64, __nv_bfloat16, 64)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_bf16_fp8_hd96, __nv_bfloat16, 96)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_bf16_fp8_hd128, __nv_bfloat16, 128)
LONGCTX_KV_EXTEND_FP8_ENTRY(longctx_kv_extend_bf16_fp8_hd256, __nv_bfloat16, 256)

// Extend over a cache of un-rotated keys (exact dynamic scaling): each Q tile and K tile is
// rotated in shared memory after it lands (Rotating<...>), 16-bit and fp8 caches.
#define LONGCTX_KV_EXTEND_ROT_ENTRY(NAME, T, D, SOURCE)                               \
    extern "C" __global__ void __launch_bounds__(Traits<D, D>::kThreads)              \
        LONGCTX_ENTRY_NAME(NAME)(const __grid_constant__ LongctxKvExtendParams p) {   \
        attn_fwd_body<T, D, D, longctx::attn::Rotating<SOURCE>>(p);                   \
    }

LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_hd64, __half, 64, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_hd96, __half, 96, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_hd128, __half, 128, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_hd256, __half, 256, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_hd64, __nv_bfloat16, 64, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_hd96, __nv_bfloat16, 96, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_hd128, __nv_bfloat16, 128, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_hd256, __nv_bfloat16, 256, longctx::attn::PagedKv)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_fp8_hd64, __half, 64, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_fp8_hd96, __half, 96, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_fp8_hd128, __half, 128, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_f16_fp8_hd256, __half, 256, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_fp8_hd64, __nv_bfloat16, 64, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_fp8_hd96, __nv_bfloat16, 96, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_fp8_hd128, __nv_bfloat16, 128, longctx::attn::PagedKvFp8)
LONGCTX_KV_EXTEND_ROT_ENTRY(longctx_kv_extend_rot_bf16_fp8_hd256, __nv_bfloat16, 256, longctx::attn::PagedKvFp8)
