//! GPU path of MoE routing: validated arguments -> params structs -> launches.
//!
//! Device index tensors that kernels dereference (expert ids, slots) only come from types
//! whose constructors guarantee their range: [`ExpertIds`] (validated on upload, or written by
//! the gating kernel) and [`Permutation`] (written by the permutation kernels).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::plan::{
    aux_grad_scale, z_grad_scale, GatePath, GatePlan, PermutePlan, StatsPlan, BIAS_THREADS,
    BWD_WARPS, LOSS_THREADS, ROW_THREADS, SCAN_THREADS, STATS_THREADS,
};
use super::{
    GroupScore, LossOptions, MoeElement, PermutationTables, PermuteOptions, RouterConfig, Scoring,
};
use crate::device::{cuda_err, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::sys;

const OP: &str = "moe";

/// f32 or bf16 variant of a kernel (MoeElement admits no other type).
fn pick<T: MoeElement>(f32_id: KernelId, bf16_id: KernelId) -> KernelId {
    match T::DTYPE {
        DType::F32 => f32_id,
        _ => bf16_id,
    }
}

/// Queues one launch of `id` with `params` by value.
///
/// # Safety
/// The caller guarantees that every device address in `params` points into a live
/// allocation of this context large enough for every access the kernel makes with those
/// params (shapes, strides and index ranges validated), that outputs do not alias inputs
/// unless the kernel is documented in place, and that the device pointer guards stay alive
/// until this returns.
unsafe fn launch<P: DeviceRepr>(
    dev: &Device,
    id: KernelId,
    grid: u32,
    threads: u32,
    smem_bytes: u32,
    params: &P,
) -> Result<()> {
    if grid == 0 {
        return Ok(());
    }
    let func = dev.function(id)?;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem_bytes,
    };
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(params);
    // SAFETY: forwarded from this function's contract (see each call site's SAFETY note).
    unsafe { builder.launch(cfg) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}

fn grid_u32(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid(OP, arg, format!("{n} blocks exceed the grid limit")))
}

fn u32_of(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::invalid(OP, arg, format!("{n} does not fit in u32")))
}

fn check_owned<T>(dev: &Device, s: &CudaSlice<T>, arg: &'static str) -> Result<()> {
    if dev.owns(s) {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            arg,
            "buffer lives on another device context",
        ))
    }
}

/// A buffer must hold exactly `want` elements (CUDA has no empty allocations: a buffer of
/// one element stands for an empty tensor).
fn check_len<T>(s: &CudaSlice<T>, want: usize, arg: &'static str, what: &str) -> Result<()> {
    if s.len() == want || (want == 0 && s.len() <= 1) {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            arg,
            format!("{} elements, expected {want} ({what})", s.len()),
        ))
    }
}

fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.zeros(len.max(1))
}

// ------------------------------------------------------------------ expert ids and routing

/// Expert ids \[tokens, top_k\] on the device, every id in 0..experts and distinct within a
/// token: validated on upload, or written by [`route`].
#[derive(Debug)]
pub struct ExpertIds {
    data: CudaSlice<i32>,
    tokens: usize,
    top_k: usize,
    experts: usize,
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
        super::plan::validate_ids(OP, ids, tokens, top_k, experts)?;
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

fn check_logits<T>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &CudaSlice<T>,
    tokens: usize,
) -> Result<()> {
    check_owned(dev, logits, "logits")?;
    check_len(logits, tokens * cfg.experts, "logits", "tokens x experts")
}

