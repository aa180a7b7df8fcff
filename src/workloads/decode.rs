//! Decode over a paged cache at model shapes: the sweep's and the criterion bench's workload.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::splitmix;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kv_cache::{
    decode, plan_decode, CacheDType, DecodeOptions, DecodeOutput, DecodePlan, Fp8E4m3, KvScales,
    KvStep, LseLayout, PageTable, PagedCache, PagedKvLayout, ScaleMode, Splits, StepTable,
};
use crate::layout::HeadsLayout;

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

/// One decode step of `batch` sequences of `context` cached tokens each (the step's one
/// new token per sequence is the last of them), bf16 queries, a bf16 or fp8 (per token
/// and head scales) cache in pages of `page_size`, pages spread over the pool in a
/// scrambled order. Cache element e holds block[e % FILL] (times its scale for fp8).
pub struct DecodeRun {
    /// The model shape.
    pub model: DecodeModel,
    /// Sequences.
    pub batch: usize,
    /// Cached tokens per sequence.
    pub context: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// The split plan the runs use.
    pub plan: DecodePlan,
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
        let q_host: Vec<bf16> = (0..batch * model.heads_q * model.head_dim)
            .map(|_| bf16::from_f64(splitmix(&mut s)))
            .collect();
        let plan = plan_decode(
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
        )?;
        let ws = plan.workspace_len(batch, model.heads_q, model.head_dim)?;
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
            o: dev.zeros(batch * model.heads_q * model.head_dim)?,
            lse: dev.zeros(batch * model.heads_q)?,
            workspace: dev.zeros(ws.max(1))?,
        })
    }

    /// One decode step (O and LSE).
    ///
    /// # Errors
    /// Whatever the launch returns.
    pub fn run(&mut self, dev: &Device) -> Result<()> {
        let m = &self.model;
        let ql = HeadsLayout::contiguous(self.batch, m.heads_q, m.head_dim);
        let out = DecodeOutput {
            o: &mut self.o,
            o_layout: ql,
            lse: Some((&mut self.lse, LseLayout::contiguous(m.heads_q, self.batch))),
        };
        let opts = DecodeOptions::default();
        match &self.cache {
            CacheBufs::Bf16 { k, v } => decode::<bf16, bf16>(
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
                Some(&mut self.workspace),
                &opts,
            ),
            CacheBufs::Fp8 {
                k,
                v,
                k_scale,
                v_scale,
            } => decode::<bf16, Fp8E4m3>(
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
                Some(&mut self.workspace),
                &opts,
            ),
        }
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
        2 * tokens * m.heads_kv * (m.head_dim * elem + scale)
            + 2 * self.batch * m.heads_q * m.head_dim * 2
            + self.batch * m.heads_q * 4
    }

    /// Runs once and returns the largest |O - reference| and |LSE - reference| over
    /// `samples` (sequence, head) rows, each against f64 attention over its sequence's
    /// cache read through the page table.
    ///
    /// # Errors
    /// Launch or copy failures.
    pub fn max_error(&mut self, dev: &Device, samples: usize) -> Result<(f64, f64)> {
        self.run(dev)?;
        let o = dev.download(&self.o)?;
        let lse = dev.download(&self.lse)?;
        let m = self.model;
        let (d, ps) = (m.head_dim, self.page_size);
        let group = m.heads_q / m.heads_kv;
        let fp8 = matches!(self.cache, CacheBufs::Fp8 { .. });
        let scale = 1.0 / (d as f64).sqrt();
        let (mut worst_o, mut worst_lse) = (0.0f64, 0.0f64);
        for i in 0..samples.max(1) {
            let b = (i * 7) % self.batch;
            let h = (i * 5 + b) % m.heads_q;
            let hk = h / group;
            let q: Vec<f64> = (0..d)
                .map(|c| self.q_host[(b * m.heads_q + h) * d + c].to_f64())
                .collect();
            let value = |t: usize, c: usize| -> f64 {
                let page = self.table[b * self.max_pages + t / ps] as usize;
                let row = (page * ps + t % ps) * m.heads_kv + hk;
                let x = self.block[(row * d + c) % FILL];
                if fp8 {
                    x * f64::from(self.scales[row % self.scales.len()])
                } else {
                    x
                }
            };
            let s: Vec<f64> = (0..self.context)
                .map(|t| scale * (0..d).map(|c| q[c] * value(t, c)).sum::<f64>())
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
                let got = o[(b * m.heads_q + h) * d + c].to_f64();
                let e = (got - want).abs();
                worst_o = worst_o.max(if e.is_nan() { f64::INFINITY } else { e });
            }
            let e = (f64::from(lse[h * self.batch + b]) - want_lse).abs();
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
