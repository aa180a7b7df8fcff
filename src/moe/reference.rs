//! CPU reference for MoE routing, in f64, naive, written from the definitions:
//!
//! * routing: per token, probabilities (softmax or sigmoid), choice = probability + bias,
//!   group scores (max, or sum of the two largest choices), the best `topk_group` groups,
//!   then the best `top_k` experts among them by (choice desc, id asc); weights are the
//!   probabilities, renormalised (sum + 1e-20) and scaled. Without a bias and without top-2
//!   group sums the ranking compares logits, which is the same order as the probabilities
//!   in exact arithmetic (both scorings are strictly increasing), kept exact here even
//!   where f64 probabilities would round to equal values.
//! * permutation: a stable sort of the assignments by expert, truncation to the capacity,
//!   padding to block multiples.
//! * gather / combine and their gradients, the load-balancing and z losses, and the
//!   router's backward through explicit Jacobians (not the kernels' simplified forms).

use super::plan::{aux_grad_scale, z_grad_scale, PermutePlan, MAX_BLOCK};
use super::{GroupScore, LossOptions, PermutationTables, RouterConfig, Scoring};
use crate::error::{Error, Result};

const OP: &str = "moe reference";

/// Routing decisions of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingF64 {
    /// [tokens, top_k] chosen experts, descending choice score, ties to the lower id.
    pub ids: Vec<i32>,
    /// [tokens, top_k] their weights.
    pub weights: Vec<f64>,
}

fn check_len(arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            OP,
            arg,
            format!("length {got}, expected {want}"),
        ));
    }
    Ok(())
}

/// `a x b`, or an error naming `arg` when it overflows usize.
fn product(arg: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::overflow(OP, arg, format!("{a} x {b} overflows usize")))
}

/// Checks that `len` is `rows x cols`, with the product checked.
fn check_shape(arg: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    check_len(arg, len, product(arg, rows, cols)?)
}

/// Routing probabilities of one token's logits (any length; an empty slice gives an empty
/// vector).
pub fn probabilities(scoring: Scoring, z: &[f64]) -> Vec<f64> {
    match scoring {
        Scoring::Softmax => {
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|&x| x / s).collect()
        }
        Scoring::Sigmoid => z.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
    }
}

/// Balance probabilities q (the P_i of the load-balancing loss): softmax, or sigmoids
/// normalised to sum 1.
pub fn balance_probabilities(scoring: Scoring, z: &[f64]) -> Vec<f64> {
    let p = probabilities(scoring, z);
    match scoring {
        Scoring::Softmax => p,
        Scoring::Sigmoid => {
            let s: f64 = p.iter().sum();
            p.iter().map(|&x| x / s).collect()
        }
    }
}

fn logsumexp(z: &[f64]) -> f64 {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// The values one token's experts are ranked by, NaN ranked as -inf: the logits when there
/// is no bias and no top-2 group sum (the same order as the probabilities), else
/// probability + bias.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors, and [`Error::InvalidArgument`] when `z` (`logits`)
/// or `bias` does not have one entry per expert.
pub fn choice_scores(cfg: &RouterConfig, z: &[f64], bias: Option<&[f64]>) -> Result<Vec<f64>> {
    cfg.validate()?;
    check_len("logits", z.len(), cfg.experts)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), cfg.experts)?;
    }
    Ok(choice_scores_of(cfg, z, bias))
}

/// [`choice_scores`] of a validated config, `z` and `bias` of `cfg.experts` entries.
fn choice_scores_of(cfg: &RouterConfig, z: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let top2 = matches!(
        cfg.effective_grouping().map(|g| g.score),
        Some(GroupScore::Top2Sum)
    );
    let c: Vec<f64> = if bias.is_none() && !top2 {
        z.to_vec()
    } else {
        let p = probabilities(cfg.scoring, z);
        p.iter()
            .enumerate()
            .map(|(e, &x)| x + bias.and_then(|b| b.get(e)).copied().unwrap_or(0.0))
            .collect()
    };
    c.into_iter()
        .map(|x| if x.is_nan() { f64::NEG_INFINITY } else { x })
        .collect()
}