fn route_impl<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &CudaSlice<T>,
    tokens: usize,
    bias: Option<&CudaSlice<f32>>,
    out: &mut Routing,
    force_block: bool,
) -> Result<()> {
    let plan = GatePlan::new(cfg, tokens, force_block)?;
    check_logits(dev, cfg, logits, tokens)?;
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
    check_owned(dev, &out.ids.data, "out")?;
    check_owned(dev, &out.weights, "out")?;
    if let Some(b) = bias {
        check_owned(dev, b, "bias")?;
        check_len(b, cfg.experts, "bias", "one per expert")?;
    }
    if tokens == 0 {
        return Ok(());
    }
    let group = cfg.effective_grouping();
    let top2 = matches!(group.map(|g| g.score), Some(GroupScore::Top2Sum));
    let stream = dev.stream();
    let (logits_ptr, _lg) = logits.device_ptr(stream);
    let bias_guard = bias.map(|b| b.device_ptr(stream));
    let (ids_ptr, _ig) = out.ids.data.device_ptr_mut(stream);
    let (w_ptr, _wg) = out.weights.device_ptr_mut(stream);
    let params = sys::LongctxMoeGateParams {
        logits: logits_ptr,
        bias: bias_guard.as_ref().map_or(0, |g| g.0),
        ids: ids_ptr,
        weights: w_ptr,
        tokens: u32_of(tokens, "tokens")?,
        experts: u32_of(cfg.experts, "experts")?,
        top_k: u32_of(cfg.top_k, "top_k")?,
        scoring: match cfg.scoring {
            Scoring::Softmax => sys::LONGCTX_MOE_SCORING_SOFTMAX,
            Scoring::Sigmoid => sys::LONGCTX_MOE_SCORING_SIGMOID,
        },
        group_mode: match group.map(|g| g.score) {
            None => sys::LONGCTX_MOE_GROUP_NONE,
            Some(GroupScore::Max) => sys::LONGCTX_MOE_GROUP_MAX,
            Some(GroupScore::Top2Sum) => sys::LONGCTX_MOE_GROUP_TOP2_SUM,
        },
        n_group: u32_of(group.map_or(1, |g| g.n_group), "n_group")?,
        topk_group: u32_of(group.map_or(1, |g| g.topk_group), "topk_group")?,
        renormalize: u32::from(cfg.renormalize),
        select_on_logits: u32::from(bias.is_none() && !top2),
        routed_scaling_factor: cfg.routed_scaling_factor as f32,
        lanes: u32_of(plan.lanes, "experts")?,
        slots: u32_of(plan.slots, "experts")?,
        group_lanes: u32_of(plan.group_lanes, "n_group")?,
        vec_loads: u32::from(
            plan.path == GatePath::Warp
                && logits_ptr % 16 == 0
                && (plan.slots * T::DTYPE.size()) % 16 == 0
                && cfg.experts % plan.slots == 0,
        ),
    };
    let id = match plan.path {
        GatePath::Warp => pick::<T>(KernelId::MoeGateWarpF32, KernelId::MoeGateWarpBf16),
        GatePath::Block => pick::<T>(KernelId::MoeGateBlockF32, KernelId::MoeGateBlockBf16),
    };
    // SAFETY: logits holds tokens x experts elements of T and bias (if any) experts f32s on
    // this context (checked above); ids and weights hold tokens x top_k elements each and
    // are distinct buffers from the inputs (a &mut borrow); the plan's grid covers exactly
    // the tokens (the warp kernel returns for the rounded-up tail) and its shared memory
    // size matches gate_block_smem_bytes; vec_loads is set only when every lane's 16-byte
    // vector loads are aligned and inside its token's row; the config is validated, so
    // top_k never exceeds the eligible experts and the kernel writes only in-range,
    // distinct ids. The pointer guards live until the end of this function.
    unsafe { launch(dev, id, plan.grid, plan.threads, plan.smem_bytes, &params) }
}

/// Routes `tokens` tokens: logits \[tokens, experts\] (f32 or bf16) -> `out`'s ids and
/// weights, with one fused launch. `bias` is DeepSeek-V3's e_score_correction_bias
/// (f32 \[experts\]); it moves the choice only, the weights use the unbiased scores.
/// Experts <= 512 with top_k <= 32 run on up to one warp per token (several tokens per warp
/// below 32 experts), with group limiting when each group covers a power of two of whole
/// lanes (DeepSeek-V2 and V3 do); anything else runs one block per token.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors; [`Error::InvalidArgument`] when logits, bias or
/// `out` do not match the config and token count or live on another device;
/// [`Error::KernelsNotCompiled`]; [`Error::Cuda`] if the launch fails.
pub fn route<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &CudaSlice<T>,
    tokens: usize,
    bias: Option<&CudaSlice<f32>>,
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
    logits: &CudaSlice<T>,
    tokens: usize,
    bias: Option<&CudaSlice<f32>>,
    out: &mut Routing,
) -> Result<()> {
    route_impl(dev, cfg, logits, tokens, bias, out, true)
}

// ------------------------------------------------------------------ permutation

/// Output of [`permute`]: counts, offsets, the slot of every assignment, the assignment of
/// every slot, the expert of every block of slots, the drop count (see
/// [`PermutationTables`] for the layout), plus the kernels' workspace.
#[derive(Debug)]
pub struct Permutation {
    plan: PermutePlan,
    routed_counts: CudaSlice<i32>,
    counts: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    slot_of: CudaSlice<i32>,
    slot_assignment: CudaSlice<i32>,
    block_expert: CudaSlice<i32>,
    dropped: CudaSlice<i32>,
    chunk_counts: CudaSlice<i32>,
    /// Whether the buffers hold a permutation (all slots in range) yet.
    filled: bool,
}

