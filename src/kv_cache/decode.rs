//! Decode over a paged cache: types, validation, the split-KV plan, the launch plan shared
//! by the CUDA path and the emulator, and the CUDA op. kernels/kv_cache/decode_kernel.cuh
//! has the kernel.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::cache::{cache_params, step_params, CacheShape, KvScales, PagedCache, ScaleMode};
use super::fp8::{cache_matches, CacheDType, CacheElement};
use super::merge::{
    plan_merge_typed, LseLayout, MergeAddrs, MergeOptions, MergeShape, StackedStates,
};
use super::rotation::{KvRotation, RotationShape};
use super::step::{KvStep, ValidatedStep, MAX_DECODE_QUERIES};
use crate::attention::SoftmaxConsts;
use crate::device::{cuda_err, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, HeadsLayout, RawBuffer, RawTensor};
use crate::rope::{AnglePrecision, RopeStyle};
use crate::sys;

const OP: &str = "decode";

/// Head dims the decode kernels are built for.
pub const DECODE_HEAD_DIMS: &[usize] = &[64, 128, 256, 512];

/// The most KV splits one decode call uses.
pub const MAX_DECODE_SPLITS: usize = 256;

/// How the keys of a sequence are split across CTAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Splits {
    /// Chosen by [`plan_decode`] from the batch's lengths and the device's SM count.
    #[default]
    Auto,
    /// At most this many splits (1 ..= [`MAX_DECODE_SPLITS`]); fewer when the longest
    /// sequence has fewer key tiles.
    AtMost(usize),
}

/// Per-call options of [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecodeOptions {
    /// Multiplies q . k before softcap and softmax; `None` is `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Logit softcap; `None` is off.
    pub softcap: Option<f32>,
    /// Sliding window: a query at position p sees keys `p - window_left ..= p`; `None` is
    /// unbounded.
    pub window_left: Option<usize>,
    /// KV splitting.
    pub splits: Splits,
}

/// The kernel's tiling for one (head dim, cache dtype), from the constants in
/// kernels/params/kv_cache_params.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeTiles {
    /// Query rows (query token x head of the GQA group) per CTA.
    pub rows_per_cta: usize,
    /// Keys per shared-memory tile.
    pub tile_keys: usize,
    /// Threads per CTA.
    pub threads: usize,
    /// Whether the kernel runs on tensor cores (head dims 64 and 128) or CUDA cores.
    pub tensor_cores: bool,
    /// CTAs an SM holds at once (registers bound it: ~110-190 x 64-128 threads on tensor
    /// cores, ~220 x 128 on CUDA cores); the split plan aims for this many per SM.
    pub ctas_per_sm: usize,
}

impl DecodeTiles {
    /// The tiling of the kernel for `head_dim` (one of [`DECODE_HEAD_DIMS`]) and a cache of
    /// `dtype`.
    pub fn new(head_dim: usize, dtype: CacheDType) -> Self {
        let mma_warps = match head_dim {
            64 => Some(sys::LONGCTX_KV_DECODE_MMA_WARPS_HD64 as usize),
            128 => Some(sys::LONGCTX_KV_DECODE_MMA_WARPS_HD128 as usize),
            _ => None,
        };
        match mma_warps {
            Some(w) => DecodeTiles {
                rows_per_cta: sys::LONGCTX_KV_DECODE_MMA_ROWS as usize,
                tile_keys: 16 * w,
                threads: 32 * w,
                tensor_cores: true,
                ctas_per_sm: 4,
            },
            None => {
                let vec = (head_dim / 32).max(8);
                DecodeTiles {
                    rows_per_cta: sys::LONGCTX_KV_DECODE_ROW_ELEMS as usize / vec,
                    tile_keys: sys::LONGCTX_KV_DECODE_TILE_BYTES as usize
                        / (head_dim * dtype.size()),
                    threads: 32 * sys::LONGCTX_KV_DECODE_WARPS as usize,
                    tensor_cores: false,
                    ctas_per_sm: 2,
                }
            }
        }
    }
}

/// How one decode call is split: a pure function of the step's lengths, the head counts,
/// the head dim, the cache dtype and the device's SM count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// KV splits (CTAs per (KV head, row tile, sequence)); 1 writes the output directly.
    pub splits: usize,
    /// Keys per split, a multiple of the tile.
    pub chunk: usize,
    /// Row tiles per KV head.
    pub row_tiles: usize,
    /// The kernel's tiling.
    pub tiles: DecodeTiles,
}

