//! RoPE whose frequencies follow the sequence's current length (dynamic scaling), for
//! caches that keep keys un-rotated and rotate them when attention reads them: every key
//! then gets the rotation of the current length, which a cache of keys rotated once at
//! append time (with the length of that moment) cannot give.

use super::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

/// How the rotation depends on the sequence's current length `len` (its cache length,
/// counting the tokens being decoded).
#[derive(Debug, Clone, PartialEq)]
pub enum LengthScaling {
    /// The configuration's own rule at `len`: static rules (default/ABF, PI, YaRN,
    /// Llama 3.1) ignore it; HF's dynamic NTK ([`RopeScaling::Dynamic`]) grows the base past
    /// `max_position_embeddings`; LongRoPE switches to `long_factor` past its original
    /// length.
    Config(RopeConfig),
    /// YaRN's dynamic variant (Peng et al. 2023, §3.3, "Dynamic-YaRN"): the configuration's
    /// YaRN parameters with the factor set to `s = max(1, len / original_max_position_embeddings)`,
    /// so the ramp and the attention factor `0.1 ln s + 1` follow the length. `config` must
    /// use [`RopeScaling::Yarn`] (its own factor is ignored).
    DynamicYarn(RopeConfig),
}

/// The rotation of one sequence at its current length.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationAt {
    /// Inverse frequencies, one per rotated pair.
    pub inv_freq: Vec<f64>,
    /// The attention factor (multiplies cos and sin).
    pub attention_factor: f64,
}

impl LengthScaling {
    /// The configuration the rule starts from.
    pub fn config(&self) -> &RopeConfig {
        match self {
            LengthScaling::Config(c) | LengthScaling::DynamicYarn(c) => c,
        }
    }

    /// Checks that a [`LengthScaling::DynamicYarn`] starts from a YaRN configuration.
    ///
    /// # Errors
    /// [`Error::Config`] (`rope_scaling.rope_type`) otherwise.
    pub fn validate(&self) -> Result<()> {
        if let LengthScaling::DynamicYarn(c) = self {
            if !matches!(c.scaling(), RopeScaling::Yarn { .. }) {
                return Err(Error::config(
                    "rope_scaling.rope_type",
                    format!(
                        "dynamic YaRN needs a yarn configuration, found {}",
                        c.scaling().rope_type()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The rotation at current length `len`.
    ///
    /// # Errors
    /// As [`LengthScaling::validate`]; for dynamic YaRN, a factor `len / L0` whose
    /// configuration fails validation (it cannot for lengths below 2^53).
    pub fn at(&self, len: usize) -> Result<RotationAt> {
        self.validate()?;
        match self {
            LengthScaling::Config(c) => Ok(RotationAt {
                inv_freq: c.inv_freq_f64(len),
                attention_factor: c.attention_factor_f64(),
            }),
            LengthScaling::DynamicYarn(c) => {
                let RopeScaling::Yarn {
                    original_max_position_embeddings: l0,
                    beta_fast,
                    beta_slow,
                    mscale,
                    mscale_all_dim,
                    attention_factor,
                    truncate,
                    ..
                } = c.scaling().clone()
                else {
                    unreachable!("validated above");
                };
                let s = (len as f64 / l0 as f64).max(1.0);
                let at = RopeConfig::builder(c.head_dim())
                    .base(c.base())
                    .partial_rotary_factor(c.partial_rotary_factor())
                    .max_position_embeddings(c.max_position_embeddings())
                    .scaling(RopeScaling::Yarn {
                        factor: s,
                        original_max_position_embeddings: l0,
                        beta_fast,
                        beta_slow,
                        mscale,
                        mscale_all_dim,
                        attention_factor,
                        truncate,
                    })
                    .build()?;
                Ok(RotationAt {
                    inv_freq: at.inv_freq_f64(len),
                    attention_factor: at.attention_factor_f64(),
                })
            }
        }
    }
}
