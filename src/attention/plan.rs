//! Everything about an attention forward run that is decided on the host, in plain Rust:
//! which head dims exist, the tile shape of each, how many CTAs a launch has, and the
//! block-skip rules of the masks (which key tiles a query tile visits, which of those need
//! element-wise masking).
//!
//! The CUDA kernel (kernels/attention/), the launcher (`cuda.rs`) and the CPU tiled
//! implementation (`reference::attention_tiled_f32`) all follow these functions, so the
//! tiling and masking logic is tested on the CPU before a GPU runs it.
//!
//! Coordinates: inside one sequence of a variable-length batch, query row `i` is in
//! `0..seqlen_q` and key `j` in `0..seqlen_k`. With `c = seqlen_k - seqlen_q` (bottom-right
//! alignment, as FlashAttention >= 2.1), row `i` sees key `j` iff
//! `i + c - left <= j <= i + c + right` and `j < seqlen_k`, where a causal mask is
//! `right = 0`. Unbounded window sides are stored as [`WINDOW_UNBOUNDED`], which is larger
//! than any admitted sequence, so one formula covers every mask.

use std::ops::Range;

use crate::error::{Error, Result};

/// Most tokens a Q, K or V tensor may hold (2^29). Mask arithmetic in the kernel is 32-bit;
/// this bound keeps `row + (seqlen_k - seqlen_q) +/- window` inside i32. The 64-bit
/// element offsets do not depend on it.
pub const MAX_TOKENS: usize = 1 << 29;

/// Window side that stands for "unbounded": at least [`MAX_TOKENS`], so it admits every key.
pub const WINDOW_UNBOUNDED: usize = 1 << 29;

/// Lazy rescaling of the online softmax, in units of the exp2 domain: a warp keeps the
/// reference maxima of its rows, and skips rescaling O and the row sums, until some row's
/// running max exceeds its reference by more than this, so every unnormalised probability
/// stays at most 2^8 (f16 and bf16 hold it exactly in range; the rounding of P is relative
/// and unchanged). FlashAttention 4 rescales conditionally in the same way. The kernel reads
/// the same number from kernels/params/attention_params.h.
pub const RESCALE_THRESHOLD: f32 = crate::sys::LONGCTX_ATTN_RESCALE_THRESHOLD as f32;

/// Supported (head_dim of Q and K, head_dim of V) pairs. d = 192 with d_v = 128 is
/// DeepSeek's MLA prefill shape (128 nope + 64 rope channels).
pub const SUPPORTED_HEAD_DIMS: [(usize, usize); 5] =
    [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256)];

/// Which kernel implementation a plan targets. Only the sm80 instruction set path exists
/// (mma.sync + ldmatrix + cp.async; it runs on sm80, sm86, sm89 and sm90); a Hopper path
/// (wgmma + TMA) would add a variant with its own tile table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// FlashAttention-2's algorithm on mma.sync m16n8k16.
    Sm80,
}

/// Tile shape of one (head_dim, head_dim_v) kernel as compiled for one PTX arch.
/// kernels/params/attention_params.h repeats these numbers as macros and
/// kernels/attention/traits.cuh static_asserts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileConfig {
    /// The kernel implementation.
    pub path: KernelPath,
    /// Lowest PTX arch (compute capability x 10) of the code this shape is compiled into:
    /// 80 for the sm_80/86/89 cubins and the compute_80 PTX, 90 for the sm_90a cubin.
    pub ptx_arch: u32,
    /// Channels of Q and K.
    pub head_dim: usize,
    /// Channels of V and O.
    pub head_dim_v: usize,
    /// Query rows per CTA.
    pub block_m: usize,
    /// Keys per streamed K/V tile.
    pub block_n: usize,
    /// Warps per CTA; each owns `block_m / warps` consecutive query rows.
    pub warps: usize,
}

/// Bytes of one shared-memory element (f16 and bf16).
const ELEM_BYTES: usize = 2;

