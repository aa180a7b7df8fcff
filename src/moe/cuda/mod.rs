//! GPU path of MoE routing: device checks -> the shared launch plans -> launches.
//!
//! Each op's validation (after the device-ownership checks), params, grid, block and shared
//! memory come from one pure `plan_*` function (in the stage's module: gating, permutation,
//! gather_combine, losses) that takes buffer addresses and lengths ([`Buf`]) and host-side
//! facts; the CUDA path passes device pointers and the CPU emulator (`crate::emulator`) host
//! addresses, so the two cannot disagree about a launch.
//!
//! Device index tensors that kernels dereference (expert ids, slots) only come from types
//! whose constructors guarantee their range: [`ExpertIds`] (validated on upload, or written by
//! the gating kernel) and [`Permutation`] (written by the permutation kernels).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, PushKernelArg};

use super::plan::{
    aux_grad_scale, z_grad_scale, GatePath, GatePlan, PermutePlan, StatsPlan, BIAS_THREADS,
    BWD_WARPS, LOSS_THREADS, ROW_THREADS, SCAN_THREADS, STATS_THREADS,
};
use super::{
    GroupScore, LossOptions, MoeElement, MoeHiddenElement, PermutationTables, PermuteOptions,
    RouterConfig, Scoring,
};
use crate::device::{cuda_err, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, RawBuffer};
use crate::sys;

const OP: &str = "moe";

/// f32 or bf16 variant of a kernel (MoeElement admits no other type).
fn pick<T: MoeElement>(f32_id: KernelId, bf16_id: KernelId) -> KernelId {
    match T::DTYPE {
        DType::F32 => f32_id,
        _ => bf16_id,
    }
}

/// f32, bf16 or f16 variant of a hidden-state kernel (gather, combine and their gradients).
fn pick_hidden<T: MoeHiddenElement>(
    f32_id: KernelId,
    bf16_id: KernelId,
    f16_id: KernelId,
) -> KernelId {
    match T::DTYPE {
        DType::F32 => f32_id,
        DType::BF16 => bf16_id,
        DType::F16 => f16_id,
    }
}

/// Queues `l` on `dev`'s stream; nothing for an empty grid.
///
/// # Safety
/// The caller guarantees that every device address in `l.params` points into a live
/// allocation of this context large enough for every access the kernel makes with those
/// params (shapes, strides and index ranges validated), that outputs do not alias inputs
/// unless the kernel is documented in place, and that the device pointer guards stay alive
/// until this returns.
unsafe fn launch<P: DeviceRepr>(dev: &Device, l: &KernelLaunch<P>) -> Result<()> {
    if l.grid.0 == 0 || l.grid.1 == 0 || l.grid.2 == 0 {
        return Ok(());
    }
    let func = dev.function(l.id)?;
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: forwarded from this function's contract (see each call site's SAFETY note).
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}

fn grid_u32(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| Error::overflow(OP, arg, format!("{n} blocks exceed the grid limit")))
}

fn u32_of(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::overflow(OP, arg, format!("{n} does not fit in u32")))
}

/// a x b elements, or an error naming `arg` when that overflows.
fn elems(a: usize, b: usize, arg: &'static str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::overflow(OP, arg, format!("{a} x {b} elements overflow usize")))
}

/// A buffer or view must live on `dev`'s CUDA context.
fn check_owned<T, S: DeviceSlice<T> + ?Sized>(
    dev: &Device,
    s: &S,
    arg: &'static str,
) -> Result<()> {
    if dev.owns_any(s) {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            arg,
            "buffer lives on another device context",
        ))
    }
}

/// A buffer of `len` elements must hold at least `want`: a longer one (a workspace sized
/// for a larger batch, or a buffer with room to spare) is used from its start and its tail
/// is left alone.
fn check_len(len: usize, want: usize, arg: &'static str, what: &str) -> Result<()> {
    if len >= want {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            arg,
            format!("{len} elements, expected at least {want} ({what})"),
        ))
    }
}

fn alloc<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.zeros(len.max(1))
}

/// One buffer of a launch, wherever it lives: its address and its length in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buf {
    pub addr: u64,
    pub len: usize,
}

/// `s` as a launch buffer with the device pointer `addr` (whose guard the caller holds).
fn dbuf<T, S: DeviceSlice<T> + ?Sized>(s: &S, addr: u64) -> Buf {
    Buf { addr, len: s.len() }
}

/// `b`'s address must be aligned to its element type `E` (always true of cudarc buffers
/// and views and of host slices; checked for raw pointers, whose kernels would fault).
fn check_aligned<E>(b: &Buf, arg: &'static str) -> Result<()> {
    check_element_alignment(OP, arg, b.addr, std::mem::size_of::<E>())
}

/// A caller's raw buffer as a launch buffer: a null pointer is refused unless the buffer
/// is empty (alignment is checked by the plans, against each buffer's element type).
fn raw_buf(r: RawBuffer, arg: &'static str) -> Result<Buf> {
    if r.ptr == 0 && r.len > 0 {
        return Err(Error::invalid(
            OP,
            arg,
            format!("null device pointer for {} elements", r.len),
        ));
    }
    Ok(Buf {
        addr: r.ptr,
        len: r.len,
    })
}

