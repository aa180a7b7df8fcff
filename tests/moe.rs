//! MoE routing: configs from real models, invariants of the f64 reference, HF-style routers
//! written here from the model code's steps, finite-difference gradients, a step-by-step
//! host emulation of the permutation kernels, typed errors, and kernel-vs-reference parity
//! (proptest and fixed edge cases) on the GPU (ignored without one) and through the CPU
//! emulator, which runs the kernel sources themselves with race and bounds checkers.

mod common;

use common::Rng;
use longctx::moe::reference::{
    choice_scores, combine_backward_f64, combine_f64, gather_f64, group_scores, permute_f64,
    probabilities, route_backward_f64, route_f64, router_losses_f64, update_bias_f64,
};
use longctx::moe::{
    capacity, GroupScore, Grouping, LossOptions, PermutationTables, PermuteOptions, PermutePlan,
    RouterConfig, Scoring,
};
use longctx::Error;
use proptest::prelude::*;

// ---------------------------------------------------------------- input builders

/// Logits on a coarse grid (k/8 + 1/64, |k| <= 24): exact in bf16, full of exact ties, and
/// free of x / -x pairs whose sigmoids sum to exactly 1.
fn grid_logit(rng: &mut Rng) -> f64 {
    (rng.below(49) as f64 - 24.0) / 8.0 + 1.0 / 64.0
}

fn logits(rng: &mut Rng, n: usize, ties: bool) -> Vec<f64> {
    (0..n)
        .map(|_| {
            if ties {
                grid_logit(rng)
            } else {
                3.0 * rng.uniform()
            }
        })
        .collect()
}

/// Integer-valued biases: two experts' choices s + b can only be close when their biases are
/// equal (sigmoids differ by less than 1), so the f32 and f64 orders agree.
fn bias(rng: &mut Rng, experts: usize) -> Vec<f64> {
    (0..experts).map(|_| rng.below(4) as f64 - 1.0).collect()
}

/// Distinct ids per token, skewed toward low experts so some experts overflow a capacity.
fn random_ids(rng: &mut Rng, tokens: usize, top_k: usize, experts: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::with_capacity(top_k);
        if 2 * top_k > experts {
            let mut all: Vec<i32> = (0..experts as i32).collect();
            for i in 0..top_k {
                let j = i + rng.below((experts - i) as u64) as usize;
                all.swap(i, j);
            }
            row.extend_from_slice(&all[..top_k]);
        } else {
            while row.len() < top_k {
                let u = (rng.uniform() + 1.0) / 2.0;
                let e = ((u * u * experts as f64) as usize).min(experts - 1) as i32;
                if !row.contains(&e) {
                    row.push(e);
                }
            }
        }
        ids.extend(row);
    }
    ids
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

/// A random valid router over `experts`.
fn random_config(rng: &mut Rng, experts: usize, max_k: usize) -> RouterConfig {
    let scoring = if rng.below(2) == 0 {
        Scoring::Softmax
    } else {
        Scoring::Sigmoid
    };
    let grouping = if experts > 1 && rng.below(2) == 0 {
        let ds = divisors(experts);
        let n_group = ds[rng.below(ds.len() as u64) as usize];
        let score = if experts / n_group >= 2 && rng.below(2) == 0 {
            GroupScore::Top2Sum
        } else {
            GroupScore::Max
        };
        Some(Grouping {
            n_group,
            topk_group: 1 + rng.below(n_group as u64) as usize,
            score,
        })
    } else {
        None
    };
    let mut cfg = RouterConfig {
        experts,
        top_k: 1,
        scoring,
        grouping,
        renormalize: rng.below(2) == 0,
        routed_scaling_factor: [1.0, 2.5, 16.0, 0.75][rng.below(4) as usize],
    };
    let el = cfg.eligible_experts();
    cfg.top_k = 1 + rng.below(el.min(max_k) as u64) as usize;
    cfg
}

// ---------------------------------------------------------------- configs from models

fn parse(json: &str) -> RouterConfig {
    RouterConfig::from_hf_config(json).unwrap_or_else(|e| panic!("config should parse: {e}"))
}

#[test]
fn configs_of_released_models() {
    let mixtral = parse(
        r#"{"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
            "hidden_size": 4096, "router_aux_loss_coef": 0.02}"#,
    );
    assert_eq!(mixtral, RouterConfig::mixtral(8, 2));
    assert!(mixtral.renormalize);

    let qwen3 = parse(
        r#"{"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8,
            "norm_topk_prob": true, "hidden_size": 2048}"#,
    );
    assert_eq!(qwen3, RouterConfig::qwen_moe(128, 8, true));

    let qwen15 = parse(
        r#"{"model_type": "qwen2_moe", "num_experts": 60, "num_experts_per_tok": 4,
            "norm_topk_prob": false}"#,
    );
    assert_eq!(qwen15, RouterConfig::qwen_moe(60, 4, false));

    let v2 = parse(
        r#"{"model_type": "deepseek_v2", "n_routed_experts": 160, "num_experts_per_tok": 6,
            "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
            "routed_scaling_factor": 16.0, "norm_topk_prob": false, "scoring_func": "softmax"}"#,
    );
    assert_eq!(v2, RouterConfig::deepseek_v2(160, 6, 8, 3, 16.0));
    assert_eq!(v2.eligible_experts(), 60);

    let v2_lite = parse(
        r#"{"model_type": "deepseek_v2", "n_routed_experts": 64, "num_experts_per_tok": 6,
            "n_group": 1, "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0}"#,
    );
    assert_eq!(v2_lite.grouping, None);
    assert_eq!(v2_lite.experts, 64);

    let v3 = parse(
        r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
            "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "hidden_size": 7168}"#,
    );
    assert_eq!(v3, RouterConfig::deepseek_v3_default());
    assert_eq!(v3.eligible_experts(), 128);
}

