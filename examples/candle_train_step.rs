//! One training step of a small Llama-style block on candle CPU tensors, with longctx's ops
//! (`longctx::candle`): RMSNorm, QKV projections, RoPE, causal GQA attention, an output
//! projection, then an MoE feed-forward (router with top-2 gating, gather to expert order,
//! one SwiGLU-free MLP per expert, weighted combine). Gradients come from candle's autograd
//! through longctx's backward passes; the step is plain SGD. Prints the loss before and
//! after, and exits non-zero if the step did not lower it.
//!
//! `cargo run --release --example candle_train_step --features candle`

use candle_core::{DType, Device, Tensor, Var, D};
use longctx::attention::{AttentionOptions, Mask};
use longctx::candle::{attention, combine, gather, permute, route, Rope};
use longctx::moe::{PermuteOptions, RouterConfig};
use longctx::rope::{RopeConfig, RopeStyle};

const TOKENS: usize = 16;
const HIDDEN: usize = 32;
const HEADS_Q: usize = 4;
const HEADS_KV: usize = 2;
const HEAD_DIM: usize = 8;
const EXPERTS: usize = 4;
const TOP_K: usize = 2;
const FFN: usize = 24;
const LR: f64 = 0.05;

/// Deterministic values in [-scale, scale).
fn init(dims: &[usize], seed: u64, scale: f32) -> candle_core::Result<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

struct Block {
    norm1: Var,
    wq: Var,
    wk: Var,
    wv: Var,
    wo: Var,
    norm2: Var,
    router: Var,
    up: Vec<Var>,
    down: Vec<Var>,
    rope: Rope,
}

impl Block {
    fn new() -> candle_core::Result<Self> {
        let w = |dims: &[usize], seed: u64| -> candle_core::Result<Var> {
            Var::from_tensor(&init(dims, seed, 1.0 / (dims[0] as f32).sqrt())?)
        };
        let ones = || Var::from_tensor(&Tensor::ones(HIDDEN, DType::F32, &Device::Cpu)?);
        let rope_cfg = RopeConfig::builder(HEAD_DIM)
            .base(10_000.0)
            .build()
            .map_err(candle_core::Error::wrap)?;
        Ok(Block {
            norm1: ones()?,
            wq: w(&[HIDDEN, HEADS_Q * HEAD_DIM], 1)?,
            wk: w(&[HIDDEN, HEADS_KV * HEAD_DIM], 2)?,
            wv: w(&[HIDDEN, HEADS_KV * HEAD_DIM], 3)?,
            wo: w(&[HEADS_Q * HEAD_DIM, HIDDEN], 4)?,
            norm2: ones()?,
            router: w(&[HIDDEN, EXPERTS], 5)?,
            up: (0..EXPERTS)
                .map(|e| w(&[HIDDEN, FFN], 10 + e as u64))
                .collect::<candle_core::Result<_>>()?,
            down: (0..EXPERTS)
                .map(|e| w(&[FFN, HIDDEN], 20 + e as u64))
                .collect::<candle_core::Result<_>>()?,
            rope: Rope::new(&rope_cfg, TOKENS, RopeStyle::Neox)?,
        })
    }

    fn vars(&self) -> Vec<&Var> {
        let mut v = vec![
            &self.norm1,
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.norm2,
            &self.router,
        ];
        v.extend(self.up.iter());
        v.extend(self.down.iter());
        v
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let positions: Vec<i32> = (0..TOKENS as i32).collect();
        // Attention: [tokens, hidden] -> Q [tokens, hq, d], K/V [tokens, hkv, d].
        let h = rms_norm(x, self.norm1.as_tensor())?;
        let q = h
            .matmul(self.wq.as_tensor())?
            .reshape((TOKENS, HEADS_Q, HEAD_DIM))?;
        let k = h
            .matmul(self.wk.as_tensor())?
            .reshape((TOKENS, HEADS_KV, HEAD_DIM))?;
        let v = h
            .matmul(self.wv.as_tensor())?
            .reshape((TOKENS, HEADS_KV, HEAD_DIM))?;
        let q = self.rope.apply(&q, &positions)?;
        let k = self.rope.apply(&k, &positions)?;
        let opts = AttentionOptions {
            mask: Mask::causal(),
            ..AttentionOptions::default()
        };
        let (o, _lse) = attention(&q, &k, &v, &opts)?;
        let x = (x + o
            .reshape((TOKENS, HEADS_Q * HEAD_DIM))?
            .matmul(self.wo.as_tensor())?)?;

        // MoE feed-forward: route, gather rows into expert order, run each expert on its
        // segment, combine with the routing weights.
        let h = rms_norm(&x, self.norm2.as_tensor())?;
        let cfg = RouterConfig::mixtral(EXPERTS, TOP_K);
        let routing = route(&h.matmul(self.router.as_tensor())?, &cfg, None)?;
        let perm = permute(&routing, EXPERTS, PermuteOptions::default())?;
        let rows = gather(&h, &perm)?;
        let mut outs = Vec::new();
        for e in 0..EXPERTS {
            let start = perm.offsets()[e] as usize;
            let len = perm.offsets()[e + 1] as usize - start;
            if len > 0 {
                let seg = rows.narrow(0, start, len)?;
                let mid = seg.matmul(self.up[e].as_tensor())?.silu()?;
                outs.push(mid.matmul(self.down[e].as_tensor())?);
            }
        }
        let moe = combine(&Tensor::cat(&outs, 0)?, &routing.weights, &perm)?;
        x + moe
    }
}

fn rms_norm(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-6)?.sqrt()?)?.broadcast_mul(w)
}

fn loss(block: &Block, x: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    (block.forward(x)? - target)?.sqr()?.mean_all()
}

fn main() -> candle_core::Result<()> {
    let block = Block::new()?;
    let x = init(&[TOKENS, HIDDEN], 100, 1.0)?;
    let target = init(&[TOKENS, HIDDEN], 101, 1.0)?;

    let before = loss(&block, &x, &target)?;
    let grads = before.backward()?;
    for var in block.vars() {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("a parameter got no gradient".into()))?;
        var.set(&(var.as_tensor() - (g * LR)?)?)?;
    }
    let before = before.to_scalar::<f32>()?;
    let after = loss(&block, &x, &target)?.to_scalar::<f32>()?;
    println!("loss before {before:.6}, after one SGD step {after:.6}");
    if after >= before {
        return Err(candle_core::Error::Msg(format!(
            "the step did not lower the loss ({before} -> {after})"
        )));
    }
    Ok(())
}
