//! Mixture-of-experts routing: fused gating, token permutation for grouped GEMMs, gather and
//! combine, load-balancing statistics, and the router's backward pass.
//!
//! * [`RouterConfig`] describes a router with HF transformers' semantics (Mixtral, Qwen2/3-MoE,
//!   DeepSeek-V2 and V3), from a builder or a model's config.json.
//! * [`route`] runs the fused gating kernel: scores (softmax or sigmoid), optional
//!   DeepSeek-V3 correction bias (moves the choice only), group-limited routing, top-k,
//!   renormalisation and `routed_scaling_factor`.
//! * [`permute`] sorts the tokens x top_k assignments by expert, stable in token order, with
//!   per-expert counts, offsets, optional padding of each expert's segment to a block multiple
//!   and an optional capacity; [`gather`] / [`combine`] move hidden states into and out of that
//!   order, [`gather_backward`] / [`combine_backward`] are their gradients.
//! * [`router_losses`] computes the Switch load-balancing loss and the ST-MoE z-loss,
//!   [`route_backward`] the gradient of the routing weights and of both losses with respect
//!   to the logits, and [`update_bias`] DeepSeek's auxiliary-loss-free bias step.
//! * [`reference`](mod@reference) is the f64 CPU reference of all of it.
//!
//! Ties go to the lower expert id (and the lower group id) on the GPU and in the reference
//! alike: the chosen experts are ordered by descending selection score, then ascending id.
//!
//! One difference from HF transformers, on purpose: HF's DeepSeek-V3 router fills the experts
//! of discarded groups with 0.0 before its final top-k, so an expert outside the kept groups
//! can still be chosen when some kept expert's biased score is negative. longctx never
//! chooses outside the kept groups (DeepSeek's own inference code, vLLM and SGLang mask with
//! -inf). With non-negative biased scores, as in every released checkpoint's routing, the two
//! agree.

pub(crate) mod cuda;
pub(crate) mod plan;
pub mod reference;

pub use cuda::{
    combine, combine_backward, combine_backward_raw, combine_raw, gather, gather_backward,
    gather_backward_raw, gather_raw, permute, route, route_backward, route_backward_raw,
    route_block_kernel, route_raw, router_losses, router_losses_raw, update_bias, update_bias_raw,
    ExpertIds, Permutation, RouterLosses, Routing,
};
pub use plan::{
    capacity, GatePath, GatePlan, PermutePlan, StatsPlan, MAX_BLOCK, MAX_EXPERTS, WARP_MAX_EXPERTS,
    WARP_MAX_TOP_K,
};

use crate::dtype::Element;
use crate::error::{Error, Result};

const OP: &str = "moe";

/// How logits become routing probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen-MoE, DeepSeek-V2).
    #[default]
    Softmax,
    /// An independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// How a group of experts is scored in group-limited routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's largest choice score (DeepSeek-V2's `group_limited_greedy`).
    Max,
    /// The sum of the group's two largest choice scores (DeepSeek-V3's `noaux_tc`). Needs
    /// at least two experts per group.
    Top2Sum,
}

/// Group-limited routing: experts split into `n_group` equal consecutive groups; only the
/// `topk_group` best groups are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    /// Number of groups; must divide the expert count.
    pub n_group: usize,
    /// Groups kept per token, 1..=n_group.
    pub topk_group: usize,
    /// Group scoring rule.
    pub score: GroupScore,
}

/// A router: how logits \[tokens, experts\] become top-k expert ids and weights.
///
/// Per token: score = softmax or sigmoid of the logits; choice = score + bias when a
/// correction bias is passed to [`route`] (DeepSeek-V3), else score; with [`Grouping`], only
/// experts of the best groups are eligible; the top_k eligible experts by (choice desc, id
/// asc) are chosen; their weights are their unbiased scores, divided by (sum + 1e-20) when
/// `renormalize`, times `routed_scaling_factor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    /// Number of routed experts, 1..=[`MAX_EXPERTS`].
    pub experts: usize,
    /// Experts chosen per token, 1..=eligible experts.
    pub top_k: usize,
    /// Scoring function.
    pub scoring: Scoring,
    /// Group-limited routing, if any.
    pub grouping: Option<Grouping>,
    /// Divide the chosen weights by their sum (Mixtral always; Qwen and DeepSeek:
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// Multiplies the final weights (DeepSeek's `routed_scaling_factor`; 1 elsewhere).
    pub routed_scaling_factor: f64,
}

