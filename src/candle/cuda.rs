//! The CUDA side of `longctx::candle` (feature `candle-cuda`): candle's CUDA storages in,
//! longctx's kernels on candle's own stream, candle storages out.
//!
//! No `unsafe` here: candle hands out its buffers as cudarc `CudaSlice`s
//! (`CudaStorage::as_cuda_slice`), longctx's safe ops take cudarc slices and views, and the
//! two crates share one cudarc (0.19), so the launches go through longctx's validated entry
//! points. Inputs are read through a view at the layout's start offset (candle passes
//! contiguous tensors here; anything else is an error, not a silent copy); outputs are
//! fresh allocations on candle's device.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};
use half::{bf16, f16};

use super::{contiguous_range, dims3, invalid, wrap, CResult, Permutation, ATTN, MOE, ROPE};
use crate::attention::{AttentionOptions, AttnOutput, Qkv, SeqLens};
use crate::device::Device;
use crate::layout::HeadsLayout;
use crate::moe::{ExpertIds, LossOptions, RouterConfig};
use crate::rope::{
    apply_rope_packed, Direction, Positions, RopeConfig, RopeOptions, RopeStyle, RopeTable,
};

/// One longctx [`Device`] per candle stream, kept for the process: each holds its loaded
/// kernel modules, so they are loaded once, not per op. The handle keeps the stream alive,
/// so a stream's address is never reused while its entry exists.
fn longctx_device(cd: &CudaDevice) -> CResult<Arc<Device>> {
    /// (the stream's CUstream address, the handle wrapping it).
    type Cache = Mutex<Vec<(usize, Arc<Device>)>>;
    static DEVICES: OnceLock<Cache> = OnceLock::new();
    let stream = cd.cuda_stream();
    let key = stream.cu_stream() as usize;
    let mut devices = DEVICES
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .map_err(|_| {
            invalid(
                "candle",
                "device",
                "the device cache was poisoned by a panic",
            )
        })?;
    if let Some((_, d)) = devices.iter().find(|(k, _)| *k == key) {
        return Ok(d.clone());
    }
    let d = Arc::new(Device::from_stream(stream).map_err(wrap)?);
    devices.push((key, d.clone()));
    Ok(d)
}

/// RoPE on a candle CUDA tensor `[tokens, heads, head_dim]`: copies it, rotates the copy in
/// place with the fused kernel on candle's stream.
pub(super) fn rope(
    config: &RopeConfig,
    seq_len: usize,
    style: RopeStyle,
    direction: Direction,
    positions: &[i32],
    s: &CudaStorage,
    l: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let (tokens, heads, head_dim) = dims3(ROPE, "x", l)?;
    let range = contiguous_range(ROPE, "x", l)?;
    let dev = longctx_device(&s.device)?;
    let table = RopeTable::new(&dev, config, seq_len).map_err(wrap)?;
    let pos = Positions::upload(&dev, positions).map_err(wrap)?;
    let q = HeadsLayout::contiguous(tokens, heads, head_dim);
    let k = HeadsLayout { heads: 0, ..q };
    let opts = RopeOptions {
        style,
        direction,
        ..RopeOptions::default()
    };
    macro_rules! run {
        ($t:ty) => {{
            let src = s.as_cuda_slice::<$t>()?;
            let view = src
                .try_slice(range.0..range.1)
                .ok_or_else(|| invalid(ROPE, "x", "layout range leaves its buffer"))?;
            let mut out = s.device.alloc_zeros::<$t>(range.1 - range.0)?;
            s.device.memcpy_dtod(&view, &mut out)?;
            apply_rope_packed(&dev, &table, &pos, &mut out, &q, &k, opts).map_err(wrap)?;
            CudaStorage::wrap_cuda_slice(out, s.device.clone())
        }};
    }
    let out = match s.dtype() {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => {
            return Err(invalid(
                ROPE,
                "x",
                format!("dtype {other:?}; the CUDA kernel takes f32, f16 or bf16"),
            ))
        }
    };
    Ok((out, l.shape().clone()))
}

