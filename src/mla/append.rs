//! MLA's latent append: one launch writes each new token's `c_kv` (512) and `k_pe` (64,
//! rotated with the RoPE family's table on the way) into its slot of the latent cache
//! ([`super::LatentCache`]'s layouts), quantising `c_kv` to e4m3 with a per-token scale for
//! an fp8 cache. kernels/kv_cache/mla_append_kernel.cuh has the kernel.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use super::decode::{LatentCacheShape, MLA_KV_LORA_RANK, MLA_ROPE_DIM};
use crate::device::{cuda_err, Device};
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::kv_cache::{
    step_params, AppendRope, AppendRopeShape, Fp8E4m3, KvStep, PagedKvLayout, ValidatedStep,
};
use crate::launch::KernelLaunch;
use crate::layout::HeadsLayout;
use crate::rope::{AnglePrecision, RopeStyle};
use crate::sys;

const OP: &str = "mla_append";

/// A latent cache written by [`append_latent`] (layouts as [`super::LatentCache`]).
pub enum LatentCacheMut<'a> {
    /// `[pages, page_size, 1, 576]` bf16.
    Bf16 {
        /// The cache.
        latent: &'a mut dyn DevicePtrMut<bf16>,
    },
    /// e4m3 codes of `c_kv`, one f32 scale per token (written here), bf16 `k_pe`.
    Fp8 {
        /// Codes, `[pages, page_size, 1, 512]`.
        latent: &'a mut dyn DevicePtrMut<Fp8E4m3>,
        /// Scales, `[pages, page_size, 1]`.
        scales: &'a mut dyn DevicePtrMut<f32>,
        /// `k_pe`, `[pages, page_size, 1, 64]`.
        rope: &'a mut dyn DevicePtrMut<bf16>,
    },
}

impl std::fmt::Debug for LatentCacheMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LatentCacheMut::Bf16 { latent } => f
                .debug_struct("Bf16")
                .field("latent_len", &latent.len())
                .finish(),
            LatentCacheMut::Fp8 {
                latent,
                scales,
                rope,
            } => f
                .debug_struct("Fp8")
                .field("latent_len", &latent.len())
                .field("scales_len", &scales.len())
                .field("rope_len", &rope.len())
                .finish(),
        }
    }
}

/// The new rows of a step: `c_kv` `[total_new, 1, 512]` and `k_pe` `[total_new, 1, 64]`
/// views, bf16 (any token stride; both may be views of one `kv_a_proj` output
/// `[tokens, 576]`).
#[derive(Clone, Copy)]
pub struct NewLatent<'a> {
    /// Holds `c_kv`.
    pub c_kv: &'a dyn DevicePtr<bf16>,
    /// Its view.
    pub c_kv_layout: HeadsLayout,
    /// Holds `k_pe` (not yet rotated when a RoPE table is given).
    pub k_pe: &'a dyn DevicePtr<bf16>,
    /// Its view.
    pub k_pe_layout: HeadsLayout,
}

impl std::fmt::Debug for NewLatent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewLatent")
            .field("c_kv_len", &self.c_kv.len())
            .field("c_kv_layout", &self.c_kv_layout)
            .field("k_pe_len", &self.k_pe.len())
            .field("k_pe_layout", &self.k_pe_layout)
            .finish()
    }
}

/// The shapes of one append, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct MlaAppendShape {
    /// The cache's buffers (its layout is the step's).
    pub cache: LatentCacheShape,
    /// `c_kv`'s view and its buffer's length.
    pub c_kv: (HeadsLayout, usize),
    /// `k_pe`'s view and its buffer's length.
    pub k_pe: (HeadsLayout, usize),
    /// The fused RoPE, if any: a table of `head_dim` = `rotary_dim` = 64.
    pub rope: Option<AppendRopeShape>,
}

/// An append that passed [`MlaAppendShape::validate`].
#[derive(Debug, Clone, Copy)]
pub struct MlaAppendValidated {
    shape: MlaAppendShape,
    page_size: usize,
    total_new: usize,
    blocks: u32,
}

