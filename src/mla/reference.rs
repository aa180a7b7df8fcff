//! f64 references of MLA attention, written from the math: the naive form (the latent
//! expanded to per-head keys and values through `kv_b_proj`), the absorption of the
//! up-projections into the query and the output, and the absorbed form (multi-query
//! attention over the latent cache). `tests/mla.rs` proves naive = absorbed to ~1e-12 at
//! DeepSeek-V3's dimensions.
//!
//! Layouts (dense, row-major): queries `[tokens_q, heads, qk_nope + qk_rope]` (no-rope part
//! first, as DeepSeek splits them), `c_kv` `[tokens_k, kv_lora_rank]`, `k_pe`
//! `[tokens_k, qk_rope]`, `kv_b_proj` `[heads, qk_nope + v_head, kv_lora_rank]` (HF's
//! `kv_b_proj.weight` `[heads x (qk_nope + v_head), kv_lora_rank]` viewed per head: rows
//! `0..qk_nope` are `W_UK`, the rest `W_UV`). Queries are the last `tokens_q` positions of
//! the `tokens_k` cached ones (bottom-right causal), as in decode with multi-token
//! prediction.

use super::MlaConfig;
use crate::attention::reference::{attention_f64, Output, Problem};
use crate::attention::Mask;
use crate::error::{Error, Result};

const OP: &str = "mla reference";

fn check_len(arg: &'static str, got: usize, dims: &[usize]) -> Result<()> {
    let want = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid(OP, arg, "size overflows usize"))?;
    if got != want {
        return Err(Error::invalid(
            OP,
            arg,
            format!("holds {got} values, expected {want} ({dims:?})"),
        ));
    }
    Ok(())
}

/// Naive MLA: per head `k_h[j] = [W_UK,h c_kv[j], k_pe[j]]`, `v_h[j] = W_UV,h c_kv[j]`, then
/// softmax attention with the config's scale, bottom-right causal. Returns O
/// `[tokens_q, heads, v_head]` and the LSE `[heads, tokens_q]`.
///
/// # Errors
/// [`Error::InvalidArgument`] for a length that does not match the config and the token
/// counts, more queries than keys, or an invalid config.
pub fn naive_f64(
    cfg: &MlaConfig,
    q: &[f64],
    c_kv: &[f64],
    k_pe: &[f64],
    kv_b_proj: &[f64],
    tokens_q: usize,
    tokens_k: usize,
) -> Result<Output<f64>> {
    cfg.validate()?;
    let (h, r, dn, dr, dv) = (
        cfg.heads,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    );
    check_len("q", q.len(), &[tokens_q, h, dn + dr])?;
    check_len("c_kv", c_kv.len(), &[tokens_k, r])?;
    check_len("k_pe", k_pe.len(), &[tokens_k, dr])?;
    check_len("kv_b_proj", kv_b_proj.len(), &[h, dn + dv, r])?;
    if tokens_q > tokens_k {
        return Err(Error::invalid(
            OP,
            "tokens_q",
            format!("{tokens_q} queries but {tokens_k} cached tokens"),
        ));
    }
    // Expanded per-head keys [tokens_k, heads, dn + dr] and values [tokens_k, heads, dv].
    let mut k = vec![0.0; tokens_k * h * (dn + dr)];
    let mut v = vec![0.0; tokens_k * h * dv];
    for j in 0..tokens_k {
        let c = &c_kv[j * r..(j + 1) * r];
        for hh in 0..h {
            let w = &kv_b_proj[hh * (dn + dv) * r..(hh + 1) * (dn + dv) * r];
            let kr = &mut k[(j * h + hh) * (dn + dr)..(j * h + hh + 1) * (dn + dr)];
            for (i, out) in kr[..dn].iter_mut().enumerate() {
                *out = dot(&w[i * r..(i + 1) * r], c);
            }
            kr[dn..].copy_from_slice(&k_pe[j * dr..(j + 1) * dr]);
            for i in 0..dv {
                v[(j * h + hh) * dv + i] = dot(&w[(dn + i) * r..(dn + i + 1) * r], c);
            }
        }
    }
    attention_f64(&Problem {
        q,
        k: &k,
        v: &v,
        cu_seqlens_q: &[0, tokens_q],
        cu_seqlens_k: &[0, tokens_k],
        heads_q: h,
        heads_kv: h,
        head_dim: dn + dr,
        head_dim_v: dv,
        scale: cfg.softmax_scale,
        softcap: None,
        mask: Mask::causal(),
    })
}

