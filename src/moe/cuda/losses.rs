//! Router losses (load balancing, z-loss), the router's backward and DeepSeek's bias
//! update.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The statistics chunking of [`router_losses`] for `tokens` tokens of `cfg`, after
/// validating both (the losses are means over tokens, so there must be some).
pub(crate) fn losses_plan(cfg: &RouterConfig, tokens: usize) -> Result<StatsPlan> {
    cfg.validate()?;
    if tokens == 0 {
        return Err(Error::invalid(
            OP,
            "tokens",
            "losses need at least one token",
        ));
    }
    Ok(StatsPlan::new(tokens))
}

/// A permutation used for load balancing must be of the call's shape.
fn check_balance_shape(p: &PermutePlan, cfg: &RouterConfig, tokens: usize) -> Result<()> {
    if p.tokens != tokens || p.top_k != cfg.top_k || p.experts != cfg.experts {
        return Err(Error::invalid(
            OP,
            "perm",
            format!(
                "made for {} tokens x top_k {} of {} experts; the call has {tokens} x {} of {}",
                p.tokens, p.top_k, p.experts, cfg.top_k, cfg.experts
            ),
        ));
    }
    Ok(())
}

/// The buffers of one losses call: logits, the permutation's routed counts, the
/// statistics workspace and the outputs.
pub(crate) struct LossBufs {
    pub logits: Buf,
    pub routed_counts: Buf,
    pub partial_probs: Buf,
    pub partial_lse2: Buf,
    pub values: Buf,
    pub mean_probs: Buf,
}

/// The losses' two launches, in order: one statistics block per chunk of tokens, then the
/// single loss block. `perm` is the plan of the permutation whose routed counts are read.
pub(crate) fn plan_losses<T: MoeElement>(
    cfg: &RouterConfig,
    tokens: usize,
    perm: &PermutePlan,
    opts: LossOptions,
    b: &LossBufs,
) -> Result<(
    KernelLaunch<sys::LongctxMoeStatsParams>,
    KernelLaunch<sys::LongctxMoeLossParams>,
)> {
    let plan = losses_plan(cfg, tokens)?;
    check_len(
        b.logits.len,
        elems(tokens, cfg.experts, "logits")?,
        "logits",
        "tokens x experts",
    )?;
    check_aligned::<T>(&b.logits, "logits")?;
    check_balance_shape(perm, cfg, tokens)?;
    check_len(b.routed_counts.len, cfg.experts, "perm", "experts")?;
    for (buf, want, what) in [
        (
            &b.partial_probs,
            elems(plan.chunks, cfg.experts, "out")?,
            "chunks x experts",
        ),
        (&b.partial_lse2, plan.chunks, "chunks"),
        (&b.values, 2, "two losses"),
        (&b.mean_probs, cfg.experts, "experts"),
    ] {
        check_len(buf.len, want, "out", what)?;
    }
    let stats = sys::LongctxMoeStatsParams {
        logits: b.logits.addr,
        partial_probs: b.partial_probs.addr,
        partial_lse2: b.partial_lse2.addr,
        tokens: u32_of(tokens, "tokens")?,
        experts: u32_of(cfg.experts, "experts")?,
        scoring: scoring_of(cfg.scoring),
        chunk_tokens: u32_of(plan.chunk_tokens, "tokens")?,
    };
    let loss = sys::LongctxMoeLossParams {
        partial_probs: b.partial_probs.addr,
        partial_lse2: b.partial_lse2.addr,
        counts: b.routed_counts.addr,
        losses: b.values.addr,
        mean_probs: b.mean_probs.addr,
        chunks: u32_of(plan.chunks, "tokens")?,
        experts: stats.experts,
        tokens: stats.tokens,
        top_k: u32_of(cfg.top_k, "top_k")?,
        aux_coef: coef(opts.aux_coef, "aux_coef")?,
        z_coef: coef(opts.z_coef, "z_coef")?,
    };
    Ok((
        KernelLaunch {
            id: pick::<T>(KernelId::MoeStatsF32, KernelId::MoeStatsBf16),
            params: stats,
            grid: (grid_u32(plan.chunks, "tokens")?, 1, 1),
            block: (STATS_THREADS, 1, 1),
            smem_bytes: 0,
        },
        KernelLaunch {
            id: KernelId::MoeLoss,
            params: loss,
            grid: (1, 1, 1),
            block: (LOSS_THREADS, 1, 1),
            smem_bytes: 0,
        },
    ))
}

