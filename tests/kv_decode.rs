//! Decode over a paged cache: the kernel through the emulator (its CUDA source on the CPU,
//! race and bounds checkers on) against the f64 reference over the logical cache, on page
//! sizes 1 to 256, edge lengths, GQA ratios, 1 to 16 query tokens, head dims 64 to 512,
//! f16 / bf16 / fp8 caches (both scale layouts), windows, softcap and split counts; the
//! invariants (paging and splitting are invisible); validation; GPU twins (`#[ignore]`d).

mod common;

use common::Aligned;

use half::{bf16, f16};
use longctx::attention::reference::Output;
use longctx::dtype::{DType, Element};
use longctx::emulator::{self, HostCache, HostDecodeOutput};
use longctx::kv_cache::reference::{decode_f64, DecodeMath};
use longctx::kv_cache::{
    plan_decode, CacheElement, DecodeOptions, DecodePlan, Fp8E4m3, LseLayout, PageTable,
    PagedKvLayout, ScaleMode, Splits, StepTable,
};
use longctx::layout::HeadsLayout;
use longctx::Error;
use proptest::prelude::*;

/// One decode problem: the logical cache, the paging, the queries.
#[derive(Debug, Clone)]
struct Case {
    page_size: usize,
    heads_kv: usize,
    group: usize,
    head_dim: usize,
    /// Cache length of each sequence (after the step).
    lens: Vec<usize>,
    /// New tokens of each sequence.
    news: Vec<usize>,
    scale_mode: Option<ScaleMode>,
    window_left: Option<usize>,
    softcap: Option<f32>,
    seed: u64,
    /// Shuffle the page ids (and leave spare pages).
    shuffle: bool,
}

/// The step's host arrays and the cache values in storage type S.
struct Built<S> {
    layout: PagedKvLayout,
    block_table: Vec<i32>,
    max_pages: usize,
    seqlens: Vec<i32>,
    cu_new: Vec<i32>,
    k: Vec<S>,
    v: Vec<S>,
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
    /// The cache's values (code x scale for fp8), as the reference reads them.
    k_val: Vec<f64>,
    v_val: Vec<f64>,
    q_val: Vec<f64>,
    heads_q: usize,
    total_new: usize,
}

