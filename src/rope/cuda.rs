//! GPU path of RoPE: validated arguments -> LongctxRopeParams -> one launch.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{AnglePrecision, Direction, RopeConfig, RopeOptions, RopeStyle};
use crate::device::{cuda_err, Device};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernel_id::KernelId;
use crate::launch::KernelLaunch;
use crate::layout::{check_element_alignment, HeadsLayout, RawTensor};
use crate::sys;

const OP: &str = "rope";
/// Threads per block (params/rope_params.h, shared with kernels/rope/traits.cuh).
const THREADS: u32 = sys::LONGCTX_ROPE_THREADS;
/// Most heads per tensor: keeps the kernel's per-token work-item index in 32 bits.
const MAX_HEADS: usize = 1 << 16;
/// Largest rotary_dim the kernel keeps cos/sin for (LONGCTX_ROPE_MAX_ROTARY_DIM).
pub(crate) const MAX_ROTARY_DIM: usize = sys::LONGCTX_ROPE_MAX_ROTARY_DIM as usize;

/// A RoPE configuration's frequency table resident on one device: inv_freq in f64 for one
/// sequence length (dynamic NTK and LongRoPE depend on it), and the attention factor.
#[derive(Debug)]
pub struct RopeTable {
    inv_freq: CudaSlice<f64>,
    head_dim: usize,
    rotary_dim: usize,
    attention_factor: f32,
    /// Positions must stay below this when the frequencies depend on the length.
    max_positions: Option<usize>,
}

impl RopeTable {
    /// Uploads `config`'s inv_freq for sequences of `seq_len` tokens.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if rotary_dim exceeds the kernel's limit (512);
    /// [`Error::Cuda`] on upload failure.
    pub fn new(dev: &Device, config: &RopeConfig, seq_len: usize) -> Result<Self> {
        let (inv, info) = table_info(config, seq_len)?;
        Ok(RopeTable {
            inv_freq: dev.upload(&inv)?,
            head_dim: info.head_dim,
            rotary_dim: info.rotary_dim,
            attention_factor: info.attention_factor,
            max_positions: info.max_positions,
        })
    }

    fn info(&self, inv_freq: u64) -> TableInfo {
        TableInfo {
            head_dim: self.head_dim,
            rotary_dim: self.rotary_dim,
            attention_factor: self.attention_factor,
            inv_freq,
            max_positions: self.max_positions,
        }
    }

    /// Channels rotated per head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// The head dim the table was made for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The attention factor folded into cos and sin.
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    /// The device inv_freq table (rotary_dim / 2 f64 entries), for kernels that fuse RoPE.
    pub(crate) fn inv_freq_buf(&self) -> &CudaSlice<f64> {
        &self.inv_freq
    }

    /// The sequence length positions must stay below, when the frequencies depend on it.
    pub(crate) fn max_positions(&self) -> Option<usize> {
        self.max_positions
    }
}

/// What a launch needs of a frequency table, wherever it lives.
pub(crate) struct TableInfo {
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub attention_factor: f32,
    /// Address of rotary_dim / 2 f64 inverse frequencies.
    pub inv_freq: u64,
    /// The sequence length the table was built for, when its frequencies depend on it
    /// (dynamic NTK, LongRoPE): positions must stay below it.
    pub max_positions: Option<usize>,
}

/// Validates `config` for the kernel and computes its inv_freq for `seq_len` tokens (the
/// address in the returned info is 0 until the caller places the table).
pub(crate) fn table_info(config: &RopeConfig, seq_len: usize) -> Result<(Vec<f64>, TableInfo)> {
    let rotary_dim = config.rotary_dim();
    if rotary_dim == 0
        || rotary_dim % 2 != 0
        || rotary_dim > MAX_ROTARY_DIM
        || rotary_dim > config.head_dim()
    {
        let problem = format!(
            "rotary_dim {rotary_dim} must be even, nonzero, <= head_dim {} and <= {MAX_ROTARY_DIM}",
            config.head_dim()
        );
        // Only a rotary dim past the kernel's limit is a valid config it does not implement.
        let consistent = rotary_dim != 0 && rotary_dim % 2 == 0 && rotary_dim <= config.head_dim();
        return Err(if consistent {
            Error::unsupported(OP, "config", problem)
        } else {
            Error::invalid(OP, "config", problem)
        });
    }
    let inv = config.inv_freq_f64(seq_len);
    Ok((
        inv,
        TableInfo {
            head_dim: config.head_dim(),
            rotary_dim,
            attention_factor: config.attention_factor(),
            inv_freq: 0,
            max_positions: config.depends_on_length().then_some(seq_len),
        },
    ))
}