impl Permutation {
    /// Allocates the tables for `tokens` x `top_k` assignments over `experts`.
    ///
    /// # Errors
    /// [`PermutePlan::new`]'s errors (experts, top_k, a capacity factor that is not positive
    /// and finite, sizes past i32); [`Error::Cuda`] on allocation failure.
    pub fn new(
        dev: &Device,
        tokens: usize,
        top_k: usize,
        experts: usize,
        opts: PermuteOptions,
    ) -> Result<Self> {
        let plan = PermutePlan::new(tokens, top_k, experts, opts)?;
        Ok(Permutation {
            routed_counts: alloc(dev, experts)?,
            counts: alloc(dev, experts)?,
            offsets: alloc(dev, experts + 1)?,
            slot_of: alloc(dev, plan.assignments)?,
            slot_assignment: alloc(dev, plan.max_slots)?,
            block_expert: alloc(dev, plan.max_blocks)?,
            dropped: alloc(dev, 1)?,
            chunk_counts: alloc(dev, plan.chunks * experts)?,
            plan,
            filled: false,
        })
    }

    /// The plan: sizes (max_slots is the row count of expert-ordered buffers), capacity,
    /// chunking.
    pub fn plan(&self) -> &PermutePlan {
        &self.plan
    }

    /// \[experts\] assignments routed to each expert, before capacity.
    pub fn routed_counts(&self) -> &CudaSlice<i32> {
        &self.routed_counts
    }

    /// \[experts\] assignments kept per expert.
    pub fn counts(&self) -> &CudaSlice<i32> {
        &self.counts
    }

    /// \[experts + 1\] padded segment starts, then the total (the rows a grouped GEMM runs).
    pub fn offsets(&self) -> &CudaSlice<i32> {
        &self.offsets
    }

    /// \[tokens x top_k\] slot of each assignment, -1 when dropped.
    pub fn slot_of(&self) -> &CudaSlice<i32> {
        &self.slot_of
    }

    /// \[max_slots\] assignment in each slot, -1 for padding and the unused tail.
    pub fn slot_assignment(&self) -> &CudaSlice<i32> {
        &self.slot_assignment
    }

    /// \[max_blocks\] expert of each block of `block` slots, -1 past the total.
    pub fn block_expert(&self) -> &CudaSlice<i32> {
        &self.block_expert
    }

    /// \[1\] assignments dropped by the capacity.
    pub fn dropped(&self) -> &CudaSlice<i32> {
        &self.dropped
    }

    /// Copies every table back (waits for the stream).
    ///
    /// # Errors
    /// [`Error::Cuda`] on copy failure or if a queued kernel failed.
    pub fn download(&self, dev: &Device) -> Result<PermutationTables> {
        let p = &self.plan;
        let get = |s: &CudaSlice<i32>, n: usize| -> Result<Vec<i32>> {
            let mut v = dev.download(s)?;
            v.truncate(n);
            Ok(v)
        };
        let dropped = get(&self.dropped, 1)?;
        Ok(PermutationTables {
            routed_counts: get(&self.routed_counts, p.experts)?,
            counts: get(&self.counts, p.experts)?,
            offsets: get(&self.offsets, p.experts + 1)?,
            slot_of: get(&self.slot_of, p.assignments)?,
            slot_assignment: get(&self.slot_assignment, p.max_slots)?,
            block_expert: get(&self.block_expert, p.max_blocks)?,
            dropped: usize::try_from(dropped.first().copied().unwrap_or(0)).unwrap_or(0),
        })
    }

    fn check_filled(&self, dev: &Device) -> Result<()> {
        if !self.filled {
            return Err(Error::invalid(
                OP,
                "perm",
                "the permutation has not been computed yet (call permute first)",
            ));
        }
        check_owned(dev, &self.slot_of, "perm")
    }
}