/// The buffers of one router backward (the weights' gradient is an optional term).
pub(crate) struct RouteBackwardBufs {
    pub logits: Buf,
    pub ids: Buf,
    pub d_weights: Option<Buf>,
    pub d_logits: Buf,
}

/// The router backward's launch, one warp per token; `None` for 0 tokens. `balance`, for
/// the load-balancing term, is a permutation's plan and its routed counts.
pub(crate) fn plan_route_backward<T: MoeElement>(
    cfg: &RouterConfig,
    tokens: usize,
    balance: Option<(&PermutePlan, Buf)>,
    opts: LossOptions,
    b: &RouteBackwardBufs,
) -> Result<Option<KernelLaunch<sys::LongctxMoeGateBwdParams>>> {
    cfg.validate()?;
    let rows = elems(tokens, cfg.experts, "logits")?;
    check_len(b.logits.len, rows, "logits", "tokens x experts")?;
    let assignments = elems(tokens, cfg.top_k, "ids")?;
    check_len(b.ids.len, assignments, "ids", "tokens x top_k")?;
    check_len(b.d_logits.len, rows, "d_logits", "tokens x experts")?;
    if let Some(d) = &b.d_weights {
        check_len(d.len, assignments, "d_weights", "tokens x top_k")?;
        check_aligned::<f32>(d, "d_weights")?;
    }
    check_aligned::<T>(&b.logits, "logits")?;
    check_aligned::<f32>(&b.d_logits, "d_logits")?;
    if let Some((p, counts)) = &balance {
        check_balance_shape(p, cfg, tokens)?;
        check_len(counts.len, cfg.experts, "perm", "experts")?;
    }
    if tokens == 0 {
        // The gradient scales divide by the token count; the coefficients must still be
        // finite.
        coef(opts.aux_coef, "aux_coef")?;
        coef(opts.z_coef, "z_coef")?;
        return Ok(None);
    }
    let params = sys::LongctxMoeGateBwdParams {
        logits: b.logits.addr,
        ids: b.ids.addr,
        d_weights: b.d_weights.map_or(0, |d| d.addr),
        counts: balance.map_or(0, |(_, c)| c.addr),
        d_logits: b.d_logits.addr,
        tokens: u32_of(tokens, "tokens")?,
        experts: u32_of(cfg.experts, "experts")?,
        top_k: u32_of(cfg.top_k, "top_k")?,
        scoring: scoring_of(cfg.scoring),
        renormalize: u32::from(cfg.renormalize),
        routed_scaling_factor: coef(cfg.routed_scaling_factor, "routed_scaling_factor")?,
        aux_grad_scale: coef(
            aux_grad_scale(opts.aux_coef, cfg.experts, tokens, cfg.top_k),
            "aux_coef",
        )?,
        z_grad_scale: coef(z_grad_scale(opts.z_coef, tokens), "z_coef")?,
    };
    Ok(Some(KernelLaunch {
        id: pick::<T>(KernelId::MoeGateBwdF32, KernelId::MoeGateBwdBf16),
        params,
        grid: (grid_u32(tokens.div_ceil(BWD_WARPS), "tokens")?, 1, 1),
        block: (u32_of(BWD_WARPS * 32, "tokens")?, 1, 1),
        smem_bytes: 0,
    }))
}

/// The bias update's single-block launch over `experts` routed counts and biases.
pub(crate) fn plan_bias_update(
    experts: usize,
    counts: Buf,
    bias: Buf,
    gamma: f64,
) -> Result<KernelLaunch<sys::LongctxMoeBiasParams>> {
    check_len(bias.len, experts, "bias", "one per expert")?;
    check_len(counts.len, experts, "perm", "experts")?;
    check_aligned::<f32>(&bias, "bias")?;
    let params = sys::LongctxMoeBiasParams {
        counts: counts.addr,
        bias: bias.addr,
        experts: u32_of(experts, "experts")?,
        gamma: coef(gamma, "gamma")?,
    };
    Ok(KernelLaunch {
        id: KernelId::MoeBiasUpdate,
        params,
        grid: (1, 1, 1),
        block: (BIAS_THREADS, 1, 1),
        smem_bytes: 0,
    })
}