impl Case {
    fn build<T: Element, S: CacheElement>(&self) -> Built<S> {
        let mut r = common::Rng(self.seed);
        let ps = self.page_size;
        let used: Vec<usize> = self.lens.iter().map(|l| l.div_ceil(ps)).collect();
        let max_pages = used.iter().copied().max().unwrap_or(0) + usize::from(self.shuffle);
        let pages = used.iter().sum::<usize>() + if self.shuffle { 3 } else { 0 };
        let mut ids: Vec<i32> = (0..pages as i32).collect();
        if self.shuffle {
            for i in (1..ids.len()).rev() {
                ids.swap(i, r.below(i as u64 + 1) as usize);
            }
        }
        let mut block_table = vec![-1i32; self.lens.len() * max_pages];
        let mut next = 0;
        for (b, &u) in used.iter().enumerate() {
            for i in 0..u {
                block_table[b * max_pages + i] = ids[next];
                next += 1;
            }
        }
        let layout = PagedKvLayout {
            page_size: ps,
            pages,
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
        };
        let n = layout.cache_len().unwrap();
        let rows = pages * ps * self.heads_kv;
        let d = self.head_dim;
        let fp8 = self.scale_mode.is_some();
        // Scales: per (token, head) spread over two octaves, or per head.
        let (k_scale, v_scale): (Vec<f32>, Vec<f32>) = match self.scale_mode {
            Some(ScaleMode::PerTokenHead) => (0..rows)
                .map(|_| {
                    (
                        (0.004 * (1.5 + r.uniform())) as f32,
                        (0.003 * (1.5 + r.uniform())) as f32,
                    )
                })
                .unzip(),
            Some(ScaleMode::PerHead) => (0..self.heads_kv)
                .map(|_| {
                    (
                        (0.004 * (1.5 + r.uniform())) as f32,
                        (0.003 * (1.5 + r.uniform())) as f32,
                    )
                })
                .unzip(),
            None => (Vec::new(), Vec::new()),
        };
        let scale_of = |s: &[f32], i: usize| -> f64 {
            match self.scale_mode {
                Some(ScaleMode::PerTokenHead) => f64::from(s[i / d]),
                Some(ScaleMode::PerHead) => f64::from(s[(i / d) % self.heads_kv]),
                None => 1.0,
            }
        };
        let mut gen = |scales: &[f32], amp: f64| -> (Vec<S>, Vec<f64>) {
            let mut st = Vec::with_capacity(n);
            let mut val = Vec::with_capacity(n);
            for i in 0..n {
                let x = amp * r.uniform();
                let sc = scale_of(scales, i);
                let e = S::from_f64(if fp8 { x / sc } else { x });
                st.push(e);
                val.push(e.to_f64() * sc);
            }
            (st, val)
        };
        let (k, k_val) = gen(&k_scale, 1.5);
        let (v, v_val) = gen(&v_scale, 1.0);
        let heads_q = self.heads_kv * self.group;
        let total_new: usize = self.news.iter().sum();
        let q_val: Vec<f64> = (0..total_new * heads_q * d)
            .map(|_| T::from_f64(1.5 * r.uniform()).to_f64())
            .collect();
        let mut cu_new = vec![0i32];
        for &x in &self.news {
            cu_new.push(cu_new.last().unwrap() + x as i32);
        }
        Built {
            layout,
            block_table,
            max_pages,
            seqlens: self.lens.iter().map(|&l| l as i32).collect(),
            cu_new,
            k,
            v,
            k_scale,
            v_scale,
            k_val,
            v_val,
            q_val,
            heads_q,
            total_new,
        }
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    fn options(&self, splits: Splits) -> DecodeOptions {
        DecodeOptions {
            softmax_scale: Some(self.scale()),
            softcap: self.softcap,
            window_left: self.window_left,
            splits,
        }
    }
}

impl<S> Built<S> {
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

/// Runs a case through the emulator with `splits` for a device of `sm_count` SMs; returns
/// O (widened), the LSE and the plan.
fn run_emu<T: Element, S: CacheElement>(
    c: &Case,
    b: &Built<S>,
    splits: Splits,
    sm_count: usize,
) -> (Vec<f64>, Vec<f32>, DecodePlan) {
    let q: Vec<T> = b.q_val.iter().map(|&x| T::from_f64(x)).collect();
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
    let k = Aligned::new(&b.k);
    let v = Aligned::new(&b.v);
    let cache = HostCache {
        layout: b.layout,
        k: k.as_slice(),
        v: v.as_slice(),
        scales: c
            .scale_mode
            .map(|m| (m, b.k_scale.as_slice(), b.v_scale.as_slice())),
    };
    let sv = b.layout.validate_step(&b.step()).unwrap();
    let plan = plan_decode(
        &sv,
        b.heads_q,
        c.heads_kv,
        c.head_dim,
        S::CACHE_DTYPE,
        sm_count,
        splits,
    )
    .unwrap();
    let mut ws = vec![
        f32::NAN;
        plan.workspace_len(b.total_new, b.heads_q, c.head_dim)
            .unwrap()
    ];
    // Poisoned outputs: every element must be written.
    let mut o = vec![T::from_f64(f64::NAN); ql.numel().unwrap()];
    let mut lse = vec![f32::NAN; b.heads_q * b.total_new];
    let ran = emulator::decode::<T, S>(
        &b.step(),
        &q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, b.total_new))),
        },
        &mut ws,
        sm_count,
        &c.options(splits),
    )
    .unwrap();
    assert_eq!(ran, plan);
    (o.iter().map(|x| x.to_f64()).collect(), lse, plan)
}

fn reference<S>(c: &Case, b: &Built<S>) -> Output<f64> {
    decode_f64(
        &b.layout,
        &b.step(),
        &b.q_val,
        b.heads_q,
        &b.k_val,
        &b.v_val,
        &DecodeMath {
            scale: f64::from(c.scale()),
            softcap: c.softcap.map(f64::from),
            window_left: c.window_left,
        },
    )
    .unwrap()
}

