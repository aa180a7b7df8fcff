//! Decode over a paged cache at model shapes: the sweep's and the criterion bench's workload.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::splitmix;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kv_cache::{
    append_kv, decode, decode_rotating, extend, plan_decode, AppendRope, CacheDType, DecodeOptions,
    DecodeOutput, DecodePlan, ExtendOptions, Fp8E4m3, KvRotation, KvScales, KvScalesMut, KvStep,
    LseLayout, NewKv, PageTable, PagedCache, PagedCacheMut, PagedKvLayout, ScaleMode, Splits,
    StepTable, MAX_DECODE_QUERIES,
};
use crate::layout::HeadsLayout;
use crate::rope::{AnglePrecision, LengthScaling, RopeConfig, RopeStyle, RopeTable};

/// Elements of the random block the cache is filled with (a prime, so the pattern does not
/// line up with rows or pages).
const FILL: usize = 1_000_003;

/// A decode shape: query and KV heads and the head dim.
#[derive(Debug, Clone, Copy)]
pub struct DecodeModel {
    /// Short name for tables.
    pub name: &'static str,
    /// Query heads.
    pub heads_q: usize,
    /// KV heads.
    pub heads_kv: usize,
    /// Head dim.
    pub head_dim: usize,
}

/// Llama-3-8B (32 query / 8 KV heads, d 128) and a head dim 512 model with few heads
/// (Gemma-style: 8 query heads on 1 KV head).
pub fn decode_models() -> Vec<DecodeModel> {
    vec![
        DecodeModel {
            name: "llama3-8b",
            heads_q: 32,
            heads_kv: 8,
            head_dim: 128,
        },
        DecodeModel {
            name: "hd512-mqa8",
            heads_q: 8,
            heads_kv: 1,
            head_dim: 512,
        },
    ]
}

enum CacheBufs {
    Bf16 {
        k: CudaSlice<bf16>,
        v: CudaSlice<bf16>,
    },
    Fp8 {
        k: CudaSlice<Fp8E4m3>,
        v: CudaSlice<Fp8E4m3>,
        k_scale: CudaSlice<f32>,
        v_scale: CudaSlice<f32>,
    },
}

/// One step of `batch` sequences of `context` cached tokens each (the step's `new` new
/// tokens per sequence are the last of them), bf16 queries, a bf16 or fp8 (per token and
/// head scales) cache in pages of `page_size`, pages spread over the pool in a scrambled
/// order. Cache element e holds block[e % FILL] (times its scale for fp8). Times decode
/// (`new` <= 16), extend (chunked prefill, bf16 or fp8) and append (with fused RoPE); after
/// [`DecodeRun::set_rotating`], decode reads the cache as un-rotated keys and rotates them
/// and the queries on load (`decode_rotating`, the base-500000 rule), to measure what the
/// rotation costs against the plain decode of the same cache.
pub struct DecodeRun {
    /// The model shape.
    pub model: DecodeModel,
    /// Sequences.
    pub batch: usize,
    /// Cached tokens per sequence.
    pub context: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// New tokens per sequence.
    pub new: usize,
    /// The split plan the decode runs use (for `new` <= 16).
    pub plan: Option<DecodePlan>,
    layout: PagedKvLayout,
    table: Vec<i32>,
    max_pages: usize,
    step: KvStep,
    cache: CacheBufs,
    block: Vec<f64>,
    scales: Vec<f32>,
    q_host: Vec<bf16>,
    q: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    k_new: CudaSlice<bf16>,
    v_new: CudaSlice<bf16>,
    rope: RopeTable,
    rope_config: RopeConfig,
    rotation: Option<KvRotation>,
}

