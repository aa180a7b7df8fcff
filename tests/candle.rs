//! `longctx::candle` on candle CPU tensors against candle's own operations: candle-nn's
//! rotary embeddings, softmax attention and a top-k router written with candle ops (matmul,
//! mask, softmax, gather). Outputs and gradients (through `Var` + `backward()`) must agree.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use longctx::attention::{AttentionOptions, Mask};
use longctx::candle::{attention, attention_varlen, combine, gather, permute, route, Rope};
use longctx::moe::{PermuteOptions, RouterConfig};
use longctx::rope::{RopeConfig, RopeScaling, RopeStyle};

type R<T> = candle_core::Result<T>;

/// Deterministic pseudo-random values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn rand_t(dims: &[usize], seed: u64) -> R<Tensor> {
    Tensor::from_vec(rand_vec(dims.iter().product(), seed), dims, &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> R<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> R<()> {
    let d = max_abs_diff(a, b)?;
    assert!(d <= tol, "{what}: max |diff| {d:e} > {tol:e}");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// RoPE
// ------------------------------------------------------------------------------------------

/// cos/sin tables `[tokens, rotary_dim / 2]` at the given positions, for candle-nn.
fn cos_sin(cfg: &RopeConfig, seq_len: usize, positions: &[i32]) -> R<(Tensor, Tensor)> {
    let inv = cfg.inv_freq_f64(seq_len);
    let f = f64::from(cfg.attention_factor());
    let mut c = Vec::new();
    let mut s = Vec::new();
    for &p in positions {
        for &i in &inv {
            let th = f64::from(p) * i;
            c.push((th.cos() * f) as f32);
            s.push((th.sin() * f) as f32);
        }
    }
    let shape = (positions.len(), inv.len());
    Ok((
        Tensor::from_vec(c, shape, &Device::Cpu)?,
        Tensor::from_vec(s, shape, &Device::Cpu)?,
    ))
}

/// `[tokens, heads, d]` to candle-nn's `[1, heads, tokens, d]` and back.
fn to_bhtd(x: &Tensor) -> R<Tensor> {
    x.transpose(0, 1)?.unsqueeze(0)?.contiguous()
}
fn from_bhtd(x: &Tensor) -> R<Tensor> {
    x.squeeze(0)?.transpose(0, 1)?.contiguous()
}

fn rope_case(style: RopeStyle, cfg: &RopeConfig, positions: &[i32], seed: u64) -> R<()> {
    let (tokens, heads, d) = (positions.len(), 3, cfg.head_dim());
    let rope = Rope::new(cfg, 64, style)?;
    let x0 = rand_t(&[tokens, heads, d], seed)?;
    let w = rand_t(&[tokens, heads, d], seed + 1)?;
    let (cos, sin) = cos_sin(cfg, 64, positions)?;

    // Forward against candle-nn's fused kernels.
    let ours = rope.apply(&x0, positions)?;
    let theirs = match style {
        RopeStyle::Neox => candle_nn::rotary_emb::rope(&to_bhtd(&x0)?, &cos, &sin)?,
        RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&to_bhtd(&x0)?, &cos, &sin)?,
    };
    assert_close("rope forward", &ours, &from_bhtd(&theirs)?, 2e-6)?;

    // Gradient against candle-nn's op-by-op versions (the fused ones have no backward).
    let x = Var::from_tensor(&x0)?;
    let g_ours = rope
        .apply(x.as_tensor(), positions)?
        .mul(&w)?
        .sum_all()?
        .backward()?;
    let x2 = Var::from_tensor(&to_bhtd(&x0)?)?;
    let y2 = match style {
        RopeStyle::Neox => candle_nn::rotary_emb::rope_slow(x2.as_tensor(), &cos, &sin)?,
        RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i_slow(x2.as_tensor(), &cos, &sin)?,
    };
    let g_theirs = y2.mul(&to_bhtd(&w)?)?.sum_all()?.backward()?;
    let a = g_ours.get(x.as_tensor()).expect("x has a gradient");
    let b = g_theirs.get(x2.as_tensor()).expect("x2 has a gradient");
    assert_close("rope gradient", a, &from_bhtd(b)?, 2e-6)?;
    // The gradient is the inverse rotation (times the attention factor f): applying the
    // forward to it gives f^2 w.
    let f2 = f64::from(cfg.attention_factor()).powi(2);
    assert_close(
        "rope R(theta) R(-theta)",
        &rope.apply(a, positions)?,
        &(&w * f2)?,
        4e-6,
    )?;
    Ok(())
}

#[test]
fn rope_matches_candle_nn_both_pairings_with_gradients() -> R<()> {
    let cfg = RopeConfig::builder(16).base(10_000.0).build().unwrap();
    let arange: Vec<i32> = (0..7).collect();
    let scattered = [5, 0, 63, 17, 17, 2, 40];
    for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
        rope_case(style, &cfg, &arange, 1)?;
        rope_case(style, &cfg, &scattered, 2)?;
    }
    // YaRN: the attention factor is folded into cos and sin on both sides.
    let yarn = RopeConfig::builder(32)
        .base(10_000.0)
        .max_position_embeddings(4096)
        .scaling(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 1024,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        })
        .build()
        .unwrap();
    assert!(yarn.attention_factor() != 1.0);
    rope_case(RopeStyle::Neox, &yarn, &scattered, 3)?;
    Ok(())
}

