//! Adversarial inputs for every public function that takes user data and needs no GPU: the
//! RoPE plan, parser and reference, head layouts, the attention plan and references, the MoE
//! router, plans and references, the KV-cache merge and paged layout, and the emulator's
//! host-slice ops.
//!
//! Each call runs under `catch_unwind`; a panic fails the case with the function's name and
//! inputs. Arguments are zeros, ones, values next to usize::MAX and i32::MAX, NaN and
//! infinities, lengths that disagree, ids and indices out of range, and mutated config.json
//! texts. A call may return any typed error, but:
//! * sizes near usize::MAX must be rejected before anything is allocated (an allocation
//!   failure aborts the whole test binary, which counts as a failure);
//! * no call may take long: work proportional to a user-given length must be bounded by
//!   validation first. A call that runs past [`CALL_LIMIT`] fails its case, and a watchdog
//!   aborts the binary, naming the call, if one runs past [`HANG_LIMIT`];
//! * a configuration that parses or builds must give finite, positive frequencies and
//!   attention factor (also when rounded to f32) at every sequence length;
//! * the emulator's ops must reject bad input before a kernel runs: an
//!   [`Error::Emulator`] (the kernel touched memory it should not have) is a failure.

use std::collections::HashMap;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, Once, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use longctx::attention::reference::{
    attention_backward_f64, attention_backward_tiled_f32, attention_f64, attention_tiled_f32,
    compare, Output, Problem, Tiles,
};
use longctx::attention::{
    backward_workspace_len, check_alignment, forward_flops, smem_row_elems, validate_cu_seqlens,
    AttentionOptions, BackwardOptions, BackwardTiles, CallShape, KernelPath, Mask, SoftmaxConsts,
    TileConfig, ViewShape,
};
use longctx::emulator::{self, Arch, HostBackwardInputs, HostGrads, HostPermutation, HostQkv};
use longctx::kv_cache::reference as kv_ref;
use longctx::kv_cache::{
    LseLayout, MergeOptions, MergeShape, PageTable, PagedKvLayout, StackedStates,
};
use longctx::layout::HeadsLayout;
use longctx::moe::reference as moe_ref;
use longctx::moe::{
    capacity, GatePlan, GroupScore, Grouping, LossOptions, PermutationTables, PermuteOptions,
    PermutePlan, RouterConfig, Scoring, StatsPlan,
};
use longctx::rope::reference::apply_rope_f64;
use longctx::rope::{
    AnglePrecision, Direction, RopeConfig, RopeOptions, RopeScaling, RopeStyle, MAX_HEAD_DIM,
};
use longctx::Error;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// The guard every call runs under
// ---------------------------------------------------------------------------------------

/// A single call taking longer than this fails its case: every function here either
/// rejects its input or works on tiny buffers.
const CALL_LIMIT: Duration = Duration::from_secs(3);
/// A call running this long is taken for a hang: the watchdog aborts the test binary.
const HANG_LIMIT: Duration = Duration::from_secs(120);

/// The call each test thread is in, with its start time, for the watchdog.
fn in_flight() -> &'static Mutex<HashMap<ThreadId, (String, Instant)>> {
    static CALLS: OnceLock<Mutex<HashMap<ThreadId, (String, Instant)>>> = OnceLock::new();
    CALLS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn start_watchdog() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(500));
            let calls = in_flight().lock().unwrap_or_else(|e| e.into_inner());
            for (what, start) in calls.values() {
                if start.elapsed() > HANG_LIMIT {
                    eprintln!(
                        "adversarial: {what} has run for {:?}: a hang; aborting",
                        start.elapsed()
                    );
                    std::process::abort();
                }
            }
        });
    });
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// At most a few hundred characters of an input description.
fn clip(mut s: String) -> String {
    const MAX: usize = 600;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Runs `f` (the call `name` on the inputs described by `inputs`) under catch_unwind and
/// the time limits.
fn call<T>(name: &str, inputs: String, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    start_watchdog();
    let id = std::thread::current().id();
    let start = Instant::now();
    in_flight()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (format!("{name}({inputs})"), start));
    let r = catch_unwind(AssertUnwindSafe(f));
    in_flight()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let elapsed = start.elapsed();
    match r {
        Err(p) => Err(TestCaseError::fail(format!(
            "{name} panicked (`{}`) on {inputs}",
            panic_message(p.as_ref())
        ))),
        Ok(_) if elapsed > CALL_LIMIT => Err(TestCaseError::fail(format!(
            "{name} took {elapsed:?} on {inputs}: its work is not bounded by validation"
        ))),
        Ok(v) => Ok(v),
    }
}

/// `guard!("name", [inputs...], call)`: [`call`] with the inputs' Debug forms, taken before
/// the call.
macro_rules! guard {
    ($name:expr, [$($arg:expr),* $(,)?], $body:expr) => {{
        let mut inputs = String::new();
        $(
            inputs.push_str(&clip(format!("{} = {:?}; ", stringify!($arg), &$arg)));
        )*
        call($name, inputs, || $body)?
    }};
}

/// A result that must be Ok or a validation error (never a CUDA, device or emulator one).
fn typed<T: Debug>(name: &str, r: &Result<T, Error>) -> Result<(), TestCaseError> {
    match r {
        Ok(_) | Err(Error::InvalidArgument { .. }) | Err(Error::Config { .. }) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!(
            "{name} returned {e:?}: bad input must be rejected before anything runs"
        ))),
    }
}

fn config_error<T: Debug>(name: &str, r: &Result<T, Error>) -> Result<(), TestCaseError> {
    match r {
        Ok(_) => Ok(()),
        Err(Error::Config { key, problem }) if !key.is_empty() && !problem.is_empty() => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!(
            "{name} returned {e:?}; a bad config.json must give Error::Config naming the key"
        ))),
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Adversarial values
// ---------------------------------------------------------------------------------------

const SPECIAL_USIZE: [usize; 16] = [
    0,
    1,
    2,
    3,
    64,
    1 << 29,
    (1 << 29) + 1,
    i32::MAX as usize,
    i32::MAX as usize + 1,
    u32::MAX as usize,
    1 << 32,
    1 << 40,
    isize::MAX as usize,
    usize::MAX / 2 + 1,
    usize::MAX - 1,
    usize::MAX,
];

fn adv_usize() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..5,
        2 => 0usize..300,
        3 => prop::sample::select(SPECIAL_USIZE.to_vec()),
    ]
}

/// Mostly small, sometimes adversarial: for sizes that should often be valid.
fn small_or_adv_usize(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0..=max, 1 => prop::sample::select(SPECIAL_USIZE.to_vec())]
}

const SPECIAL_F64: [f64; 22] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    2.0,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::MAX,
    f64::MIN,
    f64::MIN_POSITIVE,
    5e-324,
    1e-300,
    1e-45,
    1e-40,
    1e38,
    3.5e38,
    1e300,
    1e308,
    -1e308,
    1e10,
];

fn adv_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => prop::sample::select(SPECIAL_F64.to_vec()),
        1 => -10.0f64..10.0,
        1 => 0.0f64..1e6,
    ]
}

/// Mostly a plausible positive value, sometimes adversarial.
fn plausible_f64() -> impl Strategy<Value = f64> {
    prop_oneof![4 => 0.25f64..64.0, 1 => adv_f64()]
}

fn adv_f32() -> impl Strategy<Value = f32> {
    adv_f64().prop_map(|x| x as f32)
}

const SPECIAL_I32: [i32; 12] = [
    0,
    1,
    -1,
    2,
    i32::MAX,
    i32::MAX - 1,
    i32::MIN,
    i32::MIN + 1,
    1 << 29,
    (1 << 29) + 1,
    1 << 30,
    -(1 << 30),
];

fn adv_i32() -> impl Strategy<Value = i32> {
    prop_oneof![
        2 => -3i32..70,
        1 => prop::sample::select(SPECIAL_I32.to_vec()),
    ]
}

fn adv_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => -3i64..70,
        1 => prop::sample::select(vec![
            i64::MIN,
            i64::MAX,
            -2,
            i64::from(i32::MAX),
            1 << 29,
            1 << 40,
        ]),
    ]
}

fn adv_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => 0u32..120,
        1 => prop::sample::select(vec![0u32, 79, 80, 89, 90, 100, u32::MAX, i32::MAX as u32]),
    ]
}

fn adv_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => (0u64..64).prop_map(|x| x * 256),
        1 => any::<u64>(),
        1 => prop::sample::select(vec![0u64, 1, 2, 8, u64::MAX, u64::MAX - 15, 1 << 63]),
    ]
}

/// A layout with every field adversarial.
fn adv_layout() -> impl Strategy<Value = HeadsLayout> {
    (
        adv_usize(),
        adv_usize(),
        adv_usize(),
        adv_usize(),
        adv_usize(),
        adv_usize(),
    )
        .prop_map(
            |(offset, tokens, heads, head_dim, token_stride, head_stride)| HeadsLayout {
                offset,
                tokens,
                heads,
                head_dim,
                token_stride,
                head_stride,
            },
        )
}

/// A small, mostly dense layout, sometimes with an adversarial field.
fn near_layout(
    tokens: impl Strategy<Value = usize>,
    heads: impl Strategy<Value = usize>,
    head_dim: impl Strategy<Value = usize>,
) -> impl Strategy<Value = HeadsLayout> {
    (
        tokens,
        heads,
        head_dim,
        0usize..3,
        prop::option::weighted(0.15, (0usize..6, adv_usize())),
    )
        .prop_map(|(t, h, d, offset, poke)| {
            let mut l = HeadsLayout::contiguous(t, h, d);
            l.offset = offset;
            if let Some((field, v)) = poke {
                match field {
                    0 => l.offset = v,
                    1 => l.tokens = v,
                    2 => l.heads = v,
                    3 => l.head_dim = v,
                    4 => l.token_stride = v,
                    _ => l.head_stride = v,
                }
            }
            l
        })
}

fn adv_layout_mixed() -> impl Strategy<Value = HeadsLayout> {
    prop_oneof![adv_layout(), near_layout(0usize..4, 0usize..3, 0usize..9),]
}

fn adv_mask() -> impl Strategy<Value = Mask> {
    (
        any::<bool>(),
        prop::option::of(adv_usize()),
        prop::option::of(adv_usize()),
    )
        .prop_map(|(causal, window_left, window_right)| Mask {
            causal,
            window_left,
            window_right,
        })
}

fn rope_options() -> impl Strategy<Value = RopeOptions> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(i, b, f)| RopeOptions {
        style: if i {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Neox
        },
        direction: if b {
            Direction::Backward
        } else {
            Direction::Forward
        },
        precision: if f {
            AnglePrecision::F32
        } else {
            AnglePrecision::F64
        },
    })
}

/// Values from a fixed formula, for buffers whose contents do not matter.
fn filler(n: usize, seed: usize) -> Vec<f64> {
    (0..n)
        .map(|i| (((i * 7 + seed * 13) % 17) as f64 - 8.0) / 8.0)
        .collect()
}

/// `want` when it is small (perturbed by `delta` to make a mismatch), else `fallback`.
fn length(want: Option<usize>, delta: i8, fallback: usize, cap: usize) -> usize {
    match want.filter(|&n| n <= cap) {
        Some(n) => match delta {
            -1 => n.saturating_sub(1),
            1 => n.saturating_add(1),
            _ => n,
        },
        None => fallback,
    }
}

