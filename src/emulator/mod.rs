//! The CPU emulator: runs the crate's CUDA kernel sources themselves on the CPU, with race
//! and bounds checkers, so kernels are proven on machines without a GPU.
//!
//! Enabled by the `emulator` feature (the crate's own tests always enable it). The kernel
//! files in `kernels/` are compiled with the host C++ compiler against
//! `kernels/emu/cuda_emu.h`; each launch runs every CTA of its grid, one after another (the
//! CTAs of a thread-block cluster together, with distributed shared memory and the cluster
//! barrier), with every CUDA thread as a fiber that switches at barriers and warp
//! collectives, so a run is deterministic. `mma.sync`, `ldmatrix`, `cp.async`, shuffles,
//! votes and the MUFU approximations have exact twins written from the PTX ISA manual. A launch fails with
//! [`Error::Emulator`] naming kernel, block, thread and address on: a shared-memory race
//! (a byte written by one thread and touched by another with no barrier, or no `__syncwarp`
//! or collective within a warp, or no cluster barrier across CTAs, between them), a read of shared memory never written, a
//! shared access outside every allocation, a read of a `cp.async` destination before a wait
//! covers it, a global access outside the launch's buffers or a write to an input, lanes
//! that disagree at a warp collective, a barrier some threads skip or exit before, a trap.
//!
//! The op functions here mirror the GPU ones with host slices in place of device buffers;
//! validation, params, grid and shared memory come from the same functions the CUDA path
//! calls. What the emulator cannot show: speed, the real memory model (it runs threads in a
//! fixed interleaving), and nvcc's code generation (FMA contraction, register allocation).
//! docs/NOTES.md has the design.

use std::any::TypeId;
use std::ffi::{c_char, c_void, CStr};

use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::sys;

mod kv_append;
mod kv_cache;
mod kv_extend;
mod mla;
mod moe;
mod ops;
pub mod selftest;
pub use kv_append::*;
pub use kv_cache::*;
pub use kv_extend::*;
pub use mla::*;
pub use moe::*;
pub use ops::*;

#[repr(C)]
struct EmuBuffer {
    base: u64,
    bytes: u64,
    writable: u32,
    pad: u32,
    name: *const c_char,
}

#[repr(C)]
struct EmuLaunch {
    kernel: *const c_char,
    tramp: unsafe extern "C" fn(*const c_void, *const c_void),
    entry: *const c_void,
    params: *const c_void,
    grid: [u32; 3],
    block: [u32; 3],
    cluster: [u32; 3],
    dyn_smem: u32,
    buffers: *const EmuBuffer,
    n_buffers: u64,
}

extern "C" {
    fn longctx_emu_launch(launch: *const EmuLaunch, err: *mut c_char, err_len: u64) -> i32;
}

/// Which compiled copy of a kernel runs: the portable code (what compute_80 PTX and the
/// sm_80/86/89 cubins hold) or the sm_90a code (H100, H200), whose attention tiles differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// The portable tile shapes (PTX arch 80).
    Sm80,
    /// The sm_90a tile shapes (PTX arch 90).
    Sm90,
}

impl Arch {
    /// The PTX arch number the plan's tile table is keyed by.
    pub fn ptx_arch(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm90 => 90,
        }
    }

    /// The opt-in shared memory per block the emulated plans assume, for ops that pick a
    /// kernel by it: `Sm80` as the smallest part the portable code runs on (sm_86 / sm_89,
    /// 99 KB), `Sm90` as an H100 (227 KB).
    pub fn smem_per_block(self) -> usize {
        match self {
            Arch::Sm80 => 101_376,
            Arch::Sm90 => 232_448,
        }
    }
}

/// One host buffer a launch may touch.
pub(crate) struct HostBuf {
    base: u64,
    bytes: u64,
    writable: bool,
    name: &'static CStr,
}

impl HostBuf {
    pub(crate) fn input<T>(s: &[T], name: &'static CStr) -> Self {
        HostBuf {
            base: s.as_ptr() as u64,
            bytes: std::mem::size_of_val(s) as u64,
            writable: false,
            name,
        }
    }
    pub(crate) fn output<T>(s: &mut [T], name: &'static CStr) -> Self {
        HostBuf {
            base: s.as_mut_ptr() as u64,
            bytes: std::mem::size_of_val(s) as u64,
            writable: true,
            name,
        }
    }
    pub(crate) fn addr(&self) -> u64 {
        self.base
    }
}