/// Every position must lie in [0, 2^31).
pub(crate) fn check_positions(positions: &[i32]) -> Result<()> {
    if let Some((t, p)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
        return Err(Error::invalid(
            OP,
            "positions",
            format!("position {p} at token {t} is negative"),
        ));
    }
    Ok(())
}

/// Token positions on the device, validated on upload (every entry in [0, 2^31)). Packed
/// variable-length batches and KV-cache offsets are just positions; one upload serves every
/// layer.
#[derive(Debug)]
pub struct Positions {
    /// At least one element (CUDA has no empty allocations); `len` says how many count.
    data: CudaSlice<i32>,
    len: usize,
    /// The largest position (None when empty), checked against length-dependent tables.
    max: Option<i32>,
}

impl Positions {
    /// Validates and uploads `positions`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first negative position; [`Error::Cuda`] on
    /// upload failure.
    pub fn upload(dev: &Device, positions: &[i32]) -> Result<Self> {
        check_positions(positions)?;
        let data = if positions.is_empty() {
            dev.zeros(1)?
        } else {
            dev.upload(positions)?
        };
        Ok(Positions {
            data,
            len: positions.len(),
            max: positions.iter().copied().max(),
        })
    }

    /// Positions start, start + 1, ..., start + len - 1.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the last position passes i32::MAX.
    pub fn arange(dev: &Device, start: i32, len: usize) -> Result<Self> {
        let last = i64::from(start) + i64::try_from(len).unwrap_or(i64::MAX) - 1;
        if start < 0 || last > i64::from(i32::MAX) {
            return Err(Error::invalid(
                OP,
                "positions",
                format!("arange({start}, {len}) leaves [0, 2^31)"),
            ));
        }
        let v: Vec<i32> = (0..len).map(|i| start + i as i32).collect();
        Self::upload(dev, &v)
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no positions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn kernel_id(dtype: DType, vectorized: bool) -> KernelId {
    match (dtype, vectorized) {
        (DType::F32, true) => KernelId::RopeF32Vec,
        (DType::F32, false) => KernelId::RopeF32Scalar,
        (DType::F16, true) => KernelId::RopeF16Vec,
        (DType::F16, false) => KernelId::RopeF16Scalar,
        (DType::BF16, true) => KernelId::RopeBf16Vec,
        (DType::BF16, false) => KernelId::RopeBf16Scalar,
    }
}

fn check_view(
    table: &TableInfo,
    view: &HeadsLayout,
    arg: &'static str,
    buf_len: usize,
    tokens: usize,
) -> Result<()> {
    view.validate(OP, arg, buf_len)?;
    if view.heads > 0 && view.head_dim != table.head_dim {
        return Err(Error::invalid(
            OP,
            arg,
            format!(
                "head_dim {} but the table was made for head_dim {} (a table from another config?)",
                view.head_dim, table.head_dim
            ),
        ));
    }
    if view.heads > 0 && view.tokens != tokens {
        return Err(Error::invalid(
            OP,
            arg,
            format!("{} tokens, positions has {tokens}", view.tokens),
        ));
    }
    if view.heads > MAX_HEADS {
        return Err(Error::overflow(
            OP,
            arg,
            format!("{} heads is more than the kernel indexes", view.heads),
        ));
    }
    i64::try_from(view.token_stride)
        .ok()
        .zip(i64::try_from(view.head_stride).ok())
        .ok_or_else(|| Error::overflow(OP, arg, "stride does not fit in i64"))?;
    Ok(())
}

/// Whether every access of `view` is 16-byte aligned for the vector kernel (given that the
/// buffer itself starts 256-byte aligned, as CUDA allocations do).
fn vector_ok<T: Element>(view: &HeadsLayout, rotary_dim: usize, base_addr: u64) -> bool {
    let w = 16 / T::DTYPE.size();
    let byte_off = (view.offset * T::DTYPE.size()) as u64;
    view.heads == 0
        || ((base_addr + byte_off) % 16 == 0
            && view.token_stride % w == 0
            && view.head_stride % w == 0
            && rotary_dim % (2 * w) == 0)
}

fn check_owned(table: &RopeTable, positions: &Positions, dev: &Device) -> Result<()> {
    if !dev.owns(&table.inv_freq) {
        return Err(Error::invalid(
            OP,
            "table",
            "table lives on another device context",
        ));
    }
    if !dev.owns(&positions.data) {
        return Err(Error::invalid(
            OP,
            "positions",
            "positions live on another device context",
        ));
    }
    Ok(())
}

fn check_tokens(tokens: usize) -> Result<u32> {
    u32::try_from(tokens)
        .ok()
        .filter(|&t| t <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::overflow(
                OP,
                "positions",
                format!("{tokens} tokens exceed the grid limit 2^31 - 1"),
            )
        })
}

fn tensor(view: &HeadsLayout, base: u64, elem: usize) -> sys::LongctxRopeTensor {
    sys::LongctxRopeTensor {
        data: base + (view.offset * elem) as u64,
        token_stride: view.token_stride as i64,
        head_stride: view.head_stride as i64,
        heads: view.heads as u32,
        pad0: 0,
    }
}

/// The positions of a launch: address, count and largest value (None when empty).
pub(crate) struct PositionsArg {
    pub addr: u64,
    pub len: usize,
    pub max: Option<i32>,
}

/// One view of a launch: its layout, the length of its buffer (elements) and the
/// buffer's address.
pub(crate) struct ViewArg<'a> {
    pub layout: &'a HeadsLayout,
    pub buffer_len: usize,
    pub base: u64,
}

