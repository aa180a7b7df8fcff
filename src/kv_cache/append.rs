//! `append_kv`: writes one step's new K and V rows into their paged-cache slots, with RoPE
//! fused on K and fp8 quantisation for an fp8 cache. Types, validation, the launch plan
//! shared by the CUDA path and the emulator, and the CUDA op;
//! kernels/kv_cache/append_kernel.cuh has the kernel.

use cudarc::driver::{DevicePtr, PushKernelArg};

use super::cache::{CacheShape, KvScalesMut, PagedCacheMut, ScaleMode};
use super::fp8::{CacheDType, CacheElement};
use super::paged::PagedKvLayout;
use super::step::{KvStep, ValidatedStep};
use super::{cache_matches, cache_params, step_params};
use crate::device::{cuda_err, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, HeadsLayout};
use crate::rope::{AnglePrecision, RopeStyle, RopeTable};
use crate::sys;

const OP: &str = "append_kv";

/// The largest head dim [`append_kv`] accepts when every access is 16-byte aligned (new K/V
/// rows on 16 bytes, head_dim a multiple of 8, and for NeoX RoPE rotary_dim a multiple of
/// 16): the cache's own limit.
pub const MAX_APPEND_HEAD_DIM: usize = sys::LONGCTX_KV_APPEND_MAX_HEAD_DIM as usize;

/// The largest head dim of the element-aligned fallback, taken when the 16-byte conditions
/// of [`MAX_APPEND_HEAD_DIM`] do not hold.
pub const MAX_APPEND_HEAD_DIM_SCALAR: usize = sys::LONGCTX_KV_APPEND_MAX_HEAD_DIM_SCALAR as usize;

/// Largest rotary_dim (the RoPE kernel's limit).
const MAX_ROTARY_DIM: usize = sys::LONGCTX_ROPE_MAX_ROTARY_DIM as usize;

/// Vector width of the 16-byte kernels in elements of the new K/V (f16 or bf16).
const VEC: usize = 8;

/// The new K and V rows of a step, `[total_new, heads_kv, head_dim]` views (any token and
/// head strides; K and V may be views of one packed QKV buffer).
#[derive(Clone, Copy)]
pub struct NewKv<'a, T> {
    /// Holds the new K.
    pub k: &'a dyn DevicePtr<T>,
    /// K's view.
    pub k_layout: HeadsLayout,
    /// Holds the new V.
    pub v: &'a dyn DevicePtr<T>,
    /// V's view.
    pub v_layout: HeadsLayout,
}

impl<T> std::fmt::Debug for NewKv<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKv")
            .field("k_len", &self.k.len())
            .field("k_layout", &self.k_layout)
            .field("v_len", &self.v.len())
            .field("v_layout", &self.v_layout)
            .finish()
    }
}

/// RoPE fused into an append: K's first `table.rotary_dim()` channels are rotated forward
/// at each new token's position, exactly as [`crate::rope::apply_rope`] does.
#[derive(Debug, Clone, Copy)]
pub struct AppendRope<'a> {
    /// The frequency table (on the op's device, made for the cache's head dim).
    pub table: &'a RopeTable,
    /// Channel pairing.
    pub style: RopeStyle,
    /// Angle precision.
    pub precision: AnglePrecision,
}

/// What validation needs of the fused RoPE, wherever its table lives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppendRopeShape {
    /// The head dim the table was made for.
    pub head_dim: usize,
    /// Channels rotated per head: even, 2..=head_dim, at most 512.
    pub rotary_dim: usize,
    /// Positions must stay below this when the frequencies depend on the length.
    pub max_positions: Option<usize>,
    /// Channel pairing.
    pub style: RopeStyle,
    /// Angle precision.
    pub precision: AnglePrecision,
    /// Multiplies cos and sin.
    pub attention_factor: f32,
}

