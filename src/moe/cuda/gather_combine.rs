//! Hidden states between token order and expert order: gather, combine and their
//! gradients, on cudarc buffers, views and raw pointers.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The kernels index a row with `int`: hidden sizes from 1 to i32::MAX.
fn check_hidden(hidden: usize) -> Result<u32> {
    if hidden == 0 {
        return Err(Error::invalid(OP, "hidden", "hidden size 0"));
    }
    if i32::try_from(hidden).is_err() {
        return Err(Error::overflow(
            OP,
            "hidden",
            format!("hidden size {hidden} does not fit the kernels' 32-bit row index"),
        ));
    }
    u32_of(hidden, "hidden")
}

/// The buffers of one gather: source rows in token order, optional per-assignment scales,
/// the permutation's slot assignments and offsets, destination rows in expert order.
pub(crate) struct GatherBufs {
    pub x: Buf,
    pub scale: Option<Buf>,
    pub slot_assignment: Buf,
    pub offsets: Buf,
    pub out: Buf,
}

/// The gather launch over `p`'s max_slots rows of `hidden` elements: one block per slot
/// row, 16-byte vectors where every row of source and destination is aligned.
pub(crate) fn plan_gather<T: MoeHiddenElement>(
    p: &PermutePlan,
    hidden: usize,
    b: &GatherBufs,
) -> Result<KernelLaunch<sys::LongctxMoeGatherParams>> {
    let h = check_hidden(hidden)?;
    check_len(
        b.x.len,
        elems(p.tokens, hidden, "x")?,
        "x",
        "tokens x hidden",
    )?;
    check_len(
        b.out.len,
        elems(p.max_slots, hidden, "out")?,
        "out",
        "max_slots x hidden",
    )?;
    if let Some(s) = &b.scale {
        check_len(s.len, p.assignments, "scale", "tokens x top_k")?;
        check_aligned::<f32>(s, "scale")?;
    }
    check_aligned::<T>(&b.x, "x")?;
    check_aligned::<T>(&b.out, "out")?;
    check_len(b.slot_assignment.len, p.max_slots, "perm", "max_slots")?;
    check_len(b.offsets.len, p.experts + 1, "perm", "experts + 1")?;
    let params = sys::LongctxMoeGatherParams {
        src: b.x.addr,
        dst: b.out.addr,
        slot_assignment: b.slot_assignment.addr,
        scale: b.scale.map_or(0, |s| s.addr),
        // offsets[experts], the padded total.
        total: b.offsets.addr + 4 * u64::from(u32_of(p.experts, "experts")?),
        rows: u32_of(p.max_slots, "out")?,
        hidden: h,
        top_k: u32_of(p.top_k, "top_k")?,
        vec: u32::from(
            rows_vec_aligned::<T>(hidden, &b.x) && rows_vec_aligned::<T>(hidden, &b.out),
        ),
    };
    Ok(KernelLaunch {
        id: pick_hidden::<T>(
            KernelId::MoeGatherF32,
            KernelId::MoeGatherBf16,
            KernelId::MoeGatherF16,
        ),
        params,
        grid: (grid_u32(p.max_slots, "out")?, 1, 1),
        block: (ROW_THREADS, 1, 1),
        smem_bytes: 0,
    })
}

/// The buffers of one combine: rows in expert order, optional per-assignment weights, the
/// permutation's slot of each assignment, destination rows in token order.
pub(crate) struct CombineBufs {
    pub src: Buf,
    pub weights: Option<Buf>,
    pub slot_of: Buf,
    pub out: Buf,
}

