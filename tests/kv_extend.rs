//! Extend (chunked prefill) over a paged cache: the attention forward's kernel with paged
//! K/V addressing, through the emulator (its CUDA source on the CPU, race and bounds
//! checkers on) for the portable and the sm_90a tile shapes, against the f64 reference over
//! the logical cache (page sizes 1 to 256, chunks of 0 to 130 new tokens, edge lengths,
//! GQA, head dims 64 to 256, f16 / bf16, windows, softcap); bit for bit against the dense
//! forward on the gathered K/V; paging invisible; fp8 e4m3 caches (both scale layouts)
//! against the reference over their widened values and bit for bit against the 16-bit
//! extend on those values; validation; GPU twins (`#[ignore]`d).

mod common;

use common::Aligned;

use half::{bf16, f16};
use longctx::attention::reference::Output;
use longctx::attention::{AttentionOptions, AttnElement, Mask};
use longctx::dtype::{DType, Element};
use longctx::emulator::{self, Arch, HostCache, HostDecodeOutput, HostQkv};
use longctx::kv_cache::reference::{decode_f64, DecodeMath};
use longctx::kv_cache::{
    CacheElement, ExtendOptions, Fp8E4m3, LseLayout, PageTable, PagedKvLayout, ScaleMode, StepTable,
};
use longctx::layout::HeadsLayout;
use longctx::{Error, ErrorKind};
use proptest::prelude::*;

/// One extend problem: the logical cache, the paging, the queries.
#[derive(Debug, Clone)]
struct Case {
    page_size: usize,
    heads_kv: usize,
    group: usize,
    head_dim: usize,
    /// Cache length of each sequence (after the step, new tokens included).
    lens: Vec<usize>,
    /// New tokens of each sequence (its last positions).
    news: Vec<usize>,
    window_left: Option<usize>,
    softcap: Option<f32>,
    seed: u64,
    /// Shuffle the page ids (and leave spare pages).
    shuffle: bool,
}

/// The step's host arrays, the cache and the queries.
struct Built<T> {
    layout: PagedKvLayout,
    block_table: Vec<i32>,
    max_pages: usize,
    seqlens: Vec<i32>,
    cu_new: Vec<i32>,
    k: Vec<T>,
    v: Vec<T>,
    q: Vec<T>,
    heads_q: usize,
    total_new: usize,
}

impl Case {
    fn build<T: Element>(&self) -> Built<T> {
        let mut r = common::Rng(self.seed);
        let ps = self.page_size;
        let used: Vec<usize> = self.lens.iter().map(|l| l.div_ceil(ps)).collect();
        let max_pages = used.iter().copied().max().unwrap_or(0) + usize::from(self.shuffle);
        let pages = (used.iter().sum::<usize>() + if self.shuffle { 3 } else { 0 }).max(1);
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
        let k: Vec<T> = (0..n).map(|_| T::from_f64(1.5 * r.uniform())).collect();
        let v: Vec<T> = (0..n).map(|_| T::from_f64(r.uniform())).collect();
        let heads_q = self.heads_kv * self.group;
        let total_new: usize = self.news.iter().sum();
        let q: Vec<T> = (0..total_new * heads_q * self.head_dim)
            .map(|_| T::from_f64(1.5 * r.uniform()))
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
            q,
            heads_q,
            total_new,
        }
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    fn options(&self) -> ExtendOptions {
        ExtendOptions {
            softmax_scale: Some(self.scale()),
            softcap: self.softcap,
            window_left: self.window_left,
        }
    }
}

impl<T> Built<T> {
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

/// Runs a case through the emulator for `arch`; returns O and the LSE (poisoned before,
/// so every element must be written).
fn run_emu<T: AttnElement + CacheElement>(
    c: &Case,
    b: &Built<T>,
    arch: Arch,
) -> (Vec<T>, Vec<f32>) {
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
    let k = Aligned::new(&b.k);
    let v = Aligned::new(&b.v);
    let cache = HostCache {
        layout: b.layout,
        k: k.as_slice(),
        v: v.as_slice(),
        scales: None,
    };
    let mut o = vec![<T as Element>::from_f64(f64::NAN); ql.numel().unwrap()];
    let mut lse = vec![f32::NAN; b.heads_q * b.total_new];
    let tiles = emulator::extend::<T, T>(
        arch,
        &b.step(),
        &b.q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, b.total_new))),
        },
        &c.options(),
    )
    .unwrap();
    match tiles {
        // Head dim 512: the row-packed kernel, the same code on every arch.
        None => assert_eq!(c.head_dim, 512),
        Some(t) => assert_eq!(t.ptx_arch, arch.ptx_arch()),
    }
    (o, lse)
}

fn reference<T: Element>(c: &Case, b: &Built<T>) -> Output<f64> {
    reference_with(c, b, |x| x)
}

/// The reference with V's values mapped by `f` (|V| gives each row's sum p |v| / sum p).
fn reference_with<T: Element>(c: &Case, b: &Built<T>, f: fn(f64) -> f64) -> Output<f64> {
    let wide = |x: &[T]| x.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
    let v: Vec<f64> = b.v.iter().map(|e| f(e.to_f64())).collect();
    decode_f64(
        &b.layout,
        &b.step(),
        &wide(&b.q),
        b.heads_q,
        &wide(&b.k),
        &v,
        &DecodeMath {
            scale: f64::from(c.scale()),
            softcap: c.softcap.map(f64::from),
            window_left: c.window_left,
        },
    )
    .unwrap()
}

