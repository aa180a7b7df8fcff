//! Gating: the fused router launch ([`route`]), its outputs ([`Routing`], [`ExpertIds`])
//! and the raw entry point.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The buffers of one gating call (bias optional).
pub(crate) struct RouteBufs {
    pub logits: Buf,
    pub bias: Option<Buf>,
    pub ids: Buf,
    pub weights: Buf,
}

/// The gating launch for `tokens` tokens of `cfg`, on the block kernel when `force_block`;
/// `None` for 0 tokens. Validates the config and every buffer length (outputs under the
/// name `out`), picks the warp kernel's 16-byte vector loads only where they are aligned.
pub(crate) fn plan_route<T: MoeElement>(
    cfg: &RouterConfig,
    tokens: usize,
    force_block: bool,
    b: &RouteBufs,
) -> Result<Option<KernelLaunch<sys::LongctxMoeGateParams>>> {
    let plan = GatePlan::new(cfg, tokens, force_block)?;
    check_len(
        b.logits.len,
        elems(tokens, cfg.experts, "logits")?,
        "logits",
        "tokens x experts",
    )?;
    let n = elems(tokens, cfg.top_k, "out")?;
    check_len(b.ids.len, n, "out", "ids: tokens x top_k")?;
    check_len(b.weights.len, n, "out", "weights: tokens x top_k")?;
    if let Some(bias) = &b.bias {
        check_len(bias.len, cfg.experts, "bias", "one per expert")?;
        check_aligned::<f32>(bias, "bias")?;
    }
    check_aligned::<T>(&b.logits, "logits")?;
    check_aligned::<i32>(&b.ids, "out")?;
    check_aligned::<f32>(&b.weights, "out")?;
    if tokens == 0 {
        return Ok(None);
    }
    let group = cfg.effective_grouping();
    let top2 = matches!(group.map(|g| g.score), Some(GroupScore::Top2Sum));
    let params = sys::LongctxMoeGateParams {
        logits: b.logits.addr,
        bias: b.bias.map_or(0, |x| x.addr),
        ids: b.ids.addr,
        weights: b.weights.addr,
        tokens: u32_of(tokens, "tokens")?,
        experts: u32_of(cfg.experts, "experts")?,
        top_k: u32_of(cfg.top_k, "top_k")?,
        scoring: scoring_of(cfg.scoring),
        group_mode: match group.map(|g| g.score) {
            None => sys::LONGCTX_MOE_GROUP_NONE,
            Some(GroupScore::Max) => sys::LONGCTX_MOE_GROUP_MAX,
            Some(GroupScore::Top2Sum) => sys::LONGCTX_MOE_GROUP_TOP2_SUM,
        },
        n_group: u32_of(group.map_or(1, |g| g.n_group), "n_group")?,
        topk_group: u32_of(group.map_or(1, |g| g.topk_group), "topk_group")?,
        renormalize: u32::from(cfg.renormalize),
        select_on_logits: u32::from(b.bias.is_none() && !top2),
        routed_scaling_factor: coef(cfg.routed_scaling_factor, "routed_scaling_factor")?,
        lanes: u32_of(plan.lanes, "experts")?,
        slots: u32_of(plan.slots, "experts")?,
        group_lanes: u32_of(plan.group_lanes, "n_group")?,
        vec_loads: u32::from(
            plan.path == GatePath::Warp
                && b.logits.addr % 16 == 0
                && (plan.slots * T::DTYPE.size()) % 16 == 0
                && cfg.experts % plan.slots == 0,
        ),
    };
    let id = match plan.path {
        GatePath::Warp => pick::<T>(KernelId::MoeGateWarpF32, KernelId::MoeGateWarpBf16),
        GatePath::Block => pick::<T>(KernelId::MoeGateBlockF32, KernelId::MoeGateBlockBf16),
    };
    Ok(Some(KernelLaunch {
        id,
        params,
        grid: (plan.grid, 1, 1),
        block: (plan.threads, 1, 1),
        smem_bytes: plan.smem_bytes,
    }))
}

// ------------------------------------------------------------------ expert ids and routing

/// Expert ids \[tokens, top_k\] on the device, every id in 0..experts and distinct within a
/// token: validated on upload, or written by [`route`].
#[derive(Debug)]
pub struct ExpertIds {
    pub(super) data: CudaSlice<i32>,
    pub(super) tokens: usize,
    pub(super) top_k: usize,
    pub(super) experts: usize,
}

impl ExpertIds {
    /// Validates and uploads `ids` (\[tokens, top_k\], row-major).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a length other than tokens x top_k, top_k of 0 or
    /// more than `experts`, experts outside 1..=4096, an id outside 0..experts or an expert
    /// twice in one token; [`Error::Cuda`] on upload failure.
    pub fn upload(
        dev: &Device,
        ids: &[i32],
        tokens: usize,
        top_k: usize,
        experts: usize,
    ) -> Result<Self> {
        PermutePlan::new(tokens, top_k, experts, PermuteOptions::default())?;
        crate::moe::plan::validate_ids(OP, ids, tokens, top_k, experts)?;
        let data = if ids.is_empty() {
            dev.zeros(1)?
        } else {
            dev.upload(ids)?
        };
        Ok(ExpertIds {
            data,
            tokens,
            top_k,
            experts,
        })
    }

