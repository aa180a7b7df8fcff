//! `merge_states`: types, validation, the launch plan shared by the CUDA path and the
//! emulator, and the CUDA op. kernels/kv_cache/merge_kernel.cuh has the kernel.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use crate::device::{cuda_err, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, HeadsLayout, RawBuffer};
use crate::sys;

const OP: &str = "merge_states";

/// The largest `head_dim_v` [`merge_states`] accepts (DeepSeek MLA's 512 included).
pub const MAX_MERGE_HEAD_DIM: usize = sys::LONGCTX_KV_MERGE_MAX_HEAD_DIM as usize;

/// An f32 `[heads, tokens]` LSE view into a flat buffer: element (h, t) lives at
/// `offset + h * head_stride + t`. The attention forward writes `contiguous(heads_q,
/// total_q)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LseLayout {
    /// Element offset of (0, 0).
    pub offset: usize,
    /// Number of heads.
    pub heads: usize,
    /// Number of tokens (contiguous).
    pub tokens: usize,
    /// Elements between consecutive heads (at least `tokens` when `heads > 1`).
    pub head_stride: usize,
}

impl LseLayout {
    /// A dense `[heads, tokens]` view at the start of its buffer.
    pub fn contiguous(heads: usize, tokens: usize) -> Self {
        LseLayout {
            offset: 0,
            heads,
            tokens,
            head_stride: tokens,
        }
    }

    /// One past the last element, or `offset` when the view is empty.
    fn end(&self, arg: &'static str) -> Result<usize> {
        if self.heads == 0 || self.tokens == 0 {
            return Ok(self.offset);
        }
        (self.heads - 1)
            .checked_mul(self.head_stride)
            .and_then(|a| a.checked_add(self.tokens))
            .and_then(|a| a.checked_add(self.offset))
            .ok_or_else(|| Error::invalid(OP, arg, format!("{self:?} addresses past usize")))
    }

    pub(crate) fn validate(&self, arg: &'static str, len: usize) -> Result<()> {
        let end = self.end(arg)?;
        if self.heads == 0 || self.tokens == 0 {
            return Ok(());
        }
        if self.heads > 1 && self.head_stride < self.tokens {
            return Err(Error::invalid(
                OP,
                arg,
                format!(
                    "head_stride {} < tokens {}: heads would overlap",
                    self.head_stride, self.tokens
                ),
            ));
        }
        if end > len {
            return Err(Error::invalid(
                OP,
                arg,
                format!("view {self:?} reaches element {end} but the buffer holds {len}"),
            ));
        }
        Ok(())
    }
}

/// `parts` states of the same rows stacked along a leading dim: part p's O is the view
/// `o` moved by `p * o_part_stride` elements, its LSE the view `lse` moved by
/// `p * lse_part_stride`. Split-KV decode writes its splits this way; a context-parallel
/// step can stack the shards' outputs, or merge them one at a time into a running state
/// with [`MergeOptions::accumulate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackedStates {
    /// Number of parts (0 allowed: the merge of nothing is the empty state).
    pub parts: usize,
    /// Part 0's O, `[tokens, heads, head_dim_v]`.
    pub o: HeadsLayout,
    /// Elements between consecutive parts of O.
    pub o_part_stride: usize,
    /// Part 0's LSE, `[heads, tokens]`.
    pub lse: LseLayout,
    /// Elements between consecutive parts of the LSE.
    pub lse_part_stride: usize,
}

impl StackedStates {
    /// Dense stacks: O `[parts, tokens, heads, head_dim_v]`, LSE `[parts, heads, tokens]`.
    ///
    /// Never fails: a product that overflows usize saturates, and the op rejects the view.
    pub fn contiguous(parts: usize, tokens: usize, heads: usize, head_dim_v: usize) -> Self {
        let o = HeadsLayout::contiguous(tokens, heads, head_dim_v);
        StackedStates {
            parts,
            o,
            o_part_stride: tokens.saturating_mul(o.token_stride),
            lse: LseLayout::contiguous(heads, tokens),
            lse_part_stride: heads.saturating_mul(tokens),
        }
    }

