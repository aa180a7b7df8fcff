//! The KV-cache ops on host buffers, through the emulator.

use super::{run, Arch, HostBuf};
use crate::dtype::Element;
use crate::error::Result;
use crate::kv_cache::{
    plan_decode_launch, plan_merge, rotation_tables, CacheElement, CacheShape, DecodeAddrs,
    DecodeOptions, DecodePlan, DecodeShape, LseLayout, MergeAddrs, MergeOptions, MergeShape,
    PagedKvLayout, RotationShape, ScaleMode, StackedStates, StepTable,
};
use crate::layout::HeadsLayout;
use crate::rope::{AnglePrecision, LengthScaling, RopeStyle};

/// [`crate::kv_cache::merge_states`] on the CPU: merges the parts stacked in `parts_o` and
/// `parts_lse` (as `layout` says) into `out_o` / `out_lse`.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn merge_states<T: Element>(
    parts_o: &[T],
    parts_lse: &[f32],
    layout: &StackedStates,
    out_o: &mut [T],
    out_o_layout: &HeadsLayout,
    out_lse: &mut [f32],
    out_lse_layout: &LseLayout,
    opts: &MergeOptions,
) -> Result<()> {
    let v = MergeShape {
        parts: *layout,
        parts_o_len: parts_o.len(),
        parts_lse_len: parts_lse.len(),
        out_o: *out_o_layout,
        out_o_len: out_o.len(),
        out_lse: *out_lse_layout,
        out_lse_len: out_lse.len(),
    }
    .validate()?;
    let po = HostBuf::input(parts_o, c"parts.o");
    let pl = HostBuf::input(parts_lse, c"parts.lse");
    let oo = HostBuf::output(out_o, c"out_o");
    let ol = HostBuf::output(out_lse, c"out_lse");
    let plan = plan_merge::<T>(
        &v,
        opts,
        &MergeAddrs {
            parts_o: po.addr(),
            parts_lse: pl.addr(),
            out_o: oo.addr(),
            out_lse: ol.addr(),
        },
    )?;
    match plan {
        Some(l) => run("merge_states", &l, Arch::Sm80, &[po, pl, oo, ol]),
        None => Ok(()),
    }
}

/// A paged cache on the host, for the emulated ops.
#[derive(Debug, Clone, Copy)]
pub struct HostCache<'a, S> {
    /// Shape of K and V.
    pub layout: PagedKvLayout,
    /// K, `[pages, page_size, heads_kv, head_dim]`.
    pub k: &'a [S],
    /// V, same shape.
    pub v: &'a [S],
    /// fp8: the scale layout, K's and V's scales.
    pub scales: Option<(ScaleMode, &'a [f32], &'a [f32])>,
}

/// The output of an emulated decode.
#[derive(Debug)]
pub struct HostDecodeOutput<'a, T> {
    /// O, `[total_new, heads_q, head_dim]`.
    pub o: &'a mut [T],
    /// Its view.
    pub o_layout: HeadsLayout,
    /// The LSE buffer and view, if asked for.
    pub lse: Option<(&'a mut [f32], LseLayout)>,
}

/// [`crate::kv_cache::decode`] on the CPU, for a device with `sm_count` SMs (the split
/// plan's input). `workspace` holds at least the plan's
/// [`DecodePlan::workspace_len`](crate::kv_cache::DecodePlan::workspace_len) f32. Returns
/// the plan it ran.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when a kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn decode<T: Element, S: CacheElement>(
    step: &StepTable,
    q: &[T],
    q_layout: &HeadsLayout,
    cache: &HostCache<S>,
    out: HostDecodeOutput<T>,
    workspace: &mut [f32],
    sm_count: usize,
    opts: &DecodeOptions,
) -> Result<DecodePlan> {
    decode_impl(
        step, None, q, q_layout, cache, out, workspace, sm_count, opts,
    )
}

/// How an emulated [`decode_rotating`] rotates keys and queries on load.
#[derive(Debug, Clone, Copy)]
pub struct HostRotation<'a> {
    /// The rotation at each sequence's current length.
    pub scaling: &'a LengthScaling,
    /// Channel pairing.
    pub style: RopeStyle,
    /// Angle precision.
    pub precision: AnglePrecision,
}

