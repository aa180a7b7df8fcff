//! Chunked prefill ("extend") over a paged cache: every new token of a step, any number
//! per sequence, attends to its sequence's cached keys (which already hold the step's new
//! tokens: append runs first), causal bottom-right. The kernel is the attention forward's
//! (kernels/attention/attention_kernel.cuh) with paged K/V addressing (`PagedKv`): the same
//! tile table ([`TileConfig`]), the same mma.sync main loop and online softmax, and each
//! K/V row's address looked up in the sequence's page table. Types, validation, the launch
//! plan shared by the CUDA path and the emulator, and the CUDA op.
//!
//! Caches of f16 and bf16 with the queries' type, and fp8 e4m3 caches (per-(token, head)
//! or per-head scales) under f16 or bf16 queries, with head dims [`EXTEND_HEAD_DIMS`]. An
//! fp8 tile lands as codes in a staging tile and is widened in shared memory to the query
//! type, each element `T(code x scale)`, before the 16-bit main loop reads it (so fp8 extend
//! equals the 16-bit extend over the cache dequantised to T, bit for bit). fp8 at head dim
//! 256 needs [`extend_smem_bytes`] = 114,944 bytes of shared memory: sm_80 and sm_90 have
//! it, sm_86 / sm_89 (99 KB) refuse it with [`ErrorKind::Unsupported`](crate::ErrorKind).
//!
//! [`extend_rotating`] reads a cache of un-rotated keys (exact dynamic scaling): each Q and
//! K tile is rotated in shared memory after it lands, with the sequence's rotation at its
//! current length, as [`decode_rotating`](super::decode_rotating) does.
//!
//! Head dim 512 is past the forward's tile table (a 64-row tile's O would be 256 f32 per
//! lane); it runs a kernel of its own (kernels/kv_cache/extend_wide_kernel.cuh) that packs
//! 16 or 64 (new token, query head of a KV head's group) rows per CTA, as the MLA decode
//! does, on the same tensor-core main loop and online softmax; it reads f16 / bf16 caches
//! (rotated, or rotated on load through [`extend_rotating`]) and fp8 caches (widened in
//! shared memory as below; rotation on load over fp8 is [`Error::unsupported`] there).

use cudarc::driver::{DevicePtr, PushKernelArg};

use super::cache::{cache_params, step_params, CacheShape, KvScales, PagedCache};
use super::decode::DecodeOutput;
use super::fp8::{CacheDType, CacheElement};
use super::merge::LseLayout;
use super::rotation::{KvRotation, RotationShape};
use super::step::{KvStep, ValidatedStep};
use crate::attention::cuda::{require_sm80, tensor};
use crate::attention::{check_alignment, AttnElement, SoftmaxConsts, TileConfig, MAX_TOKENS};
use crate::device::{cuda_err, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::HeadsLayout;
use crate::rope::{AnglePrecision, RopeStyle};
use crate::sys;

const OP: &str = "extend";

/// Head dims the extend kernels are built for (head_dim == head_dim_v; the forward's tile
/// table rows).
pub const EXTEND_HEAD_DIMS: &[usize] = &[64, 96, 128, 256, EXTEND_WIDE_HEAD_DIM];

/// The head dim that runs the row-packed kernel instead of the forward's tiles.
pub const EXTEND_WIDE_HEAD_DIM: usize = 512;

/// Per-call options of [`extend`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ExtendOptions {
    /// Multiplies q . k before softcap and softmax; `None` is `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Logit softcap; `None` is off.
    pub softcap: Option<f32>,
    /// Sliding window: a query at position p sees keys `p - window_left ..= p`; `None` is
    /// unbounded.
    pub window_left: Option<usize>,
}

/// The shapes of one extend call, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct ExtendShape<'a> {
    /// The step (validated against the cache's layout).
    pub step: &'a ValidatedStep,
    /// The cache's buffers.
    pub cache: CacheShape,
    /// Q, `[total_new, heads_q, head_dim]`.
    pub q: HeadsLayout,
    /// Elements in Q's buffer.
    pub q_len: usize,
    /// O, Q's shape.
    pub o: HeadsLayout,
    /// Elements in O's buffer.
    pub o_len: usize,
    /// The LSE view `[heads_q, total_new]` and its buffer's length, if asked for.
    pub lse: Option<(LseLayout, usize)>,
    /// Keys and queries stored un-rotated, rotated on load ([`extend_rotating`]), or
    /// `None` for rotated ones.
    pub rotation: Option<RotationShape>,
}

/// An extend call that passed [`ExtendShape::validate`].
#[derive(Debug, Clone)]
pub struct ExtendValidated {
    /// The portable tile shape of the head dim (the launch uses the loaded code's); `None`
    /// at [`EXTEND_WIDE_HEAD_DIM`], which runs the row-packed kernel.
    pub tiles: Option<TileConfig>,
    heads_q: usize,
    total_new: usize,
    head_dim: usize,
    consts: SoftmaxConsts,
    window_left: i32,
    q: HeadsLayout,
    o: HeadsLayout,
    lse: Option<LseLayout>,
    cache: CacheShape,
    rotation: Option<RotationShape>,
}

