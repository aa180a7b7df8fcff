//! The RoPE plan: everything about rotary position embeddings that is computed on the host.
//!
//! A [`RopeConfig`] holds a model's rotary settings (base, head dimension, partial rotary
//! factor, context length and one [`RopeScaling`] variant) and turns them into the two
//! things a kernel needs: one inverse frequency per rotated channel pair
//! ([`RopeConfig::inv_freq_f64`]) and the attention factor that multiplies cos and sin
//! ([`RopeConfig::attention_factor_f64`]). The GPU table and the CPU reference both take
//! their numbers from here, so they cannot disagree about the formulas.
//!
//! The formulas and the reading of config.json follow HF transformers'
//! `modeling_rope_utils.py` (`rope_scaling` / `rope_parameters`, with `rope_type` one of
//! `default`, `linear`, `dynamic`, `yarn`, `longrope`, `llama3`). Everything is computed in
//! f64; HF computes in f32, so values agree to f32 rounding, not bit for bit.
//!
//! Sources of the formulas:
//! * RoPE itself: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
//!   Embedding" (arXiv:2104.09864). A larger base ("ABF", adjusted base frequency: Xiong et
//!   al. 2023; Code Llama; Llama 3's 500000) needs no scaling variant, only `rope_theta`.
//! * Linear position interpolation (PI): Chen et al. 2023, "Extending Context Window of
//!   Large Language Models via Positional Interpolation" (arXiv:2306.15595).
//! * NTK-aware and dynamic NTK scaling: bloc97 and emozilla, 2023 (r/LocalLLaMA posts "NTK-Aware
//!   Scaled RoPE" and "Dynamically Scaled RoPE").
//! * YaRN: Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
//!   Models" (arXiv:2309.00071), with DeepSeek-V2/V3's `mscale` / `mscale_all_dim` variant
//!   of its attention factor.
//! * LongRoPE: Ding et al. 2024, "LongRoPE: Extending LLM Context Window Beyond 2 Million
//!   Tokens" (arXiv:2402.13753), as shipped in Phi-3.
//! * Llama 3 frequency smoothing: Meta 2024, "The Llama 3 Herd of Models"
//!   (arXiv:2407.21783), as shipped in Llama 3.1.

use std::f64::consts::PI;

use crate::error::{Error, Result};

// Reading HF transformers' config.json into a RopeConfig (`RopeConfig::from_hf_config`).
mod hf_config;

/// `rope_theta` when a config does not give one (HF's `default_theta`).
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
/// YaRN's `beta_fast` when absent, null or 0 (HF: `get("beta_fast") or 32`).
const DEFAULT_BETA_FAST: f64 = 32.0;
/// YaRN's `beta_slow` when absent, null or 0 (HF: `get("beta_slow") or 1`).
const DEFAULT_BETA_SLOW: f64 = 1.0;

