//! Tiled attention forward: FlashAttention-2's algorithm on tensor cores, O(N) memory.
//!
//! `O = softmax(scale * Q K^T, masked) V` and the row LSE, for variable-length batches,
//! without ever holding a seqlen_q x seqlen_k matrix.
//!
//! * [`plan`](TileConfig): tile shapes per head dim, block-skip rules of the masks, FLOPs,
//!   softmax constants (pure Rust, shared by the GPU path and the CPU references).
//! * [`reference`](mod@reference): naive f64 attention and a CPU tiled f32 implementation that mirrors the
//!   kernel's tiling and masking.
//! * [`attention_forward`]: the CUDA kernel, with [`SeqLens`] for the batch layout.
//!
//! Conventions (FlashAttention >= 2.1): Q `[total_q, heads_q, d]`, K `[total_k, heads_kv, d]`,
//! V `[total_k, heads_kv, d_v]`, O `[total_q, heads_q, d_v]`, each a [`HeadsLayout`] view
//! (any token and head strides, last dim contiguous); LSE f32 `[heads_q, total_q]`, natural
//! log. Query head h reads KV head `h / (heads_q / heads_kv)` (GQA, MQA). Causal masks with
//! seqlen_q != seqlen_k align bottom-right; windows are `(left, right)` around that
//! diagonal; softcap maps a score s to `cap * tanh(s / cap)` before masking. Rows that see no
//! key get O = 0 and LSE = -inf (the log of an empty sum: such a row merges with other
//! partial states as "nothing", and the backward turns -inf into +inf as it loads the LSE so
//! that exp(s - LSE) = 0 and the row's gradients are 0; FlashAttention instead writes +inf
//! in its final LSE and -inf in split partials). Results are deterministic: every output element is
//! computed by one CTA in a fixed order.
//!
//! [`HeadsLayout`]: crate::layout::HeadsLayout

mod backward;
pub(crate) mod cuda;
mod plan;
pub mod reference;

pub use crate::layout::RawTensor;
pub use backward::{
    attention_backward, attention_backward_raw, backward_workspace_len, AttnGrads, BackwardInputs,
    BackwardOptions, BackwardShape, BackwardTiles, RawBackward, BACKWARD_TILES,
};
#[cfg(feature = "emulator")]
pub(crate) use backward::{plan_backward, BwdAddrs, BwdLayouts};
pub use cuda::{
    attention_forward, attention_forward_raw, device_tile_config, AttnElement, AttnOutput, Qkv,
    SeqLens,
};
pub use plan::*;

/// Per-call options of attention forward.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOptions {
    /// Multiplies Q K^T before softcap and softmax; `None` is `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Which keys each query row sees.
    pub mask: Mask,
    /// Logit softcap (Gemma-2 uses 50, Grok 30); `None` is off.
    pub softcap: Option<f32>,
}

impl AttentionOptions {
    /// The scale this call uses for a given head dim.
    pub fn scale_for(&self, head_dim: usize) -> f32 {
        self.softmax_scale
            .unwrap_or_else(|| (1.0 / (head_dim as f64).sqrt()) as f32)
    }
}

use crate::error::{Error, Result};
use crate::layout::HeadsLayout;

const OP: &str = "attention";

/// Most sequences, and most query heads, of one call (the grid's z and y dimensions).
pub const MAX_GRID_YZ: usize = 65_535;

/// Validates `cu_seqlens_q` and `cu_seqlens_k` and returns the longest query and key
/// sequence.
///
/// # Errors
/// [`Error::InvalidArgument`] when a list has fewer than 2 entries, the two lists differ in
/// length, one does not start at 0, decreases somewhere, ends past [`MAX_TOKENS`], or the
/// batch exceeds [`MAX_GRID_YZ`] sequences.
pub fn validate_cu_seqlens(cu_seqlens_q: &[i32], cu_seqlens_k: &[i32]) -> Result<(usize, usize)> {
    let max_q = check_offsets(cu_seqlens_q, "cu_seqlens_q")?;
    let max_k = check_offsets(cu_seqlens_k, "cu_seqlens_k")?;
    if cu_seqlens_q.len() != cu_seqlens_k.len() {
        return Err(Error::invalid(
            OP,
            "cu_seqlens_k",
            format!(
                "{} entries but cu_seqlens_q has {}: both must be batch + 1",
                cu_seqlens_k.len(),
                cu_seqlens_q.len()
            ),
        ));
    }
    Ok((max_q, max_k))
}

