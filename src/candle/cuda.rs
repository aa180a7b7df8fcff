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
use cudarc::driver::CudaView;
use half::{bf16, f16};

use super::{contiguous_range, dims3, invalid, wrap, CResult, ATTN, ROPE};
use crate::attention::{AttentionOptions, AttnOutput, Qkv, SeqLens};
use crate::device::Device;
use crate::layout::HeadsLayout;
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
    s.as_cuda_slice::<T>()?
        .try_slice(r.0..r.1)
        .ok_or_else(|| invalid(ATTN, arg, "layout range leaves its buffer"))
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
