//! The main job: every implemented kernel across sequence lengths, with its time, achieved
//! throughput, percent of the device's measured ceiling, and its worst error against the
//! CPU reference on sampled rows.
//!
//!     cargo run --release --example sweep            # full sweep
//!     cargo run --release --example sweep -- --quick # fewer lengths
//!     cargo run --release --example sweep -- --attention   # only attention (or --moe, --decode, --mla)
//!
//! Without a GPU it checks the CPU reference on a small case and says the GPU part was
//! skipped.

use longctx::attention::{AttentionOptions, Mask};
use longctx::device::Device;
use longctx::layout::HeadsLayout;
use longctx::rope::reference::apply_rope_f64;
use longctx::rope::{AnglePrecision, Direction, RopeOptions, RopeStyle};
use longctx::timing::{copy_bandwidth, time_gpu};
use longctx::workloads::{
    attention_backward_shapes, attention_shapes, rope_shapes, AttnBwdRun, AttnRun, RopeRun,
};

use std::sync::atomic::{AtomicUsize, Ordering};

/// Checks whose error exceeded its tolerance; the sweep exits non-zero when any did.
static OVER_TOLERANCE: AtomicUsize = AtomicUsize::new(0);

/// Records `err` against `tol` for the row `what`; prints a marked line when it is over.
fn within(what: &str, err: f64, tol: f64) -> bool {
    let ok = err <= tol; // NaN fails too
    if !ok {
        OVER_TOLERANCE.fetch_add(1, Ordering::Relaxed);
        println!("  ^ TOLERANCE EXCEEDED: {what}: error {err:.3e} > {tol:.3e}");
    }
    ok
}

fn main() {
    if let Err(e) = run() {
        eprintln!("sweep failed: {e}");
        std::process::exit(1);
    }
    let n = OVER_TOLERANCE.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!("sweep: {n} check(s) exceeded their tolerance");
        std::process::exit(2);
    }
}

/// RoPE in bf16 storage: the output's rounding (2^-8 of the pair norm, twice for safety)
/// plus the f64 angle's error.
const ROPE_BF16_TOL: f64 = 2.0 * (1.0 / 256.0) + 1e-5;
/// Attention in bf16 with inputs in [-1, 1): O within twice the bf16-storage CPU run's
/// typical worst error; the LSE (f32) within 2e-4 plus 1e-5 ln(keys), below the 1 / keys
/// that one key more or less would move it.
const ATTN_O_TOL: f64 = 2e-2;
fn attn_lse_tol(keys: usize) -> f64 {
    2e-4 + 1e-5 * (keys.max(1) as f64).ln()
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
    // `--moe`: only the MoE rows; `--attention`: only the attention rows.
    if std::env::args().any(|a| a == "--moe") {
        return moe_rows(&dev, copy, quick);
    }
    if std::env::args().any(|a| a == "--attention") {
        return attention_rows(&dev, quick);
    }
    if std::env::args().any(|a| a == "--mla") {
        return mla_rows(&dev, copy, quick);
    }
    if std::env::args().any(|a| a == "--decode") {
        decode_rows(&dev, copy, quick)?;
        decode_rotating_rows(&dev, copy, quick)?;
        return append_extend_rows(&dev, copy, quick);
    }

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
                within(
                    &format!("rope {} {t} tokens", shape.name),
                    err,
                    ROPE_BF16_TOL,
                );
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
        // Only the default f64 angle has a bound; the f32 angle is shown for comparison.
        if precision == AnglePrecision::F64 {
            within("rope f64 angle near 2^20", err, ROPE_BF16_TOL);
        }
        println!(
            "  {precision:?}: {:.2} us, max error {:.2e} (relative to pair norm)",
            ms * 1e3,
            err
        );
    }
    attention_rows(&dev, quick)?;
    merge_rows(&dev, copy, quick)?;
    decode_rows(&dev, copy, quick)?;
    decode_rotating_rows(&dev, copy, quick)?;
    append_extend_rows(&dev, copy, quick)?;
    mla_rows(&dev, copy, quick)?;
    moe_rows(&dev, copy, quick)?;
    Ok(())
}

