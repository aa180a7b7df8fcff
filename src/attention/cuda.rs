//! GPU path of attention forward: validated arguments -> LongctxAttnParams -> one launch.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use half::{bf16, f16};

use super::plan::{TileConfig, MAX_TOKENS, TILES, WINDOW_UNBOUNDED};
use super::{
    check_alignment, validate_cu_seqlens, AttentionOptions, CallShape, Validated, ViewShape,
};
use crate::device::{cuda_err, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{HeadsLayout, RawTensor};
use crate::sys;

const OP: &str = "attention";

// The plan's tile table and the header's macros (which traits.cuh static_asserts) agree,
// for the portable code (PTX arch 80) and the sm_90a code (PTX arch 90).
const _: () = {
    const fn check(arch: u32, d: usize, dv: usize, m: u32, n: u32, w: u32) {
        let mut i = 0;
        let mut found = false;
        while i < TILES.len() {
            let t = &TILES[i];
            if t.ptx_arch == arch && t.head_dim == d && t.head_dim_v == dv {
                assert!(
                    t.block_m == m as usize && t.block_n == n as usize && t.warps == w as usize
                );
                found = true;
            }
            i += 1;
        }
        assert!(found);
    }
    check(
        80,
        64,
        64,
        sys::LONGCTX_ATTN_HD64_BLOCK_M,
        sys::LONGCTX_ATTN_HD64_BLOCK_N,
        sys::LONGCTX_ATTN_HD64_WARPS,
    );
    check(
        90,
        64,
        64,
        sys::LONGCTX_ATTN_HD64_BLOCK_M,
        sys::LONGCTX_ATTN_HD64_SM90_BLOCK_N,
        sys::LONGCTX_ATTN_HD64_WARPS,
    );
    check(
        80,
        96,
        96,
        sys::LONGCTX_ATTN_HD96_BLOCK_M,
        sys::LONGCTX_ATTN_HD96_BLOCK_N,
        sys::LONGCTX_ATTN_HD96_WARPS,
    );
    check(
        90,
        96,
        96,
        sys::LONGCTX_ATTN_HD96_BLOCK_M,
        sys::LONGCTX_ATTN_HD96_SM90_BLOCK_N,
        sys::LONGCTX_ATTN_HD96_WARPS,
    );
    check(
        80,
        128,
        128,
        sys::LONGCTX_ATTN_HD128_BLOCK_M,
        sys::LONGCTX_ATTN_HD128_BLOCK_N,
        sys::LONGCTX_ATTN_HD128_WARPS,
    );
    check(
        90,
        128,
        128,
        sys::LONGCTX_ATTN_HD128_BLOCK_M,
        sys::LONGCTX_ATTN_HD128_SM90_BLOCK_N,
        sys::LONGCTX_ATTN_HD128_WARPS,
    );
    check(
        80,
        192,
        128,
        sys::LONGCTX_ATTN_HD192_BLOCK_M,
        sys::LONGCTX_ATTN_HD192_BLOCK_N,
        sys::LONGCTX_ATTN_HD192_WARPS,
    );
    check(
        90,
        192,
        128,
        sys::LONGCTX_ATTN_HD192_BLOCK_M,
        sys::LONGCTX_ATTN_HD192_SM90_BLOCK_N,
        sys::LONGCTX_ATTN_HD192_WARPS,
    );
    check(
        80,
        256,
        256,
        sys::LONGCTX_ATTN_HD256_BLOCK_M,
        sys::LONGCTX_ATTN_HD256_BLOCK_N,
        sys::LONGCTX_ATTN_HD256_WARPS,
    );
    check(
        90,
        256,
        256,
        sys::LONGCTX_ATTN_HD256_BLOCK_M,
        sys::LONGCTX_ATTN_HD256_SM90_BLOCK_N,
        sys::LONGCTX_ATTN_HD256_WARPS,
    );
    assert!(sys::LONGCTX_ATTN_MAX_TOKENS as usize == MAX_TOKENS);
    assert!(sys::LONGCTX_ATTN_WINDOW_UNBOUNDED as usize == WINDOW_UNBOUNDED);
};

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// Element types attention kernels exist for: `half::f16` and `half::bf16`.
pub trait AttnElement: Element + sealed::Sealed {}
impl AttnElement for f16 {}
impl AttnElement for bf16 {}

/// The batch layout of a variable-length attention call: `cu_seqlens_q` and `cu_seqlens_k`
/// (batch + 1 offsets each), validated on the host and uploaded once, reusable across
/// layers and calls. A padded batch is just equal lengths ([`SeqLens::uniform`]).
#[derive(Debug)]
pub struct SeqLens {
    cu_q: CudaSlice<i32>,
    cu_k: CudaSlice<i32>,
    host_q: Vec<i32>,
    host_k: Vec<i32>,
    max_q: usize,
    max_k: usize,
}

impl SeqLens {
    /// Validates and uploads the offsets; max lengths are derived from them.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when either list has fewer than 2 entries, their lengths
    /// differ, one does not start at 0, decreases somewhere, passes
    /// [`MAX_TOKENS`](super::MAX_TOKENS), or the batch exceeds 65535 sequences;
    /// [`Error::Cuda`] on upload failure.
    pub fn new(dev: &Device, cu_seqlens_q: &[i32], cu_seqlens_k: &[i32]) -> Result<Self> {
        let (max_q, max_k) = validate_cu_seqlens(cu_seqlens_q, cu_seqlens_k)?;
        Ok(SeqLens {
            cu_q: dev.upload(cu_seqlens_q)?,
            cu_k: dev.upload(cu_seqlens_k)?,
            host_q: cu_seqlens_q.to_vec(),
            host_k: cu_seqlens_k.to_vec(),
            max_q,
            max_k,
        })
    }

    /// `batch` sequences of `seqlen_q` queries and `seqlen_k` keys each.
    ///
    /// # Errors
    /// As [`SeqLens::new`], and when the totals overflow.
    pub fn uniform(dev: &Device, batch: usize, seqlen_q: usize, seqlen_k: usize) -> Result<Self> {
        let offsets = |len: usize, arg: &'static str| -> Result<Vec<i32>> {
            (0..=batch)
                .map(|b| {
                    b.checked_mul(len)
                        .and_then(|t| i32::try_from(t).ok())
                        .ok_or_else(|| {
                            Error::overflow(OP, arg, format!("{batch} x {len} tokens overflow i32"))
                        })
                })
                .collect()
        };
        Self::new(
            dev,
            &offsets(seqlen_q, "cu_seqlens_q")?,
            &offsets(seqlen_k, "cu_seqlens_k")?,
        )
    }

    /// Sets the max lengths the launch is sized for, as FlashAttention's `max_seqlen_q`
    /// argument. They may exceed the actual ones (extra CTAs exit at once).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a given max is below the longest sequence or above
    /// [`MAX_TOKENS`](super::MAX_TOKENS).
    pub fn with_max_seqlens(mut self, max_seqlen_q: usize, max_seqlen_k: usize) -> Result<Self> {
        if max_seqlen_q < self.max_q || max_seqlen_q > MAX_TOKENS {
            return Err(Error::invalid(
                OP,
                "max_seqlen_q",
                format!(
                    "{max_seqlen_q} is below the longest query sequence {} or above {MAX_TOKENS}",
                    self.max_q
                ),
            ));
        }
        if max_seqlen_k < self.max_k || max_seqlen_k > MAX_TOKENS {
            return Err(Error::invalid(
                OP,
                "max_seqlen_k",
                format!(
                    "{max_seqlen_k} is below the longest key sequence {} or above {MAX_TOKENS}",
                    self.max_k
                ),
            ));
        }
        self.max_q = max_seqlen_q;
        self.max_k = max_seqlen_k;
        Ok(self)
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.host_q.len() - 1
    }

    /// Query tokens over all sequences.
    pub fn total_q(&self) -> usize {
        self.host_q.last().map_or(0, |&t| t as usize)
    }

    /// Key tokens over all sequences.
    pub fn total_k(&self) -> usize {
        self.host_k.last().map_or(0, |&t| t as usize)
    }

    /// The max query length the launch is sized for.
    pub fn max_seqlen_q(&self) -> usize {
        self.max_q
    }

    /// The max key length.
    pub fn max_seqlen_k(&self) -> usize {
        self.max_k
    }

    /// The query offsets.
    pub fn cu_seqlens_q(&self) -> &[i32] {
        &self.host_q
    }

    /// The key offsets.
    pub fn cu_seqlens_k(&self) -> &[i32] {
        &self.host_k
    }

    /// Whether both device copies live on `dev`'s context.
    pub(crate) fn owned_by(&self, dev: &Device) -> bool {
        dev.owns(&self.cu_q) && dev.owns(&self.cu_k)
    }

    /// Device addresses of the two offset lists, with the guard that keeps them recorded
    /// on `stream` until it drops.
    pub(crate) fn device_ptrs<'s>(
        &'s self,
        stream: &'s std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> (u64, u64, impl Sized + 's) {
        let (q, gq) = self.cu_q.device_ptr(stream);
        let (k, gk) = self.cu_k.device_ptr(stream);
        (q, k, (gq, gk))
    }

    /// (seqlen_q, seqlen_k) of each sequence.
    pub fn lengths(&self) -> Vec<(usize, usize)> {
        self.host_q
            .windows(2)
            .zip(self.host_k.windows(2))
            .map(|(q, k)| ((q[1] - q[0]) as usize, (k[1] - k[0]) as usize))
            .collect()
    }
}

