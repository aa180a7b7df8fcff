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