/// The elements `r` of a candle CUDA storage of `T`, as a cudarc view.
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    r: (usize, usize),
    arg: &'static str,
) -> CResult<CudaView<'a, T>> {
    view_in(ATTN, s, r, arg)
}

/// [`view`] for op `op`'s argument `arg`.
fn view_in<'a, T: CudaDType>(
    op: &'static str,
    s: &'a CudaStorage,
    r: (usize, usize),
    arg: &'static str,
) -> CResult<CudaView<'a, T>> {
    s.as_cuda_slice::<T>()?
        .try_slice(r.0..r.1)
        .ok_or_else(|| invalid(op, arg, "layout range leaves its buffer"))
}

/// Attention forward on candle CUDA tensors: O (q's dtype) and the LSE tensor (f32,
/// `[heads_q, total_q]`), both on candle's device.
pub(super) fn attention_forward(
    opts: &AttentionOptions,
    cu_q: &[i32],
    cu_k: &[i32],
    (sq, lq): (&CudaStorage, &Layout),
    (sk, lk): (&CudaStorage, &Layout),
    (sv, lv): (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape, Tensor)> {
    let (tq, hq, d) = dims3(ATTN, "q", lq)?;
    let (tk, hkv, dk) = dims3(ATTN, "k", lk)?;
    let (tv, hv, dv) = dims3(ATTN, "v", lv)?;
    let (rq, rk, rv) = (
        contiguous_range(ATTN, "q", lq)?,
        contiguous_range(ATTN, "k", lk)?,
        contiguous_range(ATTN, "v", lv)?,
    );
    if sk.dtype() != sq.dtype() || sv.dtype() != sq.dtype() {
        return Err(invalid(ATTN, "k/v", "dtypes differ from q's"));
    }
    let dev = longctx_device(&sq.device)?;
    let seqlens = SeqLens::new(&dev, cu_q, cu_k).map_err(wrap)?;
    let o_len = tq
        .checked_mul(hq)
        .and_then(|n| n.checked_mul(dv))
        .ok_or_else(|| invalid(ATTN, "o", "size overflows usize"))?;
    let lse_len = hq
        .checked_mul(tq)
        .ok_or_else(|| invalid(ATTN, "lse", "size overflows usize"))?;
    let mut lse = sq.device.alloc_zeros::<f32>(lse_len.max(1))?;
    macro_rules! run {
        ($t:ty) => {{
            let (q, k, v) = (
                view::<$t>(sq, rq, "q")?,
                view::<$t>(sk, rk, "k")?,
                view::<$t>(sv, rv, "v")?,
            );
            let mut o = sq.device.alloc_zeros::<$t>(o_len.max(1))?;
            crate::attention::attention_forward(
                &dev,
                &Qkv {
                    q: &q,
                    q_layout: HeadsLayout::contiguous(tq, hq, d),
                    k: &k,
                    k_layout: HeadsLayout::contiguous(tk, hkv, dk),
                    v: &v,
                    v_layout: HeadsLayout::contiguous(tv, hv, dv),
                },
                AttnOutput {
                    o: &mut o,
                    o_layout: HeadsLayout::contiguous(tq, hq, dv),
                    lse: Some(&mut lse),
                },
                &seqlens,
                opts,
            )
            .map_err(wrap)?;
            CudaStorage::wrap_cuda_slice(o, sq.device.clone())
        }};
    }
    let o = match sq.dtype() {
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => {
            return Err(invalid(
                ATTN,
                "q",
                format!("dtype {other:?}; the CUDA attention kernels take f16 or bf16"),
            ))
        }
    };
    // An empty result keeps its one placeholder element, which no shape addresses.
    let lse_tensor = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(lse, sq.device.clone())),
        (hq, tq),
        BackpropOp::none(),
        false,
    );
    Ok((o, Shape::from((tq, hq, dv)), lse_tensor))
}

/// A contiguous CUDA tensor's storage guard, layout range and dims.
fn cuda_parts<'a>(
    t: &'a Tensor,
    arg: &'static str,
) -> CResult<(
    impl std::ops::Deref<Target = Storage> + 'a,
    (usize, usize),
    (usize, usize, usize),
)> {
    let (st, l) = t.storage_and_layout();
    let dims = dims3(ATTN, arg, l)?;
    let range = contiguous_range(ATTN, arg, l)?;
    Ok((st, range, dims))
}

