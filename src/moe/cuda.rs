//! GPU path of MoE routing: device checks -> the shared launch plans -> launches.
//!
//! Each op's validation (after the device-ownership checks), params, grid, block and shared
//! memory come from one pure `plan_*` function below that takes buffer addresses and
//! lengths ([`Buf`]) and host-side facts; the CUDA path passes device pointers and the CPU
//! emulator (`crate::emulator`) host addresses, so the two cannot disagree about a launch.
//!
//! Device index tensors that kernels dereference (expert ids, slots) only come from types
//! whose constructors guarantee their range: [`ExpertIds`] (validated on upload, or written by
//! the gating kernel) and [`Permutation`] (written by the permutation kernels).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, PushKernelArg};

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
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, RawBuffer};
use crate::sys;

const OP: &str = "moe";

/// f32 or bf16 variant of a kernel (MoeElement admits no other type).
fn pick<T: MoeElement>(f32_id: KernelId, bf16_id: KernelId) -> KernelId {
    match T::DTYPE {
        DType::F32 => f32_id,
        _ => bf16_id,
    }
}

/// Queues `l` on `dev`'s stream; nothing for an empty grid.
///
/// # Safety
/// The caller guarantees that every device address in `l.params` points into a live
/// allocation of this context large enough for every access the kernel makes with those
/// params (shapes, strides and index ranges validated), that outputs do not alias inputs
/// unless the kernel is documented in place, and that the device pointer guards stay alive
/// until this returns.
unsafe fn launch<P: DeviceRepr>(dev: &Device, l: &KernelLaunch<P>) -> Result<()> {
    if l.grid.0 == 0 || l.grid.1 == 0 || l.grid.2 == 0 {
        return Ok(());
    }
    let func = dev.function(l.id)?;
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: forwarded from this function's contract (see each call site's SAFETY note).
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}

fn grid_u32(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::overflow(OP, arg, format!("{n} blocks exceed the grid limit")))
}

fn u32_of(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::overflow(OP, arg, format!("{n} does not fit in u32")))
}

/// a x b elements, or an error naming `arg` when that overflows.
fn elems(a: usize, b: usize, arg: &'static str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::overflow(OP, arg, format!("{a} x {b} elements overflow usize")))
}

/// A buffer or view must live on `dev`'s CUDA context.
fn check_owned<T, S: DeviceSlice<T> + ?Sized>(
    dev: &Device,
    s: &S,
    arg: &'static str,
) -> Result<()> {
    if dev.owns_any(s) {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            arg,
            "buffer lives on another device context",
        ))
    }
}

/// A buffer of `len` elements must hold at least `want`: a longer one (a workspace sized
/// for a larger batch, or a buffer with room to spare) is used from its start and its tail
/// is left alone.
fn check_len(len: usize, want: usize, arg: &'static str, what: &str) -> Result<()> {
    if len >= want {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            arg,
            format!("{len} elements, expected at least {want} ({what})"),
        ))
    }
}

fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.zeros(len.max(1))
}

/// One buffer of a launch, wherever it lives: its address and its length in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: usize,
}

/// `s` as a launch buffer with the device pointer `addr` (whose guard the caller holds).
fn dbuf<T, S: DeviceSlice<T> + ?Sized>(s: &S, addr: u64) -> Buf {
    Buf { addr, len: s.len() }
}

/// `b`'s address must be aligned to its element type `E` (always true of cudarc buffers
/// and views and of host slices; checked for raw pointers, whose kernels would fault).
fn check_aligned<E>(b: &Buf, arg: &'static str) -> Result<()> {
    check_element_alignment(OP, arg, b.addr, std::mem::size_of::<E>())
}

/// A caller's raw buffer as a launch buffer: a null pointer is refused unless the buffer
/// is empty (alignment is checked by the plans, against each buffer's element type).
fn raw_buf(r: RawBuffer, arg: &'static str) -> Result<Buf> {
    if r.ptr == 0 && r.len > 0 {
        return Err(Error::invalid(
            OP,
            arg,
            format!("null device pointer for {} elements", r.len),
        ));
    }
    Ok(Buf {
        addr: r.ptr,
        len: r.len,
    })
}

/// Whether `b`'s rows of `hidden` elements of `T` all start 16-byte aligned, so the
/// 16-byte vector path may read or write them: hidden a multiple of the vector width and the
/// buffer itself 16-byte aligned (CUDA allocations always are; host slices need not be).
fn rows_vec_aligned<T: MoeElement>(hidden: usize, b: &Buf) -> bool {
    hidden % (16 / T::DTYPE.size()) == 0 && b.addr % 16 == 0
}

fn scoring_of(s: Scoring) -> u32 {
    match s {
        Scoring::Softmax => sys::LONGCTX_MOE_SCORING_SOFTMAX,
        Scoring::Sigmoid => sys::LONGCTX_MOE_SCORING_SIGMOID,
    }
}

