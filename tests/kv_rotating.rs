//! Exact dynamic scaling with a KV cache: keys appended un-rotated and rotated by decode as
//! it reads them, with each sequence's rotation at its current length. Through the
//! emulator: with a static rule the un-rotated mode gives the rotated cache's outputs bit for
//! bit; with dynamic NTK it gives, bit for bit, what a cache re-rotated at the current length
//! gives; it matches the f64 reference (which re-rotates every key) within the rounding of
//! the rotated keys and queries to the storage type; and dynamic and static rotations differ
//! past the original length. The same for extend (chunked prefill), which rotates each Q
//! and K tile in shared memory (`emu_extend_rotating_*`).

mod common;

use common::Aligned;

use half::{bf16, f16};
use longctx::attention::AttnElement;
use longctx::dtype::{DType, Element};
use longctx::emulator::{
    self, Arch, HostCache, HostDecodeOutput, HostNewKv, HostRope, HostRotation, HostScalesMut,
};
use longctx::kv_cache::reference::{
    decode_f64, decode_rotating_f64, extend_rotating_f64, DecodeMath,
};
use longctx::kv_cache::{
    CacheElement, DecodeOptions, ExtendOptions, Fp8E4m3, LseLayout, PageTable, PagedKvLayout,
    ScaleMode, Splits, StepTable,
};
use longctx::layout::HeadsLayout;
use longctx::rope::{
    AnglePrecision, Direction, LengthScaling, RopeConfig, RopeOptions, RopeScaling, RopeStyle,
};
use longctx::Error;

/// A batch: page tables (shuffled pages), lengths, new-token counts, un-rotated K/V of every
/// cached token (dense, sequences concatenated) and un-rotated queries.
struct Batch {
    layout: PagedKvLayout,
    table: Vec<i32>,
    max_pages: usize,
    lens: Vec<i32>,
    cu_new: Vec<i32>,
    heads_q: usize,
    k: Vec<f64>,
    v: Vec<f64>,
    q: Vec<f64>,
}

impl Batch {
    fn new<T: Element>(
        page_size: usize,
        lens: &[usize],
        news: &[usize],
        heads_kv: usize,
        group: usize,
        d: usize,
        seed: u64,
    ) -> Self {
        let mut r = common::Rng(seed);
        let used: Vec<usize> = lens.iter().map(|l| l.div_ceil(page_size)).collect();
        let max_pages = used.iter().copied().max().unwrap_or(0) + 1;
        let pages = used.iter().sum::<usize>() + 2;
        let mut ids: Vec<i32> = (0..pages as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.below(i as u64 + 1) as usize);
        }
        let mut table = vec![-1i32; lens.len() * max_pages];
        let mut next = 0;
        for (b, &u) in used.iter().enumerate() {
            for i in 0..u {
                table[b * max_pages + i] = ids[next];
                next += 1;
            }
        }
        let total: usize = lens.iter().sum();
        let heads_q = heads_kv * group;
        let nq: usize = news.iter().sum();
        let round = |x: f64| T::from_f64(x).to_f64();
        let mut cu_new = vec![0i32];
        for &n in news {
            cu_new.push(cu_new.last().unwrap() + n as i32);
        }
        Batch {
            layout: PagedKvLayout {
                page_size,
                pages,
                heads_kv,
                head_dim: d,
            },
            table,
            max_pages,
            lens: lens.iter().map(|&l| l as i32).collect(),
            cu_new,
            heads_q,
            k: (0..total * heads_kv * d)
                .map(|_| round(1.5 * r.uniform()))
                .collect(),
            v: (0..total * heads_kv * d)
                .map(|_| round(r.uniform()))
                .collect(),
            q: (0..nq * heads_q * d)
                .map(|_| round(1.5 * r.uniform()))
                .collect(),
        }
    }

    fn step(&self) -> StepTable<'_> {
        StepTable {
            table: PageTable {
                block_table: &self.table,
                max_pages_per_seq: self.max_pages,
                seqlens: &self.lens,
            },
            cu_new: &self.cu_new,
        }
    }
}

/// The cache after appending every token of sequences `seqs` (all others untouched), K
/// rotated with `rope` at each token's position when given; fp8 with per-(token, head)
/// scales when `S` is fp8.
#[allow(clippy::too_many_arguments)]
fn append_all<T: Element, S: CacheElement>(
    b: &Batch,
    seqs: &[usize],
    rope: Option<HostRope>,
    k_cache: &mut [S],
    v_cache: &mut [S],
    k_scale: &mut [f32],
    v_scale: &mut [f32],
) {
    let hd = b.layout.heads_kv * b.layout.head_dim;
    let mut start = 0usize;
    for (s, &len) in b.lens.iter().enumerate() {
        let len = len as usize;
        if seqs.contains(&s) {
            let table = &b.table[s * b.max_pages..(s + 1) * b.max_pages];
            let lens = [len as i32];
            let cu = [0, len as i32];
            let step = StepTable {
                table: PageTable {
                    block_table: table,
                    max_pages_per_seq: b.max_pages,
                    seqlens: &lens,
                },
                cu_new: &cu,
            };
            let k: Vec<T> = b.k[start * hd..(start + len) * hd]
                .iter()
                .map(|&x| T::from_f64(x))
                .collect();
            let v: Vec<T> = b.v[start * hd..(start + len) * hd]
                .iter()
                .map(|&x| T::from_f64(x))
                .collect();
            let l = HeadsLayout::contiguous(len, b.layout.heads_kv, b.layout.head_dim);
            let scales = if S::CACHE_DTYPE == longctx::kv_cache::CacheDType::Fp8E4m3 {
                HostScalesMut::PerTokenHead {
                    k: &mut *k_scale,
                    v: &mut *v_scale,
                }
            } else {
                HostScalesMut::None
            };
            emulator::append_kv::<T, S>(
                &b.layout,
                &step,
                &HostNewKv {
                    k: &k,
                    k_layout: l,
                    v: &v,
                    v_layout: l,
                },
                k_cache,
                v_cache,
                scales,
                rope,
            )
            .unwrap();
        }
        start += len;
    }
}

fn host_rope<'a>(
    c: &RopeConfig,
    inv: &'a [f64],
    len: usize,
    style: RopeStyle,
    precision: AnglePrecision,
) -> HostRope<'a> {
    HostRope {
        inv_freq: inv,
        head_dim: c.head_dim(),
        attention_factor: c.attention_factor(),
        max_positions: if c.depends_on_length() {
            Some(len)
        } else {
            None
        },
        style,
        precision,
    }
}

/// The step's queries rotated as `apply_rope` does, sequence by sequence with `config` at
/// the sequence's length.
fn rotate_queries<T: Element>(
    b: &Batch,
    q: &[T],
    config: impl Fn(usize) -> RopeConfig,
    style: RopeStyle,
    precision: AnglePrecision,
) -> Vec<T> {
    let (hq, d) = (b.heads_q, b.layout.head_dim);
    let mut out = q.to_vec();
    for s in 0..b.lens.len() {
        let (lo, hi) = (b.cu_new[s] as usize, b.cu_new[s + 1] as usize);
        if hi == lo {
            continue;
        }
        let len = b.lens[s] as usize;
        let n = hi - lo;
        let positions: Vec<i32> = ((len - n) as i32..len as i32).collect();
        let l = HeadsLayout::contiguous(n, hq, d);
        let mut part = out[lo * hq * d..hi * hq * d].to_vec();
        let mut dummy = part.clone();
        emulator::apply_rope::<T>(
            &config(len),
            len,
            &positions,
            &mut part,
            &l,
            &mut dummy,
            &l,
            RopeOptions {
                style,
                direction: Direction::Forward,
                precision,
            },
        )
        .unwrap();
        out[lo * hq * d..hi * hq * d].copy_from_slice(&part);
    }
    out
}

