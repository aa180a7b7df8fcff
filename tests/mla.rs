//! MLA: the CPU proof that absorbed attention over the latent cache equals naive attention
//! over the expanded keys and values (f64, DeepSeek-V3's real dimensions), the config.json
//! reading and its softmax scale, and the prefill path (the attention forward with head
//! dims 192/128, through the emulator) against the naive form.

mod common;

use half::bf16;
use longctx::attention::reference::attention_f64;
use longctx::attention::{AttentionOptions, Mask};
use longctx::emulator::{self, Arch, HostQkv};
use longctx::layout::HeadsLayout;
use longctx::mla::reference::{absorb_query_f64, absorbed_f64, expand_output_f64, naive_f64};
use longctx::mla::{yarn_mscale, MlaConfig};
use longctx::Error;

struct Data {
    q: Vec<f64>,
    c_kv: Vec<f64>,
    k_pe: Vec<f64>,
    w: Vec<f64>,
}

/// Random weights and activations at the config's dimensions; the latent is RMS-normalised
/// (as the model's `kv_a_layernorm` leaves it), weights scaled like a trained projection.
fn data(cfg: &MlaConfig, tq: usize, tk: usize, seed: u64) -> Data {
    let mut r = common::Rng(seed);
    let (h, rank, dn, dr, dv) = (
        cfg.heads,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    );
    let q = (0..tq * h * (dn + dr)).map(|_| 2.0 * r.uniform()).collect();
    let c_kv = (0..tk * rank).map(|_| 1.7 * r.uniform()).collect();
    let k_pe = (0..tk * dr).map(|_| 2.0 * r.uniform()).collect();
    let ws = 1.0 / (rank as f64).sqrt();
    let w = (0..h * (dn + dv) * rank)
        .map(|_| ws * r.uniform())
        .collect();
    Data { q, c_kv, k_pe, w }
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max)
}

/// naive(q) == W_UV absorbed(W_UK^T q) to ~1e-12, LSE too, at DeepSeek-V3's dimensions
/// (128 heads, latent 512, 128 + 64 query/key, 128 values), for 1 and 2 query tokens
/// (multi-token prediction) over short and longer caches.
#[test]
fn absorbed_equals_naive_deepseek_v3() {
    let cfg = MlaConfig::deepseek_v3();
    for &(tq, tk, seed) in &[(1usize, 1usize, 1u64), (2, 37, 2), (1, 150, 3)] {
        let d = data(&cfg, tq, tk, seed);
        let naive = naive_f64(&cfg, &d.q, &d.c_kv, &d.k_pe, &d.w, tq, tk).unwrap();
        let q_lat = absorb_query_f64(&cfg, &d.q, &d.w, tq).unwrap();
        let lat = absorbed_f64(&cfg, &q_lat, &d.c_kv, &d.k_pe, tq, tk).unwrap();
        let o = expand_output_f64(&cfg, &lat.o, &d.w, tq).unwrap();
        let e_o = max_rel(&o, &naive.o);
        let e_lse = max_rel(&lat.lse, &naive.lse);
        assert!(
            e_o < 1e-12,
            "tq {tq} tk {tk}: O differs by {e_o:e} (relative)"
        );
        assert!(e_lse < 1e-12, "tq {tq} tk {tk}: LSE differs by {e_lse:e}");
        // The scores are not trivial: the softmax is far from uniform.
        if tk > 1 {
            let lse_uniform = (tk as f64).ln();
            assert!(naive.lse.iter().all(|l| (l - lse_uniform).abs() > 1e-3));
        }
    }
}

/// A tensor-parallel shard (16 heads) and a small made-up shape, causal with 2 queries:
/// the second query sees one key more than the first.
#[test]
fn absorbed_equals_naive_small_shapes() {
    let mut shard = MlaConfig::deepseek_v3();
    shard.heads = 16;
    let tiny = MlaConfig {
        heads: 3,
        kv_lora_rank: 8,
        qk_nope_head_dim: 4,
        qk_rope_head_dim: 2,
        v_head_dim: 5,
        softmax_scale: 0.3,
    };
    for cfg in [shard, tiny] {
        for &(tq, tk) in &[(2usize, 2usize), (2, 9), (1, 4)] {
            let d = data(&cfg, tq, tk, 11);
            let naive = naive_f64(&cfg, &d.q, &d.c_kv, &d.k_pe, &d.w, tq, tk).unwrap();
            let q_lat = absorb_query_f64(&cfg, &d.q, &d.w, tq).unwrap();
            let lat = absorbed_f64(&cfg, &q_lat, &d.c_kv, &d.k_pe, tq, tk).unwrap();
            let o = expand_output_f64(&cfg, &lat.o, &d.w, tq).unwrap();
            assert!(max_rel(&o, &naive.o) < 1e-12);
            assert!(max_rel(&lat.lse, &naive.lse) < 1e-12);
        }
    }
    // With one cached key and one query, the output is that key's value.
    let d = data(&tiny, 1, 1, 5);
    let naive = naive_f64(&tiny, &d.q, &d.c_kv, &d.k_pe, &d.w, 1, 1).unwrap();
    for hh in 0..tiny.heads {
        for i in 0..tiny.v_head_dim {
            let w = &d.w[(hh * 9 + 4 + i) * 8..][..8];
            let v: f64 = w.iter().zip(&d.c_kv).map(|(a, b)| a * b).sum();
            assert!((naive.o[hh * 5 + i] - v).abs() < 1e-14);
        }
    }
}

