//! The paged cache's buffers: K and V in a storage type, and for fp8 their f32 scales.
//! [`CacheShape`] is the host check every op runs on them before a launch.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::fp8::{CacheDType, CacheElement};
use super::paged::PagedKvLayout;
use crate::error::{Error, Result};
use crate::sys;

const OP: &str = "paged_kv";

/// How an fp8 cache is scaled: an element's value is `code x scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleMode {
    /// One f32 scale per (token, head) for K and one for V, `[pages, page_size, heads_kv]`
    /// with the cache's paging; append writes them (absmax / 448 of the row, so every
    /// row uses fp8's whole range).
    PerTokenHead,
    /// One f32 scale per head for K and one for V, `[heads_kv]`, fixed by the caller
    /// (a calibration); append divides by them and saturates at +-448.
    PerHead,
}

impl ScaleMode {
    pub(crate) fn flag(mode: Option<ScaleMode>) -> u32 {
        match mode {
            None => sys::LONGCTX_KV_SCALE_NONE,
            Some(ScaleMode::PerTokenHead) => sys::LONGCTX_KV_SCALE_TOKEN_HEAD,
            Some(ScaleMode::PerHead) => sys::LONGCTX_KV_SCALE_HEAD,
        }
    }
}

/// The scales of a cache read by an op (decode, extend).
#[derive(Clone, Copy)]
pub enum KvScales<'a> {
    /// An f16 / bf16 cache.
    None,
    /// fp8 with scales (K's and V's, in the layout `mode` says).
    Fp8 {
        /// Per (token, head) or per head.
        mode: ScaleMode,
        /// K's scales.
        k: &'a dyn DevicePtr<f32>,
        /// V's scales.
        v: &'a dyn DevicePtr<f32>,
    },
}

impl std::fmt::Debug for KvScales<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvScales::None => f.write_str("None"),
            KvScales::Fp8 { mode, k, v } => f
                .debug_struct("Fp8")
                .field("mode", mode)
                .field("k_len", &k.len())
                .field("v_len", &v.len())
                .finish(),
        }
    }
}

/// A paged cache read by an op.
#[derive(Clone, Copy)]
pub struct PagedCache<'a, S> {
    /// Shape of K and of V.
    pub layout: PagedKvLayout,
    /// K, `[pages, page_size, heads_kv, head_dim]`.
    pub k: &'a dyn DevicePtr<S>,
    /// V, same shape.
    pub v: &'a dyn DevicePtr<S>,
    /// fp8 scales, or [`KvScales::None`].
    pub scales: KvScales<'a>,
}

impl<S> std::fmt::Debug for PagedCache<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedCache")
            .field("layout", &self.layout)
            .field("k_len", &self.k.len())
            .field("v_len", &self.v.len())
            .field("scales", &self.scales)
            .finish()
    }
}

/// The scales of a cache written by append.
pub enum KvScalesMut<'a> {
    /// An f16 / bf16 cache.
    None,
    /// fp8, one scale per (token, head), written by append.
    PerTokenHead {
        /// K's scales, `[pages, page_size, heads_kv]`.
        k: &'a mut dyn DevicePtrMut<f32>,
        /// V's scales.
        v: &'a mut dyn DevicePtrMut<f32>,
    },
    /// fp8, one scale per head, read by append.
    PerHead {
        /// K's scales, `[heads_kv]`.
        k: &'a dyn DevicePtr<f32>,
        /// V's scales.
        v: &'a dyn DevicePtr<f32>,
    },
}

impl std::fmt::Debug for KvScalesMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvScalesMut::None => f.write_str("None"),
            KvScalesMut::PerTokenHead { k, v } => f
                .debug_struct("PerTokenHead")
                .field("k_len", &k.len())
                .field("v_len", &v.len())
                .finish(),
            KvScalesMut::PerHead { k, v } => f
                .debug_struct("PerHead")
                .field("k_len", &k.len())
                .field("v_len", &v.len())
                .finish(),
        }
    }
}

/// A paged cache written by an op (append).
pub struct PagedCacheMut<'a, S> {
    /// Shape of K and of V.
    pub layout: PagedKvLayout,
    /// K, `[pages, page_size, heads_kv, head_dim]`.
    pub k: &'a mut dyn DevicePtrMut<S>,
    /// V, same shape.
    pub v: &'a mut dyn DevicePtrMut<S>,
    /// fp8 scales, or [`KvScalesMut::None`].
    pub scales: KvScalesMut<'a>,
}