impl MlaAppendShape {
    /// Checks everything about an append that does not need the device, against a step
    /// validated for `layout` ([`super::latent_layout`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for what [`LatentCacheShape::validate`] rejects; a view
    /// not `[total_new, 1, 512]` / `[total_new, 1, 64]` or leaving its buffer, or a stride
    /// past i64 (`c_kv`, `k_pe`); a RoPE table whose head dim or rotary dim is not 64, or
    /// that was built for fewer positions than the step writes (`rope`).
    pub fn validate(
        &self,
        step: &ValidatedStep,
        layout: &PagedKvLayout,
    ) -> Result<MlaAppendValidated> {
        self.cache.validate(layout)?;
        for (arg, (view, len), d) in [
            ("c_kv", self.c_kv, MLA_KV_LORA_RANK),
            ("k_pe", self.k_pe, MLA_ROPE_DIM),
        ] {
            if (view.tokens, view.heads, view.head_dim) != (step.total_new, 1, d) {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "shape [{}, {}, {}], expected [total_new {}, 1, {d}]",
                        view.tokens, view.heads, view.head_dim, step.total_new
                    ),
                ));
            }
            view.validate(OP, arg, len)?;
            i64::try_from(view.token_stride)
                .map_err(|_| Error::invalid(OP, arg, "token stride exceeds i64"))?;
        }
        if let Some(r) = &self.rope {
            if r.head_dim != MLA_ROPE_DIM || r.rotary_dim != MLA_ROPE_DIM {
                return Err(Error::invalid(
                    OP,
                    "rope",
                    format!(
                        "the table rotates {} of {} channels; k_pe needs all {MLA_ROPE_DIM} of \
                         {MLA_ROPE_DIM} (qk_rope_head_dim)",
                        r.rotary_dim, r.head_dim
                    ),
                ));
            }
            if let Some(limit) = r.max_positions {
                if let Some(b) =
                    (0..step.batch).find(|&b| step.new_tokens(b) > 0 && step.seqlens[b] > limit)
                {
                    return Err(Error::invalid(
                        OP,
                        "rope",
                        format!(
                            "sequence {b} writes position {} but the table was built for {limit} \
                             tokens and this config's frequencies depend on the length",
                            step.seqlens[b] - 1
                        ),
                    ));
                }
            }
        }
        if step.batch > i32::MAX as usize {
            return Err(Error::overflow(
                OP,
                "step",
                format!("batch {} exceeds the kernel's int32 search", step.batch),
            ));
        }
        // validate_step bounded total_new by i32::MAX.
        let blocks = step
            .total_new
            .div_ceil(sys::LONGCTX_MLA_APPEND_WARPS as usize) as u32;
        Ok(MlaAppendValidated {
            shape: *self,
            page_size: layout.page_size,
            total_new: step.total_new,
            blocks,
        })
    }
}

/// Addresses of one append's buffers.
pub(crate) struct MlaAppendAddrs {
    pub c_kv: u64,
    pub k_pe: u64,
    pub latent: u64,
    pub scales: u64,
    pub rope: u64,
    pub inv_freq: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub cu_new: u64,
}

/// The launch of one validated append, shared by the CUDA and emulated backends; `None`
/// when the step has no new token.
pub(crate) fn plan_mla_append(
    v: &MlaAppendValidated,
    step: &ValidatedStep,
    a: &MlaAppendAddrs,
) -> Result<Option<KernelLaunch<sys::LongctxMlaAppendParams>>> {
    if v.total_new == 0 {
        return Ok(None);
    }
    let sh = &v.shape;
    let fp8 = matches!(sh.cache, LatentCacheShape::Fp8 { .. });
    let at = |base: u64, offset: usize, arg: &'static str| -> Result<u64> {
        (offset as u64)
            .checked_mul(2)
            .and_then(|o| o.checked_add(base))
            .ok_or_else(|| Error::invalid(OP, arg, "offset overflows the address space"))
    };
    let (inv_freq, rope_style, angle_mode, attention_factor) = match &sh.rope {
        None => (
            0,
            sys::LONGCTX_ROPE_STYLE_NEOX,
            sys::LONGCTX_ROPE_ANGLE_F64,
            1.0,
        ),
        Some(r) => {
            if a.inv_freq == 0 {
                return Err(Error::invalid(OP, "rope", "the table's address is null"));
            }
            (
                a.inv_freq,
                match r.style {
                    RopeStyle::Neox => sys::LONGCTX_ROPE_STYLE_NEOX,
                    RopeStyle::Interleaved => sys::LONGCTX_ROPE_STYLE_INTERLEAVED,
                },
                match r.precision {
                    AnglePrecision::F64 => sys::LONGCTX_ROPE_ANGLE_F64,
                    AnglePrecision::F32 => sys::LONGCTX_ROPE_ANGLE_F32,
                },
                r.attention_factor,
            )
        }
    };
    let params = sys::LongctxMlaAppendParams {
        step: step_params(step, a.block_table, a.seqlens, a.cu_new),
        c_kv: at(a.c_kv, sh.c_kv.0.offset, "c_kv")?,
        k_pe: at(a.k_pe, sh.k_pe.0.offset, "k_pe")?,
        c_kv_stride: sh.c_kv.0.token_stride as i64,
        k_pe_stride: sh.k_pe.0.token_stride as i64,
        latent: a.latent,
        rope: if fp8 { a.rope } else { 0 },
        scale: if fp8 { a.scales } else { 0 },
        inv_freq,
        // The layout was validated (page_size <= 256); total_new <= i32::MAX.
        page_size: v.page_size as u32,
        total_new: v.total_new as u32,
        rope_style,
        angle_mode,
        attention_factor,
        pad0: 0,
    };
    Ok(Some(KernelLaunch {
        id: if fp8 {
            KernelId::MlaAppendBf16Fp8
        } else {
            KernelId::MlaAppendBf16
        },
        params,
        grid: (v.blocks, 1, 1),
        block: (32 * sys::LONGCTX_MLA_APPEND_WARPS, 1, 1),
        smem_bytes: 0,
    }))
}