fn cuda_storage<'a>(st: &'a Storage, arg: &'static str) -> CResult<&'a CudaStorage> {
    match st {
        Storage::Cuda(s) => Ok(s),
        _ => Err(invalid(ATTN, arg, "is not on the CUDA device of q")),
    }
}

/// Attention backward on CUDA tensors: longctx's backward kernels on candle's stream, with
/// the forward's O and LSE; dQ, dK and dV are fresh tensors in q's, k's and v's shapes (the
/// workspace is allocated per call on candle's device).
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_backward(
    opts: &AttentionOptions,
    cu_q: &[i32],
    cu_k: &[i32],
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: Option<&Tensor>,
    dout: &Tensor,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let lse = lse.ok_or_else(|| {
        invalid(
            ATTN,
            "lse",
            "the forward's LSE is missing (the backward needs the forward run on CUDA)",
        )
    })?;
    let dout = dout.contiguous()?;
    let (gq, rq, (tq, hq, d)) = cuda_parts(q, "q")?;
    let (gk, rk, (tk, hkv, dk)) = cuda_parts(k, "k")?;
    let (gv, rv, (tv, hv, dv)) = cuda_parts(v, "v")?;
    let (go, ro, _) = cuda_parts(o, "o")?;
    let (gd, rd, _) = cuda_parts(&dout, "dout")?;
    let (gl, ll) = lse.storage_and_layout();
    let rl = ll
        .contiguous_offsets()
        .ok_or_else(|| invalid(ATTN, "lse", "is not contiguous"))?;
    let (sq, sk, sv) = (
        cuda_storage(&gq, "q")?,
        cuda_storage(&gk, "k")?,
        cuda_storage(&gv, "v")?,
    );
    let (so, sd, sl) = (
        cuda_storage(&go, "o")?,
        cuda_storage(&gd, "dout")?,
        cuda_storage(&gl, "lse")?,
    );
    let dev = longctx_device(&sq.device)?;
    let seqlens = SeqLens::new(&dev, cu_q, cu_k).map_err(wrap)?;
    let ws_len = crate::attention::backward_workspace_len(tq, hq, d).map_err(wrap)?;
    let mut ws = sq.device.alloc_zeros::<f32>(ws_len.max(1))?;
    let lse_view = sl
        .as_cuda_slice::<f32>()?
        .try_slice(rl.0..rl.1)
        .ok_or_else(|| invalid(ATTN, "lse", "layout range leaves its buffer"))?;
    let size = |a: usize, b: usize, c: usize, arg: &'static str| {
        a.checked_mul(b)
            .and_then(|n| n.checked_mul(c))
            .ok_or_else(|| invalid(ATTN, arg, "size overflows usize"))
    };
    let (nq, nk, nv) = (
        size(tq, hq, d, "q")?,
        size(tk, hkv, dk, "k")?,
        size(tv, hv, dv, "v")?,
    );
    let bwd = crate::attention::BackwardOptions {
        attention: *opts,
        accumulate: false,
        deterministic: false,
    };
    macro_rules! run {
        ($t:ty) => {{
            let (qv, kv, vv) = (
                view::<$t>(sq, rq, "q")?,
                view::<$t>(sk, rk, "k")?,
                view::<$t>(sv, rv, "v")?,
            );
            let (ov, dov) = (view::<$t>(so, ro, "o")?, view::<$t>(sd, rd, "dout")?);
            let mut dq = sq.device.alloc_zeros::<$t>(nq.max(1))?;
            let mut dk_ = sq.device.alloc_zeros::<$t>(nk.max(1))?;
            let mut dv_ = sq.device.alloc_zeros::<$t>(nv.max(1))?;
            let ql = HeadsLayout::contiguous(tq, hq, d);
            let kl = HeadsLayout::contiguous(tk, hkv, dk);
            let vl = HeadsLayout::contiguous(tv, hv, dv);
            let ol = HeadsLayout::contiguous(tq, hq, dv);
            crate::attention::attention_backward(
                &dev,
                &Qkv {
                    q: &qv,
                    q_layout: ql,
                    k: &kv,
                    k_layout: kl,
                    v: &vv,
                    v_layout: vl,
                },
                &crate::attention::BackwardInputs {
                    o: &ov,
                    o_layout: ol,
                    dout: &dov,
                    dout_layout: ol,
                    lse: &lse_view,
                },
                crate::attention::AttnGrads {
                    dq: &mut dq,
                    dq_layout: ql,
                    dk: &mut dk_,
                    dk_layout: kl,
                    dv: &mut dv_,
                    dv_layout: vl,
                },
                &mut ws,
                &seqlens,
                &bwd,
            )
            .map_err(wrap)?;
            let wrap_t = |buf, shape: (usize, usize, usize)| {
                Tensor::from_storage(
                    Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, sq.device.clone())),
                    shape,
                    BackpropOp::none(),
                    false,
                )
            };
            (
                wrap_t(dq, (tq, hq, d)),
                wrap_t(dk_, (tk, hkv, dk)),
                wrap_t(dv_, (tv, hv, dv)),
            )
        }};
    }
    match sq.dtype() {
        DType::F16 => Ok(run!(f16)),
        DType::BF16 => Ok(run!(bf16)),
        other => Err(invalid(
            ATTN,
            "q",
            format!("dtype {other:?}; the CUDA attention kernels take f16 or bf16"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// MoE
// ---------------------------------------------------------------------------------------

/// A rank-2 layout's dims.
fn dims2(arg: &'static str, l: &Layout) -> CResult<(usize, usize)> {
    match l.dims() {
        &[a, b] => Ok((a, b)),
        other => Err(invalid(
            MOE,
            arg,
            format!("shape {other:?}; expected rank 2"),
        )),
    }
}

/// a x b, or an error naming `arg` when that overflows.
fn size2(a: usize, b: usize, arg: &'static str) -> CResult<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(MOE, arg, "size overflows usize"))
}

/// A fresh device buffer as a rank-2 tensor on candle's device, outside autograd (the
/// buffer may hold one placeholder element more than an empty shape addresses).
fn tensor2<T: CudaDType>(buf: CudaSlice<T>, shape: (usize, usize), cd: &CudaDevice) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, cd.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The CUDA storage in a storage guard.
fn moe_storage<'a>(st: &'a Storage, arg: &'static str) -> CResult<&'a CudaStorage> {
    match st {
        Storage::Cuda(s) => Ok(s),
        _ => Err(invalid(MOE, arg, "is not on a CUDA device")),
    }
}

/// The refusal of a dtype the MoE kernels are not built for.
fn moe_dtype(arg: &'static str, dtype: DType, takes: &str) -> candle_core::Error {
    invalid(
        MOE,
        arg,
        format!("dtype {dtype:?}; the CUDA MoE kernels take {takes}"),
    )
}

/// A permutation's tables on one device: longctx's permutation (made by its kernels from
/// the uploaded ids) and the handle of the stream it was made on.
#[derive(Debug)]
pub(super) struct DeviceTables {
    dev: Arc<Device>,
    perm: crate::moe::Permutation,
}

/// `perm`'s device tables on `cd`: the ones made before on this device, else made now
/// (the ids uploaded, the three permutation launches on candle's stream) and kept in `perm`
/// for its clones and later calls.
pub(super) fn device_tables(perm: &Permutation, cd: &CudaDevice) -> CResult<Arc<DeviceTables>> {
    let dev = longctx_device(cd)?;
    let mut slot = perm.device.lock().map_err(|_| {
        invalid(
            MOE,
            "perm",
            "the device tables slot was poisoned by a panic",
        )
    })?;
    if let Some(t) = slot.as_ref() {
        if Arc::ptr_eq(&t.dev, &dev) {
            return Ok(t.clone());
        }
    }
    let (tokens, top_k) = (perm.tokens(), perm.top_k());
    let ids = ExpertIds::upload(&dev, &perm.host_ids, tokens, top_k, perm.experts).map_err(wrap)?;
    let mut p =
        crate::moe::Permutation::new(&dev, tokens, top_k, perm.experts, perm.opts).map_err(wrap)?;
    crate::moe::permute(&dev, &ids, &mut p).map_err(wrap)?;
    if p.plan().max_slots != perm.slots() {
        return Err(invalid(
            MOE,
            "perm",
            format!(
                "the device tables have {} slots, the host tables {}",
                p.plan().max_slots,
                perm.slots()
            ),
        ));
    }
    let t = Arc::new(DeviceTables { dev, perm: p });
    *slot = Some(t.clone());
    Ok(t)
}

/// What the gating kernel produced for candle: the weights (f32 `[tokens, top_k]`, a fresh
/// candle buffer), the ids on the host and longctx's routing (ids on the device).
pub(super) struct RouteOut {
    pub weights: CudaStorage,
    pub shape: Shape,
    pub host_ids: Vec<i32>,
    pub routing: crate::moe::Routing,
}

/// Routing on a candle CUDA tensor of logits `[tokens, experts]` (f32 or bf16): the fused
/// gating kernel on candle's stream, then the weights copied into a candle buffer (device
/// to device) and the ids to the host (the one synchronising copy).
pub(super) fn route(
    cfg: &RouterConfig,
    bias: Option<&[f64]>,
    s: &CudaStorage,
    l: &Layout,
) -> CResult<RouteOut> {
    let (tokens, _experts) = dims2("logits", l)?;
    let range = contiguous_range(MOE, "logits", l)?;
    let dev = longctx_device(&s.device)?;
    let bias_dev = match bias {
        Some(b) => {
            let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            Some(dev.upload(&b32).map_err(wrap)?)
        }
        None => None,
    };
    let bias_ptr = bias_dev.as_ref().map(|b| b as &dyn DevicePtr<f32>);
    let mut routing = crate::moe::Routing::new(&dev, cfg, tokens).map_err(wrap)?;
    match s.dtype() {
        DType::F32 => {
            let z = view_in::<f32>(MOE, s, range, "logits")?;
            crate::moe::route::<f32>(&dev, cfg, &z, tokens, bias_ptr, &mut routing)
        }
        DType::BF16 => {
            let z = view_in::<bf16>(MOE, s, range, "logits")?;
            crate::moe::route::<bf16>(&dev, cfg, &z, tokens, bias_ptr, &mut routing)
        }
        other => return Err(moe_dtype("logits", other, "f32 or bf16 logits")),
    }
    .map_err(wrap)?;
    let n = size2(tokens, cfg.top_k, "weights")?;
    let mut weights = s.device.alloc_zeros::<f32>(n.max(1))?;
    s.device.memcpy_dtod(routing.weights(), &mut weights)?;
    let host_ids = routing.ids().download(&dev).map_err(wrap)?;
    Ok(RouteOut {
        weights: CudaStorage::wrap_cuda_slice(weights, s.device.clone()),
        shape: Shape::from((tokens, cfg.top_k)),
        host_ids,
        routing,
    })
}

/// The router backward on CUDA tensors: the gradient of the logits (the forward's input,
/// f32 or bf16) given the weights' gradient `dw` (`[tokens, top_k]`), with the forward's
/// device ids; computed in f32 and returned in the logits' dtype.
pub(super) fn route_backward(
    cfg: &RouterConfig,
    routing: &crate::moe::Routing,
    logits: &Tensor,
    dw: &Tensor,
) -> CResult<Tensor> {
    let logits = logits.contiguous()?;
    let dw = dw.to_dtype(DType::F32)?.contiguous()?;
    let (gl, ll) = logits.storage_and_layout();
    let (gd, ld) = dw.storage_and_layout();
    let (sl, sd) = (moe_storage(&gl, "logits")?, moe_storage(&gd, "d_weights")?);
    let (tokens, experts) = dims2("logits", ll)?;
    let (rl, rd) = (
        contiguous_range(MOE, "logits", ll)?,
        contiguous_range(MOE, "d_weights", ld)?,
    );
    let dev = longctx_device(&sl.device)?;
    let dwv = view_in::<f32>(MOE, sd, rd, "d_weights")?;
    let mut d = sl
        .device
        .alloc_zeros::<f32>(size2(tokens, experts, "d_logits")?.max(1))?;
    let no_losses = LossOptions {
        aux_coef: 0.0,
        z_coef: 0.0,
    };
    match sl.dtype() {
        DType::F32 => {
            let z = view_in::<f32>(MOE, sl, rl, "logits")?;
            crate::moe::route_backward::<f32>(
                &dev,
                cfg,
                &z,
                tokens,
                routing.ids(),
                Some(&dwv),
                None,
                no_losses,
                &mut d,
            )
        }
        DType::BF16 => {
            let z = view_in::<bf16>(MOE, sl, rl, "logits")?;
            crate::moe::route_backward::<bf16>(
                &dev,
                cfg,
                &z,
                tokens,
                routing.ids(),
                Some(&dwv),
                None,
                no_losses,
                &mut d,
            )
        }
        other => return Err(moe_dtype("logits", other, "f32 or bf16 logits")),
    }
    .map_err(wrap)?;
    let g = tensor2(d, (tokens, experts), &sl.device);
    if logits.dtype() == DType::F32 {
        Ok(g)
    } else {
        g.to_dtype(logits.dtype())
    }
}

/// Gather on a candle CUDA tensor `x` `[tokens, hidden]`: `[slots, hidden]` in x's dtype,
/// zeros in padding and past the used slots.
pub(super) fn gather(
    perm: &Permutation,
    s: &CudaStorage,
    l: &Layout,
) -> CResult<(CudaStorage, Shape)> {
    let (_tokens, hidden) = dims2("x", l)?;
    let range = contiguous_range(MOE, "x", l)?;
    let t = device_tables(perm, &s.device)?;
    let slots = t.perm.plan().max_slots;
    let n = size2(slots, hidden, "out")?;
    macro_rules! run {
        ($t:ty) => {{
            let x = view_in::<$t>(MOE, s, range, "x")?;
            let mut out = s.device.alloc_zeros::<$t>(n.max(1))?;
            crate::moe::gather::<$t>(&t.dev, &t.perm, &x, hidden, None, &mut out).map_err(wrap)?;
            CudaStorage::wrap_cuda_slice(out, s.device.clone())
        }};
    }
    let out = match s.dtype() {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => return Err(moe_dtype("x", other, "f32, f16 or bf16 hidden states")),
    };
    Ok((out, Shape::from((slots, hidden))))
}

/// The gather's gradient on CUDA tensors: `grad` `[slots, hidden]` summed back into each
/// token's row (the unweighted combine kernel), in x's shape and dtype.
pub(super) fn gather_backward(perm: &Permutation, x: &Tensor, grad: &Tensor) -> CResult<Tensor> {
    let grad = grad.contiguous()?;
    let (gg, lg) = grad.storage_and_layout();
    let sg = moe_storage(&gg, "grad")?;
    let (_slots, hidden) = dims2("grad", lg)?;
    let rg = contiguous_range(MOE, "grad", lg)?;
    let tokens = perm.tokens();
    let t = device_tables(perm, &sg.device)?;
    let n = size2(tokens, hidden, "d_x")?;
    macro_rules! run {
        ($t:ty) => {{
            let g = view_in::<$t>(MOE, sg, rg, "grad")?;
            let mut dx = sg.device.alloc_zeros::<$t>(n.max(1))?;
            crate::moe::gather_backward::<$t>(&t.dev, &t.perm, &g, hidden, &mut dx)
                .map_err(wrap)?;
            tensor2(dx, (tokens, hidden), &sg.device)
        }};
    }
    let dx = match sg.dtype() {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => return Err(moe_dtype("grad", other, "f32, f16 or bf16 hidden states")),
    };
    if dx.dtype() == x.dtype() {
        Ok(dx)
    } else {
        dx.to_dtype(x.dtype())
    }
}

/// Combine on candle CUDA tensors: expert outputs `[slots, hidden]` (f32, f16, bf16) and f32
/// weights `[tokens, top_k]` to `[tokens, hidden]` in the expert outputs' dtype.
pub(super) fn combine(
    perm: &Permutation,
    (se, le): (&CudaStorage, &Layout),
    (sw, lw): (&CudaStorage, &Layout),
) -> CResult<(CudaStorage, Shape)> {
    let (_slots, hidden) = dims2("expert_out", le)?;
    let (re, rw) = (
        contiguous_range(MOE, "expert_out", le)?,
        contiguous_range(MOE, "weights", lw)?,
    );
    if sw.dtype() != DType::F32 {
        return Err(moe_dtype("weights", sw.dtype(), "f32 weights"));
    }
    let w = view_in::<f32>(MOE, sw, rw, "weights")?;
    let t = device_tables(perm, &se.device)?;
    let tokens = perm.tokens();
    let n = size2(tokens, hidden, "out")?;
    macro_rules! run {
        ($t:ty) => {{
            let e = view_in::<$t>(MOE, se, re, "expert_out")?;
            let mut out = se.device.alloc_zeros::<$t>(n.max(1))?;
            crate::moe::combine::<$t>(&t.dev, &t.perm, &e, hidden, Some(&w), &mut out)
                .map_err(wrap)?;
            CudaStorage::wrap_cuda_slice(out, se.device.clone())
        }};
    }
    let out = match se.dtype() {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => {
            return Err(moe_dtype(
                "expert_out",
                other,
                "f32, f16 or bf16 hidden states",
            ))
        }
    };
    Ok((out, Shape::from((tokens, hidden))))
}

/// The combine's gradients on CUDA tensors: d expert_out (`[slots, hidden]`, expert_out's
/// dtype, zeros in padding) and d weights (f32 `[tokens, top_k]`, 0 for dropped
/// assignments), from the two gradient kernels.
pub(super) fn combine_backward(
    perm: &Permutation,
    expert_out: &Tensor,
    weights: &Tensor,
    grad: &Tensor,
) -> CResult<(Tensor, Tensor)> {
    let expert_out = expert_out.contiguous()?;
    let weights = weights.to_dtype(DType::F32)?.contiguous()?;
    let grad = grad.to_dtype(expert_out.dtype())?.contiguous()?;
    let (ge, le) = expert_out.storage_and_layout();
    let (gw, lw) = weights.storage_and_layout();
    let (gg, lg) = grad.storage_and_layout();
    let (se, sw, sg) = (
        moe_storage(&ge, "expert_out")?,
        moe_storage(&gw, "weights")?,
        moe_storage(&gg, "grad")?,
    );
    let (slots, hidden) = dims2("expert_out", le)?;
    let (tokens, top_k) = dims2("weights", lw)?;
    let (re, rw, rg) = (
        contiguous_range(MOE, "expert_out", le)?,
        contiguous_range(MOE, "weights", lw)?,
        contiguous_range(MOE, "grad", lg)?,
    );
    let t = device_tables(perm, &se.device)?;
    let w = view_in::<f32>(MOE, sw, rw, "weights")?;
    let n_e = size2(slots, hidden, "d_expert_out")?;
    let mut d_w = se
        .device
        .alloc_zeros::<f32>(size2(tokens, top_k, "d_weights")?.max(1))?;
    macro_rules! run {
        ($t:ty) => {{
            let e = view_in::<$t>(MOE, se, re, "expert_out")?;
            let g = view_in::<$t>(MOE, sg, rg, "grad")?;
            let mut d_e = se.device.alloc_zeros::<$t>(n_e.max(1))?;
            crate::moe::combine_backward::<$t>(
                &t.dev, &t.perm, &g, &e, hidden, &w, &mut d_e, &mut d_w,
            )
            .map_err(wrap)?;
            tensor2(d_e, (slots, hidden), &se.device)
        }};
    }
    let d_e = match se.dtype() {
        DType::F32 => run!(f32),
        DType::F16 => run!(f16),
        DType::BF16 => run!(bf16),
        other => {
            return Err(moe_dtype(
                "expert_out",
                other,
                "f32, f16 or bf16 hidden states",
            ))
        }
    };
    Ok((d_e, tensor2(d_w, (tokens, top_k), &se.device)))
}