/// O within the output dtype's rounding of the f64 value plus f32 accumulation error, plus,
/// on the tensor-core kernel (`p_rounding` = max |V|), P's rounding to the dtype before the
/// P V product (each weight off by at most eps relative: |dO| <= eps max |V|); the LSE
/// (summed from unrounded P) within f32 score error; -inf rows must match exactly.
fn check_p(
    tag: &str,
    dtype: DType,
    got_o: &[f64],
    got_lse: &[f32],
    want: &Output<f64>,
    p_rounding: f64,
) {
    assert_eq!(got_o.len(), want.o.len(), "{tag}");
    let eps = dtype.epsilon();
    for (i, (g, w)) in got_o.iter().zip(&want.o).enumerate() {
        let tol = 1.01 * eps * (w.abs() + p_rounding) + 2e-5;
        assert!(
            (g - w).abs() <= tol,
            "{tag}: O[{i}] = {g}, reference {w} (tolerance {tol:e})"
        );
    }
    for (i, (g, w)) in got_lse.iter().zip(&want.lse).enumerate() {
        let g = f64::from(*g);
        if *w == f64::NEG_INFINITY {
            assert_eq!(g, f64::NEG_INFINITY, "{tag}: LSE[{i}] of a row with no key");
        } else {
            let tol = 2e-5 * (1.0 + w.abs());
            assert!(
                (g - w).abs() <= tol,
                "{tag}: LSE[{i}] = {g}, reference {w} (tolerance {tol:e})"
            );
        }
    }
}

/// The P-rounding allowance of a plan's kernel for this cache.
fn p_rounding<S>(plan: &DecodePlan, b: &Built<S>) -> f64 {
    if plan.tiles.tensor_cores {
        b.v_val.iter().fold(0.0, |m, x| m.max(x.abs()))
    } else {
        0.0
    }
}

fn parity<T: Element, S: CacheElement>(
    tag: &str,
    c: &Case,
    splits: Splits,
    sm: usize,
) -> DecodePlan {
    let b = c.build::<T, S>();
    let (o, lse, plan) = run_emu::<T, S>(c, &b, splits, sm);
    let want = reference(c, &b);
    let pr = p_rounding(&plan, &b);
    check_p(
        &format!("{tag} {c:?} plan {plan:?}"),
        T::DTYPE,
        &o,
        &lse,
        &want,
        pr,
    );
    plan
}

fn base(page_size: usize, lens: Vec<usize>, news: Vec<usize>) -> Case {
    Case {
        page_size,
        heads_kv: 2,
        group: 2,
        head_dim: 64,
        lens,
        news,
        scale_mode: None,
        window_left: None,
        softcap: None,
        seed: 1,
        shuffle: true,
    }
}

/// Every page size of the issue against lengths around a page (0 new tokens with an empty
/// cache, 1, page - 1, page, page + 1, several pages), unsplit and split.
#[test]
fn emu_decode_page_sizes_and_edge_lengths() {
    for ps in [1usize, 3, 16, 64, 256] {
        let mut lens = vec![0, 1, ps.saturating_sub(1).max(1), ps, ps + 1];
        lens.push(3 * ps + 5);
        let news: Vec<usize> = lens.iter().map(|&l| l.min(1 + l % 3)).collect();
        let mut c = base(ps, lens, news);
        c.seed = ps as u64;
        let p = parity::<bf16, bf16>("bf16", &c, Splits::AtMost(1), 1);
        assert_eq!(p.splits, 1);
        let p = parity::<bf16, bf16>("bf16 split", &c, Splits::AtMost(5), 1);
        assert!(p.splits > 1 || c.lens.iter().max().unwrap() <= &p.chunk);
    }
}

/// Head dims 64 to 512, f16 and bf16, fp8 with both scale layouts, GQA 1 to 8, 1 to 16
/// query tokens (more rows than one CTA holds), window and softcap.
#[test]
fn emu_decode_dims_dtypes_and_masks() {
    let mut seed = 100;
    for d in [64usize, 128, 256, 512] {
        for (group, news) in [(1usize, vec![1usize, 2]), (4, vec![3, 1]), (8, vec![16, 1])] {
            seed += 1;
            let mut c = base(16, vec![70, 33], news);
            c.head_dim = d;
            c.group = group;
            c.heads_kv = if d == 512 { 1 } else { 2 };
            c.seed = seed;
            parity::<bf16, bf16>("bf16", &c, Splits::Auto, 2);
            parity::<f16, f16>("f16", &c, Splits::AtMost(3), 1);
            c.scale_mode = Some(ScaleMode::PerTokenHead);
            parity::<bf16, Fp8E4m3>("bf16 fp8/token", &c, Splits::Auto, 2);
            c.scale_mode = Some(ScaleMode::PerHead);
            c.window_left = Some(9);
            c.softcap = Some(5.0);
            parity::<f16, Fp8E4m3>("f16 fp8/head window softcap", &c, Splits::AtMost(2), 1);
        }
    }
}