fn delta() -> impl Strategy<Value = i8> {
    prop_oneof![8 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)]
}

// ---------------------------------------------------------------------------------------
// RoPE: configurations
// ---------------------------------------------------------------------------------------

/// Checks what a built or parsed configuration promises: usable frequencies at every
/// length and a usable attention factor.
fn check_rope_config(cfg: &RopeConfig, seq_len: usize) -> Result<(), TestCaseError> {
    let dim = cfg.rotary_dim();
    prop_assert!(dim > 0 && dim % 2 == 0 && dim <= cfg.head_dim(), "{cfg:?}");
    let orig = match cfg.scaling() {
        RopeScaling::Yarn {
            original_max_position_embeddings,
            ..
        }
        | RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        }
        | RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } => *original_max_position_embeddings,
        _ => 0,
    };
    let mpe = cfg.max_position_embeddings();
    for s in [
        0,
        1,
        seq_len,
        mpe,
        mpe.saturating_add(1),
        orig,
        orig.saturating_add(1),
        i32::MAX as usize,
        usize::MAX,
    ] {
        let inv = guard!("RopeConfig::inv_freq_f64", [cfg, s], cfg.inv_freq_f64(s));
        prop_assert_eq!(inv.len(), dim / 2);
        for (i, &v) in inv.iter().enumerate() {
            prop_assert!(
                v.is_finite() && v > 0.0 && (v as f32).is_finite() && (v as f32) > 0.0,
                "{cfg:?} at seq_len {s}: inv_freq[{i}] = {v}"
            );
        }
        let inv32 = guard!("RopeConfig::inv_freq", [cfg, s], cfg.inv_freq(s));
        prop_assert!(inv32.iter().all(|&v| v.is_finite() && v > 0.0));
    }
    let a = guard!(
        "RopeConfig::attention_factor_f64",
        [cfg],
        cfg.attention_factor_f64()
    );
    let a32 = guard!(
        "RopeConfig::attention_factor",
        [cfg],
        cfg.attention_factor()
    );
    prop_assert!(
        a.is_finite() && a > 0.0 && a32.is_finite() && a32 > 0.0,
        "{cfg:?}"
    );
    let _ = (
        cfg.depends_on_length(),
        cfg.base(),
        cfg.partial_rotary_factor(),
        cfg.scaling().rope_type(),
    );
    Ok(())
}

fn adv_scaling() -> impl Strategy<Value = RopeScaling> {
    let list = || prop::collection::vec(plausible_f64(), 0..70);
    prop_oneof![
        Just(RopeScaling::Default),
        plausible_f64().prop_map(|factor| RopeScaling::Linear { factor }),
        plausible_f64().prop_map(|factor| RopeScaling::Dynamic { factor }),
        (
            plausible_f64(),
            small_or_adv_usize(70_000),
            plausible_f64(),
            plausible_f64(),
            prop::option::of(adv_f64()),
            prop::option::of(adv_f64()),
            prop::option::of(plausible_f64()),
            any::<bool>(),
        )
            .prop_map(
                |(factor, l0, beta_fast, beta_slow, mscale, mscale_all_dim, af, truncate)| {
                    RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings: l0,
                        beta_fast,
                        beta_slow,
                        mscale,
                        mscale_all_dim,
                        attention_factor: af,
                        truncate,
                    }
                }
            ),
        (
            list(),
            list(),
            small_or_adv_usize(70_000),
            prop::option::of(plausible_f64()),
            prop::option::of(plausible_f64()),
        )
            .prop_map(|(short_factor, long_factor, l0, factor, af)| {
                RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: l0,
                    factor,
                    attention_factor: af,
                }
            }),
        (
            plausible_f64(),
            plausible_f64(),
            plausible_f64(),
            small_or_adv_usize(70_000)
        )
            .prop_map(|(factor, low, high, l0)| RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: l0,
            }),
    ]
}

/// Trims LongRoPE lists to the pair count (sometimes one off), so that the builder gets
/// past the length check often enough to reach the value checks.
fn fit_lists(scaling: RopeScaling, pairs: usize, off: i8) -> RopeScaling {
    match scaling {
        RopeScaling::LongRope {
            mut short_factor,
            mut long_factor,
            original_max_position_embeddings,
            factor,
            attention_factor,
        } => {
            let n = length(Some(pairs), off, 3, 1 << 16);
            for list in [&mut short_factor, &mut long_factor] {
                let fill = list.first().copied().unwrap_or(1.0);
                list.resize(n, fill);
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                factor,
                attention_factor,
            }
        }
        other => other,
    }
}

proptest! {
    #![proptest_config(config(3000))]

    /// The builder with every scaling variant and adversarial fields: a typed error, or a
    /// configuration whose frequencies and attention factor are usable everywhere.
    #[test]
    fn rope_builder(
        head_dim in prop_oneof![
            4 => prop::sample::select(vec![2usize, 4, 6, 8, 64, 80, 96, 128, 256]),
            1 => adv_usize(),
        ],
        base in prop_oneof![
            3 => prop::sample::select(vec![10_000.0f64, 500_000.0, 1e6, 1.5]),
            1 => adv_f64(),
        ],
        prf in prop_oneof![3 => Just(1.0f64), 1 => adv_f64(), 1 => 0.0f64..1.0],
        mpe in small_or_adv_usize(200_000),
        scaling in adv_scaling(),
        off in delta(),
        seq_len in adv_usize(),
    ) {
        let pairs = if prf == 1.0 { head_dim / 2 } else { ((head_dim as f64 * prf) as usize) / 2 };
        let scaling = fit_lists(scaling, pairs, off);
        let builder = RopeConfig::builder(head_dim)
            .base(base)
            .partial_rotary_factor(prf)
            .max_position_embeddings(mpe)
            .scaling(scaling);
        let r = guard!("RopeConfigBuilder::build", [builder], builder.clone().build());
        match &r {
            Ok(cfg) => check_rope_config(cfg, seq_len)?,
            Err(Error::Config { key, .. }) => prop_assert!(!key.is_empty()),
            Err(e) => prop_assert!(false, "build returned {e:?}"),
        }
    }
}

/// Phi-3's per-pair factors, 48 of each (head_dim 96).
fn phi3_lists() -> (String, String) {
    let short: Vec<String> = (0..48)
        .map(|i| format!("{:.4}", 1.0 + 0.02 * f64::from(i)))
        .collect();
    let long: Vec<String> = (0..48)
        .map(|i| format!("{:.4}", 1.0 + 1.5 * f64::from(i)))
        .collect();
    (short.join(", "), long.join(", "))
}

/// config.json texts of real models (the keys and values the RoPE and router parsers
/// read, with some of the keys they ignore).
fn real_configs() -> Vec<String> {
    let (short, long) = phi3_lists();
    vec![
        // Llama-3.1-8B.
        r#"{"architectures": ["LlamaForCausalLM"], "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
            "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_type": "llama3"}, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "vocab_size": 128256}"#
            .to_string(),
        // Llama-3.2-1B in transformers 5's layout.
        r#"{"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
            "head_dim": 64, "max_position_embeddings": 131072,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}"#
            .to_string(),
        // Qwen2-7B-Instruct with the YaRN section its model card adds.
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
            "num_attention_heads": 28, "num_key_value_heads": 4,
            "max_position_embeddings": 32768, "model_type": "qwen2", "rope_theta": 1000000.0,
            "sliding_window": 131072, "use_sliding_window": false,
            "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768,
            "type": "yarn"}}"#
            .to_string(),
        // DeepSeek-V3 (MLA rope head, YaRN with mscale, the noaux_tc router).
        r#"{"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": 7168, "num_attention_heads": 128, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "n_group": 8, "topk_group": 4, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc"}"#
            .to_string(),
        // DeepSeek-V2-Lite (greedy softmax router, mscale 0.707).
        r#"{"model_type": "deepseek_v2", "hidden_size": 2048, "num_attention_heads": 16,
            "qk_rope_head_dim": 64, "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
            "type": "yarn"}, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 1.0, "scoring_func": "softmax",
            "norm_topk_prob": false}"#
            .to_string(),
        // DeepSeek-V2 (group_limited_greedy).
        r#"{"model_type": "deepseek_v2", "hidden_size": 5120, "num_attention_heads": 128,
            "qk_rope_head_dim": 64, "max_position_embeddings": 163840,
            "n_routed_experts": 160, "num_experts_per_tok": 6,
            "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
            "routed_scaling_factor": 16.0, "scoring_func": "softmax"}"#
            .to_string(),
        // Phi-3-mini-128k-instruct (LongRoPE, original length at the top level).
        format!(
            r#"{{"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0, "sliding_window": 262144,
            "rope_scaling": {{"type": "longrope", "short_factor": [{short}],
            "long_factor": [{long}]}}}}"#
        ),
        // Gemma-2-9B (head_dim given, plain RoPE).
        r#"{"model_type": "gemma2", "hidden_size": 3584, "head_dim": 256,
            "num_attention_heads": 16, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rope_theta": 10000.0,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 256, "sliding_window": 4096}"#
            .to_string(),
        // Gemma-3-4B (linear scaling of the global layers).
        r#"{"model_type": "gemma3_text", "hidden_size": 2560, "head_dim": 256,
            "num_attention_heads": 8, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "sliding_window": 1024}"#
            .to_string(),
        // Gemma-3 in transformers 5's per-layer-type layout.
        r#"{"model_type": "gemma3_text", "head_dim": 256, "max_position_embeddings": 131072,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
            "rope_theta": 1000000.0}, "sliding_attention": {"rope_type": "default",
            "rope_theta": 10000.0}}}"#
            .to_string(),
        // gpt-oss-20b (YaRN without truncation).
        r#"{"model_type": "gpt_oss", "head_dim": 64, "hidden_size": 2880,
            "num_attention_heads": 64, "max_position_embeddings": 131072,
            "rope_theta": 150000, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0,
            "factor": 32.0, "original_max_position_embeddings": 4096, "rope_type": "yarn",
            "truncate": false}, "num_local_experts": 32, "experts_per_token": 4}"#
            .to_string(),
        // Mixtral-8x7B.
        r#"{"model_type": "mixtral", "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 32768,
            "rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
            "router_aux_loss_coef": 0.02, "sliding_window": null}"#
            .to_string(),
        // Qwen3-30B-A3B.
        r#"{"model_type": "qwen3_moe", "head_dim": 128, "hidden_size": 2048,
            "num_attention_heads": 32, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "rope_scaling": null, "num_experts": 128,
            "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1}"#
            .to_string(),
        // Qwen2-57B-A14B.
        r#"{"model_type": "qwen2_moe", "hidden_size": 3584, "num_attention_heads": 28,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "num_experts": 64,
            "num_experts_per_tok": 8, "norm_topk_prob": false,
            "shared_expert_intermediate_size": 20480}"#
            .to_string(),
        // Phi-2 (partial rotary: 80 x 0.4 = 32 channels).
        r#"{"model_type": "phi", "hidden_size": 2560, "num_attention_heads": 32,
            "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
            "max_position_embeddings": 2048}"#
            .to_string(),
        // Vicuna-7B-v1.5-16k (linear) and a dynamic-NTK Llama-2-13B.
        r#"{"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
            "max_position_embeddings": 4096, "rope_scaling": {"factor": 4.0, "type": "linear"}}"#
            .to_string(),
        r#"{"model_type": "llama", "hidden_size": 5120, "num_attention_heads": 40,
            "max_position_embeddings": 4096, "rope_scaling": {"factor": 2.0, "type": "dynamic"}}"#
            .to_string(),
    ]
}