/// (value desc, id asc) order.
fn ranks_before(a: (f64, usize), b: (f64, usize)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

fn top_indices(values: &[f64], eligible: &[bool], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len())
        .filter(|&i| eligible.get(i).copied().unwrap_or(false))
        .collect();
    idx.sort_by(|&a, &b| {
        if ranks_before((values[a], a), (values[b], b)) {
            std::cmp::Ordering::Less
        } else if ranks_before((values[b], b), (values[a], a)) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    idx.truncate(k);
    idx
}

/// Group scores of one token (max, or sum of the two largest choices of each group); empty
/// without group limiting.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors, and [`Error::InvalidArgument`] when `choice` does
/// not have one entry per expert.
pub fn group_scores(cfg: &RouterConfig, choice: &[f64]) -> Result<Vec<f64>> {
    cfg.validate()?;
    check_len("choice", choice.len(), cfg.experts)?;
    Ok(group_scores_of(cfg, choice))
}

/// [`group_scores`] of a validated config and a `choice` of `cfg.experts` entries.
fn group_scores_of(cfg: &RouterConfig, choice: &[f64]) -> Vec<f64> {
    let Some(g) = cfg.effective_grouping() else {
        return vec![];
    };
    let size = cfg.experts / g.n_group;
    choice
        .chunks(size.max(1))
        .take(g.n_group)
        .map(|group| {
            let mut v: Vec<f64> = group.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            let first = v.first().copied().unwrap_or(f64::NEG_INFINITY);
            let s = match g.score {
                GroupScore::Max => first,
                GroupScore::Top2Sum => first + v.get(1).copied().unwrap_or(f64::NEG_INFINITY),
            };
            if s.is_nan() {
                f64::NEG_INFINITY
            } else {
                s
            }
        })
        .collect()
}

/// Experts eligible for one token after group limiting.
///
/// # Errors
/// As [`group_scores`].
pub fn eligible(cfg: &RouterConfig, choice: &[f64]) -> Result<Vec<bool>> {
    cfg.validate()?;
    check_len("choice", choice.len(), cfg.experts)?;
    Ok(eligible_of(cfg, choice))
}

/// [`eligible`] of a validated config and a `choice` of `cfg.experts` entries.
fn eligible_of(cfg: &RouterConfig, choice: &[f64]) -> Vec<bool> {
    let Some(g) = cfg.effective_grouping() else {
        return vec![true; cfg.experts];
    };
    let size = cfg.experts / g.n_group;
    let gs = group_scores_of(cfg, choice);
    let kept = top_indices(&gs, &vec![true; gs.len()], g.topk_group);
    let mut el = vec![false; cfg.experts];
    for gi in kept {
        for e in el.iter_mut().skip(gi * size).take(size) {
            *e = true;
        }
    }
    el
}

/// Routes `tokens` rows of `logits` ([tokens, experts], row-major). `bias` is the per-expert
/// correction added to the choice only.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors, and [`Error::InvalidArgument`] for a logits or bias
/// length that does not match (or a tokens x experts product that overflows usize).
pub fn route_f64(
    cfg: &RouterConfig,
    logits: &[f64],
    tokens: usize,
    bias: Option<&[f64]>,
) -> Result<RoutingF64> {
    cfg.validate()?;
    check_shape("logits", logits.len(), tokens, cfg.experts)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), cfg.experts)?;
    }
    let k = cfg.top_k;
    // top_k <= experts after validation, so tokens x top_k <= logits.len().
    let n = product("logits", tokens, k)?;
    let mut ids = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    for z in logits.chunks(cfg.experts.max(1)).take(tokens) {
        let p = probabilities(cfg.scoring, z);
        let choice = choice_scores_of(cfg, z, bias);
        let el = eligible_of(cfg, &choice);
        let chosen = top_indices(&choice, &el, k);
        let sum: f64 = chosen.iter().map(|&e| p[e]).sum();
        let scale = if cfg.renormalize {
            cfg.routed_scaling_factor / (sum + 1e-20)
        } else {
            cfg.routed_scaling_factor
        };
        for &e in &chosen {
            ids.push(e as i32);
            weights.push(p[e] * scale);
        }
    }
    Ok(RoutingF64 { ids, weights })
}