/// The same logical cache under page sizes 1, 7 and 64, in order or shuffled, gives
/// bit-identical outputs: paging only changes addresses.
#[test]
fn emu_decode_paging_is_invisible() {
    let case = |ps: usize, shuffle: bool| {
        let mut c = base(ps, vec![130, 5, 64], vec![2, 1, 4]);
        c.shuffle = shuffle;
        c.group = 3;
        c.seed = 9;
        c
    };
    // The logical cache and queries: those of the first paging.
    let c0 = case(1, false);
    let b0 = c0.build::<bf16, bf16>();
    let (k0, v0) = (dense_of(&b0, &b0.k), dense_of(&b0, &b0.v));
    let mut results: Vec<(Vec<f64>, Vec<u32>)> = Vec::new();
    for (ps, shuffle) in [(1usize, false), (7, true), (64, true), (64, false)] {
        let c = case(ps, shuffle);
        let mut b = c.build::<bf16, bf16>();
        let st = b.step_owned();
        scatter(&b.layout, &st, &k0, &mut b.k);
        scatter(&b.layout, &st, &v0, &mut b.v);
        b.q_val.clone_from(&b0.q_val);
        let (o, lse, _) = run_emu::<bf16, bf16>(&c, &b, Splits::AtMost(1), 1);
        results.push((o, lse.iter().map(|x| x.to_bits()).collect()));
    }
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "O depends on the paging");
        assert_eq!(r.1, results[0].1, "LSE depends on the paging");
    }
}

/// Owned copy of a built step's tables (to scatter while the cache is borrowed mutably).
struct OwnedStep {
    block_table: Vec<i32>,
    max_pages: usize,
    seqlens: Vec<i32>,
}

impl<S> Built<S> {
    fn step_owned(&self) -> OwnedStep {
        OwnedStep {
            block_table: self.block_table.clone(),
            max_pages: self.max_pages,
            seqlens: self.seqlens.clone(),
        }
    }
}

/// The dense `[tokens, heads_kv, head_dim]` rows of a paged cache, sequences concatenated.
fn dense_of<S: Copy>(b: &Built<S>, cache: &[S]) -> Vec<S> {
    let l = &b.layout;
    let row = l.heads_kv * l.head_dim;
    let mut out = Vec::new();
    for (s, &len) in b.seqlens.iter().enumerate() {
        for t in 0..len as usize {
            let page = b.block_table[s * b.max_pages + t / l.page_size] as usize;
            let at = (page * l.page_size + t % l.page_size) * row;
            out.extend_from_slice(&cache[at..at + row]);
        }
    }
    out
}

fn scatter<S: Copy>(l: &PagedKvLayout, st: &OwnedStep, dense: &[S], cache: &mut [S]) {
    let row = l.heads_kv * l.head_dim;
    let mut i = 0;
    for (s, &len) in st.seqlens.iter().enumerate() {
        for t in 0..len as usize {
            let page = st.block_table[s * st.max_pages + t / l.page_size] as usize;
            let at = (page * l.page_size + t % l.page_size) * row;
            cache[at..at + row].copy_from_slice(&dense[i..i + row]);
            i += row;
        }
    }
    assert_eq!(i, dense.len());
}

/// Splitting changes only f32 rounding: outputs under 1, 2 and many splits agree with
/// each other and with the reference; Auto splits a small batch on a large device and
/// leaves a large batch unsplit.
#[test]
fn emu_decode_split_count_is_invisible() {
    let mut c = base(16, vec![300, 1, 77], vec![1, 1, 2]);
    c.group = 4;
    c.seed = 33;
    let b = c.build::<bf16, bf16>();
    let want = reference(&c, &b);
    for splits in [Splits::AtMost(1), Splits::AtMost(2), Splits::AtMost(50)] {
        let (o, lse, plan) = run_emu::<bf16, bf16>(&c, &b, splits, 1);
        let pr = p_rounding(&plan, &b);
        check_p(
            &format!("{splits:?} -> {plan:?}"),
            DType::BF16,
            &o,
            &lse,
            &want,
            pr,
        );
    }
    let sv = b.layout.validate_step(&b.step()).unwrap();
    let small = plan_decode(
        &sv,
        8,
        2,
        64,
        longctx::kv_cache::CacheDType::BF16,
        132,
        Splits::Auto,
    )
    .unwrap();
    assert!(small.splits > 1, "{small:?}");
    let big = plan_decode(
        &sv,
        8,
        2,
        64,
        longctx::kv_cache::CacheDType::BF16,
        1,
        Splits::Auto,
    )
    .unwrap();
    assert_eq!(big.splits, 1, "{big:?}");
}