/// The per-head-dim tile table, first for code compiled for compute_80 (sm80, sm86, sm89,
/// and the PTX that newer GPUs JIT), then for the sm_90a cubin. Reasons (numbers from ptxas
/// on sm80..sm90a, CUDA 13.0):
/// * block_m 128 with 4 warps (32 rows per warp, two m16 MMA tiles) reuses every K/V
///   fragment loaded from shared memory twice, as FlashAttention 2 does on A100/H100 for
///   d <= 128; the O accumulator is then d_v floats per thread.
/// * block_n 64 halves, per key, the barriers, the Q fragment reloads and the softmax
///   bookkeeping of block_n 32, and cuts shared-memory reads per MMA from 0.375 to 0.31
///   ldmatrix.x4. It is used where the kernel fits 255 registers without spilling: d 64 and
///   256 everywhere; d 96 and 128 on sm_90a only (ptxas for sm_80..89 spills 40 bytes at
///   d 128, and sm86/sm89's 100 KB of shared memory per SM would hold one 64 KB CTA instead
///   of two 48 KB ones); d 192 nowhere (40 bytes spilled on sm_90a).
/// * d 256 uses block_m 64 (16 rows per warp) so that O stays at 128 registers and shared
///   memory at 96 KiB, under the 99 KiB per-block limit of sm86/sm89.
pub(crate) const TILES: [TileConfig; 10] = [
    tile(80, 64, 64, 128, 64),
    tile(80, 96, 96, 128, 32),
    tile(80, 128, 128, 128, 32),
    tile(80, 192, 128, 128, 32),
    tile(80, 256, 256, 64, 64),
    tile(90, 64, 64, 128, 64),
    tile(90, 96, 96, 128, 64),
    tile(90, 128, 128, 128, 64),
    tile(90, 192, 128, 128, 32),
    tile(90, 256, 256, 64, 64),
];

/// One row of [`TILES`]: the sm80 path with 4 warps.
const fn tile(
    ptx_arch: u32,
    head_dim: usize,
    head_dim_v: usize,
    block_m: usize,
    block_n: usize,
) -> TileConfig {
    TileConfig {
        path: KernelPath::Sm80,
        ptx_arch,
        head_dim,
        head_dim_v,
        block_m,
        block_n,
        warps: 4,
    }
}

/// Shared-memory rows are padded to a multiple of 64 elements (128 bytes) so the XOR swizzle
/// of 16-byte chunks by `row % 8` stays inside the row; only d = 96 is padded (to 128).
/// Saturates at the largest multiple of 64 instead of overflowing.
pub const fn smem_row_elems(dim: usize) -> usize {
    dim.div_ceil(64).saturating_mul(64)
}

impl TileConfig {
    /// The tile shape of the portable code (compiled for compute_80) for a head-dim pair, or
    /// an error naming the supported pairs. The shape a launch on a given GPU uses is
    /// [`TileConfig::for_code`] with the loaded kernel's PTX arch
    /// (`attention::device_tile_config` asks the device).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `(head_dim, head_dim_v)` is not in
    /// [`SUPPORTED_HEAD_DIMS`].
    pub fn for_head_dims(head_dim: usize, head_dim_v: usize) -> Result<TileConfig> {
        Self::for_code(head_dim, head_dim_v, 80)
    }

    /// The tile shape of the code compiled for PTX arch `ptx_arch` (compute capability x 10,
    /// as CUDA reports a function's PTX version): the sm_90a shape from 90 up, the portable
    /// one below.
    ///
    /// # Errors
    /// As [`TileConfig::for_head_dims`].
    pub fn for_code(head_dim: usize, head_dim_v: usize, ptx_arch: u32) -> Result<TileConfig> {
        let arch = if ptx_arch >= 90 { 90 } else { 80 };
        TILES
            .iter()
            .find(|t| t.head_dim == head_dim && t.head_dim_v == head_dim_v && t.ptx_arch == arch)
            .copied()
            .ok_or_else(|| {
                Error::unsupported(
                    "attention",
                    "head_dim",
                    format!(
                        "(head_dim {head_dim}, head_dim_v {head_dim_v}) is not supported; supported pairs: \
                         (64, 64), (96, 96), (128, 128), (192, 128), (256, 256)"
                    ),
                )
            })
    }

