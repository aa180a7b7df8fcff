//! longctx's ops as [candle](https://crates.io/crates/candle-core) custom ops, with
//! backward passes wired into candle's autograd (feature `candle`).
//!
//! * [`Rope`]: RoPE forward; its backward is the rotation by the negative angle (itself a
//!   custom op, so second derivatives work too).
//! * [`attention`] / [`attention_varlen`]: attention forward with the LSE; backward through
//!   [`reference::attention_backward_f64`](crate::attention::reference::attention_backward_f64)
//!   on CPU tensors, through longctx's backward kernels (with the forward's LSE, on candle's
//!   stream) on CUDA tensors.
//! * [`route`]: MoE gating and top-k (softmax/sigmoid, groups, bias, renormalisation), the
//!   weights differentiable with respect to the logits; [`permute`], [`gather`] and
//!   [`combine`] with their gradients.
//!
//! Tensor layouts follow the crate: RoPE and attention take `[tokens, heads, head_dim]`
//! (batches packed along tokens, with `cu_seqlens` for attention and per-token positions
//! for RoPE); MoE takes `[tokens, experts]` logits and `[tokens, hidden]` hidden states.
//! Non-contiguous inputs are made contiguous first (a copy).
//!
//! On CPU tensors every op runs the crate's f64 reference (slow, exact: for tests and small
//! models); inputs may be f32, f64, f16 or bf16 and outputs keep the input's dtype. With the
//! `candle-cuda` feature, every op on CUDA tensors runs longctx's kernels on candle's own
//! stream (`CudaDevice::cuda_stream`), on candle's buffers: RoPE (f32, f16, bf16) and
//! attention (f16, bf16) forward and backward; MoE routing (logits f32 or bf16, f16 read as
//! f32) with the router backward, gather and combine (f32, f16, bf16) with their gradients.
//! f64 CUDA tensors are refused with an error.
//!
//! Errors: every failure is a `candle_core::Error`; longctx's validation errors are wrapped
//! (`candle_core::Error::wrap`), so their text names the op, the argument and the problem.
//! No input makes these functions panic.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use crate::attention::reference::{attention_backward_f64, attention_f64, Problem};
use crate::attention::AttentionOptions;
use crate::layout::HeadsLayout;
use crate::moe::reference as moe_ref;
use crate::moe::{LossOptions, PermutationTables, PermuteOptions, RouterConfig};
use crate::rope::reference::apply_rope_f64;
use crate::rope::{Direction, RopeConfig, RopeStyle};

#[cfg(feature = "candle-cuda")]
mod cuda;

pub use candle_core;

type CResult<T> = candle_core::Result<T>;

/// A longctx error as a candle error (its Display names op, argument and problem).
fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// An argument error of this module, as a candle error.
fn invalid(op: &'static str, arg: &'static str, problem: impl Into<String>) -> candle_core::Error {
    wrap(crate::Error::invalid(op, arg, problem))
}

/// The contiguous range of a CPU storage a layout addresses, checked.
fn contiguous_range(op: &'static str, arg: &'static str, l: &Layout) -> CResult<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        invalid(
            op,
            arg,
            format!("layout {:?} is not contiguous", l.stride()),
        )
    })
}

/// The elements of a contiguous CPU tensor as f64, and its dtype.
fn cpu_f64(op: &'static str, arg: &'static str, s: &CpuStorage, l: &Layout) -> CResult<Vec<f64>> {
    let (a, b) = contiguous_range(op, arg, l)?;
    let out_of_range = || invalid(op, arg, format!("layout range {a}..{b} leaves its storage"));
    Ok(match s {
        CpuStorage::F64(v) => v.get(a..b).ok_or_else(out_of_range)?.to_vec(),
        CpuStorage::F32(v) => v
            .get(a..b)
            .ok_or_else(out_of_range)?
            .iter()
            .map(|&x| f64::from(x))
            .collect(),
        CpuStorage::F16(v) => v
            .get(a..b)
            .ok_or_else(out_of_range)?
            .iter()
            .map(|x| x.to_f64())
            .collect(),
        CpuStorage::BF16(v) => v
            .get(a..b)
            .ok_or_else(out_of_range)?
            .iter()
            .map(|x| x.to_f64())
            .collect(),
        other => {
            return Err(invalid(
                op,
                arg,
                format!("dtype {:?}; expected f32, f64, f16 or bf16", other.dtype()),
            ))
        }
    })
}

/// f64 values as a CPU storage of `dtype` (rounded to nearest).
fn cpu_from_f64(op: &'static str, v: Vec<f64>, dtype: DType) -> CResult<CpuStorage> {
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(v),
        DType::F32 => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f64).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f64).collect()),
        other => {
            return Err(invalid(
                op,
                "dtype",
                format!("{other:?}; expected f32, f64, f16 or bf16"),
            ))
        }
    })
}