/// One step of a path into a JSON value.
#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Every path to a value below `v`, parents before children.
fn paths(v: &Value, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(Seg::Key(k.clone()));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                prefix.push(Seg::Index(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// Values a mutation writes in place of a config value.
fn garbage(i: usize) -> Value {
    let all = [
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(0.5),
        json!(1e308),
        json!(-1e308),
        json!(1e-308),
        json!(5e-324),
        json!(1e-300),
        json!(1e20),
        json!(4096.0),
        json!(3.0e9),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(9_007_199_254_740_993u64),
        json!("NaN"),
        json!("inf"),
        json!("-Infinity"),
        json!("abc"),
        json!(""),
        json!(null),
        json!(true),
        json!(false),
        json!([]),
        json!({}),
        json!([[[1]]]),
        json!([1, 2, 3]),
        json!({"a": {"b": [null, "x", {"c": 1e308}]}}),
        json!({"rope_type": "yarn"}),
        json!("yarn"),
        json!("longrope"),
        json!("su"),
        json!("llama3"),
        json!("dynamic"),
        json!(["NaN", "inf"]),
    ];
    all[i % all.len()].clone()
}

fn mutate(v: &mut Value, path: &[Seg], op: usize) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parent_path {
        let next = match (seg, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k),
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match (last, cur) {
        (Seg::Key(k), Value::Object(m)) => {
            if op == 0 {
                m.remove(k);
            } else if let Some(slot) = m.get_mut(k) {
                *slot = garbage(op - 1);
            }
        }
        (Seg::Index(i), Value::Array(a)) => {
            if op == 0 {
                if *i < a.len() {
                    a.remove(*i);
                }
            } else if let Some(slot) = a.get_mut(*i) {
                *slot = garbage(op - 1);
            }
        }
        _ => {}
    }
}

/// Text-level damage that serde_json values cannot express.
fn damage_text(text: &str, kind: usize, at: usize) -> String {
    let cut = |n: usize| {
        let mut n = n.min(text.len());
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        n
    };
    match kind {
        0 => text.to_string(),
        1 => text[..cut(at % (text.len() + 1))].to_string(),
        2 => text.replacen("8.0", "NaN", 1),
        3 => text.replacen("10000", "1e999", 1),
        4 => text.replacen("4096", "-Infinity", 1),
        5 => format!("{}{text}{}", "[".repeat(5000), "]".repeat(5000)),
        6 => format!("{text} trailing"),
        7 => text.replacen(':', "::", 1),
        8 => "{\"rope_scaling\": ".repeat(3000),
        _ => String::from("null"),
    }
}

/// A real config with up to four mutations and maybe text damage.
fn mutated_config() -> impl Strategy<Value = String> {
    (
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<prop::sample::Index>(), 0usize..60), 0..4),
        prop_oneof![5 => Just(0usize), 1 => 1usize..10],
        any::<usize>(),
    )
        .prop_map(|(which, muts, kind, at)| {
            let texts = real_configs();
            let text = &texts[which.index(texts.len())];
            let mut v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            for (p, op) in muts {
                let mut all = Vec::new();
                paths(&v, &mut Vec::new(), &mut all);
                if all.is_empty() {
                    break;
                }
                let path = all[p.index(all.len())].clone();
                mutate(&mut v, &path, op);
            }
            damage_text(&v.to_string(), kind, at)
        })
}

#[test]
fn real_configs_parse() {
    // The texts themselves are good: every RoPE one parses (but the per-layer-type one),
    // and every router one.
    for (i, text) in real_configs().iter().enumerate() {
        let r = RopeConfig::from_hf_config(text);
        if text.contains("full_attention") {
            assert!(matches!(r, Err(Error::Config { .. })), "config {i}: {r:?}");
        } else {
            let cfg = r.unwrap_or_else(|e| panic!("config {i}: {e}"));
            assert!(cfg.inv_freq_f64(1 << 20).iter().all(|&v| v > 0.0));
        }
        if text.contains("num_experts_per_tok") {
            RouterConfig::from_hf_config(text).unwrap_or_else(|e| panic!("config {i}: {e}"));
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    /// Mutated real config.json texts: a configuration whose numbers are usable, or
    /// Error::Config naming a key.
    #[test]
    fn rope_from_mutated_config(text in mutated_config(), seq_len in adv_usize()) {
        let r = guard!("RopeConfig::from_hf_config", [text], RopeConfig::from_hf_config(&text));
        config_error("RopeConfig::from_hf_config", &r)?;
        if let Ok(cfg) = &r {
            check_rope_config(cfg, seq_len)?;
        }
    }

    /// The same texts through the router parser.
    #[test]
    fn router_from_mutated_config(text in mutated_config()) {
        let r = guard!("RouterConfig::from_hf_config", [text], RouterConfig::from_hf_config(&text));
        config_error("RouterConfig::from_hf_config", &r)?;
        if let Ok(cfg) = &r {
            prop_assert!(cfg.validate().is_ok());
            let s = cfg.routed_scaling_factor;
            prop_assert!(s.is_finite() && s > 0.0 && (s as f32).is_finite() && (s as f32) > 0.0);
        }
    }
}

fn config_key(json: &str) -> String {
    match RopeConfig::from_hf_config(json) {
        Err(Error::Config { key, .. }) => key,
        other => panic!("expected a config error for {json}, got {other:?}"),
    }
}

/// Values that are finite and positive one by one but give a zero or non-finite frequency,
/// scale or factor: each is an error naming its key.
#[test]
fn zero_or_infinite_results_name_the_key() {
    let llama = |section: &str| {
        format!(
            r#"{{"head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {{{section}}}}}"#
        )
    };
    // A factor that divides every low frequency to 0 (in f32, then in f64).
    assert_eq!(
        config_key(&llama(r#""rope_type": "linear", "factor": 1e300"#)),
        "rope_scaling.factor"
    );
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "llama3", "factor": 1e308, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.factor"
    );
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "yarn", "factor": 1e300, "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.factor"
    );
    // A base so large that the unscaled frequencies vanish in f32.
    assert_eq!(
        config_key(r#"{"head_dim": 128, "rope_theta": 1e300}"#),
        "rope_theta"
    );
    // Dynamic NTK whose base overflows at long lengths.
    assert_eq!(
        config_key(
            r#"{"head_dim": 128, "max_position_embeddings": 1, "rope_theta": 1e30,
                "rope_scaling": {"type": "dynamic", "factor": 1e250}}"#
        ),
        "rope_scaling.factor"
    );
    // YaRN ramp bounds at infinity.
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "yarn", "factor": 4.0, "beta_fast": 1e-320,
               "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.beta_fast"
    );
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "yarn", "factor": 4.0, "beta_slow": 1e308,
               "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.beta_slow"
    );
    // Attention factors past f32.
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "yarn", "factor": 4.0, "attention_factor": 1e300,
               "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.attention_factor"
    );
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "yarn", "factor": 4.0, "mscale": 1e300, "mscale_all_dim": 1.0,
               "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.mscale"
    );
    assert_eq!(
        config_key(&llama(
            r#""rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": -1e300,
               "original_max_position_embeddings": 8192"#
        )),
        "rope_scaling.mscale_all_dim"
    );
    // A LongRoPE entry that blows a frequency up.
    let mut short = vec!["1.0".to_string(); 64];
    short[5] = "1e-300".to_string();
    let long = vec!["2.0".to_string(); 64];
    assert_eq!(
        config_key(&format!(
            r#"{{"head_dim": 128, "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096,
                "rope_scaling": {{"type": "longrope", "short_factor": [{}],
                "long_factor": [{}]}}}}"#,
            short.join(","),
            long.join(",")
        )),
        "rope_scaling.short_factor[5]"
    );
    // Zero factors and a zero routed scale.
    assert_eq!(
        config_key(&llama(r#""rope_type": "linear", "factor": 0"#)),
        "rope_scaling.factor"
    );
    match RouterConfig::from_hf_config(
        r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
            "routed_scaling_factor": 0}"#,
    ) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "routed_scaling_factor"),
        other => panic!("{other:?}"),
    }
    match RouterConfig::from_hf_config(
        r#"{"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
            "routed_scaling_factor": 1e300}"#,
    ) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "routed_scaling_factor"),
        other => panic!("{other:?}"),
    }
    match RouterConfig::from_hf_config(
        r#"{"model_type": "mixtral", "num_local_experts": 0, "num_experts_per_tok": 2}"#,
    ) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "num_local_experts"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// RoPE: the reference and the emulated kernel; layouts
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(3000))]

    /// The f64 reference with adversarial layouts, positions, frequencies and lengths: a
    /// typed error that leaves the buffer untouched, or a rotation.
    #[test]
    fn rope_reference(
        buf_len in 0usize..64,
        layout in adv_layout_mixed(),
        positions in prop::collection::vec(adv_i32(), 0..6),
        inv_freq in prop::collection::vec(adv_f64(), 0..6),
        factor in adv_f64(),
        opts in rope_options(),
        fit in any::<bool>(),
        deltas in prop::collection::vec(delta(), 3),
    ) {
        // Half the cases fit the buffer, positions and frequencies to the layout (up to a
        // one-off), so that validation passes often enough to reach the rotation.
        let (mut buf_len, mut positions, mut inv_freq) = (buf_len, positions, inv_freq);
        if fit {
            let end = layout.numel().and_then(|n| n.checked_add(layout.offset));
            buf_len = length(end, deltas[0], buf_len, 256);
            let n = length(Some(layout.tokens), deltas[1], positions.len(), 16);
            positions = (0..n).map(|i| positions.get(i).map_or(i as i32, |p| p.saturating_abs())).collect();
            let pairs = length(Some(layout.head_dim / 2), deltas[2], inv_freq.len(), 8);
            inv_freq.resize(pairs, 0.25);
        }
        let mut buf = filler(buf_len, 1);
        let before = buf.clone();
        let r = guard!(
            "rope::reference::apply_rope_f64",
            [buf_len, layout, positions, inv_freq, factor, opts],
            apply_rope_f64(&mut buf, &layout, &positions, &inv_freq, factor, opts.style, opts.direction)
        );
        typed("apply_rope_f64", &r)?;
        if r.is_err() {
            prop_assert!(
                buf.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()),
                "apply_rope_f64 wrote to the buffer and then failed"
            );
        }
    }

    /// Layout helpers on any numbers.
    #[test]
    fn heads_layout(tokens in adv_usize(), heads in adv_usize(), head_dim in adv_usize()) {
        let l = guard!("HeadsLayout::contiguous", [tokens, heads, head_dim], HeadsLayout::contiguous(tokens, heads, head_dim));
        let n = guard!("HeadsLayout::numel", [l], l.numel());
        prop_assert_eq!(n, tokens.checked_mul(heads).and_then(|x| x.checked_mul(head_dim)));
        let e = guard!("HeadsLayout::is_empty", [l], l.is_empty());
        prop_assert_eq!(e, tokens == 0 || heads == 0 || head_dim == 0);
    }
}