struct Run {
    o: Vec<f64>,
    lse: Vec<f32>,
}

/// Decode over `cache` (rotated or not) with `rotation` (None: a rotated cache and rotated
/// queries).
fn run_decode<T: Element, S: CacheElement>(
    b: &Batch,
    q: &[T],
    k: &[S],
    v: &[S],
    scales: Option<(&[f32], &[f32])>,
    rotation: Option<HostRotation>,
    splits: Splits,
) -> Run {
    let d = b.layout.head_dim;
    let total_new = *b.cu_new.last().unwrap() as usize;
    let ql = HeadsLayout::contiguous(total_new, b.heads_q, d);
    let ka = Aligned::new(k);
    let va = Aligned::new(v);
    let cache = HostCache {
        layout: b.layout,
        k: ka.as_slice(),
        v: va.as_slice(),
        scales: scales.map(|(k, v)| (ScaleMode::PerTokenHead, k, v)),
    };
    let mut o = vec![T::from_f64(f64::NAN); ql.numel().unwrap()];
    let mut lse = vec![f32::NAN; b.heads_q * total_new];
    let mut ws = vec![0f32; 1 << 20];
    let out = HostDecodeOutput {
        o: &mut o,
        o_layout: ql,
        lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, total_new))),
    };
    let opts = DecodeOptions {
        splits,
        ..DecodeOptions::default()
    };
    match rotation {
        Some(r) => {
            emulator::decode_rotating::<T, S>(&b.step(), &r, q, &ql, &cache, out, &mut ws, 1, &opts)
        }
        None => emulator::decode::<T, S>(&b.step(), q, &ql, &cache, out, &mut ws, 1, &opts),
    }
    .unwrap();
    Run {
        o: o.iter().map(|x| x.to_f64()).collect(),
        lse,
    }
}

fn bits(r: &Run) -> (Vec<u64>, Vec<u32>) {
    (
        r.o.iter().map(|x| x.to_bits()).collect(),
        r.lse.iter().map(|x| x.to_bits()).collect(),
    )
}

fn yarn(d: usize, factor: f64, l0: usize) -> RopeConfig {
    RopeConfig::builder(d)
        .base(1e6)
        .scaling(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: l0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: true,
        })
        .build()
        .unwrap()
}

/// Static rules: append with fused RoPE + rotated queries, and append un-rotated + decode
/// rotating on load, give the same bits (NeoX and interleaved, partial rotary, both angle
/// precisions, YaRN's attention factor, split and unsplit).
fn static_equality<T: Element + CacheElement>() {
    let cases: Vec<(RopeConfig, RopeStyle, AnglePrecision, usize)> = vec![
        (
            RopeConfig::builder(128).base(5e5).build().unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F64,
            128,
        ),
        (
            yarn(64, 4.0, 32),
            RopeStyle::Interleaved,
            AnglePrecision::F64,
            64,
        ),
        (
            RopeConfig::builder(128)
                .partial_rotary_factor(0.5)
                .build()
                .unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F32,
            128,
        ),
        // The CUDA-core kernels (head dims 256 and 512).
        (
            RopeConfig::builder(256).base(1e4).build().unwrap(),
            RopeStyle::Interleaved,
            AnglePrecision::F64,
            256,
        ),
        (
            RopeConfig::builder(512)
                .partial_rotary_factor(0.25)
                .build()
                .unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F64,
            512,
        ),
    ];
    for (i, (config, style, precision, d)) in cases.into_iter().enumerate() {
        let b = Batch::new::<T>(16, &[70, 1, 33], &[2, 1, 3], 2, 4, d, 40 + i as u64);
        let n = b.layout.cache_len().unwrap();
        let all: Vec<usize> = (0..b.lens.len()).collect();
        let max_len = 70;
        let inv = config.inv_freq_f64(max_len);
        let rope = host_rope(&config, &inv, max_len, style, precision);
        let (mut kr, mut vr) = (vec![T::default(); n], vec![T::default(); n]);
        let (mut ku, mut vu) = (vec![T::default(); n], vec![T::default(); n]);
        append_all::<T, T>(&b, &all, Some(rope), &mut kr, &mut vr, &mut [], &mut []);
        append_all::<T, T>(&b, &all, None, &mut ku, &mut vu, &mut [], &mut []);
        let q: Vec<T> = b.q.iter().map(|&x| <T as Element>::from_f64(x)).collect();
        let qr = rotate_queries(&b, &q, |_| config.clone(), style, precision);
        let scaling = LengthScaling::Config(config.clone());
        for splits in [Splits::AtMost(1), Splits::AtMost(3)] {
            let rotated = run_decode::<T, T>(&b, &qr, &kr, &vr, None, None, splits);
            let onload = run_decode::<T, T>(
                &b,
                &q,
                &ku,
                &vu,
                None,
                Some(HostRotation {
                    scaling: &scaling,
                    style,
                    precision,
                }),
                splits,
            );
            assert_eq!(bits(&rotated), bits(&onload), "case {i} {splits:?}");
            assert!(rotated.lse.iter().all(|x| x.is_finite()));
        }
    }
}

#[test]
fn emu_rotating_static_rules_equal_the_rotated_cache_bf16() {
    static_equality::<bf16>();
}

#[test]
fn emu_rotating_static_rules_equal_the_rotated_cache_f16() {
    static_equality::<f16>();
}

/// Dynamic NTK: decode rotating on load equals, bit for bit, decode over a cache whose keys
/// were all rotated with the current length's base (and queries too); sequences shorter
/// than `max_position_embeddings` keep the plain rotation.
#[test]
fn emu_rotating_dynamic_ntk_equals_a_cache_rotated_at_the_current_length() {
    let d = 64;
    let config = RopeConfig::builder(d)
        .max_position_embeddings(48)
        .scaling(RopeScaling::Dynamic { factor: 2.0 })
        .build()
        .unwrap();
    let b = Batch::new::<bf16>(8, &[150, 20, 97], &[1, 2, 1], 2, 2, d, 7);
    let n = b.layout.cache_len().unwrap();
    let (mut kr, mut vr) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    let (mut ku, mut vu) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    for (s, &len) in b.lens.iter().enumerate() {
        let len = len as usize;
        let inv = config.inv_freq_f64(len);
        let rope = host_rope(&config, &inv, len, RopeStyle::Neox, AnglePrecision::F64);
        append_all::<bf16, bf16>(&b, &[s], Some(rope), &mut kr, &mut vr, &mut [], &mut []);
    }
    let all: Vec<usize> = (0..3).collect();
    append_all::<bf16, bf16>(&b, &all, None, &mut ku, &mut vu, &mut [], &mut []);
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let qr = rotate_queries(
        &b,
        &q,
        |_| config.clone(),
        RopeStyle::Neox,
        AnglePrecision::F64,
    );
    let scaling = LengthScaling::Config(config.clone());
    let rotated = run_decode::<bf16, bf16>(&b, &qr, &kr, &vr, None, None, Splits::AtMost(2));
    let onload = run_decode::<bf16, bf16>(
        &b,
        &q,
        &ku,
        &vu,
        None,
        Some(HostRotation {
            scaling: &scaling,
            style: RopeStyle::Neox,
            precision: AnglePrecision::F64,
        }),
        Splits::AtMost(2),
    );
    assert_eq!(bits(&rotated), bits(&onload));
}

