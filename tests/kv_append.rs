//! append_kv: the kernel through the emulator (its CUDA source on the CPU, bounds checker on)
//! against the f64 reference over page sizes, lengths around page boundaries, shuffled page
//! ids, head dims, dtypes, fp8 scale modes and fused RoPE; cache bytes outside the written
//! slots stay as they were; RoPE positions matter; validation; GPU twins (`#[ignore]`d).

mod common;

use half::{bf16, f16};
use longctx::dtype::Element;
use longctx::emulator::{self, HostNewKv, HostRope, HostScalesMut};
use longctx::kv_cache::reference::{append_kv_f64, AppendRopeF64, AppendedF64};
use longctx::kv_cache::{
    AppendShape, CacheElement, CacheShape, Fp8E4m3, PageTable, PagedKvLayout, StepTable,
};
use longctx::layout::HeadsLayout;
use longctx::rope::{AnglePrecision, RopeConfig, RopeStyle};
use longctx::{Error, ErrorKind};
use proptest::prelude::*;

/// Where a case runs.
enum Backend<'a> {
    Emulator,
    Gpu(&'a longctx::device::Device),
}

/// The cache's storage and scales.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Store {
    Same,
    Fp8Token,
    Fp8Head,
}

#[derive(Debug, Clone)]
struct Case {
    page_size: usize,
    heads: usize,
    head_dim: usize,
    /// (tokens before the step, new tokens) per sequence.
    seqs: Vec<(usize, usize)>,
    /// RoPE: style, partial rotary factor, angle precision.
    rope: Option<(RopeStyle, f64, AnglePrecision)>,
    store: Store,
    /// Extra elements per token of a packed [q, k, v] buffer (0: 16-byte aligned; odd:
    /// element-aligned only, the scalar kernel).
    pad: usize,
    seed: u64,
}

/// The step's host tables and the cache layout, pages handed out in shuffled order with two
/// pages nobody uses.
struct Setup {
    layout: PagedKvLayout,
    block_table: Vec<i32>,
    max_pages: usize,
    seqlens: Vec<i32>,
    cu_new: Vec<i32>,
}

impl Setup {
    fn new(c: &Case, r: &mut common::Rng) -> Setup {
        let ps = c.page_size;
        let needed: Vec<usize> = c.seqs.iter().map(|&(a, n)| (a + n).div_ceil(ps)).collect();
        let max_pages = needed.iter().copied().max().unwrap_or(0) + 1;
        let pages = needed.iter().sum::<usize>() + 2;
        let mut ids: Vec<i32> = (0..pages as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.below(i as u64 + 1) as usize);
        }
        let mut block_table = vec![-1; c.seqs.len() * max_pages];
        let mut next = 0;
        for (b, &n) in needed.iter().enumerate() {
            for i in 0..n {
                block_table[b * max_pages + i] = ids[next];
                next += 1;
            }
        }
        let mut cu_new = vec![0i32];
        for &(_, n) in &c.seqs {
            cu_new.push(cu_new.last().unwrap() + n as i32);
        }
        Setup {
            layout: PagedKvLayout {
                page_size: ps,
                pages,
                heads_kv: c.heads,
                head_dim: c.head_dim,
            },
            block_table,
            max_pages,
            seqlens: c.seqs.iter().map(|&(a, n)| (a + n) as i32).collect(),
            cu_new,
        }
    }

    fn step(&self) -> StepTable<'_> {
        StepTable {
            table: PageTable {
                block_table: &self.block_table,
                max_pages_per_seq: self.max_pages,
                seqlens: &self.seqlens,
            },
            cu_new: &self.cu_new,
        }
    }
}

const SENTINEL: f64 = -77.0;
const SCALE_SENTINEL: f32 = -7.0;

/// What a case wrote: the whole cache and its scales, the reference, the inputs.
struct Ran<S> {
    setup: Setup,
    k: Vec<S>,
    v: Vec<S>,
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
    reference: AppendedF64,
    /// Rotated channels (0 without RoPE) and the largest position (F32 angles' error).
    rotary_dim: usize,
    f32_angles: bool,
    max_pos: usize,
    /// The new K rows as given (before rotation), dense.
    new_k: Vec<f64>,
}

fn rope_config(c: &Case) -> Option<RopeConfig> {
    c.rope.map(|(_, f, _)| {
        RopeConfig::builder(c.head_dim)
            .base(10000.0)
            .partial_rotary_factor(f)
            .build()
            .unwrap()
    })
}

