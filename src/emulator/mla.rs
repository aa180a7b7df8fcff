//! MLA's absorbed decode on host buffers, through the emulator.

use half::bf16;

use super::{run, Arch, HostBuf, HostDecodeOutput, HostRope};
use crate::error::{Error, Result};
use crate::kv_cache::{AppendRopeShape, Fp8E4m3, PagedKvLayout, StepTable};
use crate::layout::HeadsLayout;
use crate::mla::{
    plan_mla_append, plan_mla_decode_launch, LatentCacheShape, MlaAppendAddrs, MlaAppendShape,
    MlaDecodeAddrs, MlaDecodeOptions, MlaDecodePlan, MlaDecodeShape,
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

/// [`crate::mla::decode_absorbed`] on the CPU, for a device with `sm_count` SMs and
/// `smem_per_block` bytes of opt-in shared memory per block (the plan's inputs: 166,912
/// for an A100, 232,448 for an H100, which pick the 64-row kernel for more than 16 rows;
/// 101,376 for sm_86/89 parts, which keep the 16-row one), running thread-block clusters
/// or not (`clusters`: true as an H100 with sm_90a code, which pairs 64-row CTAs for more
/// than 64 rows). `layout` is the step's ([`crate::mla::latent_layout`]). Returns the plan
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
    smem_per_block: usize,
    clusters: bool,
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
        smem_per_block,
        clusters,
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

/// A latent cache written by the emulated append (see [`crate::mla::LatentCacheMut`]).
#[derive(Debug)]
pub enum HostLatentCacheMut<'a> {
    /// `[pages, page_size, 1, 576]` bf16.
    Bf16(&'a mut [bf16]),
    /// e4m3 codes, per-token scales (written), bf16 `k_pe`.
    Fp8 {
        /// Codes, `[pages, page_size, 1, 512]`.
        latent: &'a mut [Fp8E4m3],
        /// Scales, `[pages, page_size, 1]`.
        scales: &'a mut [f32],
        /// `k_pe`, `[pages, page_size, 1, 64]`.
        rope: &'a mut [bf16],
    },
}

/// [`crate::mla::append_latent`] on the CPU: `c_kv` `[total_new, 1, 512]` and `k_pe`
/// `[total_new, 1, 64]` views into the host cache, `k_pe` rotated with `rope` when given
/// (`inv_freq` of 32 entries, head dim 64).
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`] when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn mla_append(
    layout: &PagedKvLayout,
    step: &StepTable,
    c_kv: &[bf16],
    c_kv_layout: &HeadsLayout,
    k_pe: &[bf16],
    k_pe_layout: &HeadsLayout,
    cache: HostLatentCacheMut,
    rope: Option<HostRope>,
) -> Result<()> {
    let sv = layout.validate_step(step)?;
    let shape = match &cache {
        HostLatentCacheMut::Bf16(l) => LatentCacheShape::Bf16 {
            latent_len: l.len(),
        },
        HostLatentCacheMut::Fp8 {
            latent,
            scales,
            rope,
        } => LatentCacheShape::Fp8 {
            latent_len: latent.len(),
            scales_len: scales.len(),
            rope_len: rope.len(),
        },
    };
    let rope_shape = match rope {
        None => None,
        Some(r) => Some(AppendRopeShape {
            head_dim: r.head_dim,
            rotary_dim: r.inv_freq.len().checked_mul(2).ok_or_else(|| {
                Error::invalid("mla_append", "rope", "inv_freq's length overflows")
            })?,
            max_positions: r.max_positions,
            style: r.style,
            precision: r.precision,
            attention_factor: r.attention_factor,
        }),
    };
    let v = MlaAppendShape {
        cache: shape,
        c_kv: (*c_kv_layout, c_kv.len()),
        k_pe: (*k_pe_layout, k_pe.len()),
        rope: rope_shape,
    }
    .validate(&sv, layout)?;
    let cb = HostBuf::input(c_kv, c"c_kv");
    let kb = HostBuf::input(k_pe, c"k_pe");
    let bt = HostBuf::input(step.table.block_table, c"step.block_table");
    let sl = HostBuf::input(step.table.seqlens, c"step.seqlens");
    let cu = HostBuf::input(step.cu_new, c"step.cu_new");
    let inv = HostBuf::input(rope.map_or(&[][..], |r| r.inv_freq), c"rope.inv_freq");
    let (lb, sb, rb) = match cache {
        HostLatentCacheMut::Bf16(l) => (HostBuf::output(l, c"cache.latent"), None, None),
        HostLatentCacheMut::Fp8 {
            latent,
            scales,
            rope,
        } => (
            HostBuf::output(latent, c"cache.latent"),
            Some(HostBuf::output(scales, c"cache.scales")),
            Some(HostBuf::output(rope, c"cache.rope")),
        ),
    };
    let plan = plan_mla_append(
        &v,
        &sv,
        &MlaAppendAddrs {
            c_kv: cb.addr(),
            k_pe: kb.addr(),
            latent: lb.addr(),
            scales: sb.as_ref().map_or(0, HostBuf::addr),
            rope: rb.as_ref().map_or(0, HostBuf::addr),
            inv_freq: if rope.is_some() { inv.addr() } else { 0 },
            block_table: bt.addr(),
            seqlens: sl.addr(),
            cu_new: cu.addr(),
        },
    )?;
    let Some(l) = plan else {
        return Ok(());
    };
    let mut bufs = vec![cb, kb, bt, sl, cu, inv, lb];
    bufs.extend(sb);
    bufs.extend(rb);
    run("mla_append", &l, Arch::Sm80, &bufs)
}
