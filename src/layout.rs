//! Strided [tokens, heads, head_dim] views into flat buffers, and the checks every op runs on
//! them before a launch.

use crate::error::{Error, Result};

/// The largest offset an empty view may have: no allocation holds more than `isize::MAX`
/// bytes and no element is wider than 16 bytes, so a larger offset lies outside any buffer,
/// and its byte offset could overflow the address arithmetic of a launch.
const MAX_EMPTY_OFFSET: usize = isize::MAX as usize / 16;

/// A [tokens, heads, head_dim] view into a flat buffer: element (t, h, c) lives at
/// `offset + t * token_stride + h * head_stride + c`. The last dim is contiguous.
///
/// Q and K views into one packed QKV projection output are two layouts over one buffer with
/// the same `token_stride` (for example `(heads_q + 2 * heads_kv) * head_dim`) and different
/// offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadsLayout {
    /// Element offset of (0, 0, 0).
    pub offset: usize,
    /// Number of tokens.
    pub tokens: usize,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Elements between consecutive tokens.
    pub token_stride: usize,
    /// Elements between consecutive heads.
    pub head_stride: usize,
}

impl HeadsLayout {
    /// A dense [tokens, heads, head_dim] tensor at the start of its buffer.
    ///
    /// Never fails: when `heads x head_dim` overflows usize the token stride saturates at
    /// `usize::MAX`, and every op rejects the view (it addresses past usize).
    pub fn contiguous(tokens: usize, heads: usize, head_dim: usize) -> Self {
        HeadsLayout {
            offset: 0,
            tokens,
            heads,
            head_dim,
            token_stride: heads.saturating_mul(head_dim),
            head_stride: head_dim,
        }
    }

    /// Whether the view addresses no element (no token, no head or no channel).
    pub fn is_empty(&self) -> bool {
        self.tokens == 0 || self.heads == 0 || self.head_dim == 0
    }

    /// Number of addressed elements (tokens x heads x head_dim), if it fits in usize.
    pub fn numel(&self) -> Option<usize> {
        self.tokens
            .checked_mul(self.heads)?
            .checked_mul(self.head_dim)
    }

    /// One past the largest element offset the view touches (`offset` when it is empty).
    pub(crate) fn end(&self, op: &'static str, arg: &'static str) -> Result<usize> {
        if self.tokens == 0 || self.heads == 0 || self.head_dim == 0 {
            return Ok(self.offset);
        }
        let overflow = || Error::overflow(op, arg, format!("{self:?} addresses past usize"));
        let last = (self.tokens - 1)
            .checked_mul(self.token_stride)
            .and_then(|a| {
                (self.heads - 1)
                    .checked_mul(self.head_stride)
                    .and_then(|b| a.checked_add(b))
            })
            .and_then(|a| a.checked_add(self.head_dim))
            .and_then(|a| a.checked_add(self.offset))
            .ok_or_else(overflow)?;
        Ok(last)
    }

    /// Checks that the view lies inside a buffer of `len` elements and that no two of its
    /// (token, head) rows overlap. An empty view addresses nothing and may start past its
    /// buffer (an empty slice of a packed tensor), but not past [`MAX_EMPTY_OFFSET`], so
    /// that byte-address arithmetic on its offset cannot overflow.
    pub(crate) fn validate(&self, op: &'static str, arg: &'static str, len: usize) -> Result<()> {
        let end = self.end(op, arg)?;
        if self.is_empty() {
            // Its strides are irrelevant.
            if self.offset > MAX_EMPTY_OFFSET {
                return Err(Error::invalid(
                    op,
                    arg,
                    format!(
                        "empty view {self:?} starts at element {}, past any allocation (at most \
                         {MAX_EMPTY_OFFSET})",
                        self.offset
                    ),
                ));
            }
            return Ok(());
        }
        if end > len {
            return Err(Error::invalid(
                op,
                arg,
                format!("view {self:?} reaches element {end} but the buffer holds {len}"),
            ));
        }
        if self.tokens > 1 && self.heads > 1 {
            // Rows form a 2-D grid; the smaller stride must clear a row, the larger one a
            // whole run of the smaller.
            let (small, n_small, large) = if self.head_stride <= self.token_stride {
                (self.head_stride, self.heads, self.token_stride)
            } else {
                (self.token_stride, self.tokens, self.head_stride)
            };
            let span = (n_small - 1)
                .saturating_mul(small)
                .saturating_add(self.head_dim);
            if small < self.head_dim || large < span {
                return Err(Error::invalid(
                    op,
                    arg,
                    format!("strides of {self:?} make rows overlap (token_stride and head_stride must separate every head_dim-wide row)"),
                ));
            }
        } else if self.tokens > 1 && self.token_stride < self.head_dim {
            return Err(Error::invalid(
                op,
                arg,
                format!(
                    "token_stride {} < head_dim {}",
                    self.token_stride, self.head_dim
                ),
            ));
        } else if self.heads > 1 && self.head_stride < self.head_dim {
            return Err(Error::invalid(
                op,
                arg,
                format!(
                    "head_stride {} < head_dim {}",
                    self.head_stride, self.head_dim
                ),
            ));
        }
        Ok(())
    }