/// `kv_cache::decode`, one new token per sequence over a paged cache: Llama-3-8B's heads
/// and a head-dim-512 model, batch 1 to 64, contexts 1k to 128k (1M at batch 1), bf16 and
/// fp8 caches, pages of 16 and 64 tokens. Bytes = cache (K, V and fp8 scales) read once +
/// Q read + O and LSE written; the target is the copy bandwidth measured above. The error
/// is against f64 attention over the cache read through the page table, on sampled rows.
fn decode_rows(dev: &Device, copy: f64, quick: bool) -> longctx::Result<()> {
    use longctx::workloads::{decode_models, DecodeRun};
    println!(
        "\n{:<12} {:>5} {:>4} {:>5} {:>8} {:>6} {:>10} {:>9} {:>8} {:>10} {:>10}",
        "decode",
        "cache",
        "page",
        "batch",
        "context",
        "splits",
        "time (us)",
        "GB/s",
        "% copy",
        "max err O",
        "err LSE"
    );
    let cases: &[(usize, usize)] = if quick {
        &[(1, 32768), (8, 32768), (64, 4096)]
    } else {
        &[
            (1, 1024),
            (1, 32768),
            (1, 131072),
            (1, 1 << 20),
            (8, 32768),
            (8, 131072),
            (64, 4096),
            (64, 32768),
        ]
    };
    for model in decode_models() {
        for fp8 in [false, true] {
            for page in [16usize, 64] {
                for &(batch, context) in cases {
                    if model.head_dim == 512 && (context > 131072 || page == 64) {
                        continue;
                    }
                    let mut r = DecodeRun::new(dev, model, batch, context, page, fp8, 99)?;
                    let ms = time_gpu(dev, 3, 20, || r.run(dev))?.median_ms();
                    let gbs = r.bytes() as f64 / (ms * 1e-3) / 1e9;
                    let (err_o, err_lse) =
                        r.max_error(dev, if context > 200_000 { 1 } else { 3 })?;
                    let what = format!("decode {} b{batch} ctx{context} p{page}", model.name);
                    // bf16 output of a convex combination of values below 1 (fp8: below
                    // 1.1): half a bf16 ulp plus f32 accumulation; the LSE like attention's.
                    within(&what, err_o, 2f64.powi(-8) + 1e-4);
                    within(&what, err_lse, attn_lse_tol(context));
                    println!(
                        "{:<12} {:>5} {:>4} {:>5} {:>8} {:>6} {:>10.2} {:>9.0} {:>7.1}% {:>10.2e} {:>10.2e}",
                        model.name,
                        if fp8 { "fp8" } else { "bf16" },
                        page,
                        batch,
                        context,
                        r.plan.map_or(0, |p| p.splits),
                        ms * 1e3,
                        gbs,
                        100.0 * gbs * 1e9 / copy,
                        err_o,
                        err_lse
                    );
                }
            }
        }
    }
    Ok(())
}