/// A coefficient as the kernels take it: finite in f32.
fn coef(x: f64, arg: &'static str) -> Result<f32> {
    let y = x as f32;
    if y.is_finite() {
        Ok(y)
    } else {
        Err(Error::invalid(OP, arg, format!("{x} is not finite in f32")))
    }
}

/// A permutation must have been computed (by `permute`) before anything reads its tables.
pub(crate) fn check_filled(filled: bool) -> Result<()> {
    if filled {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            "perm",
            "the permutation has not been computed yet (call permute first)",
        ))
    }
}

// ------------------------------------------------------------------ launch plans
//
// The pure functions from validated arguments and buffer addresses to launches, shared by
// the CUDA path below and the emulator. They check every buffer length against the shape,
// so a launch they return touches nothing outside the buffers they were given (given the
// index tensors' ranges, which the callers guarantee).

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

/// The buffers of one permutation: the ids and every table and workspace.
pub(crate) struct PermuteBufs {
    pub ids: Buf,
    pub chunk_counts: Buf,
    pub routed_counts: Buf,
    pub counts: Buf,
    pub offsets: Buf,
    pub slot_of: Buf,
    pub slot_assignment: Buf,
    pub block_expert: Buf,
    pub dropped: Buf,
}

/// The permutation's three launches, in order: per-chunk counts, the one-block scan, the
/// scatter (the count and scatter grids are empty when there are no assignments). Checks
/// every table against `p`'s sizes (the ids under `ids`, the tables under `perm`).
pub(crate) fn plan_permute(
    p: &PermutePlan,
    b: &PermuteBufs,
) -> Result<[KernelLaunch<sys::LongctxMoePermuteParams>; 3]> {
    check_len(b.ids.len, p.assignments, "ids", "tokens x top_k")?;
    for (buf, want, what) in [
        (
            &b.chunk_counts,
            elems(p.chunks, p.experts, "perm")?,
            "chunks x experts",
        ),
        (&b.routed_counts, p.experts, "experts"),
        (&b.counts, p.experts, "experts"),
        (&b.offsets, p.experts + 1, "experts + 1"),
        (&b.slot_of, p.assignments, "tokens x top_k"),
        (&b.slot_assignment, p.max_slots, "max_slots"),
        (&b.block_expert, p.max_blocks, "max_blocks"),
        (&b.dropped, 1, "one count"),
    ] {
        check_len(buf.len, want, "perm", what)?;
    }
    let params = sys::LongctxMoePermuteParams {
        ids: b.ids.addr,
        chunk_counts: b.chunk_counts.addr,
        routed_counts: b.routed_counts.addr,
        counts: b.counts.addr,
        offsets: b.offsets.addr,
        slot_of: b.slot_of.addr,
        slot_assignment: b.slot_assignment.addr,
        block_expert: b.block_expert.addr,
        dropped: b.dropped.addr,
        assignments: u32_of(p.assignments, "ids")?,
        experts: u32_of(p.experts, "experts")?,
        block: u32_of(p.block, "block")?,
        capacity: match p.capacity {
            None => sys::LONGCTX_MOE_NO_CAPACITY,
            Some(c) => u32::try_from(c.min(p.assignments)).map_err(|_| {
                Error::overflow(OP, "capacity_factor", "capacity does not fit in u32")
            })?,
        },
        chunk: u32_of(p.chunk, "ids")?,
        chunks: u32_of(p.chunks, "ids")?,
        warps: u32_of(p.warps, "experts")?,
        max_slots: u32_of(p.max_slots, "block")?,
        max_blocks: u32_of(p.max_blocks, "block")?,
        pad0: 0,
    };
    let walk = |id| -> Result<KernelLaunch<sys::LongctxMoePermuteParams>> {
        Ok(KernelLaunch {
            id,
            params,
            grid: (grid_u32(p.count_grid(), "ids")?, 1, 1),
            block: (u32_of(32 * p.warps, "experts")?, 1, 1),
            smem_bytes: p.smem_bytes(),
        })
    };
    Ok([
        walk(KernelId::MoeCount)?,
        KernelLaunch {
            id: KernelId::MoeScan,
            params,
            grid: (1, 1, 1),
            block: (SCAN_THREADS, 1, 1),
            smem_bytes: 0,
        },
        walk(KernelId::MoeScatter)?,
    ])
}

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
pub(crate) fn plan_gather<T: MoeElement>(
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
        id: pick::<T>(KernelId::MoeGatherF32, KernelId::MoeGatherBf16),
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
pub(crate) fn plan_combine<T: MoeElement>(
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
        id: pick::<T>(KernelId::MoeCombineF32, KernelId::MoeCombineBf16),
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
pub(crate) fn plan_combine_backward<T: MoeElement>(
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
        id: pick::<T>(KernelId::MoeCombineDwF32, KernelId::MoeCombineDwBf16),
        params,
        grid: (grid_u32(p.tokens, "d_out")?, 1, 1),
        block: (ROW_THREADS, 1, 1),
        smem_bytes: 0,
    };
    Ok((gather, dw))
}

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
        check_filled(self.filled)?;
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
    for s in [
        &perm.chunk_counts,
        &perm.routed_counts,
        &perm.counts,
        &perm.offsets,
        &perm.slot_of,
        &perm.slot_assignment,
        &perm.block_expert,
        &perm.dropped,
    ] {
        check_owned(dev, s, "perm")?;
    }
    let stream = dev.stream();
    let Permutation {
        routed_counts,
        counts,
        offsets,
        slot_of,
        slot_assignment,
        block_expert,
        dropped,
        chunk_counts,
        ..
    } = perm;
    let lens = [
        chunk_counts.len(),
        routed_counts.len(),
        counts.len(),
        offsets.len(),
        slot_of.len(),
        slot_assignment.len(),
        block_expert.len(),
        dropped.len(),
    ];
    let (ids_ptr, _g0) = ids.data.device_ptr(stream);
    let (cc, _g1) = chunk_counts.device_ptr_mut(stream);
    let (routed, _g2) = routed_counts.device_ptr_mut(stream);
    let (kept, _g3) = counts.device_ptr_mut(stream);
    let (off, _g4) = offsets.device_ptr_mut(stream);
    let (so, _g5) = slot_of.device_ptr_mut(stream);
    let (sa, _g6) = slot_assignment.device_ptr_mut(stream);
    let (be, _g7) = block_expert.device_ptr_mut(stream);
    let (dr, _g8) = dropped.device_ptr_mut(stream);
    let buf = |addr, len| Buf { addr, len };
    let launches = plan_permute(
        &p,
        &PermuteBufs {
            ids: dbuf(&ids.data, ids_ptr),
            chunk_counts: buf(cc, lens[0]),
            routed_counts: buf(routed, lens[1]),
            counts: buf(kept, lens[2]),
            offsets: buf(off, lens[3]),
            slot_of: buf(so, lens[4]),
            slot_assignment: buf(sa, lens[5]),
            block_expert: buf(be, lens[6]),
            dropped: buf(dr, lens[7]),
        },
    )?;
    for l in &launches {
        // SAFETY: ids holds `assignments` in-range expert ids (ExpertIds' invariant, shape
        // checked above) and plan_permute checked every table against the plan:
        // chunk_counts chunks x experts, slot_of assignments, slot_assignment max_slots (a
        // bound on the padded total), block_expert max_slots / block, offsets experts + 1.
        // The dynamic shared memory is one int per expert per warp, as the count and
        // scatter kernels index it; the scan is one block of its compiled size. All outputs
        // are distinct allocations from ids and from each other, on this context (checked
        // above); the guards live until the end of this function. The launches run in
        // stream order, each reading what the previous one wrote.
        unsafe { launch(dev, l)? };
    }
    perm.filled = true;
    Ok(())
}