impl<S> std::fmt::Debug for PagedCacheMut<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedCacheMut")
            .field("layout", &self.layout)
            .field("k_len", &self.k.len())
            .field("v_len", &self.v.len())
            .field("scales", &self.scales)
            .finish()
    }
}

/// The buffer lengths of a cache, checkable without a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Shape of K and of V.
    pub layout: PagedKvLayout,
    /// Storage type.
    pub dtype: CacheDType,
    /// Elements in K's buffer.
    pub k_len: usize,
    /// Elements in V's buffer.
    pub v_len: usize,
    /// fp8: the scale layout and the lengths of K's and V's scale buffers.
    pub scales: Option<(ScaleMode, usize, usize)>,
}

impl CacheShape {
    /// The shape of a cache of `S` with these buffer lengths.
    pub fn of<S: CacheElement>(
        layout: PagedKvLayout,
        k_len: usize,
        v_len: usize,
        scales: Option<(ScaleMode, usize, usize)>,
    ) -> Self {
        CacheShape {
            layout,
            dtype: S::CACHE_DTYPE,
            k_len,
            v_len,
            scales,
        }
    }

    /// Checks the layout, that K and V hold a whole cache, and that an fp8 cache (and only
    /// one) has scales of the right length. Buffers may be longer than needed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid layout (see [`PagedKvLayout::validate`]),
    /// a short K or V (`cache.k`, `cache.v`), an fp8 cache without scales or an f16/bf16
    /// one with them (`cache.scales`), short scales (`cache.k_scale`, `cache.v_scale`).
    pub fn validate(&self) -> Result<()> {
        let want = self.layout.validate()?;
        for (len, arg) in [(self.k_len, "cache.k"), (self.v_len, "cache.v")] {
            if len < want {
                return Err(Error::invalid(
                    OP,
                    arg,
                    format!(
                        "holds {len} elements, the layout {:?} needs {want}",
                        self.layout
                    ),
                ));
            }
        }
        match (self.dtype, self.scales) {
            (CacheDType::Fp8E4m3, None) => Err(Error::invalid(
                OP,
                "cache.scales",
                "an fp8 cache needs K and V scales",
            )),
            (CacheDType::F16 | CacheDType::BF16, Some(_)) => Err(Error::invalid(
                OP,
                "cache.scales",
                "scales are for fp8 caches; this one is f16 or bf16",
            )),
            (_, None) => Ok(()),
            (_, Some((mode, kl, vl))) => {
                let l = &self.layout;
                let need = match mode {
                    // validate() bounded pages x page_size x heads_kv x head_dim.
                    ScaleMode::PerTokenHead => l.pages * l.page_size * l.heads_kv,
                    ScaleMode::PerHead => l.heads_kv,
                };
                for (len, arg) in [(kl, "cache.k_scale"), (vl, "cache.v_scale")] {
                    if len < need {
                        return Err(Error::invalid(
                            OP,
                            arg,
                            format!("holds {len} scales, {mode:?} needs {need}"),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The kernel's view of a cache at these addresses (validated by the caller).
pub(crate) fn cache_params(
    s: &CacheShape,
    k: u64,
    v: u64,
    k_scale: u64,
    v_scale: u64,
) -> sys::LongctxKvCache {
    let l = &s.layout;
    // CacheShape::validate bounded every field: pages <= i32::MAX, page_size <= 256,
    // heads_kv x head_dim within the cache's element count.
    sys::LongctxKvCache {
        k,
        v,
        k_scale,
        v_scale,
        pages: l.pages as u32,
        page_size: l.page_size as u32,
        heads_kv: l.heads_kv as u32,
        head_dim: l.head_dim as u32,
        scale_mode: ScaleMode::flag(s.scales.map(|x| x.0)),
        pad0: 0,
    }
}

/// The kernel's view of a validated step whose device arrays live at these addresses.
pub(crate) fn step_params(
    v: &super::ValidatedStep,
    block_table: u64,
    seqlens: u64,
    cu_new: u64,
) -> sys::LongctxKvStep {
    // validate_table bounded the batch's total tokens by i32::MAX, so batch fits u32; the
    // table's columns are checked by the ops that launch (max_pages_per_seq x batch fits
    // the table buffer).
    sys::LongctxKvStep {
        block_table,
        seqlens,
        cu_new,
        batch: v.batch as u32,
        max_pages_per_seq: v.max_pages_per_seq as u32,
    }
}