/// The inputs of one call: Q, K and V as views of device buffers (K and V may be views of
/// one packed buffer, as may all three). Each buffer is any cudarc device buffer: a
/// `CudaSlice`, or a `CudaView` into a larger one (alignment is checked on the view's own
/// address).
#[derive(Clone, Copy)]
pub struct Qkv<'a, T> {
    /// Holds Q.
    pub q: &'a dyn DevicePtr<T>,
    /// `[total_q, heads_q, head_dim]`.
    pub q_layout: HeadsLayout,
    /// Holds K.
    pub k: &'a dyn DevicePtr<T>,
    /// `[total_k, heads_kv, head_dim]`.
    pub k_layout: HeadsLayout,
    /// Holds V.
    pub v: &'a dyn DevicePtr<T>,
    /// `[total_k, heads_kv, head_dim_v]`.
    pub v_layout: HeadsLayout,
}

impl<T> std::fmt::Debug for Qkv<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qkv")
            .field("q_len", &self.q.len())
            .field("q_layout", &self.q_layout)
            .field("k_len", &self.k.len())
            .field("k_layout", &self.k_layout)
            .field("v_len", &self.v.len())
            .field("v_layout", &self.v_layout)
            .finish()
    }
}

/// The outputs of one call; O and the LSE may be `CudaSlice`s or `CudaViewMut`s.
pub struct AttnOutput<'a, T> {
    /// Receives O.
    pub o: &'a mut dyn DevicePtrMut<T>,
    /// `[total_q, heads_q, head_dim_v]`.
    pub o_layout: HeadsLayout,
    /// Receives the LSE, f32 `[heads_q, total_q]` (dense, natural log), if given.
    pub lse: Option<&'a mut dyn DevicePtrMut<f32>>,
}