    /// Part `p`'s O and LSE views.
    fn part(&self, p: usize) -> Result<(HeadsLayout, LseLayout)> {
        let bad = |arg| Error::invalid(OP, arg, format!("part {p}'s offset overflows usize"));
        let mut o = self.o;
        o.offset = p
            .checked_mul(self.o_part_stride)
            .and_then(|x| x.checked_add(self.o.offset))
            .ok_or_else(|| bad("parts.o"))?;
        let mut lse = self.lse;
        lse.offset = p
            .checked_mul(self.lse_part_stride)
            .and_then(|x| x.checked_add(self.lse.offset))
            .ok_or_else(|| bad("parts.lse"))?;
        Ok((o, lse))
    }
}

/// Per-call options of [`merge_states`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeOptions {
    /// Treat the output's current (O, LSE) as one more part: `out = merge(out, parts...)`.
    /// A running state starts as LSE = -inf everywhere (its O is then never read). Ring
    /// attention merges each arriving shard's partial this way.
    pub accumulate: bool,
}

/// The shapes of one call, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct MergeShape {
    /// The input parts.
    pub parts: StackedStates,
    /// Elements in the buffer holding the parts' O.
    pub parts_o_len: usize,
    /// Elements in the buffer holding the parts' LSE.
    pub parts_lse_len: usize,
    /// The merged O, `[tokens, heads, head_dim_v]`.
    pub out_o: HeadsLayout,
    /// Elements in its buffer.
    pub out_o_len: usize,
    /// The merged LSE, `[heads, tokens]`.
    pub out_lse: LseLayout,
    /// Elements in its buffer.
    pub out_lse_len: usize,
}

/// A call that passed [`MergeShape::validate`].
#[derive(Debug, Clone, Copy)]
pub struct MergeValidated {
    shape: MergeShape,
    /// (token, head) rows to merge.
    pub rows: usize,
}

impl MergeShape {
    /// Checks everything about a call that does not need the device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for: a `head_dim_v` outside 1..=[`MAX_MERGE_HEAD_DIM`]
    /// (`parts.o`); parts, output O or LSE shapes that disagree (`out_o`, `out_lse`,
    /// `parts.lse`); a view (any part's, or an output's) that leaves its buffer, whose rows
    /// overlap, or whose offset overflows (`parts.o`, `parts.lse`, `out_o`, `out_lse`);
    /// a count or stride that does not fit the kernel's u32/i64 fields or a grid too large.
    pub fn validate(&self) -> Result<MergeValidated> {
        let s = &self.parts;
        let (t, h, d) = (s.o.tokens, s.o.heads, s.o.head_dim);
        if d == 0 || d > MAX_MERGE_HEAD_DIM {
            return Err(Error::invalid(
                OP,
                "parts.o",
                format!("head_dim_v {d} outside 1..={MAX_MERGE_HEAD_DIM}"),
            ));
        }
        let o = self.out_o;
        if (o.tokens, o.heads, o.head_dim) != (t, h, d) {
            return Err(Error::invalid(
                OP,
                "out_o",
                format!(
                    "shape [{}, {}, {}] differs from the parts' [{t}, {h}, {d}]",
                    o.tokens, o.heads, o.head_dim
                ),
            ));
        }
        for (arg, l) in [("parts.lse", s.lse), ("out_lse", self.out_lse)] {
            if (l.heads, l.tokens) != (h, t) {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "shape [{}, {}] differs from [heads, tokens] = [{h}, {t}]",
                        l.heads, l.tokens
                    ),
                ));
            }
        }
        self.out_o.validate(OP, "out_o", self.out_o_len)?;
        self.out_lse.validate("out_lse", self.out_lse_len)?;
        if s.parts > 0 {
            // Every part has the same shape and the offsets grow with p: the first and the
            // last part inside the buffer put all of them inside.
            for p in [0, s.parts - 1] {
                let (po, pl) = s.part(p)?;
                po.validate(OP, "parts.o", self.parts_o_len)?;
                pl.validate("parts.lse", self.parts_lse_len)?;
            }
        }
        let i64_of = |v: usize, arg: &'static str| {
            i64::try_from(v).map_err(|_| Error::invalid(OP, arg, format!("stride {v} exceeds i64")))
        };
        for (v, arg) in [
            (s.o_part_stride, "parts.o"),
            (s.o.token_stride, "parts.o"),
            (s.o.head_stride, "parts.o"),
            (s.lse_part_stride, "parts.lse"),
            (s.lse.head_stride, "parts.lse"),
            (o.token_stride, "out_o"),
            (o.head_stride, "out_o"),
            (self.out_lse.head_stride, "out_lse"),
        ] {
            i64_of(v, arg)?;
        }
        for (v, what) in [(s.parts, "parts"), (t, "tokens"), (h, "heads")] {
            u32::try_from(v)
                .map_err(|_| Error::invalid(OP, "parts", format!("{what} {v} exceeds u32")))?;
        }
        let rows = t
            .checked_mul(h)
            .ok_or_else(|| Error::invalid(OP, "parts", "tokens x heads overflows usize"))?;
        let blocks = rows.div_ceil(sys::LONGCTX_KV_MERGE_WARPS as usize);
        if blocks > i32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "parts",
                format!("{rows} rows need {blocks} blocks, more than a grid holds"),
            ));
        }
        Ok(MergeValidated { shape: *self, rows })
    }
}