impl RouterConfig {
    /// Mixtral: softmax, top-k, always renormalised (Mixtral-8x7B: 8 experts, top-2).
    pub fn mixtral(experts: usize, top_k: usize) -> Self {
        RouterConfig {
            experts,
            top_k,
            scoring: Scoring::Softmax,
            grouping: None,
            renormalize: true,
            routed_scaling_factor: 1.0,
        }
    }

    /// Qwen2-MoE / Qwen3-MoE: softmax, top-k, renormalised iff `norm_topk_prob`
    /// (Qwen3-30B-A3B: 128 experts, top-8, true).
    pub fn qwen_moe(experts: usize, top_k: usize, norm_topk_prob: bool) -> Self {
        RouterConfig {
            renormalize: norm_topk_prob,
            ..Self::mixtral(experts, top_k)
        }
    }

    /// DeepSeek-V2 (`group_limited_greedy`): softmax, groups scored by their max, weights
    /// times `routed_scaling_factor` (DeepSeek-V2: 160 experts, 8 groups, 3 kept, top-6, 16.0).
    pub fn deepseek_v2(
        experts: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        routed_scaling_factor: f64,
    ) -> Self {
        RouterConfig {
            experts,
            top_k,
            scoring: Scoring::Softmax,
            grouping: Some(Grouping {
                n_group,
                topk_group,
                score: GroupScore::Max,
            }),
            renormalize: false,
            routed_scaling_factor,
        }
    }

    /// DeepSeek-V3 (`noaux_tc`): sigmoid, correction bias for the choice, groups scored by
    /// their top-2 sum, renormalised iff `norm_topk_prob`, times `routed_scaling_factor`.
    /// [`RouterConfig::deepseek_v3_default`] has the released model's numbers.
    pub fn deepseek_v3(
        experts: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f64,
    ) -> Self {
        RouterConfig {
            experts,
            top_k,
            scoring: Scoring::Sigmoid,
            grouping: Some(Grouping {
                n_group,
                topk_group,
                score: GroupScore::Top2Sum,
            }),
            renormalize: norm_topk_prob,
            routed_scaling_factor,
        }
    }

    /// DeepSeek-V3 as released: 256 experts, 8 groups, 4 kept, top-8, renormalised, x 2.5.
    pub fn deepseek_v3_default() -> Self {
        Self::deepseek_v3(256, 8, 8, 4, true, 2.5)
    }