/// A small valid RoPE configuration for the emulator, with a scaling chosen by `which`.
fn small_rope_config(head_dim: usize, which: usize) -> Result<RopeConfig, Error> {
    // Dynamic NTK needs a rotary dimension of at least 4.
    let which = if head_dim < 4 && which % 4 == 2 {
        0
    } else {
        which
    };
    let scaling = match which % 4 {
        0 => RopeScaling::Default,
        1 => RopeScaling::Linear { factor: 4.0 },
        2 => RopeScaling::Dynamic { factor: 2.0 },
        _ => RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        },
    };
    RopeConfig::builder(head_dim)
        .max_position_embeddings(16)
        .scaling(scaling)
        .build()
}

fn to_elems<T: longctx::dtype::Element>(x: &[f64], f: fn(f64) -> T) -> Vec<T> {
    x.iter().map(|&v| f(v)).collect()
}

proptest! {
    #![proptest_config(config(256))]

    /// The emulated RoPE kernel on host slices with adversarial layouts, positions and
    /// lengths: validation rejects bad input before the kernel runs; valid calls are tiny.
    #[test]
    fn rope_emulator(
        head_dim in prop::sample::select(vec![2usize, 4, 8]),
        which in 0usize..4,
        seq_len in prop_oneof![Just(16usize), adv_usize()],
        positions in prop_oneof![
            3 => prop::collection::vec(0i32..16, 0..4),
            1 => prop::collection::vec(adv_i32(), 0..4),
        ],
        heads in (0usize..3, 0usize..3),
        pokes in (
            prop::option::weighted(0.2, adv_layout_mixed()),
            prop::option::weighted(0.2, adv_layout_mixed()),
        ),
        deltas in prop::collection::vec(delta(), 2),
        offsets in (prop::option::weighted(0.2, adv_usize()), prop::option::weighted(0.2, adv_usize())),
        packed in any::<bool>(),
        bf in any::<bool>(),
        opts in rope_options(),
    ) {
        let cfg = small_rope_config(head_dim, which);
        prop_assert!(cfg.is_ok(), "{cfg:?}");
        let Ok(cfg) = cfg else { return Ok(()); };
        // Views of the table's head_dim with one token per position, unless replaced by an
        // adversarial one; buffers of the views' size, up to a one-off.
        let n = positions.len();
        let mut q_layout = pokes.0.unwrap_or(HeadsLayout::contiguous(n, heads.0, head_dim));
        let mut k_layout = pokes.1.unwrap_or(HeadsLayout::contiguous(n, heads.1, head_dim));
        // Views that are right but for their offset (empty ones included).
        q_layout.offset = offsets.0.unwrap_or(q_layout.offset);
        let end = |l: &HeadsLayout| l.numel().and_then(|x| x.checked_add(l.offset));
        let r = if packed {
            if pokes.1.is_none() {
                // K right after Q in one buffer.
                k_layout.offset = end(&q_layout).filter(|&e| e <= 256).unwrap_or(0);
            }
            k_layout.offset = offsets.1.unwrap_or(k_layout.offset);
            let len = length(end(&k_layout).max(end(&q_layout)), deltas[0], 24, 512);
            let buf = filler(len, 4);
            if bf {
                let mut b = to_elems(&buf, bf16::from_f64);
                guard!("emulator::apply_rope_packed", [cfg, seq_len, positions, q_layout, k_layout, len, opts],
                    emulator::apply_rope_packed(&cfg, seq_len, &positions, &mut b, &q_layout, &k_layout, opts))
            } else {
                let mut b = to_elems(&buf, |x| x as f32);
                guard!("emulator::apply_rope_packed", [cfg, seq_len, positions, q_layout, k_layout, len, opts],
                    emulator::apply_rope_packed(&cfg, seq_len, &positions, &mut b, &q_layout, &k_layout, opts))
            }
        } else {
            k_layout.offset = offsets.1.unwrap_or(k_layout.offset);
            let q_len = length(end(&q_layout), deltas[0], 24, 256);
            let k_len = length(end(&k_layout), deltas[1], 24, 256);
            let (q, k) = (filler(q_len, 2), filler(k_len, 3));
            if bf {
                let (mut qb, mut kb) = (to_elems(&q, bf16::from_f64), to_elems(&k, bf16::from_f64));
                guard!("emulator::apply_rope", [cfg, seq_len, positions, q_layout, k_layout, q_len, k_len, opts],
                    emulator::apply_rope(&cfg, seq_len, &positions, &mut qb, &q_layout, &mut kb, &k_layout, opts))
            } else {
                let (mut qb, mut kb) = (to_elems(&q, |x| x as f32), to_elems(&k, |x| x as f32));
                guard!("emulator::apply_rope", [cfg, seq_len, positions, q_layout, k_layout, q_len, k_len, opts],
                    emulator::apply_rope(&cfg, seq_len, &positions, &mut qb, &q_layout, &mut kb, &k_layout, opts))
            }
        };
        typed("emulator::apply_rope", &r)?;
    }
}

// ---------------------------------------------------------------------------------------
// Attention: plan
// ---------------------------------------------------------------------------------------

/// Two offsets lists of one batch (valid), or any two lists.
fn cu_pair_i32() -> impl Strategy<Value = (Vec<i32>, Vec<i32>)> {
    prop_oneof![
        prop::collection::vec((0i32..4, 0i32..4), 0..4).prop_map(|lens| {
            let (mut q, mut k) = (vec![0], vec![0]);
            for (a, b) in lens {
                q.push(q.last().copied().unwrap_or(0) + a);
                k.push(k.last().copied().unwrap_or(0) + b);
            }
            (q, k)
        }),
        (cu_list_i32(), cu_list_i32()),
    ]
}

fn cu_pair_usize() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    prop_oneof![
        3 => prop::collection::vec((0usize..4, 0usize..4), 0..4).prop_map(|lens| {
            let (mut q, mut k) = (vec![0], vec![0]);
            for (a, b) in lens {
                q.push(q.last().copied().unwrap_or(0) + a);
                k.push(k.last().copied().unwrap_or(0) + b);
            }
            (q, k)
        }),
        1 => (cu_list_usize(), cu_list_usize()),
    ]
}

/// Offsets lists: monotone from 0 (valid), or any numbers.
fn cu_list_i32() -> impl Strategy<Value = Vec<i32>> {
    prop_oneof![
        prop::collection::vec(0i32..4, 0..4).prop_map(|lens| {
            let mut cu = vec![0];
            for l in lens {
                let last = cu.last().copied().unwrap_or(0);
                cu.push(last + l);
            }
            cu
        }),
        prop::collection::vec(adv_i32(), 0..6),
    ]
}

fn cu_list_usize() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        2 => prop::collection::vec(0usize..4, 0..4).prop_map(|lens| {
            let mut cu = vec![0];
            for l in lens {
                let last = cu.last().copied().unwrap_or(0);
                cu.push(last + l);
            }
            cu
        }),
        1 => prop::collection::vec(adv_usize(), 0..5),
    ]
}