/// A tensor's elements (any device, any float dtype) on the host as f64, row-major.
fn host_f64(t: &Tensor) -> CResult<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// Host f64 values as a tensor of `shape`, `dtype` on `like`'s device.
fn tensor_from_f64(v: Vec<f64>, shape: &[usize], dtype: DType, like: &Tensor) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(like.device())
}

/// Checks a tensor's rank and returns its dims.
fn dims<const N: usize>(op: &'static str, arg: &'static str, t: &Tensor) -> CResult<[usize; N]> {
    <[usize; N]>::try_from(t.dims())
        .map_err(|_| invalid(op, arg, format!("shape {:?}; expected rank {N}", t.dims())))
}

/// Checks that a float tensor has one of the dtypes the references read.
fn check_float(op: &'static str, arg: &'static str, t: &Tensor) -> CResult<()> {
    match t.dtype() {
        DType::F64 | DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(invalid(
            op,
            arg,
            format!("dtype {other:?}; expected f32, f64, f16 or bf16"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------

const ROPE: &str = "candle rope";

/// A RoPE configuration ready to rotate candle tensors: inv_freq (f64) and the attention
/// factor for one sequence length, from a [`RopeConfig`] (HF `rope_scaling` semantics).
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    seq_len: usize,
    inv_freq: Arc<[f64]>,
    attention_factor: f64,
    style: RopeStyle,
}

impl Rope {
    /// The frequencies of `config` for sequences of `seq_len` tokens (dynamic NTK and
    /// LongRoPE depend on it; for length-dependent configs positions must stay below it),
    /// rotating pairs as `style` says.
    ///
    /// # Errors
    /// When rotary_dim is odd or zero (a validated [`RopeConfig`] never is).
    pub fn new(config: &RopeConfig, seq_len: usize, style: RopeStyle) -> CResult<Self> {
        let rotary_dim = config.rotary_dim();
        if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > config.head_dim() {
            return Err(invalid(
                ROPE,
                "config",
                format!(
                    "rotary_dim {rotary_dim} must be even, nonzero and <= head_dim {}",
                    config.head_dim()
                ),
            ));
        }
        Ok(Rope {
            config: config.clone(),
            seq_len,
            inv_freq: config.inv_freq_f64(seq_len).into(),
            // The kernel folds the f32 factor; the CPU path uses the same value.
            attention_factor: f64::from(config.attention_factor()),
            style,
        })
    }

    /// Rotates `x` `[tokens, heads, head_dim]` (head_dim the config's; channels past
    /// rotary_dim pass through), token t at `positions[t]`. Differentiable: the gradient is
    /// the rotation by the negative angle.
    ///
    /// # Errors
    /// When `x` is not rank 3 or not a float tensor, its head_dim differs from the config's,
    /// `positions` does not have one entry per token or has a negative entry, a
    /// length-dependent config sees a position at or past its `seq_len`, or (CUDA) the
    /// kernel rejects the call.
    pub fn apply(&self, x: &Tensor, positions: &[i32]) -> CResult<Tensor> {
        self.apply_dir(x, positions, Direction::Forward)
    }

    /// The backward of [`Rope::apply`] (rotation by the negative angle) as a plain op, for
    /// callers that run their own backward.
    ///
    /// # Errors
    /// As [`Rope::apply`].
    pub fn apply_backward(&self, grad: &Tensor, positions: &[i32]) -> CResult<Tensor> {
        self.apply_dir(grad, positions, Direction::Backward)
    }

    fn apply_dir(&self, x: &Tensor, positions: &[i32], direction: Direction) -> CResult<Tensor> {
        let [tokens, _heads, head_dim] = dims::<3>(ROPE, "x", x)?;
        check_float(ROPE, "x", x)?;
        if head_dim != self.config.head_dim() {
            return Err(invalid(
                ROPE,
                "x",
                format!(
                    "head_dim {head_dim} but the config's is {}",
                    self.config.head_dim()
                ),
            ));
        }
        if positions.len() != tokens {
            return Err(invalid(
                ROPE,
                "positions",
                format!("{} positions for {tokens} tokens", positions.len()),
            ));
        }
        if let Some((t, p)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
            return Err(invalid(
                ROPE,
                "positions",
                format!("position {p} at token {t} is negative"),
            ));
        }
        if self.config.depends_on_length() {
            if let Some(&p) = positions.iter().find(|&&p| p as usize >= self.seq_len) {
                return Err(invalid(
                    ROPE,
                    "positions",
                    format!(
                        "position {p} is past the sequence length {} the frequencies were made for",
                        self.seq_len
                    ),
                ));
            }
        }
        let op = RopeOp {
            rope: self.clone(),
            positions: positions.into(),
            direction,
        };
        x.contiguous()?.apply_op1(op)
    }
}

/// The custom op: one rotation direction of one [`Rope`] at fixed positions.
struct RopeOp {
    rope: Rope,
    positions: Arc<[i32]>,
    direction: Direction,
}

impl RopeOp {
    fn name_for(direction: Direction) -> &'static str {
        match direction {
            Direction::Forward => "longctx-rope",
            Direction::Backward => "longctx-rope-backward",
        }
    }
}

impl candle_core::CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        Self::name_for(self.direction)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let [tokens, heads, head_dim] = <[usize; 3]>::try_from(l.dims())
            .map_err(|_| invalid(ROPE, "x", format!("shape {:?}; expected rank 3", l.dims())))?;
        let mut buf = cpu_f64(ROPE, "x", s, l)?;
        apply_rope_f64(
            &mut buf,
            &HeadsLayout::contiguous(tokens, heads, head_dim),
            &self.positions,
            &self.rope.inv_freq,
            self.rope.attention_factor,
            self.rope.style,
            self.direction,
        )
        .map_err(wrap)?;
        Ok((cpu_from_f64(ROPE, buf, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::rope(
            &self.rope.config,
            self.rope.seq_len,
            self.rope.style,
            self.direction,
            &self.positions,
            s,
            l,
        )
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let back = match self.direction {
            Direction::Forward => Direction::Backward,
            Direction::Backward => Direction::Forward,
        };
        Ok(Some(self.rope.apply_dir(grad, &self.positions, back)?))
    }
}

// ---------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------

const ATTN: &str = "candle attention";

/// Attention over one sequence: `q` `[seqlen_q, heads_q, d]`, `k` `[seqlen_k, heads_kv, d]`,
/// `v` `[seqlen_k, heads_kv, d_v]`; returns O `[seqlen_q, heads_q, d_v]` (q's dtype) and the
/// LSE `[heads_q, seqlen_q]` (f32, natural log, -inf for rows that see no key). Conventions
/// as [`crate::attention`]: GQA by `heads_q / heads_kv`, causal aligned bottom-right.
/// O is differentiable with respect to q, k and v; the LSE is a constant to autograd.
///
/// # Errors
/// Mismatched shapes or dtypes, heads_q not a multiple of heads_kv, a scale or softcap that
/// is not finite and positive; on CUDA tensors also what the kernel rejects (dtype other
/// than f16/bf16, unsupported head dims).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> CResult<(Tensor, Tensor)> {
    let tq = i32::try_from(q.dims().first().copied().unwrap_or(0))
        .map_err(|_| invalid(ATTN, "q", "too many tokens"))?;
    let tk = i32::try_from(k.dims().first().copied().unwrap_or(0))
        .map_err(|_| invalid(ATTN, "k", "too many tokens"))?;
    attention_varlen(q, k, v, &[0, tq], &[0, tk], opts)
}

/// [`attention`] over a packed batch: sequence b has query tokens
/// `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` and keys `cu_seqlens_k[b]..cu_seqlens_k[b + 1]`.
///
/// # Errors
/// As [`attention`], plus invalid offsets (fewer than 2, not starting at 0, decreasing,
/// totals other than the token counts).
pub fn attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens_q: &[i32],
    cu_seqlens_k: &[i32],
    opts: &AttentionOptions,
) -> CResult<(Tensor, Tensor)> {
    let [tq, hq, d] = dims::<3>(ATTN, "q", q)?;
    let [tk, hkv, dk] = dims::<3>(ATTN, "k", k)?;
    let [tv, hv, _dv] = dims::<3>(ATTN, "v", v)?;
    for (t, arg) in [(q, "q"), (k, "k"), (v, "v")] {
        check_float(ATTN, arg, t)?;
        if t.dtype() != q.dtype() {
            return Err(invalid(
                ATTN,
                arg,
                format!("dtype {:?} but q is {:?}", t.dtype(), q.dtype()),
            ));
        }
        if !t.device().same_device(q.device()) {
            return Err(invalid(ATTN, arg, "on another device than q"));
        }
    }
    if dk != d || tv != tk || hv != hkv {
        return Err(invalid(
            ATTN,
            "k/v",
            format!(
                "k {:?} and v {:?} do not fit q {:?}: k needs q's head_dim, v k's tokens and heads",
                k.dims(),
                v.dims(),
                q.dims()
            ),
        ));
    }
    let (max_q, max_k) =
        crate::attention::validate_cu_seqlens(cu_seqlens_q, cu_seqlens_k).map_err(wrap)?;
    let _ = (max_q, max_k);
    let (end_q, end_k) = (
        cu_seqlens_q[cu_seqlens_q.len() - 1] as usize,
        cu_seqlens_k[cu_seqlens_k.len() - 1] as usize,
    );
    if end_q != tq || end_k != tk {
        return Err(invalid(
            ATTN,
            "cu_seqlens",
            format!("offsets end at ({end_q}, {end_k}) but q has {tq} tokens and k {tk}"),
        ));
    }
    if hkv == 0 || hq % hkv != 0 {
        return Err(invalid(
            ATTN,
            "heads",
            format!("heads_q {hq} is not a multiple of heads_kv {hkv}"),
        ));
    }
    let op = Arc::new(AttentionOp {
        opts: *opts,
        cu_q: cu_seqlens_q.into(),
        cu_k: cu_seqlens_k.into(),
        lse: Mutex::new(None),
    });
    let as_dyn: Arc<Box<dyn candle_core::CustomOp3 + Send + Sync>> =
        Arc::new(Box::new(AttentionOpRef(op.clone())));
    let o = q
        .contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, as_dyn)?;
    let lse = op
        .lse
        .lock()
        .map_err(|_| invalid(ATTN, "lse", "the LSE slot was poisoned by a panic"))?
        .clone()
        .ok_or_else(|| invalid(ATTN, "lse", "the forward produced no LSE"))?;
    Ok((o, lse))
}

/// The forward of one attention call; keeps the LSE it computed for the caller (and for a
/// CUDA backward).
struct AttentionOp {
    opts: AttentionOptions,
    cu_q: Arc<[i32]>,
    cu_k: Arc<[i32]>,
    lse: Mutex<Option<Tensor>>,
}

/// candle boxes custom ops; this shares one [`AttentionOp`] between candle's graph and
/// [`attention_varlen`], which reads the LSE back.
struct AttentionOpRef(Arc<AttentionOp>);

impl AttentionOp {
    fn store_lse(&self, lse: Tensor) -> CResult<()> {
        *self
            .lse
            .lock()
            .map_err(|_| invalid(ATTN, "lse", "the LSE slot was poisoned by a panic"))? = Some(lse);
        Ok(())
    }

    /// The reference problem for host f64 inputs.
    fn problem<'a>(
        &self,
        cu: &'a (Vec<usize>, Vec<usize>),
        q: &'a [f64],
        k: &'a [f64],
        v: &'a [f64],
        (hq, hkv, d, dv): (usize, usize, usize, usize),
    ) -> Problem<'a> {
        Problem {
            q,
            k,
            v,
            cu_seqlens_q: &cu.0,
            cu_seqlens_k: &cu.1,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            head_dim_v: dv,
            // The kernel's scale is an f32; use the same value.
            scale: f64::from(self.opts.scale_for(d)),
            softcap: self.opts.softcap.map(f64::from),
            mask: self.opts.mask,
        }
    }

    fn cu_usize(&self) -> (Vec<usize>, Vec<usize>) {
        // validate_cu_seqlens proved every offset non-negative.
        let f = |c: &[i32]| c.iter().map(|&x| x.max(0) as usize).collect::<Vec<_>>();
        (f(&self.cu_q), f(&self.cu_k))
    }
}