/// DeepSeek-V3's config.json (the attention keys): the scale is 192^-0.5 x (0.1 ln 40 + 1)^2,
/// computed by hand as 0.13523377886088 (mscale 1.36888794541139).
#[test]
fn deepseek_v3_config_and_scale() {
    let json = r#"{
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"}
    }"#;
    let cfg = MlaConfig::from_hf_config(json).unwrap();
    assert_eq!(cfg, MlaConfig::deepseek_v3());
    assert!((yarn_mscale(40.0, 1.0) - 1.368_887_945_411_393_6).abs() < 1e-15);
    assert!((cfg.softmax_scale - 0.135_233_778_860_880_1).abs() < 1e-15);
    assert_eq!(cfg.latent_dim(), 576);
    assert_eq!(cfg.qk_head_dim(), 192);
    // DeepSeek-V2-Lite: no mscale_all_dim in some exports means no correction.
    let plain = json.replace("\"mscale_all_dim\": 1.0,", "");
    let cfg = MlaConfig::from_hf_config(&plain).unwrap();
    assert!((cfg.softmax_scale - 192f64.powf(-0.5)).abs() < 1e-15);
    // The RoPE family reads the same file for k_pe's rotation (64 channels, YaRN).
    let rope = longctx::rope::RopeConfig::from_hf_config(json).unwrap();
    assert_eq!(rope.rotary_dim(), 64);
}