impl ExtendValidated {
    /// Channels of Q, K, V and O.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

impl ExtendShape<'_> {
    /// Checks everything about a call that does not need the device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for: an invalid cache ([`CacheShape::validate`]); heads
    /// that do not group (`heads_q`); Q or O not `[total_new, heads_q, head_dim]` or leaving
    /// its buffer (`q`, `o`); an LSE view of another shape or leaving its buffer (`lse`);
    /// more than [`MAX_TOKENS`] new tokens or cached tokens in a sequence, or more query
    /// heads or sequences than the grid holds (`cu_new`, `seqlens`, `heads_q`); a softmax
    /// scale or softcap that is not finite and positive; a stride past i64; an fp8 cache
    /// without scales, a 16-bit one with scales, or scales shorter than their layout
    /// (`cache.scales`, `cache.k_scale`, `cache.v_scale`); a rotation whose rotary dim is
    /// odd, 0 or above the head dim (`rotation`). Of kind unsupported: a head dim not in
    /// [`EXTEND_HEAD_DIMS`].
    pub fn validate(&self, opts: &ExtendOptions) -> Result<ExtendValidated> {
        self.cache.validate()?;
        let l = &self.cache.layout;
        let d = l.head_dim;
        if !EXTEND_HEAD_DIMS.contains(&d) {
            return Err(Error::unsupported(
                OP,
                "head_dim",
                format!("{d}: the extend kernels are built for {EXTEND_HEAD_DIMS:?}"),
            ));
        }
        let wide = d == EXTEND_WIDE_HEAD_DIM;
        if wide && self.cache.dtype == CacheDType::Fp8E4m3 && self.rotation.is_some() {
            return Err(Error::unsupported(
                OP,
                "rotation",
                "rotation on load over an fp8 cache stops at head dim 256",
            ));
        }
        let tiles = if wide {
            None
        } else {
            Some(TileConfig::for_head_dims(d, d)?)
        };
        if let Some(r) = self.rotation {
            if r.rotary_dim == 0 || r.rotary_dim % 2 != 0 || r.rotary_dim > d {
                return Err(Error::invalid(
                    OP,
                    "rotation",
                    format!("rotary dim {} must be even and in 2..={d}", r.rotary_dim),
                ));
            }
        }
        let heads_q = self.q.heads;
        if l.heads_kv == 0 || heads_q == 0 || heads_q % l.heads_kv != 0 {
            return Err(Error::invalid(
                OP,
                "heads_q",
                format!(
                    "{heads_q} query heads do not group over {} KV heads",
                    l.heads_kv
                ),
            ));
        }
        let step = self.step;
        let total_new = step.total_new;
        if total_new > MAX_TOKENS {
            return Err(Error::invalid(
                OP,
                "cu_new",
                format!("{total_new} new tokens exceed {MAX_TOKENS}"),
            ));
        }
        if step.max_seqlen > MAX_TOKENS {
            return Err(Error::invalid(
                OP,
                "seqlens",
                format!(
                    "a sequence of {} tokens exceeds {MAX_TOKENS}",
                    step.max_seqlen
                ),
            ));
        }
        // Grid (query tiles, heads_q, batch): y and z are 16-bit.
        if heads_q > 65_535 || step.batch > 65_535 {
            return Err(Error::invalid(
                OP,
                "heads_q",
                format!(
                    "{heads_q} query heads and {} sequences exceed the grid",
                    step.batch
                ),
            ));
        }
        for (arg, x, len) in [("q", &self.q, self.q_len), ("o", &self.o, self.o_len)] {
            if (x.tokens, x.heads, x.head_dim) != (total_new, heads_q, d) {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "shape [{}, {}, {}], expected [total_new {total_new}, heads_q {heads_q}, \
                         head_dim {d}]",
                        x.tokens, x.heads, x.head_dim
                    ),
                ));
            }
            x.validate(OP, arg, len)?;
            for stride in [x.token_stride, x.head_stride] {
                i64::try_from(stride)
                    .map_err(|_| Error::invalid(OP, arg, format!("stride {stride} exceeds i64")))?;
            }
        }
        if let Some((lse, len)) = self.lse {
            if (lse.heads, lse.tokens) != (heads_q, total_new) {
                return Err(Error::invalid(
                    OP,
                    "lse",
                    format!(
                        "shape [{}, {}], expected [heads_q {heads_q}, total_new {total_new}]",
                        lse.heads, lse.tokens
                    ),
                ));
            }
            lse.validate("lse", len)?;
            i64::try_from(lse.head_stride)
                .map_err(|_| Error::invalid(OP, "lse", "head stride exceeds i64"))?;
        }
        let scale = opts
            .softmax_scale
            .unwrap_or_else(|| (1.0 / (d as f64).sqrt()) as f32);
        let consts = SoftmaxConsts::new(scale, opts.softcap)?;
        let window_left = opts
            .window_left
            .map_or(sys::LONGCTX_ATTN_WINDOW_UNBOUNDED as i32, |w| {
                w.min(sys::LONGCTX_ATTN_WINDOW_UNBOUNDED as usize) as i32
            });
        Ok(ExtendValidated {
            tiles,
            heads_q,
            total_new,
            head_dim: d,
            consts,
            window_left,
            q: self.q,
            o: self.o,
            lse: self.lse.map(|x| x.0),
            cache: self.cache,
            rotation: self.rotation,
        })
    }
}