/// The combine launch (also the gather's gradient, unweighted): one block per token row;
/// `arg_in` names the source in errors.
pub(crate) fn plan_combine<T: MoeHiddenElement>(
    p: &PermutePlan,
    hidden: usize,
    b: &CombineBufs,
    arg_in: &'static str,
) -> Result<KernelLaunch<sys::LongctxMoeCombineParams>> {
    let h = check_hidden(hidden)?;
    check_len(
        b.src.len,
        elems(p.max_slots, hidden, arg_in)?,
        arg_in,
        "max_slots x hidden",
    )?;
    check_len(
        b.out.len,
        elems(p.tokens, hidden, "out")?,
        "out",
        "tokens x hidden",
    )?;
    if let Some(w) = &b.weights {
        check_len(w.len, p.assignments, "weights", "tokens x top_k")?;
        check_aligned::<f32>(w, "weights")?;
    }
    check_aligned::<T>(&b.src, arg_in)?;
    check_aligned::<T>(&b.out, "out")?;
    check_len(b.slot_of.len, p.assignments, "perm", "tokens x top_k")?;
    let params = sys::LongctxMoeCombineParams {
        src: b.src.addr,
        dst: b.out.addr,
        slot_of: b.slot_of.addr,
        weights: b.weights.map_or(0, |w| w.addr),
        tokens: u32_of(p.tokens, "out")?,
        hidden: h,
        top_k: u32_of(p.top_k, "top_k")?,
        vec: u32::from(
            rows_vec_aligned::<T>(hidden, &b.src) && rows_vec_aligned::<T>(hidden, &b.out),
        ),
    };
    Ok(KernelLaunch {
        id: pick_hidden::<T>(
            KernelId::MoeCombineF32,
            KernelId::MoeCombineBf16,
            KernelId::MoeCombineF16,
        ),
        params,
        grid: (grid_u32(p.tokens, "out")?, 1, 1),
        block: (ROW_THREADS, 1, 1),
        smem_bytes: 0,
    })
}

/// The buffers of a combine backward.
pub(crate) struct CombineBackwardBufs {
    pub d_out: Buf,
    pub expert_out: Buf,
    pub weights: Buf,
    pub slot_assignment: Buf,
    pub offsets: Buf,
    pub slot_of: Buf,
    pub d_expert_out: Buf,
    pub d_weights: Buf,
}

/// The combine's gradient, two launches in order: d_expert_out as the gather of d_out
/// scaled by the weights (its errors name d_out `x` and d_expert_out `out`), then the
/// weights' gradient as one dot product per assignment.
pub(crate) fn plan_combine_backward<T: MoeHiddenElement>(
    p: &PermutePlan,
    hidden: usize,
    b: &CombineBackwardBufs,
) -> Result<(
    KernelLaunch<sys::LongctxMoeGatherParams>,
    KernelLaunch<sys::LongctxMoeCombineDwParams>,
)> {
    let gather = plan_gather::<T>(
        p,
        hidden,
        &GatherBufs {
            x: b.d_out,
            scale: Some(b.weights),
            slot_assignment: b.slot_assignment,
            offsets: b.offsets,
            out: b.d_expert_out,
        },
    )?;
    let h = check_hidden(hidden)?;
    check_len(
        b.expert_out.len,
        elems(p.max_slots, hidden, "expert_out")?,
        "expert_out",
        "max_slots x hidden",
    )?;
    check_len(
        b.d_weights.len,
        p.assignments,
        "d_weights",
        "tokens x top_k",
    )?;
    check_aligned::<T>(&b.expert_out, "expert_out")?;
    check_aligned::<f32>(&b.d_weights, "d_weights")?;
    check_len(b.slot_of.len, p.assignments, "perm", "tokens x top_k")?;
    let params = sys::LongctxMoeCombineDwParams {
        d_out: b.d_out.addr,
        expert_out: b.expert_out.addr,
        slot_of: b.slot_of.addr,
        d_weights: b.d_weights.addr,
        tokens: u32_of(p.tokens, "d_out")?,
        hidden: h,
        top_k: u32_of(p.top_k, "top_k")?,
        vec: u32::from(
            rows_vec_aligned::<T>(hidden, &b.d_out) && rows_vec_aligned::<T>(hidden, &b.expert_out),
        ),
    };
    let dw = KernelLaunch {
        id: pick_hidden::<T>(
            KernelId::MoeCombineDwF32,
            KernelId::MoeCombineDwBf16,
            KernelId::MoeCombineDwF16,
        ),
        params,
        grid: (grid_u32(p.tokens, "d_out")?, 1, 1),
        block: (ROW_THREADS, 1, 1),
        smem_bytes: 0,
    };
    Ok((gather, dw))
}

