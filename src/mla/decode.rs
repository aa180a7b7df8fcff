//! MLA's absorbed decode over a paged latent cache: the cache's layouts, validation, the
//! split-KV plan, the launch plan shared by the CUDA path and the emulator, and the CUDA op.
//! kernels/kv_cache/mla_decode_kernel.cuh has the kernel.
//!
//! The cache is the paged layout of [`PagedKvLayout`] with one KV head of
//! [`MLA_LATENT_DIM`] = 576 channels per token: the latent `c_kv` (512) then the rotated
//! `k_pe` (64). A bf16 cache is that one tensor `[pages, page_size, 1, 576]`; an fp8 cache
//! splits it into the e4m3 codes of `c_kv` `[pages, page_size, 1, 512]`, one f32 scale per
//! token `[pages, page_size, 1]` (value = code x scale) and `k_pe` in bf16
//! `[pages, page_size, 1, 64]` (644 bytes a token). The step's layout is always the
//! 576-channel one.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use crate::attention::SoftmaxConsts;
use crate::device::{cuda_err, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::kv_cache::{
    step_params, DecodeOutput, Fp8E4m3, KvStep, LseLayout, PagedKvLayout, SplitMerge, Splits,
    ValidatedStep, MAX_DECODE_QUERIES, MAX_DECODE_SPLITS,
};
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, HeadsLayout, RawBuffer, RawTensor};
use crate::sys;

use super::MlaConfig;

const OP: &str = "mla_decode";

/// Latent channels `kv_lora_rank` the kernel is built for (DeepSeek-V2/V3).
pub const MLA_KV_LORA_RANK: usize = 512;
/// Rotated key channels `qk_rope_head_dim` the kernel is built for.
pub const MLA_ROPE_DIM: usize = 64;
/// Channels of the absorbed query and of a cached key: `c_kv` then `k_pe`.
pub const MLA_LATENT_DIM: usize = MLA_KV_LORA_RANK + MLA_ROPE_DIM;
/// The most query heads one call takes (DeepSeek-V3 has 128; a tensor-parallel shard
/// fewer).
pub const MAX_MLA_HEADS: usize = 128;

/// The step layout of a latent cache of `pages` pages of `page_size` tokens: one KV head of
/// [`MLA_LATENT_DIM`] channels.
pub fn latent_layout(pages: usize, page_size: usize) -> PagedKvLayout {
    PagedKvLayout {
        page_size,
        pages,
        heads_kv: 1,
        head_dim: MLA_LATENT_DIM,
    }
}

/// A latent cache on the device (layout: the step's, see [`latent_layout`]).
#[derive(Clone, Copy)]
pub enum LatentCache<'a> {
    /// `[pages, page_size, 1, 576]` bf16: `c_kv` then `k_pe` per token.
    Bf16 {
        /// The cache.
        latent: &'a dyn DevicePtr<bf16>,
    },
    /// `c_kv` as e4m3 codes with one f32 scale per token, `k_pe` in bf16.
    Fp8 {
        /// Codes, `[pages, page_size, 1, 512]`.
        latent: &'a dyn DevicePtr<Fp8E4m3>,
        /// Scales, `[pages, page_size, 1]`.
        scales: &'a dyn DevicePtr<f32>,
        /// `k_pe`, `[pages, page_size, 1, 64]`.
        rope: &'a dyn DevicePtr<bf16>,
    },
}

impl std::fmt::Debug for LatentCache<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LatentCache::Bf16 { latent } => f
                .debug_struct("Bf16")
                .field("latent_len", &latent.len())
                .finish(),
            LatentCache::Fp8 {
                latent,
                scales,
                rope,
            } => f
                .debug_struct("Fp8")
                .field("latent_len", &latent.len())
                .field("scales_len", &scales.len())
                .field("rope_len", &rope.len())
                .finish(),
        }
    }
}

/// The buffer lengths of a latent cache, checkable without a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentCacheShape {
    /// bf16: elements of the one tensor.
    Bf16 {
        /// Elements of `latent`.
        latent_len: usize,
    },
    /// fp8: elements of the codes, the scales and `k_pe`.
    Fp8 {
        /// Codes.
        latent_len: usize,
        /// Scales.
        scales_len: usize,
        /// `k_pe` elements.
        rope_len: usize,
    },
}

impl LatentCacheShape {
    fn is_fp8(&self) -> bool {
        matches!(self, LatentCacheShape::Fp8 { .. })
    }

