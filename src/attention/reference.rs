//! CPU references of the attention forward pass, and of its backward
//! ([`attention_backward_f64`]).
//!
//! * [`attention_f64`]: naive, written from the math. Inputs are f64 values already rounded
//!   to the device dtype; every score, the softmax and the output accumulate in f64.
//! * [`attention_tiled_f32`]: FlashAttention-2's algorithm in f32 with a tile shape and the
//!   plan's block-skip rules, the same online softmax (log2 domain, reference max kept in
//!   raw score units and moved lazily per warp's rows, see [`RESCALE_THRESHOLD`]) and the
//!   same zero-filled partial tiles as the CUDA kernel. Comparing it
//!   with the naive one on every mask proves the tiling and masking logic on the CPU. With
//!   `round` set to the device dtype's rounding it is also "the same computation in the input
//!   dtype" that GPU tolerances are measured against.
//!
//! Layouts (dense, contiguous): Q `[total_q, heads_q, d]`, K `[total_k, heads_kv, d]`,
//! V `[total_k, heads_kv, d_v]`; outputs O `[total_q, heads_q, d_v]` and LSE
//! `[heads_q, total_q]` (natural log). Sequence `b` owns query tokens
//! `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` and key tokens likewise. Rows that see no key get
//! O = 0 and LSE = -inf.

use super::plan::{Mask, SoftmaxConsts, TileConfig, RESCALE_THRESHOLD};
use super::MAX_GRID_YZ;
use crate::error::{Error, Result};

const OP: &str = "attention reference";

/// The largest `head_dim` and `head_dim_v` the references accept. Real models use 64 to 576;
/// the bound keeps a problem with no keys (whose V is empty whatever its head dim) from
/// asking for an output of absurd size.
pub const MAX_HEAD_DIM: usize = 1 << 12;

/// The largest `block_m` and `block_n` of [`Tiles`]. The kernels use 64 and 128; the bound
/// keeps the tiled run's per-tile buffers and work per key tile small.
pub const MAX_TILE: usize = 1 << 10;

mod backward;
pub use backward::{attention_backward_f64, attention_backward_tiled_f32, Grads};

/// One attention problem on the host.
#[derive(Debug, Clone, Copy)]
pub struct Problem<'a> {
    /// `[total_q, heads_q, head_dim]`.
    pub q: &'a [f64],
    /// `[total_k, heads_kv, head_dim]`.
    pub k: &'a [f64],
    /// `[total_k, heads_kv, head_dim_v]`.
    pub v: &'a [f64],
    /// `batch + 1` nondecreasing offsets into the query tokens, from 0 to total_q.
    pub cu_seqlens_q: &'a [usize],
    /// `batch + 1` nondecreasing offsets into the key tokens, from 0 to total_k.
    pub cu_seqlens_k: &'a [usize],
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads; divides `heads_q`.
    pub heads_kv: usize,
    /// Channels of Q and K.
    pub head_dim: usize,
    /// Channels of V.
    pub head_dim_v: usize,
    /// Softmax scale (usually `1 / sqrt(head_dim)`).
    pub scale: f64,
    /// Logit softcap: scores become `cap * tanh(score / cap)` before masking.
    pub softcap: Option<f64>,
    /// The mask.
    pub mask: Mask,
}

/// Outputs of a reference run.
#[derive(Debug, Clone, PartialEq)]
pub struct Output<F> {
    /// `[total_q, heads_q, head_dim_v]`.
    pub o: Vec<F>,
    /// `[heads_q, total_q]`, natural log; -inf for rows that see no key.
    pub lse: Vec<F>,
}