/// `kv_cache::decode_rotating` beside `kv_cache::decode` on the same cache: Llama-3-8B's
/// heads (32 query / 8 KV, d 128), bf16, pages of 16, one new token per sequence, batch 1
/// and 16, contexts 32k and 128k (quick: 32k). The plain row reads the cache as rotated
/// keys; the rotating row reads it as un-rotated keys and rotates every key and query on
/// load (base 500000, f64 angles). The target: rotating within 10% of plain
/// (ratio <= 1.10). Errors against f64 attention with the rotation done in f64.
fn decode_rotating_rows(dev: &Device, copy: f64, quick: bool) -> longctx::Result<()> {
    use longctx::workloads::{decode_models, DecodeRun};
    println!(
        "\n{:<18} {:>5} {:>8} {:>6} {:>10} {:>9} {:>8} {:>7} {:>10} {:>10}",
        "decode (rotating)",
        "batch",
        "context",
        "splits",
        "time (us)",
        "GB/s",
        "% copy",
        "/ plain",
        "max err O",
        "err LSE"
    );
    let cases: &[(usize, usize)] = if quick {
        &[(1, 32768), (16, 32768)]
    } else {
        &[(1, 32768), (1, 131072), (16, 32768), (16, 131072)]
    };
    let Some(model) = decode_models().into_iter().find(|m| m.name == "llama3-8b") else {
        return Ok(());
    };
    for &(batch, context) in cases {
        let mut r = DecodeRun::new(dev, model, batch, context, 16, false, 99)?;
        let row = |r: &mut DecodeRun, plain_ms: Option<f64>| -> longctx::Result<f64> {
            let ms = time_gpu(dev, 3, 20, || r.run(dev))?.median_ms();
            let gbs = r.bytes() as f64 / (ms * 1e-3) / 1e9;
            let (err_o, err_lse) = r.max_error(dev, 3)?;
            let bound = r.rotation_score_bound();
            let what = format!(
                "decode {} b{batch} ctx{context}{}",
                model.name,
                if r.rotating() { " rotating" } else { "" }
            );
            // As the plain rows, plus what rounding the rotated keys and queries to bf16
            // may move a score (and through it the weights) by.
            within(
                &what,
                err_o,
                2f64.powi(-8) + 1e-4 + ((2.0 * bound).exp() - 1.0),
            );
            within(&what, err_lse, attn_lse_tol(context) + bound);
            println!(
                "{:<18} {:>5} {:>8} {:>6} {:>10.2} {:>9.0} {:>7.1}% {:>7} {:>10.2e} {:>10.2e}",
                if r.rotating() { "rotating" } else { "plain" },
                batch,
                context,
                r.plan.map_or(0, |p| p.splits),
                ms * 1e3,
                gbs,
                100.0 * gbs * 1e9 / copy,
                plain_ms.map_or("-".to_string(), |p| format!("{:.3}", ms / p)),
                err_o,
                err_lse
            );
            Ok(ms)
        };
        let plain = row(&mut r, None)?;
        r.set_rotating(dev, true)?;
        row(&mut r, Some(plain))?;
    }
    Ok(())
}

