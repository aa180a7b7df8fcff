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

/// An attention benchmark shape: heads and head dims (bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Short name for tables.
    pub name: &'static str,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Channels of Q and K.
    pub head_dim: usize,
    /// Channels of V.
    pub head_dim_v: usize,
}

/// The backward sweep's shapes: the forward's plus DeepSeek's MLA prefill (192 / 128).
pub fn attention_backward_shapes() -> Vec<AttnShape> {
    let mut v = attention_shapes();
    v.push(AttnShape {
        name: "mla-192-128",
        heads_q: 16,
        heads_kv: 16,
        head_dim: 192,
        head_dim_v: 128,
    });
    v
}

/// FlashAttention's benchmark shapes (model dim 2048: 32 heads of 64, 16 heads of 128) and
/// Llama-3-8B's GQA (32 query heads, 8 KV heads, d 128).
pub fn attention_shapes() -> Vec<AttnShape> {
    vec![
        AttnShape {
            name: "mha-d64",
            heads_q: 32,
            heads_kv: 32,
            head_dim: 64,
            head_dim_v: 64,
        },
        AttnShape {
            name: "mha-d128",
            heads_q: 16,
            heads_kv: 16,
            head_dim: 128,
            head_dim_v: 128,
        },
        AttnShape {
            name: "llama3-8b-gqa",
            heads_q: 32,
            heads_kv: 8,
            head_dim: 128,
            head_dim_v: 128,
        },
    ]
}

/// One attention backward benchmark case: the forward's buffers plus dO, the gradients and
/// the workspace, all allocated once.
pub struct AttnBwdRun {
    /// The forward run whose O and LSE the backward consumes.
    pub fwd: AttnRun,
    dout: CudaSlice<bf16>,
    dq: CudaSlice<bf16>,
    dk: CudaSlice<bf16>,
    dv: CudaSlice<bf16>,
    workspace: CudaSlice<f32>,
}

impl AttnBwdRun {
    /// Allocates, fills, and runs the forward once (for O and the LSE).
    ///
    /// # Errors
    /// As [`AttnRun::new`] and the forward launch.
    pub fn new(
        dev: &Device,
        shape: AttnShape,
        batch: usize,
        seqlen: usize,
        opts: crate::attention::AttentionOptions,
        seed: u64,
    ) -> Result<Self> {
        let mut fwd = AttnRun::new(dev, shape, batch, seqlen, opts, seed)?;
        fwd.run(dev)?;
        let t = batch * seqlen;
        let ws = crate::attention::backward_workspace_len(t, shape.heads_q, shape.head_dim)?;
        Ok(AttnBwdRun {
            dout: filled(dev, &fwd.block[1..], t * shape.heads_q * shape.head_dim_v)?,
            dq: dev.zeros::<bf16>((t * shape.heads_q * shape.head_dim).max(1))?,
            dk: dev.zeros::<bf16>((t * shape.heads_kv * shape.head_dim).max(1))?,
            dv: dev.zeros::<bf16>((t * shape.heads_kv * shape.head_dim_v).max(1))?,
            workspace: dev.zeros::<f32>(ws.max(1))?,
            fwd,
        })
    }

    /// One backward pass (dQ, dK, dV), deterministic or not.
    ///
    /// # Errors
    /// Whatever the launches return.
    pub fn run(&mut self, dev: &Device, deterministic: bool) -> Result<()> {
        let [ql, kl, vl, ol] = self.fwd.layouts();
        let f = &self.fwd;
        crate::attention::attention_backward(
            dev,
            &crate::attention::Qkv {
                q: &f.q,
                q_layout: ql,
                k: &f.k,
                k_layout: kl,
                v: &f.v,
                v_layout: vl,
            },
            &crate::attention::BackwardInputs {
                o: &f.o,
                o_layout: ol,
                dout: &self.dout,
                dout_layout: ol,
                lse: &f.lse,
            },
            crate::attention::AttnGrads {
                dq: &mut self.dq,
                dq_layout: ql,
                dk: &mut self.dk,
                dk_layout: kl,
                dv: &mut self.dv,
                dv_layout: vl,
            },
            &mut self.workspace,
            &f.seqlens,
            &crate::attention::BackwardOptions {
                attention: f.opts,
                accumulate: false,
                deterministic,
            },
        )
    }

    /// FLOPs of one backward pass: 2.5 x the forward's (FlashAttention's count: five
    /// matrix products against the forward's two).
    pub fn flops(&self) -> f64 {
        2.5 * self.fwd.flops()
    }
}