impl Problem<'_> {
    fn batch(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }

    fn total_q(&self) -> usize {
        self.cu_seqlens_q.last().copied().unwrap_or(0)
    }

    fn total_k(&self) -> usize {
        self.cu_seqlens_k.last().copied().unwrap_or(0)
    }

    /// (query token range, key token range) of sequence `b`.
    fn sequence(&self, b: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        (
            self.cu_seqlens_q[b]..self.cu_seqlens_q[b + 1],
            self.cu_seqlens_k[b]..self.cu_seqlens_k[b + 1],
        )
    }

    /// Checks shapes and offsets: after it passes, every index the references form is in
    /// bounds and every output size is at most [`MAX_HEAD_DIM`] times an input's.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first inconsistent argument: offsets lists of
    /// different lengths or fewer than 2 entries, not starting at 0 or decreasing
    /// (`cu_seqlens_q` / `cu_seqlens_k`); heads_q or heads_kv of 0, heads_kv not dividing
    /// heads_q, or heads_q above [`MAX_GRID_YZ`] (`heads`); a
    /// head dim outside 1..=[`MAX_HEAD_DIM`] (`head_dim`); a Q, K or V length other than
    /// tokens x heads x head dim, or a product that overflows usize (`q`, `k`, `v`); a scale
    /// or softcap that is not finite and positive (`softmax_scale`).
    pub fn validate(&self) -> Result<()> {
        let bad = |arg: &'static str, problem: String| Err(Error::invalid(OP, arg, problem));
        if self.cu_seqlens_q.len() < 2 || self.cu_seqlens_q.len() != self.cu_seqlens_k.len() {
            return bad(
                "cu_seqlens",
                format!(
                    "cu_seqlens_q has {} entries, cu_seqlens_k {}; both need batch + 1 >= 2",
                    self.cu_seqlens_q.len(),
                    self.cu_seqlens_k.len()
                ),
            );
        }
        for (name, cu) in [
            ("cu_seqlens_q", self.cu_seqlens_q),
            ("cu_seqlens_k", self.cu_seqlens_k),
        ] {
            if cu[0] != 0 || cu.windows(2).any(|w| w[1] < w[0]) {
                return bad(
                    if name == "cu_seqlens_q" {
                        "cu_seqlens_q"
                    } else {
                        "cu_seqlens_k"
                    },
                    format!("{cu:?} must start at 0 and not decrease"),
                );
            }
        }
        // heads_q >= 1 and head_dim >= 1 tie total_q to q's length, so a loop over query
        // tokens is bounded by the input; heads_q itself is bounded as in the kernel (a
        // problem with no query token would otherwise loop over any number of heads).
        if self.heads_q == 0
            || self.heads_q > MAX_GRID_YZ
            || self.heads_kv == 0
            || self.heads_q % self.heads_kv != 0
        {
            return bad(
                "heads",
                format!(
                    "heads_q {} must be a positive multiple of heads_kv {}, at most {MAX_GRID_YZ}",
                    self.heads_q, self.heads_kv
                ),
            );
        }
        for (arg, dim) in [("head_dim", self.head_dim), ("head_dim_v", self.head_dim_v)] {
            if dim == 0 || dim > MAX_HEAD_DIM {
                return bad(
                    "head_dim",
                    format!("{arg} {dim} is outside 1..={MAX_HEAD_DIM}"),
                );
            }
        }
        let (tq, tk) = (self.total_q(), self.total_k());
        let size = |tokens: usize, heads: usize, dim: usize| {
            tokens.checked_mul(heads).and_then(|x| x.checked_mul(dim))
        };
        if Some(self.q.len()) != size(tq, self.heads_q, self.head_dim) {
            return bad(
                "q",
                format!(
                    "{} values, expected {tq} x {} x {}",
                    self.q.len(),
                    self.heads_q,
                    self.head_dim
                ),
            );
        }
        if Some(self.k.len()) != size(tk, self.heads_kv, self.head_dim) {
            return bad(
                "k",
                format!(
                    "{} values, expected {tk} x {} x {}",
                    self.k.len(),
                    self.heads_kv,
                    self.head_dim
                ),
            );
        }
        if Some(self.v.len()) != size(tk, self.heads_kv, self.head_dim_v) {
            return bad(
                "v",
                format!(
                    "{} values, expected {tk} x {} x {}",
                    self.v.len(),
                    self.heads_kv,
                    self.head_dim_v
                ),
            );
        }
        if !(self.scale.is_finite() && self.scale > 0.0)
            || self.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return bad(
                "softmax_scale",
                format!(
                    "scale {} and softcap {:?} must be finite and > 0",
                    self.scale, self.softcap
                ),
            );
        }
        Ok(())
    }

    fn q_row(&self, t: usize, h: usize) -> &[f64] {
        let d = self.head_dim;
        &self.q[(t * self.heads_q + h) * d..][..d]
    }

    fn k_row(&self, t: usize, h: usize) -> &[f64] {
        let d = self.head_dim;
        &self.k[(t * self.heads_kv + h) * d..][..d]
    }

    fn v_row(&self, t: usize, h: usize) -> &[f64] {
        let d = self.head_dim_v;
        &self.v[(t * self.heads_kv + h) * d..][..d]
    }
}

