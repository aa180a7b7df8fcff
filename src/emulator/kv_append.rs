//! [`crate::kv_cache::append_kv`] on host buffers, through the emulator.

use super::{run, Arch, HostBuf};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::kv_cache::{
    plan_append, AppendAddrs, AppendRopeShape, AppendShape, CacheElement, CacheShape,
    PagedKvLayout, ScaleMode, StepTable,
};
use crate::layout::HeadsLayout;
use crate::rope::{AnglePrecision, RopeStyle};

/// The fp8 scales of a host cache (the twin of [`crate::kv_cache::KvScalesMut`]).
#[derive(Debug)]
pub enum HostScalesMut<'a> {
    /// An f16 / bf16 cache.
    None,
    /// One scale per (token, head), `[pages, page_size, heads_kv]`, written by append.
    PerTokenHead {
        /// K's scales.
        k: &'a mut [f32],
        /// V's scales.
        v: &'a mut [f32],
    },
    /// One scale per head, `[heads_kv]`, read by append.
    PerHead {
        /// K's scales.
        k: &'a [f32],
        /// V's scales.
        v: &'a [f32],
    },
}

/// The fused RoPE of a host append: the plan's table (`RopeConfig::inv_freq_f64(seq_len)`,
/// rotary_dim / 2 entries) and attention factor.
#[derive(Debug, Clone, Copy)]
pub struct HostRope<'a> {
    /// inv_freq, one entry per rotated pair.
    pub inv_freq: &'a [f64],
    /// The head dim the table was made for.
    pub head_dim: usize,
    /// Multiplies cos and sin.
    pub attention_factor: f32,
    /// Positions must stay below this when the frequencies depend on the length.
    pub max_positions: Option<usize>,
    /// Channel pairing.
    pub style: RopeStyle,
    /// Angle precision.
    pub precision: AnglePrecision,
}

/// The new K and V rows of a host append, `[total_new, heads_kv, head_dim]` views.
#[derive(Debug, Clone, Copy)]
pub struct HostNewKv<'a, T> {
    /// Holds the new K.
    pub k: &'a [T],
    /// K's view.
    pub k_layout: HeadsLayout,
    /// Holds the new V.
    pub v: &'a [T],
    /// V's view.
    pub v_layout: HeadsLayout,
}

/// [`crate::kv_cache::append_kv`] on the CPU: writes the step's new rows into the host cache
/// `cache_k` / `cache_v` (and, per (token, head), `scales`), `layout` being the cache's.
///
/// # Errors
/// As the GPU op (the step is validated here with
/// [`PagedKvLayout::validate_step`]), plus [`Error::Emulator`] when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn append_kv<T: Element, S: CacheElement>(
    layout: &PagedKvLayout,
    step: &StepTable,
    new: &HostNewKv<T>,
    cache_k: &mut [S],
    cache_v: &mut [S],
    scales: HostScalesMut,
    rope: Option<HostRope>,
) -> Result<()> {
    let vstep = layout.validate_step(step)?;
    let scale_shape = match &scales {
        HostScalesMut::None => None,
        HostScalesMut::PerTokenHead { k, v } => Some((ScaleMode::PerTokenHead, k.len(), v.len())),
        HostScalesMut::PerHead { k, v } => Some((ScaleMode::PerHead, k.len(), v.len())),
    };
    let rope_shape = match rope {
        None => None,
        Some(r) => Some(AppendRopeShape {
            head_dim: r.head_dim,
            rotary_dim: r.inv_freq.len().checked_mul(2).ok_or_else(|| {
                Error::invalid("append_kv", "rope", "inv_freq's length overflows")
            })?,
            max_positions: r.max_positions,
            style: r.style,
            precision: r.precision,
            attention_factor: r.attention_factor,
        }),
    };
    let v = AppendShape {
        cache: CacheShape::of::<S>(*layout, cache_k.len(), cache_v.len(), scale_shape),
        k: new.k_layout,
        k_len: new.k.len(),
        v: new.v_layout,
        v_len: new.v.len(),
        rope: rope_shape,
    }
    .validate::<T, S>(&vstep, layout)?;
    let nk = HostBuf::input(new.k, c"new.k");
    let nv = HostBuf::input(new.v, c"new.v");
    let bt = HostBuf::input(step.table.block_table, c"step.block_table");
    let sl = HostBuf::input(step.table.seqlens, c"step.seqlens");
    let cu = HostBuf::input(step.cu_new, c"step.cu_new");
    let inv = HostBuf::input(rope.map_or(&[][..], |r| r.inv_freq), c"rope.inv_freq");
    let ck = HostBuf::output(cache_k, c"cache.k");
    let cv = HostBuf::output(cache_v, c"cache.v");
    let (ks, vs) = match scales {
        HostScalesMut::None => (
            HostBuf::input::<f32>(&[], c"cache.k_scale"),
            HostBuf::input::<f32>(&[], c"cache.v_scale"),
        ),
        HostScalesMut::PerTokenHead { k, v } => (
            HostBuf::output(k, c"cache.k_scale"),
            HostBuf::output(v, c"cache.v_scale"),
        ),
        HostScalesMut::PerHead { k, v } => (
            HostBuf::input(k, c"cache.k_scale"),
            HostBuf::input(v, c"cache.v_scale"),
        ),
    };
    let addr = |b: &HostBuf, used: bool| if used { b.addr() } else { 0 };
    let plan = plan_append::<T, S>(
        &v,
        &vstep,
        &AppendAddrs {
            new_k: nk.addr(),
            new_v: nv.addr(),
            cache_k: ck.addr(),
            cache_v: cv.addr(),
            k_scale: addr(&ks, v.shape().cache.scales.is_some()),
            v_scale: addr(&vs, v.shape().cache.scales.is_some()),
            block_table: bt.addr(),
            seqlens: sl.addr(),
            cu_new: cu.addr(),
            inv_freq: addr(&inv, rope.is_some()),
        },
    )?;
    match plan {
        Some(l) => run(
            "append_kv",
            &l,
            Arch::Sm80,
            &[nk, nv, bt, sl, cu, inv, ck, cv, ks, vs],
        ),
        None => Ok(()),
    }
}
