//! The ops on host buffers, through the emulator. Each takes the GPU op's arguments with
//! host slices in place of device buffers and runs the same validation and launch planning
//! (the ops' `plan_launch`), then the real kernel on the CPU.

use super::{run, Arch, HostBuf};
use crate::attention::cuda::{plan_launch as attn_plan, Addrs, Layouts};
use crate::attention::{
    plan_backward, validate_cu_seqlens, AttentionOptions, AttnElement, BackwardOptions,
    BackwardShape, BwdAddrs, BwdLayouts, CallShape, TileConfig, ViewShape,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::HeadsLayout;
use crate::rope::cuda::{
    check_positions, plan_launch as rope_plan, table_info, PositionsArg, ViewArg,
};
use crate::rope::{RopeConfig, RopeOptions};

/// [`crate::rope::apply_rope`] on the CPU: rotates `q` and `k` (separate buffers) in place
/// with `config`'s table for sequences of `seq_len` tokens.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn apply_rope<T: Element>(
    config: &RopeConfig,
    seq_len: usize,
    positions: &[i32],
    q: &mut [T],
    q_layout: &HeadsLayout,
    k: &mut [T],
    k_layout: &HeadsLayout,
    opts: RopeOptions,
) -> Result<()> {
    check_positions(positions)?;
    let (inv, mut info) = table_info(config, seq_len)?;
    let inv_buf = HostBuf::input(&inv, c"inv_freq");
    let pos_buf = HostBuf::input(positions, c"positions");
    info.inv_freq = inv_buf.addr();
    let (q_len, k_len) = (q.len(), k.len());
    let q_buf = HostBuf::output(q, c"q");
    let k_buf = HostBuf::output(k, c"k");
    let l = rope_plan::<T>(
        &info,
        PositionsArg {
            addr: pos_buf.addr(),
            len: positions.len(),
            max: positions.iter().copied().max(),
        },
        ViewArg {
            layout: q_layout,
            buffer_len: q_len,
            base: q_buf.addr(),
        },
        ViewArg {
            layout: k_layout,
            buffer_len: k_len,
            base: k_buf.addr(),
        },
        false,
        opts,
    )?;
    match l {
        Some(l) => run("rope", &l, Arch::Sm80, &[inv_buf, pos_buf, q_buf, k_buf]),
        None => Ok(()),
    }
}

/// [`crate::rope::apply_rope_packed`] on the CPU: Q and K are two disjoint views of `buf`.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
pub fn apply_rope_packed<T: Element>(
    config: &RopeConfig,
    seq_len: usize,
    positions: &[i32],
    buf: &mut [T],
    q_layout: &HeadsLayout,
    k_layout: &HeadsLayout,
    opts: RopeOptions,
) -> Result<()> {
    check_positions(positions)?;
    let (inv, mut info) = table_info(config, seq_len)?;
    let inv_buf = HostBuf::input(&inv, c"inv_freq");
    let pos_buf = HostBuf::input(positions, c"positions");
    info.inv_freq = inv_buf.addr();
    let len = buf.len();
    let b = HostBuf::output(buf, c"qk");
    let l = rope_plan::<T>(
        &info,
        PositionsArg {
            addr: pos_buf.addr(),
            len: positions.len(),
            max: positions.iter().copied().max(),
        },
        ViewArg {
            layout: q_layout,
            buffer_len: len,
            base: b.addr(),
        },
        ViewArg {
            layout: k_layout,
            buffer_len: len,
            base: b.addr(),
        },
        true,
        opts,
    )?;
    match l {
        Some(l) => run("rope", &l, Arch::Sm80, &[inv_buf, pos_buf, b]),
        None => Ok(()),
    }
}

/// The inputs of one attention call on the host.
#[derive(Debug, Clone, Copy)]
pub struct HostQkv<'a, T> {
    /// Holds Q.
    pub q: &'a [T],
    /// `[total_q, heads_q, head_dim]`.
    pub q_layout: HeadsLayout,
    /// Holds K.
    pub k: &'a [T],
    /// `[total_k, heads_kv, head_dim]`.
    pub k_layout: HeadsLayout,
    /// Holds V.
    pub v: &'a [T],
    /// `[total_k, heads_kv, head_dim_v]`.
    pub v_layout: HeadsLayout,
}

/// [`crate::attention::attention_forward`] on the CPU, running the code compiled for
/// `arch` (its tile shape). `lse`, if given, receives f32 `[heads_q, total_q]`.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: AttnElement>(
    arch: Arch,
    x: &HostQkv<'_, T>,
    o: &mut [T],
    o_layout: HeadsLayout,
    lse: Option<&mut [f32]>,
    cu_seqlens_q: &[i32],
    cu_seqlens_k: &[i32],
    opts: &AttentionOptions,
) -> Result<()> {
    validate_cu_seqlens(cu_seqlens_q, cu_seqlens_k)?;
    let lse_len = lse.as_ref().map(|l| l.len());
    let c = CallShape {
        q: ViewShape {
            layout: x.q_layout,
            buffer_len: x.q.len(),
        },
        k: ViewShape {
            layout: x.k_layout,
            buffer_len: x.k.len(),
        },
        v: ViewShape {
            layout: x.v_layout,
            buffer_len: x.v.len(),
        },
        o: ViewShape {
            layout: o_layout,
            buffer_len: o.len(),
        },
        lse_len,
        cu_seqlens_q,
        cu_seqlens_k,
    }
    .validate(opts)?;
    if c.heads_q == 0 || c.total_q == 0 {
        return Ok(());
    }
    let tiles = TileConfig::for_code(c.tiles.head_dim, c.tiles.head_dim_v, arch.ptx_arch())?;
    let mut bufs = vec![
        HostBuf::input(x.q, c"q"),
        HostBuf::input(x.k, c"k"),
        HostBuf::input(x.v, c"v"),
        HostBuf::input(cu_seqlens_q, c"cu_seqlens_q"),
        HostBuf::input(cu_seqlens_k, c"cu_seqlens_k"),
        HostBuf::output(o, c"o"),
    ];
    let lse_addr = match lse {
        Some(l) => {
            let b = HostBuf::output(l, c"lse");
            let a = b.addr();
            bufs.push(b);
            a
        }
        None => 0,
    };
    let addrs = Addrs {
        q: bufs[0].addr(),
        k: bufs[1].addr(),
        v: bufs[2].addr(),
        cu_seqlens_q: bufs[3].addr(),
        cu_seqlens_k: bufs[4].addr(),
        o: bufs[5].addr(),
        lse: lse_addr,
    };
    let l = attn_plan::<T>(
        &c,
        &tiles,
        tiles.smem_bytes(),
        &Layouts {
            q: x.q_layout,
            k: x.k_layout,
            v: x.v_layout,
            o: o_layout,
        },
        &addrs,
    )?;
    if l.grid.0 == 0 {
        return Ok(());
    }
    run("attention", &l, arch, &bufs)
}

