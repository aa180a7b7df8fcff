//! The MoE routing ops on host buffers, through the emulator. Each takes the GPU op's
//! arguments with host slices in place of device buffers and runs the same validation and
//! launch planning (the `plan_*` functions of `crate::moe::cuda`), then the real kernels on
//! the CPU, in the GPU op's order.
//!
//! The GPU's device-side types become host ones: expert ids are plain `&[i32]` slices,
//! checked on every call with the validator [`ExpertIds`](crate::moe::ExpertIds) uses on
//! upload (length, range, no expert twice in a token), and [`HostPermutation`] holds what
//! [`Permutation`](crate::moe::Permutation) holds, written only by the emulated permutation
//! kernels.

use super::{run, Arch, HostBuf};
use crate::error::Result;
use crate::launch::KernelLaunch;
use crate::moe::cuda::{
    check_filled, losses_plan, plan_bias_update, plan_combine, plan_combine_backward, plan_gather,
    plan_losses, plan_permute, plan_route, plan_route_backward, Buf, CombineBackwardBufs,
    CombineBufs, GatherBufs, LossBufs, PermuteBufs, RouteBackwardBufs, RouteBufs,
};
use crate::moe::plan::validate_ids;
use crate::moe::{
    LossOptions, MoeElement, MoeHiddenElement, PermutationTables, PermuteOptions, PermutePlan,
    RouterConfig,
};

const OP: &str = "moe";
/// The MoE kernels have one code path for every architecture.
const ARCH: Arch = Arch::Sm80;

/// Runs `l` on the CPU unless its grid is empty (the CUDA path skips those too: a
/// permutation of no assignments has no chunks to count or scatter).
fn run_launch<P: Copy + 'static>(l: &KernelLaunch<P>, bufs: &[HostBuf]) -> Result<()> {
    if l.grid.0 == 0 || l.grid.1 == 0 || l.grid.2 == 0 {
        return Ok(());
    }
    run(OP, l, ARCH, bufs)
}

/// `b`'s address with `len` elements, for a plan.
fn buf(b: &HostBuf, len: usize) -> Buf {
    Buf {
        addr: b.addr(),
        len,
    }
}

#[allow(clippy::too_many_arguments)]
fn route_impl<T: MoeElement>(
    cfg: &RouterConfig,
    logits: &[T],
    tokens: usize,
    bias: Option<&[f32]>,
    ids: &mut [i32],
    weights: &mut [f32],
    force_block: bool,
) -> Result<()> {
    let (ids_len, w_len) = (ids.len(), weights.len());
    let mut bufs = vec![
        HostBuf::input(logits, c"logits"),
        HostBuf::output(ids, c"ids"),
        HostBuf::output(weights, c"weights"),
    ];
    let bias_buf = bias.map(|b| (HostBuf::input(b, c"bias"), b.len()));
    let l = plan_route::<T>(
        cfg,
        tokens,
        force_block,
        &RouteBufs {
            logits: buf(&bufs[0], logits.len()),
            bias: bias_buf.as_ref().map(|(b, len)| buf(b, *len)),
            ids: buf(&bufs[1], ids_len),
            weights: buf(&bufs[2], w_len),
        },
    )?;
    let Some(l) = l else {
        return Ok(());
    };
    if let Some((b, _)) = bias_buf {
        bufs.push(b);
    }
    run_launch(&l, &bufs)
}

/// [`crate::moe::route`] on the CPU: routes `tokens` tokens of `logits` \[tokens, experts\]
/// into `ids` and `weights` (\[tokens, top_k\] each), with `bias` as DeepSeek-V3's
/// correction bias (f32 \[experts\]). The warp or block kernel as the GPU op picks it.
///
/// # Errors
/// As the GPU op (`out` names `ids` or `weights` of the wrong length), plus
/// [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
pub fn route<T: MoeElement>(
    cfg: &RouterConfig,
    logits: &[T],
    tokens: usize,
    bias: Option<&[f32]>,
    ids: &mut [i32],
    weights: &mut [f32],
) -> Result<()> {
    route_impl(cfg, logits, tokens, bias, ids, weights, false)
}

