//! MLA: the CPU proof that absorbed attention over the latent cache equals naive attention
//! over the expanded keys and values (f64, DeepSeek-V3's real dimensions), the config.json
//! reading and its softmax scale, and the prefill path (the attention forward with head
//! dims 192/128, through the emulator) against the naive form.

mod common;

use common::Aligned;

use half::bf16;
use longctx::attention::reference::attention_f64;
use longctx::attention::{AttentionOptions, Mask};
use longctx::emulator::{self, Arch, HostQkv};
use longctx::layout::HeadsLayout;
use longctx::mla::reference::{absorb_query_f64, absorbed_f64, expand_output_f64, naive_f64};
use longctx::mla::{yarn_mscale, MlaConfig};
use longctx::Error;
use proptest::prelude::*;

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

/// Training through the prefill path: the attention backward at head dims 192/128 on the
/// expanded keys and values, chained through the expansion (dc_kv = sum over heads of
/// W_UK^T dk_nope + W_UV^T dv; dk_pe = sum over heads of dk_rope), is naive MLA's gradient
/// with respect to the latent and k_pe (checked against central differences of naive_f64
/// in f64, to 1e-6 of the largest gradient); and the backward kernels (through the
/// emulator) match the f64 backward of the same bf16 inputs within FlashAttention-style
/// bounds anchored on the same-precision CPU mirror.
#[test]
fn emu_prefill_backward_192_128_matches_naive_mla() {
    use longctx::attention::reference::{
        attention_backward_f64, attention_backward_tiled_f32, Problem, Tiles,
    };
    use longctx::attention::{backward_workspace_len, BackwardOptions, BackwardTiles};
    use longctx::emulator::{HostBackwardInputs, HostGrads};
    let mut cfg = MlaConfig::deepseek_v3();
    cfg.heads = 3;
    let (t, h) = (37usize, cfg.heads);
    let d = data(&cfg, t, t, 31);
    let (r, dn, dr, dv) = (cfg.kv_lora_rank, 128usize, 64usize, 128usize);
    let dk_all = dn + dr;
    // The expansion of a latent (and k_pe) into per-head keys and values, in f64.
    let expand = |c_kv: &[f64], k_pe: &[f64]| -> (Vec<f64>, Vec<f64>) {
        let mut k = vec![0.0; t * h * dk_all];
        let mut v = vec![0.0; t * h * dv];
        for j in 0..t {
            let c = &c_kv[j * r..(j + 1) * r];
            for hh in 0..h {
                let w = &d.w[hh * (dn + dv) * r..];
                for i in 0..dn {
                    k[(j * h + hh) * dk_all + i] = w[i * r..(i + 1) * r]
                        .iter()
                        .zip(c)
                        .map(|(a, b)| a * b)
                        .sum();
                }
                k[(j * h + hh) * dk_all + dn..][..dr].copy_from_slice(&k_pe[j * dr..(j + 1) * dr]);
                for i in 0..dv {
                    v[(j * h + hh) * dv + i] = w[(dn + i) * r..(dn + i + 1) * r]
                        .iter()
                        .zip(c)
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
        }
        (k, v)
    };
    let cu = [0usize, t];
    let mut rng = common::Rng(32);
    let dout: Vec<f64> = (0..t * h * dv)
        .map(|_| f64::from(bf16::from_f64(rng.uniform())))
        .collect();

    // 1. The chain rule through the expansion equals naive MLA's gradient.
    let (k, v) = expand(&d.c_kv, &d.k_pe);
    let g = attention_backward_f64(
        &Problem {
            q: &d.q,
            k: &k,
            v: &v,
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
            heads_q: h,
            heads_kv: h,
            head_dim: dk_all,
            head_dim_v: dv,
            scale: cfg.softmax_scale,
            softcap: None,
            mask: Mask::causal(),
        },
        &dout,
    )
    .unwrap();
    let mut dc = vec![0.0; t * r];
    let mut dpe = vec![0.0; t * dr];
    for j in 0..t {
        for hh in 0..h {
            let w = &d.w[hh * (dn + dv) * r..];
            let dkr = &g.dk[(j * h + hh) * dk_all..][..dk_all];
            let dvr = &g.dv[(j * h + hh) * dv..][..dv];
            for (c, x) in dc[j * r..(j + 1) * r].iter_mut().enumerate() {
                let from_k: f64 = (0..dn).map(|i| w[i * r + c] * dkr[i]).sum();
                let from_v: f64 = (0..dv).map(|i| w[(dn + i) * r + c] * dvr[i]).sum();
                *x += from_k + from_v;
            }
            for i in 0..dr {
                dpe[j * dr + i] += dkr[dn + i];
            }
        }
    }
    let loss = |c_kv: &[f64], k_pe: &[f64]| -> f64 {
        let o = naive_f64(&cfg, &d.q, c_kv, k_pe, &d.w, t, t).unwrap().o;
        o.iter().zip(&dout).map(|(a, b)| a * b).sum()
    };
    let gmax = dc.iter().chain(&dpe).fold(0.0f64, |m, x| m.max(x.abs()));
    let step = 1e-5;
    for (which, idx) in [
        (0usize, 0usize),
        (0, 5 * r + 77),
        (0, (t - 1) * r + 511),
        (0, 20 * r + 300),
        (1, 3),
        (1, 17 * dr + 40),
        (1, (t - 1) * dr + 63),
    ] {
        let mut c_kv = d.c_kv.clone();
        let mut k_pe = d.k_pe.clone();
        let x = if which == 0 {
            &mut c_kv[idx]
        } else {
            &mut k_pe[idx]
        };
        let x0 = *x;
        *x = x0 + step;
        let up = loss(&c_kv, &k_pe);
        let (c_kv2, k_pe2) = if which == 0 {
            c_kv[idx] = x0 - step;
            (c_kv, k_pe)
        } else {
            k_pe[idx] = x0 - step;
            (c_kv, k_pe)
        };
        let down = loss(&c_kv2, &k_pe2);
        let fd = (up - down) / (2.0 * step);
        let chain = if which == 0 { dc[idx] } else { dpe[idx] };
        assert!(
            (fd - chain).abs() <= 1e-6 * gmax,
            "{} [{idx}]: chain rule {chain:e}, central difference {fd:e} (max |grad| {gmax:e})",
            if which == 0 { "dc_kv" } else { "dk_pe" }
        );
    }

    // 2. The backward kernels on the bf16-rounded expansion against the f64 backward of the
    // same values.
    let rnd = |x: &[f64]| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f64(v)).collect() };
    let widen = |x: &[bf16]| -> Vec<f64> { x.iter().map(|v| v.to_f64()).collect() };
    let (qb, kb, vb) = (rnd(&d.q), rnd(&k), rnd(&v));
    let (qr, kr, vr) = (widen(&qb), widen(&kb), widen(&vb));
    let pr = Problem {
        q: &qr,
        k: &kr,
        v: &vr,
        cu_seqlens_q: &cu,
        cu_seqlens_k: &cu,
        heads_q: h,
        heads_kv: h,
        head_dim: dk_all,
        head_dim_v: dv,
        scale: cfg.softmax_scale,
        softcap: None,
        mask: Mask::causal(),
    };
    let fwd = attention_f64(&pr).unwrap();
    let ob = rnd(&fwd.o);
    let lse: Vec<f32> = fwd.lse.iter().map(|&x| x as f32).collect();
    let want = attention_backward_f64(&pr, &dout).unwrap();
    let tiles = BackwardTiles::for_head_dims(dk_all, dv).unwrap();
    let f32s = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
    let cpu = attention_backward_tiled_f32(
        &pr,
        &f32s(&widen(&ob)),
        &lse,
        &f32s(&dout),
        Tiles::new(tiles.block_m, tiles.block_n),
        |x| bf16::from_f32(x).to_f32(),
    )
    .unwrap();
    let dob = rnd(&dout);
    let ql = HeadsLayout::contiguous(t, h, dk_all);
    let vl = HeadsLayout::contiguous(t, h, dv);
    let mut dq = vec![bf16::ZERO; t * h * dk_all];
    let mut dk = vec![bf16::ZERO; t * h * dk_all];
    let mut dvv = vec![bf16::ZERO; t * h * dv];
    let mut ws = vec![f32::NAN; backward_workspace_len(t, h, dk_all).unwrap().max(1)];
    let cu32 = [0i32, t as i32];
    emulator::attention_backward(
        &HostQkv {
            q: &qb,
            q_layout: ql,
            k: &kb,
            k_layout: ql,
            v: &vb,
            v_layout: vl,
        },
        &HostBackwardInputs {
            o: &ob,
            o_layout: vl,
            dout: &dob,
            dout_layout: vl,
            lse: &lse,
        },
        HostGrads {
            dq: &mut dq,
            dq_layout: ql,
            dk: &mut dk,
            dk_layout: ql,
            dv: &mut dvv,
            dv_layout: vl,
        },
        &mut ws,
        &cu32,
        &cu32,
        &BackwardOptions {
            attention: AttentionOptions {
                softmax_scale: Some(cfg.softmax_scale as f32),
                mask: Mask::causal(),
                softcap: None,
            },
            ..BackwardOptions::default()
        },
    )
    .unwrap();
    let eps = 2f64.powi(-8);
    for (name, got, cpu, want) in [
        ("dq", widen(&dq), &cpu.dq, &want.dq),
        ("dk", widen(&dk), &cpu.dk, &want.dk),
        ("dv", widen(&dvv), &cpu.dv, &want.dv),
    ] {
        let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let err = |a: &mut dyn Iterator<Item = f64>| {
            a.zip(want.iter()).fold(0.0f64, |m, (x, y)| {
                let e = (x - y).abs();
                if e.is_nan() {
                    f64::INFINITY
                } else {
                    m.max(e)
                }
            })
        };
        let e_emu = err(&mut got.iter().copied());
        let e_cpu = err(&mut cpu.iter().map(|&x| f64::from(x)));
        let tol = 3.0 * e_cpu + 4.0 * eps * scale + 1e-5;
        assert!(
            e_emu <= tol,
            "{name}: error {e_emu:e} > {tol:e} (CPU mirror {e_cpu:e}, max |grad| {scale:e})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Absorbed decode over the paged latent cache (kernels/kv_cache/mla_decode_kernel.cuh).

use longctx::attention::reference::Output;
use longctx::emulator::{HostDecodeOutput, HostLatentCache};
use longctx::kv_cache::{Fp8E4m3, LseLayout, PageTable, PagedKvLayout, Splits, StepTable};
use longctx::mla::{
    latent_layout, plan_mla_decode, MlaDecodeOptions, MlaDecodePlan, MLA_KV_LORA_RANK,
    MLA_LATENT_DIM, MLA_ROPE_DIM,
};

/// One latent decode problem.
#[derive(Debug, Clone)]
struct LatCase {
    page_size: usize,
    heads: usize,
    lens: Vec<usize>,
    news: Vec<usize>,
    fp8: bool,
    seed: u64,
}

/// The paged cache (both storages) and the logical values the reference reads.
struct LatBuilt {
    layout: PagedKvLayout,
    block_table: Vec<i32>,
    max_pages: usize,
    seqlens: Vec<i32>,
    cu_new: Vec<i32>,
    /// bf16 cache `[slots, 576]`.
    lat_bf16: Vec<bf16>,
    /// fp8 codes `[slots, 512]`, scales `[slots]`, k_pe `[slots, 64]`.
    codes: Vec<Fp8E4m3>,
    scales: Vec<f32>,
    rope: Vec<bf16>,
    /// Per sequence: c_kv `[len, 512]` and k_pe `[len, 64]` as the kernel reads them.
    c_kv: Vec<Vec<f64>>,
    k_pe: Vec<Vec<f64>>,
    /// q_lat `[total_new, heads, 576]`, bf16 values.
    q: Vec<f64>,
    total_new: usize,
}

const SCALE: f32 = 0.135;

impl LatCase {
    /// Random latent rows (amplitude 1.7 like the normalised c_kv, 2 for k_pe), written
    /// into shuffled pages (3 spare); per-token fp8 scales absmax / 448.
    fn build(&self) -> LatBuilt {
        let mut r = common::Rng(self.seed);
        let ps = self.page_size;
        let used: Vec<usize> = self.lens.iter().map(|l| l.div_ceil(ps)).collect();
        let max_pages = used.iter().copied().max().unwrap_or(0) + 1;
        let pages = used.iter().sum::<usize>() + 3;
        let mut ids: Vec<i32> = (0..pages as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.below(i as u64 + 1) as usize);
        }
        let mut block_table = vec![-1i32; self.lens.len() * max_pages];
        let mut next = 0;
        for (b, &u) in used.iter().enumerate() {
            for i in 0..u {
                block_table[b * max_pages + i] = ids[next];
                next += 1;
            }
        }
        let slots = pages * ps;
        let layout = latent_layout(pages, ps);
        // Unused slots hold NaN-free garbage.
        let mut lat_bf16 = vec![bf16::from_f32(7.0); slots * MLA_LATENT_DIM];
        let mut codes = vec![Fp8E4m3(0x55); slots * MLA_KV_LORA_RANK];
        let mut scales = vec![3.0f32; slots];
        let mut rope = vec![bf16::from_f32(-5.0); slots * MLA_ROPE_DIM];
        let mut c_kv = Vec::new();
        let mut k_pe = Vec::new();
        for (b, &len) in self.lens.iter().enumerate() {
            let mut cs = Vec::with_capacity(len * MLA_KV_LORA_RANK);
            let mut ks = Vec::with_capacity(len * MLA_ROPE_DIM);
            for t in 0..len {
                let slot = block_table[b * max_pages + t / ps] as usize * ps + t % ps;
                let c: Vec<f64> = (0..MLA_KV_LORA_RANK).map(|_| 1.7 * r.uniform()).collect();
                let k: Vec<f64> = (0..MLA_ROPE_DIM)
                    .map(|_| f64::from(bf16::from_f64(2.0 * r.uniform())))
                    .collect();
                let amax = c.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let sc = (amax / 448.0) as f32;
                scales[slot] = sc;
                for (i, &x) in c.iter().enumerate() {
                    let hb = bf16::from_f64(x);
                    lat_bf16[slot * MLA_LATENT_DIM + i] = hb;
                    let code = Fp8E4m3::from_f64(x / f64::from(sc));
                    codes[slot * MLA_KV_LORA_RANK + i] = code;
                    cs.push(if self.fp8 {
                        code.to_f64() * f64::from(sc)
                    } else {
                        f64::from(hb)
                    });
                }
                for (i, &x) in k.iter().enumerate() {
                    lat_bf16[slot * MLA_LATENT_DIM + MLA_KV_LORA_RANK + i] = bf16::from_f64(x);
                    rope[slot * MLA_ROPE_DIM + i] = bf16::from_f64(x);
                    ks.push(x);
                }
            }
            c_kv.push(cs);
            k_pe.push(ks);
        }
        let total_new: usize = self.news.iter().sum();
        let q = (0..total_new * self.heads * MLA_LATENT_DIM)
            .map(|_| f64::from(bf16::from_f64(r.uniform())))
            .collect();
        let mut cu_new = vec![0i32];
        for &x in &self.news {
            cu_new.push(cu_new.last().unwrap() + x as i32);
        }
        LatBuilt {
            layout,
            block_table,
            max_pages,
            seqlens: self.lens.iter().map(|&l| l as i32).collect(),
            cu_new,
            lat_bf16,
            codes,
            scales,
            rope,
            c_kv,
            k_pe,
            q,
            total_new,
        }
    }
}

impl LatBuilt {
    fn step(&self) -> StepTable<'_> {
        StepTable {
            table: PageTable {
                block_table: &self.block_table,
                max_pages_per_seq: self.max_pages,
                seqlens: &self.seqlens,
            },
            cu_new: &self.cu_new,
        }
    }

    /// absorbed_f64 per sequence, assembled into `[total_new, heads, 512]` and
    /// `[heads, total_new]`.
    fn reference(&self, heads: usize, scale: f64) -> Output<f64> {
        let cfg = MlaConfig {
            heads,
            kv_lora_rank: MLA_KV_LORA_RANK,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: MLA_ROPE_DIM,
            v_head_dim: 128,
            softmax_scale: scale,
        };
        let tn = self.total_new;
        let mut o = vec![0.0; tn * heads * MLA_KV_LORA_RANK];
        let mut lse = vec![0.0; heads * tn];
        for b in 0..self.seqlens.len() {
            let (t0, t1) = (self.cu_new[b] as usize, self.cu_new[b + 1] as usize);
            if t1 == t0 {
                continue;
            }
            let row = heads * MLA_LATENT_DIM;
            let out = absorbed_f64(
                &cfg,
                &self.q[t0 * row..t1 * row],
                &self.c_kv[b],
                &self.k_pe[b],
                t1 - t0,
                self.seqlens[b] as usize,
            )
            .unwrap();
            let orow = heads * MLA_KV_LORA_RANK;
            o[t0 * orow..t1 * orow].copy_from_slice(&out.o);
            for h in 0..heads {
                for i in 0..t1 - t0 {
                    lse[h * tn + t0 + i] = out.lse[h * (t1 - t0) + i];
                }
            }
        }
        Output { o, lse }
    }

    fn max_v(&self) -> f64 {
        self.c_kv
            .iter()
            .flatten()
            .fold(0.0f64, |m, x| m.max(x.abs()))
    }
}

/// Opt-in shared memory per block of an A100 (163 KB): more than 16 rows per sequence run
/// the 64-row kernel.
const SMEM_A100: usize = 166_912;
/// Of an sm_86 / sm_89 part (99 KB): always the 16-row kernel.
const SMEM_SM86: usize = 101_376;
/// Of an H100 (227 KB).
const SMEM_H100: usize = 232_448;

/// The device a plan is made for: its shared memory per block and whether its loaded code
/// runs thread-block clusters.
#[derive(Debug, Clone, Copy)]
struct Target {
    smem: usize,
    clusters: bool,
}
/// sm_86 / sm_89: the 16-row kernel.
const SM86: Target = Target {
    smem: SMEM_SM86,
    clusters: false,
};
/// A100: the 64-row kernel for more than 16 rows.
const A100: Target = Target {
    smem: SMEM_A100,
    clusters: false,
};
/// H100 with sm_90a code: 64-row CTAs in clusters of 2 (65-128 rows) or 4 (more).
const H100: Target = Target {
    smem: SMEM_H100,
    clusters: true,
};
const TARGETS: [Target; 3] = [SM86, A100, H100];

/// Runs a case through the emulator for a device with `sm_count` SMs and `smem` bytes of
/// shared memory per block; returns o_lat (widened), the LSE and the plan.
fn mla_emu(
    c: &LatCase,
    b: &LatBuilt,
    splits: Splits,
    sm_count: usize,
    target: Target,
) -> (Vec<f64>, Vec<f32>, MlaDecodePlan) {
    let Target { smem, clusters } = target;
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let q = Aligned::new(&q);
    let ql = HeadsLayout::contiguous(b.total_new, c.heads, MLA_LATENT_DIM);
    let ol = HeadsLayout::contiguous(b.total_new, c.heads, MLA_KV_LORA_RANK);
    let lat = Aligned::new(&b.lat_bf16);
    let codes = Aligned::new(&b.codes);
    let rope = Aligned::new(&b.rope);
    let cache = if c.fp8 {
        HostLatentCache::Fp8 {
            latent: codes.as_slice(),
            scales: &b.scales,
            rope: rope.as_slice(),
        }
    } else {
        HostLatentCache::Bf16(lat.as_slice())
    };
    let sv = b.layout.validate_step(&b.step()).unwrap();
    let plan = plan_mla_decode(&sv, c.heads, sm_count, smem, clusters, splits).unwrap();
    let mut ws = vec![f32::NAN; plan.workspace_len(b.total_new, c.heads).unwrap()];
    let mut o = vec![bf16::NAN; ol.numel().unwrap()];
    let mut lse = vec![f32::NAN; c.heads * b.total_new];
    let opts = MlaDecodeOptions {
        softmax_scale: SCALE,
        splits,
        clusters: true,
    };
    let ran = emulator::mla_decode(
        &b.step(),
        &b.layout,
        q.as_slice(),
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ol,
            lse: Some((&mut lse, LseLayout::contiguous(c.heads, b.total_new))),
        },
        &mut ws,
        sm_count,
        smem,
        clusters,
        &opts,
    )
    .unwrap();
    assert_eq!(ran, plan);
    let rows = c.heads * c.news.iter().copied().max().unwrap_or(0);
    let want_rows = if rows > 16 && smem >= SMEM_A100 {
        64
    } else {
        16
    };
    assert_eq!(
        plan.rows_per_tile, want_rows,
        "kernel choice for {rows} rows, {smem} B"
    );
    let want_cluster = match (clusters, rows) {
        (true, 65..=128) => 2,
        (true, 129..) => 4,
        _ => 1,
    };
    assert_eq!(
        (plan.cluster, plan.row_tiles % want_cluster),
        (want_cluster, 0),
        "clusters for {rows} rows, {target:?}"
    );
    (o.iter().map(|x| f64::from(*x)).collect(), lse, plan)
}