    /// Checks that `layout` is a latent layout and that the buffers hold every slot.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid layout or one that is not one head of
    /// [`MLA_LATENT_DIM`] channels (`cache`), or a buffer too short (`cache.latent`,
    /// `cache.scales`, `cache.rope`).
    pub fn validate(&self, layout: &PagedKvLayout) -> Result<()> {
        if layout.heads_kv != 1 || layout.head_dim != MLA_LATENT_DIM {
            return Err(Error::invalid(
                OP,
                "cache",
                format!(
                    "layout has {} KV heads of {} channels; a latent cache has 1 of \
                     {MLA_LATENT_DIM}",
                    layout.heads_kv, layout.head_dim
                ),
            ));
        }
        let elems = layout.validate()?;
        let slots = elems / MLA_LATENT_DIM;
        let need = |arg: &'static str, len: usize, per: usize| -> Result<()> {
            // slots x per <= slots x 576 = elems: no overflow.
            let want = slots * per;
            if len < want {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!("holds {len} elements, the layout {layout:?} needs {want}"),
                ));
            }
            Ok(())
        };
        match *self {
            LatentCacheShape::Bf16 { latent_len } => need("cache.latent", latent_len, 576),
            LatentCacheShape::Fp8 {
                latent_len,
                scales_len,
                rope_len,
            } => {
                need("cache.latent", latent_len, MLA_KV_LORA_RANK)?;
                need("cache.scales", scales_len, 1)?;
                need("cache.rope", rope_len, MLA_ROPE_DIM)
            }
        }
    }
}

/// Per-call options of [`decode_absorbed`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaDecodeOptions {
    /// Multiplies `q_lat . k` (the model's, [`MlaConfig::softmax_scale`]; not
    /// `576^-0.5`).
    pub softmax_scale: f32,
    /// KV splitting.
    pub splits: Splits,
    /// Lets the plan run the thread-block-cluster kernels where the loaded code has them
    /// ([`Device::cluster_kernels`]); false keeps the 64-row kernel without clusters (to
    /// compare the two). A caller sizing the workspace passes `dev.cluster_kernels() &&
    /// clusters` to [`plan_mla_decode`].
    pub clusters: bool,
}

impl MlaDecodeOptions {
    /// The config's softmax scale, splits chosen automatically, clusters where the device
    /// runs them.
    pub fn new(cfg: &MlaConfig) -> Self {
        MlaDecodeOptions {
            softmax_scale: cfg.softmax_scale as f32,
            splits: Splits::Auto,
            clusters: true,
        }
    }
}

/// How one call is split: a pure function of the step's lengths, the head count and the
/// device's SM count and shared memory per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDecodePlan {
    /// KV splits (CTAs per (row tile, sequence)); 1 writes the output directly.
    pub splits: usize,
    /// Keys per split, a multiple of the kernel's key tile.
    pub chunk: usize,
    /// (query token, head) rows per CTA: [`MLA_ROWS_NARROW`] or [`MLA_ROWS_WIDE`] (which
    /// kernel runs).
    pub rows_per_tile: usize,
    /// Row tiles per sequence (a multiple of `cluster`).
    pub row_tiles: usize,
    /// CTAs per thread-block cluster: 1, or 2 / 4 ([`MLA_MAX_CLUSTER`]) when that many
    /// 64-row CTAs share each latent tile they read (sm_90a code; more than 64 / 128 rows
    /// per sequence).
    pub cluster: usize,
}

impl MlaDecodePlan {
    /// f32 elements of workspace the call needs: nothing with one split; with several, the
    /// partial O `[splits, total_new, heads, 512]`, the partial LSE `[splits, heads,
    /// total_new]` and one `[heads, total_new]` LSE for a call that asked for none.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the size overflows usize.
    pub fn workspace_len(&self, total_new: usize, heads: usize) -> Result<usize> {
        if self.splits <= 1 {
            return Ok(0);
        }
        total_new
            .checked_mul(heads)
            .and_then(|rows| {
                rows.checked_mul(MLA_KV_LORA_RANK + 1)
                    .and_then(|x| x.checked_mul(self.splits))
                    .and_then(|x| x.checked_add(rows))
            })
            .ok_or_else(|| Error::invalid(OP, "workspace", "size overflows usize"))
    }
}