// ------------------------------------------------------------------ gather / combine

/// The gather from launch buffers, shared by [`gather`] and [`gather_raw`].
///
/// # Safety
/// `x`, `scale` (if any) and `out` are device buffers of `dev`'s context holding at least
/// `len` elements from `addr` (of `T`, f32, `T`); `out` overlaps neither input nor `perm`'s
/// tables; no other work touches them until the launch has completed; they stay alive
/// until then.
unsafe fn gather_bufs<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    x: Buf,
    hidden: usize,
    scale: Option<Buf>,
    out: Buf,
) -> Result<()> {
    perm.check_filled(dev)?;
    check_owned(dev, &perm.slot_assignment, "perm")?;
    check_owned(dev, &perm.offsets, "perm")?;
    let stream = dev.stream();
    let (sa, _g2) = perm.slot_assignment.device_ptr(stream);
    let (offsets, _g3) = perm.offsets.device_ptr(stream);
    let l = plan_gather::<T>(
        &perm.plan,
        hidden,
        &GatherBufs {
            x,
            scale,
            slot_assignment: dbuf(&perm.slot_assignment, sa),
            offsets: dbuf(&perm.offsets, offsets),
            out,
        },
    )?;
    // SAFETY: plan_gather checked that out holds max_slots x hidden elements (one block per
    // slot row), x tokens x hidden and scale (if any) one entry per assignment, each
    // address aligned to its element; `total` points at offsets[experts] inside perm's
    // experts + 1 offsets; each slot's assignment is -1 or in 0..tokens x top_k (written by
    // permute), so the source row a / top_k < tokens lies in x; vector access only when
    // hidden is a multiple of the 16-byte width and both buffers' actual addresses are
    // 16-byte aligned, so every row start is. perm's tables are on this context (checked
    // above), their guards live until the end of this function; x, scale and out are live
    // buffers of this context with out distinct from the rest (this function's contract).
    unsafe { launch(dev, &l) }
}

/// Hidden states `x` \[tokens, hidden\] into expert order `out` \[max_slots, hidden\]: row s =
/// scale\[a\] x x\[a / top_k\] for the assignment a in slot s, zeros for padding inside the
/// experts' segments; rows past the padded total (`offsets[experts]`) are left untouched.
/// `scale` (f32 \[tokens x top_k\]) defaults to 1.
///
/// Every buffer is a cudarc `CudaSlice` or view (`CudaView`, `CudaViewMut`) of at least the
/// needed length, used from its start (the tail is left alone); the 16-byte vector path is
/// chosen from the actual addresses.
///
/// # Errors
/// [`Error::InvalidArgument`] on a length mismatch, hidden of 0, a permutation not yet
/// computed, or a buffer on another device; [`Error::Cuda`].
pub fn gather<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    x: &impl DevicePtr<T>,
    hidden: usize,
    scale: Option<&dyn DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    check_owned(dev, x, "x")?;
    check_owned(dev, out, "out")?;
    if let Some(s) = scale {
        check_owned(dev, s, "scale")?;
    }
    let stream = dev.stream();
    let out_len = out.len();
    let (src, _g0) = x.device_ptr(stream);
    let scale_guard = scale.map(|s| (s.len(), s.device_ptr(stream)));
    let (dst, _g1) = out.device_ptr_mut(stream);
    let x = dbuf(x, src);
    let scale = scale_guard.as_ref().map(|(len, g)| Buf {
        addr: g.0,
        len: *len,
    });
    // SAFETY: x, scale and out are cudarc buffers or views of this context (checked above)
    // with the lengths given; out is borrowed mutably, so it overlaps neither the inputs
    // nor perm's tables (owned by perm, borrowed shared); the guards live until the end of
    // this function.
    unsafe {
        gather_bufs::<T>(
            dev,
            perm,
            x,
            hidden,
            scale,
            Buf {
                addr: dst,
                len: out_len,
            },
        )
    }
}