/// FlashAttention-style bounds (as tests/kv_decode.rs): O within bf16 rounding of the f64
/// value plus P's rounding to bf16 before P V (eps x max |V|) plus f32 accumulation; the
/// LSE within 2e-5 relative, which an extra or missing key (a shift of about p_j >= 1e-3
/// at these lengths) exceeds; -inf rows exactly.
fn check_mla(tag: &str, got_o: &[f64], got_lse: &[f32], want: &Output<f64>, max_v: f64) {
    assert_eq!(got_o.len(), want.o.len(), "{tag}");
    let eps = 2f64.powi(-8);
    for (i, (g, w)) in got_o.iter().zip(&want.o).enumerate() {
        let tol = 1.01 * eps * (w.abs() + max_v) + 2e-5;
        assert!(
            (g - w).abs() <= tol,
            "{tag}: O[{i}] = {g}, reference {w} (tolerance {tol:e})"
        );
    }
    for (i, (g, w)) in got_lse.iter().zip(&want.lse).enumerate() {
        let g = f64::from(*g);
        if *w == f64::NEG_INFINITY {
            assert_eq!(g, f64::NEG_INFINITY, "{tag}: LSE[{i}] of a row with no key");
        } else {
            let tol = 2e-5 * (1.0 + w.abs());
            assert!(
                (g - w).abs() <= tol,
                "{tag}: LSE[{i}] = {g}, reference {w} (tolerance {tol:e})"
            );
        }
    }
}