/// Device (or emulated host) addresses of one call's buffers.
pub(crate) struct ExtendAddrs {
    pub q: u64,
    pub o: u64,
    pub lse: u64,
    pub k: u64,
    pub v: u64,
    /// fp8: K's and V's f32 scales (0 for a 16-bit cache).
    pub k_scale: u64,
    pub v_scale: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub cu_new: u64,
    /// Rotation on load: the per-sequence tables (0 without).
    pub rope_inv_freq: u64,
    pub rope_factor: u64,
}

pub(crate) fn kernel_id(t: DType, s: CacheDType, d: usize, rotate: bool) -> Result<KernelId> {
    use KernelId::*;
    let fp8 = s == CacheDType::Fp8E4m3;
    if rotate {
        return Ok(match (t, fp8, d) {
            (DType::F16, false, 64) => KvExtendRotF16Hd64,
            (DType::F16, false, 96) => KvExtendRotF16Hd96,
            (DType::F16, false, 128) => KvExtendRotF16Hd128,
            (DType::F16, false, 256) => KvExtendRotF16Hd256,
            (DType::BF16, false, 64) => KvExtendRotBf16Hd64,
            (DType::BF16, false, 96) => KvExtendRotBf16Hd96,
            (DType::BF16, false, 128) => KvExtendRotBf16Hd128,
            (DType::BF16, false, 256) => KvExtendRotBf16Hd256,
            (DType::F16, true, 64) => KvExtendRotF16Fp8Hd64,
            (DType::F16, true, 96) => KvExtendRotF16Fp8Hd96,
            (DType::F16, true, 128) => KvExtendRotF16Fp8Hd128,
            (DType::F16, true, 256) => KvExtendRotF16Fp8Hd256,
            (DType::BF16, true, 64) => KvExtendRotBf16Fp8Hd64,
            (DType::BF16, true, 96) => KvExtendRotBf16Fp8Hd96,
            (DType::BF16, true, 128) => KvExtendRotBf16Fp8Hd128,
            (DType::BF16, true, 256) => KvExtendRotBf16Fp8Hd256,
            (DType::F16, false, 512) => KvExtendRotF16Hd512,
            (DType::BF16, false, 512) => KvExtendRotBf16Hd512,
            _ => {
                return Err(Error::unsupported(
                    OP,
                    "dtype",
                    format!(
                        "no rotating extend kernel for {t:?} queries over a {s:?} cache with \
                         head dim {d}"
                    ),
                ))
            }
        });
    }
    Ok(match (t, fp8, d) {
        (DType::F16, false, 64) => KvExtendF16Hd64,
        (DType::F16, false, 96) => KvExtendF16Hd96,
        (DType::F16, false, 128) => KvExtendF16Hd128,
        (DType::F16, false, 256) => KvExtendF16Hd256,
        (DType::BF16, false, 64) => KvExtendBf16Hd64,
        (DType::BF16, false, 96) => KvExtendBf16Hd96,
        (DType::BF16, false, 128) => KvExtendBf16Hd128,
        (DType::BF16, false, 256) => KvExtendBf16Hd256,
        (DType::F16, true, 64) => KvExtendF16Fp8Hd64,
        (DType::F16, true, 96) => KvExtendF16Fp8Hd96,
        (DType::F16, true, 128) => KvExtendF16Fp8Hd128,
        (DType::F16, true, 256) => KvExtendF16Fp8Hd256,
        (DType::BF16, true, 64) => KvExtendBf16Fp8Hd64,
        (DType::BF16, true, 96) => KvExtendBf16Fp8Hd96,
        (DType::BF16, true, 128) => KvExtendBf16Fp8Hd128,
        (DType::BF16, true, 256) => KvExtendBf16Fp8Hd256,
        (DType::F16, false, 512) => KvExtendF16Hd512,
        (DType::BF16, false, 512) => KvExtendBf16Hd512,
        (DType::F16, true, 512) => KvExtendF16Fp8Hd512,
        (DType::BF16, true, 512) => KvExtendBf16Fp8Hd512,
        _ => {
            return Err(Error::unsupported(
                OP,
                "dtype",
                format!("no extend kernel for {t:?} queries over a {s:?} cache with head dim {d}"),
            ))
        }
    })
}