/// Checks one offsets list; returns the longest sequence.
fn check_offsets(cu: &[i32], arg: &'static str) -> Result<usize> {
    if cu.len() < 2 {
        return Err(Error::invalid(
            OP,
            arg,
            format!("{} entries; need batch + 1 >= 2", cu.len()),
        ));
    }
    if cu.len() - 1 > MAX_GRID_YZ {
        return Err(Error::invalid(
            OP,
            arg,
            format!("batch {} exceeds {MAX_GRID_YZ} sequences", cu.len() - 1),
        ));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(
            OP,
            arg,
            format!("starts at {}, not 0", cu[0]),
        ));
    }
    let mut longest = 0usize;
    for (b, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::invalid(
                OP,
                arg,
                format!("not monotone: entry {} is {} after {}", b + 1, w[1], w[0]),
            ));
        }
        longest = longest.max((w[1] - w[0]) as usize);
    }
    let total = cu[cu.len() - 1] as usize;
    if total > MAX_TOKENS {
        return Err(Error::invalid(
            OP,
            arg,
            format!("{total} tokens exceed the kernel's limit {MAX_TOKENS}"),
        ));
    }
    Ok(longest)
}

/// A view and the length of the buffer it views, for [`CallShape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewShape {
    /// The view.
    pub layout: HeadsLayout,
    /// Elements in its buffer.
    pub buffer_len: usize,
}

/// The shapes of one attention forward call, checkable without a device (the GPU path runs
/// exactly this validation before anything device-specific).
#[derive(Debug, Clone, Copy)]
pub struct CallShape<'a> {
    /// Q: `[total_q, heads_q, head_dim]`.
    pub q: ViewShape,
    /// K: `[total_k, heads_kv, head_dim]`.
    pub k: ViewShape,
    /// V: `[total_k, heads_kv, head_dim_v]`.
    pub v: ViewShape,
    /// O: `[total_q, heads_q, head_dim_v]`.
    pub o: ViewShape,
    /// Floats in the LSE buffer, if one is given.
    pub lse_len: Option<usize>,
    /// Query offsets, batch + 1.
    pub cu_seqlens_q: &'a [i32],
    /// Key offsets, batch + 1.
    pub cu_seqlens_k: &'a [i32],
}

/// What [`CallShape::validate`] established.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Validated {
    /// The kernel's tile shape.
    pub tiles: TileConfig,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Sequences.
    pub batch: usize,
    /// Query tokens.
    pub total_q: usize,
    /// Key tokens.
    pub total_k: usize,
    /// Longest query sequence (the launch is sized for it).
    pub max_seqlen_q: usize,
    /// Longest key sequence.
    pub max_seqlen_k: usize,
    /// Folded softmax constants.
    pub consts: SoftmaxConsts,
    /// Effective (left, right) window, clamped to [`WINDOW_UNBOUNDED`].
    pub window: (i64, i64),
}