/// The one function from arguments to a launch, shared by the CUDA and emulated backends:
/// validates the views against the table and the token count, checks that Q and K are
/// disjoint when `same_buffer`, picks the vector kernel where every access is 16-byte
/// aligned, and fills the params. `None` when there is nothing to rotate.
pub(crate) fn plan_launch<T: Element>(
    table: &TableInfo,
    positions: PositionsArg,
    q: ViewArg<'_>,
    k: ViewArg<'_>,
    same_buffer: bool,
    opts: RopeOptions,
) -> Result<Option<KernelLaunch<sys::LongctxRopeParams>>> {
    let PositionsArg {
        addr: positions,
        len: tokens,
        max: max_position,
    } = positions;
    let tokens32 = check_tokens(tokens)?;
    if let (Some(limit), Some(p)) = (table.max_positions, max_position) {
        if usize::try_from(p).map_or(true, |p| p >= limit) {
            return Err(Error::invalid(
                OP,
                "positions",
                format!(
                    "position {p} is past the {limit} tokens the table was built for, and this \
                     config's frequencies depend on the length (dynamic NTK or LongRoPE): build \
                     the table for at least {} tokens",
                    i64::from(p) + 1
                ),
            ));
        }
    }
    check_view(table, q.layout, "q", q.buffer_len, tokens)?;
    check_view(table, k.layout, "k", k.buffer_len, tokens)?;
    for (v, arg) in [(&q, "q"), (&k, "k")] {
        if !v.layout.is_empty() {
            check_element_alignment(OP, arg, v.base, T::DTYPE.size())?;
        }
    }
    if same_buffer
        && q.layout.heads > 0
        && k.layout.heads > 0
        && q.layout.may_overlap(k.layout, OP)?
    {
        return Err(Error::invalid(
            OP,
            "q/k",
            format!(
                "views may overlap: q {:?}, k {:?}; in-place rotation needs disjoint views",
                q.layout, k.layout
            ),
        ));
    }
    let vectorized = vector_ok::<T>(q.layout, table.rotary_dim, q.base)
        && vector_ok::<T>(k.layout, table.rotary_dim, k.base);
    let elem = T::DTYPE.size();
    let params = sys::LongctxRopeParams {
        q: tensor(q.layout, q.base, elem),
        k: tensor(k.layout, k.base, elem),
        positions,
        inv_freq: table.inv_freq,
        tokens: tokens32,
        rotary_dim: table.rotary_dim as u32,
        style: match opts.style {
            RopeStyle::Neox => sys::LONGCTX_ROPE_STYLE_NEOX,
            RopeStyle::Interleaved => sys::LONGCTX_ROPE_STYLE_INTERLEAVED,
        },
        direction: match opts.direction {
            Direction::Forward => sys::LONGCTX_ROPE_FORWARD,
            Direction::Backward => sys::LONGCTX_ROPE_BACKWARD,
        },
        angle_mode: match opts.precision {
            AnglePrecision::F64 => sys::LONGCTX_ROPE_ANGLE_F64,
            AnglePrecision::F32 => sys::LONGCTX_ROPE_ANGLE_F32,
        },
        attention_factor: table.attention_factor,
    };
    if params.tokens == 0 || (params.q.heads == 0 && params.k.heads == 0) {
        return Ok(None);
    }
    Ok(Some(KernelLaunch {
        id: kernel_id(T::DTYPE, vectorized),
        params,
        grid: (params.tokens, 1, 1),
        block: (THREADS, 1, 1),
        smem_bytes: 0,
    }))
}

