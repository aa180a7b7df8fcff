//! Attention backward: dQ, dK and dV from Q, K, V, O, dO and the forward's LSE
//! (FlashAttention-2's decomposition; kernels/attention/attention_bwd_kernel.cuh has the
//! algorithm). Three launches on the caller's stream: a row-wise preprocess
//! (`rowsum(dO * O)`, the LSE in the exp2 domain, the dQ accumulator zeroed), the main
//! kernel (one CTA per key tile and KV head: dK and dV summed over the GQA group in
//! registers, dQ accumulated in f32), and a row-wise dQ conversion.
//!
//! The caller supplies the workspace (an f32 buffer of [`backward_workspace_len`] floats),
//! so the op allocates nothing and a CUDA graph can capture it. The LSE is the forward's
//! (or a merged one from context-parallel partials): f32 `[heads_q, total_q]`, natural log,
//! -inf for rows that see no key, whose gradients are then 0.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::cuda::{kernel_id as fwd_kernel_id, tensor, AttnElement, Qkv, SeqLens};
use super::plan::smem_row_elems;
use super::{check_alignment, AttentionOptions, CallShape, Validated, ViewShape};
use crate::device::{cuda_err, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{HeadsLayout, RawTensor};
use crate::sys;

const OP: &str = "attention_backward";

/// Tile shape of one backward kernel: each CTA owns `block_n` keys of one KV head and
/// visits query tiles of `block_m` rows; its warps are `block_n / 16` key groups times
/// `dim_split` column slices of dK and dV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackwardTiles {
    /// Channels of Q and K.
    pub head_dim: usize,
    /// Channels of V and O.
    pub head_dim_v: usize,
    /// Query rows per step.
    pub block_m: usize,
    /// Keys per CTA.
    pub block_n: usize,
    /// Column slices of dK and dV per key group.
    pub dim_split: usize,
}

/// The backward tile table; kernels/params/attention_params.h holds the same numbers
/// (checked at compile time below) and the kernel derives its shared memory from them.
pub const BACKWARD_TILES: [BackwardTiles; 5] = [
    bwd_tiles(
        64,
        64,
        sys::LONGCTX_ATTN_BWD_HD64_BLOCK_M,
        sys::LONGCTX_ATTN_BWD_HD64_BLOCK_N,
        sys::LONGCTX_ATTN_BWD_HD64_DIM_SPLIT,
    ),
    bwd_tiles(
        96,
        96,
        sys::LONGCTX_ATTN_BWD_HD96_BLOCK_M,
        sys::LONGCTX_ATTN_BWD_HD96_BLOCK_N,
        sys::LONGCTX_ATTN_BWD_HD96_DIM_SPLIT,
    ),
    bwd_tiles(
        128,
        128,
        sys::LONGCTX_ATTN_BWD_HD128_BLOCK_M,
        sys::LONGCTX_ATTN_BWD_HD128_BLOCK_N,
        sys::LONGCTX_ATTN_BWD_HD128_DIM_SPLIT,
    ),
    bwd_tiles(
        192,
        128,
        sys::LONGCTX_ATTN_BWD_HD192_BLOCK_M,
        sys::LONGCTX_ATTN_BWD_HD192_BLOCK_N,
        sys::LONGCTX_ATTN_BWD_HD192_DIM_SPLIT,
    ),
    bwd_tiles(
        256,
        256,
        sys::LONGCTX_ATTN_BWD_HD256_BLOCK_M,
        sys::LONGCTX_ATTN_BWD_HD256_BLOCK_N,
        sys::LONGCTX_ATTN_BWD_HD256_DIM_SPLIT,
    ),
];

const fn bwd_tiles(d: usize, dv: usize, m: u32, n: u32, split: u32) -> BackwardTiles {
    BackwardTiles {
        head_dim: d,
        head_dim_v: dv,
        block_m: m as usize,
        block_n: n as usize,
        dim_split: split as usize,
    }
}

