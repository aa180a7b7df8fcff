//! # longctx
//!
//! Hand-written CUDA kernels for long-context LLMs, launched from safe Rust through cudarc
//! and checked against CPU references that accumulate in f64.
//!
//! * [`rope`]: RoPE with every long-context scaling rule (default/ABF, linear, dynamic NTK,
//!   YaRN, LongRoPE, Llama-3, partial rotary), Q and K rotated together in place, forward
//!   and backward, f32/f16/bf16, with the attention factor folded in.
//! * [`moe`]: MoE routing for Mixtral, Qwen-MoE and DeepSeek-V2/V3 routers: fused gating
//!   (softmax/sigmoid, correction bias, group limiting, top-k, renormalisation, scaling),
//!   a stable deterministic permutation for grouped GEMMs (counts, offsets, padding,
//!   capacity), gather and combine with their gradients, load-balancing and z losses, the
//!   router's backward, and DeepSeek's bias update.
//! * [`kv_cache`]: merging partial attention states (split-KV decode, ring attention).
//!
//! ## Example
//!
//! ```no_run
//! use half::bf16;
//! use longctx::device::Device;
//! use longctx::layout::HeadsLayout;
//! use longctx::rope::{apply_rope, Positions, RopeConfig, RopeOptions, RopeTable};
//!
//! # fn main() -> longctx::Result<()> {
//! let config = RopeConfig::from_hf_config(
//!     r#"{"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
//!         "max_position_embeddings": 131072,
//!         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
//!                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
//! )?;
//! let dev = Device::new(0)?;
//! let tokens = 1024;
//! let table = RopeTable::new(&dev, &config, tokens)?;
//! let positions = Positions::arange(&dev, 0, tokens)?;
//! let q_layout = HeadsLayout::contiguous(tokens, 32, 128);
//! let k_layout = HeadsLayout::contiguous(tokens, 8, 128);
//! let mut q = dev.zeros::<bf16>(tokens * 32 * 128)?;
//! let mut k = dev.zeros::<bf16>(tokens * 8 * 128)?;
//! apply_rope(&dev, &table, &positions, &mut q, &q_layout, &mut k, &k_layout, RopeOptions::default())?;
//! dev.synchronize()?;
//! # Ok(()) }
//! ```
//!
//! Every public function validates its arguments completely and returns [`Error`] instead
//! of launching on bad input; without a GPU or without compiled kernels, GPU calls return
//! [`Error::NoDevice`] or [`Error::KernelsNotCompiled`].

#![warn(missing_docs)]

pub mod attention;
#[cfg(feature = "candle")]
pub mod candle;
pub mod device;
pub mod dtype;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod error;
pub mod kv_cache;
pub mod layout;
pub mod mla;
pub mod moe;
pub mod rope;
// Benchmark helpers shared by the benches, the sweep and the GPU tests: public so those
// targets can use them, but not part of the documented API.
#[doc(hidden)]
pub mod timing;
#[doc(hidden)]
pub mod workloads;

mod kernel_id;
mod launch;
mod sys;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use error::{Error, ErrorKind, Result};

/// The cudarc and half versions this crate is built against, so callers name the same
/// types (`longctx::cudarc::driver::CudaSlice`, `longctx::half::bf16`).
pub use cudarc;
pub use half;

/// The README's Rust example, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
