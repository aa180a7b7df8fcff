//! Progressive context extension: a [`RopeSchedule`] is the ordered list of stages a
//! trainer goes through (each a training length, a RoPE base and optionally a scaling
//! rule), so the RoPE configuration of any point of training is `config_at(tokens_seen)`
//! instead of a hand-written config per stage. Presets write out published recipes, each
//! with its source; [`frequency_bands`] says which pairs a configuration leaves unchanged,
//! interpolates, or blends (YaRN's ramp, Llama 3.1's smoothing).

use serde_json::{Map, Value};

use super::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

/// One stage of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeStage {
    /// A name for logs.
    pub name: String,
    /// The training sequence length of the stage.
    pub seq_len: usize,
    /// Training tokens the stage lasts; `None` where the source does not say (then
    /// [`RopeSchedule::config_at`] cannot place a token count past it). The last stage may
    /// be open-ended.
    pub tokens: Option<u64>,
    /// The rotary configuration of the stage (base, scaling, attention factor).
    pub config: RopeConfig,
    /// Whether this stage may lower the base below the previous stage's (a deliberate
    /// choice; ABF schedules only raise it).
    pub allow_base_decrease: bool,
}

/// An ordered, validated list of stages.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSchedule {
    stages: Vec<RopeStage>,
}

const KEY: &str = "schedule";