/// FlashAttention-style bounds. O: the output's rounding to T plus the rounding of P to T
/// before the P V MMA (the forward rounds P to the input type, as FlashAttention 2 does),
/// at most eps x sum p |v| / sum p per element (`o_abs`: the reference over |V|), plus f32
/// slack. LSE: f32 score error only (P's rounding does not reach it), 2e-5 relative: one
/// key more or less in a row of n keys moves it by about 1 / n, far outside. Rows with no
/// key must give LSE -inf exactly.
fn check(
    tag: &str,
    dtype: DType,
    got_o: &[f64],
    got_lse: &[f32],
    want: &Output<f64>,
    o_abs: &[f64],
) {
    assert_eq!(got_o.len(), want.o.len(), "{tag}");
    let eps = dtype.epsilon();
    for (i, ((g, w), a)) in got_o.iter().zip(&want.o).zip(o_abs).enumerate() {
        let tol = 1.01 * eps * w.abs() + eps * a + 2e-5;
        assert!(
            (g - w).abs() <= tol,
            "{tag}: O[{i}] = {g}, reference {w} (tolerance {tol:e})"
        );
    }
    assert_eq!(got_lse.len(), want.lse.len(), "{tag}");
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

fn parity<T: AttnElement + CacheElement>(tag: &str, c: &Case, arch: Arch) {
    let b = c.build::<T>();
    let (o, lse) = run_emu::<T>(c, &b, arch);
    let want = reference(c, &b);
    let abs = reference_with(c, &b, f64::abs);
    let o: Vec<f64> = o.iter().map(|x| Element::to_f64(*x)).collect();
    check(
        &format!("{tag} {arch:?} {c:?}"),
        T::DTYPE,
        &o,
        &lse,
        &want,
        &abs.o,
    );
}

fn base(page_size: usize, lens: Vec<usize>, news: Vec<usize>) -> Case {
    Case {
        page_size,
        heads_kv: 1,
        group: 2,
        head_dim: 64,
        lens,
        news,
        window_left: None,
        softcap: None,
        seed: 1,
        shuffle: true,
    }
}

/// Every page size against cache lengths around a page (page - 1, page, page + 1, several
/// pages, and an empty cache) and chunks of 0, 1, 17 and 130 new tokens (a prefix-only
/// sequence brings none): bf16 with GQA 2 on the portable tiles, f16 with GQA 4, a window
/// and softcap on the sm_90a tiles.
#[test]
fn emu_extend_page_sizes_and_chunks() {
    for ps in [1usize, 3, 16, 64, 256] {
        let mut lens = vec![ps.saturating_sub(1), ps, ps + 1, 2 * ps + 140, 0];
        let chunks = [0usize, 1, 17, 130];
        let mut news: Vec<usize> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| chunks[(i + ps) % 4].min(l))
            .collect();
        // A long sequence whose chunk spans several query tiles and is not its whole cache.
        lens.push(300);
        news.push(130);
        let mut c = base(ps, lens, news);
        c.seed = ps as u64;
        parity::<bf16>("bf16", &c, Arch::Sm80);
        // GQA 4, a window shorter than a chunk and a page, softcap; the sm_90a tiles.
        c.group = 4;
        c.window_left = Some(ps / 2 + 5);
        c.softcap = Some(6.0);
        c.seed += 1000;
        parity::<f16>("f16 window softcap", &c, Arch::Sm90);
    }
}

/// Head dims 64 to 256, f16 and bf16, GQA 1 and 4, windows and softcap, both tile shapes.
#[test]
fn emu_extend_dims_dtypes_and_masks() {
    let mut seed = 100;
    for d in [64usize, 96, 128, 256] {
        for (group, window, softcap) in [(1usize, None, None), (4, Some(20usize), Some(5.0f32))] {
            seed += 1;
            let mut c = base(16, vec![150, 33, 17], vec![70, 33, 1]);
            c.head_dim = d;
            c.group = group;
            c.window_left = window;
            c.softcap = softcap;
            c.seed = seed;
            let arch = if seed % 2 == 0 {
                Arch::Sm80
            } else {
                Arch::Sm90
            };
            parity::<bf16>("bf16", &c, arch);
            parity::<f16>(
                "f16",
                &c,
                if arch == Arch::Sm80 {
                    Arch::Sm90
                } else {
                    Arch::Sm80
                },
            );
        }
    }
}

/// Head dim 512 (the row-packed kernels: 16 or 64 (token, group head) rows per CTA, K and V
/// tiles of 32 keys): page sizes 1, 3, 16, 64 and 256 against cache lengths around a page
/// and chunks of 0, 1, 17 and 130 new tokens (130 x GQA 2 is 17 row tiles of 16, the last
/// one partial, or 5 of 64), GQA 1, 3 (row tiles that split a token's heads; 17 x 3 rows
/// leave a 64-row tile's last row group 3 live rows) and 4, windows shorter than a tile and
/// than a chunk, softcap, f16 and bf16, each on both kernels.
#[test]
fn emu_extend_head_dim_512() {
    for (i, ps) in [1usize, 3, 16, 64, 256].into_iter().enumerate() {
        let mut lens = vec![ps.saturating_sub(1), ps, ps + 1, 2 * ps + 40, 0];
        let chunks = [0usize, 1, 17, 130];
        let mut news: Vec<usize> = lens
            .iter()
            .enumerate()
            .map(|(j, &l)| chunks[(j + ps) % 4].min(l))
            .collect();
        lens.push(200);
        news.push(130);
        let mut c = base(ps, lens, news);
        c.head_dim = 512;
        c.seed = 500 + ps as u64;
        // Sm80 plans as a 99 KB part (the 16-row kernel), Sm90 as an H100 (the 64-row
        // kernel wherever a sequence has more than 16 rows).
        for arch in [Arch::Sm80, Arch::Sm90] {
            parity::<bf16>("bf16 d512", &c, arch);
        }
        c.group = [3, 4, 1, 3, 4][i];
        c.heads_kv = 2;
        c.window_left = Some([5, 40, 20, 150, 31][i]);
        c.softcap = Some(5.0);
        c.seed += 1000;
        for arch in [Arch::Sm90, Arch::Sm80] {
            parity::<f16>("f16 d512 window softcap", &c, arch);
        }
    }
}