/// Where the buffers of one call start (device or emulated host addresses).
pub(crate) struct MergeAddrs {
    pub parts_o: u64,
    pub parts_lse: u64,
    pub out_o: u64,
    pub out_lse: u64,
}

fn kernel_id(parts: DType, out: DType, vec: bool) -> Result<KernelId> {
    use KernelId::*;
    Ok(match (parts, out, vec) {
        (DType::F32, DType::F32, true) => KvMergeF32Vec,
        (DType::F32, DType::F32, false) => KvMergeF32Scalar,
        (DType::F16, DType::F16, true) => KvMergeF16Vec,
        (DType::F16, DType::F16, false) => KvMergeF16Scalar,
        (DType::BF16, DType::BF16, true) => KvMergeBf16Vec,
        (DType::BF16, DType::BF16, false) => KvMergeBf16Scalar,
        (DType::F32, DType::F16, true) => KvMergeF32F16Vec,
        (DType::F32, DType::F16, false) => KvMergeF32F16Scalar,
        (DType::F32, DType::BF16, true) => KvMergeF32Bf16Vec,
        (DType::F32, DType::BF16, false) => KvMergeF32Bf16Scalar,
        _ => {
            return Err(Error::unsupported(
                OP,
                "parts",
                format!("no merge kernel from {parts:?} parts to a {out:?} output"),
            ))
        }
    })
}

/// Byte address of element `offset` of the buffer at `base`.
fn byte_addr(base: u64, offset: usize, elem: usize, arg: &'static str) -> Result<u64> {
    (offset as u64)
        .checked_mul(elem as u64)
        .and_then(|b| b.checked_add(base))
        .ok_or_else(|| Error::invalid(OP, arg, "offset overflows the address space"))
}

/// The one function from a validated call to its launch, shared by the CUDA and emulated
/// backends. `None` when there is no row to merge.
///
/// The 16-byte vector kernel is chosen when every O row the kernel touches starts on 16
/// bytes (base addresses, part, token and head strides) and `head_dim_v` is a multiple of
/// the vector width; otherwise the scalar one, which accepts any element-aligned view.
pub(crate) fn plan_merge<T: Element>(
    v: &MergeValidated,
    opts: &MergeOptions,
    a: &MergeAddrs,
) -> Result<Option<KernelLaunch<sys::LongctxKvMergeParams>>> {
    plan_merge_typed(T::DTYPE, T::DTYPE, v, opts, a)
}