impl RopeSchedule {
    /// Checks and wraps `stages`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the stage (`stages[i]...`) when: there is no stage; a
    /// sequence length is 0 or not larger than the previous stage's; a stage other than the
    /// last lasts 0 tokens; the base decreases without `allow_base_decrease`; the head dim
    /// or rotary dim differs from the first stage's; the token boundaries overflow u64.
    pub fn new(stages: Vec<RopeStage>) -> Result<Self> {
        if stages.is_empty() {
            return Err(Error::config(KEY, "a schedule needs at least one stage"));
        }
        let mut total = 0u64;
        for (i, s) in stages.iter().enumerate() {
            let key = |k: &str| format!("stages[{i}].{k}");
            if s.seq_len == 0 {
                return Err(Error::config(key("seq_len"), "must be at least 1"));
            }
            if i + 1 < stages.len() && s.tokens == Some(0) {
                return Err(Error::config(
                    key("tokens"),
                    "a stage before the last lasts 0 tokens",
                ));
            }
            if let Some(t) = s.tokens {
                total = total
                    .checked_add(t)
                    .ok_or_else(|| Error::config(key("tokens"), "token boundaries overflow u64"))?;
            }
            if i == 0 {
                continue;
            }
            let prev = &stages[i - 1];
            if s.seq_len <= prev.seq_len {
                return Err(Error::config(
                    key("seq_len"),
                    format!(
                        "{} is not longer than the previous stage's {}",
                        s.seq_len, prev.seq_len
                    ),
                ));
            }
            if s.config.base() < prev.config.base() && !s.allow_base_decrease {
                return Err(Error::config(
                    key("rope_theta"),
                    format!(
                        "{} lowers the previous stage's base {} (set allow_base_decrease)",
                        s.config.base(),
                        prev.config.base()
                    ),
                ));
            }
            if s.config.head_dim() != stages[0].config.head_dim()
                || s.config.rotary_dim() != stages[0].config.rotary_dim()
            {
                return Err(Error::config(
                    key("head_dim"),
                    format!(
                        "head dim {} / rotary dim {} differ from the first stage's {} / {}",
                        s.config.head_dim(),
                        s.config.rotary_dim(),
                        stages[0].config.head_dim(),
                        stages[0].config.rotary_dim()
                    ),
                ));
            }
        }
        Ok(RopeSchedule { stages })
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[RopeStage] {
        &self.stages
    }

    /// The cumulative token count at which each stage ends (`None` from the first stage
    /// whose length is unknown on).
    pub fn boundaries(&self) -> Vec<Option<u64>> {
        let mut acc = Some(0u64);
        self.stages
            .iter()
            .map(|s| {
                acc = match (acc, s.tokens) {
                    (Some(a), Some(t)) => a.checked_add(t),
                    _ => None,
                };
                acc
            })
            .collect()
    }

    /// The stage training is in after `tokens_seen` tokens: stage i covers
    /// `[boundary(i-1), boundary(i))`; past the last boundary, the last stage.
    ///
    /// # Errors
    /// [`Error::Config`] when a stage before the one containing `tokens_seen` has no token
    /// count.
    pub fn stage_at(&self, tokens_seen: u64) -> Result<&RopeStage> {
        for (i, (s, end)) in self.stages.iter().zip(self.boundaries()).enumerate() {
            if i + 1 == self.stages.len() {
                return Ok(s);
            }
            match end {
                Some(e) if tokens_seen < e => return Ok(s),
                Some(_) => {}
                None => {
                    return Err(Error::config(
                        format!("stages[{i}].tokens"),
                        "unknown: set it to place token counts past this stage",
                    ))
                }
            }
        }
        unreachable!("a schedule has at least one stage")
    }

    /// The RoPE configuration after `tokens_seen` training tokens.
    ///
    /// # Errors
    /// As [`RopeSchedule::stage_at`].
    pub fn config_at(&self, tokens_seen: u64) -> Result<&RopeConfig> {
        Ok(&self.stage_at(tokens_seen)?.config)
    }

    /// Sets every stage's token count (`tokens[i]` for stage i), as a trainer's own budget.
    ///
    /// # Errors
    /// As [`RopeSchedule::new`], plus a count list of the wrong length.
    pub fn with_tokens(self, tokens: &[u64]) -> Result<Self> {
        if tokens.len() != self.stages.len() {
            return Err(Error::config(
                KEY,
                format!(
                    "{} token counts for {} stages",
                    tokens.len(),
                    self.stages.len()
                ),
            ));
        }
        let stages = self
            .stages
            .into_iter()
            .zip(tokens)
            .map(|(s, &t)| RopeStage {
                tokens: Some(t),
                ..s
            })
            .collect();
        RopeSchedule::new(stages)
    }

    /// Reads a schedule from JSON:
    ///
    /// ```json
    /// {"head_dim": 128,
    ///  "stages": [
    ///    {"name": "pretrain", "seq_len": 4096, "tokens": 2e12, "rope_theta": 10000},
    ///    {"name": "long", "seq_len": 32768, "rope_theta": 1e6},
    ///    {"seq_len": 131072, "rope_theta": 1e6,
    ///     "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}}]}
    /// ```
    ///
    /// Each stage is read like an HF config.json with `head_dim` (and an optional top-level
    /// `partial_rotary_factor`) and `max_position_embeddings` = its `seq_len`: the same
    /// keys, rules and errors as [`RopeConfig::from_hf_config`]. `tokens` (an integer, or
    /// an integral float such as `2e12`), `name` and `allow_base_decrease` are optional.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key (`stages[i].<key>` for a stage's own keys).
    pub fn from_json(json: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(json)
            .map_err(|e| Error::config(KEY, format!("is not valid JSON: {e}")))?;
        let top = root
            .as_object()
            .ok_or_else(|| Error::config(KEY, "must be a JSON object"))?;
        let head_dim = top
            .get("head_dim")
            .cloned()
            .ok_or_else(|| Error::config("head_dim", "missing"))?;
        let stages_v = top
            .get("stages")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::config("stages", "missing, or not an array"))?;
        let mut stages = Vec::with_capacity(stages_v.len().min(64));
        for (i, sv) in stages_v.iter().enumerate() {
            let key = |k: &str| format!("stages[{i}].{k}");
            let s = sv
                .as_object()
                .ok_or_else(|| Error::config(format!("stages[{i}]"), "must be an object"))?;
            let seq_len = s
                .get("seq_len")
                .and_then(as_count)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    Error::config(key("seq_len"), "missing, or not a positive integer")
                })?;
            let tokens = match s.get("tokens") {
                None | Some(Value::Null) => None,
                Some(v) => Some(as_count(v).ok_or_else(|| {
                    Error::config(
                        key("tokens"),
                        format!("expected a non-negative integer, found {v}"),
                    )
                })?),
            };
            let name = match s.get("name") {
                None => format!("stage {i}"),
                Some(Value::String(n)) => n.clone(),
                Some(v) => {
                    return Err(Error::config(
                        key("name"),
                        format!("expected a string, found {v}"),
                    ))
                }
            };
            let allow_base_decrease = match s.get("allow_base_decrease") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(Error::config(
                        key("allow_base_decrease"),
                        format!("expected a boolean, found {v}"),
                    ))
                }
            };
            // The stage as an HF config.json.
            let mut cfg = Map::new();
            cfg.insert("head_dim".into(), head_dim.clone());
            if let Some(p) = top.get("partial_rotary_factor") {
                cfg.insert("partial_rotary_factor".into(), p.clone());
            }
            cfg.insert(
                "max_position_embeddings".into(),
                Value::from(seq_len as u64),
            );
            for k in ["rope_theta", "rope_scaling", "partial_rotary_factor"] {
                if let Some(v) = s.get(k) {
                    cfg.insert(k.into(), v.clone());
                }
            }
            let text = Value::Object(cfg).to_string();
            let config = RopeConfig::from_hf_config(&text).map_err(|e| match e {
                Error::Config { key: k, problem } => Error::Config {
                    key: key(&k),
                    problem,
                },
                other => other,
            })?;
            stages.push(RopeStage {
                name,
                seq_len,
                tokens,
                config,
                allow_base_decrease,
            });
        }
        RopeSchedule::new(stages)
    }

    /// Code Llama's recipe (Rozière et al. 2023, "Code Llama: Open Foundation Models for
    /// Code", §2.4): Llama 2 pre-trained at 4,096 tokens with base 10,000 (2T tokens, Llama 2
    /// paper), then long-context fine-tuning on 16,384-token sequences with the base raised
    /// to 1,000,000 (its token count left unset here). `head_dim` 128 for every size.
    ///
    /// # Errors
    /// None for valid `head_dim`s (see [`RopeConfig::builder`]).
    pub fn code_llama(head_dim: usize) -> Result<Self> {
        RopeSchedule::new(vec![
            stage(
                "llama2 pretraining",
                4096,
                Some(2_000_000_000_000),
                head_dim,
                1e4,
                RopeScaling::Default,
            )?,
            stage(
                "code llama long-context fine-tuning",
                16384,
                None,
                head_dim,
                1e6,
                RopeScaling::Default,
            )?,
        ])
    }

    /// Qwen2.5's recipe (Qwen2.5 Technical Report, 2024, §3.2 and §3.3): pre-training at
    /// 4,096 tokens with base 10,000, a final pre-training stage at 32,768 tokens with the
    /// base raised to 1,000,000 (ABF), and YaRN with factor 4 over the 32,768-token original
    /// length to reach 131,072 (attention factor `0.1 ln 4 + 1`). Token counts are not
    /// given per stage (18T in all).
    ///
    /// # Errors
    /// None for valid `head_dim`s.
    pub fn qwen2_5(head_dim: usize) -> Result<Self> {
        RopeSchedule::new(vec![
            stage(
                "pretraining",
                4096,
                None,
                head_dim,
                1e4,
                RopeScaling::Default,
            )?,
            stage(
                "long-context pretraining (ABF)",
                32768,
                None,
                head_dim,
                1e6,
                RopeScaling::Default,
            )?,
            stage(
                "yarn x4",
                131072,
                None,
                head_dim,
                1e6,
                RopeScaling::Yarn {
                    factor: 4.0,
                    original_max_position_embeddings: 32768,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: None,
                    mscale_all_dim: None,
                    attention_factor: None,
                    truncate: true,
                },
            )?,
        ])
    }

    /// Llama 3.1's recipe as far as it is published (Llama 3 Herd of Models, 2024, §3.1.2
    /// and §3.4.2, and the released config.json): pre-training at 8,192 tokens with base
    /// 500,000, then context extension to 131,072 tokens "in six stages" over about 800B
    /// tokens, the released model using the `llama3` rule (factor 8, low_freq_factor 1,
    /// high_freq_factor 4, original 8,192). The lengths of the four intermediate stages are
    /// not published; insert them with [`RopeSchedule::new`] if your run has them.
    ///
    /// # Errors
    /// None for valid `head_dim`s.
    pub fn llama3_1(head_dim: usize) -> Result<Self> {
        RopeSchedule::new(vec![
            stage(
                "pretraining",
                8192,
                None,
                head_dim,
                5e5,
                RopeScaling::Default,
            )?,
            stage(
                "long-context pretraining (llama3 rule)",
                131072,
                Some(800_000_000_000),
                head_dim,
                5e5,
                RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                },
            )?,
        ])
    }
}

