//! `longctx::candle` on candle CPU tensors against candle's own operations: candle-nn's
//! rotary embeddings, softmax attention and a top-k router written with candle ops (matmul,
//! mask, softmax, gather). Outputs and gradients (through `Var` + `backward()`) must agree.
//! With `candle-cuda`, the module `cuda` runs the MoE ops on CUDA tensors against the same
//! ops on CPU tensors (ignored without a GPU).
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

// ------------------------------------------------------------------------------------------
// MoE on CUDA tensors (feature candle-cuda): the same ops on CPU tensors are the reference
// ------------------------------------------------------------------------------------------

#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::*;
    use longctx::candle::Routing;

    /// candle's CUDA device 0, or `None` with a SKIPPED note when there is no GPU or the
    /// crate was built without kernels; with `LONGCTX_REQUIRE_GPU=1` that fails instead.
    fn cuda(test: &str) -> Option<Device> {
        let required = std::env::var("LONGCTX_REQUIRE_GPU").as_deref() == Ok("1");
        let why = if !longctx::device::kernels_compiled() {
            "the crate was built without CUDA kernels (no nvcc at build time)".to_string()
        } else {
            match Device::new_cuda(0) {
                Ok(d) => return Some(d),
                Err(e) => e.to_string(),
            }
        };
        assert!(!required, "{test}: LONGCTX_REQUIRE_GPU=1 but {why}");
        eprintln!("SKIPPED {test}: {why}");
        None
    }

    /// Largest difference, relative to the reference's largest magnitude, that a result of
    /// `dtype` may show between the GPU (f32 accumulation, one rounding) and the CPU
    /// reference (f64, one rounding), with a few roundings of candle ops in between.
    fn rel_tol(dtype: DType) -> f64 {
        match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 4e-3,
            _ => 3e-2,
        }
    }

    /// `gpu` (on the GPU) against `cpu` (on the CPU): same dtype and shape, max |diff| at
    /// most `rel` times max(1, max |cpu|).
    fn assert_close_dev(what: &str, gpu: &Tensor, cpu: &Tensor, rel: f64) -> R<()> {
        assert!(gpu.device().is_cuda(), "{what}: not on the GPU");
        assert!(cpu.device().is_cpu(), "{what}: not on the CPU");
        assert_eq!(gpu.dtype(), cpu.dtype(), "{what}: dtypes differ");
        let scale = cpu
            .to_dtype(DType::F64)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?
            .max(1.0);
        assert_close(what, &gpu.to_device(&Device::Cpu)?, cpu, rel * scale)
    }

    /// Routes the same logits (rounded to `dtype`) on CPU and on `dev`, weights times `c`
    /// summed as the loss; checks ids, weights and the logits' gradients agree.
    fn route_case(
        dev: &Device,
        cfg: &RouterConfig,
        bias: Option<&[f64]>,
        dtype: DType,
        seed: u64,
    ) -> R<()> {
        let tokens = 11;
        let z0 = (rand_t(&[tokens, cfg.experts], seed)? * 3.0)?.to_dtype(dtype)?;
        let c = rand_t(&[tokens, cfg.top_k], seed + 1)?;
        let run = |d: &Device| -> R<(Routing, Tensor)> {
            let z = Var::from_tensor(&z0.to_device(d)?)?;
            let r = route(z.as_tensor(), cfg, bias)?;
            let g = r.weights.mul(&c.to_device(d)?)?.sum_all()?.backward()?;
            let dz = g.get(z.as_tensor()).expect("logits gradient").clone();
            Ok((r, dz))
        };
        let (rg, dzg) = run(dev)?;
        let (rc, dzc) = run(&Device::Cpu)?;
        let what = format!("{cfg:?} {dtype:?}");
        assert_eq!(rg.host_ids, rc.host_ids, "{what}: ids");
        assert_eq!(
            rg.ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?,
            rc.ids.to_vec2::<u32>()?,
            "{what}: ids tensor"
        );
        assert_eq!(rg.weights.dtype(), DType::F32);
        // The weights are f32 from the same (rounded) logits on both devices.
        assert_close_dev(&format!("{what}: weights"), &rg.weights, &rc.weights, 1e-5)?;
        assert_eq!(dzg.dtype(), dtype, "{what}: gradient dtype");
        assert_close_dev(
            &format!("{what}: logits gradient"),
            &dzg,
            &dzc,
            rel_tol(dtype),
        )
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_moe_route_matches_cpu_with_gradients() -> R<()> {
        let Some(dev) = cuda("gpu_moe_route_matches_cpu_with_gradients") else {
            return Ok(());
        };
        let bias: Vec<f64> = (0..16).map(|e| 0.05 * (e % 5) as f64).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            route_case(&dev, &RouterConfig::mixtral(8, 2), None, dtype, 40)?;
            route_case(&dev, &RouterConfig::qwen_moe(8, 3, false), None, dtype, 42)?;
            route_case(
                &dev,
                &RouterConfig::deepseek_v2(16, 4, 4, 2, 16.0),
                None,
                dtype,
                44,
            )?;
            route_case(
                &dev,
                &RouterConfig::deepseek_v3(16, 4, 4, 2, true, 2.5),
                Some(&bias),
                dtype,
                46,
            )?;
        }
        Ok(())
    }

    /// route -> permute -> gather -> expert e scales its rows by (e + 1) -> combine, on one
    /// device: the output and the gradients of x, the weights and the logits.
    fn moe_chain(
        d: &Device,
        z0: &Tensor,
        x0: &Tensor,
        c: &Tensor,
        cfg: &RouterConfig,
        opts: PermuteOptions,
        cpu_permutation: bool,
    ) -> R<Vec<Tensor>> {
        let z = Var::from_tensor(&z0.to_device(d)?)?;
        let x = Var::from_tensor(&x0.to_device(d)?)?;
        let r = route(z.as_tensor(), cfg, None)?;
        // The permutation from a CPU routing makes its device tables on first use.
        let perm = if cpu_permutation {
            permute(&route(z0, cfg, None)?, cfg.experts, opts)?
        } else {
            permute(&r, cfg.experts, opts)?
        };
        let gathered = gather(x.as_tensor(), &perm)?;
        assert_eq!(gathered.dims(), &[perm.used_slots(), x0.dims()[1]]);
        let mut segs = Vec::new();
        for e in 0..cfg.experts {
            let (start, end) = (perm.offsets()[e] as usize, perm.offsets()[e + 1] as usize);
            if end > start {
                segs.push((gathered.narrow(0, start, end - start)? * (e as f64 + 1.0))?);
            }
        }
        let expert_out = Tensor::cat(&segs, 0)?;
        let w = r.weights.clone();
        let y = combine(&expert_out, &w, &perm)?;
        let g = y
            .to_dtype(DType::F32)?
            .mul(&c.to_device(d)?)?
            .sum_all()?
            .backward()?;
        Ok(vec![
            y,
            g.get(x.as_tensor()).expect("x gradient").clone(),
            g.get(&w).expect("weights gradient").clone(),
            g.get(z.as_tensor()).expect("logits gradient").clone(),
        ])
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_moe_gather_combine_match_cpu_with_gradients() -> R<()> {
        let Some(dev) = cuda("gpu_moe_gather_combine_match_cpu_with_gradients") else {
            return Ok(());
        };
        let (tokens, hidden) = (13, 24);
        // Qwen without renormalisation, so the logits' gradient through combine is not 0.
        let cfg = RouterConfig::qwen_moe(6, 2, false);
        let z0 = rand_t(&[tokens, cfg.experts], 51)?;
        let c = rand_t(&[tokens, hidden], 53)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x0 = rand_t(&[tokens, hidden], 52)?.to_dtype(dtype)?;
            for (block, capacity_factor) in [(1, None), (4, None), (1, Some(0.75))] {
                let opts = PermuteOptions {
                    block,
                    capacity_factor,
                };
                for cpu_permutation in [false, true] {
                    let gpu = moe_chain(&dev, &z0, &x0, &c, &cfg, opts, cpu_permutation)?;
                    let cpu = moe_chain(&Device::Cpu, &z0, &x0, &c, &cfg, opts, false)?;
                    let what = format!("{dtype:?} block {block} capacity {capacity_factor:?}");
                    for (name, (a, b)) in ["y", "d x", "d weights", "d logits"]
                        .iter()
                        .zip(gpu.iter().zip(&cpu))
                    {
                        // The weights and the logits stay f32; d weights is computed in f32
                        // from the same expert outputs on both devices.
                        let rel = if a.dtype() == DType::F32 {
                            1e-5
                        } else {
                            rel_tol(dtype)
                        };
                        assert_close_dev(&format!("{what}: {name}"), a, b, rel)?;
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_moe_rejects_unsupported_input_with_errors() -> R<()> {
        let Some(dev) = cuda("gpu_moe_rejects_unsupported_input_with_errors") else {
            return Ok(());
        };
        let cfg = RouterConfig::mixtral(4, 2);
        let z = rand_t(&[3, 4], 1)?.to_device(&dev)?;
        let e = route(&z.to_dtype(DType::F64)?, &cfg, None).unwrap_err();
        assert!(e.to_string().contains("dtype"), "{e}");
        let r = route(&z, &cfg, None)?;
        let perm = permute(&r, 4, PermuteOptions::default())?;
        let x = rand_t(&[3, 8], 2)?.to_device(&dev)?;
        assert!(gather(&x.to_dtype(DType::F64)?, &perm).is_err());
        let g = gather(&x, &perm)?;
        assert!(combine(&g.to_dtype(DType::F64)?, &r.weights, &perm).is_err());
        // Expert outputs and weights on different devices.
        assert!(combine(&g, &r.weights.to_device(&Device::Cpu)?, &perm).is_err());
        // The CUDA path takes weights of any float dtype (converted to f32).
        let y = combine(&g, &r.weights.to_dtype(DType::BF16)?, &perm)?;
        assert_eq!(y.dims(), &[3, 8]);
        Ok(())
    }
}