/// [`plan_merge`] with parts of type `parts` merged into an output of type `out` (split-KV
/// decode merges its f32 partial states into the attention dtype). The vector width is
/// the parts' 16 bytes.
pub(crate) fn plan_merge_typed(
    parts: DType,
    out_dtype: DType,
    v: &MergeValidated,
    opts: &MergeOptions,
    a: &MergeAddrs,
) -> Result<Option<KernelLaunch<sys::LongctxKvMergeParams>>> {
    if v.rows == 0 {
        return Ok(None);
    }
    let s = &v.shape.parts;
    let out = &v.shape.out_o;
    let elem = parts.size();
    let out_elem = out_dtype.size();
    let w = 16 / elem;
    let parts_o = byte_addr(a.parts_o, s.o.offset, elem, "parts.o")?;
    let parts_lse = byte_addr(a.parts_lse, s.lse.offset, 4, "parts.lse")?;
    let out_o = byte_addr(a.out_o, out.offset, out_elem, "out_o")?;
    let out_lse = byte_addr(a.out_lse, v.shape.out_lse.offset, 4, "out_lse")?;
    let inputs_aligned = s.parts == 0
        || (parts_o % 16 == 0
            && (s.parts == 1 || s.o_part_stride % w == 0)
            && s.o.token_stride % w == 0
            && s.o.head_stride % w == 0);
    let vec = inputs_aligned
        && out_o % (w * out_elem) as u64 == 0
        && out.token_stride % w == 0
        && out.head_stride % w == 0
        && s.o.head_dim % w == 0;
    // Validation proved every value below fits its field.
    let params = sys::LongctxKvMergeParams {
        o_parts: parts_o,
        lse_parts: parts_lse,
        out_o,
        out_lse,
        o_part_stride: s.o_part_stride as i64,
        o_token_stride: s.o.token_stride as i64,
        o_head_stride: s.o.head_stride as i64,
        lse_part_stride: s.lse_part_stride as i64,
        lse_head_stride: s.lse.head_stride as i64,
        out_token_stride: out.token_stride as i64,
        out_head_stride: out.head_stride as i64,
        out_lse_head_stride: v.shape.out_lse.head_stride as i64,
        parts: s.parts as u32,
        tokens: s.o.tokens as u32,
        heads: s.o.heads as u32,
        head_dim_v: s.o.head_dim as u32,
        flags: if opts.accumulate {
            sys::LONGCTX_KV_MERGE_ACCUMULATE
        } else {
            0
        },
        pad0: 0,
    };
    let blocks = v.rows.div_ceil(sys::LONGCTX_KV_MERGE_WARPS as usize) as u32;
    Ok(Some(KernelLaunch {
        id: kernel_id(parts, out_dtype, vec)?,
        params,
        grid: (blocks, 1, 1),
        block: (32 * sys::LONGCTX_KV_MERGE_WARPS, 1, 1),
        smem_bytes: 0,
    }))
}

/// The input parts of a merge: two buffers and their stacked layout.
#[derive(Clone, Copy)]
pub struct States<'a, T> {
    /// Holds every part's O.
    pub o: &'a dyn DevicePtr<T>,
    /// Holds every part's LSE (f32, natural log, -inf for an empty row).
    pub lse: &'a dyn DevicePtr<f32>,
    /// Where each part lives in them.
    pub layout: StackedStates,
}

impl<T> std::fmt::Debug for States<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("States")
            .field("o_len", &self.o.len())
            .field("lse_len", &self.lse.len())
            .field("layout", &self.layout)
            .finish()
    }
}

/// The merged state a merge writes (and, with [`MergeOptions::accumulate`], first reads).
pub struct MergeState<'a, T> {
    /// Receives O.
    pub o: &'a mut dyn DevicePtrMut<T>,
    /// `[tokens, heads, head_dim_v]`.
    pub o_layout: HeadsLayout,
    /// Receives the LSE.
    pub lse: &'a mut dyn DevicePtrMut<f32>,
    /// `[heads, tokens]`.
    pub lse_layout: LseLayout,
}

impl<T> std::fmt::Debug for MergeState<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeState")
            .field("o_len", &self.o.len())
            .field("o_layout", &self.o_layout)
            .field("lse_len", &self.lse.len())
            .field("lse_layout", &self.lse_layout)
            .finish()
    }
}