impl BackwardTiles {
    /// The tiles for a (head_dim, head_dim_v) pair.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a pair outside
    /// [`SUPPORTED_HEAD_DIMS`](super::SUPPORTED_HEAD_DIMS).
    pub fn for_head_dims(head_dim: usize, head_dim_v: usize) -> Result<BackwardTiles> {
        BACKWARD_TILES
            .iter()
            .find(|t| t.head_dim == head_dim && t.head_dim_v == head_dim_v)
            .copied()
            .ok_or_else(|| {
                Error::unsupported(
                    OP,
                    "head_dim",
                    format!(
                        "no backward kernel for head dims ({head_dim}, {head_dim_v}); supported: {:?}",
                        super::SUPPORTED_HEAD_DIMS
                    ),
                )
            })
    }

    /// Warps per CTA of the main kernel.
    pub fn warps(&self) -> usize {
        self.block_n / 16 * self.dim_split
    }

    /// Dynamic shared memory of the main kernel: K, V, Q, dO and dS^T tiles (rows padded
    /// to 64 elements) and two floats per query row.
    pub fn smem_bytes(&self) -> usize {
        let qk = smem_row_elems(self.head_dim);
        let v = smem_row_elems(self.head_dim_v);
        2 * (self.block_n * qk
            + self.block_n * v
            + self.block_m * qk
            + self.block_m * v
            + self.block_n * smem_row_elems(self.block_m))
            + 8 * self.block_m
    }

    /// CTAs of the main kernel: (key tiles of the longest key sequence, KV heads, batch).
    pub fn grid(
        &self,
        max_seqlen_k: usize,
        heads_kv: usize,
        batch: usize,
    ) -> (usize, usize, usize) {
        (max_seqlen_k.div_ceil(self.block_n), heads_kv, batch)
    }
}

/// Per-call options of attention backward.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BackwardOptions {
    /// The forward's options (scale, mask, softcap): the backward must use the same.
    pub attention: AttentionOptions,
    /// Add the gradients to what dQ, dK and dV hold (gradient accumulation) instead of
    /// overwriting them.
    pub accumulate: bool,
    /// Bit-identical results on every run: dQ comes from a separate kernel that recomputes
    /// S, P and dS per query tile (about 1.4x the main pass's tensor-core work in all)
    /// instead of f32 atomics whose order varies. dK and dV are deterministic either way.
    pub deterministic: bool,
}

/// Floats of the workspace [`attention_backward`] needs: the f32 dQ accumulator
/// (`total_q x heads_q x head_dim`) and two floats per (query head, token).
///
/// # Errors
/// [`Error::InvalidArgument`] when the size overflows usize.
pub fn backward_workspace_len(total_q: usize, heads_q: usize, head_dim: usize) -> Result<usize> {
    let rows = total_q
        .checked_mul(heads_q)
        .ok_or_else(|| Error::overflow(OP, "workspace", "total_q x heads_q overflows usize"))?;
    rows.checked_mul(head_dim)
        .and_then(|a| a.checked_add(rows.checked_mul(2)?))
        .ok_or_else(|| Error::overflow(OP, "workspace", "workspace size overflows usize"))
}

/// The shapes of one backward call, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct BackwardShape<'a> {
    /// Q, K, V and O (the forward's output) with the LSE and the offsets, as the forward.
    pub forward: CallShape<'a>,
    /// dO: O's shape.
    pub dout: ViewShape,
    /// dQ: Q's shape.
    pub dq: ViewShape,
    /// dK: K's shape.
    pub dk: ViewShape,
    /// dV: V's shape.
    pub dv: ViewShape,
    /// Floats in the workspace.
    pub workspace_len: usize,
}