fn mla_parity(tag: &str, c: &LatCase, splits: Splits, sm: usize, target: Target) -> MlaDecodePlan {
    let b = c.build();
    let (o, lse, plan) = mla_emu(c, &b, splits, sm, target);
    let want = b.reference(c.heads, f64::from(SCALE));
    check_mla(
        &format!("{tag} {c:?} plan {plan:?}"),
        &o,
        &lse,
        &want,
        b.max_v(),
    );
    plan
}

/// Page sizes 1, 3, 16, 64 against lengths 1, page - 1, page, page + 1 and ~300 in one
/// batch, 1 and 2 query tokens, 16 heads, bf16 and fp8, unsplit, split in 4, and the
/// automatic plan for a 132-SM device.
#[test]
fn emu_mla_decode_page_sizes_and_lengths() {
    for ps in [1usize, 3, 16, 64] {
        let lens = vec![1, ps.saturating_sub(1).max(1), ps, ps + 1, 300];
        let news: Vec<usize> = lens.iter().map(|&l| l.min(1 + l % 2)).collect();
        for fp8 in [false, true] {
            let c = LatCase {
                page_size: ps,
                heads: 16,
                lens: lens.clone(),
                news: news.clone(),
                fp8,
                seed: ps as u64 + 10 * u64::from(fp8),
            };
            // 16 heads x up to 2 tokens: the 16-row kernel on a 99 KB part, the 64-row one
            // (half its row groups idle) on an A100-class part.
            for t in [SM86, A100] {
                let p = mla_parity("unsplit", &c, Splits::AtMost(1), 1, t);
                assert_eq!(p.splits, 1);
                let p = mla_parity("split", &c, Splits::AtMost(4), 1, t);
                assert_eq!(p.splits, 4, "300 keys in 4 splits of whole tiles");
                let p = mla_parity("auto", &c, Splits::Auto, 132, t);
                assert_eq!(p.splits, 2, "auto: chunks of at least 256 keys");
            }
        }
    }
}

