//! Realistic workloads shared by the criterion benches and the sweep example, so both time
//! the same shapes the same way.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::device::Device;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::HeadsLayout;
use crate::rope::reference::apply_rope_f64;
use crate::rope::{
    apply_rope, Positions, RopeConfig, RopeOptions, RopeScaling, RopeStyle, RopeTable,
};

/// A model's RoPE shape: how many Q and K heads one token rotates, and its config.
#[derive(Debug, Clone)]
pub struct RopeShape {
    /// Short name for tables.
    pub name: &'static str,
    /// Query heads.
    pub heads_q: usize,
    /// Key heads (one shared k_pe for DeepSeek's MLA).
    pub heads_k: usize,
    /// Pairing the model uses.
    pub style: RopeStyle,
    /// The model's RoPE config.
    pub config: RopeConfig,
}

/// Llama-3.1-8B (32 Q heads, 8 KV heads, d 128, Llama-3 scaling) and DeepSeek-V3's rope
/// part (128 heads of q_pe and one shared k_pe, 64 channels, YaRN factor 40, interleaved).
///
/// # Errors
/// Only if the built-in configs fail validation, which the tests rule out.
pub fn rope_shapes() -> Result<Vec<RopeShape>> {
    let llama = RopeConfig::builder(128)
        .base(500_000.0)
        .max_position_embeddings(131_072)
        .scaling(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
        .build()?;
    let deepseek = RopeConfig::builder(64)
        .base(10_000.0)
        .max_position_embeddings(163_840)
        .scaling(RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(1.0),
            attention_factor: None,
            truncate: true,
        })
        .build()?;
    Ok(vec![
        RopeShape {
            name: "llama3-8b",
            heads_q: 32,
            heads_k: 8,
            style: RopeStyle::Neox,
            config: llama,
        },
        RopeShape {
            name: "deepseek-v3-rope",
            heads_q: 128,
            heads_k: 1,
            style: RopeStyle::Interleaved,
            config: deepseek,
        },
    ])
}

/// Device buffers for one RoPE run: Q and K in bf16, contiguous, random in [-1, 1).
pub struct RopeRun {
    /// The shape.
    pub shape: RopeShape,
    /// Tokens.
    pub tokens: usize,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    host_q: Vec<bf16>,
    host_k: Vec<bf16>,
    positions_host: Vec<i32>,
    positions: Positions,
    table: RopeTable,
}

fn splitmix(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

impl RopeRun {
    /// Allocates and fills buffers for `tokens` tokens at positions 0..tokens.
    ///
    /// # Errors
    /// [`crate::Error::Cuda`] on allocation or upload failure.
    pub fn new(dev: &Device, shape: &RopeShape, tokens: usize, seed: u64) -> Result<Self> {
        Self::new_at(dev, shape, tokens, seed, 0)
    }

    /// As [`RopeRun::new`], with positions first_position..first_position + tokens.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] if a position passes i32::MAX;
    /// [`crate::Error::Cuda`] on allocation or upload failure.
    pub fn new_at(
        dev: &Device,
        shape: &RopeShape,
        tokens: usize,
        seed: u64,
        first_position: i32,
    ) -> Result<Self> {
        let mut s = seed;
        let d = shape.config.head_dim();
        let host_q: Vec<bf16> = (0..tokens * shape.heads_q * d)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let host_k: Vec<bf16> = (0..tokens * shape.heads_k * d)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let last = i64::from(first_position) + tokens as i64;
        if last > i64::from(i32::MAX) {
            return Err(crate::Error::invalid(
                "rope",
                "positions",
                format!("{tokens} tokens from {first_position} pass i32::MAX"),
            ));
        }
        let positions_host: Vec<i32> = (0..tokens).map(|t| first_position + t as i32).collect();
        Ok(RopeRun {
            shape: shape.clone(),
            tokens,
            q: dev.upload(&host_q)?,
            k: dev.upload(&host_k)?,
            positions: Positions::upload(dev, &positions_host)?,
            table: RopeTable::new(dev, &shape.config, last as usize)?,
            host_q,
            host_k,
            positions_host,
        })
    }

    fn layouts(&self) -> (HeadsLayout, HeadsLayout) {
        let d = self.shape.config.head_dim();
        (
            HeadsLayout::contiguous(self.tokens, self.shape.heads_q, d),
            HeadsLayout::contiguous(self.tokens, self.shape.heads_k, d),
        )
    }

    /// One in-place rotation of Q and K.
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run(&mut self, dev: &Device, opts: RopeOptions) -> Result<()> {
        let (ql, kl) = self.layouts();
        apply_rope(
            dev,
            &self.table,
            &self.positions,
            &mut self.q,
            &ql,
            &mut self.k,
            &kl,
            opts,
        )
    }

    /// Bytes one run must move: every rotated element read and written once.
    pub fn bytes(&self) -> usize {
        2 * self.tokens
            * (self.shape.heads_q + self.shape.heads_k)
            * self.shape.config.rotary_dim()
            * bf16::DTYPE.size()
    }

    /// Restores the original inputs, runs once with `opts`, and returns the largest error
    /// relative to each rotated pair's norm over `samples` tokens spread across the run.
    ///
    /// # Errors
    /// Launch or copy failures.
    pub fn max_error(&mut self, dev: &Device, opts: RopeOptions, samples: usize) -> Result<f64> {
        self.q = dev.upload(&self.host_q)?;
        self.k = dev.upload(&self.host_k)?;
        self.run(dev, opts)?;
        let got_q = dev.download(&self.q)?;
        let got_k = dev.download(&self.k)?;
        let cfg = &self.shape.config;
        let seq_len = self.positions_host.last().map_or(0, |&p| p as usize + 1);
        let inv = cfg.inv_freq_f64(seq_len);
        let f = f64::from(cfg.attention_factor());
        let d = cfg.head_dim();
        let rot = cfg.rotary_dim();
        let mut worst = 0.0f64;
        let step = (self.tokens / samples.max(1)).max(1);
        for t in (0..self.tokens).step_by(step) {
            for (heads, input, got) in [
                (self.shape.heads_q, &self.host_q, &got_q),
                (self.shape.heads_k, &self.host_k, &got_k),
            ] {
                let row = &input[t * heads * d..(t + 1) * heads * d];
                let x: Vec<f64> = row.iter().map(|v| v.to_f64()).collect();
                let mut want = x.clone();
                let l = HeadsLayout::contiguous(1, heads, d);
                apply_rope_f64(
                    &mut want,
                    &l,
                    &self.positions_host[t..t + 1],
                    &inv,
                    f,
                    opts.style,
                    opts.direction,
                )?;
                for h in 0..heads {
                    for i in 0..rot / 2 {
                        let (a, b) = match opts.style {
                            RopeStyle::Neox => (h * d + i, h * d + i + rot / 2),
                            RopeStyle::Interleaved => (h * d + 2 * i, h * d + 2 * i + 1),
                        };
                        let norm = x[a].hypot(x[b]) * f + 1e-30;
                        for idx in [a, b] {
                            let g = got[t * heads * d + idx].to_f64();
                            worst = worst.max((g - want[idx]).abs() / norm);
                        }
                    }
                }
            }
        }
        Ok(worst)
    }
}