fn check_ids(ids: &[i32], tokens: usize, top_k: usize, experts: usize) -> Result<()> {
    super::plan::validate_ids(OP, ids, tokens, top_k, experts)
}

/// Sorts the assignments a = token x top_k + rank by expert, stable in a, keeps each
/// expert's first `capacity` and pads its segment to a multiple of `block`. Sizes come from
/// [`PermutePlan`], so `slot_assignment` and `block_expert` have the GPU buffers' lengths.
///
/// # Errors
/// [`PermutePlan::new`]'s errors; [`Error::InvalidArgument`] when `ids` has the wrong
/// length, an id out of range, or an expert twice in one token.
pub fn permute_f64(
    ids: &[i32],
    tokens: usize,
    top_k: usize,
    experts: usize,
    opts: super::PermuteOptions,
) -> Result<PermutationTables> {
    let plan = PermutePlan::new(tokens, top_k, experts, opts)?;
    check_ids(ids, tokens, top_k, experts)?;
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for (a, &e) in ids.iter().enumerate() {
        by_expert[e as usize].push(a);
    }
    let cap = plan.capacity.unwrap_or(usize::MAX);
    let b = plan.block;
    let mut out = PermutationTables {
        routed_counts: vec![0; experts],
        counts: vec![0; experts],
        offsets: vec![0; experts + 1],
        slot_of: vec![-1; plan.assignments],
        slot_assignment: vec![-1; plan.max_slots],
        block_expert: vec![-1; plan.max_blocks],
        dropped: 0,
    };
    let mut start = 0usize;
    for (e, list) in by_expert.iter().enumerate() {
        let kept = list.len().min(cap);
        out.routed_counts[e] = list.len() as i32;
        out.counts[e] = kept as i32;
        out.dropped += list.len() - kept;
        out.offsets[e] = start as i32;
        for (r, &a) in list.iter().take(kept).enumerate() {
            out.slot_of[a] = (start + r) as i32;
            out.slot_assignment[start + r] = a as i32;
        }
        let len = kept.div_ceil(b) * b;
        for blk in start / b..(start + len) / b {
            out.block_expert[blk] = e as i32;
        }
        start += len;
    }
    out.offsets[experts] = start as i32;
    Ok(out)
}

/// Checks hand-made (or foreign) permutation tables for what gather and combine index with,
/// and returns the token count `slot_of.len() / top_k`: `top_k >= 1`; `slot_of` a whole
/// number of tokens; every `slot_of` entry -1 or a slot of `slot_assignment`, every
/// `slot_assignment` entry -1 or an assignment of `slot_of`; and `slot_assignment` of a size
/// a permutation of these assignments can have (at least one slot when there is an
/// assignment, at most assignments x [`MAX_BLOCK`]), which bounds every output by the inputs.
fn check_perm(p: &PermutationTables, top_k: usize) -> Result<usize> {
    if top_k == 0 {
        return Err(Error::invalid(OP, "top_k", "top_k 0; need at least 1"));
    }
    let (assignments, slots) = (p.slot_of.len(), p.slot_assignment.len());
    if assignments % top_k != 0 {
        return Err(Error::invalid(
            OP,
            "perm",
            format!("slot_of has {assignments} entries, not a multiple of top_k {top_k}"),
        ));
    }
    if (assignments > 0 && slots == 0) || slots > assignments.saturating_mul(MAX_BLOCK) {
        return Err(Error::invalid(
            OP,
            "perm",
            format!(
                "slot_assignment has {slots} slots; a permutation of {assignments} assignments \
                 has between 1 and assignments x {MAX_BLOCK} (none for no assignment)"
            ),
        ));
    }
    let in_range = |x: i32, n: usize| x == -1 || usize::try_from(x).is_ok_and(|x| x < n);
    if let Some((a, &s)) = p
        .slot_of
        .iter()
        .enumerate()
        .find(|&(_, &s)| !in_range(s, slots))
    {
        return Err(Error::invalid(
            OP,
            "perm",
            format!("slot_of[{a}] = {s} is neither -1 nor a slot below {slots}"),
        ));
    }
    if let Some((s, &a)) = p
        .slot_assignment
        .iter()
        .enumerate()
        .find(|&(_, &a)| !in_range(a, assignments))
    {
        return Err(Error::invalid(
            OP,
            "perm",
            format!(
                "slot_assignment[{s}] = {a} is neither -1 nor an assignment below {assignments}"
            ),
        ));
    }
    Ok(assignments / top_k)
}

