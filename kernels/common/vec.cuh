// Vector access: W consecutive elements of T moved in one instruction where W * sizeof(T) is
// 4, 8 or 16 bytes. Callers guarantee alignment of W * sizeof(T) bytes (the host validates
// pointers and strides before choosing a vector width).
#pragma once
#include <stdint.h>

namespace longctx {

template <int BYTES> struct RawVec;
template <> struct RawVec<2> { using type = uint16_t; };
template <> struct RawVec<4> { using type = uint32_t; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

// W elements of T held in registers, with a raw view for single-instruction transfers.
template <typename T, int W> struct alignas(W * sizeof(T)) Vec {
    static constexpr int BYTES = W * int(sizeof(T));
    using Raw = typename RawVec<BYTES>::type;
    T elt[W];

    __device__ __forceinline__ void load(const T* p) {
        *reinterpret_cast<Raw*>(elt) = *reinterpret_cast<const Raw*>(p);
    }
    __device__ __forceinline__ void store(T* p) const {
        *reinterpret_cast<Raw*>(p) = *reinterpret_cast<const Raw*>(elt);
    }
};

}  // namespace longctx
