//! Error kinds: a representative bad input of each kind is classified as such, and a
//! driver error stays reachable through `std::error::Error::source`.

mod common;

use std::error::Error as _;

use longctx::cudarc::driver::sys::CUresult;
use longctx::cudarc::driver::DriverError;
use longctx::device::Device;
use longctx::emulator::{self, selftest, HostPermutation};
use longctx::moe::{PermuteOptions, PermutePlan, RouterConfig, MAX_EXPERTS};
use longctx::rope::RopeConfig;
use longctx::{Error, ErrorKind};

fn kind<T: std::fmt::Debug>(r: Result<T, Error>) -> ErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.kind(),
    }
}

#[test]
fn shape_and_value_errors_are_invalid_argument() {
    let opts = PermuteOptions::default();
    assert_eq!(
        kind(PermutePlan::new(4, 0, 8, opts)),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(RouterConfig::mixtral(0, 1).validate()),
        ErrorKind::InvalidArgument
    );
    // A destination buffer too short for the permutation's rows.
    let mut perm = HostPermutation::new(2, 1, 2, opts).unwrap();
    emulator::permute(&[0, 1], &mut perm).unwrap();
    let x = vec![0f32; 2 * 8];
    let mut out = vec![0f32; 3];
    let e = emulator::gather(&perm, &x, 8, None, &mut out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        matches!(e, Error::InvalidArgument { arg: "out", .. }),
        "{e:?}"
    );
}

#[test]
fn sizes_the_kernels_do_not_implement_are_unsupported() {
    assert_eq!(
        kind(RouterConfig::mixtral(MAX_EXPERTS + 1, 2).validate()),
        ErrorKind::Unsupported
    );
    assert_eq!(
        kind(PermutePlan::new(
            4,
            1,
            MAX_EXPERTS + 1,
            PermuteOptions::default()
        )),
        ErrorKind::Unsupported
    );
    // A consistent config whose rotary dim (1024) is past the kernel's limit (512).
    let cfg = RopeConfig::from_hf_config(
        r#"{"hidden_size": 8192, "num_attention_heads": 8, "rope_theta": 10000.0}"#,
    )
    .unwrap();
    assert_eq!(cfg.rotary_dim(), 1024);
    let mut q = vec![0f32; 1024];
    let mut k = vec![0f32; 0];
    let r = emulator::apply_rope(
        &cfg,
        1,
        &[0],
        &mut q,
        &longctx::layout::HeadsLayout::contiguous(1, 1, 1024),
        &mut k,
        &longctx::layout::HeadsLayout::contiguous(1, 0, 1024),
        longctx::rope::RopeOptions::default(),
    );
    assert_eq!(kind(r), ErrorKind::Unsupported);
}

#[test]
fn sizes_past_usize_or_the_kernels_indexing_are_overflow() {
    let opts = PermuteOptions::default();
    assert_eq!(
        kind(PermutePlan::new(usize::MAX, 2, 8, opts)),
        ErrorKind::Overflow
    );
    // Fits usize, not the kernels' i32 assignment index.
    assert_eq!(
        kind(PermutePlan::new(1 << 31, 1, 8, opts)),
        ErrorKind::Overflow
    );
}

#[test]
fn config_errors_are_config() {
    assert_eq!(kind(RopeConfig::from_hf_config("{}")), ErrorKind::Config);
    assert_eq!(kind(RouterConfig::from_hf_config("{}")), ErrorKind::Config);
}

#[test]
fn a_missing_device_is_no_device() {
    // Without a driver, or with one and no such ordinal: NoDevice either way.
    assert_eq!(kind(Device::new(usize::MAX)), ErrorKind::NoDevice);
    assert_eq!(
        Error::KernelsNotCompiled.kind(),
        ErrorKind::KernelsNotCompiled
    );
}

#[test]
fn driver_errors_keep_the_driver_error_as_source() {
    let oom = Error::Cuda {
        op: "alloc",
        message: "out of memory".into(),
        source: Some(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)),
    };
    assert_eq!(oom.kind(), ErrorKind::OutOfMemory);
    let src = oom.source().expect("the driver error is the source");
    assert_eq!(
        src.downcast_ref::<DriverError>(),
        Some(&DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY))
    );
    let other = Error::Cuda {
        op: "launch",
        message: "invalid value".into(),
        source: Some(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)),
    };
    assert_eq!(other.kind(), ErrorKind::Driver);
    assert!(other.source().is_some());
    let poisoned = Error::Cuda {
        op: "load kernel",
        message: "kernel cache lock poisoned".into(),
        source: None,
    };
    assert_eq!(poisoned.kind(), ErrorKind::Driver);
    assert!(poisoned.source().is_none());
    // Messages are unchanged by the source.
    assert_eq!(oom.to_string(), "alloc: CUDA error: out of memory");
    // Argument errors have no source.
    assert!(PermutePlan::new(4, 0, 8, PermuteOptions::default())
        .unwrap_err()
        .source()
        .is_none());
}

#[test]
fn a_kernel_fault_is_emulator() {
    let input: Vec<u32> = (0..256u32).collect();
    let mut out = vec![0u32; 256];
    let r = selftest::program(selftest::Program::Trap, &input, &mut out);
    assert_eq!(kind(r), ErrorKind::Emulator);
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_out_of_memory_and_misaligned_raw_pointers() {
    let Some(dev) = common::gpu("gpu_out_of_memory_and_misaligned_raw_pointers") else {
        return;
    };
    // 4 PiB: no device has it.
    let e = dev.zeros::<u8>(1 << 52).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    assert!(e
        .source()
        .and_then(|s| s.downcast_ref::<DriverError>())
        .is_some());

    use longctx::cudarc::driver::DevicePtr;
    use longctx::layout::RawBuffer;
    use longctx::moe::{gather_raw, permute, ExpertIds, Permutation};
    let ids = ExpertIds::upload(&dev, &[0, 1], 2, 1, 2).unwrap();
    let mut perm = Permutation::new(&dev, 2, 1, 2, PermuteOptions::default()).unwrap();
    permute(&dev, &ids, &mut perm).unwrap();
    let x = dev.zeros::<f32>(2 * 8 + 1).unwrap();
    let out = dev.zeros::<f32>(perm.plan().max_slots * 8).unwrap();
    let (xp, _gx) = x.device_ptr(dev.stream());
    let (op, _go) = out.device_ptr(dev.stream());
    let raw = |ptr, len| RawBuffer { ptr, len };
    // SAFETY: both buffers are live allocations of this context, held until after the
    // synchronize below, of the lengths given (x from its second element: 2 x 8 left).
    let misaligned =
        unsafe { gather_raw::<f32>(&dev, &perm, raw(xp + 2, 16), 8, None, raw(op, out.len())) };
    assert_eq!(kind(misaligned), ErrorKind::Alignment);
    // SAFETY: as above, x from its second element, 4-byte aligned.
    unsafe { gather_raw::<f32>(&dev, &perm, raw(xp + 4, 16), 8, None, raw(op, out.len())) }
        .unwrap();
    dev.synchronize().unwrap();
}