impl BackwardShape<'_> {
    /// Checks everything about a call that does not need the device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for everything [`CallShape::validate`] rejects, a missing
    /// LSE, a gradient or dO whose shape differs from its tensor's, a view that leaves its
    /// buffer, or a workspace shorter than [`backward_workspace_len`].
    pub fn validate(&self, opts: &BackwardOptions) -> Result<Validated> {
        if self.forward.lse_len.is_none() {
            return Err(Error::invalid(
                OP,
                "lse",
                "the backward needs the forward's LSE",
            ));
        }
        let c = self.forward.validate(&opts.attention)?;
        for (arg, got, want) in [
            ("dout", self.dout, self.forward.o),
            ("dq", self.dq, self.forward.q),
            ("dk", self.dk, self.forward.k),
            ("dv", self.dv, self.forward.v),
        ] {
            got.layout.validate(OP, arg, got.buffer_len)?;
            let (g, w) = (got.layout, want.layout);
            if (g.tokens, g.heads, g.head_dim) != (w.tokens, w.heads, w.head_dim) {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "shape [{}, {}, {}] differs from [{}, {}, {}]",
                        g.tokens, g.heads, g.head_dim, w.tokens, w.heads, w.head_dim
                    ),
                ));
            }
            if i64::try_from(g.token_stride).is_err() || i64::try_from(g.head_stride).is_err() {
                return Err(Error::overflow(OP, arg, "a stride does not fit in i64"));
            }
        }
        let need = backward_workspace_len(c.total_q, c.heads_q, c.tiles.head_dim)?;
        if self.workspace_len < need {
            return Err(Error::invalid(
                OP,
                "workspace",
                format!(
                    "holds {} floats, needs {need} (backward_workspace_len)",
                    self.workspace_len
                ),
            ));
        }
        BackwardTiles::for_head_dims(c.tiles.head_dim, c.tiles.head_dim_v)?;
        Ok(c)
    }
}

/// The views of one backward call.
pub(crate) struct BwdLayouts {
    pub q: HeadsLayout,
    pub k: HeadsLayout,
    pub v: HeadsLayout,
    pub o: HeadsLayout,
    pub dout: HeadsLayout,
    pub dq: HeadsLayout,
    pub dk: HeadsLayout,
    pub dv: HeadsLayout,
}

/// Where the buffers of one backward call start.
pub(crate) struct BwdAddrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub lse: u64,
    pub workspace: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
}

/// The three launches of one call, in order.
pub(crate) struct BwdLaunches {
    pub pre: KernelLaunch<sys::LongctxAttnBwdParams>,
    pub main: KernelLaunch<sys::LongctxAttnBwdParams>,
    pub dq: KernelLaunch<sys::LongctxAttnBwdParams>,
}

fn ids(
    dtype: DType,
    head_dim: usize,
    head_dim_v: usize,
) -> Result<(KernelId, KernelId, KernelId, KernelId)> {
    use KernelId::*;
    // The forward's id check rejects the same (dtype, dims) combinations.
    fwd_kernel_id(dtype, head_dim, head_dim_v)?;
    let (main, det) = match (dtype, head_dim, head_dim_v) {
        (DType::F16, 64, 64) => (AttnBwdF16Hd64, AttnBwdDqDetF16Hd64),
        (DType::F16, 96, 96) => (AttnBwdF16Hd96, AttnBwdDqDetF16Hd96),
        (DType::F16, 128, 128) => (AttnBwdF16Hd128, AttnBwdDqDetF16Hd128),
        (DType::F16, 192, 128) => (AttnBwdF16Hd192Dv128, AttnBwdDqDetF16Hd192Dv128),
        (DType::F16, 256, 256) => (AttnBwdF16Hd256, AttnBwdDqDetF16Hd256),
        (DType::BF16, 64, 64) => (AttnBwdBf16Hd64, AttnBwdDqDetBf16Hd64),
        (DType::BF16, 96, 96) => (AttnBwdBf16Hd96, AttnBwdDqDetBf16Hd96),
        (DType::BF16, 128, 128) => (AttnBwdBf16Hd128, AttnBwdDqDetBf16Hd128),
        (DType::BF16, 192, 128) => (AttnBwdBf16Hd192Dv128, AttnBwdDqDetBf16Hd192Dv128),
        (DType::BF16, 256, 256) => (AttnBwdBf16Hd256, AttnBwdDqDetBf16Hd256),
        _ => {
            return Err(Error::unsupported(
                OP,
                "dtype",
                format!("no kernel for {dtype:?} with head dims ({head_dim}, {head_dim_v})"),
            ))
        }
    };
    Ok(match dtype {
        DType::F16 => (AttnBwdPreF16, main, AttnBwdDqF16, det),
        _ => (AttnBwdPreBf16, main, AttnBwdDqBf16, det),
    })
}

