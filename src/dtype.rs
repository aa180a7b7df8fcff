//! Storage types the kernels accept. All math is f32 on the GPU and f64 in the references.

use cudarc::driver::DeviceRepr;
use half::{bf16, f16};

/// Storage type of a tensor, as the kernels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Unit roundoff of the type (half an ulp at 1), used to scale test tolerances.
    pub fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f64::from(f32::EPSILON) / 2.0,
            DType::F16 => 2f64.powi(-11),
            DType::BF16 => 2f64.powi(-8),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type with GPU kernels: `f32`, `half::f16` or `half::bf16`.
pub trait Element:
    DeviceRepr + Copy + Default + Send + Sync + std::fmt::Debug + sealed::Sealed + 'static
{
    /// The kernels' name for this type.
    const DTYPE: DType;
    /// Widens to f64 exactly.
    fn to_f64(self) -> f64;
    /// Rounds from f64 to the nearest value of the type. Tests build their inputs with
    /// this and hand the rounded values to both the GPU and the reference, so both sides see
    /// identical inputs.
    fn from_f64(x: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}