fn extend_case_strategy() -> impl Strategy<Value = (Case, bool, bool)> {
    (
        prop::sample::select(vec![1usize, 3, 16, 64, 256]),
        1usize..=2,
        prop::sample::select(vec![1usize, 2, 3, 4]),
        prop::sample::select(vec![64usize, 96, 128, 256, 512]),
        prop::collection::vec((0usize..200, 0usize..=70), 1..=3),
        prop::option::of(0usize..60),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(ps, hkv, group, d, seqs, window, seed, f16_, sm90)| {
            let lens: Vec<usize> = seqs.iter().map(|s| s.0).collect();
            let news: Vec<usize> = seqs.iter().map(|s| s.1.min(s.0)).collect();
            let c = Case {
                page_size: ps,
                heads_kv: hkv,
                group,
                head_dim: d,
                lens,
                news,
                window_left: window,
                softcap: if seed % 3 == 0 { Some(6.5) } else { None },
                seed,
                shuffle: seed % 2 == 0,
            };
            (c, f16_, sm90)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random batches (chunks of 0 to 70 over caches of 0 to 199), page sizes, GQA ratios,
    /// head dims (512's row-packed kernels included), windows, softcap, dtypes and tile
    /// shapes.
    #[test]
    fn emu_extend_parity_random((c, f16_, sm90) in extend_case_strategy()) {
        let arch = if sm90 { Arch::Sm90 } else { Arch::Sm80 };
        if f16_ {
            parity::<f16>("f16 random", &c, arch);
        } else {
            parity::<bf16>("bf16 random", &c, arch);
        }
    }
}

/// The dense `[tokens, heads_kv, head_dim]` rows of a paged cache, sequences concatenated.
fn dense_of<T: Copy>(b: &Built<T>, cache: &[T]) -> Vec<T> {
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

/// The same kernel body with dense addressing: the attention forward on the gathered K/V
/// with cu_seqlens_q = cu_new and cu_seqlens_k the prefix sums of the lengths, causal
/// (bottom-right) with the same window, softcap and scale.
fn run_dense<T: AttnElement>(c: &Case, b: &Built<T>, arch: Arch) -> (Vec<T>, Vec<f32>) {
    let d = c.head_dim;
    let k = Aligned::new(&dense_of(b, &b.k));
    let v = Aligned::new(&dense_of(b, &b.v));
    let q = Aligned::new(&b.q);
    let total_k = k.as_slice().len() / (c.heads_kv * d);
    let mut cu_k = vec![0i32];
    for &l in &b.seqlens {
        cu_k.push(cu_k.last().unwrap() + l);
    }
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, d);
    let kl = HeadsLayout::contiguous(total_k, c.heads_kv, d);
    let mut o = vec![T::from_f64(f64::NAN); ql.numel().unwrap()];
    let mut lse = vec![f32::NAN; b.heads_q * b.total_new];
    emulator::attention_forward::<T>(
        arch,
        &HostQkv {
            q: q.as_slice(),
            q_layout: ql,
            k: k.as_slice(),
            k_layout: kl,
            v: v.as_slice(),
            v_layout: kl,
        },
        &mut o,
        ql,
        Some(&mut lse),
        &b.cu_new,
        &cu_k,
        &AttentionOptions {
            softmax_scale: Some(c.scale()),
            mask: Mask {
                causal: true,
                window_left: c.window_left,
                window_right: None,
            },
            softcap: c.softcap,
        },
    )
    .unwrap();
    (o, lse)
}

fn bits<T: Element>(o: &[T], lse: &[f32]) -> (Vec<u64>, Vec<u32>) {
    (
        o.iter().map(|x| x.to_f64().to_bits()).collect(),
        lse.iter().map(|x| x.to_bits()).collect(),
    )
}

/// Paged extend and the dense forward run the same code on the same values: O and the LSE
/// agree bit for bit (any difference is a paging bug), for both tile shapes, with window,
/// softcap, GQA, prefix-only sequences and several query tiles.
#[test]
fn emu_extend_is_the_dense_forward_bit_for_bit() {
    let mut c = base(7, vec![200, 9, 0, 64], vec![150, 0, 0, 64]);
    c.group = 3;
    c.heads_kv = 2;
    c.seed = 77;
    for (arch, d, window, softcap) in [
        (Arch::Sm80, 64usize, None, None),
        (Arch::Sm90, 128, Some(40usize), Some(4.0f32)),
    ] {
        c.head_dim = d;
        c.window_left = window;
        c.softcap = softcap;
        let b = c.build::<bf16>();
        let (po, pl) = run_emu::<bf16>(&c, &b, arch);
        let (dop, dl) = run_dense::<bf16>(&c, &b, arch);
        assert_eq!(
            bits(&po, &pl),
            bits(&dop, &dl),
            "{arch:?} d {d}: paged differs from dense"
        );
    }
}

/// The same logical cache under page sizes 1, 5, 16 and 256, in order or shuffled, gives
/// bit-identical outputs: paging only changes addresses.
#[test]
fn emu_extend_paging_is_invisible() {
    let case = |ps: usize, shuffle: bool| {
        let mut c = base(ps, vec![140, 5, 70], vec![20, 5, 66]);
        c.shuffle = shuffle;
        c.group = 2;
        c.seed = 9;
        c
    };
    let c0 = case(1, false);
    let b0 = c0.build::<f16>();
    let (k0, v0) = (dense_of(&b0, &b0.k), dense_of(&b0, &b0.v));
    let mut results = Vec::new();
    for (ps, shuffle) in [(1usize, false), (5, true), (16, true), (256, false)] {
        let c = case(ps, shuffle);
        let mut b = c.build::<f16>();
        scatter(&mut b, &k0, &v0);
        b.q.clone_from(&b0.q);
        let (o, lse) = run_emu::<f16>(&c, &b, Arch::Sm80);
        results.push(bits(&o, &lse));
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0], "outputs depend on the paging");
    }
}