#[test]
fn config_errors_name_the_key() {
    let key = |json: &str| match RouterConfig::from_hf_config(json) {
        Err(Error::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(key(r#"{"num_local_experts": 8}"#), "model_type");
    assert_eq!(key(r#"{"model_type": "llama"}"#), "model_type");
    assert_eq!(
        key(r#"{"model_type": "mixtral", "num_experts_per_tok": 2}"#),
        "num_local_experts"
    );
    assert_eq!(
        key(r#"{"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 9}"#),
        "num_experts_per_tok"
    );
    assert_eq!(
        key(
            r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                "n_group": 7, "topk_group": 4}"#
        ),
        "n_group"
    );
    assert_eq!(
        key(
            r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                "n_group": 8, "topk_group": 9}"#
        ),
        "topk_group"
    );
    assert_eq!(
        key(
            r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                "scoring_func": "softmax"}"#
        ),
        "scoring_func"
    );
    assert_eq!(
        key(r#"{"model_type": "qwen3_moe", "num_experts": "128", "num_experts_per_tok": 8}"#),
        "num_experts"
    );
}

#[track_caller]
fn invalid_arg(r: Result<impl std::fmt::Debug, Error>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    // top_k > experts, and > the experts left after group limiting.
    assert_eq!(invalid_arg(RouterConfig::mixtral(8, 9).validate()), "top_k");
    assert_eq!(invalid_arg(RouterConfig::mixtral(8, 0).validate()), "top_k");
    assert_eq!(
        invalid_arg(RouterConfig::deepseek_v3(256, 65, 8, 2, true, 2.5).validate()),
        "top_k"
    );
    // experts not divisible by n_group; topk_group > n_group; top-2 with 1 expert per group.
    assert_eq!(
        invalid_arg(RouterConfig::deepseek_v3(100, 8, 8, 4, true, 2.5).validate()),
        "n_group"
    );
    assert_eq!(
        invalid_arg(RouterConfig::deepseek_v3(256, 8, 8, 9, true, 2.5).validate()),
        "topk_group"
    );
    assert_eq!(
        invalid_arg(RouterConfig::deepseek_v3(8, 2, 8, 4, true, 2.5).validate()),
        "n_group"
    );
    assert_eq!(
        invalid_arg(RouterConfig::mixtral(0, 1).validate()),
        "experts"
    );
    assert_eq!(
        invalid_arg(RouterConfig::mixtral(4097, 1).validate()),
        "experts"
    );
    let mut nan_scale = RouterConfig::mixtral(8, 2);
    nan_scale.routed_scaling_factor = f64::NAN;
    assert_eq!(invalid_arg(nan_scale.validate()), "routed_scaling_factor");
    // Capacity factor <= 0 or not finite.
    for f in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(invalid_arg(capacity(f, 10, 2, 4)), "capacity_factor");
        let opts = PermuteOptions {
            block: 1,
            capacity_factor: Some(f),
        };
        assert_eq!(
            invalid_arg(PermutePlan::new(10, 2, 4, opts)),
            "capacity_factor"
        );
    }
    // ids out of range, duplicated in a token, wrong length.
    let opts = PermuteOptions::default();
    assert_eq!(invalid_arg(permute_f64(&[0, 4], 1, 2, 4, opts)), "ids");
    assert_eq!(invalid_arg(permute_f64(&[0, -1], 1, 2, 4, opts)), "ids");
    assert_eq!(invalid_arg(permute_f64(&[1, 1], 1, 2, 4, opts)), "ids");
    assert_eq!(invalid_arg(permute_f64(&[0, 1, 2], 1, 2, 4, opts)), "ids");
    // Mismatched lengths.
    let cfg = RouterConfig::mixtral(8, 2);
    assert_eq!(invalid_arg(route_f64(&cfg, &[0.0; 15], 2, None)), "logits");
    assert_eq!(
        invalid_arg(route_f64(&cfg, &[0.0; 16], 2, Some(&[0.0; 7]))),
        "bias"
    );
    let perm = permute_f64(&[0, 1, 2, 3], 2, 2, 8, opts).unwrap();
    assert_eq!(invalid_arg(gather_f64(&[0.0; 5], 3, 2, &perm, None)), "x");
    assert_eq!(
        invalid_arg(combine_f64(&[0.0; 5], 3, 2, &perm, None)),
        "expert_out"
    );
    assert_eq!(
        invalid_arg(router_losses_f64(
            &cfg,
            &[0.0; 16],
            2,
            &[1; 7],
            LossOptions {
                aux_coef: 1.0,
                z_coef: 1.0
            }
        )),
        "routed_counts"
    );
    assert_eq!(
        invalid_arg(update_bias_f64(&[0.0; 3], &[1; 4], 0.1)),
        "bias"
    );
}

#[test]
fn gate_plans_of_model_shapes() {
    use longctx::moe::{GatePath, GatePlan};
    let plan = |cfg: RouterConfig| GatePlan::new(&cfg, 4096, false).unwrap();
    // Tokens packed densely: DeepSeek-V3 16 lanes of 16 experts (2 tokens per warp), each
    // group of 32 on 2 lanes.
    let p = plan(RouterConfig::deepseek_v3_default());
    assert_eq!(
        (p.path, p.lanes, p.slots, p.group_lanes),
        (GatePath::Warp, 16, 16, 2)
    );
    assert_eq!(p.grid, 512);
    let p = plan(RouterConfig::deepseek_v2(160, 6, 8, 3, 16.0));
    assert_eq!(
        (p.path, p.lanes, p.slots, p.group_lanes),
        (GatePath::Warp, 16, 10, 2)
    );
    // Mixtral: 2 lanes per token (one per rank of the top-2), 16 tokens per warp, 64 per
    // block.
    let p = plan(RouterConfig::mixtral(8, 2));
    assert_eq!(
        (p.path, p.lanes, p.slots, p.group_lanes),
        (GatePath::Warp, 2, 4, 0)
    );
    assert_eq!(p.grid, 64);
    let p = plan(RouterConfig::qwen_moe(128, 8, true));
    assert_eq!((p.path, p.lanes, p.slots), (GatePath::Warp, 8, 16));
    let p = plan(RouterConfig::qwen_moe(60, 4, false));
    assert_eq!((p.path, p.lanes, p.slots), (GatePath::Warp, 4, 15));
    // A single expert: one lane per token, 32 tokens per warp.
    let p = plan(RouterConfig::mixtral(1, 1));
    assert_eq!((p.path, p.lanes, p.slots), (GatePath::Warp, 1, 1));
    // Groups decide the width: 72 experts in 3 groups of 24 do not fit 8 lanes (9 per lane)
    // or 16 (5), but do 32 (3 per lane, 8 lanes per group); 96 in 3 groups of 32 fit none.
    let p = plan(RouterConfig::deepseek_v2(72, 2, 3, 1, 1.0));
    assert_eq!(
        (p.path, p.lanes, p.slots, p.group_lanes),
        (GatePath::Warp, 32, 3, 8)
    );
    assert_eq!(
        plan(RouterConfig::deepseek_v2(96, 4, 3, 2, 1.0)).path,
        GatePath::Block
    );
    // The block kernel: more than 512 experts, top_k past the lanes, groups that do not
    // cover a power of two of whole lanes (60 experts in 5 groups of 12: 6 lanes of 2).
    assert_eq!(plan(RouterConfig::mixtral(513, 2)).path, GatePath::Block);
    assert_eq!(plan(RouterConfig::mixtral(64, 33)).path, GatePath::Block);
    assert_eq!(plan(RouterConfig::mixtral(16, 16)).path, GatePath::Warp);
    assert_eq!(
        plan(RouterConfig::deepseek_v2(60, 4, 5, 2, 1.0)).path,
        GatePath::Block
    );
    let forced = GatePlan::new(&RouterConfig::mixtral(8, 2), 4096, true).unwrap();
    assert_eq!((forced.path, forced.grid), (GatePath::Block, 4096));
}

#[test]
fn capacity_formula() {
    // ceil(1.0 * 4096 * 8 / 256) = 128; ceil(1.25 * 10 * 2 / 3) = ceil(8.33) = 9.
    assert_eq!(capacity(1.0, 4096, 8, 256).unwrap(), 128);
    assert_eq!(capacity(1.25, 10, 2, 3).unwrap(), 9);
    // Never more than all assignments.
    assert_eq!(capacity(100.0, 10, 2, 3).unwrap(), 20);
}

// ---------------------------------------------------------------- HF-style routers

/// Mixtral / Qwen as HF computes it: softmax in f64, top-k by probability (ties to the lower
/// id, as the reference promises), renormalise if asked.
fn hf_softmax_topk(z: &[f64], k: usize, norm: bool) -> (Vec<i32>, Vec<f64>) {
    let p = probabilities(Scoring::Softmax, z);
    let mut order: Vec<usize> = (0..z.len()).collect();
    // Probabilities rank like logits; compare logits so exact-math order is kept.
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
    let top: Vec<usize> = order[..k].to_vec();
    let s: f64 = top.iter().map(|&e| p[e]).sum();
    let w = top
        .iter()
        .map(|&e| if norm { p[e] / s } else { p[e] })
        .collect();
    (top.iter().map(|&e| e as i32).collect(), w)
}

/// DeepSeek-V3's TopkRouter steps: sigmoid, + bias for the choice, groups of E / n_group
/// scored by their top-2 sum, the best topk_group kept (others masked to -inf), top-k,
/// weights = unbiased sigmoid gathered, / (sum + 1e-20) if norm, x scale.
fn hf_deepseek_v3(
    z: &[f64],
    bias: &[f64],
    k: usize,
    n_group: usize,
    topk_group: usize,
    norm: bool,
    scale: f64,
) -> (Vec<i32>, Vec<f64>) {
    let e_n = z.len();
    let s: Vec<f64> = z.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
    let choice: Vec<f64> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
    let size = e_n / n_group;
    let mut gs: Vec<(f64, usize)> = (0..n_group)
        .map(|g| {
            let mut v = choice[g * size..(g + 1) * size].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            (v[0] + v[1], g)
        })
        .collect();
    gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let kept: Vec<usize> = gs[..topk_group].iter().map(|x| x.1).collect();
    let masked: Vec<f64> = (0..e_n)
        .map(|e| {
            if kept.contains(&(e / size)) {
                choice[e]
            } else {
                f64::NEG_INFINITY
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..e_n).collect();
    order.sort_by(|&a, &b| masked[b].total_cmp(&masked[a]).then(a.cmp(&b)));
    let top = &order[..k];
    let sum: f64 = top.iter().map(|&e| s[e]).sum::<f64>() + 1e-20;
    let w = top
        .iter()
        .map(|&e| {
            if norm {
                s[e] / sum * scale
            } else {
                s[e] * scale
            }
        })
        .collect();
    (top.iter().map(|&e| e as i32).collect(), w)
}

fn assert_weights_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "weight {i}: {g} vs {w}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn reference_matches_hf_mixtral_and_qwen(seed in any::<u64>(), ties in any::<bool>(),
        shape in prop::sample::select(vec![(8usize, 2usize), (128, 8), (60, 4), (3, 3)]), norm in any::<bool>()) {
        let (e, k) = shape;
        let mut rng = Rng(seed);
        let tokens = 9;
        let z = logits(&mut rng, tokens * e, ties);
        let cfg = RouterConfig::qwen_moe(e, k, norm);
        let r = route_f64(&cfg, &z, tokens, None).unwrap();
        for t in 0..tokens {
            let (ids, w) = hf_softmax_topk(&z[t * e..(t + 1) * e], k, norm);
            prop_assert_eq!(&r.ids[t * k..(t + 1) * k], &ids[..]);
            assert_weights_close(&r.weights[t * k..(t + 1) * k], &w, 1e-12);
        }
    }

    #[test]
    fn reference_matches_hf_deepseek_v3(seed in any::<u64>(), ties in any::<bool>(), norm in any::<bool>(),
        shape in prop::sample::select(vec![(256usize, 8usize, 8usize, 4usize), (64, 6, 8, 3), (16, 4, 4, 2), (12, 3, 3, 1)])) {
        let (e, k, ng, kg) = shape;
        let mut rng = Rng(seed);
        let tokens = 7;
        let z = logits(&mut rng, tokens * e, ties);
        let b: Vec<f64> = (0..e).map(|_| 0.25 * (rng.below(5) as f64)).collect();
        let cfg = RouterConfig::deepseek_v3(e, k, ng, kg, norm, 2.5);
        let r = route_f64(&cfg, &z, tokens, Some(&b)).unwrap();
        for t in 0..tokens {
            let (ids, w) = hf_deepseek_v3(&z[t * e..(t + 1) * e], &b, k, ng, kg, norm, 2.5);
            prop_assert_eq!(&r.ids[t * k..(t + 1) * k], &ids[..]);
            assert_weights_close(&r.weights[t * k..(t + 1) * k], &w, 1e-12);
        }
    }

    #[test]
    fn routing_invariants(seed in any::<u64>(), ties in any::<bool>(), use_bias in any::<bool>(),
        experts in prop::sample::select(vec![1usize, 2, 6, 8, 24, 60, 64, 160, 256])) {
        let mut rng = Rng(seed);
        let cfg = random_config(&mut rng, experts, 16);
        let tokens = 5;
        let z = logits(&mut rng, tokens * experts, ties);
        let b = bias(&mut rng, experts);
        let bias_arg = if use_bias { Some(&b[..]) } else { None };
        let r = route_f64(&cfg, &z, tokens, bias_arg).unwrap();
        let k = cfg.top_k;
        for t in 0..tokens {
            let zt = &z[t * experts..(t + 1) * experts];
            let ids = &r.ids[t * k..(t + 1) * k];
            let w = &r.weights[t * k..(t + 1) * k];
            let choice = choice_scores(&cfg, zt, bias_arg).unwrap();
            // In range, distinct, descending choice, ties to the lower id.
            for j in 0..k {
                prop_assert!(ids[j] >= 0 && (ids[j] as usize) < experts);
                prop_assert!(!ids[..j].contains(&ids[j]));
                if j > 0 {
                    let (a, b2) = (choice[ids[j - 1] as usize], choice[ids[j] as usize]);
                    prop_assert!(a > b2 || (a == b2 && ids[j - 1] < ids[j]), "order at rank {}", j);
                }
            }
            // Group limiting: chosen experts lie in at most topk_group groups, and every
            // eligible expert not chosen ranks below the last chosen one.
            if let Some(g) = cfg.grouping.filter(|g| g.n_group > 1) {
                let size = experts / g.n_group;
                let mut groups: Vec<i32> = ids.iter().map(|&e| e / size as i32).collect();
                groups.sort();
                groups.dedup();
                prop_assert!(groups.len() <= g.topk_group);
                let gs = group_scores(&cfg, &choice).unwrap();
                prop_assert_eq!(gs.len(), g.n_group);
            }
            let p = probabilities(cfg.scoring, zt);
            if cfg.renormalize {
                let s: f64 = w.iter().sum();
                prop_assert!((s - cfg.routed_scaling_factor).abs() <= 1e-12 * cfg.routed_scaling_factor, "sum {}", s);
            } else {
                for j in 0..k {
                    let want = p[ids[j] as usize] * cfg.routed_scaling_factor;
                    prop_assert!((w[j] - want).abs() <= 1e-15 * want.max(1.0));
                }
            }
        }
    }
}

#[test]
fn ties_go_to_the_lower_id() {
    // All logits equal: the first k experts in id order.
    let cfg = RouterConfig::mixtral(8, 3);
    let r = route_f64(&cfg, &[0.5; 8], 1, None).unwrap();
    assert_eq!(r.ids, vec![0, 1, 2]);
    assert!(r.weights.iter().all(|&w| (w - 1.0 / 3.0).abs() < 1e-15));
    // Equal groups: the lower group wins; then the lower ids within it.
    let cfg = RouterConfig::deepseek_v3(8, 2, 4, 1, true, 1.0);
    let z = [1.0, 1.0, 2.0, 0.0, 2.0, 0.0, 1.0, 1.0];
    // Group top-2 sums of sigmoids: g0 = g3 = 2 s(1) = 1.462 > g1 = g2 = s(2) + s(0) =
    // 1.381, so g0 and g3 tie and g0 (lower) is kept; experts 0 and 1 tie: id order.
    let r = route_f64(&cfg, &z, 1, None).unwrap();
    assert_eq!(r.ids, vec![0, 1]);
    // A bias moves the choice but not the weights.
    let b = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
    let r = route_f64(&cfg, &z, 1, Some(&b)).unwrap();
    assert_eq!(r.ids, vec![7, 6]);
    assert!((r.weights[0] - 0.5).abs() < 1e-15 && (r.weights[1] - 0.5).abs() < 1e-15);
}

// ---------------------------------------------------------------- warp kernel emulation

/// (value, id) rank order of the kernels' 64-bit keys: value desc (-0 equal to +0), id asc.
fn key_beats(a: Option<(f64, usize)>, b: Option<(f64, usize)>) -> bool {
    match (a, b) {
        (Some(_), None) => true,
        (Some((va, ia)), Some((vb, ib))) => va > vb || (va == vb && ia < ib),
        _ => false,
    }
}

/// xor butterfly over aligned segments of `width` lanes, as __shfl_xor_sync does.
fn butterfly<V: Copy>(vals: &mut [V], width: usize, op: impl Fn(V, V) -> V) {
    let mut off = width / 2;
    while off > 0 {
        let old = vals.to_vec();
        for (i, v) in vals.iter_mut().enumerate() {
            *v = op(old[i], old[i ^ off]);
        }
        off /= 2;
    }
}

/// Step-by-step host emulation of kernels/moe/gate_kernel.cuh's warp kernel for one token:
/// the plan's segment of `lanes` lanes holding `slots` consecutive experts each, group
/// scores as butterflies over `group_lanes` lanes, group and expert choice by segment-wide
/// key maxima, the owner lane retiring the winner. Values are the reference's (f64), so
/// this checks the layout and selection logic without a GPU.
fn emulate_warp_gate(cfg: &RouterConfig, z: &[f64], bias: Option<&[f64]>) -> Vec<i32> {
    use longctx::moe::{GatePath, GatePlan};
    let plan = GatePlan::new(cfg, 1, false).unwrap();
    assert_eq!(plan.path, GatePath::Warp);
    let (l, s, gl) = (plan.lanes, plan.slots, plan.group_lanes);
    let e_n = cfg.experts;
    let choice = choice_scores(cfg, z, bias).unwrap();
    let mut avail: Vec<Vec<bool>> = (0..l)
        .map(|sl| (0..s).map(|j| sl * s + j < e_n).collect())
        .collect();
    if gl != 0 {
        let g = cfg.grouping.unwrap();
        let mut top2: Vec<(f64, f64)> = (0..l)
            .map(|sl| {
                let (mut a1, mut a2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
                for j in 0..s {
                    if avail[sl][j] {
                        let v = choice[sl * s + j];
                        if v > a1 {
                            a2 = a1;
                            a1 = v;
                        } else if v > a2 {
                            a2 = v;
                        }
                    }
                }
                (a1, a2)
            })
            .collect();
        butterfly(&mut top2, gl, |(a1, a2), (b1, b2)| {
            (a1.max(b1), a1.min(b1).max(a2.max(b2)))
        });
        let mut gkey: Vec<Option<(f64, usize)>> = (0..l)
            .map(|sl| {
                let (a1, a2) = top2[sl];
                let gs = match g.score {
                    GroupScore::Top2Sum => a1 + a2,
                    GroupScore::Max => a1,
                };
                let gs = if gs.is_nan() { f64::NEG_INFINITY } else { gs };
                (sl / gl < g.n_group).then_some((gs, sl / gl))
            })
            .collect();
        let mut eligible = vec![false; l];
        for _ in 0..g.topk_group {
            let mut best = gkey.clone();
            butterfly(&mut best, l, |a, b| if key_beats(b, a) { b } else { a });
            for sl in 0..l {
                if let Some((_, gid)) = best[sl] {
                    if gid == sl / gl {
                        eligible[sl] = true;
                        gkey[sl] = None;
                    }
                }
            }
        }
        for sl in 0..l {
            if !eligible[sl] {
                avail[sl] = vec![false; s];
            }
        }
    }
    // Each rank as the kernel does it: the segment's best value (a max over lanes of each
    // lane's best available value), the lowest lane holding it, that lane's lowest slot
    // with it.
    let mut ids = Vec::new();
    for _ in 0..cfg.top_k {
        let lane_best: Vec<Option<f64>> = (0..l)
            .map(|sl| {
                (0..s)
                    .filter(|&j| avail[sl][j])
                    .map(|j| choice[sl * s + j])
                    .fold(None, |acc: Option<f64>, v| {
                        Some(acc.map_or(v, |a| a.max(v)))
                    })
            })
            .collect();
        let mut best = lane_best.clone();
        butterfly(&mut best, l, |a, b| if b > a { b } else { a });
        assert!(best.iter().all(|&b| b == best[0]), "lanes disagree");
        let top = best[0].expect("a live token always finds a candidate");
        let owner = (0..l)
            .find(|&sl| lane_best[sl] == Some(top))
            .expect("some lane holds the best value");
        let slot = (0..s)
            .find(|&j| avail[owner][j] && choice[owner * s + j] == top)
            .expect("the owner holds it");
        avail[owner][slot] = false;
        ids.push((owner * s + slot) as i32);
    }
    ids
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn warp_kernel_emulation_matches_reference(seed in any::<u64>(), ties in any::<bool>(), use_bias in any::<bool>(),
        experts in prop::sample::select(vec![1usize, 2, 3, 5, 6, 8, 12, 16, 24, 32, 33, 60, 64, 96, 100, 128, 160, 256, 257, 384, 500, 512])) {
        use longctx::moe::{GatePath, GatePlan};
        let mut rng = Rng(seed);
        let cfg = random_config(&mut rng, experts, 32);
        prop_assume!(GatePlan::new(&cfg, 1, false).unwrap().path == GatePath::Warp);
        let z = logits(&mut rng, experts, ties);
        let b = bias(&mut rng, experts);
        let bias_arg = if use_bias { Some(&b[..]) } else { None };
        let want = route_f64(&cfg, &z, 1, bias_arg).unwrap();
        prop_assert_eq!(emulate_warp_gate(&cfg, &z, bias_arg), want.ids, "{:?}", cfg);
    }
}

// ---------------------------------------------------------------- permutation

fn check_tables(
    p: &PermutationTables,
    ids: &[i32],
    tokens: usize,
    k: usize,
    experts: usize,
    plan: &PermutePlan,
) -> Result<(), TestCaseError> {
    let a_n = tokens * k;
    let kept: i32 = p.counts.iter().sum();
    let routed: i32 = p.routed_counts.iter().sum();
    prop_assert_eq!(routed as usize, a_n);
    prop_assert_eq!(kept as usize, a_n - p.dropped);
    let b = plan.block;
    prop_assert_eq!(p.offsets[0], 0);
    for e in 0..experts {
        let (lo, hi) = (p.offsets[e] as usize, p.offsets[e + 1] as usize);
        prop_assert_eq!(lo % b, 0);
        prop_assert_eq!((hi - lo) % b, 0);
        prop_assert!(hi - lo >= p.counts[e] as usize && hi - lo < p.counts[e] as usize + b);
        let seg = &p.slot_assignment[lo..hi];
        let n = p.counts[e] as usize;
        // Stable: the kept assignments in increasing order, then padding.
        for w in seg[..n].windows(2) {
            prop_assert!(w[0] < w[1]);
        }
        for &a in &seg[..n] {
            prop_assert_eq!(ids[a as usize], e as i32);
        }
        prop_assert!(seg[n..].iter().all(|&a| a == -1));
        if let Some(c) = plan.capacity {
            prop_assert_eq!(p.counts[e] as usize, (p.routed_counts[e] as usize).min(c));
        }
        for blk in lo / b..hi / b {
            prop_assert_eq!(p.block_expert[blk], e as i32);
        }
    }
    let total = p.offsets[experts] as usize;
    prop_assert!(total <= plan.max_slots);
    prop_assert!(p.slot_assignment[total..].iter().all(|&a| a == -1));
    prop_assert!(p.block_expert[total / b..].iter().all(|&e| e == -1));
    // slot_of and slot_assignment are inverse; dropped ones are later than every kept one.
    for (a, &s) in p.slot_of.iter().enumerate() {
        if s >= 0 {
            prop_assert_eq!(p.slot_assignment[s as usize], a as i32);
        } else {
            let e = ids[a] as usize;
            let seg = &p.slot_assignment[p.offsets[e] as usize..][..p.counts[e] as usize];
            prop_assert!(
                seg.iter().all(|&x| (x as usize) < a),
                "a dropped assignment precedes a kept one"
            );
        }
    }
    Ok(())
}

/// Step-by-step host emulation of kernels/moe/permute_kernel.cuh: per-chunk counts walked 32
/// lanes at a time with match-any groups, the in-place per-expert scan over chunks, the
/// scan over experts in thread runs, and the scatter with running counters. Checks the
/// kernels' algorithm (not just the reference's) without a GPU.
fn emulate_permute_kernels(ids: &[i32], plan: &PermutePlan) -> PermutationTables {
    let e_n = plan.experts;
    let a_n = plan.assignments;
    let cap = plan.capacity.unwrap_or(u32::MAX as usize);
    let b = plan.block;
    // Walk of one chunk: calls f(a, e, rank) per lane, updates run like the leader does.
    let walk = |c: usize, run: &mut Vec<i32>, f: &mut dyn FnMut(usize, usize, i32)| {
        let begin = c * plan.chunk;
        let end = (begin + plan.chunk).min(a_n);
        let mut base = begin;
        while base < end {
            let lanes: Vec<Option<usize>> = (0..32)
                .map(|l| (base + l < end).then(|| ids[base + l] as usize))
                .collect();
            let before: Vec<i32> = lanes.iter().map(|e| e.map_or(0, |e| run[e])).collect();
            for (l, e) in lanes.iter().enumerate() {
                if let Some(e) = *e {
                    let lower = lanes[..l].iter().filter(|x| **x == Some(e)).count() as i32;
                    let group = lanes.iter().filter(|x| **x == Some(e)).count() as i32;
                    f(base + l, e, before[l] + lower);
                    let leader = lanes.iter().position(|x| *x == Some(e)) == Some(l);
                    if leader {
                        run[e] = before[l] + group;
                    }
                }
            }
            base += 32;
        }
    };
    let mut cc = vec![0i32; plan.chunks * e_n];
    for c in 0..plan.chunks {
        let mut run = vec![0i32; e_n];
        walk(c, &mut run, &mut |_, _, _| {});
        cc[c * e_n..(c + 1) * e_n].copy_from_slice(&run);
    }
    let mut t = PermutationTables {
        routed_counts: vec![0; e_n],
        counts: vec![0; e_n],
        offsets: vec![0; e_n + 1],
        slot_of: vec![0; a_n],
        slot_assignment: vec![-7; plan.max_slots],
        block_expert: vec![-7; plan.max_blocks],
        dropped: 0,
    };
    let threads = 1024;
    // Threads per expert, as scan_threads_per_expert in the kernel.
    let mut tpe = 1;
    while tpe < 32 && 2 * tpe * e_n <= threads {
        tpe *= 2;
    }
    let mut start = 0i32;
    if tpe == 1 {
        let per = e_n.div_ceil(threads);
        let mut padded_per_thread = vec![0i32; threads];
        for (tid, padded) in padded_per_thread.iter_mut().enumerate() {
            for e in (per * tid).min(e_n)..(per * tid + per).min(e_n) {
                let mut run = 0;
                for c in 0..plan.chunks {
                    let v = cc[c * e_n + e];
                    cc[c * e_n + e] = run;
                    run += v;
                }
                let k = (run as usize).min(cap) as i32;
                t.routed_counts[e] = run;
                t.counts[e] = k;
                t.dropped += (run - k) as usize;
                *padded += (k as usize).div_ceil(b) as i32 * b as i32;
            }
        }
        for (tid, padded) in padded_per_thread.iter().enumerate() {
            let mut s = start;
            for e in (per * tid).min(e_n)..(per * tid + per).min(e_n) {
                let len = (t.counts[e] as usize).div_ceil(b) * b;
                t.offsets[e] = s;
                for x in s as usize + t.counts[e] as usize..s as usize + len {
                    t.slot_assignment[x] = -1;
                }
                for blk in s as usize / b..(s as usize + len) / b {
                    t.block_expert[blk] = e as i32;
                }
                s += len as i32;
            }
            start += padded;
        }
    } else {
        // tpe parts per expert, part q owning chunks [q cpp, q cpp + cpp) clipped; the parts'
        // sums prefixed in lane order; part 0 contributes the padded length to the block scan.
        let c_n = plan.chunks;
        let cpp = c_n.div_ceil(tpe);
        for e in 0..e_n {
            let parts: Vec<std::ops::Range<usize>> = (0..tpe)
                .map(|q| {
                    let c0 = (q * cpp).min(c_n);
                    c0..(c0 + cpp).min(c_n)
                })
                .collect();
            let local: Vec<i32> = parts
                .iter()
                .map(|r| r.clone().map(|c| cc[c * e_n + e]).sum())
                .collect();
            let run: i32 = local.iter().sum();
            let mut before = 0;
            for (q, r) in parts.iter().enumerate() {
                let mut rank = before;
                for c in r.clone() {
                    let v = cc[c * e_n + e];
                    cc[c * e_n + e] = rank;
                    rank += v;
                }
                before += local[q];
            }
            let k = (run as usize).min(cap) as i32;
            let len = (k as usize).div_ceil(b) * b;
            t.routed_counts[e] = run;
            t.counts[e] = k;
            t.dropped += (run - k) as usize;
            t.offsets[e] = start;
            for q in 0..tpe {
                for x in (start as usize + k as usize + q..start as usize + len).step_by(tpe) {
                    t.slot_assignment[x] = -1;
                }
                for blk in (start as usize / b + q..(start as usize + len) / b).step_by(tpe) {
                    t.block_expert[blk] = e as i32;
                }
            }
            start += len as i32;
        }
    }
    t.offsets[e_n] = start;
    for x in t.slot_assignment.iter_mut().skip(start as usize) {
        *x = -1;
    }
    for x in t.block_expert.iter_mut().skip(start as usize / b) {
        *x = -1;
    }
    for c in 0..plan.chunks {
        let mut run = cc[c * e_n..(c + 1) * e_n].to_vec();
        let offsets = t.offsets.clone();
        let (slot_of, slot_assignment) = (&mut t.slot_of, &mut t.slot_assignment);
        walk(c, &mut run, &mut |a, e, rank| {
            if (rank as usize) < cap {
                let slot = offsets[e] + rank;
                slot_of[a] = slot;
                slot_assignment[slot as usize] = a as i32;
            } else {
                slot_of[a] = -1;
            }
        });
    }
    t
}

fn permute_case() -> impl Strategy<Value = (u64, usize, usize, usize, usize, Option<f64>)> {
    (
        any::<u64>(),
        prop::sample::select(vec![0usize, 1, 2, 7, 33, 100, 513, 3000]),
        // Up to 512 experts the scan splits each expert's chunks over 2-32 lanes; past it
        // a thread takes whole experts.
        prop::sample::select(vec![1usize, 2, 3, 8, 60, 128, 256, 513, 600, 1500]),
        1usize..=8,
        prop::sample::select(vec![1usize, 2, 16, 64, 128]),
        prop::sample::select(vec![None, Some(0.3), Some(1.0), Some(1.25), Some(4.0)]),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn permutation_invariants_and_kernel_emulation(case in permute_case()) {
        let (seed, tokens, experts, k, block, cf) = case;
        let k = k.min(experts);
        let mut rng = Rng(seed);
        let ids = random_ids(&mut rng, tokens, k, experts);
        let opts = PermuteOptions { block, capacity_factor: cf };
        let plan = PermutePlan::new(tokens, k, experts, opts).unwrap();
        let p = permute_f64(&ids, tokens, k, experts, opts).unwrap();
        check_tables(&p, &ids, tokens, k, experts, &plan)?;
        let emu = emulate_permute_kernels(&ids, &plan);
        prop_assert_eq!(emu, p);
    }

    #[test]
    fn gather_then_combine_through_identity_experts(seed in any::<u64>(), hidden in 1usize..6, renorm in any::<bool>()) {
        let mut rng = Rng(seed);
        let (tokens, experts) = (11, 6);
        let cfg = RouterConfig { renormalize: renorm, ..RouterConfig::qwen_moe(experts, 3, renorm) };
        let z = logits(&mut rng, tokens * experts, true);
        let r = route_f64(&cfg, &z, tokens, None).unwrap();
        let perm = permute_f64(&r.ids, tokens, 3, experts, PermuteOptions { block: 4, capacity_factor: None }).unwrap();
        let x: Vec<f64> = (0..tokens * hidden).map(|_| rng.uniform()).collect();
        let xp = gather_f64(&x, hidden, 3, &perm, None).unwrap();
        let y = combine_f64(&xp, hidden, 3, &perm, Some(&r.weights)).unwrap();
        for t in 0..tokens {
            let s: f64 = r.weights[t * 3..t * 3 + 3].iter().sum();
            if renorm {
                prop_assert!((s - 1.0).abs() < 1e-12);
            }
            for c in 0..hidden {
                prop_assert!((y[t * hidden + c] - s * x[t * hidden + c]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn combine_and_gather_gradients(seed in any::<u64>(), cf in prop::sample::select(vec![None, Some(0.5)])) {
        let mut rng = Rng(seed);
        let (tokens, k, experts, hidden) = (9, 2, 5, 3);
        let ids = random_ids(&mut rng, tokens, k, experts);
        let perm = permute_f64(&ids, tokens, k, experts, PermuteOptions { block: 2, capacity_factor: cf }).unwrap();
        let rows = perm.slot_assignment.len();
        let w: Vec<f64> = (0..tokens * k).map(|_| rng.uniform()).collect();
        let eo: Vec<f64> = (0..rows * hidden).map(|_| rng.uniform()).collect();
        let g: Vec<f64> = (0..tokens * hidden).map(|_| rng.uniform()).collect();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let f = |w: &[f64], eo: &[f64]| dot(&combine_f64(eo, hidden, k, &perm, Some(w)).unwrap(), &g);
        let (d_eo, d_w) = combine_backward_f64(&g, &eo, hidden, k, &perm, &w).unwrap();
        // d/d expert_out: combine is linear in it, so <d_eo, v> = f(eo + v) - f(eo) exactly
        // up to rounding, for any v (padding rows get zero gradient).
        let v: Vec<f64> = (0..rows * hidden).map(|_| rng.uniform()).collect();
        let eo_v: Vec<f64> = eo.iter().zip(&v).map(|(a, b)| a + b).collect();
        prop_assert!((dot(&d_eo, &v) - (f(&w, &eo_v) - f(&w, &eo))).abs() < 1e-10);
        // d/d w by central differences.
        for a in 0..tokens * k {
            let mut wp = w.clone();
            let mut wm = w.clone();
            wp[a] += 1e-3;
            wm[a] -= 1e-3;
            let fd = (f(&wp, &eo) - f(&wm, &eo)) / 2e-3;
            prop_assert!((fd - d_w[a]).abs() < 1e-9, "d_w[{}]: {} vs {}", a, d_w[a], fd);
            if perm.slot_of[a] < 0 {
                prop_assert_eq!(d_w[a], 0.0);
            }
        }
        // The gather's gradient is the unweighted combine: <gather(x), y> = <x, combine(y)>.
        let x: Vec<f64> = (0..tokens * hidden).map(|_| rng.uniform()).collect();
        let y: Vec<f64> = (0..rows * hidden).map(|_| rng.uniform()).collect();
        let lhs = dot(&gather_f64(&x, hidden, k, &perm, None).unwrap(), &y);
        let rhs = dot(&x, &combine_f64(&y, hidden, k, &perm, None).unwrap());
        prop_assert!((lhs - rhs).abs() < 1e-10);
    }
}

// ---------------------------------------------------------------- gradients

/// The routing weights of fixed chosen ids as a function of the logits.
fn weights_of(cfg: &RouterConfig, z: &[f64], tokens: usize, ids: &[i32]) -> Vec<f64> {
    let (e_n, k) = (cfg.experts, cfg.top_k);
    let mut w = Vec::new();
    for t in 0..tokens {
        let p = probabilities(cfg.scoring, &z[t * e_n..(t + 1) * e_n]);
        let chosen = &ids[t * k..(t + 1) * k];
        let s: f64 = chosen.iter().map(|&e| p[e as usize]).sum::<f64>() + 1e-20;
        for &e in chosen {
            let v = p[e as usize] * cfg.routed_scaling_factor;
            w.push(if cfg.renormalize { v / s } else { v });
        }
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn backward_matches_finite_differences(seed in any::<u64>(), experts in 2usize..10,
        use_dw in any::<bool>(), use_aux in any::<bool>(), use_z in any::<bool>()) {
        let mut rng = Rng(seed);
        let cfg = random_config(&mut rng, experts, 4);
        let tokens = 3;
        let z: Vec<f64> = (0..tokens * experts).map(|_| 2.0 * rng.uniform()).collect();
        let r = route_f64(&cfg, &z, tokens, None).unwrap();
        let dw: Vec<f64> = (0..tokens * cfg.top_k).map(|_| rng.uniform()).collect();
        let counts: Vec<i32> = (0..experts).map(|_| rng.below(7) as i32).collect();
        let opts = LossOptions { aux_coef: if use_aux { 0.7 } else { 0.0 }, z_coef: if use_z { 0.3 } else { 0.0 } };
        let loss = |z: &[f64]| {
            let mut l = 0.0;
            if use_dw {
                l += weights_of(&cfg, z, tokens, &r.ids).iter().zip(&dw).map(|(a, b)| a * b).sum::<f64>();
            }
            let (aux, zl, _) = router_losses_f64(&cfg, z, tokens, &counts, opts).unwrap();
            l + aux + zl
        };
        let grad = route_backward_f64(&cfg, &z, tokens, &r.ids, use_dw.then_some(&dw[..]),
            use_aux.then_some(&counts[..]), opts).unwrap();
        let h = 1e-5;
        for i in 0..z.len() {
            let mut zp = z.clone();
            let mut zm = z.clone();
            zp[i] += h;
            zm[i] -= h;
            let fd = (loss(&zp) - loss(&zm)) / (2.0 * h);
            prop_assert!((fd - grad[i]).abs() <= 1e-7 * (1.0 + fd.abs()), "{:?}: d z[{}] = {} vs fd {}", cfg, i, grad[i], fd);
        }
    }
}

#[test]
fn switch_loss_conventions() {
    // Uniform router, perfectly balanced counts: the load-balancing loss is alpha.
    let cfg = RouterConfig::mixtral(4, 1);
    let z = vec![0.3; 8];
    let (aux, zl, p) = router_losses_f64(
        &cfg,
        &z,
        2,
        &[1, 0, 1, 0],
        LossOptions {
            aux_coef: 0.01,
            z_coef: 1.0,
        },
    )
    .unwrap();
    assert!(p.iter().all(|&x| (x - 0.25).abs() < 1e-15));
    assert!((aux - 0.01).abs() < 1e-15);
    let lse = 0.3 + 4f64.ln();
    assert!((zl - lse * lse).abs() < 1e-12);
    // HF's load_balancing_loss_func normalises by tokens only: k times this loss.
    let cfg = RouterConfig::mixtral(8, 2);
    let mut rng = Rng(5);
    let tokens = 13;
    let z = logits(&mut rng, tokens * 8, false);
    let r = route_f64(&cfg, &z, tokens, None).unwrap();
    let perm = permute_f64(&r.ids, tokens, 2, 8, PermuteOptions::default()).unwrap();
    let (aux, _, mean) = router_losses_f64(
        &cfg,
        &z,
        tokens,
        &perm.routed_counts,
        LossOptions {
            aux_coef: 1.0,
            z_coef: 0.0,
        },
    )
    .unwrap();
    let hf: f64 = 8.0
        * (0..8)
            .map(|e| {
                let frac = r.ids.iter().filter(|&&i| i == e as i32).count() as f64 / tokens as f64;
                frac * mean[e]
            })
            .sum::<f64>();
    assert!((hf - 2.0 * aux).abs() < 1e-12, "{hf} vs 2 x {aux}");
}

#[test]
fn bias_update_moves_toward_balance() {
    let b = update_bias_f64(&[0.0, 0.5, -0.25, 1.0], &[10, 2, 4, 4], 0.125).unwrap();
    // mean load 5: expert 0 overloaded (down), the others under (up).
    assert_eq!(b, vec![-0.125, 0.625, -0.125, 1.125]);
    let b = update_bias_f64(&[0.0, 0.0], &[3, 3], 0.5).unwrap();
    assert_eq!(b, vec![0.0, 0.0]);
}

// ---------------------------------------------------------------- GPU and emulator parity

/// Every parity check runs on a [`gpu::Backend`]: the GPU (ignored without one; the GPU
/// bundle runs them with `--include-ignored`), or the kernel sources themselves on the CPU
/// emulator (`emu_*`, always run, on smaller shapes and fewer cases).
mod gpu {
    use super::*;
    use half::bf16;
    use longctx::device::Device;
    use longctx::dtype::Element;
    use longctx::emulator;
    use longctx::moe::reference::eligible;
    use longctx::moe::{
        combine, combine_backward, gather, gather_backward, permute, route, route_backward,
        route_block_kernel, router_losses, update_bias, ExpertIds, MoeElement, MoeHiddenElement,
        Permutation, RouterLosses, Routing,
    };

    /// Where a parity case runs: the GPU, or the kernel source on the CPU emulator.
    pub enum Backend<'a> {
        Gpu(&'a Device),
        Emulator,
    }

    /// A computed permutation on the backend that made it.
    pub enum Perm {
        Gpu(Box<Permutation>),
        Emu(Box<emulator::HostPermutation>),
    }

    impl Perm {
        fn gpu(&self) -> &Permutation {
            match self {
                Perm::Gpu(p) => p,
                Perm::Emu(_) => panic!("an emulator permutation passed to the GPU"),
            }
        }

        fn emu(&self) -> &emulator::HostPermutation {
            match self {
                Perm::Emu(p) => p,
                Perm::Gpu(_) => panic!("a GPU permutation passed to the emulator"),
            }
        }

        fn max_slots(&self) -> usize {
            match self {
                Perm::Gpu(p) => p.plan().max_slots,
                Perm::Emu(p) => p.plan().max_slots,
            }
        }
    }

    /// What output buffers hold before an op runs (where the test allocates them), so a
    /// kernel that skips an element shows: exact in f32 and bf16, outside every result.
    const SENTINEL: f64 = -96.5;

    fn sentinel<T: Element>(n: usize) -> Vec<T> {
        vec![T::from_f64(SENTINEL); n]
    }

    /// The MoE ops with host inputs and outputs on either backend: the GPU path uploads,
    /// runs the op and downloads; the emulator path runs the same kernel sources on the CPU.
    /// Outputs start as [`SENTINEL`] on both (ids as -1), except the GPU's routing and
    /// losses buffers, which their types allocate zeroed.
    impl Backend<'_> {
        pub fn route<T: MoeElement>(
            &self,
            cfg: &RouterConfig,
            z: &[T],
            tokens: usize,
            bias: Option<&[f32]>,
            block_kernel: bool,
        ) -> Result<(Vec<i32>, Vec<f32>), Error> {
            match self {
                Backend::Gpu(dev) => {
                    let dz = dev.upload(z)?;
                    let db = bias.map(|b| dev.upload(b)).transpose()?;
                    let mut out = Routing::new(dev, cfg, tokens)?;
                    if block_kernel {
                        route_block_kernel(
                            dev,
                            cfg,
                            &dz,
                            tokens,
                            db.as_ref().map(|b| b as _),
                            &mut out,
                        )?;
                    } else {
                        route(dev, cfg, &dz, tokens, db.as_ref().map(|b| b as _), &mut out)?;
                    }
                    out.download(dev)
                }
                Backend::Emulator => {
                    let n = tokens * cfg.top_k;
                    let (mut ids, mut w) = (vec![-1i32; n], sentinel::<f32>(n));
                    if block_kernel {
                        emulator::route_block_kernel(cfg, z, tokens, bias, &mut ids, &mut w)?;
                    } else {
                        emulator::route(cfg, z, tokens, bias, &mut ids, &mut w)?;
                    }
                    Ok((ids, w))
                }
            }
        }

        /// Permutes `ids` `runs` times into one permutation (a result must not depend on
        /// what the tables held before).
        pub fn permute(
            &self,
            ids: &[i32],
            (tokens, k, experts): (usize, usize, usize),
            opts: PermuteOptions,
            runs: usize,
        ) -> Result<Perm, Error> {
            match self {
                Backend::Gpu(dev) => {
                    let dids = ExpertIds::upload(dev, ids, tokens, k, experts)?;
                    let mut perm = Permutation::new(dev, tokens, k, experts, opts)?;
                    for _ in 0..runs {
                        permute(dev, &dids, &mut perm)?;
                    }
                    Ok(Perm::Gpu(Box::new(perm)))
                }
                Backend::Emulator => {
                    let mut perm = emulator::HostPermutation::new(tokens, k, experts, opts)?;
                    for _ in 0..runs {
                        emulator::permute(ids, &mut perm)?;
                    }
                    Ok(Perm::Emu(Box::new(perm)))
                }
            }
        }

        pub fn tables(&self, p: &Perm) -> Result<PermutationTables, Error> {
            match self {
                Backend::Gpu(dev) => p.gpu().download(dev),
                Backend::Emulator => Ok(p.emu().tables()),
            }
        }

        pub fn gather<T: MoeHiddenElement>(
            &self,
            p: &Perm,
            x: &[T],
            hidden: usize,
            scale: Option<&[f32]>,
        ) -> Result<Vec<T>, Error> {
            let n = p.max_slots() * hidden;
            match self {
                Backend::Gpu(dev) => {
                    let dx = dev.upload(x)?;
                    let ds = scale.map(|s| dev.upload(s)).transpose()?;
                    let mut out = dev.upload(&sentinel::<T>(n))?;
                    gather(
                        dev,
                        p.gpu(),
                        &dx,
                        hidden,
                        ds.as_ref().map(|s| s as _),
                        &mut out,
                    )?;
                    dev.download(&out)
                }
                Backend::Emulator => {
                    let mut out = sentinel::<T>(n);
                    emulator::gather(p.emu(), x, hidden, scale, &mut out)?;
                    Ok(out)
                }
            }
        }

        /// [`combine`] with `weights`, or [`gather_backward`] without.
        pub fn combine<T: MoeHiddenElement>(
            &self,
            p: &Perm,
            eo: &[T],
            hidden: usize,
            tokens: usize,
            weights: Option<&[f32]>,
        ) -> Result<Vec<T>, Error> {
            let n = tokens * hidden;
            match self {
                Backend::Gpu(dev) => {
                    let deo = dev.upload(eo)?;
                    let mut out = dev.upload(&sentinel::<T>(n))?;
                    match weights {
                        Some(w) => {
                            let dw = dev.upload(w)?;
                            combine(dev, p.gpu(), &deo, hidden, Some(&dw), &mut out)?;
                        }
                        None => gather_backward(dev, p.gpu(), &deo, hidden, &mut out)?,
                    }
                    dev.download(&out)
                }
                Backend::Emulator => {
                    let mut out = sentinel::<T>(n);
                    match weights {
                        Some(w) => emulator::combine(p.emu(), eo, hidden, Some(w), &mut out)?,
                        None => emulator::gather_backward(p.emu(), eo, hidden, &mut out)?,
                    }
                    Ok(out)
                }
            }
        }

        #[allow(clippy::too_many_arguments)]
        pub fn combine_backward<T: MoeHiddenElement>(
            &self,
            p: &Perm,
            d_out: &[T],
            eo: &[T],
            hidden: usize,
            w: &[f32],
        ) -> Result<(Vec<T>, Vec<f32>), Error> {
            let (rows, assignments) = (p.max_slots(), w.len());
            match self {
                Backend::Gpu(dev) => {
                    let (dg, deo, dw) = (dev.upload(d_out)?, dev.upload(eo)?, dev.upload(w)?);
                    let mut d_eo = dev.upload(&sentinel::<T>(rows * hidden))?;
                    let mut d_w = dev.upload(&sentinel::<f32>(assignments))?;
                    combine_backward(dev, p.gpu(), &dg, &deo, hidden, &dw, &mut d_eo, &mut d_w)?;
                    Ok((dev.download(&d_eo)?, dev.download(&d_w)?))
                }
                Backend::Emulator => {
                    let mut d_eo = sentinel::<T>(rows * hidden);
                    let mut d_w = sentinel::<f32>(assignments);
                    emulator::combine_backward(p.emu(), d_out, eo, hidden, w, &mut d_eo, &mut d_w)?;
                    Ok((d_eo, d_w))
                }
            }
        }

        /// (alpha x aux loss, beta x z-loss, mean balance probabilities).
        pub fn losses<T: MoeElement>(
            &self,
            cfg: &RouterConfig,
            z: &[T],
            tokens: usize,
            p: &Perm,
            opts: LossOptions,
        ) -> Result<(f32, f32, Vec<f32>), Error> {
            match self {
                Backend::Gpu(dev) => {
                    let dz = dev.upload(z)?;
                    let mut out = RouterLosses::new(dev, cfg, tokens)?;
                    router_losses(dev, cfg, &dz, tokens, p.gpu(), opts, &mut out)?;
                    let (aux, zl) = out.download(dev)?;
                    Ok((aux, zl, dev.download(out.mean_probs())?))
                }
                Backend::Emulator => {
                    let l = emulator::router_losses(cfg, z, tokens, p.emu(), opts)?;
                    Ok((l.aux, l.z, l.mean_probs))
                }
            }
        }

        #[allow(clippy::too_many_arguments)]
        pub fn route_backward<T: MoeElement>(
            &self,
            cfg: &RouterConfig,
            z: &[T],
            tokens: usize,
            ids: &[i32],
            d_weights: Option<&[f32]>,
            balance: Option<&Perm>,
            opts: LossOptions,
        ) -> Result<Vec<f32>, Error> {
            let n = tokens * cfg.experts;
            match self {
                Backend::Gpu(dev) => {
                    let dz = dev.upload(z)?;
                    let dids = ExpertIds::upload(dev, ids, tokens, cfg.top_k, cfg.experts)?;
                    let ddw = d_weights.map(|d| dev.upload(d)).transpose()?;
                    let mut dl = dev.upload(&sentinel::<f32>(n))?;
                    route_backward(
                        dev,
                        cfg,
                        &dz,
                        tokens,
                        &dids,
                        ddw.as_ref().map(|d| d as _),
                        balance.map(Perm::gpu),
                        opts,
                        &mut dl,
                    )?;
                    dev.download(&dl)
                }
                Backend::Emulator => {
                    let mut dl = sentinel::<f32>(n);
                    emulator::route_backward(
                        cfg,
                        z,
                        tokens,
                        ids,
                        d_weights,
                        balance.map(Perm::emu),
                        opts,
                        &mut dl,
                    )?;
                    Ok(dl)
                }
            }
        }

        pub fn update_bias(&self, p: &Perm, gamma: f64, bias: &[f32]) -> Result<Vec<f32>, Error> {
            match self {
                Backend::Gpu(dev) => {
                    let mut db = dev.upload(bias)?;
                    update_bias(dev, p.gpu(), gamma, &mut db)?;
                    dev.download(&db)
                }
                Backend::Emulator => {
                    let mut b = bias.to_vec();
                    emulator::update_bias(p.emu(), gamma, &mut b)?;
                    Ok(b)
                }
            }
        }
    }

    fn cases(default: u32) -> u32 {
        std::env::var("LONGCTX_PARITY_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn fail(e: Error) -> TestCaseError {
        TestCaseError::fail(e.to_string())
    }

    fn runner(cases: u32) -> proptest::test_runner::TestRunner {
        // Failing cases are kept (and replayed first) in the committed regression file;
        // every failure message prints the case, seed included.
        proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::Direct(
                    "tests/proptest-regressions/moe-parity.txt",
                ),
            )),
            ..ProptestConfig::default()
        })
    }

    fn host<T: Element>(n: usize, rng: &mut Rng) -> (Vec<T>, Vec<f64>) {
        let v: Vec<T> = (0..n).map(|_| T::from_f64(rng.uniform())).collect();
        let f = v.iter().map(|x| x.to_f64()).collect();
        (v, f)
    }

    // ------------------------------------------------------------ routing

    /// A bound on the f32 error of one expert's choice as the kernels compute it, from its
    /// probability `p` and choice `c` (p, or p + bias): the probability to a few parts in a
    /// million (MUFU exp2 and reciprocal on the warp path, expf and a division on the block
    /// path, each a few ulp; 4e-6 leaves a margin), then a full f32 ulp of the choice when
    /// the bias is added. (A softmax's normaliser error is common to every expert and
    /// cannot reorder them; it is covered anyway.)
    fn choice_err(p: f64, c: f64) -> f64 {
        4e-6 * p.abs() + f64::from(f32::EPSILON) * c.abs()
    }

    /// Distinct values whose difference is within their error bounds, so that f32 may order
    /// them the other way or round them to one value (whose tie then goes to the lower id).
    /// Exact ties are not near: both sides break them by id alike.
    fn near((a, ea): (f64, f64), (b, eb): (f64, f64)) -> bool {
        a != b && (a - b).abs() <= ea + eb
    }

    /// How an f32 ranking of one token may differ from the f64 one.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tie {
        /// It may not: ids must match in rank order.
        None,
        /// Neighbours inside the top k are near-tied: the chosen set is fixed, and ranks may
        /// swap only within near-tied runs.
        Order,
        /// The k-th and (k+1)-th eligible experts, or the last kept and the first dropped
        /// group, are near-tied: the set itself may differ by a swap at the boundary.
        Set,
    }

    /// The token's near-ties as they matter to the result, with its choices and their error
    /// bounds. Near-ties only count between neighbours among the top k + 1 eligible experts
    /// (by choice desc, id asc, as both sides rank) and at the group cutoff; anywhere else
    /// they cannot change the result. Ranking on logits (no bias, no top-2 sums) compares
    /// the same numbers on both sides: never tied.
    fn ties(cfg: &RouterConfig, z: &[f64], bias: Option<&[f64]>) -> (Tie, Vec<f64>, Vec<f64>) {
        let group = cfg.grouping.filter(|g| g.n_group > 1);
        let top2 = matches!(group.map(|g| g.score), Some(GroupScore::Top2Sum));
        if bias.is_none() && !top2 {
            return (Tie::None, vec![], vec![]);
        }
        let p = probabilities(cfg.scoring, z);
        let c = choice_scores(cfg, z, bias).unwrap();
        let err: Vec<f64> = p.iter().zip(&c).map(|(&p, &c)| choice_err(p, c)).collect();
        let by_choice = |ids: &mut Vec<usize>| {
            ids.sort_by(|&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
        };
        if let Some(g) = group.filter(|g| g.topk_group < g.n_group) {
            let size = cfg.experts / g.n_group;
            // Each group's score and its error bound: the best choice, or the sum of the
            // two best rounded once more.
            let mut gs: Vec<(f64, f64, usize)> = (0..g.n_group)
                .map(|gi| {
                    let mut m: Vec<usize> = (gi * size..(gi + 1) * size).collect();
                    by_choice(&mut m);
                    match g.score {
                        GroupScore::Max => (c[m[0]], err[m[0]], gi),
                        GroupScore::Top2Sum => {
                            let v = c[m[0]] + c[m[1]];
                            let e = err[m[0]] + err[m[1]] + f64::from(f32::EPSILON) * v.abs();
                            (v, e, gi)
                        }
                    }
                })
                .collect();
            gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
            let (last, first_out) = (gs[g.topk_group - 1], gs[g.topk_group]);
            if near((last.0, last.1), (first_out.0, first_out.1)) {
                return (Tie::Set, c, err);
            }
        }
        let el = eligible(cfg, &c).unwrap();
        let mut top: Vec<usize> = (0..cfg.experts).filter(|&e| el[e]).collect();
        by_choice(&mut top);
        top.truncate(cfg.top_k + 1);
        let k = cfg.top_k;
        let nb = |i: usize| near((c[top[i]], err[top[i]]), (c[top[i + 1]], err[top[i + 1]]));
        let tie = if top.len() > k && nb(k - 1) {
            Tie::Set
        } else if (0..k - 1).any(nb) {
            Tie::Order
        } else {
            Tie::None
        };
        (tie, c, err)
    }

    /// Biases for the parity tests: [`bias`]'s integers scaled to the probabilities' size,
    /// 1 for sigmoid scores and 1/E rounded to a power of two for softmax, whose
    /// probabilities are about 1/E (exact in f32 either way). An integer bias on softmax
    /// probabilities of 1e-4 would leave the experts of one bias class a few f32 ulps
    /// apart: a ranking f32 cannot decide, which the test would have to skip.
    fn parity_bias(rng: &mut Rng, cfg: &RouterConfig) -> Vec<f64> {
        let scale = match cfg.scoring {
            Scoring::Sigmoid => 1.0,
            Scoring::Softmax => 2f64.powi(-((cfg.experts as f64).log2().round() as i32)),
        };
        bias(rng, cfg.experts)
            .into_iter()
            .map(|b| b * scale)
            .collect()
    }

    /// Near-tie tokens skipped, and tokens checked, over a run.
    #[derive(Debug, Default, Clone, Copy)]
    struct Skips {
        skipped: usize,
        tokens: usize,
    }

    impl Skips {
        fn add(&mut self, o: Skips) {
            self.skipped += o.skipped;
            self.tokens += o.tokens;
        }

        /// The near-tie rule must stay narrow: under 2% of the tokens skipped.
        fn assert_few(&self, name: &str) {
            eprintln!(
                "{name}: {} of {} tokens skipped as near-ties",
                self.skipped, self.tokens
            );
            assert!(
                self.skipped * 50 < self.tokens.max(1),
                "{name}: {} of {} tokens skipped as near-ties (2% allowed)",
                self.skipped,
                self.tokens
            );
        }
    }

    /// Checks one kernel's routing against the reference, token by token, weights always by
    /// expert id. Ids: exactly in rank order; where neighbours inside the top k are
    /// near-tied ([`Tie::Order`]), the same set, and at every rank an expert whose choice
    /// equals or is near-tied with the reference's at that rank. Tokens near-tied at the
    /// boundary of the chosen set ([`Tie::Set`]) are skipped (counted), after checking
    /// their ids are in range and distinct, and their weights when both chose one set.
    #[allow(clippy::too_many_arguments)]
    fn check_routing(
        cfg: &RouterConfig,
        z: &[f64],
        tokens: usize,
        bias: Option<&[f64]>,
        want: &longctx::moe::reference::RoutingF64,
        ids: &[i32],
        w: &[f32],
        what: &str,
    ) -> Result<Skips, TestCaseError> {
        let (e_n, k) = (cfg.experts, cfg.top_k);
        prop_assert_eq!(ids.len(), tokens * k);
        prop_assert_eq!(w.len(), tokens * k);
        let mut s = Skips { skipped: 0, tokens };
        for t in 0..tokens {
            let got = &ids[t * k..(t + 1) * k];
            let want_ids = &want.ids[t * k..(t + 1) * k];
            let want_w = &want.weights[t * k..(t + 1) * k];
            for j in 0..k {
                prop_assert!(
                    got[j] >= 0 && (got[j] as usize) < e_n && !got[..j].contains(&got[j]),
                    "{} token {}: ids {:?}",
                    what,
                    t,
                    got
                );
            }
            let (mut a, mut b) = (got.to_vec(), want_ids.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            let same_set = a == b;
            let (tie, c, err) = ties(cfg, &z[t * e_n..(t + 1) * e_n], bias);
            match tie {
                Tie::Set => {
                    s.skipped += 1;
                    if !same_set {
                        continue;
                    }
                }
                Tie::Order => {
                    prop_assert!(
                        same_set,
                        "{} {:?} token {}: ids {:?} vs {:?}",
                        what,
                        cfg,
                        t,
                        got,
                        want_ids
                    );
                    for j in 0..k {
                        let (g, r) = (got[j] as usize, want_ids[j] as usize);
                        prop_assert!(
                            c[g] == c[r] || near((c[g], err[g]), (c[r], err[r])),
                            "{} {:?} token {} rank {}: expert {} vs {} (choices {} vs {})",
                            what,
                            cfg,
                            t,
                            j,
                            g,
                            r,
                            c[g],
                            c[r]
                        );
                    }
                }
                Tie::None => {
                    prop_assert_eq!(got, want_ids, "{} {:?} token {}", what, cfg, t);
                }
            }
            for (j, &e) in got.iter().enumerate() {
                let r = want_ids.iter().position(|&x| x == e).unwrap_or(0);
                let (g, r) = (f64::from(w[t * k + j]), want_w[r]);
                prop_assert!(
                    (g - r).abs() <= 2e-5 * r.abs().max(cfg.routed_scaling_factor * 1e-3),
                    "{} {:?} token {} expert {}: weight {} vs {}",
                    what,
                    cfg,
                    t,
                    e,
                    g,
                    r
                );
            }
        }
        Ok(s)
    }

    #[derive(Debug, Clone)]
    struct RouteCase {
        seed: u64,
        tokens: usize,
        experts: usize,
        max_k: usize,
        ties: bool,
        use_bias: bool,
        /// Most tokens x top_k (the emulator's block kernel takes a block-wide argmax per
        /// rank).
        max_ranks: usize,
    }

    /// Shapes a routing run draws from.
    struct RouteShapes {
        tokens: Vec<usize>,
        experts: Vec<usize>,
        max_k: Vec<usize>,
        /// Most tokens x experts per case.
        max_elems: usize,
        max_ranks: usize,
    }

    fn gpu_route_shapes() -> RouteShapes {
        RouteShapes {
            tokens: vec![1, 2, 3, 5, 31, 33, 64, 257, 1000],
            experts: vec![
                1, 2, 3, 7, 8, 16, 60, 64, 100, 128, 160, 256, 257, 384, 500, 512, 513, 768, 1000,
                4096,
            ],
            max_k: vec![2, 8, 8, 40, 600],
            // Keep the f64 reference quick.
            max_elems: 1 << 19,
            max_ranks: usize::MAX,
        }
    }

    fn emu_route_shapes() -> RouteShapes {
        RouteShapes {
            // 1, a warp's tokens +- 1 for 1- and 2-lane segments (16, 32), a block's +- 1
            // for 2 and 8 lanes (64, 16), primes.
            tokens: vec![1, 2, 3, 5, 15, 17, 31, 33, 63, 65, 257],
            experts: vec![
                1, 2, 3, 7, 8, 16, 60, 64, 100, 128, 160, 256, 257, 384, 512, 513, 1000, 4096,
            ],
            max_k: vec![2, 8, 8, 40, 600],
            max_elems: 1 << 17,
            max_ranks: 1024,
        }
    }

    fn route_case(s: RouteShapes) -> impl Strategy<Value = RouteCase> {
        let (max_elems, max_ranks) = (s.max_elems, s.max_ranks);
        (
            any::<u64>(),
            prop::sample::select(s.tokens),
            prop::sample::select(s.experts),
            prop::sample::select(s.max_k),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                move |(seed, tokens, experts, max_k, ties, use_bias)| RouteCase {
                    seed,
                    tokens: tokens.min(max_elems / experts).max(1),
                    experts,
                    max_k,
                    ties,
                    use_bias,
                    max_ranks,
                },
            )
    }

    /// Runs one routing case on both kernels and compares with the reference.
    fn run_route<T: MoeElement>(b: &Backend<'_>, c: &RouteCase) -> Result<Skips, TestCaseError> {
        let mut rng = Rng(c.seed);
        let cfg = random_config(&mut rng, c.experts, c.max_k);
        let tokens = c.tokens.min(c.max_ranks / cfg.top_k).max(1);
        let z_host: Vec<T> = logits(&mut rng, tokens * c.experts, c.ties)
            .into_iter()
            .map(T::from_f64)
            .collect();
        let z: Vec<f64> = z_host.iter().map(|v| v.to_f64()).collect();
        let bias64 = parity_bias(&mut rng, &cfg);
        let bias_arg = c.use_bias.then_some(&bias64[..]);
        let want = route_f64(&cfg, &z, tokens, bias_arg).map_err(fail)?;
        let b32: Vec<f32> = bias64.iter().map(|&x| x as f32).collect();
        let mut skips = Skips::default();
        for block_kernel in [false, true] {
            let (ids, w) = b
                .route(
                    &cfg,
                    &z_host,
                    tokens,
                    c.use_bias.then_some(&b32[..]),
                    block_kernel,
                )
                .map_err(fail)?;
            let what = format!("{c:?} block kernel {block_kernel}");
            skips.add(check_routing(
                &cfg, &z, tokens, bias_arg, &want, &ids, &w, &what,
            )?);
        }
        Ok(skips)
    }

    fn route_parity_on<T: MoeElement>(name: &str, b: &Backend<'_>, cases: u32, s: RouteShapes) {
        let skips = std::cell::Cell::new(Skips::default());
        runner(cases)
            .run(&route_case(s), |c| {
                let mut all = skips.get();
                all.add(run_route::<T>(b, &c)?);
                skips.set(all);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        skips.get().assert_few(name);
    }

    fn route_parity<T: MoeElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        route_parity_on::<T>(name, &Backend::Gpu(&dev), cases(96), gpu_route_shapes());
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_route_parity_f32() {
        route_parity::<f32>("gpu_route_parity_f32");
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_route_parity_bf16() {
        route_parity::<bf16>("gpu_route_parity_bf16");
    }

    #[test]
    fn emu_route_parity_f32() {
        route_parity_on::<f32>(
            "emu_route_parity_f32",
            &Backend::Emulator,
            32,
            emu_route_shapes(),
        );
    }

    #[test]
    fn emu_route_parity_bf16() {
        route_parity_on::<bf16>(
            "emu_route_parity_bf16",
            &Backend::Emulator,
            32,
            emu_route_shapes(),
        );
    }

    /// Real model shapes: Mixtral, Qwen3-MoE and DeepSeek-V3 (with bias), bf16 logits.
    fn model_shapes_on(name: &str, b: &Backend<'_>, tokens: usize) {
        let mut all = Skips::default();
        for (cfg, with_bias) in [
            (RouterConfig::mixtral(8, 2), false),
            (RouterConfig::qwen_moe(128, 8, true), false),
            (RouterConfig::deepseek_v3_default(), true),
        ] {
            let mut rng = Rng(99);
            let z_host: Vec<bf16> = logits(&mut rng, tokens * cfg.experts, true)
                .into_iter()
                .map(bf16::from_f64)
                .collect();
            let z: Vec<f64> = z_host.iter().map(|v| v.to_f64()).collect();
            let b64 = parity_bias(&mut rng, &cfg);
            let bias_arg = with_bias.then_some(&b64[..]);
            let want = route_f64(&cfg, &z, tokens, bias_arg).unwrap();
            let b32: Vec<f32> = b64.iter().map(|&x| x as f32).collect();
            let (ids, w) = b
                .route(&cfg, &z_host, tokens, with_bias.then_some(&b32[..]), false)
                .unwrap();
            let s = check_routing(&cfg, &z, tokens, bias_arg, &want, &ids, &w, name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                s.skipped * 100 < tokens,
                "{name} {cfg:?}: {} near-tie tokens of {tokens}",
                s.skipped
            );
            all.add(s);
        }
        all.assert_few(name);
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_route_parity_model_shapes_64k() {
        let name = "gpu_route_parity_model_shapes_64k";
        let Some(dev) = common::gpu(name) else {
            return;
        };
        model_shapes_on(name, &Backend::Gpu(&dev), 65536);
    }

    /// 257 tokens: Mixtral packs 64 tokens per block, Qwen3 16 and DeepSeek-V3 8, so every
    /// shape ends on a block with one live token.
    #[test]
    fn emu_route_parity_model_shapes() {
        model_shapes_on("emu_route_parity_model_shapes", &Backend::Emulator, 257);
    }

    /// Fixed routing edge cases every run sees: token counts 1, a block's tokens - 1, + 0
    /// and + 1, and a prime, for the warp kernel's layouts (1 to 16 lanes per token, groups
    /// on whole lanes) and the block kernel's shapes (past 512 experts, top_k past 32,
    /// groups that do not fit lanes); exact ties everywhere (all logits equal, then the
    /// coarse grid), with and without a bias.
    fn route_edges_on(name: &str, b: &Backend<'_>) {
        use longctx::moe::{GatePath, GatePlan};
        let configs = [
            RouterConfig::mixtral(1, 1),
            RouterConfig::mixtral(8, 2),
            RouterConfig::qwen_moe(60, 4, false),
            RouterConfig::qwen_moe(128, 8, true),
            RouterConfig::deepseek_v2(160, 6, 8, 3, 16.0),
            RouterConfig::deepseek_v3_default(),
            RouterConfig::deepseek_v3(8, 2, 4, 1, true, 1.0),
            RouterConfig::deepseek_v2(72, 2, 3, 1, 1.0),
            RouterConfig::mixtral(64, 33),
            RouterConfig::deepseek_v2(60, 4, 5, 2, 1.0),
            RouterConfig::mixtral(513, 2),
        ];
        let mut skips = Skips::default();
        for (i, cfg) in configs.iter().enumerate() {
            let plan = GatePlan::new(cfg, 1, false).unwrap();
            // Tokens per block of the kernel `route` picks.
            let tile = match plan.path {
                GatePath::Warp => plan.threads as usize / plan.lanes,
                GatePath::Block => 1,
            };
            let mut token_counts = vec![
                1,
                tile.saturating_sub(1).max(1),
                tile,
                tile + 1,
                2 * tile + 3,
            ];
            token_counts.dedup();
            for &tokens in &token_counts {
                for (mode, use_bias) in [(0, false), (0, true), (1, false), (1, true), (2, true)] {
                    let mut rng = Rng(1000 * i as u64 + tokens as u64);
                    let z_host: Vec<f32> = match mode {
                        // Every expert ties.
                        0 => vec![0.5; tokens * cfg.experts],
                        // The coarse grid: many exact ties.
                        1 => logits(&mut rng, tokens * cfg.experts, true),
                        _ => logits(&mut rng, tokens * cfg.experts, false),
                    }
                    .into_iter()
                    .map(|v| v as f32)
                    .collect();
                    let z: Vec<f64> = z_host.iter().map(|&v| f64::from(v)).collect();
                    let b64: Vec<f64> = if mode == 0 {
                        vec![0.25; cfg.experts]
                    } else {
                        parity_bias(&mut rng, cfg)
                    };
                    let bias_arg = use_bias.then_some(&b64[..]);
                    let want = route_f64(cfg, &z, tokens, bias_arg).unwrap();
                    if mode == 0 && cfg.grouping.is_none() {
                        // All tied: the first top_k ids.
                        let first: Vec<i32> = (0..cfg.top_k as i32).collect();
                        assert_eq!(&want.ids[..cfg.top_k], &first[..]);
                    }
                    let b32: Vec<f32> = b64.iter().map(|&x| x as f32).collect();
                    for block_kernel in [false, true] {
                        let (ids, w) = b
                            .route(
                                cfg,
                                &z_host,
                                tokens,
                                use_bias.then_some(&b32[..]),
                                block_kernel,
                            )
                            .unwrap_or_else(|e| panic!("{name} {cfg:?} {tokens} tokens: {e}"));
                        let what = format!(
                            "{name} {cfg:?} {tokens} tokens mode {mode} bias {use_bias} block kernel {block_kernel}"
                        );
                        skips.add(
                            check_routing(cfg, &z, tokens, bias_arg, &want, &ids, &w, &what)
                                .unwrap_or_else(|e| panic!("{e}")),
                        );
                    }
                }
            }
        }
        skips.assert_few(name);
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_route_edges() {
        let Some(dev) = common::gpu("gpu_route_edges") else {
            return;
        };
        route_edges_on("gpu_route_edges", &Backend::Gpu(&dev));
    }

    #[test]
    fn emu_route_edges() {
        route_edges_on("emu_route_edges", &Backend::Emulator);
    }

    // ------------------------------------------------------------ permutation

    type PermuteCase = (u64, usize, usize, usize, usize, Option<f64>);

    fn run_permute(b: &Backend<'_>, c: PermuteCase) -> Result<(), TestCaseError> {
        let (seed, tokens, experts, k, block, cf) = c;
        let k = k.min(experts);
        let mut rng = Rng(seed);
        let ids = random_ids(&mut rng, tokens, k, experts);
        let opts = PermuteOptions {
            block,
            capacity_factor: cf,
        };
        let want = permute_f64(&ids, tokens, k, experts, opts).map_err(fail)?;
        // Twice: the result must not depend on the previous contents.
        let perm = b
            .permute(&ids, (tokens, k, experts), opts, 2)
            .map_err(fail)?;
        let got = b.tables(&perm).map_err(fail)?;
        prop_assert_eq!(got, want, "{:?}", c);
        Ok(())
    }

    fn permutation_parity_on(name: &str, b: &Backend<'_>, cases: u32, tokens: Vec<usize>) {
        let strategy = (
            any::<u64>(),
            prop::sample::select(tokens),
            prop::sample::select(vec![1usize, 2, 3, 8, 60, 128, 256, 1000, 4096]),
            1usize..=8,
            prop::sample::select(vec![1usize, 2, 16, 64, 128]),
            prop::sample::select(vec![None, Some(0.3), Some(1.0), Some(1.25), Some(4.0)]),
        );
        runner(cases)
            .run(&strategy, |c| run_permute(b, c))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_permutation_parity() {
        let Some(dev) = common::gpu("gpu_permutation_parity") else {
            return;
        };
        permutation_parity_on(
            "gpu_permutation_parity",
            &Backend::Gpu(&dev),
            cases(96),
            vec![0, 1, 2, 7, 33, 100, 513, 3000, 70000],
        );
    }

    #[test]
    fn emu_permutation_parity() {
        permutation_parity_on(
            "emu_permutation_parity",
            &Backend::Emulator,
            32,
            vec![0, 1, 2, 7, 33, 100, 513, 3000],
        );
    }

    /// Fixed permutation edge cases: assignments around a warp step (32), a walk batch
    /// (256), a chunk (512) and past one block of warp chunks; expert counts at the scan's
    /// threads-per-expert boundaries (16 and 17: 32 and 16 lanes; 512 and 513: 2 and 1) and
    /// 8 / 256 (Mixtral, DeepSeek-V3); no padding and padding to 16; no capacity, a tight
    /// one and one every expert fits.
    fn permutation_edges_on(name: &str, b: &Backend<'_>) {
        let mut n = 0u64;
        for (tokens, k) in [
            (1, 1),
            (31, 1),
            (32, 1),
            (33, 1),
            (32, 8),
            (64, 8),
            (63, 8),
            (65, 8),
            (2049, 2),
        ] {
            for experts in [8usize, 16, 17, 256, 512, 513] {
                for (block, cf) in [(1, None), (16, None), (1, Some(0.5)), (16, Some(1.0))] {
                    n += 1;
                    run_permute(b, (n, tokens, experts, k, block, cf))
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_permutation_edges() {
        let Some(dev) = common::gpu("gpu_permutation_edges") else {
            return;
        };
        permutation_edges_on("gpu_permutation_edges", &Backend::Gpu(&dev));
    }

    #[test]
    fn emu_permutation_edges() {
        permutation_edges_on("emu_permutation_edges", &Backend::Emulator);
    }

    // ------------------------------------------------------------ gather / combine

    fn tol_of<T: Element>() -> f64 {
        match T::DTYPE {
            longctx::dtype::DType::F32 => 2e-6,
            dt => 2.0 * dt.epsilon(),
        }
    }

    /// The absolute error allowed on top of the relative bound: f16's subnormals (below
    /// 2^-14) are spaced 2^-24 apart, so a result rounded to one of them is off by up to
    /// 2^-25 whatever its magnitude; f32 and bf16 share f32's exponent range, where the
    /// values here never go subnormal.
    fn abs_floor_of<T: Element>() -> f64 {
        match T::DTYPE {
            longctx::dtype::DType::F16 => 2f64.powi(-24),
            _ => 1e-30,
        }
    }

    /// One gather / combine / backward case over 16 experts, top-4.
    fn run_hidden<T: MoeHiddenElement>(
        b: &Backend<'_>,
        (seed, tokens, hidden, cf, block): (u64, usize, usize, Option<f64>, usize),
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng(seed);
        let (k, experts) = (4usize, 16usize);
        let ids = random_ids(&mut rng, tokens, k, experts);
        let opts = PermuteOptions {
            block,
            capacity_factor: cf,
        };
        let tables = permute_f64(&ids, tokens, k, experts, opts).map_err(fail)?;
        let rows = tables.slot_assignment.len();
        let perm = b
            .permute(&ids, (tokens, k, experts), opts, 1)
            .map_err(fail)?;
        let (x, x64) = host::<T>(tokens * hidden, &mut rng);
        let (eo, eo64) = host::<T>(rows * hidden, &mut rng);
        let (g, g64) = host::<T>(tokens * hidden, &mut rng);
        let w32: Vec<f32> = (0..tokens * k).map(|_| rng.uniform() as f32).collect();
        let w64: Vec<f64> = w32.iter().map(|&v| f64::from(v)).collect();
        let tol = tol_of::<T>();
        let floor = abs_floor_of::<T>();
        let close =
            |got: &[T], want: &[f64], scale: &[f64], what: &str| -> Result<(), TestCaseError> {
                prop_assert_eq!(got.len(), want.len());
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    let e = (a.to_f64() - b).abs();
                    prop_assert!(
                        e <= tol * scale[i].max(1e-30) + floor,
                        "{} tokens {} hidden {} [{}]: {} vs {}",
                        what,
                        tokens,
                        hidden,
                        i,
                        a.to_f64(),
                        b
                    );
                }
                Ok(())
            };
        // Gather, plain and scaled: rows up to the padded total as the reference, the rows
        // past it untouched.
        let written = tables.offsets[experts] as usize * hidden;
        for scaled in [false, true] {
            let got = b
                .gather(&perm, &x, hidden, scaled.then_some(&w32[..]))
                .map_err(fail)?;
            let want =
                gather_f64(&x64, hidden, k, &tables, scaled.then_some(&w64[..])).map_err(fail)?;
            let mag: Vec<f64> = want.iter().map(|v| v.abs()).collect();
            prop_assert_eq!(got.len(), want.len());
            close(&got[..written], &want[..written], &mag, "gather")?;
            prop_assert!(
                got[written..].iter().all(|v| v.to_f64() == SENTINEL),
                "gather wrote past the padded total {}",
                written / hidden
            );
        }
        // Combine (and the gather's gradient, the unweighted combine).
        let abs_eo: Vec<f64> = eo64.iter().map(|v| v.abs()).collect();
        let abs_w: Vec<f64> = w64.iter().map(|v| v.abs()).collect();
        for weighted in [true, false] {
            let got = b
                .combine(&perm, &eo, hidden, tokens, weighted.then_some(&w32[..]))
                .map_err(fail)?;
            let w_arg = weighted.then_some(&w64[..]);
            let want = combine_f64(&eo64, hidden, k, &tables, w_arg).map_err(fail)?;
            let mag = combine_f64(&abs_eo, hidden, k, &tables, weighted.then_some(&abs_w[..]))
                .map_err(fail)?;
            close(
                &got,
                &want,
                &mag,
                if weighted {
                    "combine"
                } else {
                    "gather_backward"
                },
            )?;
        }
        // Combine backward.
        let (d_eo, got_w) = b
            .combine_backward(&perm, &g, &eo, hidden, &w32)
            .map_err(fail)?;
        let (want_eo, want_w) =
            combine_backward_f64(&g64, &eo64, hidden, k, &tables, &w64).map_err(fail)?;
        let mag: Vec<f64> = want_eo.iter().map(|v| v.abs()).collect();
        prop_assert_eq!(d_eo.len(), want_eo.len());
        close(&d_eo[..written], &want_eo[..written], &mag, "d_expert_out")?;
        prop_assert!(
            d_eo[written..].iter().all(|v| v.to_f64() == SENTINEL),
            "d_expert_out written past the padded total {}",
            written / hidden
        );
        let abs_g: Vec<f64> = g64.iter().map(|v| v.abs()).collect();
        let (_, mag_w) =
            combine_backward_f64(&abs_g, &abs_eo, hidden, k, &tables, &w64).map_err(fail)?;
        prop_assert_eq!(got_w.len(), want_w.len());
        for (a, (gw, ww)) in got_w.iter().zip(&want_w).enumerate() {
            prop_assert!(
                (f64::from(*gw) - ww).abs() <= 2e-6 * mag_w[a] + 1e-30,
                "d_weights[{}]: {} vs {}",
                a,
                gw,
                ww
            );
        }
        Ok(())
    }

    fn hidden_parity_on<T: MoeHiddenElement>(
        name: &str,
        b: &Backend<'_>,
        cases: u32,
        tokens: Vec<usize>,
        hidden: Vec<usize>,
    ) {
        let strategy = (
            any::<u64>(),
            prop::sample::select(tokens),
            prop::sample::select(hidden),
            prop::sample::select(vec![None, Some(0.5)]),
            prop::sample::select(vec![1usize, 16]),
        );
        runner(cases)
            .run(&strategy, |c| run_hidden::<T>(b, c))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    fn hidden_parity<T: MoeHiddenElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        hidden_parity_on::<T>(
            name,
            &Backend::Gpu(&dev),
            cases(48),
            vec![1, 7, 100, 513],
            vec![1, 3, 8, 64, 100, 1024, 4096],
        );
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_gather_combine_parity_f32() {
        hidden_parity::<f32>("gpu_gather_combine_parity_f32");
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_gather_combine_parity_bf16() {
        hidden_parity::<bf16>("gpu_gather_combine_parity_bf16");
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_gather_combine_parity_f16() {
        hidden_parity::<half::f16>("gpu_gather_combine_parity_f16");
    }

    /// Hidden sizes around the vector widths (4 f32, 8 bf16 and f16) and the 128 threads of a row,
    /// in elements and in vectors (127-129, 511-513, 1024).
    const EMU_HIDDEN: [usize; 12] = [1, 3, 4, 5, 8, 9, 127, 128, 129, 512, 513, 1024];

    #[test]
    fn emu_gather_combine_parity_f32() {
        hidden_parity_on::<f32>(
            "emu_gather_combine_parity_f32",
            &Backend::Emulator,
            24,
            vec![1, 7, 31, 100],
            EMU_HIDDEN.to_vec(),
        );
    }

    #[test]
    fn emu_gather_combine_parity_bf16() {
        hidden_parity_on::<bf16>(
            "emu_gather_combine_parity_bf16",
            &Backend::Emulator,
            24,
            vec![1, 7, 31, 100],
            EMU_HIDDEN.to_vec(),
        );
    }

    #[test]
    fn emu_gather_combine_parity_f16() {
        hidden_parity_on::<half::f16>(
            "emu_gather_combine_parity_f16",
            &Backend::Emulator,
            24,
            vec![1, 7, 31, 100],
            EMU_HIDDEN.to_vec(),
        );
    }

    /// Host buffers whose rows are not 16-byte aligned take the scalar path (CUDA
    /// allocations always are aligned; host slices need not be): the plan must not pick
    /// vector access there, or the emulator (like the GPU) would read misaligned vectors.
    #[test]
    fn emu_gather_combine_misaligned_rows() {
        let (tokens, k, experts, hidden) = (5, 2, 4, 8);
        let mut rng = Rng(7);
        let ids = random_ids(&mut rng, tokens, k, experts);
        let opts = PermuteOptions::default();
        let tables = permute_f64(&ids, tokens, k, experts, opts).unwrap();
        let mut perm = emulator::HostPermutation::new(tokens, k, experts, opts).unwrap();
        emulator::permute(&ids, &mut perm).unwrap();
        let rows = perm.plan().max_slots;
        // One f32 in front: x[1..] starts 4 bytes past a 16-byte boundary (Vec<f32> of this
        // size comes 16-byte aligned from the system allocator).
        let backing: Vec<f32> = (0..=tokens * hidden)
            .map(|_| rng.uniform() as f32)
            .collect();
        let x = &backing[1..];
        let mut out_backing = vec![0f32; rows * hidden + 1];
        emulator::gather(&perm, x, hidden, None, &mut out_backing[1..]).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let want = gather_f64(&x64, hidden, k, &tables, None).unwrap();
        for (i, (a, b)) in out_backing[1..].iter().zip(&want).enumerate() {
            assert_eq!(f64::from(*a), *b, "row element {i}");
        }
        let mut y_backing = vec![0f32; tokens * hidden + 1];
        emulator::gather_backward(&perm, &out_backing[1..], hidden, &mut y_backing[1..]).unwrap();
        let want_y = combine_f64(&want, hidden, k, &tables, None).unwrap();
        for (i, (a, b)) in y_backing[1..].iter().zip(&want_y).enumerate() {
            assert!(
                (f64::from(*a) - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{i}: {a} vs {b}"
            );
        }
    }

    // ------------------------------------------------------------ losses and backward

    /// One losses + router backward case: route, permute, both losses, then the gradient
    /// with and without the weights' term and the load-balancing term.
    fn run_losses<T: MoeElement>(
        b: &Backend<'_>,
        (seed, tokens, experts, use_dw, use_aux): (u64, usize, usize, bool, bool),
    ) -> Result<(), TestCaseError> {
        let mut rng = Rng(seed);
        let cfg = random_config(&mut rng, experts, 8);
        let z_host: Vec<T> = logits(&mut rng, tokens * experts, false)
            .into_iter()
            .map(T::from_f64)
            .collect();
        let z: Vec<f64> = z_host.iter().map(|v| v.to_f64()).collect();
        let (ids, _) = b.route(&cfg, &z_host, tokens, None, false).map_err(fail)?;
        let perm = b
            .permute(
                &ids,
                (tokens, cfg.top_k, experts),
                PermuteOptions::default(),
                1,
            )
            .map_err(fail)?;
        let counts = b.tables(&perm).map_err(fail)?.routed_counts;
        let opts = LossOptions {
            aux_coef: 0.01,
            z_coef: 0.001,
        };
        let (aux, zl, p) = b.losses(&cfg, &z_host, tokens, &perm, opts).map_err(fail)?;
        let (want_aux, want_z, want_p) =
            router_losses_f64(&cfg, &z, tokens, &counts, opts).map_err(fail)?;
        prop_assert!(
            (f64::from(aux) - want_aux).abs() <= 1e-5 * want_aux.abs() + 1e-12,
            "aux {} vs {}",
            aux,
            want_aux
        );
        prop_assert!(
            (f64::from(zl) - want_z).abs() <= 1e-5 * want_z.abs() + 1e-12,
            "z {} vs {}",
            zl,
            want_z
        );
        prop_assert_eq!(p.len(), want_p.len());
        for (e, (a, b)) in p.iter().zip(&want_p).enumerate() {
            prop_assert!(
                (f64::from(*a) - b).abs() <= 1e-5 * b.abs() + 1e-9,
                "P[{}] {} vs {}",
                e,
                a,
                b
            );
        }
        // Backward.
        let dw_host: Vec<f32> = (0..tokens * cfg.top_k)
            .map(|_| rng.uniform() as f32)
            .collect();
        let dw64: Vec<f64> = dw_host.iter().map(|&v| f64::from(v)).collect();
        let got = b
            .route_backward(
                &cfg,
                &z_host,
                tokens,
                &ids,
                use_dw.then_some(&dw_host[..]),
                use_aux.then_some(&perm),
                opts,
            )
            .map_err(fail)?;
        let want = route_backward_f64(
            &cfg,
            &z,
            tokens,
            &ids,
            use_dw.then_some(&dw64[..]),
            use_aux.then_some(&counts[..]),
            opts,
        )
        .map_err(fail)?;
        for t in 0..tokens {
            let row = &want[t * experts..(t + 1) * experts];
            // The gating term cancels (exactly, for sigmoid with top-1 renormalised):
            // scale the tolerance by its size before cancellation, c sum|g| / D.
            let k = cfg.top_k;
            let p = probabilities(cfg.scoring, &z[t * experts..(t + 1) * experts]);
            let d: f64 = ids[t * k..(t + 1) * k]
                .iter()
                .map(|&e| p[e as usize])
                .sum::<f64>()
                + 1e-20;
            let g: f64 = dw64[t * k..(t + 1) * k].iter().map(|v| v.abs()).sum();
            let gate = if use_dw {
                cfg.routed_scaling_factor * g / if cfg.renormalize { d } else { 1.0 }
            } else {
                0.0
            };
            let mag = row.iter().fold(gate, |m, v| m.max(v.abs()));
            for e in 0..experts {
                let (g, r) = (f64::from(got[t * experts + e]), row[e]);
                prop_assert!(
                    (g - r).abs() <= 1e-4 * mag + 1e-9,
                    "{:?} token {} expert {}: {} vs {}",
                    cfg,
                    t,
                    e,
                    g,
                    r
                );
            }
        }
        Ok(())
    }

    fn losses_parity_on<T: MoeElement>(
        name: &str,
        b: &Backend<'_>,
        cases: u32,
        tokens: Vec<usize>,
        experts: Vec<usize>,
        max_elems: usize,
    ) {
        let strategy = (
            any::<u64>(),
            prop::sample::select(tokens),
            prop::sample::select(experts),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(move |(seed, tokens, experts, use_dw, use_aux)| {
                // The reference's load-balancing Jacobian is O(experts^2) per token.
                let tokens = tokens.min((max_elems / (experts * experts)).max(1));
                (seed, tokens, experts, use_dw, use_aux)
            });
        runner(cases)
            .run(&strategy, |c| run_losses::<T>(b, c))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    fn losses_parity<T: MoeElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        losses_parity_on::<T>(
            name,
            &Backend::Gpu(&dev),
            cases(48),
            vec![1, 3, 100, 1000, 5000],
            vec![2, 8, 60, 128, 256, 600],
            20_000_000,
        );
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_losses_and_backward_parity_f32() {
        losses_parity::<f32>("gpu_losses_and_backward_parity_f32");
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_losses_and_backward_parity_bf16() {
        losses_parity::<bf16>("gpu_losses_and_backward_parity_bf16");
    }

    /// Token counts around a statistics chunk (16 at these sizes) and a backward block (4
    /// warps), expert counts around the 256 statistics threads and a warp.
    #[test]
    fn emu_losses_and_backward_parity_f32() {
        losses_parity_on::<f32>(
            "emu_losses_and_backward_parity_f32",
            &Backend::Emulator,
            24,
            vec![1, 3, 4, 5, 15, 16, 17, 100],
            vec![2, 8, 31, 33, 60, 256, 257, 600],
            1_000_000,
        );
    }

    #[test]
    fn emu_losses_and_backward_parity_bf16() {
        losses_parity_on::<bf16>(
            "emu_losses_and_backward_parity_bf16",
            &Backend::Emulator,
            24,
            vec![1, 3, 4, 5, 15, 16, 17, 100],
            vec![2, 8, 31, 33, 60, 256, 257, 600],
            1_000_000,
        );
    }

    // ------------------------------------------------------------ end to end

    /// DeepSeek-V3 with a bias end to end: route, permute padded to 64, gather through
    /// identity experts and combine with the routing weights (renormalised and x 2.5, so
    /// every row comes back x 2.5), then the bias update against the reference.
    fn identity_experts_and_bias_update_on(b: &Backend<'_>, tokens: usize) {
        let cfg = RouterConfig::deepseek_v3_default();
        let hidden = 64;
        let mut rng = Rng(3);
        let z: Vec<f32> = logits(&mut rng, tokens * cfg.experts, false)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let bias32: Vec<f32> = (0..cfg.experts).map(|e| (e % 5) as f32 * 0.125).collect();
        let (ids, w) = b.route(&cfg, &z, tokens, Some(&bias32), false).unwrap();
        let opts = PermuteOptions {
            block: 64,
            capacity_factor: None,
        };
        let perm = b
            .permute(&ids, (tokens, cfg.top_k, cfg.experts), opts, 1)
            .unwrap();
        let x: Vec<f32> = (0..tokens * hidden).map(|_| rng.uniform() as f32).collect();
        let xp = b.gather(&perm, &x, hidden, None).unwrap();
        let y = b.combine(&perm, &xp, hidden, tokens, Some(&w)).unwrap();
        for (i, (a, b)) in y.iter().zip(&x).enumerate() {
            assert!((a - 2.5 * b).abs() <= 1e-5, "element {i}: {a} vs 2.5 x {b}");
        }
        let counts = b.tables(&perm).unwrap().routed_counts;
        let got = b.update_bias(&perm, 0.001, &bias32).unwrap();
        let b64: Vec<f64> = bias32.iter().map(|&v| f64::from(v)).collect();
        let want = update_bias_f64(&b64, &counts, f64::from(0.001f32)).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g, *w as f32);
        }
        // Loads exactly at the mean leave their bias alone (sign 0): counts [3, 2, 2, 1],
        // mean 2.
        let ids = [0, 1, 0, 1, 0, 2, 3, 2];
        let perm = b
            .permute(&ids, (4, 2, 4), PermuteOptions::default(), 1)
            .unwrap();
        assert_eq!(b.tables(&perm).unwrap().routed_counts, vec![3, 2, 2, 1]);
        let got = b.update_bias(&perm, 0.5, &[0.25; 4]).unwrap();
        assert_eq!(got, vec![-0.25, 0.25, 0.25, 0.75]);
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_identity_experts_and_bias_update() {
        let Some(dev) = common::gpu("gpu_identity_experts_and_bias_update") else {
            return;
        };
        identity_experts_and_bias_update_on(&Backend::Gpu(&dev), 300);
    }

    #[test]
    fn emu_identity_experts_and_bias_update() {
        identity_experts_and_bias_update_on(&Backend::Emulator, 300);
    }

    // ------------------------------------------------------------ typed errors

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_rejects_bad_input() {
        let Some(dev) = common::gpu("gpu_rejects_bad_input") else {
            return;
        };
        let cfg = RouterConfig::mixtral(8, 2);
        let z = dev.zeros::<f32>(4 * 8).unwrap();
        let mut out = Routing::new(&dev, &cfg, 4).unwrap();
        route(&dev, &cfg, &z, 4, None, &mut out).unwrap();
        // Logits too short; outputs made for another token count; bias of wrong length.
        let z2 = dev.zeros::<f32>(2 * 8).unwrap();
        assert_eq!(
            invalid_arg(route(&dev, &cfg, &z2, 3, None, &mut out)),
            "logits"
        );
        let z3 = dev.zeros::<f32>(3 * 8).unwrap();
        assert_eq!(
            invalid_arg(route(&dev, &cfg, &z3, 3, None, &mut out)),
            "out"
        );
        let b7 = dev.zeros::<f32>(7).unwrap();
        assert_eq!(
            invalid_arg(route(&dev, &cfg, &z, 4, Some(&b7), &mut out)),
            "bias"
        );
        // Invalid configs.
        let bad = RouterConfig::mixtral(8, 9);
        assert_eq!(
            invalid_arg(route(&dev, &bad, &z, 4, None, &mut out)),
            "top_k"
        );
        assert_eq!(invalid_arg(Routing::new(&dev, &bad, 4)), "top_k");
        // ids out of range, duplicated, wrong length.
        assert_eq!(
            invalid_arg(ExpertIds::upload(&dev, &[0, 8], 1, 2, 8)),
            "ids"
        );
        assert_eq!(
            invalid_arg(ExpertIds::upload(&dev, &[3, 3], 1, 2, 8)),
            "ids"
        );
        assert_eq!(invalid_arg(ExpertIds::upload(&dev, &[3], 1, 2, 8)), "ids");
        // Capacity factor <= 0.
        let opts = PermuteOptions {
            block: 1,
            capacity_factor: Some(0.0),
        };
        assert_eq!(
            invalid_arg(Permutation::new(&dev, 4, 2, 8, opts)),
            "capacity_factor"
        );
        // A permutation for another shape; gather before permute; wrong hidden lengths.
        let mut perm5 = Permutation::new(&dev, 5, 2, 8, PermuteOptions::default()).unwrap();
        assert_eq!(invalid_arg(permute(&dev, out.ids(), &mut perm5)), "perm");
        let mut perm = Permutation::new(&dev, 4, 2, 8, PermuteOptions::default()).unwrap();
        let x = dev.zeros::<f32>(4 * 16).unwrap();
        let mut xp = dev.zeros::<f32>(8 * 16).unwrap();
        assert_eq!(
            invalid_arg(gather(&dev, &perm, &x, 16, None, &mut xp)),
            "perm"
        );
        permute(&dev, out.ids(), &mut perm).unwrap();
        gather(&dev, &perm, &x, 16, None, &mut xp).unwrap();
        assert_eq!(invalid_arg(gather(&dev, &perm, &x, 32, None, &mut xp)), "x");
        let mut short = dev.zeros::<f32>(7 * 16).unwrap();
        assert_eq!(
            invalid_arg(gather(&dev, &perm, &x, 16, None, &mut short)),
            "out"
        );
        let w3 = dev.zeros::<f32>(3).unwrap();
        let mut y = dev.zeros::<f32>(4 * 16).unwrap();
        assert_eq!(
            invalid_arg(combine(&dev, &perm, &xp, 16, Some(&w3), &mut y)),
            "weights"
        );
        let mut bias = dev.zeros::<f32>(7).unwrap();
        assert_eq!(
            invalid_arg(update_bias(&dev, &perm, 0.1, &mut bias)),
            "bias"
        );
        let mut dl = dev.zeros::<f32>(4 * 8).unwrap();
        let ids5 = ExpertIds::upload(&dev, &[0, 1, 2, 3, 4, 5, 6, 7, 0, 1], 5, 2, 8).unwrap();
        assert_eq!(
            invalid_arg(route_backward(
                &dev,
                &cfg,
                &z,
                4,
                &ids5,
                None,
                None,
                LossOptions {
                    aux_coef: 1.0,
                    z_coef: 1.0
                },
                &mut dl
            )),
            "ids"
        );
        assert_eq!(invalid_arg(RouterLosses::new(&dev, &cfg, 0)), "tokens");
    }

    /// The raw entries of the losses, the router backward and the bias update give the
    /// same bits as the safe ops on the same buffers, and refuse a null pointer.
    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_loss_raw_entries_match_safe() {
        use longctx::cudarc::driver::{DevicePtr, DevicePtrMut};
        use longctx::layout::RawBuffer;
        use longctx::moe::{route_backward_raw, router_losses_raw, update_bias_raw};
        let Some(dev) = common::gpu("gpu_loss_raw_entries_match_safe") else {
            return;
        };
        let tokens = 37usize;
        let cfg = RouterConfig::deepseek_v3(16, 4, 4, 2, true, 2.5);
        let mut rng = Rng(17);
        let z: Vec<f32> = (0..tokens * 16)
            .map(|_| 2.0 * rng.uniform() as f32)
            .collect();
        let dw: Vec<f32> = (0..tokens * cfg.top_k)
            .map(|_| rng.uniform() as f32)
            .collect();
        let dz = dev.upload(&z).unwrap();
        let ddw = dev.upload(&dw).unwrap();
        let mut r = Routing::new(&dev, &cfg, tokens).unwrap();
        route(&dev, &cfg, &dz, tokens, None, &mut r).unwrap();
        let mut perm = Permutation::new(
            &dev,
            tokens,
            cfg.top_k,
            cfg.experts,
            PermuteOptions::default(),
        )
        .unwrap();
        permute(&dev, r.ids(), &mut perm).unwrap();
        let opts = LossOptions {
            aux_coef: 0.01,
            z_coef: 0.001,
        };
        let s = dev.stream().clone();
        let (zp, _gz) = dz.device_ptr(&s);
        let (dwp, _gdw) = ddw.device_ptr(&s);
        let raw = |ptr: u64, len: usize| RawBuffer { ptr, len };

        let mut want = RouterLosses::new(&dev, &cfg, tokens).unwrap();
        router_losses(&dev, &cfg, &dz, tokens, &perm, opts, &mut want).unwrap();
        let mut got = RouterLosses::new(&dev, &cfg, tokens).unwrap();
        // SAFETY: zp addresses the live logits buffer of tokens x experts f32s.
        unsafe {
            router_losses_raw::<f32>(&dev, &cfg, raw(zp, z.len()), tokens, &perm, opts, &mut got)
        }
        .unwrap();
        assert_eq!(want.download(&dev).unwrap(), got.download(&dev).unwrap());
        // SAFETY: rejected before any launch (null pointer).
        let null = unsafe {
            router_losses_raw::<f32>(&dev, &cfg, raw(0, z.len()), tokens, &perm, opts, &mut got)
        };
        assert_eq!(invalid_arg(null), "logits");

        let mut d1 = dev.zeros::<f32>(tokens * 16).unwrap();
        route_backward(
            &dev,
            &cfg,
            &dz,
            tokens,
            r.ids(),
            Some(&ddw),
            Some(&perm),
            opts,
            &mut d1,
        )
        .unwrap();
        let mut d2 = dev.zeros::<f32>(tokens * 16).unwrap();
        {
            let (op, _go) = d2.device_ptr_mut(&s);
            // SAFETY: every pointer addresses a live buffer of the stated length; d2 is a
            // distinct allocation; the guards outlive the launch.
            unsafe {
                route_backward_raw::<f32>(
                    &dev,
                    &cfg,
                    raw(zp, z.len()),
                    tokens,
                    r.ids(),
                    Some(raw(dwp, dw.len())),
                    Some(&perm),
                    opts,
                    raw(op, tokens * 16),
                )
            }
            .unwrap();
        }
        assert_eq!(dev.download(&d1).unwrap(), dev.download(&d2).unwrap());

        let bias0: Vec<f32> = (0..16).map(|i| i as f32 * 0.01).collect();
        let mut b1 = dev.upload(&bias0).unwrap();
        let mut b2 = dev.upload(&bias0).unwrap();
        update_bias(&dev, &perm, 0.001, &mut b1).unwrap();
        {
            let (bp, _gb) = b2.device_ptr_mut(&s);
            // SAFETY: bp addresses the live bias buffer of 16 f32s, touched by nothing else.
            unsafe { update_bias_raw(&dev, &perm, 0.001, raw(bp, 16)) }.unwrap();
        }
        assert_eq!(dev.download(&b1).unwrap(), dev.download(&b2).unwrap());
    }

    /// Every op on views into larger buffers (offsets that break the 16-byte vector path
    /// included) and on raw pointers gives exactly what it gives on whole buffers, and
    /// leaves the buffers' other elements alone; a raw pointer that is not a multiple of
    /// its element is refused with ErrorKind::Alignment.
    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_views_and_raw_pointers_match_whole_buffers() {
        use longctx::cudarc::driver::{DevicePtr, DevicePtrMut};
        use longctx::layout::RawBuffer;
        use longctx::moe::{combine_raw, gather_raw, route_raw};
        use longctx::ErrorKind;
        let Some(dev) = common::gpu("gpu_views_and_raw_pointers_match_whole_buffers") else {
            return;
        };
        let (tokens, hidden) = (5usize, 24usize);
        let cfg = RouterConfig::deepseek_v3(16, 4, 4, 2, true, 2.5);
        let mut rng = Rng(7);
        let z: Vec<bf16> = (0..tokens * 16)
            .map(|_| bf16::from_f64(2.0 * rng.uniform()))
            .collect();
        let bias: Vec<f32> = (0..16).map(|_| rng.uniform() as f32 * 0.1).collect();
        let x: Vec<bf16> = (0..tokens * hidden)
            .map(|_| bf16::from_f64(2.0 * rng.uniform()))
            .collect();
        let pad = |v: &[bf16], before: usize| {
            let mut p = vec![bf16::from_f32(-7.0); before];
            p.extend_from_slice(v);
            p.extend(std::iter::repeat(bf16::from_f32(-7.0)).take(5));
            p
        };
        // Whole buffers.
        let dz = dev.upload(&z).unwrap();
        let db = dev.upload(&bias).unwrap();
        let mut want_route = Routing::new(&dev, &cfg, tokens).unwrap();
        route(&dev, &cfg, &dz, tokens, Some(&db), &mut want_route).unwrap();
        let want_routing = want_route.download(&dev).unwrap();
        let mut perm = Permutation::new(
            &dev,
            tokens,
            cfg.top_k,
            cfg.experts,
            PermuteOptions::default(),
        )
        .unwrap();
        permute(&dev, want_route.ids(), &mut perm).unwrap();
        let rows = perm.plan().max_slots;
        let dx = dev.upload(&x).unwrap();
        let mut xp = dev.zeros::<bf16>(rows * hidden).unwrap();
        gather(&dev, &perm, &dx, hidden, None, &mut xp).unwrap();
        let mut y = dev.zeros::<bf16>(tokens * hidden).unwrap();
        combine(&dev, &perm, &xp, hidden, Some(want_route.weights()), &mut y).unwrap();
        let (want_xp, want_y) = (dev.download(&xp).unwrap(), dev.download(&y).unwrap());

        // Views: inputs 1 element (2 bytes) into a larger buffer, outputs 3 in.
        let zb = dev.upload(&pad(&z, 1)).unwrap();
        let bb = dev.upload(&[&[9.0f32][..], &bias[..]].concat()).unwrap();
        let mut r = Routing::new(&dev, &cfg, tokens).unwrap();
        let bias_view = bb.slice(1..);
        route(
            &dev,
            &cfg,
            &zb.slice(1..1 + tokens * 16),
            tokens,
            Some(&bias_view),
            &mut r,
        )
        .unwrap();
        assert_eq!(r.download(&dev).unwrap(), want_routing, "route on views");
        let xb = dev.upload(&pad(&x, 1)).unwrap();
        let sentinel = bf16::from_f32(-3.0);
        let mut xpb = dev.upload(&vec![sentinel; rows * hidden + 8]).unwrap();
        gather(
            &dev,
            &perm,
            &xb.slice(1..),
            hidden,
            None,
            &mut xpb.slice_mut(3..),
        )
        .unwrap();
        let got = dev.download(&xpb).unwrap();
        assert_eq!(&got[3..3 + rows * hidden], &want_xp[..], "gather on views");
        assert!(got[..3]
            .iter()
            .chain(&got[3 + rows * hidden..])
            .all(|&v| v == sentinel));
        let mut yb = dev.upload(&vec![sentinel; tokens * hidden + 4]).unwrap();
        let w_view = want_route.weights().slice(..);
        combine(
            &dev,
            &perm,
            &xpb.slice(3..),
            hidden,
            Some(&w_view),
            &mut yb.slice_mut(1..),
        )
        .unwrap();
        let got = dev.download(&yb).unwrap();
        assert_eq!(
            &got[1..1 + tokens * hidden],
            &want_y[..],
            "combine on views"
        );
        assert_eq!(got[0], sentinel);

        // Raw pointers, the same offsets.
        let stream = dev.stream().clone();
        let raw = |ptr: u64, len: usize| RawBuffer { ptr, len };
        let mut r2 = Routing::new(&dev, &cfg, tokens).unwrap();
        let mut xpr = dev.upload(&vec![sentinel; rows * hidden + 8]).unwrap();
        let mut yr = dev.upload(&vec![sentinel; tokens * hidden + 4]).unwrap();
        {
            let (zp, _g0) = zb.device_ptr(&stream);
            let (bp, _g1) = bb.device_ptr(&stream);
            let (xr, _g2) = xb.device_ptr(&stream);
            let (xpp, _g3) = xpr.device_ptr_mut(&stream);
            let (wp, _g4) = want_route.weights().device_ptr(&stream);
            let (yp, _g5) = yr.device_ptr_mut(&stream);
            // SAFETY: every pointer is into a live allocation of this context, held (with
            // its guard) until the synchronize below, with at least the given elements
            // from the offset; the outputs are separate allocations from the inputs.
            unsafe {
                route_raw::<bf16>(
                    &dev,
                    &cfg,
                    raw(zp + 2, tokens * 16),
                    tokens,
                    Some(raw(bp + 4, 16)),
                    &mut r2,
                )
                .unwrap();
                gather_raw::<bf16>(
                    &dev,
                    &perm,
                    raw(xr + 2, tokens * hidden),
                    hidden,
                    None,
                    raw(xpp + 6, rows * hidden),
                )
                .unwrap();
                combine_raw::<bf16>(
                    &dev,
                    &perm,
                    raw(xpp + 6, rows * hidden),
                    hidden,
                    Some(raw(wp, tokens * cfg.top_k)),
                    raw(yp + 2, tokens * hidden),
                )
                .unwrap();
                let e = gather_raw::<bf16>(
                    &dev,
                    &perm,
                    raw(xr + 1, tokens * hidden),
                    hidden,
                    None,
                    raw(xpp, rows * hidden),
                )
                .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Alignment, "{e}");
                let e =
                    route_raw::<bf16>(&dev, &cfg, raw(0, 80), tokens, None, &mut r2).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            }
            dev.synchronize().unwrap();
        }
        assert_eq!(r2.download(&dev).unwrap(), want_routing, "route_raw");
        let got = dev.download(&xpr).unwrap();
        assert_eq!(&got[3..3 + rows * hidden], &want_xp[..], "gather_raw");
        let got = dev.download(&yr).unwrap();
        assert_eq!(&got[1..1 + tokens * hidden], &want_y[..], "combine_raw");
    }

    /// The emulator's ops validate as the GPU ones do (the same planning functions), with
    /// host slices standing in for the device types; an invalid call launches nothing.
    #[test]
    fn emu_rejects_bad_input() {
        let cfg = RouterConfig::mixtral(8, 2);
        let z = vec![0f32; 4 * 8];
        let (mut ids, mut w) = (vec![0i32; 8], vec![0f32; 8]);
        emulator::route(&cfg, &z, 4, None, &mut ids, &mut w).unwrap();
        // Logits too short; outputs too short; bias of wrong length.
        assert_eq!(
            invalid_arg(emulator::route(
                &cfg,
                &z[..23],
                3,
                None,
                &mut ids[..6],
                &mut w[..6]
            )),
            "logits"
        );
        // Outputs longer than needed are used from their start; shorter ones are refused.
        emulator::route(&cfg, &z[..24], 3, None, &mut ids, &mut w).unwrap();
        assert_eq!(
            invalid_arg(emulator::route(&cfg, &z, 4, None, &mut ids[..7], &mut w)),
            "out"
        );
        assert_eq!(
            invalid_arg(emulator::route(
                &cfg,
                &z,
                4,
                Some(&[0.0; 7]),
                &mut ids,
                &mut w
            )),
            "bias"
        );
        // Invalid configs.
        let bad = RouterConfig::mixtral(8, 9);
        assert_eq!(
            invalid_arg(emulator::route(&bad, &z, 4, None, &mut ids, &mut w)),
            "top_k"
        );
        // No tokens: nothing to do.
        emulator::route(&cfg, &[0f32; 0], 0, None, &mut [], &mut []).unwrap();
        // ids out of range, duplicated, wrong length.
        let mut perm1 = emulator::HostPermutation::new(1, 2, 8, PermuteOptions::default()).unwrap();
        assert_eq!(invalid_arg(emulator::permute(&[0, 8], &mut perm1)), "ids");
        assert_eq!(invalid_arg(emulator::permute(&[3, 3], &mut perm1)), "ids");
        assert_eq!(invalid_arg(emulator::permute(&[3], &mut perm1)), "ids");
        assert!(!perm1.is_filled());
        // Capacity factor <= 0.
        let opts = PermuteOptions {
            block: 1,
            capacity_factor: Some(0.0),
        };
        assert_eq!(
            invalid_arg(emulator::HostPermutation::new(4, 2, 8, opts)),
            "capacity_factor"
        );
        // Gather before permute; wrong hidden lengths.
        let mut perm = emulator::HostPermutation::new(4, 2, 8, PermuteOptions::default()).unwrap();
        let x = vec![0f32; 4 * 16];
        let mut xp = vec![0f32; 8 * 16];
        assert_eq!(
            invalid_arg(emulator::gather(&perm, &x, 16, None, &mut xp)),
            "perm"
        );
        emulator::permute(&ids, &mut perm).unwrap();
        emulator::gather(&perm, &x, 16, None, &mut xp).unwrap();
        assert_eq!(
            invalid_arg(emulator::gather(&perm, &x, 32, None, &mut xp)),
            "x"
        );
        assert_eq!(
            invalid_arg(emulator::gather(&perm, &x, 0, None, &mut xp)),
            "hidden"
        );
        let mut short = vec![0f32; 7 * 16];
        assert_eq!(
            invalid_arg(emulator::gather(&perm, &x, 16, None, &mut short)),
            "out"
        );
        let mut y = vec![0f32; 4 * 16];
        assert_eq!(
            invalid_arg(emulator::combine(&perm, &xp, 16, Some(&[0.0; 3]), &mut y)),
            "weights"
        );
        assert_eq!(
            invalid_arg(emulator::gather_backward(&perm, &xp[..16], 16, &mut y)),
            "d_permuted"
        );
        // Combine backward checks both launches' arguments before the first runs: with a
        // bad d_weights, d_expert_out keeps its contents.
        let mut d_eo = vec![7f32; 8 * 16];
        let mut d_w3 = vec![0f32; 3];
        assert_eq!(
            invalid_arg(emulator::combine_backward(
                &perm, &y, &xp, 16, &[1.0; 8], &mut d_eo, &mut d_w3
            )),
            "d_weights"
        );
        assert!(d_eo.iter().all(|&v| v == 7.0));
        let mut d_w = vec![0f32; 8];
        assert_eq!(
            invalid_arg(emulator::combine_backward(
                &perm,
                &y,
                &xp[..16],
                16,
                &[1.0; 8],
                &mut d_eo,
                &mut d_w
            )),
            "expert_out"
        );
        // Bias update: wrong length, gamma not finite.
        let mut bias7 = vec![0f32; 7];
        assert_eq!(
            invalid_arg(emulator::update_bias(&perm, 0.1, &mut bias7)),
            "bias"
        );
        let mut bias = vec![0f32; 8];
        assert_eq!(
            invalid_arg(emulator::update_bias(&perm, f64::NAN, &mut bias)),
            "gamma"
        );
        assert_eq!(
            invalid_arg(emulator::update_bias(&perm1, 0.1, &mut bias)),
            "perm"
        );
        // Router backward: ids for another token count, out of range, duplicated; output
        // of the wrong length; a permutation of another shape; no tokens is fine.
        let mut dl = vec![0f32; 4 * 8];
        let lo = LossOptions {
            aux_coef: 1.0,
            z_coef: 1.0,
        };
        let rb = |ids: &[i32], dl: &mut [f32], bal: Option<&emulator::HostPermutation>| {
            emulator::route_backward(&cfg, &z, 4, ids, None, bal, lo, dl)
        };
        assert_eq!(
            invalid_arg(rb(&[0, 1, 2, 3, 4, 5, 6, 7, 0, 1], &mut dl, None)),
            "ids"
        );
        assert_eq!(
            invalid_arg(rb(&[0, 1, 2, 3, 4, 5, 6, 8], &mut dl, None)),
            "ids"
        );
        assert_eq!(
            invalid_arg(rb(&[0, 1, 2, 3, 4, 5, 6, 6], &mut dl, None)),
            "ids"
        );
        assert_eq!(invalid_arg(rb(&ids, &mut dl[..31], None)), "d_logits");
        rb(&ids, &mut dl, Some(&perm)).unwrap();
        let mut perm5 = emulator::HostPermutation::new(5, 2, 8, PermuteOptions::default()).unwrap();
        emulator::permute(&[0, 1, 2, 3, 4, 5, 6, 7, 0, 1], &mut perm5).unwrap();
        assert_eq!(invalid_arg(rb(&ids, &mut dl, Some(&perm5))), "perm");
        emulator::route_backward(&cfg, &[0f32; 0], 0, &[], None, None, lo, &mut []).unwrap();
        // Losses: no tokens, a permutation of another shape, a coefficient not finite.
        assert_eq!(
            invalid_arg(emulator::router_losses(&cfg, &[0f32; 0], 0, &perm, lo)),
            "tokens"
        );
        assert_eq!(
            invalid_arg(emulator::router_losses(&cfg, &z, 4, &perm5, lo)),
            "perm"
        );
        let nan = LossOptions {
            aux_coef: f64::NAN,
            z_coef: 1.0,
        };
        assert_eq!(
            invalid_arg(emulator::router_losses(&cfg, &z, 4, &perm, nan)),
            "aux_coef"
        );
    }
}
