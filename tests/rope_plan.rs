//! Tests of the RoPE plan: limits between the scaling variants, values for real model
//! configs (checked against closed forms computed here by a different route), config.json
//! errors and the builder.

use longctx::rope::{RopeConfig, RopeScaling};
use longctx::Error;

/// `base^(-2i/dim)` by exp/ln instead of the plan's `1 / powf`.
fn default_inv(base: f64, dim: usize, i: usize) -> f64 {
    (-(2.0 * i as f64 / dim as f64) * base.ln()).exp()
}

fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    let tol = rel * got.abs().max(want.abs());
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, want {want:e} (diff {:e}, tol {tol:e})",
        (got - want).abs()
    );
}

fn parse(json: &str) -> RopeConfig {
    match RopeConfig::from_hf_config(json) {
        Ok(c) => c,
        Err(e) => panic!("config should parse: {e}"),
    }
}

fn config_error(json: &str) -> (String, String) {
    match RopeConfig::from_hf_config(json) {
        Ok(c) => panic!("config should be rejected, got {c:?}"),
        Err(Error::Config { key, problem }) => (key, problem),
        Err(other) => panic!("expected Error::Config, got {other:?}"),
    }
}

fn builder_error(result: Result<RopeConfig, Error>) -> (String, String) {
    match result {
        Ok(c) => panic!("builder should reject, got {c:?}"),
        Err(Error::Config { key, problem }) => (key, problem),
        Err(other) => panic!("expected Error::Config, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------
// Real model configs (the RoPE-relevant keys of their config.json)
// ------------------------------------------------------------------------------------

const LLAMA_3_1_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "hidden_size": 4096,
  "num_attention_heads": 32,
  "num_key_value_heads": 8,
  "max_position_embeddings": 131072,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0
}"#;

const QWEN2_5_YARN: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "hidden_size": 3584,
  "num_attention_heads": 28,
  "num_key_value_heads": 4,
  "max_position_embeddings": 32768,
  "rope_theta": 1000000.0,
  "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
}"#;

const DEEPSEEK_V3: &str = r#"{
  "architectures": ["DeepseekV3ForCausalLM"],
  "hidden_size": 7168,
  "num_attention_heads": 128,
  "kv_lora_rank": 512,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "max_position_embeddings": 163840,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000
}"#;

const DEEPSEEK_V2: &str = r#"{
  "architectures": ["DeepseekV2ForCausalLM"],
  "hidden_size": 5120,
  "num_attention_heads": 128,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "max_position_embeddings": 163840,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000
}"#;

const GPT_OSS: &str = r#"{
  "architectures": ["GptOssForCausalLM"],
  "head_dim": 64,
  "hidden_size": 2880,
  "num_attention_heads": 64,
  "max_position_embeddings": 131072,
  "rope_scaling": {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_type": "yarn",
    "truncate": false
  },
  "rope_theta": 150000
}"#;

const CODE_LLAMA: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "hidden_size": 4096,
  "num_attention_heads": 32,
  "max_position_embeddings": 16384,
  "rope_scaling": null,
  "rope_theta": 1000000
}"#;