/// Sorts the assignments of `ids` by expert into `perm` (three launches: per-chunk counts,
/// one-block scan, scatter). Stable: within an expert, assignments keep token order; with a
/// capacity the later ones are dropped. Deterministic: no atomics.
///
/// # Errors
/// [`Error::InvalidArgument`] when `perm` was made for another shape than `ids` or either
/// lives on another device; [`Error::KernelsNotCompiled`]; [`Error::Cuda`].
pub fn permute(dev: &Device, ids: &ExpertIds, perm: &mut Permutation) -> Result<()> {
    let p = perm.plan;
    if ids.tokens != p.tokens || ids.top_k != p.top_k || ids.experts != p.experts {
        return Err(Error::invalid(
            OP,
            "perm",
            format!(
                "made for {} tokens x top_k {} of {} experts; ids are {} x {} of {}",
                p.tokens, p.top_k, p.experts, ids.tokens, ids.top_k, ids.experts
            ),
        ));
    }
    check_owned(dev, &ids.data, "ids")?;
    check_owned(dev, &perm.slot_of, "perm")?;
    let stream = dev.stream();
    let (ids_ptr, _g0) = ids.data.device_ptr(stream);
    let (cc, _g1) = perm.chunk_counts.device_ptr_mut(stream);
    let (routed, _g2) = perm.routed_counts.device_ptr_mut(stream);
    let (counts, _g3) = perm.counts.device_ptr_mut(stream);
    let (offsets, _g4) = perm.offsets.device_ptr_mut(stream);
    let (slot_of, _g5) = perm.slot_of.device_ptr_mut(stream);
    let (slot_assignment, _g6) = perm.slot_assignment.device_ptr_mut(stream);
    let (block_expert, _g7) = perm.block_expert.device_ptr_mut(stream);
    let (dropped, _g8) = perm.dropped.device_ptr_mut(stream);
    let params = sys::LongctxMoePermuteParams {
        ids: ids_ptr,
        chunk_counts: cc,
        routed_counts: routed,
        counts,
        offsets,
        slot_of,
        slot_assignment,
        block_expert,
        dropped,
        assignments: u32_of(p.assignments, "ids")?,
        experts: u32_of(p.experts, "experts")?,
        block: u32_of(p.block, "block")?,
        capacity: match p.capacity {
            None => sys::LONGCTX_MOE_NO_CAPACITY,
            Some(c) => u32::try_from(c.min(p.assignments)).map_err(|_| {
                Error::invalid(OP, "capacity_factor", "capacity does not fit in u32")
            })?,
        },
        chunk: u32_of(p.chunk, "ids")?,
        chunks: u32_of(p.chunks, "ids")?,
        warps: u32_of(p.warps, "experts")?,
        max_slots: u32_of(p.max_slots, "block")?,
        max_blocks: u32_of(p.max_blocks, "block")?,
        pad0: 0,
    };
    let grid = grid_u32(p.count_grid(), "ids")?;
    let threads = u32_of(32 * p.warps, "experts")?;
    // SAFETY: ids holds `assignments` in-range expert ids (ExpertIds' invariant) and every
    // table was allocated by Permutation::new from the same plan: chunk_counts chunks x
    // experts, slot_of assignments, slot_assignment max_slots (a bound on the padded total),
    // block_expert max_slots / block, offsets experts + 1. The dynamic shared memory is one
    // int per expert per warp, as the count and scatter kernels index it; the scan is one
    // block of its compiled size. All outputs are distinct allocations from ids; the guards
    // live until the end of this function.
    unsafe {
        launch(
            dev,
            KernelId::MoeCount,
            grid,
            threads,
            p.smem_bytes(),
            &params,
        )?;
        launch(dev, KernelId::MoeScan, 1, SCAN_THREADS, 0, &params)?;
        launch(
            dev,
            KernelId::MoeScatter,
            grid,
            threads,
            p.smem_bytes(),
            &params,
        )?;
    }
    perm.filled = true;
    Ok(())
}

// ------------------------------------------------------------------ gather / combine

fn check_hidden(hidden: usize) -> Result<u32> {
    if hidden == 0 {
        return Err(Error::invalid(OP, "hidden", "hidden size 0"));
    }
    u32_of(hidden, "hidden")
}

fn vec_ok<T: MoeElement>(hidden: usize) -> u32 {
    u32::from(hidden % (16 / T::DTYPE.size()) == 0)
}