macro_rules! entries {
    ($($id:ident => $sym:ident, $sym90:ident : $p:ty;)*) => {
        extern "C" {
            $(fn $sym(p: $p);)*
        }
        /// The emulated entry point of `id` for `arch` and the type of its params.
        fn entry(id: KernelId, arch: Arch) -> (*const c_void, TypeId) {
            match id {
                $(KernelId::$id => {
                    let f: unsafe extern "C" fn($p) = match arch {
                        Arch::Sm80 => $sym,
                        Arch::Sm90 => $sym90,
                    };
                    (f as *const c_void, TypeId::of::<$p>())
                })*
            }
        }
    };
}

macro_rules! sm90_entries {
    ($($sym:ident : $p:ty;)*) => {
        extern "C" {
            $(fn $sym(p: $p);)*
        }
    };
}

sm90_entries! {
    longctx_attn_fwd_f16_hd64_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_f16_hd96_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_f16_hd128_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_f16_hd192_dv128_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_f16_hd256_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_bf16_hd64_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_bf16_hd96_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_bf16_hd128_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_bf16_hd192_dv128_emu_sm90: sys::LongctxAttnParams;
    longctx_attn_fwd_bf16_hd256_emu_sm90: sys::LongctxAttnParams;
    longctx_kv_extend_f16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_f16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_bf16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_f16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    longctx_kv_extend_rot_bf16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
}