/// The largest head dimension a [`RopeConfig`] accepts.
///
/// Real models use 64 to 512; the bound only stops a corrupt config file from asking
/// [`RopeConfig::inv_freq_f64`] for an absurd allocation.
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// How the base RoPE frequencies are remapped for long contexts (HF's `rope_type`).
///
/// Every variant starts from the default inverse frequencies
/// `inv[i] = base^(-2i/dim)`, `i < dim/2`, with `dim` the rotary dimension
/// ([`RopeConfig::rotary_dim`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (Su et al. 2021): `inv[i] = base^(-2i/dim)`, attention factor 1. An
    /// adjusted base frequency (ABF: Code Llama's 1e6, Llama 3's 500000) is this variant
    /// with a different [`RopeConfig::base`].
    Default,
    /// Linear position interpolation (PI; Chen et al. 2023): `inv[i] / factor`, attention
    /// factor 1.
    Linear {
        /// How many times longer the context becomes; positions are divided by it.
        factor: f64,
    },
    /// Dynamic NTK-aware scaling (bloc97 and emozilla, 2023): the base grows with the
    /// sequence length. With `L = max_position_embeddings` and `l = max(seq_len, L)`:
    /// `base' = base * (factor * l / L - (factor - 1))^(dim / (dim - 2))`, computed as
    /// `1 + factor * (l - L) / L` inside the power (the same number, without cancellation).
    /// Equal to [`RopeScaling::Default`] while `seq_len <= L`. Attention factor 1.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// YaRN (Peng et al. 2023): high-frequency pairs keep their frequency, low-frequency
    /// pairs are interpolated by `factor`, with a linear ramp in the pair index between.
    ///
    /// `d(r) = dim * ln(L0 / (2 pi r)) / (2 ln base)`; `low = d(beta_fast)`,
    /// `high = d(beta_slow)` (floored and ceiled when `truncate`), clamped to `[0, dim-1]`,
    /// `high += 0.001` when they are equal; `ramp_i = clamp((i - low) / (high - low), 0, 1)`;
    /// `inv'[i] = (inv[i] / factor) * ramp_i + inv[i] * (1 - ramp_i)`.
    ///
    /// Attention factor: `attention_factor` if given; else, when `mscale` and
    /// `mscale_all_dim` are both given and nonzero (DeepSeek-V2/V3),
    /// `g(factor, mscale) / g(factor, mscale_all_dim)`; else `g(factor, 1)`, where
    /// `g(s, m) = 1` for `s <= 1` and `0.1 m ln s + 1` otherwise.
    Yarn {
        /// The scaling factor `s`.
        factor: f64,
        /// The pre-training context length `L0`.
        original_max_position_embeddings: usize,
        /// Rotations over `L0` above which a pair is left unscaled (HF default 32).
        beta_fast: f64,
        /// Rotations over `L0` below which a pair is fully interpolated (HF default 1).
        beta_slow: f64,
        /// DeepSeek's `mscale`, numerator of the attention factor ratio.
        mscale: Option<f64>,
        /// DeepSeek's `mscale_all_dim`, denominator of the attention factor ratio.
        mscale_all_dim: Option<f64>,
        /// An explicit attention factor, overriding the formulas.
        attention_factor: Option<f64>,
        /// Round the ramp bounds outward to whole pair indices (HF default `true`;
        /// gpt-oss uses `false`).
        truncate: bool,
    },
    /// LongRoPE (Ding et al. 2024; Phi-3): one searched rescale factor per pair,
    /// `inv'[i] = 1 / (ext[i] * base^(2i/dim))`, with `ext = long_factor` once the sequence
    /// is longer than `L0` and `short_factor` otherwise.
    ///
    /// Attention factor: `attention_factor` if given; else, with
    /// `s = factor` or `max_position_embeddings / L0`, `1` for `s <= 1` and
    /// `sqrt(1 + ln s / ln L0)` otherwise.
    LongRope {
        /// Per-pair factors for sequences up to `L0` (`rotary_dim / 2` entries).
        short_factor: Vec<f64>,
        /// Per-pair factors for sequences longer than `L0` (`rotary_dim / 2` entries).
        long_factor: Vec<f64>,
        /// The pre-training context length `L0`.
        original_max_position_embeddings: usize,
        /// The context extension factor; `None` derives it as
        /// `max_position_embeddings / L0`. Used only for the attention factor.
        factor: Option<f64>,
        /// An explicit attention factor, overriding the formula.
        attention_factor: Option<f64>,
    },
    /// Llama 3.1's frequency smoothing (Meta 2024). With wavelength `w = 2 pi / inv[i]`,
    /// `lo = L0 / low_freq_factor` and `hi = L0 / high_freq_factor`: `w < hi` keeps
    /// `inv[i]`; `w > lo` gives `inv[i] / factor`; between,
    /// `s = (L0 / w - low_freq_factor) / (high_freq_factor - low_freq_factor)` and
    /// `inv'[i] = (1 - s) inv[i] / factor + s inv[i]`. Attention factor 1.
    Llama3 {
        /// The scaling factor for low-frequency pairs (8 in Llama 3.1).
        factor: f64,
        /// Sets the long-wavelength edge `L0 / low_freq_factor` (1 in Llama 3.1).
        low_freq_factor: f64,
        /// Sets the short-wavelength edge `L0 / high_freq_factor` (4 in Llama 3.1).
        high_freq_factor: f64,
        /// The pre-training context length `L0` (8192 in Llama 3.1).
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// HF's `rope_type` string for this variant: `default`, `linear`, `dynamic`, `yarn`,
    /// `longrope` or `llama3`.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }
}