    /// Reads the router from a model's config.json, by `model_type`: `mixtral`
    /// (`num_local_experts`), `qwen2_moe` / `qwen3_moe` (`num_experts`, `norm_topk_prob`),
    /// `deepseek_v2` (`n_routed_experts`, `topk_method` greedy or group_limited_greedy,
    /// `n_group`, `topk_group`, `routed_scaling_factor`) and `deepseek_v3` (the same keys,
    /// sigmoid scoring, `norm_topk_prob`). Defaults follow HF's config classes.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key that is missing, of the wrong type or unsupported
    /// (an unknown `model_type`, a `scoring_func` or `topk_method` other than the model's),
    /// and the errors of [`RouterConfig::validate`] as [`Error::Config`] naming the
    /// config.json key of the field (`num_local_experts` / `num_experts` /
    /// `n_routed_experts`, `num_experts_per_tok`, `n_group`, `topk_group`,
    /// `routed_scaling_factor`).
    pub fn from_hf_config(json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::config("config.json", format!("not valid JSON: {e}")))?;
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .ok_or_else(|| Error::config("model_type", "missing or not a string"))?;
        let uint = |key: &str| -> Result<usize> {
            let x = v
                .get(key)
                .ok_or_else(|| Error::config(key, "missing"))?
                .as_u64()
                .ok_or_else(|| Error::config(key, "not a non-negative integer"))?;
            usize::try_from(x).map_err(|_| Error::config(key, "too large"))
        };
        let uint_or = |key: &str, default: usize| -> Result<usize> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(_) => uint(key),
            }
        };
        let boolean_or = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| Error::config(key, "not a boolean")),
            }
        };
        let float_or = |key: &str, default: f64| -> Result<f64> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| Error::config(key, "not a number")),
            }
        };
        let string_or = |key: &str, default: &'static str| -> Result<String> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default.to_string()),
                Some(x) => x
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::config(key, "not a string")),
            }
        };
        let experts_key = match model_type {
            "mixtral" => "num_local_experts",
            "qwen2_moe" | "qwen3_moe" => "num_experts",
            _ => "n_routed_experts",
        };
        let cfg = match model_type {
            "mixtral" => Self::mixtral(uint("num_local_experts")?, uint("num_experts_per_tok")?),
            "qwen2_moe" | "qwen3_moe" => Self::qwen_moe(
                uint("num_experts")?,
                uint("num_experts_per_tok")?,
                boolean_or("norm_topk_prob", false)?,
            ),
            "deepseek_v2" => {
                let scoring = string_or("scoring_func", "softmax")?;
                if scoring != "softmax" {
                    return Err(Error::config(
                        "scoring_func",
                        format!("`{scoring}` is not supported for deepseek_v2 (softmax only)"),
                    ));
                }
                let experts = uint("n_routed_experts")?;
                let top_k = uint("num_experts_per_tok")?;
                let scale = float_or("routed_scaling_factor", 1.0)?;
                let method = string_or("topk_method", "greedy")?;
                let mut cfg = match method.as_str() {
                    "greedy" => Self::qwen_moe(experts, top_k, false),
                    "group_limited_greedy" => Self::deepseek_v2(
                        experts,
                        top_k,
                        uint_or("n_group", 1)?,
                        uint_or("topk_group", 1)?,
                        scale,
                    ),
                    other => {
                        return Err(Error::config(
                            "topk_method",
                            format!(
                                "`{other}` is not supported for deepseek_v2 (greedy or group_limited_greedy)"
                            ),
                        ))
                    }
                };
                cfg.routed_scaling_factor = scale;
                cfg.renormalize = boolean_or("norm_topk_prob", false)? && top_k > 1;
                cfg
            }
            "deepseek_v3" => {
                let scoring = string_or("scoring_func", "sigmoid")?;
                if scoring != "sigmoid" {
                    return Err(Error::config(
                        "scoring_func",
                        format!("`{scoring}` is not supported for deepseek_v3 (sigmoid only)"),
                    ));
                }
                let method = string_or("topk_method", "noaux_tc")?;
                if method != "noaux_tc" {
                    return Err(Error::config(
                        "topk_method",
                        format!("`{method}` is not supported for deepseek_v3 (noaux_tc only)"),
                    ));
                }
                Self::deepseek_v3(
                    uint("n_routed_experts")?,
                    uint("num_experts_per_tok")?,
                    uint_or("n_group", 8)?,
                    uint_or("topk_group", 4)?,
                    boolean_or("norm_topk_prob", true)?,
                    float_or("routed_scaling_factor", 2.5)?,
                )
            }
            other => {
                return Err(Error::config(
                    "model_type",
                    format!(
                        "`{other}` has no router here (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3)"
                    ),
                ))
            }
        };
        cfg.validate().map_err(|e| match e {
            Error::InvalidArgument { arg, problem, .. } => {
                let key = match arg {
                    "experts" => experts_key,
                    "top_k" => "num_experts_per_tok",
                    other => other,
                };
                Error::config(key, problem)
            }
            other => other,
        })?;
        Ok(cfg)
    }

    /// The grouping that actually limits the choice (`None` for one group).
    pub(crate) fn effective_grouping(&self) -> Option<Grouping> {
        self.grouping.filter(|g| g.n_group > 1)
    }

    /// Experts a token may choose from after group limiting (saturating, for a config that
    /// has not been validated).
    pub fn eligible_experts(&self) -> usize {
        match self.effective_grouping() {
            Some(g) if g.n_group > 0 => g.topk_group.saturating_mul(self.experts / g.n_group),
            _ => self.experts,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field: `experts` outside 1..=4096, `top_k` of 0
    /// or more than the eligible experts, `n_group` of 0 or not dividing `experts`,
    /// `topk_group` of 0 or more than `n_group`, [`GroupScore::Top2Sum`] with one expert per
    /// group, or a `routed_scaling_factor` that is not finite and positive, or rounds to 0
    /// or infinity in f32 (the kernels take it as f32).
    pub fn validate(&self) -> Result<()> {
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            let problem = format!("{} experts; 1..={MAX_EXPERTS} are supported", self.experts);
            return Err(if self.experts == 0 {
                Error::invalid(OP, "experts", problem)
            } else {
                Error::unsupported(OP, "experts", problem)
            });
        }
        if let Some(g) = self.grouping {
            if g.n_group == 0 || self.experts % g.n_group != 0 {
                return Err(Error::invalid(
                    OP,
                    "n_group",
                    format!(
                        "n_group {} must be at least 1 and divide the {} experts",
                        g.n_group, self.experts
                    ),
                ));
            }
            if g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(Error::invalid(
                    OP,
                    "topk_group",
                    format!(
                        "topk_group {} must be in 1..=n_group {}",
                        g.topk_group, g.n_group
                    ),
                ));
            }
            if g.score == GroupScore::Top2Sum && g.n_group > 1 && self.experts / g.n_group < 2 {
                return Err(Error::invalid(
                    OP,
                    "n_group",
                    format!(
                        "top-2 group scores need at least 2 experts per group; {} experts in {} groups",
                        self.experts, g.n_group
                    ),
                ));
            }
        }
        if self.top_k == 0 || self.top_k > self.eligible_experts() {
            return Err(Error::invalid(
                OP,
                "top_k",
                format!(
                    "top_k {} must be in 1..={} (the experts eligible after group limiting, of {})",
                    self.top_k,
                    self.eligible_experts(),
                    self.experts
                ),
            ));
        }
        let scale = self.routed_scaling_factor;
        let single = scale as f32;
        if !(scale.is_finite() && scale > 0.0 && single.is_finite() && single > 0.0) {
            return Err(Error::invalid(
                OP,
                "routed_scaling_factor",
                format!("{scale} must be finite and positive, in f64 and in f32"),
            ));
        }
        Ok(())
    }
}