/// Hidden states `x` \[tokens, hidden\] into expert order `out` \[max_slots, hidden\]: row s =
/// scale\[a\] x x\[a / top_k\] for the assignment a in slot s, zeros for padding inside the
/// experts' segments; rows past the padded total (`offsets[experts]`) are left untouched.
/// `scale` (f32 \[tokens x top_k\]) defaults to 1.
///
/// # Errors
/// [`Error::InvalidArgument`] on a length mismatch, hidden of 0, a permutation not yet
/// computed, or a buffer on another device; [`Error::Cuda`].
pub fn gather<T: MoeElement>(
    dev: &Device,
    perm: &Permutation,
    x: &CudaSlice<T>,
    hidden: usize,
    scale: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let h = check_hidden(hidden)?;
    perm.check_filled(dev)?;
    let p = &perm.plan;
    check_owned(dev, x, "x")?;
    check_owned(dev, out, "out")?;
    check_len(x, p.tokens * hidden, "x", "tokens x hidden")?;
    check_len(out, p.max_slots * hidden, "out", "max_slots x hidden")?;
    if let Some(s) = scale {
        check_owned(dev, s, "scale")?;
        check_len(s, p.assignments, "scale", "tokens x top_k")?;
    }
    let stream = dev.stream();
    let (src, _g0) = x.device_ptr(stream);
    let (dst, _g1) = out.device_ptr_mut(stream);
    let (sa, _g2) = perm.slot_assignment.device_ptr(stream);
    let scale_guard = scale.map(|s| s.device_ptr(stream));
    let (offsets, _g3) = perm.offsets.device_ptr(stream);
    let params = sys::LongctxMoeGatherParams {
        src,
        dst,
        slot_assignment: sa,
        scale: scale_guard.as_ref().map_or(0, |g| g.0),
        total: offsets + 4 * p.experts as u64,
        rows: u32_of(p.max_slots, "out")?,
        hidden: h,
        top_k: u32_of(p.top_k, "top_k")?,
        vec: vec_ok::<T>(hidden),
    };
    let id = pick::<T>(KernelId::MoeGatherF32, KernelId::MoeGatherBf16);
    // SAFETY: out holds max_slots x hidden elements, one block per slot row; `total` points
    // at offsets[experts] inside perm's experts + 1 offsets; each slot's
    // assignment is -1 or in 0..tokens x top_k (written by permute), so the source row
    // a / top_k < tokens lies in x (tokens x hidden, checked), and scale (if any) has an
    // entry per assignment; vector access only when hidden is a multiple of the 16-byte
    // width, so every row start is 16-byte aligned in these whole allocations. out is a
    // distinct buffer (&mut). Guards live until the end of this function.
    unsafe {
        launch(
            dev,
            id,
            grid_u32(p.max_slots, "out")?,
            ROW_THREADS,
            0,
            &params,
        )
    }
}

fn combine_impl<T: MoeElement>(
    dev: &Device,
    perm: &Permutation,
    expert_out: &CudaSlice<T>,
    hidden: usize,
    weights: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    arg_in: &'static str,
) -> Result<()> {
    let h = check_hidden(hidden)?;
    perm.check_filled(dev)?;
    let p = &perm.plan;
    check_owned(dev, expert_out, arg_in)?;
    check_owned(dev, out, "out")?;
    check_len(
        expert_out,
        p.max_slots * hidden,
        arg_in,
        "max_slots x hidden",
    )?;
    check_len(out, p.tokens * hidden, "out", "tokens x hidden")?;
    if let Some(w) = weights {
        check_owned(dev, w, "weights")?;
        check_len(w, p.assignments, "weights", "tokens x top_k")?;
    }
    let stream = dev.stream();
    let (src, _g0) = expert_out.device_ptr(stream);
    let (dst, _g1) = out.device_ptr_mut(stream);
    let (so, _g2) = perm.slot_of.device_ptr(stream);
    let w_guard = weights.map(|w| w.device_ptr(stream));
    let params = sys::LongctxMoeCombineParams {
        src,
        dst,
        slot_of: so,
        weights: w_guard.as_ref().map_or(0, |g| g.0),
        tokens: u32_of(p.tokens, "out")?,
        hidden: h,
        top_k: u32_of(p.top_k, "top_k")?,
        vec: vec_ok::<T>(hidden),
    };
    let id = pick::<T>(KernelId::MoeCombineF32, KernelId::MoeCombineBf16);
    // SAFETY: one block per token row of out (tokens x hidden, checked); slot_of has
    // tokens x top_k entries, each -1 or below max_slots (written by permute), and
    // expert_out holds max_slots x hidden elements; weights (if any) one per assignment;
    // vector access only with 16-byte aligned rows. out is a distinct buffer (&mut). Guards
    // live until the end of this function.
    unsafe { launch(dev, id, grid_u32(p.tokens, "out")?, ROW_THREADS, 0, &params) }
}