fn scatter<T: Copy>(b: &mut Built<T>, k: &[T], v: &[T]) {
    let l = b.layout;
    let row = l.heads_kv * l.head_dim;
    let mut i = 0;
    for (s, &len) in b.seqlens.iter().enumerate() {
        for t in 0..len as usize {
            let page = b.block_table[s * b.max_pages + t / l.page_size] as usize;
            let at = (page * l.page_size + t % l.page_size) * row;
            b.k[at..at + row].copy_from_slice(&k[i..i + row]);
            b.v[at..at + row].copy_from_slice(&v[i..i + row]);
            i += row;
        }
    }
    assert_eq!(i, k.len());
}

/// An fp8 copy of a case's cache: codes of the case's K and V values under per-(token,
/// head) scales spread over two octaves (or per-head ones), and the values extend computes
/// with, `T(code x scale)` (the f32 product rounded once to T: what the kernel widens into
/// shared memory).
struct Fp8Cache<T> {
    mode: ScaleMode,
    k: Vec<Fp8E4m3>,
    v: Vec<Fp8E4m3>,
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
    k_wide: Vec<T>,
    v_wide: Vec<T>,
}

fn fp8_of<T: Element>(c: &Case, b: &Built<T>, mode: ScaleMode) -> Fp8Cache<T> {
    let mut r = common::Rng(c.seed ^ 0x5eed);
    let d = c.head_dim;
    let rows = b.layout.pages * b.layout.page_size * c.heads_kv;
    let n_scales = match mode {
        ScaleMode::PerTokenHead => rows,
        ScaleMode::PerHead => c.heads_kv,
    };
    // K values reach 1.5 and V values 1: codes up to 1.5 / 0.006 = 250 < 448.
    let k_scale: Vec<f32> = (0..n_scales)
        .map(|_| (0.004 * (1.5 + r.uniform())) as f32)
        .collect();
    let v_scale: Vec<f32> = (0..n_scales)
        .map(|_| (0.003 * (1.5 + r.uniform())) as f32)
        .collect();
    let scale_of = |s: &[f32], i: usize| match mode {
        ScaleMode::PerTokenHead => s[i / d],
        ScaleMode::PerHead => s[(i / d) % c.heads_kv],
    };
    let quantise = |x: &[T], s: &[f32]| -> (Vec<Fp8E4m3>, Vec<T>) {
        x.iter()
            .enumerate()
            .map(|(i, e)| {
                let sc = scale_of(s, i);
                let code = Fp8E4m3::from_f64(e.to_f64() / f64::from(sc));
                // code.to_f32() is exact; the product is the kernel's f32 product.
                (code, round_f32::<T>(code.to_f32() * sc))
            })
            .unzip()
    };
    let (k, k_wide) = quantise(&b.k, &k_scale);
    let (v, v_wide) = quantise(&b.v, &v_scale);
    Fp8Cache {
        mode,
        k,
        v,
        k_scale,
        v_scale,
        k_wide,
        v_wide,
    }
}

/// `x` rounded to T, to nearest even. (`half`'s conversions from f64 drop the low 32 bits of
/// the f64 before rounding, so an f32 just above a tie of T would round down; from f32 they
/// see every bit.)
fn round_f32<T: Element>(x: f32) -> T {
    let y = match T::DTYPE {
        DType::BF16 => bf16::from_f32(x).to_f64(),
        DType::F16 => f16::from_f32(x).to_f64(),
        _ => f64::from(x),
    };
    // Exact: y is a value of T.
    T::from_f64(y)
}