fn tile_config() -> impl Strategy<Value = TileConfig> {
    prop_oneof![
        prop::sample::select(TileConfig::all().to_vec()),
        (
            adv_u32(),
            adv_usize(),
            adv_usize(),
            adv_usize(),
            adv_usize(),
            adv_usize()
        )
            .prop_map(
                |(ptx_arch, head_dim, head_dim_v, block_m, block_n, warps)| {
                    TileConfig {
                        path: KernelPath::Sm80,
                        ptx_arch,
                        head_dim,
                        head_dim_v,
                        block_m,
                        block_n,
                        warps,
                    }
                }
            ),
    ]
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn attention_offsets((q, k) in cu_pair_i32()) {
        let r = guard!("attention::validate_cu_seqlens", [q, k], validate_cu_seqlens(&q, &k));
        typed("validate_cu_seqlens", &r)?;
    }

    /// Every method of a tile shape, from the table or made by hand, with any arguments.
    #[test]
    fn attention_tiles(
        t in tile_config(),
        d in prop_oneof![prop::sample::select(vec![64usize, 96, 128, 192, 256]), adv_usize()],
        dv in prop_oneof![prop::sample::select(vec![64usize, 96, 128, 256]), adv_usize()],
        arch in adv_u32(),
        mask in adv_mask(),
        a in adv_usize(),
        b in adv_usize(),
        sq in adv_usize(),
        sk in adv_usize(),
    ) {
        let r = guard!("TileConfig::for_head_dims", [d, dv], TileConfig::for_head_dims(d, dv));
        typed("TileConfig::for_head_dims", &r)?;
        let r = guard!("TileConfig::for_code", [d, dv, arch], TileConfig::for_code(d, dv, arch));
        typed("TileConfig::for_code", &r)?;
        let r = guard!("TileConfig::validate", [t], t.validate());
        typed("TileConfig::validate", &r)?;
        guard!("TileConfig::threads", [t], t.threads());
        guard!("TileConfig::rows_per_warp", [t], t.rows_per_warp());
        guard!("TileConfig::smem_bytes", [t], t.smem_bytes());
        guard!("TileConfig::num_m_blocks", [t, sq], t.num_m_blocks(sq));
        guard!("TileConfig::grid", [t, sq, a, b], t.grid(sq, a, b));
        let rows = guard!("TileConfig::m_rows", [t, a, sq], t.m_rows(a, sq));
        if let Some(rows) = &rows {
            prop_assert!(rows.start < rows.end && rows.end <= sq);
        }
        let kb = guard!("TileConfig::key_blocks", [t, mask, a, sq, sk], t.key_blocks(&mask, a, sq, sk));
        if let Some(kb) = kb {
            prop_assert!(kb.start < kb.end);
        }
        guard!("TileConfig::needs_mask", [t, mask, a, b, sq, sk], t.needs_mask(&mask, a, b, sq, sk));
        guard!("TileConfig::unmasked_blocks", [t, mask, a, sq, sk], t.unmasked_blocks(&mask, a, sq, sk));
        guard!("attention::smem_row_elems", [d], smem_row_elems(d));
        guard!("Tiles::from", [t], Tiles::from(&t));
        guard!("Tiles::new", [a, b], Tiles::new(a, b));
    }

    /// Masks with any sides and any lengths; the closed-form pair count against a direct
    /// count where the lengths are small.
    #[test]
    fn attention_masks(
        mask in adv_mask(),
        causal in any::<bool>(),
        fl in adv_i64(),
        fr in adv_i64(),
        wl in adv_usize(),
        wr in adv_usize(),
        row in adv_usize(),
        key in adv_usize(),
        sq in adv_usize(),
        sk in adv_usize(),
        rows in (adv_usize(), adv_usize()),
        seqlens in prop::collection::vec((adv_usize(), adv_usize()), 0..4),
        heads in adv_usize(),
        d in adv_usize(),
        dv in adv_usize(),
    ) {
        let r = guard!("Mask::from_flash", [causal, fl, fr], Mask::from_flash(causal, fl, fr));
        typed("Mask::from_flash", &r)?;
        let w = guard!("Mask::window", [wl, wr], Mask::window(wl, wr));
        for m in [mask, w, Mask::none(), Mask::causal()] {
            let (l, r) = guard!("Mask::bounds", [m], m.bounds());
            prop_assert!((0..=1 << 29).contains(&l) && (0..=1 << 29).contains(&r));
            guard!("Mask::is_none", [m], m.is_none());
            let keys = guard!("Mask::visible_keys", [m, row, sq, sk], m.visible_keys(row, sq, sk));
            prop_assert!(keys.end <= sk);
            guard!("Mask::sees", [m, row, key, sq, sk], m.sees(row, key, sq, sk));
            let u = guard!("Mask::visible_union", [m, rows, sq, sk], m.visible_union(rows.0..rows.1, sq, sk));
            if let Some(u) = u {
                prop_assert!(u.start < u.end && u.end <= sk);
            }
            let pairs = guard!("Mask::visible_pairs", [m, sq, sk], m.visible_pairs(sq, sk));
            if sq <= 300 && sk <= 300 {
                let direct: u64 = (0..sq).map(|i| m.visible_keys(i, sq, sk).len() as u64).sum();
                prop_assert_eq!(pairs, direct, "{:?} {} {}", m, sq, sk);
            }
            let f = guard!("attention::forward_flops", [m, seqlens, heads, d, dv], forward_flops(&m, &seqlens, heads, d, dv));
            prop_assert!(f >= 0.0 && !f.is_nan());
        }
    }

    #[test]
    fn attention_scalars(
        scale in adv_f32(),
        cap in prop::option::of(adv_f32()),
        opt_scale in prop::option::of(adv_f32()),
        d in adv_usize(),
        mask in adv_mask(),
        layout in adv_layout_mixed(),
        base in adv_u64(),
        elem in adv_usize(),
    ) {
        let r = guard!("SoftmaxConsts::new", [scale, cap], SoftmaxConsts::new(scale, cap));
        typed("SoftmaxConsts::new", &r)?;
        let opts = AttentionOptions { softmax_scale: opt_scale, mask, softcap: cap };
        guard!("AttentionOptions::scale_for", [opts, d], opts.scale_for(d));
        let r = guard!("attention::check_alignment", [layout, base, elem], check_alignment(&layout, base, elem, "q"));
        typed("check_alignment", &r)?;
    }

    /// A whole call's shapes: a valid call with some views, lengths or options replaced by
    /// adversarial ones.
    #[test]
    fn attention_call_shape(
        dims in attn_dims(),
        heads in (1usize..3, 1usize..3),
        (q, k) in cu_pair_i32(),
        views in prop::collection::vec(prop::option::weighted(0.2, (adv_layout_mixed(), adv_usize())), 4),
        deltas in prop::collection::vec(delta(), 5),
        lse in any::<bool>(),
        scale in prop::option::weighted(0.3, adv_f32()),
        cap in prop::option::weighted(0.3, adv_f32()),
        mask in adv_mask(),
    ) {
        let (tq, tk) = (
            q.last().map_or(0, |&t| t.max(0) as usize),
            k.last().map_or(0, |&t| t.max(0) as usize),
        );
        let (hq, hkv) = (heads.0 * heads.1, heads.1);
        let base = [
            HeadsLayout::contiguous(tq, hq, dims.0),
            HeadsLayout::contiguous(tk, hkv, dims.0),
            HeadsLayout::contiguous(tk, hkv, dims.1),
            HeadsLayout::contiguous(tq, hq, dims.1),
        ];
        let v: Vec<ViewShape> = (0..4)
            .map(|i| match views[i] {
                Some((layout, buffer_len)) => ViewShape { layout, buffer_len },
                None => ViewShape {
                    layout: base[i],
                    buffer_len: length(base[i].numel(), deltas[i], 0, usize::MAX),
                },
            })
            .collect();
        let lse_len = lse.then(|| length(hq.checked_mul(tq), deltas[4], 0, usize::MAX));
        let shape = CallShape { q: v[0], k: v[1], v: v[2], o: v[3], lse_len, cu_seqlens_q: &q, cu_seqlens_k: &k };
        let opts = AttentionOptions { softmax_scale: scale, mask, softcap: cap };
        let r = guard!("CallShape::validate", [shape, opts], shape.validate(&opts));
        typed("CallShape::validate", &r)?;
    }
}

// ---------------------------------------------------------------------------------------
// Attention: references and the emulated kernel
// ---------------------------------------------------------------------------------------

/// Problem shape: offsets, heads and dims (mostly small), scale, softcap, mask, and how
/// the buffer lengths deviate from the shape.
#[derive(Debug, Clone)]
struct AttnCase {
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    head_dim_v: usize,
    scale: f64,
    softcap: Option<f64>,
    mask: Mask,
    deltas: Vec<i8>,
    fallback: Vec<usize>,
}

fn attn_case() -> impl Strategy<Value = AttnCase> {
    (
        cu_pair_usize(),
        (
            prop_oneof![4 => (1usize..3, 1usize..3).prop_map(|(g, h)| (g * h, h)), 1 => (adv_usize(), adv_usize())],
            prop_oneof![4 => 1usize..6, 1 => adv_usize()],
            prop_oneof![4 => 1usize..6, 1 => adv_usize()],
        ),
        prop_oneof![3 => 0.1f64..2.0, 1 => adv_f64()],
        prop::option::of(prop_oneof![3 => 0.5f64..10.0, 1 => adv_f64()]),
        adv_mask(),
        prop::collection::vec(delta(), 6),
        prop::collection::vec(0usize..40, 6),
    )
        .prop_map(
            |((cu_q, cu_k), ((heads_q, heads_kv), head_dim, head_dim_v), scale, softcap, mask, deltas, fallback)| {
                AttnCase {
                    cu_q,
                    cu_k,
                    heads_q,
                    heads_kv,
                    head_dim,
                    head_dim_v,
                    scale,
                    softcap,
                    mask,
                    deltas,
                    fallback,
                }
            },
        )
}

fn size3(a: usize, b: usize, c: usize) -> Option<usize> {
    a.checked_mul(b)?.checked_mul(c)
}

proptest! {
    #![proptest_config(config(2000))]

    /// The f64 and tiled f32 references, forward and backward, with adversarial sizes.
    #[test]
    fn attention_references(
        c in attn_case(),
        tiles in (small_or_adv_usize(9), small_or_adv_usize(9), small_or_adv_usize(9)),
        extra in prop::collection::vec(0usize..40, 3),
    ) {
        let tq = c.cu_q.last().copied().unwrap_or(0);
        let tk = c.cu_k.last().copied().unwrap_or(0);
        let cap = 600;
        let q = filler(length(size3(tq, c.heads_q, c.head_dim), c.deltas[0], c.fallback[0], cap), 5);
        let k = filler(length(size3(tk, c.heads_kv, c.head_dim), c.deltas[1], c.fallback[1], cap), 6);
        let v = filler(length(size3(tk, c.heads_kv, c.head_dim_v), c.deltas[2], c.fallback[2], cap), 7);
        let p = Problem {
            q: &q,
            k: &k,
            v: &v,
            cu_seqlens_q: &c.cu_q,
            cu_seqlens_k: &c.cu_k,
            heads_q: c.heads_q,
            heads_kv: c.heads_kv,
            head_dim: c.head_dim,
            head_dim_v: c.head_dim_v,
            scale: c.scale,
            softcap: c.softcap,
            mask: c.mask,
        };
        let r = guard!("Problem::validate", [p], p.validate());
        typed("Problem::validate", &r)?;
        let want = guard!("attention::reference::attention_f64", [p], attention_f64(&p));
        typed("attention_f64", &want)?;
        let t = Tiles { block_m: tiles.0, block_n: tiles.1, rows_per_warp: tiles.2 };
        let got = guard!("attention::reference::attention_tiled_f32", [p, t], attention_tiled_f32(&p, t, |x| x));
        typed("attention_tiled_f32", &got)?;
        let o_len = length(size3(tq, c.heads_q, c.head_dim_v), c.deltas[3], c.fallback[3], cap);
        let dout = filler(o_len, 8);
        let g = guard!("attention::reference::attention_backward_f64", [p, o_len], attention_backward_f64(&p, &dout));
        typed("attention_backward_f64", &g)?;
        let o32: Vec<f32> = filler(o_len, 9).iter().map(|&x| x as f32).collect();
        let lse_len = length(c.heads_q.checked_mul(tq), c.deltas[4], c.fallback[4], cap);
        let lse32 = vec![0.5f32; lse_len];
        let dout32: Vec<f32> = dout.iter().map(|&x| x as f32).collect();
        let g = guard!("attention::reference::attention_backward_tiled_f32", [p, o_len, lse_len, t],
            attention_backward_tiled_f32(&p, &o32, &lse32, &dout32, t, |x| x));
        typed("attention_backward_tiled_f32", &g)?;
        // compare() with outputs of any lengths.
        let out = Output { o: filler(extra[0], 1), lse: filler(extra[1], 2) };
        let got_o = filler(extra[2], 3);
        let got_lse: Vec<f32> = filler(extra[1] / 2, 4).iter().map(|&x| x as f32).collect();
        guard!("attention::reference::compare", [extra], compare(&got_o, &got_lse, &out));
    }
}

/// Supported head-dim pairs (tiny valid calls) and unsupported ones.
fn attn_dims() -> impl Strategy<Value = (usize, usize)> {
    prop::sample::select(vec![
        (64usize, 64usize),
        (128, 128),
        (192, 128),
        (80, 80),
        (64, 128),
    ])
}