/// Attention forward at FlashAttention's benchmark shape (16k tokens per batch: batch =
/// 16384 / seqlen), causal and not, with FLOPs counted exactly for the mask; then one
/// 1M-token causal Llama-3-8B sequence (full sweep only).
fn attention_rows(dev: &Device, quick: bool) -> longctx::Result<()> {
    println!(
        "\n{:<16} {:>6} {:>7} {:>5} {:>10} {:>8} {:>10} {:>10}",
        "attention (bf16)",
        "mask",
        "seqlen",
        "batch",
        "time (ms)",
        "TFLOP/s",
        "max |dO|",
        "max |dLSE|"
    );
    let lens: &[usize] = if quick {
        &[1024, 16384]
    } else {
        &[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    };
    for shape in attention_shapes() {
        let t = longctx::attention::device_tile_config::<half::bf16>(
            dev,
            shape.head_dim,
            shape.head_dim_v,
        )?;
        println!(
            "{:<16} tiles {} x {} keys, {} warps (code for compute_{})",
            shape.name, t.block_m, t.block_n, t.warps, t.ptx_arch
        );
        for causal in [false, true] {
            for &n in lens {
                let batch = (16384 / n).max(1);
                let mask = if causal { Mask::causal() } else { Mask::none() };
                let opts = AttentionOptions {
                    mask,
                    ..AttentionOptions::default()
                };
                let mut r = AttnRun::new(dev, shape, batch, n, opts, 3)?;
                let ms = time_gpu(dev, 3, 10, || r.run(dev))?.median_ms();
                let (eo, el) = r.max_error(dev, 8)?;
                let what = format!("attention {} seqlen {n}", shape.name);
                within(&what, eo, ATTN_O_TOL);
                within(&what, el, attn_lse_tol(n));
                println!(
                    "{:<16} {:>6} {:>7} {:>5} {:>10.3} {:>8.1} {:>10.2e} {:>10.2e}",
                    shape.name,
                    if causal { "causal" } else { "none" },
                    n,
                    batch,
                    ms,
                    r.flops() / (ms * 1e-3) / 1e12,
                    eo,
                    el
                );
            }
        }
    }
    attention_backward_rows(dev, quick)?;
    if !quick {
        let shape = attention_shapes()[2];
        let opts = AttentionOptions {
            mask: Mask::causal(),
            ..AttentionOptions::default()
        };
        let mut r = AttnRun::new(dev, shape, 1, 1 << 20, opts, 5)?;
        let ms = time_gpu(dev, 0, 1, || r.run(dev))?.median_ms();
        let (eo, el) = r.max_error(dev, 4)?;
        within("attention 1M-token sequence", eo, ATTN_O_TOL);
        within("attention 1M-token sequence", el, attn_lse_tol(1 << 20));
        println!(
            "{:<16} {:>6} {:>7} {:>5} {:>10.1} {:>8.1} {:>10.2e} {:>10.2e}  (one 1M-token sequence)",
            shape.name,
            "causal",
            1 << 20,
            1,
            ms,
            r.flops() / (ms * 1e-3) / 1e12,
            eo,
            el
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
        within(
            &format!("rope reference round trip {}", shape.name),
            err,
            1e-12,
        );
        println!(
            "  {:<18} rotary_dim {:>3}  attention factor {:.6}  round-trip error {:.1e}",
            shape.name,
            shape.config.rotary_dim(),
            f,
            err
        );
    }
    moe_cpu_check()?;
    Ok(())
}

/// MoE routing at the shapes: gating, permutation, gather and combine (bf16, hidden
/// states through identity experts) and the router backward, with throughput against the
/// measured copy bandwidth and the errors of sampled tokens against the f64 reference.
/// Each time is the median over `LONGCTX_MOE_ITERS` (default 50) runs of 10 back-to-back
/// launches, divided by 10: the GPU time per op once launches overlap (a single launch's
/// host overhead, a few microseconds, is not counted). `LONGCTX_MOE_TOKENS=4096,65536`
/// picks the token counts (for a profiler run, say).
fn moe_rows(dev: &Device, copy: f64, quick: bool) -> longctx::Result<()> {
    use longctx::workloads::{moe_shapes, MoeRun};
    const BATCH: usize = 10;
    let env_tokens: Option<Vec<usize>> = std::env::var("LONGCTX_MOE_TOKENS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect());
    let iters: usize = std::env::var("LONGCTX_MOE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let tokens: Vec<usize> = match env_tokens {
        Some(t) => t,
        None if quick => vec![4096, 65536],
        None => vec![1024, 4096, 16384, 65536, 131072],
    };
    println!(
        "\n{:<14} {:>7} {:>8} {:>10} {:>8} {:>8}   check (sampled tokens vs f64 reference)",
        "moe", "op", "tokens", "time (us)", "GB/s", "% copy"
    );
    for shape in moe_shapes() {
        for &t in &tokens {
            let mut r = MoeRun::new(dev, &shape, t, 17)?;
            let check = r.check(dev, 256)?;
            // Weights are f32 softmax/sigmoid values; the identity-expert round trip moves
            // bf16 rows (relative error within twice bf16's rounding).
            within(
                &format!("moe {} {t} weights", shape.name),
                check.weight_err,
                1e-5,
            );
            within(
                &format!("moe {} {t} combine", shape.name),
                check.combine_err,
                2.0 / 256.0,
            );
            type Op = fn(&mut MoeRun, &Device) -> longctx::Result<()>;
            let ops: [(&str, Op, usize); 5] = [
                ("gate", MoeRun::gate, r.gate_bytes()),
                ("permute", MoeRun::permute, r.permute_bytes()),
                ("gather", MoeRun::gather, r.gather_bytes()),
                ("combine", MoeRun::combine, r.combine_bytes()),
                ("bwd", MoeRun::backward, r.backward_bytes()),
            ];
            for (name, op, bytes) in ops {
                let ms = time_gpu(dev, 2, iters, || {
                    (0..BATCH).try_for_each(|_| op(&mut r, dev))
                })?
                .median_ms()
                    / BATCH as f64;
                let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
                let note = match name {
                    "gate" => format!(
                        "ids differ on {} tokens, max weight err {:.1e}",
                        check.id_mismatches, check.weight_err
                    ),
                    "combine" => {
                        format!("identity-expert round trip err {:.1e}", check.combine_err)
                    }
                    _ => String::new(),
                };
                println!(
                    "{:<14} {:>7} {:>8} {:>10.2} {:>8.0} {:>7.1}%   {}",
                    shape.name,
                    name,
                    t,
                    ms * 1e3,
                    gbs,
                    100.0 * gbs * 1e9 / copy,
                    note
                );
            }
        }
    }
    Ok(())
}

/// Without a GPU: the MoE reference on DeepSeek-V3's router, checked against its own
/// invariants (renormalised weights sum to routed_scaling_factor, permutation counts).
fn moe_cpu_check() -> longctx::Result<()> {
    use longctx::moe::reference::{permute_f64, route_f64};
    use longctx::moe::{PermuteOptions, RouterConfig};
    let cfg = RouterConfig::deepseek_v3_default();
    let tokens = 64;
    let z: Vec<f64> = (0..tokens * cfg.experts)
        .map(|i| ((i * 7919) % 1000) as f64 / 250.0 - 2.0)
        .collect();
    let r = route_f64(&cfg, &z, tokens, None)?;
    let worst = r
        .weights
        .chunks(cfg.top_k)
        .map(|w| (w.iter().sum::<f64>() - cfg.routed_scaling_factor).abs())
        .fold(0.0, f64::max);
    let opts = PermuteOptions {
        block: 128,
        capacity_factor: Some(1.0),
    };
    let p = permute_f64(&r.ids, tokens, cfg.top_k, cfg.experts, opts)?;
    let kept: i32 = p.counts.iter().sum();
    println!(
        "  moe deepseek-v3 router, {tokens} tokens: |sum w - 2.5| <= {worst:.1e}; kept {kept} + dropped {} = {} assignments; padded rows {}",
        p.dropped,
        tokens * cfg.top_k,
        p.offsets[cfg.experts]
    );
    Ok(())
}

/// Attention backward at the same 16k-token batches: d 64, 128, Llama-3-8B GQA and the MLA
/// prefill shape (192 / 128), causal and not, the atomic dQ path and deterministic mode;
/// FLOPs 2.5 x the forward's. Correctness is the parity tests' (tests/attention_backward.rs,
/// GPU and emulator); this times.
fn attention_backward_rows(dev: &Device, quick: bool) -> longctx::Result<()> {
    println!(
        "\n{:<16} {:>6} {:>7} {:>5} {:>13} {:>10} {:>8}",
        "attn bwd (bf16)", "mask", "seqlen", "batch", "mode", "time (ms)", "TFLOP/s"
    );
    let lens: &[usize] = if quick {
        &[1024, 16384]
    } else {
        &[1024, 2048, 4096, 8192, 16384, 32768]
    };
    for shape in attention_backward_shapes() {
        for causal in [false, true] {
            for &n in lens {
                let batch = (16384 / n).max(1);
                let opts = AttentionOptions {
                    mask: if causal { Mask::causal() } else { Mask::none() },
                    ..AttentionOptions::default()
                };
                let mut r = AttnBwdRun::new(dev, shape, batch, n, opts, 3)?;
                for det in [false, true] {
                    let ms = time_gpu(dev, 2, 10, || r.run(dev, det))?.median_ms();
                    println!(
                        "{:<16} {:>6} {:>7} {:>5} {:>13} {:>10.3} {:>8.1}",
                        shape.name,
                        if causal { "causal" } else { "none" },
                        n,
                        batch,
                        if det { "deterministic" } else { "atomic dQ" },
                        ms,
                        r.flops() / (ms * 1e-3) / 1e12
                    );
                }
            }
        }
    }
    Ok(())
}

/// `kv_cache::merge_states` of P bf16 partial states (split-KV decode, ring attention):
/// Llama-3-8B's 32 query heads, d_v 128, P = 2, 4, 8. Bytes = P x (O + LSE) read + one
/// state written; the error is against the f64 merge of the same (bf16-rounded) parts on
/// every row.
fn merge_rows(dev: &Device, copy: f64, quick: bool) -> longctx::Result<()> {
    use longctx::kv_cache::{
        merge_states, reference::merge_states_f64, LseLayout, MergeOptions, MergeState,
        StackedStates, States,
    };
    println!(
        "\n{:<18} {:>5} {:>8} {:>10} {:>9} {:>8} {:>10}",
        "merge (bf16)", "parts", "tokens", "time (us)", "GB/s", "% copy", "max err"
    );
    let (heads, dv) = (32usize, 128usize);
    let tokens: &[usize] = if quick { &[4096] } else { &[256, 4096, 32768] };
    for &parts in &[2usize, 4, 8] {
        for &t in tokens {
            let rows = t * heads;
            let mut seed = 0x5eed_u64 + (parts * 131 + t) as u64;
            let mut next = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            };
            let o_host: Vec<half::bf16> = (0..parts * rows * dv)
                .map(|_| half::bf16::from_f64(next()))
                .collect();
            let lse_host: Vec<f32> = (0..parts * rows).map(|_| (4.0 * next()) as f32).collect();
            let o_parts = dev.upload(&o_host)?;
            let lse_parts = dev.upload(&lse_host)?;
            let mut o = dev.zeros::<half::bf16>(rows * dv)?;
            let mut lse = dev.zeros::<f32>(rows)?;
            let layout = StackedStates::contiguous(parts, t, heads, dv);
            let mut run = || {
                merge_states(
                    dev,
                    &States {
                        o: &o_parts,
                        lse: &lse_parts,
                        layout,
                    },
                    MergeState {
                        o: &mut o,
                        o_layout: HeadsLayout::contiguous(t, heads, dv),
                        lse: &mut lse,
                        lse_layout: LseLayout::contiguous(heads, t),
                    },
                    &MergeOptions::default(),
                )
            };
            let ms = time_gpu(dev, 5, 50, &mut run)?.median_ms();
            let bytes = (parts * rows * (dv * 2 + 4) + rows * (dv * 2 + 4)) as f64;
            let gbs = bytes / (ms * 1e-3) / 1e9;
            run()?;
            let got = dev.download(&o)?;
            let want = merge_states_f64(
                &o_host.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
                &lse_host.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
                parts,
                t,
                heads,
                dv,
            )?;
            let err = got
                .iter()
                .zip(&want.o)
                .map(|(g, w)| (g.to_f64() - w).abs())
                .fold(
                    0.0f64,
                    |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
                );
            // bf16 output: half an ulp of values below 1, plus f32 accumulation.
            within(
                &format!("merge {parts} parts {t} tokens"),
                err,
                2f64.powi(-8),
            );
            println!(
                "{:<18} {:>5} {:>8} {:>10.2} {:>9.0} {:>7.1}% {:>10.2e}",
                "llama3-8b-heads",
                parts,
                t,
                ms * 1e3,
                gbs,
                100.0 * gbs * 1e9 / copy,
                err
            );
        }
    }
    Ok(())
}

/// `kv_cache::append_kv` (new K/V rows into their pages, K rotated on the way; bytes = new
/// rows read in bf16 + written in the cache type, target the copy bandwidth) and
/// `kv_cache::extend` (a prefill chunk over the cache on tensor cores; FLOPs as
/// FlashAttention counts them for the bottom-right causal mask) at Llama-3-8B's heads, and
/// at head dim 512 (the row-packed kernel) on the decode sweep's second model.
fn append_extend_rows(dev: &Device, copy: f64, quick: bool) -> longctx::Result<()> {
    use longctx::workloads::{decode_models, DecodeRun};
    let model = decode_models()[0];
    println!(
        "\n{:<12} {:>5} {:>5} {:>8} {:>6} {:>10} {:>9} {:>8}",
        "append", "cache", "batch", "context", "new", "time (us)", "GB/s", "% copy"
    );
    let cases: &[(usize, usize, usize)] = if quick {
        &[(64, 4096, 1), (1, 8192, 8192)]
    } else {
        &[
            (64, 4096, 1),
            (8, 4096, 512),
            (1, 8192, 8192),
            (1, 65536, 65536),
        ]
    };
    for fp8 in [false, true] {
        for &(batch, context, new) in cases {
            let mut r = DecodeRun::with_new_tokens(dev, model, batch, context, 16, fp8, new, 5)?;
            let ms = time_gpu(dev, 3, 20, || r.run_append(dev))?.median_ms();
            let gbs = r.append_bytes() as f64 / (ms * 1e-3) / 1e9;
            println!(
                "{:<12} {:>5} {:>5} {:>8} {:>6} {:>10.2} {:>9.0} {:>7.1}%",
                model.name,
                if fp8 { "fp8" } else { "bf16" },
                batch,
                context,
                new,
                ms * 1e3,
                gbs,
                100.0 * gbs * 1e9 / copy
            );
        }
    }
    println!(
        "\n{:<12} {:>5} {:>5} {:>8} {:>6} {:>10} {:>9} {:>10} {:>10}",
        "extend",
        "cache",
        "batch",
        "context",
        "new",
        "time (ms)",
        "TFLOP/s",
        "max err O",
        "err LSE"
    );
    let cases: &[(usize, usize, usize)] = if quick {
        &[(1, 32768, 2048)]
    } else {
        &[
            (1, 8192, 1024),
            (1, 32768, 2048),
            (4, 32768, 512),
            (1, 131072, 4096),
        ]
    };
    // fp8: the same kernel after each tile is widened in shared memory; the reference reads
    // each fp8 value as the kernel does, bf16(code x scale), so the bf16 tolerances hold.
    // Head dim 512 (the row-packed kernel, 16-bit caches) on the few-head model, shorter
    // contexts.
    let wide = decode_models()[1];
    let wide_cases: &[(usize, usize, usize)] = if quick {
        &[(1, 8192, 1024)]
    } else {
        &[(1, 8192, 1024), (1, 32768, 2048)]
    };
    let runs = [false, true]
        .into_iter()
        .flat_map(|fp8| cases.iter().map(move |&c| (model, fp8, c)))
        .chain(wide_cases.iter().map(|&c| (wide, false, c)));
    for (model, fp8, (batch, context, new)) in runs {
        let mut r = DecodeRun::with_new_tokens(dev, model, batch, context, 16, fp8, new, 6)?;
        let ms = time_gpu(dev, 3, 10, || r.run_extend(dev))?.median_ms();
        let tflops = r.extend_flops() / (ms * 1e-3) / 1e12;
        let (err_o, err_lse) = r.max_error_extend(dev, 2)?;
        let cache = if fp8 { "fp8" } else { "bf16" };
        let what = format!(
            "extend {} {cache} b{batch} ctx{context} new{new}",
            model.name
        );
        // P is rounded to bf16 before P V, as in the attention forward: bf16 tolerance.
        within(&what, err_o, ATTN_O_TOL);
        within(&what, err_lse, attn_lse_tol(context));
        println!(
            "{:<12} {:>5} {:>5} {:>8} {:>6} {:>10.3} {:>9.1} {:>10.2e} {:>10.2e}",
            model.name, cache, batch, context, new, ms, tflops, err_o, err_lse
        );
    }
    Ok(())
}

/// `mla::decode_absorbed` at DeepSeek-V3's dimensions (128 heads, and 16 for a TP-8 shard),
/// one query token per sequence, bf16 and fp8 latent caches in pages of 64: GB/s against
/// the copy ceiling (bytes = latent rows read + Q + O) and TFLOP/s (2 x heads x 1088 per
/// cached token); `rows x sp` is the plan's kernel (16 or 64 rows per CTA, `c2` / `c4` for
/// clusters of 2 / 4 CTAs) and split count; the error is against f64 attention over the latent
/// rows on sampled (sequence, head) rows.
fn mla_rows(dev: &Device, copy: f64, quick: bool) -> longctx::Result<()> {
    use longctx::workloads::MlaRun;
    println!(
        "\n{:<10} {:>5} {:>5} {:>5} {:>8} {:>9} {:>10} {:>9} {:>8} {:>8} {:>10} {:>10}",
        "mla",
        "heads",
        "cache",
        "batch",
        "context",
        "rows x sp",
        "time (us)",
        "GB/s",
        "% copy",
        "TFLOP/s",
        "max err O",
        "err LSE"
    );
    let cases: &[(usize, usize)] = if quick {
        &[(1, 16384), (64, 4096)]
    } else {
        &[
            (1, 4096),
            (1, 65536),
            (8, 16384),
            (32, 16384),
            (128, 4096),
            (128, 16384),
        ]
    };
    // At 128 heads on a device with the clustered kernels, each case runs twice: clusters
    // (`64c2`, `64c4`) and the 64-row kernel alone (`64`), the baseline they must beat.
    let cluster_choices: &[bool] = if dev.cluster_kernels() {
        &[true, false]
    } else {
        &[true]
    };
    for heads in [128usize, 16] {
        for fp8 in [false, true] {
            for &(batch, context) in cases {
                for &clusters in cluster_choices {
                    if !clusters && heads <= 64 {
                        continue;
                    }
                    let mut r =
                        MlaRun::with_clusters(dev, heads, batch, context, fp8, 13, clusters)?;
                    let ms = time_gpu(dev, 3, 20, || r.run(dev))?.median_ms();
                    let gbs = r.bytes() as f64 / (ms * 1e-3) / 1e9;
                    let tflops = r.flops() / (ms * 1e-3) / 1e12;
                    let (err_o, err_lse) = r.max_error(dev, 2)?;
                    let what = format!("mla h{heads} b{batch} ctx{context}");
                    // bf16 o_lat of values below ~1.25: output and P rounding (2 eps max|V|).
                    within(&what, err_o, 2.5 * 2f64.powi(-8) + 1e-4);
                    within(&what, err_lse, attn_lse_tol(context));
                    println!(
                    "{:<10} {:>5} {:>5} {:>5} {:>8} {:>9} {:>10.2} {:>9.0} {:>7.1}% {:>8.1} {:>10.2e} {:>10.2e}",
                    "deepseek-v3",
                    heads,
                    if fp8 { "fp8" } else { "bf16" },
                    batch,
                    context,
                    format!(
                        "{}{}x{}",
                        r.plan().rows_per_tile,
                        match r.plan().cluster {
                            1 => String::new(),
                            c => format!("c{c}"),
                        },
                        r.plan().splits
                    ),
                    ms * 1e3,
                    gbs,
                    100.0 * gbs * 1e9 / copy,
                    tflops,
                    err_o,
                    err_lse
                );
                }
            }
        }
    }
    Ok(())
}