/// Runs a case over its fp8 cache through the emulator for `arch`.
fn run_emu_fp8<T: AttnElement + CacheElement>(
    c: &Case,
    b: &Built<T>,
    f: &Fp8Cache<T>,
    arch: Arch,
) -> (Vec<T>, Vec<f32>) {
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
    let k = Aligned::new(&f.k);
    let v = Aligned::new(&f.v);
    let cache = HostCache {
        layout: b.layout,
        k: k.as_slice(),
        v: v.as_slice(),
        scales: Some((f.mode, &f.k_scale, &f.v_scale)),
    };
    let mut o = vec![<T as Element>::from_f64(f64::NAN); ql.numel().unwrap()];
    let mut lse = vec![f32::NAN; b.heads_q * b.total_new];
    let tiles = emulator::extend::<T, Fp8E4m3>(
        arch,
        &b.step(),
        &b.q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, b.total_new))),
        },
        &c.options(),
    )
    .unwrap();
    match tiles {
        Some(t) => assert_eq!(t.ptx_arch, arch.ptx_arch()),
        // Head dim 512: the row-packed kernels.
        None => assert_eq!(c.head_dim, 512),
    }
    (o, lse)
}

/// The case with its cache replaced by the fp8 cache's widened values.
fn widened<T: Clone>(b: &Built<T>, f: &Fp8Cache<T>) -> Built<T> {
    Built {
        layout: b.layout,
        block_table: b.block_table.clone(),
        max_pages: b.max_pages,
        seqlens: b.seqlens.clone(),
        cu_new: b.cu_new.clone(),
        k: f.k_wide.clone(),
        v: f.v_wide.clone(),
        q: b.q.clone(),
        heads_q: b.heads_q,
        total_new: b.total_new,
    }
}

/// fp8 extend against the f64 reference over the dequantised cache (each value code x
/// scale as extend uses it, rounded once to T), with the 16-bit parity's tolerances: a key
/// more or less moves a row's LSE by about 1 / keys, a K scale off by one row or dropped
/// moves scores by up to 2x, a V scale dropped moves O by a factor 150 or more.
fn parity_fp8<T: AttnElement + CacheElement>(tag: &str, c: &Case, mode: ScaleMode, arch: Arch) {
    let b = c.build::<T>();
    let f = fp8_of(c, &b, mode);
    let (o, lse) = run_emu_fp8::<T>(c, &b, &f, arch);
    let w = widened(&b, &f);
    let want = reference(c, &w);
    let abs = reference_with(c, &w, f64::abs);
    let o: Vec<f64> = o.iter().map(|x| Element::to_f64(*x)).collect();
    check(
        &format!("{tag} fp8 {mode:?} {arch:?} {c:?}"),
        T::DTYPE,
        &o,
        &lse,
        &want,
        &abs.o,
    );
}

/// fp8 caches: page sizes 1, 3, 16 and 64 against lengths 0, 1, page - 1, page, page + 1
/// and long ones (several pages and query tiles), chunks of 0 to 130 new tokens, GQA 2 and
/// 4 over 2 KV heads, per-(token, head) and per-head scales, f16 and bf16, both tile
/// shapes; a window and softcap on half of them.
#[test]
fn emu_extend_fp8_page_sizes_lengths_and_scales() {
    for (i, ps) in [1usize, 3, 16, 64].into_iter().enumerate() {
        let lens = vec![0, 1, ps.saturating_sub(1), ps, ps + 1, 2 * ps + 140, 300];
        let chunks = [0usize, 1, 17, 130];
        let news: Vec<usize> = lens
            .iter()
            .enumerate()
            .map(|(j, &l)| {
                if j == 6 {
                    130
                } else {
                    chunks[(j + ps) % 4].min(l)
                }
            })
            .collect();
        let mut c = base(ps, lens, news);
        c.heads_kv = 2;
        c.seed = 500 + ps as u64;
        let (mode, other) = if i % 2 == 0 {
            (ScaleMode::PerTokenHead, ScaleMode::PerHead)
        } else {
            (ScaleMode::PerHead, ScaleMode::PerTokenHead)
        };
        parity_fp8::<bf16>("bf16", &c, mode, Arch::Sm80);
        c.group = 4;
        c.window_left = Some(ps / 2 + 5);
        c.softcap = Some(6.0);
        c.seed += 1000;
        parity_fp8::<f16>("f16 window softcap", &c, other, Arch::Sm90);
    }
}

/// fp8 at every head dim (64, 96, 128, 256), f16 and bf16, both scale layouts, both tile
/// shapes.
#[test]
fn emu_extend_fp8_head_dims() {
    let mut seed = 900;
    // 512: the row-packed kernels (16 rows on Sm80, 64 on Sm90).
    for d in [64usize, 96, 128, 256, 512] {
        seed += 1;
        let mut c = base(16, vec![150, 33, 17], vec![70, 33, 1]);
        c.head_dim = d;
        c.group = 2;
        c.heads_kv = 2;
        c.seed = seed;
        let (a, b) = if d % 128 == 0 {
            (Arch::Sm80, Arch::Sm90)
        } else {
            (Arch::Sm90, Arch::Sm80)
        };
        parity_fp8::<bf16>("bf16", &c, ScaleMode::PerTokenHead, a);
        parity_fp8::<f16>("f16", &c, ScaleMode::PerHead, b);
    }
}