/// Hidden states [tokens, hidden] into expert order [slots, hidden]: row s is
/// scale\[a\] x x\[a / top_k\] for the assignment a in slot s (scale 1 when `None`), zeros for
/// padding.
///
/// # Errors
/// [`Error::InvalidArgument`] on length mismatches (or products that overflow usize), a
/// `top_k` of 0, or tables that fail the checks of a permutation (`perm`: entries out of
/// range, a slot count no permutation of these assignments has).
pub fn gather_f64(
    x: &[f64],
    hidden: usize,
    top_k: usize,
    perm: &PermutationTables,
    scale: Option<&[f64]>,
) -> Result<Vec<f64>> {
    let tokens = check_perm(perm, top_k)?;
    check_shape("x", x.len(), tokens, hidden)?;
    if let Some(s) = scale {
        check_len("scale", s.len(), perm.slot_of.len())?;
    }
    let mut out = vec![0.0; product("perm", perm.slot_assignment.len(), hidden)?];
    for (s, &a) in perm.slot_assignment.iter().enumerate() {
        let Ok(a) = usize::try_from(a) else {
            continue;
        };
        let t = a / top_k;
        let w = scale.map_or(1.0, |sc| sc[a]);
        for c in 0..hidden {
            out[s * hidden + c] = w * x[t * hidden + c];
        }
    }
    Ok(out)
}

/// out\[t\] = sum_j w\[t, j\] x expert_out\[slot_of\[t, j\]\] over kept assignments (w = 1 when
/// `None`): the combine, and with `None` the gather's gradient.
///
/// # Errors
/// As [`gather_f64`].
pub fn combine_f64(
    expert_out: &[f64],
    hidden: usize,
    top_k: usize,
    perm: &PermutationTables,
    weights: Option<&[f64]>,
) -> Result<Vec<f64>> {
    let tokens = check_perm(perm, top_k)?;
    check_shape(
        "expert_out",
        expert_out.len(),
        perm.slot_assignment.len(),
        hidden,
    )?;
    if let Some(w) = weights {
        check_len("weights", w.len(), perm.slot_of.len())?;
    }
    // At least one slot when there is a token, so hidden <= expert_out.len() then.
    let mut out = vec![0.0; product("expert_out", tokens, hidden)?];
    for (a, &s) in perm.slot_of.iter().enumerate() {
        let Ok(s) = usize::try_from(s) else {
            continue;
        };
        let t = a / top_k;
        let w = weights.map_or(1.0, |w| w[a]);
        for c in 0..hidden {
            out[t * hidden + c] += w * expert_out[s * hidden + c];
        }
    }
    Ok(out)
}