/// Writes the step's new latent rows into `cache` on `dev`'s stream: new token `i` of
/// sequence `b` (position `seqlens[b] - n_b + i`) lands in its page slot, `k_pe` rotated
/// forward at that position when `rope` is given (a table built for head dim 64 from the
/// model's `RopeConfig`, e.g. DeepSeek-V3's YaRN; [`RopeStyle::Interleaved`] is DeepSeek's
/// reference pairing, [`RopeStyle::Neox`] HF's). An fp8 cache gets codes of `c_kv / scale`
/// with `scale = absmax / 448` per token. The step's layout is [`super::latent_layout`].
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`MlaAppendShape::validate`] rejects, a
/// buffer of another context, or a device older than sm_80;
/// [`Error::KernelsNotCompiled`] without kernels; [`Error::Cuda`] if the launch fails.
pub fn append_latent(
    dev: &Device,
    step: &KvStep,
    new: &NewLatent,
    cache: LatentCacheMut,
    rope: Option<AppendRope>,
) -> Result<()> {
    let mut owned = vec![
        (dev.owns_any(new.c_kv), "c_kv"),
        (dev.owns_any(new.k_pe), "k_pe"),
        (dev.owns(step.block_table()), "step"),
    ];
    if let Some(r) = &rope {
        owned.push((dev.owns(r.table.inv_freq_buf()), "rope"));
    }
    let shape = match &cache {
        LatentCacheMut::Bf16 { latent } => {
            owned.push((dev.owns_any(&**latent), "cache.latent"));
            LatentCacheShape::Bf16 {
                latent_len: latent.len(),
            }
        }
        LatentCacheMut::Fp8 {
            latent,
            scales,
            rope,
        } => {
            owned.push((dev.owns_any(&**latent), "cache.latent"));
            owned.push((dev.owns_any(&**scales), "cache.scales"));
            owned.push((dev.owns_any(&**rope), "cache.rope"));
            LatentCacheShape::Fp8 {
                latent_len: latent.len(),
                scales_len: scales.len(),
                rope_len: rope.len(),
            }
        }
    };
    if let Some((_, arg)) = owned.iter().find(|x| !x.0) {
        return Err(Error::invalid(OP, arg, "lives on another device context"));
    }
    let cc = dev.compute_capability();
    if cc < (8, 0) {
        return Err(Error::invalid(
            OP,
            "device",
            format!(
                "the kernel needs sm_80 or newer; this device is sm_{}{}",
                cc.0, cc.1
            ),
        ));
    }
    let v = MlaAppendShape {
        cache: shape,
        c_kv: (new.c_kv_layout, new.c_kv.len()),
        k_pe: (new.k_pe_layout, new.k_pe.len()),
        rope: rope.map(|r| AppendRopeShape {
            head_dim: r.table.head_dim(),
            rotary_dim: r.table.rotary_dim(),
            max_positions: r.table.max_positions(),
            style: r.style,
            precision: r.precision,
            attention_factor: r.table.attention_factor(),
        }),
    }
    .validate(step.validated(), step.layout())?;
    let stream = dev.stream();
    let (ck, _g0) = new.c_kv.device_ptr(stream);
    let (kp, _g1) = new.k_pe.device_ptr(stream);
    let (bt, _g2) = step.block_table().device_ptr(stream);
    let (sl, _g3) = step.seqlens().device_ptr(stream);
    let (cu, _g4) = step.cu_new().device_ptr(stream);
    let inv = rope.map(|r| r.table.inv_freq_buf().device_ptr(stream));
    let (lat, _g5, sc, _g6, rp, _g7) = match cache {
        LatentCacheMut::Bf16 { latent } => {
            let (a, ga) = latent.device_ptr_mut(stream);
            (a, ga, 0, None, 0, None)
        }
        LatentCacheMut::Fp8 {
            latent,
            scales,
            rope,
        } => {
            let (a, ga) = latent.device_ptr_mut(stream);
            let (b, gb) = scales.device_ptr_mut(stream);
            let (c, gc) = rope.device_ptr_mut(stream);
            (a, ga, b, Some(gb), c, Some(gc))
        }
    };
    let Some(l) = plan_mla_append(
        &v,
        step.validated(),
        &MlaAppendAddrs {
            c_kv: ck,
            k_pe: kp,
            latent: lat,
            scales: sc,
            rope: rp,
            inv_freq: inv.as_ref().map_or(0, |x| x.0),
            block_table: bt,
            seqlens: sl,
            cu_new: cu,
        },
    )?
    else {
        return Ok(());
    };
    let func = dev.function(l.id)?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: MlaAppendShape::validate proved both new views inside their buffers, the
    // cache buffers holding every slot of the layout, the step validated for this layout
    // (every page id a used table entry holds in 0..pages, every new position below its
    // sequence's length, so every slot written is inside the cache) and the RoPE table's 32
    // entries present; all buffers live on this context (owns_any above); the cache is
    // borrowed mutably, so no input aliases it; the guards keep every buffer alive until
    // the launch is queued. The kernel accesses elements one at a time (2- and 4-byte
    // aligned as their types are).
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}