/// Deterministic mode's dQ kernel: (query rows, keys) per CTA, 4 warps.
pub(crate) fn dq_det_tiles(head_dim: usize) -> (usize, usize) {
    let n = if head_dim >= 256 {
        sys::LONGCTX_ATTN_BWD_DQ_HD256_BLOCK_N
    } else {
        sys::LONGCTX_ATTN_BWD_DQ_BLOCK_N
    };
    (sys::LONGCTX_ATTN_BWD_DQ_BLOCK_M as usize, n as usize)
}

/// Dynamic shared memory of the deterministic dQ kernel: Q and dO tiles, K and V tiles,
/// two floats per row.
fn dq_det_smem(head_dim: usize, head_dim_v: usize) -> usize {
    let (m, n) = dq_det_tiles(head_dim);
    let (qk, v) = (smem_row_elems(head_dim), smem_row_elems(head_dim_v));
    2 * (m * qk + m * v + n * qk + n * v) + 8 * m
}

/// The one function from a validated call to its launches, shared by the CUDA and emulated
/// backends.
pub(crate) fn plan_backward<T: AttnElement>(
    c: &Validated,
    opts: &BackwardOptions,
    views: &BwdLayouts,
    a: &BwdAddrs,
) -> Result<BwdLaunches> {
    let (d, dv) = (c.tiles.head_dim, c.tiles.head_dim_v);
    let (pre_id, main_id, dq_id, det_id) = ids(T::DTYPE, d, dv)?;
    let tiles = BackwardTiles::for_head_dims(d, dv)?;
    let elem = T::DTYPE.size();
    for (l, addr, arg) in [
        (&views.q, a.q, "q"),
        (&views.k, a.k, "k"),
        (&views.v, a.v, "v"),
        (&views.o, a.o, "o"),
        (&views.dout, a.dout, "dout"),
        (&views.dq, a.dq, "dq"),
        (&views.dk, a.dk, "dk"),
        (&views.dv, a.dv, "dv"),
    ] {
        check_alignment(l, addr, elem, arg)?;
    }
    if a.workspace % 16 != 0 {
        return Err(Error::misaligned(
            OP,
            "workspace",
            format!(
                "starts at byte address {:#x}, not 16-byte aligned",
                a.workspace
            ),
        ));
    }
    let u32_of = |v: usize, what: &str| {
        u32::try_from(v)
            .map_err(|_| Error::overflow(OP, "seqlens", format!("{what} {v} exceeds u32")))
    };
    let rows = c.total_q * c.heads_q; // validated: fits the workspace length
    let acc_bytes = (rows as u64) * (d as u64) * 4;
    let grid = tiles.grid(c.max_seqlen_k, c.heads_kv, c.batch);
    let params = sys::LongctxAttnBwdParams {
        q: tensor(&views.q, a.q, elem),
        k: tensor(&views.k, a.k, elem),
        v: tensor(&views.v, a.v, elem),
        o: tensor(&views.o, a.o, elem),
        dout: tensor(&views.dout, a.dout, elem),
        dq: tensor(&views.dq, a.dq, elem),
        dk: tensor(&views.dk, a.dk, elem),
        dv: tensor(&views.dv, a.dv, elem),
        lse: a.lse,
        lse_head_stride: i64::try_from(c.total_q)
            .map_err(|_| Error::overflow(OP, "lse", "total_q exceeds i64"))?,
        dq_accum: a.workspace,
        lse_log2: a.workspace + acc_bytes,
        dot: a.workspace + acc_bytes + (rows as u64) * 4,
        cu_seqlens_q: a.cu_seqlens_q,
        cu_seqlens_k: a.cu_seqlens_k,
        batch: u32_of(c.batch, "batch")?,
        heads_q: u32_of(c.heads_q, "heads")?,
        heads_per_kv: u32_of(c.heads_q / c.heads_kv, "heads_q / heads_kv")?,
        num_n_blocks: u32_of(grid.0, "key tiles")?,
        total_q: u32_of(c.total_q, "total_q")?,
        head_dim: u32_of(d, "head_dim")?,
        head_dim_v: u32_of(dv, "head_dim_v")?,
        flags: if opts.accumulate {
            sys::LONGCTX_ATTN_BWD_ACCUMULATE
        } else {
            0
        } | if opts.deterministic {
            sys::LONGCTX_ATTN_BWD_SKIP_DQ
        } else {
            0
        },
        window_left: i32::try_from(c.window.0)
            .map_err(|_| Error::overflow(OP, "mask", "window side past i32"))?,
        window_right: i32::try_from(c.window.1)
            .map_err(|_| Error::overflow(OP, "mask", "window side past i32"))?,
        exp_scale: c.consts.exp_scale,
        softcap_in: c.consts.softcap_in,
        scale: opts.attention.scale_for(d),
        num_m_blocks: u32_of(c.max_seqlen_q.div_ceil(dq_det_tiles(d).0), "query tiles")?,
    };
    let row_warps = sys::LONGCTX_ATTN_BWD_ROW_WARPS as usize;
    let row_grid = (u32_of(rows.div_ceil(row_warps), "row blocks")?, 1, 1);
    let row_block = (32 * sys::LONGCTX_ATTN_BWD_ROW_WARPS, 1, 1);
    let row = |id| KernelLaunch {
        id,
        params,
        grid: row_grid,
        block: row_block,
        smem_bytes: 0,
    };
    Ok(BwdLaunches {
        pre: row(pre_id),
        main: KernelLaunch {
            id: main_id,
            params,
            grid: (
                u32_of(grid.0, "key tiles")?,
                u32_of(grid.1, "heads")?,
                u32_of(grid.2, "batch")?,
            ),
            block: (u32_of(tiles.warps() * 32, "threads")?, 1, 1),
            smem_bytes: u32_of(tiles.smem_bytes(), "shared memory")?,
        },
        dq: if opts.deterministic {
            KernelLaunch {
                id: det_id,
                params,
                grid: (
                    params.num_m_blocks,
                    u32_of(c.heads_q, "heads")?,
                    u32_of(c.batch, "batch")?,
                ),
                block: (32 * sys::LONGCTX_ATTN_BWD_DQ_BLOCK_M / 16, 1, 1),
                smem_bytes: u32_of(dq_det_smem(d, dv), "shared memory")?,
            }
        } else {
            row(dq_id)
        },
    })
}

