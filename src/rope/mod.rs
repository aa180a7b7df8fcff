//! Rotary position embedding (RoPE) with every long-context frequency remapping.
//!
//! * [`RopeConfig`] (in `plan`) turns a model's config.json or a builder into inv_freq and
//!   the attention factor, with HF transformers' semantics.
//! * [`reference`](mod@reference) applies RoPE on the CPU in f64.
//! * [`RopeTable`], [`Positions`] and [`apply_rope`] / [`apply_rope_packed`] run the fused
//!   CUDA kernel: Q and K together, in place, forward or backward.
//! * [`RopeSchedule`]: progressive context extension (stages of length, base and scaling),
//!   with presets from published recipes, and [`frequency_bands`] per configuration.

mod dynamic;
mod plan;
pub mod reference;
mod schedule;

pub(crate) mod cuda;

pub use dynamic::{LengthScaling, RotationAt};
pub use plan::*;
pub use schedule::{frequency_bands, Band, PairBand, RopeSchedule, RopeStage};

pub use cuda::{apply_rope, apply_rope_packed, apply_rope_raw, Positions, RopeTable};

/// Which channels form a rotation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RopeStyle {
    /// Half-split: channel i pairs with i + rotary_dim / 2 (GPT-NeoX; HF Llama, Mistral,
    /// Qwen, Mixtral).
    #[default]
    Neox,
    /// Interleaved: channel 2i pairs with 2i + 1 (GPT-J; DeepSeek's reference code; vLLM's
    /// `is_neox_style=False`).
    Interleaved,
}

/// Forward rotation, or its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// y = f R(theta) x.
    #[default]
    Forward,
    /// dx = f R(theta)^T dy = f R(-theta) dy: the gradient of the forward pass.
    Backward,
}

/// How the GPU forms each angle position x inv_freq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnglePrecision {
    /// f64 product and reduction modulo 2 pi, then an accurate f32 sincos (of pi times
    /// r / pi): within ~1e-7 rad of the exact angle at any int32 position. The default.
    #[default]
    F64,
    /// The f32 product as HF transformers forms it, then an accurate sincos of that f32
    /// angle: ~3e-2 rad off at position 2^20. For comparison and benchmarks.
    F32,
}

/// Per-call options of the RoPE kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RopeOptions {
    /// Channel pairing.
    pub style: RopeStyle,
    /// Forward or backward.
    pub direction: Direction,
    /// Angle precision.
    pub precision: AnglePrecision,
}