/// A key off by one is caught: with one query per sequence and the last key's value far
/// from the others, dropping or adding a key moves O by far more than the tolerance.
#[test]
fn emu_decode_sees_exactly_its_keys() {
    let mut c = base(4, vec![9, 17], vec![1, 3]);
    c.group = 1;
    c.seed = 5;
    let mut b = c.build::<f16, f16>();
    // Make every cached V row of the last position of each sequence large.
    let want_before = reference(&c, &b);
    let l = b.layout;
    for (s, &len) in b.seqlens.clone().iter().enumerate() {
        let t = len as usize - 1;
        let page = b.block_table[s * b.max_pages + t / l.page_size] as usize;
        let at = (page * l.page_size + t % l.page_size) * l.heads_kv * l.head_dim;
        for i in at..at + l.heads_kv * l.head_dim {
            b.v[i] = f16::from_f64(8.0);
            b.v_val[i] = 8.0;
        }
    }
    let want = reference(&c, &b);
    let moved = want
        .o
        .iter()
        .zip(&want_before.o)
        .map(|(a, x)| (a - x).abs())
        .fold(0.0, f64::max);
    assert!(moved > 0.05, "the last key must matter ({moved})");
    let (o, lse, plan) = run_emu::<f16, f16>(&c, &b, Splits::AtMost(1), 1);
    check_p(
        "last key",
        DType::F16,
        &o,
        &lse,
        &want,
        p_rounding(&plan, &b),
    );
}

fn arg_of<T: std::fmt::Debug>(r: longctx::Result<T>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected a typed argument error, got {other:?}"),
    }
}

/// Bad calls are typed errors before any launch.
#[test]
fn emu_decode_rejects_bad_calls() {
    let c = base(16, vec![200, 3], vec![1, 2]);
    let b = c.build::<bf16, bf16>();
    let q: Vec<bf16> = b.q_val.iter().map(|&x| bf16::from_f64(x)).collect();
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, 64);
    let k = Aligned::new(&b.k);
    let v = Aligned::new(&b.v);
    let cache = HostCache {
        layout: b.layout,
        k: k.as_slice(),
        v: v.as_slice(),
        scales: None,
    };
    let mut o = vec![bf16::ZERO; ql.numel().unwrap()];
    let mut ws = vec![0f32; 1 << 16];
    let run = |step: &StepTable,
               ql: &HeadsLayout,
               cache: &HostCache<bf16>,
               o: &mut [bf16],
               ws: &mut [f32],
               opts: &DecodeOptions| {
        emulator::decode::<bf16, bf16>(
            step,
            &q,
            ql,
            cache,
            HostDecodeOutput {
                o,
                o_layout: HeadsLayout::contiguous(b.total_new, b.heads_q, 64),
                lse: None,
            },
            ws,
            1,
            opts,
        )
    };
    let ok = DecodeOptions::default();
    run(&b.step(), &ql, &cache, &mut o, &mut ws, &ok).unwrap();
    // Q of the wrong shape.
    let bad_q = HeadsLayout::contiguous(b.total_new + 1, b.heads_q, 64);
    assert_eq!(
        arg_of(run(&b.step(), &bad_q, &cache, &mut o, &mut ws, &ok)),
        "q"
    );
    // Workspace too small for a split plan.
    let split = DecodeOptions {
        splits: Splits::AtMost(4),
        ..ok
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &cache, &mut o, &mut ws[..3], &split)),
        "workspace"
    );
    // Splits out of range.
    let zero = DecodeOptions {
        splits: Splits::AtMost(0),
        ..ok
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &cache, &mut o, &mut ws, &zero)),
        "splits"
    );
    // Short cache.
    let short = HostCache {
        k: &k.as_slice()[..10],
        ..cache
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &short, &mut o, &mut ws, &ok)),
        "cache.k"
    );
    // Scales on a bf16 cache.
    let sc = vec![1f32; 1 << 12];
    let scaled = HostCache {
        scales: Some((ScaleMode::PerHead, &sc, &sc)),
        ..cache
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &scaled, &mut o, &mut ws, &ok)),
        "cache.scales"
    );
    // Too many new tokens for decode.
    let mut c2 = base(16, vec![40], vec![17]);
    c2.group = 1;
    let b2 = c2.build::<bf16, bf16>();
    let q2 = HeadsLayout::contiguous(17, 2, 64);
    let mut o2 = vec![bf16::ZERO; q2.numel().unwrap()];
    let k2 = Aligned::new(&b2.k);
    let v2 = Aligned::new(&b2.v);
    let e = emulator::decode::<bf16, bf16>(
        &b2.step(),
        &vec![bf16::ZERO; q2.numel().unwrap()],
        &q2,
        &HostCache {
            layout: b2.layout,
            k: k2.as_slice(),
            v: v2.as_slice(),
            scales: None,
        },
        HostDecodeOutput {
            o: &mut o2,
            o_layout: q2,
            lse: None,
        },
        &mut ws,
        1,
        &ok,
    );
    assert_eq!(arg_of(e), "cu_new");
    // Unsupported head dim, heads that do not group.
    let sv = b.layout.validate_step(&b.step()).unwrap();
    let dt = longctx::kv_cache::CacheDType::BF16;
    assert_eq!(
        arg_of(plan_decode(&sv, 4, 2, 96, dt, 1, Splits::Auto)),
        "head_dim"
    );
    assert_eq!(
        arg_of(plan_decode(&sv, 3, 2, 64, dt, 1, Splits::Auto)),
        "heads_q"
    );
    // An fp8 cache without scales.
    let fp8 = vec![Fp8E4m3(0); b.k.len()];
    let fp8a = Aligned::new(&fp8);
    let e = emulator::decode::<bf16, Fp8E4m3>(
        &b.step(),
        &q,
        &ql,
        &HostCache {
            layout: b.layout,
            k: fp8a.as_slice(),
            v: fp8a.as_slice(),
            scales: None,
        },
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: None,
        },
        &mut ws,
        1,
        &ok,
    );
    assert_eq!(arg_of(e), "cache.scales");
}