fn run_case<T: Element, S: CacheElement>(
    backend: &Backend<'_>,
    c: &Case,
) -> longctx::Result<Ran<S>> {
    let mut r = common::Rng(c.seed);
    let setup = Setup::new(c, &mut r);
    let step = setup.step();
    let (h, d) = (c.heads, c.head_dim);
    let total: usize = c.seqs.iter().map(|s| s.1).sum();
    // A packed [q (h heads), k, v] buffer per token, `pad` extra elements.
    let stride = 3 * h * d + c.pad;
    let mut packed = vec![T::from_f64(0.0); total * stride + 1];
    let amp = 3.0;
    for x in packed.iter_mut() {
        *x = T::from_f64(amp * r.uniform());
    }
    // A zero row (fp8's scale-1 rule) when there are at least two tokens.
    if total >= 2 {
        for c0 in 0..d {
            packed[stride + h * d + c0] = T::from_f64(0.0);
        }
    }
    let k_layout = HeadsLayout {
        offset: h * d,
        tokens: total,
        heads: h,
        head_dim: d,
        token_stride: stride,
        head_stride: d,
    };
    let v_layout = HeadsLayout {
        offset: 2 * h * d,
        ..k_layout
    };
    let dense = |l: &HeadsLayout| -> Vec<f64> {
        let mut out = Vec::with_capacity(total * h * d);
        for t in 0..total {
            for hh in 0..h {
                let base = l.offset + t * l.token_stride + hh * l.head_stride;
                out.extend(packed[base..base + d].iter().map(|x| x.to_f64()));
            }
        }
        out
    };
    let (new_k, new_v) = (dense(&k_layout), dense(&v_layout));
    let config = rope_config(c);
    let max_len = setup.seqlens.iter().copied().max().unwrap_or(0) as usize;
    let inv = config.as_ref().map(|cfg| cfg.inv_freq_f64(max_len.max(1)));
    let rope_ref = config.as_ref().map(|cfg| AppendRopeF64 {
        inv_freq: inv.as_deref().unwrap(),
        attention_factor: f64::from(cfg.attention_factor()),
        style: c.rope.unwrap().0,
    });
    let reference = append_kv_f64(&setup.layout, &step, &new_k, &new_v, rope_ref.as_ref())?;

    let cache_len = setup.layout.cache_len()?;
    let mut k = vec![S::from_f64(SENTINEL); cache_len];
    let mut v = k.clone();
    let scale_rows = setup.layout.pages * c.page_size * h;
    let (mut k_scale, mut v_scale) = match c.store {
        Store::Same => (Vec::new(), Vec::new()),
        Store::Fp8Token => (
            vec![SCALE_SENTINEL; scale_rows],
            vec![SCALE_SENTINEL; scale_rows],
        ),
        // Some values saturate at +-448 (|x| up to 3, scale 3 / 448 x 0.7), one head finer.
        Store::Fp8Head => (
            (0..h)
                .map(|i| (amp / 448.0 * 0.7 / (1 + i) as f64) as f32)
                .collect(),
            (0..h)
                .map(|i| (amp / 448.0 * (1 + i) as f64) as f32)
                .collect(),
        ),
    };
    match backend {
        Backend::Emulator => {
            let scales = match c.store {
                Store::Same => HostScalesMut::None,
                Store::Fp8Token => HostScalesMut::PerTokenHead {
                    k: &mut k_scale,
                    v: &mut v_scale,
                },
                Store::Fp8Head => HostScalesMut::PerHead {
                    k: &k_scale,
                    v: &v_scale,
                },
            };
            emulator::append_kv::<T, S>(
                &setup.layout,
                &step,
                &HostNewKv {
                    k: &packed,
                    k_layout,
                    v: &packed,
                    v_layout,
                },
                &mut k,
                &mut v,
                scales,
                config.as_ref().map(|cfg| HostRope {
                    inv_freq: inv.as_deref().unwrap(),
                    head_dim: d,
                    attention_factor: cfg.attention_factor(),
                    max_positions: cfg.depends_on_length().then_some(max_len.max(1)),
                    style: c.rope.unwrap().0,
                    precision: c.rope.unwrap().2,
                }),
            )?;
        }
        Backend::Gpu(dev) => {
            use longctx::kv_cache::{
                append_kv, AppendRope, KvScalesMut, KvStep, NewKv, PagedCacheMut,
            };
            use longctx::rope::RopeTable;
            let dstep = KvStep::upload(dev, &setup.layout, &step)?;
            let dpacked = dev.upload(&packed)?;
            let mut dk = dev.upload(&k)?;
            let mut dv = dev.upload(&v)?;
            let one = [0f32];
            let mut dks = dev.upload(if k_scale.is_empty() {
                &one[..]
            } else {
                &k_scale
            })?;
            let mut dvs = dev.upload(if v_scale.is_empty() {
                &one[..]
            } else {
                &v_scale
            })?;
            let table = match &config {
                Some(cfg) => Some(RopeTable::new(dev, cfg, max_len.max(1))?),
                None => None,
            };
            let scales = match c.store {
                Store::Same => KvScalesMut::None,
                Store::Fp8Token => KvScalesMut::PerTokenHead {
                    k: &mut dks,
                    v: &mut dvs,
                },
                Store::Fp8Head => KvScalesMut::PerHead { k: &dks, v: &dvs },
            };
            append_kv::<T, S>(
                dev,
                &dstep,
                &NewKv {
                    k: &dpacked,
                    k_layout,
                    v: &dpacked,
                    v_layout,
                },
                PagedCacheMut {
                    layout: setup.layout,
                    k: &mut dk,
                    v: &mut dv,
                    scales,
                },
                table.as_ref().map(|t| AppendRope {
                    table: t,
                    style: c.rope.unwrap().0,
                    precision: c.rope.unwrap().2,
                }),
            )?;
            dev.synchronize()?;
            k = dev.download(&dk)?;
            v = dev.download(&dv)?;
            if c.store == Store::Fp8Token {
                k_scale = dev.download(&dks)?;
                v_scale = dev.download(&dvs)?;
            }
        }
    }
    Ok(Ran {
        setup,
        k,
        v,
        k_scale,
        v_scale,
        reference,
        rotary_dim: config.as_ref().map_or(0, |cfg| cfg.rotary_dim()),
        f32_angles: matches!(c.rope, Some((_, _, AnglePrecision::F32))),
        max_pos: max_len,
        new_k,
    })
}