/// Output sizes of a validated problem: (O elements, LSE elements). Checked, although
/// validation bounds both by the input sizes: heads_q x total_q <= q.len() (head_dim >= 1).
fn output_sizes(p: &Problem) -> Result<(usize, usize)> {
    let lse = p
        .heads_q
        .checked_mul(p.total_q())
        .ok_or_else(|| Error::overflow(OP, "q", "heads_q x total_q overflows usize"))?;
    let o = lse.checked_mul(p.head_dim_v).ok_or_else(|| {
        Error::overflow(OP, "v", "total_q x heads_q x head_dim_v overflows usize")
    })?;
    Ok((o, lse))
}

/// Naive attention in f64: scores, softcap, mask, softmax and P V for every row.
///
/// The work is heads_q x (sum over sequences of seqlen_q x seqlen_k) x (head_dim +
/// head_dim_v): proportional to the sizes of Q and K, whose lengths validation ties to the
/// offsets.
///
/// # Errors
/// [`Error::InvalidArgument`] when the problem's shapes are inconsistent (see
/// [`Problem::validate`]).
pub fn attention_f64(p: &Problem) -> Result<Output<f64>> {
    p.validate()?;
    let (tq, dv) = (p.total_q(), p.head_dim_v);
    let group = p.heads_q / p.heads_kv;
    let (o_len, lse_len) = output_sizes(p)?;
    let mut o = vec![0.0f64; o_len];
    let mut lse = vec![f64::NEG_INFINITY; lse_len];
    let mut scores = Vec::new();
    for b in 0..p.batch() {
        let (qs, ks) = p.sequence(b);
        let (sq, sk) = (qs.len(), ks.len());
        for h in 0..p.heads_q {
            let hk = h / group;
            for i in 0..sq {
                let q = p.q_row(qs.start + i, h);
                scores.clear();
                for j in 0..sk {
                    if !p.mask.sees(i, j, sq, sk) {
                        continue;
                    }
                    let k = p.k_row(ks.start + j, hk);
                    let mut s = p.scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>();
                    if let Some(cap) = p.softcap {
                        s = cap * (s / cap).tanh();
                    }
                    scores.push((j, s));
                }
                if scores.is_empty() {
                    continue;
                }
                let m = scores
                    .iter()
                    .map(|&(_, s)| s)
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|&(_, s)| (s - m).exp()).sum();
                let out = &mut o[((qs.start + i) * p.heads_q + h) * dv..][..dv];
                for &(j, s) in &scores {
                    let w = (s - m).exp() / sum;
                    for (acc, x) in out.iter_mut().zip(p.v_row(ks.start + j, hk)) {
                        *acc += w * x;
                    }
                }
                lse[h * tq + qs.start + i] = m + sum.ln();
            }
        }
    }
    Ok(Output { o, lse })
}

/// Tile shape of the tiled implementation: the kernel's (from the plan) or any other, to
/// exercise tile boundaries with small tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    /// Query rows per tile.
    pub block_m: usize,
    /// Keys per tile.
    pub block_n: usize,
    /// Rows that decide together whether to move their reference maxima (the kernel's rows
    /// per warp); consecutive groups from the tile's first row, the last one possibly short.
    pub rows_per_warp: usize,
}

impl From<&TileConfig> for Tiles {
    fn from(t: &TileConfig) -> Self {
        Tiles {
            block_m: t.block_m,
            block_n: t.block_n,
            rows_per_warp: t.rows_per_warp(),
        }
    }
}

impl Tiles {
    /// A tile shape whose rows all decide rescaling together.
    pub fn new(block_m: usize, block_n: usize) -> Tiles {
        Tiles {
            block_m,
            block_n,
            rows_per_warp: block_m,
        }
    }

    fn config(self, p: &Problem) -> TileConfig {
        TileConfig {
            path: super::plan::KernelPath::Sm80,
            ptx_arch: 80,
            head_dim: p.head_dim,
            head_dim_v: p.head_dim_v,
            block_m: self.block_m,
            block_n: self.block_n,
            warps: 1,
        }
    }
}

