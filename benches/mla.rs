//! Absorbed MLA decode over a paged latent cache, timed with CUDA events: DeepSeek-V3's
//! dimensions (latent 512 + rope 64; 128 heads, and 16 for a TP-8 shard), one query token
//! per sequence, batch 1 to 128, contexts 1k to 64k, bf16 and fp8 latent caches.
//! Throughput is bytes (criterion's "bytes": every cached row read once, Q read, O written);
//! the sweep reports the same runs against the measured copy bandwidth and in TFLOP/s.
//! Without a GPU it benches the f64 absorbed reference at a small size instead and says so.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use longctx::device::Device;
use longctx::mla::reference::absorbed_f64;
use longctx::mla::MlaConfig;
use longctx::workloads::MlaRun;

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    for heads in [128usize, 16] {
        for fp8 in [false, true] {
            for batch in [1usize, 8, 32, 128] {
                let name = format!(
                    "mla_decode/h{heads}/{}/batch{batch}",
                    if fp8 { "fp8" } else { "bf16" }
                );
                let mut group = c.benchmark_group(name);
                group
                    .sample_size(10)
                    .warm_up_time(Duration::from_millis(200))
                    .measurement_time(Duration::from_secs(1));
                for ctx in [1024usize, 4096, 16384, 65536] {
                    if batch * ctx > 128 * 16384 {
                        continue;
                    }
                    let mut run =
                        MlaRun::new(dev, heads, batch, ctx, fp8, 3).expect("allocate MLA buffers");
                    group.throughput(Throughput::Bytes(run.bytes() as u64));
                    group.bench_function(BenchmarkId::from_parameter(ctx), |b| {
                        b.iter_custom(|iters| {
                            longctx::timing::time_batch(dev, iters, || run.run(dev))
                                .expect("mla decode launch")
                        })
                    });
                }
                group.finish();
            }
        }
    }
}

fn cpu_benches(c: &mut Criterion) {
    eprintln!("mla bench: no GPU available; benchmarking the f64 absorbed reference at a small size instead");
    let mut cfg = MlaConfig::deepseek_v3();
    cfg.heads = 16;
    let tk = 256usize;
    let q: Vec<f64> = (0..cfg.heads * 576)
        .map(|i| (i as f64 * 0.37).sin())
        .collect();
    let c_kv: Vec<f64> = (0..tk * 512).map(|i| (i as f64 * 0.11).cos()).collect();
    let k_pe: Vec<f64> = (0..tk * 64).map(|i| (i as f64 * 0.07).sin()).collect();
    let mut group = c.benchmark_group("mla-cpu-reference");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((tk * 576 * 8) as u64));
    group.bench_function(BenchmarkId::from_parameter(tk), |b| {
        b.iter(|| absorbed_f64(&cfg, &q, &c_kv, &k_pe, 1, tk).expect("reference"))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    match longctx::timing::bench_device() {
        Ok(dev) => gpu_benches(c, &dev),
        Err(why) => {
            eprintln!("mla bench: {why}");
            cpu_benches(c)
        }
    }
}

criterion_group!(mla, benches);
criterion_main!(mla);