/// Gradient of the combine: (d expert_out, d weights). d expert_out\[slot\] = w\[a\] x
/// d_out\[a / top_k\] (zeros in padding), d w\[a\] = <d_out\[a / top_k\], expert_out\[slot_of\[a\]\]>
/// (0 when dropped).
///
/// # Errors
/// As [`gather_f64`].
pub fn combine_backward_f64(
    d_out: &[f64],
    expert_out: &[f64],
    hidden: usize,
    top_k: usize,
    perm: &PermutationTables,
    weights: &[f64],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let tokens = check_perm(perm, top_k)?;
    check_shape("d_out", d_out.len(), tokens, hidden)?;
    check_shape(
        "expert_out",
        expert_out.len(),
        perm.slot_assignment.len(),
        hidden,
    )?;
    check_len("weights", weights.len(), perm.slot_of.len())?;
    let d_expert = gather_f64(d_out, hidden, top_k, perm, Some(weights))?;
    let d_w = perm
        .slot_of
        .iter()
        .enumerate()
        .map(|(a, &s)| {
            let Ok(s) = usize::try_from(s) else {
                return 0.0;
            };
            let t = a / top_k;
            (0..hidden)
                .map(|c| d_out[t * hidden + c] * expert_out[s * hidden + c])
                .sum()
        })
        .collect();
    Ok((d_expert, d_w))
}

/// The router's losses: (alpha x E x sum_i f_i P_i, beta x mean_t lse_t^2, P) with f_i =
/// routed_counts\[i\] / (tokens x top_k) and P_i the mean balance probability.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors, and [`Error::InvalidArgument`] on length mismatches
/// or zero tokens.
pub fn router_losses_f64(
    cfg: &RouterConfig,
    logits: &[f64],
    tokens: usize,
    routed_counts: &[i32],
    opts: LossOptions,
) -> Result<(f64, f64, Vec<f64>)> {
    cfg.validate()?;
    check_shape("logits", logits.len(), tokens, cfg.experts)?;
    check_len("routed_counts", routed_counts.len(), cfg.experts)?;
    if tokens == 0 {
        return Err(Error::invalid(
            OP,
            "tokens",
            "losses need at least one token",
        ));
    }
    let e_n = cfg.experts;
    let mut mean = vec![0.0; e_n];
    let mut z2 = 0.0;
    for z in logits.chunks(e_n) {
        for (m, q) in mean.iter_mut().zip(balance_probabilities(cfg.scoring, z)) {
            *m += q / tokens as f64;
        }
        z2 += logsumexp(z).powi(2);
    }
    let a = tokens as f64 * cfg.top_k as f64;
    let aux = opts.aux_coef
        * e_n as f64
        * routed_counts
            .iter()
            .zip(&mean)
            .map(|(&c, &p)| f64::from(c) / a * p)
            .sum::<f64>();
    Ok((aux, opts.z_coef * z2 / tokens as f64, mean))
}

/// Jacobian dp_m / dz_e of one token's probabilities, row m.
fn prob_jacobian(scoring: Scoring, p: &[f64], m: usize, e: usize) -> f64 {
    match scoring {
        Scoring::Softmax => p[m] * (if m == e { 1.0 } else { 0.0 } - p[e]),
        Scoring::Sigmoid => {
            if m == e {
                p[m] * (1.0 - p[m])
            } else {
                0.0
            }
        }
    }
}

