//! fp8 e4m3 storage (OCP E4M3FN: bias 7, 3 mantissa bits, largest finite 448, no
//! infinities, 0x7F / 0xFF NaN) and the cache element types. kernels/common/fp8.cuh has the
//! device twin of the conversions; tests check the two agree on every code and on ties.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use crate::dtype::{DType, Element};

/// One fp8 e4m3 value, as stored in an fp8 KV cache.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Fp8E4m3(pub u8);

// SAFETY: a plain byte with no padding and no invalid bit pattern; all-zero is +0.
unsafe impl DeviceRepr for Fp8E4m3 {}
// SAFETY: as above.
unsafe impl ValidAsZeroBits for Fp8E4m3 {}

impl Fp8E4m3 {
    /// The largest finite value; quantisation saturates to +-448.
    pub const MAX: f32 = 448.0;
    /// The smallest positive value, 2^-9.
    pub const MIN_POSITIVE_SUBNORMAL: f32 = 1.0 / 512.0;

    /// Rounds `x` to the nearest e4m3 value, ties to even, saturating at +-448 (the fp8
    /// cache's quantisation rule); NaN becomes the NaN code 0x7F.
    pub fn from_f32(x: f32) -> Self {
        Self::from_f64(f64::from(x))
    }

    /// As [`Fp8E4m3::from_f32`], from an f64 (exact: no double rounding through f32).
    pub fn from_f64(x: f64) -> Self {
        if x.is_nan() {
            return Fp8E4m3(0x7F);
        }
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = x.abs();
        if a >= 448.0 {
            return Fp8E4m3(sign | 0x7E);
        }
        if a < 2f64.powi(-6) {
            // Multiples of 2^-9; 8 units is the smallest normal, code 0x08.
            return Fp8E4m3(sign | round_half_even(a * 512.0) as u8);
        }
        // a in [2^e, 2^(e+1)) with e in -6..=8.
        let mut e = a.log2().floor() as i32;
        if 2f64.powi(e) > a {
            e -= 1;
        } else if 2f64.powi(e + 1) <= a {
            e += 1;
        }
        let m = round_half_even((a / 2f64.powi(e) - 1.0) * 8.0) as u32; // 0..=8
        let bits = (((e + 7) as u32) << 3) + m; // a carry of 8 moves into the exponent
        Fp8E4m3(sign | bits.min(0x7E) as u8)
    }

    /// The exact value (NaN for the NaN codes).
    pub fn to_f32(self) -> f32 {
        self.to_f64() as f32
    }