/// Whether `b`'s rows of `hidden` elements of `T` all start 16-byte aligned, so the
/// 16-byte vector path may read or write them: hidden a multiple of the vector width and the
/// buffer itself 16-byte aligned (CUDA allocations always are; host slices need not be).
fn rows_vec_aligned<T: MoeHiddenElement>(hidden: usize, b: &Buf) -> bool {
    hidden % (16 / T::DTYPE.size()) == 0 && b.addr % 16 == 0
}

fn scoring_of(s: Scoring) -> u32 {
    match s {
        Scoring::Softmax => sys::LONGCTX_MOE_SCORING_SOFTMAX,
        Scoring::Sigmoid => sys::LONGCTX_MOE_SCORING_SIGMOID,
    }
}

/// A coefficient as the kernels take it: finite in f32.
fn coef(x: f64, arg: &'static str) -> Result<f32> {
    let y = x as f32;
    if y.is_finite() {
        Ok(y)
    } else {
        Err(Error::invalid(OP, arg, format!("{x} is not finite in f32")))
    }
}

/// A permutation must have been computed (by `permute`) before anything reads its tables.
pub(crate) fn check_filled(filled: bool) -> Result<()> {
    if filled {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            "perm",
            "the permutation has not been computed yet (call permute first)",
        ))
    }
}

// One module per stage. Each holds its launch plans (the pure functions from validated
// arguments and buffer addresses to launches, shared by the CUDA path and the emulator;
// they check every buffer length against the shape, so a launch they return touches
// nothing outside the buffers they were given, given the index tensors' ranges, which the
// callers guarantee), then its device types and ops.
mod gather_combine;
mod gating;
mod losses;
mod permutation;

pub use gather_combine::{
    combine, combine_backward, combine_backward_raw, combine_raw, gather, gather_backward,
    gather_backward_raw, gather_raw,
};
#[cfg(feature = "emulator")]
pub(crate) use gather_combine::{
    plan_combine, plan_combine_backward, plan_gather, CombineBackwardBufs, CombineBufs, GatherBufs,
};
#[cfg(feature = "emulator")]
pub(crate) use gating::{plan_route, RouteBufs};
pub use gating::{route, route_block_kernel, route_raw, ExpertIds, Routing};
#[cfg(feature = "emulator")]
pub(crate) use losses::{
    losses_plan, plan_bias_update, plan_losses, plan_route_backward, LossBufs, RouteBackwardBufs,
};
pub use losses::{
    route_backward, route_backward_raw, router_losses, router_losses_raw, update_bias,
    update_bias_raw, RouterLosses,
};
pub use permutation::{permute, Permutation};
#[cfg(feature = "emulator")]
pub(crate) use permutation::{plan_permute, PermuteBufs};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn buf(addr: u64, len: usize) -> Buf {
        Buf { addr, len }
    }

    /// Raw pointers reach the plans unchecked by cudarc: a pointer that is not a multiple
    /// of its element is an alignment error before anything launches, and a misaligned
    /// 16-byte row start only turns the vector path off.
    #[test]
    fn plans_check_each_pointer_against_its_element() {
        let p = PermutePlan::new(4, 2, 4, PermuteOptions::default()).unwrap();
        let hidden = 8;
        let gather = |x: u64, scale: Option<u64>, out: u64| {
            plan_gather::<f32>(
                &p,
                hidden,
                &GatherBufs {
                    x: buf(x, p.tokens * hidden),
                    scale: scale.map(|s| buf(s, p.assignments)),
                    slot_assignment: buf(0x1000, p.max_slots),
                    offsets: buf(0x2000, p.experts + 1),
                    out: buf(out, p.max_slots * hidden),
                },
            )
        };
        assert_eq!(gather(0x10000, None, 0x20000).unwrap().params.vec, 1);
        assert_eq!(gather(0x10004, None, 0x20000).unwrap().params.vec, 0);
        for (x, scale, out, arg) in [
            (0x10002, None, 0x20000, "x"),
            (0x10000, Some(0x30001), 0x20000, "scale"),
            (0x10000, None, 0x20003, "out"),
        ] {
            match gather(x, scale, out) {
                Err(e @ Error::InvalidArgument { arg: a, .. }) => {
                    assert_eq!(e.kind(), ErrorKind::Alignment, "{e}");
                    assert_eq!(a, arg);
                }
                other => panic!("{arg}: expected an alignment error, got {other:?}"),
            }
        }
        let cfg = RouterConfig::mixtral(8, 2);
        let route = |logits: u64| {
            plan_route::<half::bf16>(
                &cfg,
                4,
                false,
                &RouteBufs {
                    logits: buf(logits, 32),
                    bias: None,
                    ids: buf(0x1000, 8),
                    weights: buf(0x2000, 8),
                },
            )
        };
        assert!(route(0x10002).is_ok());
        assert_eq!(route(0x10001).unwrap_err().kind(), ErrorKind::Alignment);
        assert_eq!(
            raw_buf(RawBuffer { ptr: 0, len: 1 }, "x")
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
        assert!(raw_buf(RawBuffer { ptr: 0, len: 0 }, "x").is_ok());
    }
}