    /// Copies the ids back (\[tokens, top_k\]).
    ///
    /// # Errors
    /// [`Error::Cuda`] on copy failure or if a queued kernel failed.
    pub fn download(&self, dev: &Device) -> Result<Vec<i32>> {
        let mut v = dev.download(&self.data)?;
        v.truncate(self.tokens * self.top_k);
        Ok(v)
    }

    /// The device buffer (at least one element; `tokens * top_k` of them count).
    pub fn as_slice(&self) -> &CudaSlice<i32> {
        &self.data
    }

    /// Tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Number of experts the ids index.
    pub fn experts(&self) -> usize {
        self.experts
    }
}

/// Output buffers of [`route`]: ids and f32 weights, \[tokens, top_k\] each.
#[derive(Debug)]
pub struct Routing {
    ids: ExpertIds,
    weights: CudaSlice<f32>,
}

impl Routing {
    /// Allocates outputs for `tokens` tokens of `cfg` (ids all 0 until [`route`] runs).
    ///
    /// # Errors
    /// [`RouterConfig::validate`]'s errors; [`Error::Cuda`] on allocation failure.
    pub fn new(dev: &Device, cfg: &RouterConfig, tokens: usize) -> Result<Self> {
        GatePlan::new(cfg, tokens, false)?;
        let n = tokens * cfg.top_k;
        Ok(Routing {
            ids: ExpertIds {
                data: alloc(dev, n)?,
                tokens,
                top_k: cfg.top_k,
                experts: cfg.experts,
            },
            weights: alloc(dev, n)?,
        })
    }

    /// The chosen experts.
    pub fn ids(&self) -> &ExpertIds {
        &self.ids
    }

    /// The routing weights \[tokens, top_k\].
    pub fn weights(&self) -> &CudaSlice<f32> {
        &self.weights
    }

    /// The routing weights, writable (the ids stay as routed).
    pub fn weights_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.weights
    }

    /// Copies ids and weights back.
    ///
    /// # Errors
    /// [`Error::Cuda`] on copy failure or if a queued kernel failed.
    pub fn download(&self, dev: &Device) -> Result<(Vec<i32>, Vec<f32>)> {
        let mut w = dev.download(&self.weights)?;
        w.truncate(self.ids.tokens * self.ids.top_k);
        Ok((self.ids.download(dev)?, w))
    }
}

/// Routes into `out` from logits and bias already reduced to launch buffers: validation,
/// planning and the launch shared by [`route`], [`route_block_kernel`] and [`route_raw`].
///
/// # Safety
/// `logits` (and `bias`, if any) are device buffers of `dev`'s context holding at least
/// `len` elements from `addr` (elements of `T`, and f32), not written by other work until
/// the launch has completed, and alive until then (a cudarc guard held by the caller, or
/// the raw entry's contract).
unsafe fn route_bufs<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: Buf,
    tokens: usize,
    bias: Option<Buf>,
    out: &mut Routing,
    force_block: bool,
) -> Result<()> {
    check_owned(dev, &out.ids.data, "out")?;
    check_owned(dev, &out.weights, "out")?;
    let stream = dev.stream();
    let (ids_len, w_len) = (out.ids.data.len(), out.weights.len());
    let (ids_ptr, _ig) = out.ids.data.device_ptr_mut(stream);
    let (w_ptr, _wg) = out.weights.device_ptr_mut(stream);
    let l = plan_route::<T>(
        cfg,
        tokens,
        force_block,
        &RouteBufs {
            logits,
            bias,
            ids: Buf {
                addr: ids_ptr,
                len: ids_len,
            },
            weights: Buf {
                addr: w_ptr,
                len: w_len,
            },
        },
    )?;
    // The ids' type promises ids in 0..experts of its shape: the outputs must have been
    // made for this config.
    if out.ids.tokens != tokens || out.ids.top_k != cfg.top_k || out.ids.experts != cfg.experts {
        return Err(Error::invalid(
            OP,
            "out",
            format!(
                "outputs made for {} tokens x top_k {} of {} experts; the call has {tokens} x {} of {}",
                out.ids.tokens, out.ids.top_k, out.ids.experts, cfg.top_k, cfg.experts
            ),
        ));
    }
    let Some(l) = l else {
        return Ok(());
    };
    // SAFETY: plan_route checked that logits holds tokens x experts elements of T, bias (if
    // any) experts f32s, ids and weights tokens x top_k elements each, every address
    // aligned to its element; logits and bias are live buffers of this context (this
    // function's contract), ids and weights are out's own allocations on this context
    // (checked above), distinct from the inputs (a &mut borrow of out); the plan's grid
    // covers exactly the tokens (the warp kernel returns for the rounded-up tail) and its
    // shared memory size matches gate_block_smem_bytes; vec_loads is set only when every
    // lane's 16-byte vector loads are aligned (on the logits' actual address) and inside
    // its token's row; the config is validated, so top_k never exceeds the eligible experts
    // and the kernel writes only in-range, distinct ids. The outputs' guards live until the
    // end of this function, the inputs' in the caller.
    unsafe { launch(dev, &l) }
}

