//! Decode over a paged cache, timed with CUDA events: one new token per sequence,
//! Llama-3-8B's heads (32 query / 8 KV, d 128) and a head-dim-512 model with one KV head,
//! batch 1, 8 and 64, contexts 1k to 128k, bf16 and fp8 caches, pages of 16 and 64 tokens.
//! Throughput is bytes (criterion's "bytes": every cached K/V element and fp8 scale read
//! once, Q read, O and LSE written); the target is the device's copy bandwidth (the sweep
//! measures it in the same run). Groups `decode-rotating/...` time `decode_rotating` (keys
//! and queries rotated on load) beside `decode` on the same Llama-3-8B cache, batch 1 and
//! 16, contexts 32k and 128k. Without a GPU it benches the f64 reference at a small size
//! instead and says so.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use longctx::device::Device;
use longctx::kv_cache::reference::{decode_f64, DecodeMath};
use longctx::kv_cache::{PageTable, PagedKvLayout, StepTable};
use longctx::workloads::{decode_models, DecodeRun};

const CONTEXTS: &[usize] = &[1024, 4096, 32768, 131072];

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    for model in decode_models() {
        for fp8 in [false, true] {
            for page in [16usize, 64] {
                if model.head_dim == 512 && page == 64 {
                    continue;
                }
                for batch in [1usize, 8, 64] {
                    let name = format!(
                        "decode/{}/{}/page{page}/batch{batch}",
                        model.name,
                        if fp8 { "fp8" } else { "bf16" }
                    );
                    let mut group = c.benchmark_group(name);
                    group
                        .sample_size(10)
                        .warm_up_time(Duration::from_millis(200))
                        .measurement_time(Duration::from_secs(1));
                    for &ctx in CONTEXTS {
                        if batch * ctx > 64 * 32768 {
                            continue;
                        }
                        let mut run = DecodeRun::new(dev, model, batch, ctx, page, fp8, 7)
                            .expect("allocate decode buffers");
                        group.throughput(Throughput::Bytes(run.bytes() as u64));
                        group.bench_function(BenchmarkId::from_parameter(ctx), |b| {
                            b.iter_custom(|iters| {
                                longctx::timing::time_batch(dev, iters, || run.run(dev))
                                    .expect("decode launch")
                            })
                        });
                    }
                    group.finish();
                }
            }
        }
    }
    rotating_benches(c, dev);
}

/// `decode_rotating` beside `decode` on the same cache at Llama-3-8B's heads, bf16, pages
/// of 16, batch 1 and 16, contexts 32k and 128k: the target is rotating within 10%
/// of plain.
fn rotating_benches(c: &mut Criterion, dev: &Device) {
    let Some(model) = decode_models().into_iter().find(|m| m.name == "llama3-8b") else {
        return;
    };
    for batch in [1usize, 16] {
        let mut group = c.benchmark_group(format!(
            "decode-rotating/{}/bf16/page16/batch{batch}",
            model.name
        ));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_secs(1));
        for ctx in [32768usize, 131072] {
            let mut run = DecodeRun::new(dev, model, batch, ctx, 16, false, 7)
                .expect("allocate decode buffers");
            group.throughput(Throughput::Bytes(run.bytes() as u64));
            for rotating in [false, true] {
                run.set_rotating(dev, rotating).expect("rotation tables");
                let id = format!("{}/{ctx}", if rotating { "rotating" } else { "plain" });
                group.bench_function(BenchmarkId::from_parameter(id), |b| {
                    b.iter_custom(|iters| {
                        longctx::timing::time_batch(dev, iters, || run.run(dev))
                            .expect("decode launch")
                    })
                });
            }
        }
        group.finish();
    }
}

fn cpu_benches(c: &mut Criterion) {
    eprintln!(
        "decode bench: no GPU available; benchmarking the f64 reference at a small size instead"
    );
    let (ps, ctx, hkv, hq, d) = (16usize, 512usize, 2usize, 8usize, 64usize);
    let pages = ctx / ps;
    let layout = PagedKvLayout {
        page_size: ps,
        pages,
        heads_kv: hkv,
        head_dim: d,
    };
    let n = layout.cache_len().expect("layout");
    let k: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    let q: Vec<f64> = (0..hq * d).map(|i| (i as f64 * 0.11).cos()).collect();
    let table: Vec<i32> = (0..pages as i32).collect();
    let seqlens = [ctx as i32];
    let step = StepTable {
        table: PageTable {
            block_table: &table,
            max_pages_per_seq: pages,
            seqlens: &seqlens,
        },
        cu_new: &[0, 1],
    };
    let math = DecodeMath {
        scale: 0.125,
        softcap: None,
        window_left: None,
    };
    let mut group = c.benchmark_group("decode-cpu-reference");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((2 * n * 8) as u64));
    group.bench_function(BenchmarkId::from_parameter(ctx), |b| {
        b.iter(|| decode_f64(&layout, &step, &q, hq, &k, &k, &math).expect("reference"))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    match longctx::timing::bench_device() {
        Ok(dev) => gpu_benches(c, &dev),
        Err(why) => {
            eprintln!("decode bench: {why}");
            cpu_benches(c)
        }
    }
}

criterion_group!(decode, benches);
criterion_main!(decode);