/// fp8 extend is the 16-bit extend over the cache dequantised to T, bit for bit (widening
/// changes only where the tile's values come from), for both scale layouts, both tile
/// shapes, f16 and bf16, with paging, GQA, a window and softcap.
#[test]
fn emu_extend_fp8_is_the_16bit_extend_on_widened_values() {
    let mut c = base(7, vec![200, 9, 0, 64], vec![150, 0, 0, 64]);
    c.group = 3;
    c.heads_kv = 2;
    c.seed = 78;
    for (arch, d, window, softcap, mode) in [
        (Arch::Sm80, 64usize, None, None, ScaleMode::PerTokenHead),
        (
            Arch::Sm90,
            128,
            Some(40usize),
            Some(4.0f32),
            ScaleMode::PerHead,
        ),
        (Arch::Sm80, 96, Some(70), None, ScaleMode::PerTokenHead),
        // Head dim 512: the 64-row kernel (Sm90) and the 16-row one (Sm80).
        (
            Arch::Sm90,
            512,
            Some(40),
            Some(4.0),
            ScaleMode::PerTokenHead,
        ),
        (Arch::Sm80, 512, None, None, ScaleMode::PerHead),
    ] {
        c.head_dim = d;
        c.window_left = window;
        c.softcap = softcap;
        let b = c.build::<bf16>();
        let f = fp8_of(&c, &b, mode);
        let (po, pl) = run_emu_fp8::<bf16>(&c, &b, &f, arch);
        let (wo, wl) = run_emu::<bf16>(&c, &widened(&b, &f), arch);
        assert_eq!(
            bits(&po, &pl),
            bits(&wo, &wl),
            "{arch:?} d {d} {mode:?}: fp8 differs from bf16 on the widened values"
        );
        let b = c.build::<f16>();
        let f = fp8_of(&c, &b, mode);
        let (po, pl) = run_emu_fp8::<f16>(&c, &b, &f, arch);
        let (wo, wl) = run_emu::<f16>(&c, &widened(&b, &f), arch);
        assert_eq!(
            bits(&po, &pl),
            bits(&wo, &wl),
            "f16 {arch:?} d {d} {mode:?}: fp8 differs from f16 on the widened values"
        );
    }
}

/// The widened values are the cache's fp8 values within T's rounding: the reference over
/// them and the reference over the exact values code x scale differ by no more than T's
/// rounding moves attention (so the parity above is parity with the fp8 cache itself).
#[test]
fn fp8_widened_values_are_the_cache_values_within_t_rounding() {
    let c = base(16, vec![150, 33], vec![70, 33]);
    let b = c.build::<bf16>();
    for mode in [ScaleMode::PerTokenHead, ScaleMode::PerHead] {
        let f = fp8_of(&c, &b, mode);
        let d = c.head_dim;
        let scale_of = |s: &[f32], i: usize| match mode {
            ScaleMode::PerTokenHead => f64::from(s[i / d]),
            ScaleMode::PerHead => f64::from(s[(i / d) % c.heads_kv]),
        };
        for (codes, wide, s) in [(&f.k, &f.k_wide, &f.k_scale), (&f.v, &f.v_wide, &f.v_scale)] {
            for (i, (code, w)) in codes.iter().zip(wide.iter()).enumerate() {
                let exact = code.to_f64() * scale_of(s, i);
                let got = w.to_f64();
                // One rounding to bf16 (the f32 product's own rounding is 2^-24).
                assert!(
                    (got - exact).abs() <= exact.abs() * (2f64.powi(-8) + 2f64.powi(-23)),
                    "{mode:?} element {i}: {got} vs {exact}"
                );
            }
        }
    }
}

fn arg_of<T: std::fmt::Debug>(r: longctx::Result<T>) -> (&'static str, ErrorKind) {
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            let kind = e.kind();
            let Error::InvalidArgument { arg, .. } = e else {
                unreachable!()
            };
            (arg, kind)
        }
        other => panic!("expected a typed argument error, got {other:?}"),
    }
}

