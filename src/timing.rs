//! GPU timing with CUDA events, shared by the benches and the sweep example.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;

use crate::device::{cuda_err, Device};
use crate::error::Result;

/// Times of repeated runs of one GPU operation, in milliseconds.
#[derive(Debug, Clone)]
pub struct GpuTimes {
    /// Each timed run, sorted ascending.
    pub ms: Vec<f64>,
}

impl GpuTimes {
    /// Median run time in milliseconds.
    pub fn median_ms(&self) -> f64 {
        match self.ms.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => self.ms[n / 2],
            n => 0.5 * (self.ms[n / 2 - 1] + self.ms[n / 2]),
        }
    }

    /// Fastest run in milliseconds.
    pub fn min_ms(&self) -> f64 {
        self.ms.first().copied().unwrap_or(f64::NAN)
    }
}

/// Runs `op` `warmup` times, then `iters` times between CUDA events (one event pair per run),
/// and returns each run's time.
///
/// # Errors
/// The first error `op` returns, or [`crate::Error::Cuda`] from the events.
pub fn time_gpu(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<GpuTimes> {
    for _ in 0..warmup {
        op()?;
    }
    let ctx = dev.context();
    let mut pairs = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("timing"))?;
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("timing"))?;
        start.record(dev.stream()).map_err(cuda_err("timing"))?;
        op()?;
        end.record(dev.stream()).map_err(cuda_err("timing"))?;
        pairs.push((start, end));
    }
    let mut ms = Vec::with_capacity(iters);
    for (s, e) in &pairs {
        ms.push(f64::from(s.elapsed_ms(e).map_err(cuda_err("timing"))?));
    }
    ms.sort_by(f64::total_cmp);
    Ok(GpuTimes { ms })
}

/// Measures device-to-device copy bandwidth in bytes/s (bytes read plus bytes written) with
/// a copy of `bytes` bytes, median of `iters` runs: the ceiling for memory-bound kernels.
///
/// # Errors
/// [`crate::Error::Cuda`] on allocation, copy or timing failure.
pub fn copy_bandwidth(dev: &Device, bytes: usize, iters: usize) -> Result<f64> {
    let n = bytes / 4;
    let src: CudaSlice<u32> = dev.upload(&(0..n as u32).collect::<Vec<_>>())?;
    let mut dst: CudaSlice<u32> = dev.zeros(n)?;
    let t = time_gpu(dev, 3, iters, || {
        dev.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(cuda_err("copy"))
    })?;
    Ok(2.0 * (n * 4) as f64 / (t.median_ms() * 1e-3))
}

/// Runs `op` `iters` times back to back between one pair of CUDA events and returns the
/// elapsed GPU time: the measurement criterion's `iter_custom` wants.
///
/// # Errors
/// The first error `op` returns, or [`crate::Error::Cuda`] from the events.
pub fn time_batch(
    dev: &Device,
    iters: u64,
    mut op: impl FnMut() -> Result<()>,
) -> Result<std::time::Duration> {
    let t = time_gpu(dev, 0, 1, || {
        for _ in 0..iters {
            op()?;
        }
        Ok(())
    })?;
    Ok(std::time::Duration::from_secs_f64(t.median_ms() * 1e-3))
}

/// The device benches and the sweep time on: GPU 0 when it exists and kernels were
/// compiled, else the reason they fall back to the CPU reference.
///
/// # Errors
/// A sentence saying why no GPU run is possible.
pub fn bench_device() -> std::result::Result<Device, String> {
    if !crate::device::kernels_compiled() {
        return Err("the crate was built without CUDA kernels".to_string());
    }
    Device::new(0).map_err(|e| e.to_string())
}