/// Whether queries of `T` read a cache of `S` in extend: the same 16-bit type, or fp8.
fn cache_matches<T: AttnElement, S: CacheElement>() -> bool {
    matches!(
        (T::DTYPE, S::CACHE_DTYPE),
        (DType::F16, CacheDType::F16)
            | (DType::BF16, CacheDType::BF16)
            | (DType::F16 | DType::BF16, CacheDType::Fp8E4m3)
    )
}

/// Bytes of dynamic shared memory the extend kernel for `tiles` needs over a cache of
/// `cache`: the forward's Q, K and V tiles, and for fp8 the staged codes of one tile
/// (`block_n x head_dim` bytes) and its rows' f32 scales (`block_n x 4`).
pub fn extend_smem_bytes(tiles: &TileConfig, cache: CacheDType) -> usize {
    let base = tiles.smem_bytes();
    if cache == CacheDType::Fp8E4m3 {
        let extra = tiles
            .block_n
            .saturating_mul(tiles.head_dim.saturating_add(4));
        base.saturating_add(extra)
    } else {
        base
    }
}

/// The launch of one validated call, shared by the CUDA and emulated backends: the kernel
/// for the dtype and head dim, 16-byte alignment of the cache, Q and O, the grid for
/// `tiles` (the loaded code's tile shape of the head dim), `smem` bytes of dynamic shared
/// memory, and the params. `None` for a call with no query row.
pub(crate) fn plan_extend_launch<T: AttnElement, S: CacheElement>(
    step: &ValidatedStep,
    v: &ExtendValidated,
    tiles: &TileConfig,
    smem: usize,
    a: &ExtendAddrs,
) -> Result<Option<KernelLaunch<sys::LongctxKvExtendParams>>> {
    if !cache_matches::<T, S>() {
        return Err(Error::unsupported(
            OP,
            "cache",
            format!(
                "{:?} queries over a {:?} cache: extend reads caches of the queries' type, \
                 or fp8",
                T::DTYPE,
                S::CACHE_DTYPE
            ),
        ));
    }
    tiles.validate()?;
    if (tiles.head_dim, tiles.head_dim_v) != (v.head_dim, v.head_dim) {
        return Err(Error::invalid(
            OP,
            "tiles",
            format!("{tiles:?} is not a tile shape of head dim {}", v.head_dim),
        ));
    }
    if v.total_new == 0 || step.batch == 0 {
        return Ok(None);
    }
    let id = kernel_id(T::DTYPE, S::CACHE_DTYPE, v.head_dim, v.rotation.is_some())?;
    let need = extend_smem_bytes(tiles, S::CACHE_DTYPE);
    if smem < need {
        return Err(Error::invalid(
            OP,
            "tiles",
            format!("{smem} bytes of shared memory, the kernel for {tiles:?} needs {need}"),
        ));
    }
    let grid = tiles.grid(step.max_new, v.heads_q, step.batch);
    let m_blocks = u32::try_from(grid.0)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid(OP, "cu_new", "too many query tiles for the grid"))?;
    let params = extend_params::<T, S>(step, v, a, m_blocks)?;
    Ok(Some(KernelLaunch {
        id,
        params,
        grid: (m_blocks, v.heads_q as u32, step.batch as u32),
        block: (tiles.threads() as u32, 1, 1),
        smem_bytes: u32::try_from(smem)
            .map_err(|_| Error::overflow(OP, "head_dim", "shared memory exceeds u32"))?,
    }))
}

