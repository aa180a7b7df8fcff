// Storage types and their conversion to and from f32, the type all math is done in.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace longctx {

template <typename T> struct DType;

template <> struct DType<float> {
    __device__ __forceinline__ static float to_f32(float x) { return x; }
    __device__ __forceinline__ static float from_f32(float x) { return x; }
};

template <> struct DType<__half> {
    __device__ __forceinline__ static float to_f32(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_f32(float x) { return __float2half_rn(x); }
};

template <> struct DType<__nv_bfloat16> {
    __device__ __forceinline__ static float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
};

}  // namespace longctx
