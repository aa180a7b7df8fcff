/* Parameters of the fused RoPE kernel (longctx_rope_*). Pure C, shared with Rust through
 * bindgen (src/sys/rope_params.rs is its committed output).
 *
 * Tensors are [tokens, heads, head_dim] with the last dim contiguous and arbitrary token and
 * head strides (in elements), so Q and K may be views into one packed QKV buffer. Rotation is
 * in place. Only the first rotary_dim channels of each head are read and written. */
#ifndef LONGCTX_ROPE_PARAMS_H
#define LONGCTX_ROPE_PARAMS_H

#include <stdint.h>

/* Pairing of channels. */
#define LONGCTX_ROPE_STYLE_NEOX 0u        /* channel i with i + rotary_dim/2 (HF Llama) */
#define LONGCTX_ROPE_STYLE_INTERLEAVED 1u /* channel 2i with 2i+1 (GPT-J, DeepSeek)   */

/* Direction. Backward applies the inverse rotation (the transpose), times the factor. */
#define LONGCTX_ROPE_FORWARD 0u
#define LONGCTX_ROPE_BACKWARD 1u

/* How the angle position * inv_freq is formed and reduced. */
#define LONGCTX_ROPE_ANGLE_F64 0u /* f64 product and reduction mod 2pi, then f32 sincos */
#define LONGCTX_ROPE_ANGLE_F32 1u /* plain f32 product and sincosf, HF's precision       */

typedef struct LongctxRopeTensor {
    uint64_t data;         /* device address of element [0, 0, 0]                         */
    int64_t token_stride;  /* elements between consecutive tokens                         */
    int64_t head_stride;   /* elements between consecutive heads                          */
    uint32_t heads;        /* number of heads (0 allowed: the tensor is skipped)          */
    uint32_t pad0;
} LongctxRopeTensor;

typedef struct LongctxRopeParams {
    LongctxRopeTensor q;
    LongctxRopeTensor k;
    uint64_t positions;      /* device int32[tokens], each in [0, 2^31)                      */
    uint64_t inv_freq;       /* device double[rotary_dim / 2], from the plan                 */
    uint32_t tokens;
    uint32_t rotary_dim;     /* even, <= head_dim, <= LONGCTX_ROPE_MAX_ROTARY_DIM           */
    uint32_t style;          /* LONGCTX_ROPE_STYLE_*                                         */
    uint32_t direction;      /* LONGCTX_ROPE_FORWARD or _BACKWARD                            */
    uint32_t angle_mode;     /* LONGCTX_ROPE_ANGLE_*                                         */
    float attention_factor;  /* multiplies cos and sin                                       */
} LongctxRopeParams;

#define LONGCTX_ROPE_MAX_ROTARY_DIM 512u

/* Threads per block of the RoPE kernel (one block per token; see rope/traits.cuh). */
#define LONGCTX_ROPE_THREADS 128u

#ifdef __cplusplus
static_assert(sizeof(LongctxRopeTensor) == 32, "LongctxRopeTensor layout");
static_assert(sizeof(LongctxRopeParams) == 104, "LongctxRopeParams layout");
#else
_Static_assert(sizeof(LongctxRopeTensor) == 32, "LongctxRopeTensor layout");
_Static_assert(sizeof(LongctxRopeParams) == 104, "LongctxRopeParams layout");
#endif

#endif