#[test]
fn rope_takes_non_contiguous_and_half_inputs() -> R<()> {
    let cfg = RopeConfig::builder(8).build().unwrap();
    let rope = Rope::new(&cfg, 16, RopeStyle::Neox)?;
    let x = rand_t(&[2, 5, 8], 9)?; // [heads, tokens, d]
    let pos: Vec<i32> = (0..5).collect();
    let strided = x.transpose(0, 1)?; // [tokens, heads, d], not contiguous
    assert!(!strided.is_contiguous());
    let a = rope.apply(&strided, &pos)?;
    let b = rope.apply(&strided.contiguous()?, &pos)?;
    assert_close("strided", &a, &b, 0.0)?;
    let h = rope.apply(&strided.to_dtype(DType::BF16)?, &pos)?;
    assert_eq!(h.dtype(), DType::BF16);
    assert_close("bf16", &h, &b, 2e-2)?;
    Ok(())
}

#[test]
fn rope_rejects_bad_input_with_errors() -> R<()> {
    let cfg = RopeConfig::builder(8).build().unwrap();
    let rope = Rope::new(&cfg, 16, RopeStyle::Neox)?;
    let x = rand_t(&[4, 2, 8], 1)?;
    let e = rope.apply(&x, &[0, 1, 2]).unwrap_err().to_string();
    assert!(e.contains("positions"), "{e}");
    assert!(rope.apply(&x, &[0, 1, -2, 3]).is_err());
    assert!(rope.apply(&rand_t(&[4, 2, 6], 1)?, &[0, 1, 2, 3]).is_err());
    assert!(rope.apply(&rand_t(&[4, 16], 1)?, &[0, 1, 2, 3]).is_err());
    let ints = Tensor::zeros((4, 2, 8), DType::U32, &Device::Cpu)?;
    assert!(rope.apply(&ints, &[0, 1, 2, 3]).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Attention
// ------------------------------------------------------------------------------------------

/// Softmax attention with candle ops: GQA by repeating KV heads, the mask as -inf,
/// candle-nn's softmax. Returns (O `[tq, hq, dv]`, LSE `[hq, tq]`).
fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
    softcap: Option<f64>,
) -> R<(Tensor, Tensor)> {
    let (tq, hq, d) = q.dims3()?;
    let (tk, hkv, dv) = v.dims3()?;
    let g = hq / hkv;
    let rep = |x: &Tensor, dd: usize| -> R<Tensor> {
        x.unsqueeze(2)?
            .broadcast_as((tk, hkv, g, dd))?
            .reshape((tk, hq, dd))?
            .transpose(0, 1)
    };
    let (kk, vv) = (rep(k, d)?, rep(v, dv)?); // [hq, tk, .]
    let qq = q.transpose(0, 1)?.contiguous()?; // [hq, tq, d]
    let mut s = (qq.matmul(&kk.transpose(1, 2)?.contiguous()?)? * scale)?; // [hq, tq, tk]
    if let Some(cap) = softcap {
        s = ((s / cap)?.tanh()? * cap)?;
    }
    if causal {
        let mask: Vec<f32> = (0..tq)
            .flat_map(|i| {
                (0..tk).map(move |j| {
                    if j + tq <= i + tk {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (tq, tk), &Device::Cpu)?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    let o = p.matmul(&vv.contiguous()?)?.transpose(0, 1)?.contiguous()?;
    let m = s.max_keepdim(D::Minus1)?;
    let lse = (s.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(2)?;
    Ok((o, lse))
}

#[allow(clippy::too_many_arguments)]
fn attention_case(
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    causal: bool,
    softcap: Option<f32>,
    seed: u64,
) -> R<()> {
    // Scaled up so that a softcap of 1 bends the scores noticeably.
    let q0 = (rand_t(&[tq, hq, d], seed)? * 3.0)?;
    let k0 = rand_t(&[tk, hkv, d], seed + 1)?;
    let v0 = rand_t(&[tk, hkv, d], seed + 2)?;
    let w = rand_t(&[tq, hq, d], seed + 3)?;
    let opts = AttentionOptions {
        mask: if causal { Mask::causal() } else { Mask::none() },
        softcap,
        ..AttentionOptions::default()
    };
    let scale = f64::from(opts.scale_for(d));
    let (q, k, v) = (
        Var::from_tensor(&q0)?,
        Var::from_tensor(&k0)?,
        Var::from_tensor(&v0)?,
    );
    let (o, lse) = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts)?;
    let g = o.mul(&w)?.sum_all()?.backward()?;

    // The candle-op version in f64, so the comparison measures the f32 rounding only.
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    let (q2, k2, v2) = (
        Var::from_tensor(&f(&q0)?)?,
        Var::from_tensor(&f(&k0)?)?,
        Var::from_tensor(&f(&v0)?)?,
    );
    let (o2, lse2) = candle_attention(
        q2.as_tensor(),
        k2.as_tensor(),
        v2.as_tensor(),
        causal,
        scale,
        softcap.map(f64::from),
    )?;
    let g2 = o2.mul(&f(&w)?)?.sum_all()?.backward()?;

    let tag =
        format!("tq {tq} tk {tk} hq {hq} hkv {hkv} d {d} causal {causal} softcap {softcap:?}");
    assert_close(&format!("O ({tag})"), &o, &o2, 1e-5)?;
    assert_close(&format!("LSE ({tag})"), &lse, &lse2, 1e-5)?;
    for (name, a, b) in [("dq", &q, &q2), ("dk", &k, &k2), ("dv", &v, &v2)] {
        let ga = g.get(a.as_tensor()).expect("ours has a gradient");
        let gb = g2.get(b.as_tensor()).expect("candle's has a gradient");
        assert_close(&format!("{name} ({tag})"), ga, gb, 1e-5)?;
    }
    Ok(())
}

#[test]
fn attention_matches_candle_ops_with_gradients() -> R<()> {
    attention_case(6, 6, 2, 2, 8, false, None, 10)?; // MHA
    attention_case(6, 6, 4, 2, 16, true, None, 20)?; // GQA 2, causal
    attention_case(5, 9, 4, 1, 8, true, None, 30)?; // MQA, causal bottom-right (tq < tk)
    attention_case(1, 7, 8, 2, 8, false, None, 40)?; // decode-like single row
    attention_case(6, 8, 4, 2, 8, true, Some(1.0), 50)?; // softcap (Gemma-2 style)
    Ok(())
}

#[test]
fn attention_varlen_equals_separate_sequences() -> R<()> {
    let (hq, hkv, d) = (4, 2, 8);
    let (q, k, v) = (
        rand_t(&[9, hq, d], 1)?,
        rand_t(&[11, hkv, d], 2)?,
        rand_t(&[11, hkv, d], 3)?,
    );
    let opts = AttentionOptions {
        mask: Mask::causal(),
        ..AttentionOptions::default()
    };
    let (o, lse) = attention_varlen(&q, &k, &v, &[0, 4, 9], &[0, 5, 11], &opts)?;
    let (oa, la) = attention(&q.i(0..4)?, &k.i(0..5)?, &v.i(0..5)?, &opts)?;
    let (ob, lb) = attention(&q.i(4..9)?, &k.i(5..11)?, &v.i(5..11)?, &opts)?;
    assert_close("varlen O", &o, &Tensor::cat(&[oa, ob], 0)?, 0.0)?;
    assert_close("varlen LSE", &lse, &Tensor::cat(&[la, lb], 1)?, 0.0)?;
    Ok(())
}

#[test]
fn attention_rejects_bad_input_with_errors() -> R<()> {
    let q = rand_t(&[4, 3, 8], 1)?;
    let k = rand_t(&[4, 2, 8], 2)?;
    let opts = AttentionOptions::default();
    let e = attention(&q, &k, &k, &opts).unwrap_err().to_string();
    assert!(e.contains("heads"), "{e}");
    let k1 = rand_t(&[4, 1, 4], 2)?;
    assert!(attention(&q, &k1, &k1, &opts).is_err());
    let k1 = rand_t(&[4, 1, 8], 2)?;
    assert!(attention(&q, &k1, &k1.to_dtype(DType::F64)?, &opts).is_err());
    assert!(attention_varlen(&q, &k1, &k1, &[0, 3], &[0, 4], &opts).is_err());
    assert!(attention_varlen(&q, &k1, &k1, &[0, 5, 4], &[0, 2, 4], &opts).is_err());
    let bad = AttentionOptions {
        softmax_scale: Some(f32::NAN),
        ..opts
    };
    assert!(attention(&q, &k1, &k1, &bad).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------------------
// MoE
// ------------------------------------------------------------------------------------------

/// Top-k router with candle ops: softmax, the ids (from candle's sort), gather,
/// renormalisation.
fn candle_router(logits: &Tensor, top_k: usize, renormalize: bool) -> R<(Tensor, Tensor)> {
    let p = candle_nn::ops::softmax(logits, D::Minus1)?;
    let ids = logits
        .arg_sort_last_dim(false)?
        .narrow(1, 0, top_k)?
        .contiguous()?;
    let w = p.gather(&ids, 1)?;
    let w = if renormalize {
        w.broadcast_div(&w.sum_keepdim(1)?)?
    } else {
        w
    };
    Ok((ids, w))
}

#[test]
fn router_matches_candle_ops_with_gradients() -> R<()> {
    let (tokens, experts) = (7, 8);
    for (cfg, renorm) in [
        (RouterConfig::mixtral(experts, 2), true),
        (RouterConfig::qwen_moe(experts, 3, false), false),
    ] {
        let z0 = (rand_t(&[tokens, experts], 5)? * 3.0)?;
        let c = rand_t(&[tokens, cfg.top_k], 6)?;
        let z = Var::from_tensor(&z0)?;
        let r = route(z.as_tensor(), &cfg, None)?;
        let g = r.weights.mul(&c)?.sum_all()?.backward()?;
        let z2 = Var::from_tensor(&z0.to_dtype(DType::F64)?)?;
        let (ids2, w2) = candle_router(z2.as_tensor(), cfg.top_k, renorm)?;
        let g2 = w2.mul(&c.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        assert_eq!(r.ids.to_vec2::<u32>()?, ids2.to_vec2::<u32>()?);
        assert_close("router weights", &r.weights, &w2, 1e-6)?;
        let ga = g.get(z.as_tensor()).expect("logits gradient");
        let gb = g2.get(z2.as_tensor()).expect("candle logits gradient");
        assert_close("router gradient", ga, gb, 1e-6)?;
    }
    Ok(())
}

#[test]
fn deepseek_v3_router_matches_candle_ops_with_gradients() -> R<()> {
    // Sigmoid scoring, a correction bias in the choice only, 4 groups of 4 scored by their
    // top-2 sums, 2 groups kept, top-4, renormalised, x 2.5.
    let (tokens, experts, top_k) = (6, 16, 4);
    let cfg = RouterConfig::deepseek_v3(experts, top_k, 4, 2, true, 2.5);
    let bias: Vec<f64> = (0..experts).map(|e| 0.05 * (e % 5) as f64).collect();
    let z0 = (rand_t(&[tokens, experts], 31)? * 2.0)?;
    let c = rand_t(&[tokens, top_k], 32)?;
    let z = Var::from_tensor(&z0)?;
    let r = route(z.as_tensor(), &cfg, Some(&bias))?;
    let g = r.weights.mul(&c)?.sum_all()?.backward()?;
    // The chosen experts come from at most 2 groups of 4.
    for row in r.ids.to_vec2::<u32>()? {
        let mut groups: Vec<u32> = row.iter().map(|&e| e / 4).collect();
        groups.sort_unstable();
        groups.dedup();
        assert!(
            groups.len() <= 2,
            "experts {row:?} span {} groups",
            groups.len()
        );
    }
    // Weights from candle ops at the same ids: sigmoid, gather, renormalise, scale.
    let z2 = Var::from_tensor(&z0.to_dtype(DType::F64)?)?;
    let s = candle_nn::ops::sigmoid(z2.as_tensor())?;
    let w = s.gather(&r.ids, 1)?;
    let w2 = (w.broadcast_div(&w.sum_keepdim(1)?)? * 2.5)?;
    let g2 = w2.mul(&c.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    assert_close("deepseek weights", &r.weights, &w2, 1e-6)?;
    let ga = g.get(z.as_tensor()).expect("logits gradient");
    let gb = g2.get(z2.as_tensor()).expect("candle logits gradient");
    assert_close("deepseek gradient", ga, gb, 1e-6)?;
    Ok(())
}

#[test]
fn gather_and_combine_match_candle_ops_with_gradients() -> R<()> {
    let (tokens, hidden, experts, top_k) = (9, 6, 4, 2);
    let cfg = RouterConfig::mixtral(experts, top_k);
    for block in [1, 4] {
        let logits = rand_t(&[tokens, experts], 11)?;
        let r = route(&logits, &cfg, None)?;
        let perm = permute(
            &r,
            experts,
            PermuteOptions {
                block,
                capacity_factor: None,
            },
        )?;
        let x0 = rand_t(&[tokens, hidden], 12)?;
        let w0 = r.weights.clone();
        let c = rand_t(&[tokens, hidden], 13)?;

        // Ours: gather, expert e scales its rows by (e + 1), combine.
        let x = Var::from_tensor(&x0)?;
        let w = Var::from_tensor(&w0)?;
        let gathered = gather(x.as_tensor(), &perm)?;
        assert_eq!(gathered.dims(), &[perm.used_slots(), hidden]);
        assert_eq!(perm.used_slots() % block, 0);
        let mut segs = Vec::new();
        for e in 0..experts {
            let (start, end) = (perm.offsets()[e] as usize, perm.offsets()[e + 1] as usize);
            if end > start {
                segs.push((gathered.narrow(0, start, end - start)? * (e as f64 + 1.0))?);
            }
        }
        let expert_out = Tensor::cat(&segs, 0)?;
        let y = combine(&expert_out, w.as_tensor(), &perm)?;
        let g = y.mul(&c)?.sum_all()?.backward()?;

        // candle ops: y[t] = sum_j w[t, j] (ids[t, j] + 1) x[t].
        let x2 = Var::from_tensor(&x0)?;
        let w2 = Var::from_tensor(&w0)?;
        let factor = (r.ids.to_dtype(DType::F32)? + 1.0)?;
        let y2 = x2
            .as_tensor()
            .broadcast_mul(&w2.as_tensor().mul(&factor)?.sum_keepdim(1)?)?;
        let g2 = y2.mul(&c)?.sum_all()?.backward()?;

        assert_close("combine(gather)", &y, &y2, 1e-5)?;
        assert_close(
            "d x",
            g.get(x.as_tensor()).expect("x grad"),
            g2.get(x2.as_tensor()).expect("x2 grad"),
            1e-5,
        )?;
        assert_close(
            "d weights",
            g.get(w.as_tensor()).expect("w grad"),
            g2.get(w2.as_tensor()).expect("w2 grad"),
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn router_gradient_flows_through_combine_to_logits() -> R<()> {
    // route -> combine: the logits' gradient equals the router backward of d weights.
    let (tokens, hidden, experts) = (5, 4, 6);
    let cfg = RouterConfig::mixtral(experts, 2);
    let z = Var::from_tensor(&rand_t(&[tokens, experts], 21)?)?;
    let r = route(z.as_tensor(), &cfg, None)?;
    let perm = permute(&r, experts, PermuteOptions::default())?;
    let x = rand_t(&[tokens, hidden], 22)?;
    let y = combine(&gather(&x, &perm)?, &r.weights, &perm)?;
    let g = y.sum_all()?.backward()?;
    let dz = g.get(z.as_tensor()).expect("logits gradient");
    // Mixtral renormalises, so every expert's output equal to x gives y = x regardless of
    // the weights: the logits' gradient is zero.
    assert_close("y", &y, &x, 1e-6)?;
    assert_close("dz", dz, &dz.zeros_like()?, 1e-6)?;
    Ok(())
}

#[test]
fn moe_rejects_bad_input_with_errors() -> R<()> {
    let cfg = RouterConfig::mixtral(4, 2);
    assert!(route(&rand_t(&[3, 5], 1)?, &cfg, None).is_err());
    assert!(route(&rand_t(&[3, 4], 1)?, &cfg, Some(&[0.0; 3])).is_err());
    let bad = RouterConfig { top_k: 9, ..cfg };
    assert!(route(&rand_t(&[3, 4], 1)?, &bad, None).is_err());
    let r = route(&rand_t(&[3, 4], 1)?, &cfg, None)?;
    let perm = permute(&r, 4, PermuteOptions::default())?;
    assert!(gather(&rand_t(&[4, 2], 1)?, &perm).is_err());
    assert!(combine(&rand_t(&[perm.slots() + 1, 2], 1)?, &r.weights, &perm).is_err());
    assert!(combine(&rand_t(&[perm.used_slots() - 1, 2], 1)?, &r.weights, &perm).is_err());
    assert!(permute(&r, 1, PermuteOptions::default()).is_err());
    Ok(())
}