fn case_strategy() -> impl Strategy<Value = (Case, u8, usize)> {
    (
        prop::sample::select(vec![1usize, 3, 16, 64, 256]),
        1usize..=2,
        prop::sample::select(vec![1usize, 2, 4, 8]),
        prop::sample::select(vec![64usize, 128, 256, 512]),
        prop::collection::vec((0usize..200, 1usize..=16), 1..=3),
        0u8..4,
        prop::option::of(0usize..50),
        any::<u64>(),
        0u8..4,
        1usize..=8,
    )
        .prop_map(
            |(ps, hkv, group, d, seqs, fp8, window, seed, dtype, splits)| {
                let lens: Vec<usize> = seqs.iter().map(|s| s.0).collect();
                let news: Vec<usize> = seqs.iter().map(|s| s.1.min(s.0)).collect();
                let case = Case {
                    page_size: ps,
                    heads_kv: if d == 512 { 1 } else { hkv },
                    group,
                    head_dim: d,
                    lens,
                    news,
                    scale_mode: match fp8 {
                        1 => Some(ScaleMode::PerTokenHead),
                        2 => Some(ScaleMode::PerHead),
                        _ => None,
                    },
                    window_left: window,
                    softcap: if seed % 3 == 0 { Some(7.5) } else { None },
                    seed,
                    shuffle: seed % 2 == 0,
                };
                (case, dtype, splits)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random batches, page sizes, GQA ratios, head dims, query counts, dtypes and splits.
    #[test]
    fn emu_decode_parity((c, dtype, splits) in case_strategy()) {
        let s = Splits::AtMost(splits);
        match (dtype % 2, c.scale_mode.is_some()) {
            (0, false) => { parity::<bf16, bf16>("bf16", &c, s, 1); }
            (_, false) => { parity::<f16, f16>("f16", &c, s, 1); }
            (0, true) => { parity::<bf16, Fp8E4m3>("bf16 fp8", &c, s, 1); }
            (_, true) => { parity::<f16, Fp8E4m3>("f16 fp8", &c, s, 1); }
        }
    }
}

/// Runs a case on the GPU with `splits`; returns O (widened), the LSE and the plan.
fn run_gpu<
    T: Element + cudarc::driver::ValidAsZeroBits,
    S: CacheElement + cudarc::driver::ValidAsZeroBits,
>(
    dev: &longctx::device::Device,
    c: &Case,
    b: &Built<S>,
    splits: Splits,
) -> (Vec<f64>, Vec<f32>, DecodePlan) {
    use longctx::kv_cache::{decode, DecodeOutput, KvScales, KvStep, PagedCache};
    let q: Vec<T> = b.q_val.iter().map(|&x| T::from_f64(x)).collect();
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
    let step = KvStep::upload(dev, &b.layout, &b.step()).unwrap();
    let qd = dev.upload(&q).unwrap();
    let kd = dev.upload(&b.k).unwrap();
    let vd = dev.upload(&b.v).unwrap();
    let ks = dev
        .upload(&b.k_scale)
        .unwrap_or_else(|_| dev.zeros::<f32>(1).unwrap());
    let vs = dev
        .upload(&b.v_scale)
        .unwrap_or_else(|_| dev.zeros::<f32>(1).unwrap());
    let plan = plan_decode(
        step.validated(),
        b.heads_q,
        c.heads_kv,
        c.head_dim,
        S::CACHE_DTYPE,
        dev.sm_count(),
        splits,
    )
    .unwrap();
    let mut ws = dev
        .zeros::<f32>(
            plan.workspace_len(b.total_new, b.heads_q, c.head_dim)
                .unwrap()
                .max(1),
        )
        .unwrap();
    let nan = T::from_f64(f64::NAN);
    let mut o = dev.upload(&vec![nan; ql.numel().unwrap().max(1)]).unwrap();
    let mut lse = dev
        .upload(&vec![f32::NAN; (b.heads_q * b.total_new).max(1)])
        .unwrap();
    decode::<T, S>(
        dev,
        &step,
        &qd,
        &ql,
        &PagedCache {
            layout: b.layout,
            k: &kd,
            v: &vd,
            scales: match c.scale_mode {
                Some(mode) => KvScales::Fp8 {
                    mode,
                    k: &ks,
                    v: &vs,
                },
                None => KvScales::None,
            },
        },
        DecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, b.total_new))),
        },
        Some(&mut ws),
        &c.options(splits),
    )
    .unwrap();
    let o = dev.download(&o).unwrap();
    let lse = dev.download(&lse).unwrap();
    (
        o[..ql.numel().unwrap()]
            .iter()
            .map(|x| x.to_f64())
            .collect(),
        lse[..b.heads_q * b.total_new].to_vec(),
        plan,
    )
}