entries! {
    RopeF32Vec => longctx_rope_f32_vec, longctx_rope_f32_vec: sys::LongctxRopeParams;
    RopeF32Scalar => longctx_rope_f32_scalar, longctx_rope_f32_scalar: sys::LongctxRopeParams;
    RopeF16Vec => longctx_rope_f16_vec, longctx_rope_f16_vec: sys::LongctxRopeParams;
    RopeF16Scalar => longctx_rope_f16_scalar, longctx_rope_f16_scalar: sys::LongctxRopeParams;
    RopeBf16Vec => longctx_rope_bf16_vec, longctx_rope_bf16_vec: sys::LongctxRopeParams;
    RopeBf16Scalar => longctx_rope_bf16_scalar, longctx_rope_bf16_scalar: sys::LongctxRopeParams;
    AttnFwdF16Hd64 => longctx_attn_fwd_f16_hd64, longctx_attn_fwd_f16_hd64_emu_sm90: sys::LongctxAttnParams;
    AttnFwdF16Hd96 => longctx_attn_fwd_f16_hd96, longctx_attn_fwd_f16_hd96_emu_sm90: sys::LongctxAttnParams;
    AttnFwdF16Hd128 => longctx_attn_fwd_f16_hd128, longctx_attn_fwd_f16_hd128_emu_sm90: sys::LongctxAttnParams;
    AttnFwdF16Hd192Dv128 => longctx_attn_fwd_f16_hd192_dv128, longctx_attn_fwd_f16_hd192_dv128_emu_sm90: sys::LongctxAttnParams;
    AttnFwdF16Hd256 => longctx_attn_fwd_f16_hd256, longctx_attn_fwd_f16_hd256_emu_sm90: sys::LongctxAttnParams;
    AttnFwdBf16Hd64 => longctx_attn_fwd_bf16_hd64, longctx_attn_fwd_bf16_hd64_emu_sm90: sys::LongctxAttnParams;
    AttnFwdBf16Hd96 => longctx_attn_fwd_bf16_hd96, longctx_attn_fwd_bf16_hd96_emu_sm90: sys::LongctxAttnParams;
    AttnFwdBf16Hd128 => longctx_attn_fwd_bf16_hd128, longctx_attn_fwd_bf16_hd128_emu_sm90: sys::LongctxAttnParams;
    AttnFwdBf16Hd192Dv128 => longctx_attn_fwd_bf16_hd192_dv128, longctx_attn_fwd_bf16_hd192_dv128_emu_sm90: sys::LongctxAttnParams;
    AttnFwdBf16Hd256 => longctx_attn_fwd_bf16_hd256, longctx_attn_fwd_bf16_hd256_emu_sm90: sys::LongctxAttnParams;
    AttnBwdPreF16 => longctx_attn_bwd_pre_f16, longctx_attn_bwd_pre_f16: sys::LongctxAttnBwdParams;
    AttnBwdPreBf16 => longctx_attn_bwd_pre_bf16, longctx_attn_bwd_pre_bf16: sys::LongctxAttnBwdParams;
    AttnBwdDqF16 => longctx_attn_bwd_dq_f16, longctx_attn_bwd_dq_f16: sys::LongctxAttnBwdParams;
    AttnBwdDqBf16 => longctx_attn_bwd_dq_bf16, longctx_attn_bwd_dq_bf16: sys::LongctxAttnBwdParams;
    AttnBwdF16Hd64 => longctx_attn_bwd_f16_hd64, longctx_attn_bwd_f16_hd64: sys::LongctxAttnBwdParams;
    AttnBwdF16Hd96 => longctx_attn_bwd_f16_hd96, longctx_attn_bwd_f16_hd96: sys::LongctxAttnBwdParams;
    AttnBwdF16Hd128 => longctx_attn_bwd_f16_hd128, longctx_attn_bwd_f16_hd128: sys::LongctxAttnBwdParams;
    AttnBwdF16Hd192Dv128 => longctx_attn_bwd_f16_hd192_dv128, longctx_attn_bwd_f16_hd192_dv128: sys::LongctxAttnBwdParams;
    AttnBwdF16Hd256 => longctx_attn_bwd_f16_hd256, longctx_attn_bwd_f16_hd256: sys::LongctxAttnBwdParams;
    AttnBwdBf16Hd64 => longctx_attn_bwd_bf16_hd64, longctx_attn_bwd_bf16_hd64: sys::LongctxAttnBwdParams;
    AttnBwdBf16Hd96 => longctx_attn_bwd_bf16_hd96, longctx_attn_bwd_bf16_hd96: sys::LongctxAttnBwdParams;
    AttnBwdBf16Hd128 => longctx_attn_bwd_bf16_hd128, longctx_attn_bwd_bf16_hd128: sys::LongctxAttnBwdParams;
    AttnBwdBf16Hd192Dv128 => longctx_attn_bwd_bf16_hd192_dv128, longctx_attn_bwd_bf16_hd192_dv128: sys::LongctxAttnBwdParams;
    AttnBwdBf16Hd256 => longctx_attn_bwd_bf16_hd256, longctx_attn_bwd_bf16_hd256: sys::LongctxAttnBwdParams;
    AttnBwdDqDetF16Hd64 => longctx_attn_bwd_dq_det_f16_hd64, longctx_attn_bwd_dq_det_f16_hd64: sys::LongctxAttnBwdParams;
    AttnBwdDqDetF16Hd96 => longctx_attn_bwd_dq_det_f16_hd96, longctx_attn_bwd_dq_det_f16_hd96: sys::LongctxAttnBwdParams;
    AttnBwdDqDetF16Hd128 => longctx_attn_bwd_dq_det_f16_hd128, longctx_attn_bwd_dq_det_f16_hd128: sys::LongctxAttnBwdParams;
    AttnBwdDqDetF16Hd192Dv128 => longctx_attn_bwd_dq_det_f16_hd192_dv128, longctx_attn_bwd_dq_det_f16_hd192_dv128: sys::LongctxAttnBwdParams;
    AttnBwdDqDetF16Hd256 => longctx_attn_bwd_dq_det_f16_hd256, longctx_attn_bwd_dq_det_f16_hd256: sys::LongctxAttnBwdParams;
    AttnBwdDqDetBf16Hd64 => longctx_attn_bwd_dq_det_bf16_hd64, longctx_attn_bwd_dq_det_bf16_hd64: sys::LongctxAttnBwdParams;
    AttnBwdDqDetBf16Hd96 => longctx_attn_bwd_dq_det_bf16_hd96, longctx_attn_bwd_dq_det_bf16_hd96: sys::LongctxAttnBwdParams;
    AttnBwdDqDetBf16Hd128 => longctx_attn_bwd_dq_det_bf16_hd128, longctx_attn_bwd_dq_det_bf16_hd128: sys::LongctxAttnBwdParams;
    AttnBwdDqDetBf16Hd192Dv128 => longctx_attn_bwd_dq_det_bf16_hd192_dv128, longctx_attn_bwd_dq_det_bf16_hd192_dv128: sys::LongctxAttnBwdParams;
    AttnBwdDqDetBf16Hd256 => longctx_attn_bwd_dq_det_bf16_hd256, longctx_attn_bwd_dq_det_bf16_hd256: sys::LongctxAttnBwdParams;
    MoeGateWarpF32 => longctx_moe_gate_warp_f32, longctx_moe_gate_warp_f32: sys::LongctxMoeGateParams;
    MoeGateWarpBf16 => longctx_moe_gate_warp_bf16, longctx_moe_gate_warp_bf16: sys::LongctxMoeGateParams;
    MoeGateBlockF32 => longctx_moe_gate_block_f32, longctx_moe_gate_block_f32: sys::LongctxMoeGateParams;
    MoeGateBlockBf16 => longctx_moe_gate_block_bf16, longctx_moe_gate_block_bf16: sys::LongctxMoeGateParams;
    MoeGateBwdF32 => longctx_moe_gate_bwd_f32, longctx_moe_gate_bwd_f32: sys::LongctxMoeGateBwdParams;
    MoeGateBwdBf16 => longctx_moe_gate_bwd_bf16, longctx_moe_gate_bwd_bf16: sys::LongctxMoeGateBwdParams;
    MoeStatsF32 => longctx_moe_stats_f32, longctx_moe_stats_f32: sys::LongctxMoeStatsParams;
    MoeStatsBf16 => longctx_moe_stats_bf16, longctx_moe_stats_bf16: sys::LongctxMoeStatsParams;
    MoeLoss => longctx_moe_loss, longctx_moe_loss: sys::LongctxMoeLossParams;
    MoeBiasUpdate => longctx_moe_bias_update, longctx_moe_bias_update: sys::LongctxMoeBiasParams;
    MoeCount => longctx_moe_count, longctx_moe_count: sys::LongctxMoePermuteParams;
    MoeScan => longctx_moe_scan, longctx_moe_scan: sys::LongctxMoePermuteParams;
    MoeScatter => longctx_moe_scatter, longctx_moe_scatter: sys::LongctxMoePermuteParams;
    MoeGatherF32 => longctx_moe_gather_f32, longctx_moe_gather_f32: sys::LongctxMoeGatherParams;
    MoeGatherBf16 => longctx_moe_gather_bf16, longctx_moe_gather_bf16: sys::LongctxMoeGatherParams;
    MoeCombineF32 => longctx_moe_combine_f32, longctx_moe_combine_f32: sys::LongctxMoeCombineParams;
    MoeCombineBf16 => longctx_moe_combine_bf16, longctx_moe_combine_bf16: sys::LongctxMoeCombineParams;
    MoeCombineDwF32 => longctx_moe_combine_dw_f32, longctx_moe_combine_dw_f32: sys::LongctxMoeCombineDwParams;
    MoeCombineDwBf16 => longctx_moe_combine_dw_bf16, longctx_moe_combine_dw_bf16: sys::LongctxMoeCombineDwParams;
    MoeGatherF16 => longctx_moe_gather_f16, longctx_moe_gather_f16: sys::LongctxMoeGatherParams;
    MoeCombineF16 => longctx_moe_combine_f16, longctx_moe_combine_f16: sys::LongctxMoeCombineParams;
    MoeCombineDwF16 => longctx_moe_combine_dw_f16, longctx_moe_combine_dw_f16: sys::LongctxMoeCombineDwParams;
    KvMergeF32Vec => longctx_kv_merge_f32_vec, longctx_kv_merge_f32_vec: sys::LongctxKvMergeParams;
    KvMergeF32Scalar => longctx_kv_merge_f32_scalar, longctx_kv_merge_f32_scalar: sys::LongctxKvMergeParams;
    KvMergeF16Vec => longctx_kv_merge_f16_vec, longctx_kv_merge_f16_vec: sys::LongctxKvMergeParams;
    KvMergeF16Scalar => longctx_kv_merge_f16_scalar, longctx_kv_merge_f16_scalar: sys::LongctxKvMergeParams;
    KvMergeBf16Vec => longctx_kv_merge_bf16_vec, longctx_kv_merge_bf16_vec: sys::LongctxKvMergeParams;
    KvMergeBf16Scalar => longctx_kv_merge_bf16_scalar, longctx_kv_merge_bf16_scalar: sys::LongctxKvMergeParams;
    KvMergeF32F16Vec => longctx_kv_merge_f32_f16_vec, longctx_kv_merge_f32_f16_vec: sys::LongctxKvMergeParams;
    KvMergeF32F16Scalar => longctx_kv_merge_f32_f16_scalar, longctx_kv_merge_f32_f16_scalar: sys::LongctxKvMergeParams;
    KvMergeF32Bf16Vec => longctx_kv_merge_f32_bf16_vec, longctx_kv_merge_f32_bf16_vec: sys::LongctxKvMergeParams;
    KvMergeF32Bf16Scalar => longctx_kv_merge_f32_bf16_scalar, longctx_kv_merge_f32_bf16_scalar: sys::LongctxKvMergeParams;
    KvDecodeF16Hd64 => longctx_kv_decode_f16_hd64, longctx_kv_decode_f16_hd64: sys::LongctxKvDecodeParams;
    KvDecodeF16Hd128 => longctx_kv_decode_f16_hd128, longctx_kv_decode_f16_hd128: sys::LongctxKvDecodeParams;
    KvDecodeF16Hd256 => longctx_kv_decode_f16_hd256, longctx_kv_decode_f16_hd256: sys::LongctxKvDecodeParams;
    KvDecodeF16Hd512 => longctx_kv_decode_f16_hd512, longctx_kv_decode_f16_hd512: sys::LongctxKvDecodeParams;
    KvDecodeBf16Hd64 => longctx_kv_decode_bf16_hd64, longctx_kv_decode_bf16_hd64: sys::LongctxKvDecodeParams;
    KvDecodeBf16Hd128 => longctx_kv_decode_bf16_hd128, longctx_kv_decode_bf16_hd128: sys::LongctxKvDecodeParams;
    KvDecodeBf16Hd256 => longctx_kv_decode_bf16_hd256, longctx_kv_decode_bf16_hd256: sys::LongctxKvDecodeParams;
    KvDecodeBf16Hd512 => longctx_kv_decode_bf16_hd512, longctx_kv_decode_bf16_hd512: sys::LongctxKvDecodeParams;
    KvDecodeF16Fp8Hd64 => longctx_kv_decode_f16_fp8_hd64, longctx_kv_decode_f16_fp8_hd64: sys::LongctxKvDecodeParams;
    KvDecodeF16Fp8Hd128 => longctx_kv_decode_f16_fp8_hd128, longctx_kv_decode_f16_fp8_hd128: sys::LongctxKvDecodeParams;
    KvDecodeF16Fp8Hd256 => longctx_kv_decode_f16_fp8_hd256, longctx_kv_decode_f16_fp8_hd256: sys::LongctxKvDecodeParams;
    KvDecodeF16Fp8Hd512 => longctx_kv_decode_f16_fp8_hd512, longctx_kv_decode_f16_fp8_hd512: sys::LongctxKvDecodeParams;
    KvDecodeBf16Fp8Hd64 => longctx_kv_decode_bf16_fp8_hd64, longctx_kv_decode_bf16_fp8_hd64: sys::LongctxKvDecodeParams;
    KvDecodeBf16Fp8Hd128 => longctx_kv_decode_bf16_fp8_hd128, longctx_kv_decode_bf16_fp8_hd128: sys::LongctxKvDecodeParams;
    KvDecodeBf16Fp8Hd256 => longctx_kv_decode_bf16_fp8_hd256, longctx_kv_decode_bf16_fp8_hd256: sys::LongctxKvDecodeParams;
    KvDecodeBf16Fp8Hd512 => longctx_kv_decode_bf16_fp8_hd512, longctx_kv_decode_bf16_fp8_hd512: sys::LongctxKvDecodeParams;
    KvExtendF16Hd64 => longctx_kv_extend_f16_hd64, longctx_kv_extend_f16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Hd96 => longctx_kv_extend_f16_hd96, longctx_kv_extend_f16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Hd128 => longctx_kv_extend_f16_hd128, longctx_kv_extend_f16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Hd256 => longctx_kv_extend_f16_hd256, longctx_kv_extend_f16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Hd64 => longctx_kv_extend_bf16_hd64, longctx_kv_extend_bf16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Hd96 => longctx_kv_extend_bf16_hd96, longctx_kv_extend_bf16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Hd128 => longctx_kv_extend_bf16_hd128, longctx_kv_extend_bf16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Hd256 => longctx_kv_extend_bf16_hd256, longctx_kv_extend_bf16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Hd512 => longctx_kv_extend_f16_hd512, longctx_kv_extend_f16_hd512: sys::LongctxKvExtendParams;
    KvExtendBf16Hd512 => longctx_kv_extend_bf16_hd512, longctx_kv_extend_bf16_hd512: sys::LongctxKvExtendParams;
    KvExtendR64F16Hd512 => longctx_kv_extend_r64_f16_hd512, longctx_kv_extend_r64_f16_hd512: sys::LongctxKvExtendParams;
    KvExtendR64Bf16Hd512 => longctx_kv_extend_r64_bf16_hd512, longctx_kv_extend_r64_bf16_hd512: sys::LongctxKvExtendParams;
    KvExtendRotF16Hd512 => longctx_kv_extend_rot_f16_hd512, longctx_kv_extend_rot_f16_hd512: sys::LongctxKvExtendParams;
    KvExtendRotBf16Hd512 => longctx_kv_extend_rot_bf16_hd512, longctx_kv_extend_rot_bf16_hd512: sys::LongctxKvExtendParams;
    KvExtendRotR64F16Hd512 => longctx_kv_extend_rot_r64_f16_hd512, longctx_kv_extend_rot_r64_f16_hd512: sys::LongctxKvExtendParams;
    KvExtendRotR64Bf16Hd512 => longctx_kv_extend_rot_r64_bf16_hd512, longctx_kv_extend_rot_r64_bf16_hd512: sys::LongctxKvExtendParams;
    KvExtendF16Fp8Hd512 => longctx_kv_extend_f16_fp8_hd512, longctx_kv_extend_f16_fp8_hd512: sys::LongctxKvExtendParams;
    KvExtendBf16Fp8Hd512 => longctx_kv_extend_bf16_fp8_hd512, longctx_kv_extend_bf16_fp8_hd512: sys::LongctxKvExtendParams;
    KvExtendR64F16Fp8Hd512 => longctx_kv_extend_r64_f16_fp8_hd512, longctx_kv_extend_r64_f16_fp8_hd512: sys::LongctxKvExtendParams;
    KvExtendR64Bf16Fp8Hd512 => longctx_kv_extend_r64_bf16_fp8_hd512, longctx_kv_extend_r64_bf16_fp8_hd512: sys::LongctxKvExtendParams;
    KvExtendF16Fp8Hd64 => longctx_kv_extend_f16_fp8_hd64, longctx_kv_extend_f16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Fp8Hd96 => longctx_kv_extend_f16_fp8_hd96, longctx_kv_extend_f16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Fp8Hd128 => longctx_kv_extend_f16_fp8_hd128, longctx_kv_extend_f16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendF16Fp8Hd256 => longctx_kv_extend_f16_fp8_hd256, longctx_kv_extend_f16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Fp8Hd64 => longctx_kv_extend_bf16_fp8_hd64, longctx_kv_extend_bf16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Fp8Hd96 => longctx_kv_extend_bf16_fp8_hd96, longctx_kv_extend_bf16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Fp8Hd128 => longctx_kv_extend_bf16_fp8_hd128, longctx_kv_extend_bf16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendBf16Fp8Hd256 => longctx_kv_extend_bf16_fp8_hd256, longctx_kv_extend_bf16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Hd64 => longctx_kv_extend_rot_f16_hd64, longctx_kv_extend_rot_f16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Hd96 => longctx_kv_extend_rot_f16_hd96, longctx_kv_extend_rot_f16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Hd128 => longctx_kv_extend_rot_f16_hd128, longctx_kv_extend_rot_f16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Hd256 => longctx_kv_extend_rot_f16_hd256, longctx_kv_extend_rot_f16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Hd64 => longctx_kv_extend_rot_bf16_hd64, longctx_kv_extend_rot_bf16_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Hd96 => longctx_kv_extend_rot_bf16_hd96, longctx_kv_extend_rot_bf16_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Hd128 => longctx_kv_extend_rot_bf16_hd128, longctx_kv_extend_rot_bf16_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Hd256 => longctx_kv_extend_rot_bf16_hd256, longctx_kv_extend_rot_bf16_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Fp8Hd64 => longctx_kv_extend_rot_f16_fp8_hd64, longctx_kv_extend_rot_f16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Fp8Hd96 => longctx_kv_extend_rot_f16_fp8_hd96, longctx_kv_extend_rot_f16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Fp8Hd128 => longctx_kv_extend_rot_f16_fp8_hd128, longctx_kv_extend_rot_f16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotF16Fp8Hd256 => longctx_kv_extend_rot_f16_fp8_hd256, longctx_kv_extend_rot_f16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Fp8Hd64 => longctx_kv_extend_rot_bf16_fp8_hd64, longctx_kv_extend_rot_bf16_fp8_hd64_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Fp8Hd96 => longctx_kv_extend_rot_bf16_fp8_hd96, longctx_kv_extend_rot_bf16_fp8_hd96_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Fp8Hd128 => longctx_kv_extend_rot_bf16_fp8_hd128, longctx_kv_extend_rot_bf16_fp8_hd128_emu_sm90: sys::LongctxKvExtendParams;
    KvExtendRotBf16Fp8Hd256 => longctx_kv_extend_rot_bf16_fp8_hd256, longctx_kv_extend_rot_bf16_fp8_hd256_emu_sm90: sys::LongctxKvExtendParams;
    KvAppendF16Vec => longctx_kv_append_f16_vec, longctx_kv_append_f16_vec: sys::LongctxKvAppendParams;
    KvAppendF16Scalar => longctx_kv_append_f16_scalar, longctx_kv_append_f16_scalar: sys::LongctxKvAppendParams;
    KvAppendF16Fp8Vec => longctx_kv_append_f16_fp8_vec, longctx_kv_append_f16_fp8_vec: sys::LongctxKvAppendParams;
    KvAppendF16Fp8Scalar => longctx_kv_append_f16_fp8_scalar, longctx_kv_append_f16_fp8_scalar: sys::LongctxKvAppendParams;
    KvAppendBf16Vec => longctx_kv_append_bf16_vec, longctx_kv_append_bf16_vec: sys::LongctxKvAppendParams;
    KvAppendBf16Scalar => longctx_kv_append_bf16_scalar, longctx_kv_append_bf16_scalar: sys::LongctxKvAppendParams;
    KvAppendBf16Fp8Vec => longctx_kv_append_bf16_fp8_vec, longctx_kv_append_bf16_fp8_vec: sys::LongctxKvAppendParams;
    KvAppendBf16Fp8Scalar => longctx_kv_append_bf16_fp8_scalar, longctx_kv_append_bf16_fp8_scalar: sys::LongctxKvAppendParams;
    MlaDecodeBf16 => longctx_mla_decode_bf16, longctx_mla_decode_bf16: sys::LongctxMlaDecodeParams;
    MlaDecodeBf16Fp8 => longctx_mla_decode_bf16_fp8, longctx_mla_decode_bf16_fp8: sys::LongctxMlaDecodeParams;
    MlaDecodeR64Bf16 => longctx_mla_decode_r64_bf16, longctx_mla_decode_r64_bf16: sys::LongctxMlaDecodeParams;
    MlaDecodeR64Bf16Fp8 => longctx_mla_decode_r64_bf16_fp8, longctx_mla_decode_r64_bf16_fp8: sys::LongctxMlaDecodeParams;
    MlaDecodeC2Bf16 => longctx_mla_decode_c2_bf16, longctx_mla_decode_c2_bf16: sys::LongctxMlaDecodeParams;
    MlaDecodeC2Bf16Fp8 => longctx_mla_decode_c2_bf16_fp8, longctx_mla_decode_c2_bf16_fp8: sys::LongctxMlaDecodeParams;
    MlaDecodeC4Bf16 => longctx_mla_decode_c4_bf16, longctx_mla_decode_c4_bf16: sys::LongctxMlaDecodeParams;
    MlaDecodeC4Bf16Fp8 => longctx_mla_decode_c4_bf16_fp8, longctx_mla_decode_c4_bf16_fp8: sys::LongctxMlaDecodeParams;
    MlaAppendBf16 => longctx_mla_append_bf16, longctx_mla_append_bf16: sys::LongctxMlaAppendParams;
    MlaAppendBf16Fp8 => longctx_mla_append_bf16_fp8, longctx_mla_append_bf16_fp8: sys::LongctxMlaAppendParams;
}

