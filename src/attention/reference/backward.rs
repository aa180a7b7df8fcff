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
        .ok_or_else(|| Error::invalid(OP, "dout", "size overflows usize"))?;
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
