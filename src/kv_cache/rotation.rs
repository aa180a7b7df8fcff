//! Caches that keep keys un-rotated: the per-sequence rotation tables of one step, so that
//! decode rotates every key it reads (and each query) with the rotation of the sequence's
//! current length. With dynamic scaling (HF's dynamic NTK, dynamic YaRN) the rotation
//! changes as a sequence grows; a cache of keys rotated once at append time keeps each
//! key's rotation of that moment, which is inexact; this mode is exact.

use cudarc::driver::CudaSlice;

use super::step::{KvStep, ValidatedStep};
use crate::device::{cuda_err, Device};
use crate::error::{Error, Result};
use crate::rope::{AnglePrecision, LengthScaling, RopeStyle};

const OP: &str = "kv_rotation";

/// How keys and queries are rotated on load: pairing, angle precision and the rotated
/// channels (the first `rotary_dim` of each head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationShape {
    /// Rotated channels per head (even, at most the head dim).
    pub rotary_dim: usize,
    /// Channel pairing.
    pub style: RopeStyle,
    /// Angle precision (the RoPE family's).
    pub precision: AnglePrecision,
}

/// The host tables of one step: `inv_freq` `[batch, rotary_dim / 2]` (each sequence's
/// rotation at its current length, `seqlens[b]`) and the attention factors `[batch]` (f32,
/// as the RoPE kernel uses them).
///
/// # Errors
/// The scaling's own errors ([`LengthScaling::at`]); a rotation whose pair count differs
/// between sequences (it cannot: the rotary dim is the config's).
pub fn rotation_tables(
    step: &ValidatedStep,
    scaling: &LengthScaling,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let half = scaling.config().rotary_dim() / 2;
    let mut inv = Vec::with_capacity(step.batch.saturating_mul(half));
    let mut factor = Vec::with_capacity(step.batch);
    for &len in &step.seqlens {
        let r = scaling.at(len)?;
        if r.inv_freq.len() != half {
            return Err(Error::invalid(
                OP,
                "scaling",
                "inv_freq length differs from rotary_dim / 2",
            ));
        }
        inv.extend_from_slice(&r.inv_freq);
        factor.push(r.attention_factor as f32);
    }
    Ok((inv, factor))
}

/// A step's rotation tables on the device, for [`decode_rotating`](super::decode_rotating).
/// Built per step (after [`KvStep::upload`] or [`KvStep::update`]) from the step's lengths;
/// decode checks that the lengths still match.
#[derive(Debug)]
pub struct KvRotation {
    shape: RotationShape,
    head_dim: usize,
    seqlens: Vec<usize>,
    inv_freq: CudaSlice<f64>,
    factor: CudaSlice<f32>,
}

impl KvRotation {
    /// Computes each sequence's rotation at its current length with `scaling` and copies
    /// the tables to the device on `dev`'s stream.
    ///
    /// # Errors
    /// [`Error::Config`] for a scaling that fails ([`LengthScaling::at`]);
    /// [`Error::InvalidArgument`] for a head dim that differs from the step's cache
    /// (`scaling`); [`Error::Cuda`] when a copy fails.
    pub fn upload(
        dev: &Device,
        step: &KvStep,
        scaling: &LengthScaling,
        style: RopeStyle,
        precision: AnglePrecision,
    ) -> Result<Self> {
        let head_dim = step.layout().head_dim;
        if scaling.config().head_dim() != head_dim {
            return Err(Error::invalid(
                OP,
                "scaling",
                format!(
                    "head dim {} differs from the cache's {head_dim}",
                    scaling.config().head_dim()
                ),
            ));
        }
        let v = step.validated();
        let (inv, factor) = rotation_tables(v, scaling)?;
        let st = dev.stream();
        let inv_freq = st
            .clone_htod(if inv.is_empty() { &[0.0][..] } else { &inv[..] })
            .map_err(cuda_err(OP))?;
        let factor = st
            .clone_htod(if factor.is_empty() {
                &[0.0f32][..]
            } else {
                &factor[..]
            })
            .map_err(cuda_err(OP))?;
        Ok(KvRotation {
            shape: RotationShape {
                rotary_dim: scaling.config().rotary_dim(),
                style,
                precision,
            },
            head_dim,
            seqlens: v.seqlens.clone(),
            inv_freq,
            factor,
        })
    }

    /// Pairing, precision and rotated channels.
    pub fn shape(&self) -> RotationShape {
        self.shape
    }

    /// Checks that the tables were made for `step`'s lengths and head dim.
    pub(crate) fn check_step(&self, step: &ValidatedStep, head_dim: usize) -> Result<()> {
        if self.seqlens != step.seqlens || self.head_dim != head_dim {
            return Err(Error::invalid(
                OP,
                "rotation",
                "the tables were made for another step (rebuild them after KvStep::update)",
            ));
        }
        Ok(())
    }

    pub(crate) fn inv_freq(&self) -> &CudaSlice<f64> {
        &self.inv_freq
    }

    pub(crate) fn factor(&self) -> &CudaSlice<f32> {
        &self.factor
    }
}