/// How [`permute`] lays out the expert-ordered buffer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PermuteOptions {
    /// Each expert's segment is padded with empty slots to a multiple of this (the M tile of
    /// a grouped GEMM); 0 or 1 means no padding; at most [`MAX_BLOCK`].
    pub block: usize,
    /// Per-expert capacity = ceil(capacity_factor x tokens x top_k / experts); assignments
    /// past it are dropped in token order (later tokens first). `None`: no limit.
    pub capacity_factor: Option<f64>,
}

/// Coefficients of the router's training losses. There is no default: each term's weight is
/// a training decision (0 turns a term off), so callers name both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions {
    /// alpha of the Switch load-balancing loss alpha x E x sum_i f_i P_i, with f_i the
    /// fraction of the tokens x top_k assignments routed to expert i (before capacity) and
    /// P_i the mean over tokens of the router probability (softmax; for sigmoid scoring the
    /// sigmoids normalised to sum 1 per token). HF's `load_balancing_loss_func` divides by
    /// tokens only, so its value is top_k times this one: pass alpha x top_k to match it.
    pub aux_coef: f64,
    /// beta of the ST-MoE router z-loss beta x mean over tokens of logsumexp(logits)^2.
    pub z_coef: f64,
}

/// Host copy of everything [`permute`] produces (also what [`reference::permute_f64`]
/// returns). Slots are rows of the expert-ordered buffer; an assignment is
/// a = token x top_k + rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermutationTables {
    /// \[experts\]: assignments routed to each expert (before capacity).
    pub routed_counts: Vec<i32>,
    /// \[experts\]: assignments kept (min(routed, capacity)).
    pub counts: Vec<i32>,
    /// \[experts + 1\]: start slot of each expert's padded segment, then the total.
    pub offsets: Vec<i32>,
    /// \[tokens x top_k\]: the slot of each assignment, -1 when dropped.
    pub slot_of: Vec<i32>,
    /// \[max_slots\]: the assignment in each slot, -1 for padding and the unused tail.
    pub slot_assignment: Vec<i32>,
    /// \[max_blocks\]: the expert owning each block of `block` slots, -1 past the total.
    pub block_expert: Vec<i32>,
    /// Assignments dropped by the capacity.
    pub dropped: usize,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Element types of the hidden states that [`gather`], [`combine`] and their gradients
/// move: `f32`, `half::bf16` and `half::f16` (accumulation is f32 in every case).
pub trait MoeHiddenElement: Element + cudarc::driver::ValidAsZeroBits + sealed::Sealed {}
impl MoeHiddenElement for f32 {}
impl MoeHiddenElement for half::bf16 {}
impl MoeHiddenElement for half::f16 {}

/// Element types the MoE kernels are built for in every op (router logits and hidden
/// states): `f32` and `half::bf16`.
pub trait MoeElement: MoeHiddenElement {}
impl MoeElement for f32 {}
impl MoeElement for half::bf16 {}