/// Keys per tile of the kernel.
pub const MLA_TILE_KEYS: usize = sys::LONGCTX_MLA_DECODE_TILE_KEYS as usize;
/// Rows per CTA of the kernel that runs on every sm_80+ part (4 warps, under 99 KB of
/// shared memory).
pub const MLA_ROWS_NARROW: usize = sys::LONGCTX_MLA_DECODE_ROWS as usize;
/// Rows per CTA of the kernel for parts with at least [`MLA_WIDE_SMEM_BYTES`] of shared
/// memory per block (A100, H100, H200: 8 warps; DeepSeek-V3's 128 heads read each latent
/// byte in 2 CTAs instead of 8).
pub const MLA_ROWS_WIDE: usize = sys::LONGCTX_MLA_DECODE_R64_ROWS as usize;
/// The shared memory per block (opt-in) a device needs for the 64-row kernel (its fp8
/// variant's, the larger).
pub const MLA_WIDE_SMEM_BYTES: usize = sys::LONGCTX_MLA_DECODE_R64_SMEM_FP8 as usize;
/// The largest thread-block cluster of the clustered 64-row kernels (sm_90a): 2 or 4 CTAs
/// take consecutive row tiles of a sequence, each copies its part of every key tile from
/// global memory and writes it into every CTA's shared memory, so DeepSeek-V3's 128 heads
/// (times 2 MTP tokens: 256 rows, 4 CTAs) read each latent byte once.
pub const MLA_MAX_CLUSTER: usize = sys::LONGCTX_MLA_DECODE_MAX_CLUSTER as usize;
/// The shared memory per block (opt-in) the clustered kernels need (their bf16 variant's,
/// the larger: three key tiles in flight).
pub const MLA_CLUSTER_SMEM_BYTES: usize = sys::LONGCTX_MLA_DECODE_CLUSTER_SMEM_BF16 as usize;

/// Plans a call. The kernel: 64 rows per CTA when a sequence has more than 16 (query
/// token, head) rows and `smem_per_block` (the device's opt-in maximum,
/// [`Device::smem_per_block`]) holds [`MLA_WIDE_SMEM_BYTES`], else 16; with more than 64
/// rows and `clusters` (the loaded code runs thread-block clusters,
/// [`Device::cluster_kernels`]: sm_90a code on an H100 / H200) and `smem_per_block` holding
/// [`MLA_CLUSTER_SMEM_BYTES`], the 64-row CTAs of a
/// sequence run in one thread-block cluster (2 for up to 128 rows, 4 for up to 256) that
/// shares every latent tile. With
/// [`Splits::Auto`], a batch whose (sequence, row tile) CTAs number at least the SM count
/// times the CTAs an SM holds (2 of 16 rows on an H100, 1 of 64) runs unsplit; otherwise
/// the longest sequence is cut into enough chunks of at least 256 keys (whole tiles) to
/// reach that count, at most [`MAX_DECODE_SPLITS`].
///
/// # Errors
/// [`Error::InvalidArgument`] for `heads` outside 1..=[`MAX_MLA_HEADS`], more than
/// [`MAX_DECODE_QUERIES`] new tokens in a sequence (unsupported), `Splits::AtMost(0)` or
/// more than [`MAX_DECODE_SPLITS`], or a grid too large.
pub fn plan_mla_decode(
    step: &ValidatedStep,
    heads: usize,
    sm_count: usize,
    smem_per_block: usize,
    clusters: bool,
    splits: Splits,
) -> Result<MlaDecodePlan> {
    if heads == 0 || heads > MAX_MLA_HEADS {
        return Err(Error::invalid(
            OP,
            "heads",
            format!("{heads} outside 1..={MAX_MLA_HEADS}"),
        ));
    }
    if step.max_new > MAX_DECODE_QUERIES {
        return Err(Error::unsupported(
            OP,
            "cu_new",
            format!(
                "a sequence brings {} new tokens; decode takes at most {MAX_DECODE_QUERIES}",
                step.max_new
            ),
        ));
    }
    // Bounded: heads <= 128, max_new <= 16.
    let rows = heads * step.max_new;
    let wide = rows > MLA_ROWS_NARROW && smem_per_block >= MLA_WIDE_SMEM_BYTES;
    let (rows_per_tile, ctas_per_sm) = if wide {
        (MLA_ROWS_WIDE, 1)
    } else {
        (MLA_ROWS_NARROW, 2)
    };
    // Bounded: rows <= 128 x 16 = 2048, so at most 32 tiles of 64.
    let cluster =
        if wide && clusters && rows > MLA_ROWS_WIDE && smem_per_block >= MLA_CLUSTER_SMEM_BYTES {
            rows.div_ceil(MLA_ROWS_WIDE)
                .next_power_of_two()
                .min(MLA_MAX_CLUSTER)
        } else {
            1
        };
    let row_tiles = rows
        .div_ceil(rows_per_tile)
        .max(1)
        .next_multiple_of(cluster);
    if step.batch > 65_535 {
        return Err(Error::invalid(
            OP,
            "cu_new",
            format!("{} sequences exceed the grid", step.batch),
        ));
    }
    let round = |keys: usize| keys.div_ceil(MLA_TILE_KEYS).max(1) * MLA_TILE_KEYS;
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
            let ctas = step.batch.saturating_mul(row_tiles);
            let target = ctas_per_sm * sm_count.max(1);
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
    Ok(MlaDecodePlan {
        splits,
        chunk,
        rows_per_tile,
        row_tiles,
        cluster,
    })
}