impl<T> std::fmt::Debug for AttnOutput<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttnOutput")
            .field("o_len", &self.o.len())
            .field("o_layout", &self.o_layout)
            .field("lse_len", &self.lse.as_ref().map(|l| l.len()))
            .finish()
    }
}

pub(crate) fn kernel_id(dtype: DType, head_dim: usize, head_dim_v: usize) -> Result<KernelId> {
    use KernelId::*;
    let id = match (dtype, head_dim, head_dim_v) {
        (DType::F16, 64, 64) => AttnFwdF16Hd64,
        (DType::F16, 96, 96) => AttnFwdF16Hd96,
        (DType::F16, 128, 128) => AttnFwdF16Hd128,
        (DType::F16, 192, 128) => AttnFwdF16Hd192Dv128,
        (DType::F16, 256, 256) => AttnFwdF16Hd256,
        (DType::BF16, 64, 64) => AttnFwdBf16Hd64,
        (DType::BF16, 96, 96) => AttnFwdBf16Hd96,
        (DType::BF16, 128, 128) => AttnFwdBf16Hd128,
        (DType::BF16, 192, 128) => AttnFwdBf16Hd192Dv128,
        (DType::BF16, 256, 256) => AttnFwdBf16Hd256,
        _ => {
            return Err(Error::unsupported(
                OP,
                "dtype",
                format!("no kernel for {dtype:?} with head dims ({head_dim}, {head_dim_v})"),
            ))
        }
    };
    Ok(id)
}