fn config_key(e: longctx::Result<MlaConfig>) -> String {
    match e {
        Err(Error::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn bad_configs_and_lengths_are_typed_errors() {
    let base = r#"{"num_attention_heads": 16, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                  "qk_rope_head_dim": 64, "v_head_dim": 128}"#;
    MlaConfig::from_hf_config(base).unwrap();
    assert_eq!(
        config_key(MlaConfig::from_hf_config(
            &base.replace("\"kv_lora_rank\": 512,", "")
        )),
        "kv_lora_rank"
    );
    assert_eq!(
        config_key(MlaConfig::from_hf_config(&base.replace("16", "0"))),
        "num_attention_heads"
    );
    assert_eq!(
        config_key(MlaConfig::from_hf_config(&base.replace("128,", "\"x\","))),
        "qk_nope_head_dim"
    );
    assert_eq!(config_key(MlaConfig::from_hf_config("[1]")), "config.json");
    let with_bad_factor = base.replace(
        "\"v_head_dim\": 128}",
        "\"v_head_dim\": 128, \"rope_scaling\": {\"mscale_all_dim\": 1.0}}",
    );
    assert_eq!(
        config_key(MlaConfig::from_hf_config(&with_bad_factor)),
        "rope_scaling.factor"
    );
    let cfg = MlaConfig::from_hf_config(base).unwrap();
    let d = data(&cfg, 1, 3, 1);
    let e = naive_f64(&cfg, &d.q[1..], &d.c_kv, &d.k_pe, &d.w, 1, 3);
    assert!(
        matches!(e, Err(Error::InvalidArgument { arg: "q", .. })),
        "{e:?}"
    );
    let e = naive_f64(&cfg, &d.q, &d.c_kv, &d.k_pe, &d.w, 1, 4);
    assert!(
        matches!(e, Err(Error::InvalidArgument { arg: "c_kv", .. })),
        "{e:?}"
    );
    let e = absorbed_f64(&cfg, &[], &[], &[], 1, 0);
    assert!(matches!(e, Err(Error::InvalidArgument { .. })), "{e:?}");
    let huge = MlaConfig {
        heads: usize::MAX,
        ..cfg
    };
    assert!(naive_f64(&huge, &d.q, &d.c_kv, &d.k_pe, &d.w, 1, 3).is_err());
}

/// Prefill stays on the attention forward with head dims 192/128: the kernel (through the
/// emulator, both tile shapes) on the keys and values expanded from the latent and rounded
/// to bf16 matches the naive MLA of the same rounded inputs, within bf16 attention
/// tolerance; and the naive MLA is exactly attention over the expansion.
#[test]
fn emu_prefill_192_128_matches_naive_mla() {
    let mut cfg = MlaConfig::deepseek_v3();
    cfg.heads = 4;
    let (t, h) = (45usize, cfg.heads);
    let d = data(&cfg, t, t, 21);
    let rnd = |x: &[f64]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f64(v)).collect() };
    // Expand in f64, as the model's kv_b_proj GEMM would, then round to bf16.
    let (r, dn, dr, dv) = (cfg.kv_lora_rank, 128, 64, 128);
    let mut k = vec![0.0; t * h * (dn + dr)];
    let mut v = vec![0.0; t * h * dv];
    for j in 0..t {
        let c = &d.c_kv[j * r..(j + 1) * r];
        for hh in 0..h {
            let w = &d.w[hh * (dn + dv) * r..];
            for i in 0..dn {
                k[(j * h + hh) * (dn + dr) + i] = w[i * r..(i + 1) * r]
                    .iter()
                    .zip(c)
                    .map(|(a, b)| a * b)
                    .sum();
            }
            k[(j * h + hh) * (dn + dr) + dn..][..dr].copy_from_slice(&d.k_pe[j * dr..(j + 1) * dr]);
            for i in 0..dv {
                v[(j * h + hh) * dv + i] = w[(dn + i) * r..(dn + i + 1) * r]
                    .iter()
                    .zip(c)
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
    }
    let (qb, kb, vb) = (rnd(&d.q), rnd(&k), rnd(&v));
    let widen = |x: &[bf16]| -> Vec<f64> { x.iter().map(|v| v.to_f64()).collect() };
    // The naive MLA equals attention over its expansion exactly (same f64 math).
    let naive = naive_f64(&cfg, &d.q, &d.c_kv, &d.k_pe, &d.w, t, t).unwrap();
    let problem = |q: &[f64], k: &[f64], v: &[f64]| {
        attention_f64(&longctx::attention::reference::Problem {
            q,
            k,
            v,
            cu_seqlens_q: &[0, t],
            cu_seqlens_k: &[0, t],
            heads_q: h,
            heads_kv: h,
            head_dim: dn + dr,
            head_dim_v: dv,
            scale: cfg.softmax_scale,
            softcap: None,
            mask: Mask::causal(),
        })
        .unwrap()
    };
    let expanded = problem(&d.q, &k, &v);
    assert!(max_rel(&expanded.o, &naive.o) < 1e-13);
    // The kernel on the rounded tensors against the f64 attention of the same rounded values.
    let want = problem(&widen(&qb), &widen(&kb), &widen(&vb));
    for arch in [Arch::Sm80, Arch::Sm90] {
        let mut o = vec![bf16::ZERO; t * h * dv];
        let mut lse = vec![0f32; h * t];
        emulator::attention_forward(
            arch,
            &HostQkv {
                q: &qb,
                q_layout: HeadsLayout::contiguous(t, h, dn + dr),
                k: &kb,
                k_layout: HeadsLayout::contiguous(t, h, dn + dr),
                v: &vb,
                v_layout: HeadsLayout::contiguous(t, h, dv),
            },
            &mut o,
            HeadsLayout::contiguous(t, h, dv),
            Some(&mut lse),
            &[0, t as i32],
            &[0, t as i32],
            &AttentionOptions {
                softmax_scale: Some(cfg.softmax_scale as f32),
                mask: Mask::causal(),
                softcap: None,
            },
        )
        .unwrap();
        let vmax = widen(&vb).iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (i, (g, w)) in o.iter().zip(&want.o).enumerate() {
            // Output rounding plus P rounded to bf16 before P V (|dO| <= eps max|V|).
            let tol = 2f64.powi(-8) * (w.abs() + vmax) * 1.01 + 1e-5;
            assert!(
                (g.to_f64() - w).abs() <= tol,
                "{arch:?} O[{i}] {} vs {w}",
                g.to_f64()
            );
        }
        for (g, w) in lse.iter().zip(&want.lse) {
            assert!(
                (f64::from(*g) - w).abs() <= 2e-5 * (1.0 + w.abs()),
                "{arch:?} LSE {g} vs {w}"
            );
        }
    }
}