fn dims3(op: &'static str, arg: &'static str, l: &Layout) -> CResult<(usize, usize, usize)> {
    match l.dims() {
        &[a, b, c] => Ok((a, b, c)),
        other => Err(invalid(
            op,
            arg,
            format!("shape {other:?}; expected rank 3"),
        )),
    }
}

impl candle_core::CustomOp3 for AttentionOpRef {
    fn name(&self) -> &'static str {
        "longctx-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let op = &self.0;
        let (tq, hq, d) = dims3(ATTN, "q", lq)?;
        let (_, hkv, _) = dims3(ATTN, "k", lk)?;
        let (_, _, dv) = dims3(ATTN, "v", lv)?;
        let (q, k, v) = (
            cpu_f64(ATTN, "q", sq, lq)?,
            cpu_f64(ATTN, "k", sk, lk)?,
            cpu_f64(ATTN, "v", sv, lv)?,
        );
        let cu = op.cu_usize();
        let out = attention_f64(&op.problem(&cu, &q, &k, &v, (hq, hkv, d, dv))).map_err(wrap)?;
        let lse: Vec<f32> = out.lse.iter().map(|&x| x as f32).collect();
        op.store_lse(Tensor::from_vec(lse, (hq, tq), &candle_core::Device::Cpu)?)?;
        Ok((
            cpu_from_f64(ATTN, out.o, sq.dtype())?,
            Shape::from((tq, hq, dv)),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        let op = &self.0;
        let (o, shape, lse) =
            cuda::attention_forward(&op.opts, &op.cu_q, &op.cu_k, (sq, lq), (sk, lk), (sv, lv))?;
        op.store_lse(lse)?;
        Ok((o, shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = attention_backward(&self.0, q, k, v, o, dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward of one attention call: (dQ, dK, dV) in the inputs' shapes and dtype.
fn attention_backward(
    op: &AttentionOp,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    if q.device().is_cuda() {
        #[cfg(feature = "candle-cuda")]
        {
            let lse = op
                .lse
                .lock()
                .map_err(|_| invalid(ATTN, "lse", "the LSE slot was poisoned by a panic"))?
                .clone();
            return cuda::attention_backward(
                &op.opts,
                &op.cu_q,
                &op.cu_k,
                q,
                k,
                v,
                o,
                lse.as_ref(),
                dout,
            );
        }
    }
    // CPU (and any other device, through host copies): the f64 reference, which
    // recomputes the softmax from q and k (O and the LSE are not needed).
    let _ = o;
    let [_, hq, d] = dims::<3>(ATTN, "q", q)?;
    let [_, hkv, _] = dims::<3>(ATTN, "k", k)?;
    let [_, _, dv] = dims::<3>(ATTN, "v", v)?;
    let (qh, kh, vh, gh) = (host_f64(q)?, host_f64(k)?, host_f64(v)?, host_f64(dout)?);
    let cu = op.cu_usize();
    let g = attention_backward_f64(&op.problem(&cu, &qh, &kh, &vh, (hq, hkv, d, dv)), &gh)
        .map_err(wrap)?;
    Ok((
        tensor_from_f64(g.dq, q.dims(), q.dtype(), q)?,
        tensor_from_f64(g.dk, k.dims(), k.dtype(), k)?,
        tensor_from_f64(g.dv, v.dims(), v.dtype(), v)?,
    ))
}

// ---------------------------------------------------------------------------------------
// MoE routing
// ---------------------------------------------------------------------------------------

const MOE: &str = "candle moe";

/// Routing decisions: the chosen experts and their weights.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `[tokens, top_k]` u32 expert ids, by descending choice score, ties to the lower id.
    pub ids: Tensor,
    /// `[tokens, top_k]` f32 weights, differentiable with respect to the logits (the chosen
    /// set is held fixed, as in every MoE trainer).
    pub weights: Tensor,
    /// The ids on the host, `[tokens x top_k]`, for [`permute`].
    pub host_ids: Vec<i32>,
}

/// Routes `logits` `[tokens, experts]` with `cfg` (Mixtral, Qwen-MoE, DeepSeek-V2/V3
/// gating); `bias` is DeepSeek-V3's per-expert correction, added to the choice only.
///
/// On CUDA tensors the fused gating kernel runs on candle's stream (logits f32 or bf16; f16
/// logits are converted to f32 first, and their gradient back to f16); the chosen ids are
/// copied to the host once (a synchronising device-to-host copy of `tokens x top_k` i32s)
/// because [`permute`] and [`Routing::host_ids`] read them there, and `ids` is made from
/// that host copy; the weights stay on the device. The bias is uploaded as f32.
///
/// # Errors
/// An invalid `cfg` (see [`RouterConfig::validate`]), logits that are not `[tokens,
/// experts]` floats, a bias of the wrong length; on CUDA tensors f64 logits and what the
/// kernel rejects.
pub fn route(logits: &Tensor, cfg: &RouterConfig, bias: Option<&[f64]>) -> CResult<Routing> {
    let [tokens, experts] = dims::<2>(MOE, "logits", logits)?;
    check_float(MOE, "logits", logits)?;
    cfg.validate().map_err(wrap)?;
    if experts != cfg.experts {
        return Err(invalid(
            MOE,
            "logits",
            format!("{experts} experts but the config has {}", cfg.experts),
        ));
    }
    if let Some(b) = bias {
        if b.len() != experts {
            return Err(invalid(
                MOE,
                "bias",
                format!("{} entries for {experts} experts", b.len()),
            ));
        }
    }
    // The CUDA gating kernel reads f32 or bf16 logits: f16 goes through f32 (exact).
    let logits_in = if logits.device().is_cuda() && logits.dtype() == DType::F16 {
        logits.to_dtype(DType::F32)?
    } else {
        logits.contiguous()?
    };
    let op = Arc::new(RouteOp {
        cfg: *cfg,
        bias: bias.map(Into::into),
        ids: Mutex::new(None),
        #[cfg(feature = "candle-cuda")]
        routing: Mutex::new(None),
    });
    let as_dyn: Arc<Box<dyn candle_core::CustomOp1 + Send + Sync>> =
        Arc::new(Box::new(RouteOpRef(op.clone())));
    let weights = logits_in.apply_op1_arc(as_dyn)?;
    let host_ids = op
        .ids
        .lock()
        .map_err(|_| invalid(MOE, "ids", "the ids slot was poisoned by a panic"))?
        .clone()
        .ok_or_else(|| invalid(MOE, "ids", "routing produced no ids"))?;
    let ids_u32: Vec<u32> = host_ids.iter().map(|&e| e.max(0) as u32).collect();
    let ids = Tensor::from_vec(ids_u32, (tokens, cfg.top_k), logits.device())?;
    Ok(Routing {
        ids,
        weights,
        host_ids: host_ids.to_vec(),
    })
}

struct RouteOp {
    cfg: RouterConfig,
    bias: Option<Arc<[f64]>>,
    /// The chosen ids on the host, written by the forward.
    ids: Mutex<Option<Arc<[i32]>>>,
    /// The GPU routing (ids on the device) of a forward on CUDA, for the backward.
    #[cfg(feature = "candle-cuda")]
    routing: Mutex<Option<Arc<crate::moe::Routing>>>,
}

struct RouteOpRef(Arc<RouteOp>);

impl candle_core::CustomOp1 for RouteOpRef {
    fn name(&self) -> &'static str {
        "longctx-moe-route"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let op = &self.0;
        let tokens = l.dims().first().copied().unwrap_or(0);
        let z = cpu_f64(MOE, "logits", s, l)?;
        let r = moe_ref::route_f64(&op.cfg, &z, tokens, op.bias.as_deref()).map_err(wrap)?;
        *op.ids
            .lock()
            .map_err(|_| invalid(MOE, "ids", "the ids slot was poisoned by a panic"))? =
            Some(r.ids.into());
        Ok((
            cpu_from_f64(MOE, r.weights, DType::F32)?,
            Shape::from((tokens, op.cfg.top_k)),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        let op = &self.0;
        let out = cuda::route(&op.cfg, op.bias.as_deref(), s, l)?;
        *op.ids
            .lock()
            .map_err(|_| invalid(MOE, "ids", "the ids slot was poisoned by a panic"))? =
            Some(out.host_ids.into());
        *op.routing
            .lock()
            .map_err(|_| invalid(MOE, "ids", "the routing slot was poisoned by a panic"))? =
            Some(Arc::new(out.routing));
        Ok((out.weights, out.shape))
    }

    fn bwd(&self, logits: &Tensor, _w: &Tensor, dw: &Tensor) -> CResult<Option<Tensor>> {
        let op = &self.0;
        if logits.device().is_cuda() {
            #[cfg(feature = "candle-cuda")]
            {
                let routing = op
                    .routing
                    .lock()
                    .map_err(|_| invalid(MOE, "ids", "the routing slot was poisoned by a panic"))?
                    .clone()
                    .ok_or_else(|| {
                        invalid(
                            MOE,
                            "ids",
                            "the forward's device ids are missing (the backward needs the \
                             forward run on CUDA)",
                        )
                    })?;
                return Ok(Some(cuda::route_backward(&op.cfg, &routing, logits, dw)?));
            }
        }
        let ids = op
            .ids
            .lock()
            .map_err(|_| invalid(MOE, "ids", "the ids slot was poisoned by a panic"))?
            .clone()
            .ok_or_else(|| invalid(MOE, "ids", "backward before forward"))?;
        let [tokens, _] = dims::<2>(MOE, "logits", logits)?;
        let g = moe_ref::route_backward_f64(
            &op.cfg,
            &host_f64(logits)?,
            tokens,
            &ids,
            Some(&host_f64(dw)?),
            None,
            LossOptions {
                aux_coef: 0.0,
                z_coef: 0.0,
            },
        )
        .map_err(wrap)?;
        Ok(Some(tensor_from_f64(
            g,
            logits.dims(),
            logits.dtype(),
            logits,
        )?))
    }
}

/// An expert-ordered layout of one routing's assignments (host tables): expert e's rows of
/// a [`gather`]ed tensor are `offsets()[e] .. offsets()[e] + counts()[e]`, padding after.
///
/// With `candle-cuda`, the tables the kernels read live on the device too: made by
/// [`permute`] when the routing is on a CUDA device, else by the first op on CUDA tensors
/// (the GPU permutation kernels on the uploaded ids), once per `Permutation` (clones share
/// them); an op on another CUDA device remakes them there.
#[derive(Debug, Clone)]
pub struct Permutation {
    tables: Arc<PermutationTables>,
    top_k: usize,
    /// The routed ids on the host, `[tokens x top_k]`, and the sort's parameters, from
    /// which the device tables are made.
    #[cfg(feature = "candle-cuda")]
    host_ids: Arc<[i32]>,
    #[cfg(feature = "candle-cuda")]
    experts: usize,
    #[cfg(feature = "candle-cuda")]
    opts: PermuteOptions,
    #[cfg(feature = "candle-cuda")]
    device: Arc<Mutex<Option<Arc<cuda::DeviceTables>>>>,
}

impl Permutation {
    /// Kept assignments per expert.
    pub fn counts(&self) -> &[i32] {
        &self.tables.counts
    }

    /// Start row of each expert's segment, experts + 1 entries.
    pub fn offsets(&self) -> &[i32] {
        &self.tables.offsets
    }

    /// Rows of a [`gather`]ed tensor: every expert's segment with its padding,
    /// `offsets()[experts]`.
    pub fn used_slots(&self) -> usize {
        self.tables
            .offsets
            .last()
            .map_or(0, |&o| usize::try_from(o).unwrap_or(0))
    }

    /// Rows the tables provide for (the worst-case padding; at least [`used_slots`]).
    ///
    /// [`used_slots`]: Permutation::used_slots
    pub fn slots(&self) -> usize {
        self.tables.slot_assignment.len()
    }

    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.tables.slot_of.len() / self.top_k.max(1)
    }

    /// Experts picked per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// All tables (slot of each assignment, assignment of each slot, ...).
    pub fn tables(&self) -> &PermutationTables {
        &self.tables
    }
}

/// Sorts a routing's assignments by expert (stable), with optional padding and capacity
/// (see [`PermuteOptions`]).
///
/// The host tables come from the reference sort of [`Routing::host_ids`]; when the
/// routing's ids are on a CUDA device, the device tables are made there too (the ids
/// uploaded, then longctx's permutation kernels on candle's stream), so the ops that follow
/// read them without another copy.
///
/// # Errors
/// Ids out of range or repeated within a token, a bad block or capacity; on CUDA what the
/// upload or the kernels report.
pub fn permute(routing: &Routing, experts: usize, opts: PermuteOptions) -> CResult<Permutation> {
    let [tokens, top_k] = dims::<2>(MOE, "ids", &routing.ids)?;
    let tables =
        moe_ref::permute_f64(&routing.host_ids, tokens, top_k, experts, opts).map_err(wrap)?;
    let perm = Permutation {
        tables: Arc::new(tables),
        top_k,
        #[cfg(feature = "candle-cuda")]
        host_ids: routing.host_ids.as_slice().into(),
        #[cfg(feature = "candle-cuda")]
        experts,
        #[cfg(feature = "candle-cuda")]
        opts,
        #[cfg(feature = "candle-cuda")]
        device: Arc::new(Mutex::new(None)),
    };
    #[cfg(feature = "candle-cuda")]
    if let candle_core::Device::Cuda(cd) = routing.ids.device() {
        cuda::device_tables(&perm, cd)?;
    }
    Ok(perm)
}

/// Hidden states `x` `[tokens, hidden]` into expert order `[used_slots, hidden]` (see
/// [`Permutation::used_slots`]; zeros in padding). Differentiable: the gradient sums each
/// token's rows back.
///
/// On CUDA tensors (f32, f16, bf16) the gather kernel and, for the gradient, the gather's
/// backward kernel run on candle's stream over the permutation's device tables.
///
/// # Errors
/// `x` not `[perm.tokens(), hidden]` floats; on CUDA f64 tensors and what the kernel
/// rejects (hidden of 0).
pub fn gather(x: &Tensor, perm: &Permutation) -> CResult<Tensor> {
    let [tokens, _] = dims::<2>(MOE, "x", x)?;
    check_float(MOE, "x", x)?;
    if tokens != perm.tokens() {
        return Err(invalid(
            MOE,
            "x",
            format!("{tokens} tokens but the permutation has {}", perm.tokens()),
        ));
    }
    let all = x.contiguous()?.apply_op1(GatherOp { perm: perm.clone() })?;
    let used = perm.used_slots();
    if used < perm.slots() {
        all.narrow(0, 0, used)
    } else {
        Ok(all)
    }
}

/// Expert outputs `[rows, hidden]` back to tokens, `rows` between
/// [`Permutation::used_slots`] and [`Permutation::slots`] (rows past the used ones are
/// ignored): `out[t] = sum_j w[t, j] x
/// expert_out[slot of (t, j)]` over kept assignments, with `weights` `[tokens, top_k]`
/// (a routing's weights). Differentiable with respect to both.
///
/// On CUDA tensors (expert outputs f32, f16 or bf16) the combine kernel runs on candle's
/// stream over the permutation's device tables, with the weights as f32 (other float
/// dtypes are converted first, and their gradient back); the backward runs the combine's
/// gradient kernels (expert outputs and weights).
///
/// # Errors
/// Shapes that do not fit the permutation; on CUDA f64 expert outputs, tensors on
/// different devices and what the kernels reject.
pub fn combine(expert_out: &Tensor, weights: &Tensor, perm: &Permutation) -> CResult<Tensor> {
    let [slots, _] = dims::<2>(MOE, "expert_out", expert_out)?;
    let [tokens, top_k] = dims::<2>(MOE, "weights", weights)?;
    check_float(MOE, "expert_out", expert_out)?;
    check_float(MOE, "weights", weights)?;
    if slots < perm.used_slots()
        || slots > perm.slots()
        || tokens != perm.tokens()
        || top_k != perm.top_k()
    {
        return Err(invalid(
            MOE,
            "expert_out/weights",
            format!(
                "expert_out has {slots} rows and weights is [{tokens}, {top_k}]; the permutation \
                 uses {}..={} rows for [{}, {}]",
                perm.used_slots(),
                perm.slots(),
                perm.tokens(),
                perm.top_k()
            ),
        ));
    }
    if !expert_out.device().same_device(weights.device()) {
        return Err(invalid(MOE, "weights", "on another device than expert_out"));
    }
    // The CUDA kernels take f32 weights.
    let weights = if weights.device().is_cuda() && weights.dtype() != DType::F32 {
        weights.to_dtype(DType::F32)?
    } else {
        weights.contiguous()?
    };
    // The reference reads every slot the tables provide for; unused ones are zeros.
    let expert_out = if slots < perm.slots() {
        expert_out.pad_with_zeros(0, 0, perm.slots() - slots)?
    } else {
        expert_out.contiguous()?
    };
    expert_out.apply_op2(&weights, CombineOp { perm: perm.clone() })
}

struct GatherOp {
    perm: Permutation,
}

impl candle_core::CustomOp1 for GatherOp {
    fn name(&self) -> &'static str {
        "longctx-moe-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let hidden = l.dims().get(1).copied().unwrap_or(0);
        let x = cpu_f64(MOE, "x", s, l)?;
        let out = moe_ref::gather_f64(&x, hidden, self.perm.top_k, &self.perm.tables, None)
            .map_err(wrap)?;
        Ok((
            cpu_from_f64(MOE, out, s.dtype())?,
            Shape::from((self.perm.slots(), hidden)),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::gather(&self.perm, s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        if x.device().is_cuda() {
            #[cfg(feature = "candle-cuda")]
            return Ok(Some(cuda::gather_backward(&self.perm, x, grad)?));
        }
        let hidden = x.dims().get(1).copied().unwrap_or(0);
        // The gather's gradient is the unweighted combine.
        let g = moe_ref::combine_f64(
            &host_f64(grad)?,
            hidden,
            self.perm.top_k,
            &self.perm.tables,
            None,
        )
        .map_err(wrap)?;
        Ok(Some(tensor_from_f64(g, x.dims(), x.dtype(), x)?))
    }
}

struct CombineOp {
    perm: Permutation,
}

impl candle_core::CustomOp2 for CombineOp {
    fn name(&self) -> &'static str {
        "longctx-moe-combine"
    }

    fn cpu_fwd(
        &self,
        se: &CpuStorage,
        le: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let hidden = le.dims().get(1).copied().unwrap_or(0);
        let e = cpu_f64(MOE, "expert_out", se, le)?;
        let w = cpu_f64(MOE, "weights", sw, lw)?;
        let out = moe_ref::combine_f64(&e, hidden, self.perm.top_k, &self.perm.tables, Some(&w))
            .map_err(wrap)?;
        Ok((
            cpu_from_f64(MOE, out, se.dtype())?,
            Shape::from((self.perm.tokens(), hidden)),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        se: &candle_core::CudaStorage,
        le: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda::combine(&self.perm, (se, le), (sw, lw))
    }

    fn bwd(
        &self,
        expert_out: &Tensor,
        weights: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        if expert_out.device().is_cuda() {
            #[cfg(feature = "candle-cuda")]
            {
                let (d_e, d_w) = cuda::combine_backward(&self.perm, expert_out, weights, grad)?;
                return Ok((Some(d_e), Some(d_w)));
            }
        }
        let hidden = expert_out.dims().get(1).copied().unwrap_or(0);
        let (d_e, d_w) = moe_ref::combine_backward_f64(
            &host_f64(grad)?,
            &host_f64(expert_out)?,
            hidden,
            self.perm.top_k,
            &self.perm.tables,
            &host_f64(weights)?,
        )
        .map_err(wrap)?;
        Ok((
            Some(tensor_from_f64(
                d_e,
                expert_out.dims(),
                expert_out.dtype(),
                expert_out,
            )?),
            Some(tensor_from_f64(
                d_w,
                weights.dims(),
                weights.dtype(),
                weights,
            )?),
        ))
    }
}