fn route_impl<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &impl DevicePtr<T>,
    tokens: usize,
    bias: Option<&dyn DevicePtr<f32>>,
    out: &mut Routing,
    force_block: bool,
) -> Result<()> {
    check_owned(dev, logits, "logits")?;
    if let Some(b) = bias {
        check_owned(dev, b, "bias")?;
    }
    let stream = dev.stream();
    let (logits_ptr, _lg) = logits.device_ptr(stream);
    let bias_guard = bias.map(|b| (b.len(), b.device_ptr(stream)));
    let bias = bias_guard.as_ref().map(|(len, g)| Buf {
        addr: g.0,
        len: *len,
    });
    // SAFETY: logits and bias are cudarc buffers or views of this context (checked above),
    // each holding the length given; their guards live until the end of this function, and
    // the borrows keep other host code from freeing or writing them meanwhile.
    unsafe {
        route_bufs::<T>(
            dev,
            cfg,
            dbuf(logits, logits_ptr),
            tokens,
            bias,
            out,
            force_block,
        )
    }
}

/// Routes `tokens` tokens: logits \[tokens, experts\] (f32 or bf16) -> `out`'s ids and
/// weights, with one fused launch. `bias` is DeepSeek-V3's e_score_correction_bias
/// (f32 \[experts\]); it moves the choice only, the weights use the unbiased scores.
/// Experts <= 512 with top_k <= 32 run on up to one warp per token (several tokens per warp
/// below 32 experts), with group limiting when each group covers a power of two of whole
/// lanes (DeepSeek-V2 and V3 do); anything else runs one block per token.
///
/// `logits` and `bias` are cudarc buffers (`CudaSlice`) or views (`CudaView`,
/// `CudaViewMut`) of at least the needed length, used from their start; the vector loads
/// are chosen from the actual address.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors; [`Error::InvalidArgument`] when logits, bias or
/// `out` do not match the config and token count or live on another device;
/// [`Error::KernelsNotCompiled`]; [`Error::Cuda`] if the launch fails.
pub fn route<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &impl DevicePtr<T>,
    tokens: usize,
    bias: Option<&dyn DevicePtr<f32>>,
    out: &mut Routing,
) -> Result<()> {
    route_impl(dev, cfg, logits, tokens, bias, out, false)
}

/// [`route`] on the general one-block-per-token kernel whatever the shape, for comparison
/// and benchmarks: the same rule, but the softmax sums run in a different order (and the
/// warp kernel multiplies by the reciprocal of the sum), so weights and probability + bias
/// rankings can differ in the last bits; the tests check both paths against the reference.
///
/// # Errors
/// As [`route`].
pub fn route_block_kernel<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &impl DevicePtr<T>,
    tokens: usize,
    bias: Option<&dyn DevicePtr<f32>>,
    out: &mut Routing,
) -> Result<()> {
    route_impl(dev, cfg, logits, tokens, bias, out, true)
}

/// [`route`] with the logits (and bias) given as raw device pointers, for frameworks that
/// hand out only pointers; the outputs stay a [`Routing`], whose ids [`permute`] trusts.
/// Everything [`route`] checks about shapes and lengths is checked here too, plus that each
/// pointer is non-null and a multiple of its element size.
///
/// # Safety
/// `logits.ptr` points to at least `logits.len` elements of `T` (and `bias.ptr`, if given,
/// to `bias.len` f32s) in live device memory of `dev`'s CUDA context; no other work writes
/// them until the launch, queued on `dev`'s stream, has completed; and the memory stays
/// allocated until then.
///
/// # Errors
/// As [`route`], plus an [`Error::InvalidArgument`] of kind
/// [`ErrorKind::Alignment`](crate::ErrorKind::Alignment) for a misaligned pointer.
pub unsafe fn route_raw<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: RawBuffer,
    tokens: usize,
    bias: Option<RawBuffer>,
    out: &mut Routing,
) -> Result<()> {
    let logits = raw_buf(logits, "logits")?;
    let bias = bias.map(|b| raw_buf(b, "bias")).transpose()?;
    // SAFETY: forwarded from this function's contract.
    unsafe { route_bufs::<T>(dev, cfg, logits, tokens, bias, out, false) }
}