/// A validated rotary-embedding configuration: the single source of inv_freq and of the
/// attention factor for the CPU reference and the GPU kernels.
///
/// Made from a model's config.json with [`RopeConfig::from_hf_config`] or in code with
/// [`RopeConfig::builder`]; both run the same validation, so every `RopeConfig` yields
/// finite, positive frequencies and a finite, positive attention factor.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    base: f64,
    head_dim: usize,
    partial_rotary_factor: f64,
    max_position_embeddings: usize,
    scaling: RopeScaling,
}

impl RopeConfig {
    /// Starts a configuration made in code for heads of `head_dim` channels.
    ///
    /// Defaults: base 10000, partial rotary factor 1, `max_position_embeddings` 0 (unknown;
    /// only some scalings need it), [`RopeScaling::Default`]. Nothing is checked until
    /// [`RopeConfigBuilder::build`].
    pub fn builder(head_dim: usize) -> RopeConfigBuilder {
        RopeConfigBuilder {
            head_dim,
            base: DEFAULT_ROPE_THETA,
            partial_rotary_factor: 1.0,
            max_position_embeddings: 0,
            scaling: RopeScaling::Default,
        }
    }

    /// The inverse frequencies rounded to f32, one per rotated pair (`rotary_dim / 2`).
    ///
    /// Each entry is the f32 nearest to the matching [`RopeConfig::inv_freq_f64`] entry.
    /// `seq_len` is as there.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        self.inv_freq_f64(seq_len)
            .into_iter()
            .map(|x| x as f32)
            .collect()
    }

    /// Whether the frequencies depend on the sequence length they are built for
    /// ([`RopeScaling::Dynamic`] and [`RopeScaling::LongRope`]). A table built from such a
    /// config serves positions below that length only; the ops reject larger ones.
    pub fn depends_on_length(&self) -> bool {
        matches!(
            self.scaling,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }

    /// The inverse frequencies in f64, one per rotated pair (`rotary_dim / 2` entries): pair
    /// `i` turns by `position * inv[i]` radians.
    ///
    /// `seq_len` is the longest sequence the frequencies will serve (largest position + 1).
    /// Only [`RopeScaling::Dynamic`] (which grows the base past `max_position_embeddings`)
    /// and [`RopeScaling::LongRope`] (which switches to `long_factor` past
    /// `original_max_position_embeddings`) depend on it; the others ignore it.
    ///
    /// Never fails: validation ([`RopeConfigBuilder::build`]) proved every entry finite and
    /// positive, and nonzero and finite in f32, at every `seq_len`; the work is
    /// `rotary_dim / 2 <= MAX_HEAD_DIM / 2` entries.
    pub fn inv_freq_f64(&self, seq_len: usize) -> Vec<f64> {
        let dim = self.rotary_dim();
        match &self.scaling {
            RopeScaling::Default => default_inv_freq(self.base, dim),
            RopeScaling::Linear { factor } => default_inv_freq(self.base, dim)
                .into_iter()
                .map(|inv| inv / factor)
                .collect(),
            RopeScaling::Dynamic { factor } => {
                let l = self.max_position_embeddings;
                if seq_len <= l {
                    // base' = base * 1^(...) exactly: skip the arithmetic so the equality holds
                    // bit for bit.
                    default_inv_freq(self.base, dim)
                } else {
                    // factor x seq_len / L - (factor - 1), HF's form, written as
                    // 1 + factor x (seq_len - L) / L: the same number without the
                    // cancellation that turns HF's form to 0 (and the base to 0) for a large
                    // factor and seq_len just past L. It is at least 1 and grows with seq_len,
                    // so validation can check the frequencies at the longest length.
                    let excess = (seq_len - l) as f64 / l as f64;
                    let ratio = 1.0 + factor * excess;
                    let d = dim as f64;
                    let base = self.base * ratio.powf(d / (d - 2.0));
                    default_inv_freq(base, dim)
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let (low, high) = yarn_correction_range(
                    *beta_fast,
                    *beta_slow,
                    dim,
                    self.base,
                    *original_max_position_embeddings,
                    *truncate,
                );
                let high = if low == high { high + 0.001 } else { high };
                default_inv_freq(self.base, dim)
                    .into_iter()
                    .enumerate()
                    .map(|(i, extrapolated)| {
                        let interpolated = extrapolated / factor;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
                    })
                    .collect()
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                ..
            } => {
                let ext = if seq_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let d = dim as f64;
                ext.iter()
                    .take(dim / 2)
                    .enumerate()
                    .map(|(i, e)| 1.0 / (e * self.base.powf((2 * i) as f64 / d)))
                    .collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let l0 = *original_max_position_embeddings as f64;
                let low_freq_wavelen = l0 / low_freq_factor;
                let high_freq_wavelen = l0 / high_freq_factor;
                default_inv_freq(self.base, dim)
                    .into_iter()
                    .map(|inv| {
                        let wavelen = 2.0 * PI / inv;
                        if wavelen < high_freq_wavelen {
                            inv
                        } else if wavelen > low_freq_wavelen {
                            inv / factor
                        } else {
                            let smooth = (l0 / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    })
                    .collect()
            }
        }
    }

    /// The attention factor rounded to f32: see [`RopeConfig::attention_factor_f64`].
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor_f64() as f32
    }

    /// The factor that multiplies both cos and sin (so q, k, and the logits by its square).
    ///
    /// 1 for default, linear, dynamic and llama3; YaRN's and LongRoPE's formulas are given
    /// on [`RopeScaling::Yarn`] and [`RopeScaling::LongRope`].
    pub fn attention_factor_f64(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => match (attention_factor, nonzero(*mscale), nonzero(*mscale_all_dim)) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(m_all)) => {
                    yarn_mscale(*factor, m) / yarn_mscale(*factor, m_all)
                }
                (None, _, _) => yarn_mscale(*factor, 1.0),
            },
            RopeScaling::LongRope {
                original_max_position_embeddings,
                factor,
                attention_factor,
                ..
            } => match attention_factor {
                Some(a) => *a,
                None => {
                    let l0 = *original_max_position_embeddings as f64;
                    let s = factor.unwrap_or(self.max_position_embeddings as f64 / l0);
                    if s <= 1.0 {
                        1.0
                    } else {
                        (1.0 + s.ln() / l0.ln()).sqrt()
                    }
                }
            },
            RopeScaling::Default
            | RopeScaling::Linear { .. }
            | RopeScaling::Dynamic { .. }
            | RopeScaling::Llama3 { .. } => 1.0,
        }
    }

    /// The number of rotated channels: `int(head_dim * partial_rotary_factor)`, even and
    /// nonzero. Channels from here to `head_dim` pass through unrotated and unscaled.
    pub fn rotary_dim(&self) -> usize {
        rotary_dim_of(self.head_dim, self.partial_rotary_factor)
    }

    /// The head dimension the rotation applies to (for DeepSeek's MLA, `qk_rope_head_dim`).
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The RoPE base (`rope_theta`).
    pub fn base(&self) -> f64 {
        self.base
    }

    /// The fraction of each head that is rotated (`partial_rotary_factor`, in (0, 1]).
    pub fn partial_rotary_factor(&self) -> f64 {
        self.partial_rotary_factor
    }

    /// `max_position_embeddings`: the context length the model is configured for; 0 when
    /// neither the config nor the builder gave one.
    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    /// The frequency remapping.
    pub fn scaling(&self) -> &RopeScaling {
        &self.scaling
    }
}