/// 8, 24, 32, 64 and 128 heads (several row tiles; 128 heads x 2 tokens is 16 tiles; with 8
/// or 24 heads a tile mixes two query tokens), 1 and 2 query tokens, sequences without new tokens, bf16 and fp8, the automatic split plan for
/// a small device.
#[test]
fn emu_mla_decode_heads_and_fp8() {
    for (heads, lens, news) in [
        // An empty sequence and one with no new token ride along.
        (32usize, vec![40usize, 0, 5, 97], vec![1usize, 0, 0, 2]),
        (64, vec![65, 3], vec![2, 1]),
        (128, vec![33], vec![2]),
        // Tiles holding rows of two query tokens (each row its own causal bound): 8 heads
        // (a 16-way tensor-parallel shard of DeepSeek-V3) and 24.
        (8, vec![1, 50, 17], vec![1, 2, 2]),
        // 24 heads x 1 token leaves the 64-row kernel's second row group 8 live rows.
        (24, vec![2, 70, 40], vec![2, 2, 1]),
    ] {
        for fp8 in [false, true] {
            let c = LatCase {
                page_size: 16,
                heads,
                lens: lens.clone(),
                news: news.clone(),
                fp8,
                seed: heads as u64 + u64::from(fp8),
            };
            for t in TARGETS {
                mla_parity("heads", &c, Splits::Auto, 2, t);
            }
        }
    }
}