/// The spacing of `T` values at |x| (one ulp).
fn ulp<T: Element>(x: f64) -> f64 {
    let eps2 = 2.0 * T::DTYPE.epsilon(); // ulp at 1
    let min_normal = match T::DTYPE {
        longctx::dtype::DType::F16 => 2f64.powi(-14),
        _ => 2f64.powi(-126),
    };
    let a = x.abs().max(min_normal);
    2f64.powi(a.log2().floor() as i32) * eps2
}

/// One fp8 quantisation step at |x| (x in units of the scale).
fn fp8_step(x: f64) -> f64 {
    let a = x.abs();
    if a < 2f64.powi(-6) {
        2f64.powi(-9)
    } else {
        2f64.powi(a.log2().floor() as i32 - 3)
    }
}

/// Checks a run against its reference (with `expect_k` in place of the reference's K rows
/// when given): the written rows within the dtype's tolerance, every other cache element
/// and scale untouched.
fn check<T: Element, S: CacheElement>(
    c: &Case,
    ran: &Ran<S>,
    expect_k: Option<&[f64]>,
) -> Result<(), String> {
    let (h, d) = (c.heads, c.head_dim);
    let reference = &ran.reference;
    let exp_k = expect_k.unwrap_or(&reference.k);
    let mut written = vec![false; ran.setup.layout.pages * c.page_size * h];
    let fp8 = c.store != Store::Same;
    for (i, &row) in reference.rows.iter().enumerate() {
        written[row] = true;
        let t = i / h;
        let hh = i % h;
        let in_max = ran.new_k[i * d..(i + 1) * d]
            .iter()
            .fold(0.0f64, |m, x| m.max(x.abs()));
        // f32 rotation and angle error: a few f32 roundings of the row's size; F32 angles
        // are off by up to |pos| x 2^-24 rad.
        let rot_err = in_max
            * (4e-7
                + if ran.f32_angles {
                    2.0 * (ran.max_pos as f64) * 2f64.powi(-24)
                } else {
                    0.0
                });
        for (is_k, cache, scales) in [(true, &ran.k, &ran.k_scale), (false, &ran.v, &ran.v_scale)] {
            let expect = if is_k {
                &exp_k[i * d..(i + 1) * d]
            } else {
                &reference.v[i * d..(i + 1) * d]
            };
            let got = &cache[row * d..(row + 1) * d];
            let rotated = is_k && ran.rotary_dim > 0;
            let name = if is_k { "K" } else { "V" };
            if !fp8 {
                for (ch, (g, e)) in got.iter().zip(expect).enumerate() {
                    let g = g.to_f64();
                    let ok = if rotated && ch < ran.rotary_dim {
                        (g - e).abs() <= ulp::<T>(*e) + rot_err
                    } else {
                        g == *e
                    };
                    if !ok {
                        return Err(format!(
                            "{name} token {t} head {hh} channel {ch} (cache row {row}): got {g}, \
                             expected {e}"
                        ));
                    }
                }
                continue;
            }
            let want_scale = if is_k {
                reference.k_scale[i]
            } else {
                reference.v_scale[i]
            };
            let scale = match c.store {
                Store::Fp8Token => {
                    let s = f64::from(scales[row]);
                    let tol = if rotated {
                        want_scale * 1e-6 + rot_err / 448.0
                    } else {
                        want_scale * 2f64.powi(-23)
                    };
                    if (s - want_scale).abs() > tol {
                        return Err(format!(
                            "{name} token {t} head {hh}: scale {s}, expected {want_scale}"
                        ));
                    }
                    s
                }
                _ => f64::from(scales[hh]),
            };
            for (ch, (g, e)) in got.iter().zip(expect).enumerate() {
                let q = g.to_f64();
                let x = (e / scale).clamp(-448.0, 448.0);
                let ok = if rotated {
                    (q - x).abs() <= fp8_step(x) + rot_err / scale
                } else {
                    // Unrotated rows: the kernel's f32 quotient rounded to nearest even.
                    let quotient = (*e as f32) / (scale as f32);
                    S::from_f64(f64::from(quotient)).to_f64() == q
                };
                if !ok {
                    return Err(format!(
                        "{name} token {t} head {hh} channel {ch} (cache row {row}): code value \
                         {q} x scale {scale}, expected {e} (= {x} scales)"
                    ));
                }
            }
        }
    }
    let sentinel = S::from_f64(SENTINEL).to_f64();
    for (row, &w) in written.iter().enumerate() {
        if w {
            continue;
        }
        for (name, cache) in [("K", &ran.k), ("V", &ran.v)] {
            if let Some(ch) = cache[row * d..(row + 1) * d]
                .iter()
                .position(|x| x.to_f64() != sentinel)
            {
                return Err(format!(
                    "{name} cache row {row} channel {ch} was written but no new token maps there"
                ));
            }
        }
        if c.store == Store::Fp8Token
            && (ran.k_scale[row] != SCALE_SENTINEL || ran.v_scale[row] != SCALE_SENTINEL)
        {
            return Err(format!("scale of cache row {row} was written"));
        }
    }
    Ok(())
}

