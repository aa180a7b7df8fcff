//! Extend (chunked prefill over the paged cache) on host buffers, through the emulator.

use super::{run, Arch, HostBuf, HostCache, HostDecodeOutput, HostRotation};
use crate::attention::{AttnElement, TileConfig};
use crate::error::Result;
use crate::kv_cache::{
    extend_smem_bytes, plan_extend_launch, plan_extend_wide_launch, rotation_tables, CacheElement,
    CacheShape, ExtendAddrs, ExtendOptions, ExtendShape, RotationShape, StepTable,
    EXTEND_WIDE_HEAD_DIM,
};
use crate::layout::HeadsLayout;

/// [`crate::kv_cache::extend`] on the CPU, running the code compiled for `arch` (its tile
/// shape, as the forward's emulated op does). Returns the tile shape it ran; `None` at head
/// dim [`EXTEND_WIDE_HEAD_DIM`], whose row-packed kernel is the same code on every arch and
/// whose rows per CTA follow [`Arch::smem_per_block`] (16 for `Sm80`, 64 for `Sm90` when a
/// sequence has more than 16 rows).
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel
/// misbehaves.
pub fn extend<T: AttnElement, S: CacheElement>(
    arch: Arch,
    step: &StepTable,
    q: &[T],
    q_layout: &HeadsLayout,
    cache: &HostCache<S>,
    out: HostDecodeOutput<T>,
    opts: &ExtendOptions,
) -> Result<Option<TileConfig>> {
    extend_impl(arch, step, None, q, q_layout, cache, out, opts)
}

/// [`crate::kv_cache::extend_rotating`] on the CPU: keys in the cache and `q` un-rotated,
/// rotated on load with each sequence's rotation at its current length (tables computed
/// here, as [`KvRotation::upload`](crate::kv_cache::KvRotation::upload) does). Returns the
/// tile shape it ran (`None` at head dim 512, as [`extend`]).
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel
/// misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn extend_rotating<T: AttnElement, S: CacheElement>(
    arch: Arch,
    step: &StepTable,
    rotation: &HostRotation,
    q: &[T],
    q_layout: &HeadsLayout,
    cache: &HostCache<S>,
    out: HostDecodeOutput<T>,
    opts: &ExtendOptions,
) -> Result<Option<TileConfig>> {
    extend_impl(arch, step, Some(rotation), q, q_layout, cache, out, opts)
}

#[allow(clippy::too_many_arguments)]
fn extend_impl<T: AttnElement, S: CacheElement>(
    arch: Arch,
    step: &StepTable,
    rotation: Option<&HostRotation>,
    q: &[T],
    q_layout: &HeadsLayout,
    cache: &HostCache<S>,
    out: HostDecodeOutput<T>,
    opts: &ExtendOptions,
) -> Result<Option<TileConfig>> {
    let sv = cache.layout.validate_step(step)?;
    let v = ExtendShape {
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
                    "extend",
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
    let d = v.head_dim();
    let tiles = if d == EXTEND_WIDE_HEAD_DIM {
        None
    } else {
        Some(TileConfig::for_code(d, d, arch.ptx_arch())?)
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
    let addrs = ExtendAddrs {
        q: qb.addr(),
        o: ob.addr(),
        lse: lb.as_ref().map_or(0, HostBuf::addr),
        k: kb.addr(),
        v: vb.addr(),
        k_scale: ksb.as_ref().map_or(0, HostBuf::addr),
        v_scale: vsb.as_ref().map_or(0, HostBuf::addr),
        block_table: btb.addr(),
        seqlens: slb.addr(),
        cu_new: cnb.addr(),
        rope_inv_freq: ifb.as_ref().map_or(0, HostBuf::addr),
        rope_factor: fb.as_ref().map_or(0, HostBuf::addr),
    };
    let launch = match &tiles {
        Some(t) => {
            let smem = extend_smem_bytes(t, S::CACHE_DTYPE);
            plan_extend_launch::<T, S>(&sv, &v, t, smem, &addrs)?
        }
        None => plan_extend_wide_launch::<T, S>(&sv, &v, arch.smem_per_block(), &addrs)?,
    };
    let Some(l) = launch else {
        return Ok(tiles);
    };
    let mut bufs = vec![qb, kb, vb, btb, slb, cnb, ob];
    bufs.extend(ksb);
    bufs.extend(vsb);
    bufs.extend(lb);
    bufs.extend(ifb);
    bufs.extend(fb);
    run("extend", &l, arch, &bufs)?;
    Ok(tiles)
}
