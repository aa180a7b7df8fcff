//! The attention backward in f64, written from the math (the reference the backward
//! kernels are checked against).
//!
//! For query row i of head h (KV head h / group) with visible keys J, scale c and optional
//! softcap C:
//!   s_j = c q_i . k_j,   t_j = C tanh(s_j / C) (or s_j),   P_ij = exp(t_j - LSE_i),
//!   O_i = sum_j P_ij v_j.
//! Given dO (the loss's gradient with respect to O):
//!   dv_j += P_ij dO_i                       (summed over rows and the group's query heads)
//!   dP_ij = dO_i . v_j,   D_i = sum_j P_ij dP_ij = dO_i . O_i
//!   dt_j = P_ij (dP_ij - D_i),   ds_j = dt_j (1 - tanh^2(s_j / C)) (or dt_j)
//!   dq_i += c sum_j ds_j k_j,   dk_j += c ds_j q_i.
//! Rows that see no key have P = 0: they give nothing to any gradient and get dq = 0.

use super::{Problem, OP};
use crate::error::{Error, Result};

/// Gradients of a loss with respect to Q, K and V, in the forward's layouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads<F> {
    /// `[total_q, heads_q, head_dim]`.
    pub dq: Vec<F>,
    /// `[total_k, heads_kv, head_dim]`.
    pub dk: Vec<F>,
    /// `[total_k, heads_kv, head_dim_v]`.
    pub dv: Vec<F>,
}

/// The backward of [`attention_f64`](super::attention_f64) in f64: `dout` is dL/dO in O's
/// layout `[total_q, heads_q, head_dim_v]`. The softmax is recomputed from the inputs (not
/// taken from a forward's LSE).
///
/// # Errors
/// [`Error::InvalidArgument`] when the problem's shapes are inconsistent (as
/// [`Problem::validate`]) or `dout` does not hold total_q x heads_q x head_dim_v values.
pub fn attention_backward_f64(p: &Problem, dout: &[f64]) -> Result<Grads<f64>> {
    p.validate()?;
    let (tq, tk) = (p.total_q(), p.total_k());
    let (d, dv) = (p.head_dim, p.head_dim_v);
    let want = tq
        .checked_mul(p.heads_q)
        .and_then(|n| n.checked_mul(dv))
        .ok_or_else(|| Error::overflow(OP, "dout", "size overflows usize"))?;
    if dout.len() != want {
        return Err(Error::invalid(
            OP,
            "dout",
            format!(
                "{} values, expected {tq} x {} x {dv}",
                dout.len(),
                p.heads_q
            ),
        ));
    }
    let group = p.heads_q / p.heads_kv;
    let mut dq = vec![0.0f64; tq * p.heads_q * d];
    let mut dk = vec![0.0f64; tk * p.heads_kv * d];
    let mut dvv = vec![0.0f64; tk * p.heads_kv * dv];
    // Per visible key of the current row: (key index in the sequence, s, t).
    let mut row: Vec<(usize, f64, f64)> = Vec::new();
    let mut probs: Vec<f64> = Vec::new();
    for b in 0..p.batch() {
        let (qs, ks) = p.sequence(b);
        let (sq, sk) = (qs.len(), ks.len());
        for h in 0..p.heads_q {
            let hk = h / group;
            for i in 0..sq {
                let tq_i = qs.start + i;
                let q = p.q_row(tq_i, h);
                row.clear();
                for j in 0..sk {
                    if !p.mask.sees(i, j, sq, sk) {
                        continue;
                    }
                    let k = p.k_row(ks.start + j, hk);
                    let s = p.scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>();
                    let t = p.softcap.map_or(s, |cap| cap * (s / cap).tanh());
                    row.push((j, s, t));
                }
                if row.is_empty() {
                    continue;
                }
                let m = row.iter().map(|r| r.2).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|r| (r.2 - m).exp()).sum();
                probs.clear();
                probs.extend(row.iter().map(|r| (r.2 - m).exp() / sum));
                let g = &dout[(tq_i * p.heads_q + h) * dv..][..dv];
                // dP_j = dO . v_j and D = sum_j P_j dP_j.
                let dp: Vec<f64> = row
                    .iter()
                    .map(|r| {
                        g.iter()
                            .zip(p.v_row(ks.start + r.0, hk))
                            .map(|(a, b)| a * b)
                            .sum()
                    })
                    .collect();
                let dd: f64 = probs.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (n, &(j, s, _)) in row.iter().enumerate() {
                    let pj = probs[n];
                    let tj = ks.start + j;
                    for (acc, x) in dvv[(tj * p.heads_kv + hk) * dv..][..dv].iter_mut().zip(g) {
                        *acc += pj * x;
                    }
                    let dt = pj * (dp[n] - dd);
                    let ds = match p.softcap {
                        Some(cap) => {
                            let th = (s / cap).tanh();
                            dt * (1.0 - th * th)
                        }
                        None => dt,
                    };
                    let k = p.k_row(tj, hk);
                    for (acc, x) in dq[(tq_i * p.heads_q + h) * d..][..d].iter_mut().zip(k) {
                        *acc += p.scale * ds * x;
                    }
                    for (acc, x) in dk[(tj * p.heads_kv + hk) * d..][..d].iter_mut().zip(q) {
                        *acc += p.scale * ds * x;
                    }
                }
            }
        }
    }
    Ok(Grads { dq, dk, dv: dvv })
}

