//! The GPU handle: a CUDA context, the stream every op runs on, and the kernel modules,
//! loaded once per device on first use.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};

use crate::error::{Error, Result};
use crate::kernel_id::{Family, KernelId};

/// A CUDA device with one stream. All of `longctx`'s launches on this handle are queued on
/// that stream, in order.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<Vec<Option<Arc<CudaModule>>>>,
    functions: Mutex<Vec<Option<CudaFunction>>>,
    /// Per kernel: the PTX arch of the loaded code, once asked, and the dynamic shared
    /// memory it has been opted in to (0: the default 48 KB).
    kernel_info: Mutex<Vec<(Option<u32>, usize)>>,
    /// Most dynamic shared memory a block may opt in to.
    smem_opt_in_limit: usize,
    name: String,
    capability: (i32, i32),
    sm_count: usize,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("capability", &self.capability)
            .finish()
    }
}

pub(crate) fn cuda_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::driver(op, e)
}

/// Per kernel: the PTX arch of the loaded code (once asked) and the dynamic shared memory
/// it was opted into.
type KernelInfo = (Option<u32>, usize);

/// Whether the CUDA driver library can be loaded, asked without cudarc (whose own probe
/// exists only when it loads the library dynamically, and which panics on a missing one).
fn driver_library_present() -> bool {
    const NAMES: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    NAMES.iter().any(|name| {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which are made
        // to be loaded into any process (cudarc loads the same library the same way); the
        // handle is dropped at once and no symbol is called.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Whether this build embeds compiled kernels (false when nvcc was absent at build time).
pub fn kernels_compiled() -> bool {
    Family::ALL.iter().all(|f| f.fatbin().is_some())
}

impl Device {
    /// Opens device `ordinal` with a new stream.
    ///
    /// # Errors
    /// [`Error::NoDevice`] when the CUDA driver library is missing, no GPU is visible or
    /// `ordinal` is out of range; [`Error::Cuda`] when the driver fails otherwise.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_library_present() {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda) was not found".into(),
            });
        }
        // cudarc panics on some driver-loading failures; keep those from reaching the user.
        let ctx = std::panic::catch_unwind(|| -> Result<Arc<CudaContext>> {
            let count = CudaContext::device_count().map_err(|e| Error::NoDevice {
                reason: format!("the CUDA driver reports no device: {e}"),
            })?;
            let count = usize::try_from(count).unwrap_or(0);
            if ordinal >= count {
                return Err(Error::NoDevice {
                    reason: format!("device ordinal {ordinal} requested, {count} visible"),
                });
            }
            CudaContext::new(ordinal).map_err(cuda_err("device"))
        })
        .map_err(|_| Error::NoDevice {
            reason: "the CUDA driver could not be initialised".into(),
        })??;
        // A stream of its own, never the legacy NULL stream (which serialises with every
        // other stream of the process and cannot be captured into a CUDA graph).
        let stream = ctx.new_stream().map_err(cuda_err("device"))?;
        Self::with_stream(ctx, stream)
    }

    /// Wraps the caller's stream: every op on the returned handle is queued on `stream`,
    /// and buffers allocated through any cudarc handle on the same CUDA context (candle's,
    /// the trainer's own) are accepted.
    ///
    /// # Errors
    /// [`Error::Cuda`] when the device cannot be queried.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        Self::with_stream(ctx, stream)
    }

    fn with_stream(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let name = ctx.name().map_err(cuda_err("device"))?;
        let capability = ctx.compute_capability().map_err(cuda_err("device"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda_err("device"))?;
        let opt_in = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(cuda_err("device"))?;
        Ok(Device {
            ctx,
            stream,
            modules: Mutex::new(vec![None; Family::ALL.len()]),
            functions: Mutex::new(vec![None; KernelId::ALL.len()]),
            kernel_info: Mutex::new(vec![(None, 0); KernelId::ALL.len()]),
            smem_opt_in_limit: usize::try_from(opt_in).unwrap_or(0),
            name,
            capability,
            sm_count: usize::try_from(sm_count).unwrap_or(0),
        })
    }

    /// The stream all ops on this handle are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The most shared memory one block may opt into, in bytes (the kernel-choice input of
    /// plans such as [`crate::mla::plan_mla_decode`]).
    pub fn smem_per_block(&self) -> usize {
        self.smem_opt_in_limit
    }

    /// Whether the loaded kernels include the thread-block-cluster variants (sm_90a code on
    /// an H100 / H200 class device: a build whose `LONGCTX_CUDA_ARCHS` has `90a`), the
    /// `clusters` input of plans such as [`crate::mla::plan_mla_decode`]. False where the
    /// driver runs the portable code (older parts, or JIT-compiled compute_80 PTX), and when
    /// the kernels cannot be loaded.
    pub fn cluster_kernels(&self) -> bool {
        self.capability >= (9, 0)
            && self
                .ptx_arch(KernelId::MlaDecodeC2Bf16)
                .is_ok_and(|arch| arch >= 90)
    }

    /// Waits for all work queued on this handle's stream.
    ///
    /// # Errors
    /// [`Error::Cuda`] if a queued kernel failed.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    /// Copies a host slice to a new device buffer.
    ///
    /// # Errors
    /// [`Error::Cuda`] on allocation or copy failure.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(cuda_err("upload"))
    }

    /// Copies a device buffer back to the host (waits for the stream).
    ///
    /// # Errors
    /// [`Error::Cuda`] on copy failure or if a queued kernel failed.
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(cuda_err("download"))
    }

    /// A zero-filled device buffer of `len` elements.
    ///
    /// # Errors
    /// [`Error::Cuda`] on allocation failure.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(cuda_err("alloc"))
    }

    /// Whether `slice` was allocated in this handle's context.
    /// Whether `slice` lives on this handle's CUDA context. The context itself is compared,
    /// not the `Arc`: every cudarc handle on one device's primary context wraps the same
    /// `CUcontext`.
    pub(crate) fn owns<T>(&self, slice: &CudaSlice<T>) -> bool {
        slice.context().cu_ctx() == self.ctx.cu_ctx()
    }

    /// [`Device::owns`] for any cudarc buffer or view.
    pub(crate) fn owns_any<T, S: cudarc::driver::DeviceSlice<T> + ?Sized>(&self, s: &S) -> bool {
        s.stream().context().cu_ctx() == self.ctx.cu_ctx()
    }

    /// The loaded function for `id`, loading its family's fatbin on first use.
    pub(crate) fn function(&self, id: KernelId) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().map_err(|_| Error::Cuda {
            op: "load kernel",
            message: "kernel cache lock poisoned".into(),
            source: None,
        })?;
        if let Some(f) = &functions[id.index()] {
            return Ok(f.clone());
        }
        let module = self.module(id.family())?;
        let f = module
            .load_function(id.symbol())
            .map_err(cuda_err("load kernel"))?;
        functions[id.index()] = Some(f.clone());
        Ok(f)
    }

    fn kernel_info(&self) -> Result<std::sync::MutexGuard<'_, Vec<KernelInfo>>> {
        self.kernel_info.lock().map_err(|_| Error::Cuda {
            op: "load kernel",
            message: "kernel info lock poisoned".into(),
            source: None,
        })
    }

    /// The PTX arch (compute capability x 10) the driver's loaded code for `id` was compiled
    /// for: 90 for an sm_90a cubin, 80 for sm_80/86/89 cubins and JIT-compiled compute_80
    /// PTX. Asked of the driver once per kernel.
    pub(crate) fn ptx_arch(&self, id: KernelId) -> Result<u32> {
        if let Some(arch) = self.kernel_info()?[id.index()].0 {
            return Ok(arch);
        }
        let ptx = self
            .function(id)?
            .ptx_version()
            .map_err(cuda_err("load kernel"))?;
        let arch = u32::try_from(ptx).unwrap_or(0);
        self.kernel_info()?[id.index()].0 = Some(arch);
        Ok(arch)
    }

    /// Lets `id` launch with `bytes` of dynamic shared memory: above the default 48 KB the
    /// kernel is opted in (once per kernel and size, not per launch).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `op` and the argument `arg` that sized the shared
    /// memory when the device allows less per block; [`Error::Cuda`] if the driver refuses.
    pub(crate) fn allow_dynamic_smem(
        &self,
        id: KernelId,
        bytes: usize,
        op: &'static str,
        arg: &'static str,
    ) -> Result<()> {
        const DEFAULT: usize = 48 * 1024;
        if bytes <= DEFAULT || bytes <= self.kernel_info()?[id.index()].1 {
            return Ok(());
        }
        if bytes > self.smem_opt_in_limit {
            return Err(Error::unsupported(
                op,
                arg,
                format!(
                    "{} needs {bytes} bytes of shared memory per block; this device allows {}",
                    id.symbol(),
                    self.smem_opt_in_limit
                ),
            ));
        }
        let value = i32::try_from(bytes)
            .map_err(|_| Error::overflow(op, arg, format!("{bytes} bytes of shared memory")))?;
        self.function(id)?
            .set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                value,
            )
            .map_err(cuda_err(op))?;
        self.kernel_info()?[id.index()].1 = bytes;
        Ok(())
    }

    fn module(&self, family: Family) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().map_err(|_| Error::Cuda {
            op: "load module",
            message: "module cache lock poisoned".into(),
            source: None,
        })?;
        if let Some(m) = &modules[family.index()] {
            return Ok(m.clone());
        }
        let bytes = family.fatbin().ok_or(Error::KernelsNotCompiled)?;
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
            .map_err(cuda_err("load module"))?;
        modules[family.index()] = Some(m.clone());
        Ok(m)
    }
}