/// Builds a [`RopeConfig`] in code. Made by [`RopeConfig::builder`].
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfigBuilder {
    head_dim: usize,
    base: f64,
    partial_rotary_factor: f64,
    max_position_embeddings: usize,
    scaling: RopeScaling,
}

impl RopeConfigBuilder {
    /// Sets the RoPE base (`rope_theta`; default 10000).
    pub fn base(mut self, base: f64) -> Self {
        self.base = base;
        self
    }

    /// Sets the fraction of each head that is rotated (default 1).
    pub fn partial_rotary_factor(mut self, partial_rotary_factor: f64) -> Self {
        self.partial_rotary_factor = partial_rotary_factor;
        self
    }

    /// Sets `max_position_embeddings` (default 0, unknown). [`RopeScaling::Dynamic`] needs
    /// it, and [`RopeScaling::LongRope`] without `factor` or `attention_factor` derives its
    /// factor from it.
    pub fn max_position_embeddings(mut self, max_position_embeddings: usize) -> Self {
        self.max_position_embeddings = max_position_embeddings;
        self
    }

    /// Sets the frequency remapping (default [`RopeScaling::Default`]).
    pub fn scaling(mut self, scaling: RopeScaling) -> Self {
        self.scaling = scaling;
        self
    }

    /// Checks the settings and makes the configuration.
    ///
    /// # Errors
    ///
    /// [`Error::Config`], naming the config.json key the value would have, when:
    /// * `rope_theta` is not finite or not greater than 1;
    /// * `head_dim` is 0 or above [`MAX_HEAD_DIM`];
    /// * `partial_rotary_factor` is outside (0, 1], or the rotary dimension
    ///   `int(head_dim * partial_rotary_factor)` is 0 or odd;
    /// * a scaling `factor`, `beta_fast`, `beta_slow`, `low_freq_factor`, an explicit
    ///   `attention_factor` or a LongRoPE entry is not finite and positive, `mscale` or
    ///   `mscale_all_dim` is not finite, or `high_freq_factor <= low_freq_factor`;
    /// * `original_max_position_embeddings` is 0 (or 1 where LongRoPE takes its logarithm);
    /// * `short_factor` or `long_factor` does not have `rotary_dim / 2` entries;
    /// * dynamic NTK lacks `max_position_embeddings` or has a rotary dimension of 2 (its
    ///   exponent `dim / (dim - 2)` would divide by zero);
    /// * YaRN's `beta_fast` or `beta_slow` puts a ramp bound at an infinite pair index;
    /// * some inverse frequency, at some sequence length, is not finite and positive in f64
    ///   or rounds to 0 or infinity in f32 (the key named is `rope_theta` when the unscaled
    ///   frequencies already fail, the LongRoPE entry responsible, else the scaling
    ///   `factor`);
    /// * the resulting attention factor is not finite and positive, in f64 and rounded to
    ///   f32.
    pub fn build(self) -> Result<RopeConfig> {
        let config = RopeConfig {
            base: self.base,
            head_dim: self.head_dim,
            partial_rotary_factor: self.partial_rotary_factor,
            max_position_embeddings: self.max_position_embeddings,
            scaling: self.scaling,
        };
        validate(&config, "rope_scaling")?;
        Ok(config)
    }
}

