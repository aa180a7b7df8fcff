//! The main job: every implemented kernel across sequence lengths, with its time, achieved
//! throughput, percent of the device's measured ceiling, and its worst error against the
//! CPU reference on sampled rows.
//!
//!     cargo run --release --example sweep            # full sweep
//!     cargo run --release --example sweep -- --quick # fewer lengths
//!
//! Without a GPU it checks the CPU reference on a small case and says the GPU part was
//! skipped.

use longctx::device::Device;
use longctx::layout::HeadsLayout;
use longctx::rope::reference::apply_rope_f64;
use longctx::rope::{AnglePrecision, Direction, RopeOptions, RopeStyle};
use longctx::timing::{copy_bandwidth, time_gpu};
use longctx::workloads::{rope_shapes, RopeRun};

fn main() {
    if let Err(e) = run() {
        eprintln!("sweep failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> longctx::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dev = match Device::new(0) {
        Ok(d) if longctx::device::kernels_compiled() => d,
        Ok(_) => return cpu_only("the crate was built without CUDA kernels"),
        Err(e) => return cpu_only(&e.to_string()),
    };
    println!(
        "device: {} (sm_{}{}, {} SMs)",
        dev.name(),
        dev.compute_capability().0,
        dev.compute_capability().1,
        dev.sm_count()
    );
    let copy = copy_bandwidth(&dev, 1 << 30, 20)?;
    println!(
        "measured ceiling: device-to-device copy {:.0} GB/s (bytes read + written)\n",
        copy / 1e9
    );

    let tokens: &[usize] = if quick {
        &[1024, 16384]
    } else {
        &[1024, 4096, 16384, 65536, 131072]
    };
    println!(
        "{:<18} {:>5} {:>8} {:>10} {:>9} {:>8} {:>10}",
        "rope (bf16)", "dir", "tokens", "time (us)", "GB/s", "% copy", "max err"
    );
    for shape in rope_shapes()? {
        for &t in tokens {
            let mut r = RopeRun::new(&dev, &shape, t, 7)?;
            for dir in [Direction::Forward, Direction::Backward] {
                let opts = RopeOptions {
                    style: shape.style,
                    direction: dir,
                    ..RopeOptions::default()
                };
                let times = time_gpu(&dev, 5, 50, || r.run(&dev, opts))?;
                let ms = times.median_ms();
                let gbs = r.bytes() as f64 / (ms * 1e-3) / 1e9;
                let err = r.max_error(&dev, opts, 64)?;
                println!(
                    "{:<18} {:>5} {:>8} {:>10.2} {:>9.0} {:>7.1}% {:>10.2e}",
                    shape.name,
                    if dir == Direction::Forward {
                        "fwd"
                    } else {
                        "bwd"
                    },
                    t,
                    ms * 1e3,
                    gbs,
                    100.0 * gbs * 1e9 / copy,
                    err
                );
            }
        }
    }

    // Angle precision: the default f64 angle against HF-style f32 angles, at large positions.
    println!("\nangle precision at positions near 2^20 (llama3-8b, 4096 tokens starting at 2^20 - 4096):");
    let shape = &rope_shapes()?[0];
    for precision in [AnglePrecision::F64, AnglePrecision::F32] {
        let mut r = RopeRun::new_at(&dev, shape, 4096, 11, (1 << 20) - 4096)?;
        let opts = RopeOptions {
            style: RopeStyle::Neox,
            precision,
            ..RopeOptions::default()
        };
        let ms = time_gpu(&dev, 5, 50, || r.run(&dev, opts))?.median_ms();
        let err = r.max_error(&dev, opts, 64)?;
        println!(
            "  {precision:?}: {:.2} us, max error {:.2e} (relative to pair norm)",
            ms * 1e3,
            err
        );
    }
    Ok(())
}

fn cpu_only(why: &str) -> longctx::Result<()> {
    println!("GPU part skipped: {why}");
    println!("checking the CPU reference instead (RoPE forward then backward must give factor^2 x input):");
    for shape in rope_shapes()? {
        let d = shape.config.head_dim();
        let l = HeadsLayout::contiguous(8, shape.heads_q, d);
        let x: Vec<f64> = (0..l.numel().unwrap_or(0))
            .map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        let pos: Vec<i32> = (0..8).map(|t| t * 100_003).collect();
        let inv = shape.config.inv_freq_f64(1 << 20);
        let f = shape.config.attention_factor_f64();
        let mut y = x.clone();
        apply_rope_f64(&mut y, &l, &pos, &inv, f, shape.style, Direction::Forward)?;
        apply_rope_f64(&mut y, &l, &pos, &inv, f, shape.style, Direction::Backward)?;
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a * f * f - b).abs())
            .fold(0.0, f64::max);
        println!(
            "  {:<18} rotary_dim {:>3}  attention factor {:.6}  round-trip error {:.1e}",
            shape.name,
            shape.config.rotary_dim(),
            f,
            err
        );
    }
    Ok(())
}
