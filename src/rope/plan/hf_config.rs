//! Reading HF transformers' `config.json` into a [`RopeConfig`]: the keys, their precedence
//! and their JSON types. The formulas and the validation both parsed and built
//! configurations go through stay in the parent module.

use serde_json::{Map, Value};

#[allow(clippy::wildcard_imports)]
use super::*;

impl RopeConfig {
    /// Reads the rotary settings from the text of an HF transformers `config.json`.
    ///
    /// Keys read, with HF's precedence:
    /// * the rope head dimension: `qk_rope_head_dim` (DeepSeek's MLA), else `head_dim`, else
    ///   `hidden_size / num_attention_heads` (floor division, as HF);
    /// * the scaling section: legacy `rope_scaling` (`type` or `rope_type`; `null` means
    ///   default) or, when that is absent, null or empty, transformers-5 `rope_parameters`.
    ///   Legacy type `su` means `longrope`;
    /// * `rope_theta`: from the section if there, else top level, else 10000;
    /// * `partial_rotary_factor`: from the section if there, else top level, else 1;
    /// * `max_position_embeddings` (top level; needed by `dynamic`, and wherever a value is
    ///   derived from it);
    /// * `original_max_position_embeddings` for `yarn`, `longrope` and `llama3`: top level
    ///   first (Phi-3 keeps it there), then the section, then `max_position_embeddings`.
    ///
    /// Per type, as HF: `linear`, `dynamic` and `llama3` need `factor`; `yarn` needs the
    /// `factor` key, and a `null` factor is derived as
    /// `max_position_embeddings / original_max_position_embeddings`; `longrope` needs
    /// `short_factor` and `long_factor`, its `factor` is optional. Unknown keys are ignored.
    /// A null value counts as absent, except for YaRN's `factor`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the config.json key when the text is not a JSON object, a
    /// required key is missing, a key has the wrong JSON type (a string where a number is
    /// expected, a fraction where an integer is), the `rope_type` is not one of the six
    /// known ones, the section holds per-layer-type parameters, or the values fail the
    /// checks of [`RopeConfigBuilder::build`].
    pub fn from_hf_config(json: &str) -> Result<RopeConfig> {
        let root: Value = serde_json::from_str(json)
            .map_err(|e| Error::config("config.json", format!("is not valid JSON: {e}")))?;
        let top = root.as_object().ok_or_else(|| {
            Error::config(
                "config.json",
                format!("must be a JSON object, found {}", describe(&root)),
            )
        })?;
        parse_config(top)
    }
}

// ---------------------------------------------------------------------------------------
// config.json parsing
// ---------------------------------------------------------------------------------------

type Object = Map<String, Value>;