// ---------------------------------------------------------------------------------------
// Formulas
// ---------------------------------------------------------------------------------------

/// `int(head_dim * partial_rotary_factor)`, as Python's `int()` truncates (both operands
/// are positive after validation; a NaN or negative product gives 0).
fn rotary_dim_of(head_dim: usize, partial_rotary_factor: f64) -> usize {
    let d = (head_dim as f64 * partial_rotary_factor).trunc();
    if d.is_finite() && d > 0.0 {
        // Float-to-int `as` saturates; validation bounds head_dim, so nothing is lost.
        d as usize
    } else {
        0
    }
}

/// `inv[i] = 1 / base^(2i/dim)` for `i < dim/2`, in HF's order of operations.
fn default_inv_freq(base: f64, dim: usize) -> Vec<f64> {
    let d = dim as f64;
    (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / d))
        .collect()
}

/// YaRN's inverse dimension formula: the (fractional) pair dimension whose wavelength
/// fits `num_rotations` times into `original_max_position_embeddings`.
fn yarn_correction_dim(
    num_rotations: f64,
    dim: usize,
    base: f64,
    original_max_position_embeddings: usize,
) -> f64 {
    (dim as f64 * (original_max_position_embeddings as f64 / (num_rotations * 2.0 * PI)).ln())
        / (2.0 * base.ln())
}

