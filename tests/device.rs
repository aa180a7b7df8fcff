//! Running where the trainer runs: ops on the caller's stream, buffers from other cudarc
//! handles on the same context. GPU only (ignored without one).

mod common;

use std::sync::Arc;

use longctx::cudarc::driver::CudaContext;
use longctx::device::Device;
use longctx::layout::HeadsLayout;
use longctx::rope::reference::apply_rope_f64;
use longctx::rope::{
    apply_rope, Direction, Positions, RopeConfig, RopeOptions, RopeStyle, RopeTable,
};

/// RoPE on `dev` with Q uploaded through `upload_stream`'s context; checks the result
/// against the f64 reference.
fn rope_roundtrip(dev: &Device, other: &Arc<longctx::cudarc::driver::CudaStream>) {
    let config = RopeConfig::builder(64)
        .base(10000.0)
        .build()
        .expect("config");
    let (tokens, heads, d) = (5usize, 3usize, 64usize);
    let l = HeadsLayout::contiguous(tokens, heads, d);
    let mut rng = common::Rng(3);
    let x: Vec<f32> = (0..tokens * heads * d)
        .map(|_| rng.uniform() as f32)
        .collect();
    let pos: Vec<i32> = (0..tokens as i32).map(|t| 7 * t).collect();
    let table = RopeTable::new(dev, &config, 4096).expect("table");
    let positions = Positions::upload(dev, &pos).expect("positions");
    let mut q = other
        .clone_htod(&x)
        .expect("upload through the other handle");
    let mut k = dev.zeros::<f32>(1).expect("k");
    let kl = HeadsLayout { heads: 0, ..l };
    apply_rope(
        dev,
        &table,
        &positions,
        &mut q,
        &l,
        &mut k,
        &kl,
        RopeOptions::default(),
    )
    .expect("a buffer of the same context is accepted");
    dev.synchronize().expect("sync");
    let got = other.clone_dtoh(&q).expect("download");
    let mut want: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    apply_rope_f64(
        &mut want,
        &l,
        &pos,
        &config.inv_freq_f64(4096),
        config.attention_factor_f64(),
        RopeStyle::Neox,
        Direction::Forward,
    )
    .expect("reference");
    for (g, w) in got.iter().zip(&want) {
        assert!((f64::from(*g) - w).abs() <= 1e-5, "{g} vs {w}");
    }
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_from_stream_runs_on_the_callers_stream() {
    if common::gpu("gpu_from_stream_runs_on_the_callers_stream").is_none() {
        return;
    }
    let ctx = CudaContext::new(0).expect("context");
    let stream = ctx.new_stream().expect("stream");
    let dev = Device::from_stream(stream.clone()).expect("device");
    assert!(Arc::ptr_eq(dev.stream(), &stream));
    rope_roundtrip(&dev, &stream);
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_buffers_from_another_cudarc_handle_are_accepted() {
    let Some(dev) = common::gpu("gpu_buffers_from_another_cudarc_handle_are_accepted") else {
        return;
    };
    // A second handle on the same device: another Arc, the same primary context.
    let other = CudaContext::new(0).expect("context");
    assert!(!Arc::ptr_eq(&other, dev.context()));
    let stream = other.new_stream().expect("stream");
    rope_roundtrip(&dev, &stream);
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_device_uses_its_own_stream_not_the_null_stream() {
    let Some(dev) = common::gpu("gpu_device_uses_its_own_stream_not_the_null_stream") else {
        return;
    };
    assert!(!dev.stream().cu_stream().is_null());
}