/// Merges `parts` into `out` on `dev`'s stream: for each (token, head) row,
/// `LSE = log sum_p exp(LSE_p)` and `O = sum_p exp(LSE_p - LSE) O_p`, in f32. Parts whose
/// LSE is -inf contribute nothing (their O is not read); a row with no nonempty part gets
/// O = 0, LSE = -inf. LSE values must be finite or -inf (+inf or NaN give NaN rows).
/// One launch, nothing allocated.
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`MergeShape::validate`] rejects, a buffer of
/// another context, or a device older than sm_80. [`Error::KernelsNotCompiled`] without
/// kernels; [`Error::Cuda`] if the launch fails.
pub fn merge_states<T: Element>(
    dev: &Device,
    parts: &States<T>,
    out: MergeState<T>,
    opts: &MergeOptions,
) -> Result<()> {
    for (same_ctx, arg) in [
        (dev.owns_any(parts.o), "parts.o"),
        (dev.owns_any(parts.lse), "parts.lse"),
        (dev.owns_any(&*out.o), "out_o"),
        (dev.owns_any(&*out.lse), "out_lse"),
    ] {
        if !same_ctx {
            return Err(Error::invalid(OP, arg, "lives on another device context"));
        }
    }
    check_arch(dev)?;
    let v = MergeShape {
        parts: parts.layout,
        parts_o_len: parts.o.len(),
        parts_lse_len: parts.lse.len(),
        out_o: out.o_layout,
        out_o_len: out.o.len(),
        out_lse: out.lse_layout,
        out_lse_len: out.lse.len(),
    }
    .validate()?;
    let stream = dev.stream();
    let (po, _g0) = parts.o.device_ptr(stream);
    let (pl, _g1) = parts.lse.device_ptr(stream);
    let MergeState { o, lse, .. } = out;
    let (oo, _g2) = o.device_ptr_mut(stream);
    let (ol, _g3) = lse.device_ptr_mut(stream);
    // SAFETY: live allocations of this context (owns_any above), the outputs borrowed
    // mutably (so no input aliases them), all guarded until the launch is queued.
    unsafe {
        launch_validated::<T>(
            dev,
            &v,
            opts,
            &MergeAddrs {
                parts_o: po,
                parts_lse: pl,
                out_o: oo,
                out_lse: ol,
            },
        )
    }
}

/// Plans and queues a validated merge at these addresses.
///
/// # Safety
/// Each address starts a live allocation of `dev`'s context of the length `v` was
/// validated with; the outputs overlap no input; no other work touches them until the
/// launch completes.
unsafe fn launch_validated<T: Element>(
    dev: &Device,
    v: &MergeValidated,
    opts: &MergeOptions,
    a: &MergeAddrs,
) -> Result<()> {
    let Some(l) = plan_merge::<T>(v, opts, a)? else {
        return Ok(());
    };
    let func = dev.function(l.id)?;
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: MergeShape::validate proved every part's O and LSE view and both output views
    // inside their buffers, the output rows disjoint, every count and stride within the
    // kernel's u32/i64 fields and the grid within limits; plan_merge picked the 16-byte
    // kernel only for 16-byte aligned rows; the caller guarantees the addresses.
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}

/// [`merge_states`] on raw device pointers (burn/cubecl-style frameworks): `parts_o` /
/// `parts_lse` hold the stacked parts as `layout` says, `out_o` / `out_lse` receive the
/// merged state in their views. Everything [`merge_states`] checks is checked here too.
///
/// # Safety
/// Each pointer is the start of a live device allocation (or a part of one) of `dev`'s CUDA
/// context holding at least `len` elements (`T` for O, `f32` for LSE); the outputs overlap
/// each other and no input; no other work writes the inputs or touches the outputs until
/// the launch, queued on `dev`'s stream, completes; the memory stays allocated until then.
///
/// # Errors
/// As [`merge_states`], plus a pointer not a multiple of its element size (kind alignment).
#[allow(clippy::too_many_arguments)]
pub unsafe fn merge_states_raw<T: Element>(
    dev: &Device,
    parts_o: RawBuffer,
    parts_lse: RawBuffer,
    layout: &StackedStates,
    out_o: RawBuffer,
    out_o_layout: &HeadsLayout,
    out_lse: RawBuffer,
    out_lse_layout: &LseLayout,
    opts: &MergeOptions,
) -> Result<()> {
    check_arch(dev)?;
    let elem = T::DTYPE.size();
    for (arg, b, e) in [
        ("parts.o", parts_o, elem),
        ("parts.lse", parts_lse, 4),
        ("out_o", out_o, elem),
        ("out_lse", out_lse, 4),
    ] {
        check_element_alignment(OP, arg, b.ptr, e)?;
    }
    let v = MergeShape {
        parts: *layout,
        parts_o_len: parts_o.len,
        parts_lse_len: parts_lse.len,
        out_o: *out_o_layout,
        out_o_len: out_o.len,
        out_lse: *out_lse_layout,
        out_lse_len: out_lse.len,
    }
    .validate()?;
    // SAFETY: the caller's contract.
    unsafe {
        launch_validated::<T>(
            dev,
            &v,
            opts,
            &MergeAddrs {
                parts_o: parts_o.ptr,
                parts_lse: parts_lse.ptr,
                out_o: out_o.ptr,
                out_lse: out_lse.ptr,
            },
        )
    }
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