fn mla_case_strategy() -> impl Strategy<Value = (LatCase, usize, Target)> {
    (
        prop::sample::select(vec![1usize, 3, 16, 64, 256]),
        prop::sample::select(vec![8usize, 16, 24, 32, 48, 64, 128]),
        prop::collection::vec((0usize..160, 0usize..=2), 1..=3),
        any::<bool>(),
        any::<u64>(),
        1usize..=5,
        prop::sample::select(TARGETS.to_vec()),
    )
        .prop_map(|(ps, heads, seqs, fp8, seed, splits, target)| {
            let lens: Vec<usize> = seqs.iter().map(|s| s.0).collect();
            let news: Vec<usize> = seqs.iter().map(|s| s.1.min(s.0)).collect();
            let c = LatCase {
                page_size: ps,
                heads,
                lens,
                news,
                fp8,
                seed,
            };
            (c, splits, target)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random batches (caches of 0 to 159, 0 to 2 new tokens), page sizes, head counts,
    /// bf16 and fp8, 1 to 5 splits, on a 99 KB part (the 16-row kernel), an A100 (the 64-row
    /// kernel for more than 16 rows) or an H100 (64-row CTAs in clusters of two for more
    /// than 64 rows).
    #[test]
    fn emu_mla_decode_parity_random((c, splits, target) in mla_case_strategy()) {
        mla_parity("random", &c, Splits::AtMost(splits), 1, target);
    }
}

/// The whole chain at DeepSeek-V3's dimensions (128 heads, config scale): naive MLA on the
/// f64 inputs against W_UV (kernel (bf16 (W_UK^T q))) over a bf16 cache, 2 query tokens over
/// 37 cached ones; the gap is bf16 rounding of q_lat, the cache and the output.
#[test]
fn emu_mla_decode_matches_naive_deepseek_v3() {
    let cfg = MlaConfig::deepseek_v3();
    let (tq, tk) = (2usize, 37usize);
    let d = data(&cfg, tq, tk, 77);
    let naive = naive_f64(&cfg, &d.q, &d.c_kv, &d.k_pe, &d.w, tq, tk).unwrap();
    let q_lat = absorb_query_f64(&cfg, &d.q, &d.w, tq).unwrap();
    let ps = 16;
    let pages = tk.div_ceil(ps);
    let layout = latent_layout(pages, ps);
    let mut lat = vec![bf16::ZERO; pages * ps * MLA_LATENT_DIM];
    for t in 0..tk {
        for i in 0..MLA_KV_LORA_RANK {
            lat[t * MLA_LATENT_DIM + i] = bf16::from_f64(d.c_kv[t * MLA_KV_LORA_RANK + i]);
        }
        for i in 0..MLA_ROPE_DIM {
            lat[t * MLA_LATENT_DIM + MLA_KV_LORA_RANK + i] =
                bf16::from_f64(d.k_pe[t * MLA_ROPE_DIM + i]);
        }
    }
    let lat = Aligned::new(&lat);
    let q: Vec<bf16> = q_lat.iter().map(|&x| bf16::from_f64(x)).collect();
    let q = Aligned::new(&q);
    let block_table: Vec<i32> = (0..pages as i32).collect();
    let seqlens = [tk as i32];
    let cu_new = [0, tq as i32];
    let step = StepTable {
        table: PageTable {
            block_table: &block_table,
            max_pages_per_seq: pages,
            seqlens: &seqlens,
        },
        cu_new: &cu_new,
    };
    let h = cfg.heads;
    let ql = HeadsLayout::contiguous(tq, h, MLA_LATENT_DIM);
    let ol = HeadsLayout::contiguous(tq, h, MLA_KV_LORA_RANK);
    // The A100's 64-row CTAs (4 per sequence), the H100's cluster of four, and the H100
    // with clusters turned off in the options.
    for (target, allow) in [(A100, true), (H100, true), (H100, false)] {
        let mut o = vec![bf16::NAN; tq * h * MLA_KV_LORA_RANK];
        let mut lse = vec![f32::NAN; h * tq];
        let plan = emulator::mla_decode(
            &step,
            &layout,
            q.as_slice(),
            &ql,
            &HostLatentCache::Bf16(lat.as_slice()),
            HostDecodeOutput {
                o: &mut o,
                o_layout: ol,
                lse: Some((&mut lse, LseLayout::contiguous(h, tq))),
            },
            &mut [],
            132,
            target.smem,
            target.clusters,
            &MlaDecodeOptions {
                clusters: allow,
                ..MlaDecodeOptions::new(&cfg)
            },
        )
        .unwrap();
        // 256 rows: 4 tiles of 64, one cluster of 4 CTAs on the H100.
        assert_eq!(
            (plan.rows_per_tile, plan.row_tiles, plan.cluster),
            (64, 4, if target.clusters && allow { 4 } else { 1 })
        );
        let o_lat: Vec<f64> = o.iter().map(|x| f64::from(*x)).collect();
        let out = expand_output_f64(&cfg, &o_lat, &d.w, tq).unwrap();
        let e_o = max_rel(&out, &naive.o);
        let lse: Vec<f64> = lse.iter().map(|&x| f64::from(x)).collect();
        let e_lse = lse
            .iter()
            .zip(&naive.lse)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{target:?} clusters {allow}: naive vs kernel chain: O {e_o:e} (relative to max |O|), LSE {e_lse:e}"
        );
        assert!(
            e_o < 1e-2,
            "{target:?}: O differs from naive MLA by {e_o:e} (relative to max |O|)"
        );
        assert!(
            e_lse < 2e-2,
            "{target:?}: LSE differs from naive MLA by {e_lse:e}"
        );
    }
}

/// Typed errors: a layout that is not one 576-channel head, short cache buffers, Q / O of
/// the wrong shape, Q strides off 16 bytes, heads 0 or past 128, too many new tokens, zero
/// splits, a short workspace, a bad scale.
#[test]
fn emu_mla_decode_errors() {
    let c = LatCase {
        page_size: 4,
        heads: 16,
        lens: vec![70],
        news: vec![1],
        fp8: false,
        seed: 5,
    };
    let b = c.build();
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let q = Aligned::new(&q);
    let lat = Aligned::new(&b.lat_bf16);
    let ql = HeadsLayout::contiguous(1, 16, MLA_LATENT_DIM);
    let ol = HeadsLayout::contiguous(1, 16, MLA_KV_LORA_RANK);
    let opts = MlaDecodeOptions {
        softmax_scale: SCALE,
        splits: Splits::AtMost(1),
        clusters: true,
    };
    let run = |layout: &PagedKvLayout,
               cache: &HostLatentCache,
               ql: &HeadsLayout,
               ol: &HeadsLayout,
               ws: usize,
               opts: &MlaDecodeOptions|
     -> longctx::Result<MlaDecodePlan> {
        let mut o = vec![bf16::ZERO; 16 * MLA_KV_LORA_RANK];
        let mut ws = vec![0f32; ws];
        emulator::mla_decode(
            &b.step(),
            layout,
            q.as_slice(),
            ql,
            cache,
            HostDecodeOutput {
                o: &mut o,
                o_layout: *ol,
                lse: None,
            },
            &mut ws,
            1,
            SMEM_A100,
            false,
            opts,
        )
    };
    let arg = |r: longctx::Result<MlaDecodePlan>| match r {
        Err(Error::InvalidArgument { arg, .. }) => arg.to_string(),
        other => panic!("expected an invalid argument, got {other:?}"),
    };
    let bf = HostLatentCache::Bf16(lat.as_slice());
    assert!(run(&b.layout, &bf, &ql, &ol, 0, &opts).is_ok());
    let mut wrong = b.layout;
    wrong.head_dim = 512;
    assert_eq!(arg(run(&wrong, &bf, &ql, &ol, 0, &opts)), "cache");
    let short = HostLatentCache::Bf16(&lat.as_slice()[..100]);
    assert_eq!(
        arg(run(&b.layout, &short, &ql, &ol, 0, &opts)),
        "cache.latent"
    );
    let codes = vec![Fp8E4m3(0); b.codes.len()];
    let codes = Aligned::new(&codes);
    let rope = Aligned::new(&b.rope);
    let fp8_short_scales = HostLatentCache::Fp8 {
        latent: codes.as_slice(),
        scales: &b.scales[..3],
        rope: rope.as_slice(),
    };
    assert_eq!(
        arg(run(&b.layout, &fp8_short_scales, &ql, &ol, 0, &opts)),
        "cache.scales"
    );
    let fp8_short_rope = HostLatentCache::Fp8 {
        latent: codes.as_slice(),
        scales: &b.scales,
        rope: &rope.as_slice()[..64],
    };
    assert_eq!(
        arg(run(&b.layout, &fp8_short_rope, &ql, &ol, 0, &opts)),
        "cache.rope"
    );
    let bad_q = HeadsLayout::contiguous(1, 16, 512);
    assert_eq!(arg(run(&b.layout, &bf, &bad_q, &ol, 0, &opts)), "q");
    let bad_o = HeadsLayout::contiguous(1, 16, MLA_LATENT_DIM);
    assert_eq!(arg(run(&b.layout, &bf, &ql, &bad_o, 0, &opts)), "o");
    let mut odd = ql;
    odd.head_stride = MLA_LATENT_DIM - 4;
    odd.token_stride = 16 * (MLA_LATENT_DIM - 4);
    assert_eq!(arg(run(&b.layout, &bf, &odd, &ol, 0, &opts)), "q");
    let mut split = opts;
    split.splits = Splits::AtMost(2);
    assert_eq!(arg(run(&b.layout, &bf, &ql, &ol, 0, &split)), "workspace");
    split.splits = Splits::AtMost(0);
    assert_eq!(arg(run(&b.layout, &bf, &ql, &ol, 0, &split)), "splits");
    let mut bad_scale = opts;
    bad_scale.softmax_scale = f32::NAN;
    assert_eq!(
        arg(run(&b.layout, &bf, &ql, &ol, 0, &bad_scale)),
        "softmax_scale"
    );
    // Heads outside 1..=128 and more than 16 new tokens, on the plan.
    let sv = b.layout.validate_step(&b.step()).unwrap();
    assert!(plan_mla_decode(&sv, 0, 1, SMEM_A100, false, Splits::Auto).is_err());
    assert!(plan_mla_decode(&sv, 129, 1, SMEM_A100, false, Splits::Auto).is_err());
    let long = LatCase {
        lens: vec![20],
        news: vec![17],
        ..c.clone()
    }
    .build();
    let sv = long.layout.validate_step(&long.step()).unwrap();
    assert!(matches!(
        plan_mla_decode(&sv, 16, 1, SMEM_A100, false, Splits::Auto),
        Err(Error::InvalidArgument { .. })
    ));
}

/// The parity cases on the device, with longer caches (bf16 and fp8, 16 to 128 heads, 1
/// and 2 query tokens, unsplit, split, automatic), against the f64 reference.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_mla_decode_parity() {
    use longctx::kv_cache::{DecodeOutput, KvStep};
    use longctx::mla::{decode_absorbed, LatentCache};
    let Some(dev) = common::gpu("gpu_mla_decode_parity") else {
        return;
    };
    for (ps, heads, lens, news) in [
        (1usize, 16usize, vec![1usize, 2, 300], vec![1usize, 2, 1]),
        (16, 128, vec![16, 17, 4000], vec![2, 1, 2]),
        (64, 64, vec![63, 64, 65, 9000], vec![1, 2, 1, 2]),
    ] {
        for fp8 in [false, true] {
            let c = LatCase {
                page_size: ps,
                heads,
                lens: lens.clone(),
                news: news.clone(),
                fp8,
                seed: 3,
            };
            let b = c.build();
            let want = b.reference(heads, f64::from(SCALE));
            for splits in [Splits::AtMost(1), Splits::AtMost(7), Splits::Auto] {
                let step = KvStep::upload(&dev, &b.layout, &b.step()).unwrap();
                let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
                let qd = dev.upload(&q).unwrap();
                let lat = dev.upload(&b.lat_bf16).unwrap();
                let codes = dev.upload(&b.codes).unwrap();
                let scales = dev.upload(&b.scales).unwrap();
                let rope = dev.upload(&b.rope).unwrap();
                let plan = plan_mla_decode(
                    step.validated(),
                    heads,
                    dev.sm_count(),
                    dev.smem_per_block(),
                    dev.cluster_kernels(),
                    splits,
                )
                .unwrap();
                // An H100 / H200 with the bundle's sm_90a code runs 128 heads in clusters.
                let rows = heads * news.iter().copied().max().unwrap_or(0);
                let want_cluster = match (dev.cluster_kernels(), rows) {
                    (true, 65..=128) => 2,
                    (true, 129..) => 4,
                    _ => 1,
                };
                assert_eq!(plan.cluster, want_cluster, "{plan:?}");
                eprintln!(
                    "gpu_mla_decode_parity: {heads} heads, fp8 {fp8}, {plan:?} (clusters {})",
                    dev.cluster_kernels()
                );
                let mut ws = dev
                    .zeros::<f32>(plan.workspace_len(b.total_new, heads).unwrap().max(1))
                    .unwrap();
                let ql = HeadsLayout::contiguous(b.total_new, heads, MLA_LATENT_DIM);
                let ol = HeadsLayout::contiguous(b.total_new, heads, MLA_KV_LORA_RANK);
                let mut o = dev.upload(&vec![bf16::NAN; ol.numel().unwrap()]).unwrap();
                let mut lse = dev.upload(&vec![f32::NAN; heads * b.total_new]).unwrap();
                let cache = if fp8 {
                    LatentCache::Fp8 {
                        latent: &codes,
                        scales: &scales,
                        rope: &rope,
                    }
                } else {
                    LatentCache::Bf16 { latent: &lat }
                };
                decode_absorbed(
                    &dev,
                    &step,
                    &qd,
                    &ql,
                    &cache,
                    DecodeOutput {
                        o: &mut o,
                        o_layout: ol,
                        lse: Some((&mut lse, LseLayout::contiguous(heads, b.total_new))),
                    },
                    Some(&mut ws),
                    &MlaDecodeOptions {
                        softmax_scale: SCALE,
                        splits,
                        clusters: true,
                    },
                )
                .unwrap();
                let o: Vec<f64> = dev
                    .download(&o)
                    .unwrap()
                    .iter()
                    .map(|x| f64::from(*x))
                    .collect();
                let lse = dev.download(&lse).unwrap();
                check_mla(&format!("gpu {c:?} {plan:?}"), &o, &lse, &want, b.max_v());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Latent append (kernels/kv_cache/mla_append_kernel.cuh).

use longctx::emulator::{HostLatentCacheMut, HostRope};
use longctx::rope::{AnglePrecision, RopeConfig, RopeScaling, RopeStyle};

/// DeepSeek-V3's RoPE over k_pe: 64 channels, base 10000, YaRN factor 40 from 4096
/// positions, mscale = mscale_all_dim = 1 (attention factor 1).
fn deepseek_v3_rope() -> RopeConfig {
    RopeConfig::builder(MLA_ROPE_DIM)
        .base(10000.0)
        .max_position_embeddings(163_840)
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
        .build()
        .unwrap()
}

/// k_pe rotated forward at `pos` in f64 (pairing `style`), times `factor`.
fn rotate_f64(x: &[f64], pos: usize, inv: &[f64], factor: f64, style: RopeStyle) -> Vec<f64> {
    let mut y = x.to_vec();
    for (i, &f) in inv.iter().enumerate() {
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + inv.len()),
        };
        let (s, c) = (pos as f64 * f).sin_cos();
        y[a] = factor * (x[a] * c - x[b] * s);
        y[b] = factor * (x[b] * c + x[a] * s);
    }
    y
}

/// One step's append through the emulator against the f64 rotation and the host fp8
/// quantiser, on a cache pre-filled with sentinels: every new token's slot holds its c_kv
/// (bf16 as given, or e4m3 codes of c / (absmax / 448) with that scale) and its rotated
/// k_pe within bf16 rounding; every other slot is untouched. c_kv and k_pe are views of one
/// `[total_new, 576]` buffer, as `kv_a_proj`'s output.
fn append_case(
    dev: Option<&longctx::device::Device>,
    ps: usize,
    lens: &[usize],
    news: &[usize],
    style: RopeStyle,
    fp8: bool,
    seed: u64,
) {
    let c = LatCase {
        page_size: ps,
        heads: 16,
        lens: lens.to_vec(),
        news: news.to_vec(),
        fp8,
        seed,
    };
    let b = c.build();
    let slots = b.layout.pages * ps;
    let mut r = common::Rng(seed ^ 0xABCD);
    let tn = b.total_new;
    let rows: Vec<bf16> = (0..tn * MLA_LATENT_DIM)
        .map(|i| {
            let amp = if i % MLA_LATENT_DIM < MLA_KV_LORA_RANK {
                1.7
            } else {
                2.0
            };
            bf16::from_f64(amp * r.uniform())
        })
        .collect();
    let cl = HeadsLayout {
        offset: 0,
        tokens: tn,
        heads: 1,
        head_dim: MLA_KV_LORA_RANK,
        token_stride: MLA_LATENT_DIM,
        head_stride: MLA_LATENT_DIM,
    };
    let kl = HeadsLayout {
        offset: MLA_KV_LORA_RANK,
        head_dim: MLA_ROPE_DIM,
        ..cl
    };
    let cfg = deepseek_v3_rope();
    let max_len = *lens.iter().max().unwrap();
    let inv = cfg.inv_freq_f64(max_len);
    let factor = cfg.attention_factor();
    let rope = HostRope {
        inv_freq: &inv,
        head_dim: MLA_ROPE_DIM,
        attention_factor: factor,
        max_positions: cfg.depends_on_length().then_some(max_len),
        style,
        precision: AnglePrecision::F64,
    };
    let mut lat = vec![bf16::from_f32(9.0); slots * MLA_LATENT_DIM];
    let mut codes = vec![Fp8E4m3(0x11); slots * MLA_KV_LORA_RANK];
    let mut scales = vec![-1.0f32; slots];
    let mut rp = vec![bf16::from_f32(9.0); slots * MLA_ROPE_DIM];
    if let Some(dev) = dev {
        use longctx::kv_cache::{AppendRope, KvStep};
        use longctx::mla::{append_latent, LatentCacheMut, NewLatent};
        use longctx::rope::RopeTable;
        let step = KvStep::upload(dev, &b.layout, &b.step()).unwrap();
        let rows_d = dev.upload(&rows).unwrap();
        let table = RopeTable::new(dev, &cfg, max_len).unwrap();
        let mut lat_d = dev.upload(&lat).unwrap();
        let mut codes_d = dev.upload(&codes).unwrap();
        let mut scales_d = dev.upload(&scales).unwrap();
        let mut rp_d = dev.upload(&rp).unwrap();
        let cache = if fp8 {
            LatentCacheMut::Fp8 {
                latent: &mut codes_d,
                scales: &mut scales_d,
                rope: &mut rp_d,
            }
        } else {
            LatentCacheMut::Bf16 { latent: &mut lat_d }
        };
        append_latent(
            dev,
            &step,
            &NewLatent {
                c_kv: &rows_d,
                c_kv_layout: cl,
                k_pe: &rows_d,
                k_pe_layout: kl,
            },
            cache,
            Some(AppendRope {
                table: &table,
                style,
                precision: AnglePrecision::F64,
            }),
        )
        .unwrap();
        lat = dev.download(&lat_d).unwrap();
        codes = dev.download(&codes_d).unwrap();
        scales = dev.download(&scales_d).unwrap();
        rp = dev.download(&rp_d).unwrap();
    } else {
        let cache = if fp8 {
            HostLatentCacheMut::Fp8 {
                latent: &mut codes,
                scales: &mut scales,
                rope: &mut rp,
            }
        } else {
            HostLatentCacheMut::Bf16(&mut lat)
        };
        emulator::mla_append(
            &b.layout,
            &b.step(),
            &rows,
            &cl,
            &rows,
            &kl,
            cache,
            Some(rope),
        )
        .unwrap();
    }
    let tag = format!("append ps {ps} lens {lens:?} news {news:?} {style:?} fp8 {fp8}");
    let mut written = vec![false; slots];
    for (bi, (&len, &n)) in lens.iter().zip(news).enumerate() {
        for i in 0..n {
            let t = b.cu_new[bi] as usize + i;
            let pos = len - n + i;
            let slot = b.block_table[bi * b.max_pages + pos / ps] as usize * ps + pos % ps;
            written[slot] = true;
            let row = &rows[t * MLA_LATENT_DIM..(t + 1) * MLA_LATENT_DIM];
            let k: Vec<f64> = row[MLA_KV_LORA_RANK..]
                .iter()
                .map(|x| f64::from(*x))
                .collect();
            let want = rotate_f64(&k, pos, &inv, f64::from(factor), style);
            let got: Vec<f64> = if fp8 {
                rp[slot * MLA_ROPE_DIM..(slot + 1) * MLA_ROPE_DIM]
                    .iter()
                    .map(|x| f64::from(*x))
                    .collect()
            } else {
                lat[slot * MLA_LATENT_DIM + MLA_KV_LORA_RANK..(slot + 1) * MLA_LATENT_DIM]
                    .iter()
                    .map(|x| f64::from(*x))
                    .collect()
            };
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 2f64.powi(-8) * w.abs() + 1e-5;
                assert!(
                    (g - w).abs() <= tol,
                    "{tag}: token {t} k_pe[{j}] = {g}, want {w} at position {pos}"
                );
            }
            let cv = &row[..MLA_KV_LORA_RANK];
            if fp8 {
                let amax = cv.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
                let sc = if amax / 448.0 > 0.0 {
                    amax / 448.0
                } else {
                    1.0
                };
                assert_eq!(scales[slot], sc, "{tag}: token {t} scale");
                for (j, x) in cv.iter().enumerate() {
                    let want = Fp8E4m3::from_f32(x.to_f32() / sc);
                    assert_eq!(
                        codes[slot * MLA_KV_LORA_RANK + j],
                        want,
                        "{tag}: token {t} code {j}"
                    );
                }
            } else {
                assert_eq!(
                    &lat[slot * MLA_LATENT_DIM..slot * MLA_LATENT_DIM + MLA_KV_LORA_RANK],
                    cv,
                    "{tag}: token {t} c_kv"
                );
            }
        }
    }
    for (s, w) in written.iter().enumerate() {
        if *w {
            continue;
        }
        if fp8 {
            assert_eq!(scales[s], -1.0, "{tag}: slot {s} written");
            assert!(codes[s * MLA_KV_LORA_RANK..(s + 1) * MLA_KV_LORA_RANK]
                .iter()
                .all(|x| *x == Fp8E4m3(0x11)));
        } else {
            assert!(lat[s * MLA_LATENT_DIM..(s + 1) * MLA_LATENT_DIM]
                .iter()
                .all(|x| *x == bf16::from_f32(9.0)));
        }
    }
}

/// Page sizes 1, 3, 16, 64, lengths around a page, 1 and 2 new tokens per sequence, both
/// pairings (DeepSeek's interleaved and HF's half-split), bf16 and fp8 caches.
#[test]
fn emu_mla_append_slots_rope_and_fp8() {
    for ps in [1usize, 3, 16, 64] {
        let lens = [1, ps.saturating_sub(1).max(1), ps, ps + 1, 300];
        let news: Vec<usize> = lens.iter().map(|&l| l.min(1 + l % 2)).collect();
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            for fp8 in [false, true] {
                append_case(None, ps, &lens, &news, style, fp8, ps as u64);
            }
        }
    }
}