impl CallShape<'_> {
    /// Checks everything about a call that does not need the device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when: the offsets are invalid (see
    /// [`validate_cu_seqlens`]); a view leaves its buffer or its rows overlap; token counts
    /// differ from the offsets' totals; Q and O or K and V disagree on heads; heads_q is not
    /// a multiple of heads_kv or exceeds [`MAX_GRID_YZ`]; Q and K differ in head_dim, or V
    /// and O; the head dims are not in [`SUPPORTED_HEAD_DIMS`]; the LSE buffer holds fewer
    /// than heads_q x total_q floats; a stride does not fit i64; the scale or softcap is not
    /// finite and positive.
    pub fn validate(&self, opts: &AttentionOptions) -> Result<Validated> {
        let (max_seqlen_q, max_seqlen_k) =
            validate_cu_seqlens(self.cu_seqlens_q, self.cu_seqlens_k)?;
        let total_q = self.cu_seqlens_q[self.cu_seqlens_q.len() - 1] as usize;
        let total_k = self.cu_seqlens_k[self.cu_seqlens_k.len() - 1] as usize;
        let (q, k, v, o) = (
            &self.q.layout,
            &self.k.layout,
            &self.v.layout,
            &self.o.layout,
        );
        q.validate(OP, "q", self.q.buffer_len)?;
        k.validate(OP, "k", self.k.buffer_len)?;
        v.validate(OP, "v", self.v.buffer_len)?;
        o.validate(OP, "o", self.o.buffer_len)?;
        for (l, arg, want, list) in [
            (q, "q", total_q, "cu_seqlens_q"),
            (o, "o", total_q, "cu_seqlens_q"),
            (k, "k", total_k, "cu_seqlens_k"),
            (v, "v", total_k, "cu_seqlens_k"),
        ] {
            if l.tokens != want {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!("{} tokens but {list} ends at {want}", l.tokens),
                ));
            }
        }
        if v.heads != k.heads {
            return Err(Error::invalid(
                OP,
                "v",
                format!("{} heads but k has {}", v.heads, k.heads),
            ));
        }
        if o.heads != q.heads {
            return Err(Error::invalid(
                OP,
                "o",
                format!("{} heads but q has {}", o.heads, q.heads),
            ));
        }
        let (heads_q, heads_kv) = (q.heads, k.heads);
        if heads_kv == 0 || heads_q % heads_kv != 0 {
            return Err(Error::invalid(
                OP,
                "heads",
                format!(
                    "heads_q {heads_q} is not a multiple of heads_kv {heads_kv} (GQA needs heads_q = g x heads_kv, g >= 1)"
                ),
            ));
        }
        if heads_q > MAX_GRID_YZ {
            return Err(Error::invalid(
                OP,
                "q",
                format!("{heads_q} heads exceed {MAX_GRID_YZ}"),
            ));
        }
        if k.head_dim != q.head_dim {
            return Err(Error::invalid(
                OP,
                "k",
                format!("head_dim {} but q has {}", k.head_dim, q.head_dim),
            ));
        }
        if o.head_dim != v.head_dim {
            return Err(Error::invalid(
                OP,
                "o",
                format!("head_dim {} but v has {}", o.head_dim, v.head_dim),
            ));
        }
        let tiles = TileConfig::for_head_dims(q.head_dim, v.head_dim)?;
        if let Some(len) = self.lse_len {
            let need = heads_q
                .checked_mul(total_q)
                .ok_or_else(|| Error::overflow(OP, "lse", "heads_q x total_q overflows"))?;
            if len < need {
                return Err(Error::invalid(
                    OP,
                    "lse",
                    format!("holds {len} floats, needs heads_q x total_q = {need}"),
                ));
            }
        }
        for (l, arg) in [(q, "q"), (k, "k"), (v, "v"), (o, "o")] {
            if i64::try_from(l.token_stride).is_err() || i64::try_from(l.head_stride).is_err() {
                return Err(Error::overflow(OP, arg, "a stride does not fit in i64"));
            }
        }
        let consts = SoftmaxConsts::new(opts.scale_for(q.head_dim), opts.softcap)?;
        Ok(Validated {
            tiles,
            heads_q,
            heads_kv,
            batch: self.cu_seqlens_q.len() - 1,
            total_q,
            total_k,
            max_seqlen_q,
            max_seqlen_k,
            consts,
            window: opts.mask.bounds(),
        })
    }
}

/// Checks that every row a view addresses starts on 16 bytes (the kernel moves 16-byte
/// chunks), given the device address `base` of its buffer and the element size: the
/// view's first element, and each stride the view actually steps by.
///
/// # Errors
/// [`Error::InvalidArgument`] naming what is misaligned.
pub fn check_alignment(
    l: &HeadsLayout,
    base: u64,
    elem_size: usize,
    arg: &'static str,
) -> Result<()> {
    if l.tokens == 0 || l.heads == 0 || elem_size == 0 || 16 % elem_size != 0 {
        return Ok(());
    }
    let per16 = 16 / elem_size;
    let start = (l.offset as u64)
        .checked_mul(elem_size as u64)
        .and_then(|b| b.checked_add(base))
        .ok_or_else(|| Error::overflow(OP, arg, "offset overflows the address space"))?;
    let mut problems = Vec::new();
    if start % 16 != 0 {
        problems.push(format!("first element at byte address {start:#x}"));
    }
    if l.tokens > 1 && l.token_stride % per16 != 0 {
        problems.push(format!("token_stride {}", l.token_stride));
    }
    if l.heads > 1 && l.head_stride % per16 != 0 {
        problems.push(format!("head_stride {}", l.head_stride));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::misaligned(
            OP,
            arg,
            format!(
                "not 16-byte aligned ({}): offset and strides must be multiples of {per16} elements on a 16-byte aligned buffer",
                problems.join(", ")
            ),
        ))
    }
}