/// ptxas resource usage of one compiled kernel for one arch, parsed from the build's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// The kernel's symbol.
    pub symbol: String,
    /// The arch it was compiled for, e.g. "sm_90a".
    pub arch: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Stack frame bytes.
    pub stack_frame: u32,
    /// Whether the report had the entry's own "Function properties" block with its stack
    /// and spill figures; when false the figures above are not measurements.
    pub properties_found: bool,
}

/// Parses every `ptxas info` block of all embedded families. Empty without kernels.
pub fn kernel_resources() -> Vec<KernelResources> {
    let mut out = Vec::new();
    for family in Family::ALL {
        parse_ptxas(family.ptxas_report(), &mut out);
    }
    out
}

/// The embedded fatbin of each kernel family, as (family, bytes): "rope", "attention",
/// "moe". Empty without kernels. For inspection tools (cuobjdump), and for the test that
/// checks the attention kernels' SASS for tensor-core instructions.
pub fn embedded_fatbins() -> Vec<(&'static str, &'static [u8])> {
    Family::ALL
        .iter()
        .filter_map(|f| {
            let name = match f {
                Family::Rope => "rope",
                Family::Attention => "attention",
                Family::AttentionBwd => "attention_bwd",
                Family::Moe => "moe",
                Family::KvCache => "kv_cache",
            };
            f.fatbin().map(|b| (name, b))
        })
        .collect()
}

