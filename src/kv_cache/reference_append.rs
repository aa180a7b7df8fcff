//! The f64 reference of [`append_kv`](super::append_kv), written from its definition: new
//! row `i` of sequence `b` (`n_b` new tokens) is the token at position
//! `p = seqlens[b] - n_b + i`, whose K is rotated forward at `p` (RoPE on the first
//! rotary_dim channels, [`apply_rope_f64`]) and whose K and V rows land in cache row
//! `(page * page_size + p % page_size) * heads_kv + h`, `page = block_table[b][p / page_size]`.

use super::paged::PagedKvLayout;
use super::step::StepTable;
use crate::error::{Error, Result};
use crate::layout::HeadsLayout;
use crate::rope::reference::apply_rope_f64;
use crate::rope::{Direction, RopeStyle};

const OP: &str = "append_kv reference";

/// The largest fp8 e4m3 value: a per-(token, head) scale is `absmax / 448`.
const FP8_MAX: f64 = 448.0;

/// The RoPE of a reference append.
#[derive(Debug, Clone, Copy)]
pub struct AppendRopeF64<'a> {
    /// One inverse frequency per rotated pair (rotary_dim / 2 of them).
    pub inv_freq: &'a [f64],
    /// Multiplies cos and sin.
    pub attention_factor: f64,
    /// Channel pairing.
    pub style: RopeStyle,
}

/// What an append writes, in f64, before rounding to the cache type.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendedF64 {
    /// The cache row `(page * page_size + slot) * heads_kv + h` of each new (token, head)
    /// row, token-major (`rows[t * heads_kv + h]`); element `c` of it is cache element
    /// `rows[..] * head_dim + c`, and for per-(token, head) fp8 its scale's index.
    pub rows: Vec<usize>,
    /// The position of each new token.
    pub positions: Vec<usize>,
    /// K's rows as written, `[total_new, heads_kv, head_dim]` (rotated).
    pub k: Vec<f64>,
    /// V's rows as written (never rotated).
    pub v: Vec<f64>,
    /// The per-(token, head) fp8 scale of each K row: `absmax / 448`, 1 for an all-zero row.
    pub k_scale: Vec<f64>,
    /// The same for V.
    pub v_scale: Vec<f64>,
}

impl AppendedF64 {
    /// Writes the appended rows into cache-shaped tensors (`[pages, page_size, heads_kv,
    /// head_dim]`, `head_dim` per row), leaving every other element as it is: the expected
    /// cache contents before rounding to the storage type.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `head_dim` is not the rows' width (`head_dim`) or a row
    /// does not fit `cache_k` or `cache_v` (`cache`).
    pub fn scatter(&self, head_dim: usize, cache_k: &mut [f64], cache_v: &mut [f64]) -> Result<()> {
        if self.rows.len().checked_mul(head_dim) != Some(self.k.len())
            || self.v.len() != self.k.len()
        {
            return Err(Error::invalid(
                OP,
                "head_dim",
                format!(
                    "{} rows of {head_dim} are not the {} values held",
                    self.rows.len(),
                    self.k.len()
                ),
            ));
        }
        for (i, &row) in self.rows.iter().enumerate() {
            let end = row
                .checked_add(1)
                .and_then(|r| r.checked_mul(head_dim))
                .filter(|&e| e <= cache_k.len() && e <= cache_v.len())
                .ok_or_else(|| {
                    Error::invalid(OP, "cache", format!("cache row {row} is past the cache"))
                })?;
            let src = i * head_dim..(i + 1) * head_dim;
            cache_k[end - head_dim..end].copy_from_slice(&self.k[src.clone()]);
            cache_v[end - head_dim..end].copy_from_slice(&self.v[src]);
        }
        Ok(())
    }
}

/// The per-(token, head) fp8 scale of a row: `absmax / 448`, 1 for an all-zero row.
pub fn fp8_row_scale(row: &[f64]) -> f64 {
    let m = row.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if m > 0.0 {
        m / FP8_MAX
    } else {
        1.0
    }
}