fn run_and_check(backend: &Backend<'_>, c: &Case, dtype_bf16: bool) -> Result<(), String> {
    macro_rules! go {
        ($t:ty, $s:ty) => {{
            let ran = run_case::<$t, $s>(backend, c).map_err(|e| e.to_string())?;
            check::<$t, $s>(c, &ran, None)
        }};
    }
    match (dtype_bf16, c.store) {
        (false, Store::Same) => go!(f16, f16),
        (true, Store::Same) => go!(bf16, bf16),
        (false, _) => go!(f16, Fp8E4m3),
        (true, _) => go!(bf16, Fp8E4m3),
    }
}

fn case_strategy() -> impl Strategy<Value = (Case, bool)> {
    let page = prop::sample::select(vec![1usize, 3, 16, 64, 256]);
    let dim = prop::sample::select(vec![64usize, 128, 256, 512, 72, 8]);
    (page, dim, 1usize..=3, 1usize..=3, any::<u64>())
        .prop_flat_map(|(ps, d, heads, batch, seed)| {
            // Lengths before the step around page boundaries; new tokens 0, 1, a chunk.
            let before = prop::sample::select(vec![0usize, 1, ps - 1, ps, ps + 1, 2 * ps + 3]);
            let new = prop::sample::select(vec![0usize, 1, 2, 5, ps.min(9) + 1]);
            let seqs = prop::collection::vec((before, new), batch);
            let rope = prop_oneof![
                Just(None),
                Just(Some((RopeStyle::Neox, 1.0, AnglePrecision::F64))),
                Just(Some((RopeStyle::Interleaved, 1.0, AnglePrecision::F64))),
                Just(Some((RopeStyle::Neox, 0.5, AnglePrecision::F64))),
                Just(Some((RopeStyle::Interleaved, 0.25, AnglePrecision::F32))),
            ];
            let store = prop::sample::select(vec![Store::Same, Store::Fp8Token, Store::Fp8Head]);
            let pad = prop::sample::select(vec![0usize, 8, 1]);
            (seqs, rope, store, pad, any::<bool>()).prop_map(move |(seqs, rope, store, pad, bf)| {
                (
                    Case {
                        page_size: ps,
                        heads,
                        head_dim: d,
                        seqs,
                        rope,
                        store,
                        pad,
                        seed,
                    },
                    bf,
                )
            })
        })
        // An 8-wide head takes no partial rotation of 0.25 (rotary_dim 2 is fine).
        .prop_filter("rotary_dim even and nonzero", |(c, _)| {
            c.rope.map_or(true, |(_, f, _)| {
                ((c.head_dim as f64 * f) as usize) % 2 == 0
            })
        })
}