/// Phi-3-mini-128k's shape (head_dim 96 = 3072 / 32, 48 pairs, top-level
/// original_max_position_embeddings 4096, max 131072). The 48-entry factor lists are
/// synthetic but distinct per pair, so the index-to-factor mapping is checked.
fn phi3_short(i: usize) -> f64 {
    1.0 + 0.01 * i as f64
}
fn phi3_long(i: usize) -> f64 {
    1.25 + 0.75 * i as f64
}
fn phi3_json(rope_type: &str) -> String {
    let list = |f: fn(usize) -> f64| {
        (0..48)
            .map(|i| format!("{}", f(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"{{
  "architectures": ["Phi3ForCausalLM"],
  "hidden_size": 3072,
  "num_attention_heads": 32,
  "max_position_embeddings": 131072,
  "original_max_position_embeddings": 4096,
  "rope_scaling": {{
    "long_factor": [{}],
    "short_factor": [{}],
    "type": "{rope_type}"
  }},
  "rope_theta": 10000.0
}}"#,
        list(phi3_long),
        list(phi3_short)
    )
}

// ------------------------------------------------------------------------------------
// Limits
// ------------------------------------------------------------------------------------

#[test]
fn yarn_with_factor_one_equals_default() {
    let default = RopeConfig::builder(128).base(1e6).build().unwrap();
    let yarn = RopeConfig::builder(128)
        .base(1e6)
        .scaling(RopeScaling::Yarn {
            factor: 1.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        })
        .build()
        .unwrap();
    let (d, y) = (default.inv_freq_f64(1 << 20), yarn.inv_freq_f64(1 << 20));
    assert_eq!(d.len(), 64);
    assert_eq!(y.len(), 64);
    for (i, (a, b)) in d.iter().zip(&y).enumerate() {
        assert_close(*b, *a, 1e-15, &format!("pair {i}"));
    }
    assert_eq!(yarn.attention_factor_f64(), 1.0);
}

#[test]
fn llama3_keeps_high_frequencies_and_divides_low_ones() {
    let c = parse(LLAMA_3_1_8B);
    let (base, dim, factor) = (500000.0, 128, 8.0);
    let inv = c.inv_freq_f64(131072);
    assert_eq!(inv.len(), 64);
    for (i, &got) in inv.iter().enumerate() {
        let plain = default_inv(base, dim, i);
        let wavelen = 2.0 * std::f64::consts::PI / plain;
        if wavelen < 8192.0 / 4.0 {
            assert_close(got, plain, 1e-13, &format!("high-frequency pair {i} kept"));
        } else if wavelen > 8192.0 / 1.0 {
            assert_close(
                got,
                plain / factor,
                1e-13,
                &format!("low-frequency pair {i} / factor"),
            );
        } else {
            assert!(got < plain && got > plain / factor, "pair {i} lies between");
        }
    }
    // Where the bands fall for Llama 3.1: w_i = 2 pi 500000^(i/64); 2048 <= w <= 8192 for
    // i in 29..=34 (w_28 = 1956.7, w_35 = 8217.1).
    assert_close(inv[28], default_inv(base, dim, 28), 1e-13, "pair 28");
    assert_close(inv[35], default_inv(base, dim, 35) / 8.0, 1e-13, "pair 35");
    assert_close(inv[63], default_inv(base, dim, 63) / 8.0, 1e-13, "pair 63");
    assert_eq!(inv[0], 1.0);
    // Medium band, pair 30: smooth = (L0 / w - 1) / (4 - 1).
    let plain = 500000f64.powf(-30.0 / 64.0);
    let w = 2.0 * std::f64::consts::PI / plain;
    let smooth = (8192.0 / w - 1.0) / 3.0;
    assert!(smooth > 0.0 && smooth < 1.0);
    assert_close(
        inv[30],
        (1.0 - smooth) * plain / 8.0 + smooth * plain,
        1e-13,
        "pair 30",
    );
    assert_eq!(c.attention_factor(), 1.0);
    assert_eq!(c.rotary_dim(), 128);
    assert_eq!(c.head_dim(), 128);
    assert_eq!(c.base(), 500000.0);
    assert_eq!(c.max_position_embeddings(), 131072);
    assert_eq!(
        c.scaling(),
        &RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
}

#[test]
fn dynamic_ntk_is_default_up_to_max_positions_and_grows_the_base_past_it() {
    let json = r#"{"hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 4096,
                   "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}"#;
    let c = parse(json);
    let default = RopeConfig::builder(128)
        .max_position_embeddings(4096)
        .build()
        .unwrap();
    for seq_len in [0, 1, 100, 4095, 4096] {
        assert_eq!(
            c.inv_freq_f64(seq_len),
            default.inv_freq_f64(seq_len),
            "seq_len {seq_len}"
        );
    }
    // seq_len = 2L with factor 2: base' = base * (2 * 2 - 1)^(128 / 126) = base * 3^(64/63).
    let grown_base = 10000.0 * 3f64.powf(64.0 / 63.0);
    let inv = c.inv_freq_f64(8192);
    assert_ne!(inv, default.inv_freq_f64(8192));
    assert_eq!(inv[0], 1.0);
    for i in [1, 17, 32, 63] {
        assert_close(
            inv[i],
            default_inv(grown_base, 128, i),
            1e-13,
            &format!("pair {i}"),
        );
        assert!(inv[i] < default_inv(10000.0, 128, i));
    }
    assert_eq!(c.attention_factor_f64(), 1.0);
}

#[test]
fn longrope_switches_to_long_factors_just_past_the_original_length() {
    let c = parse(&phi3_json("longrope"));
    assert_eq!(c.head_dim(), 96);
    assert_eq!(c.rotary_dim(), 96);
    let short = c.inv_freq_f64(4096);
    let long = c.inv_freq_f64(4097);
    assert_eq!(short.len(), 48);
    for i in 0..48 {
        let shape = 10000f64.powf(2.0 * i as f64 / 96.0);
        assert_close(
            short[i],
            1.0 / (phi3_short(i) * shape),
            1e-13,
            &format!("short pair {i}"),
        );
        assert_close(
            long[i],
            1.0 / (phi3_long(i) * shape),
            1e-13,
            &format!("long pair {i}"),
        );
    }
    assert_eq!(c.inv_freq_f64(1), short);
    assert_eq!(c.inv_freq_f64(131072), long);
    // s = 131072 / 4096 = 32 = 2^5 and L0 = 2^12: sqrt(1 + 5/12) = sqrt(17/12).
    assert_close(
        c.attention_factor_f64(),
        (17.0f64 / 12.0).sqrt(),
        1e-15,
        "attention factor",
    );
    match c.scaling() {
        RopeScaling::LongRope {
            original_max_position_embeddings,
            factor,
            attention_factor,
            ..
        } => {
            assert_eq!(*original_max_position_embeddings, 4096);
            assert_eq!(*factor, None);
            assert_eq!(*attention_factor, None);
        }
        other => panic!("expected LongRope, got {other:?}"),
    }
}

#[test]
fn legacy_su_type_is_longrope() {
    assert_eq!(parse(&phi3_json("su")), parse(&phi3_json("longrope")));
}

// ------------------------------------------------------------------------------------
// Real model values
// ------------------------------------------------------------------------------------

/// YaRN's ramp bounds by a different route: d(r) = (dim / 2) log_base(L0 / (2 pi r)).
fn correction_dim(r: f64, dim: usize, base: f64, l0: f64) -> f64 {
    (dim as f64 / 2.0) * (l0 / (2.0 * std::f64::consts::PI * r)).log(base)
}

/// YaRN's inv_freq for pair `i` written as a blend: inv * ((1 - ramp) + ramp / s).
fn yarn_inv(base: f64, dim: usize, s: f64, low: f64, high: f64, i: usize) -> f64 {
    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
    default_inv(base, dim, i) * ((1.0 - ramp) + ramp / s)
}

#[test]
fn qwen2_5_yarn_factor_4() {
    let c = parse(QWEN2_5_YARN);
    assert_eq!(c.rotary_dim(), 128);
    assert_eq!(c.base(), 1e6);
    let (low, high) = (
        correction_dim(32.0, 128, 1e6, 32768.0).floor(),
        correction_dim(1.0, 128, 1e6, 32768.0).ceil(),
    );
    assert_eq!((low, high), (23.0, 40.0));
    let inv = c.inv_freq_f64(131072);
    assert_eq!(inv[0], 1.0);
    for i in [0, 10, 23] {
        assert_close(
            inv[i],
            default_inv(1e6, 128, i),
            1e-13,
            &format!("extrapolated pair {i}"),
        );
    }
    for i in [40, 50, 63] {
        assert_close(
            inv[i],
            default_inv(1e6, 128, i) / 4.0,
            1e-13,
            &format!("interpolated pair {i}"),
        );
    }
    // Pair 30: ramp = 7 / 17.
    let plain = default_inv(1e6, 128, 30);
    assert_close(
        inv[30],
        plain * (10.0 / 17.0) + plain / 4.0 * (7.0 / 17.0),
        1e-13,
        "pair 30",
    );
    for (i, &got) in inv.iter().enumerate() {
        assert_close(
            got,
            yarn_inv(1e6, 128, 4.0, low, high, i),
            1e-13,
            &format!("pair {i}"),
        );
    }
    // 0.1 ln 4 + 1.
    assert_close(
        c.attention_factor_f64(),
        1.138_629_436_111_989,
        1e-15,
        "attention factor",
    );
    assert_eq!(c.attention_factor(), (0.1 * 4f64.ln() + 1.0) as f32);
}

#[test]
fn deepseek_v3_uses_qk_rope_head_dim_and_an_attention_factor_of_exactly_one() {
    let c = parse(DEEPSEEK_V3);
    assert_eq!(c.head_dim(), 64);
    assert_eq!(c.rotary_dim(), 64);
    assert_eq!(c.base(), 10000.0);
    // mscale = mscale_all_dim: the ratio cancels exactly.
    assert_eq!(c.attention_factor_f64(), 1.0);
    assert_eq!(c.attention_factor(), 1.0f32);
    let (low, high) = (
        correction_dim(32.0, 64, 1e4, 4096.0).floor(),
        correction_dim(1.0, 64, 1e4, 4096.0).ceil(),
    );
    assert_eq!((low, high), (10.0, 23.0));
    let inv = c.inv_freq_f64(163840);
    assert_eq!(inv.len(), 32);
    assert_close(inv[5], default_inv(1e4, 64, 5), 1e-13, "pair 5 kept");
    assert_close(
        inv[31],
        1e4f64.powf(-62.0 / 64.0) / 40.0,
        1e-13,
        "pair 31 / 40",
    );
    let plain = default_inv(1e4, 64, 16);
    assert_close(
        inv[16],
        plain * (7.0 / 13.0) + plain / 40.0 * (6.0 / 13.0),
        1e-13,
        "pair 16",
    );
    for (i, &got) in inv.iter().enumerate() {
        assert_close(
            got,
            yarn_inv(1e4, 64, 40.0, low, high, i),
            1e-13,
            &format!("pair {i}"),
        );
    }
}

#[test]
fn deepseek_v2_mscale() {
    let c = parse(DEEPSEEK_V2);
    assert_eq!(c.rotary_dim(), 64);
    assert_eq!(c.attention_factor_f64(), 1.0);
    // With different mscale and mscale_all_dim the ratio shows.
    let json = DEEPSEEK_V2.replace("\"mscale\": 0.707", "\"mscale\": 1.0");
    let c = parse(&json);
    let ln40 = 40f64.ln();
    assert_close(
        c.attention_factor_f64(),
        (0.1 * ln40 + 1.0) / (0.0707 * ln40 + 1.0),
        1e-15,
        "mscale ratio",
    );
    // mscale_all_dim 0 counts as absent (Python truthiness): back to g(40, 1).
    let json = DEEPSEEK_V2.replace("\"mscale_all_dim\": 0.707", "\"mscale_all_dim\": 0");
    assert_close(
        parse(&json).attention_factor_f64(),
        0.1 * ln40 + 1.0,
        1e-15,
        "g(40, 1)",
    );
}

#[test]
fn gpt_oss_yarn_without_truncation() {
    let c = parse(GPT_OSS);
    assert_eq!(c.head_dim(), 64);
    assert_eq!(c.rotary_dim(), 64);
    let low = correction_dim(32.0, 64, 150000.0, 4096.0);
    let high = correction_dim(1.0, 64, 150000.0, 4096.0);
    assert!(
        low.fract() > 0.05 && high.fract() > 0.05,
        "bounds stay fractional: {low} {high}"
    );
    let inv = c.inv_freq_f64(131072);
    assert_eq!(inv.len(), 32);
    for (i, &got) in inv.iter().enumerate() {
        assert_close(
            got,
            yarn_inv(150000.0, 64, 32.0, low, high, i),
            1e-13,
            &format!("pair {i}"),
        );
    }
    // Pair 12 is inside the ramp, with a fractional weight.
    let ramp = (12.0 - low) / (high - low);
    let plain = default_inv(150000.0, 64, 12);
    assert_close(
        inv[12],
        plain * (1.0 - ramp) + plain / 32.0 * ramp,
        1e-13,
        "pair 12",
    );
    // It differs from the truncated version.
    let truncated = parse(&GPT_OSS.replace("\"truncate\": false", "\"truncate\": true"));
    assert_ne!(truncated.inv_freq_f64(131072)[12], inv[12]);
    assert_close(
        c.attention_factor_f64(),
        0.1 * 32f64.ln() + 1.0,
        1e-15,
        "attention factor",
    );
}

#[test]
fn code_llama_default_with_large_base() {
    let c = parse(CODE_LLAMA);
    assert_eq!(c.scaling(), &RopeScaling::Default);
    assert_eq!(c.base(), 1e6);
    assert_eq!(c.rotary_dim(), 128);
    let inv = c.inv_freq_f64(16384);
    assert_eq!(inv.len(), 64);
    assert_eq!(inv[0], 1.0);
    assert_close(inv[32], 1e-3, 1e-14, "1e6^(-1/2)");
    assert_close(inv[16], 1e6f64.powf(-0.25), 1e-14, "1e6^(-1/4)");
    for (i, &got) in inv.iter().enumerate() {
        assert_close(got, default_inv(1e6, 128, i), 1e-13, &format!("pair {i}"));
    }
    assert_eq!(c.attention_factor(), 1.0);
}

#[test]
fn f32_table_is_the_rounded_f64_table() {
    for json in [LLAMA_3_1_8B, QWEN2_5_YARN, DEEPSEEK_V3, GPT_OSS, CODE_LLAMA] {
        let c = parse(json);
        let wide = c.inv_freq_f64(200_000);
        let narrow = c.inv_freq(200_000);
        assert_eq!(narrow.len(), c.rotary_dim() / 2);
        for (n, w) in narrow.iter().zip(&wide) {
            assert_eq!(*n, *w as f32);
        }
    }
}

#[test]
fn rope_theta_defaults_to_10000() {
    let c = parse(
        r#"{"hidden_size": 2048, "num_attention_heads": 16, "max_position_embeddings": 2048}"#,
    );
    assert_eq!(c.base(), 10000.0);
    assert_eq!(c.head_dim(), 128);
    assert_eq!(c.scaling(), &RopeScaling::Default);
}

#[test]
fn linear_divides_by_the_factor() {
    let c = parse(
        r#"{"head_dim": 128, "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 16384,
            "rope_scaling": {"type": "linear", "factor": 4}}"#,
    );
    let inv = c.inv_freq_f64(1);
    for i in [0, 1, 31, 63] {
        assert_close(
            inv[i],
            default_inv(10000.0, 128, i) / 4.0,
            1e-13,
            &format!("pair {i}"),
        );
    }
    assert_eq!(c.attention_factor_f64(), 1.0);
}

#[test]
fn partial_rotary_factor_and_transformers5_rope_parameters() {
    // Phi-2 style: head_dim 80, 40% rotated -> 32 channels, 16 pairs; rope_theta and
    // partial_rotary_factor inside rope_parameters.
    let c = parse(
        r#"{"hidden_size": 2560, "num_attention_heads": 32, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}}"#,
    );
    assert_eq!(c.head_dim(), 80);
    assert_eq!(c.rotary_dim(), 32);
    let inv = c.inv_freq_f64(2048);
    assert_eq!(inv.len(), 16);
    assert_close(inv[8], 0.01, 1e-14, "10000^(-16/32)");
    // Top-level partial_rotary_factor works too.
    let c = parse(r#"{"head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 1e6}"#);
    assert_eq!(c.rotary_dim(), 64);
    assert_close(c.inv_freq_f64(1)[16], 1e-3, 1e-14, "1e6^(-32/64)");
    // The section's rope_theta wins over the top level's.
    let c = parse(
        r#"{"head_dim": 64, "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                "original_max_position_embeddings": 4096}}"#,
    );
    assert_eq!(c.base(), 150000.0);
}

#[test]
fn yarn_defaults_and_derived_factor() {
    // No original_max_position_embeddings: L0 = max_position_embeddings; betas 32 / 1;
    // truncate true.
    let c = parse(
        r#"{"head_dim": 128, "max_position_embeddings": 32768,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
    );
    assert_eq!(
        c.scaling(),
        &RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32768,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        }
    );
    // factor: null derives max_position_embeddings / L0.
    let c = parse(
        r#"{"head_dim": 64, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "yarn", "factor": null, "original_max_position_embeddings": 4096}}"#,
    );
    match c.scaling() {
        RopeScaling::Yarn { factor, .. } => assert_eq!(*factor, 32.0),
        other => panic!("expected Yarn, got {other:?}"),
    }
    // An explicit attention factor wins.
    let c = parse(
        r#"{"head_dim": 64, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "yarn", "factor": 32, "attention_factor": 1.25}}"#,
    );
    assert_eq!(c.attention_factor_f64(), 1.25);
}

// ------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------

#[test]
fn unknown_rope_type_is_named() {
    let (key, problem) = config_error(
        r#"{"head_dim": 128, "rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}"#,
    );
    assert_eq!(key, "rope_scaling.rope_type");
    assert!(problem.contains("ntk-by-parts"), "{problem}");
    let (key, _) = config_error(r#"{"head_dim": 128, "rope_scaling": {"type": "mrope"}}"#);
    assert_eq!(key, "rope_scaling.rope_type");
    let (key, _) = config_error(r#"{"head_dim": 128, "rope_parameters": {"rope_type": 7}}"#);
    assert_eq!(key, "rope_parameters.rope_type");
}

#[test]
fn missing_required_keys_are_named() {
    let (key, problem) = config_error(r#"{"head_dim": 128, "rope_scaling": {"type": "linear"}}"#);
    assert_eq!(key, "rope_scaling.factor");
    assert!(problem.contains("missing"), "{problem}");
    let (key, _) = config_error(
        r#"{"head_dim": 128, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}"#,
    );
    assert_eq!(key, "rope_scaling.low_freq_factor");
    let (key, _) = config_error(
        r#"{"head_dim": 128, "max_position_embeddings": 32768,
            "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 4096}}"#,
    );
    assert_eq!(key, "rope_scaling.factor");
    let (key, _) = config_error(
        r#"{"head_dim": 96, "rope_scaling": {"type": "longrope", "long_factor": [1.0]}}"#,
    );
    assert_eq!(key, "rope_scaling.short_factor");
    let (key, _) =
        config_error(r#"{"head_dim": 128, "rope_scaling": {"type": "dynamic", "factor": 2.0}}"#);
    assert_eq!(key, "max_position_embeddings");
}

#[test]
fn missing_head_dim_keys_are_named() {
    let (key, problem) = config_error(r#"{"rope_theta": 10000.0}"#);
    assert_eq!(key, "head_dim");
    assert!(
        problem.contains("hidden_size") && problem.contains("num_attention_heads"),
        "{problem}"
    );
    let (key, _) = config_error(r#"{"hidden_size": 4096}"#);
    assert_eq!(key, "num_attention_heads");
    let (key, _) = config_error(r#"{"hidden_size": 4096, "num_attention_heads": 0}"#);
    assert_eq!(key, "num_attention_heads");
}

#[test]
fn wrong_json_types_are_rejected() {
    let (key, problem) =
        config_error(r#"{"head_dim": 128, "rope_scaling": {"type": "linear", "factor": "8"}}"#);
    assert_eq!(key, "rope_scaling.factor");
    assert!(problem.contains("number"), "{problem}");
    let (key, _) = config_error(r#"{"head_dim": 128, "rope_theta": "10000"}"#);
    assert_eq!(key, "rope_theta");
    let (key, _) = config_error(r#"{"head_dim": 128.5}"#);
    assert_eq!(key, "head_dim");
    let (key, _) = config_error(r#"{"head_dim": -128}"#);
    assert_eq!(key, "head_dim");
    let (key, _) = config_error(r#"{"head_dim": 128, "rope_scaling": "yarn"}"#);
    assert_eq!(key, "rope_scaling");
    let (key, _) = config_error(
        r#"{"head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "truncate": "no"}}"#,
    );
    assert_eq!(key, "rope_scaling.truncate");
    let mut phi3 = phi3_json("longrope");
    phi3 = phi3.replacen("\"long_factor\": [1.25", "\"long_factor\": [\"1.25\"", 1);
    let (key, _) = config_error(&phi3);
    assert_eq!(key, "rope_scaling.long_factor[0]");
    let (key, _) = config_error("{not json");
    assert_eq!(key, "config.json");
    let (key, _) = config_error("[1, 2]");
    assert_eq!(key, "config.json");
}

#[test]
fn out_of_domain_values_are_rejected() {
    let (key, _) = config_error(r#"{"head_dim": 128, "partial_rotary_factor": 0}"#);
    assert_eq!(key, "partial_rotary_factor");
    let (key, _) = config_error(r#"{"head_dim": 128, "partial_rotary_factor": 1.5}"#);
    assert_eq!(key, "partial_rotary_factor");
    let (key, _) = config_error(r#"{"head_dim": 10, "partial_rotary_factor": 0.5}"#);
    assert_eq!(key, "partial_rotary_factor");
    let (key, _) = config_error(r#"{"head_dim": 0}"#);
    assert_eq!(key, "head_dim");
    let (key, _) = config_error(r#"{"head_dim": 127}"#);
    assert_eq!(key, "head_dim");
    let (key, _) = config_error(r#"{"head_dim": 128, "rope_theta": 1.0}"#);
    assert_eq!(key, "rope_theta");
    let (key, _) =
        config_error(r#"{"head_dim": 128, "rope_scaling": {"type": "linear", "factor": 0}}"#);
    assert_eq!(key, "rope_scaling.factor");
    let (key, _) =
        config_error(r#"{"head_dim": 128, "rope_scaling": {"type": "linear", "factor": -2.0}}"#);
    assert_eq!(key, "rope_scaling.factor");
    let (key, _) = config_error(
        &LLAMA_3_1_8B.replace("\"high_freq_factor\": 4.0", "\"high_freq_factor\": 1.0"),
    );
    assert_eq!(key, "rope_scaling.high_freq_factor");
    // LongRoPE factor lists must have rotary_dim / 2 entries: 48 for head_dim 96, not 64.
    let (key, problem) = config_error(&phi3_json("longrope").replace("3072", "4096"));
    assert_eq!(key, "rope_scaling.short_factor");
    assert!(
        problem.contains("64") && problem.contains("48"),
        "{problem}"
    );
}

#[test]
fn per_layer_rope_parameters_are_rejected() {
    let (key, _) = config_error(
        r#"{"head_dim": 256, "rope_parameters": {
              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}"#,
    );
    assert_eq!(key, "rope_parameters");
}

// ------------------------------------------------------------------------------------
// Builder
// ------------------------------------------------------------------------------------

#[test]
fn builder_matches_the_parsed_config() {
    let built = RopeConfig::builder(128)
        .base(500000.0)
        .max_position_embeddings(131072)
        .scaling(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
        .build()
        .unwrap();
    assert_eq!(built, parse(LLAMA_3_1_8B));

    let built = RopeConfig::builder(64)
        .scaling(RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(1.0),
            attention_factor: None,
            truncate: true,
        })
        .max_position_embeddings(163840)
        .build()
        .unwrap();
    assert_eq!(built, parse(DEEPSEEK_V3));
}

#[test]
fn builder_defaults() {
    let c = RopeConfig::builder(64).build().unwrap();
    assert_eq!(c.base(), 10000.0);
    assert_eq!(c.rotary_dim(), 64);
    assert_eq!(c.max_position_embeddings(), 0);
    assert_eq!(c.scaling(), &RopeScaling::Default);
    assert_eq!(c.attention_factor(), 1.0);
    let c = RopeConfig::builder(128)
        .partial_rotary_factor(0.25)
        .build()
        .unwrap();
    assert_eq!(c.rotary_dim(), 32);
    assert_eq!(c.inv_freq(1).len(), 16);
}

#[test]
fn builder_rejects_bad_values() {
    let (key, _) = builder_error(RopeConfig::builder(0).build());
    assert_eq!(key, "head_dim");
    let (key, _) = builder_error(RopeConfig::builder(128).base(f64::NAN).build());
    assert_eq!(key, "rope_theta");
    let (key, _) = builder_error(RopeConfig::builder(128).partial_rotary_factor(0.0).build());
    assert_eq!(key, "partial_rotary_factor");
    let (key, _) = builder_error(
        RopeConfig::builder(128)
            .scaling(RopeScaling::Linear {
                factor: f64::INFINITY,
            })
            .build(),
    );
    assert_eq!(key, "rope_scaling.factor");
    let (key, _) = builder_error(
        RopeConfig::builder(128)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build(),
    );
    assert_eq!(key, "max_position_embeddings");
    let (key, _) = builder_error(
        RopeConfig::builder(96)
            .scaling(RopeScaling::LongRope {
                short_factor: vec![1.0; 48],
                long_factor: vec![1.0; 47],
                original_max_position_embeddings: 4096,
                factor: Some(32.0),
                attention_factor: None,
            })
            .build(),
    );
    assert_eq!(key, "rope_scaling.long_factor");
    let (key, _) = builder_error(
        RopeConfig::builder(64)
            .scaling(RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            })
            .build(),
    );
    assert_eq!(key, "rope_scaling.original_max_position_embeddings");
    // mscale_all_dim making g(s, mscale_all_dim) negative: so would be the attention factor.
    let (key, _) = builder_error(
        RopeConfig::builder(64)
            .scaling(RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: Some(1.0),
                mscale_all_dim: Some(-100.0),
                attention_factor: None,
                truncate: true,
            })
            .build(),
    );
    assert_eq!(key, "rope_scaling.mscale_all_dim");
}