    /// The exact value as f64.
    pub fn to_f64(self) -> f64 {
        let b = self.0;
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((b >> 3) & 0xF);
        let m = f64::from(b & 7);
        if e == 15 && b & 7 == 7 {
            return f64::NAN;
        }
        sign * if e == 0 {
            m / 8.0 * 2f64.powi(-6)
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (r - x).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Storage type of a KV cache, as the kernels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheDType {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// fp8 e4m3 with f32 scales ([`crate::kv_cache::KvScales`]).
    Fp8E4m3,
}

impl CacheDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            CacheDType::F16 | CacheDType::BF16 => 2,
            CacheDType::Fp8E4m3 => 1,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for super::Fp8E4m3 {}
}

/// An element type a KV cache can be stored in: `half::f16`, `half::bf16` (the attention
/// dtype itself) or [`Fp8E4m3`] (with scales).
pub trait CacheElement:
    DeviceRepr + Copy + Default + Send + Sync + std::fmt::Debug + sealed::Sealed + 'static
{
    /// The kernels' name for this type.
    const CACHE_DTYPE: CacheDType;
    /// The exact value.
    fn to_f64(self) -> f64;
    /// Rounds to the nearest value (fp8: ties to even, saturating at +-448).
    fn from_f64(x: f64) -> Self;
}

impl CacheElement for f16 {
    const CACHE_DTYPE: CacheDType = CacheDType::F16;
    fn to_f64(self) -> f64 {
        Element::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        <f16 as Element>::from_f64(x)
    }
}

impl CacheElement for bf16 {
    const CACHE_DTYPE: CacheDType = CacheDType::BF16;
    fn to_f64(self) -> f64 {
        Element::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        <bf16 as Element>::from_f64(x)
    }
}

impl CacheElement for Fp8E4m3 {
    const CACHE_DTYPE: CacheDType = CacheDType::Fp8E4m3;
    fn to_f64(self) -> f64 {
        Fp8E4m3::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        Fp8E4m3::from_f64(x)
    }
}

/// Whether a cache of `S` can serve attention in `T`: the same type, or fp8.
pub(crate) fn cache_matches<T: Element, S: CacheElement>() -> bool {
    matches!(
        (T::DTYPE, S::CACHE_DTYPE),
        (DType::F16, CacheDType::F16)
            | (DType::BF16, CacheDType::BF16)
            | (DType::F16 | DType::BF16, CacheDType::Fp8E4m3)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for b in 0..=255u8 {
            let x = Fp8E4m3(b);
            if b & 0x7F == 0x7F {
                assert!(x.to_f64().is_nan());
                continue;
            }
            let back = Fp8E4m3::from_f64(x.to_f64());
            // -0 and +0 keep their sign.
            assert_eq!(back, x, "code {b:#04x} value {}", x.to_f64());
        }
        assert_eq!(Fp8E4m3(0x7E).to_f64(), 448.0);
        assert_eq!(Fp8E4m3(0x01).to_f64(), 2f64.powi(-9));
        assert_eq!(Fp8E4m3(0x08).to_f64(), 2f64.powi(-6));
    }

    #[test]
    fn rounds_to_nearest_even_and_saturates() {
        // Between 1 (0x38) and 1.125 (0x39): the tie goes to the even code 0x38.
        assert_eq!(Fp8E4m3::from_f64(1.0625), Fp8E4m3(0x38));
        assert_eq!(Fp8E4m3::from_f64(1.0625 + 1e-9), Fp8E4m3(0x39));
        // Between 1.125 (0x39) and 1.25 (0x3A): the tie goes to 0x3A.
        assert_eq!(Fp8E4m3::from_f64(1.1875), Fp8E4m3(0x3A));
        // Subnormal tie: 1.5 x 2^-9 -> 2 x 2^-9.
        assert_eq!(Fp8E4m3::from_f64(1.5 / 512.0), Fp8E4m3(0x02));
        assert_eq!(Fp8E4m3::from_f64(0.5 / 512.0), Fp8E4m3(0x00));
        // The largest subnormal rounds up into the smallest normal.
        assert_eq!(Fp8E4m3::from_f64(7.9 / 512.0), Fp8E4m3(0x08));
        // 1.875 x 2^7 = 240 rounds to 256 (carry into the exponent).
        assert_eq!(Fp8E4m3::from_f64(1.9375 * 128.0).to_f64(), 256.0);
        assert_eq!(Fp8E4m3::from_f64(1e9), Fp8E4m3(0x7E));
        assert_eq!(Fp8E4m3::from_f64(-460.0), Fp8E4m3(0xFE));
        assert_eq!(Fp8E4m3::from_f64(f64::INFINITY), Fp8E4m3(0x7E));
        assert_eq!(Fp8E4m3::from_f64(f64::NAN), Fp8E4m3(0x7F));
        assert_eq!(Fp8E4m3::from_f64(-0.0), Fp8E4m3(0x80));
    }

    #[test]
    fn relative_error_is_half_an_ulp() {
        let mut x = 2f64.powi(-6);
        while x < 448.0 {
            let q = Fp8E4m3::from_f64(x).to_f64();
            assert!(
                (q - x).abs() <= x * 2f64.powi(-4) * (1.0 + 1e-12),
                "{x} -> {q}"
            );
            x *= 1.013;
        }
    }
}
