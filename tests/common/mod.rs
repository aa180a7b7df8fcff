//! Shared by the integration tests: the GPU handle, or a visible skip.
#![allow(dead_code)]

use longctx::device::Device;

/// The first GPU, or `None` after printing why GPU checks are skipped. With
/// `LONGCTX_REQUIRE_GPU=1` a missing GPU (or missing kernels) fails the test instead.
pub fn gpu(test: &str) -> Option<Device> {
    let required = std::env::var("LONGCTX_REQUIRE_GPU").as_deref() == Ok("1");
    let why = if !longctx::device::kernels_compiled() {
        "the crate was built without CUDA kernels (no nvcc at build time)".to_string()
    } else {
        match Device::new(0) {
            Ok(d) => return Some(d),
            Err(e) => e.to_string(),
        }
    };
    if required {
        panic!("{test}: LONGCTX_REQUIRE_GPU=1 but {why}");
    }
    skipped(test, &why);
    None
}

/// A small deterministic generator (SplitMix64) for test data, so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Prints a skip notice past libtest's output capture, so it shows in a plain `cargo test`.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A slice of `len` elements starting on a 16-byte boundary (kernels read caches and Q in
/// 16-byte chunks; a host Vec need not start on one).
pub struct Aligned<S> {
    buf: Vec<S>,
    off: usize,
    len: usize,
}

impl<S: Copy + Default> Aligned<S> {
    pub fn new(values: &[S]) -> Self {
        let size = std::mem::size_of::<S>();
        let mut buf = vec![S::default(); values.len() + 16];
        let off = (16 - buf.as_ptr() as usize % 16) % 16 / size;
        buf[off..off + values.len()].copy_from_slice(values);
        Aligned {
            buf,
            off,
            len: values.len(),
        }
    }
    pub fn as_slice(&self) -> &[S] {
        &self.buf[self.off..self.off + self.len]
    }
}
