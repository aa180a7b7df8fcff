//! Tiled attention forward (FlashAttention-2's algorithm on tensor cores).
mod plan;
pub mod reference;

pub use plan::*;