/// Back to token order: out\[t\] = sum_j weights\[t, j\] x expert_out\[slot_of\[t, j\]\] over
/// the kept assignments, accumulated in f32 in rank order; `weights` (f32 \[tokens x top_k\])
/// default to 1. Dropped assignments contribute nothing.
///
/// # Errors
/// As [`gather`].
pub fn combine<T: MoeElement>(
    dev: &Device,
    perm: &Permutation,
    expert_out: &CudaSlice<T>,
    hidden: usize,
    weights: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    combine_impl(dev, perm, expert_out, hidden, weights, out, "expert_out")
}

/// Gradient of [`gather`] (without scale): d_x\[t\] = sum_j d_permuted\[slot_of\[t, j\]\], a
/// scatter-add done as a gather through the inverse map, so no atomics.
///
/// # Errors
/// As [`gather`].
pub fn gather_backward<T: MoeElement>(
    dev: &Device,
    perm: &Permutation,
    d_permuted: &CudaSlice<T>,
    hidden: usize,
    d_x: &mut CudaSlice<T>,
) -> Result<()> {
    combine_impl(dev, perm, d_permuted, hidden, None, d_x, "d_permuted")
}

/// Gradient of [`combine`] with weights: d_expert_out\[slot\] = w\[a\] x d_out\[a / top_k\]
/// (zeros in padding) and d_weights\[a\] = <d_out\[a / top_k\], expert_out\[slot_of\[a\]\]>
/// (0 for dropped assignments), two launches.
///
/// # Errors
/// As [`gather`].
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: MoeElement>(
    dev: &Device,
    perm: &Permutation,
    d_out: &CudaSlice<T>,
    expert_out: &CudaSlice<T>,
    hidden: usize,
    weights: &CudaSlice<f32>,
    d_expert_out: &mut CudaSlice<T>,
    d_weights: &mut CudaSlice<f32>,
) -> Result<()> {
    gather(dev, perm, d_out, hidden, Some(weights), d_expert_out)?;
    let h = check_hidden(hidden)?;
    let p = &perm.plan;
    check_owned(dev, expert_out, "expert_out")?;
    check_owned(dev, d_weights, "d_weights")?;
    check_len(
        expert_out,
        p.max_slots * hidden,
        "expert_out",
        "max_slots x hidden",
    )?;
    check_len(d_weights, p.assignments, "d_weights", "tokens x top_k")?;
    let stream = dev.stream();
    let (g, _g0) = d_out.device_ptr(stream);
    let (x, _g1) = expert_out.device_ptr(stream);
    let (so, _g2) = perm.slot_of.device_ptr(stream);
    let (dw, _g3) = d_weights.device_ptr_mut(stream);
    let params = sys::LongctxMoeCombineDwParams {
        d_out: g,
        expert_out: x,
        slot_of: so,
        d_weights: dw,
        tokens: u32_of(p.tokens, "d_out")?,
        hidden: h,
        top_k: u32_of(p.top_k, "top_k")?,
        vec: vec_ok::<T>(hidden),
    };
    let id = pick::<T>(KernelId::MoeCombineDwF32, KernelId::MoeCombineDwBf16);
    // SAFETY: d_out (tokens x hidden, checked by the gather above) and expert_out
    // (max_slots x hidden, checked) are read at rows t < tokens and slot_of entries that are
    // -1 or below max_slots (written by permute); d_weights holds one f32 per assignment
    // and is a distinct buffer (&mut); vector access only with 16-byte aligned rows. Guards
    // live until the end of this function.
    unsafe {
        launch(
            dev,
            id,
            grid_u32(p.tokens, "d_out")?,
            ROW_THREADS,
            0,
            &params,
        )
    }
}

// ------------------------------------------------------------------ losses and backward

