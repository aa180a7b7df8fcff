//! A kernel launch described without a backend: which entry point, its params struct, the
//! grid, block and dynamic shared memory. Each op builds one with a single pure function
//! from validated arguments and buffer addresses; the CUDA path queues it on a stream, the
//! emulator runs it on the CPU, so neither can disagree with the other about shapes.

use crate::kernel_id::KernelId;

/// One launch, ready for either backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelLaunch<P> {
    pub id: KernelId,
    pub params: P,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem_bytes: u32,
}

impl<P> KernelLaunch<P> {
    /// cudarc's view of the geometry.
    pub(crate) fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: self.grid,
            block_dim: self.block,
            shared_mem_bytes: self.smem_bytes,
        }
    }
}