// ------------------------------------------------------------------ losses and backward

/// Device outputs of [`router_losses`]: the two loss values and the mean balance
/// probability per expert, plus workspace.
#[derive(Debug)]
pub struct RouterLosses {
    tokens: usize,
    experts: usize,
    partial_probs: CudaSlice<f32>,
    partial_lse2: CudaSlice<f32>,
    values: CudaSlice<f32>,
    mean_probs: CudaSlice<f32>,
}

impl RouterLosses {
    /// Allocates outputs and workspace for `tokens` tokens of `cfg`.
    ///
    /// # Errors
    /// [`RouterConfig::validate`]'s errors; [`Error::InvalidArgument`] for 0 tokens (the
    /// losses are means over tokens); [`Error::Cuda`] on allocation failure.
    pub fn new(dev: &Device, cfg: &RouterConfig, tokens: usize) -> Result<Self> {
        let plan = losses_plan(cfg, tokens)?;
        Ok(RouterLosses {
            tokens,
            experts: cfg.experts,
            partial_probs: alloc(dev, plan.chunks * cfg.experts)?,
            partial_lse2: alloc(dev, plan.chunks)?,
            values: alloc(dev, 2)?,
            mean_probs: alloc(dev, cfg.experts)?,
        })
    }

    /// f32 \[2\]: {alpha x load-balancing loss, beta x z-loss}.
    pub fn values(&self) -> &CudaSlice<f32> {
        &self.values
    }

    /// f32 \[experts\]: P_i, the mean balance probability of each expert.
    pub fn mean_probs(&self) -> &CudaSlice<f32> {
        &self.mean_probs
    }

    /// Copies the two loss values back (waits for the stream).
    ///
    /// # Errors
    /// [`Error::Cuda`] on copy failure or if a queued kernel failed.
    pub fn download(&self, dev: &Device) -> Result<(f32, f32)> {
        let v = dev.download(&self.values)?;
        Ok((
            v.first().copied().unwrap_or(0.0),
            v.get(1).copied().unwrap_or(0.0),
        ))
    }
}

fn check_balance(
    dev: &Device,
    cfg: &RouterConfig,
    tokens: usize,
    perm: &Permutation,
) -> Result<()> {
    perm.check_filled(dev)?;
    check_owned(dev, &perm.routed_counts, "perm")?;
    check_balance_shape(&perm.plan, cfg, tokens)
}

/// The load-balancing loss alpha x E x sum_i f_i P_i (f_i from `perm`'s routed counts, before
/// capacity) and the z-loss beta x mean_t logsumexp(logits_t)^2 into `out`, deterministic
/// (fixed-order sums, no atomics), two launches. `logits` is a cudarc buffer or view of
/// at least tokens x experts elements, used from its start.
///
/// # Errors
/// [`Error::InvalidArgument`] when logits, `perm` or `out` do not match the config and token
/// count, a coefficient is not finite, or a buffer lives on another device; [`Error::Cuda`].
pub fn router_losses<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &impl DevicePtr<T>,
    tokens: usize,
    perm: &Permutation,
    opts: LossOptions,
    out: &mut RouterLosses,
) -> Result<()> {
    check_owned(dev, logits, "logits")?;
    let (logits_ptr, _g0) = logits.device_ptr(dev.stream());
    // SAFETY: logits is a live cudarc buffer or view on this context (checked above),
    // guarded until the end of this function.
    unsafe { router_losses_bufs::<T>(dev, cfg, dbuf(logits, logits_ptr), tokens, perm, opts, out) }
}