/// YaRN's ramp bounds `(low, high)`: `d(beta_fast)` and `d(beta_slow)`, floored and
/// ceiled when `truncate`, clamped to `[0, dim - 1]`.
fn yarn_correction_range(
    beta_fast: f64,
    beta_slow: f64,
    dim: usize,
    base: f64,
    original_max_position_embeddings: usize,
    truncate: bool,
) -> (f64, f64) {
    let mut low = yarn_correction_dim(beta_fast, dim, base, original_max_position_embeddings);
    let mut high = yarn_correction_dim(beta_slow, dim, base, original_max_position_embeddings);
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let top = dim.saturating_sub(1) as f64;
    (low.max(0.0), high.min(top))
}

/// YaRN's `g(s, m)`: 1 for `s <= 1`, else `0.1 m ln s + 1`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Python truthiness of an optional number: `None` and `0` count as absent.
fn nonzero(v: Option<f64>) -> Option<f64> {
    v.filter(|&x| x != 0.0)
}

// ---------------------------------------------------------------------------------------
// Validation: the one place both the parser and the builder check a configuration.
// ---------------------------------------------------------------------------------------

/// Checks every invariant the formulas rely on. `section` prefixes the scaling keys in
/// error messages (`rope_scaling` or `rope_parameters`).
fn validate(config: &RopeConfig, section: &str) -> Result<()> {
    let key = |name: &str| format!("{section}.{name}");

    if !(config.base.is_finite() && config.base > 1.0) {
        return Err(Error::config(
            "rope_theta",
            format!(
                "must be a finite number greater than 1, got {}",
                config.base
            ),
        ));
    }
    if config.head_dim == 0 || config.head_dim > MAX_HEAD_DIM {
        return Err(Error::config(
            "head_dim",
            format!(
                "must be between 1 and {MAX_HEAD_DIM}, got {}",
                config.head_dim
            ),
        ));
    }
    let prf = config.partial_rotary_factor;
    if !(prf.is_finite() && prf > 0.0 && prf <= 1.0) {
        return Err(Error::config(
            "partial_rotary_factor",
            format!("must be in (0, 1], got {prf}"),
        ));
    }
    let dim = config.rotary_dim();
    if dim == 0 || dim % 2 != 0 {
        let k = if prf == 1.0 {
            "head_dim"
        } else {
            "partial_rotary_factor"
        };
        return Err(Error::config(
            k,
            format!(
                "the rotary dimension int(head_dim {} x partial_rotary_factor {prf}) = {dim} must be even and nonzero",
                config.head_dim
            ),
        ));
    }

    match &config.scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => positive(*factor, key("factor"))?,
        RopeScaling::Dynamic { factor } => {
            positive(*factor, key("factor"))?;
            if config.max_position_embeddings == 0 {
                return Err(Error::config(
                    "max_position_embeddings",
                    "missing or 0; dynamic NTK scaling needs it as the length past which the base grows",
                ));
            }
            if dim < 4 {
                let k = if prf == 1.0 {
                    "head_dim"
                } else {
                    "partial_rotary_factor"
                };
                return Err(Error::config(
                    k,
                    format!("dynamic NTK scaling needs a rotary dimension of at least 4 (its exponent is dim / (dim - 2)), got {dim}"),
                ));
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
            truncate: _,
        } => {
            positive(*factor, key("factor"))?;
            nonzero_length(
                *original_max_position_embeddings,
                key("original_max_position_embeddings"),
            )?;
            positive(*beta_fast, key("beta_fast"))?;
            positive(*beta_slow, key("beta_slow"))?;
            if let Some(m) = mscale {
                finite(*m, key("mscale"))?;
            }
            if let Some(m) = mscale_all_dim {
                finite(*m, key("mscale_all_dim"))?;
            }
            if let Some(a) = attention_factor {
                positive(*a, key("attention_factor"))?;
            }
            // The ramp bounds must be finite, or the ramp is NaN for every pair: a tiny
            // beta_fast puts d(beta_fast) at +inf, a huge beta_slow d(beta_slow) at -inf.
            let (low, high) = yarn_correction_range(
                *beta_fast,
                *beta_slow,
                dim,
                config.base,
                *original_max_position_embeddings,
                true,
            );
            for (bound, name) in [(low, "beta_fast"), (high, "beta_slow")] {
                if !bound.is_finite() {
                    return Err(Error::config(
                        key(name),
                        format!(
                            "puts YaRN's ramp bound at {bound}; beta_fast and beta_slow must give \
                             finite correction dimensions"
                        ),
                    ));
                }
            }
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            factor,
            attention_factor,
        } => {
            for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if list.len() != dim / 2 {
                    return Err(Error::config(
                        key(name),
                        format!(
                            "must have rotary_dim / 2 = {} entries (one per rotated pair), got {}",
                            dim / 2,
                            list.len()
                        ),
                    ));
                }
                for (i, &v) in list.iter().enumerate() {
                    positive(v, format!("{section}.{name}[{i}]"))?;
                }
            }
            nonzero_length(
                *original_max_position_embeddings,
                key("original_max_position_embeddings"),
            )?;
            if let Some(f) = factor {
                positive(*f, key("factor"))?;
            }
            match attention_factor {
                Some(a) => positive(*a, key("attention_factor"))?,
                None => {
                    if factor.is_none() && config.max_position_embeddings == 0 {
                        return Err(Error::config(
                            "max_position_embeddings",
                            format!(
                                "missing or 0; LongRoPE without {section}.factor or {section}.attention_factor \
                                 derives its factor as max_position_embeddings / original_max_position_embeddings"
                            ),
                        ));
                    }
                    let l0 = *original_max_position_embeddings as f64;
                    let s = factor.unwrap_or(config.max_position_embeddings as f64 / l0);
                    if s > 1.0 && *original_max_position_embeddings < 2 {
                        return Err(Error::config(
                            key("original_max_position_embeddings"),
                            "must be at least 2: LongRoPE's attention factor divides by its logarithm",
                        ));
                    }
                }
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            positive(*factor, key("factor"))?;
            positive(*low_freq_factor, key("low_freq_factor"))?;
            finite(*high_freq_factor, key("high_freq_factor"))?;
            if high_freq_factor <= low_freq_factor {
                return Err(Error::config(
                    key("high_freq_factor"),
                    format!("must be greater than low_freq_factor {low_freq_factor}, got {high_freq_factor}"),
                ));
            }
            nonzero_length(
                *original_max_position_embeddings,
                key("original_max_position_embeddings"),
            )?;
        }
    }

    check_frequencies(config, section)?;

    let a = config.attention_factor_f64();
    if !usable(a) {
        let k = match &config.scaling {
            RopeScaling::Yarn {
                attention_factor: Some(_),
                ..
            }
            | RopeScaling::LongRope {
                attention_factor: Some(_),
                ..
            } => key("attention_factor"),
            RopeScaling::Yarn {
                factor,
                mscale: Some(m),
                mscale_all_dim,
                ..
            } if *m != 0.0 && nonzero(*mscale_all_dim).is_some() => {
                // The ratio g(factor, mscale) / g(factor, mscale_all_dim): blame the
                // numerator when it is already unusable, else the denominator.
                if usable(yarn_mscale(*factor, *m)) {
                    key("mscale_all_dim")
                } else {
                    key("mscale")
                }
            }
            _ => key("factor"),
        };
        return Err(Error::config(
            k,
            format!(
                "gives an attention factor of {a}; it must be finite and positive in f64 and in \
                 f32 (the kernels take it as f32)"
            ),
        ));
    }
    Ok(())
}