/// Bad calls are typed errors before any launch.
#[test]
fn emu_extend_rejects_bad_calls() {
    let c = base(16, vec![40, 3], vec![20, 2]);
    let b = c.build::<bf16>();
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
    let run = |step: &StepTable,
               ql: &HeadsLayout,
               cache: &HostCache<bf16>,
               o: &mut [bf16],
               opts: &ExtendOptions| {
        emulator::extend::<bf16, bf16>(
            Arch::Sm80,
            step,
            &b.q,
            ql,
            cache,
            HostDecodeOutput {
                o,
                o_layout: HeadsLayout::contiguous(b.total_new, b.heads_q, 64),
                lse: None,
            },
            opts,
        )
    };
    let ok = ExtendOptions::default();
    run(&b.step(), &ql, &cache, &mut o, &ok).unwrap();
    let invalid = ErrorKind::InvalidArgument;
    // Q rows != total_new; heads that do not group over the KV heads.
    let bad_q = HeadsLayout::contiguous(b.total_new + 1, b.heads_q, 64);
    assert_eq!(
        arg_of(run(&b.step(), &bad_q, &cache, &mut o, &ok)),
        ("q", invalid)
    );
    // Short cache.
    let short = HostCache {
        k: &k.as_slice()[..10],
        ..cache
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &short, &mut o, &ok)),
        ("cache.k", invalid)
    );
    // Misaligned cache base.
    let shifted = Aligned::new(&[b.k.as_slice(), &[bf16::ZERO]].concat());
    let mis = HostCache {
        k: &shifted.as_slice()[1..],
        ..cache
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &mis, &mut o, &ok)),
        ("cache.k", ErrorKind::Alignment)
    );
    // A bad scale.
    let bad = ExtendOptions {
        softmax_scale: Some(f32::NAN),
        ..ok
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &cache, &mut o, &bad)),
        ("softmax_scale", invalid)
    );
    // Scales on a bf16 cache.
    let sc = vec![1f32; 1 << 12];
    let scaled = HostCache {
        scales: Some((ScaleMode::PerHead, &sc, &sc)),
        ..cache
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &scaled, &mut o, &ok)),
        ("cache.scales", invalid)
    );
    // A cache of another layout than the step was built for (fewer pages than it uses).
    let small = HostCache {
        layout: PagedKvLayout {
            pages: 1,
            ..b.layout
        },
        ..cache
    };
    assert_eq!(
        arg_of(run(&b.step(), &ql, &small, &mut o, &ok)).1,
        ErrorKind::InvalidArgument
    );
    // fp8: runs with scales of the layout's length; refused without scales or with short
    // ones.
    let fp8 = vec![Fp8E4m3(0); b.k.len()];
    let fp8a = Aligned::new(&fp8);
    let scales = vec![1f32; b.layout.pages * 16];
    let mut run_fp8 = |sc: Option<(ScaleMode, &[f32], &[f32])>| {
        emulator::extend::<bf16, Fp8E4m3>(
            Arch::Sm80,
            &b.step(),
            &b.q,
            &ql,
            &HostCache {
                layout: b.layout,
                k: fp8a.as_slice(),
                v: fp8a.as_slice(),
                scales: sc,
            },
            HostDecodeOutput {
                o: &mut o,
                o_layout: ql,
                lse: None,
            },
            &ok,
        )
    };
    run_fp8(Some((ScaleMode::PerTokenHead, &scales, &scales))).unwrap();
    assert_eq!(arg_of(run_fp8(None)), ("cache.scales", invalid));
    assert_eq!(
        arg_of(run_fp8(Some((
            ScaleMode::PerTokenHead,
            &scales[..scales.len() - 1],
            &scales
        )))),
        ("cache.k_scale", invalid)
    );
    assert_eq!(
        arg_of(run_fp8(Some((ScaleMode::PerHead, &scales[..1], &[])))),
        ("cache.v_scale", invalid)
    );
    // f16 queries over a bf16 cache.
    let qf: Vec<f16> = vec![f16::ZERO; b.q.len()];
    let mut of = vec![f16::ZERO; b.q.len()];
    let kf: Vec<bf16> = b.k.clone();
    let kfa = Aligned::new(&kf);
    let e = emulator::extend::<f16, bf16>(
        Arch::Sm80,
        &b.step(),
        &qf,
        &ql,
        &HostCache {
            layout: b.layout,
            k: kfa.as_slice(),
            v: kfa.as_slice(),
            scales: None,
        },
        HostDecodeOutput {
            o: &mut of,
            o_layout: ql,
            lse: None,
        },
        &ok,
    );
    assert_eq!(arg_of(e), ("cache", ErrorKind::Unsupported));
    // A head dim without a kernel (80) and one outside the forward's D == DV rows (192).
    for d in [80usize, 192] {
        let mut c2 = base(16, vec![40, 3], vec![20, 2]);
        c2.head_dim = d;
        let b2 = c2.build::<bf16>();
        let q2 = HeadsLayout::contiguous(b2.total_new, b2.heads_q, d);
        let mut o2 = vec![bf16::ZERO; q2.numel().unwrap()];
        let k2 = Aligned::new(&b2.k);
        let e = emulator::extend::<bf16, bf16>(
            Arch::Sm80,
            &b2.step(),
            &b2.q,
            &q2,
            &HostCache {
                layout: b2.layout,
                k: k2.as_slice(),
                v: k2.as_slice(),
                scales: None,
            },
            HostDecodeOutput {
                o: &mut o2,
                o_layout: q2,
                lse: None,
            },
            &ok,
        );
        assert_eq!(arg_of(e), ("head_dim", ErrorKind::Unsupported), "d {d}");
    }
    // An LSE view of the wrong shape.
    let mut lse = vec![0f32; 4];
    let e = emulator::extend::<bf16, bf16>(
        Arch::Sm80,
        &b.step(),
        &b.q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, 2))),
        },
        &ok,
    );
    assert_eq!(arg_of(e), ("lse", invalid));
}

/// The parity cases on a real device: upload the step and the cache, run the CUDA op, and
/// compare with the f64 reference (and with the emulator of the loaded code's tiles, bit
/// for bit up to the GPU's own code generation: checked against the reference only).
#[test]
#[ignore = "needs a GPU: run with --ignored on a machine with CUDA"]
fn gpu_extend_parity() {
    let Some(dev) = common::gpu("gpu_extend_parity") else {
        return;
    };
    let mut cases = Vec::new();
    for ps in [1usize, 3, 16, 64, 256] {
        let lens = vec![ps.saturating_sub(1), ps, ps + 1, 2 * ps + 140, 0, 300];
        let news = vec![0, 1, 17.min(ps + 1), 130, 0, 130];
        let mut c = base(ps, lens, news);
        c.seed = ps as u64;
        cases.push(c);
    }
    for d in [64usize, 96, 128, 256, 512] {
        let mut c = base(16, vec![150, 33, 17], vec![70, 33, 1]);
        c.head_dim = d;
        c.group = 4;
        c.heads_kv = 2;
        c.window_left = Some(20);
        c.softcap = Some(5.0);
        c.seed = d as u64;
        cases.push(c);
    }
    for c in &cases {
        gpu_parity::<bf16>(&dev, c);
        gpu_parity::<f16>(&dev, c);
    }
}