/// Elements of the random block that fills attention buffers by repetition: a prime, so
/// rows of any power-of-two width see different data, and small enough that a 1M-token
/// run needs no multi-GB host copy.
const ATTN_FILL: usize = 1_000_003;

/// Device buffers for one attention run: `batch` sequences of `seqlen` tokens, dense
/// layouts, bf16 data uniform in [-1, 1) (one random block repeated; element e of each
/// tensor holds block[e % ATTN_FILL]).
pub struct AttnRun {
    /// The shape.
    pub shape: AttnShape,
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seqlen: usize,
    /// Options (mask, scale, softcap).
    pub opts: crate::attention::AttentionOptions,
    block: Vec<bf16>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    seqlens: crate::attention::SeqLens,
}

fn filled(dev: &Device, block: &[bf16], len: usize) -> Result<CudaSlice<bf16>> {
    let mut buf = dev.zeros::<bf16>(len.max(1))?;
    let mut start = 0;
    while start < len {
        let n = block.len().min(len - start);
        dev.stream()
            .memcpy_htod(&block[..n], &mut buf.slice_mut(start..start + n))
            .map_err(crate::device::cuda_err("upload"))?;
        start += n;
    }
    Ok(buf)
}

impl AttnRun {
    /// Allocates and fills the buffers.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] for sizes the kernel rejects; [`crate::Error::Cuda`]
    /// on allocation or upload failure.
    pub fn new(
        dev: &Device,
        shape: AttnShape,
        batch: usize,
        seqlen: usize,
        opts: crate::attention::AttentionOptions,
        seed: u64,
    ) -> Result<Self> {
        let mut s = seed;
        let block: Vec<bf16> = (0..ATTN_FILL)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let t = batch * seqlen;
        Ok(AttnRun {
            shape,
            batch,
            seqlen,
            opts,
            q: filled(dev, &block, t * shape.heads_q * shape.head_dim)?,
            k: filled(dev, &block, t * shape.heads_kv * shape.head_dim)?,
            v: filled(dev, &block, t * shape.heads_kv * shape.head_dim_v)?,
            o: dev.zeros::<bf16>((t * shape.heads_q * shape.head_dim_v).max(1))?,
            lse: dev.zeros::<f32>((t * shape.heads_q).max(1))?,
            seqlens: crate::attention::SeqLens::uniform(dev, batch, seqlen, seqlen)?,
            block,
        })
    }

    fn layouts(&self) -> [HeadsLayout; 4] {
        let t = self.batch * self.seqlen;
        let s = &self.shape;
        [
            HeadsLayout::contiguous(t, s.heads_q, s.head_dim),
            HeadsLayout::contiguous(t, s.heads_kv, s.head_dim),
            HeadsLayout::contiguous(t, s.heads_kv, s.head_dim_v),
            HeadsLayout::contiguous(t, s.heads_q, s.head_dim_v),
        ]
    }

    /// One forward pass (O and LSE).
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run(&mut self, dev: &Device) -> Result<()> {
        let [ql, kl, vl, ol] = self.layouts();
        let qkv = crate::attention::Qkv {
            q: &self.q,
            q_layout: ql,
            k: &self.k,
            k_layout: kl,
            v: &self.v,
            v_layout: vl,
        };
        let out = crate::attention::AttnOutput {
            o: &mut self.o,
            o_layout: ol,
            lse: Some(&mut self.lse),
        };
        crate::attention::attention_forward(dev, &qkv, out, &self.seqlens, &self.opts)
    }

    /// FLOPs of one run, FlashAttention 3's count (exact for the mask).
    pub fn flops(&self) -> f64 {
        let s = &self.shape;
        crate::attention::forward_flops(
            &self.opts.mask,
            &vec![(self.seqlen, self.seqlen); self.batch],
            s.heads_q,
            s.head_dim,
            s.head_dim_v,
        )
    }