/// The absorbed query: `[q_abs, q_pe]` per token and head, `[tokens_q, heads, kv_lora_rank
/// + qk_rope]`, with `q_abs = W_UK,h^T q_nope` (a GEMM the model runs; here in f64).
///
/// # Errors
/// As [`naive_f64`].
pub fn absorb_query_f64(
    cfg: &MlaConfig,
    q: &[f64],
    kv_b_proj: &[f64],
    tokens_q: usize,
) -> Result<Vec<f64>> {
    cfg.validate()?;
    let (h, r, dn, dr, dv) = (
        cfg.heads,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    );
    check_len("q", q.len(), &[tokens_q, h, dn + dr])?;
    check_len("kv_b_proj", kv_b_proj.len(), &[h, dn + dv, r])?;
    let mut out = vec![0.0; tokens_q * h * (r + dr)];
    for t in 0..tokens_q {
        for hh in 0..h {
            let qn = &q[(t * h + hh) * (dn + dr)..][..dn];
            let w = &kv_b_proj[hh * (dn + dv) * r..];
            let o = &mut out[(t * h + hh) * (r + dr)..(t * h + hh + 1) * (r + dr)];
            for (i, &qi) in qn.iter().enumerate() {
                for (x, &wi) in o[..r].iter_mut().zip(&w[i * r..(i + 1) * r]) {
                    *x += qi * wi;
                }
            }
            o[r..].copy_from_slice(&q[(t * h + hh) * (dn + dr) + dn..][..dr]);
        }
    }
    Ok(out)
}

/// Absorbed MLA: multi-query attention of `q_lat` (`[tokens_q, heads, kv_lora_rank +
/// qk_rope]`, from [`absorb_query_f64`]) over one KV head whose key is `[c_kv, k_pe]` and
/// whose value is `c_kv`, with the config's scale, bottom-right causal. Returns the latent
/// output `o_lat` `[tokens_q, heads, kv_lora_rank]` and the LSE `[heads, tokens_q]`: what
/// an absorbed decode kernel writes.
///
/// # Errors
/// As [`naive_f64`].
pub fn absorbed_f64(
    cfg: &MlaConfig,
    q_lat: &[f64],
    c_kv: &[f64],
    k_pe: &[f64],
    tokens_q: usize,
    tokens_k: usize,
) -> Result<Output<f64>> {
    cfg.validate()?;
    let (h, r, dr) = (cfg.heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim);
    check_len("q_lat", q_lat.len(), &[tokens_q, h, r + dr])?;
    check_len("c_kv", c_kv.len(), &[tokens_k, r])?;
    check_len("k_pe", k_pe.len(), &[tokens_k, dr])?;
    if tokens_q > tokens_k {
        return Err(Error::invalid(
            OP,
            "tokens_q",
            format!("{tokens_q} queries but {tokens_k} cached tokens"),
        ));
    }
    let mut k = Vec::with_capacity(tokens_k * (r + dr));
    for j in 0..tokens_k {
        k.extend_from_slice(&c_kv[j * r..(j + 1) * r]);
        k.extend_from_slice(&k_pe[j * dr..(j + 1) * dr]);
    }
    attention_f64(&Problem {
        q: q_lat,
        k: &k,
        v: c_kv,
        cu_seqlens_q: &[0, tokens_q],
        cu_seqlens_k: &[0, tokens_k],
        heads_q: h,
        heads_kv: 1,
        head_dim: r + dr,
        head_dim_v: r,
        scale: cfg.softmax_scale,
        softcap: None,
        mask: Mask::causal(),
    })
}

/// The output projection's absorbed half: `o_h = W_UV,h o_lat,h`, `[tokens_q, heads,
/// v_head]` from `o_lat` `[tokens_q, heads, kv_lora_rank]`.
///
/// # Errors
/// As [`naive_f64`].
pub fn expand_output_f64(
    cfg: &MlaConfig,
    o_lat: &[f64],
    kv_b_proj: &[f64],
    tokens_q: usize,
) -> Result<Vec<f64>> {
    cfg.validate()?;
    let (h, r, dn, dv) = (
        cfg.heads,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.v_head_dim,
    );
    check_len("o_lat", o_lat.len(), &[tokens_q, h, r])?;
    check_len("kv_b_proj", kv_b_proj.len(), &[h, dn + dv, r])?;
    let mut out = vec![0.0; tokens_q * h * dv];
    for t in 0..tokens_q {
        for hh in 0..h {
            let ol = &o_lat[(t * h + hh) * r..(t * h + hh + 1) * r];
            let w = &kv_b_proj[hh * (dn + dv) * r..];
            for i in 0..dv {
                out[(t * h + hh) * dv + i] = dot(&w[(dn + i) * r..(dn + i + 1) * r], ol);
            }
        }
    }
    Ok(out)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