/// The inputs of one backward call besides Q, K and V.
#[derive(Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    /// The forward's output O.
    pub o: &'a dyn DevicePtr<T>,
    /// `[total_q, heads_q, head_dim_v]`.
    pub o_layout: HeadsLayout,
    /// dL/dO.
    pub dout: &'a dyn DevicePtr<T>,
    /// O's shape.
    pub dout_layout: HeadsLayout,
    /// The forward's LSE, f32 `[heads_q, total_q]` (dense, natural log).
    pub lse: &'a dyn DevicePtr<f32>,
}

impl<T> std::fmt::Debug for BackwardInputs<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackwardInputs")
            .field("o_len", &self.o.len())
            .field("o_layout", &self.o_layout)
            .field("dout_len", &self.dout.len())
            .field("dout_layout", &self.dout_layout)
            .field("lse_len", &self.lse.len())
            .finish()
    }
}

/// The gradients one backward call writes (or adds to, with
/// [`BackwardOptions::accumulate`]).
pub struct AttnGrads<'a, T> {
    /// dQ, Q's shape.
    pub dq: &'a mut dyn DevicePtrMut<T>,
    /// `[total_q, heads_q, head_dim]`.
    pub dq_layout: HeadsLayout,
    /// dK, K's shape (summed over each KV head's query heads).
    pub dk: &'a mut dyn DevicePtrMut<T>,
    /// `[total_k, heads_kv, head_dim]`.
    pub dk_layout: HeadsLayout,
    /// dV, V's shape.
    pub dv: &'a mut dyn DevicePtrMut<T>,
    /// `[total_k, heads_kv, head_dim_v]`.
    pub dv_layout: HeadsLayout,
}