/// What every emulated CUDA thread runs: the kernel entry with the launch's params.
unsafe extern "C" fn trampoline<P: Copy>(entry: *const c_void, params: *const c_void) {
    // SAFETY: `run_entry`'s contract pairs `entry` with its params type `P`, and `params`
    // points at a live `P` for the whole launch.
    unsafe {
        let f: unsafe extern "C" fn(P) = std::mem::transmute(entry);
        f(*(params as *const P))
    }
}

/// Runs `l` on the CPU with `bufs` as the only memory it may touch outside shared memory.
pub(crate) fn run<P: Copy + 'static>(
    op: &'static str,
    l: &KernelLaunch<P>,
    arch: Arch,
    bufs: &[HostBuf],
) -> Result<()> {
    let (entry_ptr, ty) = entry(l.id, arch);
    if ty != TypeId::of::<P>() {
        return Err(Error::Emulator {
            op,
            message: format!("params type does not match kernel {}", l.id.symbol()),
        });
    }
    let name = match arch {
        Arch::Sm80 => l.id.symbol().to_string(),
        Arch::Sm90 => format!("{} (sm_90a tiles)", l.id.symbol()),
    };
    // SAFETY: `entry` returned the entry point of `l.id`, whose params type is `P` (checked
    // against the TypeId above).
    unsafe {
        run_entry(
            op,
            &name,
            entry_ptr,
            &l.params,
            l.grid,
            l.block,
            l.id.cluster_dims(),
            l.smem_bytes,
            bufs,
        )
    }
}