/// Appends the dense `[total_new, heads_kv, head_dim]` rows `new_k` / `new_v` of `step` to
/// a cache of `layout`, returning what lands where (see [`AppendedF64`]); cache rows not in
/// `rows` are untouched by an append.
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`PagedKvLayout::validate_step`] rejects; new
/// K or V not `total_new x heads_kv x head_dim` long or that size overflowing (`new_k`,
/// `new_v`); a RoPE table of more than head_dim / 2 pairs (`rope`); two new tokens mapping
/// to one cache slot (`block_table`).
pub fn append_kv_f64(
    layout: &PagedKvLayout,
    step: &StepTable,
    new_k: &[f64],
    new_v: &[f64],
    rope: Option<&AppendRopeF64>,
) -> Result<AppendedF64> {
    let v = layout.validate_step(step)?;
    let (heads, dim) = (layout.heads_kv, layout.head_dim);
    let want = v
        .total_new
        .checked_mul(heads)
        .and_then(|x| x.checked_mul(dim))
        .ok_or_else(|| Error::invalid(OP, "new_k", "total_new x heads_kv x head_dim overflows"))?;
    for (len, arg) in [(new_k.len(), "new_k"), (new_v.len(), "new_v")] {
        if len != want {
            return Err(Error::invalid(
                OP,
                arg,
                format!("holds {len} values, expected {want}"),
            ));
        }
    }
    if let Some(r) = rope {
        if r.inv_freq.len() > dim / 2 {
            return Err(Error::invalid(
                OP,
                "rope",
                format!("rotary_dim 2 x {} > head_dim {dim}", r.inv_freq.len()),
            ));
        }
    }
    let mut out = AppendedF64 {
        rows: Vec::with_capacity(v.total_new * heads),
        positions: Vec::with_capacity(v.total_new),
        k: new_k.to_vec(),
        v: new_v.to_vec(),
        k_scale: Vec::with_capacity(v.total_new * heads),
        v_scale: Vec::with_capacity(v.total_new * heads),
    };
    let mut seen = std::collections::HashMap::new();
    for b in 0..v.batch {
        let n = v.new_tokens(b);
        for i in 0..n {
            // validate_step: n <= seqlens[b], and the table covers every position below it.
            let p = v.seqlens[b] - n + i;
            let t = v.cu_new[b] + i;
            let page =
                step.table.block_table[b * step.table.max_pages_per_seq + p / layout.page_size];
            // page is in 0..pages (validated), so the product stays within the cache size.
            let slot_row = page as usize * layout.page_size + p % layout.page_size;
            if let Some(other) = seen.insert(slot_row, t) {
                return Err(Error::invalid(
                    OP,
                    "block_table",
                    format!(
                        "new tokens {other} and {t} both map to slot {} of page {page}",
                        p % layout.page_size
                    ),
                ));
            }
            out.positions.push(p);
            for h in 0..heads {
                out.rows.push(slot_row * heads + h);
            }
            if let Some(r) = rope {
                let row = HeadsLayout::contiguous(1, heads, dim);
                let pos = i32::try_from(p)
                    .map_err(|_| Error::invalid(OP, "seqlens", "a position exceeds i32"))?;
                apply_rope_f64(
                    &mut out.k[t * heads * dim..(t + 1) * heads * dim],
                    &row,
                    &[pos],
                    r.inv_freq,
                    r.attention_factor,
                    r.style,
                    Direction::Forward,
                )?;
            }
        }
    }
    for r in 0..v.total_new * heads {
        out.k_scale
            .push(fp8_row_scale(&out.k[r * dim..(r + 1) * dim]));
        out.v_scale
            .push(fp8_row_scale(&out.v[r * dim..(r + 1) * dim]));
    }
    Ok(out)
}