/// The params both extend kernels take, after the checks they share: rotation tables given
/// with a rotation; K and V scales given with an fp8 cache and only with it, on 4 bytes;
/// the cache on 16 bytes (rows of head_dim x 2 or x 1 bytes, a multiple of 16 at every
/// extend head dim); Q and O on their element and 16-byte rows; the LSE's address.
/// `m_blocks` is gridDim.x (query or row tiles).
fn extend_params<T: AttnElement, S: CacheElement>(
    step: &ValidatedStep,
    v: &ExtendValidated,
    a: &ExtendAddrs,
    m_blocks: u32,
) -> Result<sys::LongctxKvExtendParams> {
    if v.rotation.is_some() && (a.rope_inv_freq == 0 || a.rope_factor == 0) {
        return Err(Error::invalid(OP, "rotation", "rotation tables missing"));
    }
    let fp8 = S::CACHE_DTYPE == CacheDType::Fp8E4m3;
    if (a.k_scale != 0, a.v_scale != 0) != (fp8, fp8) {
        return Err(Error::invalid(
            OP,
            "cache.scales",
            "an fp8 cache needs K and V scales, a 16-bit cache none",
        ));
    }
    for (addr, arg) in [(a.k_scale, "cache.k_scale"), (a.v_scale, "cache.v_scale")] {
        if addr % 4 != 0 {
            return Err(Error::misaligned(
                OP,
                arg,
                format!("the scales start at {addr:#x}; the kernel reads f32"),
            ));
        }
    }
    for (addr, arg) in [(a.k, "cache.k"), (a.v, "cache.v")] {
        if addr % 16 != 0 {
            return Err(Error::misaligned(
                OP,
                arg,
                format!("the cache starts at {addr:#x}; the kernel copies 16-byte chunks"),
            ));
        }
    }
    let elem = T::DTYPE.size();
    // Cache rows are dense: head_dim x 2 (fp8: 1) bytes, a multiple of 16 for every extend
    // head dim.
    debug_assert!(v.head_dim % 16 == 0);
    check_alignment(&v.q, a.q, elem, "q")?;
    check_alignment(&v.o, a.o, elem, "o")?;
    let (lse, lse_stride) = match v.lse {
        Some(l) => (
            (l.offset as u64)
                .checked_mul(4)
                .and_then(|b| b.checked_add(a.lse))
                .ok_or_else(|| Error::invalid(OP, "lse", "offset overflows the address space"))?,
            l.head_stride as i64,
        ),
        None => (0, 0),
    };
    let zero = sys::LongctxAttnTensor {
        data: 0,
        token_stride: 0,
        head_stride: 0,
    };
    // validate() bounded heads_q and batch by 65535, the window by WINDOW_UNBOUNDED, and
    // the views' strides by i64.
    Ok(sys::LongctxKvExtendParams {
        attn: sys::LongctxAttnParams {
            q: tensor(&v.q, a.q, elem),
            k: zero,
            v: zero,
            o: tensor(&v.o, a.o, elem),
            lse,
            lse_head_stride: lse_stride,
            cu_seqlens_q: a.cu_new,
            cu_seqlens_k: 0,
            batch: step.batch as u32,
            heads_q: v.heads_q as u32,
            heads_per_kv: (v.heads_q / v.cache.layout.heads_kv) as u32,
            num_m_blocks: m_blocks,
            window_left: v.window_left,
            window_right: 0,
            exp_scale: v.consts.exp_scale,
            softcap_in: v.consts.softcap_in,
        },
        cache: cache_params(&v.cache, a.k, a.v, a.k_scale, a.v_scale),
        step: step_params(step, a.block_table, a.seqlens, a.cu_new),
        rotary_dim: v.rotation.map_or(0, |r| r.rotary_dim as u32),
        rope_style: match v.rotation.map(|r| r.style) {
            Some(RopeStyle::Interleaved) => sys::LONGCTX_ROPE_STYLE_INTERLEAVED,
            _ => sys::LONGCTX_ROPE_STYLE_NEOX,
        },
        rope_inv_freq: if v.rotation.is_some() {
            a.rope_inv_freq
        } else {
            0
        },
        rope_factor: if v.rotation.is_some() {
            a.rope_factor
        } else {
            0
        },
        rope_angle_mode: match v.rotation.map(|r| r.precision) {
            Some(AnglePrecision::F32) => sys::LONGCTX_ROPE_ANGLE_F32,
            _ => sys::LONGCTX_ROPE_ANGLE_F64,
        },
        pad0: 0,
    })
}

/// Rows per CTA of the head-dim-512 extend kernel on every sm_80+ part.
pub const EXTEND_WIDE_ROWS_NARROW: usize = sys::LONGCTX_KV_EXTEND_WIDE_ROWS as usize;
/// Rows per CTA of the head-dim-512 extend kernel on parts with at least
/// [`EXTEND_WIDE_R64_SMEM_BYTES`] of shared memory per block (A100, H100, H200).
pub const EXTEND_WIDE_ROWS_WIDE: usize = sys::LONGCTX_KV_EXTEND_WIDE_R64_ROWS as usize;
/// Shared memory per block (opt-in) the 64-row head-dim-512 extend kernel needs (its fp8
/// variant's, the larger).
pub const EXTEND_WIDE_R64_SMEM_BYTES: usize = sys::LONGCTX_KV_EXTEND_WIDE_R64_SMEM_FP8 as usize;

/// Rows per CTA of the head-dim-512 extend kernel for a step whose largest chunk brings
/// `max_new` tokens to a group of `group` query heads per KV head, on a device allowing
/// `smem_per_block` bytes of shared memory per block: 64 when a sequence has more than 16
/// rows and the device holds the 64-row kernel, else 16.
pub fn extend_wide_rows(max_new: usize, group: usize, smem_per_block: usize) -> usize {
    let rows = max_new.saturating_mul(group);
    if rows > EXTEND_WIDE_ROWS_NARROW && smem_per_block >= EXTEND_WIDE_R64_SMEM_BYTES {
        EXTEND_WIDE_ROWS_WIDE
    } else {
        EXTEND_WIDE_ROWS_NARROW
    }
}