/// [`crate::kv_cache::decode_rotating`] on the CPU: keys in the cache and `q` un-rotated,
/// rotated on load with each sequence's rotation at its current length.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when a kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn decode_rotating<T: Element, S: CacheElement>(
    step: &StepTable,
    rotation: &HostRotation,
    q: &[T],
    q_layout: &HeadsLayout,
    cache: &HostCache<S>,
    out: HostDecodeOutput<T>,
    workspace: &mut [f32],
    sm_count: usize,
    opts: &DecodeOptions,
) -> Result<DecodePlan> {
    decode_impl(
        step,
        Some(rotation),
        q,
        q_layout,
        cache,
        out,
        workspace,
        sm_count,
        opts,
    )
}

#[allow(clippy::too_many_arguments)]
fn decode_impl<T: Element, S: CacheElement>(
    step: &StepTable,
    rotation: Option<&HostRotation>,
    q: &[T],
    q_layout: &HeadsLayout,
    cache: &HostCache<S>,
    out: HostDecodeOutput<T>,
    workspace: &mut [f32],
    sm_count: usize,
    opts: &DecodeOptions,
) -> Result<DecodePlan> {
    let sv = cache.layout.validate_step(step)?;
    let v = DecodeShape {
        step: &sv,
        cache: CacheShape::of::<S>(
            cache.layout,
            cache.k.len(),
            cache.v.len(),
            cache.scales.map(|(m, k, v)| (m, k.len(), v.len())),
        ),
        q: *q_layout,
        q_len: q.len(),
        o: out.o_layout,
        o_len: out.o.len(),
        lse: out.lse.as_ref().map(|(b, l)| (*l, b.len())),
        workspace_len: workspace.len(),
        sm_count,
        rotation: rotation.map(|r| RotationShape {
            rotary_dim: r.scaling.config().rotary_dim(),
            style: r.style,
            precision: r.precision,
        }),
    }
    .validate(opts)?;
    let tables = match rotation {
        Some(r) => {
            if r.scaling.config().head_dim() != cache.layout.head_dim {
                return Err(crate::Error::invalid(
                    "decode",
                    "rotation",
                    "the scaling's head dim differs from the cache's",
                ));
            }
            Some(rotation_tables(&sv, r.scaling)?)
        }
        None => None,
    };
    let (ifb, fb) = match &tables {
        Some((i, f)) => (
            Some(HostBuf::input(i.as_slice(), c"rope_inv_freq")),
            Some(HostBuf::input(f.as_slice(), c"rope_factor")),
        ),
        None => (None, None),
    };
    let qb = HostBuf::input(q, c"q");
    let kb = HostBuf::input(cache.k, c"cache.k");
    let vb = HostBuf::input(cache.v, c"cache.v");
    let (ksb, vsb) = match cache.scales {
        Some((_, k, v)) => (
            Some(HostBuf::input(k, c"cache.k_scale")),
            Some(HostBuf::input(v, c"cache.v_scale")),
        ),
        None => (None, None),
    };
    let btb = HostBuf::input(step.table.block_table, c"block_table");
    let slb = HostBuf::input(step.table.seqlens, c"seqlens");
    let cnb = HostBuf::input(step.cu_new, c"cu_new");
    let HostDecodeOutput { o, lse, .. } = out;
    let ob = HostBuf::output(o, c"o");
    let lb = lse.map(|(l, _)| HostBuf::output(l, c"lse"));
    let wb = HostBuf::output(workspace, c"workspace");
    let addrs = DecodeAddrs {
        q: qb.addr(),
        o: ob.addr(),
        lse: lb.as_ref().map_or(0, HostBuf::addr),
        k: kb.addr(),
        v: vb.addr(),
        k_scale: ksb.as_ref().map_or(0, HostBuf::addr),
        v_scale: vsb.as_ref().map_or(0, HostBuf::addr),
        workspace: wb.addr(),
        block_table: btb.addr(),
        seqlens: slb.addr(),
        cu_new: cnb.addr(),
        rope_inv_freq: ifb.as_ref().map_or(0, HostBuf::addr),
        rope_factor: fb.as_ref().map_or(0, HostBuf::addr),
    };
    let Some((dl, ml)) = plan_decode_launch::<T, S>(&sv, &v, &addrs)? else {
        return Ok(v.plan);
    };
    let mut bufs = vec![qb, kb, vb, btb, slb, cnb, ob, wb];
    bufs.extend(ksb);
    bufs.extend(vsb);
    bufs.extend(lb);
    bufs.extend(ifb);
    bufs.extend(fb);
    run("decode", &dl, Arch::Sm80, &bufs)?;
    if let Some(ml) = ml {
        run("decode", &ml, Arch::Sm80, &bufs)?;
    }
    Ok(v.plan)
}
