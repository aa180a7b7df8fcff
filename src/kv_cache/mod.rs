//! The paged KV cache and attention over it.
//!
//! * [`PagedKvLayout`] and [`PageTable`]: the paged cache layout (pages of `page_size`
//!   tokens, int32 page tables per sequence) with complete host validation; [`StepTable`]
//!   and [`KvStep`]: one step of a batch (lengths after the step, which tokens are new), on
//!   the host and on the device.
//! * [`append_kv`]: writes a step's new K and V rows into their cache slots (one launch,
//!   every head), with RoPE fused on K and fp8 quantisation (per (token, head) scales
//!   written beside the codes, or fixed per-head scales).
//! * [`decode`]: attention of each sequence's 1 to 16 new tokens over its cache, GQA
//!   packed, split-KV sized by [`plan_decode`]; f16/bf16/fp8 caches.
//! * [`extend`]: chunked prefill over the paged cache (any number of new tokens per
//!   sequence attending to its cache, causal bottom-right), the attention forward's
//!   tensor-core kernel with paged K/V addressing; f16/bf16/fp8 caches (fp8 tiles widened
//!   in shared memory). [`extend_rotating`] reads un-rotated keys and queries and rotates
//!   them on load (exact dynamic scaling), as [`decode_rotating`] does.
//! * [`merge_states`]: combines partial attention states `(O_p, LSE_p)` of the same query
//!   rows, each computed over a disjoint subset of the keys, into the state of attention
//!   over their union: `LSE = log sum_p exp(LSE_p)`, `O = sum_p exp(LSE_p - LSE) O_p`.
//!   It is the combine step of split-KV decode (one part per KV split, stacked along a
//!   leading dim) and of ring / context-parallel attention (one part per KV shard, or the
//!   running state plus each arriving shard with [`MergeOptions::accumulate`]).
//! * [`reference`](mod@reference): the f64 references (append, decode, merge) and the
//!   paged <-> dense gather and scatter that define the paged layout.
//!
//! States use the attention forward's conventions: O `[tokens, heads, head_dim_v]` in the
//! input dtype, LSE f32 `[heads, tokens]`, natural log, -inf for a row that saw no key (an
//! empty part, which contributes nothing; a row whose every part is empty merges to O = 0,
//! LSE = -inf).

mod append;
mod cache;
mod decode;
mod extend;
mod fp8;
mod merge;
mod paged;
pub mod reference;
mod rotation;
mod step;

pub use cache::{CacheShape, KvScales, KvScalesMut, PagedCache, PagedCacheMut, ScaleMode};
pub(crate) use decode::SplitMerge;
pub use decode::{
    decode, decode_raw, decode_rotating, plan_decode, DecodeOptions, DecodeOutput, DecodePlan,
    DecodeShape, DecodeTiles, DecodeValidated, Splits, DECODE_HEAD_DIMS, MAX_DECODE_SPLITS,
};
#[cfg(feature = "emulator")]
pub(crate) use decode::{plan_decode_launch, DecodeAddrs};
pub use extend::{
    extend, extend_rotating, extend_smem_bytes, extend_wide_rows, ExtendOptions, ExtendShape,
    ExtendValidated, EXTEND_HEAD_DIMS, EXTEND_WIDE_HEAD_DIM, EXTEND_WIDE_R64_SMEM_BYTES,
    EXTEND_WIDE_ROWS_NARROW, EXTEND_WIDE_ROWS_WIDE,
};
#[cfg(feature = "emulator")]
pub(crate) use extend::{plan_extend_launch, plan_extend_wide_launch, ExtendAddrs};
mod reference_append;

pub use append::{
    append_kv, AppendRope, AppendRopeShape, AppendShape, AppendValidated, NewKv,
    MAX_APPEND_HEAD_DIM, MAX_APPEND_HEAD_DIM_SCALAR,
};
#[cfg(feature = "emulator")]
pub(crate) use append::{plan_append, AppendAddrs};
pub(crate) use cache::{cache_params, step_params};
pub(crate) use fp8::cache_matches;
pub use fp8::{CacheDType, CacheElement, Fp8E4m3};
#[cfg(feature = "emulator")]
pub(crate) use merge::plan_merge;
#[cfg(feature = "emulator")]
pub(crate) use merge::MergeAddrs;
pub use merge::{
    merge_states, merge_states_raw, LseLayout, MergeOptions, MergeShape, MergeState,
    MergeValidated, StackedStates, States, MAX_MERGE_HEAD_DIM,
};
pub(crate) use paged::{dense_len, for_each_row};
pub use paged::{PageTable, PagedKvLayout, ValidatedTable, MAX_CACHE_HEAD_DIM, MAX_PAGE_SIZE};
pub use rotation::{rotation_tables, KvRotation, RotationShape};
pub use step::{KvStep, StepTable, ValidatedStep, MAX_DECODE_QUERIES};