/// [`router_losses`] with the logits given as a raw device pointer; `perm` and `out` stay
/// the crate's types. Everything [`router_losses`] checks is checked here too, plus that the
/// pointer is non-null and aligned to `T`.
///
/// # Safety
/// `logits.ptr` points to at least `logits.len` elements of `T` in live device memory of
/// `dev`'s CUDA context; no other work writes them until the launches, queued on `dev`'s
/// stream, have completed; and the memory stays allocated until then.
///
/// # Errors
/// As [`router_losses`], plus kind [`ErrorKind::Alignment`](crate::ErrorKind::Alignment)
/// for a misaligned pointer.
pub unsafe fn router_losses_raw<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: RawBuffer,
    tokens: usize,
    perm: &Permutation,
    opts: LossOptions,
    out: &mut RouterLosses,
) -> Result<()> {
    let logits = raw_buf(logits, "logits")?;
    check_aligned::<T>(&logits, "logits")?;
    // SAFETY: forwarded from this function's contract.
    unsafe { router_losses_bufs::<T>(dev, cfg, logits, tokens, perm, opts, out) }
}

/// The launches of [`router_losses`] with the logits at `logits`.
///
/// # Safety
/// `logits` is `logits.len` elements of `T` in live device memory of `dev`'s context that
/// nothing writes until the launches complete.
unsafe fn router_losses_bufs<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: Buf,
    tokens: usize,
    perm: &Permutation,
    opts: LossOptions,
    out: &mut RouterLosses,
) -> Result<()> {
    check_balance(dev, cfg, tokens, perm)?;
    for s in [
        &out.partial_probs,
        &out.partial_lse2,
        &out.values,
        &out.mean_probs,
    ] {
        check_owned(dev, s, "out")?;
    }
    let stream = dev.stream();
    let RouterLosses {
        tokens: out_tokens,
        experts: out_experts,
        partial_probs,
        partial_lse2,
        values,
        mean_probs,
    } = out;
    let lens = [
        partial_probs.len(),
        partial_lse2.len(),
        values.len(),
        mean_probs.len(),
    ];
    let (pp, _g1) = partial_probs.device_ptr_mut(stream);
    let (pl, _g2) = partial_lse2.device_ptr_mut(stream);
    let (vals, _g3) = values.device_ptr_mut(stream);
    let (mp, _g4) = mean_probs.device_ptr_mut(stream);
    let (counts, _g5) = perm.routed_counts.device_ptr(stream);
    let buf = |addr, len| Buf { addr, len };
    let (stats, loss) = plan_losses::<T>(
        cfg,
        tokens,
        &perm.plan,
        opts,
        &LossBufs {
            logits,
            routed_counts: dbuf(&perm.routed_counts, counts),
            partial_probs: buf(pp, lens[0]),
            partial_lse2: buf(pl, lens[1]),
            values: buf(vals, lens[2]),
            mean_probs: buf(mp, lens[3]),
        },
    )?;
    if *out_tokens != tokens || *out_experts != cfg.experts {
        return Err(Error::invalid(
            OP,
            "out",
            format!(
                "made for {out_tokens} tokens of {out_experts} experts; the call has {tokens} of {}",
                cfg.experts
            ),
        ));
    }
    // SAFETY: plan_losses checked that logits holds tokens x experts elements (the caller
    // guarantees they are live on this context) and sized the workspace from the same
    // StatsPlan: one stats block per chunk of chunk_tokens (<= 256, the kernel's shared
    // arrays) tokens, writing chunks x experts and chunks partials; the loss kernel (one
    // block) reads those and perm's experts routed counts, and writes 2 values and experts
    // means. The outputs are on this context (checked above) and distinct allocations
    // (&mut); the second launch runs after the first in stream order. Guards live until
    // the end.
    unsafe {
        launch(dev, &stats)?;
        launch(dev, &loss)
    }
}