    /// Runs once and returns the largest |O - reference| and |LSE - reference| over
    /// `samples` query rows (spread over the batch, the sequence and the heads), each
    /// checked against f64 attention over exactly its visible keys.
    ///
    /// # Errors
    /// Launch or copy failures.
    pub fn max_error(&mut self, dev: &Device, samples: usize) -> Result<(f64, f64)> {
        self.run(dev)?;
        let o = dev.download(&self.o)?;
        let lse = dev.download(&self.lse)?;
        let s = self.shape;
        let t = self.batch * self.seqlen;
        let at = |e: usize| self.block[e % ATTN_FILL].to_f64();
        let scale = f64::from(self.opts.scale_for(s.head_dim));
        let group = s.heads_q / s.heads_kv;
        let (mut worst_o, mut worst_lse) = (0.0f64, 0.0f64);
        for i in 0..samples.max(1) {
            // Spread rows: the last row of the last sequence, the first, and others between.
            let token = if i == 0 { t - 1 } else { (i * 7919 * 131) % t };
            let (b, row) = (token / self.seqlen, token % self.seqlen);
            let h = (i * 5) % s.heads_q;
            let keys = self.opts.mask.visible_keys(row, self.seqlen, self.seqlen);
            let q: Vec<f64> = (0..s.head_dim)
                .map(|c| at((token * s.heads_q + h) * s.head_dim + c))
                .collect();
            let k: Vec<f64> = keys
                .clone()
                .flat_map(|j| {
                    let base = ((b * self.seqlen + j) * s.heads_kv + h / group) * s.head_dim;
                    (0..s.head_dim).map(move |c| base + c)
                })
                .map(at)
                .collect();
            let v: Vec<f64> = keys
                .clone()
                .flat_map(|j| {
                    let base = ((b * self.seqlen + j) * s.heads_kv + h / group) * s.head_dim_v;
                    (0..s.head_dim_v).map(move |c| base + c)
                })
                .map(at)
                .collect();
            let p = crate::attention::reference::Problem {
                q: &q,
                k: &k,
                v: &v,
                cu_seqlens_q: &[0, 1],
                cu_seqlens_k: &[0, keys.len()],
                heads_q: 1,
                heads_kv: 1,
                head_dim: s.head_dim,
                head_dim_v: s.head_dim_v,
                scale,
                softcap: self.opts.softcap.map(f64::from),
                mask: crate::attention::Mask::none(),
            };
            let want = crate::attention::reference::attention_f64(&p)?;
            for c in 0..s.head_dim_v {
                let g = o[(token * s.heads_q + h) * s.head_dim_v + c].to_f64();
                worst_o = worst_o.max((g - want.o[c]).abs());
            }
            let gl = f64::from(lse[h * t + token]);
            let e = if gl == want.lse[0] {
                0.0
            } else {
                (gl - want.lse[0]).abs()
            };
            worst_lse = worst_lse.max(if e.is_nan() { f64::INFINITY } else { e });
        }
        Ok((worst_o, worst_lse))
    }
}

// ---------------------------------------------------------------- MoE routing

pub use moe_workloads::{moe_shapes, MoeCheck, MoeRun, MoeShape};

mod moe_workloads {
    use cudarc::driver::{CudaSlice, DevicePtr};
    use half::bf16;

    use crate::device::{cuda_err, Device};
    use crate::error::Result;
    use crate::moe::reference::route_f64;
    use crate::moe::{
        combine, gather, permute, route, route_backward, LossOptions, Permutation, PermuteOptions,
        RouterConfig, Routing,
    };

    /// A model's routed MoE layer: its router, hidden size, and whether it has DeepSeek-V3's
    /// correction bias.
    #[derive(Debug, Clone)]
    pub struct MoeShape {
        /// Short name for tables.
        pub name: &'static str,
        /// The router.
        pub router: RouterConfig,
        /// Hidden size of the states gathered and combined.
        pub hidden: usize,
        /// Whether routing uses a correction bias.
        pub bias: bool,
        /// Segment padding of the permutation (a grouped GEMM's M tile).
        pub block: usize,
    }

    /// Mixtral-8x7B (8 experts, top-2, hidden 4096), Qwen3-MoE-235B (128 experts, top-8,
    /// hidden 4096) and DeepSeek-V3 (256 experts in 8 groups, 4 kept, top-8, hidden 7168).
    pub fn moe_shapes() -> Vec<MoeShape> {
        vec![
            MoeShape {
                name: "mixtral-8x7b",
                router: RouterConfig::mixtral(8, 2),
                hidden: 4096,
                bias: false,
                block: 128,
            },
            MoeShape {
                name: "qwen3-moe",
                router: RouterConfig::qwen_moe(128, 8, true),
                hidden: 4096,
                bias: false,
                block: 128,
            },
            MoeShape {
                name: "deepseek-v3",
                router: RouterConfig::deepseek_v3_default(),
                hidden: 7168,
                bias: true,
                block: 128,
            },
        ]
    }

