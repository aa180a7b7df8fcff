//! DeepSeek's multi-head latent attention (MLA): the model shape read from a config.json,
//! the softmax scale DeepSeek-V2/V3 use, and the f64 references that prove the absorbed
//! decode form equal to the naive one ([`reference`](mod@reference)).
//!
//! Per token and layer the cache holds one latent `c_kv` (`kv_lora_rank` = 512 values, already
//! normalised by the model) and one rotated key part `k_pe` (`qk_rope_head_dim` = 64), shared
//! by every head. Naive attention expands the latent through the up-projection
//! `kv_b_proj` (`W_UK` for the keys' no-rope part, `W_UV` for the values) per head; decode
//! instead absorbs `W_UK` into the query (`q_abs = W_UK^T q_nope`) and `W_UV` into the
//! output (`o = W_UV o_lat`), which turns it into multi-query attention with one KV head of
//! `kv_lora_rank + qk_rope_head_dim` = 576 channels whose first 512 are also the values.

use serde_json::Value;

use crate::error::{Error, Result};

mod append;
mod decode;
pub mod reference;

pub use append::{append_latent, LatentCacheMut, MlaAppendShape, MlaAppendValidated, NewLatent};
#[cfg(feature = "emulator")]
pub(crate) use append::{plan_mla_append, MlaAppendAddrs};
pub use decode::{
    decode_absorbed, decode_absorbed_raw, latent_layout, mla_decode_smem_bytes, plan_mla_decode,
    LatentCache, LatentCacheShape, MlaDecodeOptions, MlaDecodePlan, MlaDecodeShape,
    MlaDecodeValidated, RawLatentCache, MAX_MLA_HEADS, MLA_CLUSTER_SMEM_BYTES, MLA_KV_LORA_RANK,
    MLA_LATENT_DIM, MLA_MAX_CLUSTER, MLA_ROPE_DIM, MLA_ROWS_NARROW, MLA_ROWS_WIDE, MLA_TILE_KEYS,
    MLA_WIDE_SMEM_BYTES,
};
#[cfg(feature = "emulator")]
pub(crate) use decode::{plan_mla_decode_launch, MlaDecodeAddrs};

/// The attention shape of an MLA model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// Query heads (`num_attention_heads`; a tensor-parallel shard has fewer).
    pub heads: usize,
    /// Latent width `kv_lora_rank` (512 in DeepSeek-V2/V3).
    pub kv_lora_rank: usize,
    /// Per-head no-rope query/key width `qk_nope_head_dim` (128).
    pub qk_nope_head_dim: usize,
    /// Rotated query/key width `qk_rope_head_dim` (64).
    pub qk_rope_head_dim: usize,
    /// Per-head value width `v_head_dim` (128).
    pub v_head_dim: usize,
    /// The softmax scale: `(qk_nope_head_dim + qk_rope_head_dim)^-0.5`, times `mscale^2`
    /// under YaRN scaling with `mscale_all_dim` (see [`MlaConfig::from_hf_config`]).
    pub softmax_scale: f64,
}

/// DeepSeek's YaRN attention-scale correction: `0.1 mscale ln(factor) + 1` for a factor
/// above 1, else 1 (DeepSeek-V2/V3 modeling code, `yarn_get_mscale`).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

impl MlaConfig {
    /// DeepSeek-V3's shape (671B; also V3.1, R1): 128 heads, latent 512, no-rope 128, rope
    /// 64, values 128, YaRN factor 40 with `mscale_all_dim` 1, so the softmax scale is
    /// `192^-0.5 x (0.1 ln 40 + 1)^2`.
    pub fn deepseek_v3() -> Self {
        let m = yarn_mscale(40.0, 1.0);
        MlaConfig {
            heads: 128,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            softmax_scale: (192f64).powf(-0.5) * m * m,
        }
    }

    /// Width of one head's query and key: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Channels of the absorbed form's single KV head: `kv_lora_rank + qk_rope_head_dim`.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Checks that every width is nonzero, the sums fit, and the scale is finite and
    /// positive.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending key.
    pub fn validate(&self) -> Result<()> {
        for (v, key) in [
            (self.heads, "num_attention_heads"),
            (self.kv_lora_rank, "kv_lora_rank"),
            (self.qk_nope_head_dim, "qk_nope_head_dim"),
            (self.qk_rope_head_dim, "qk_rope_head_dim"),
            (self.v_head_dim, "v_head_dim"),
        ] {
            if v == 0 || v > 1 << 16 {
                return Err(Error::config(key, format!("{v} outside 1..=65536")));
            }
        }
        if !(self.softmax_scale.is_finite() && self.softmax_scale > 0.0) {
            return Err(Error::config(
                "softmax_scale",
                format!("{} must be finite and > 0", self.softmax_scale),
            ));
        }
        Ok(())
    }

    /// Reads the MLA shape from the text of a DeepSeek-V2/V3 `config.json` (HF layout):
    /// `num_attention_heads`, `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`,
    /// `v_head_dim`; the scale is `(qk_nope_head_dim + qk_rope_head_dim)^-0.5`, and when
    /// `rope_scaling` has a nonzero `mscale_all_dim`, times
    /// `yarn_mscale(factor, mscale_all_dim)^2` (DeepSeek's modeling code; the RoPE
    /// family's YaRN attention factor, `mscale / mscale_all_dim`, multiplies cos and sin
    /// separately).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key when the text is not a JSON object, a key is
    /// missing or not a positive integer / finite number, or the result fails
    /// [`MlaConfig::validate`].
    pub fn from_hf_config(json: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(json)
            .map_err(|e| Error::config("config.json", format!("is not valid JSON: {e}")))?;
        let top = root
            .as_object()
            .ok_or_else(|| Error::config("config.json", "must be a JSON object"))?;
        let uint = |key: &str| -> Result<usize> {
            let v = top
                .get(key)
                .ok_or_else(|| Error::config(key, "missing; required for MLA"))?;
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    Error::config(key, format!("expected a positive integer, found {v}"))
                })
        };
        let heads = uint("num_attention_heads")?;
        let kv_lora_rank = uint("kv_lora_rank")?;
        let qk_nope_head_dim = uint("qk_nope_head_dim")?;
        let qk_rope_head_dim = uint("qk_rope_head_dim")?;
        let v_head_dim = uint("v_head_dim")?;
        let qk = qk_nope_head_dim
            .checked_add(qk_rope_head_dim)
            .ok_or_else(|| Error::config("qk_rope_head_dim", "qk head dim overflows"))?;
        let mut scale = (qk as f64).powf(-0.5);
        if let Some(rs) = top.get("rope_scaling").and_then(Value::as_object) {
            let num = |key: &str| -> Result<Option<f64>> {
                match rs.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .filter(|x| x.is_finite())
                        .map(Some)
                        .ok_or_else(|| {
                            Error::config(
                                format!("rope_scaling.{key}"),
                                format!("expected a finite number, found {v}"),
                            )
                        }),
                }
            };
            let all_dim = num("mscale_all_dim")?.unwrap_or(0.0);
            if all_dim != 0.0 {
                let factor = num("factor")?.ok_or_else(|| {
                    Error::config(
                        "rope_scaling.factor",
                        "missing; required with mscale_all_dim",
                    )
                })?;
                let m = yarn_mscale(factor, all_dim);
                scale *= m * m;
            }
        }
        let c = MlaConfig {
            heads,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            softmax_scale: scale,
        };
        c.validate()?;
        Ok(c)
    }
}