/// Against the f64 reference that re-rotates every key at the current length (dynamic NTK
/// and dynamic YaRN, bf16 and fp8 caches): the kernel rounds each rotated key and query to
/// the storage type, which moves a score by at most `scale x 2 eps |q| |k|` (delta); the LSE
/// is held to delta plus f32 error, O to e^(2 delta) - 1 of max|V| plus P's and the
/// output's rounding.
fn reference_parity<S: CacheElement>(scaling: &LengthScaling, style: RopeStyle, seed: u64) {
    let shape = Shape {
        page_size: 16,
        lens: &[130, 5, 64],
        news: &[2, 1, 3],
        group: 2,
    };
    reference_parity_on::<S>(scaling, style, seed, &shape, Splits::AtMost(3));
}

/// A batch's shape: page size, cache lengths, new tokens per sequence, query heads per KV
/// head (two KV heads).
struct Shape<'a> {
    page_size: usize,
    lens: &'a [usize],
    news: &'a [usize],
    group: usize,
}

fn reference_parity_on<S: CacheElement>(
    scaling: &LengthScaling,
    style: RopeStyle,
    seed: u64,
    shape: &Shape,
    splits: Splits,
) {
    let d = scaling.config().head_dim();
    let b = Batch::new::<bf16>(
        shape.page_size,
        shape.lens,
        shape.news,
        2,
        shape.group,
        d,
        seed,
    );
    let n = b.layout.cache_len().unwrap();
    let rows = b.layout.pages * b.layout.page_size * b.layout.heads_kv;
    let (mut ku, mut vu) = (vec![S::default(); n], vec![S::default(); n]);
    let (mut ks, mut vs) = (vec![0f32; rows], vec![0f32; rows]);
    let all: Vec<usize> = (0..b.lens.len()).collect();
    append_all::<bf16, S>(&b, &all, None, &mut ku, &mut vu, &mut ks, &mut vs);
    let fp8 = S::CACHE_DTYPE == longctx::kv_cache::CacheDType::Fp8E4m3;
    // The cache's values as the reference reads them.
    let value = |c: &[S], sc: &[f32]| -> Vec<f64> {
        c.iter()
            .enumerate()
            .map(|(i, x)| x.to_f64() * if fp8 { f64::from(sc[i / d]) } else { 1.0 })
            .collect()
    };
    let (kval, vval) = (value(&ku, &ks), value(&vu, &vs));
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let got = run_decode::<bf16, S>(
        &b,
        &q,
        &ku,
        &vu,
        fp8.then_some((&ks[..], &vs[..])),
        Some(HostRotation {
            scaling,
            style,
            precision: AnglePrecision::F64,
        }),
        splits,
    );
    let scale = 1.0 / (d as f64).sqrt();
    let math = DecodeMath {
        scale,
        softcap: None,
        window_left: None,
    };
    let want = decode_rotating_f64(
        &b.layout,
        &b.step(),
        &b.q,
        b.heads_q,
        &kval,
        &vval,
        scaling,
        style,
        &math,
    )
    .unwrap();
    let norm = |x: &[f64]| {
        x.chunks(d)
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
            .fold(0.0f64, f64::max)
    };
    let factor2 = (0..b.lens.len())
        .map(|s| {
            scaling
                .at(b.lens[s] as usize)
                .unwrap()
                .attention_factor
                .powi(2)
        })
        .fold(0.0f64, f64::max);
    let eps = DType::BF16.epsilon();
    let delta = scale * 2.0 * eps * norm(&b.q) * norm(&kval) * factor2 * 1.01;
    let vmax = vval.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.o.iter().zip(&want.o).enumerate() {
        let tol = ((2.0 * delta).exp() - 1.0) * vmax + 1.01 * eps * (w.abs() + vmax) + 2e-5;
        assert!(
            (g - w).abs() <= tol,
            "O[{i}] {g} vs {w} (tolerance {tol:e})"
        );
    }
    for (i, (g, w)) in got.lse.iter().zip(&want.lse).enumerate() {
        let tol = delta + 2e-5 * (1.0 + w.abs());
        assert!(
            (f64::from(*g) - w).abs() <= tol,
            "LSE[{i}] {g} vs {w} (tolerance {tol:e})"
        );
    }
}