/// The launch of one validated call at [`EXTEND_WIDE_HEAD_DIM`], shared by the CUDA and
/// emulated backends: grid (row tiles of [`extend_wide_rows`] (token, group head) rows, KV
/// heads, sequences), the kernel's fixed shared memory. Checks as [`plan_extend_launch`].
/// `None` for a call with no query row.
pub(crate) fn plan_extend_wide_launch<T: AttnElement, S: CacheElement>(
    step: &ValidatedStep,
    v: &ExtendValidated,
    smem_per_block: usize,
    a: &ExtendAddrs,
) -> Result<Option<KernelLaunch<sys::LongctxKvExtendParams>>> {
    if !cache_matches::<T, S>() {
        return Err(Error::unsupported(
            OP,
            "cache",
            format!(
                "{:?} queries over a {:?} cache: extend reads caches of the queries' type, \
                 or fp8",
                T::DTYPE,
                S::CACHE_DTYPE
            ),
        ));
    }
    if v.head_dim != EXTEND_WIDE_HEAD_DIM {
        return Err(Error::invalid(
            OP,
            "head_dim",
            format!("{} is not the row-packed kernel's", v.head_dim),
        ));
    }
    if v.total_new == 0 || step.batch == 0 {
        return Ok(None);
    }
    let heads_kv = v.cache.layout.heads_kv;
    let group = v.heads_q / heads_kv;
    let rows = extend_wide_rows(step.max_new, group, smem_per_block);
    let wide = rows == EXTEND_WIDE_ROWS_WIDE;
    let rotate = v.rotation.is_some();
    let fp8 = S::CACHE_DTYPE == CacheDType::Fp8E4m3;
    let id = match (T::DTYPE, wide, rotate, fp8) {
        (DType::F16, false, false, false) => KernelId::KvExtendF16Hd512,
        (DType::BF16, false, false, false) => KernelId::KvExtendBf16Hd512,
        (DType::F16, true, false, false) => KernelId::KvExtendR64F16Hd512,
        (DType::BF16, true, false, false) => KernelId::KvExtendR64Bf16Hd512,
        (DType::F16, false, true, false) => KernelId::KvExtendRotF16Hd512,
        (DType::BF16, false, true, false) => KernelId::KvExtendRotBf16Hd512,
        (DType::F16, true, true, false) => KernelId::KvExtendRotR64F16Hd512,
        (DType::BF16, true, true, false) => KernelId::KvExtendRotR64Bf16Hd512,
        (DType::F16, false, false, true) => KernelId::KvExtendF16Fp8Hd512,
        (DType::BF16, false, false, true) => KernelId::KvExtendBf16Fp8Hd512,
        (DType::F16, true, false, true) => KernelId::KvExtendR64F16Fp8Hd512,
        (DType::BF16, true, false, true) => KernelId::KvExtendR64Bf16Fp8Hd512,
        (t, _, _, _) => {
            return Err(Error::unsupported(
                OP,
                "dtype",
                format!("no extend kernel for {t:?} with head dim 512"),
            ))
        }
    };
    // max_new <= MAX_TOKENS and group <= 65535 (validate): no overflow in u64.
    let row_tiles = (step.max_new as u64 * group as u64).div_ceil(rows as u64);
    let m_blocks = u32::try_from(row_tiles)
        .ok()
        .filter(|&x| x <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid(OP, "cu_new", "too many row tiles for the grid"))?;
    let params = extend_params::<T, S>(step, v, a, m_blocks)?;
    Ok(Some(KernelLaunch {
        id,
        params,
        grid: (m_blocks, heads_kv as u32, step.batch as u32),
        block: (
            32 * if wide {
                sys::LONGCTX_KV_EXTEND_WIDE_R64_WARPS
            } else {
                sys::LONGCTX_KV_EXTEND_WIDE_WARPS
            },
            1,
            1,
        ),
        smem_bytes: match (wide, fp8) {
            (false, false) => sys::LONGCTX_KV_EXTEND_WIDE_SMEM,
            (true, false) => sys::LONGCTX_KV_EXTEND_WIDE_R64_SMEM,
            (false, true) => sys::LONGCTX_KV_EXTEND_WIDE_SMEM_FP8,
            (true, true) => sys::LONGCTX_KV_EXTEND_WIDE_R64_SMEM_FP8,
        },
    }))
}