impl<T> std::fmt::Debug for AttnGrads<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnGrads")
            .field("dq_layout", &self.dq_layout)
            .field("dk_layout", &self.dk_layout)
            .field("dv_layout", &self.dv_layout)
            .finish()
    }
}

/// Device checks (arch), then [`BackwardShape::validate`] of the views (each a layout and
/// its buffer's length), with the launch sized for `seqlens`' max lengths.
fn check_backward(
    dev: &Device,
    v: &[(HeadsLayout, usize); 8],
    lse_len: usize,
    workspace_len: usize,
    seqlens: &SeqLens,
    opts: &BackwardOptions,
) -> Result<Validated> {
    super::cuda::require_sm80(dev, OP)?;
    let shape = |(layout, buffer_len): (HeadsLayout, usize)| ViewShape { layout, buffer_len };
    let mut c = BackwardShape {
        forward: CallShape {
            q: shape(v[0]),
            k: shape(v[1]),
            v: shape(v[2]),
            o: shape(v[3]),
            lse_len: Some(lse_len),
            cu_seqlens_q: seqlens.cu_seqlens_q(),
            cu_seqlens_k: seqlens.cu_seqlens_k(),
        },
        dout: shape(v[4]),
        dq: shape(v[5]),
        dk: shape(v[6]),
        dv: shape(v[7]),
        workspace_len,
    }
    .validate(opts)?;
    c.max_seqlen_q = seqlens.max_seqlen_q();
    c.max_seqlen_k = seqlens.max_seqlen_k();
    Ok(c)
}

/// Plans and queues the launches of a validated call.
///
/// # Safety
/// Every view of `views` lies inside a live device allocation of `dev`'s context starting
/// at the matching address of `a` (as `c` was validated against); dQ, dK, dV and the
/// workspace do not overlap each other or any input; the LSE holds heads_q x total_q
/// floats and the workspace `backward_workspace_len` floats; the offsets are the device
/// copies of the ones `c` was validated with; and all of it stays alive, and unwritten by
/// other work, until the launches complete.
unsafe fn launch_backward<T: AttnElement>(
    dev: &Device,
    c: &Validated,
    opts: &BackwardOptions,
    views: &BwdLayouts,
    a: &BwdAddrs,
) -> Result<()> {
    if c.heads_q == 0 || (c.total_q == 0 && c.total_k == 0) {
        return Ok(());
    }
    let plan = plan_backward::<T>(c, opts, views, a)?;
    for l in [&plan.main, &plan.dq] {
        dev.allow_dynamic_smem(l.id, l.smem_bytes as usize, OP, "head_dim")?;
    }
    for l in [&plan.pre, &plan.main, &plan.dq] {
        if l.grid.0 == 0 {
            continue;
        }
        let func = dev.function(l.id)?;
        let mut builder = dev.stream().launch_builder(&func);
        builder.arg(&l.params);
        // SAFETY: BackwardShape::validate and plan_backward proved every view inside its
        // buffer, the gradients' rows disjoint, the LSE and workspace long enough and
        // aligned, the offsets valid on the host (nondecreasing from 0, at most
        // MAX_TOKENS, so the kernels' int32 mask arithmetic cannot overflow); the caller
        // guarantees the buffers are live allocations of this context at those addresses,
        // that no input aliases an output, and that they outlive the launches. Dynamic
        // shared memory was opted into above.
        unsafe { builder.launch(l.config()) }
            .map(|_| ())
            .map_err(cuda_err(OP))?;
    }
    Ok(())
}