/// The tile shape attention forward uses on `dev` for element type `T` and these head
/// dims: the portable shape, or the sm_90a one when the driver loaded that cubin (H100,
/// H200). Benchmarks report it, and a CPU tiled run with it is the same-precision baseline
/// of the GPU parity tests.
///
/// # Errors
/// [`Error::InvalidArgument`] for unsupported head dims; [`Error::KernelsNotCompiled`]
/// without kernels; [`Error::Cuda`] if the module cannot be loaded.
pub fn device_tile_config<T: AttnElement>(
    dev: &Device,
    head_dim: usize,
    head_dim_v: usize,
) -> Result<TileConfig> {
    TileConfig::for_head_dims(head_dim, head_dim_v)?;
    let id = kernel_id(T::DTYPE, head_dim, head_dim_v)?;
    TileConfig::for_code(head_dim, head_dim_v, dev.ptx_arch(id)?)
}

/// Device-side checks (contexts, architecture), then everything [`CallShape::validate`]
/// checks.
fn check_call<T: AttnElement>(
    dev: &Device,
    x: &Qkv<T>,
    out: &AttnOutput<T>,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<Validated> {
    for (same_ctx, arg) in [
        (dev.owns_any(x.q), "q"),
        (dev.owns_any(x.k), "k"),
        (dev.owns_any(x.v), "v"),
        (dev.owns_any(&*out.o), "o"),
        (out.lse.as_ref().map_or(true, |l| dev.owns_any(&**l)), "lse"),
        (
            dev.owns(&seqlens.cu_q) && dev.owns(&seqlens.cu_k),
            "seqlens",
        ),
    ] {
        if !same_ctx {
            return Err(Error::invalid(OP, arg, "lives on another device context"));
        }
    }
    check_shapes(
        dev,
        &[
            (x.q_layout, x.q.len()),
            (x.k_layout, x.k.len()),
            (x.v_layout, x.v.len()),
            (out.o_layout, out.o.len()),
        ],
        out.lse.as_ref().map(|l| l.len()),
        seqlens,
        opts,
    )
}

/// Everything checked without looking at buffers: the device's arch, then
/// [`CallShape::validate`] of Q, K, V and O (each a layout and its buffer's length) against
/// the batch layout and options.
fn check_shapes(
    dev: &Device,
    views: &[(HeadsLayout, usize); 4],
    lse_len: Option<usize>,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<Validated> {
    require_sm80(dev, OP)?;
    let shape = |(layout, buffer_len): (HeadsLayout, usize)| ViewShape { layout, buffer_len };
    let mut v = CallShape {
        q: shape(views[0]),
        k: shape(views[1]),
        v: shape(views[2]),
        o: shape(views[3]),
        lse_len,
        cu_seqlens_q: &seqlens.host_q,
        cu_seqlens_k: &seqlens.host_k,
    }
    .validate(opts)?;
    // The launch is sized for the (possibly larger) max lengths the caller gave.
    v.max_seqlen_q = seqlens.max_q;
    v.max_seqlen_k = seqlens.max_k;
    Ok(v)
}

/// The attention kernels need sm_80 or newer (cp.async, bf16 mma.sync).
pub(crate) fn require_sm80(dev: &Device, op: &'static str) -> Result<()> {
    let cc = dev.compute_capability();
    if cc < (8, 0) {
        return Err(Error::unsupported(
            op,
            "device",
            format!(
                "the kernels need sm_80 or newer (cp.async, bf16 mma.sync); this device is sm_{}{}",
                cc.0, cc.1
            ),
        ));
    }
    Ok(())
}

/// A validated view at `base` as the kernels' tensor descriptor.
pub(crate) fn tensor(l: &HeadsLayout, base: u64, elem: usize) -> sys::LongctxAttnTensor {
    sys::LongctxAttnTensor {
        data: base + (l.offset * elem) as u64,
        token_stride: l.token_stride as i64,
        head_stride: l.head_stride as i64,
    }
}

/// Runs attention forward: writes O (and the LSE if asked) for every query row.
///
/// Shapes: see [`Qkv`] and [`AttnOutput`]; the token counts must match `seqlens`'
/// totals. Options: [`AttentionOptions`] (scale, mask, softcap). One kernel launch on
/// `dev`'s stream; nothing is launched when an argument is invalid, or when there is no
/// query row or head.
///
/// # Errors
/// [`Error::InvalidArgument`] when: a buffer lives on another device; the device is older
/// than sm_80; a view leaves its buffer or its rows overlap; token counts differ from
/// `seqlens`' totals; Q and O or K and V disagree on heads; heads_q is not a multiple of
/// heads_kv; Q and K differ in head_dim, or V and O; the head dims are not one of
/// [`SUPPORTED_HEAD_DIMS`](super::SUPPORTED_HEAD_DIMS); the LSE buffer is too small; a view
/// is not 16-byte aligned; the scale or softcap is not finite and positive; the kernel
/// needs more shared memory than the device allows. [`Error::KernelsNotCompiled`] without
/// kernels; [`Error::Cuda`] if the launch fails.
pub fn attention_forward<T: AttnElement>(
    dev: &Device,
    x: &Qkv<T>,
    out: AttnOutput<T>,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<()> {
    let c = check_call(dev, x, &out, seqlens, opts)?;
    if c.heads_q == 0 || c.total_q == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (q_ptr, _qg) = x.q.device_ptr(stream);
    let (k_ptr, _kg) = x.k.device_ptr(stream);
    let (v_ptr, _vg) = x.v.device_ptr(stream);
    let (cu_q_ptr, _cqg) = seqlens.cu_q.device_ptr(stream);
    let (cu_k_ptr, _ckg) = seqlens.cu_k.device_ptr(stream);
    let AttnOutput { o, o_layout, lse } = out;
    let (o_ptr, _og) = o.device_ptr_mut(stream);
    let mut lse_guard = None;
    let lse_ptr = match lse {
        Some(l) => {
            let (p, g) = l.device_ptr_mut(stream);
            lse_guard = Some(g);
            p
        }
        None => 0,
    };
    // SAFETY: check_call proved every view inside its live buffer on this context, O's rows
    // disjoint, the LSE buffer large enough; O and the LSE are borrowed mutably, so no
    // input aliases them; the pointer guards (_qg, _kg, _vg, _og, _cqg, _ckg, lse_guard)
    // live until this returns, after the launch is queued.
    let launched = unsafe {
        launch_validated::<T>(
            dev,
            &c,
            &Layouts {
                q: x.q_layout,
                k: x.k_layout,
                v: x.v_layout,
                o: o_layout,
            },
            &Addrs {
                q: q_ptr,
                k: k_ptr,
                v: v_ptr,
                o: o_ptr,
                lse: lse_ptr,
                cu_seqlens_q: cu_q_ptr,
                cu_seqlens_k: cu_k_ptr,
            },
        )
    };
    drop(lse_guard);
    launched
}

/// Sizes, plans and queues the launch of a validated call.
///
/// # Safety
/// Every view of `views` lies inside a live device allocation of `dev`'s context starting
/// at the matching address of `a` (as `c` was validated against), O does not overlap Q, K,
/// V or the LSE, the LSE (when its address is not 0) holds heads_q x total_q floats, the
/// sequence offsets are the device copies of the ones `c` was validated with, and all of it
/// stays alive and unwritten by other work until the launch completes.
unsafe fn launch_validated<T: AttnElement>(
    dev: &Device,
    c: &Validated,
    views: &Layouts,
    a: &Addrs,
) -> Result<()> {
    if c.heads_q == 0 || c.total_q == 0 {
        return Ok(());
    }
    let id = kernel_id(T::DTYPE, c.tiles.head_dim, c.tiles.head_dim_v)?;
    // The key tile depends on which code the driver loaded (the sm_90a cubin or code for
    // compute_80); query rows and warps, and so the grid, do not.
    let tiles = device_tile_config::<T>(dev, c.tiles.head_dim, c.tiles.head_dim_v)?;
    // Shared memory for the larger of the loaded code's tiles and those of the device's own
    // arch, so it suffices whichever code runs (the kernel traps if given too little).
    let cc = dev.compute_capability();
    let native = TileConfig::for_code(
        c.tiles.head_dim,
        c.tiles.head_dim_v,
        u32::try_from(cc.0 * 10 + cc.1).unwrap_or(0),
    )?;
    let smem = tiles.smem_bytes().max(native.smem_bytes());
    dev.allow_dynamic_smem(id, smem, OP, "head_dim")?;
    let func = dev.function(id)?;
    let l = plan_launch::<T>(c, &tiles, smem, views, a)?;
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: check_shapes (CallShape::validate) and plan_launch proved that every (token,
    // head, channel) address of the Q, K, V and O views lies inside its buffer (the caller
    // guarantees the buffers are live allocations of this context at those addresses) and
    // that O's rows do not overlap; the caller guarantees no input aliases O or the LSE,
    // which holds heads_q x total_q floats at lse_head_stride = total_q. The offsets are
    // validated on the host: nondecreasing from 0, ending at the views' token counts, at
    // most MAX_TOKENS (so the kernel's int32 mask arithmetic cannot overflow), batch and
    // heads within the grid limits, num_m_blocks covering the longest query sequence.
    // heads_q is a multiple of heads_kv, so h / heads_per_kv < heads_kv. plan_launch's
    // check_alignment proved 16-byte alignment of every row start the kernel's cp.async and
    // vector stores use. The window sides are clamped to WINDOW_UNBOUNDED by the plan, the
    // softmax constants are normal floats, and the dynamic shared memory was opted into
    // above when over 48 KiB.
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}

/// [`attention_forward`] on raw device pointers (burn/cubecl-style frameworks).
/// Everything [`attention_forward`] checks about shapes, lengths, alignment and options is
/// checked here too; what cannot be checked is the contract below. `lse` is the address and
/// length (floats) of the LSE buffer, if one is written.
///
/// # Safety
/// Each `ptr` is the start of a live device allocation (or a part of one) of `dev`'s CUDA
/// context holding at least `len` elements of `T` (`f32` for the LSE); O and the LSE do not
/// overlap each other or Q, K, V; no other work writes Q, K, V or reads or writes O and the
/// LSE until the launch, queued on `dev`'s stream, has completed; and the memory stays
/// allocated until then.
///
/// # Errors
/// As [`attention_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_forward_raw<T: AttnElement>(
    dev: &Device,
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    o: RawTensor,
    lse: Option<(u64, usize)>,
    seqlens: &SeqLens,
    opts: &AttentionOptions,
) -> Result<()> {
    if !(dev.owns(&seqlens.cu_q) && dev.owns(&seqlens.cu_k)) {
        return Err(Error::invalid(
            OP,
            "seqlens",
            "lives on another device context",
        ));
    }
    let c = check_shapes(
        dev,
        &[
            (q.layout, q.len),
            (k.layout, k.len),
            (v.layout, v.len),
            (o.layout, o.len),
        ],
        lse.map(|l| l.1),
        seqlens,
        opts,
    )?;
    let stream = dev.stream();
    let (cu_q_ptr, _cqg) = seqlens.cu_q.device_ptr(stream);
    let (cu_k_ptr, _ckg) = seqlens.cu_k.device_ptr(stream);
    // SAFETY: the caller's contract (above) for the raw tensors; the offsets are this
    // handle's own, guarded until the launch is queued.
    unsafe {
        launch_validated::<T>(
            dev,
            &c,
            &Layouts {
                q: q.layout,
                k: k.layout,
                v: v.layout,
                o: o.layout,
            },
            &Addrs {
                q: q.ptr,
                k: k.ptr,
                v: v.ptr,
                o: o.ptr,
                lse: lse.map_or(0, |l| l.0),
                cu_seqlens_q: cu_q_ptr,
                cu_seqlens_k: cu_k_ptr,
            },
        )
    }
}

/// The views of one call.
pub(crate) struct Layouts {
    pub q: HeadsLayout,
    pub k: HeadsLayout,
    pub v: HeadsLayout,
    pub o: HeadsLayout,
}

/// Where the buffers of one call start (LSE 0 when not written).
pub(crate) struct Addrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
}

/// The one function from a validated call to a launch, shared by the CUDA and emulated
/// backends: the kernel for the dtype and head dims, 16-byte alignment of every view, the
/// grid for `tiles` (the loaded code's tile shape), `smem` bytes of dynamic shared memory,
/// and the params.
pub(crate) fn plan_launch<T: AttnElement>(
    c: &Validated,
    tiles: &TileConfig,
    smem: usize,
    views: &Layouts,
    a: &Addrs,
) -> Result<KernelLaunch<sys::LongctxAttnParams>> {
    let id = kernel_id(T::DTYPE, c.tiles.head_dim, c.tiles.head_dim_v)?;
    let elem = T::DTYPE.size();
    check_alignment(&views.q, a.q, elem, "q")?;
    check_alignment(&views.k, a.k, elem, "k")?;
    check_alignment(&views.v, a.v, elem, "v")?;
    check_alignment(&views.o, a.o, elem, "o")?;
    let grid = tiles.grid(c.max_seqlen_q, c.heads_q, c.batch);
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v)
            .map_err(|_| Error::overflow(OP, "seqlens", format!("{what} {v} exceeds u32")))
    };
    let grid = (
        to_u32(grid.0, "query tiles")?,
        to_u32(grid.1, "heads")?,
        to_u32(grid.2, "batch")?,
    );
    let params = sys::LongctxAttnParams {
        q: tensor(&views.q, a.q, elem),
        k: tensor(&views.k, a.k, elem),
        v: tensor(&views.v, a.v, elem),
        o: tensor(&views.o, a.o, elem),
        lse: a.lse,
        lse_head_stride: i64::try_from(c.total_q)
            .map_err(|_| Error::overflow(OP, "lse", "total_q exceeds i64"))?,
        cu_seqlens_q: a.cu_seqlens_q,
        cu_seqlens_k: a.cu_seqlens_k,
        batch: grid.2,
        heads_q: grid.1,
        heads_per_kv: to_u32(c.heads_q / c.heads_kv, "heads_q / heads_kv")?,
        num_m_blocks: grid.0,
        window_left: i32::try_from(c.window.0)
            .map_err(|_| Error::overflow(OP, "mask", "window side past i32"))?,
        window_right: i32::try_from(c.window.1)
            .map_err(|_| Error::overflow(OP, "mask", "window side past i32"))?,
        exp_scale: c.consts.exp_scale,
        softcap_in: c.consts.softcap_in,
    };
    Ok(KernelLaunch {
        id,
        params,
        grid,
        block: (to_u32(tiles.threads(), "threads")?, 1, 1),
        smem_bytes: to_u32(smem, "shared memory")?,
    })
}