/// [`gather`] on raw device pointers (`x` and `out` of `T`, `scale` of f32), for frameworks
/// that hand out only pointers. Checks everything [`gather`] checks, plus that each pointer
/// is non-null and a multiple of its element size.
///
/// # Safety
/// Each pointer points to at least its `len` elements in live device memory of `dev`'s CUDA
/// context; `out`'s range overlaps neither `x`'s nor `scale`'s; no other work reads or
/// writes `out`, or writes `x` or `scale`, until the launch, queued on `dev`'s stream, has
/// completed; and the memory stays allocated until then.
///
/// # Errors
/// As [`gather`], plus an [`Error::InvalidArgument`] of kind
/// [`ErrorKind::Alignment`](crate::ErrorKind::Alignment) for a misaligned pointer.
pub unsafe fn gather_raw<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    x: RawBuffer,
    hidden: usize,
    scale: Option<RawBuffer>,
    out: RawBuffer,
) -> Result<()> {
    let x = raw_buf(x, "x")?;
    let scale = scale.map(|s| raw_buf(s, "scale")).transpose()?;
    let out = raw_buf(out, "out")?;
    // SAFETY: forwarded from this function's contract.
    unsafe { gather_bufs::<T>(dev, perm, x, hidden, scale, out) }
}

/// The combine (and the gather's gradient) from launch buffers; `arg_in` names the source.
///
/// # Safety
/// As [`gather_bufs`], with `src` \[max_slots, hidden\] and `weights` for `x` and `scale`.
unsafe fn combine_bufs<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    src: Buf,
    hidden: usize,
    weights: Option<Buf>,
    out: Buf,
    arg_in: &'static str,
) -> Result<()> {
    perm.check_filled(dev)?;
    let stream = dev.stream();
    let (so, _g2) = perm.slot_of.device_ptr(stream);
    let l = plan_combine::<T>(
        &perm.plan,
        hidden,
        &CombineBufs {
            src,
            weights,
            slot_of: dbuf(&perm.slot_of, so),
            out,
        },
        arg_in,
    )?;
    // SAFETY: plan_combine checked that out holds tokens x hidden elements (one block per
    // token row), src max_slots x hidden and weights (if any) one per assignment, each
    // address aligned to its element; slot_of has tokens x top_k entries, each -1 or below
    // max_slots (written by permute) and lives on this context (check_filled); vector
    // access only with 16-byte aligned rows at the actual addresses. src, weights and out
    // are live buffers of this context with out distinct from the rest (this function's
    // contract). slot_of's guard lives until the end of this function.
    unsafe { launch(dev, &l) }
}

/// combine and gather_backward on cudarc buffers or views.
fn combine_impl<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    expert_out: &impl DevicePtr<T>,
    hidden: usize,
    weights: Option<&dyn DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<T>,
    arg_in: &'static str,
) -> Result<()> {
    check_owned(dev, expert_out, arg_in)?;
    check_owned(dev, out, "out")?;
    if let Some(w) = weights {
        check_owned(dev, w, "weights")?;
    }
    let stream = dev.stream();
    let out_len = out.len();
    let (src, _g0) = expert_out.device_ptr(stream);
    let w_guard = weights.map(|w| (w.len(), w.device_ptr(stream)));
    let (dst, _g1) = out.device_ptr_mut(stream);
    let src = dbuf(expert_out, src);
    let weights = w_guard.as_ref().map(|(len, g)| Buf {
        addr: g.0,
        len: *len,
    });
    // SAFETY: every buffer is a cudarc buffer or view of this context (checked above) with
    // the length given; out is borrowed mutably, so it overlaps neither the inputs nor
    // perm's tables; the guards live until the end of this function.
    unsafe {
        combine_bufs::<T>(
            dev,
            perm,
            src,
            hidden,
            weights,
            Buf {
                addr: dst,
                len: out_len,
            },
            arg_in,
        )
    }
}