/// Runs attention backward: writes (or adds to) dQ, dK and dV.
///
/// Three launches on `dev`'s stream, nothing allocated: `workspace` (f32, at least
/// [`backward_workspace_len`] floats, 16-byte aligned) holds the dQ accumulator and the
/// per-row statistics. Options must be the forward's (`opts.attention`).
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`attention_forward`](super::attention_forward)
/// rejects, plus: a gradient or dO whose shape differs from its tensor's, a short LSE or
/// workspace, a misaligned view or workspace, a buffer of another context.
/// [`Error::KernelsNotCompiled`] without kernels; [`Error::Cuda`] if a launch fails.
pub fn attention_backward<T: AttnElement>(
    dev: &Device,
    x: &Qkv<T>,
    inputs: &BackwardInputs<T>,
    grads: AttnGrads<T>,
    workspace: &mut dyn DevicePtrMut<f32>,
    seqlens: &SeqLens,
    opts: &BackwardOptions,
) -> Result<()> {
    for (same_ctx, arg) in [
        (dev.owns_any(x.q), "q"),
        (dev.owns_any(x.k), "k"),
        (dev.owns_any(x.v), "v"),
        (dev.owns_any(inputs.o), "o"),
        (dev.owns_any(inputs.dout), "dout"),
        (dev.owns_any(inputs.lse), "lse"),
        (dev.owns_any(&*grads.dq), "dq"),
        (dev.owns_any(&*grads.dk), "dk"),
        (dev.owns_any(&*grads.dv), "dv"),
        (dev.owns_any(&*workspace), "workspace"),
        (seqlens.owned_by(dev), "seqlens"),
    ] {
        if !same_ctx {
            return Err(Error::invalid(OP, arg, "lives on another device context"));
        }
    }
    let c = check_backward(
        dev,
        &[
            (x.q_layout, x.q.len()),
            (x.k_layout, x.k.len()),
            (x.v_layout, x.v.len()),
            (inputs.o_layout, inputs.o.len()),
            (inputs.dout_layout, inputs.dout.len()),
            (grads.dq_layout, grads.dq.len()),
            (grads.dk_layout, grads.dk.len()),
            (grads.dv_layout, grads.dv.len()),
        ],
        inputs.lse.len(),
        workspace.len(),
        seqlens,
        opts,
    )?;
    let stream = dev.stream();
    let (q, _g0) = x.q.device_ptr(stream);
    let (k, _g1) = x.k.device_ptr(stream);
    let (v, _g2) = x.v.device_ptr(stream);
    let (o, _g3) = inputs.o.device_ptr(stream);
    let (dout, _g4) = inputs.dout.device_ptr(stream);
    let (lse, _g5) = inputs.lse.device_ptr(stream);
    let (cu_q, cu_k, _g6) = seqlens.device_ptrs(stream);
    let AttnGrads {
        dq: dq_buf,
        dq_layout,
        dk: dk_buf,
        dk_layout,
        dv: dv_buf,
        dv_layout,
    } = grads;
    let (dq, _g7) = dq_buf.device_ptr_mut(stream);
    let (dk, _g8) = dk_buf.device_ptr_mut(stream);
    let (dv, _g9) = dv_buf.device_ptr_mut(stream);
    let (ws, _g10) = workspace.device_ptr_mut(stream);
    // SAFETY: every buffer is a live cudarc allocation (or view) of this context (checked
    // above), validated against its view by check_backward; the gradients and workspace
    // are borrowed mutably, so nothing else aliases them; the guards keep each buffer
    // recorded on the stream until the launches are queued.
    unsafe {
        launch_backward::<T>(
            dev,
            &c,
            opts,
            &BwdLayouts {
                q: x.q_layout,
                k: x.k_layout,
                v: x.v_layout,
                o: inputs.o_layout,
                dout: inputs.dout_layout,
                dq: dq_layout,
                dk: dk_layout,
                dv: dv_layout,
            },
            &BwdAddrs {
                q,
                k,
                v,
                o,
                dout,
                dq,
                dk,
                dv,
                lse,
                workspace: ws,
                cu_seqlens_q: cu_q,
                cu_seqlens_k: cu_k,
            },
        )
    }
}

/// The buffers of one [`attention_backward_raw`] call: each tensor a device address, its
/// buffer's length in elements and its view; the LSE and the workspace an address and a
/// length in floats.
#[derive(Debug, Clone, Copy)]
pub struct RawBackward {
    /// Q.
    pub q: RawTensor,
    /// K.
    pub k: RawTensor,
    /// V.
    pub v: RawTensor,
    /// The forward's O.
    pub o: RawTensor,
    /// dL/dO, O's shape.
    pub dout: RawTensor,
    /// dQ, written.
    pub dq: RawTensor,
    /// dK, written.
    pub dk: RawTensor,
    /// dV, written.
    pub dv: RawTensor,
    /// The forward's LSE, f32 `[heads_q, total_q]`: (address, floats).
    pub lse: (u64, usize),
    /// f32 workspace of at least [`backward_workspace_len`] floats: (address, floats).
    pub workspace: (u64, usize),
}