fn upload_repeated<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    block: &[T],
    len: usize,
) -> Result<CudaSlice<T>> {
    let mut buf = dev.zeros::<T>(len.max(1))?;
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

impl DecodeRun {
    /// Allocates and fills the cache, the step and the buffers.
    ///
    /// # Errors
    /// Invalid sizes; allocation or copy failures.
    pub fn new(
        dev: &Device,
        model: DecodeModel,
        batch: usize,
        context: usize,
        page_size: usize,
        fp8: bool,
        seed: u64,
    ) -> Result<Self> {
        Self::with_new_tokens(dev, model, batch, context, page_size, fp8, 1, seed)
    }

    /// As [`DecodeRun::new`] with `new` new tokens per sequence (1 ..= context).
    ///
    /// # Errors
    /// Invalid sizes; allocation or copy failures.
    #[allow(clippy::too_many_arguments)]
    pub fn with_new_tokens(
        dev: &Device,
        model: DecodeModel,
        batch: usize,
        context: usize,
        page_size: usize,
        fp8: bool,
        new: usize,
        seed: u64,
    ) -> Result<Self> {
        if new == 0 || new > context {
            return Err(Error::invalid("decode workload", "new", "1 ..= context"));
        }
        let max_pages = context.div_ceil(page_size);
        let pages = batch
            .checked_mul(max_pages)
            .ok_or_else(|| Error::invalid("decode workload", "context", "too large"))?;
        let layout = PagedKvLayout {
            page_size,
            pages,
            heads_kv: model.heads_kv,
            head_dim: model.head_dim,
        };
        let n = layout.cache_len()?;
        // Scrambled page ids: a stride coprime with the pool size.
        let stride = (1..)
            .map(|k| pages / 2 + k)
            .find(|&s| gcd(s, pages.max(1)) == 1)
            .unwrap_or(1);
        let table: Vec<i32> = (0..pages)
            .map(|i| ((i * stride) % pages.max(1)) as i32)
            .collect();
        let seqlens = vec![context as i32; batch];
        let cu_new: Vec<i32> = (0..=batch).map(|b| (b * new) as i32).collect();
        let st = StepTable {
            table: PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens: &seqlens,
            },
            cu_new: &cu_new,
        };
        let step = KvStep::upload(dev, &layout, &st)?;
        let mut s = seed;
        let rows = pages * page_size * model.heads_kv;
        let (cache, block, scales) = if fp8 {
            let codes: Vec<Fp8E4m3> = (0..FILL)
                .map(|_| Fp8E4m3::from_f64(400.0 * splitmix(&mut s)))
                .collect();
            let scales: Vec<f32> = (0..4099)
                .map(|_| (0.0025 * (1.5 + 0.5 * splitmix(&mut s))) as f32)
                .collect();
            let block = codes.iter().map(|c| c.to_f64()).collect();
            (
                CacheBufs::Fp8 {
                    k: upload_repeated(dev, &codes, n)?,
                    v: upload_repeated(dev, &codes, n)?,
                    k_scale: upload_repeated(dev, &scales, rows)?,
                    v_scale: upload_repeated(dev, &scales, rows)?,
                },
                block,
                scales,
            )
        } else {
            let vals: Vec<bf16> = (0..FILL)
                .map(|_| bf16::from_f64(splitmix(&mut s)))
                .collect();
            let block = vals.iter().map(|x| x.to_f64()).collect();
            (
                CacheBufs::Bf16 {
                    k: upload_repeated(dev, &vals, n)?,
                    v: upload_repeated(dev, &vals, n)?,
                },
                block,
                Vec::new(),
            )
        };
        let rows = batch * new;
        let q_host: Vec<bf16> = (0..rows * model.heads_q * model.head_dim)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let plan = if new <= MAX_DECODE_QUERIES {
            Some(plan_decode(
                step.validated(),
                model.heads_q,
                model.heads_kv,
                model.head_dim,
                if fp8 {
                    CacheDType::Fp8E4m3
                } else {
                    CacheDType::BF16
                },
                dev.sm_count(),
                Splits::Auto,
            )?)
        } else {
            None
        };
        let ws = match &plan {
            Some(p) => p.workspace_len(rows, model.heads_q, model.head_dim)?,
            None => 0,
        };
        let kv_block: Vec<bf16> = (0..4099)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let rope_cfg = RopeConfig::builder(model.head_dim).base(5e5).build()?;
        Ok(DecodeRun {
            model,
            batch,
            context,
            page_size,
            plan,
            layout,
            table,
            max_pages,
            step,
            cache,
            block,
            scales,
            q: dev.upload(&q_host)?,
            q_host,
            o: dev.zeros(rows * model.heads_q * model.head_dim)?,
            lse: dev.zeros(rows * model.heads_q)?,
            workspace: dev.zeros(ws.max(1))?,
            new,
            k_new: upload_repeated(dev, &kv_block, rows * model.heads_kv * model.head_dim)?,
            v_new: upload_repeated(dev, &kv_block, rows * model.heads_kv * model.head_dim)?,
            rope: RopeTable::new(dev, &rope_cfg, context.max(1))?,
            rope_config: rope_cfg,
            rotation: None,
        })
    }

    /// Makes [`DecodeRun::run`] rotate keys and queries on load (`decode_rotating`, the
    /// base-500000 rule, NeoX pairs, f64 angles) when `on`, or read them as they are.
    ///
    /// # Errors
    /// Allocation or copy failures of the rotation tables.
    pub fn set_rotating(&mut self, dev: &Device, on: bool) -> Result<()> {
        self.rotation = if on {
            Some(KvRotation::upload(
                dev,
                &self.step,
                &LengthScaling::Config(self.rope_config.clone()),
                RopeStyle::Neox,
                AnglePrecision::F64,
            )?)
        } else {
            None
        };
        Ok(())
    }

    /// Whether [`DecodeRun::run`] rotates on load.
    pub fn rotating(&self) -> bool {
        self.rotation.is_some()
    }

    /// A bound on how far one score of the rotating decode may move from exact rotation:
    /// the kernel rounds each rotated key and query to bf16, `scale x 2 eps |q| |k|` with
    /// |q| and |k| bounded by sqrt(d) times their largest element; 0 when not rotating.
    pub fn rotation_score_bound(&self) -> f64 {
        if self.rotation.is_none() {
            return 0.0;
        }
        let d = self.model.head_dim as f64;
        let qmax = self
            .q_host
            .iter()
            .fold(0.0f64, |m, x| m.max(x.to_f64().abs()));
        let kmax = match self.cache {
            CacheBufs::Bf16 { .. } => self.block.iter().fold(0.0f64, |m, x| m.max(x.abs())),
            CacheBufs::Fp8 { .. } => {
                let smax = self.scales.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                self.block.iter().fold(0.0f64, |m, x| m.max(x.abs())) * f64::from(smax)
            }
        };
        2.0 * 2f64.powi(-8) * d * qmax * kmax / d.sqrt()
    }

    /// One decode step (O and LSE).
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run(&mut self, dev: &Device) -> Result<()> {
        let m = &self.model;
        let rows = self.batch * self.new;
        let ql = HeadsLayout::contiguous(rows, m.heads_q, m.head_dim);
        let out = DecodeOutput {
            o: &mut self.o,
            o_layout: ql,
            lse: Some((&mut self.lse, LseLayout::contiguous(m.heads_q, rows))),
        };
        let opts = DecodeOptions::default();
        let ws = Some(&mut self.workspace as &mut dyn cudarc::driver::DevicePtrMut<f32>);
        match (&self.cache, &self.rotation) {
            (CacheBufs::Bf16 { k, v }, rot) => {
                let cache = PagedCache {
                    layout: self.layout,
                    k,
                    v,
                    scales: KvScales::None,
                };
                match rot {
                    None => {
                        decode::<bf16, bf16>(dev, &self.step, &self.q, &ql, &cache, out, ws, &opts)
                    }
                    Some(r) => decode_rotating::<bf16, bf16>(
                        dev, &self.step, r, &self.q, &ql, &cache, out, ws, &opts,
                    ),
                }
            }
            (
                CacheBufs::Fp8 {
                    k,
                    v,
                    k_scale,
                    v_scale,
                },
                rot,
            ) => {
                let cache = PagedCache {
                    layout: self.layout,
                    k,
                    v,
                    scales: KvScales::Fp8 {
                        mode: ScaleMode::PerTokenHead,
                        k: k_scale,
                        v: v_scale,
                    },
                };
                match rot {
                    None => decode::<bf16, Fp8E4m3>(
                        dev, &self.step, &self.q, &ql, &cache, out, ws, &opts,
                    ),
                    Some(r) => decode_rotating::<bf16, Fp8E4m3>(
                        dev, &self.step, r, &self.q, &ql, &cache, out, ws, &opts,
                    ),
                }
            }
        }
    }

    /// Chunked prefill of the step's new tokens over the cache (bf16, or fp8 with per
    /// (token, head) scales).
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run_extend(&mut self, dev: &Device) -> Result<()> {
        let m = &self.model;
        let rows = self.batch * self.new;
        let ql = HeadsLayout::contiguous(rows, m.heads_q, m.head_dim);
        let out = DecodeOutput {
            o: &mut self.o,
            o_layout: ql,
            lse: Some((&mut self.lse, LseLayout::contiguous(m.heads_q, rows))),
        };
        match &self.cache {
            CacheBufs::Bf16 { k, v } => extend::<bf16, bf16>(
                dev,
                &self.step,
                &self.q,
                &ql,
                &PagedCache {
                    layout: self.layout,
                    k,
                    v,
                    scales: KvScales::None,
                },
                out,
                &ExtendOptions::default(),
            ),
            CacheBufs::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            } => extend::<bf16, Fp8E4m3>(
                dev,
                &self.step,
                &self.q,
                &ql,
                &PagedCache {
                    layout: self.layout,
                    k,
                    v,
                    scales: KvScales::Fp8 {
                        mode: ScaleMode::PerTokenHead,
                        k: k_scale,
                        v: v_scale,
                    },
                },
                out,
                &ExtendOptions::default(),
            ),
        }
    }

    /// Appends the step's new K and V rows (K rotated with a base-500000 RoPE table).
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run_append(&mut self, dev: &Device) -> Result<()> {
        let m = &self.model;
        let l = HeadsLayout::contiguous(self.batch * self.new, m.heads_kv, m.head_dim);
        let new = NewKv {
            k: &self.k_new,
            k_layout: l,
            v: &self.v_new,
            v_layout: l,
        };
        let rope = Some(AppendRope {
            table: &self.rope,
            style: RopeStyle::Neox,
            precision: AnglePrecision::F64,
        });
        match &mut self.cache {
            CacheBufs::Bf16 { k, v } => append_kv::<bf16, bf16>(
                dev,
                &self.step,
                &new,
                PagedCacheMut {
                    layout: self.layout,
                    k,
                    v,
                    scales: KvScalesMut::None,
                },
                rope,
            ),
            CacheBufs::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            } => append_kv::<bf16, Fp8E4m3>(
                dev,
                &self.step,
                &new,
                PagedCacheMut {
                    layout: self.layout,
                    k,
                    v,
                    scales: KvScalesMut::PerTokenHead {
                        k: k_scale,
                        v: v_scale,
                    },
                },
                rope,
            ),
        }
    }

    /// Bytes one append moves: the new K and V rows read (bf16), written in the cache type
    /// (with a 4-byte scale per row for fp8).
    pub fn append_bytes(&self) -> usize {
        let m = &self.model;
        let rows = self.batch * self.new * m.heads_kv;
        let (elem, scale) = match self.cache {
            CacheBufs::Bf16 { .. } => (2, 0),
            CacheBufs::Fp8 { .. } => (1, 4),
        };
        2 * rows * (m.head_dim * 2 + m.head_dim * elem + scale)
    }

    /// FLOPs of one extend: 4 x head_dim per visible (query, key) pair and query head
    /// (FlashAttention's count, exact for the bottom-right causal mask).
    pub fn extend_flops(&self) -> f64 {
        let m = &self.model;
        let (n, c) = (self.new as f64, self.context as f64);
        // Query i of n sees c - n + i + 1 keys.
        let pairs = n * (c - n) + n * (n + 1.0) / 2.0;
        4.0 * m.head_dim as f64 * m.heads_q as f64 * self.batch as f64 * pairs
    }

    /// Bytes one step moves: every cached K and V element (and fp8 scale) read once, Q
    /// read, O and LSE written.
    pub fn bytes(&self) -> usize {
        let m = &self.model;
        let tokens = self.batch * self.context;
        let (elem, scale) = match self.cache {
            CacheBufs::Bf16 { .. } => (2, 0),
            CacheBufs::Fp8 { .. } => (1, 4),
        };
        let rows = self.batch * self.new;
        2 * tokens * m.heads_kv * (m.head_dim * elem + scale)
            + 2 * rows * m.heads_q * m.head_dim * 2
            + rows * m.heads_q * 4
    }

    /// Runs once and returns the largest |O - reference| and |LSE - reference| over
    /// `samples` (sequence, head) rows, each against f64 attention over its sequence's
    /// cache read through the page table (when rotating, with the query and every key
    /// rotated in f64 at their positions).
    ///
    /// # Errors
    /// Launch or copy failures.
    pub fn max_error(&mut self, dev: &Device, samples: usize) -> Result<(f64, f64)> {
        self.run(dev)?;
        self.check(dev, samples, false)
    }

    /// As [`DecodeRun::max_error`] after an extend run. Over an fp8 cache the reference
    /// reads what extend computes with: each value `code x scale` (an f32 product) rounded
    /// once to bf16.
    ///
    /// # Errors
    /// Launch or copy failures.
    pub fn max_error_extend(&mut self, dev: &Device, samples: usize) -> Result<(f64, f64)> {
        self.run_extend(dev)?;
        self.check(dev, samples, true)
    }

    /// `widened`: fp8 values as bf16(code x scale) instead of exact.
    fn check(&mut self, dev: &Device, samples: usize, widened: bool) -> Result<(f64, f64)> {
        let o = dev.download(&self.o)?;
        let lse = dev.download(&self.lse)?;
        let m = self.model;
        let (d, ps) = (m.head_dim, self.page_size);
        let group = m.heads_q / m.heads_kv;
        let fp8 = matches!(self.cache, CacheBufs::Fp8 { .. });
        let scale = 1.0 / (d as f64).sqrt();
        // NeoX pairs (i, i + half) rotated by pos x inv_freq[i], times the attention factor.
        let rotation = self.rotation.as_ref().map(|_| {
            (
                self.rope_config.inv_freq_f64(self.context),
                self.rope_config.attention_factor_f64(),
            )
        });
        let rotate = |x: &mut [f64], pos: usize| {
            if let Some((inv, f)) = &rotation {
                let half = inv.len();
                for (i, w) in inv.iter().enumerate() {
                    let (sn, cs) = (pos as f64 * w).sin_cos();
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = f * (a * cs - b * sn);
                    x[i + half] = f * (b * cs + a * sn);
                }
            }
        };
        let (mut worst_o, mut worst_lse) = (0.0f64, 0.0f64);
        for i in 0..samples.max(1) {
            let b = (i * 7) % self.batch;
            let h = (i * 5 + b) % m.heads_q;
            let hk = h / group;
            // The sequence's first new token (position context - new), which sees every
            // key before it and itself.
            let mut q: Vec<f64> = (0..d)
                .map(|c| self.q_host[(b * self.new * m.heads_q + h) * d + c].to_f64())
                .collect();
            rotate(&mut q, self.context - self.new);
            let value = |t: usize, c: usize| -> f64 {
                let page = self.table[b * self.max_pages + t / ps] as usize;
                let row = (page * ps + t % ps) * m.heads_kv + hk;
                let x = self.block[(row * d + c) % FILL];
                let sc = self.scales[row % self.scales.len()];
                if fp8 && widened {
                    // The code's value is exact in f32.
                    bf16::from_f32(x as f32 * sc).to_f64()
                } else if fp8 {
                    x * f64::from(sc)
                } else {
                    x
                }
            };
            let visible = self.context - self.new + 1;
            let s: Vec<f64> = (0..visible)
                .map(|t| {
                    let mut k: Vec<f64> = (0..d).map(|c| value(t, c)).collect();
                    rotate(&mut k, t);
                    scale * q.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>()
                })
                .collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            let want_lse = mx + sum.ln();
            for c in 0..d {
                let want: f64 = s
                    .iter()
                    .enumerate()
                    .map(|(t, x)| (x - want_lse).exp() * value(t, c))
                    .sum();
                let got = o[(b * self.new * m.heads_q + h) * d + c].to_f64();
                let e = (got - want).abs();
                worst_o = worst_o.max(if e.is_nan() { f64::INFINITY } else { e });
            }
            let e = (f64::from(lse[h * self.batch * self.new + b * self.new]) - want_lse).abs();
            worst_lse = worst_lse.max(if e.is_nan() { f64::INFINITY } else { e });
        }
        Ok((worst_o, worst_lse))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One absorbed MLA decode step over a paged latent cache at DeepSeek-V3's dimensions
/// (latent 512 + rope 64, `heads` query heads, softmax scale from the V3 config), `batch`
/// sequences of `context` tokens, one new token each, bf16 or fp8 latent, pages of 64
/// tokens in a scrambled order. Latent element e holds block[e % FILL] (times its token's
/// scale for fp8).
pub struct MlaRun {
    /// Query heads (128 for DeepSeek-V3, 16 for a TP-8 shard).
    pub heads: usize,
    /// Sequences.
    pub batch: usize,
    /// Cached tokens per sequence.
    pub context: usize,
    /// fp8 latent.
    pub fp8: bool,
    step: KvStep,
    table: Vec<i32>,
    max_pages: usize,
    cache: MlaBufs,
    block: Vec<f64>,
    rope_block: Vec<f64>,
    scales: Vec<f32>,
    q_host: Vec<bf16>,
    q: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    opts: crate::mla::MlaDecodeOptions,
    plan: crate::mla::MlaDecodePlan,
}

enum MlaBufs {
    Bf16(CudaSlice<bf16>),
    Fp8 {
        latent: CudaSlice<Fp8E4m3>,
        scales: CudaSlice<f32>,
        rope: CudaSlice<bf16>,
    },
}

const MLA_PAGE: usize = 64;

impl MlaRun {
    /// Allocates and fills the latent cache, the step and the buffers (the clustered kernels
    /// where the device runs them).
    ///
    /// # Errors
    /// Invalid sizes; allocation or copy failures.
    pub fn new(
        dev: &Device,
        heads: usize,
        batch: usize,
        context: usize,
        fp8: bool,
        seed: u64,
    ) -> Result<Self> {
        Self::with_clusters(dev, heads, batch, context, fp8, seed, true)
    }

    /// As [`MlaRun::new`], with `clusters` false to keep the 64-row kernel without
    /// thread-block clusters on a device that has them (the comparison the sweep prints).
    ///
    /// # Errors
    /// Invalid sizes; allocation or copy failures.
    pub fn with_clusters(
        dev: &Device,
        heads: usize,
        batch: usize,
        context: usize,
        fp8: bool,
        seed: u64,
        clusters: bool,
    ) -> Result<Self> {
        use crate::mla::{latent_layout, plan_mla_decode, MlaConfig, MlaDecodeOptions};
        let max_pages = context.div_ceil(MLA_PAGE);
        let pages = batch
            .checked_mul(max_pages)
            .ok_or_else(|| Error::invalid("mla workload", "context", "too large"))?;
        let layout = latent_layout(pages, MLA_PAGE);
        let stride = (1..)
            .map(|k| pages / 2 + k)
            .find(|&s| gcd(s, pages.max(1)) == 1)
            .unwrap_or(1);
        let table: Vec<i32> = (0..pages)
            .map(|i| ((i * stride) % pages.max(1)) as i32)
            .collect();
        let seqlens = vec![context as i32; batch];
        let cu_new: Vec<i32> = (0..=batch as i32).collect();
        let st = StepTable {
            table: PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens: &seqlens,
            },
            cu_new: &cu_new,
        };
        let step = KvStep::upload(dev, &layout, &st)?;
        let tokens = pages * MLA_PAGE;
        let mut s = seed;
        let (cache, block, rope_block, scales) = if fp8 {
            let codes: Vec<Fp8E4m3> = (0..FILL)
                .map(|_| Fp8E4m3::from_f64(400.0 * splitmix(&mut s)))
                .collect();
            let scales: Vec<f32> = (0..4099)
                .map(|_| (0.0025 * (1.5 + 0.5 * splitmix(&mut s))) as f32)
                .collect();
            let rope: Vec<bf16> = (0..4099)
                .map(|_| bf16::from_f64(splitmix(&mut s)))
                .collect();
            let block = codes.iter().map(|c| c.to_f64()).collect();
            let rope_block = rope.iter().map(|x| x.to_f64()).collect();
            (
                MlaBufs::Fp8 {
                    latent: upload_repeated(dev, &codes, tokens * 512)?,
                    scales: upload_repeated(dev, &scales, tokens)?,
                    rope: upload_repeated(dev, &rope, tokens * 64)?,
                },
                block,
                rope_block,
                scales,
            )
        } else {
            let vals: Vec<bf16> = (0..FILL)
                .map(|_| bf16::from_f64(splitmix(&mut s)))
                .collect();
            let block = vals.iter().map(|x| x.to_f64()).collect();
            (
                MlaBufs::Bf16(upload_repeated(dev, &vals, tokens * 576)?),
                block,
                Vec::new(),
                Vec::new(),
            )
        };
        let q_host: Vec<bf16> = (0..batch * heads * 576)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let mut cfg = MlaConfig::deepseek_v3();
        cfg.heads = heads;
        let opts = MlaDecodeOptions {
            clusters,
            ..MlaDecodeOptions::new(&cfg)
        };
        let plan = plan_mla_decode(
            step.validated(),
            heads,
            dev.sm_count(),
            dev.smem_per_block(),
            dev.cluster_kernels() && clusters,
            opts.splits,
        )?;
        let ws = plan.workspace_len(batch, heads)?;
        Ok(MlaRun {
            heads,
            batch,
            context,
            fp8,
            step,
            table,
            max_pages,
            cache,
            block,
            rope_block,
            scales,
            q: dev.upload(&q_host)?,
            q_host,
            o: dev.zeros(batch * heads * 512)?,
            lse: dev.zeros(batch * heads)?,
            workspace: dev.zeros(ws.max(1))?,
            opts,
            plan,
        })
    }

    /// The plan each step runs (which kernel: rows per CTA; splits).
    pub fn plan(&self) -> crate::mla::MlaDecodePlan {
        self.plan
    }

    /// One absorbed decode step.
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run(&mut self, dev: &Device) -> Result<()> {
        use crate::mla::{decode_absorbed, LatentCache};
        let ql = HeadsLayout::contiguous(self.batch, self.heads, 576);
        let out = DecodeOutput {
            o: &mut self.o,
            o_layout: HeadsLayout::contiguous(self.batch, self.heads, 512),
            lse: Some((&mut self.lse, LseLayout::contiguous(self.heads, self.batch))),
        };
        let cache = match &self.cache {
            MlaBufs::Bf16(latent) => LatentCache::Bf16 { latent },
            MlaBufs::Fp8 {
                latent,
                scales,
                rope,
            } => LatentCache::Fp8 {
                latent,
                scales,
                rope,
            },
        };
        decode_absorbed(
            dev,
            &self.step,
            &self.q,
            &ql,
            &cache,
            out,
            Some(&mut self.workspace),
            &self.opts,
        )
    }

    /// Bytes one step moves: every cached token's row (1152 bytes bf16; 512 + 4 + 128 fp8)
    /// read once, Q read, O and LSE written.
    pub fn bytes(&self) -> usize {
        let per_token = if self.fp8 { 512 + 4 + 128 } else { 1152 };
        self.batch * self.context * per_token
            + self.batch * self.heads * (576 + 512) * 2
            + self.batch * self.heads * 4
    }

    /// FLOPs of one step: 2 x heads x (576 + 512) per cached token and query token.
    pub fn flops(&self) -> f64 {
        2.0 * self.heads as f64 * 1088.0 * (self.batch * self.context) as f64
    }

    /// Runs once; the largest |o_lat - reference| and |LSE - reference| over `samples`
    /// (sequence, head) rows against f64 attention over the sequence's latent rows.
    ///
    /// # Errors
    /// Launch or copy failures.
    pub fn max_error(&mut self, dev: &Device, samples: usize) -> Result<(f64, f64)> {
        self.run(dev)?;
        let o = dev.download(&self.o)?;
        let lse = dev.download(&self.lse)?;
        let scale = f64::from(self.opts.softmax_scale);
        let (mut worst_o, mut worst_lse) = (0.0f64, 0.0f64);
        for i in 0..samples.max(1) {
            let b = (i * 7) % self.batch;
            let h = (i * 37 + b) % self.heads;
            let q: Vec<f64> = (0..576)
                .map(|c| self.q_host[(b * self.heads + h) * 576 + c].to_f64())
                .collect();
            // Channel c of token t's key (the first 512 are also the value).
            let key = |t: usize, c: usize| -> f64 {
                let page = self.table[b * self.max_pages + t / MLA_PAGE] as usize;
                let row = page * MLA_PAGE + t % MLA_PAGE;
                if self.fp8 {
                    if c < 512 {
                        self.block[(row * 512 + c) % FILL]
                            * f64::from(self.scales[row % self.scales.len()])
                    } else {
                        self.rope_block[(row * 64 + c - 512) % self.rope_block.len()]
                    }
                } else {
                    self.block[(row * 576 + c) % FILL]
                }
            };
            let s: Vec<f64> = (0..self.context)
                .map(|t| scale * (0..576).map(|c| q[c] * key(t, c)).sum::<f64>())
                .collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            let want_lse = mx + sum.ln();
            for c in 0..512 {
                let want: f64 = s
                    .iter()
                    .enumerate()
                    .map(|(t, x)| (x - want_lse).exp() * key(t, c))
                    .sum();
                let e = (o[(b * self.heads + h) * 512 + c].to_f64() - want).abs();
                worst_o = worst_o.max(if e.is_nan() { f64::INFINITY } else { e });
            }
            let e = (f64::from(lse[h * self.batch + b]) - want_lse).abs();
            worst_lse = worst_lse.max(if e.is_nan() { f64::INFINITY } else { e });
        }
        Ok((worst_o, worst_lse))
    }
}