/// Gradient with respect to the logits (f32 \[tokens, experts\]) of: the routing weights,
/// given their gradient `d_weights` (f32 \[tokens, top_k\]; `None`: no such term); the
/// load-balancing loss when `balance` gives the routed counts (`opts.aux_coef`); and the
/// z-loss (`opts.z_coef`, 0 for none). The chosen experts (`ids`, from the forward) are
/// fixed, the bias gets no gradient. One launch, one warp per token. The buffers are cudarc
/// buffers or views of at least the needed length, used from their start.
///
/// # Errors
/// [`Error::InvalidArgument`] when a buffer, `ids` or `balance` does not match the config and
/// token count, a coefficient is not finite, or a buffer lives on another device;
/// [`Error::Cuda`].
#[allow(clippy::too_many_arguments)]
pub fn route_backward<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &impl DevicePtr<T>,
    tokens: usize,
    ids: &ExpertIds,
    d_weights: Option<&dyn DevicePtr<f32>>,
    balance: Option<&Permutation>,
    opts: LossOptions,
    d_logits: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    check_owned(dev, logits, "logits")?;
    check_owned(dev, d_logits, "d_logits")?;
    if let Some(d) = d_weights {
        check_owned(dev, d, "d_weights")?;
    }
    let stream = dev.stream();
    let out_len = d_logits.len();
    let (logits_ptr, _g0) = logits.device_ptr(stream);
    let dw_guard = d_weights.map(|d| (d.len(), d.device_ptr(stream)));
    let (out, _g2) = d_logits.device_ptr_mut(stream);
    // SAFETY: every buffer is a live cudarc buffer or view on this context (checked above),
    // guarded until the end of this function; d_logits is borrowed mutably, so no input
    // aliases it.
    unsafe {
        route_backward_bufs::<T>(
            dev,
            cfg,
            dbuf(logits, logits_ptr),
            tokens,
            ids,
            dw_guard.as_ref().map(|(len, g)| Buf {
                addr: g.0,
                len: *len,
            }),
            balance,
            opts,
            Buf {
                addr: out,
                len: out_len,
            },
        )
    }
}

/// [`route_backward`] with the logits, the weights' gradient and the output given as raw
/// device pointers; `ids` and `balance` stay the crate's types. Everything
/// [`route_backward`] checks is checked here too, plus that each pointer is non-null and
/// aligned to its element.
///
/// # Safety
/// Each pointer addresses at least its `len` elements (`T` for the logits, f32 for the
/// others) of live device memory of `dev`'s CUDA context; `d_logits` overlaps no input; no
/// other work writes the inputs or touches `d_logits` until the launch, queued on `dev`'s
/// stream, has completed; and the memory stays allocated until then.
///
/// # Errors
/// As [`route_backward`], plus kind [`ErrorKind::Alignment`](crate::ErrorKind::Alignment)
/// for a misaligned pointer.
#[allow(clippy::too_many_arguments)]
pub unsafe fn route_backward_raw<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: RawBuffer,
    tokens: usize,
    ids: &ExpertIds,
    d_weights: Option<RawBuffer>,
    balance: Option<&Permutation>,
    opts: LossOptions,
    d_logits: RawBuffer,
) -> Result<()> {
    let logits = raw_buf(logits, "logits")?;
    check_aligned::<T>(&logits, "logits")?;
    let d_weights = d_weights.map(|d| raw_buf(d, "d_weights")).transpose()?;
    if let Some(d) = &d_weights {
        check_aligned::<f32>(d, "d_weights")?;
    }
    let d_logits = raw_buf(d_logits, "d_logits")?;
    check_aligned::<f32>(&d_logits, "d_logits")?;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        route_backward_bufs::<T>(
            dev, cfg, logits, tokens, ids, d_weights, balance, opts, d_logits,
        )
    }
}

/// The launch of [`route_backward`] on addressed buffers.
///
/// # Safety
/// `logits`, `d_weights` and `d_logits` are live device memory of `dev`'s context of their
/// stated lengths; `d_logits` overlaps no input; nothing else touches them until the launch
/// completes.
#[allow(clippy::too_many_arguments)]
unsafe fn route_backward_bufs<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: Buf,
    tokens: usize,
    ids: &ExpertIds,
    d_weights: Option<Buf>,
    balance: Option<&Permutation>,
    opts: LossOptions,
    d_logits: Buf,
) -> Result<()> {
    check_owned(dev, &ids.data, "ids")?;
    if let Some(perm) = balance {
        check_balance(dev, cfg, tokens, perm)?;
    }
    let stream = dev.stream();
    let (ids_ptr, _g1) = ids.data.device_ptr(stream);
    let counts_guard = balance.map(|p| (p, p.routed_counts.device_ptr(stream)));
    let l = plan_route_backward::<T>(
        cfg,
        tokens,
        counts_guard.as_ref().map(|(p, g)| {
            (
                &p.plan,
                Buf {
                    addr: g.0,
                    len: p.routed_counts.len(),
                },
            )
        }),
        opts,
        &RouteBackwardBufs {
            logits,
            ids: Buf {
                addr: ids_ptr,
                len: ids.data.len(),
            },
            d_weights,
            d_logits,
        },
    )?;
    // The ids' type promises ids in 0..experts of its shape, which must be the call's.
    if ids.tokens != tokens || ids.top_k != cfg.top_k || ids.experts != cfg.experts {
        return Err(Error::invalid(
            OP,
            "ids",
            format!(
                "{} tokens x top_k {} of {} experts; the call has {tokens} x {} of {}",
                ids.tokens, ids.top_k, ids.experts, cfg.top_k, cfg.experts
            ),
        ));
    }
    let Some(l) = l else {
        return Ok(());
    };
    // SAFETY: plan_route_backward checked that logits and d_logits hold tokens x experts
    // elements, d_weights (if any) tokens x top_k and counts (if any) experts; ids holds
    // tokens x top_k ids, every one in 0..experts (ExpertIds' invariant, its shape checked
    // above), so row[ids[j]] stays in the row. One warp per token, the grid rounded up and
    // the tail returning. ids and counts are on this context (checked above); the caller
    // guarantees the rest. Guards live until the end of this function.
    unsafe { launch(dev, &l) }
}