/// Back to token order: out\[t\] = sum_j weights\[t, j\] x expert_out\[slot_of\[t, j\]\] over
/// the kept assignments, accumulated in f32 in rank order; `weights` (f32 \[tokens x top_k\])
/// default to 1. Dropped assignments contribute nothing. Buffers as in [`gather`].
///
/// # Errors
/// As [`gather`].
pub fn combine<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    expert_out: &impl DevicePtr<T>,
    hidden: usize,
    weights: Option<&dyn DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    combine_impl(dev, perm, expert_out, hidden, weights, out, "expert_out")
}

/// [`combine`] on raw device pointers (`expert_out` and `out` of `T`, `weights` of f32).
///
/// # Safety
/// As [`gather_raw`], with `expert_out` and `weights` for `x` and `scale`.
///
/// # Errors
/// As [`gather_raw`].
pub unsafe fn combine_raw<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    expert_out: RawBuffer,
    hidden: usize,
    weights: Option<RawBuffer>,
    out: RawBuffer,
) -> Result<()> {
    let src = raw_buf(expert_out, "expert_out")?;
    let weights = weights.map(|w| raw_buf(w, "weights")).transpose()?;
    let out = raw_buf(out, "out")?;
    // SAFETY: forwarded from this function's contract.
    unsafe { combine_bufs::<T>(dev, perm, src, hidden, weights, out, "expert_out") }
}

/// Gradient of [`gather`] (without scale): d_x\[t\] = sum_j d_permuted\[slot_of\[t, j\]\], a
/// scatter-add done as a gather through the inverse map, so no atomics.
///
/// # Errors
/// As [`gather`].
pub fn gather_backward<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    d_permuted: &impl DevicePtr<T>,
    hidden: usize,
    d_x: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    combine_impl(dev, perm, d_permuted, hidden, None, d_x, "d_permuted")
}

/// [`gather_backward`] on raw device pointers (both of `T`).
///
/// # Safety
/// As [`gather_raw`], with `d_permuted` for `x` and `d_x` for `out`.
///
/// # Errors
/// As [`gather_raw`].
pub unsafe fn gather_backward_raw<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    d_permuted: RawBuffer,
    hidden: usize,
    d_x: RawBuffer,
) -> Result<()> {
    let src = raw_buf(d_permuted, "d_permuted")?;
    let out = raw_buf(d_x, "out")?;
    // SAFETY: forwarded from this function's contract.
    unsafe { combine_bufs::<T>(dev, perm, src, hidden, None, out, "d_permuted") }
}

/// The combine's gradient from launch buffers, shared by [`combine_backward`] and
/// [`combine_backward_raw`].
///
/// # Safety
/// `d_out` (`T`, \[tokens, hidden\]), `expert_out` (`T`), `weights` (f32), `d_expert_out`
/// (`T`) and `d_weights` (f32) are device buffers of `dev`'s context holding at least `len`
/// elements from `addr`; the two outputs overlap each other and no input or table; no
/// other work touches them until the launches have completed; they stay alive until then.
#[allow(clippy::too_many_arguments)]
unsafe fn combine_backward_bufs<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    d_out: Buf,
    expert_out: Buf,
    hidden: usize,
    weights: Buf,
    d_expert_out: Buf,
    d_weights: Buf,
) -> Result<()> {
    perm.check_filled(dev)?;
    check_owned(dev, &perm.slot_assignment, "perm")?;
    check_owned(dev, &perm.offsets, "perm")?;
    let stream = dev.stream();
    let (sa, _g3) = perm.slot_assignment.device_ptr(stream);
    let (off, _g4) = perm.offsets.device_ptr(stream);
    let (so, _g5) = perm.slot_of.device_ptr(stream);
    let (gather_l, dw_l) = plan_combine_backward::<T>(
        &perm.plan,
        hidden,
        &CombineBackwardBufs {
            d_out,
            expert_out,
            weights,
            slot_assignment: dbuf(&perm.slot_assignment, sa),
            offsets: dbuf(&perm.offsets, off),
            slot_of: dbuf(&perm.slot_of, so),
            d_expert_out,
            d_weights,
        },
    )?;
    // SAFETY: the gather's guarantees (see `gather_bufs`), with d_out as the source rows
    // (tokens x hidden), the weights as scales (one per assignment) and d_expert_out
    // (max_slots x hidden) as the destination, all checked by plan_combine_backward; then
    // d_out and expert_out (max_slots x hidden, checked) are read at rows t < tokens and at
    // slot_of entries that are -1 or below max_slots (written by permute); d_weights holds
    // one f32 per assignment (checked); every address aligned to its element, vector access
    // only with 16-byte aligned rows at the actual addresses. perm's tables are on this
    // context (checked above) and their guards live until the end of this function; the
    // caller's buffers are live, on this context, with distinct outputs (this function's
    // contract).
    unsafe {
        launch(dev, &gather_l)?;
        launch(dev, &dw_l)
    }
}