fn gpu_parity<T, S>(dev: &longctx::device::Device, tag: &str, c: &Case, splits: Splits)
where
    T: Element + cudarc::driver::ValidAsZeroBits,
    S: CacheElement + cudarc::driver::ValidAsZeroBits,
{
    let b = c.build::<T, S>();
    let (o, lse, plan) = run_gpu::<T, S>(dev, c, &b, splits);
    let want = reference(c, &b);
    let pr = p_rounding(&plan, &b);
    check_p(
        &format!("gpu {tag} {c:?} plan {plan:?}"),
        T::DTYPE,
        &o,
        &lse,
        &want,
        pr,
    );
}

fn gpu_cases() -> usize {
    std::env::var("LONGCTX_PARITY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

/// The emulator's edge cases and random cases, on the device.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_decode_parity() {
    let Some(dev) = common::gpu("gpu_decode_parity") else {
        return;
    };
    for ps in [1usize, 3, 16, 64, 256] {
        let lens = vec![0, 1, ps.saturating_sub(1).max(1), ps, ps + 1, 40 * ps + 5];
        let news: Vec<usize> = lens.iter().map(|&l| l.min(1 + l % 3)).collect();
        let c = base(ps, lens, news);
        for splits in [Splits::AtMost(1), Splits::AtMost(7), Splits::Auto] {
            gpu_parity::<bf16, bf16>(&dev, "bf16 edges", &c, splits);
        }
    }
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = case_strategy();
    for i in 0..gpu_cases() {
        let (mut c, dtype, splits) = strategy.new_tree(&mut runner).unwrap().current();
        // Longer caches than the emulator can afford.
        for l in &mut c.lens {
            *l *= 1 + i % 40;
        }
        let s = if i % 3 == 0 {
            Splits::Auto
        } else {
            Splits::AtMost(splits)
        };
        match (dtype % 2, c.scale_mode.is_some()) {
            (0, false) => gpu_parity::<bf16, bf16>(&dev, "bf16", &c, s),
            (_, false) => gpu_parity::<f16, f16>(&dev, "f16", &c, s),
            (0, true) => gpu_parity::<bf16, Fp8E4m3>(&dev, "bf16 fp8", &c, s),
            (_, true) => gpu_parity::<f16, Fp8E4m3>(&dev, "f16 fp8", &c, s),
        }
    }
}

/// A long context (64k tokens at batch 1, split across the SMs) against the reference.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_decode_long_context() {
    let Some(dev) = common::gpu("gpu_decode_long_context") else {
        return;
    };
    let mut c = base(16, vec![65536], vec![1]);
    c.heads_kv = 8;
    c.group = 4;
    c.head_dim = 128;
    gpu_parity::<bf16, bf16>(&dev, "64k", &c, Splits::Auto);
    c.scale_mode = Some(ScaleMode::PerTokenHead);
    gpu_parity::<bf16, Fp8E4m3>(&dev, "64k fp8", &c, Splits::Auto);
}