proptest! {
    #![proptest_config(config(160))]

    /// The emulated attention kernel on host slices: adversarial layouts, offsets, scales
    /// and LSE lengths are rejected before the kernel runs; valid calls are tiny.
    #[test]
    fn attention_emulator(
        dims in attn_dims(),
        tq in 0usize..3,
        tk in 0usize..3,
        heads in (1usize..3, 1usize..3),
        layouts in prop::collection::vec(prop::option::weighted(0.25, adv_layout()), 4),
        deltas in prop::collection::vec(delta(), 5),
        cu in prop_oneof![3 => Just(None), 1 => cu_pair_i32().prop_map(Some)],
        lse in any::<bool>(),
        scale in prop::option::weighted(0.3, adv_f32()),
        cap in prop::option::weighted(0.3, prop_oneof![Just(30.0f32), adv_f32()]),
        mask in adv_mask(),
        sm90 in any::<bool>(),
    ) {
        let (d, dv) = dims;
        let (hq, hkv) = (heads.0 * heads.1, heads.1);
        let mut l = [
            HeadsLayout::contiguous(tq, hq, d),
            HeadsLayout::contiguous(tk, hkv, d),
            HeadsLayout::contiguous(tk, hkv, dv),
            HeadsLayout::contiguous(tq, hq, dv),
        ];
        for (slot, poke) in l.iter_mut().zip(&layouts) {
            if let Some(p) = poke {
                *slot = *p;
            }
        }
        let cap_len = 2048;
        let lens: Vec<usize> = (0..4)
            .map(|i| length(size3(l[i].tokens, l[i].heads, l[i].head_dim), deltas[i], 16, cap_len))
            .collect();
        let q: Vec<f16> = filler(lens[0], 1).into_iter().map(f16::from_f64).collect();
        let k: Vec<f16> = filler(lens[1], 2).into_iter().map(f16::from_f64).collect();
        let v: Vec<f16> = filler(lens[2], 3).into_iter().map(f16::from_f64).collect();
        let mut o = vec![f16::ZERO; lens[3]];
        let mut lse_buf = vec![0f32; length(hq.checked_mul(tq), deltas[4], 3, cap_len)];
        let (cu_q, cu_k) = cu.unwrap_or_else(|| (vec![0, tq as i32], vec![0, tk as i32]));
        let x = HostQkv { q: &q, q_layout: l[0], k: &k, k_layout: l[1], v: &v, v_layout: l[2] };
        let opts = AttentionOptions { softmax_scale: scale, mask, softcap: cap };
        let arch = if sm90 { Arch::Sm90 } else { Arch::Sm80 };
        let o_layout = l[3];
        let r = guard!(
            "emulator::attention_forward",
            [arch, l, lens, lse, cu_q, cu_k, opts],
            emulator::attention_forward(arch, &x, &mut o, o_layout, if lse { Some(&mut lse_buf[..]) } else { None }, &cu_q, &cu_k, &opts)
        );
        typed("emulator::attention_forward", &r)?;
    }

    /// The emulated attention backward on host slices: adversarial layouts of all eight
    /// tensors, offsets, LSE and workspace lengths, options and modes are rejected before
    /// any kernel runs; valid calls are tiny.
    #[test]
    fn attention_backward_emulator(
        dims in attn_dims(),
        tq in 0usize..3,
        tk in 0usize..3,
        heads in (1usize..3, 1usize..3),
        layouts in prop::collection::vec(prop::option::weighted(0.2, adv_layout()), 8),
        deltas in prop::collection::vec(delta(), 10),
        cu in prop_oneof![3 => Just(None), 1 => cu_pair_i32().prop_map(Some)],
        scale in prop::option::weighted(0.3, adv_f32()),
        cap in prop::option::weighted(0.3, prop_oneof![Just(30.0f32), adv_f32()]),
        mask in adv_mask(),
        accumulate in any::<bool>(),
        deterministic in any::<bool>(),
        ws_total in (adv_usize(), adv_usize(), adv_usize()),
    ) {
        let (d, dv) = dims;
        let (hq, hkv) = (heads.0 * heads.1, heads.1);
        // q, k, v, o, dout, dq, dk, dv
        let shapes = [(tq, hq, d), (tk, hkv, d), (tk, hkv, dv), (tq, hq, dv), (tq, hq, dv), (tq, hq, d), (tk, hkv, d), (tk, hkv, dv)];
        let mut l: Vec<HeadsLayout> = shapes.iter().map(|&(t, h, c)| HeadsLayout::contiguous(t, h, c)).collect();
        for (slot, poke) in l.iter_mut().zip(&layouts) {
            if let Some(p) = poke {
                *slot = *p;
            }
        }
        let cap_len = 2048;
        let lens: Vec<usize> = (0..8)
            .map(|i| length(size3(l[i].tokens, l[i].heads, l[i].head_dim), deltas[i], 16, cap_len))
            .collect();
        let mk = |n: usize, seed: usize| -> Vec<f16> { filler(n, seed).into_iter().map(f16::from_f64).collect() };
        let (q, k, v, o, dout) = (mk(lens[0], 1), mk(lens[1], 2), mk(lens[2], 3), mk(lens[3], 4), mk(lens[4], 5));
        let (mut dq, mut dk, mut dvb) = (mk(lens[5], 6), mk(lens[6], 7), mk(lens[7], 8));
        let lse = vec![0f32; length(hq.checked_mul(tq), deltas[8], 3, cap_len)];
        let ws_want = backward_workspace_len(tq, hq, d).ok();
        let mut ws = vec![0f32; length(ws_want, deltas[9], 8, cap_len)];
        let (cu_q, cu_k) = cu.unwrap_or_else(|| (vec![0, tq as i32], vec![0, tk as i32]));
        let x = HostQkv { q: &q, q_layout: l[0], k: &k, k_layout: l[1], v: &v, v_layout: l[2] };
        let inputs = HostBackwardInputs { o: &o, o_layout: l[3], dout: &dout, dout_layout: l[4], lse: &lse };
        let opts = BackwardOptions {
            attention: AttentionOptions { softmax_scale: scale, mask, softcap: cap },
            accumulate,
            deterministic,
        };
        let (gl5, gl6, gl7) = (l[5], l[6], l[7]);
        let r = guard!(
            "emulator::attention_backward",
            [l, lens, cu_q, cu_k, opts],
            emulator::attention_backward(
                &x,
                &inputs,
                HostGrads { dq: &mut dq, dq_layout: gl5, dk: &mut dk, dk_layout: gl6, dv: &mut dvb, dv_layout: gl7 },
                &mut ws,
                &cu_q,
                &cu_k,
                &opts,
            )
        );
        typed("emulator::attention_backward", &r)?;
        let (a, b, c) = ws_total;
        let r = guard!("attention::backward_workspace_len", [a, b, c], backward_workspace_len(a, b, c));
        typed("backward_workspace_len", &r)?;
        let r = guard!("attention::BackwardTiles::for_head_dims", [a, b], BackwardTiles::for_head_dims(a, b));
        typed("BackwardTiles::for_head_dims", &r)?;
    }
}

// ---------------------------------------------------------------------------------------
// MoE: router configurations and plans
// ---------------------------------------------------------------------------------------

fn adv_router() -> impl Strategy<Value = RouterConfig> {
    let grouping = prop::option::of((adv_usize(), adv_usize(), any::<bool>()).prop_map(
        |(n_group, topk_group, top2)| Grouping {
            n_group,
            topk_group,
            score: if top2 {
                GroupScore::Top2Sum
            } else {
                GroupScore::Max
            },
        },
    ));
    let small = (
        1usize..9,
        1usize..5,
        any::<bool>(),
        prop::option::of((
            prop::sample::select(vec![1usize, 2, 4]),
            1usize..5,
            any::<bool>(),
        )),
        any::<bool>(),
        prop_oneof![3 => Just(1.0f64), 1 => adv_f64()],
    )
        .prop_map(|(experts, top_k, sigmoid, g, renormalize, scale)| {
            let experts = experts * 4;
            RouterConfig {
                experts,
                top_k,
                scoring: if sigmoid {
                    Scoring::Sigmoid
                } else {
                    Scoring::Softmax
                },
                grouping: g.map(|(n_group, topk_group, top2)| Grouping {
                    n_group,
                    topk_group: topk_group.min(n_group),
                    score: if top2 {
                        GroupScore::Top2Sum
                    } else {
                        GroupScore::Max
                    },
                }),
                renormalize,
                routed_scaling_factor: scale,
            }
        });
    let wild = (
        adv_usize(),
        adv_usize(),
        any::<bool>(),
        grouping,
        any::<bool>(),
        adv_f64(),
    )
        .prop_map(
            |(experts, top_k, sigmoid, grouping, renormalize, routed_scaling_factor)| {
                RouterConfig {
                    experts,
                    top_k,
                    scoring: if sigmoid {
                        Scoring::Sigmoid
                    } else {
                        Scoring::Softmax
                    },
                    grouping,
                    renormalize,
                    routed_scaling_factor,
                }
            },
        );
    let named = (
        adv_usize(),
        adv_usize(),
        adv_usize(),
        adv_usize(),
        adv_f64(),
        0usize..5,
    )
        .prop_map(|(e, k, g, tg, s, which)| match which {
            0 => RouterConfig::mixtral(e, k),
            1 => RouterConfig::qwen_moe(e, k, true),
            2 => RouterConfig::deepseek_v2(e, k, g, tg, s),
            3 => RouterConfig::deepseek_v3(e, k, g, tg, false, s),
            _ => RouterConfig::deepseek_v3_default(),
        });
    prop_oneof![3 => small, 1 => wild, 1 => named]
}

fn permute_options() -> impl Strategy<Value = PermuteOptions> {
    (
        small_or_adv_usize(20),
        prop::option::of(prop_oneof![2 => 0.25f64..4.0, 1 => adv_f64()]),
    )
        .prop_map(|(block, capacity_factor)| PermuteOptions {
            block,
            capacity_factor,
        })
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn moe_plans(
        cfg in adv_router(),
        tokens in adv_usize(),
        top_k in adv_usize(),
        experts in adv_usize(),
        force_block in any::<bool>(),
        opts in permute_options(),
        factor in adv_f64(),
    ) {
        let r = guard!("RouterConfig::validate", [cfg], cfg.validate());
        typed("RouterConfig::validate", &r)?;
        guard!("RouterConfig::eligible_experts", [cfg], cfg.eligible_experts());
        let r = guard!("GatePlan::new", [cfg, tokens, force_block], GatePlan::new(&cfg, tokens, force_block));
        typed("GatePlan::new", &r)?;
        let r = guard!("PermutePlan::new", [tokens, top_k, experts, opts], PermutePlan::new(tokens, top_k, experts, opts));
        typed("PermutePlan::new", &r)?;
        if let Ok(p) = &r {
            // The padded total's bound is tight: a few slots per assignment at most.
            prop_assert!(p.max_slots <= p.assignments.saturating_mul(p.block));
            prop_assert!(p.max_slots <= i32::MAX as usize && p.max_blocks * p.block == p.max_slots);
        }
        guard!("StatsPlan::new", [tokens], StatsPlan::new(tokens));
        let r = guard!("moe::capacity", [factor, tokens, top_k, experts], capacity(factor, tokens, top_k, experts));
        typed("capacity", &r)?;
    }
}

// ---------------------------------------------------------------------------------------
// MoE: references
// ---------------------------------------------------------------------------------------

/// Ids of the shape [tokens, top_k], in range and distinct in each token, when the shape
/// is small and admits such ids; else `ids` unchanged.
fn fit_ids(ids: &[i32], tokens: usize, top_k: usize, experts: usize) -> Vec<i32> {
    match tokens.checked_mul(top_k).filter(|&n| n <= 64) {
        Some(n) if experts >= top_k && experts > 0 => (0..n)
            .map(|a| {
                let (t, j) = (a / top_k, a % top_k);
                let first = ids
                    .get(t)
                    .map_or(0, |&e| e.rem_euclid(experts.min(1 << 20) as i32) as usize);
                ((first + j) % experts) as i32
            })
            .collect(),
        _ => ids.to_vec(),
    }
}