/// Gradient of the loss with respect to the logits [tokens, experts], given the gradient of
/// the routing weights (`d_weights`, may be `None`), the routed counts for the
/// load-balancing term (`None`: no such term) and the z-loss (`opts.z_coef`, 0 for none).
/// The chosen set is fixed (not differentiable); the bias gets no gradient.
///
/// # Errors
/// [`RouterConfig::validate`]'s errors, and [`Error::InvalidArgument`] on length mismatches
/// or ids out of range or repeated in a token.
#[allow(clippy::too_many_arguments)]
pub fn route_backward_f64(
    cfg: &RouterConfig,
    logits: &[f64],
    tokens: usize,
    ids: &[i32],
    d_weights: Option<&[f64]>,
    routed_counts: Option<&[i32]>,
    opts: LossOptions,
) -> Result<Vec<f64>> {
    cfg.validate()?;
    let e_n = cfg.experts;
    let k = cfg.top_k;
    check_shape("logits", logits.len(), tokens, e_n)?;
    check_ids(ids, tokens, k, e_n)?;
    if let Some(d) = d_weights {
        check_len("d_weights", d.len(), ids.len())?;
    }
    if let Some(c) = routed_counts {
        check_len("routed_counts", c.len(), e_n)?;
    }
    let aux_scale = aux_grad_scale(opts.aux_coef, e_n, tokens, k);
    let z_scale = z_grad_scale(opts.z_coef, tokens);
    let mut out = vec![0.0; tokens * e_n];
    for t in 0..tokens {
        let z = &logits[t * e_n..(t + 1) * e_n];
        let p = probabilities(cfg.scoring, z);
        let row = &mut out[t * e_n..(t + 1) * e_n];
        let chosen: Vec<usize> = ids[t * k..(t + 1) * k]
            .iter()
            .map(|&e| e as usize)
            .collect();
        if let Some(dw) = d_weights {
            let g = &dw[t * k..(t + 1) * k];
            // dL/dp_m for chosen m through w_j = c p_j / D (or c p_j).
            let d: f64 = chosen.iter().map(|&m| p[m]).sum::<f64>() + 1e-20;
            let c = cfg.routed_scaling_factor;
            let mut dp = vec![0.0; e_n];
            for (jm, &m) in chosen.iter().enumerate() {
                dp[m] = if cfg.renormalize {
                    chosen
                        .iter()
                        .enumerate()
                        .map(|(j, &pj)| {
                            let dwj_dpm =
                                c * ((if j == jm { 1.0 } else { 0.0 }) / d - p[pj] / (d * d));
                            g[j] * dwj_dpm
                        })
                        .sum()
                } else {
                    c * g[jm]
                };
            }
            for (e, r) in row.iter_mut().enumerate() {
                *r += chosen
                    .iter()
                    .map(|&m| dp[m] * prob_jacobian(cfg.scoring, &p, m, e))
                    .sum::<f64>();
            }
        }
        if let Some(counts) = routed_counts {
            // d/dz_e of sum_i c_i q_i.
            let q = balance_probabilities(cfg.scoring, z);
            let s_sum: f64 = p.iter().sum();
            for (e, r) in row.iter_mut().enumerate() {
                let mut acc = 0.0;
                for i in 0..e_n {
                    let dq = match cfg.scoring {
                        Scoring::Softmax => prob_jacobian(Scoring::Softmax, &p, i, e),
                        Scoring::Sigmoid => {
                            let ds = p[e] * (1.0 - p[e]);
                            ds * ((if i == e { 1.0 } else { 0.0 }) - q[i]) / s_sum
                        }
                    };
                    acc += f64::from(counts[i]) * dq;
                }
                *r += aux_scale * acc;
            }
        }
        if opts.z_coef != 0.0 {
            let lse = logsumexp(z);
            for (e, r) in row.iter_mut().enumerate() {
                *r += z_scale * lse * (z[e] - lse).exp();
            }
        }
    }
    Ok(out)
}

/// DeepSeek's bias step: bias_i + gamma x sign(mean load - load_i), sign(0) = 0.
///
/// # Errors
/// [`Error::InvalidArgument`] when the lengths differ.
pub fn update_bias_f64(bias: &[f64], routed_counts: &[i32], gamma: f64) -> Result<Vec<f64>> {
    check_len("bias", bias.len(), routed_counts.len())?;
    // i128 holds the sum of any slice of i32 and its product with the slice length exactly.
    let e_n = routed_counts.len() as i128;
    let total: i128 = routed_counts.iter().map(|&c| i128::from(c)).sum();
    Ok(bias
        .iter()
        .zip(routed_counts)
        .map(|(&b, &c)| {
            let d = total - e_n * i128::from(c);
            b + gamma * (d.signum() as f64)
        })
        .collect())
}
