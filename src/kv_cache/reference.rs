//! CPU references of the KV-cache ops, written from the math in f64.
//!
//! Layouts (dense): parts' O `[parts, tokens, heads, head_dim_v]`, parts' LSE
//! `[parts, heads, tokens]` (natural log, -inf = empty); the merged state is an
//! [`Output`] with O `[tokens, heads, head_dim_v]` and LSE `[heads, tokens]`, the attention
//! reference's own type, so [`crate::attention::reference::compare`] applies.

use crate::attention::reference::Output;
use crate::error::{Error, Result};

const OP: &str = "merge_states reference";

mod decode;
pub use decode::{decode_f64, decode_rotating_f64, extend_rotating_f64, DecodeMath};

/// Merges `parts` states of `tokens x heads` rows: `LSE = log sum_p exp(LSE_p)` (formed as
/// `m + log sum_p exp(LSE_p - m)` with `m` the largest finite LSE_p), `O = sum_p
/// exp(LSE_p - LSE) O_p`. Parts with LSE -inf are skipped (their O is not read); a row
/// with no other part gets O = 0, LSE = -inf.
///
/// # Errors
/// [`Error::InvalidArgument`] when a size overflows or `o` / `lse` is not
/// `parts x tokens x heads x head_dim_v` / `parts x heads x tokens` long, or an LSE is NaN
/// or +inf.
pub fn merge_states_f64(
    o: &[f64],
    lse: &[f64],
    parts: usize,
    tokens: usize,
    heads: usize,
    head_dim_v: usize,
) -> Result<Output<f64>> {
    let rows = tokens
        .checked_mul(heads)
        .ok_or_else(|| Error::invalid(OP, "tokens", "tokens x heads overflows usize"))?;
    let o_part = rows
        .checked_mul(head_dim_v)
        .ok_or_else(|| Error::invalid(OP, "o", "a part's O size overflows usize"))?;
    let want_o = parts
        .checked_mul(o_part)
        .ok_or_else(|| Error::invalid(OP, "o", "O size overflows usize"))?;
    let want_lse = parts
        .checked_mul(rows)
        .ok_or_else(|| Error::invalid(OP, "lse", "LSE size overflows usize"))?;
    if o.len() != want_o {
        return Err(Error::invalid(
            OP,
            "o",
            format!("holds {} values, expected {want_o}", o.len()),
        ));
    }
    if lse.len() != want_lse {
        return Err(Error::invalid(
            OP,
            "lse",
            format!("holds {} values, expected {want_lse}", lse.len()),
        ));
    }
    if let Some(bad) = lse.iter().find(|x| x.is_nan() || **x == f64::INFINITY) {
        return Err(Error::invalid(
            OP,
            "lse",
            format!("{bad} is neither finite nor -inf"),
        ));
    }
    let mut out = Output {
        o: vec![0.0; o_part],
        lse: vec![f64::NEG_INFINITY; rows],
    };
    for t in 0..tokens {
        for h in 0..heads {
            let l = |p: usize| lse[p * rows + h * tokens + t];
            let m = (0..parts).map(l).fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let total = m + (0..parts).map(|p| (l(p) - m).exp()).sum::<f64>().ln();
            let dst = &mut out.o[(t * heads + h) * head_dim_v..][..head_dim_v];
            for p in (0..parts).filter(|&p| l(p) > f64::NEG_INFINITY) {
                let w = (l(p) - total).exp();
                let src = &o[p * o_part + (t * heads + h) * head_dim_v..][..head_dim_v];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += w * s;
                }
            }
            out.lse[h * tokens + t] = total;
        }
    }
    Ok(out)
}

/// Gathers a paged cache tensor into its dense twin `[total_tokens, heads_kv, head_dim]`,
/// the batch's sequences concatenated in order (offsets in the returned
/// [`ValidatedTable::cu_seqlens`](super::ValidatedTable)).
///
/// # Errors
/// [`Error::InvalidArgument`] for an invalid layout or table (see
/// [`PagedKvLayout::validate_table`](super::PagedKvLayout::validate_table)) or a cache that
/// is not [`PagedKvLayout::cache_len`](super::PagedKvLayout::cache_len) long.
pub fn gather_paged_f64(
    layout: &super::PagedKvLayout,
    cache: &[f64],
    table: &super::PageTable,
) -> Result<(Vec<f64>, super::ValidatedTable)> {
    check_cache_len(layout, cache.len())?;
    let v = layout.validate_table(table)?;
    let mut dense = vec![0.0; super::dense_len(layout, &v)?];
    let d = layout.head_dim;
    super::for_each_row(layout, table, |src, dst| {
        dense[dst..dst + d].copy_from_slice(&cache[src..src + d]);
    })?;
    Ok((dense, v))
}

/// Writes a dense `[total_tokens, heads_kv, head_dim]` tensor (sequences concatenated)
/// into the pages its table names; cache elements of other pages or slots are left as
/// they are. A page shared by two sequences receives the later sequence's rows.
///
/// # Errors
/// As [`gather_paged_f64`], plus a dense tensor of the wrong length (`dense`).
pub fn scatter_paged_f64(
    layout: &super::PagedKvLayout,
    dense: &[f64],
    table: &super::PageTable,
    cache: &mut [f64],
) -> Result<super::ValidatedTable> {
    check_cache_len(layout, cache.len())?;
    let v = layout.validate_table(table)?;
    let want = super::dense_len(layout, &v)?;
    if dense.len() != want {
        return Err(Error::invalid(
            "paged_kv",
            "dense",
            format!("holds {} values, expected {want}", dense.len()),
        ));
    }
    let d = layout.head_dim;
    super::for_each_row(layout, table, |src, dst| {
        cache[src..src + d].copy_from_slice(&dense[dst..dst + d]);
    })
}

fn check_cache_len(layout: &super::PagedKvLayout, len: usize) -> Result<()> {
    let want = layout.cache_len()?;
    if len != want {
        return Err(Error::invalid(
            "paged_kv",
            "cache",
            format!("holds {len} values, expected {want} ({layout:?})"),
        ));
    }
    Ok(())
}

pub use super::reference_append::{append_kv_f64, fp8_row_scale, AppendRopeF64, AppendedF64};