/// Device outputs of [`router_losses`]: the two loss values and the mean balance
/// probability per expert, plus workspace.
#[derive(Debug)]
pub struct RouterLosses {
    plan: StatsPlan,
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
        cfg.validate()?;
        if tokens == 0 {
            return Err(Error::invalid(
                OP,
                "tokens",
                "losses need at least one token",
            ));
        }
        let plan = StatsPlan::new(tokens);
        Ok(RouterLosses {
            plan,
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

fn coef(x: f64, arg: &'static str) -> Result<f32> {
    if x.is_finite() {
        Ok(x as f32)
    } else {
        Err(Error::invalid(OP, arg, format!("{x} is not finite")))
    }
}

fn check_balance(
    dev: &Device,
    cfg: &RouterConfig,
    tokens: usize,
    perm: &Permutation,
) -> Result<()> {
    perm.check_filled(dev)?;
    let p = &perm.plan;
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

/// The load-balancing loss alpha x E x sum_i f_i P_i (f_i from `perm`'s routed counts, before
/// capacity) and the z-loss beta x mean_t logsumexp(logits_t)^2 into `out`, deterministic
/// (fixed-order sums, no atomics), two launches.
///
/// # Errors
/// [`Error::InvalidArgument`] when logits, `perm` or `out` do not match the config and token
/// count, a coefficient is not finite, or a buffer lives on another device; [`Error::Cuda`].
pub fn router_losses<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &CudaSlice<T>,
    tokens: usize,
    perm: &Permutation,
    opts: LossOptions,
    out: &mut RouterLosses,
) -> Result<()> {
    cfg.validate()?;
    check_logits(dev, cfg, logits, tokens)?;
    check_balance(dev, cfg, tokens, perm)?;
    if out.tokens != tokens || out.experts != cfg.experts {
        return Err(Error::invalid(
            OP,
            "out",
            format!(
                "made for {} tokens of {} experts; the call has {tokens} of {}",
                out.tokens, out.experts, cfg.experts
            ),
        ));
    }
    check_owned(dev, &out.values, "out")?;
    let plan = out.plan;
    let stream = dev.stream();
    let (logits_ptr, _g0) = logits.device_ptr(stream);
    let (pp, _g1) = out.partial_probs.device_ptr_mut(stream);
    let (pl, _g2) = out.partial_lse2.device_ptr_mut(stream);
    let (vals, _g3) = out.values.device_ptr_mut(stream);
    let (mp, _g4) = out.mean_probs.device_ptr_mut(stream);
    let (counts, _g5) = perm.routed_counts.device_ptr(stream);
    let scoring = match cfg.scoring {
        Scoring::Softmax => sys::LONGCTX_MOE_SCORING_SOFTMAX,
        Scoring::Sigmoid => sys::LONGCTX_MOE_SCORING_SIGMOID,
    };
    let stats = sys::LongctxMoeStatsParams {
        logits: logits_ptr,
        partial_probs: pp,
        partial_lse2: pl,
        tokens: u32_of(tokens, "tokens")?,
        experts: u32_of(cfg.experts, "experts")?,
        scoring,
        chunk_tokens: u32_of(plan.chunk_tokens, "tokens")?,
    };
    let loss = sys::LongctxMoeLossParams {
        partial_probs: pp,
        partial_lse2: pl,
        counts,
        losses: vals,
        mean_probs: mp,
        chunks: u32_of(plan.chunks, "tokens")?,
        experts: stats.experts,
        tokens: stats.tokens,
        top_k: u32_of(cfg.top_k, "top_k")?,
        aux_coef: coef(opts.aux_coef, "aux_coef")?,
        z_coef: coef(opts.z_coef, "z_coef")?,
    };
    let id = pick::<T>(KernelId::MoeStatsF32, KernelId::MoeStatsBf16);
    // SAFETY: logits holds tokens x experts elements (checked); one stats block per chunk of
    // chunk_tokens (<= 256, the kernel's shared arrays) tokens, writing chunks x experts and
    // chunks partials into buffers RouterLosses::new sized from the same plan; the loss
    // kernel (one block) reads those, perm's experts routed counts, and writes 2 values and
    // experts means. Outputs are distinct allocations; guards live until the end.
    unsafe {
        launch(
            dev,
            id,
            grid_u32(plan.chunks, "tokens")?,
            STATS_THREADS,
            0,
            &stats,
        )?;
        launch(dev, KernelId::MoeLoss, 1, LOSS_THREADS, 0, &loss)
    }
}

/// Gradient with respect to the logits (f32 \[tokens, experts\]) of: the routing weights,
/// given their gradient `d_weights` (f32 \[tokens, top_k\]; `None`: no such term); the
/// load-balancing loss when `balance` gives the routed counts (`opts.aux_coef`); and the
/// z-loss (`opts.z_coef`, 0 for none). The chosen experts (`ids`, from the forward) are
/// fixed, the bias gets no gradient. One launch, one warp per token.
///
/// # Errors
/// [`Error::InvalidArgument`] when a buffer, `ids` or `balance` does not match the config and
/// token count, a coefficient is not finite, or a buffer lives on another device;
/// [`Error::Cuda`].
#[allow(clippy::too_many_arguments)]
pub fn route_backward<T: MoeElement>(
    dev: &Device,
    cfg: &RouterConfig,
    logits: &CudaSlice<T>,
    tokens: usize,
    ids: &ExpertIds,
    d_weights: Option<&CudaSlice<f32>>,
    balance: Option<&Permutation>,
    opts: LossOptions,
    d_logits: &mut CudaSlice<f32>,
) -> Result<()> {
    cfg.validate()?;
    check_logits(dev, cfg, logits, tokens)?;
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
    check_owned(dev, &ids.data, "ids")?;
    check_owned(dev, d_logits, "d_logits")?;
    check_len(
        d_logits,
        tokens * cfg.experts,
        "d_logits",
        "tokens x experts",
    )?;
    if let Some(d) = d_weights {
        check_owned(dev, d, "d_weights")?;
        check_len(d, tokens * cfg.top_k, "d_weights", "tokens x top_k")?;
    }
    if let Some(perm) = balance {
        check_balance(dev, cfg, tokens, perm)?;
    }
    let aux = coef(
        aux_grad_scale(opts.aux_coef, cfg.experts, tokens, cfg.top_k),
        "aux_coef",
    )?;
    let zs = coef(z_grad_scale(opts.z_coef, tokens), "z_coef")?;
    if tokens == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let (logits_ptr, _g0) = logits.device_ptr(stream);
    let (ids_ptr, _g1) = ids.data.device_ptr(stream);
    let dw_guard = d_weights.map(|d| d.device_ptr(stream));
    let counts_guard = balance.map(|p| p.routed_counts.device_ptr(stream));
    let (out, _g2) = d_logits.device_ptr_mut(stream);
    let params = sys::LongctxMoeGateBwdParams {
        logits: logits_ptr,
        ids: ids_ptr,
        d_weights: dw_guard.as_ref().map_or(0, |g| g.0),
        counts: counts_guard.as_ref().map_or(0, |g| g.0),
        d_logits: out,
        tokens: u32_of(tokens, "tokens")?,
        experts: u32_of(cfg.experts, "experts")?,
        top_k: u32_of(cfg.top_k, "top_k")?,
        scoring: match cfg.scoring {
            Scoring::Softmax => sys::LONGCTX_MOE_SCORING_SOFTMAX,
            Scoring::Sigmoid => sys::LONGCTX_MOE_SCORING_SIGMOID,
        },
        renormalize: u32::from(cfg.renormalize),
        routed_scaling_factor: cfg.routed_scaling_factor as f32,
        aux_grad_scale: aux,
        z_grad_scale: zs,
    };
    let id = pick::<T>(KernelId::MoeGateBwdF32, KernelId::MoeGateBwdBf16);
    // SAFETY: logits and d_logits hold tokens x experts elements, ids and d_weights (if any)
    // tokens x top_k, counts (if any) experts (checked above or by construction); every id
    // is in 0..experts (ExpertIds' invariant), so row[ids[j]] stays in the row. One warp per
    // token, the grid rounded up and the tail returning. d_logits is a distinct buffer
    // (&mut). Guards live until the end of this function.
    unsafe {
        launch(
            dev,
            id,
            grid_u32(tokens.div_ceil(BWD_WARPS), "tokens")?,
            (BWD_WARPS * 32) as u32,
            0,
            &params,
        )
    }
}

/// DeepSeek's auxiliary-loss-free balancing step on `bias` (f32 \[experts\], in place):
/// bias_i += gamma x sign(mean load - load_i), loads being `perm`'s routed counts. The sign
/// is exact (integer arithmetic); sign(0) = 0.
///
/// # Errors
/// [`Error::InvalidArgument`] for a bias of the wrong length, a gamma that is not finite, or
/// a permutation not yet computed; [`Error::Cuda`].
pub fn update_bias(
    dev: &Device,
    perm: &Permutation,
    gamma: f64,
    bias: &mut CudaSlice<f32>,
) -> Result<()> {
    perm.check_filled(dev)?;
    check_owned(dev, bias, "bias")?;
    let experts = perm.plan.experts;
    check_len(bias, experts, "bias", "one per expert")?;
    let stream = dev.stream();
    let (counts, _g0) = perm.routed_counts.device_ptr(stream);
    let (b, _g1) = bias.device_ptr_mut(stream);
    let params = sys::LongctxMoeBiasParams {
        counts,
        bias: b,
        experts: u32_of(experts, "experts")?,
        gamma: coef(gamma, "gamma")?,
    };
    // SAFETY: counts and bias hold `experts` elements each (perm's plan, checked); one block
    // of the kernel's compiled size; bias is updated in place through a &mut borrow and
    // counts is another allocation. Guards live until the end of this function.
    unsafe { launch(dev, KernelId::MoeBiasUpdate, 1, BIAS_THREADS, 0, &params) }
}