fn launch(dev: &Device, l: Option<KernelLaunch<sys::LongctxRopeParams>>) -> Result<()> {
    let Some(l) = l else {
        return Ok(());
    };
    let func = dev.function(l.id)?;
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(&l.params);
    // SAFETY: plan_launch validated that every (token, head, channel < rotary_dim) address
    // of q and k lies inside its live buffer, that q and k do not overlap, that vectorized
    // kernels see 16-byte aligned addresses and strides, and that all counts fit the
    // kernel's 32-bit indexing; positions has `tokens` non-negative entries and inv_freq
    // rotary_dim / 2 entries on this context (checked on upload and by check_owned). The
    // device pointer guards are held by the caller until this returns, i.e. until the
    // launch is queued.
    unsafe { builder.launch(l.config()) }
        .map(|_| ())
        .map_err(cuda_err(OP))
}

/// Rotates Q and K, two separate buffers, in place with one launch.
///
/// `q` and `k` are [tokens, heads, head_dim] views (see [`HeadsLayout`]) of `q_buf` and
/// `k_buf`, each a cudarc `CudaSlice` or `CudaViewMut` (a view into a larger buffer; the
/// vector kernel is chosen from the view's actual address); `k.heads` may be 0 to rotate Q
/// alone. head_dim must be the table's; channels past its rotary_dim are untouched.
///
/// # Errors
/// [`Error::InvalidArgument`] when a view leaves its buffer or overlaps itself, token counts
/// differ from `positions`, head_dim differs from the table's, or a buffer, the table or
/// positions live on another device; [`Error::KernelsNotCompiled`] without kernels;
/// [`Error::Cuda`] if the launch fails.
#[allow(clippy::too_many_arguments)]
pub fn apply_rope<T: Element>(
    dev: &Device,
    table: &RopeTable,
    positions: &Positions,
    q_buf: &mut impl DevicePtrMut<T>,
    q: &HeadsLayout,
    k_buf: &mut impl DevicePtrMut<T>,
    k: &HeadsLayout,
    opts: RopeOptions,
) -> Result<()> {
    check_owned(table, positions, dev)?;
    if !dev.owns_any(q_buf) || !dev.owns_any(k_buf) {
        return Err(Error::invalid(
            OP,
            "q/k",
            "buffer lives on another device context",
        ));
    }
    let stream = dev.stream();
    let (pos_ptr, _pg) = positions.data.device_ptr(stream);
    let (inv_ptr, _ig) = table.inv_freq.device_ptr(stream);
    let (q_len, k_len) = (q_buf.len(), k_buf.len());
    let (q_ptr, _qg) = q_buf.device_ptr_mut(stream);
    let (k_ptr, _kg) = k_buf.device_ptr_mut(stream);
    let l = plan_launch::<T>(
        &table.info(inv_ptr),
        PositionsArg {
            addr: pos_ptr,
            len: positions.len(),
            max: positions.max,
        },
        ViewArg {
            layout: q,
            buffer_len: q_len,
            base: q_ptr,
        },
        ViewArg {
            layout: k,
            buffer_len: k_len,
            base: k_ptr,
        },
        false,
        opts,
    )?;
    launch(dev, l)
}

/// Rotates Q and K that are two views of one buffer (for example a packed QKV projection
/// output), in place with one launch.
///
/// # Errors
/// As [`apply_rope`], plus [`Error::InvalidArgument`] when the two views may share an
/// element.
pub fn apply_rope_packed<T: Element>(
    dev: &Device,
    table: &RopeTable,
    positions: &Positions,
    buf: &mut impl DevicePtrMut<T>,
    q: &HeadsLayout,
    k: &HeadsLayout,
    opts: RopeOptions,
) -> Result<()> {
    check_owned(table, positions, dev)?;
    if !dev.owns_any(buf) {
        return Err(Error::invalid(
            OP,
            "buf",
            "buffer lives on another device context",
        ));
    }
    let stream = dev.stream();
    let (pos_ptr, _pg) = positions.data.device_ptr(stream);
    let (inv_ptr, _ig) = table.inv_freq.device_ptr(stream);
    let len = buf.len();
    let (ptr, _bg) = buf.device_ptr_mut(stream);
    let l = plan_launch::<T>(
        &table.info(inv_ptr),
        PositionsArg {
            addr: pos_ptr,
            len: positions.len(),
            max: positions.max,
        },
        ViewArg {
            layout: q,
            buffer_len: len,
            base: ptr,
        },
        ViewArg {
            layout: k,
            buffer_len: len,
            base: ptr,
        },
        true,
        opts,
    )?;
    launch(dev, l)
}