    /// Every tile configuration: one per supported head-dim pair and PTX arch.
    pub fn all() -> &'static [TileConfig] {
        &TILES
    }

    /// Checks that the shape is one the kernels are built with (one of
    /// [`TileConfig::all`]). The fields are public, so a hand-made shape can be anything;
    /// the methods below never panic on one, but only a shape from the table describes a
    /// real launch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (arg `tiles`) when the shape is not in the table.
    pub fn validate(&self) -> Result<()> {
        if TILES.contains(self) {
            Ok(())
        } else {
            Err(Error::invalid(
                "attention",
                "tiles",
                format!("{self:?} is not one of the compiled tile shapes (TileConfig::all())"),
            ))
        }
    }

    /// Threads per CTA (saturating for a hand-made shape with absurd `warps`).
    pub fn threads(&self) -> usize {
        self.warps.saturating_mul(32)
    }

    /// Query rows owned by each warp (a multiple of 16, the MMA's M); 0 for a hand-made
    /// shape with no warps.
    pub fn rows_per_warp(&self) -> usize {
        self.block_m.checked_div(self.warps).unwrap_or(0)
    }

    /// Dynamic shared memory of one CTA: the Q tile, one K tile and one V tile, rows padded
    /// per [`smem_row_elems`]. The output tile is staged in the Q tile's space. Saturates
    /// at `usize::MAX` for hand-made shapes too large to address.
    pub fn smem_bytes(&self) -> usize {
        let q = self.block_m.saturating_mul(smem_row_elems(self.head_dim));
        let k = self.block_n.saturating_mul(smem_row_elems(self.head_dim));
        let v = self.block_n.saturating_mul(smem_row_elems(self.head_dim_v));
        q.saturating_add(k)
            .saturating_add(v)
            .saturating_mul(ELEM_BYTES)
    }

    /// Query tiles needed to cover the longest query sequence (0 for a hand-made shape with
    /// `block_m` 0, which covers nothing).
    pub fn num_m_blocks(&self, max_seqlen_q: usize) -> usize {
        if self.block_m == 0 {
            return 0;
        }
        max_seqlen_q.div_ceil(self.block_m)
    }

    /// CTAs of one launch: (m blocks, heads_q, batch), the kernel's grid. CTAs whose query
    /// tile starts past their sequence's end return at once.
    pub fn grid(&self, max_seqlen_q: usize, heads_q: usize, batch: usize) -> (usize, usize, usize) {
        (self.num_m_blocks(max_seqlen_q), heads_q, batch)
    }

    /// Rows `[m0, m1)` of query tile `m_block` that exist in a sequence of `seqlen_q` rows,
    /// or `None` past the end (and for a hand-made shape with `block_m` 0).
    pub fn m_rows(&self, m_block: usize, seqlen_q: usize) -> Option<Range<usize>> {
        if self.block_m == 0 {
            return None;
        }
        let m0 = m_block.checked_mul(self.block_m)?;
        (m0 < seqlen_q).then(|| m0..m0.saturating_add(self.block_m).min(seqlen_q))
    }

    /// Key tiles `[n_min, n_max)` that query tile `m_block` visits: the tiles holding at
    /// least one key that some existing row of the tile sees. `None` when the tile is past
    /// the sequence's end or no row of it sees any key (its rows get O = 0, LSE = -inf).
    pub fn key_blocks(
        &self,
        mask: &Mask,
        m_block: usize,
        seqlen_q: usize,
        seqlen_k: usize,
    ) -> Option<Range<usize>> {
        if self.block_n == 0 {
            return None;
        }
        let rows = self.m_rows(m_block, seqlen_q)?;
        let keys = mask.visible_union(rows, seqlen_q, seqlen_k)?;
        // keys is nonempty, and (keys.end - 1) / block_n + 1 <= keys.end.
        Some(keys.start / self.block_n..(keys.end - 1) / self.block_n + 1)
    }

    /// Whether key tile `n_block` needs element-wise masking for query tile `m_block`: it is
    /// partial (passes seqlen_k), or some existing row of the tile does not see all of its
    /// keys. Tiles for which this is false are processed with no mask at all. A hand-made
    /// shape with `block_n` 0 has empty key tiles, which this reports as needing a mask.
    pub fn needs_mask(
        &self,
        mask: &Mask,
        m_block: usize,
        n_block: usize,
        seqlen_q: usize,
        seqlen_k: usize,
    ) -> bool {
        let Some(rows) = self.m_rows(m_block, seqlen_q) else {
            return true;
        };
        if self.block_n == 0 {
            return true;
        }
        // A tile that starts past usize::MAX starts past every sequence: it is partial.
        let Some(k0) = n_block.checked_mul(self.block_n) else {
            return true;
        };
        // i128 holds sums and differences of a few usizes exactly.
        let k0 = wide(k0);
        let k_last = k0 + wide(self.block_n) - 1;
        if k_last >= wide(seqlen_k) {
            return true;
        }
        let (left, right) = mask.exact_sides();
        let c = wide(seqlen_k) - wide(seqlen_q);
        // The last row has the largest lower bound, the first row the smallest upper bound.
        let lo_of_last = wide(rows.end - 1) + c - left;
        let hi_of_first = wide(rows.start) + c + right;
        !(lo_of_last <= k0 && hi_of_first >= k_last)
    }

    /// [`TileConfig::needs_mask`] in the interval form the kernel uses: key tiles
    /// `n` in the returned range need no mask, all others do. With
    /// `A = m1 - 1 + c - left` and `U = min(seqlen_k - block_n, m0 + c + right - block_n + 1)`,
    /// tile `n` is unmasked iff `A <= n * block_n <= U`. Empty past the sequence's end (and
    /// for a hand-made shape with `block_n` 0).
    pub fn unmasked_blocks(
        &self,
        mask: &Mask,
        m_block: usize,
        seqlen_q: usize,
        seqlen_k: usize,
    ) -> Range<usize> {
        let Some(rows) = self.m_rows(m_block, seqlen_q) else {
            return 0..0;
        };
        if self.block_n == 0 {
            return 0..0;
        }
        let (left, right) = mask.exact_sides();
        let bn = wide(self.block_n);
        let c = wide(seqlen_k) - wide(seqlen_q);
        let a = wide(rows.end - 1) + c - left;
        let u = (wide(seqlen_k) - bn).min(wide(rows.start) + c + right - bn + 1);
        let lo = if a <= 0 { 0 } else { (a + bn - 1) / bn };
        let hi = if u < 0 { 0 } else { u / bn + 1 };
        narrow(lo)..narrow(hi.max(lo))
    }
}

