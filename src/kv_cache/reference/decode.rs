//! The f64 reference of decode over a paged cache: the cache is read back to its logical
//! (dense, per-sequence) K and V with [`gather_paged_f64`](super::gather_paged_f64), and
//! each sequence's new tokens attend to its keys with the attention reference
//! ([`attention_f64`](crate::attention::reference::attention_f64), written from the math),
//! causal bottom-right: query i of n new tokens sits at position len - n + i.

use crate::attention::reference::{attention_f64, Output, Problem};
use crate::attention::Mask;
use crate::error::{Error, Result};
use crate::kv_cache::{PagedKvLayout, StepTable};

const OP: &str = "decode reference";

/// Scores and mask of a decode reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeMath {
    /// Softmax scale.
    pub scale: f64,
    /// Logit softcap, if any.
    pub softcap: Option<f64>,
    /// Keys before a query's own position it sees (None: all).
    pub window_left: Option<usize>,
}

/// Decode's output for `q` (`[total_new, heads_q, head_dim]`) over the cache values `k`
/// and `v` (each `[pages, page_size, heads_kv, head_dim]`, already dequantised: an fp8
/// cache's `code x scale`): O `[total_new, heads_q, head_dim]`, LSE `[heads_q, total_new]`
/// (natural log, -inf for a row with no visible key).
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid layout or step (see
/// [`PagedKvLayout::validate_step`]), a cache or Q of the wrong length, heads that do not
/// group, or what the attention reference rejects.
pub fn decode_f64(
    layout: &PagedKvLayout,
    step: &StepTable,
    q: &[f64],
    heads_q: usize,
    k: &[f64],
    v: &[f64],
    math: &DecodeMath,
) -> Result<Output<f64>> {
    let s = layout.validate_step(step)?;
    let (dense_k, t) = super::gather_paged_f64(layout, k, &step.table)?;
    let (dense_v, _) = super::gather_paged_f64(layout, v, &step.table)?;
    let want_q = s
        .total_new
        .checked_mul(heads_q)
        .and_then(|x| x.checked_mul(layout.head_dim))
        .ok_or_else(|| Error::invalid(OP, "q", "size overflows usize"))?;
    if q.len() != want_q {
        return Err(Error::invalid(
            OP,
            "q",
            format!("holds {} values, expected {want_q}", q.len()),
        ));
    }
    attention_f64(&Problem {
        q,
        k: &dense_k,
        v: &dense_v,
        cu_seqlens_q: &s.cu_new,
        cu_seqlens_k: &t.cu_seqlens,
        heads_q,
        heads_kv: layout.heads_kv,
        head_dim: layout.head_dim,
        head_dim_v: layout.head_dim,
        scale: math.scale,
        softcap: math.softcap,
        mask: Mask {
            causal: true,
            window_left: math.window_left,
            window_right: None,
        },
    })
}

/// Decode with keys stored un-rotated and every rotation taken at each sequence's current
/// length (exact dynamic scaling): for sequence b with `len` cached tokens, the rotation
/// `scaling.at(len)` (inverse frequencies and attention factor) turns every cached key j at
/// position j and every new query i at position `len - n + i` (RoPE with `style`, the
/// attention factor multiplying cos and sin of both, as HF applies it); then the attention
/// of [`decode_f64`]. `q` and the cache hold un-rotated values.
///
/// # Errors
/// As [`decode_f64`], plus the scaling's own errors
/// ([`LengthScaling::at`](crate::rope::LengthScaling::at)) and a rotary dim that does not fit
/// the head dim.
#[allow(clippy::too_many_arguments)]
pub fn decode_rotating_f64(
    layout: &PagedKvLayout,
    step: &StepTable,
    q: &[f64],
    heads_q: usize,
    k: &[f64],
    v: &[f64],
    scaling: &crate::rope::LengthScaling,
    style: crate::rope::RopeStyle,
    math: &DecodeMath,
) -> Result<Output<f64>> {
    use crate::layout::HeadsLayout;
    use crate::rope::reference::apply_rope_f64;
    use crate::rope::Direction;
    let s = layout.validate_step(step)?;
    let (mut dense_k, t) = super::gather_paged_f64(layout, k, &step.table)?;
    let (dense_v, _) = super::gather_paged_f64(layout, v, &step.table)?;
    let d = layout.head_dim;
    let want_q = s
        .total_new
        .checked_mul(heads_q)
        .and_then(|x| x.checked_mul(d))
        .ok_or_else(|| Error::invalid(OP, "q", "size overflows usize"))?;
    if q.len() != want_q {
        return Err(Error::invalid(
            OP,
            "q",
            format!("holds {} values, expected {want_q}", q.len()),
        ));
    }
    if scaling.config().head_dim() != d {
        return Err(Error::invalid(
            OP,
            "scaling",
            format!(
                "head dim {} differs from the cache's {d}",
                scaling.config().head_dim()
            ),
        ));
    }
    let mut q = q.to_vec();
    for b in 0..s.batch {
        let len = s.seqlens[b];
        let n = s.new_tokens(b);
        let rot = scaling.at(len)?;
        let k0 = t.cu_seqlens[b];
        let kl = HeadsLayout::contiguous(len, layout.heads_kv, d);
        let positions: Vec<i32> = (0..len as i32).collect();
        apply_rope_f64(
            &mut dense_k[k0 * layout.heads_kv * d..(k0 + len) * layout.heads_kv * d],
            &kl,
            &positions,
            &rot.inv_freq,
            rot.attention_factor,
            style,
            Direction::Forward,
        )?;
        let q0 = s.cu_new[b];
        let ql = HeadsLayout::contiguous(n, heads_q, d);
        let qpos: Vec<i32> = ((len - n) as i32..len as i32).collect();
        apply_rope_f64(
            &mut q[q0 * heads_q * d..(q0 + n) * heads_q * d],
            &ql,
            &qpos,
            &rot.inv_freq,
            rot.attention_factor,
            style,
            Direction::Forward,
        )?;
    }
    attention_f64(&Problem {
        q: &q,
        k: &dense_k,
        v: &dense_v,
        cu_seqlens_q: &s.cu_new,
        cu_seqlens_k: &t.cu_seqlens,
        heads_q,
        heads_kv: layout.heads_kv,
        head_dim: d,
        head_dim_v: d,
        scale: math.scale,
        softcap: math.softcap,
        mask: Mask {
            causal: true,
            window_left: math.window_left,
            window_right: None,
        },
    })
}

/// Extend (chunked prefill) over a cache of un-rotated keys, every rotation taken at each
/// sequence's current length: the math of [`decode_rotating_f64`], which places no limit
/// on the new tokens per sequence. For sequence b with `len` cached tokens and `n` new ones,
/// `scaling.at(len)` rotates every cached key j at position j and every query i at
/// `len - n + i`, cos and sin times the attention factor; then causal bottom-right
/// attention in f64 with `math`'s scale, softcap and window. `q` and the cache hold
/// un-rotated values.
///
/// # Errors
/// As [`decode_rotating_f64`].
#[allow(clippy::too_many_arguments)]
pub fn extend_rotating_f64(
    layout: &PagedKvLayout,
    step: &StepTable,
    q: &[f64],
    heads_q: usize,
    k: &[f64],
    v: &[f64],
    scaling: &crate::rope::LengthScaling,
    style: crate::rope::RopeStyle,
    math: &DecodeMath,
) -> Result<Output<f64>> {
    decode_rotating_f64(layout, step, q, heads_q, k, v, scaling, style, math)
}