/// Counts of what the tiled run did, to check that tests exercise every path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TileStats {
    /// Key tiles processed with element-wise masking.
    pub masked_tiles: u64,
    /// Key tiles processed with no mask.
    pub unmasked_tiles: u64,
    /// Query tiles that saw no key at all (written as O = 0, LSE = -inf).
    pub empty_query_tiles: u64,
    /// (key tile, row group) steps that moved the group's reference maxima and rescaled
    /// accumulated values (not counting a group's first visible keys).
    pub rescales: u64,
    /// Steps that kept them: some row's max grew, but by no more than the threshold.
    pub kept_grown_max: u64,
}

/// FlashAttention-2's forward pass in f32, mirroring the CUDA kernel: for each (sequence,
/// head, query tile) it visits only the key tiles the plan's `key_blocks` names, masks
/// element-wise only outside `unmasked_blocks` (the kernel's form of `needs_mask`; keys
/// past seqlen_k read as zero, as the kernel's zero-filled loads do), and keeps the online
/// softmax in the log2 domain with the reference max in raw score units, moved (and O and
/// the row sums rescaled) per group of `rows_per_warp` rows only when some row of the group
/// outgrew it by more than [`RESCALE_THRESHOLD`], as the kernel's warps do. `round` is applied to P
/// before P V and to the final O: pass the device dtype's rounding for a same-precision
/// run, or the identity for pure f32.
///
/// # Errors
/// [`Error::InvalidArgument`] when the problem's shapes are inconsistent (see
/// [`Problem::validate`]), a tile side is zero or `block_m` or `block_n` exceeds
/// [`MAX_TILE`] (`tiles`), or the scale and softcap do not fold into normal f32 constants
/// (`softmax_scale`, `softcap`).
pub fn attention_tiled_f32(
    p: &Problem,
    tiles: Tiles,
    round: fn(f32) -> f32,
) -> Result<(Output<f32>, TileStats)> {
    p.validate()?;
    if tiles.block_m == 0 || tiles.block_n == 0 || tiles.rows_per_warp == 0 {
        return Err(Error::invalid(
            OP,
            "tiles",
            format!("{tiles:?} has a zero side"),
        ));
    }
    if tiles.block_m > MAX_TILE || tiles.block_n > MAX_TILE {
        return Err(Error::invalid(
            OP,
            "tiles",
            format!("{tiles:?}: block_m and block_n must be at most {MAX_TILE}"),
        ));
    }
    let consts = SoftmaxConsts::new(p.scale as f32, p.softcap.map(|c| c as f32))?;
    let cfg = tiles.config(p);
    let (tq, d, dv) = (p.total_q(), p.head_dim, p.head_dim_v);
    let group = p.heads_q / p.heads_kv;
    let (o_len, lse_len) = output_sizes(p)?;
    let mut o = vec![0.0f32; o_len];
    let mut lse = vec![f32::NEG_INFINITY; lse_len];
    let mut stats = TileStats::default();
    let (bm, bn) = (tiles.block_m, tiles.block_n);
    // Per query tile: the running max (raw units), the running sum and the O accumulator,
    // for the rows a tile can actually have (at most the longest query sequence).
    let longest_q = p
        .cu_seqlens_q
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0);
    let rows_cap = bm.min(longest_q);
    let mut row_max = vec![0.0f32; rows_cap];
    let mut row_sum = vec![0.0f32; rows_cap];
    let mut m_new = vec![0.0f32; rows_cap];
    // rows_cap <= MAX_TILE, bn <= MAX_TILE and dv <= MAX_HEAD_DIM: no overflow.
    let mut acc = vec![0.0f32; rows_cap * dv];
    let mut s = vec![0.0f32; rows_cap * bn];
    let zeros_d = vec![0.0f32; d];
    let zeros_dv = vec![0.0f32; dv];
    let to32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (q32, k32, v32) = (to32(p.q), to32(p.k), to32(p.v));
    for b in 0..p.batch() {
        let (qs, ks) = p.sequence(b);
        let (sq, sk) = (qs.len(), ks.len());
        for h in 0..p.heads_q {
            let hk = h / group;
            for mb in 0..cfg.num_m_blocks(sq) {
                let Some(rows) = cfg.m_rows(mb, sq) else {
                    continue;
                };
                let Some(n_range) = cfg.key_blocks(&p.mask, mb, sq, sk) else {
                    // The output is already O = 0, LSE = -inf.
                    stats.empty_query_tiles += 1;
                    continue;
                };
                let nrows = rows.len();
                row_max[..nrows].fill(f32::NEG_INFINITY);
                row_sum[..nrows].fill(0.0);
                acc[..nrows * dv].fill(0.0);
                let unmasked = cfg.unmasked_blocks(&p.mask, mb, sq, sk);
                for nb in n_range {
                    let masked = !unmasked.contains(&nb);
                    if masked {
                        stats.masked_tiles += 1;
                    } else {
                        stats.unmasked_tiles += 1;
                    }
                    let k0 = nb * bn;
                    // S = Q K^T (raw), softcap transform, mask.
                    for r in 0..nrows {
                        let i = rows.start + r;
                        let t = qs.start + i;
                        let q = &q32[(t * p.heads_q + h) * d..][..d];
                        for c in 0..bn {
                            let j = k0 + c;
                            let k = if j < sk {
                                &k32[((ks.start + j) * p.heads_kv + hk) * d..][..d]
                            } else {
                                &zeros_d[..]
                            };
                            let mut x: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                            if consts.softcap_in != 0.0 {
                                x = (x * consts.softcap_in).tanh();
                            }
                            if masked && !p.mask.sees(i, j, sq, sk) {
                                x = f32::NEG_INFINITY;
                            }
                            s[r * bn + c] = x;
                        }
                    }
                    // Online softmax with lazy rescaling, one row group (the kernel's warp)
                    // at a time, then O += P V.
                    for g0 in (0..nrows).step_by(tiles.rows_per_warp) {
                        let group = g0..(g0 + tiles.rows_per_warp).min(nrows);
                        let mut grow = false;
                        let mut grew = false;
                        for r in group.clone() {
                            m_new[r] = s[r * bn..][..bn].iter().copied().fold(row_max[r], f32::max);
                            // +inf for a row's first visible key, NaN (false) while it has none.
                            grow |= (m_new[r] - row_max[r]) * consts.exp_scale > RESCALE_THRESHOLD;
                            grew |= m_new[r] > row_max[r];
                        }
                        if grow {
                            if group.clone().any(|r| row_max[r].is_finite()) {
                                stats.rescales += 1;
                            }
                            for r in group.clone() {
                                let m_use = if m_new[r] == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    m_new[r]
                                };
                                let corr = ((row_max[r] - m_use) * consts.exp_scale).exp2();
                                row_max[r] = m_new[r];
                                row_sum[r] *= corr;
                                acc[r * dv..][..dv].iter_mut().for_each(|a| *a *= corr);
                            }
                        } else if grew {
                            stats.kept_grown_max += 1;
                        }
                        for r in group {
                            let m_ref = if row_max[r] == f32::NEG_INFINITY {
                                0.0
                            } else {
                                row_max[r]
                            };
                            let m_scaled = m_ref * consts.exp_scale;
                            let out = &mut acc[r * dv..][..dv];
                            for (c, x) in s[r * bn..][..bn].iter_mut().enumerate() {
                                let pv = x.mul_add(consts.exp_scale, -m_scaled).exp2();
                                row_sum[r] += pv;
                                let pr = round(pv);
                                let j = k0 + c;
                                let v = if j < sk {
                                    &v32[((ks.start + j) * p.heads_kv + hk) * dv..][..dv]
                                } else {
                                    &zeros_dv[..]
                                };
                                for (a, vx) in out.iter_mut().zip(v) {
                                    *a += pr * vx;
                                }
                            }
                        }
                    }
                }
                for r in 0..nrows {
                    let t = qs.start + rows.start + r;
                    let l = row_sum[r];
                    let dst = &mut o[(t * p.heads_q + h) * dv..][..dv];
                    if l == 0.0 {
                        dst.fill(0.0);
                        lse[h * tq + t] = f32::NEG_INFINITY;
                    } else {
                        let inv = 1.0 / l;
                        for (x, a) in dst.iter_mut().zip(&acc[r * dv..][..dv]) {
                            *x = round(a * inv);
                        }
                        lse[h * tq + t] =
                            (row_max[r] * consts.exp_scale + l.log2()) * std::f32::consts::LN_2;
                    }
                }
            }
        }
    }
    Ok((Output { o, lse }, stats))
}