    /// Worst errors of one MoE pass against the reference on sampled tokens.
    #[derive(Debug, Clone, Copy)]
    pub struct MoeCheck {
        /// Sampled tokens whose chosen ids differ from the reference's.
        pub id_mismatches: usize,
        /// Largest |weight - reference| over sampled tokens with matching ids.
        pub weight_err: f64,
        /// Largest error of gather then combine through identity experts (each row comes
        /// back times the sum of its weights), relative to that row's largest magnitude.
        pub combine_err: f64,
    }

    fn splitmix(state: &mut u64) -> f64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// Distinct hidden rows; token t gets row pattern (t * 7919) % PATTERN_ROWS, so large
    /// runs fill quickly and the check knows every row.
    const PATTERN_ROWS: usize = 61;

    /// Device buffers for one MoE layer pass: f32 router logits, bf16 hidden states, the
    /// routing, permutation and combine outputs, and gradient buffers.
    pub struct MoeRun {
        /// The shape.
        pub shape: MoeShape,
        /// Tokens.
        pub tokens: usize,
        logits_host: Vec<f32>,
        bias_host: Vec<f32>,
        rows_host: Vec<Vec<bf16>>,
        logits: CudaSlice<f32>,
        bias: CudaSlice<f32>,
        routing: Routing,
        perm: Permutation,
        x: CudaSlice<bf16>,
        xp: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
        d_weights: CudaSlice<f32>,
        d_logits: CudaSlice<f32>,
    }

    impl MoeRun {
        /// Allocates and fills buffers for `tokens` tokens (logits uniform in [-3, 3),
        /// hidden rows from a fixed random pattern, biases small multiples of 1/64).
        ///
        /// # Errors
        /// Validation or allocation failures.
        pub fn new(dev: &Device, shape: &MoeShape, tokens: usize, seed: u64) -> Result<Self> {
            let mut s = seed;
            let e = shape.router.experts;
            let k = shape.router.top_k;
            let logits_host: Vec<f32> = (0..tokens * e)
                .map(|_| (3.0 * splitmix(&mut s)) as f32)
                .collect();
            let bias_host: Vec<f32> = (0..e)
                .map(|_| ((8.0 * splitmix(&mut s)).round() / 64.0) as f32)
                .collect();
            let rows_host: Vec<Vec<bf16>> = (0..PATTERN_ROWS)
                .map(|_| {
                    (0..shape.hidden)
                        .map(|_| bf16::from_f64(splitmix(&mut s)))
                        .collect()
                })
                .collect();
            let mut x_host = Vec::with_capacity(tokens * shape.hidden);
            for t in 0..tokens {
                x_host.extend_from_slice(&rows_host[(t * 7919) % PATTERN_ROWS]);
            }
            let opts = PermuteOptions {
                block: shape.block,
                capacity_factor: None,
            };
            let perm = Permutation::new(dev, tokens, k, e, opts)?;
            let rows = perm.plan().max_slots;
            let d_weights_host: Vec<f32> =
                (0..tokens * k).map(|_| splitmix(&mut s) as f32).collect();
            Ok(MoeRun {
                logits: dev.upload(&logits_host)?,
                bias: dev.upload(&bias_host)?,
                routing: Routing::new(dev, &shape.router, tokens)?,
                x: dev.upload(&x_host)?,
                xp: dev.zeros(rows * shape.hidden)?,
                y: dev.zeros(tokens * shape.hidden)?,
                d_weights: dev.upload(&d_weights_host)?,
                d_logits: dev.zeros(tokens * e)?,
                perm,
                shape: shape.clone(),
                tokens,
                logits_host,
                bias_host,
                rows_host,
            })
        }

        /// The fused gating kernel.
        ///
        /// # Errors
        /// Whatever the launch returns.
        pub fn gate(&mut self, dev: &Device) -> Result<()> {
            let bias = self.shape.bias.then_some(&self.bias as &dyn DevicePtr<f32>);
            route(
                dev,
                &self.shape.router,
                &self.logits,
                self.tokens,
                bias,
                &mut self.routing,
            )
        }

        /// The permutation (counts, scan, scatter).
        ///
        /// # Errors
        /// Whatever the launches return.
        pub fn permute(&mut self, dev: &Device) -> Result<()> {
            permute(dev, self.routing.ids(), &mut self.perm)
        }

        /// Hidden states into expert order.
        ///
        /// # Errors
        /// Whatever the launch returns.
        pub fn gather(&mut self, dev: &Device) -> Result<()> {
            gather(
                dev,
                &self.perm,
                &self.x,
                self.shape.hidden,
                None,
                &mut self.xp,
            )
        }