fn parse_config(top: &Object) -> Result<RopeConfig> {
    let head_dim = parse_head_dim(top)?;
    let max_position_embeddings =
        opt_uint(top, "max_position_embeddings", "max_position_embeddings")?;

    let (section_name, section) = match opt_section(top, "rope_scaling")? {
        Some(s) => ("rope_scaling", Some(s)),
        None => ("rope_parameters", opt_section(top, "rope_parameters")?),
    };
    let empty = Object::new();
    let section = section.unwrap_or(&empty);
    let key = |name: &str| format!("{section_name}.{name}");

    if !section.contains_key("rope_type")
        && !section.contains_key("type")
        && section.values().all(Value::is_object)
    {
        // HF allows one dict per layer type ({"full_attention": {...}, "sliding_attention":
        // {...}}). One RopeConfig describes one rotation.
        if let Some(layer_type) = section.keys().next() {
            return Err(Error::config(
                section_name,
                format!(
                    "holds per-layer-type RoPE parameters (`{layer_type}`, ...); build one RopeConfig \
                     per layer type with RopeConfig::builder"
                ),
            ));
        }
    }

    let base = match opt_num(section, "rope_theta", &key("rope_theta"))? {
        Some(b) => b,
        None => opt_num(top, "rope_theta", "rope_theta")?.unwrap_or(DEFAULT_ROPE_THETA),
    };
    let partial_rotary_factor = match opt_num(
        section,
        "partial_rotary_factor",
        &key("partial_rotary_factor"),
    )? {
        Some(p) => p,
        None => opt_num(top, "partial_rotary_factor", "partial_rotary_factor")?.unwrap_or(1.0),
    };

    let type_key = key("rope_type");
    let rope_type = match present(section, "rope_type").or_else(|| present(section, "type")) {
        None => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(Error::config(
                type_key,
                format!("expected a string, found {}", describe(other)),
            ))
        }
    };

    // Pre-training length for the types that have one: top level first (Phi-3), then the
    // section, then max_position_embeddings (HF's standardize_rope_params).
    let original_len = || -> Result<usize> {
        let top_level = opt_uint(
            top,
            "original_max_position_embeddings",
            "original_max_position_embeddings",
        )?;
        let in_section = opt_uint(
            section,
            "original_max_position_embeddings",
            &key("original_max_position_embeddings"),
        )?;
        top_level
            .or(in_section)
            .or(max_position_embeddings)
            .ok_or_else(|| {
                Error::config(
                    key("original_max_position_embeddings"),
                    "missing, and there is no max_position_embeddings to default it to",
                )
            })
    };

    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: req_num(section, "factor", &key("factor"), "linear")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: req_num(section, "factor", &key("factor"), "dynamic")?,
        },
        "yarn" => {
            let l0 = original_len()?;
            let factor = match section.get("factor") {
                None => {
                    return Err(Error::config(
                        key("factor"),
                        "missing; required for rope_type yarn (null derives it as \
                         max_position_embeddings / original_max_position_embeddings)",
                    ))
                }
                Some(Value::Null) => {
                    let max = max_position_embeddings.ok_or_else(|| {
                        Error::config(
                            "max_position_embeddings",
                            format!("missing; needed to derive the null {}", key("factor")),
                        )
                    })?;
                    if l0 == 0 {
                        return Err(Error::config(
                            key("original_max_position_embeddings"),
                            "must be a positive number of positions, got 0",
                        ));
                    }
                    max as f64 / l0 as f64
                }
                Some(_) => req_num(section, "factor", &key("factor"), "yarn")?,
            };
            let beta_fast = opt_num(section, "beta_fast", &key("beta_fast"))?
                .filter(|&b| b != 0.0)
                .unwrap_or(DEFAULT_BETA_FAST);
            let beta_slow = opt_num(section, "beta_slow", &key("beta_slow"))?
                .filter(|&b| b != 0.0)
                .unwrap_or(DEFAULT_BETA_SLOW);
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: l0,
                beta_fast,
                beta_slow,
                mscale: opt_num(section, "mscale", &key("mscale"))?,
                mscale_all_dim: opt_num(section, "mscale_all_dim", &key("mscale_all_dim"))?,
                attention_factor: opt_num(section, "attention_factor", &key("attention_factor"))?,
                truncate: opt_bool(section, "truncate", &key("truncate"))?.unwrap_or(true),
            }
        }
        "longrope" | "su" => RopeScaling::LongRope {
            short_factor: req_num_list(section, "short_factor", &key("short_factor"))?,
            long_factor: req_num_list(section, "long_factor", &key("long_factor"))?,
            original_max_position_embeddings: original_len()?,
            factor: opt_num(section, "factor", &key("factor"))?,
            attention_factor: opt_num(section, "attention_factor", &key("attention_factor"))?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: req_num(section, "factor", &key("factor"), "llama3")?,
            low_freq_factor: req_num(section, "low_freq_factor", &key("low_freq_factor"), "llama3")?,
            high_freq_factor: req_num(section, "high_freq_factor", &key("high_freq_factor"), "llama3")?,
            original_max_position_embeddings: original_len()?,
        },
        other => {
            return Err(Error::config(
                type_key,
                format!(
                    "unknown RoPE type {other:?}; expected one of \"default\", \"linear\", \"dynamic\", \
                     \"yarn\", \"longrope\" (legacy \"su\"), \"llama3\""
                ),
            ))
        }
    };

    let config = RopeConfig {
        base,
        head_dim,
        partial_rotary_factor,
        max_position_embeddings: max_position_embeddings.unwrap_or(0),
        scaling,
    };
    validate(&config, section_name)?;
    Ok(config)
}

