//! MoE routing throughput across token counts, timed with CUDA events.
//!
//! Shapes: Mixtral-8x7B (8 experts, top-2, hidden 4096), Qwen3-MoE (128 experts, top-8,
//! hidden 4096) and DeepSeek-V3 (256 experts in 8 groups, 4 kept, top-8, hidden 7168, with
//! the correction bias). Ops: fused gating (f32 logits), permutation (counts, scan, scatter;
//! segments padded to 128), gather and combine of bf16 hidden states, router backward.
//! Throughput counts each op's minimal bytes (see `MoeRun::*_bytes`). Without a GPU it
//! benches the CPU reference at small sizes instead and says so.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use longctx::device::Device;
use longctx::moe::reference::{permute_f64, route_f64};
use longctx::moe::PermuteOptions;
use longctx::workloads::{moe_shapes, MoeRun};

const TOKENS: &[usize] = &[1024, 4096, 16384, 65536, 131072];

type Op = fn(&mut MoeRun, &Device) -> longctx::Result<()>;

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    for shape in moe_shapes() {
        let mut group = c.benchmark_group(format!("moe/{}", shape.name));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for &tokens in TOKENS {
            let mut run = MoeRun::new(dev, &shape, tokens, 42).expect("allocate moe buffers");
            run.check(dev, 1).expect("first pass");
            let ops: [(&str, Op, usize); 5] = [
                ("gate", MoeRun::gate, run.gate_bytes()),
                ("permute", MoeRun::permute, run.permute_bytes()),
                ("gather", MoeRun::gather, run.gather_bytes()),
                ("combine", MoeRun::combine, run.combine_bytes()),
                ("backward", MoeRun::backward, run.backward_bytes()),
            ];
            for (name, op, bytes) in ops {
                group.throughput(Throughput::Bytes(bytes as u64));
                group.bench_function(BenchmarkId::new(name, tokens), |b| {
                    b.iter_custom(|iters| {
                        longctx::timing::time_batch(dev, iters, || op(&mut run, dev))
                            .expect("moe launch")
                    })
                });
            }
        }
        group.finish();
    }
}

fn cpu_benches(c: &mut Criterion) {
    eprintln!("moe bench: no GPU available; benchmarking the CPU reference at small sizes instead");
    let mut group = c.benchmark_group("moe-cpu-reference");
    group.sample_size(10);
    for shape in moe_shapes() {
        let r = shape.router;
        let tokens = 64;
        let z: Vec<f64> = (0..tokens * r.experts)
            .map(|i| ((i * 7919) % 1000) as f64 / 250.0 - 2.0)
            .collect();
        group.throughput(criterion::Throughput::Elements(tokens as u64));
        group.bench_function(
            BenchmarkId::new(format!("{}/route", shape.name), tokens),
            |b| b.iter(|| route_f64(&r, &z, tokens, None).expect("reference")),
        );
        let ids = route_f64(&r, &z, tokens, None).expect("reference").ids;
        let opts = PermuteOptions {
            block: shape.block,
            capacity_factor: None,
        };
        group.bench_function(
            BenchmarkId::new(format!("{}/permute", shape.name), tokens),
            |b| b.iter(|| permute_f64(&ids, tokens, r.top_k, r.experts, opts).expect("reference")),
        );
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    match longctx::timing::bench_device() {
        Ok(dev) => gpu_benches(c, &dev),
        Err(why) => {
            eprintln!("moe bench: {why}");
            cpu_benches(c)
        }
    }
}

criterion_group!(moe, benches);
criterion_main!(moe);