/// [`crate::moe::route_block_kernel`] on the CPU: [`route`] on the one-block-per-token
/// kernel whatever the shape.
///
/// # Errors
/// As [`route`].
pub fn route_block_kernel<T: MoeElement>(
    cfg: &RouterConfig,
    logits: &[T],
    tokens: usize,
    bias: Option<&[f32]>,
    ids: &mut [i32],
    weights: &mut [f32],
) -> Result<()> {
    route_impl(cfg, logits, tokens, bias, ids, weights, true)
}

/// The host twin of [`crate::moe::Permutation`]: the tables of one permutation shape and the
/// kernels' workspace, filled by [`permute`] (nothing else writes them, so every slot in
/// them is in range, as on the GPU).
#[derive(Debug, Clone)]
pub struct HostPermutation {
    plan: PermutePlan,
    routed_counts: Vec<i32>,
    counts: Vec<i32>,
    offsets: Vec<i32>,
    slot_of: Vec<i32>,
    slot_assignment: Vec<i32>,
    block_expert: Vec<i32>,
    dropped: Vec<i32>,
    chunk_counts: Vec<i32>,
    filled: bool,
}

impl HostPermutation {
    /// Allocates the tables for `tokens` x `top_k` assignments over `experts`, as
    /// [`crate::moe::Permutation::new`].
    ///
    /// # Errors
    /// [`PermutePlan::new`]'s errors.
    pub fn new(tokens: usize, top_k: usize, experts: usize, opts: PermuteOptions) -> Result<Self> {
        let plan = PermutePlan::new(tokens, top_k, experts, opts)?;
        let chunk_counts = plan.chunks.checked_mul(experts).ok_or_else(|| {
            crate::Error::overflow(OP, "experts", "chunks x experts counters overflow usize")
        })?;
        Ok(HostPermutation {
            routed_counts: vec![0; experts],
            counts: vec![0; experts],
            offsets: vec![0; experts + 1],
            slot_of: vec![0; plan.assignments],
            slot_assignment: vec![0; plan.max_slots],
            block_expert: vec![0; plan.max_blocks],
            dropped: vec![0; 1],
            chunk_counts: vec![0; chunk_counts],
            plan,
            filled: false,
        })
    }

    /// The plan: sizes (max_slots is the row count of expert-ordered buffers), capacity,
    /// chunking.
    pub fn plan(&self) -> &PermutePlan {
        &self.plan
    }

    /// Whether [`permute`] has filled the tables.
    pub fn is_filled(&self) -> bool {
        self.filled
    }

    /// A copy of every table, as [`crate::moe::Permutation::download`] returns them.
    pub fn tables(&self) -> PermutationTables {
        PermutationTables {
            routed_counts: self.routed_counts.clone(),
            counts: self.counts.clone(),
            offsets: self.offsets.clone(),
            slot_of: self.slot_of.clone(),
            slot_assignment: self.slot_assignment.clone(),
            block_expert: self.block_expert.clone(),
            dropped: self
                .dropped
                .first()
                .and_then(|&d| usize::try_from(d).ok())
                .unwrap_or(0),
        }
    }

    /// \[experts\] assignments routed to each expert, before capacity.
    pub fn routed_counts(&self) -> &[i32] {
        &self.routed_counts
    }
}