    /// Whether two views of one buffer may share an element. Conservative: it answers
    /// `false` only when disjointness is proven, either because the address ranges do not
    /// intersect, or because both views repeat with one token stride and their per-token
    /// footprints occupy disjoint residues modulo it.
    pub(crate) fn may_overlap(&self, other: &HeadsLayout, op: &'static str) -> Result<bool> {
        let (a0, a1) = (self.offset, self.end(op, "q")?);
        let (b0, b1) = (other.offset, other.end(op, "k")?);
        if a0 == a1 || b0 == b1 || a1 <= b0 || b1 <= a0 {
            return Ok(false);
        }
        if self.token_stride != other.token_stride || self.token_stride == 0 {
            return Ok(true);
        }
        let ts = self.token_stride;
        // Both views are nonempty here (their ranges intersect), so heads >= 1; the
        // footprints are at most `end`, which did not overflow, but stay checked anyway.
        let foot = |l: &HeadsLayout| {
            l.heads
                .saturating_sub(1)
                .checked_mul(l.head_stride)
                .and_then(|x| x.checked_add(l.head_dim))
        };
        let (Some(fa), Some(fb)) = (foot(self), foot(other)) else {
            return Ok(true);
        };
        if fa > ts || fb > ts {
            return Ok(true);
        }
        // Residue intervals [ra, ra + fa) and [rb, rb + fb) on a circle of length ts.
        let ra = self.offset % ts;
        let rb = other.offset % ts;
        // Start of b relative to a, in [0, ts), without forming rb + ts.
        let d = if rb >= ra { rb - ra } else { ts - (ra - rb) };
        let disjoint = d >= fa && fb <= ts - d;
        Ok(!disjoint)
    }
}

/// A flat device buffer given by its raw address, for frameworks that expose only
/// pointers (the MoE raw entry points take these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBuffer {
    /// Device address of element 0 (`CUdeviceptr`); a multiple of the element size.
    pub ptr: u64,
    /// Elements in the buffer from `ptr` on.
    pub len: usize,
}

/// A tensor given by its raw device address, for frameworks that expose only pointers.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor {
    /// Device address of element 0 of the buffer (`CUdeviceptr`).
    pub ptr: u64,
    /// Elements in the buffer from `ptr` on; views are checked against it.
    pub len: usize,
    /// The view of the tensor in that buffer.
    pub layout: HeadsLayout,
}

/// Checks that a buffer's device address is a multiple of its element size: CUDA
/// allocations and cudarc views of them always are, a raw pointer from elsewhere need not
/// be, and a kernel reading `T` through a misaligned address faults.
///
/// # Errors
/// [`Error::InvalidArgument`] of kind [`crate::error::ErrorKind::Alignment`] naming `arg`.
pub(crate) fn check_element_alignment(
    op: &'static str,
    arg: &'static str,
    addr: u64,
    elem_size: usize,
) -> Result<()> {
    if elem_size > 1 && addr % elem_size as u64 != 0 {
        return Err(Error::misaligned(
            op,
            arg,
            format!("device address {addr:#x} is not a multiple of the {elem_size}-byte element"),
        ));
    }
    Ok(())
}