/// Symbols of kernels on the hot path (the build's spill check covers these).
pub fn hot_kernel_symbols() -> Vec<&'static str> {
    KernelId::ALL
        .iter()
        .filter(|k| k.is_hot())
        .map(|k| k.symbol())
        .collect()
}

fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let idx = line.find(suffix)?;
    line[..idx].split_whitespace().last()?.parse().ok()
}

/// Reads ptxas's `-v` report. Only the "Function properties for <entry>" block of each
/// entry counts toward it (device functions it calls have blocks of their own), and
/// `ptxas warning` lines are skipped: they can precede the entry they name.
fn parse_ptxas(report: &str, out: &mut Vec<KernelResources>) {
    let mut current: Option<KernelResources> = None;
    let mut in_own_block = false;
    for line in report.lines() {
        if line.contains("ptxas warning") {
            continue;
        }
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(done) = current.take() {
                out.push(done);
            }
            let symbol = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("")
                .to_string();
            current = Some(KernelResources {
                symbol,
                arch,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0,
                properties_found: false,
            });
            in_own_block = false;
        } else if let Some(cur) = current.as_mut() {
            if let Some(name) = line.split("Function properties for ").nth(1) {
                in_own_block = name.trim() == cur.symbol;
                continue;
            }
            if in_own_block {
                if let Some(v) = number_before(line, "bytes stack frame") {
                    cur.stack_frame = v;
                }
                if let Some(v) = number_before(line, "bytes spill stores") {
                    cur.spill_stores = v;
                }
                if let Some(v) = number_before(line, "bytes spill loads") {
                    cur.spill_loads = v;
                    cur.properties_found = true;
                }
            }
            if line.contains("Used ") {
                if let Some(v) = number_before(line, "registers") {
                    cur.registers = v;
                }
            }
        }
    }
    if let Some(done) = current.take() {
        out.push(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_without_its_properties_block_is_flagged() {
        let report = "\
ptxas info    : Compiling entry function 'a' for 'sm_80'
ptxas info    : Used 40 registers, used 1 barriers
ptxas info    : Compiling entry function 'b' for 'sm_80'
ptxas info    : Function properties for b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers
";
        let mut out = Vec::new();
        parse_ptxas(report, &mut out);
        assert_eq!(out.len(), 2);
        assert!(!out[0].properties_found);
        assert!(out[1].properties_found);
    }

    #[test]
    fn ptxas_report_is_attributed_to_the_right_entry() {
        let report = "\
ptxas info    : Compiling entry function 'a' for 'sm_80'
ptxas info    : Function properties for a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
ptxas warning : Registers are spilled to local memory in function 'b', 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function 'b' for 'sm_80'
ptxas info    : Function properties for helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for b
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
";
        let mut out = Vec::new();
        parse_ptxas(report, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (
                out[0].symbol.as_str(),
                out[0].registers,
                out[0].spill_stores
            ),
            ("a", 40, 0)
        );
        assert_eq!(
            (
                out[1].symbol.as_str(),
                out[1].registers,
                out[1].spill_stores,
                out[1].spill_loads,
                out[1].stack_frame
            ),
            ("b", 255, 16, 12, 24)
        );
    }
}