/// Permutation tables: a real one (from a small valid permutation) with some entries or
/// lengths damaged, or arbitrary ones.
fn perm_tables() -> impl Strategy<Value = (PermutationTables, usize)> {
    let real = (
        1usize..5,
        1usize..3,
        1usize..6,
        0usize..5,
        prop::option::of((0usize..4, 0usize..3, adv_i32())),
        any::<u64>(),
    )
        .prop_map(|(tokens, top_k, experts, block, poke, seed)| {
            let experts = experts.max(top_k);
            let ids: Vec<i32> = (0..tokens)
                .flat_map(|t| {
                    (0..top_k).map(move |j| ((seed as usize + t * 3 + j) % experts) as i32)
                })
                .collect();
            // Keep ids distinct within a token.
            let ids: Vec<i32> = ids
                .chunks(top_k)
                .flat_map(|row| {
                    let first = row[0];
                    (0..row.len()).map(move |j| (first + j as i32) % experts as i32)
                })
                .collect();
            let opts = PermuteOptions {
                block,
                capacity_factor: None,
            };
            let mut p = moe_ref::permute_f64(&ids, tokens, top_k, experts, opts).unwrap_or(
                PermutationTables {
                    routed_counts: vec![],
                    counts: vec![],
                    offsets: vec![],
                    slot_of: vec![],
                    slot_assignment: vec![],
                    block_expert: vec![],
                    dropped: 0,
                },
            );
            if let Some((table, at, v)) = poke {
                let t = match table {
                    0 => &mut p.slot_of,
                    1 => &mut p.slot_assignment,
                    2 => &mut p.offsets,
                    _ => &mut p.counts,
                };
                if !t.is_empty() {
                    let i = at % t.len();
                    t[i] = v;
                }
            }
            (p, top_k)
        });
    let wild = (
        prop::collection::vec(adv_i32(), 0..8),
        prop::collection::vec(adv_i32(), 0..8),
        adv_usize(),
    )
        .prop_map(|(slot_of, slot_assignment, top_k)| {
            (
                PermutationTables {
                    routed_counts: vec![],
                    counts: vec![],
                    offsets: vec![],
                    slot_of,
                    slot_assignment,
                    block_expert: vec![],
                    dropped: 0,
                },
                top_k,
            )
        });
    prop_oneof![3 => real, 1 => wild]
}

proptest! {
    #![proptest_config(config(2000))]

    /// Routing and the losses with adversarial configs, lengths and token counts.
    #[test]
    fn moe_reference_routing(
        cfg in adv_router(),
        tokens in small_or_adv_usize(4),
        logits_delta in delta(),
        z in prop::collection::vec(adv_f64(), 0..12),
        bias in prop::option::of(prop::collection::vec(adv_f64(), 0..40)),
        counts in prop::collection::vec(adv_i32(), 0..40),
        ids in prop::collection::vec(adv_i32(), 0..20),
        dw in prop::option::of(prop::collection::vec(adv_f64(), 0..20)),
        losses in (adv_f64(), adv_f64()),
        gamma in adv_f64(),
        fallback in 0usize..40,
    ) {
        let opts = LossOptions { aux_coef: losses.0, z_coef: losses.1 };
        // Per-expert vectors of the config's length (up to a one-off) in most cases.
        let fit = |v: &[f64], d: i8| -> Vec<f64> {
            let n = length(Some(cfg.experts), d, v.len(), 64);
            (0..n).map(|i| v.get(i).copied().unwrap_or(0.25 * i as f64)).collect()
        };
        let (z, bias, counts) = if logits_delta == 0 || fallback % 3 != 0 {
            let n = length(Some(cfg.experts), logits_delta, counts.len(), 64);
            let counts: Vec<i32> = (0..n).map(|i| counts.get(i).copied().unwrap_or(i as i32)).collect();
            (fit(&z, 0), bias.map(|b| fit(&b, logits_delta)), counts)
        } else {
            (z, bias, counts)
        };
        for scoring in [Scoring::Softmax, Scoring::Sigmoid] {
            guard!("moe::reference::probabilities", [scoring, z], moe_ref::probabilities(scoring, &z));
            guard!("moe::reference::balance_probabilities", [scoring, z], moe_ref::balance_probabilities(scoring, &z));
        }
        let r = guard!("moe::reference::choice_scores", [cfg, z, bias], moe_ref::choice_scores(&cfg, &z, bias.as_deref()));
        typed("choice_scores", &r)?;
        let r = guard!("moe::reference::group_scores", [cfg, z], moe_ref::group_scores(&cfg, &z));
        typed("group_scores", &r)?;
        let r = guard!("moe::reference::eligible", [cfg, z], moe_ref::eligible(&cfg, &z));
        typed("eligible", &r)?;
        // Logits of the right length when that is small.
        let n = length(tokens.checked_mul(cfg.experts), logits_delta, fallback, 400);
        let logits = filler(n, 11);
        let r = guard!("moe::reference::route_f64", [cfg, n, tokens, bias], moe_ref::route_f64(&cfg, &logits, tokens, bias.as_deref()));
        typed("route_f64", &r)?;
        let routed_ids = r.ok().map(|r| r.ids);
        let ids_used = routed_ids.as_deref().unwrap_or(&ids);
        let dw = dw.map(|d| {
            let n = length(Some(ids_used.len()), logits_delta, d.len(), 64);
            (0..n).map(|i| d.get(i).copied().unwrap_or(0.5)).collect::<Vec<f64>>()
        });
        let r = guard!("moe::reference::router_losses_f64", [cfg, n, tokens, counts, opts],
            moe_ref::router_losses_f64(&cfg, &logits, tokens, &counts, opts));
        typed("router_losses_f64", &r)?;
        let r = guard!("moe::reference::route_backward_f64", [cfg, n, tokens, ids_used, dw, counts, opts],
            moe_ref::route_backward_f64(&cfg, &logits, tokens, ids_used, dw.as_deref(), Some(&counts), opts));
        typed("route_backward_f64", &r)?;
        let bias_v = bias.clone().unwrap_or_default();
        let r = guard!("moe::reference::update_bias_f64", [bias_v, counts, gamma], moe_ref::update_bias_f64(&bias_v, &counts, gamma));
        typed("update_bias_f64", &r)?;
    }

    /// Permutation, gather and combine with adversarial ids, tables and hidden sizes.
    #[test]
    fn moe_reference_permutation(
        ids in prop::collection::vec(adv_i32(), 0..12),
        tokens in small_or_adv_usize(6),
        top_k in small_or_adv_usize(3),
        experts in small_or_adv_usize(8),
        opts in permute_options(),
        tables in perm_tables(),
        hidden in small_or_adv_usize(4),
        deltas in prop::collection::vec(delta(), 4),
        fallback in prop::collection::vec(0usize..30, 4),
        with_scale in any::<bool>(),
        fit in any::<bool>(),
    ) {
        // Half the cases: ids of the right shape, each in range and distinct in a token
        // (when the shape is small), so that the permutation runs.
        let ids = if fit { fit_ids(&ids, tokens, top_k, experts) } else { ids };
        let r = guard!("moe::reference::permute_f64", [ids, tokens, top_k, experts, opts],
            moe_ref::permute_f64(&ids, tokens, top_k, experts, opts));
        typed("permute_f64", &r)?;
        let (perm, k) = tables;
        let assignments = perm.slot_of.len();
        let t = assignments.checked_div(k).unwrap_or(0);
        let cap = 400;
        let x = filler(length(t.checked_mul(hidden), deltas[0], fallback[0], cap), 12);
        let slots_h = length(perm.slot_assignment.len().checked_mul(hidden), deltas[1], fallback[1], cap);
        let expert_out = filler(slots_h, 13);
        let w = filler(length(Some(assignments), deltas[2], fallback[2], cap), 14);
        let scale = with_scale.then(|| w.clone());
        let r = guard!("moe::reference::gather_f64", [perm, k, hidden, x.len(), scale], moe_ref::gather_f64(&x, hidden, k, &perm, scale.as_deref()));
        typed("gather_f64", &r)?;
        let r = guard!("moe::reference::combine_f64", [perm, k, hidden, slots_h, w.len()], moe_ref::combine_f64(&expert_out, hidden, k, &perm, scale.as_deref()));
        typed("combine_f64", &r)?;
        let r = guard!("moe::reference::combine_backward_f64", [perm, k, hidden, x.len(), slots_h, w.len()],
            moe_ref::combine_backward_f64(&x, &expert_out, hidden, k, &perm, &w));
        typed("combine_backward_f64", &r)?;
    }
}

// ---------------------------------------------------------------------------------------
// MoE: the emulated kernels
// ---------------------------------------------------------------------------------------

/// Small router configurations the emulator can run quickly, and a few bad ones.
fn emu_router() -> impl Strategy<Value = RouterConfig> {
    prop_oneof![
        4 => (0usize..4, 1usize..3).prop_map(|(which, k)| match which {
            0 => RouterConfig::mixtral(8, k),
            1 => RouterConfig::qwen_moe(6, k, true),
            2 => RouterConfig::deepseek_v2(8, k, 4, 2, 16.0),
            _ => RouterConfig::deepseek_v3(8, k, 2, 1, true, 2.5),
        }),
        1 => adv_router(),
    ]
}

