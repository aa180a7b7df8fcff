// Shared-memory declarations. Kernels declare shared memory only through these macros, so
// that the CPU emulator (LONGCTX_EMU) can place every array in the CTA's checked arena:
//   LONGCTX_SHARED_ARRAY(T, name, N)   a static array T name[N]
//   LONGCTX_DYNAMIC_SMEM(T, name, A)   the launch's dynamic shared memory as T name[],
//                                      aligned to A bytes
//   smem_addr_of(p)                    shared-window address of a shared pointer
//   dynamic_smem_size()                bytes of dynamic shared memory of the launch
#pragma once
#include <stdint.h>

#ifdef LONGCTX_EMU
#define LONGCTX_SHARED_ARRAY(T, name, N)                                                       \
    static const char name##_emu_key = 0;                                                      \
    T(&name)[N] = *reinterpret_cast<T(*)[N]>(                                                  \
        ::longctx_emu::static_smem(&name##_emu_key, sizeof(T) * (N), alignof(T), __FILE__, __LINE__))
#define LONGCTX_DYNAMIC_SMEM(T, name, ALIGN) T* const name = reinterpret_cast<T*>(::longctx_emu::dynamic_smem(ALIGN))
#else
#define LONGCTX_SHARED_ARRAY(T, name, N) __shared__ T name[N]
#define LONGCTX_DYNAMIC_SMEM(T, name, ALIGN) extern __shared__ __align__(ALIGN) T name[]
#endif

namespace longctx {

// The shared-window address of a pointer into shared memory (for cp.async and ldmatrix).
__device__ __forceinline__ uint32_t smem_addr_of(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ uint32_t dynamic_smem_size() {
#ifdef LONGCTX_EMU
    return ::longctx_emu::dynamic_smem_size();
#else
    uint32_t n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
#endif
}

}  // namespace longctx