// ------------------------------------------------------------------ gather / combine

/// The gather from launch buffers, shared by [`gather`] and [`gather_raw`].
///
/// # Safety
/// `x`, `scale` (if any) and `out` are device buffers of `dev`'s context holding at least
/// `len` elements from `addr` (of `T`, f32, `T`); `out` overlaps neither input nor `perm`'s
/// tables; no other work touches them until the launch has completed; they stay alive
/// until then.
unsafe fn gather_bufs<T: MoeElement>(
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
pub fn gather<T: MoeElement>(
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
pub unsafe fn gather_raw<T: MoeElement>(
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
unsafe fn combine_bufs<T: MoeElement>(
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
fn combine_impl<T: MoeElement>(
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
pub fn combine<T: MoeElement>(
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
pub unsafe fn combine_raw<T: MoeElement>(
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
pub fn gather_backward<T: MoeElement>(
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
pub unsafe fn gather_backward_raw<T: MoeElement>(
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
unsafe fn combine_backward_bufs<T: MoeElement>(
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
pub fn combine_backward<T: MoeElement>(
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
pub unsafe fn combine_backward_raw<T: MoeElement>(
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
    let (logits_ptr, _g0) = logits.device_ptr(stream);
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
            logits: dbuf(logits, logits_ptr),
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
    // SAFETY: plan_losses checked that logits holds tokens x experts elements and sized the
    // workspace from the same StatsPlan: one stats block per chunk of chunk_tokens (<= 256,
    // the kernel's shared arrays) tokens, writing chunks x experts and chunks partials; the
    // loss kernel (one block) reads those and perm's experts routed counts, and writes 2
    // values and experts means. All buffers are on this context (checked above); the
    // outputs are distinct allocations (&mut); the second launch runs after the first in
    // stream order. Guards live until the end.
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
    check_owned(dev, &ids.data, "ids")?;
    check_owned(dev, d_logits, "d_logits")?;
    if let Some(d) = d_weights {
        check_owned(dev, d, "d_weights")?;
    }
    if let Some(perm) = balance {
        check_balance(dev, cfg, tokens, perm)?;
    }
    let stream = dev.stream();
    let out_len = d_logits.len();
    let (logits_ptr, _g0) = logits.device_ptr(stream);
    let (ids_ptr, _g1) = ids.data.device_ptr(stream);
    let dw_guard = d_weights.map(|d| (d.len(), d.device_ptr(stream)));
    let counts_guard = balance.map(|p| (p, p.routed_counts.device_ptr(stream)));
    let (out, _g2) = d_logits.device_ptr_mut(stream);
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
            logits: dbuf(logits, logits_ptr),
            ids: Buf {
                addr: ids_ptr,
                len: ids.data.len(),
            },
            d_weights: dw_guard.as_ref().map(|(len, g)| Buf {
                addr: g.0,
                len: *len,
            }),
            d_logits: Buf {
                addr: out,
                len: out_len,
            },
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
    // the tail returning. All buffers are on this context (checked above); d_logits is a
    // distinct buffer (&mut). Guards live until the end of this function.
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
    perm.check_filled(dev)?;
    check_owned(dev, &perm.routed_counts, "perm")?;
    check_owned(dev, bias, "bias")?;
    let stream = dev.stream();
    let bias_len = bias.len();
    let (counts, _g0) = perm.routed_counts.device_ptr(stream);
    let (b, _g1) = bias.device_ptr_mut(stream);
    let l = plan_bias_update(
        perm.plan.experts,
        dbuf(&perm.routed_counts, counts),
        Buf {
            addr: b,
            len: bias_len,
        },
        gamma,
    )?;
    // SAFETY: plan_bias_update checked that counts and bias hold `experts` elements each;
    // one block of the kernel's compiled size; bias is updated in place through a &mut
    // borrow and counts is another allocation, both on this context (checked above).
    // Guards live until the end of this function.
    unsafe { launch(dev, &l) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn buf(addr: u64, len: usize) -> Buf {
        Buf { addr, len }
    }

    /// Raw pointers reach the plans unchecked by cudarc: a pointer that is not a multiple
    /// of its element is an alignment error before anything launches, and a misaligned
    /// 16-byte row start only turns the vector path off.
    #[test]
    fn plans_check_each_pointer_against_its_element() {
        let p = PermutePlan::new(4, 2, 4, PermuteOptions::default()).unwrap();
        let hidden = 8;
        let gather = |x: u64, scale: Option<u64>, out: u64| {
            plan_gather::<f32>(
                &p,
                hidden,
                &GatherBufs {
                    x: buf(x, p.tokens * hidden),
                    scale: scale.map(|s| buf(s, p.assignments)),
                    slot_assignment: buf(0x1000, p.max_slots),
                    offsets: buf(0x2000, p.experts + 1),
                    out: buf(out, p.max_slots * hidden),
                },
            )
        };
        assert_eq!(gather(0x10000, None, 0x20000).unwrap().params.vec, 1);
        assert_eq!(gather(0x10004, None, 0x20000).unwrap().params.vec, 0);
        for (x, scale, out, arg) in [
            (0x10002, None, 0x20000, "x"),
            (0x10000, Some(0x30001), 0x20000, "scale"),
            (0x10000, None, 0x20003, "out"),
        ] {
            match gather(x, scale, out) {
                Err(e @ Error::InvalidArgument { arg: a, .. }) => {
                    assert_eq!(e.kind(), ErrorKind::Alignment, "{e}");
                    assert_eq!(a, arg);
                }
                other => panic!("{arg}: expected an alignment error, got {other:?}"),
            }
        }
        let cfg = RouterConfig::mixtral(8, 2);
        let route = |logits: u64| {
            plan_route::<half::bf16>(
                &cfg,
                4,
                false,
                &RouteBufs {
                    logits: buf(logits, 32),
                    bias: None,
                    ids: buf(0x1000, 8),
                    weights: buf(0x2000, 8),
                },
            )
        };
        assert!(route(0x10002).is_ok());
        assert_eq!(route(0x10001).unwrap_err().kind(), ErrorKind::Alignment);
        assert_eq!(
            raw_buf(RawBuffer { ptr: 0, len: 1 }, "x")
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
        assert!(raw_buf(RawBuffer { ptr: 0, len: 0 }, "x").is_ok());
    }
}