impl DecodePlan {
    /// f32 elements of workspace the call needs: nothing with one split; with several, the
    /// partial O `[splits, total_new, heads_q, head_dim]`, the partial LSE
    /// `[splits, heads_q, total_new]` and one `[heads_q, total_new]` LSE for a call that
    /// asked for none.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the size overflows usize.
    pub fn workspace_len(
        &self,
        total_new: usize,
        heads_q: usize,
        head_dim: usize,
    ) -> Result<usize> {
        if self.splits <= 1 {
            return Ok(0);
        }
        let rows = total_new
            .checked_mul(heads_q)
            .ok_or_else(|| Error::invalid(OP, "workspace", "total_new x heads_q overflows"))?;
        rows.checked_mul(head_dim)
            .and_then(|o| o.checked_add(rows))
            .and_then(|x| x.checked_mul(self.splits))
            .and_then(|x| x.checked_add(rows))
            .ok_or_else(|| Error::invalid(OP, "workspace", "size overflows usize"))
    }
}

/// Plans a decode call.
///
/// With [`Splits::Auto`], a batch whose (sequence, KV head, row tile) CTAs already number
/// at least [`DecodeTiles::ctas_per_sm`] times the SM count runs unsplit; otherwise the
/// longest sequence is cut into enough chunks of at least 256 keys (whole tiles) to reach
/// that count, at most [`MAX_DECODE_SPLITS`].
///
/// # Errors
/// [`Error::InvalidArgument`] for a head dim not in [`DECODE_HEAD_DIMS`], heads that do not
/// group (`heads_q` a multiple of `heads_kv`), more than [`MAX_DECODE_QUERIES`] new tokens in
/// a sequence, `Splits::AtMost(0)` or more than [`MAX_DECODE_SPLITS`], or a grid too large.
pub fn plan_decode(
    step: &ValidatedStep,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    dtype: CacheDType,
    sm_count: usize,
    splits: Splits,
) -> Result<DecodePlan> {
    if !DECODE_HEAD_DIMS.contains(&head_dim) {
        return Err(Error::unsupported(
            OP,
            "head_dim",
            format!("{head_dim}: the decode kernels are built for {DECODE_HEAD_DIMS:?}"),
        ));
    }
    if heads_kv == 0 || heads_q == 0 || heads_q % heads_kv != 0 {
        return Err(Error::invalid(
            OP,
            "heads_q",
            format!("{heads_q} query heads do not group over {heads_kv} KV heads"),
        ));
    }
    if step.max_new > MAX_DECODE_QUERIES {
        return Err(Error::unsupported(
            OP,
            "cu_new",
            format!(
                "a sequence brings {} new tokens; decode takes at most {MAX_DECODE_QUERIES} \
                 (longer chunks are prefill)",
                step.max_new
            ),
        ));
    }
    let tiles = DecodeTiles::new(head_dim, dtype);
    let group = heads_q / heads_kv;
    // Bounded: group <= heads_q and max_new <= 16.
    let row_tiles = (group.saturating_mul(step.max_new))
        .div_ceil(tiles.rows_per_cta)
        .max(1);
    let grid_y = heads_kv.saturating_mul(row_tiles);
    if grid_y > 65_535 || step.batch > 65_535 {
        return Err(Error::invalid(
            OP,
            "heads_q",
            format!(
                "{heads_kv} KV heads x {row_tiles} row tiles and {} sequences exceed the grid",
                step.batch
            ),
        ));
    }
    let round = |keys: usize| keys.div_ceil(tiles.tile_keys).max(1) * tiles.tile_keys;
    let max_len = step.max_seqlen;
    let (splits, chunk) = match splits {
        Splits::AtMost(n) => {
            if n == 0 || n > MAX_DECODE_SPLITS {
                return Err(Error::invalid(
                    OP,
                    "splits",
                    format!("{n} outside 1..={MAX_DECODE_SPLITS}"),
                ));
            }
            let chunk = round(max_len.div_ceil(n));
            (max_len.div_ceil(chunk).max(1), chunk)
        }
        Splits::Auto => {
            let ctas = step.batch.saturating_mul(grid_y);
            let target = tiles.ctas_per_sm * sm_count.max(1);
            if ctas == 0 || ctas >= target || max_len == 0 {
                (1, round(max_len))
            } else {
                let want = target.div_ceil(ctas).min(MAX_DECODE_SPLITS);
                let chunk = round(max_len.div_ceil(want).max(256));
                (max_len.div_ceil(chunk).max(1), chunk)
            }
        }
    };
    if chunk > i32::MAX as usize {
        return Err(Error::invalid(
            OP,
            "cu_new",
            "a split longer than i32::MAX keys",
        ));
    }
    Ok(DecodePlan {
        splits,
        chunk,
        row_tiles,
        tiles,
    })
}