/// FlashAttention-2's backward decomposition in f32, the algorithm the backward kernel
/// follows: D_i = dO_i . O_i first; then for each (sequence, query head, key tile of
/// `tiles.block_n` keys) dK and dV of the tile stay in f32 accumulators while the query
/// tiles of `tiles.block_m` rows pass over it in ascending order, recomputing P from S and
/// the forward's LSE (-inf, a row with no key, read as +inf so P = 0); dQ accumulates in
/// f32 over key tiles in ascending order, and a KV head's dK and dV sum its query heads in
/// ascending order, so the result is deterministic. `round` is applied where the kernel
/// rounds to the storage dtype for a tensor-core product (P before dV, dS before dK and
/// dQ) and to the final gradients: the dtype's rounding for a same-precision run, the
/// identity for pure f32. `o`, `lse` and `dout` are the forward's O `[total_q, heads_q,
/// head_dim_v]`, LSE `[heads_q, total_q]` and dL/dO in O's layout.
///
/// # Errors
/// [`Error::InvalidArgument`] for inconsistent shapes, buffer lengths, or a zero tile side.
pub fn attention_backward_tiled_f32(
    p: &Problem,
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    tiles: super::Tiles,
    round: fn(f32) -> f32,
) -> Result<Grads<f32>> {
    p.validate()?;
    if tiles.block_m == 0 || tiles.block_n == 0 {
        return Err(Error::invalid(
            OP,
            "tiles",
            format!("{tiles:?} has a zero side"),
        ));
    }
    let (tq, tk) = (p.total_q(), p.total_k());
    let (d, dv) = (p.head_dim, p.head_dim_v);
    let n_o = tq
        .checked_mul(p.heads_q)
        .and_then(|n| n.checked_mul(dv))
        .ok_or_else(|| Error::overflow(OP, "dout", "size overflows usize"))?;
    for (arg, len, want) in [
        ("o", o.len(), n_o),
        ("dout", dout.len(), n_o),
        ("lse", lse.len(), tq * p.heads_q),
    ] {
        if len != want {
            return Err(Error::invalid(
                OP,
                arg,
                format!("{len} values, expected {want}"),
            ));
        }
    }
    let group = p.heads_q / p.heads_kv;
    let f = |x: f64| x as f32;
    // D = rowsum(dO * O), [heads_q, total_q].
    let mut dd = vec![0.0f32; p.heads_q * tq];
    for t in 0..tq {
        for h in 0..p.heads_q {
            let base = (t * p.heads_q + h) * dv;
            dd[h * tq + t] = (0..dv).map(|c| dout[base + c] * o[base + c]).sum();
        }
    }
    let scale = f(p.scale);
    let mut dq = vec![0.0f32; tq * p.heads_q * d];
    let mut dk = vec![0.0f32; tk * p.heads_kv * d];
    let mut dvv = vec![0.0f32; tk * p.heads_kv * dv];
    let (bm, bn) = (tiles.block_m, tiles.block_n);
    for b in 0..p.batch() {
        let (qs, ks) = p.sequence(b);
        let (sq, sk) = (qs.len(), ks.len());
        for h in 0..p.heads_q {
            let hk = h / group;
            for n0 in (0..sk).step_by(bn) {
                let n1 = (n0 + bn).min(sk);
                let mut dk_t = vec![0.0f32; (n1 - n0) * d];
                let mut dv_t = vec![0.0f32; (n1 - n0) * dv];
                for m0 in (0..sq).step_by(bm) {
                    let m1 = (m0 + bm).min(sq);
                    for i in m0..m1 {
                        let tq_i = qs.start + i;
                        let l = lse[h * tq + tq_i];
                        let l = if l == f32::NEG_INFINITY {
                            f32::INFINITY
                        } else {
                            l
                        };
                        let q: Vec<f32> = p.q_row(tq_i, h).iter().map(|&x| f(x)).collect();
                        let g = &dout[(tq_i * p.heads_q + h) * dv..][..dv];
                        for j in n0..n1 {
                            if !p.mask.sees(i, j, sq, sk) {
                                continue;
                            }
                            let k = p.k_row(ks.start + j, hk);
                            let v = p.v_row(ks.start + j, hk);
                            let s = scale * q.iter().zip(k).map(|(a, b)| a * f(*b)).sum::<f32>();
                            let (t, dtds) = match p.softcap {
                                Some(cap) => {
                                    let cap = f(cap);
                                    let th = (s / cap).tanh();
                                    (cap * th, 1.0 - th * th)
                                }
                                None => (s, 1.0),
                            };
                            let pij = (t - l).exp();
                            let pr = round(pij);
                            for (acc, x) in dv_t[(j - n0) * dv..][..dv].iter_mut().zip(g) {
                                *acc += pr * x;
                            }
                            let dp: f32 = g.iter().zip(v).map(|(a, b)| a * f(*b)).sum();
                            let ds = round(pij * (dp - dd[h * tq + tq_i]) * dtds);
                            for (acc, x) in dk_t[(j - n0) * d..][..d].iter_mut().zip(&q) {
                                *acc += scale * ds * x;
                            }
                            for (acc, x) in dq[(tq_i * p.heads_q + h) * d..][..d].iter_mut().zip(k)
                            {
                                *acc += scale * ds * f(*x);
                            }
                        }
                    }
                }
                for j in n0..n1 {
                    let tj = ks.start + j;
                    for (acc, x) in dk[(tj * p.heads_kv + hk) * d..][..d]
                        .iter_mut()
                        .zip(&dk_t[(j - n0) * d..][..d])
                    {
                        *acc += x;
                    }
                    for (acc, x) in dvv[(tj * p.heads_kv + hk) * dv..][..dv]
                        .iter_mut()
                        .zip(&dv_t[(j - n0) * dv..][..dv])
                    {
                        *acc += x;
                    }
                }
            }
        }
    }
    for x in dq.iter_mut().chain(dk.iter_mut()).chain(dvv.iter_mut()) {
        *x = round(*x);
    }
    Ok(Grads { dq, dk, dv: dvv })
}