/// The shapes of one call, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct MlaDecodeShape<'a> {
    /// The step (validated against the cache's layout).
    pub step: &'a ValidatedStep,
    /// The step's layout ([`latent_layout`]).
    pub layout: PagedKvLayout,
    /// The cache's buffers.
    pub cache: LatentCacheShape,
    /// `q_lat`, `[total_new, heads, 576]`.
    pub q: HeadsLayout,
    /// Elements in Q's buffer.
    pub q_len: usize,
    /// `o_lat`, `[total_new, heads, 512]`.
    pub o: HeadsLayout,
    /// Elements in O's buffer.
    pub o_len: usize,
    /// The LSE view `[heads, total_new]` and its buffer's length, if asked for.
    pub lse: Option<(LseLayout, usize)>,
    /// Elements in the workspace (f32).
    pub workspace_len: usize,
    /// The device's SM count (the split plan's input).
    pub sm_count: usize,
    /// The device's opt-in shared memory per block (picks the kernel).
    pub smem_per_block: usize,
    /// Whether the loaded code runs the clustered kernel ([`Device::cluster_kernels`]).
    pub clusters: bool,
}

/// A call that passed [`MlaDecodeShape::validate`].
#[derive(Debug, Clone)]
pub struct MlaDecodeValidated {
    /// The split plan.
    pub plan: MlaDecodePlan,
    heads: usize,
    total_new: usize,
    exp_scale: f32,
    q: HeadsLayout,
    o: HeadsLayout,
    lse: Option<LseLayout>,
    layout: PagedKvLayout,
    fp8: bool,
    workspace_needed: usize,
}