/// Whether a frequency or factor is usable by both the f64 reference and the f32 kernels:
/// finite and positive in f64, and still finite and nonzero when rounded to f32.
fn usable(v: f64) -> bool {
    let single = v as f32;
    v.is_finite() && v > 0.0 && single.is_finite() && single > 0.0
}

/// The first pair whose inverse frequency is not [`usable`], with its value.
fn first_unusable(inv: &[f64]) -> Option<(usize, f64)> {
    inv.iter().copied().enumerate().find(|&(_, v)| !usable(v))
}

/// Checks that the frequencies are usable at every sequence length, naming the key that
/// breaks them: `rope_theta` when the unscaled frequencies already fail, the offending
/// LongRoPE entry, else the scaling `factor`. Dynamic NTK's base grows with the length, so
/// its frequencies are checked at the longest length there is (`usize::MAX`), where they are
/// smallest; LongRoPE's at a short and a long length (each factor list once). The other
/// variants do not depend on the length.
fn check_frequencies(config: &RopeConfig, section: &str) -> Result<()> {
    let dim = config.rotary_dim();
    let problem = |i: usize, v: f64| {
        format!(
            "gives inverse frequency {v} for rotated pair {i}; every frequency must be finite \
             and positive in f64 and nonzero and finite in f32"
        )
    };
    if let Some((i, v)) = first_unusable(&default_inv_freq(config.base, dim)) {
        return Err(Error::config("rope_theta", problem(i, v)));
    }
    match &config.scaling {
        RopeScaling::Default => Ok(()),
        RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } => {
            let long_len = original_max_position_embeddings.saturating_add(1);
            for (name, seq_len) in [("short_factor", 0), ("long_factor", long_len)] {
                if let Some((i, v)) = first_unusable(&config.inv_freq_f64(seq_len)) {
                    return Err(Error::config(
                        format!("{section}.{name}[{i}]"),
                        problem(i, v),
                    ));
                }
            }
            Ok(())
        }
        RopeScaling::Dynamic { .. } => match first_unusable(&config.inv_freq_f64(usize::MAX)) {
            Some((i, v)) => Err(Error::config(
                format!("{section}.factor"),
                format!(
                    "{} at the longest sequence length (dynamic NTK grows the base with the \
                     length, so factor x length / max_position_embeddings must stay moderate)",
                    problem(i, v)
                ),
            )),
            None => Ok(()),
        },
        RopeScaling::Linear { .. } | RopeScaling::Yarn { .. } | RopeScaling::Llama3 { .. } => {
            match first_unusable(&config.inv_freq_f64(0)) {
                Some((i, v)) => Err(Error::config(format!("{section}.factor"), problem(i, v))),
                None => Ok(()),
            }
        }
    }
}

fn finite(v: f64, key: String) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::config(
            key,
            format!("must be a finite number, got {v}"),
        ))
    }
}

fn positive(v: f64, key: String) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::config(
            key,
            format!("must be a finite number greater than 0, got {v}"),
        ))
    }
}

fn nonzero_length(v: usize, key: String) -> Result<()> {
    if v > 0 {
        Ok(())
    } else {
        Err(Error::config(
            key,
            "must be a positive number of positions, got 0",
        ))
    }
}
