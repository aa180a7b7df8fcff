//! MoE routing: configs from real models, invariants of the f64 reference, HF-style routers
//! written here from the model code's steps, finite-difference gradients, a step-by-step
//! host emulation of the permutation kernels, typed errors, and GPU-vs-reference parity
//! (proptest; skipped visibly without a GPU).

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
        "top_k"
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
            LossOptions::default()
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
            let choice = choice_scores(&cfg, zt, bias_arg);
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
                let gs = group_scores(&cfg, &choice);
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
    let choice = choice_scores(cfg, z, bias);
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

// ---------------------------------------------------------------- GPU parity

mod gpu {
    use super::*;
    use half::bf16;
    use longctx::device::Device;
    use longctx::dtype::Element;
    use longctx::moe::{
        combine, combine_backward, gather, gather_backward, permute, route, route_backward,
        route_block_kernel, router_losses, update_bias, ExpertIds, MoeElement, Permutation,
        RouterLosses, Routing,
    };

    fn cases(default: u32) -> u32 {
        std::env::var("LONGCTX_PARITY_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn fail(e: Error) -> TestCaseError {
        TestCaseError::fail(e.to_string())
    }

    /// Whether the token's ranking has a near-tie that f32 and f64 may break differently:
    /// only when ranking on probability + bias or top-2 sums (ranking on logits compares the
    /// same numbers on both sides).
    fn ambiguous(cfg: &RouterConfig, z: &[f64], bias: Option<&[f64]>) -> bool {
        let top2 = matches!(
            cfg.grouping.filter(|g| g.n_group > 1).map(|g| g.score),
            Some(GroupScore::Top2Sum)
        );
        if bias.is_none() && !top2 {
            return false;
        }
        let c = choice_scores(cfg, z, bias);
        let near = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.windows(2)
                .any(|w| w[1] != w[0] && (w[1] - w[0]) <= 1e-5 * w[0].abs().max(1.0))
        };
        near(c.clone()) || near(group_scores(cfg, &c))
    }

    #[derive(Debug, Clone)]
    struct RouteCase {
        seed: u64,
        tokens: usize,
        experts: usize,
        max_k: usize,
        ties: bool,
        use_bias: bool,
    }

    fn route_case() -> impl Strategy<Value = RouteCase> {
        (
            any::<u64>(),
            prop::sample::select(vec![1usize, 2, 3, 5, 31, 33, 64, 257, 1000]),
            prop::sample::select(vec![
                1usize, 2, 3, 7, 8, 16, 60, 64, 100, 128, 160, 256, 257, 384, 500, 512, 513, 768,
                1000, 4096,
            ]),
            prop::sample::select(vec![2usize, 8, 8, 40, 600]),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(seed, tokens, experts, max_k, ties, use_bias)| RouteCase {
                seed,
                // Keep the f64 reference quick.
                tokens: tokens.min((1 << 19) / experts).max(1),
                experts,
                max_k,
                ties,
                use_bias,
            })
    }

    /// Runs one routing case on both kernels and compares with the reference; returns the
    /// number of tokens skipped as near-ties.
    fn run_route<T: MoeElement>(dev: &Device, c: &RouteCase) -> Result<usize, TestCaseError> {
        let mut rng = Rng(c.seed);
        let cfg = random_config(&mut rng, c.experts, c.max_k);
        let z_host: Vec<T> = logits(&mut rng, c.tokens * c.experts, c.ties)
            .into_iter()
            .map(T::from_f64)
            .collect();
        let z: Vec<f64> = z_host.iter().map(|v| v.to_f64()).collect();
        let b = bias(&mut rng, c.experts);
        let bias_arg = c.use_bias.then_some(&b[..]);
        let want = route_f64(&cfg, &z, c.tokens, bias_arg).map_err(fail)?;
        let dz = dev.upload(&z_host).map_err(fail)?;
        let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
        let db = dev.upload(&b32).map_err(fail)?;
        let bias_dev = c.use_bias.then_some(&db);
        let mut skipped = 0;
        for block_kernel in [false, true] {
            let mut out = Routing::new(dev, &cfg, c.tokens).map_err(fail)?;
            if block_kernel {
                route_block_kernel(dev, &cfg, &dz, c.tokens, bias_dev, &mut out)
            } else {
                route(dev, &cfg, &dz, c.tokens, bias_dev, &mut out)
            }
            .map_err(fail)?;
            let (ids, w) = out.download(dev).map_err(fail)?;
            let k = cfg.top_k;
            for t in 0..c.tokens {
                let zt = &z[t * c.experts..(t + 1) * c.experts];
                let got = &ids[t * k..(t + 1) * k];
                if ambiguous(&cfg, zt, bias_arg) {
                    skipped += 1;
                    for j in 0..k {
                        prop_assert!(got[j] >= 0 && (got[j] as usize) < c.experts);
                        prop_assert!(!got[..j].contains(&got[j]));
                    }
                    continue;
                }
                prop_assert_eq!(
                    got,
                    &want.ids[t * k..(t + 1) * k],
                    "{:?} {:?} block kernel {} token {}",
                    c,
                    cfg,
                    block_kernel,
                    t
                );
                for j in 0..k {
                    let (g, r) = (f64::from(w[t * k + j]), want.weights[t * k + j]);
                    prop_assert!(
                        (g - r).abs() <= 2e-5 * r.abs().max(cfg.routed_scaling_factor * 1e-3),
                        "{:?} {:?} block kernel {} token {} rank {}: weight {} vs {}",
                        c,
                        cfg,
                        block_kernel,
                        t,
                        j,
                        g,
                        r
                    );
                }
            }
        }
        Ok(skipped)
    }