/// Which keys each query row sees: causal (bottom-right aligned) and a sliding window
/// `(left, right)`, combinable. `None` sides are unbounded. Causal sets the right side to 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask {
    /// Row i sees no key past i + seqlen_k - seqlen_q.
    pub causal: bool,
    /// Keys before the diagonal a row sees (None: all).
    pub window_left: Option<usize>,
    /// Keys after the diagonal a row sees (None: all; ignored when causal).
    pub window_right: Option<usize>,
}

impl Mask {
    /// No mask: every row sees every key of its sequence.
    pub fn none() -> Mask {
        Mask::default()
    }

    /// Causal, bottom-right aligned.
    pub fn causal() -> Mask {
        Mask {
            causal: true,
            ..Mask::default()
        }
    }

    /// Sliding window of `left` keys before and `right` after the diagonal (each inclusive
    /// of the diagonal itself, so `(0, 0)` sees exactly one key).
    pub fn window(left: usize, right: usize) -> Mask {
        Mask {
            causal: false,
            window_left: Some(left),
            window_right: Some(right),
        }
    }

    /// FlashAttention's convention: `window_left`/`window_right` as i64 with -1 unbounded.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a side below -1.
    pub fn from_flash(causal: bool, window_left: i64, window_right: i64) -> Result<Mask> {
        let side = |v: i64, arg: &'static str| -> Result<Option<usize>> {
            match v {
                -1 => Ok(None),
                v if v >= 0 => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
                v => Err(Error::invalid(
                    "attention",
                    arg,
                    format!("window side {v} must be >= 0, or -1 for unbounded"),
                )),
            }
        };
        Ok(Mask {
            causal,
            window_left: side(window_left, "window_left")?,
            window_right: side(window_right, "window_right")?,
        })
    }

    /// Effective (left, right), each in `0..=WINDOW_UNBOUNDED`: what the kernel receives.
    pub fn bounds(&self) -> (i64, i64) {
        let clamp =
            |s: Option<usize>| s.map_or(WINDOW_UNBOUNDED, |v| v.min(WINDOW_UNBOUNDED)) as i64;
        let left = clamp(self.window_left);
        let right = if self.causal {
            0
        } else {
            clamp(self.window_right)
        };
        (left, right)
    }

    /// Whether the mask removes nothing (every row sees all of its keys).
    pub fn is_none(&self) -> bool {
        self.bounds() == (WINDOW_UNBOUNDED as i64, WINDOW_UNBOUNDED as i64)
    }

    /// (left, right) as exact integers for the host-side formulas: a `None` side is larger
    /// than any distance between two usize positions. Equal in effect to [`Mask::bounds`]
    /// for sequences of up to [`MAX_TOKENS`] (the kernel's range), and correct beyond it.
    fn exact_sides(&self) -> (i128, i128) {
        let side = |s: Option<usize>| s.map_or(UNBOUNDED_SIDE, wide);
        let left = side(self.window_left);
        let right = if self.causal {
            0
        } else {
            side(self.window_right)
        };
        (left, right)
    }

    /// Keys row `row` sees, as a range (empty when it sees none). Any arguments are
    /// accepted (a row past `seqlen_q` sees what the formula gives it).
    pub fn visible_keys(&self, row: usize, seqlen_q: usize, seqlen_k: usize) -> Range<usize> {
        let (left, right) = self.exact_sides();
        let c = wide(seqlen_k) - wide(seqlen_q);
        let lo = (wide(row) + c - left).max(0);
        let hi = (wide(row) + c + right).min(wide(seqlen_k) - 1);
        if hi < lo {
            0..0
        } else {
            // 0 <= lo <= hi < seqlen_k, so both ends fit in usize.
            narrow(lo)..narrow(hi + 1)
        }
    }

    /// Whether row `row` sees key `key`.
    pub fn sees(&self, row: usize, key: usize, seqlen_q: usize, seqlen_k: usize) -> bool {
        self.visible_keys(row, seqlen_q, seqlen_k).contains(&key)
    }

    /// The union of the visible key ranges of `rows`, `None` when empty. Windows have
    /// nonnegative sides, so each row's range has length `left + right + 1` before clipping
    /// and consecutive rows' ranges overlap: the union is one interval from the first row's
    /// lower bound to the last row's upper bound, clipped to the sequence.
    pub fn visible_union(
        &self,
        rows: Range<usize>,
        seqlen_q: usize,
        seqlen_k: usize,
    ) -> Option<Range<usize>> {
        if rows.is_empty() || seqlen_k == 0 {
            return None;
        }
        let (left, right) = self.exact_sides();
        let c = wide(seqlen_k) - wide(seqlen_q);
        let lo = (wide(rows.start) + c - left).max(0);
        let hi = (wide(rows.end - 1) + c + right).min(wide(seqlen_k) - 1);
        (lo <= hi).then(|| narrow(lo)..narrow(hi + 1))
    }

    /// Number of (row, key) pairs the mask keeps in a `seqlen_q` x `seqlen_k` sequence,
    /// saturating at `u64::MAX`. Computed in closed form: constant time for any lengths.
    pub fn visible_pairs(&self, seqlen_q: usize, seqlen_k: usize) -> u64 {
        if seqlen_q == 0 || seqlen_k == 0 {
            return 0;
        }
        // Pair (i, j) is kept iff c - left <= j - i <= c + right. Count by the diagonal
        // d = j - i: cnt(d) = min(seqlen_q, seqlen_k - d) - max(0, -d) pairs lie on it for
        // d in [-(seqlen_q - 1), seqlen_k - 1], and cnt is linear between the breakpoints
        // d = 0 and d = seqlen_k - seqlen_q.
        let (sq, sk) = (wide(seqlen_q), wide(seqlen_k));
        let (left, right) = self.exact_sides();
        let c = sk - sq;
        let lo = (c - left).max(1 - sq);
        let hi = (c + right).min(sk - 1);
        if lo > hi {
            return 0;
        }
        let cnt = |d: i128| sq.min(sk - d) - (-d).max(0);
        // Sum of cnt over [a, b], on which cnt is linear with slope -1, 0 or 1. Each term is
        // at least 1, and the whole sum is at most seqlen_q x seqlen_k < 2^128, so halving
        // the even factor first keeps the product inside u128.
        let segment = |a: i128, b: i128| -> u128 {
            if a > b {
                return 0;
            }
            let n = (b - a + 1).unsigned_abs();
            let ends = (cnt(a) + cnt(b)).unsigned_abs();
            if n % 2 == 0 {
                (n / 2) * ends
            } else {
                n * (ends / 2)
            }
        };
        let (p1, p2) = if c < 0 { (c, 0) } else { (0, c) };
        let p1 = p1.clamp(lo, hi + 1);
        let p2 = p2.clamp(p1, hi + 1);
        let total = segment(lo, p1 - 1)
            .saturating_add(segment(p1, p2 - 1))
            .saturating_add(segment(p2, hi));
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

/// A `None` window side in [`Mask::exact_sides`]: more than any two usize positions apart.
const UNBOUNDED_SIDE: i128 = 1 << 70;

/// A usize as i128 (lossless).
fn wide(x: usize) -> i128 {
    x as i128
}

/// An i128 known to lie in `0..=usize::MAX` as usize; out-of-range values saturate.
fn narrow(x: i128) -> usize {
    usize::try_from(x.max(0)).unwrap_or(usize::MAX)
}

/// FLOPs of a forward run, counted as FlashAttention 3's benchmarks do:
/// `2 * heads_q * sum over rows of visible keys * (head_dim + head_dim_v)`, exact for every
/// mask. `seqlens` lists (seqlen_q, seqlen_k) per sequence. Constant time per sequence
/// (see [`Mask::visible_pairs`]); the pair count saturates at `u64::MAX` and the product
/// is formed in f64, so no argument overflows.
pub fn forward_flops(
    mask: &Mask,
    seqlens: &[(usize, usize)],
    heads_q: usize,
    head_dim: usize,
    head_dim_v: usize,
) -> f64 {
    let pairs: u64 = seqlens
        .iter()
        .map(|&(sq, sk)| mask.visible_pairs(sq, sk))
        .fold(0, u64::saturating_add);
    2.0 * heads_q as f64 * pairs as f64 * (head_dim as f64 + head_dim_v as f64)
}

/// Softmax constants folded on the host. Scores go to the log2 domain as
/// `t = transform(s) * exp_scale`, where `s` is the raw dot product q . k and
/// * without softcap: `transform(s) = s`, `exp_scale = scale * log2(e)`;
/// * with softcap `cap`: `transform(s) = tanh(s * softcap_in)` with `softcap_in = scale / cap`,
///   and `exp_scale = cap * log2(e)`, i.e. `cap * tanh(scale * s / cap)` in natural units.
///
/// The LSE (natural log) is `(max(t_raw) * exp_scale + log2(sum)) * ln(2)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftmaxConsts {
    /// Multiplies a transformed score to reach the log2 domain.
    pub exp_scale: f32,
    /// `scale / cap` with softcap, 0 without.
    pub softcap_in: f32,
}