/// DeepSeek's auxiliary-loss-free balancing step on `bias` (f32 \[experts\], in place):
/// bias_i += gamma x sign(mean load - load_i), loads being `perm`'s routed counts. The sign
/// is exact (integer arithmetic); sign(0) = 0. `bias` is a cudarc buffer or view of at least
/// `experts` elements.
///
/// # Errors
/// [`Error::InvalidArgument`] for a bias of the wrong length, a gamma that is not finite, or
/// a permutation not yet computed; [`Error::Cuda`].
pub fn update_bias(
    dev: &Device,
    perm: &Permutation,
    gamma: f64,
    bias: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    check_owned(dev, bias, "bias")?;
    let bias_len = bias.len();
    let (b, _g1) = bias.device_ptr_mut(dev.stream());
    // SAFETY: bias is a live cudarc buffer or view on this context (checked above), borrowed
    // mutably and guarded until the end of this function.
    unsafe {
        update_bias_bufs(
            dev,
            perm,
            gamma,
            Buf {
                addr: b,
                len: bias_len,
            },
        )
    }
}

/// [`update_bias`] on a raw device pointer to the bias (f32). Everything [`update_bias`]
/// checks is checked here too, plus that the pointer is non-null and 4-byte aligned.
///
/// # Safety
/// `bias.ptr` points to at least `bias.len` f32s of live device memory of `dev`'s CUDA
/// context that no other work touches until the launch, queued on `dev`'s stream, has
/// completed, and that stays allocated until then.
///
/// # Errors
/// As [`update_bias`], plus kind [`ErrorKind::Alignment`](crate::ErrorKind::Alignment) for
/// a misaligned pointer.
pub unsafe fn update_bias_raw(
    dev: &Device,
    perm: &Permutation,
    gamma: f64,
    bias: RawBuffer,
) -> Result<()> {
    let bias = raw_buf(bias, "bias")?;
    check_aligned::<f32>(&bias, "bias")?;
    // SAFETY: forwarded from this function's contract.
    unsafe { update_bias_bufs(dev, perm, gamma, bias) }
}

/// The launch of [`update_bias`] on an addressed bias.
///
/// # Safety
/// `bias` is live device memory of `dev`'s context of its stated length, touched by nothing
/// else until the launch completes.
unsafe fn update_bias_bufs(dev: &Device, perm: &Permutation, gamma: f64, bias: Buf) -> Result<()> {
    perm.check_filled(dev)?;
    check_owned(dev, &perm.routed_counts, "perm")?;
    let (counts, _g0) = perm.routed_counts.device_ptr(dev.stream());
    let l = plan_bias_update(
        perm.plan.experts,
        dbuf(&perm.routed_counts, counts),
        bias,
        gamma,
    )?;
    // SAFETY: plan_bias_update checked that counts and bias hold `experts` elements each;
    // one block of the kernel's compiled size; bias is updated in place (the caller
    // guarantees it is live on this context and touched by nothing else) and counts is
    // another allocation on this context (checked above). Guards live until the end.
    unsafe { launch(dev, &l) }
}