    fn route_parity<T: MoeElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: cases(96),
            ..ProptestConfig::default()
        });
        let skipped = std::cell::Cell::new(0usize);
        runner
            .run(&route_case(), |c| {
                skipped.set(skipped.get() + run_route::<T>(&dev, &c)?);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!("{name}: {} near-tie tokens skipped", skipped.get());
    }

    #[test]
    fn gpu_route_parity_f32() {
        route_parity::<f32>("gpu_route_parity_f32");
    }

    #[test]
    fn gpu_route_parity_bf16() {
        route_parity::<bf16>("gpu_route_parity_bf16");
    }

    /// Real model shapes at 64k tokens: Mixtral, Qwen3-MoE and DeepSeek-V3 (with bias).
    #[test]
    fn gpu_route_parity_model_shapes_64k() {
        let Some(dev) = common::gpu("gpu_route_parity_model_shapes_64k") else {
            return;
        };
        let tokens = 65536;
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
            let b = bias(&mut rng, cfg.experts);
            let bias_arg = with_bias.then_some(&b[..]);
            let want = route_f64(&cfg, &z, tokens, bias_arg).unwrap();
            let dz = dev.upload(&z_host).unwrap();
            let db = dev
                .upload(&b.iter().map(|&x| x as f32).collect::<Vec<_>>())
                .unwrap();
            let mut out = Routing::new(&dev, &cfg, tokens).unwrap();
            route(&dev, &cfg, &dz, tokens, with_bias.then_some(&db), &mut out).unwrap();
            let (ids, w) = out.download(&dev).unwrap();
            let k = cfg.top_k;
            let mut skipped = 0;
            for t in 0..tokens {
                let zt = &z[t * cfg.experts..(t + 1) * cfg.experts];
                if ambiguous(&cfg, zt, bias_arg) {
                    skipped += 1;
                    continue;
                }
                assert_eq!(
                    &ids[t * k..(t + 1) * k],
                    &want.ids[t * k..(t + 1) * k],
                    "{cfg:?} token {t}"
                );
                for j in 0..k {
                    let (g, r) = (f64::from(w[t * k + j]), want.weights[t * k + j]);
                    assert!(
                        (g - r).abs() <= 2e-5 * r.abs().max(1e-3),
                        "{cfg:?} token {t}: {g} vs {r}"
                    );
                }
            }
            assert!(
                skipped < tokens / 100,
                "{skipped} near-tie tokens of {tokens}"
            );
        }
    }

    #[test]
    fn gpu_permutation_parity() {
        let Some(dev) = common::gpu("gpu_permutation_parity") else {
            return;
        };
        let strategy = (
            any::<u64>(),
            prop::sample::select(vec![0usize, 1, 2, 7, 33, 100, 513, 3000, 70000]),
            prop::sample::select(vec![1usize, 2, 3, 8, 60, 128, 256, 1000, 4096]),
            1usize..=8,
            prop::sample::select(vec![1usize, 2, 16, 64, 128]),
            prop::sample::select(vec![None, Some(0.3), Some(1.0), Some(1.25), Some(4.0)]),
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: cases(96),
            ..ProptestConfig::default()
        });
        runner
            .run(&strategy, |(seed, tokens, experts, k, block, cf)| {
                let k = k.min(experts);
                let mut rng = Rng(seed);
                let ids = random_ids(&mut rng, tokens, k, experts);
                let opts = PermuteOptions {
                    block,
                    capacity_factor: cf,
                };
                let want = permute_f64(&ids, tokens, k, experts, opts).map_err(fail)?;
                let dids = ExpertIds::upload(&dev, &ids, tokens, k, experts).map_err(fail)?;
                let mut perm = Permutation::new(&dev, tokens, k, experts, opts).map_err(fail)?;
                permute(&dev, &dids, &mut perm).map_err(fail)?;
                // Twice: the result must not depend on the previous contents.
                permute(&dev, &dids, &mut perm).map_err(fail)?;
                let got = perm.download(&dev).map_err(fail)?;
                prop_assert_eq!(got, want);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("gpu_permutation_parity: {e}"));
    }

    fn tol_of<T: Element>() -> f64 {
        match T::DTYPE {
            longctx::dtype::DType::F32 => 2e-6,
            dt => 2.0 * dt.epsilon(),
        }
    }

    fn hidden_parity<T: MoeElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        let strategy = (
            any::<u64>(),
            prop::sample::select(vec![1usize, 7, 100, 513]),
            prop::sample::select(vec![1usize, 3, 8, 64, 100, 1024, 4096]),
            prop::sample::select(vec![None, Some(0.5)]),
            prop::sample::select(vec![1usize, 16]),
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: cases(48),
            ..ProptestConfig::default()
        });
        runner
            .run(&strategy, |(seed, tokens, hidden, cf, block)| {
                let mut rng = Rng(seed);
                let (k, experts) = (4usize, 16usize);
                let ids = random_ids(&mut rng, tokens, k, experts);
                let opts = PermuteOptions {
                    block,
                    capacity_factor: cf,
                };
                let tables = permute_f64(&ids, tokens, k, experts, opts).map_err(fail)?;
                let rows = tables.slot_assignment.len();
                let dids = ExpertIds::upload(&dev, &ids, tokens, k, experts).map_err(fail)?;
                let mut perm = Permutation::new(&dev, tokens, k, experts, opts).map_err(fail)?;
                permute(&dev, &dids, &mut perm).map_err(fail)?;
                let host = |n: usize, rng: &mut Rng| -> (Vec<T>, Vec<f64>) {
                    let v: Vec<T> = (0..n).map(|_| T::from_f64(rng.uniform())).collect();
                    let f = v.iter().map(|x| x.to_f64()).collect();
                    (v, f)
                };
                let (x, x64) = host(tokens * hidden, &mut rng);
                let (eo, eo64) = host(rows * hidden, &mut rng);
                let (g, g64) = host(tokens * hidden, &mut rng);
                let w32: Vec<f32> = (0..tokens * k).map(|_| rng.uniform() as f32).collect();
                let w64: Vec<f64> = w32.iter().map(|&v| f64::from(v)).collect();
                let up = |v: &[T]| dev.upload(v).map_err(fail);
                let (dx, deo, dg) = (up(&x)?, up(&eo)?, up(&g)?);
                let dw = dev.upload(&w32).map_err(fail)?;
                let tol = tol_of::<T>();
                let close = |got: &[T],
                             want: &[f64],
                             scale: &[f64],
                             what: &str|
                 -> Result<(), TestCaseError> {
                    for (i, (a, b)) in got.iter().zip(want).enumerate() {
                        let e = (a.to_f64() - b).abs();
                        prop_assert!(
                            e <= tol * scale[i].max(1e-30) + 1e-30,
                            "{} [{}]: {} vs {}",
                            what,
                            i,
                            a.to_f64(),
                            b
                        );
                    }
                    Ok(())
                };
                // Gather, plain and scaled.
                for scaled in [false, true] {
                    let mut out = dev.zeros::<T>(rows * hidden).map_err(fail)?;
                    gather(&dev, &perm, &dx, hidden, scaled.then_some(&dw), &mut out)
                        .map_err(fail)?;
                    let got = dev.download(&out).map_err(fail)?;
                    let want = gather_f64(&x64, hidden, k, &tables, scaled.then_some(&w64[..]))
                        .map_err(fail)?;
                    let mag: Vec<f64> = want.iter().map(|v| v.abs()).collect();
                    close(&got, &want, &mag, "gather")?;
                }
                // Combine (and the gather's gradient, the unweighted combine).
                let abs_eo: Vec<f64> = eo64.iter().map(|v| v.abs()).collect();
                let abs_w: Vec<f64> = w64.iter().map(|v| v.abs()).collect();
                for weighted in [true, false] {
                    let mut out = dev.zeros::<T>(tokens * hidden).map_err(fail)?;
                    if weighted {
                        combine(&dev, &perm, &deo, hidden, Some(&dw), &mut out).map_err(fail)?;
                    } else {
                        gather_backward(&dev, &perm, &deo, hidden, &mut out).map_err(fail)?;
                    }
                    let got = dev.download(&out).map_err(fail)?;
                    let w_arg = weighted.then_some(&w64[..]);
                    let want = combine_f64(&eo64, hidden, k, &tables, w_arg).map_err(fail)?;
                    let mag =
                        combine_f64(&abs_eo, hidden, k, &tables, weighted.then_some(&abs_w[..]))
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
                let mut d_eo = dev.zeros::<T>(rows * hidden).map_err(fail)?;
                let mut d_w = dev.zeros::<f32>(tokens * k).map_err(fail)?;
                combine_backward(&dev, &perm, &dg, &deo, hidden, &dw, &mut d_eo, &mut d_w)
                    .map_err(fail)?;
                let (want_eo, want_w) =
                    combine_backward_f64(&g64, &eo64, hidden, k, &tables, &w64).map_err(fail)?;
                let mag: Vec<f64> = want_eo.iter().map(|v| v.abs()).collect();
                close(
                    &dev.download(&d_eo).map_err(fail)?,
                    &want_eo,
                    &mag,
                    "d_expert_out",
                )?;
                let got_w = dev.download(&d_w).map_err(fail)?;
                let abs_g: Vec<f64> = g64.iter().map(|v| v.abs()).collect();
                let (_, mag_w) = combine_backward_f64(&abs_g, &abs_eo, hidden, k, &tables, &w64)
                    .map_err(fail)?;
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
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    #[test]
    fn gpu_gather_combine_parity_f32() {
        hidden_parity::<f32>("gpu_gather_combine_parity_f32");
    }

    #[test]
    fn gpu_gather_combine_parity_bf16() {
        hidden_parity::<bf16>("gpu_gather_combine_parity_bf16");
    }

    fn losses_parity<T: MoeElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        let strategy = (
            any::<u64>(),
            prop::sample::select(vec![1usize, 3, 100, 1000, 5000]),
            prop::sample::select(vec![2usize, 8, 60, 128, 256, 600]),
            any::<bool>(),
            any::<bool>(),
        );
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: cases(48),
            ..ProptestConfig::default()
        });
        runner
            .run(&strategy, |(seed, tokens, experts, use_dw, use_aux)| {
                // The reference's load-balancing Jacobian is O(experts^2) per token.
                let tokens = tokens.min((20_000_000 / (experts * experts)).max(1));
                let mut rng = Rng(seed);
                let cfg = random_config(&mut rng, experts, 8);
                let z_host: Vec<T> = logits(&mut rng, tokens * experts, false)
                    .into_iter()
                    .map(T::from_f64)
                    .collect();
                let z: Vec<f64> = z_host.iter().map(|v| v.to_f64()).collect();
                let dz = dev.upload(&z_host).map_err(fail)?;
                let mut routing = Routing::new(&dev, &cfg, tokens).map_err(fail)?;
                route(&dev, &cfg, &dz, tokens, None, &mut routing).map_err(fail)?;
                let ids = routing.ids().download(&dev).map_err(fail)?;
                let mut perm =
                    Permutation::new(&dev, tokens, cfg.top_k, experts, PermuteOptions::default())
                        .map_err(fail)?;
                permute(&dev, routing.ids(), &mut perm).map_err(fail)?;
                let counts = perm.download(&dev).map_err(fail)?.routed_counts;
                let opts = LossOptions {
                    aux_coef: 0.01,
                    z_coef: 0.001,
                };
                let mut losses = RouterLosses::new(&dev, &cfg, tokens).map_err(fail)?;
                router_losses(&dev, &cfg, &dz, tokens, &perm, opts, &mut losses).map_err(fail)?;
                let (aux, zl) = losses.download(&dev).map_err(fail)?;
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
                let p = dev.download(losses.mean_probs()).map_err(fail)?;
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
                let ddw = dev.upload(&dw_host).map_err(fail)?;
                let mut dl = dev.zeros::<f32>(tokens * experts).map_err(fail)?;
                route_backward(
                    &dev,
                    &cfg,
                    &dz,
                    tokens,
                    routing.ids(),
                    use_dw.then_some(&ddw),
                    use_aux.then_some(&perm),
                    opts,
                    &mut dl,
                )
                .map_err(fail)?;
                let got = dev.download(&dl).map_err(fail)?;
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
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    #[test]
    fn gpu_losses_and_backward_parity_f32() {
        losses_parity::<f32>("gpu_losses_and_backward_parity_f32");
    }

    #[test]
    fn gpu_losses_and_backward_parity_bf16() {
        losses_parity::<bf16>("gpu_losses_and_backward_parity_bf16");
    }

    #[test]
    fn gpu_identity_experts_and_bias_update() {
        let Some(dev) = common::gpu("gpu_identity_experts_and_bias_update") else {
            return;
        };
        let cfg = RouterConfig::deepseek_v3_default();
        let (tokens, hidden) = (300, 64);
        let mut rng = Rng(3);
        let z: Vec<f32> = logits(&mut rng, tokens * cfg.experts, false)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let dz = dev.upload(&z).unwrap();
        let b: Vec<f32> = (0..cfg.experts).map(|e| (e % 5) as f32 * 0.125).collect();
        let mut db = dev.upload(&b).unwrap();
        let mut routing = Routing::new(&dev, &cfg, tokens).unwrap();
        route(&dev, &cfg, &dz, tokens, Some(&db), &mut routing).unwrap();
        let mut perm = Permutation::new(
            &dev,
            tokens,
            cfg.top_k,
            cfg.experts,
            PermuteOptions {
                block: 64,
                capacity_factor: None,
            },
        )
        .unwrap();
        permute(&dev, routing.ids(), &mut perm).unwrap();
        let x: Vec<f32> = (0..tokens * hidden).map(|_| rng.uniform() as f32).collect();
        let dx = dev.upload(&x).unwrap();
        let mut xp = dev.zeros::<f32>(perm.plan().max_slots * hidden).unwrap();
        gather(&dev, &perm, &dx, hidden, None, &mut xp).unwrap();
        let mut y = dev.zeros::<f32>(tokens * hidden).unwrap();
        combine(&dev, &perm, &xp, hidden, Some(routing.weights()), &mut y).unwrap();
        let y = dev.download(&y).unwrap();
        // Renormalised and scaled by 2.5: each row comes back times 2.5.
        for (i, (a, b)) in y.iter().zip(&x).enumerate() {
            assert!((a - 2.5 * b).abs() <= 1e-5, "element {i}: {a} vs 2.5 x {b}");
        }
        let counts = perm.download(&dev).unwrap().routed_counts;
        update_bias(&dev, &perm, 0.001, &mut db).unwrap();
        let got = dev.download(&db).unwrap();
        let b64: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
        let want = update_bias_f64(&b64, &counts, f64::from(0.001f32)).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g, *w as f32);
        }
    }

    #[test]
    fn gpu_rejects_bad_input() {
        let Some(dev) = common::gpu("gpu_rejects_bad_input") else {
            return;
        };
        let cfg = RouterConfig::mixtral(8, 2);
        let z = dev.zeros::<f32>(4 * 8).unwrap();
        let mut out = Routing::new(&dev, &cfg, 4).unwrap();
        route(&dev, &cfg, &z, 4, None, &mut out).unwrap();
        // Logits of the wrong length; outputs for another token count; bias of wrong length.
        assert_eq!(
            invalid_arg(route(&dev, &cfg, &z, 3, None, &mut out)),
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
        assert_eq!(invalid_arg(gather(&dev, &perm, &x, 8, None, &mut xp)), "x");
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
                LossOptions::default(),
                &mut dl
            )),
            "ids"
        );
        assert_eq!(invalid_arg(RouterLosses::new(&dev, &cfg, 0)), "tokens");
    }
}