fn parity_on(name: &str, backend: &Backend<'_>, cases: u32) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/kv-append.txt",
            ),
        )),
        ..ProptestConfig::default()
    });
    runner
        .run(&case_strategy(), |(c, bf)| {
            run_and_check(backend, &c, bf)
                .map_err(|e| TestCaseError::fail(format!("{c:?} bf16={bf}: {e}")))
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn emu_cases() -> u32 {
    std::env::var("LONGCTX_EMU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

#[test]
fn emu_append_parity() {
    parity_on("emu_append_parity", &Backend::Emulator, emu_cases());
}

/// Fixed edge cases for every dtype and store: page sizes 1 and 256, a sequence starting at
/// a page boundary, one ending exactly on one, empty sequences between others, the vector
/// and scalar kernels, NeoX and interleaved RoPE with partial rotation.
fn edges_on(backend: &Backend<'_>) {
    // (page_size, heads, head_dim, (before, new) per sequence, pad)
    type Shape = (usize, usize, usize, &'static [(usize, usize)], usize);
    let shapes: &[Shape] = &[
        (1, 2, 128, &[(0, 3), (5, 0), (2, 1)], 0),
        (16, 1, 64, &[(15, 1), (16, 16), (0, 17)], 8),
        (256, 2, 72, &[(255, 2), (0, 0), (1, 4)], 1),
        (3, 1, 512, &[(0, 0), (6, 3), (2, 2)], 0),
        (64, 1, 1024, &[(63, 2)], 0),
    ];
    let ropes = [
        None,
        Some((RopeStyle::Neox, 0.5, AnglePrecision::F64)),
        Some((RopeStyle::Interleaved, 1.0, AnglePrecision::F64)),
    ];
    for (i, &(ps, heads, d, seqs, pad)) in shapes.iter().enumerate() {
        for (j, rope) in ropes.iter().enumerate() {
            // RoPE rotates at most 512 channels.
            if rope.is_some_and(|(_, f, _)| d as f64 * f > 512.0) {
                continue;
            }
            for store in [Store::Same, Store::Fp8Token, Store::Fp8Head] {
                for bf in [false, true] {
                    let c = Case {
                        page_size: ps,
                        heads,
                        head_dim: d,
                        seqs: seqs.to_vec(),
                        rope: *rope,
                        store,
                        pad,
                        seed: (i * 10 + j) as u64,
                    };
                    run_and_check(backend, &c, bf)
                        .unwrap_or_else(|e| panic!("{c:?} bf16={bf}: {e}"));
                }
            }
        }
    }
}

#[test]
fn emu_append_edges() {
    edges_on(&Backend::Emulator);
}

/// The checker is sharp enough to see a position off by one: the same output compared with
/// K rotated at p + 1 fails (and passes at p).
#[test]
fn emu_wrong_rope_position_is_caught() {
    for (style, bf) in [(RopeStyle::Neox, false), (RopeStyle::Interleaved, true)] {
        let c = Case {
            page_size: 16,
            heads: 2,
            head_dim: 128,
            seqs: vec![(40, 3), (0, 2)],
            rope: Some((style, 1.0, AnglePrecision::F64)),
            store: Store::Same,
            pad: 0,
            seed: 5,
        };
        macro_rules! go {
            ($t:ty) => {{
                let ran = run_case::<$t, $t>(&Backend::Emulator, &c).unwrap();
                check::<$t, $t>(&c, &ran, None).unwrap();
                let config = rope_config(&c).unwrap();
                let inv = config.inv_freq_f64(ran.max_pos);
                for shift in [1i32, -1] {
                    let mut shifted = ran.new_k.clone();
                    for (t, &p) in ran.reference.positions.iter().enumerate() {
                        let n = c.heads * c.head_dim;
                        longctx::rope::reference::apply_rope_f64(
                            &mut shifted[t * n..(t + 1) * n],
                            &HeadsLayout::contiguous(1, c.heads, c.head_dim),
                            &[(p as i32 + shift).max(0)],
                            &inv,
                            1.0,
                            style,
                            longctx::rope::Direction::Forward,
                        )
                        .unwrap();
                    }
                    assert!(
                        check::<$t, $t>(&c, &ran, Some(&shifted)).is_err(),
                        "a rotation at p {shift:+} passed the check"
                    );
                }
            }};
        }
        if bf {
            go!(bf16)
        } else {
            go!(f16)
        }
    }
}

/// The fused rotation equals the RoPE kernel's forward bit for bit (same angle code, same
/// f32 arithmetic), in both angle modes, with an attention factor.
#[test]
fn emu_rotation_matches_the_rope_kernel() {
    for (style, precision) in [
        (RopeStyle::Neox, AnglePrecision::F64),
        (RopeStyle::Interleaved, AnglePrecision::F32),
    ] {
        let (ps, h, d) = (8usize, 2usize, 128usize);
        let config = RopeConfig::builder(d)
            .base(500000.0)
            .partial_rotary_factor(0.5)
            .build()
            .unwrap();
        let layout = PagedKvLayout {
            page_size: ps,
            pages: 200,
            heads_kv: h,
            head_dim: d,
        };
        // One sequence of 1500 tokens whose last 3 are new: positions 1497..1500.
        let table: Vec<i32> = (0..200).rev().collect();
        let seqlens = [1500i32];
        let cu_new = [0, 3];
        let step = StepTable {
            table: PageTable {
                block_table: &table,
                max_pages_per_seq: 200,
                seqlens: &seqlens,
            },
            cu_new: &cu_new,
        };
        let mut r = common::Rng(11);
        let new: Vec<bf16> = (0..3 * h * d)
            .map(|_| bf16::from_f64(r.uniform()))
            .collect();
        let inv = config.inv_freq_f64(1500);
        let factor = 1.25f32;
        let mut k = vec![bf16::from_f64(0.0); layout.cache_len().unwrap()];
        let mut v = k.clone();
        let nl = HeadsLayout::contiguous(3, h, d);
        emulator::append_kv::<bf16, bf16>(
            &layout,
            &step,
            &HostNewKv {
                k: &new,
                k_layout: nl,
                v: &new,
                v_layout: nl,
            },
            &mut k,
            &mut v,
            HostScalesMut::None,
            Some(HostRope {
                inv_freq: &inv,
                head_dim: d,
                attention_factor: factor,
                max_positions: None,
                style,
                precision,
            }),
        )
        .unwrap();
        // The RoPE kernel on the same rows at the same positions. Its table comes from the
        // config (attention factor 1), so compare the factor-free case through a second
        // append with factor 1, and the factor's effect separately.
        let mut rot = new.clone();
        let mut none: Vec<bf16> = Vec::new();
        emulator::apply_rope::<bf16>(
            &config,
            1500,
            &[1497, 1498, 1499],
            &mut none,
            &HeadsLayout::contiguous(3, 0, d),
            &mut rot,
            &nl,
            longctx::rope::RopeOptions {
                style,
                direction: longctx::rope::Direction::Forward,
                precision,
            },
        )
        .unwrap();
        let mut k1 = vec![bf16::from_f64(0.0); layout.cache_len().unwrap()];
        let mut v1 = k1.clone();
        emulator::append_kv::<bf16, bf16>(
            &layout,
            &step,
            &HostNewKv {
                k: &new,
                k_layout: nl,
                v: &new,
                v_layout: nl,
            },
            &mut k1,
            &mut v1,
            HostScalesMut::None,
            Some(HostRope {
                inv_freq: &inv,
                head_dim: d,
                attention_factor: 1.0,
                max_positions: None,
                style,
                precision,
            }),
        )
        .unwrap();
        for t in 0..3 {
            let p = 1497 + t;
            let page = table[p / ps] as usize;
            for hh in 0..h {
                let row = ((page * ps + p % ps) * h + hh) * d;
                let src = (t * h + hh) * d;
                for c in 0..d {
                    assert_eq!(
                        k1[row + c].to_bits(),
                        rot[src + c].to_bits(),
                        "{style:?} {precision:?} token {t} head {hh} channel {c}"
                    );
                    // V is a copy; K's rotated channels with factor 1.25 are 1.25 x the
                    // factor-1 rotation (to bf16 rounding of the f32 products).
                    assert_eq!(v1[row + c].to_bits(), new[src + c].to_bits());
                    // Channels past rotary_dim are copied, unscaled.
                    let f = if c < config.rotary_dim() { 1.25 } else { 1.0 };
                    let want = f * k1[row + c].to_f64();
                    let got = k[row + c].to_f64();
                    assert!(
                        (got - want).abs() <= 2.0 * ulp::<bf16>(want) + 1e-6,
                        "factor: {got} vs {want}"
                    );
                }
            }
        }
    }
}

mod errors {
    use super::*;

    fn arg_of<T: std::fmt::Debug>(r: longctx::Result<T>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    struct Fixture {
        layout: PagedKvLayout,
        table: Vec<i32>,
        seqlens: Vec<i32>,
        cu_new: Vec<i32>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                layout: PagedKvLayout {
                    page_size: 4,
                    pages: 4,
                    heads_kv: 2,
                    head_dim: 16,
                },
                table: vec![3, 1, 0, 2],
                seqlens: vec![6, 3],
                cu_new: vec![0, 2, 5],
            }
        }
        fn step(&self) -> StepTable<'_> {
            StepTable {
                table: PageTable {
                    block_table: &self.table,
                    max_pages_per_seq: 2,
                    seqlens: &self.seqlens,
                },
                cu_new: &self.cu_new,
            }
        }
    }

    /// Runs the emulator op on the fixture with one thing changed.
    #[allow(clippy::too_many_arguments)]
    fn call<T: Element, S: CacheElement>(
        f: &Fixture,
        k_layout: HeadsLayout,
        v_layout: HeadsLayout,
        new_len: usize,
        cache_len: usize,
        scales: HostScalesMut,
        rope: Option<HostRope>,
    ) -> longctx::Result<()> {
        let new = vec![T::from_f64(0.5); new_len];
        let mut k = vec![S::from_f64(0.0); cache_len];
        let mut v = vec![S::from_f64(0.0); f.layout.cache_len().unwrap()];
        emulator::append_kv::<T, S>(
            &f.layout,
            &f.step(),
            &HostNewKv {
                k: &new,
                k_layout,
                v: &new,
                v_layout,
            },
            &mut k,
            &mut v,
            scales,
            rope,
        )
    }

    #[test]
    fn append_validation() {
        let f = Fixture::new();
        let (h, d) = (2, 16);
        let good = HeadsLayout::contiguous(5, h, d);
        let n = 5 * h * d;
        let cl = f.layout.cache_len().unwrap();
        let srows = 4 * 4 * h;
        // The fixture itself is fine, in every accepted dtype pair.
        call::<f16, f16>(&f, good, good, n, cl, HostScalesMut::None, None).unwrap();
        call::<bf16, bf16>(&f, good, good, n, cl, HostScalesMut::None, None).unwrap();
        let (mut ks, mut vs) = (vec![0f32; srows], vec![0f32; srows]);
        call::<bf16, Fp8E4m3>(
            &f,
            good,
            good,
            n,
            cl,
            HostScalesMut::PerTokenHead {
                k: &mut ks,
                v: &mut vs,
            },
            None,
        )
        .unwrap();
        // Rows of one type in a cache of another.
        assert_eq!(
            arg_of(call::<f16, bf16>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::None,
                None
            )),
            "cache"
        );
        assert_eq!(
            arg_of(call::<f32, Fp8E4m3>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::PerHead {
                    k: &[1.0; 2],
                    v: &[1.0; 2]
                },
                None
            )),
            "cache"
        );
        // Token count, heads, head dim.
        let more = HeadsLayout::contiguous(6, h, d);
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                more,
                good,
                6 * h * d,
                cl,
                HostScalesMut::None,
                None
            )),
            "new.k"
        );
        let heads = HeadsLayout::contiguous(5, 1, d);
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                heads,
                n,
                cl,
                HostScalesMut::None,
                None
            )),
            "new.v"
        );
        let dim = HeadsLayout::contiguous(5, h, 8);
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                dim,
                good,
                n,
                cl,
                HostScalesMut::None,
                None
            )),
            "new.k"
        );
        // A view past its buffer, overlapping rows.
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                good,
                n - 1,
                cl,
                HostScalesMut::None,
                None
            )),
            "new.k"
        );
        let overlap = HeadsLayout {
            head_stride: 8,
            ..good
        };
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                overlap,
                n,
                cl,
                HostScalesMut::None,
                None
            )),
            "new.v"
        );
        // A short cache.
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                good,
                n,
                cl - 1,
                HostScalesMut::None,
                None
            )),
            "cache.k"
        );
        // fp8 without scales, f16 with them, short scales of both modes.
        assert_eq!(
            arg_of(call::<f16, Fp8E4m3>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::None,
                None
            )),
            "cache.scales"
        );
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::PerHead {
                    k: &[1.0; 2],
                    v: &[1.0; 2]
                },
                None
            )),
            "cache.scales"
        );
        let (mut ks, mut vs) = (vec![0f32; srows - 1], vec![0f32; srows]);
        assert_eq!(
            arg_of(call::<f16, Fp8E4m3>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::PerTokenHead {
                    k: &mut ks,
                    v: &mut vs
                },
                None
            )),
            "cache.k_scale"
        );
        assert_eq!(
            arg_of(call::<f16, Fp8E4m3>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::PerHead {
                    k: &[1.0; 2],
                    v: &[1.0; 1]
                },
                None
            )),
            "cache.v_scale"
        );
        // RoPE: a table of another head dim, a rotary dim past head_dim, a length-dependent
        // table too short for the positions written.
        let rope = |head_dim, inv: &'static [f64], max_positions| HostRope {
            inv_freq: inv,
            head_dim,
            attention_factor: 1.0,
            max_positions,
            style: RopeStyle::Neox,
            precision: AnglePrecision::F64,
        };
        call::<f16, f16>(
            &f,
            good,
            good,
            n,
            cl,
            HostScalesMut::None,
            Some(rope(16, &[1.0, 0.5, 0.25, 0.125], Some(6))),
        )
        .unwrap();
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::None,
                Some(rope(32, &[1.0, 0.5], None))
            )),
            "rope"
        );
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::None,
                Some(rope(16, &[1.0; 9], None))
            )),
            "rope"
        );
        assert_eq!(
            arg_of(call::<f16, f16>(
                &f,
                good,
                good,
                n,
                cl,
                HostScalesMut::None,
                Some(rope(16, &[1.0], Some(5)))
            )),
            "rope"
        );
        // A step validated for another layout (the GPU op's KvStep carries its layout).
        let vstep = f.layout.validate_step(&f.step()).unwrap();
        let shape = AppendShape {
            cache: CacheShape::of::<f16>(f.layout, cl, cl, None),
            k: good,
            k_len: n,
            v: good,
            v_len: n,
            rope: None,
        };
        shape.validate::<f16, f16>(&vstep, &f.layout).unwrap();
        let other = PagedKvLayout {
            pages: 5,
            ..f.layout
        };
        assert_eq!(arg_of(shape.validate::<f16, f16>(&vstep, &other)), "step");
        // A cache shape that says bf16 for an f16 cache.
        let lying = AppendShape {
            cache: CacheShape::of::<bf16>(f.layout, cl, cl, None),
            ..shape
        };
        assert_eq!(
            arg_of(lying.validate::<f16, f16>(&vstep, &f.layout)),
            "cache"
        );
    }

    /// A head dim past the scalar kernel's limit with an element-aligned view is a typed
    /// "unsupported"; the same head dim with aligned views runs.
    #[test]
    fn wide_heads_need_the_vector_kernel() {
        let layout = PagedKvLayout {
            page_size: 2,
            pages: 1,
            heads_kv: 1,
            head_dim: 1024,
        };
        let table = [0];
        let seqlens = [1];
        let cu_new = [0, 1];
        let step = StepTable {
            table: PageTable {
                block_table: &table,
                max_pages_per_seq: 1,
                seqlens: &seqlens,
            },
            cu_new: &cu_new,
        };
        let new = vec![f16::from_f64(1.0); 1024 + 1];
        let mut k = vec![f16::from_f64(0.0); 2048];
        let mut v = k.clone();
        let run = |offset: usize, k: &mut [f16], v: &mut [f16]| {
            let l = HeadsLayout {
                offset,
                ..HeadsLayout::contiguous(1, 1, 1024)
            };
            emulator::append_kv::<f16, f16>(
                &layout,
                &step,
                &HostNewKv {
                    k: &new,
                    k_layout: l,
                    v: &new,
                    v_layout: l,
                },
                k,
                v,
                HostScalesMut::None,
                None,
            )
        };
        match run(1, &mut k, &mut v) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
            Ok(()) => panic!("an element-aligned 1024-wide row was accepted"),
        }
        if new.as_ptr() as usize % 16 == 0 {
            run(0, &mut k, &mut v).unwrap();
            assert!(k[..1024].iter().all(|x| x.to_f64() == 1.0));
        }
    }

    /// The reference rejects two new tokens in one slot and wrong row counts.
    #[test]
    fn reference_validation() {
        let f = Fixture::new();
        let n = 5 * 2 * 16;
        let new = vec![0.0; n];
        let out = append_kv_f64(&f.layout, &f.step(), &new, &new, None).unwrap();
        // The expected cache: the rows land in their slots, nothing else moves.
        let cl = f.layout.cache_len().unwrap();
        let (mut ck, mut cv) = (vec![9.0; cl], vec![9.0; cl]);
        out.scatter(16, &mut ck, &mut cv).unwrap();
        assert_eq!(ck.iter().filter(|&&x| x == 0.0).count(), n);
        assert_eq!(cv.iter().filter(|&&x| x == 0.0).count(), n);
        // seq 0's new tokens at positions 4, 5: page 1 slots 0, 1; seq 1's at page 0.
        assert_eq!(&out.rows, &[8, 9, 10, 11, 0, 1, 2, 3, 4, 5]);
        assert_eq!(&out.positions, &[4, 5, 0, 1, 2]);
        assert_eq!(arg_of(out.scatter(8, &mut ck, &mut cv)), "head_dim");
        assert_eq!(arg_of(out.scatter(16, &mut ck[..100], &mut cv)), "cache");
        assert_eq!(
            arg_of(append_kv_f64(&f.layout, &f.step(), &new[1..], &new, None)),
            "new_k"
        );
        assert_eq!(
            arg_of(append_kv_f64(&f.layout, &f.step(), &new, &new[1..], None)),
            "new_v"
        );
        // Both sequences' new tokens in page 1 at slots 0..: the second shares page 1.
        let shared = Fixture {
            table: vec![3, 1, 1, 2],
            ..Fixture::new()
        };
        assert_eq!(
            arg_of(append_kv_f64(
                &shared.layout,
                &shared.step(),
                &new,
                &new,
                None
            )),
            "block_table"
        );
        let rope = AppendRopeF64 {
            inv_freq: &[1.0; 9],
            attention_factor: 1.0,
            style: RopeStyle::Neox,
        };
        assert_eq!(
            arg_of(append_kv_f64(&f.layout, &f.step(), &new, &new, Some(&rope))),
            "rope"
        );
    }
}

fn gpu_cases() -> u32 {
    std::env::var("LONGCTX_PARITY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_append_parity() {
    let Some(dev) = common::gpu("gpu_append_parity") else {
        return;
    };
    parity_on("gpu_append_parity", &Backend::Gpu(&dev), gpu_cases());
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_append_edges() {
    let Some(dev) = common::gpu("gpu_append_edges") else {
        return;
    };
    edges_on(&Backend::Gpu(&dev));
}