/// The shapes of one call, checkable without a device.
#[derive(Debug, Clone, Copy)]
pub struct AppendShape {
    /// The cache's layout, storage type and buffer lengths.
    pub cache: CacheShape,
    /// The new K's view, `[total_new, heads_kv, head_dim]`.
    pub k: HeadsLayout,
    /// Elements in its buffer.
    pub k_len: usize,
    /// The new V's view.
    pub v: HeadsLayout,
    /// Elements in its buffer.
    pub v_len: usize,
    /// The fused RoPE, if any.
    pub rope: Option<AppendRopeShape>,
}

/// A call that passed [`AppendShape::validate`].
#[derive(Debug, Clone, Copy)]
pub struct AppendValidated {
    shape: AppendShape,
    total_new: usize,
    /// (token, head) rows to write, each of K and of V.
    pub rows: usize,
    blocks: u32,
}

impl AppendValidated {
    /// The validated shapes.
    pub fn shape(&self) -> &AppendShape {
        &self.shape
    }
}

fn i64_of(v: usize, arg: &'static str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::overflow(OP, arg, format!("stride {v} exceeds i64")))
}

impl AppendShape {
    /// Checks everything about a call that does not need the device, for new rows of `T`
    /// and a cache of `S`, against a step validated for `step_layout`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for: `T` not f16 / bf16 or `S` neither `T` nor fp8
    /// (`cache`); everything [`CacheShape::validate`] rejects (`cache.*`, `paged_kv`
    /// arguments); a step validated for another layout (`step`); a new K or V view whose
    /// token count differs from the step's new tokens, whose heads or head dim differ from
    /// the cache's, that leaves its buffer or whose rows overlap (`new.k`, `new.v`); a RoPE
    /// table made for another head dim, an odd, zero or too large rotary dim, or a new
    /// token's position past a length-dependent table's length (`rope`). Kind
    /// [`ErrorKind::Overflow`](crate::ErrorKind::Overflow) for strides past i64 and a grid
    /// past 2^31 - 1 blocks.
    pub fn validate<T: Element, S: CacheElement>(
        &self,
        step: &ValidatedStep,
        step_layout: &PagedKvLayout,
    ) -> Result<AppendValidated> {
        if !matches!(T::DTYPE, DType::F16 | DType::BF16) || !cache_matches::<T, S>() {
            return Err(Error::invalid(
                OP,
                "cache",
                format!(
                    "new rows of {:?} cannot be stored in a {:?} cache (f16 or bf16 rows go to \
                     a cache of their own type or to fp8)",
                    T::DTYPE,
                    S::CACHE_DTYPE
                ),
            ));
        }
        if self.cache.dtype != S::CACHE_DTYPE {
            return Err(Error::invalid(
                OP,
                "cache",
                format!(
                    "the shape says {:?}, the cache holds {:?}",
                    self.cache.dtype,
                    S::CACHE_DTYPE
                ),
            ));
        }
        self.cache.validate()?;
        let l = &self.cache.layout;
        if step_layout != l {
            return Err(Error::invalid(
                OP,
                "step",
                format!("the step was validated for {step_layout:?}, the cache is {l:?}"),
            ));
        }
        for (view, len, arg) in [
            (&self.k, self.k_len, "new.k"),
            (&self.v, self.v_len, "new.v"),
        ] {
            if (view.tokens, view.heads, view.head_dim) != (step.total_new, l.heads_kv, l.head_dim)
            {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "shape [{}, {}, {}], expected [total_new, heads_kv, head_dim] = \
                         [{}, {}, {}]",
                        view.tokens,
                        view.heads,
                        view.head_dim,
                        step.total_new,
                        l.heads_kv,
                        l.head_dim
                    ),
                ));
            }
            view.validate(OP, arg, len)?;
            i64_of(view.token_stride, arg)?;
            i64_of(view.head_stride, arg)?;
        }
        if l.head_dim > MAX_APPEND_HEAD_DIM {
            return Err(Error::unsupported(
                OP,
                "cache",
                format!("head_dim {} > {MAX_APPEND_HEAD_DIM}", l.head_dim),
            ));
        }
        if let Some(r) = &self.rope {
            if r.head_dim != l.head_dim {
                return Err(Error::invalid(
                    OP,
                    "rope",
                    format!(
                        "the table was made for head_dim {}, the cache has {}",
                        r.head_dim, l.head_dim
                    ),
                ));
            }
            if r.rotary_dim == 0
                || r.rotary_dim % 2 != 0
                || r.rotary_dim > r.head_dim
                || r.rotary_dim > MAX_ROTARY_DIM
            {
                return Err(Error::invalid(
                    OP,
                    "rope",
                    format!(
                        "rotary_dim {} must be even, nonzero, <= head_dim {} and <= \
                         {MAX_ROTARY_DIM}",
                        r.rotary_dim, r.head_dim
                    ),
                ));
            }
            if let Some(limit) = r.max_positions {
                // The last new token of sequence b sits at position seqlens[b] - 1.
                if let Some(b) =
                    (0..step.batch).find(|&b| step.new_tokens(b) > 0 && step.seqlens[b] > limit)
                {
                    return Err(Error::invalid(
                        OP,
                        "rope",
                        format!(
                            "sequence {b} writes position {} but the table was built for {limit} \
                             tokens and this config's frequencies depend on the length: build \
                             it for at least {}",
                            step.seqlens[b] - 1,
                            step.seqlens[b]
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
        let rows = step
            .total_new
            .checked_mul(l.heads_kv)
            .ok_or_else(|| Error::overflow(OP, "step", "total_new x heads_kv overflows usize"))?;
        let blocks = rows.div_ceil(sys::LONGCTX_KV_APPEND_WARPS as usize);
        let blocks = u32::try_from(blocks)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| {
                Error::overflow(
                    OP,
                    "step",
                    format!("{rows} rows need {blocks} blocks, more than a grid holds"),
                )
            })?;
        // validate_step bounded the batch's tokens (so total_new) by i32::MAX.
        Ok(AppendValidated {
            shape: *self,
            total_new: step.total_new,
            rows,
            blocks,
        })
    }
}

/// Where the buffers of one call start (device or emulated host addresses).
pub(crate) struct AppendAddrs {
    pub new_k: u64,
    pub new_v: u64,
    pub cache_k: u64,
    pub cache_v: u64,
    /// 0 for an f16 / bf16 cache.
    pub k_scale: u64,
    pub v_scale: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub cu_new: u64,
    /// 0 without RoPE.
    pub inv_freq: u64,
}

fn kernel_id(t: DType, s: CacheDType, vec: bool) -> Result<KernelId> {
    use KernelId::*;
    Ok(match (t, s, vec) {
        (DType::F16, CacheDType::F16, true) => KvAppendF16Vec,
        (DType::F16, CacheDType::F16, false) => KvAppendF16Scalar,
        (DType::F16, CacheDType::Fp8E4m3, true) => KvAppendF16Fp8Vec,
        (DType::F16, CacheDType::Fp8E4m3, false) => KvAppendF16Fp8Scalar,
        (DType::BF16, CacheDType::BF16, true) => KvAppendBf16Vec,
        (DType::BF16, CacheDType::BF16, false) => KvAppendBf16Scalar,
        (DType::BF16, CacheDType::Fp8E4m3, true) => KvAppendBf16Fp8Vec,
        (DType::BF16, CacheDType::Fp8E4m3, false) => KvAppendBf16Fp8Scalar,
        _ => {
            return Err(Error::invalid(
                OP,
                "cache",
                format!("no kernel stores {t:?} rows in a {s:?} cache"),
            ))
        }
    })
}

/// Byte address of element `offset` of the buffer at `base`.
fn byte_addr(base: u64, offset: usize, elem: usize, arg: &'static str) -> Result<u64> {
    (offset as u64)
        .checked_mul(elem as u64)
        .and_then(|b| b.checked_add(base))
        .ok_or_else(|| Error::invalid(OP, arg, "offset overflows the address space"))
}

/// The one function from a validated call to its launch, shared by the CUDA and emulated
/// backends; `step` is the step `v` was validated with. `None` when the step brings no
/// token.
///
/// The 16-byte kernel is chosen when both new views' rows start on 16 bytes (base address,
/// token and head strides), the cache rows start on `8 x sizeof(S)` bytes, head_dim is a
/// multiple of 8 and NeoX RoPE's rotary_dim a multiple of 16; otherwise the element-aligned
/// one, which takes head dims up to [`MAX_APPEND_HEAD_DIM_SCALAR`].
///
/// # Errors
/// Kind [`ErrorKind::Alignment`](crate::ErrorKind::Alignment) for a buffer address that is
/// not a multiple of its element; [`Error::InvalidArgument`] of kind
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) for a head dim past
/// [`MAX_APPEND_HEAD_DIM_SCALAR`] without 16-byte alignment.
pub(crate) fn plan_append<T: Element, S: CacheElement>(
    v: &AppendValidated,
    step: &ValidatedStep,
    a: &AppendAddrs,
) -> Result<Option<KernelLaunch<sys::LongctxKvAppendParams>>> {
    if v.rows == 0 {
        return Ok(None);
    }
    let sh = &v.shape;
    let l = &sh.cache.layout;
    let elem = T::DTYPE.size();
    let selem = S::CACHE_DTYPE.size();
    let new_k = byte_addr(a.new_k, sh.k.offset, elem, "new.k")?;
    let new_v = byte_addr(a.new_v, sh.v.offset, elem, "new.v")?;
    for (addr, size, arg) in [
        (new_k, elem, "new.k"),
        (new_v, elem, "new.v"),
        (a.cache_k, selem, "cache.k"),
        (a.cache_v, selem, "cache.v"),
        (a.k_scale, 4, "cache.k_scale"),
        (a.v_scale, 4, "cache.v_scale"),
        (a.block_table, 4, "step.block_table"),
        (a.seqlens, 4, "step.seqlens"),
        (a.cu_new, 4, "step.cu_new"),
        (a.inv_freq, 8, "rope.table"),
    ] {
        check_element_alignment(OP, arg, addr, size)?;
    }
    let rope_vec_ok = match &sh.rope {
        None
        | Some(AppendRopeShape {
            style: RopeStyle::Interleaved,
            ..
        }) => true,
        Some(r) => r.rotary_dim % (2 * VEC) == 0,
    };
    let vec = l.head_dim % VEC == 0
        && rope_vec_ok
        && [(new_k, &sh.k), (new_v, &sh.v)].iter().all(|(addr, view)| {
            addr % 16 == 0 && view.token_stride % VEC == 0 && view.head_stride % VEC == 0
        })
        && [a.cache_k, a.cache_v]
            .iter()
            .all(|&c| c % (VEC * selem) as u64 == 0);
    if !vec && l.head_dim > MAX_APPEND_HEAD_DIM_SCALAR {
        return Err(Error::unsupported(
            OP,
            "cache",
            format!(
                "head_dim {} > {MAX_APPEND_HEAD_DIM_SCALAR} needs the 16-byte kernel: new K/V \
                 rows on 16 bytes with strides and head_dim multiples of 8 (and for NeoX RoPE \
                 a rotary_dim multiple of 16)",
                l.head_dim
            ),
        ));
    }
    let cache = cache_params(&sh.cache, a.cache_k, a.cache_v, a.k_scale, a.v_scale);
    let step = step_params(step, a.block_table, a.seqlens, a.cu_new);
    let (inv_freq, rotary_dim, rope_style, angle_mode, attention_factor) = match &sh.rope {
        None => (
            0,
            0,
            sys::LONGCTX_ROPE_STYLE_NEOX,
            sys::LONGCTX_ROPE_ANGLE_F64,
            1.0,
        ),
        Some(r) => (
            a.inv_freq,
            r.rotary_dim as u32,
            match r.style {
                RopeStyle::Neox => sys::LONGCTX_ROPE_STYLE_NEOX,
                RopeStyle::Interleaved => sys::LONGCTX_ROPE_STYLE_INTERLEAVED,
            },
            match r.precision {
                AnglePrecision::F64 => sys::LONGCTX_ROPE_ANGLE_F64,
                AnglePrecision::F32 => sys::LONGCTX_ROPE_ANGLE_F32,
            },
            r.attention_factor,
        ),
    };
    if sh.rope.is_some() && inv_freq == 0 {
        return Err(Error::invalid(OP, "rope", "the table's address is null"));
    }
    // Validation proved every value below fits its field.
    let params = sys::LongctxKvAppendParams {
        cache,
        step,
        new_k,
        new_v,
        k_token_stride: sh.k.token_stride as i64,
        k_head_stride: sh.k.head_stride as i64,
        v_token_stride: sh.v.token_stride as i64,
        v_head_stride: sh.v.head_stride as i64,
        inv_freq,
        total_new: v.total_new as u32,
        rotary_dim,
        rope_style,
        angle_mode,
        attention_factor,
        pad0: 0,
    };
    Ok(Some(KernelLaunch {
        id: kernel_id(T::DTYPE, S::CACHE_DTYPE, vec)?,
        params,
        grid: (v.blocks, 1, 1),
        block: (32 * sys::LONGCTX_KV_APPEND_WARPS, 1, 1),
        smem_bytes: 0,
    }))
}

/// Writes the step's new K and V rows into `cache` on `dev`'s stream: new row `i` of
/// sequence `b` (which brings `n_b` tokens) is the token at position `seqlens[b] - n_b + i`,
/// stored in slot `p % page_size` of page `block_table[b][p / page_size]`, every head. With
/// `rope`, K's first rotary_dim channels are rotated forward at that position first (V
/// never is). One launch, nothing allocated; cache slots no new token maps to are left
/// as they are.
///
/// An f16 / bf16 cache (of `T` itself) receives the values rounded to nearest. An fp8 cache
/// receives codes `e4m3(x / scale)` (round to nearest even, saturating at +-448), with
/// [`KvScalesMut::PerTokenHead`]: `scale = absmax(row) / 448` per (token, head) row of K and
/// of V (1 for an all-zero row), written next to the codes; with [`KvScalesMut::PerHead`]:
/// the caller's `scale[h]`, read only (its values cannot be checked without a copy: a zero
/// or NaN scale gives NaN or saturated codes). New rows must be finite (an infinite or NaN
/// value gives NaN codes in its fp8 row).
///
/// Two new tokens that map to the same slot (a page shared by two sequences, written at the
/// same position) race; the step must give each new token a slot of its own.
///
/// # Errors
/// [`Error::InvalidArgument`] for everything [`AppendShape::validate`] rejects, a buffer, the
/// step or the RoPE table of another device context, or a device older than sm_80; kind
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) for a head dim past
/// [`MAX_APPEND_HEAD_DIM_SCALAR`] whose views are not 16-byte aligned (see
/// [`MAX_APPEND_HEAD_DIM`]), kind [`ErrorKind::Alignment`](crate::ErrorKind::Alignment) for
/// a view whose address is not a multiple of its element. [`Error::KernelsNotCompiled`]
/// without kernels; [`Error::Cuda`] if the launch fails.
pub fn append_kv<T: Element, S: CacheElement>(
    dev: &Device,
    step: &KvStep,
    new: &NewKv<T>,
    cache: PagedCacheMut<S>,
    rope: Option<AppendRope>,
) -> Result<()> {
    let scales_owned = match &cache.scales {
        KvScalesMut::None => true,
        KvScalesMut::PerTokenHead { k, v } => dev.owns_any(&**k) && dev.owns_any(&**v),
        KvScalesMut::PerHead { k, v } => dev.owns_any(*k) && dev.owns_any(*v),
    };
    for (same_ctx, arg) in [
        (dev.owns_any(new.k), "new.k"),
        (dev.owns_any(new.v), "new.v"),
        (dev.owns_any(&*cache.k), "cache.k"),
        (dev.owns_any(&*cache.v), "cache.v"),
        (scales_owned, "cache.scales"),
        (
            dev.owns(step.block_table()) && dev.owns(step.seqlens()) && dev.owns(step.cu_new()),
            "step",
        ),
        (
            rope.map_or(true, |r| dev.owns(r.table.inv_freq_buf())),
            "rope",
        ),
    ] {
        if !same_ctx {
            return Err(Error::invalid(OP, arg, "lives on another device context"));
        }
    }
    let cc = dev.compute_capability();
    if cc < (8, 0) {
        return Err(Error::invalid(
            OP,
            "device",
            format!(
                "the kernels need sm_80 or newer; this device is sm_{}{}",
                cc.0, cc.1
            ),
        ));
    }
    let scales = match &cache.scales {
        KvScalesMut::None => None,
        KvScalesMut::PerTokenHead { k, v } => Some((ScaleMode::PerTokenHead, k.len(), v.len())),
        KvScalesMut::PerHead { k, v } => Some((ScaleMode::PerHead, k.len(), v.len())),
    };
    let v = AppendShape {
        cache: CacheShape::of::<S>(cache.layout, cache.k.len(), cache.v.len(), scales),
        k: new.k_layout,
        k_len: new.k.len(),
        v: new.v_layout,
        v_len: new.v.len(),
        rope: rope.map(|r| AppendRopeShape {
            head_dim: r.table.head_dim(),
            rotary_dim: r.table.rotary_dim(),
            max_positions: r.table.max_positions(),
            style: r.style,
            precision: r.precision,
            attention_factor: r.table.attention_factor(),
        }),
    }
    .validate::<T, S>(step.validated(), step.layout())?;
    let stream = dev.stream();
    let (nk, _g0) = new.k.device_ptr(stream);
    let (nv, _g1) = new.v.device_ptr(stream);
    let (bt, _g2) = step.block_table().device_ptr(stream);
    let (sl, _g3) = step.seqlens().device_ptr(stream);
    let (cu, _g4) = step.cu_new().device_ptr(stream);
    let inv = rope.map(|r| r.table.inv_freq_buf().device_ptr(stream));
    let PagedCacheMut {
        k, v: cv, scales, ..
    } = cache;
    let (ck, _g5) = k.device_ptr_mut(stream);
    let (cvv, _g6) = cv.device_ptr_mut(stream);
    let (ks, vs, _g7, _g8, _g9, _g10) = match scales {
        KvScalesMut::None => (0, 0, None, None, None, None),
        KvScalesMut::PerTokenHead { k, v } => {
            let (a, ga) = k.device_ptr_mut(stream);
            let (b, gb) = v.device_ptr_mut(stream);
            (a, b, Some(ga), Some(gb), None, None)
        }
        KvScalesMut::PerHead { k, v } => {
            let (a, ga) = k.device_ptr(stream);
            let (b, gb) = v.device_ptr(stream);
            (a, b, None, None, Some(ga), Some(gb))
        }
    };
    let Some(l) = plan_append::<T, S>(
        &v,
        step.validated(),
        &AppendAddrs {
            new_k: nk,
            new_v: nv,
            cache_k: ck,
            cache_v: cvv,
            k_scale: ks,
            v_scale: vs,
            block_table: bt,
            seqlens: sl,
            cu_new: cu,
            inv_freq: inv.as_ref().map_or(0, |x| x.0),
        },
    )?
    else {
        return Ok(());
    };
    let func = dev.function(l.id)?;
    let mut builder = stream.launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: AppendShape::validate proved both new views inside their buffers with every
    // count and stride within the kernel's fields, the cache buffers holding
    // pages x page_size x heads_kv x head_dim elements, the scale buffers the length their
    // mode needs, the step validated for this cache layout (every page id a used table
    // entry holds in 0..pages, every new token's position below its sequence's length, so
    // every slot written is inside the cache), the RoPE table's rotary_dim / 2 entries
    // present, and the grid within limits; all buffers live on this context (owns_any /
    // owns above); plan_append picked the 16-byte kernel only for aligned accesses and
    // checked element alignment of every address. The cache and its per-token scales are
    // borrowed mutably, so no input aliases them. The guards keep every buffer alive until
    // the launch is queued.
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}