/// Error of `got` against `want`, FlashAttention-style: the largest and the mean absolute
/// difference over O, and the largest over finite LSE entries (an LSE that is -inf in one
/// and not the other counts as infinite error).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ErrorStats {
    /// Largest |O_got - O_want|.
    pub max_o: f64,
    /// Mean |O_got - O_want|.
    pub mean_o: f64,
    /// Largest |LSE_got - LSE_want|.
    pub max_lse: f64,
}

/// Compares two outputs element by element (see [`ErrorStats`]).
pub fn compare<A: Copy + Into<f64>>(
    got_o: &[A],
    got_lse: &[f32],
    want: &Output<f64>,
) -> ErrorStats {
    let mut st = ErrorStats::default();
    let mut sum = 0.0;
    for (g, w) in got_o.iter().zip(&want.o) {
        let e = ((*g).into() - w).abs();
        let e = if e.is_nan() { f64::INFINITY } else { e };
        st.max_o = st.max_o.max(e);
        sum += e;
    }
    st.mean_o = if want.o.is_empty() {
        0.0
    } else {
        sum / want.o.len() as f64
    };
    for (g, w) in got_lse.iter().zip(&want.lse) {
        let g = f64::from(*g);
        let e = if g == f64::NEG_INFINITY && *w == f64::NEG_INFINITY {
            0.0
        } else if g.is_finite() && w.is_finite() {
            (g - w).abs()
        } else {
            f64::INFINITY
        };
        st.max_lse = st.max_lse.max(e);
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn single_key_returns_its_value() {
        let q = [1.0, 2.0];
        let k = [0.5, -1.0];
        let v = [3.0, -4.0];
        let p = Problem {
            q: &q,
            k: &k,
            v: &v,
            cu_seqlens_q: &[0, 1],
            cu_seqlens_k: &[0, 1],
            heads_q: 1,
            heads_kv: 1,
            head_dim: 2,
            head_dim_v: 2,
            scale: 0.5,
            softcap: None,
            mask: Mask::none(),
        };
        let out = attention_f64(&p).unwrap();
        assert_eq!(out.o, vec![3.0, -4.0]);
        assert!((out.lse[0] - 0.5 * (0.5 - 2.0)).abs() < 1e-15);
    }

    #[test]
    fn tiled_matches_naive_small_tiles() {
        let mut seed = 3u64;
        let (hq, hkv, d, dv) = (4, 2, 8, 4);
        let cu_q = [0usize, 5, 5, 22, 23];
        let cu_k = [0usize, 9, 12, 20, 20];
        let q: Vec<f64> = (0..23 * hq * d).map(|_| lcg(&mut seed)).collect();
        let k: Vec<f64> = (0..20 * hkv * d).map(|_| lcg(&mut seed)).collect();
        let v: Vec<f64> = (0..20 * hkv * dv).map(|_| lcg(&mut seed)).collect();
        for mask in [
            Mask::none(),
            Mask::causal(),
            Mask::window(2, 1),
            Mask {
                causal: true,
                window_left: Some(3),
                window_right: None,
            },
        ] {
            for softcap in [None, Some(0.7)] {
                let p = Problem {
                    q: &q,
                    k: &k,
                    v: &v,
                    cu_seqlens_q: &cu_q,
                    cu_seqlens_k: &cu_k,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    head_dim_v: dv,
                    scale: 0.9,
                    softcap,
                    mask,
                };
                let want = attention_f64(&p).unwrap();
                let (got, _) = attention_tiled_f32(
                    &p,
                    Tiles {
                        block_m: 4,
                        block_n: 3,
                        rows_per_warp: 2,
                    },
                    |x| x,
                )
                .unwrap();
                let st = compare(&got.o, &got.lse, &want);
                assert!(
                    st.max_o < 1e-5 && st.max_lse < 1e-5,
                    "{mask:?} {softcap:?}: {st:?}"
                );
            }
        }
    }
}