/// Gradient of [`combine`] with weights: d_expert_out\[slot\] = w\[a\] x d_out\[a / top_k\]
/// (zeros in padding) and d_weights\[a\] = <d_out\[a / top_k\], expert_out\[slot_of\[a\]\]>
/// (0 for dropped assignments), two launches. Buffers as in [`gather`].
///
/// # Errors
/// As [`gather`].
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    d_out: &impl DevicePtr<T>,
    expert_out: &impl DevicePtr<T>,
    hidden: usize,
    weights: &impl DevicePtr<f32>,
    d_expert_out: &mut impl DevicePtrMut<T>,
    d_weights: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    check_owned(dev, d_out, "x")?;
    check_owned(dev, d_expert_out, "out")?;
    check_owned(dev, weights, "scale")?;
    check_owned(dev, expert_out, "expert_out")?;
    check_owned(dev, d_weights, "d_weights")?;
    let stream = dev.stream();
    let (deo_len, dw_len) = (d_expert_out.len(), d_weights.len());
    let (g, _g0) = d_out.device_ptr(stream);
    let (x, _g1) = expert_out.device_ptr(stream);
    let (w, _g2) = weights.device_ptr(stream);
    let (deo, _g6) = d_expert_out.device_ptr_mut(stream);
    let (dw, _g7) = d_weights.device_ptr_mut(stream);
    let (d_out, expert_out, weights) = (dbuf(d_out, g), dbuf(expert_out, x), dbuf(weights, w));
    // SAFETY: every buffer is a cudarc buffer or view of this context (checked above) with
    // the length given; the outputs are borrowed mutably, so they overlap each other, the
    // inputs and perm's tables nowhere; the guards live until the end of this function.
    unsafe {
        combine_backward_bufs::<T>(
            dev,
            perm,
            d_out,
            expert_out,
            hidden,
            weights,
            Buf {
                addr: deo,
                len: deo_len,
            },
            Buf {
                addr: dw,
                len: dw_len,
            },
        )
    }
}

/// [`combine_backward`] on raw device pointers (`d_out`, `expert_out` and `d_expert_out` of
/// `T`, `weights` and `d_weights` of f32).
///
/// # Safety
/// Each pointer points to at least its `len` elements in live device memory of `dev`'s CUDA
/// context; the ranges of `d_expert_out` and `d_weights` overlap each other and no input;
/// no other work reads or writes the outputs, or writes the inputs, until the launches,
/// queued on `dev`'s stream, have completed; and the memory stays allocated until then.
///
/// # Errors
/// As [`gather_raw`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn combine_backward_raw<T: MoeHiddenElement>(
    dev: &Device,
    perm: &Permutation,
    d_out: RawBuffer,
    expert_out: RawBuffer,
    hidden: usize,
    weights: RawBuffer,
    d_expert_out: RawBuffer,
    d_weights: RawBuffer,
) -> Result<()> {
    let d_out = raw_buf(d_out, "x")?;
    let expert_out = raw_buf(expert_out, "expert_out")?;
    let weights = raw_buf(weights, "scale")?;
    let d_expert_out = raw_buf(d_expert_out, "out")?;
    let d_weights = raw_buf(d_weights, "d_weights")?;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        combine_backward_bufs::<T>(
            dev,
            perm,
            d_out,
            expert_out,
            hidden,
            weights,
            d_expert_out,
            d_weights,
        )
    }
}