#[test]
fn emu_rotating_matches_the_dynamic_reference() {
    let ntk = LengthScaling::Config(
        RopeConfig::builder(64)
            .max_position_embeddings(48)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    reference_parity::<bf16>(&ntk, RopeStyle::Neox, 3);
    reference_parity::<Fp8E4m3>(&ntk, RopeStyle::Interleaved, 4);
    let dyn_yarn = LengthScaling::DynamicYarn(yarn(128, 1.0, 40));
    reference_parity::<bf16>(&dyn_yarn, RopeStyle::Neox, 5);
    reference_parity::<Fp8E4m3>(&dyn_yarn, RopeStyle::Neox, 6);
    // The CUDA-core kernel (head dims 256 and 512) over fp8 caches.
    let ntk256 = LengthScaling::Config(
        RopeConfig::builder(256)
            .max_position_embeddings(48)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    let shape = Shape {
        page_size: 7,
        lens: &[0, 1, 8, 110],
        news: &[0, 1, 2, 1],
        group: 4,
    };
    reference_parity_on::<Fp8E4m3>(
        &ntk256,
        RopeStyle::Interleaved,
        7,
        &shape,
        Splits::AtMost(3),
    );
    let dyn_yarn512 = LengthScaling::DynamicYarn(yarn(512, 1.0, 40));
    let shape = Shape {
        page_size: 1,
        lens: &[1, 2, 90],
        news: &[1, 2, 1],
        group: 2,
    };
    reference_parity_on::<Fp8E4m3>(&dyn_yarn512, RopeStyle::Neox, 8, &shape, Splits::AtMost(1));
}

/// The configuration whose fixed-length rotation is `scaling`'s at length `len` (dynamic
/// YaRN: the YaRN parameters with factor `max(1, len / L0)`), checked against
/// `LengthScaling::at`.
fn config_at(scaling: &LengthScaling, len: usize) -> RopeConfig {
    let c = match scaling {
        LengthScaling::Config(c) => c.clone(),
        LengthScaling::DynamicYarn(c) => {
            let RopeScaling::Yarn {
                original_max_position_embeddings: l0,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
                ..
            } = c.scaling().clone()
            else {
                panic!("dynamic YaRN from a yarn configuration");
            };
            RopeConfig::builder(c.head_dim())
                .base(c.base())
                .partial_rotary_factor(c.partial_rotary_factor())
                .max_position_embeddings(c.max_position_embeddings())
                .scaling(RopeScaling::Yarn {
                    factor: (len as f64 / l0 as f64).max(1.0),
                    original_max_position_embeddings: l0,
                    beta_fast,
                    beta_slow,
                    mscale,
                    mscale_all_dim,
                    attention_factor,
                    truncate,
                })
                .build()
                .unwrap()
        }
    };
    let at = scaling.at(len).unwrap();
    assert_eq!(c.inv_freq_f64(len), at.inv_freq, "len {len}");
    assert_eq!(
        c.attention_factor(),
        at.attention_factor as f32,
        "len {len}"
    );
    c
}

/// fp8 keys rotated on load, by the definition shared by both decode kernels: each code is
/// widened to `T` (value / 256, exact), rotated as RoPE rotates a `T` row (f32 arithmetic,
/// rounded to `T`), and only then multiplied by 256 x its scale; queries rotated as
/// `apply_rope` rotates them. The model here builds exactly those keys (the widened codes
/// of every sequence through the emulated `apply_rope` at the sequence's current length)
/// and runs the f64 decode over them, so what is left is the kernel's f32 arithmetic: each
/// score within `delta` = 24 x 2^-24 x scale |q| |k| (an fma chain of 16 channels, 5
/// shuffle adds, the scale), the LSE within delta + 1e-5 relative, O within its rounding
/// to `T` plus (e^(2 delta') - 1) max|V| (and eps max|V| at head dims 64 and 128, whose
/// tensor-core kernel rounds P to `T` before P V). A missing or extra key moves the LSE by about
/// 1 / length (>= 1e-3 here); a wrong angle, pair or scale moves the scores by O(1).
#[allow(clippy::too_many_arguments)]
fn fp8_rotating_exact<T: Element>(
    scaling: &LengthScaling,
    style: RopeStyle,
    precision: AnglePrecision,
    shape: &Shape,
    splits: &[Splits],
    seed: u64,
) {
    let d = scaling.config().head_dim();
    let b = Batch::new::<T>(
        shape.page_size,
        shape.lens,
        shape.news,
        2,
        shape.group,
        d,
        seed,
    );
    let hk = b.layout.heads_kv;
    let n = b.layout.cache_len().unwrap();
    let rows = b.layout.pages * b.layout.page_size * hk;
    let (mut ku, mut vu) = (vec![Fp8E4m3(0); n], vec![Fp8E4m3(0); n]);
    let (mut ks, mut vs) = (vec![0f32; rows], vec![0f32; rows]);
    let all: Vec<usize> = (0..b.lens.len()).collect();
    append_all::<T, Fp8E4m3>(&b, &all, None, &mut ku, &mut vu, &mut ks, &mut vs);

    // The keys the kernel scores, in the cache's layout; V as the cache's values.
    let mut kval = vec![0.0f64; n];
    for (s, &len) in b.lens.iter().enumerate() {
        let len = len as usize;
        if len == 0 {
            continue;
        }
        let slot = |j: usize| {
            b.table[s * b.max_pages + j / b.layout.page_size] as usize * b.layout.page_size
                + j % b.layout.page_size
        };
        let mut wide: Vec<T> = Vec::with_capacity(len * hk * d);
        for j in 0..len {
            let base = slot(j) * hk * d;
            wide.extend(
                ku[base..base + hk * d]
                    .iter()
                    .map(|c| <T as Element>::from_f64(c.to_f64() / 256.0)),
            );
        }
        let l = HeadsLayout::contiguous(len, hk, d);
        let mut dummy = wide.clone();
        let positions: Vec<i32> = (0..len as i32).collect();
        emulator::apply_rope::<T>(
            &config_at(scaling, len),
            len,
            &positions,
            &mut wide,
            &l,
            &mut dummy,
            &l,
            RopeOptions {
                style,
                direction: Direction::Forward,
                precision,
            },
        )
        .unwrap();
        for j in 0..len {
            for h in 0..hk {
                let row = slot(j) * hk + h;
                for ch in 0..d {
                    kval[row * d + ch] =
                        wide[(j * hk + h) * d + ch].to_f64() * 256.0 * f64::from(ks[row]);
                }
            }
        }
    }
    let vval: Vec<f64> = vu
        .iter()
        .enumerate()
        .map(|(i, x)| x.to_f64() * f64::from(vs[i / d]))
        .collect();
    let q: Vec<T> = b.q.iter().map(|&x| <T as Element>::from_f64(x)).collect();
    let qr: Vec<f64> = rotate_queries(&b, &q, |len| config_at(scaling, len), style, precision)
        .iter()
        .map(|x| x.to_f64())
        .collect();
    let scale = 1.0 / (d as f64).sqrt();
    let math = DecodeMath {
        scale,
        softcap: None,
        window_left: None,
    };
    let want = decode_f64(&b.layout, &b.step(), &qr, b.heads_q, &kval, &vval, &math).unwrap();

    let norm = |x: &[f64]| {
        x.chunks(d)
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
            .fold(0.0f64, f64::max)
    };
    let delta = 24.0 * 2f64.powi(-24) * scale * norm(&qr) * norm(&kval);
    let vmax = vval.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let eps = T::DTYPE.epsilon();
    let p_round = if d <= 128 { 1.01 * eps } else { 0.0 };
    for &sp in splits {
        let got = run_decode::<T, Fp8E4m3>(
            &b,
            &q,
            &ku,
            &vu,
            Some((&ks[..], &vs[..])),
            Some(HostRotation {
                scaling,
                style,
                precision,
            }),
            sp,
        );
        let mut worst = 0.0f64;
        for (i, (g, w)) in got.lse.iter().zip(&want.lse).enumerate() {
            if w.is_infinite() {
                assert_eq!(f64::from(*g), *w, "LSE[{i}] of a row without keys, {sp:?}");
                continue;
            }
            let tol = delta + 1e-5 * (1.0 + w.abs());
            let err = (f64::from(*g) - w).abs();
            worst = worst.max(err / tol);
            assert!(err <= tol, "LSE[{i}] {g} vs {w} (tolerance {tol:e}) {sp:?}");
        }
        let dl = delta + 1e-5;
        for (i, (g, w)) in got.o.iter().zip(&want.o).enumerate() {
            let tol = 1.01 * eps * w.abs() + ((2.0 * dl).exp() - 1.0 + p_round) * vmax;
            let err = (g - w).abs();
            worst = worst.max(err / tol);
            assert!(err <= tol, "O[{i}] {g} vs {w} (tolerance {tol:e}) {sp:?}");
        }
        eprintln!(
            "d {d} page {} {sp:?}: worst error / tolerance {worst:.3}",
            shape.page_size
        );
    }
}

/// fp8 caches rotated on load by the CUDA-core kernel (head dims 256 and 512): static rules
/// (NeoX and interleaved, partial rotary, both angle precisions, f16 and bf16 queries) and
/// dynamic NTK and dynamic YaRN, on page sizes 1 to 16 (5 and 7 not powers of two), lengths
/// 0, 1, page - 1, page, page + 1 and several pages, GQA 1 to 8, split and unsplit; and the
/// same at head dims 64 and 128 (the tensor-core kernel), so one definition holds for all.
#[test]
fn emu_rotating_fp8_every_head_dim() {
    let unsplit_and_split = [Splits::AtMost(1), Splits::AtMost(3)];
    let d256 = LengthScaling::Config(RopeConfig::builder(256).base(1e4).build().unwrap());
    fp8_rotating_exact::<bf16>(
        &d256,
        RopeStyle::Neox,
        AnglePrecision::F64,
        &Shape {
            page_size: 1,
            lens: &[0, 1, 2, 45],
            news: &[0, 1, 2, 3],
            group: 4,
        },
        &unsplit_and_split,
        11,
    );
    let d256_partial = LengthScaling::Config(
        RopeConfig::builder(256)
            .base(5e5)
            .partial_rotary_factor(0.5)
            .build()
            .unwrap(),
    );
    fp8_rotating_exact::<bf16>(
        &d256_partial,
        RopeStyle::Interleaved,
        AnglePrecision::F32,
        &Shape {
            page_size: 7,
            lens: &[6, 7, 8, 150],
            news: &[1, 3, 2, 1],
            group: 2,
        },
        &[Splits::AtMost(1), Splits::AtMost(4)],
        12,
    );
    let d512_partial = LengthScaling::Config(
        RopeConfig::builder(512)
            .partial_rotary_factor(0.25)
            .build()
            .unwrap(),
    );
    fp8_rotating_exact::<bf16>(
        &d512_partial,
        RopeStyle::Neox,
        AnglePrecision::F64,
        &Shape {
            page_size: 16,
            lens: &[0, 15, 16, 17, 130],
            news: &[0, 2, 1, 3, 1],
            group: 8,
        },
        &unsplit_and_split,
        13,
    );
    let d512_yarn = LengthScaling::Config(yarn(512, 4.0, 32));
    fp8_rotating_exact::<f16>(
        &d512_yarn,
        RopeStyle::Interleaved,
        AnglePrecision::F64,
        &Shape {
            page_size: 5,
            lens: &[1, 4, 6, 70],
            news: &[1, 2, 1, 2],
            group: 1,
        },
        &unsplit_and_split,
        14,
    );
    // Dynamic rules: every key at the current length's rotation.
    let ntk256 = LengthScaling::Config(
        RopeConfig::builder(256)
            .max_position_embeddings(48)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    fp8_rotating_exact::<bf16>(
        &ntk256,
        RopeStyle::Neox,
        AnglePrecision::F64,
        &Shape {
            page_size: 3,
            lens: &[2, 3, 4, 160],
            news: &[1, 1, 2, 1],
            group: 4,
        },
        &[Splits::AtMost(3)],
        15,
    );
    let dyn_yarn512 = LengthScaling::DynamicYarn(yarn(512, 1.0, 40));
    fp8_rotating_exact::<bf16>(
        &dyn_yarn512,
        RopeStyle::Neox,
        AnglePrecision::F64,
        &Shape {
            page_size: 16,
            lens: &[1, 17, 120],
            news: &[1, 2, 1],
            group: 2,
        },
        &[Splits::AtMost(2)],
        16,
    );
    // The tensor-core kernel, same definition.
    let ntk64 = LengthScaling::Config(
        RopeConfig::builder(64)
            .max_position_embeddings(48)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    fp8_rotating_exact::<bf16>(
        &ntk64,
        RopeStyle::Interleaved,
        AnglePrecision::F64,
        &Shape {
            page_size: 7,
            lens: &[0, 1, 8, 100],
            news: &[0, 1, 2, 1],
            group: 4,
        },
        &unsplit_and_split,
        17,
    );
    let dyn_yarn128 = LengthScaling::DynamicYarn(yarn(128, 1.0, 40));
    fp8_rotating_exact::<f16>(
        &dyn_yarn128,
        RopeStyle::Neox,
        AnglePrecision::F64,
        &Shape {
            page_size: 1,
            lens: &[1, 2, 90],
            news: &[1, 2, 1],
            group: 2,
        },
        &[Splits::AtMost(2)],
        18,
    );
}

/// The references: re-rotating at the current length differs from keys rotated with the
/// original rule once a sequence outgrows `max_position_embeddings`, and equals it before.
#[test]
fn dynamic_and_static_rotations_differ_past_the_original_length() {
    let d = 64;
    let dynamic = RopeConfig::builder(d)
        .max_position_embeddings(48)
        .scaling(RopeScaling::Dynamic { factor: 2.0 })
        .build()
        .unwrap();
    let plain = RopeConfig::builder(d).build().unwrap();
    let math = DecodeMath {
        scale: 0.125,
        softcap: None,
        window_left: None,
    };
    for (len, differ) in [(40usize, false), (160, true)] {
        let b = Batch::new::<bf16>(16, &[len], &[1], 1, 2, d, 9);
        let n = b.layout.cache_len().unwrap();
        // The cache in value space: dense rows scattered into pages.
        let mut kc = vec![0.0; n];
        let mut vc = vec![0.0; n];
        longctx::kv_cache::reference::scatter_paged_f64(&b.layout, &b.k, &b.step().table, &mut kc)
            .unwrap();
        longctx::kv_cache::reference::scatter_paged_f64(&b.layout, &b.v, &b.step().table, &mut vc)
            .unwrap();
        let dynamic_out = decode_rotating_f64(
            &b.layout,
            &b.step(),
            &b.q,
            b.heads_q,
            &kc,
            &vc,
            &LengthScaling::Config(dynamic.clone()),
            RopeStyle::Neox,
            &math,
        )
        .unwrap();
        let static_out = decode_rotating_f64(
            &b.layout,
            &b.step(),
            &b.q,
            b.heads_q,
            &kc,
            &vc,
            &LengthScaling::Config(plain.clone()),
            RopeStyle::Neox,
            &math,
        )
        .unwrap();
        let diff = dynamic_out
            .lse
            .iter()
            .zip(&static_out.lse)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        if differ {
            assert!(diff > 1e-3, "len {len}: {diff}");
        } else {
            assert_eq!(diff, 0.0, "len {len}");
        }
        // decode_f64 over keys rotated outside agrees with decode_rotating_f64 (static).
        let _ = decode_f64(&b.layout, &b.step(), &b.q, b.heads_q, &kc, &vc, &math).unwrap();
    }
}

#[test]
fn emu_rotating_rejects_bad_calls() {
    let scaling = LengthScaling::Config(RopeConfig::builder(256).build().unwrap());
    let rot = HostRotation {
        scaling: &scaling,
        style: RopeStyle::Neox,
        precision: AnglePrecision::F64,
    };
    let mut o = vec![bf16::ZERO; 512];
    let mut ws = vec![0f32; 1 << 12];
    // A scaling made for another head dim.
    let b = Batch::new::<bf16>(16, &[20], &[1], 1, 2, 64, 1);
    let k = vec![bf16::ZERO; b.layout.cache_len().unwrap()];
    let ka = Aligned::new(&k);
    let cache = HostCache {
        layout: b.layout,
        k: ka.as_slice(),
        v: ka.as_slice(),
        scales: None,
    };
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let ql = HeadsLayout::contiguous(1, 2, 64);
    let e = emulator::decode_rotating::<bf16, bf16>(
        &b.step(),
        &rot,
        &q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o[..128],
            o_layout: ql,
            lse: None,
        },
        &mut ws,
        1,
        &DecodeOptions::default(),
    );
    assert!(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "rotation",
                ..
            })
        ),
        "{e:?}"
    );
}

