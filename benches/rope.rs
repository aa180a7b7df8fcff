//! RoPE throughput across sequence lengths, timed with CUDA events.
//!
//! Shapes: Llama-3.1-8B (32 Q and 8 K heads, d 128) and DeepSeek-V3's rope part (128 q_pe
//! heads and one shared k_pe, 64 channels); bf16, in place, forward and backward. Throughput
//! counts every rotated element read once and written once. Without a GPU it benches the
//! CPU reference at small sizes instead and says so.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use longctx::device::Device;
use longctx::layout::HeadsLayout;
use longctx::rope::reference::apply_rope_f64;
use longctx::rope::{Direction, RopeOptions};
use longctx::workloads::{rope_shapes, RopeRun};

const TOKENS: &[usize] = &[1024, 4096, 16384, 65536, 131072];

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    let shapes = rope_shapes().expect("built-in shapes are valid");
    for shape in &shapes {
        let mut group = c.benchmark_group(format!("rope/{}", shape.name));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
        for &tokens in TOKENS {
            let mut run = RopeRun::new(dev, shape, tokens, 42).expect("allocate rope buffers");
            group.throughput(Throughput::Bytes(run.bytes() as u64));
            for dir in [Direction::Forward, Direction::Backward] {
                let opts = RopeOptions {
                    style: shape.style,
                    direction: dir,
                    ..RopeOptions::default()
                };
                let id = BenchmarkId::new(format!("{dir:?}").to_lowercase(), tokens);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        longctx::timing::time_batch(dev, iters, || run.run(dev, opts))
                            .expect("rope launch")
                    })
                });
            }
        }
        group.finish();
    }
}

fn cpu_benches(c: &mut Criterion) {
    eprintln!(
        "rope bench: no GPU available; benchmarking the CPU reference at small sizes instead"
    );
    let shapes = rope_shapes().expect("built-in shapes are valid");
    let mut group = c.benchmark_group("rope-cpu-reference");
    group.sample_size(10);
    for shape in &shapes {
        for &tokens in &[16usize, 64] {
            let d = shape.config.head_dim();
            let l = HeadsLayout::contiguous(tokens, shape.heads_q, d);
            let x: Vec<f64> = (0..l.numel().unwrap_or(0))
                .map(|i| (i as f64 * 0.37).sin())
                .collect();
            let pos: Vec<i32> = (0..tokens as i32).collect();
            let inv = shape.config.inv_freq_f64(tokens);
            let f = shape.config.attention_factor_f64();
            group.throughput(Throughput::Elements((tokens * shape.heads_q) as u64));
            group.bench_function(BenchmarkId::new(shape.name, tokens), |b| {
                b.iter(|| {
                    let mut y = x.clone();
                    apply_rope_f64(&mut y, &l, &pos, &inv, f, shape.style, Direction::Forward)
                        .expect("reference");
                    y
                })
            });
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    match longctx::timing::bench_device() {
        Ok(dev) => gpu_benches(c, &dev),
        Err(why) => {
            eprintln!("rope bench: {why}");
            cpu_benches(c)
        }
    }
}

criterion_group!(rope, benches);
criterion_main!(rope);
