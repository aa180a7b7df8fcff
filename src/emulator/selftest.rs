//! Kernels that exercise the emulator itself (kernels/emu/selftest.cu): each `mma.sync`
//! and `ldmatrix` form on chosen data, and small programs that are correct or carry one
//! deliberate bug each. The crate's tests check the first against naive products written
//! from the PTX ISA manual and that the emulator reports every bug; they are public so that
//! anyone changing the emulator can run the same checks.

use std::ffi::c_void;

use super::{run_entry, HostBuf};
use crate::error::{Error, Result};

#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    input: u64,
    output: u64,
    n: i32,
    mode: i32,
}

extern "C" {
    fn longctx_emu_selftest_mma(p: Params);
    fn longctx_emu_selftest_ldmatrix(p: Params);
    fn longctx_emu_selftest_bugs(p: Params);
    fn longctx_emu_selftest_cluster(p: Params);
}

const OP: &str = "emulator selftest";

/// Runs one self-test kernel as `ctas` blocks of `threads` threads, all in one cluster.
fn launch(
    name: &str,
    f: unsafe extern "C" fn(Params),
    p: &Params,
    ctas: u32,
    threads: u32,
    smem: u32,
    bufs: &[HostBuf],
) -> Result<()> {
    // SAFETY: every self-test entry takes `Params`, which `f`'s type states.
    unsafe {
        run_entry(
            OP,
            name,
            f as *const c_void,
            p,
            (ctas, 1, 1),
            (threads, 1, 1),
            (ctas, 1, 1),
            smem,
            bufs,
        )
    }
}

/// Runs program `mode` of a self-test entry on `input` and `output` (256 words each) as
/// `ctas` blocks (one cluster) of 64 threads with 1024 bytes of dynamic shared memory.
fn run_words(
    name: &str,
    f: unsafe extern "C" fn(Params),
    mode: i32,
    ctas: u32,
    input: &[u32],
    output: &mut [u32],
) -> Result<()> {
    if input.len() != 256 || output.len() != 256 {
        return Err(Error::invalid(OP, "input/output", "256 words each"));
    }
    let ib = HostBuf::input(input, c"in");
    let ob = HostBuf::output(output, c"out");
    let p = Params {
        input: ib.addr(),
        output: ob.addr(),
        n: 256,
        mode,
    };
    launch(name, f, &p, ctas, 64, 1024, &[ib, ob])
}

/// The input type of an `mma.sync.m16n8k16` with f32 accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaInput {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

/// D = A B + C with one `mma.sync.m16n8k16` (A by `ldmatrix.x4`, B by `ldmatrix.x2.trans`
/// from shared memory). `a` is A \[16\]\[16\] and `b` is B \[16 (k)\]\[8 (n)\], row major, as
/// raw 16-bit patterns; `c` is C \[16\]\[8\] row major on entry and D on return.
///
/// # Errors
/// [`Error::Emulator`] if the emulator reports a fault.
pub fn mma(kind: MmaInput, a: &[u16; 256], b: &[u16; 128], c: &mut [f32; 128]) -> Result<()> {
    let mut input = [0u16; 384];
    input[..256].copy_from_slice(a);
    input[256..].copy_from_slice(b);
    let ib = HostBuf::input(&input[..], c"ab");
    let ob = HostBuf::output(&mut c[..], c"c");
    let p = Params {
        input: ib.addr(),
        output: ob.addr(),
        n: 128,
        mode: i32::from(kind == MmaInput::Bf16),
    };
    launch(
        "longctx_emu_selftest_mma",
        longctx_emu_selftest_mma,
        &p,
        1,
        32,
        0,
        &[ib, ob],
    )
}

/// `ldmatrix` with `count` (1, 2 or 4) matrices, transposed or not. `smem` holds four 8x8
/// matrices of 16-bit elements, matrix i row r at words (8 i + r) * 4 .. + 4 (each row 16
/// bytes); lane l gives the address of matrix l / 8, row l % 8. Returns register j of lane
/// l at index 4 l + j (registers past `count` are 0).
///
/// # Errors
/// [`Error::InvalidArgument`] for a count other than 1, 2, 4; [`Error::Emulator`] if the
/// emulator reports a fault.
pub fn ldmatrix(count: u32, trans: bool, smem: &[u32; 128]) -> Result<[u32; 128]> {
    if !matches!(count, 1 | 2 | 4) {
        return Err(Error::invalid(
            OP,
            "count",
            format!("{count} matrices (1, 2 or 4)"),
        ));
    }
    let mut out = [0u32; 128];
    let ib = HostBuf::input(&smem[..], c"smem");
    let ob = HostBuf::output(&mut out[..], c"registers");
    let p = Params {
        input: ib.addr(),
        output: ob.addr(),
        n: 128,
        mode: count as i32 + if trans { 8 } else { 0 },
    };
    launch(
        "longctx_emu_selftest_ldmatrix",
        longctx_emu_selftest_ldmatrix,
        &p,
        1,
        32,
        0,
        &[ib, ob],
    )?;
    Ok(out)
}

