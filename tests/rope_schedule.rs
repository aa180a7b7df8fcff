//! Progressive RoPE schedules: each preset against values computed by hand from its source,
//! the JSON form, validation, stage lookup, and the frequency bands.

use longctx::rope::{frequency_bands, Band, RopeScaling, RopeSchedule};
use longctx::Error;

fn key_of<T: std::fmt::Debug>(r: longctx::Result<T>) -> String {
    match r {
        Err(Error::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// Code Llama: 4,096 at base 1e4, then 16,384 at base 1e6. Pair 1 of head dim 128 turns at
/// base^(-2/128): 1e4^(-1/64) = 0.865964323360065 and 1e6^(-1/64) = 0.8058421877614819.
#[test]
fn code_llama_preset() {
    let s = RopeSchedule::code_llama(128).unwrap();
    let st = s.stages();
    assert_eq!(st.len(), 2);
    assert_eq!((st[0].seq_len, st[1].seq_len), (4096, 16384));
    assert_eq!((st[0].config.base(), st[1].config.base()), (1e4, 1e6));
    let inv0 = st[0].config.inv_freq_f64(4096);
    let inv1 = st[1].config.inv_freq_f64(16384);
    assert!((inv0[1] - 0.865_964_323_360_065).abs() < 1e-15);
    assert!((inv1[1] - 0.805_842_187_761_481_9).abs() < 1e-15);
    assert_eq!(st[1].config.attention_factor_f64(), 1.0);
    // Llama 2's 2T tokens place everything before them in stage 0; the fine-tuning stage is
    // open-ended.
    assert_eq!(s.config_at(0).unwrap().base(), 1e4);
    assert_eq!(s.config_at(1_999_999_999_999).unwrap().base(), 1e4);
    assert_eq!(s.config_at(2_000_000_000_000).unwrap().base(), 1e6);
    assert_eq!(s.boundaries(), vec![Some(2_000_000_000_000), None]);
    // ABF alone changes no pair's band relative to its own base.
    assert!(frequency_bands(&st[1].config, 16384)
        .iter()
        .all(|b| b.band == Band::Unchanged));
}

/// Qwen2.5: YaRN x4 over 32,768 at base 1e6, head dim 128. Ramp bounds by hand:
/// d(r) = 128 ln(32768 / (2 pi r)) / (2 ln 1e6): d(32) = 23.596 -> 23, d(1) = 39.651 -> 40;
/// pairs 0..=23 unchanged, 24..=39 blended, 40..=63 interpolated (/4). Attention factor
/// 0.1 ln 4 + 1 = 1.138629436111989.
#[test]
fn qwen2_5_preset() {
    let s = RopeSchedule::qwen2_5(128).unwrap();
    let st = s.stages();
    assert_eq!(
        st.iter().map(|x| x.seq_len).collect::<Vec<_>>(),
        vec![4096, 32768, 131072]
    );
    let yarn = &st[2].config;
    assert!(matches!(yarn.scaling(), RopeScaling::Yarn { factor, .. } if *factor == 4.0));
    assert!((yarn.attention_factor_f64() - 1.138_629_436_111_989).abs() < 1e-15);
    let bands = frequency_bands(yarn, 131072);
    let count = |b: Band| bands.iter().filter(|x| x.band == b).count();
    assert_eq!(count(Band::Unchanged), 24);
    assert_eq!(count(Band::Blended), 16);
    assert_eq!(count(Band::Interpolated), 24);
    assert!(bands[..24].iter().all(|x| x.band == Band::Unchanged));
    assert!(bands[40..]
        .iter()
        .all(|x| x.band == Band::Interpolated && (x.ratio - 0.25).abs() < 1e-12));
    // Unknown stage lengths: a token count cannot be placed past stage 0.
    assert_eq!(key_of(s.config_at(5)), "stages[0].tokens");
    let s = s.with_tokens(&[1000, 500, 0]).unwrap();
    assert_eq!(s.config_at(999).unwrap().base(), 1e4);
    assert_eq!(s.stage_at(1000).unwrap().seq_len, 32768);
    assert_eq!(s.stage_at(1500).unwrap().seq_len, 131072);
    assert_eq!(s.stage_at(u64::MAX).unwrap().seq_len, 131072);
}

/// Llama 3.1: base 500,000; llama3 rule factor 8 over 8,192: wavelength 2 pi 5e5^(i/64)
/// below 2,048 (i <= 28: 29 pairs) unchanged, above 8,192 (i >= 35: 29 pairs) divided by 8,
/// 6 pairs smoothed.
#[test]
fn llama3_1_preset() {
    let s = RopeSchedule::llama3_1(128).unwrap();
    let last = &s.stages()[1];
    assert_eq!(last.seq_len, 131072);
    assert_eq!(last.tokens, Some(800_000_000_000));
    let bands = frequency_bands(&last.config, 131072);
    let count = |b: Band| bands.iter().filter(|x| x.band == b).count();
    assert_eq!(
        (
            count(Band::Unchanged),
            count(Band::Blended),
            count(Band::Interpolated)
        ),
        (29, 6, 29)
    );
    assert_eq!(bands[28].band, Band::Unchanged);
    assert_eq!(bands[35].band, Band::Interpolated);
}

#[test]
fn json_schedule_and_validation() {
    let json = r#"{"head_dim": 128, "stages": [
        {"name": "pretrain", "seq_len": 4096, "tokens": 2e12, "rope_theta": 10000},
        {"name": "long", "seq_len": 32768, "tokens": 1000000, "rope_theta": 1e6},
        {"seq_len": 131072, "rope_theta": 1e6,
         "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}}]}"#;
    let s = RopeSchedule::from_json(json).unwrap();
    let q = RopeSchedule::qwen2_5(128).unwrap();
    assert_eq!(s.stages()[2].config, q.stages()[2].config);
    assert_eq!(s.stages()[0].name, "pretrain");
    assert_eq!(s.stages()[2].name, "stage 2");
    assert_eq!(s.config_at(2_000_000_999_999).unwrap().base(), 1e6);
    // Lengths must grow.
    let bad = json.replace("\"seq_len\": 32768", "\"seq_len\": 4096");
    assert_eq!(key_of(RopeSchedule::from_json(&bad)), "stages[1].seq_len");
    // Bases must not decrease unless the stage says so.
    let lower = json.replace(
        "\"tokens\": 1000000, \"rope_theta\": 1e6",
        "\"tokens\": 1000000, \"rope_theta\": 5000",
    );
    assert_eq!(
        key_of(RopeSchedule::from_json(&lower)),
        "stages[1].rope_theta"
    );
    let allowed = lower.replace(
        "\"name\": \"long\",",
        "\"name\": \"long\", \"allow_base_decrease\": true,",
    );
    let s2 = RopeSchedule::from_json(&allowed).unwrap();
    // ... but the next stage raising it back is fine.
    assert_eq!(s2.stages()[1].config.base(), 5000.0);
    // A stage config error names the stage.
    let yarn_bad = json.replace("\"factor\": 4", "\"factor\": -4");
    assert_eq!(
        key_of(RopeSchedule::from_json(&yarn_bad)),
        "stages[2].rope_scaling.factor"
    );
    assert_eq!(
        key_of(RopeSchedule::from_json(
            "{\"head_dim\": 128, \"stages\": []}"
        )),
        "schedule"
    );
    assert_eq!(
        key_of(RopeSchedule::from_json("{\"stages\": []}")),
        "head_dim"
    );
    let frac = json.replace("\"tokens\": 1000000", "\"tokens\": 1.5");
    assert_eq!(key_of(RopeSchedule::from_json(&frac)), "stages[1].tokens");
    let zero = json.replace("\"tokens\": 1000000", "\"tokens\": 0");
    assert_eq!(key_of(RopeSchedule::from_json(&zero)), "stages[1].tokens");
    let over = json
        .replace("\"tokens\": 2e12", "\"tokens\": 18446744073709551615")
        .replace("\"tokens\": 1000000", "\"tokens\": 2");
    assert_eq!(key_of(RopeSchedule::from_json(&over)), "stages[1].tokens");
    assert_eq!(key_of(RopeSchedule::from_json("nope")), "schedule");
    // Different head dims across stages.
    let a = RopeSchedule::code_llama(128).unwrap();
    let b = RopeSchedule::code_llama(64).unwrap();
    let mixed = vec![a.stages()[0].clone(), b.stages()[1].clone()];
    assert_eq!(key_of(RopeSchedule::new(mixed)), "stages[1].head_dim");
}

/// PI interpolates every pair; dynamic NTK past its length blends all but pair 0.
#[test]
fn bands_of_pi_and_dynamic() {
    use longctx::rope::RopeConfig;
    let pi = RopeConfig::builder(64)
        .scaling(RopeScaling::Linear { factor: 4.0 })
        .build()
        .unwrap();
    assert!(frequency_bands(&pi, 1)
        .iter()
        .all(|b| b.band == Band::Interpolated));
    let ntk = RopeConfig::builder(64)
        .max_position_embeddings(4096)
        .scaling(RopeScaling::Dynamic { factor: 2.0 })
        .build()
        .unwrap();
    let short = frequency_bands(&ntk, 4096);
    assert!(short.iter().all(|b| b.band == Band::Unchanged));
    let long = frequency_bands(&ntk, 16384);
    assert_eq!(long[0].band, Band::Unchanged);
    assert!(long[1..]
        .iter()
        .all(|b| b.band == Band::Blended && b.ratio < 1.0));
}

/// Dynamic YaRN follows the length: at or below the original length it is plain RoPE
/// (attention factor 1), at 4x it is YaRN x4 exactly (the static rule's numbers), between
/// it interpolates less than x4; dynamic NTK through `Config` grows its base past its length.
#[test]
fn length_scaling_rules() {
    use longctx::rope::{LengthScaling, RopeConfig};
    let yarn = |factor: f64| {
        RopeConfig::builder(128)
            .base(1e6)
            .scaling(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: 32768,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            })
            .build()
            .unwrap()
    };
    let dy = LengthScaling::DynamicYarn(yarn(4.0));
    let plain = RopeConfig::builder(128)
        .base(1e6)
        .build()
        .unwrap()
        .inv_freq_f64(1);
    let short = dy.at(1000).unwrap();
    assert_eq!(short.attention_factor, 1.0);
    for (a, b) in short.inv_freq.iter().zip(&plain) {
        assert!((a - b).abs() <= 1e-15 * b, "{a} vs {b}");
    }
    let at4 = dy.at(4 * 32768).unwrap();
    assert_eq!(at4.inv_freq, yarn(4.0).inv_freq_f64(4 * 32768));
    assert_eq!(at4.attention_factor, yarn(4.0).attention_factor_f64());
    let at2 = dy.at(2 * 32768).unwrap();
    assert!((at2.attention_factor - (0.1 * 2f64.ln() + 1.0)).abs() < 1e-15);
    assert!((at2.inv_freq[63] / plain[63] - 0.5).abs() < 1e-12);
    // Static YaRN through Config ignores the length.
    let st = LengthScaling::Config(yarn(4.0));
    assert_eq!(st.at(10).unwrap(), st.at(1 << 20).unwrap());
    // Dynamic NTK: unchanged up to its length, a larger base after.
    let ntk = LengthScaling::Config(
        RopeConfig::builder(128)
            .max_position_embeddings(8192)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    let base = RopeConfig::builder(128).build().unwrap().inv_freq_f64(1);
    assert_eq!(ntk.at(8192).unwrap().inv_freq, base);
    assert!(ntk.at(16384).unwrap().inv_freq[10] < base[10]);
    // Dynamic YaRN needs a YaRN configuration.
    let bad = LengthScaling::DynamicYarn(RopeConfig::builder(128).build().unwrap());
    assert_eq!(key_of(bad.at(5)), "rope_scaling.rope_type");
}