impl SoftmaxConsts {
    /// Folds `scale` and the optional softcap.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `scale` is not finite and positive, `softcap` is not
    /// finite and positive, or a folded constant is not a normal f32.
    pub fn new(scale: f32, softcap: Option<f32>) -> Result<SoftmaxConsts> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid(
                "attention",
                "softmax_scale",
                format!("{scale} must be finite and > 0"),
            ));
        }
        let log2e = std::f64::consts::LOG2_E;
        let (exp_scale, softcap_in) = match softcap {
            None => ((f64::from(scale) * log2e) as f32, 0.0f32),
            Some(cap) => {
                if !(cap.is_finite() && cap > 0.0) {
                    return Err(Error::invalid(
                        "attention",
                        "softcap",
                        format!("{cap} must be finite and > 0"),
                    ));
                }
                (
                    (f64::from(cap) * log2e) as f32,
                    (f64::from(scale) / f64::from(cap)) as f32,
                )
            }
        };
        if !exp_scale.is_normal() || (softcap.is_some() && !softcap_in.is_normal()) {
            return Err(Error::invalid(
                "attention",
                "softmax_scale",
                format!("scale {scale} with softcap {softcap:?} folds to a non-normal f32 ({exp_scale}, {softcap_in})"),
            ));
        }
        Ok(SoftmaxConsts {
            exp_scale,
            softcap_in,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_pair_has_tiles_that_fit() {
        for (&(d, dv), arch) in SUPPORTED_HEAD_DIMS.iter().flat_map(|p| [(p, 80), (p, 90)]) {
            let t = TileConfig::for_code(d, dv, arch).unwrap();
            assert_eq!(TileConfig::for_code(d, dv, arch + 9).unwrap(), t);
            assert_eq!((t.block_m, t.warps), {
                let p = TileConfig::for_head_dims(d, dv).unwrap();
                (p.block_m, p.warps)
            });
            assert_eq!(t.rows_per_warp() % 16, 0);
            assert_eq!(t.block_n % 16, 0);
            assert!(
                t.smem_bytes() <= 99 * 1024,
                "{t:?} needs {} bytes",
                t.smem_bytes()
            );
            assert_eq!(t.block_n % 16, 0);
        }
        assert!(TileConfig::for_head_dims(80, 80).is_err());
    }

    #[test]
    fn key_blocks_cover_exactly_the_visible_keys() {
        for t in [
            TileConfig::for_code(128, 128, 80).unwrap(),
            TileConfig::for_code(128, 128, 90).unwrap(),
        ] {
            key_blocks_cover_exactly_the_visible_keys_for(t);
        }
    }

    fn key_blocks_cover_exactly_the_visible_keys_for(t: TileConfig) {
        let masks = [
            Mask::none(),
            Mask::causal(),
            Mask::window(100, 0),
            Mask::window(5, 7),
            Mask {
                causal: true,
                window_left: Some(200),
                window_right: None,
            },
        ];
        for mask in masks {
            for &(sq, sk) in &[
                (1, 1),
                (127, 300),
                (300, 127),
                (513, 513),
                (64, 1000),
                (1000, 64),
            ] {
                for mb in 0..t.num_m_blocks(sq) {
                    let rows = t.m_rows(mb, sq).unwrap();
                    let mut want: Vec<usize> = rows
                        .clone()
                        .flat_map(|i| mask.visible_keys(i, sq, sk))
                        .map(|j| j / t.block_n)
                        .collect();
                    want.sort_unstable();
                    want.dedup();
                    let got: Vec<usize> = t
                        .key_blocks(&mask, mb, sq, sk)
                        .map(|r| r.collect())
                        .unwrap_or_default();
                    assert_eq!(got, want, "{mask:?} sq {sq} sk {sk} m_block {mb}");
                    for n in got {
                        let all = rows.clone().all(|i| {
                            (n * t.block_n..(n + 1) * t.block_n).all(|j| mask.sees(i, j, sq, sk))
                        });
                        assert_eq!(
                            t.needs_mask(&mask, mb, n, sq, sk),
                            !t.unmasked_blocks(&mask, mb, sq, sk).contains(&n),
                            "interval form disagrees: {mask:?} sq {sq} sk {sk} m {mb} n {n}"
                        );
                        if !t.needs_mask(&mask, mb, n, sq, sk) {
                            assert!(all, "{mask:?} sq {sq} sk {sk} m {mb} n {n}: skipped mask on a masked tile");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn causal_bottom_right() {
        let m = Mask::causal();
        assert_eq!(m.visible_keys(0, 2, 5), 0..4);
        assert_eq!(m.visible_keys(1, 2, 5), 0..5);
        assert_eq!(m.visible_keys(0, 5, 2), 0..0);
        assert_eq!(m.visible_keys(3, 5, 2), 0..1);
        assert_eq!(Mask::window(1, 1).visible_keys(3, 8, 8), 2..5);
    }

    #[test]
    fn flops_of_square_causal_is_half_plus_diagonal() {
        let f = forward_flops(&Mask::causal(), &[(4, 4)], 1, 1, 1);
        assert_eq!(f, 2.0 * 10.0 * 2.0);
    }
}