/// [`apply_rope`] on raw device pointers (burn/cubecl-style frameworks): rotates Q and K in
/// place. For a packed QKV buffer pass the same `ptr` for both, with the views' offsets
/// saying where Q and K start: their elements are then checked to be disjoint, as
/// [`apply_rope_packed`] does. Everything the safe ops check about shapes, lengths,
/// alignment and positions is checked here too; what cannot be checked is the contract
/// below.
///
/// # Safety
/// `q.ptr` and `k.ptr` are starts of live device allocations (or parts of one) of `dev`'s
/// CUDA context holding at least `q.len` and `k.len` elements of `T`; when the two pointers
/// differ, the `len`-element ranges they start do not overlap; no other work reads or
/// writes them until the launch, queued on `dev`'s stream, has completed; and the memory
/// stays allocated until then.
///
/// # Errors
/// As [`apply_rope`], plus an [`Error::InvalidArgument`] of kind
/// [`ErrorKind::Alignment`](crate::error::ErrorKind::Alignment) when a pointer is not a
/// multiple of `T`'s size.
pub unsafe fn apply_rope_raw<T: Element>(
    dev: &Device,
    table: &RopeTable,
    positions: &Positions,
    q: RawTensor,
    k: RawTensor,
    opts: RopeOptions,
) -> Result<()> {
    check_owned(table, positions, dev)?;
    let stream = dev.stream();
    let (pos_ptr, _pg) = positions.data.device_ptr(stream);
    let (inv_ptr, _ig) = table.inv_freq.device_ptr(stream);
    let l = plan_launch::<T>(
        &table.info(inv_ptr),
        PositionsArg {
            addr: pos_ptr,
            len: positions.len(),
            max: positions.max,
        },
        ViewArg {
            layout: &q.layout,
            buffer_len: q.len,
            base: q.ptr,
        },
        ViewArg {
            layout: &k.layout,
            buffer_len: k.len,
            base: k.ptr,
        },
        q.ptr == k.ptr,
        opts,
    )?;
    // The launch inside relies on plan_launch having checked the views against the lengths the
    // caller vouches for; the caller's contract covers liveness and aliasing; the table's
    // and positions' guards live until the launch is queued.
    launch(dev, l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A raw pointer that is not a multiple of the element size is refused before the
    /// launch (kind Alignment); one that is aligned to the element but not to 16 bytes
    /// takes the scalar kernel; an empty view's pointer is not looked at.
    #[test]
    fn the_plan_checks_each_pointer_against_its_element() {
        let table = TableInfo {
            head_dim: 64,
            rotary_dim: 64,
            attention_factor: 1.0,
            inv_freq: 0x1000,
            max_positions: None,
        };
        let layout = HeadsLayout::contiguous(2, 1, 64);
        let empty = HeadsLayout::contiguous(2, 0, 64);
        let plan = |q_base: u64, k_base: u64| {
            plan_launch::<half::bf16>(
                &table,
                PositionsArg {
                    addr: 0x2000,
                    len: 2,
                    max: Some(1),
                },
                ViewArg {
                    layout: &layout,
                    buffer_len: 128,
                    base: q_base,
                },
                ViewArg {
                    layout: &empty,
                    buffer_len: 0,
                    base: k_base,
                },
                false,
                RopeOptions::default(),
            )
        };
        let vec = plan(0x10000, 0x3).unwrap().unwrap();
        assert_eq!(vec.id, KernelId::RopeBf16Vec);
        let scalar = plan(0x10002, 0).unwrap().unwrap();
        assert_eq!(scalar.id, KernelId::RopeBf16Scalar);
        match plan(0x10001, 0) {
            Err(e @ Error::InvalidArgument { arg: "q", .. }) => {
                assert_eq!(e.kind(), ErrorKind::Alignment, "{e}")
            }
            other => panic!("expected an alignment error for q, got {other:?}"),
        }
    }
}