/// [`crate::moe::permute`] on the CPU: sorts the assignments of `ids` (\[tokens, top_k\] of
/// `perm`'s shape) by expert into `perm`, with the count, scan and scatter kernels in order.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) naming `ids` when they are not
/// of `perm`'s shape, an id is outside 0..experts or an expert appears twice in a token (the
/// checks of [`crate::moe::ExpertIds::upload`]), plus
/// [`Error::Emulator`](crate::Error::Emulator) when a kernel misbehaves.
pub fn permute(ids: &[i32], perm: &mut HostPermutation) -> Result<()> {
    let p = perm.plan;
    validate_ids(OP, ids, p.tokens, p.top_k, p.experts)?;
    let HostPermutation {
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
    // A HostBuf records an address and a size, not a borrow: the plan gets every table's
    // address, and each launch exactly the buffers it may touch, read-only where it only
    // reads.
    let [count, scan, scatter] = plan_permute(
        &p,
        &PermuteBufs {
            ids: buf(&HostBuf::input(ids, c"ids"), ids.len()),
            chunk_counts: buf(&HostBuf::output(chunk_counts, c"chunk_counts"), lens[0]),
            routed_counts: buf(&HostBuf::output(routed_counts, c"routed_counts"), lens[1]),
            counts: buf(&HostBuf::output(counts, c"counts"), lens[2]),
            offsets: buf(&HostBuf::output(offsets, c"offsets"), lens[3]),
            slot_of: buf(&HostBuf::output(slot_of, c"slot_of"), lens[4]),
            slot_assignment: buf(
                &HostBuf::output(slot_assignment, c"slot_assignment"),
                lens[5],
            ),
            block_expert: buf(&HostBuf::output(block_expert, c"block_expert"), lens[6]),
            dropped: buf(&HostBuf::output(dropped, c"dropped"), lens[7]),
        },
    )?;
    run_launch(
        &count,
        &[
            HostBuf::input(ids, c"ids"),
            HostBuf::output(chunk_counts, c"chunk_counts"),
        ],
    )?;
    run_launch(
        &scan,
        &[
            HostBuf::output(chunk_counts, c"chunk_counts"),
            HostBuf::output(routed_counts, c"routed_counts"),
            HostBuf::output(counts, c"counts"),
            HostBuf::output(offsets, c"offsets"),
            HostBuf::output(slot_assignment, c"slot_assignment"),
            HostBuf::output(block_expert, c"block_expert"),
            HostBuf::output(dropped, c"dropped"),
        ],
    )?;
    run_launch(
        &scatter,
        &[
            HostBuf::input(ids, c"ids"),
            HostBuf::input(chunk_counts, c"chunk_counts"),
            HostBuf::input(offsets, c"offsets"),
            HostBuf::output(slot_of, c"slot_of"),
            HostBuf::output(slot_assignment, c"slot_assignment"),
        ],
    )?;
    perm.filled = true;
    Ok(())
}

/// The permutation's tables as a launch reads them, after checking it was computed.
fn filled(perm: &HostPermutation) -> Result<&HostPermutation> {
    check_filled(perm.filled)?;
    Ok(perm)
}

/// [`crate::moe::gather`] on the CPU: hidden states `x` \[tokens, hidden\] into expert order
/// `out` \[max_slots, hidden\], scaled by `scale` (f32 \[tokens x top_k\]) if given; rows past
/// the padded total are left untouched.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
pub fn gather<T: MoeHiddenElement>(
    perm: &HostPermutation,
    x: &[T],
    hidden: usize,
    scale: Option<&[f32]>,
    out: &mut [T],
) -> Result<()> {
    let perm = filled(perm)?;
    let out_len = out.len();
    let mut bufs = vec![
        HostBuf::input(x, c"x"),
        HostBuf::input(&perm.slot_assignment, c"slot_assignment"),
        HostBuf::input(&perm.offsets, c"offsets"),
        HostBuf::output(out, c"out"),
    ];
    let scale_buf = scale.map(|s| (HostBuf::input(s, c"scale"), s.len()));
    let l = plan_gather::<T>(
        &perm.plan,
        hidden,
        &GatherBufs {
            x: buf(&bufs[0], x.len()),
            scale: scale_buf.as_ref().map(|(b, len)| buf(b, *len)),
            slot_assignment: buf(&bufs[1], perm.slot_assignment.len()),
            offsets: buf(&bufs[2], perm.offsets.len()),
            out: buf(&bufs[3], out_len),
        },
    )?;
    if let Some((b, _)) = scale_buf {
        bufs.push(b);
    }
    run_launch(&l, &bufs)
}

fn combine_impl<T: MoeHiddenElement>(
    perm: &HostPermutation,
    expert_out: &[T],
    hidden: usize,
    weights: Option<&[f32]>,
    out: &mut [T],
    arg_in: &'static str,
) -> Result<()> {
    let perm = filled(perm)?;
    let out_len = out.len();
    let mut bufs = vec![
        HostBuf::input(expert_out, c"expert_out"),
        HostBuf::input(&perm.slot_of, c"slot_of"),
        HostBuf::output(out, c"out"),
    ];
    let w_buf = weights.map(|w| (HostBuf::input(w, c"weights"), w.len()));
    let l = plan_combine::<T>(
        &perm.plan,
        hidden,
        &CombineBufs {
            src: buf(&bufs[0], expert_out.len()),
            weights: w_buf.as_ref().map(|(b, len)| buf(b, *len)),
            slot_of: buf(&bufs[1], perm.slot_of.len()),
            out: buf(&bufs[2], out_len),
        },
        arg_in,
    )?;
    if let Some((b, _)) = w_buf {
        bufs.push(b);
    }
    run_launch(&l, &bufs)
}

/// [`crate::moe::combine`] on the CPU: back to token order, out\[t\] = sum_j weights\[t, j\]
/// x expert_out\[slot_of\[t, j\]\] over the kept assignments (weights default to 1).
///
/// # Errors
/// As [`gather`].
pub fn combine<T: MoeHiddenElement>(
    perm: &HostPermutation,
    expert_out: &[T],
    hidden: usize,
    weights: Option<&[f32]>,
    out: &mut [T],
) -> Result<()> {
    combine_impl(perm, expert_out, hidden, weights, out, "expert_out")
}

/// [`crate::moe::gather_backward`] on the CPU: d_x\[t\] = sum_j d_permuted\[slot_of\[t, j\]\].
///
/// # Errors
/// As [`gather`].
pub fn gather_backward<T: MoeHiddenElement>(
    perm: &HostPermutation,
    d_permuted: &[T],
    hidden: usize,
    d_x: &mut [T],
) -> Result<()> {
    combine_impl(perm, d_permuted, hidden, None, d_x, "d_permuted")
}

/// [`crate::moe::combine_backward`] on the CPU: d_expert_out as the gather of `d_out` scaled
/// by `weights`, then d_weights\[a\] = <d_out\[a / top_k\], expert_out\[slot_of\[a\]\]>, two
/// launches in that order.
///
/// # Errors
/// As [`gather`].
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: MoeHiddenElement>(
    perm: &HostPermutation,
    d_out: &[T],
    expert_out: &[T],
    hidden: usize,
    weights: &[f32],
    d_expert_out: &mut [T],
    d_weights: &mut [f32],
) -> Result<()> {
    let perm = filled(perm)?;
    let (deo_len, dw_len) = (d_expert_out.len(), d_weights.len());
    let g = HostBuf::input(d_out, c"d_out");
    let x = HostBuf::input(expert_out, c"expert_out");
    let w = HostBuf::input(weights, c"weights");
    let sa = HostBuf::input(&perm.slot_assignment, c"slot_assignment");
    let off = HostBuf::input(&perm.offsets, c"offsets");
    let so = HostBuf::input(&perm.slot_of, c"slot_of");
    let deo = HostBuf::output(d_expert_out, c"d_expert_out");
    let dw = HostBuf::output(d_weights, c"d_weights");
    let (gather_l, dw_l) = plan_combine_backward::<T>(
        &perm.plan,
        hidden,
        &CombineBackwardBufs {
            d_out: buf(&g, d_out.len()),
            expert_out: buf(&x, expert_out.len()),
            weights: buf(&w, weights.len()),
            slot_assignment: buf(&sa, perm.slot_assignment.len()),
            offsets: buf(&off, perm.offsets.len()),
            slot_of: buf(&so, perm.slot_of.len()),
            d_expert_out: buf(&deo, deo_len),
            d_weights: buf(&dw, dw_len),
        },
    )?;
    run_launch(&gather_l, &[g, w, sa, off, deo])?;
    run_launch(&dw_l, &[HostBuf::input(d_out, c"d_out"), x, so, dw])
}

/// What [`router_losses`] computes, as [`crate::moe::RouterLosses`] holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRouterLosses {
    /// alpha x the load-balancing loss.
    pub aux: f32,
    /// beta x the z-loss.
    pub z: f32,
    /// \[experts\]: P_i, the mean balance probability of each expert.
    pub mean_probs: Vec<f32>,
}