/// The plan sizes a HostPermutation would allocate, when its plan is valid.
fn host_perm_elems(tokens: usize, top_k: usize, experts: usize, opts: PermuteOptions) -> usize {
    match PermutePlan::new(tokens, top_k, experts, opts) {
        Ok(p) => p
            .assignments
            .saturating_add(p.max_slots)
            .saturating_add(p.chunks.saturating_mul(experts)),
        Err(_) => 0,
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn moe_emulator(
        cfg in emu_router(),
        tokens in small_or_adv_usize(3),
        deltas in prop::collection::vec(delta(), 10),
        fallback in prop::collection::vec(0usize..20, 10),
        bias in any::<bool>(),
        block_kernel in any::<bool>(),
        perm_shape in (small_or_adv_usize(3), small_or_adv_usize(3), small_or_adv_usize(8), permute_options()),
        ids in prop::collection::vec(adv_i32(), 0..8),
        hidden in small_or_adv_usize(8),
        losses in (adv_f64(), adv_f64()),
        gamma in adv_f64(),
        use_routed in any::<bool>(),
        bf in any::<bool>(),
    ) {
        let cap = 512;
        let n_logits = length(tokens.checked_mul(cfg.experts), deltas[0], fallback[0], cap);
        let logits: Vec<f32> = filler(n_logits, 21).iter().map(|&x| x as f32).collect();
        let n_out = length(tokens.checked_mul(cfg.top_k), deltas[1], fallback[1], cap);
        let mut out_ids = vec![0i32; n_out];
        let mut out_w = vec![0f32; length(tokens.checked_mul(cfg.top_k), deltas[2], fallback[2], cap)];
        let bias_v: Vec<f32> = vec![0.01; length(Some(cfg.experts), deltas[3], fallback[3], cap)];
        let bias_arg = bias.then_some(&bias_v[..]);
        let r = if block_kernel {
            guard!("emulator::route_block_kernel", [cfg, tokens, n_logits, n_out, bias_v.len()],
                emulator::route_block_kernel(&cfg, &logits, tokens, bias_arg, &mut out_ids, &mut out_w))
        } else if bf {
            let lb: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
            guard!("emulator::route", [cfg, tokens, n_logits, n_out, bias_v.len()],
                emulator::route(&cfg, &lb, tokens, bias_arg, &mut out_ids, &mut out_w))
        } else {
            guard!("emulator::route", [cfg, tokens, n_logits, n_out, bias_v.len()],
                emulator::route(&cfg, &logits, tokens, bias_arg, &mut out_ids, &mut out_w))
        };
        typed("emulator::route", &r)?;
        let routed = r.is_ok() && tokens > 0;

        // A permutation: of the routed ids when routing worked, else of the adversarial
        // shape (not allocated when its valid plan is large: HostPermutation::new sizes
        // its tables from the plan by design).
        let (pt, pk, pe, popts) = perm_shape;
        let (pt, pk, pe, ids) = if routed && use_routed {
            (tokens, cfg.top_k, cfg.experts, out_ids.clone())
        } else if use_routed {
            (pt, pk, pe, fit_ids(&ids, pt, pk, pe))
        } else {
            (pt, pk, pe, ids)
        };
        if host_perm_elems(pt, pk, pe, popts) > 1 << 16 {
            return Ok(());
        }
        let r = guard!("HostPermutation::new", [pt, pk, pe, popts], HostPermutation::new(pt, pk, pe, popts));
        typed("HostPermutation::new", &r)?;
        let Ok(mut perm) = r else { return Ok(()); };
        let r = guard!("emulator::permute", [ids, pt, pk, pe], emulator::permute(&ids, &mut perm));
        typed("emulator::permute", &r)?;
        let _ = (perm.plan(), perm.is_filled(), perm.tables(), perm.routed_counts());

        let plan = *perm.plan();
        let x: Vec<f32> = vec![0.5; length(plan.tokens.checked_mul(hidden), deltas[4], fallback[4], cap)];
        let rows = length(plan.max_slots.checked_mul(hidden), deltas[5], fallback[5], cap);
        let mut gathered = vec![0f32; rows];
        let scale: Vec<f32> = vec![1.0; length(Some(plan.assignments), deltas[6], fallback[6], cap)];
        let r = guard!("emulator::gather", [plan, hidden, x.len(), rows], emulator::gather(&perm, &x, hidden, Some(&scale), &mut gathered));
        typed("emulator::gather", &r)?;
        let mut combined = vec![0f32; x.len()];
        let r = guard!("emulator::combine", [plan, hidden, rows, scale.len()], emulator::combine(&perm, &gathered, hidden, Some(&scale), &mut combined));
        typed("emulator::combine", &r)?;
        let r = guard!("emulator::gather_backward", [plan, hidden, rows], emulator::gather_backward(&perm, &gathered, hidden, &mut combined));
        typed("emulator::gather_backward", &r)?;
        let mut d_expert = vec![0f32; rows];
        let mut d_w = vec![0f32; length(Some(plan.assignments), deltas[7], fallback[7], cap)];
        let r = guard!("emulator::combine_backward", [plan, hidden, rows, scale.len()],
            emulator::combine_backward(&perm, &x, &gathered, hidden, &scale, &mut d_expert, &mut d_w));
        typed("emulator::combine_backward", &r)?;

        let opts = LossOptions { aux_coef: losses.0, z_coef: losses.1 };
        // router_losses sizes its workspace from `tokens` before checking anything else
        // (src/emulator/moe.rs): only token counts whose workspace is small are passed.
        let workspace = StatsPlan::new(tokens).chunks.saturating_mul(cfg.experts);
        if workspace <= 1 << 16 {
            let r = guard!("emulator::router_losses", [cfg, tokens, n_logits, plan, opts],
                emulator::router_losses(&cfg, &logits, tokens, &perm, opts));
            typed("emulator::router_losses", &r)?;
        }
        let mut d_logits = vec![0f32; length(tokens.checked_mul(cfg.experts), deltas[8], fallback[8], cap)];
        let d_weights: Vec<f32> = vec![0.1; n_out];
        let r = guard!("emulator::route_backward", [cfg, tokens, n_logits, out_ids, plan, opts, d_logits.len()],
            emulator::route_backward(&cfg, &logits, tokens, &out_ids, Some(&d_weights), Some(&perm), opts, &mut d_logits));
        typed("emulator::route_backward", &r)?;
        let mut b: Vec<f32> = vec![0.0; length(Some(plan.experts), deltas[9], fallback[9], cap)];
        let r = guard!("emulator::update_bias", [plan, gamma, b.len()], emulator::update_bias(&perm, gamma, &mut b));
        typed("emulator::update_bias", &r)?;
    }
}

/// The bound on head dims is what keeps `inv_freq_f64` small whatever a config says.
#[test]
fn head_dim_bound_is_enforced() {
    let r = RopeConfig::builder(MAX_HEAD_DIM + 2).build();
    assert!(matches!(r, Err(Error::Config { .. })), "{r:?}");
}

// ---------------------------------------------------------------------------------------
// KV cache: merge_states and the paged layout
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(1500))]

    /// merge_states' validation and the emulated op never panic, and bad views are rejected
    /// before the kernel runs (no Error::Emulator), whatever the LSE values (NaN, +-inf).
    #[test]
    fn adv_merge_states(
        dense in (0usize..5, 0usize..5, 0usize..4, 1usize..20),
        pokes in prop::collection::vec((0usize..14, adv_usize()), 0..2),
        deltas in prop::collection::vec(delta(), 4),
        lse_vals in prop::collection::vec(adv_f32(), 1..6),
        accumulate in any::<bool>(),
    ) {
        // Dense views, with up to one adversarial field.
        let (parts0, t, h, d) = dense;
        let mut stack = StackedStates::contiguous(parts0, t, h, d);
        let mut out = HeadsLayout::contiguous(t, h, d);
        let mut out_lse = LseLayout::contiguous(h, t);
        for &(field, v) in &pokes {
            match field {
                0 => stack.parts = v,
                1 => stack.o.offset = v,
                2 => stack.o.tokens = v,
                3 => stack.o.head_dim = v,
                4 => stack.o.token_stride = v,
                5 => stack.o_part_stride = v,
                6 => stack.lse.head_stride = v,
                7 => stack.lse_part_stride = v,
                8 => stack.lse.offset = v,
                9 => out.offset = v,
                10 => out.head_stride = v,
                11 => out_lse.head_stride = v,
                12 => out_lse.tokens = v,
                _ => out.heads = v,
            }
        }
        let (parts, o, o_part_stride, lse, lse_part_stride) =
            (stack.parts, stack.o, stack.o_part_stride, stack.lse, stack.lse_part_stride);
        let cap = 1 << 14;
        let last = |l: &HeadsLayout, p: usize, s: usize| -> Option<usize> {
            let off = p.saturating_sub(1).checked_mul(s)?.checked_add(l.offset)?;
            let l2 = HeadsLayout { offset: off, ..*l };
            l2.numel()?;
            Some(off + (l.tokens.max(1) - 1).checked_mul(l.token_stride)?
                + (l.heads.max(1) - 1).checked_mul(l.head_stride)? + l.head_dim)
        };
        let last_lse = |l: &LseLayout, p: usize, s: usize| -> Option<usize> {
            p.saturating_sub(1).checked_mul(s)?.checked_add(l.offset)?
                .checked_add((l.heads.max(1) - 1).checked_mul(l.head_stride)?)?
                .checked_add(l.tokens)
        };
        let po = vec![f16::from_f64(0.5); length(last(&o, parts, o_part_stride), deltas[0], 7, cap)];
        let pl: Vec<f32> = (0..length(last_lse(&lse, parts, lse_part_stride), deltas[1], 5, cap))
            .map(|i| lse_vals[i % lse_vals.len()])
            .collect();
        let mut oo = vec![f16::from_f64(0.25); length(last(&out, 1, 0), deltas[2], 3, cap)];
        let mut ol: Vec<f32> = (0..length(last_lse(&out_lse, 1, 0), deltas[3], 2, cap))
            .map(|i| lse_vals[(i + 1) % lse_vals.len()])
            .collect();
        let shape = MergeShape {
            parts: stack,
            parts_o_len: po.len(),
            parts_lse_len: pl.len(),
            out_o: out,
            out_o_len: oo.len(),
            out_lse,
            out_lse_len: ol.len(),
        };
        let r = guard!("MergeShape::validate", [shape], shape.validate());
        typed("MergeShape::validate", &r)?;
        // Only small launches run (the emulator's cost is per row).
        let rows = o.tokens.saturating_mul(o.heads);
        if rows <= 64 && parts <= 8 {
            let opts = MergeOptions { accumulate };
            let n = (po.len(), pl.len(), oo.len(), ol.len());
            let r = guard!("emulator::merge_states", [stack, out, out_lse, n, opts],
                emulator::merge_states(&po, &pl, &stack, &mut oo, &out, &mut ol, &out_lse, &opts));
            typed("emulator::merge_states", &r)?;
        }
        let lens = (pl.len(), o.head_dim);
        let r = guard!("merge_states_f64", [parts, lens],
            kv_ref::merge_states_f64(&filler(po.len().min(64), 1), &filler(pl.len().min(64), 2),
                parts, o.tokens, o.heads, o.head_dim));
        typed("merge_states_f64", &r)?;
    }

    /// The paged layout's validation, addressing and references never panic.
    #[test]
    fn adv_paged_kv(
        shape in (1usize..5, 1usize..8, 1usize..3, 1usize..5),
        seqlens in prop::collection::vec(-1i32..12, 0..4),
        table_seed in prop::collection::vec(-1i32..9, 0..64),
        pokes in prop::collection::vec((0usize..6, adv_usize(), adv_i32()), 0..2),
        probe in (0usize..5, 0usize..14, 0usize..3),
        delta in delta(),
    ) {
        // A mostly valid batch, with up to one adversarial field.
        let (mut page_size, mut pages, mut heads_kv, mut head_dim) = shape;
        let mut seqlens = seqlens;
        let longest = seqlens.iter().map(|&x| x.max(0) as usize).max().unwrap_or(0);
        let mut max_pages_per_seq = longest.div_ceil(page_size);
        let mut table: Vec<i32> = (0..seqlens.len() * max_pages_per_seq)
            .map(|i| table_seed.get(i).copied().unwrap_or(0).min(pages as i32 - 1))
            .collect();
        for &(field, v, i) in &pokes {
            match field {
                0 => page_size = v,
                1 => pages = v,
                2 => heads_kv = v,
                3 => head_dim = v,
                4 => max_pages_per_seq = v,
                _ => {
                    if let Some(x) = table.first_mut() {
                        *x = i;
                    } else if let Some(x) = seqlens.first_mut() {
                        *x = i;
                    }
                }
            }
        }
        let l = PagedKvLayout { page_size, pages, heads_kv, head_dim };
        let t = PageTable { block_table: &table, max_pages_per_seq, seqlens: &seqlens };
        let r = guard!("PagedKvLayout::validate", [l], l.validate());
        typed("PagedKvLayout::validate", &r)?;
        let r = guard!("PagedKvLayout::validate_table", [l, t], l.validate_table(&t));
        typed("PagedKvLayout::validate_table", &r)?;
        let r = guard!("PagedKvLayout::token_offset", [l, t, probe], l.token_offset(&t, probe.0, probe.1, probe.2));
        typed("PagedKvLayout::token_offset", &r)?;
        let n = length(l.cache_len().ok(), delta, 4, 1 << 14);
        let cache = filler(n, 3);
        let r = guard!("gather_paged_f64", [l, t, n], kv_ref::gather_paged_f64(&l, &cache, &t));
        typed("gather_paged_f64", &r)?;
        if let Ok((dense, _)) = r {
            let mut cache = cache;
            let r = guard!("scatter_paged_f64", [l, t, n], kv_ref::scatter_paged_f64(&l, &dense, &t, &mut cache));
            typed("scatter_paged_f64", &r)?;
        }
    }
}