/// The rope head dimension: `qk_rope_head_dim`, else `head_dim`, else
/// `hidden_size / num_attention_heads`.
fn parse_head_dim(top: &Object) -> Result<usize> {
    if let Some(d) = opt_uint(top, "qk_rope_head_dim", "qk_rope_head_dim")? {
        return Ok(d);
    }
    if let Some(d) = opt_uint(top, "head_dim", "head_dim")? {
        return Ok(d);
    }
    let hidden = opt_uint(top, "hidden_size", "hidden_size")?;
    let heads = opt_uint(top, "num_attention_heads", "num_attention_heads")?;
    match (hidden, heads) {
        (Some(hidden), Some(heads)) => hidden
            .checked_div(heads)
            .ok_or_else(|| Error::config("num_attention_heads", "must be positive, got 0")),
        (Some(_), None) => Err(Error::config(
            "num_attention_heads",
            "missing; needed with hidden_size to derive the head dimension, as head_dim is absent",
        )),
        (None, Some(_)) => Err(Error::config(
            "hidden_size",
            "missing; needed with num_attention_heads to derive the head dimension, as head_dim is absent",
        )),
        (None, None) => Err(Error::config(
            "head_dim",
            "missing, and neither qk_rope_head_dim nor hidden_size and num_attention_heads are there to \
             derive it from",
        )),
    }
}

/// A value that is there and not null.
fn present<'a>(obj: &'a Object, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// An object-valued section; absent, null and `{}` all read as `None`.
fn opt_section<'a>(top: &'a Object, name: &str) -> Result<Option<&'a Object>> {
    match top.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) if m.is_empty() => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(Error::config(
            name,
            format!("expected an object or null, found {}", describe(other)),
        )),
    }
}

fn as_number(v: &Value, full_key: &str) -> Result<f64> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(Error::config(
            full_key,
            format!("expected a number, found {}", describe(v)),
        )),
    }
}

fn opt_num(obj: &Object, name: &str, full_key: &str) -> Result<Option<f64>> {
    present(obj, name)
        .map(|v| as_number(v, full_key))
        .transpose()
}

fn req_num(obj: &Object, name: &str, full_key: &str, rope_type: &str) -> Result<f64> {
    opt_num(obj, name, full_key)?.ok_or_else(|| {
        Error::config(
            full_key,
            format!("missing; required for rope_type {rope_type}"),
        )
    })
}

fn req_num_list(obj: &Object, name: &str, full_key: &str) -> Result<Vec<f64>> {
    match present(obj, name) {
        None => Err(Error::config(
            full_key,
            "missing; required for rope_type longrope",
        )),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| as_number(v, &format!("{full_key}[{i}]")))
            .collect(),
        Some(other) => Err(Error::config(
            full_key,
            format!("expected an array of numbers, found {}", describe(other)),
        )),
    }
}

fn opt_uint(obj: &Object, name: &str, full_key: &str) -> Result<Option<usize>> {
    let Some(v) = present(obj, name) else {
        return Ok(None);
    };
    let bad = || {
        Error::config(
            full_key,
            format!("expected a non-negative integer, found {}", describe(v)),
        )
    };
    let n = if let Some(n) = v.as_u64() {
        n
    } else {
        // Accept integral floats such as 4096.0, which Python would also take.
        match v.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 9.0e15 => x as u64,
            _ => return Err(bad()),
        }
    };
    usize::try_from(n).map(Some).map_err(|_| bad())
}

fn opt_bool(obj: &Object, name: &str, full_key: &str) -> Result<Option<bool>> {
    match present(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::config(
            full_key,
            format!("expected true or false, found {}", describe(other)),
        )),
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let text = v.to_string();
    let mut shown: String = text.chars().take(40).collect();
    if shown.len() < text.len() {
        shown.push_str("...");
    }
    format!("{kind} ({shown})")
}