/// The shapes of one decode call, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape<'a> {
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
    /// Elements in the workspace (f32).
    pub workspace_len: usize,
    /// The device's SM count (the split plan's input).
    pub sm_count: usize,
    /// Keys and queries stored un-rotated and rotated on load (see
    /// [`decode_rotating`]), or `None` for a cache of rotated keys.
    pub rotation: Option<RotationShape>,
}

/// A decode call that passed [`DecodeShape::validate`].
#[derive(Debug, Clone)]
pub struct DecodeValidated {
    /// The split plan.
    pub plan: DecodePlan,
    heads_q: usize,
    total_new: usize,
    head_dim: usize,
    consts: SoftmaxConsts,
    window_left: i32,
    q: HeadsLayout,
    o: HeadsLayout,
    lse: Option<LseLayout>,
    cache: CacheShape,
    workspace_needed: usize,
    rotation: Option<RotationShape>,
}

impl DecodeShape<'_> {
    /// Checks everything about a call that does not need the device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (or of kind unsupported) for: an invalid cache
    /// ([`CacheShape::validate`]); what [`plan_decode`] rejects; Q or O not
    /// `[total_new, heads_q, head_dim]` or leaving its buffer (`q`, `o`); an LSE view of
    /// another shape or leaving its buffer (`lse`); a workspace shorter than
    /// [`DecodePlan::workspace_len`] (`workspace`); a softmax scale or softcap that is not
    /// finite and positive; a stride past i64.
    pub fn validate(&self, opts: &DecodeOptions) -> Result<DecodeValidated> {
        self.cache.validate()?;
        let l = &self.cache.layout;
        let d = l.head_dim;
        let heads_q = self.q.heads;
        let plan = plan_decode(
            self.step,
            heads_q,
            l.heads_kv,
            d,
            self.cache.dtype,
            self.sm_count,
            opts.splits,
        )?;
        let total_new = self.step.total_new;
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
        let workspace_needed = plan.workspace_len(total_new, heads_q, d)?;
        if self.workspace_len < workspace_needed {
            return Err(Error::invalid(
                OP,
                "workspace",
                format!(
                    "holds {} f32, the plan ({} splits) needs {workspace_needed}",
                    self.workspace_len, plan.splits
                ),
            ));
        }
        if let Some(r) = self.rotation {
            if r.rotary_dim == 0 || r.rotary_dim % 2 != 0 || r.rotary_dim > d {
                return Err(Error::invalid(
                    OP,
                    "rotation",
                    format!("rotary dim {} must be even and in 2..={d}", r.rotary_dim),
                ));
            }
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
        Ok(DecodeValidated {
            plan,
            heads_q,
            total_new,
            head_dim: d,
            consts,
            window_left,
            q: self.q,
            o: self.o,
            lse: self.lse.map(|x| x.0),
            cache: self.cache,
            workspace_needed,
            rotation: self.rotation,
        })
    }
}

/// Device (or emulated host) addresses of one call's buffers.
pub(crate) struct DecodeAddrs {
    pub q: u64,
    pub o: u64,
    pub lse: u64,
    pub k: u64,
    pub v: u64,
    pub k_scale: u64,
    pub v_scale: u64,
    pub workspace: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub cu_new: u64,
    pub rope_inv_freq: u64,
    pub rope_factor: u64,
}

