// Asynchronous global -> shared copies (cp.async, sm80+). A copy is issued, grouped with
// commit(), and waited for with wait<N>() (at most N groups still in flight); a barrier is
// still needed before other threads read what this thread copied.
#pragma once
#include <stdint.h>

namespace longctx {

// Copies 16 bytes from global `src` to shared `dst` (both 16-byte aligned), bypassing L1.
// When `valid` is false nothing is read and the 16 destination bytes are zero-filled; `src`
// must still be a valid address then (callers pass the tile's first row).
#ifdef LONGCTX_EMU
#define cp_async_16(dst, src, valid) ::longctx_emu::cp_async_16(__FILE__, __LINE__, (dst), (src), (valid))
__device__ __forceinline__ void cp_async_commit() { ::longctx_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    ::longctx_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const uint32_t src_bytes = valid ? 16u : 0u;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

}  // namespace longctx
