//! MLA's absorbed decode on host buffers, through the emulator.

use half::bf16;

use super::{run, Arch, HostBuf, HostDecodeOutput};
use crate::error::Result;
use crate::kv_cache::{Fp8E4m3, PagedKvLayout, StepTable};
use crate::layout::HeadsLayout;
use crate::mla::{
    plan_mla_decode_launch, LatentCacheShape, MlaDecodeAddrs, MlaDecodeOptions, MlaDecodePlan,
    MlaDecodeShape,
};

/// A latent cache's buffers on the host (see [`crate::mla::LatentCache`]).
#[derive(Debug, Clone, Copy)]
pub enum HostLatentCache<'a> {
    /// `[pages, page_size, 1, 576]` bf16.
    Bf16(&'a [bf16]),
    /// e4m3 codes `[pages, page_size, 1, 512]`, f32 scales `[pages, page_size, 1]`, bf16
    /// `k_pe` `[pages, page_size, 1, 64]`.
    Fp8 {
        /// Codes.
        latent: &'a [Fp8E4m3],
        /// Per-token scales.
        scales: &'a [f32],
        /// `k_pe`.
        rope: &'a [bf16],
    },
}

/// [`crate::mla::decode_absorbed`] on the CPU, for a device with `sm_count` SMs (the split
/// plan's input). `layout` is the step's ([`crate::mla::latent_layout`]). Returns the plan
/// it ran.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when a kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn mla_decode(
    step: &StepTable,
    layout: &PagedKvLayout,
    q_lat: &[bf16],
    q_layout: &HeadsLayout,
    cache: &HostLatentCache,
    out: HostDecodeOutput<bf16>,
    workspace: &mut [f32],
    sm_count: usize,
    opts: &MlaDecodeOptions,
) -> Result<MlaDecodePlan> {
    let shape = match *cache {
        HostLatentCache::Bf16(l) => LatentCacheShape::Bf16 {
            latent_len: l.len(),
        },
        HostLatentCache::Fp8 {
            latent,
            scales,
            rope,
        } => LatentCacheShape::Fp8 {
            latent_len: latent.len(),
            scales_len: scales.len(),
            rope_len: rope.len(),
        },
    };
    shape.validate(layout)?;
    let sv = layout.validate_step(step)?;
    let v = MlaDecodeShape {
        step: &sv,
        layout: *layout,
        cache: shape,
        q: *q_layout,
        q_len: q_lat.len(),
        o: out.o_layout,
        o_len: out.o.len(),
        lse: out.lse.as_ref().map(|(b, l)| (*l, b.len())),
        workspace_len: workspace.len(),
        sm_count,
    }
    .validate(opts)?;
    let qb = HostBuf::input(q_lat, c"q");
    let (lb, sb, rb) = match *cache {
        HostLatentCache::Bf16(l) => (HostBuf::input(l, c"cache.latent"), None, None),
        HostLatentCache::Fp8 {
            latent,
            scales,
            rope,
        } => (
            HostBuf::input(latent, c"cache.latent"),
            Some(HostBuf::input(scales, c"cache.scales")),
            Some(HostBuf::input(rope, c"cache.rope")),
        ),
    };
    let btb = HostBuf::input(step.table.block_table, c"block_table");
    let slb = HostBuf::input(step.table.seqlens, c"seqlens");
    let cnb = HostBuf::input(step.cu_new, c"cu_new");
    let HostDecodeOutput { o, lse, .. } = out;
    let ob = HostBuf::output(o, c"o");
    let lseb = lse.map(|(l, _)| HostBuf::output(l, c"lse"));
    let wb = HostBuf::output(workspace, c"workspace");
    let addrs = MlaDecodeAddrs {
        q: qb.addr(),
        o: ob.addr(),
        lse: lseb.as_ref().map_or(0, HostBuf::addr),
        latent: lb.addr(),
        scales: sb.as_ref().map_or(0, HostBuf::addr),
        rope: rb.as_ref().map_or(0, HostBuf::addr),
        workspace: wb.addr(),
        block_table: btb.addr(),
        seqlens: slb.addr(),
        cu_new: cnb.addr(),
    };
    let Some((dl, ml)) = plan_mla_decode_launch(&sv, &v, &addrs)? else {
        return Ok(v.plan);
    };
    let mut bufs = vec![qb, lb, btb, slb, cnb, ob, wb];
    bufs.extend(sb);
    bufs.extend(rb);
    bufs.extend(lseb);
    run("mla_decode", &dl, Arch::Sm80, &bufs)?;
    if let Some(ml) = ml {
        run("mla_decode", &ml, Arch::Sm80, &bufs)?;
    }
    Ok(v.plan)
}