/// The forward's output and the loss gradient of one backward call on the host.
#[derive(Debug, Clone, Copy)]
pub struct HostBackwardInputs<'a, T> {
    /// The forward's O.
    pub o: &'a [T],
    /// `[total_q, heads_q, head_dim_v]`.
    pub o_layout: HeadsLayout,
    /// dL/dO.
    pub dout: &'a [T],
    /// O's shape.
    pub dout_layout: HeadsLayout,
    /// The forward's LSE, `[heads_q, total_q]`.
    pub lse: &'a [f32],
}

/// The gradients of one backward call on the host.
#[derive(Debug)]
pub struct HostGrads<'a, T> {
    /// dQ.
    pub dq: &'a mut [T],
    /// Q's shape.
    pub dq_layout: HeadsLayout,
    /// dK.
    pub dk: &'a mut [T],
    /// K's shape.
    pub dk_layout: HeadsLayout,
    /// dV.
    pub dv: &'a mut [T],
    /// V's shape.
    pub dv_layout: HeadsLayout,
}

/// [`crate::attention::attention_backward`] on the CPU: the three backward kernels, with
/// `workspace` of at least [`backward_workspace_len`](crate::attention::backward_workspace_len)
/// floats.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when a kernel misbehaves.
pub fn attention_backward<T: AttnElement>(
    x: &HostQkv<'_, T>,
    inputs: &HostBackwardInputs<'_, T>,
    grads: HostGrads<'_, T>,
    workspace: &mut [f32],
    cu_seqlens_q: &[i32],
    cu_seqlens_k: &[i32],
    opts: &BackwardOptions,
) -> Result<()> {
    let shape = |layout: HeadsLayout, buffer_len: usize| ViewShape { layout, buffer_len };
    let c = BackwardShape {
        forward: CallShape {
            q: shape(x.q_layout, x.q.len()),
            k: shape(x.k_layout, x.k.len()),
            v: shape(x.v_layout, x.v.len()),
            o: shape(inputs.o_layout, inputs.o.len()),
            lse_len: Some(inputs.lse.len()),
            cu_seqlens_q,
            cu_seqlens_k,
        },
        dout: shape(inputs.dout_layout, inputs.dout.len()),
        dq: shape(grads.dq_layout, grads.dq.len()),
        dk: shape(grads.dk_layout, grads.dk.len()),
        dv: shape(grads.dv_layout, grads.dv.len()),
        workspace_len: workspace.len(),
    }
    .validate(opts)?;
    if c.heads_q == 0 || (c.total_q == 0 && c.total_k == 0) {
        return Ok(());
    }
    let HostGrads {
        dq,
        dq_layout,
        dk,
        dk_layout,
        dv,
        dv_layout,
    } = grads;
    let bufs = vec![
        HostBuf::input(x.q, c"q"),
        HostBuf::input(x.k, c"k"),
        HostBuf::input(x.v, c"v"),
        HostBuf::input(inputs.o, c"o"),
        HostBuf::input(inputs.dout, c"dout"),
        HostBuf::input(inputs.lse, c"lse"),
        HostBuf::input(cu_seqlens_q, c"cu_seqlens_q"),
        HostBuf::input(cu_seqlens_k, c"cu_seqlens_k"),
        HostBuf::output(dq, c"dq"),
        HostBuf::output(dk, c"dk"),
        HostBuf::output(dv, c"dv"),
        HostBuf::output(workspace, c"workspace"),
    ];
    let a = BwdAddrs {
        q: bufs[0].addr(),
        k: bufs[1].addr(),
        v: bufs[2].addr(),
        o: bufs[3].addr(),
        dout: bufs[4].addr(),
        lse: bufs[5].addr(),
        cu_seqlens_q: bufs[6].addr(),
        cu_seqlens_k: bufs[7].addr(),
        dq: bufs[8].addr(),
        dk: bufs[9].addr(),
        dv: bufs[10].addr(),
        workspace: bufs[11].addr(),
    };
    let plan = plan_backward::<T>(
        &c,
        opts,
        &BwdLayouts {
            q: x.q_layout,
            k: x.k_layout,
            v: x.v_layout,
            o: inputs.o_layout,
            dout: inputs.dout_layout,
            dq: dq_layout,
            dk: dk_layout,
            dv: dv_layout,
        },
        &a,
    )?;
    for l in [&plan.pre, &plan.main, &plan.dq] {
        if l.grid.0 != 0 {
            run("attention_backward", l, Arch::Sm80, &bufs)?;
        }
    }
    Ok(())
}