/// Append then decode: the cache the append kernel wrote, read by the decode kernel,
/// against the f64 reference on what the append stored (bf16 and fp8).
#[test]
fn emu_mla_append_then_decode() {
    for fp8 in [false, true] {
        let c = LatCase {
            page_size: 16,
            heads: 16,
            lens: vec![3, 40],
            news: vec![2, 1],
            fp8,
            seed: 31,
        };
        let mut b = c.build();
        // Rewrite every token of every sequence through the append (a prefill step), no
        // rotation, then read the stored values back as the reference's inputs.
        let full: Vec<i32> = c.lens.iter().map(|&l| l as i32).collect();
        let mut cu = vec![0i32];
        for &l in &c.lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let tn = *cu.last().unwrap() as usize;
        let mut r = common::Rng(5);
        let rows: Vec<bf16> = (0..tn * MLA_LATENT_DIM)
            .map(|_| bf16::from_f64(1.5 * r.uniform()))
            .collect();
        let cl = HeadsLayout {
            offset: 0,
            tokens: tn,
            heads: 1,
            head_dim: MLA_KV_LORA_RANK,
            token_stride: MLA_LATENT_DIM,
            head_stride: MLA_LATENT_DIM,
        };
        let kl = HeadsLayout {
            offset: MLA_KV_LORA_RANK,
            head_dim: MLA_ROPE_DIM,
            ..cl
        };
        let prefill = StepTable {
            table: PageTable {
                block_table: &b.block_table,
                max_pages_per_seq: b.max_pages,
                seqlens: &full,
            },
            cu_new: &cu,
        };
        let cache = if fp8 {
            HostLatentCacheMut::Fp8 {
                latent: &mut b.codes,
                scales: &mut b.scales,
                rope: &mut b.rope,
            }
        } else {
            HostLatentCacheMut::Bf16(&mut b.lat_bf16)
        };
        emulator::mla_append(&b.layout, &prefill, &rows, &cl, &rows, &kl, cache, None).unwrap();
        let ps = c.page_size;
        for (bi, &len) in c.lens.iter().enumerate() {
            for t in 0..len {
                let slot = b.block_table[bi * b.max_pages + t / ps] as usize * ps + t % ps;
                for i in 0..MLA_KV_LORA_RANK {
                    b.c_kv[bi][t * MLA_KV_LORA_RANK + i] = if fp8 {
                        b.codes[slot * MLA_KV_LORA_RANK + i].to_f64() * f64::from(b.scales[slot])
                    } else {
                        f64::from(b.lat_bf16[slot * MLA_LATENT_DIM + i])
                    };
                }
                for i in 0..MLA_ROPE_DIM {
                    let want = rows[(cu[bi] as usize + t) * MLA_LATENT_DIM + MLA_KV_LORA_RANK + i];
                    b.k_pe[bi][t * MLA_ROPE_DIM + i] = f64::from(want);
                }
            }
        }
        let (o, lse, plan) = mla_emu(&c, &b, Splits::AtMost(2), 1, A100);
        let want = b.reference(c.heads, f64::from(SCALE));
        check_mla(
            &format!("append then decode fp8 {fp8} {plan:?}"),
            &o,
            &lse,
            &want,
            b.max_v(),
        );
    }
}