/// A raw buffer: not null when it holds elements, aligned to its element.
fn check_raw(arg: &'static str, ptr: u64, len: usize, elem: usize) -> Result<()> {
    if ptr == 0 && len > 0 {
        return Err(Error::invalid(
            OP,
            arg,
            format!("null device pointer with {len} elements"),
        ));
    }
    crate::layout::check_element_alignment(OP, arg, ptr, elem)
}

/// [`attention_backward`] on raw device pointers (burn/cubecl-style frameworks). Everything
/// [`attention_backward`] checks about shapes, lengths, alignment and options is checked
/// here too; what cannot be checked is the contract below.
///
/// # Safety
/// Each address is the start of a live device allocation (or a part of one) of `dev`'s
/// CUDA context holding at least its stated number of elements; dQ, dK, dV and the
/// workspace do not overlap each other or Q, K, V, O, dO and the LSE; no other work reads
/// or writes the outputs or writes the inputs until the launches, queued on `dev`'s
/// stream, have completed; and the memory stays allocated until then.
///
/// # Errors
/// As [`attention_backward`].
pub unsafe fn attention_backward_raw<T: AttnElement>(
    dev: &Device,
    t: &RawBackward,
    seqlens: &SeqLens,
    opts: &BackwardOptions,
) -> Result<()> {
    if !seqlens.owned_by(dev) {
        return Err(Error::invalid(
            OP,
            "seqlens",
            "lives on another device context",
        ));
    }
    let views = [t.q, t.k, t.v, t.o, t.dout, t.dq, t.dk, t.dv];
    for (r, arg) in views
        .iter()
        .zip(["q", "k", "v", "o", "dout", "dq", "dk", "dv"])
    {
        check_raw(arg, r.ptr, r.len, T::DTYPE.size())?;
    }
    check_raw("lse", t.lse.0, t.lse.1, 4)?;
    check_raw("workspace", t.workspace.0, t.workspace.1, 4)?;
    let c = check_backward(
        dev,
        &views.map(|r| (r.layout, r.len)),
        t.lse.1,
        t.workspace.1,
        seqlens,
        opts,
    )?;
    let stream = dev.stream();
    let (cu_q, cu_k, _g) = seqlens.device_ptrs(stream);
    // SAFETY: the caller's contract (above) for the raw buffers; the offsets are this
    // handle's own, guarded until the launches are queued.
    unsafe {
        launch_backward::<T>(
            dev,
            &c,
            opts,
            &BwdLayouts {
                q: t.q.layout,
                k: t.k.layout,
                v: t.v.layout,
                o: t.o.layout,
                dout: t.dout.layout,
                dq: t.dq.layout,
                dk: t.dk.layout,
                dv: t.dv.layout,
            },
            &BwdAddrs {
                q: t.q.ptr,
                k: t.k.ptr,
                v: t.v.ptr,
                o: t.o.ptr,
                dout: t.dout.ptr,
                dq: t.dq.ptr,
                dk: t.dk.ptr,
                dv: t.dv.ptr,
                lse: t.lse.0,
                workspace: t.workspace.0,
                cu_seqlens_q: cu_q,
                cu_seqlens_k: cu_k,
            },
        )
    }
}

// The kernel's tile macros and this table agree with the forward's head-dim list.
const _: () = {
    let mut i = 0;
    while i < BACKWARD_TILES.len() {
        let t = &BACKWARD_TILES[i];
        assert!(t.head_dim == super::SUPPORTED_HEAD_DIMS[i].0);
        assert!(t.head_dim_v == super::SUPPORTED_HEAD_DIMS[i].1);
        assert!(t.block_n % 16 == 0 && t.block_m % 16 == 0);
        i += 1;
    }
};