/// Runs the kernel at `entry_ptr` with `params`, in thread-block clusters of `cluster` CTAs
/// ((1, 1, 1) for none; it must divide the grid).
///
/// # Safety
/// `entry_ptr` must be an emulated kernel entry (`extern "C" fn(P)`) taking exactly `P`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn run_entry<P: Copy>(
    op: &'static str,
    name: &str,
    entry_ptr: *const c_void,
    params: &P,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    cluster: (u32, u32, u32),
    smem_bytes: u32,
    bufs: &[HostBuf],
) -> Result<()> {
    let name = std::ffi::CString::new(name).map_err(|_| Error::Emulator {
        op,
        message: "kernel name with a NUL".into(),
    })?;
    let raw: Vec<EmuBuffer> = bufs
        .iter()
        .filter(|b| b.bytes > 0)
        .map(|b| EmuBuffer {
            base: b.base,
            bytes: b.bytes,
            writable: u32::from(b.writable),
            pad: 0,
            name: b.name.as_ptr(),
        })
        .collect();
    let desc = EmuLaunch {
        kernel: name.as_ptr(),
        tramp: trampoline::<P>,
        entry: entry_ptr,
        params: params as *const P as *const c_void,
        grid: [grid.0, grid.1, grid.2],
        block: [block.0, block.1, block.2],
        cluster: [cluster.0, cluster.1, cluster.2],
        dyn_smem: smem_bytes,
        buffers: raw.as_ptr(),
        n_buffers: raw.len() as u64,
    };
    let mut err = vec![0 as c_char; 4096];
    // SAFETY: `desc` and everything it points at (name, params, buffer list) outlive the
    // call, which runs the launch to completion before returning; `entry` takes a `P` (the
    // caller's contract), which the trampoline passes by value. The buffers are live host
    // slices borrowed by the caller for the duration; the kernel's accesses outside them
    // are caught by the runtime before they happen.
    let rc = unsafe { longctx_emu_launch(&desc, err.as_mut_ptr(), err.len() as u64) };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the runtime NUL-terminates the message within `err`.
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Emulator { op, message: msg })
}