/// The append cases on the device (longer caches), against the same f64 rotation and host
/// quantiser.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_mla_append_parity() {
    let Some(dev) = common::gpu("gpu_mla_append_parity") else {
        return;
    };
    for ps in [1usize, 16, 64] {
        let lens = [1, ps + 1, 5000, 70_000];
        let news = [1, 2, 2, 1];
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            for fp8 in [false, true] {
                append_case(Some(&dev), ps, &lens, &news, style, fp8, 7);
            }
        }
    }
}

/// The raw-pointer entry gives the safe op's bits (bf16 latent, split).
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_mla_decode_raw_matches_safe() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use longctx::kv_cache::{DecodeOutput, KvStep, LseLayout, PageTable, Splits, StepTable};
    use longctx::layout::{RawBuffer, RawTensor};
    use longctx::mla::{
        decode_absorbed, decode_absorbed_raw, latent_layout, plan_mla_decode, LatentCache,
        MlaDecodeOptions, RawLatentCache,
    };
    let Some(dev) = common::gpu("gpu_mla_decode_raw_matches_safe") else {
        return;
    };
    let heads = 32;
    let layout = latent_layout(40, 16);
    let table: Vec<i32> = (0..40).rev().collect();
    let (lens, cu) = ([600i32], [0i32, 2]);
    let st = StepTable {
        table: PageTable {
            block_table: &table,
            max_pages_per_seq: 40,
            seqlens: &lens,
        },
        cu_new: &cu,
    };
    let step = KvStep::upload(&dev, &layout, &st).unwrap();
    let mut r = common::Rng(3);
    let lat: Vec<bf16> = (0..layout.cache_len().unwrap())
        .map(|_| bf16::from_f64(r.uniform()))
        .collect();
    let q: Vec<bf16> = (0..2 * heads * 576)
        .map(|_| bf16::from_f64(r.uniform()))
        .collect();
    let (latd, qd) = (dev.upload(&lat).unwrap(), dev.upload(&q).unwrap());
    let mut cfg = MlaConfig::deepseek_v3();
    cfg.heads = heads;
    let opts = MlaDecodeOptions {
        splits: Splits::AtMost(5),
        ..MlaDecodeOptions::new(&cfg)
    };
    let plan = plan_mla_decode(
        step.validated(),
        heads,
        dev.sm_count(),
        dev.smem_per_block(),
        dev.cluster_kernels(),
        opts.splits,
    )
    .unwrap();
    let wl = plan.workspace_len(2, heads).unwrap().max(1);
    let ql = HeadsLayout::contiguous(2, heads, 576);
    let ol = HeadsLayout::contiguous(2, heads, 512);
    let ll = LseLayout::contiguous(heads, 2);
    let mut o1 = dev.zeros::<bf16>(2 * heads * 512).unwrap();
    let mut l1 = dev.zeros::<f32>(2 * heads).unwrap();
    let mut w1 = dev.zeros::<f32>(wl).unwrap();
    decode_absorbed(
        &dev,
        &step,
        &qd,
        &ql,
        &LatentCache::Bf16 { latent: &latd },
        DecodeOutput {
            o: &mut o1,
            o_layout: ol,
            lse: Some((&mut l1, ll)),
        },
        Some(&mut w1),
        &opts,
    )
    .unwrap();
    let mut o2 = dev.zeros::<bf16>(2 * heads * 512).unwrap();
    let mut l2 = dev.zeros::<f32>(2 * heads).unwrap();
    let mut w2 = dev.zeros::<f32>(wl).unwrap();
    let stream = dev.stream().clone();
    {
        let (qp, _g0) = qd.device_ptr(&stream);
        let (lp, _g1) = latd.device_ptr(&stream);
        let (op, _g2) = o2.device_ptr_mut(&stream);
        let (lsp, _g3) = l2.device_ptr_mut(&stream);
        let (wp, _g4) = w2.device_ptr_mut(&stream);
        // SAFETY: live allocations of this context of the stated lengths, the outputs
        // distinct; synchronised before the guards drop.
        unsafe {
            decode_absorbed_raw(
                &dev,
                &step,
                RawTensor {
                    ptr: qp,
                    len: q.len(),
                    layout: ql,
                },
                RawLatentCache::Bf16 {
                    latent: RawBuffer {
                        ptr: lp,
                        len: lat.len(),
                    },
                },
                RawTensor {
                    ptr: op,
                    len: 2 * heads * 512,
                    layout: ol,
                },
                Some((
                    RawBuffer {
                        ptr: lsp,
                        len: 2 * heads,
                    },
                    ll,
                )),
                Some(RawBuffer { ptr: wp, len: wl }),
                &opts,
            )
            .unwrap();
        }
        dev.synchronize().unwrap();
    }
    let b16 = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let b32 = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        b16(dev.download(&o1).unwrap()),
        b16(dev.download(&o2).unwrap())
    );
    assert_eq!(
        b32(dev.download(&l1).unwrap()),
        b32(dev.download(&l2).unwrap())
    );
}