fn stage(
    name: &str,
    seq_len: usize,
    tokens: Option<u64>,
    head_dim: usize,
    base: f64,
    scaling: RopeScaling,
) -> Result<RopeStage> {
    Ok(RopeStage {
        name: name.into(),
        seq_len,
        tokens,
        config: RopeConfig::builder(head_dim)
            .base(base)
            .max_position_embeddings(seq_len)
            .scaling(scaling)
            .build()?,
        allow_base_decrease: false,
    })
}

/// A JSON count: a non-negative integer, or an integral float below 2^53.
fn as_count(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15)
            .map(|x| x as u64)
    })
}

/// What a configuration does to one rotary pair, relative to the same base unscaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Band {
    /// Frequency unchanged (high-frequency pairs: extrapolated as trained).
    Unchanged,
    /// Frequency divided by the full factor (low-frequency pairs: interpolated).
    Interpolated,
    /// In between (YaRN's ramp, Llama 3.1's smoothing, dynamic NTK's graded base, a
    /// LongRoPE factor between 1 and its largest).
    Blended,
}

/// One pair's frequency, wavelength and band.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairBand {
    /// Pair index.
    pub pair: usize,
    /// Wavelength `2 pi / inv_freq` in positions.
    pub wavelength: f64,
    /// `inv_freq / inv_freq_unscaled`: 1 unchanged, `1 / factor` interpolated.
    pub ratio: f64,
    /// The band.
    pub band: Band,
}