/// The raw-pointer entry gives the safe op's bits, split and unsplit.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_decode_raw_matches_safe() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use longctx::kv_cache::{decode_raw, KvStep};
    use longctx::layout::{RawBuffer, RawTensor};
    let Some(dev) = common::gpu("gpu_decode_raw_matches_safe") else {
        return;
    };
    let mut c = base(16, vec![3000, 17], vec![1, 3]);
    c.scale_mode = Some(ScaleMode::PerTokenHead);
    let b = c.build::<bf16, Fp8E4m3>();
    for splits in [Splits::AtMost(1), Splits::AtMost(9)] {
        let (want_o, want_lse, plan) = run_gpu::<bf16, Fp8E4m3>(&dev, &c, &b, splits);
        let q: Vec<bf16> = b.q_val.iter().map(|&x| bf16::from_f64(x)).collect();
        let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
        let step = KvStep::upload(&dev, &b.layout, &b.step()).unwrap();
        let qd = dev.upload(&q).unwrap();
        let kd = dev.upload(&b.k).unwrap();
        let vd = dev.upload(&b.v).unwrap();
        let ks = dev.upload(&b.k_scale).unwrap();
        let vs = dev.upload(&b.v_scale).unwrap();
        let mut o = dev.zeros::<bf16>(ql.numel().unwrap()).unwrap();
        let mut lse = dev.zeros::<f32>(b.heads_q * b.total_new).unwrap();
        let mut ws = dev
            .zeros::<f32>(
                plan.workspace_len(b.total_new, b.heads_q, 64)
                    .unwrap()
                    .max(1),
            )
            .unwrap();
        let st = dev.stream().clone();
        {
            let (qp, _g0) = qd.device_ptr(&st);
            let (kp, _g1) = kd.device_ptr(&st);
            let (vp, _g2) = vd.device_ptr(&st);
            let (ksp, _g3) = ks.device_ptr(&st);
            let (vsp, _g4) = vs.device_ptr(&st);
            let (op, _g5) = o.device_ptr_mut(&st);
            let (lp, _g6) = lse.device_ptr_mut(&st);
            let ws_len = ws.len();
            let (wp, _g7) = ws.device_ptr_mut(&st);
            let raw = |ptr, len| RawBuffer { ptr, len };
            // SAFETY: every pointer is a live allocation of this context of the stated
            // length; the outputs are distinct buffers; the launch completes before the
            // guards drop (synchronize below).
            unsafe {
                decode_raw::<bf16, Fp8E4m3>(
                    &dev,
                    &step,
                    RawTensor {
                        ptr: qp,
                        len: q.len(),
                        layout: ql,
                    },
                    raw(kp, b.k.len()),
                    raw(vp, b.v.len()),
                    Some((
                        ScaleMode::PerTokenHead,
                        raw(ksp, b.k_scale.len()),
                        raw(vsp, b.v_scale.len()),
                    )),
                    RawTensor {
                        ptr: op,
                        len: ql.numel().unwrap(),
                        layout: ql,
                    },
                    Some((
                        raw(lp, b.heads_q * b.total_new),
                        LseLayout::contiguous(b.heads_q, b.total_new),
                    )),
                    Some(raw(wp, ws_len)),
                    &c.options(splits),
                )
                .unwrap();
            }
            dev.synchronize().unwrap();
        }
        let got_o: Vec<f64> = dev
            .download(&o)
            .unwrap()
            .iter()
            .map(|x| x.to_f64())
            .collect();
        let got_lse = dev.download(&lse).unwrap();
        assert_eq!(got_o, want_o, "{splits:?}");
        assert_eq!(
            got_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