/// [`crate::moe::router_losses`] on the CPU: the load-balancing loss (f_i from `perm`'s
/// routed counts) and the z-loss of `logits` \[tokens, experts\], the statistics and loss
/// kernels in order (their workspace sized as [`crate::moe::RouterLosses::new`] sizes it).
///
/// # Errors
/// As the GPU op and [`crate::moe::RouterLosses::new`] (0 tokens), plus
/// [`Error::Emulator`](crate::Error::Emulator) when a kernel misbehaves.
pub fn router_losses<T: MoeElement>(
    cfg: &RouterConfig,
    logits: &[T],
    tokens: usize,
    perm: &HostPermutation,
    opts: LossOptions,
) -> Result<HostRouterLosses> {
    let plan = losses_plan(cfg, tokens)?;
    let perm = filled(perm)?;
    // Shapes first, so a bad token count allocates nothing.
    if perm.plan.tokens != tokens {
        return Err(crate::Error::invalid(
            OP,
            "perm",
            format!(
                "a permutation of {} tokens, the call has {tokens}",
                perm.plan.tokens
            ),
        ));
    }
    let want_logits = tokens
        .checked_mul(cfg.experts)
        .ok_or_else(|| crate::Error::overflow(OP, "tokens", "tokens x experts overflows usize"))?;
    if logits.len() < want_logits {
        return Err(crate::Error::invalid(
            OP,
            "logits",
            format!(
                "{} values, expected {tokens} x {}",
                logits.len(),
                cfg.experts
            ),
        ));
    }
    let workspace = plan.chunks.checked_mul(cfg.experts).ok_or_else(|| {
        crate::Error::overflow(OP, "tokens", "chunks x experts partials overflow usize")
    })?;
    let mut partial_probs = vec![0f32; workspace];
    let mut partial_lse2 = vec![0f32; plan.chunks];
    let mut values = vec![0f32; 2];
    let mut mean_probs = vec![0f32; cfg.experts];
    let lens = [
        partial_probs.len(),
        partial_lse2.len(),
        values.len(),
        mean_probs.len(),
    ];
    let z = HostBuf::input(logits, c"logits");
    let counts = HostBuf::input(&perm.routed_counts, c"routed_counts");
    let (stats, loss) = plan_losses::<T>(
        cfg,
        tokens,
        &perm.plan,
        opts,
        &LossBufs {
            logits: buf(&z, logits.len()),
            routed_counts: buf(&counts, perm.routed_counts.len()),
            partial_probs: buf(
                &HostBuf::output(&mut partial_probs, c"partial_probs"),
                lens[0],
            ),
            partial_lse2: buf(
                &HostBuf::output(&mut partial_lse2, c"partial_lse2"),
                lens[1],
            ),
            values: buf(&HostBuf::output(&mut values, c"values"), lens[2]),
            mean_probs: buf(&HostBuf::output(&mut mean_probs, c"mean_probs"), lens[3]),
        },
    )?;
    run_launch(
        &stats,
        &[
            z,
            HostBuf::output(&mut partial_probs, c"partial_probs"),
            HostBuf::output(&mut partial_lse2, c"partial_lse2"),
        ],
    )?;
    run_launch(
        &loss,
        &[
            HostBuf::input(&partial_probs, c"partial_probs"),
            HostBuf::input(&partial_lse2, c"partial_lse2"),
            counts,
            HostBuf::output(&mut values, c"values"),
            HostBuf::output(&mut mean_probs, c"mean_probs"),
        ],
    )?;
    Ok(HostRouterLosses {
        aux: values.first().copied().unwrap_or(0.0),
        z: values.get(1).copied().unwrap_or(0.0),
        mean_probs,
    })
}