/// Each pair's band under `config` at `seq_len` (dynamic NTK and LongRoPE depend on it):
/// the ratio of its inverse frequency to the same base's unscaled one, classified as
/// unchanged (ratio 1), interpolated (the smallest ratio the rule produces: `1 / factor`
/// for PI, YaRN and Llama 3.1) or blended.
pub fn frequency_bands(config: &RopeConfig, seq_len: usize) -> Vec<PairBand> {
    let scaled = config.inv_freq_f64(seq_len);
    let dim = config.rotary_dim();
    let full = match config.scaling() {
        RopeScaling::Linear { factor }
        | RopeScaling::Yarn { factor, .. }
        | RopeScaling::Llama3 { factor, .. } => Some(1.0 / factor),
        _ => None,
    };
    scaled
        .iter()
        .enumerate()
        .map(|(i, &inv)| {
            let plain = config.base().powf(-2.0 * i as f64 / dim as f64);
            let ratio = inv / plain;
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-300);
            let band = if close(ratio, 1.0) {
                Band::Unchanged
            } else if full.is_some_and(|f| close(ratio, f)) {
                Band::Interpolated
            } else {
                Band::Blended
            };
            PairBand {
                pair: i,
                wavelength: 2.0 * std::f64::consts::PI / inv,
                ratio,
                band,
            }
        })
        .collect()
}