fn gpu_parity<T: AttnElement + CacheElement>(dev: &longctx::device::Device, c: &Case) {
    use longctx::kv_cache::{extend, DecodeOutput, KvScales, KvStep, PagedCache};
    let b = c.build::<T>();
    let step = KvStep::upload(dev, &b.layout, &b.step()).unwrap();
    let q = dev.upload(&b.q).unwrap();
    let k = dev.upload(&b.k).unwrap();
    let v = dev.upload(&b.v).unwrap();
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
    let n = ql.numel().unwrap().max(1);
    let mut o = dev
        .upload(&vec![<T as Element>::from_f64(f64::NAN); n])
        .unwrap();
    let mut lse = dev
        .upload(&vec![f32::NAN; (b.heads_q * b.total_new).max(1)])
        .unwrap();
    extend::<T, T>(
        dev,
        &step,
        &q,
        &ql,
        &PagedCache {
            layout: b.layout,
            k: &k,
            v: &v,
            scales: KvScales::None,
        },
        DecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, b.total_new))),
        },
        &c.options(),
    )
    .unwrap();
    let o = dev.download(&o).unwrap();
    let lse = dev.download(&lse).unwrap();
    let want = reference(c, &b);
    let abs = reference_with(c, &b, f64::abs);
    let o: Vec<f64> = o[..ql.numel().unwrap()]
        .iter()
        .map(|x| Element::to_f64(*x))
        .collect();
    check(
        &format!("gpu {:?} {c:?}", T::DTYPE),
        T::DTYPE,
        &o,
        &lse[..b.heads_q * b.total_new],
        &want,
        &abs.o,
    );
}

/// The fp8 parity cases on a real device (both scale layouts, f16 and bf16, every head
/// dim), against the f64 reference over the widened values with the emulated tests'
/// tolerances. Head dim 256 needs 112 KB of shared memory: on a device with less (sm_86,
/// sm_89) the op must refuse it as unsupported, and the case is skipped.
#[test]
#[ignore = "needs a GPU: run with --ignored on a machine with CUDA"]
fn gpu_extend_fp8_parity() {
    let Some(dev) = common::gpu("gpu_extend_fp8_parity") else {
        return;
    };
    let mut cases = Vec::new();
    for ps in [1usize, 3, 16, 64] {
        let lens = vec![0, 1, ps.saturating_sub(1), ps, ps + 1, 2 * ps + 140, 300];
        let news = vec![0, 1, 0, 17.min(ps), 1, 130, 130];
        let mut c = base(ps, lens, news);
        c.heads_kv = 2;
        c.seed = 500 + ps as u64;
        cases.push(c);
    }
    for d in [64usize, 96, 128, 256] {
        let mut c = base(16, vec![150, 33, 17], vec![70, 33, 1]);
        c.head_dim = d;
        c.group = 4;
        c.heads_kv = 2;
        c.window_left = Some(20);
        c.softcap = Some(5.0);
        c.seed = 900 + d as u64;
        cases.push(c);
    }
    for c in &cases {
        for mode in [ScaleMode::PerTokenHead, ScaleMode::PerHead] {
            gpu_parity_fp8::<bf16>(&dev, c, mode);
            gpu_parity_fp8::<f16>(&dev, c, mode);
        }
    }
}

fn gpu_parity_fp8<T: AttnElement + CacheElement>(
    dev: &longctx::device::Device,
    c: &Case,
    mode: ScaleMode,
) {
    use longctx::kv_cache::{extend, DecodeOutput, KvScales, KvStep, PagedCache};
    let b = c.build::<T>();
    let f = fp8_of(c, &b, mode);
    let step = KvStep::upload(dev, &b.layout, &b.step()).unwrap();
    let q = dev.upload(&b.q).unwrap();
    let k = dev.upload(&f.k).unwrap();
    let v = dev.upload(&f.v).unwrap();
    let ks = dev.upload(&f.k_scale).unwrap();
    let vs = dev.upload(&f.v_scale).unwrap();
    let ql = HeadsLayout::contiguous(b.total_new, b.heads_q, c.head_dim);
    let n = ql.numel().unwrap().max(1);
    let mut o = dev
        .upload(&vec![<T as Element>::from_f64(f64::NAN); n])
        .unwrap();
    let mut lse = dev
        .upload(&vec![f32::NAN; (b.heads_q * b.total_new).max(1)])
        .unwrap();
    let r = extend::<T, Fp8E4m3>(
        dev,
        &step,
        &q,
        &ql,
        &PagedCache {
            layout: b.layout,
            k: &k,
            v: &v,
            scales: KvScales::Fp8 {
                mode,
                k: &ks,
                v: &vs,
            },
        },
        DecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, b.total_new))),
        },
        &c.options(),
    );
    if let Err(e) = &r {
        if c.head_dim == 256 && e.kind() == ErrorKind::Unsupported {
            eprintln!("fp8 extend d 256 refused on this device: {e}");
            return;
        }
    }
    r.unwrap();
    let o = dev.download(&o).unwrap();
    let lse = dev.download(&lse).unwrap();
    let w = widened(&b, &f);
    let want = reference(c, &w);
    let abs = reference_with(c, &w, f64::abs);
    let o: Vec<f64> = o[..ql.numel().unwrap()]
        .iter()
        .map(|x| Element::to_f64(*x))
        .collect();
    check(
        &format!("gpu fp8 {mode:?} {:?} {c:?}", T::DTYPE),
        T::DTYPE,
        &o,
        &lse[..b.heads_q * b.total_new],
        &want,
        &abs.o,
    );
}