/// [`crate::moe::route_backward`] on the CPU: the gradient with respect to the logits (f32
/// \[tokens, experts\] into `d_logits`) of the routing weights given `d_weights`, of the
/// load-balancing loss when `balance` gives the routed counts, and of the z-loss. `ids`
/// (\[tokens, top_k\]) are the forward's choices.
///
/// # Errors
/// As the GPU op; `ids` is checked as [`crate::moe::ExpertIds::upload`] checks it (each id
/// in 0..experts, none twice in a token); plus [`Error::Emulator`](crate::Error::Emulator)
/// when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn route_backward<T: MoeElement>(
    cfg: &RouterConfig,
    logits: &[T],
    tokens: usize,
    ids: &[i32],
    d_weights: Option<&[f32]>,
    balance: Option<&HostPermutation>,
    opts: LossOptions,
    d_logits: &mut [f32],
) -> Result<()> {
    let balance = balance.map(filled).transpose()?;
    let out_len = d_logits.len();
    let mut bufs = vec![
        HostBuf::input(logits, c"logits"),
        HostBuf::input(ids, c"ids"),
        HostBuf::output(d_logits, c"d_logits"),
    ];
    let dw_buf = d_weights.map(|d| (HostBuf::input(d, c"d_weights"), d.len()));
    let counts_buf = balance.map(|p| (p, HostBuf::input(&p.routed_counts, c"routed_counts")));
    let l = plan_route_backward::<T>(
        cfg,
        tokens,
        counts_buf
            .as_ref()
            .map(|(p, b)| (&p.plan, buf(b, p.routed_counts.len()))),
        opts,
        &RouteBackwardBufs {
            logits: buf(&bufs[0], logits.len()),
            ids: buf(&bufs[1], ids.len()),
            d_weights: dw_buf.as_ref().map(|(b, len)| buf(b, *len)),
            d_logits: buf(&bufs[2], out_len),
        },
    )?;
    // The kernel indexes rows by the ids: they must be what ExpertIds guarantees.
    validate_ids(OP, ids, tokens, cfg.top_k, cfg.experts)?;
    let Some(l) = l else {
        return Ok(());
    };
    bufs.extend(dw_buf.map(|(b, _)| b));
    bufs.extend(counts_buf.map(|(_, b)| b));
    run_launch(&l, &bufs)
}

/// [`crate::moe::update_bias`] on the CPU: bias_i += gamma x sign(mean load - load_i) in
/// place on `bias` (f32 \[experts\]), loads being `perm`'s routed counts.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
pub fn update_bias(perm: &HostPermutation, gamma: f64, bias: &mut [f32]) -> Result<()> {
    let perm = filled(perm)?;
    let bias_len = bias.len();
    let counts = HostBuf::input(&perm.routed_counts, c"routed_counts");
    let b = HostBuf::output(bias, c"bias");
    let l = plan_bias_update(
        perm.plan.experts,
        buf(&counts, perm.routed_counts.len()),
        buf(&b, bias_len),
        gamma,
    )?;
    run_launch(&l, &[counts, b])
}