fn kernel_id(t: DType, s: CacheDType, d: usize) -> Result<KernelId> {
    use KernelId::*;
    let fp8 = s == CacheDType::Fp8E4m3;
    Ok(match (t, fp8, d) {
        (DType::F16, false, 64) => KvDecodeF16Hd64,
        (DType::F16, false, 128) => KvDecodeF16Hd128,
        (DType::F16, false, 256) => KvDecodeF16Hd256,
        (DType::F16, false, 512) => KvDecodeF16Hd512,
        (DType::BF16, false, 64) => KvDecodeBf16Hd64,
        (DType::BF16, false, 128) => KvDecodeBf16Hd128,
        (DType::BF16, false, 256) => KvDecodeBf16Hd256,
        (DType::BF16, false, 512) => KvDecodeBf16Hd512,
        (DType::F16, true, 64) => KvDecodeF16Fp8Hd64,
        (DType::F16, true, 128) => KvDecodeF16Fp8Hd128,
        (DType::F16, true, 256) => KvDecodeF16Fp8Hd256,
        (DType::F16, true, 512) => KvDecodeF16Fp8Hd512,
        (DType::BF16, true, 64) => KvDecodeBf16Fp8Hd64,
        (DType::BF16, true, 128) => KvDecodeBf16Fp8Hd128,
        (DType::BF16, true, 256) => KvDecodeBf16Fp8Hd256,
        (DType::BF16, true, 512) => KvDecodeBf16Fp8Hd512,
        _ => {
            return Err(Error::unsupported(
                OP,
                "dtype",
                format!("no decode kernel for {t:?} queries over a {s:?} cache with head dim {d}"),
            ))
        }
    })
}

fn byte_addr(base: u64, offset: usize, elem: usize, arg: &'static str) -> Result<u64> {
    (offset as u64)
        .checked_mul(elem as u64)
        .and_then(|b| b.checked_add(base))
        .ok_or_else(|| Error::invalid(OP, arg, "offset overflows the address space"))
}

/// The launches of one validated call: the decode kernel, and with several splits the
/// merge of the partial states. Shared by the CUDA and emulated backends. `None` for a
/// call with no query row.
#[allow(clippy::type_complexity)]
pub(crate) fn plan_decode_launch<T: Element, S: CacheElement>(
    step: &ValidatedStep,
    v: &DecodeValidated,
    a: &DecodeAddrs,
) -> Result<
    Option<(
        KernelLaunch<sys::LongctxKvDecodeParams>,
        Option<KernelLaunch<sys::LongctxKvMergeParams>>,
    )>,
> {
    if !cache_matches::<T, S>() {
        return Err(Error::unsupported(
            OP,
            "cache",
            format!(
                "{:?} queries cannot read a {:?} cache (same type, or fp8)",
                T::DTYPE,
                S::CACHE_DTYPE
            ),
        ));
    }
    if v.total_new == 0 || step.batch == 0 {
        return Ok(None);
    }
    if v.rotation.is_some() && (a.rope_inv_freq == 0 || a.rope_factor == 0) {
        return Err(Error::invalid(OP, "rotation", "rotation tables missing"));
    }
    for (addr, arg) in [(a.k, "cache.k"), (a.v, "cache.v")] {
        if addr % 16 != 0 {
            return Err(Error::misaligned(
                OP,
                arg,
                format!("the cache starts at {addr:#x}; the kernel reads 16-byte chunks"),
            ));
        }
    }
    let elem = T::DTYPE.size();
    let q = byte_addr(a.q, v.q.offset, elem, "q")?;
    let o = byte_addr(a.o, v.o.offset, elem, "o")?;
    let (lse, lse_stride) = match v.lse {
        Some(l) => (byte_addr(a.lse, l.offset, 4, "lse")?, l.head_stride),
        None => (0, 0),
    };
    let plan = &v.plan;
    let rows = v.total_new * v.heads_q; // fits: bounded by the Q buffer
    let part_o = a.workspace;
    let part_lse = byte_addr(a.workspace, plan.splits * rows * v.head_dim, 4, "workspace")?;
    let l = &v.cache.layout;
    let params = sys::LongctxKvDecodeParams {
        cache: cache_params(&v.cache, a.k, a.v, a.k_scale, a.v_scale),
        step: step_params(step, a.block_table, a.seqlens, a.cu_new),
        q,
        q_token_stride: v.q.token_stride as i64,
        q_head_stride: v.q.head_stride as i64,
        o,
        o_token_stride: v.o.token_stride as i64,
        o_head_stride: v.o.head_stride as i64,
        lse,
        lse_head_stride: lse_stride as i64,
        part_o: if plan.splits > 1 { part_o } else { 0 },
        part_lse: if plan.splits > 1 { part_lse } else { 0 },
        heads_q: v.heads_q as u32,
        heads_per_kv: (v.heads_q / l.heads_kv) as u32,
        row_tiles: plan.row_tiles as u32,
        splits: plan.splits as u32,
        chunk: plan.chunk as u32,
        total_new: v.total_new as u32,
        window_left: v.window_left,
        exp_scale: v.consts.exp_scale,
        softcap_in: v.consts.softcap_in,
        rotary_dim: v.rotation.map_or(0, |r| r.rotary_dim as u32),
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
        rope_style: match v.rotation.map(|r| r.style) {
            Some(RopeStyle::Interleaved) => sys::LONGCTX_ROPE_STYLE_INTERLEAVED,
            _ => sys::LONGCTX_ROPE_STYLE_NEOX,
        },
        rope_angle_mode: match v.rotation.map(|r| r.precision) {
            Some(AnglePrecision::F32) => sys::LONGCTX_ROPE_ANGLE_F32,
            _ => sys::LONGCTX_ROPE_ANGLE_F64,
        },
    };
    let decode = KernelLaunch {
        id: kernel_id(T::DTYPE, S::CACHE_DTYPE, v.head_dim)?,
        params,
        grid: (
            plan.splits as u32,
            (l.heads_kv * plan.row_tiles) as u32,
            step.batch as u32,
        ),
        block: (plan.tiles.threads as u32, 1, 1),
        smem_bytes: 0,
    };
    if plan.splits == 1 {
        return Ok(Some((decode, None)));
    }
    let merge = SplitMerge {
        splits: plan.splits,
        total_new: v.total_new,
        heads: v.heads_q,
        dv: v.head_dim,
        out_o: v.o,
        out_lse: v.lse,
        workspace_needed: v.workspace_needed,
    }
    .plan(T::DTYPE, a.workspace, a.o, a.lse)?;
    Ok(Some((decode, merge)))
}