/// The device path: `KvRotation::upload` + `decode_rotating` on a cache built here (through
/// the emulated append), against the emulated decode rotating on load: the same code, so
/// within a few ulps (nvcc may contract multiply-adds differently from the host compiler).
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_rotating_matches_the_emulator() {
    use longctx::kv_cache::{
        decode_rotating, DecodeOutput, KvRotation, KvScales, KvStep, PagedCache,
    };
    let Some(dev) = common::gpu("gpu_rotating_matches_the_emulator") else {
        return;
    };
    let d = 128;
    let config = RopeConfig::builder(d)
        .max_position_embeddings(1024)
        .scaling(RopeScaling::Dynamic { factor: 4.0 })
        .build()
        .unwrap();
    let scaling = LengthScaling::Config(config);
    let b = Batch::new::<bf16>(16, &[5000, 17, 900], &[1, 2, 1], 8, 4, d, 77);
    let n = b.layout.cache_len().unwrap();
    let (mut ku, mut vu) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    append_all::<bf16, bf16>(&b, &[0, 1, 2], None, &mut ku, &mut vu, &mut [], &mut []);
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let rot = HostRotation {
        scaling: &scaling,
        style: RopeStyle::Neox,
        precision: AnglePrecision::F64,
    };
    let want = run_decode::<bf16, bf16>(&b, &q, &ku, &vu, None, Some(rot), Splits::AtMost(4));
    let step = KvStep::upload(&dev, &b.layout, &b.step()).unwrap();
    let rotation =
        KvRotation::upload(&dev, &step, &scaling, RopeStyle::Neox, AnglePrecision::F64).unwrap();
    let total_new = *b.cu_new.last().unwrap() as usize;
    let ql = HeadsLayout::contiguous(total_new, b.heads_q, d);
    let qd = dev.upload(&q).unwrap();
    let kd = dev.upload(&ku).unwrap();
    let vd = dev.upload(&vu).unwrap();
    let mut o = dev.zeros::<bf16>(ql.numel().unwrap()).unwrap();
    let mut lse = dev.zeros::<f32>(b.heads_q * total_new).unwrap();
    let mut ws = dev.zeros::<f32>(1 << 20).unwrap();
    decode_rotating::<bf16, bf16>(
        &dev,
        &step,
        &rotation,
        &qd,
        &ql,
        &PagedCache {
            layout: b.layout,
            k: &kd,
            v: &vd,
            scales: KvScales::None,
        },
        DecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, total_new))),
        },
        Some(&mut ws),
        &DecodeOptions {
            splits: Splits::AtMost(4),
            ..DecodeOptions::default()
        },
    )
    .unwrap();
    let got_o = dev.download(&o).unwrap();
    let got_lse = dev.download(&lse).unwrap();
    for (g, w) in got_o.iter().zip(&want.o) {
        assert!(
            (g.to_f64() - w).abs() <= 4.0 * DType::BF16.epsilon() * (w.abs() + 1.0),
            "{g} vs {w}"
        );
    }
    for (g, w) in got_lse.iter().zip(&want.lse) {
        assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

/// Extend over `cache` (rotated or not) with `rotation` (None: a rotated cache and rotated
/// queries), for `arch`'s tile shape; no window or softcap, scale 1 / sqrt(d).
#[allow(clippy::too_many_arguments)]
fn run_extend<T: AttnElement + Element, S: CacheElement>(
    b: &Batch,
    q: &[T],
    k: &[S],
    v: &[S],
    scales: Option<(&[f32], &[f32])>,
    rotation: Option<HostRotation>,
    arch: Arch,
) -> Run {
    let d = b.layout.head_dim;
    let total_new = *b.cu_new.last().unwrap() as usize;
    let ql = HeadsLayout::contiguous(total_new, b.heads_q, d);
    let ka = Aligned::new(k);
    let va = Aligned::new(v);
    let cache = HostCache {
        layout: b.layout,
        k: ka.as_slice(),
        v: va.as_slice(),
        scales: scales.map(|(k, v)| (ScaleMode::PerTokenHead, k, v)),
    };
    let mut o = vec![<T as Element>::from_f64(f64::NAN); ql.numel().unwrap()];
    let mut lse = vec![f32::NAN; b.heads_q * total_new];
    let out = HostDecodeOutput {
        o: &mut o,
        o_layout: ql,
        lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, total_new))),
    };
    let opts = ExtendOptions::default();
    let tiles = match rotation {
        Some(r) => {
            emulator::extend_rotating::<T, S>(arch, &b.step(), &r, q, &ql, &cache, out, &opts)
        }
        None => emulator::extend::<T, S>(arch, &b.step(), q, &ql, &cache, out, &opts),
    }
    .unwrap();
    match tiles {
        Some(t) => assert_eq!(t.ptx_arch, arch.ptx_arch()),
        // Head dim 512: the row-packed kernels.
        None => assert_eq!(b.layout.head_dim, 512),
    }
    Run {
        o: o.iter().map(|x| Element::to_f64(*x)).collect(),
        lse,
    }
}