/// Attention of each sequence's new tokens (any number: a prefill chunk, or decode's one)
/// over its paged cache on `dev`'s stream, with the attention forward's tensor-core kernel.
/// The step's new tokens must already be in the cache (append first): query i of the n
/// new tokens of sequence b sits at position `p = seqlens[b] - n + i` and sees keys
/// `max(0, p - window_left) ..= p`. `q` is `[total_new, heads_q, head_dim]` (rotated
/// already); query head h reads KV head `h / (heads_q / heads_kv)`. O has Q's shape; the
/// LSE (natural log, -inf for a row that sees no key) is written when `out.lse` is given.
/// An fp8 cache's values are `code x scale` with `cache.scales` (required for fp8, refused
/// for 16-bit caches), each rounded once to T before the MMAs.
/// One launch, nothing allocated; nothing is launched when there is no new token.
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`ExtendShape::validate`] rejects, a cache
/// whose layout differs from the step's, a cache, Q or O not 16-byte aligned (kind
/// misaligned), a buffer of another context; of kind unsupported: a 16-bit cache of
/// another type than the queries, a head dim not in [`EXTEND_HEAD_DIMS`], a device older
/// than sm_80, more shared memory than the device allows; [`Error::KernelsNotCompiled`]
/// without kernels; [`Error::Cuda`] if the launch fails.
pub fn extend<T: AttnElement, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    q: &dyn DevicePtr<T>,
    q_layout: &HeadsLayout,
    cache: &PagedCache<S>,
    out: DecodeOutput<T>,
    opts: &ExtendOptions,
) -> Result<()> {
    extend_impl(dev, step, None, q, q_layout, cache, out, opts)
}

/// [`extend`] over a cache whose keys are stored un-rotated (appended without RoPE), with
/// un-rotated queries: the kernel rotates each query tile and each key tile in shared
/// memory after it lands, every row at its position, with the sequence's rotation at its
/// current length from `rotation` ([`KvRotation::upload`] for this step), cos and sin
/// times the attention factor, rounded to T, before the MMAs read them. With a static rule
/// this gives what a cache of keys rotated at append time and rotated queries give (bit
/// for bit on the emulator); with dynamic scaling (HF's dynamic NTK, dynamic YaRN) every
/// key gets the current length's rotation, which a rotated cache cannot. Every head dim of
/// [`EXTEND_HEAD_DIMS`], 16-bit and fp8 caches (fp8 tiles are rotated after widening).
///
/// # Errors
/// As [`extend`], plus tables made for another step or head dim or on another device
/// context, and a rotary dim that is odd, 0 or above the head dim (`rotation`).
#[allow(clippy::too_many_arguments)]
pub fn extend_rotating<T: AttnElement, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    rotation: &KvRotation,
    q: &dyn DevicePtr<T>,
    q_layout: &HeadsLayout,
    cache: &PagedCache<S>,
    out: DecodeOutput<T>,
    opts: &ExtendOptions,
) -> Result<()> {
    if !dev.owns(rotation.inv_freq()) || !dev.owns(rotation.factor()) {
        return Err(Error::invalid(
            OP,
            "rotation",
            "lives on another device context",
        ));
    }
    rotation.check_step(step.validated(), step.layout().head_dim)?;
    extend_impl(dev, step, Some(rotation), q, q_layout, cache, out, opts)
}