/// Where a split call's f32 partial states sit in its workspace and where the merge writes:
/// partial O `[splits, total_new, heads, dv]` at the start, partial LSE `[splits, heads,
/// total_new]` after it, and (when the caller asked for no LSE) the merged LSE after that.
pub(crate) struct SplitMerge {
    pub splits: usize,
    pub total_new: usize,
    pub heads: usize,
    pub dv: usize,
    /// The caller's O view (checked against its buffer by the caller).
    pub out_o: HeadsLayout,
    /// The caller's LSE view, if any (checked by the caller).
    pub out_lse: Option<LseLayout>,
    /// f32 elements of workspace the plan needs.
    pub workspace_needed: usize,
}

impl SplitMerge {
    /// The merge launch of the partial states into the caller's O (of `out`) and LSE.
    pub(crate) fn plan(
        &self,
        out: DType,
        workspace: u64,
        o: u64,
        lse: u64,
    ) -> Result<Option<KernelLaunch<sys::LongctxKvMergeParams>>> {
        let rows = self.total_new * self.heads; // fits: bounded by the O buffer
        let lse_at = self.splits * rows * self.dv;
        let (out_lse, out_lse_addr, out_lse_len) = match self.out_lse {
            Some(l) => (l, lse, usize::MAX),
            None => (
                LseLayout {
                    offset: lse_at + self.splits * rows,
                    heads: self.heads,
                    tokens: self.total_new,
                    head_stride: self.total_new,
                },
                workspace,
                self.workspace_needed,
            ),
        };
        let parts = StackedStates {
            parts: self.splits,
            o: HeadsLayout::contiguous(self.total_new, self.heads, self.dv),
            o_part_stride: rows * self.dv,
            lse: LseLayout {
                offset: lse_at,
                heads: self.heads,
                tokens: self.total_new,
                head_stride: self.total_new,
            },
            lse_part_stride: rows,
        };
        // The caller's views were checked against their buffers; the merge re-checks the
        // workspace views (usize::MAX stands for "already checked").
        let m = MergeShape {
            parts,
            parts_o_len: self.workspace_needed,
            parts_lse_len: self.workspace_needed,
            out_o: self.out_o,
            out_o_len: usize::MAX,
            out_lse,
            out_lse_len,
        }
        .validate()?;
        plan_merge_typed(
            DType::F32,
            out,
            &m,
            &MergeOptions::default(),
            &MergeAddrs {
                parts_o: workspace,
                parts_lse: workspace,
                out_o: o,
                out_lse: out_lse_addr,
            },
        )
    }
}

