//! CPU reference for RoPE: f64, naive, written from the formula.
//!
//! For pair i with angle theta = position x inv_freq\[i\] and attention factor f:
//! forward  (x, y) -> f (x cos theta - y sin theta, y cos theta + x sin theta);
//! backward (x, y) -> f (x cos theta + y sin theta, y cos theta - x sin theta).

use super::{Direction, RopeStyle};
use crate::error::{Error, Result};
use crate::layout::HeadsLayout;

/// Rotates the view `layout` of `buf` in place, in f64.
///
/// `inv_freq` has one entry per pair (rotary_dim / 2 of them); channels from rotary_dim on
/// are left untouched. Everything is checked before `buf` is touched, so on an error `buf`
/// is unchanged.
///
/// # Errors
/// [`Error::InvalidArgument`] when the view leaves `buf` or its rows overlap, `positions`
/// does not have one entry per token, a position is negative, or rotary_dim = 2 x
/// inv_freq.len() exceeds head_dim.
pub fn apply_rope_f64(
    buf: &mut [f64],
    layout: &HeadsLayout,
    positions: &[i32],
    inv_freq: &[f64],
    attention_factor: f64,
    style: RopeStyle,
    direction: Direction,
) -> Result<()> {
    const OP: &str = "rope reference";
    layout.validate(OP, "x", buf.len())?;
    if positions.len() != layout.tokens {
        return Err(Error::invalid(
            OP,
            "positions",
            format!("{} positions for {} tokens", positions.len(), layout.tokens),
        ));
    }
    if let Some((t, pos)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
        return Err(Error::invalid(
            OP,
            "positions",
            format!("position {pos} at token {t} is negative"),
        ));
    }
    let half = inv_freq.len();
    // A slice of f64 holds at most isize::MAX / 8 entries, so 2 x half cannot overflow;
    // compare without forming it anyway.
    if half > layout.head_dim / 2 {
        return Err(Error::invalid(
            OP,
            "inv_freq",
            format!("rotary_dim 2 x {half} > head_dim {}", layout.head_dim),
        ));
    }
    if layout.is_empty() || half == 0 {
        // Nothing to rotate; the loops below would only count heads.
        return Ok(());
    }
    let sign = match direction {
        Direction::Forward => 1.0,
        Direction::Backward => -1.0,
    };
    // `validate` proved offset + (tokens - 1) x token_stride + (heads - 1) x head_stride +
    // head_dim <= buf.len(), so none of the index arithmetic below overflows or leaves buf.
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..layout.heads {
            let base = layout.offset + t * layout.token_stride + h * layout.head_stride;
            for (i, &inv) in inv_freq.iter().enumerate() {
                let theta = f64::from(pos) * inv;
                let (s, c) = theta.sin_cos();
                let (s, c) = (sign * s * attention_factor, c * attention_factor);
                let (ia, ib) = match style {
                    RopeStyle::Neox => (base + i, base + i + half),
                    RopeStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                };
                let (x, y) = (buf[ia], buf[ib]);
                buf[ia] = x * c - y * s;
                buf[ib] = y * c + x * s;
            }
        }
    }
    Ok(())
}