#[allow(clippy::too_many_arguments)]
fn extend_impl<T: AttnElement, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    rotation: Option<&KvRotation>,
    q: &dyn DevicePtr<T>,
    q_layout: &HeadsLayout,
    cache: &PagedCache<S>,
    out: DecodeOutput<T>,
    opts: &ExtendOptions,
) -> Result<()> {
    if cache.layout != *step.layout() {
        return Err(Error::invalid(
            OP,
            "cache",
            format!(
                "layout {:?} differs from the step's {:?}",
                cache.layout,
                step.layout()
            ),
        ));
    }
    let mut owned = vec![
        (dev.owns_any(q), "q"),
        (dev.owns_any(cache.k), "cache.k"),
        (dev.owns_any(cache.v), "cache.v"),
        (dev.owns_any(&*out.o), "o"),
        (dev.owns(step.block_table()), "step"),
    ];
    if let KvScales::Fp8 { k, v, .. } = cache.scales {
        owned.push((dev.owns_any(k), "cache.k_scale"));
        owned.push((dev.owns_any(v), "cache.v_scale"));
    }
    if let Some((l, _)) = &out.lse {
        owned.push((dev.owns_any(&**l), "lse"));
    }
    if let Some((_, arg)) = owned.iter().find(|x| !x.0) {
        return Err(Error::invalid(OP, arg, "lives on another device context"));
    }
    require_sm80(dev, OP)?;
    let scales = match cache.scales {
        KvScales::None => None,
        KvScales::Fp8 { mode, k, v } => Some((mode, k.len(), v.len())),
    };
    let sv = step.validated();
    let v = ExtendShape {
        step: sv,
        cache: CacheShape::of::<S>(cache.layout, cache.k.len(), cache.v.len(), scales),
        q: *q_layout,
        q_len: q.len(),
        o: out.o_layout,
        o_len: out.o.len(),
        lse: out.lse.as_ref().map(|(b, l)| (*l, b.len())),
        rotation: rotation.map(KvRotation::shape),
    }
    .validate(opts)?;
    if !cache_matches::<T, S>() {
        return Err(Error::unsupported(
            OP,
            "cache",
            format!(
                "{:?} queries over a {:?} cache: extend reads caches of the queries' type, \
                 or fp8",
                T::DTYPE,
                S::CACHE_DTYPE
            ),
        ));
    }
    if v.total_new == 0 || sv.batch == 0 {
        return Ok(());
    }
    let d = v.head_dim;
    // The forward's key tile depends on which code the driver loaded (the sm_90a cubin or
    // code for compute_80); shared memory covers the larger of its tiles and the device
    // arch's own, as the forward does. Head dim 512's row-packed kernels need neither: their
    // shared memory is fixed per shape.
    let tiles = if d == EXTEND_WIDE_HEAD_DIM {
        None
    } else {
        let id = kernel_id(T::DTYPE, S::CACHE_DTYPE, d, rotation.is_some())?;
        let tiles = TileConfig::for_code(d, d, dev.ptx_arch(id)?)?;
        let cc = dev.compute_capability();
        let native = TileConfig::for_code(d, d, u32::try_from(cc.0 * 10 + cc.1).unwrap_or(0))?;
        let smem = extend_smem_bytes(&tiles, S::CACHE_DTYPE)
            .max(extend_smem_bytes(&native, S::CACHE_DTYPE));
        Some((tiles, smem))
    };
    let stream = dev.stream();
    let (qp, _g0) = q.device_ptr(stream);
    let (kp, _g1) = cache.k.device_ptr(stream);
    let (vp, _g2) = cache.v.device_ptr(stream);
    let (ksp, vsp, _g8, _g9) = match cache.scales {
        KvScales::None => (0, 0, None, None),
        KvScales::Fp8 { k, v, .. } => {
            let (a, ga) = k.device_ptr(stream);
            let (b, gb) = v.device_ptr(stream);
            (a, b, Some(ga), Some(gb))
        }
    };
    let (rope_if, rope_f, _g10, _g11) = match rotation {
        Some(r) => {
            let (a, ga) = r.inv_freq().device_ptr(stream);
            let (b, gb) = r.factor().device_ptr(stream);
            (a, b, Some(ga), Some(gb))
        }
        None => (0, 0, None, None),
    };
    let (bt, _g3) = step.block_table().device_ptr(stream);
    let (sl, _g4) = step.seqlens().device_ptr(stream);
    let (cn, _g5) = step.cu_new().device_ptr(stream);
    let DecodeOutput { o, lse, .. } = out;
    let (op, _g6) = o.device_ptr_mut(stream);
    let (lp, _g7) = match lse {
        Some((l, _)) => {
            let (p, g) = l.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let addrs = ExtendAddrs {
        q: qp,
        o: op,
        lse: lp,
        k: kp,
        v: vp,
        k_scale: ksp,
        v_scale: vsp,
        block_table: bt,
        seqlens: sl,
        cu_new: cn,
        rope_inv_freq: rope_if,
        rope_factor: rope_f,
    };
    let launch = match &tiles {
        Some((t, smem)) => plan_extend_launch::<T, S>(sv, &v, t, *smem, &addrs)?,
        None => plan_extend_wide_launch::<T, S>(sv, &v, dev.smem_per_block(), &addrs)?,
    };
    let Some(l) = launch else {
        return Ok(());
    };
    dev.allow_dynamic_smem(l.id, l.smem_bytes as usize, OP, "head_dim")?;
    let func = dev.function(l.id)?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: the step's device arrays were validated against the cache's layout when the
    // KvStep was built (every page id a sequence uses in range, every table row long
    // enough for its length, lengths and new-token offsets consistent, new tokens at most
    // the length); the kernel reads table entries only for keys below a sequence's length.
    // ExtendShape::validate proved the cache buffers hold the whole layout (and, for fp8,
    // scales as long as their layout: the kernel reads a scale only for a key below its
    // sequence's length, at that key's slot, or at the KV head), the Q, O and LSE views
    // inside their buffers with O's rows disjoint, lengths within MAX_TOKENS (the kernel's
    // int32 mask arithmetic), heads_q a multiple of heads_kv, and the grid within limits;
    // the plan (extend_params) checked the dtype pair, that scales come with fp8 and only
    // with it, their 4-byte alignment, and the 16-byte alignment of the cache, Q and O
    // (cache rows are head_dim x 2 or x 1 bytes, a multiple of 16). Dynamic shared memory
    // was sized for the loaded code's tiles (fp8's staging included, extend_smem_bytes), or
    // is the row-packed kernel's fixed size at head dim 512, and opted into above. With rotation, check_step proved the tables were built for this
    // step's lengths and head dim: inv_freq holds batch x rotary_dim / 2 f64 and factor
    // batch f32 (validate bounded rotary_dim by the head dim), read at blockIdx.z < batch.
    // Outputs are borrowed mutably, so no input aliases them; the guards keep every buffer
    // alive until the launch is queued.
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}