/// The output of a decode call.
pub struct DecodeOutput<'a, T> {
    /// Receives O, `[total_new, heads_q, head_dim]`.
    pub o: &'a mut dyn DevicePtrMut<T>,
    /// Its view.
    pub o_layout: HeadsLayout,
    /// Receives the LSE (f32, natural log, -inf for a row that saw no key), if given.
    pub lse: Option<(&'a mut dyn DevicePtrMut<f32>, LseLayout)>,
}

impl<T> std::fmt::Debug for DecodeOutput<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeOutput")
            .field("o_len", &self.o.len())
            .field("o_layout", &self.o_layout)
            .field("lse", &self.lse.as_ref().map(|(b, l)| (b.len(), *l)))
            .finish()
    }
}

/// Attention of each sequence's new tokens (its last 1 to [`MAX_DECODE_QUERIES`]
/// positions, causal among themselves) over its paged cache, with GQA packing and split-KV,
/// on `dev`'s stream. `q` is `[total_new, heads_q, head_dim]` (rotated already); query head
/// h reads KV head `h / (heads_q / heads_kv)`. `workspace` holds
/// [`DecodePlan::workspace_len`] f32 (from [`plan_decode`] with `dev.sm_count()`), and may
/// be `None` when that is 0. One or two launches, nothing allocated.
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`DecodeShape::validate`] rejects, a cache
/// whose layout differs from the step's, a cache dtype the query dtype cannot read, a
/// cache not starting on 16 bytes, a buffer of another context, or a device older than
/// sm_80; [`Error::KernelsNotCompiled`] without kernels; [`Error::Cuda`] if a launch fails.
#[allow(clippy::too_many_arguments)]
pub fn decode<T: Element, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    q: &dyn DevicePtr<T>,
    q_layout: &HeadsLayout,
    cache: &PagedCache<S>,
    out: DecodeOutput<T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    opts: &DecodeOptions,
) -> Result<()> {
    decode_impl(dev, step, None, q, q_layout, cache, out, workspace, opts)
}

/// [`decode`] over a cache whose keys are stored un-rotated (appended without RoPE), with
/// un-rotated queries: the kernel rotates every key it reads at its position, and each query
/// at its position, with the sequence's rotation at its current length from `rotation`
/// ([`KvRotation::upload`] for this step). With a static rule this gives what a cache of
/// keys rotated at append time gives (bit for bit on the emulator); with dynamic scaling
/// (HF's dynamic NTK, dynamic YaRN) every key gets the current length's rotation, which a
/// rotated cache cannot. Every head dim of [`DECODE_HEAD_DIMS`] and every cache type; an
/// fp8 key is rotated after widening, before its scale: the codes (value / 256) are rotated
/// and rounded to `T`, and 256 x the scale multiplies the score, at every head dim.
///
/// # Errors
/// As [`decode`], plus tables made for another step or head dim (`rotation`), a rotary dim
/// that is odd or above the head dim.
#[allow(clippy::too_many_arguments)]
pub fn decode_rotating<T: Element, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    rotation: &KvRotation,
    q: &dyn DevicePtr<T>,
    q_layout: &HeadsLayout,
    cache: &PagedCache<S>,
    out: DecodeOutput<T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    opts: &DecodeOptions,
) -> Result<()> {
    if !dev.owns(rotation.inv_freq()) {
        return Err(Error::invalid(
            OP,
            "rotation",
            "lives on another device context",
        ));
    }
    rotation.check_step(step.validated(), step.layout().head_dim)?;
    decode_impl(
        dev,
        step,
        Some(rotation),
        q,
        q_layout,
        cache,
        out,
        workspace,
        opts,
    )
}