/// The small programs of [`program`]: one correct, the rest one deliberate bug each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// cp.async with its wait, barriers, a shuffle, a ballot and a `__syncwarp` exchange,
    /// all correct: out\[t\] is known (see the tests).
    Correct = 0,
    /// Reads a word another warp wrote, with no `__syncthreads` between.
    MissingBarrier = 1,
    /// Reads a word another lane of the warp wrote, with no `__syncwarp` between.
    MissingSyncwarp = 2,
    /// A copy loop whose bound is `<=` instead of `<`.
    OffByOneBound = 3,
    /// A tile swizzle whose XOR value leaves the row.
    WrongSwizzle = 4,
    /// Reads a `cp.async` destination before a wait covers the copy.
    PrematureCpAsyncRead = 5,
    /// Stores past the end of the output.
    OutOfBoundsStore = 6,
    /// Half the lanes skip a full-mask shuffle.
    DivergentShuffle = 7,
    /// Only the first warp reaches a `__syncthreads`.
    SkippedBarrier = 8,
    /// Writes its input buffer.
    WritesInput = 9,
    /// Shuffles from a lane outside the mask.
    ShuffleOutsideMask = 10,
    /// Calls `__trap()`.
    Trap = 11,
    /// Reads shared memory no thread wrote.
    UninitializedShared = 12,
    /// The two warps wait at different `__syncthreads`.
    DifferentBarriers = 13,
    /// Writes past the dynamic shared-memory allocation.
    SharedOutOfBounds = 14,
}

impl Program {
    /// Every program.
    pub const ALL: [Program; 15] = [
        Program::Correct,
        Program::MissingBarrier,
        Program::MissingSyncwarp,
        Program::OffByOneBound,
        Program::WrongSwizzle,
        Program::PrematureCpAsyncRead,
        Program::OutOfBoundsStore,
        Program::DivergentShuffle,
        Program::SkippedBarrier,
        Program::WritesInput,
        Program::ShuffleOutsideMask,
        Program::Trap,
        Program::UninitializedShared,
        Program::DifferentBarriers,
        Program::SharedOutOfBounds,
    ];
}

/// Runs `prog` with 64 threads (two warps) and 1024 bytes of dynamic shared memory on
/// `input` (256 words) and `output` (256 words).
///
/// # Errors
/// [`Error::InvalidArgument`] unless both hold 256 words; [`Error::Emulator`] with what
/// the emulator found.
pub fn program(prog: Program, input: &[u32], output: &mut [u32]) -> Result<()> {
    run_words(
        "longctx_emu_selftest_bugs",
        longctx_emu_selftest_bugs,
        prog as i32,
        1,
        input,
        output,
    )
}

/// The thread-block cluster programs of [`cluster_program`]: one correct, the rest one
/// deliberate bug each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterProgram {
    /// Each CTA pushes its words into the other's shared memory, arrives at the cluster
    /// barrier, works on its own words, waits, reads the pushed words, pulls the other's
    /// words and passes a last cluster barrier:
    /// `out[64 r + t] = out[128 + 64 r + t] = in[64 (r ^ 1) + t]` for rank `r`, thread `t`.
    Correct = 0,
    /// Reads what the other CTA pushed with only `__syncthreads` between.
    MissingClusterBarrier = 1,
    /// Overwrites the other CTA's buffer while the other CTA may still read it.
    OverwriteWhileRead = 2,
    /// Maps a shared address to a rank outside the cluster.
    RankOutsideCluster = 3,
    /// One CTA leaves while the other still reads its shared memory.
    ExitWhileRead = 4,
    /// Only one CTA reaches the cluster barrier.
    SkippedClusterBarrier = 5,
    /// Pushes into the other CTA after arriving: the wait for that phase does not cover it.
    WriteAfterArrive = 6,
    /// Arrives twice without waiting in between.
    ArriveTwice = 7,
}

impl ClusterProgram {
    /// Every program.
    pub const ALL: [ClusterProgram; 8] = [
        ClusterProgram::Correct,
        ClusterProgram::MissingClusterBarrier,
        ClusterProgram::OverwriteWhileRead,
        ClusterProgram::RankOutsideCluster,
        ClusterProgram::ExitWhileRead,
        ClusterProgram::SkippedClusterBarrier,
        ClusterProgram::WriteAfterArrive,
        ClusterProgram::ArriveTwice,
    ];
}

/// Runs `prog` as one cluster of two CTAs of 64 threads with 1024 bytes of dynamic shared
/// memory each, on `input` (256 words) and `output` (256 words).
///
/// # Errors
/// [`Error::InvalidArgument`] unless both hold 256 words; [`Error::Emulator`] with what
/// the emulator found.
pub fn cluster_program(prog: ClusterProgram, input: &[u32], output: &mut [u32]) -> Result<()> {
    run_words(
        "longctx_emu_selftest_cluster",
        longctx_emu_selftest_cluster,
        prog as i32,
        2,
        input,
        output,
    )
}