/// Static rules through extend: append with fused RoPE + rotated queries, and append
/// un-rotated + extend rotating each Q and K tile on load, give the same bits (NeoX and
/// interleaved, partial rotary, both angle precisions, YaRN's attention factor, head dims
/// 64 to 512, chunks over several query and key tiles, both tile shapes and both row-packed
/// kernels).
fn extend_static_equality<T: AttnElement + Element + CacheElement>() {
    let cases: Vec<(RopeConfig, RopeStyle, AnglePrecision, usize)> = vec![
        (
            RopeConfig::builder(128).base(5e5).build().unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F64,
            128,
        ),
        (
            yarn(64, 4.0, 32),
            RopeStyle::Interleaved,
            AnglePrecision::F64,
            64,
        ),
        (
            RopeConfig::builder(96)
                .partial_rotary_factor(0.5)
                .build()
                .unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F32,
            96,
        ),
        (
            RopeConfig::builder(256).base(1e4).build().unwrap(),
            RopeStyle::Interleaved,
            AnglePrecision::F64,
            256,
        ),
        // Head dim 512's row-packed kernels: 16 rows on Sm80, 64 on Sm90.
        (
            RopeConfig::builder(512)
                .base(1e6)
                .partial_rotary_factor(0.25)
                .build()
                .unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F64,
            512,
        ),
        (
            yarn(512, 4.0, 32),
            RopeStyle::Interleaved,
            AnglePrecision::F32,
            512,
        ),
        (
            RopeConfig::builder(512).base(1e4).build().unwrap(),
            RopeStyle::Neox,
            AnglePrecision::F64,
            512,
        ),
    ];
    for (i, (config, style, precision, d)) in cases.into_iter().enumerate() {
        let b = Batch::new::<T>(16, &[150, 1, 33], &[130, 1, 20], 2, 2, d, 60 + i as u64);
        let n = b.layout.cache_len().unwrap();
        let all: Vec<usize> = (0..b.lens.len()).collect();
        let max_len = 150;
        let inv = config.inv_freq_f64(max_len);
        let rope = host_rope(&config, &inv, max_len, style, precision);
        let (mut kr, mut vr) = (vec![T::default(); n], vec![T::default(); n]);
        let (mut ku, mut vu) = (vec![T::default(); n], vec![T::default(); n]);
        append_all::<T, T>(&b, &all, Some(rope), &mut kr, &mut vr, &mut [], &mut []);
        append_all::<T, T>(&b, &all, None, &mut ku, &mut vu, &mut [], &mut []);
        let q: Vec<T> = b.q.iter().map(|&x| <T as Element>::from_f64(x)).collect();
        let qr = rotate_queries(&b, &q, |_| config.clone(), style, precision);
        let scaling = LengthScaling::Config(config.clone());
        let arch = if i % 2 == 0 { Arch::Sm80 } else { Arch::Sm90 };
        let rotated = run_extend::<T, T>(&b, &qr, &kr, &vr, None, None, arch);
        let onload = run_extend::<T, T>(
            &b,
            &q,
            &ku,
            &vu,
            None,
            Some(HostRotation {
                scaling: &scaling,
                style,
                precision,
            }),
            arch,
        );
        assert_eq!(bits(&rotated), bits(&onload), "case {i} {arch:?}");
        assert!(rotated.lse.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn emu_extend_rotating_static_rules_equal_the_rotated_cache_bf16() {
    extend_static_equality::<bf16>();
}

#[test]
fn emu_extend_rotating_static_rules_equal_the_rotated_cache_f16() {
    extend_static_equality::<f16>();
}

/// Dynamic NTK through extend: rotating on load equals, bit for bit, extend over a cache
/// whose keys were all rotated with the current length's base (and queries too), on both
/// tile shapes.
#[test]
fn emu_extend_rotating_dynamic_ntk_equals_a_cache_rotated_at_the_current_length() {
    let d = 64;
    let config = RopeConfig::builder(d)
        .max_position_embeddings(48)
        .scaling(RopeScaling::Dynamic { factor: 2.0 })
        .build()
        .unwrap();
    let b = Batch::new::<bf16>(8, &[150, 20, 97], &[70, 20, 1], 2, 2, d, 17);
    let n = b.layout.cache_len().unwrap();
    let (mut kr, mut vr) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    let (mut ku, mut vu) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    for (s, &len) in b.lens.iter().enumerate() {
        let len = len as usize;
        let inv = config.inv_freq_f64(len);
        let rope = host_rope(&config, &inv, len, RopeStyle::Neox, AnglePrecision::F64);
        append_all::<bf16, bf16>(&b, &[s], Some(rope), &mut kr, &mut vr, &mut [], &mut []);
    }
    let all: Vec<usize> = (0..3).collect();
    append_all::<bf16, bf16>(&b, &all, None, &mut ku, &mut vu, &mut [], &mut []);
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let qr = rotate_queries(
        &b,
        &q,
        |_| config.clone(),
        RopeStyle::Neox,
        AnglePrecision::F64,
    );
    let scaling = LengthScaling::Config(config.clone());
    for arch in [Arch::Sm80, Arch::Sm90] {
        let rotated = run_extend::<bf16, bf16>(&b, &qr, &kr, &vr, None, None, arch);
        let onload = run_extend::<bf16, bf16>(
            &b,
            &q,
            &ku,
            &vu,
            None,
            Some(HostRotation {
                scaling: &scaling,
                style: RopeStyle::Neox,
                precision: AnglePrecision::F64,
            }),
            arch,
        );
        assert_eq!(bits(&rotated), bits(&onload), "{arch:?}");
    }
}

/// Extend rotating on load against the f64 reference that re-rotates every key and query
/// at the current length (dynamic NTK, dynamic YaRN; bf16 and fp8 caches). The kernel
/// rounds each rotated key and query to T (for fp8 also the dequantised key before its
/// rotation): a score moves by at most delta = scale x (2 or 3) eps |q| |k| f^2; the LSE
/// is held to delta plus f32 error, O to e^(2 delta) - 1 of max|V| plus the rounding of P
/// (to T, before P V), of fp8 V values and of the output.
fn extend_reference_parity<S: CacheElement>(
    scaling: &LengthScaling,
    style: RopeStyle,
    seed: u64,
    arch: Arch,
) {
    let d = scaling.config().head_dim();
    let b = Batch::new::<bf16>(16, &[130, 5, 64], &[100, 5, 17], 2, 2, d, seed);
    let n = b.layout.cache_len().unwrap();
    let rows = b.layout.pages * b.layout.page_size * b.layout.heads_kv;
    let (mut ku, mut vu) = (vec![S::default(); n], vec![S::default(); n]);
    let (mut ks, mut vs) = (vec![0f32; rows], vec![0f32; rows]);
    let all: Vec<usize> = (0..3).collect();
    append_all::<bf16, S>(&b, &all, None, &mut ku, &mut vu, &mut ks, &mut vs);
    let fp8 = S::CACHE_DTYPE == longctx::kv_cache::CacheDType::Fp8E4m3;
    let value = |c: &[S], sc: &[f32]| -> Vec<f64> {
        c.iter()
            .enumerate()
            .map(|(i, x)| x.to_f64() * if fp8 { f64::from(sc[i / d]) } else { 1.0 })
            .collect()
    };
    let (kval, vval) = (value(&ku, &ks), value(&vu, &vs));
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let got = run_extend::<bf16, S>(
        &b,
        &q,
        &ku,
        &vu,
        fp8.then_some((&ks[..], &vs[..])),
        Some(HostRotation {
            scaling,
            style,
            precision: AnglePrecision::F64,
        }),
        arch,
    );
    let scale = 1.0 / (d as f64).sqrt();
    let math = DecodeMath {
        scale,
        softcap: None,
        window_left: None,
    };
    let want = extend_rotating_f64(
        &b.layout,
        &b.step(),
        &b.q,
        b.heads_q,
        &kval,
        &vval,
        scaling,
        style,
        &math,
    )
    .unwrap();
    let norm = |x: &[f64]| {
        x.chunks(d)
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
            .fold(0.0f64, f64::max)
    };
    let factor2 = (0..b.lens.len())
        .map(|s| {
            scaling
                .at(b.lens[s] as usize)
                .unwrap()
                .attention_factor
                .powi(2)
        })
        .fold(0.0f64, f64::max);
    let eps = DType::BF16.epsilon();
    let roundings = if fp8 { 3.0 } else { 2.0 };
    let delta = scale * roundings * eps * norm(&b.q) * norm(&kval) * factor2 * 1.01;
    let vmax = vval.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let v_round = if fp8 { 3.0 } else { 2.0 };
    for (i, (g, w)) in got.o.iter().zip(&want.o).enumerate() {
        let tol =
            ((2.0 * delta).exp() - 1.0) * vmax + 1.01 * eps * (w.abs() + v_round * vmax) + 2e-5;
        assert!(
            (g - w).abs() <= tol,
            "{arch:?} O[{i}] {g} vs {w} (tolerance {tol:e})"
        );
    }
    for (i, (g, w)) in got.lse.iter().zip(&want.lse).enumerate() {
        let tol = delta + 2e-5 * (1.0 + w.abs());
        assert!(
            (f64::from(*g) - w).abs() <= tol,
            "{arch:?} LSE[{i}] {g} vs {w} (tolerance {tol:e})"
        );
    }
}

#[test]
fn emu_extend_rotating_matches_the_dynamic_reference() {
    let ntk = LengthScaling::Config(
        RopeConfig::builder(64)
            .max_position_embeddings(48)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    extend_reference_parity::<bf16>(&ntk, RopeStyle::Neox, 13, Arch::Sm80);
    extend_reference_parity::<Fp8E4m3>(&ntk, RopeStyle::Interleaved, 14, Arch::Sm90);
    let dyn_yarn = LengthScaling::DynamicYarn(yarn(128, 1.0, 40));
    extend_reference_parity::<bf16>(&dyn_yarn, RopeStyle::Neox, 15, Arch::Sm90);
    extend_reference_parity::<Fp8E4m3>(&dyn_yarn, RopeStyle::Neox, 16, Arch::Sm80);
    // Head dim 512 (the row-packed kernels, 16-bit caches): 64 rows on Sm90, 16 on Sm80.
    let dyn_yarn512 = LengthScaling::DynamicYarn(yarn(512, 1.0, 40));
    extend_reference_parity::<bf16>(&dyn_yarn512, RopeStyle::Neox, 17, Arch::Sm90);
    let ntk512 = LengthScaling::Config(
        RopeConfig::builder(512)
            .max_position_embeddings(48)
            .scaling(RopeScaling::Dynamic { factor: 2.0 })
            .build()
            .unwrap(),
    );
    extend_reference_parity::<bf16>(&ntk512, RopeStyle::Interleaved, 18, Arch::Sm80);
}

/// Typed errors of extend_rotating: a scaling made for another head dim.
#[test]
fn emu_extend_rotating_rejects_bad_calls() {
    let b = Batch::new::<bf16>(16, &[20], &[3], 1, 2, 64, 1);
    let k = vec![bf16::ZERO; b.layout.cache_len().unwrap()];
    let ka = Aligned::new(&k);
    let cache = HostCache {
        layout: b.layout,
        k: ka.as_slice(),
        v: ka.as_slice(),
        scales: None,
    };
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let ql = HeadsLayout::contiguous(3, 2, 64);
    let mut o = vec![bf16::ZERO; 3 * 2 * 64];
    let scaling = LengthScaling::Config(RopeConfig::builder(128).build().unwrap());
    let e = emulator::extend_rotating::<bf16, bf16>(
        Arch::Sm80,
        &b.step(),
        &HostRotation {
            scaling: &scaling,
            style: RopeStyle::Neox,
            precision: AnglePrecision::F64,
        },
        &q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: None,
        },
        &ExtendOptions::default(),
    );
    assert!(
        matches!(
            e,
            Err(Error::InvalidArgument {
                arg: "rotation",
                ..
            })
        ),
        "{e:?}"
    );
    // Rotation on load over an fp8 cache stops at head dim 256: at 512 a typed unsupported
    // error naming the rotation, before any launch.
    let b = Batch::new::<bf16>(16, &[20], &[3], 1, 2, 512, 2);
    let n = b.layout.cache_len().unwrap();
    let codes = vec![Fp8E4m3(0x38); n];
    let ca = Aligned::new(&codes);
    let scales = vec![1.0f32; b.layout.pages * b.layout.page_size];
    let cache = HostCache {
        layout: b.layout,
        k: ca.as_slice(),
        v: ca.as_slice(),
        scales: Some((ScaleMode::PerTokenHead, &scales, &scales)),
    };
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let ql = HeadsLayout::contiguous(3, 2, 512);
    let mut o = vec![bf16::ZERO; 3 * 2 * 512];
    let scaling = LengthScaling::Config(RopeConfig::builder(512).build().unwrap());
    let e = emulator::extend_rotating::<bf16, Fp8E4m3>(
        Arch::Sm90,
        &b.step(),
        &HostRotation {
            scaling: &scaling,
            style: RopeStyle::Neox,
            precision: AnglePrecision::F64,
        },
        &q,
        &ql,
        &cache,
        HostDecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: None,
        },
        &ExtendOptions::default(),
    );
    match e {
        Err(ref err @ Error::InvalidArgument { arg, .. }) => {
            assert_eq!(arg, "rotation", "{err:?}");
            assert_eq!(err.kind(), longctx::ErrorKind::Unsupported, "{err:?}");
        }
        other => panic!("expected an unsupported rotation, got {other:?}"),
    }
    assert!(o.iter().all(|x| *x == bf16::ZERO), "nothing was written");
}

/// The device path: `KvRotation::upload` + `extend_rotating` on a cache built here (through
/// the emulated append), against the emulated extend rotating on load with the loaded
/// code's tile shape: the same code, so within a few ulps (nvcc may contract multiply-adds
/// differently from the host compiler).
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_extend_rotating_matches_the_emulator() {
    use longctx::kv_cache::{
        extend_rotating, DecodeOutput, KvRotation, KvScales, KvStep, PagedCache,
    };
    let Some(dev) = common::gpu("gpu_extend_rotating_matches_the_emulator") else {
        return;
    };
    let d = 128;
    let config = RopeConfig::builder(d)
        .max_position_embeddings(1024)
        .scaling(RopeScaling::Dynamic { factor: 4.0 })
        .build()
        .unwrap();
    let scaling = LengthScaling::Config(config);
    let b = Batch::new::<bf16>(16, &[3000, 17, 900], &[300, 17, 1], 4, 4, d, 78);
    let n = b.layout.cache_len().unwrap();
    let (mut ku, mut vu) = (vec![bf16::ZERO; n], vec![bf16::ZERO; n]);
    append_all::<bf16, bf16>(&b, &[0, 1, 2], None, &mut ku, &mut vu, &mut [], &mut []);
    let q: Vec<bf16> = b.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let rot = HostRotation {
        scaling: &scaling,
        style: RopeStyle::Neox,
        precision: AnglePrecision::F64,
    };
    let arch = if dev.compute_capability().0 >= 9 {
        Arch::Sm90
    } else {
        Arch::Sm80
    };
    let want = run_extend::<bf16, bf16>(&b, &q, &ku, &vu, None, Some(rot), arch);
    let step = KvStep::upload(&dev, &b.layout, &b.step()).unwrap();
    let rotation =
        KvRotation::upload(&dev, &step, &scaling, RopeStyle::Neox, AnglePrecision::F64).unwrap();
    let total_new = *b.cu_new.last().unwrap() as usize;
    let ql = HeadsLayout::contiguous(total_new, b.heads_q, d);
    let qd = dev.upload(&q).unwrap();
    let kd = dev.upload(&ku).unwrap();
    let vd = dev.upload(&vu).unwrap();
    let mut o = dev.zeros::<bf16>(ql.numel().unwrap()).unwrap();
    let mut lse = dev.zeros::<f32>(b.heads_q * total_new).unwrap();
    extend_rotating::<bf16, bf16>(
        &dev,
        &step,
        &rotation,
        &qd,
        &ql,
        &PagedCache {
            layout: b.layout,
            k: &kd,
            v: &vd,
            scales: KvScales::None,
        },
        DecodeOutput {
            o: &mut o,
            o_layout: ql,
            lse: Some((&mut lse, LseLayout::contiguous(b.heads_q, total_new))),
        },
        &ExtendOptions::default(),
    )
    .unwrap();
    let got_o = dev.download(&o).unwrap();
    let got_lse = dev.download(&lse).unwrap();
    for (g, w) in got_o.iter().zip(&want.o) {
        assert!(
            (g.to_f64() - w).abs() <= 4.0 * DType::BF16.epsilon() * (w.abs() + 1.0),
            "{g} vs {w}"
        );
    }
    for (g, w) in got_lse.iter().zip(&want.lse) {
        assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
    }
}