#[allow(clippy::too_many_arguments)]
fn decode_impl<T: Element, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    rotation: Option<&KvRotation>,
    q: &dyn DevicePtr<T>,
    q_layout: &HeadsLayout,
    cache: &PagedCache<S>,
    out: DecodeOutput<T>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    opts: &DecodeOptions,
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
    if let Some(w) = &workspace {
        owned.push((dev.owns_any(&**w), "workspace"));
    }
    if let Some((_, arg)) = owned.iter().find(|x| !x.0) {
        return Err(Error::invalid(OP, arg, "lives on another device context"));
    }
    check_arch(dev)?;
    let scales = match cache.scales {
        KvScales::None => None,
        KvScales::Fp8 { mode, k, v } => Some((mode, k.len(), v.len())),
    };
    let sv = step.validated();
    let v = DecodeShape {
        step: sv,
        cache: CacheShape::of::<S>(cache.layout, cache.k.len(), cache.v.len(), scales),
        q: *q_layout,
        q_len: q.len(),
        o: out.o_layout,
        o_len: out.o.len(),
        lse: out.lse.as_ref().map(|(b, l)| (*l, b.len())),
        workspace_len: workspace.as_ref().map_or(0, |w| w.len()),
        sm_count: dev.sm_count(),
        rotation: rotation.map(KvRotation::shape),
    }
    .validate(opts)?;
    let stream = dev.stream();
    let (qp, _g0) = q.device_ptr(stream);
    let (kp, _g1) = cache.k.device_ptr(stream);
    let (vp, _g2) = cache.v.device_ptr(stream);
    let (ksp, vsp, _g3, _g4) = match cache.scales {
        KvScales::None => (0, 0, None, None),
        KvScales::Fp8 { k, v, .. } => {
            let (a, ga) = k.device_ptr(stream);
            let (b, gb) = v.device_ptr(stream);
            (a, b, Some(ga), Some(gb))
        }
    };
    let (bt, _g5) = step.block_table().device_ptr(stream);
    let (sl, _g6) = step.seqlens().device_ptr(stream);
    let (cn, _g7) = step.cu_new().device_ptr(stream);
    let DecodeOutput { o, lse, .. } = out;
    let (op, _g8) = o.device_ptr_mut(stream);
    let (lp, _g9) = match lse {
        Some((l, _)) => {
            let (p, g) = l.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (wp, _g10) = match workspace {
        Some(w) => {
            let (p, g) = w.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (rope_if, rope_f, _g11, _g12) = match rotation {
        Some(r) => {
            let (a, ga) = r.inv_freq().device_ptr(stream);
            let (b, gb) = r.factor().device_ptr(stream);
            (a, b, Some(ga), Some(gb))
        }
        None => (0, 0, None, None),
    };
    let addrs = DecodeAddrs {
        q: qp,
        o: op,
        lse: lp,
        k: kp,
        v: vp,
        k_scale: ksp,
        v_scale: vsp,
        workspace: wp,
        block_table: bt,
        seqlens: sl,
        cu_new: cn,
        rope_inv_freq: rope_if,
        rope_factor: rope_f,
    };
    // SAFETY: the buffers are live allocations of this context (owns_any above), borrowed
    // (the outputs mutably, so no input aliases them) until the launches are queued.
    unsafe { launch_validated::<T, S>(dev, sv, &v, &addrs) }
}

fn check_arch(dev: &Device) -> Result<()> {
    let cc = dev.compute_capability();
    if cc < (8, 0) {
        return Err(Error::invalid(
            OP,
            "device",
            format!(
                "the kernels need sm_80 or newer; this device is sm_{}{}",
                cc.0, cc.1
            ),
        ));
    }
    Ok(())
}

/// Plans and queues the launches of a validated call at these addresses.
///
/// # Safety
/// Every address is the start of a live allocation of `dev`'s context holding the length
/// `v` was validated with; the outputs (O, LSE, workspace) overlap no input and no other
/// work touches them until the launches complete; the step arrays are those of a
/// `KvStep` validated against the cache's layout.
unsafe fn launch_validated<T: Element, S: CacheElement>(
    dev: &Device,
    sv: &ValidatedStep,
    v: &DecodeValidated,
    addrs: &DecodeAddrs,
) -> Result<()> {
    let Some((dl, ml)) = plan_decode_launch::<T, S>(sv, v, addrs)? else {
        return Ok(());
    };
    let stream = dev.stream();
    let func = dev.function(dl.id)?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(&dl.params);
    // SAFETY: the step's device arrays were validated against the cache's layout when the
    // KvStep was built (every used page id in range, every table row long enough, lengths
    // and new-token offsets consistent); DecodeShape::validate proved the cache buffers
    // hold the whole layout (and scales of the right length for fp8), the Q, O and LSE
    // views inside their buffers, the workspace large enough for the plan, and every count
    // and stride within the kernel's fields; plan_decode_launch checked the cache's 16-byte
    // alignment and the dtype pair; the caller guarantees the addresses (see above).
    unsafe { builder.launch(dl.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))?;
    if let Some(ml) = ml {
        let func = dev.function(ml.id)?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&ml.params);
        // SAFETY: the merge reads the workspace regions the decode launch just wrote (same
        // stream, so ordered after it) and writes the caller's O and LSE views, all
        // checked by MergeShape::validate inside plan_decode_launch and by
        // DecodeShape::validate.
        unsafe { builder.launch(ml.config()) }
            .map(|_| ())
            .map_err(cuda_err(OP))?;
    }
    Ok(())
}

/// [`decode`] on raw device pointers (burn/cubecl-style frameworks). The step is a
/// [`KvStep`] (its device tables were validated when it was built); everything else
/// [`decode`] checks about shapes, lengths, alignment and options is checked here too.
/// `scales` gives an fp8 cache's scale layout and its K and V scale buffers; `lse` the LSE
/// buffer and view; `workspace` the f32 workspace.
///
/// # Safety
/// Each pointer is the start of a live device allocation (or a part of one) of `dev`'s CUDA
/// context holding at least `len` elements (`S` for the cache, `T` for Q and O, `f32` for
/// scales, LSE and workspace); O, the LSE and the workspace overlap each other and no input;
/// no other work writes the inputs or touches the outputs until the launches, queued on
/// `dev`'s stream, complete; the memory stays allocated until then.
///
/// # Errors
/// As [`decode`], plus [`Error::InvalidArgument`] of kind alignment for a pointer that is
/// not a multiple of its element size.
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_raw<T: Element, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    q: RawTensor,
    cache_k: RawBuffer,
    cache_v: RawBuffer,
    scales: Option<(ScaleMode, RawBuffer, RawBuffer)>,
    o: RawTensor,
    lse: Option<(RawBuffer, LseLayout)>,
    workspace: Option<RawBuffer>,
    opts: &DecodeOptions,
) -> Result<()> {
    if !dev.owns(step.block_table()) {
        return Err(Error::invalid(
            OP,
            "step",
            "lives on another device context",
        ));
    }
    check_arch(dev)?;
    let elem = T::DTYPE.size();
    check_element_alignment(OP, "q", q.ptr, elem)?;
    check_element_alignment(OP, "o", o.ptr, elem)?;
    for (arg, b) in [
        ("lse", lse.map(|l| l.0)),
        ("workspace", workspace),
        ("cache.k_scale", scales.map(|s| s.1)),
        ("cache.v_scale", scales.map(|s| s.2)),
    ] {
        if let Some(b) = b {
            check_element_alignment(OP, arg, b.ptr, 4)?;
        }
    }
    let sv = step.validated();
    let v = DecodeShape {
        step: sv,
        cache: CacheShape::of::<S>(
            *step.layout(),
            cache_k.len,
            cache_v.len,
            scales.map(|(m, k, v)| (m, k.len, v.len)),
        ),
        q: q.layout,
        q_len: q.len,
        o: o.layout,
        o_len: o.len,
        lse: lse.map(|(b, l)| (l, b.len)),
        workspace_len: workspace.map_or(0, |w| w.len),
        sm_count: dev.sm_count(),
        rotation: None,
    }
    .validate(opts)?;
    let stream = dev.stream();
    let (bt, _g0) = step.block_table().device_ptr(stream);
    let (sl, _g1) = step.seqlens().device_ptr(stream);
    let (cn, _g2) = step.cu_new().device_ptr(stream);
    let addrs = DecodeAddrs {
        q: q.ptr,
        o: o.ptr,
        lse: lse.map_or(0, |l| l.0.ptr),
        k: cache_k.ptr,
        v: cache_v.ptr,
        k_scale: scales.map_or(0, |s| s.1.ptr),
        v_scale: scales.map_or(0, |s| s.2.ptr),
        workspace: workspace.map_or(0, |w| w.ptr),
        block_table: bt,
        seqlens: sl,
        cu_new: cn,
        rope_inv_freq: 0,
        rope_factor: 0,
    };
    // SAFETY: the caller's contract for the raw buffers; the step's arrays are this
    // handle's own, guarded until the launches are queued.
    unsafe { launch_validated::<T, S>(dev, sv, &v, &addrs) }
}