        /// Weighted combine back to token order, the expert-ordered states standing in for
        /// the experts' outputs (identity experts).
        ///
        /// # Errors
        /// Whatever the launch returns.
        pub fn combine(&mut self, dev: &Device) -> Result<()> {
            combine(
                dev,
                &self.perm,
                &self.xp,
                self.shape.hidden,
                Some(self.routing.weights()),
                &mut self.y,
            )
        }

        /// The router's backward: weights' gradient plus load-balancing and z-loss terms.
        ///
        /// # Errors
        /// Whatever the launch returns.
        pub fn backward(&mut self, dev: &Device) -> Result<()> {
            route_backward(
                dev,
                &self.shape.router,
                &self.logits,
                self.tokens,
                self.routing.ids(),
                Some(&self.d_weights),
                Some(&self.perm),
                LossOptions {
                    aux_coef: 0.001,
                    z_coef: 0.001,
                },
                &mut self.d_logits,
            )
        }

        /// Bytes the gating must move: logits read, ids and weights written.
        pub fn gate_bytes(&self) -> usize {
            let r = &self.shape.router;
            self.tokens * (r.experts * 4 + r.top_k * 8)
        }

        /// Bytes the permutation must move at least: ids read, slot_of and slot_assignment
        /// written.
        pub fn permute_bytes(&self) -> usize {
            self.tokens * self.shape.router.top_k * 12
        }

        /// Bytes the gather must move: each assignment's row read from its token and
        /// written in expert order (padding rows not counted).
        pub fn gather_bytes(&self) -> usize {
            2 * self.tokens * self.shape.router.top_k * self.shape.hidden * 2
        }

        /// Bytes the combine moves: every kept expert row read, every token row written.
        pub fn combine_bytes(&self) -> usize {
            let a = self.tokens * self.shape.router.top_k;
            (a + self.tokens) * self.shape.hidden * 2
        }

        /// Bytes of the router backward: logits read, weight gradients and ids read, logit
        /// gradients written.
        pub fn backward_bytes(&self) -> usize {
            let r = &self.shape.router;
            self.tokens * (r.experts * 8 + r.top_k * 8)
        }

        /// Runs gate, permute, gather and combine once and compares `samples` tokens spread
        /// over the run with the reference.
        ///
        /// # Errors
        /// Launch or copy failures.
        pub fn check(&mut self, dev: &Device, samples: usize) -> Result<MoeCheck> {
            self.gate(dev)?;
            self.permute(dev)?;
            self.gather(dev)?;
            self.combine(dev)?;
            let (ids, w) = self.routing.download(dev)?;
            let r = self.shape.router;
            let (e, k, h) = (r.experts, r.top_k, self.shape.hidden);
            let bias: Vec<f64> = self.bias_host.iter().map(|&b| f64::from(b)).collect();
            let mut out = MoeCheck {
                id_mismatches: 0,
                weight_err: 0.0,
                combine_err: 0.0,
            };
            let step = (self.tokens / samples.max(1)).max(1);
            for t in (0..self.tokens).step_by(step) {
                let z: Vec<f64> = self.logits_host[t * e..(t + 1) * e]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                let want = route_f64(&r, &z, 1, self.shape.bias.then_some(&bias[..]))?;
                if want.ids[..] != ids[t * k..(t + 1) * k] {
                    out.id_mismatches += 1;
                    continue;
                }
                for j in 0..k {
                    let err = (f64::from(w[t * k + j]) - want.weights[j]).abs();
                    out.weight_err = out.weight_err.max(err);
                }
                let wsum: f64 = w[t * k..(t + 1) * k].iter().map(|&v| f64::from(v)).sum();
                let row = dev
                    .stream()
                    .clone_dtoh(&self.y.slice(t * h..(t + 1) * h))
                    .map_err(cuda_err("download"))?;
                let x = &self.rows_host[(t * 7919) % PATTERN_ROWS];
                let mag = x.iter().fold(0.0f64, |m, v| m.max(v.to_f64().abs())) * wsum.abs();
                for (g, xv) in row.iter().zip(x) {
                    let err = (g.to_f64() - wsum * xv.to_f64()).abs() / mag.max(1e-30);
                    out.combine_err = out.combine_err.max(err);
                }
            }
            Ok(out)
        }
    }
}

mod decode;
pub use decode::{decode_models, DecodeModel, DecodeRun, MlaRun};