impl MlaDecodeShape<'_> {
    /// Checks everything about a call that does not need the device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (or of kind unsupported) for: an invalid cache
    /// ([`LatentCacheShape::validate`]); what [`plan_mla_decode`] rejects; Q not
    /// `[total_new, heads, 576]` or O not `[total_new, heads, 512]`, or either leaving its
    /// buffer (`q`, `o`); Q strides that are not multiples of 8 elements (`q`, alignment:
    /// the kernel reads Q in 16-byte chunks); an LSE view of another shape or leaving its
    /// buffer (`lse`); a workspace shorter than [`MlaDecodePlan::workspace_len`]
    /// (`workspace`); a softmax scale that is not finite and positive; a stride past i64.
    pub fn validate(&self, opts: &MlaDecodeOptions) -> Result<MlaDecodeValidated> {
        self.cache.validate(&self.layout)?;
        let heads = self.q.heads;
        let plan = plan_mla_decode(
            self.step,
            heads,
            self.sm_count,
            self.smem_per_block,
            self.clusters && opts.clusters,
            opts.splits,
        )?;
        let total_new = self.step.total_new;
        for (arg, x, len, d) in [
            ("q", &self.q, self.q_len, MLA_LATENT_DIM),
            ("o", &self.o, self.o_len, MLA_KV_LORA_RANK),
        ] {
            if (x.tokens, x.heads, x.head_dim) != (total_new, heads, d) {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "shape [{}, {}, {}], expected [total_new {total_new}, heads {heads}, {d}]",
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
        let q = &self.q;
        if q.token_stride % 8 != 0 || q.head_stride % 8 != 0 || q.offset % 8 != 0 {
            return Err(Error::misaligned(
                OP,
                "q",
                format!(
                    "offset {} and strides ({}, {}) must be multiples of 8 elements: the \
                     kernel reads Q in 16-byte chunks",
                    q.offset, q.token_stride, q.head_stride
                ),
            ));
        }
        if let Some((lse, len)) = self.lse {
            if (lse.heads, lse.tokens) != (heads, total_new) {
                return Err(Error::invalid(
                    OP,
                    "lse",
                    format!(
                        "shape [{}, {}], expected [heads {heads}, total_new {total_new}]",
                        lse.heads, lse.tokens
                    ),
                ));
            }
            lse.validate("lse", len)?;
            i64::try_from(lse.head_stride)
                .map_err(|_| Error::invalid(OP, "lse", "head stride exceeds i64"))?;
        }
        let workspace_needed = plan.workspace_len(total_new, heads)?;
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
        let consts = SoftmaxConsts::new(opts.softmax_scale, None)?;
        Ok(MlaDecodeValidated {
            plan,
            heads,
            total_new,
            exp_scale: consts.exp_scale,
            q: self.q,
            o: self.o,
            lse: self.lse.map(|x| x.0),
            layout: self.layout,
            fp8: self.cache.is_fp8(),
            workspace_needed,
        })
    }
}

/// Device (or emulated host) addresses of one call's buffers.
pub(crate) struct MlaDecodeAddrs {
    pub q: u64,
    pub o: u64,
    pub lse: u64,
    pub latent: u64,
    pub scales: u64,
    pub rope: u64,
    pub workspace: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub cu_new: u64,
}

fn byte_addr(base: u64, offset: usize, elem: usize, arg: &'static str) -> Result<u64> {
    (offset as u64)
        .checked_mul(elem as u64)
        .and_then(|b| b.checked_add(base))
        .ok_or_else(|| Error::invalid(OP, arg, "offset overflows the address space"))
}

/// Dynamic shared memory of the kernel a plan runs, from its `rows_per_tile`
/// ([`MLA_ROWS_NARROW`] or [`MLA_ROWS_WIDE`]) and `cluster` (1, or 2 / 4 for the clustered
/// kernels, which keep three key tiles in flight) for a bf16 or fp8 cache.
pub fn mla_decode_smem_bytes(fp8: bool, rows_per_tile: usize, cluster: usize) -> usize {
    let bytes = match (rows_per_tile == MLA_ROWS_WIDE, cluster > 1, fp8) {
        (false, _, false) => sys::LONGCTX_MLA_DECODE_SMEM_BF16,
        (false, _, true) => sys::LONGCTX_MLA_DECODE_SMEM_FP8,
        (true, false, false) => sys::LONGCTX_MLA_DECODE_R64_SMEM_BF16,
        (true, false, true) => sys::LONGCTX_MLA_DECODE_R64_SMEM_FP8,
        (true, true, false) => sys::LONGCTX_MLA_DECODE_CLUSTER_SMEM_BF16,
        (true, true, true) => sys::LONGCTX_MLA_DECODE_CLUSTER_SMEM_FP8,
    };
    bytes as usize
}

/// The launches of one validated call: the decode kernel, and with several splits the
/// merge of the partial states. Shared by the CUDA and emulated backends. `None` for a
/// call with no query row.
#[allow(clippy::type_complexity)]
pub(crate) fn plan_mla_decode_launch(
    step: &ValidatedStep,
    v: &MlaDecodeValidated,
    a: &MlaDecodeAddrs,
) -> Result<
    Option<(
        KernelLaunch<sys::LongctxMlaDecodeParams>,
        Option<KernelLaunch<sys::LongctxKvMergeParams>>,
    )>,
> {
    if v.total_new == 0 || step.batch == 0 {
        return Ok(None);
    }
    let mut bases = vec![(a.latent, "cache.latent")];
    if v.fp8 {
        bases.push((a.rope, "cache.rope"));
    }
    for (addr, arg) in bases {
        if addr % 16 != 0 {
            return Err(Error::misaligned(
                OP,
                arg,
                format!("starts at {addr:#x}; the kernel reads 16-byte chunks"),
            ));
        }
    }
    let q = byte_addr(a.q, v.q.offset, 2, "q")?;
    if q % 16 != 0 {
        return Err(Error::misaligned(
            OP,
            "q",
            format!("Q's first row is at {q:#x}; the kernel reads 16-byte chunks"),
        ));
    }
    let o = byte_addr(a.o, v.o.offset, 2, "o")?;
    let (lse, lse_stride) = match v.lse {
        Some(l) => (byte_addr(a.lse, l.offset, 4, "lse")?, l.head_stride),
        None => (0, 0),
    };
    let plan = &v.plan;
    let rows = v.total_new * v.heads; // fits: bounded by the Q buffer
    let part_lse = byte_addr(
        a.workspace,
        plan.splits * rows * MLA_KV_LORA_RANK,
        4,
        "workspace",
    )?;
    let params = sys::LongctxMlaDecodeParams {
        step: step_params(step, a.block_table, a.seqlens, a.cu_new),
        latent: a.latent,
        rope: if v.fp8 { a.rope } else { 0 },
        scale: if v.fp8 { a.scales } else { 0 },
        q,
        q_token_stride: v.q.token_stride as i64,
        q_head_stride: v.q.head_stride as i64,
        o,
        o_token_stride: v.o.token_stride as i64,
        o_head_stride: v.o.head_stride as i64,
        lse,
        lse_head_stride: lse_stride as i64,
        part_o: if plan.splits > 1 { a.workspace } else { 0 },
        part_lse: if plan.splits > 1 { part_lse } else { 0 },
        // The layout was validated (page_size <= 256); heads <= 128; the plan bounded the
        // rest.
        page_size: v.layout.page_size as u32,
        heads: v.heads as u32,
        row_tiles: plan.row_tiles as u32,
        splits: plan.splits as u32,
        chunk: plan.chunk as u32,
        total_new: v.total_new as u32,
        exp_scale: v.exp_scale,
        pad0: 0,
    };
    let wide = plan.rows_per_tile == MLA_ROWS_WIDE;
    let decode = KernelLaunch {
        id: match (wide, plan.cluster, v.fp8) {
            (false, _, false) => KernelId::MlaDecodeBf16,
            (false, _, true) => KernelId::MlaDecodeBf16Fp8,
            (true, 2, false) => KernelId::MlaDecodeC2Bf16,
            (true, 2, true) => KernelId::MlaDecodeC2Bf16Fp8,
            (true, 4, false) => KernelId::MlaDecodeC4Bf16,
            (true, 4, true) => KernelId::MlaDecodeC4Bf16Fp8,
            (true, _, false) => KernelId::MlaDecodeR64Bf16,
            (true, _, true) => KernelId::MlaDecodeR64Bf16Fp8,
        },
        params,
        grid: (plan.splits as u32, plan.row_tiles as u32, step.batch as u32),
        block: (
            32 * if wide {
                sys::LONGCTX_MLA_DECODE_R64_WARPS
            } else {
                sys::LONGCTX_MLA_DECODE_WARPS
            },
            1,
            1,
        ),
        smem_bytes: mla_decode_smem_bytes(v.fp8, plan.rows_per_tile, plan.cluster) as u32,
    };
    if plan.splits == 1 {
        return Ok(Some((decode, None)));
    }
    let merge = SplitMerge {
        splits: plan.splits,
        total_new: v.total_new,
        heads: v.heads,
        dv: MLA_KV_LORA_RANK,
        out_o: v.o,
        out_lse: v.lse,
        workspace_needed: v.workspace_needed,
    }
    .plan(DType::BF16, a.workspace, a.o, a.lse)?;
    Ok(Some((decode, merge)))
}

/// Absorbed MLA decode: each sequence's new tokens (its last 1 to [`MAX_DECODE_QUERIES`]
/// positions, causal among themselves; DeepSeek's multi-token prediction uses 2) attend
/// with every head to its latent cache, as multi-query attention whose key is
/// `[c_kv | k_pe]` (576) and whose value is `c_kv` (512). `q_lat` is `[total_new, heads,
/// 576]` bf16 (`[W_UK^T q_nope | q_pe]` per head, rotated), `out.o` receives `o_lat`
/// `[total_new, heads, 512]` bf16 (before `W_UV`), `out.lse` the LSE `[heads, total_new]`.
/// The step's layout is [`latent_layout`]. `workspace` holds
/// [`MlaDecodePlan::workspace_len`] f32 (from [`plan_mla_decode`] with `dev.sm_count()`),
/// and may be `None` when that is 0. One or two launches, nothing allocated.
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`MlaDecodeShape::validate`] rejects, a
/// buffer of another context, a cache or Q not on 16 bytes (kind alignment), or a device
/// older than sm_80 or without the shared memory the kernel needs (unsupported);
/// [`Error::KernelsNotCompiled`] without kernels; [`Error::Cuda`] if a launch fails.
#[allow(clippy::too_many_arguments)]
pub fn decode_absorbed(
    dev: &Device,
    step: &KvStep,
    q_lat: &dyn DevicePtr<bf16>,
    q_layout: &HeadsLayout,
    cache: &LatentCache,
    out: DecodeOutput<bf16>,
    workspace: Option<&mut dyn DevicePtrMut<f32>>,
    opts: &MlaDecodeOptions,
) -> Result<()> {
    let mut owned = vec![
        (dev.owns_any(q_lat), "q"),
        (dev.owns_any(&*out.o), "o"),
        (dev.owns(step.block_table()), "step"),
    ];
    let shape = match *cache {
        LatentCache::Bf16 { latent } => {
            owned.push((dev.owns_any(latent), "cache.latent"));
            LatentCacheShape::Bf16 {
                latent_len: latent.len(),
            }
        }
        LatentCache::Fp8 {
            latent,
            scales,
            rope,
        } => {
            owned.push((dev.owns_any(latent), "cache.latent"));
            owned.push((dev.owns_any(scales), "cache.scales"));
            owned.push((dev.owns_any(rope), "cache.rope"));
            LatentCacheShape::Fp8 {
                latent_len: latent.len(),
                scales_len: scales.len(),
                rope_len: rope.len(),
            }
        }
    };
    if let Some((l, _)) = &out.lse {
        owned.push((dev.owns_any(&**l), "lse"));
    }
    if let Some(w) = &workspace {
        owned.push((dev.owns_any(&**w), "workspace"));
    }
    if let Some((_, arg)) = owned.iter().find(|x| !x.0) {
        return Err(Error::invalid(OP, arg, "lives on another device context"));
    }
    let cc = dev.compute_capability();
    if cc < (8, 0) {
        return Err(Error::invalid(
            OP,
            "device",
            format!(
                "the kernel needs sm_80 or newer; this device is sm_{}{}",
                cc.0, cc.1
            ),
        ));
    }
    let sv = step.validated();
    let v = MlaDecodeShape {
        step: sv,
        layout: *step.layout(),
        cache: shape,
        q: *q_layout,
        q_len: q_lat.len(),
        o: out.o_layout,
        o_len: out.o.len(),
        lse: out.lse.as_ref().map(|(b, l)| (*l, b.len())),
        workspace_len: workspace.as_ref().map_or(0, |w| w.len()),
        sm_count: dev.sm_count(),
        smem_per_block: dev.smem_per_block(),
        clusters: dev.cluster_kernels(),
    }
    .validate(opts)?;
    let stream = dev.stream();
    let (qp, _g0) = q_lat.device_ptr(stream);
    let (lat, _g1, sc, _g2, rp, _g3) = match *cache {
        LatentCache::Bf16 { latent } => {
            let (a, ga) = latent.device_ptr(stream);
            (a, ga, 0, None, 0, None)
        }
        LatentCache::Fp8 {
            latent,
            scales,
            rope,
        } => {
            let (a, ga) = latent.device_ptr(stream);
            let (b, gb) = scales.device_ptr(stream);
            let (c, gc) = rope.device_ptr(stream);
            (a, ga, b, Some(gb), c, Some(gc))
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
    let addrs = MlaDecodeAddrs {
        q: qp,
        o: op,
        lse: lp,
        latent: lat,
        scales: sc,
        rope: rp,
        workspace: wp,
        block_table: bt,
        seqlens: sl,
        cu_new: cn,
    };
    // SAFETY: the buffers are live allocations of this context (owns_any above), borrowed
    // (the outputs mutably, so no input aliases them) until the launches are queued.
    unsafe { launch_validated(dev, sv, &v, &addrs) }
}

/// Plans and queues the launches of a validated call at these addresses.
///
/// # Safety
/// Every address is the start of a live allocation of `dev`'s context holding the length
/// `v` was validated with; the outputs (o_lat, LSE, workspace) overlap no input and no
/// other work touches them until the launches complete; the step arrays are those of a
/// `KvStep` validated against the latent layout.
unsafe fn launch_validated(
    dev: &Device,
    sv: &ValidatedStep,
    v: &MlaDecodeValidated,
    addrs: &MlaDecodeAddrs,
) -> Result<()> {
    let Some((dl, ml)) = plan_mla_decode_launch(sv, v, addrs)? else {
        return Ok(());
    };
    let stream = dev.stream();
    if dl.id.needs_sm90() && dev.ptx_arch(dl.id)? < 90 {
        return Err(Error::unsupported(
            OP,
            "device",
            "the plan asked for the clustered kernel, whose loaded code is not sm_90a",
        ));
    }
    dev.allow_dynamic_smem(dl.id, dl.smem_bytes as usize, OP, "device")?;
    let func = dev.function(dl.id)?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(&dl.params);
    // SAFETY: the step's device arrays were validated against the latent layout when the
    // KvStep was built (every used page id in range, table rows long enough, lengths and
    // new-token offsets consistent); MlaDecodeShape::validate proved the cache buffers hold
    // every slot, the Q, O and LSE views inside their buffers, the workspace large enough
    // for the plan; plan_mla_decode_launch checked the 16-byte alignment of the cache and
    // Q; the caller guarantees the addresses (see above).
    unsafe { builder.launch(dl.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))?;
    if let Some(ml) = ml {
        let func = dev.function(ml.id)?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&ml.params);
        // SAFETY: the merge reads the workspace regions the decode launch just wrote (same
        // stream, so ordered after it) and writes the caller's O and LSE views, all checked
        // by MergeShape::validate in plan_mla_decode_launch and by MlaDecodeShape::validate.
        unsafe { builder.launch(ml.config()) }
            .map(|_| ())
            .map_err(cuda_err(OP))?;
    }
    Ok(())
}

/// A latent cache given by raw device pointers (for [`decode_absorbed_raw`]).
#[derive(Debug, Clone, Copy)]
pub enum RawLatentCache {
    /// `[pages, page_size, 1, 576]` bf16.
    Bf16 {
        /// The cache.
        latent: RawBuffer,
    },
    /// e4m3 codes `[.., 512]`, f32 scales `[..]`, bf16 `k_pe` `[.., 64]`.
    Fp8 {
        /// Codes.
        latent: RawBuffer,
        /// Scales.
        scales: RawBuffer,
        /// `k_pe`.
        rope: RawBuffer,
    },
}

/// [`decode_absorbed`] on raw device pointers (burn/cubecl-style frameworks). The step is a
/// [`KvStep`] (its device tables were validated when it was built); everything
/// [`decode_absorbed`] checks about shapes, lengths, alignment and options is checked here
/// too.
///
/// # Safety
/// Each pointer is the start of a live device allocation (or a part of one) of `dev`'s CUDA
/// context holding at least `len` elements (bf16 for Q, O, a bf16 latent and `k_pe`; e4m3
/// codes; f32 for scales, LSE and workspace); O, the LSE and the workspace overlap each other
/// and no input; no other work writes the inputs or touches the outputs until the launches,
/// queued on `dev`'s stream, complete; the memory stays allocated until then.
///
/// # Errors
/// As [`decode_absorbed`], plus a pointer that is not a multiple of its element size (kind
/// alignment).
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_absorbed_raw(
    dev: &Device,
    step: &KvStep,
    q_lat: RawTensor,
    cache: RawLatentCache,
    o: RawTensor,
    lse: Option<(RawBuffer, LseLayout)>,
    workspace: Option<RawBuffer>,
    opts: &MlaDecodeOptions,
) -> Result<()> {
    if !dev.owns(step.block_table()) {
        return Err(Error::invalid(
            OP,
            "step",
            "lives on another device context",
        ));
    }
    let cc = dev.compute_capability();
    if cc < (8, 0) {
        return Err(Error::invalid(
            OP,
            "device",
            format!(
                "the kernel needs sm_80 or newer; this device is sm_{}{}",
                cc.0, cc.1
            ),
        ));
    }
    check_element_alignment(OP, "q", q_lat.ptr, 2)?;
    check_element_alignment(OP, "o", o.ptr, 2)?;
    let (shape, lat, sc, rp) = match cache {
        RawLatentCache::Bf16 { latent } => {
            check_element_alignment(OP, "cache.latent", latent.ptr, 2)?;
            (
                LatentCacheShape::Bf16 {
                    latent_len: latent.len,
                },
                latent.ptr,
                0,
                0,
            )
        }
        RawLatentCache::Fp8 {
            latent,
            scales,
            rope,
        } => {
            check_element_alignment(OP, "cache.scales", scales.ptr, 4)?;
            check_element_alignment(OP, "cache.rope", rope.ptr, 2)?;
            (
                LatentCacheShape::Fp8 {
                    latent_len: latent.len,
                    scales_len: scales.len,
                    rope_len: rope.len,
                },
                latent.ptr,
                scales.ptr,
                rope.ptr,
            )
        }
    };
    for (arg, b) in [("lse", lse.map(|l| l.0)), ("workspace", workspace)] {
        if let Some(b) = b {
            check_element_alignment(OP, arg, b.ptr, 4)?;
        }
    }
    let sv = step.validated();
    let v = MlaDecodeShape {
        step: sv,
        layout: *step.layout(),
        cache: shape,
        q: q_lat.layout,
        q_len: q_lat.len,
        o: o.layout,
        o_len: o.len,
        lse: lse.map(|(b, l)| (l, b.len)),
        workspace_len: workspace.map_or(0, |w| w.len),
        sm_count: dev.sm_count(),
        smem_per_block: dev.smem_per_block(),
        clusters: dev.cluster_kernels(),
    }
    .validate(opts)?;
    let stream = dev.stream();
    let (bt, _g0) = step.block_table().device_ptr(stream);
    let (sl, _g1) = step.seqlens().device_ptr(stream);
    let (cn, _g2) = step.cu_new().device_ptr(stream);
    let addrs = MlaDecodeAddrs {
        q: q_lat.ptr,
        o: o.ptr,
        lse: lse.map_or(0, |l| l.0.ptr),
        latent: lat,
        scales: sc,
        rope: rp,
        workspace: workspace.map_or(0, |w| w.ptr),
        block_table: bt,
        seqlens: sl,
        cu_new: cn,
    };
    // SAFETY: the caller's contract for the raw buffers; the step's arrays are this
    // handle's own, guarded until the launches are queued.
    unsafe { launch_validated(dev, sv, &v, &addrs) }
}
