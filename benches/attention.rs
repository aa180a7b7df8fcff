//! Attention forward throughput across sequence lengths, timed with CUDA events.
//!
//! FlashAttention's benchmark shape: 16k tokens per batch (batch = 16384 / seqlen), seqlen
//! 512 to 64k; MHA with head dims 64 (32 heads) and 128 (16 heads) and Llama-3-8B's GQA
//! (32 query heads, 8 KV heads, d 128); bf16; causal and not. Throughput is FLOP/s counted as
//! `2 * heads_q * sum over rows of visible keys * (d + d_v)` (criterion's "elements" are
//! FLOPs). Without a GPU it benches the CPU tiled reference at a small size instead and
//! says so.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use longctx::attention::reference::{attention_tiled_f32, Problem, Tiles};
use longctx::attention::{AttentionOptions, Mask, TileConfig};
use longctx::device::Device;
use longctx::workloads::{attention_backward_shapes, attention_shapes, AttnBwdRun, AttnRun};

const SEQLENS: &[usize] = &[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    for shape in attention_shapes() {
        for causal in [false, true] {
            let mask = if causal { Mask::causal() } else { Mask::none() };
            let name = format!(
                "attention/{}/{}",
                shape.name,
                if causal { "causal" } else { "full" }
            );
            let mut group = c.benchmark_group(name);
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(2));
            for &n in SEQLENS {
                let opts = AttentionOptions {
                    mask,
                    ..AttentionOptions::default()
                };
                let mut run = AttnRun::new(dev, shape, (16384 / n).max(1), n, opts, 42)
                    .expect("allocate attention buffers");
                group.throughput(Throughput::Elements(run.flops() as u64));
                group.bench_function(BenchmarkId::from_parameter(n), |b| {
                    b.iter_custom(|iters| {
                        longctx::timing::time_batch(dev, iters, || run.run(dev))
                            .expect("attention launch")
                    })
                });
            }
            group.finish();
        }
    }
}

/// Backward at the sweep's shapes, causal and not, 1k to 32k tokens,
/// both dQ modes; throughput in FLOPs (2.5 x the forward's).
fn gpu_backward_benches(c: &mut Criterion, dev: &Device) {
    for shape in attention_backward_shapes() {
        for causal in [false, true] {
            for det in [false, true] {
                let name = format!(
                    "attention_backward/{}/{}/{}",
                    shape.name,
                    if causal { "causal" } else { "full" },
                    if det { "deterministic" } else { "atomic" }
                );
                let mut group = c.benchmark_group(name);
                group
                    .sample_size(10)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_secs(2));
                for &n in &SEQLENS[1..SEQLENS.len() - 1] {
                    let opts = AttentionOptions {
                        mask: if causal { Mask::causal() } else { Mask::none() },
                        ..AttentionOptions::default()
                    };
                    let mut run = AttnBwdRun::new(dev, shape, (16384 / n).max(1), n, opts, 42)
                        .expect("allocate attention backward buffers");
                    group.throughput(Throughput::Elements(run.flops() as u64));
                    group.bench_function(BenchmarkId::from_parameter(n), |b| {
                        b.iter_custom(|iters| {
                            longctx::timing::time_batch(dev, iters, || run.run(dev, det))
                                .expect("attention backward launch")
                        })
                    });
                }
                group.finish();
            }
        }
    }
}

fn cpu_benches(c: &mut Criterion) {
    eprintln!("attention bench: no GPU available; benchmarking the CPU tiled reference at a small size instead");
    let (n, h, d) = (256usize, 2usize, 64usize);
    let x: Vec<f64> = (0..n * h * d).map(|i| (i as f64 * 0.37).sin()).collect();
    let cu = [0usize, n];
    let tiles = Tiles::from(&TileConfig::for_head_dims(d, d).expect("supported"));
    let mut group = c.benchmark_group("attention-cpu-tiled-reference");
    group.sample_size(10);
    for causal in [false, true] {
        let mask = if causal { Mask::causal() } else { Mask::none() };
        let p = Problem {
            q: &x,
            k: &x,
            v: &x,
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
            heads_q: h,
            heads_kv: h,
            head_dim: d,
            head_dim_v: d,
            scale: 0.125,
            softcap: None,
            mask,
        };
        let flops = longctx::attention::forward_flops(&mask, &[(n, n)], h, d, d);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(
            BenchmarkId::new(if causal { "causal" } else { "full" }, n),
            |b| b.iter(|| attention_tiled_f32(&p, tiles, |v| v).expect("reference")),
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    match longctx::timing::bench_device() {
        Ok(dev) => {
            gpu_benches(c, &dev);
            gpu_backward_benches(c, &dev);
        }
        Err(why) => {
            eprintln!("attention bench: {why}");
            cpu_benches(c)
        }
    }
}

criterion_group!(attention, benches);
criterion_main!(attention);
