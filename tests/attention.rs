//! Attention forward: the CPU tiled implementation against naive f64 attention on every
//! mask configuration, invariants, input validation, and GPU-vs-reference parity.

mod common;

use half::{bf16, f16};
use longctx::attention::reference::{
    attention_f64, attention_tiled_f32, compare, ErrorStats, Problem, Tiles,
};
use longctx::attention::{
    check_alignment, validate_cu_seqlens, AttentionOptions, CallShape, Mask, TileConfig, ViewShape,
    SUPPORTED_HEAD_DIMS,
};
use longctx::dtype::Element;
use longctx::layout::HeadsLayout;
use longctx::Error;
use proptest::prelude::*;

/// Host data of one problem: contiguous Q, K, V (values already rounded to the dtype the
/// caller chose) and the batch offsets.
#[derive(Debug, Clone)]
struct Host {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
}

fn offsets(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut cu = vec![0];
    for l in lens {
        cu.push(cu[cu.len() - 1] + l);
    }
    cu
}

/// Random problem with values uniform in [-amp, amp), rounded through `round`.
#[allow(clippy::too_many_arguments)]
fn random_host(
    seed: u64,
    lens: &[(usize, usize)],
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    amp: f64,
    round: fn(f64) -> f64,
) -> Host {
    let mut r = common::Rng(seed);
    let cu_q = offsets(lens.iter().map(|l| l.0));
    let cu_k = offsets(lens.iter().map(|l| l.1));
    let (tq, tk) = (cu_q[cu_q.len() - 1], cu_k[cu_k.len() - 1]);
    let mut gen = |n: usize| {
        (0..n)
            .map(|_| round(amp * r.uniform()))
            .collect::<Vec<f64>>()
    };
    Host {
        q: gen(tq * hq * d),
        k: gen(tk * hkv * d),
        v: gen(tk * hkv * dv),
        cu_q,
        cu_k,
        hq,
        hkv,
        d,
        dv,
    }
}

impl Host {
    fn problem(&self, scale: f64, softcap: Option<f64>, mask: Mask) -> Problem<'_> {
        Problem {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            cu_seqlens_q: &self.cu_q,
            cu_seqlens_k: &self.cu_k,
            heads_q: self.hq,
            heads_kv: self.hkv,
            head_dim: self.d,
            head_dim_v: self.dv,
            scale,
            softcap,
            mask,
        }
    }
}

fn round_f16(x: f64) -> f64 {
    f16::from_f64(x).to_f64()
}
fn round_bf16(x: f64) -> f64 {
    bf16::from_f64(x).to_f64()
}
fn round_f16_f32(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}
fn round_bf16_f32(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Every mask shape the kernels support, with windows around the tile sizes.
fn masks() -> Vec<Mask> {
    vec![
        Mask::none(),
        Mask::causal(),
        Mask::window(0, 0),
        Mask::window(3, 5),
        Mask::window(40, 0),
        Mask::window(100, 70),
        Mask {
            causal: false,
            window_left: Some(33),
            window_right: None,
        },
        Mask {
            causal: false,
            window_left: None,
            window_right: Some(17),
        },
        Mask {
            causal: true,
            window_left: Some(64),
            window_right: None,
        },
        Mask {
            causal: true,
            window_left: Some(1),
            window_right: Some(9),
        },
    ]
}

/// Ragged batches: seqlen_q == seqlen_k, either one longer, empty sequences, lengths at
/// tile boundaries and primes.
fn batches() -> Vec<Vec<(usize, usize)>> {
    vec![
        vec![(129, 129)],
        vec![(65, 200)],
        vec![(200, 33)],
        vec![(1, 1), (0, 7), (64, 0), (31, 257), (130, 127)],
        vec![(97, 97), (128, 64), (33, 129)],
    ]
}

/// Runs the tiled f32 implementation with `tiles` and checks it against naive f64 attention
/// (`want`) to 2e-5 in O and LSE; returns what the run did.
fn assert_tiled_matches(
    p: &Problem,
    tiles: Tiles,
    want: &longctx::attention::reference::Output<f64>,
    what: &str,
) -> longctx::attention::reference::TileStats {
    let (got, st) = attention_tiled_f32(p, tiles, |x| x).unwrap();
    let e = compare(&got.o, &got.lse, want);
    assert!(
        e.max_o < 2e-5 && e.max_lse < 2e-5,
        "{what} {tiles:?}: {e:?}"
    );
    st
}

fn tile_shapes() -> Vec<Tiles> {
    let mut t: Vec<Tiles> = TileConfig::all().iter().map(Tiles::from).collect();
    t.dedup();
    t.push(Tiles {
        block_m: 16,
        block_n: 16,
        rows_per_warp: 8,
    });
    t.push(Tiles {
        block_m: 5,
        block_n: 3,
        rows_per_warp: 2,
    });
    t
}

#[test]
fn tiled_f32_matches_naive_f64_on_every_mask() {
    let mut masked = 0;
    let mut unmasked = 0;
    let mut empty = 0;
    for (bi, lens) in batches().iter().enumerate() {
        for &(hq, hkv) in &[(4usize, 4usize), (4, 2), (8, 1)] {
            let host = random_host(17 + bi as u64, lens, hq, hkv, 16, 8, 2.0, |x| x);
            for mask in masks() {
                for softcap in [None, Some(1.5)] {
                    let p = host.problem(0.3, softcap, mask);
                    let want = attention_f64(&p).unwrap();
                    for tiles in tile_shapes() {
                        let what =
                            format!("{lens:?} heads {hq}/{hkv} {mask:?} softcap {softcap:?}");
                        let st = assert_tiled_matches(&p, tiles, &want, &what);
                        masked += st.masked_tiles;
                        unmasked += st.unmasked_tiles;
                        empty += st.empty_query_tiles;
                    }
                }
            }
        }
    }
    // The cases exercise masked, unmasked and fully masked tiles.
    assert!(
        masked > 0 && unmasked > 0 && empty > 0,
        "{masked} {unmasked} {empty}"
    );
}

#[test]
fn tiled_f32_matches_naive_f64_at_every_head_dim() {
    for &(d, dv) in &SUPPORTED_HEAD_DIMS {
        let cfg = TileConfig::for_head_dims(d, dv).unwrap();
        let host = random_host(
            d as u64,
            &[(cfg.block_m + 1, 2 * cfg.block_n + 3), (3, 1)],
            2,
            1,
            d,
            dv,
            1.0,
            |x| x,
        );
        for mask in [Mask::causal(), Mask::window(20, 3)] {
            let p = host.problem(1.0 / (d as f64).sqrt(), Some(30.0), mask);
            let want = attention_f64(&p).unwrap();
            let (got, _) = attention_tiled_f32(&p, Tiles::from(&cfg), |x| x).unwrap();
            let e = compare(&got.o, &got.lse, &want);
            assert!(e.max_o < 1e-5 && e.max_lse < 1e-5, "d {d}: {e:?}");
        }
    }
}

/// Scores that climb along the keys make the lazy rescale take both of its paths: maxima
/// that grow by less than the threshold are kept (probabilities above 1 accumulate), and
/// larger growth moves them and rescales. Both must equal naive attention, in f32 and with
/// P and O rounded to bf16 (then within the same-precision bound of a rounded run).
#[test]
fn lazy_rescale_keeps_and_moves_the_max_and_matches_naive() {
    let mut host = random_host(23, &[(70, 300), (33, 1000)], 2, 1, 8, 4, 1.0, |x| x);
    // Channel 0 of key j is 0.05 j and q[0] is in [0.05, 1.05), so a row's scores rise by
    // 0.05 * q[0] * 0.4 * log2(e) (up to 0.03) per key in the exp2 domain: by up to 9 over
    // 300 keys and 30 over 1000, a little per tile; the other channels are random.
    for b in 0..2 {
        for j in 0..host.cu_k[b + 1] - host.cu_k[b] {
            host.k[(host.cu_k[b] + j) * 8] = 0.05 * j as f64;
        }
    }
    for t in 0..host.q.len() / 8 {
        host.q[t * 8] = host.q[t * 8].abs() + 0.05;
    }
    let mut kept = 0;
    let mut moved = 0;
    for mask in [Mask::none(), Mask::causal(), Mask::window(200, 0)] {
        let p = host.problem(0.4, None, mask);
        let want = attention_f64(&p).unwrap();
        for tiles in tile_shapes() {
            let st = assert_tiled_matches(&p, tiles, &want, &format!("{mask:?}"));
            kept += st.kept_grown_max;
            moved += st.rescales;
            // A rounded run stays within bf16's output rounding of the truth.
            let (r, _) = attention_tiled_f32(&p, tiles, round_bf16_f32).unwrap();
            let e = compare(&r.o, &r.lse, &want);
            assert!(
                e.max_o < 2e-2 && e.max_lse < 2e-5,
                "rounded {mask:?} {tiles:?}: {e:?}"
            );
        }
    }
    eprintln!("lazy rescale: {kept} steps kept a grown max, {moved} moved it past the first key");
    // Both paths ran, and moves happened past each row group's first visible key.
    assert!(kept > 1000 && moved > 100, "kept {kept} moved {moved}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random shapes and masks, small tiles: the tiled algorithm equals naive attention.
    #[test]
    fn tiled_matches_naive_random(
        seed in any::<u64>(),
        lens in prop::collection::vec((0usize..70, 0usize..70), 1..4),
        hkv in 1usize..3,
        group in prop::sample::select(vec![1usize, 2, 4]),
        causal in any::<bool>(),
        left in prop::option::of(0usize..40),
        right in prop::option::of(0usize..40),
        softcap in prop::option::of(0.5f64..5.0),
        bm in 1usize..20,
        bn in 1usize..20,
        rows_per_warp in 1usize..20,
    ) {
        let host = random_host(seed, &lens, hkv * group, hkv, 8, 4, 2.0, |x| x);
        let mask = Mask { causal, window_left: left, window_right: right };
        let p = host.problem(0.4, softcap, mask);
        let want = attention_f64(&p).unwrap();
        let (got, _) = attention_tiled_f32(&p, Tiles { block_m: bm, block_n: bn, rows_per_warp }, |x| x).unwrap();
        let e = compare(&got.o, &got.lse, &want);
        prop_assert!(e.max_o < 2e-5 && e.max_lse < 2e-5, "{e:?}");
    }
}

/// Q = 0 makes every visible score equal, so O is the mean of the visible V rows.
#[test]
fn zero_queries_give_the_mean_of_visible_values() {
    let mut host = random_host(5, &[(40, 70), (70, 40)], 2, 1, 8, 4, 1.0, |x| x);
    host.q.iter_mut().for_each(|x| *x = 0.0);
    for mask in masks() {
        let out = attention_f64(&host.problem(0.5, None, mask)).unwrap();
        for b in 0..2 {
            let (sq, sk) = (
                host.cu_q[b + 1] - host.cu_q[b],
                host.cu_k[b + 1] - host.cu_k[b],
            );
            for i in 0..sq {
                let keys = mask.visible_keys(i, sq, sk);
                for h in 0..2 {
                    for c in 0..4 {
                        let mean = if keys.is_empty() {
                            0.0
                        } else {
                            keys.clone()
                                .map(|j| host.v[(host.cu_k[b] + j) * 4 + c])
                                .sum::<f64>()
                                / keys.len() as f64
                        };
                        let got = out.o[((host.cu_q[b] + i) * 2 + h) * 4 + c];
                        assert!(
                            (got - mean).abs() < 1e-12,
                            "{mask:?} row {i}: {got} vs {mean}"
                        );
                    }
                }
            }
        }
    }
}

/// Permuting K and V rows together leaves non-causal, unwindowed attention unchanged.
#[test]
fn permuting_keys_leaves_unmasked_output_unchanged() {
    let host = random_host(9, &[(20, 33)], 2, 2, 8, 8, 2.0, |x| x);
    let a = attention_f64(&host.problem(0.4, Some(3.0), Mask::none())).unwrap();
    let mut perm = host.clone();
    for j in 0..33 {
        let src = (j * 7 + 3) % 33;
        perm.k[j * 16..(j + 1) * 16].copy_from_slice(&host.k[src * 16..(src + 1) * 16]);
        perm.v[j * 16..(j + 1) * 16].copy_from_slice(&host.v[src * 16..(src + 1) * 16]);
    }
    let b = attention_f64(&perm.problem(0.4, Some(3.0), Mask::none())).unwrap();
    let e = compare(
        &b.o.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        &b.lse.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        &a,
    );
    assert!(e.max_o < 1e-6 && e.max_lse < 1e-5, "{e:?}");
}

/// A causal square run's first rows equal a shorter causal square run.
#[test]
fn causal_prefix_equals_shorter_run() {
    let host = random_host(11, &[(90, 90)], 2, 1, 8, 4, 2.0, |x| x);
    let full = attention_f64(&host.problem(0.4, None, Mask::causal())).unwrap();
    let m = 37;
    let short = Host {
        q: host.q[..m * 2 * 8].to_vec(),
        k: host.k[..m * 8].to_vec(),
        v: host.v[..m * 4].to_vec(),
        cu_q: vec![0, m],
        cu_k: vec![0, m],
        ..host.clone()
    };
    let s = attention_f64(&short.problem(0.4, None, Mask::causal())).unwrap();
    for i in 0..m * 2 * 4 {
        assert!((s.o[i] - full.o[i]).abs() < 1e-14);
    }
    for h in 0..2 {
        for i in 0..m {
            assert!((s.lse[h * m + i] - full.lse[h * 90 + i]).abs() < 1e-12);
        }
    }
}

#[test]
fn fully_masked_rows_are_zero_with_lse_minus_infinity() {
    // seqlen_q > seqlen_k with causal: the first seqlen_q - seqlen_k rows see nothing.
    let host = random_host(3, &[(10, 4)], 1, 1, 8, 8, 1.0, |x| x);
    let out = attention_f64(&host.problem(0.3, None, Mask::causal())).unwrap();
    for i in 0..6 {
        assert!(out.o[i * 8..(i + 1) * 8].iter().all(|&x| x == 0.0));
        assert_eq!(out.lse[i], f64::NEG_INFINITY);
    }
    assert!(out.lse[6].is_finite());
    let (t, _) = attention_tiled_f32(
        &host.problem(0.3, None, Mask::causal()),
        Tiles {
            block_m: 4,
            block_n: 2,
            rows_per_warp: 4,
        },
        |x| x,
    )
    .unwrap();
    assert_eq!(t.lse[0], f32::NEG_INFINITY);
    assert!(t.o[..8].iter().all(|&x| x == 0.0));
}

#[allow(clippy::too_many_arguments)]
fn contiguous_shape<'a>(
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dv: usize,
    cu_q: &'a [i32],
    cu_k: &'a [i32],
) -> CallShape<'a> {
    let view = |t, h, dim| {
        let l = HeadsLayout::contiguous(t, h, dim);
        ViewShape {
            layout: l,
            buffer_len: t * h * dim,
        }
    };
    CallShape {
        q: view(tq, hq, d),
        k: view(tk, hkv, d),
        v: view(tk, hkv, dv),
        o: view(tq, hq, dv),
        lse_len: Some(hq * tq),
        cu_seqlens_q: cu_q,
        cu_seqlens_k: cu_k,
    }
}

fn invalid_arg(r: Result<impl std::fmt::Debug, Error>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn bad_input_is_rejected_with_typed_errors() {
    let opts = AttentionOptions::default();
    let (cq, ck) = ([0, 5, 12], [0, 9, 9]);
    let ok = contiguous_shape(12, 9, 8, 2, 128, 128, &cq, &ck);
    let v = ok.validate(&opts).unwrap();
    assert_eq!(
        (
            v.heads_q,
            v.heads_kv,
            v.batch,
            v.max_seqlen_q,
            v.max_seqlen_k
        ),
        (8, 2, 2, 7, 9)
    );

    // heads_q not a multiple of heads_kv; mismatched heads between Q and O, K and V.
    assert_eq!(
        invalid_arg(contiguous_shape(12, 9, 6, 4, 128, 128, &cq, &ck).validate(&opts)),
        "heads"
    );
    let mut s = ok;
    s.o = ViewShape {
        layout: HeadsLayout::contiguous(12, 4, 128),
        buffer_len: 12 * 4 * 128,
    };
    assert_eq!(invalid_arg(s.validate(&opts)), "o");
    let mut s = ok;
    s.v = ViewShape {
        layout: HeadsLayout::contiguous(9, 1, 128),
        buffer_len: 9 * 128,
    };
    assert_eq!(invalid_arg(s.validate(&opts)), "v");
    // Unsupported head dims name the supported ones.
    match contiguous_shape(12, 9, 8, 2, 80, 80, &cq, &ck).validate(&opts) {
        Err(Error::InvalidArgument { problem, .. }) => {
            assert!(problem.contains("(128, 128)"), "{problem}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        invalid_arg(contiguous_shape(12, 9, 8, 2, 128, 64, &cq, &ck).validate(&opts)),
        "head_dim"
    );
    // Offsets: not monotone, not starting at 0, not ending at the total, lengths differ.
    assert_eq!(
        invalid_arg(contiguous_shape(12, 9, 8, 2, 128, 128, &[0, 13, 12], &ck).validate(&opts)),
        "cu_seqlens_q"
    );
    assert_eq!(
        invalid_arg(contiguous_shape(12, 9, 8, 2, 128, 128, &[1, 5, 12], &ck).validate(&opts)),
        "cu_seqlens_q"
    );
    assert_eq!(
        invalid_arg(contiguous_shape(12, 9, 8, 2, 128, 128, &[0, 5, 11], &ck).validate(&opts)),
        "q"
    );
    assert_eq!(
        invalid_arg(contiguous_shape(12, 9, 8, 2, 128, 128, &cq, &[0, 9]).validate(&opts)),
        "cu_seqlens_k"
    );
    assert!(validate_cu_seqlens(&[0], &[0]).is_err());
    // Views that leave their buffer or overlap themselves.
    let mut s = ok;
    s.q.buffer_len -= 1;
    assert_eq!(invalid_arg(s.validate(&opts)), "q");
    let mut s = ok;
    s.o.layout.head_stride = 64;
    assert_eq!(invalid_arg(s.validate(&opts)), "o");
    let mut s = ok;
    s.k.layout.token_stride = 128; // two heads of 128 in 128 elements: rows overlap
    assert_eq!(invalid_arg(s.validate(&opts)), "k");
    // LSE too small; bad scale or softcap.
    let mut s = ok;
    s.lse_len = Some(8 * 12 - 1);
    assert_eq!(invalid_arg(s.validate(&opts)), "lse");
    let bad_scale = AttentionOptions {
        softmax_scale: Some(f32::NAN),
        ..opts
    };
    assert_eq!(invalid_arg(ok.validate(&bad_scale)), "softmax_scale");
    let bad_cap = AttentionOptions {
        softcap: Some(-1.0),
        ..opts
    };
    assert_eq!(invalid_arg(ok.validate(&bad_cap)), "softcap");
    assert!(Mask::from_flash(false, -2, 0).is_err());
    assert_eq!(Mask::from_flash(true, -1, -1).unwrap(), Mask::causal());

    // 16-byte alignment: base, offset and strides.
    let l = HeadsLayout::contiguous(4, 2, 64);
    assert!(check_alignment(&l, 256, 2, "q").is_ok());
    assert_eq!(invalid_arg(check_alignment(&l, 258, 2, "q")), "q");
    assert_eq!(
        invalid_arg(check_alignment(
            &HeadsLayout { offset: 4, ..l },
            256,
            2,
            "q"
        )),
        "q"
    );
    assert_eq!(
        invalid_arg(check_alignment(
            &HeadsLayout {
                token_stride: 132,
                ..l
            },
            256,
            2,
            "k"
        )),
        "k"
    );
    assert!(check_alignment(
        &HeadsLayout {
            offset: 8,
            token_stride: 136,
            head_stride: 64,
            ..l
        },
        256,
        2,
        "q"
    )
    .is_ok());
}

#[test]
fn flops_follow_the_mask() {
    use longctx::attention::forward_flops;
    let full = forward_flops(&Mask::none(), &[(1000, 1000)], 32, 128, 128);
    assert_eq!(full, 2.0 * 32.0 * 1e6 * 256.0);
    let causal = forward_flops(&Mask::causal(), &[(1000, 1000)], 32, 128, 128);
    assert_eq!(causal, 2.0 * 32.0 * (1000.0 * 1001.0 / 2.0) * 256.0);
}

mod gpu {
    use super::*;
    use cudarc::driver::CudaSlice;
    use longctx::attention::{attention_forward, AttnElement, AttnOutput, Qkv, SeqLens};
    use longctx::device::Device;
    use longctx::emulator;

    /// How the tensors sit in their buffers.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub enum Placement {
        /// Dense, one buffer each.
        Contiguous,
        /// One buffer each, with padding between heads and tokens and a leading offset.
        Padded,
        /// Q, K and V interleaved per token in one buffer (self-attention shapes only).
        Packed,
    }

    #[derive(Debug, Clone)]
    pub struct Case {
        pub lens: Vec<(usize, usize)>,
        pub hkv: usize,
        pub group: usize,
        pub dims: (usize, usize),
        pub mask: Mask,
        pub softcap: Option<f32>,
        pub placement: Placement,
        pub with_lse: bool,
        pub amp: f64,
        pub seed: u64,
    }

    fn len_strategy() -> impl Strategy<Value = usize> {
        prop::sample::select(vec![
            0usize, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 211, 257,
        ])
    }

    fn mask_strategy() -> impl Strategy<Value = Mask> {
        let side = prop::option::of(prop::sample::select(vec![0usize, 1, 7, 31, 64, 100, 300]));
        (any::<bool>(), side.clone(), side).prop_map(|(causal, l, r)| Mask {
            causal,
            window_left: l,
            window_right: r,
        })
    }

    pub fn case_strategy() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec((len_strategy(), len_strategy()), 1..4),
            any::<bool>(),
            prop::sample::select(vec![1usize, 2]),
            prop::sample::select(vec![1usize, 2, 4, 8]),
            prop::sample::select(SUPPORTED_HEAD_DIMS.to_vec()),
            mask_strategy(),
            prop::option::of(prop::sample::select(vec![5.0f32, 30.0])),
            prop::sample::select(vec![
                Placement::Contiguous,
                Placement::Padded,
                Placement::Packed,
            ]),
            any::<bool>(),
            prop::sample::select(vec![1.0f64, 3.0]),
            any::<u64>(),
        )
            .prop_map(
                |(
                    mut lens,
                    square,
                    hkv,
                    group,
                    dims,
                    mask,
                    softcap,
                    placement,
                    with_lse,
                    amp,
                    seed,
                )| {
                    if square || placement == Placement::Packed {
                        lens.iter_mut().for_each(|l| l.1 = l.0);
                    }
                    Case {
                        lens,
                        hkv,
                        group,
                        dims,
                        mask,
                        softcap,
                        placement,
                        with_lse,
                        amp,
                        seed,
                    }
                },
            )
    }

    /// Device buffers and views of one case.
    pub struct Bufs<T> {
        pub q: CudaSlice<T>,
        pub k: Option<CudaSlice<T>>,
        pub v: Option<CudaSlice<T>>,
        pub ql: HeadsLayout,
        pub kl: HeadsLayout,
        pub vl: HeadsLayout,
    }

    /// Scatters a contiguous [tokens, heads, dim] tensor into `buf` through `l`.
    fn scatter(buf: &mut [f64], l: &HeadsLayout, x: &[f64]) {
        for t in 0..l.tokens {
            for h in 0..l.heads {
                let dst = l.offset + t * l.token_stride + h * l.head_stride;
                let src = (t * l.heads + h) * l.head_dim;
                buf[dst..dst + l.head_dim].copy_from_slice(&x[src..src + l.head_dim]);
            }
        }
    }

    fn gather<T: Element>(buf: &[T], l: &HeadsLayout) -> Vec<f64> {
        let mut out = Vec::with_capacity(l.tokens * l.heads * l.head_dim);
        for t in 0..l.tokens {
            for h in 0..l.heads {
                let s = l.offset + t * l.token_stride + h * l.head_stride;
                out.extend(buf[s..s + l.head_dim].iter().map(|x| x.to_f64()));
            }
        }
        out
    }

    fn padded(tokens: usize, heads: usize, dim: usize) -> HeadsLayout {
        HeadsLayout {
            offset: 8,
            tokens,
            heads,
            head_dim: dim,
            token_stride: heads * (dim + 8) + 16,
            head_stride: dim + 8,
        }
    }

    fn convert<T: Element>(host: &[f64]) -> Vec<T> {
        host.iter().map(|&x| T::from_f64(x)).collect()
    }

    /// Host buffers and views of one case.
    pub struct HostBufs<T> {
        pub q: Vec<T>,
        pub k: Option<Vec<T>>,
        pub v: Option<Vec<T>>,
        pub ql: HeadsLayout,
        pub kl: HeadsLayout,
        pub vl: HeadsLayout,
    }

    pub fn place<T: Element>(dev: &Device, h: &Host, placement: Placement) -> Bufs<T> {
        let hb = place_host::<T>(h, placement);
        let up = |v: &Vec<T>| dev.upload(v).expect("upload");
        Bufs {
            q: up(&hb.q),
            k: hb.k.as_ref().map(up),
            v: hb.v.as_ref().map(up),
            ql: hb.ql,
            kl: hb.kl,
            vl: hb.vl,
        }
    }

    pub fn place_host<T: Element>(h: &Host, placement: Placement) -> HostBufs<T> {
        let (tq, tk) = (h.cu_q[h.cu_q.len() - 1], h.cu_k[h.cu_k.len() - 1]);
        match placement {
            Placement::Contiguous => HostBufs {
                q: convert(&h.q),
                k: Some(convert(&h.k)),
                v: Some(convert(&h.v)),
                ql: HeadsLayout::contiguous(tq, h.hq, h.d),
                kl: HeadsLayout::contiguous(tk, h.hkv, h.d),
                vl: HeadsLayout::contiguous(tk, h.hkv, h.dv),
            },
            Placement::Padded => {
                let (ql, kl, vl) = (
                    padded(tq, h.hq, h.d),
                    padded(tk, h.hkv, h.d),
                    padded(tk, h.hkv, h.dv),
                );
                let mut bufs = Vec::new();
                for (l, x) in [(&ql, &h.q), (&kl, &h.k), (&vl, &h.v)] {
                    let mut b = vec![0.0; l.offset + l.tokens * l.token_stride + 8];
                    scatter(&mut b, l, x);
                    bufs.push(convert::<T>(&b));
                }
                let v = bufs.pop();
                let k = bufs.pop();
                HostBufs {
                    q: bufs.remove(0),
                    k,
                    v,
                    ql,
                    kl,
                    vl,
                }
            }
            Placement::Packed => {
                assert_eq!(tq, tk);
                let stride = h.hq * h.d + h.hkv * h.d + h.hkv * h.dv;
                let ql = HeadsLayout {
                    offset: 0,
                    tokens: tq,
                    heads: h.hq,
                    head_dim: h.d,
                    token_stride: stride,
                    head_stride: h.d,
                };
                let kl = HeadsLayout {
                    offset: h.hq * h.d,
                    heads: h.hkv,
                    ..ql
                };
                let vl = HeadsLayout {
                    offset: h.hq * h.d + h.hkv * h.d,
                    heads: h.hkv,
                    head_dim: h.dv,
                    head_stride: h.dv,
                    ..ql
                };
                let mut b = vec![0.0; tq * stride];
                scatter(&mut b, &ql, &h.q);
                scatter(&mut b, &kl, &h.k);
                scatter(&mut b, &vl, &h.v);
                HostBufs {
                    q: convert(&b),
                    k: None,
                    v: None,
                    ql,
                    kl,
                    vl,
                }
            }
        }
    }

    /// O gathered to contiguous f64, the LSE buffer, the raw O buffer and O's layout.
    pub type GpuOut<T> = (Vec<f64>, Vec<f32>, Vec<T>, HeadsLayout);

    /// Runs one case on the GPU. Returns O gathered to contiguous f64, the LSE (if asked)
    /// and the raw output buffer with its layout (to check what lies outside the view).
    pub fn run_gpu<T: AttnElement>(
        dev: &Device,
        h: &Host,
        b: &Bufs<T>,
        opts: &AttentionOptions,
        o_padded: bool,
        with_lse: bool,
    ) -> Result<GpuOut<T>, Error> {
        let tq = h.cu_q[h.cu_q.len() - 1];
        let cu = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let seqlens = SeqLens::new(dev, &cu(&h.cu_q), &cu(&h.cu_k))?;
        let ol = if o_padded {
            padded(tq, h.hq, h.dv)
        } else {
            HeadsLayout::contiguous(tq, h.hq, h.dv)
        };
        let o_len = if o_padded {
            ol.offset + tq * ol.token_stride + 8
        } else {
            tq * h.hq * h.dv
        }
        .max(1);
        let sentinel = T::from_f64(7.0);
        let mut o = dev.upload(&vec![sentinel; o_len])?;
        let mut lse = dev.upload(&vec![f32::NAN; (h.hq * tq).max(1)])?;
        let qkv = Qkv {
            q: &b.q,
            q_layout: b.ql,
            k: b.k.as_ref().unwrap_or(&b.q),
            k_layout: b.kl,
            v: b.v.as_ref().unwrap_or(&b.q),
            v_layout: b.vl,
        };
        let out = AttnOutput {
            o: &mut o,
            o_layout: ol,
            lse: if with_lse { Some(&mut lse) } else { None },
        };
        attention_forward(dev, &qkv, out, &seqlens, opts)?;
        let raw = dev.download(&o)?;
        let lse_host = dev.download(&lse)?;
        Ok((gather(&raw, &ol), lse_host, raw, ol))
    }

    /// Runs one case through the emulator (the kernel source, on the CPU), with the tile
    /// shape of `arch`'s code. Returns what [`run_gpu`] returns.
    pub fn run_emu<T: AttnElement>(
        arch: emulator::Arch,
        h: &Host,
        b: &HostBufs<T>,
        opts: &AttentionOptions,
        o_padded: bool,
        with_lse: bool,
    ) -> Result<GpuOut<T>, Error> {
        let tq = h.cu_q[h.cu_q.len() - 1];
        let cu = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        let ol = if o_padded {
            padded(tq, h.hq, h.dv)
        } else {
            HeadsLayout::contiguous(tq, h.hq, h.dv)
        };
        let o_len = if o_padded {
            ol.offset + tq * ol.token_stride + 8
        } else {
            tq * h.hq * h.dv
        }
        .max(1);
        let mut o = vec![T::from_f64(7.0); o_len];
        let mut lse = vec![f32::NAN; (h.hq * tq).max(1)];
        let qkv = emulator::HostQkv {
            q: &b.q,
            q_layout: b.ql,
            k: b.k.as_deref().unwrap_or(&b.q),
            k_layout: b.kl,
            v: b.v.as_deref().unwrap_or(&b.q),
            v_layout: b.vl,
        };
        emulator::attention_forward(
            arch,
            &qkv,
            &mut o,
            ol,
            if with_lse { Some(&mut lse) } else { None },
            &cu(&h.cu_q),
            &cu(&h.cu_k),
            opts,
        )?;
        Ok((gather(&o, &ol), lse, o, ol))
    }

    /// Where a parity case runs.
    pub enum Backend<'a> {
        Gpu(&'a Device),
        Emulator(emulator::Arch),
    }

    fn parity_case<T: AttnElement>(
        backend: &Backend<'_>,
        c: &Case,
    ) -> Result<(ErrorStats, ErrorStats), TestCaseError> {
        let (d, dv) = c.dims;
        let hq = c.hkv * c.group;
        let round: fn(f64) -> f64 = if T::DTYPE == longctx::dtype::DType::F16 {
            round_f16
        } else {
            round_bf16
        };
        let round32: fn(f32) -> f32 = if T::DTYPE == longctx::dtype::DType::F16 {
            round_f16_f32
        } else {
            round_bf16_f32
        };
        let host = random_host(c.seed, &c.lens, hq, c.hkv, d, dv, c.amp, round);
        let opts = AttentionOptions {
            softmax_scale: None,
            mask: c.mask,
            softcap: c.softcap,
        };
        let scale = f64::from(opts.scale_for(d));
        let p = host.problem(scale, c.softcap.map(f64::from), c.mask);
        let want = attention_f64(&p).expect("reference");
        // The tile shape the device runs (the sm_90a cubin's on H100/H200).
        let cfg = match backend {
            Backend::Gpu(dev) => longctx::attention::device_tile_config::<T>(dev, d, dv),
            Backend::Emulator(arch) => TileConfig::for_code(d, dv, arch.ptx_arch()),
        }
        .expect("supported");
        let (cpu, _) =
            attention_tiled_f32(&p, Tiles::from(&cfg), round32).expect("tiled reference");
        let cpu_err = compare(&cpu.o, &cpu.lse, &want);

        let o_padded = c.placement == Placement::Padded;
        let (o, lse, raw, ol) = match backend {
            Backend::Gpu(dev) => {
                let bufs = place::<T>(dev, &host, c.placement);
                run_gpu(dev, &host, &bufs, &opts, o_padded, c.with_lse).expect("launch")
            }
            Backend::Emulator(arch) => {
                let bufs = place_host::<T>(&host, c.placement);
                run_emu(*arch, &host, &bufs, &opts, o_padded, c.with_lse)
                    .map_err(|e| TestCaseError::fail(format!("{c:?}: {e}")))?
            }
        };
        let lse_cmp: Vec<f32> = if c.with_lse {
            lse.clone()
        } else {
            want.lse.iter().map(|&x| x as f32).collect()
        };
        let o32: Vec<f32> = o.iter().map(|&x| x as f32).collect();
        let gpu_err = compare(&o32, &lse_cmp[..want.lse.len()], &want);

        let eps = T::DTYPE.epsilon();
        let o_tol = 2.0 * cpu_err.max_o + 0.5 * eps * c.amp;
        // One key more or less in a row of n similar keys moves its LSE by about 1 / n; the
        // floor stays well below that for every length drawn (1e-5 (1 + ln n) < 1 / n up to
        // n ~ 10^4), on top of twice the same-precision CPU run's error.
        let max_k = c.lens.iter().map(|l| l.1).max().unwrap_or(0).max(1);
        let lse_tol = 2.0 * cpu_err.max_lse + 1e-5 * (1.0 + (max_k as f64).ln());
        prop_assert!(
            gpu_err.max_o <= o_tol && gpu_err.max_lse <= lse_tol,
            "{c:?}: gpu {gpu_err:?} vs cpu same-precision {cpu_err:?} (tolerances O {o_tol:.3e}, LSE {lse_tol:.3e})"
        );
        // Nothing outside the O view was written.
        let mut inside = vec![false; raw.len()];
        for t in 0..ol.tokens {
            for h in 0..ol.heads {
                let s = ol.offset + t * ol.token_stride + h * ol.head_stride;
                inside[s..s + ol.head_dim]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
        }
        for (i, x) in raw.iter().enumerate() {
            if !inside[i] {
                prop_assert!(
                    x.to_f64() == 7.0,
                    "{c:?}: element {i} outside the O view was written"
                );
            }
        }
        Ok((gpu_err, cpu_err))
    }

    /// Under compute-sanitizer (LONGCTX_PARITY_CASES set) the heavy tests shrink or skip.
    fn sanitizer_run() -> bool {
        std::env::var("LONGCTX_PARITY_CASES").is_ok()
    }

    fn parity<T: AttnElement>(name: &str) {
        let Some(dev) = common::gpu(name) else { return };
        // LONGCTX_PARITY_CASES shrinks the run for compute-sanitizer.
        let cases = std::env::var("LONGCTX_PARITY_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        parity_on::<T>(name, &Backend::Gpu(&dev), cases);
    }

    /// The GPU parity cases through the emulator, for both compiled tile shapes.
    fn emu_parity<T: AttnElement>(name: &str, arch: emulator::Arch) {
        let cases = std::env::var("LONGCTX_EMU_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24);
        parity_on::<T>(name, &Backend::Emulator(arch), cases);
    }

    #[test]
    fn emu_parity_f16_sm80() {
        emu_parity::<f16>("emu_parity_f16_sm80", emulator::Arch::Sm80);
    }

    #[test]
    fn emu_parity_bf16_sm80() {
        emu_parity::<bf16>("emu_parity_bf16_sm80", emulator::Arch::Sm80);
    }

    #[test]
    fn emu_parity_f16_sm90() {
        emu_parity::<f16>("emu_parity_f16_sm90", emulator::Arch::Sm90);
    }

    #[test]
    fn emu_parity_bf16_sm90() {
        emu_parity::<bf16>("emu_parity_bf16_sm90", emulator::Arch::Sm90);
    }

    fn parity_on<T: AttnElement>(name: &str, backend: &Backend<'_>, cases: u32) {
        // Failing cases are kept (and replayed first) in the committed regression file;
        // every failure message prints the case, seed included.
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::Direct(
                    "tests/proptest-regressions/attention-parity.txt",
                ),
            )),
            ..ProptestConfig::default()
        });
        let worst = std::cell::Cell::new((ErrorStats::default(), ErrorStats::default()));
        runner
            .run(&case_strategy(), |c| {
                let (g, cpu) = parity_case::<T>(backend, &c)?;
                let (mut wg, mut wc) = worst.get();
                if g.max_o > wg.max_o {
                    wg = g;
                    wc = cpu;
                }
                worst.set((wg, wc));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (g, cpu) = worst.get();
        eprintln!(
            "{name}: worst case max |O err| {:.3e} (mean {:.3e}), LSE {:.3e}; same-precision CPU run there: {:.3e} (mean {:.3e})",
            g.max_o, g.mean_o, g.max_lse, cpu.max_o, cpu.mean_o
        );
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_parity_f16() {
        parity::<f16>("gpu_parity_f16");
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_parity_bf16() {
        parity::<bf16>("gpu_parity_bf16");
    }

    /// Fixed edge cases every run sees, whatever proptest draws.
    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_parity_edges() {
        let Some(dev) = common::gpu("gpu_parity_edges") else {
            return;
        };
        parity_edges(&Backend::Gpu(&dev));
    }

    /// The fixed edge cases through the emulator, for both compiled tile shapes.
    #[test]
    fn emu_parity_edges_sm80() {
        parity_edges(&Backend::Emulator(emulator::Arch::Sm80));
    }

    #[test]
    fn emu_parity_edges_sm90() {
        parity_edges(&Backend::Emulator(emulator::Arch::Sm90));
    }

    /// With Q = 0 every score is 0, so each row's LSE is exactly ln(its visible keys): a
    /// per-row check of every mask boundary (causal diagonal, both window sides, sequence
    /// ends, empty rows at -inf) that one key more or less fails by ln((n + 1) / n).
    fn mask_boundaries_by_lse(backend: &Backend<'_>) {
        for dims in [(64usize, 64usize), (128, 128)] {
            for mask in masks() {
                for lens in batches() {
                    let mut host = random_host(5, &lens, 4, 2, dims.0, dims.1, 1.0, round_bf16);
                    host.q.iter_mut().for_each(|x| *x = 0.0);
                    let opts = AttentionOptions {
                        softmax_scale: None,
                        mask,
                        softcap: None,
                    };
                    let p = host.problem(f64::from(opts.scale_for(dims.0)), None, mask);
                    let want = attention_f64(&p).expect("reference");
                    let (_, lse, _, _) = match backend {
                        Backend::Gpu(dev) => {
                            let b = place::<bf16>(dev, &host, Placement::Contiguous);
                            run_gpu(dev, &host, &b, &opts, false, true).expect("launch")
                        }
                        Backend::Emulator(arch) => {
                            let b = place_host::<bf16>(&host, Placement::Contiguous);
                            run_emu(*arch, &host, &b, &opts, false, true)
                                .unwrap_or_else(|e| panic!("{mask:?} {lens:?}: {e}"))
                        }
                    };
                    for (row, (g, w)) in lse.iter().zip(&want.lse).enumerate() {
                        let g = f64::from(*g);
                        let ok = if *w == f64::NEG_INFINITY {
                            g == f64::NEG_INFINITY
                        } else {
                            (g - w).abs() <= 1e-5
                        };
                        assert!(
                            ok,
                            "{mask:?} {lens:?} d {dims:?}: LSE row {row} is {g}, ln(visible keys) = {w} \
                             (e^LSE = {:.3} keys, want {:.3})",
                            g.exp(),
                            w.exp()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn emu_mask_boundaries_by_lse_sm80() {
        mask_boundaries_by_lse(&Backend::Emulator(emulator::Arch::Sm80));
    }

    #[test]
    fn emu_mask_boundaries_by_lse_sm90() {
        mask_boundaries_by_lse(&Backend::Emulator(emulator::Arch::Sm90));
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_mask_boundaries_by_lse() {
        let Some(dev) = common::gpu("gpu_mask_boundaries_by_lse") else {
            return;
        };
        mask_boundaries_by_lse(&Backend::Gpu(&dev));
    }

    fn parity_edges(backend: &Backend<'_>) {
        let dims_list = if sanitizer_run() {
            &SUPPORTED_HEAD_DIMS[2..3]
        } else {
            &SUPPORTED_HEAD_DIMS[..]
        };
        for &dims in dims_list {
            // Edges of the tiles the device runs.
            let cfg = match backend {
                Backend::Gpu(dev) => {
                    longctx::attention::device_tile_config::<bf16>(dev, dims.0, dims.1)
                }
                Backend::Emulator(arch) => TileConfig::for_code(dims.0, dims.1, arch.ptx_arch()),
            }
            .unwrap();
            let (bm, bn) = (cfg.block_m, cfg.block_n);
            for (lens, mask) in [
                (
                    vec![(bm - 1, bm - 1), (bm, bm), (bm + 1, bm + 1)],
                    Mask::causal(),
                ),
                (vec![(1, bn + 1), (bn - 1, 1), (0, 3), (5, 0)], Mask::none()),
                (
                    vec![(bm + 7, 3 * bn + 1)],
                    Mask {
                        causal: true,
                        window_left: Some(bn),
                        window_right: None,
                    },
                ),
                (vec![(3 * bn + 1, bm + 7)], Mask::causal()),
                (vec![(2 * bm + 3, 2 * bm + 3)], Mask::window(bn / 2, bn + 3)),
            ] {
                for (hkv, group) in [(1usize, 8usize), (2, 2)] {
                    let c = Case {
                        lens: lens.clone(),
                        hkv,
                        group,
                        dims,
                        mask,
                        softcap: Some(30.0),
                        placement: Placement::Padded,
                        with_lse: true,
                        amp: 3.0,
                        seed: 1234,
                    };
                    parity_case::<bf16>(backend, &c).unwrap_or_else(|e| panic!("{e}"));
                    let c = Case {
                        softcap: None,
                        placement: Placement::Contiguous,
                        ..c
                    };
                    parity_case::<f16>(backend, &c).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_invariants() {
        let Some(dev) = common::gpu("gpu_invariants") else {
            return;
        };
        // Q = 0: the mean of the visible V rows.
        let mut host = random_host(
            21,
            &[(150, 150), (40, 200)],
            8,
            2,
            128,
            128,
            2.0,
            round_bf16,
        );
        host.q.iter_mut().for_each(|x| *x = 0.0);
        for mask in [Mask::causal(), Mask::window(30, 5), Mask::none()] {
            let opts = AttentionOptions {
                mask,
                ..AttentionOptions::default()
            };
            let b = place::<bf16>(&dev, &host, Placement::Contiguous);
            let (o, lse, _, _) = run_gpu(&dev, &host, &b, &opts, false, true).unwrap();
            let want =
                attention_f64(&host.problem(f64::from(opts.scale_for(128)), None, mask)).unwrap();
            let e = compare(
                &o.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                &lse,
                &want,
            );
            assert!(
                e.max_o <= 2.0 * bf16::DTYPE.epsilon() * 2.0 && e.max_lse < 1e-4,
                "{mask:?}: {e:?}"
            );

            // Deterministic: a second run is bit-identical.
            let (o2, lse2, _, _) = run_gpu(&dev, &host, &b, &opts, false, true).unwrap();
            assert!(o.iter().zip(&o2).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(lse
                .iter()
                .zip(&lse2)
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
        }
        // A causal square run's first rows equal a shorter run's (bit for bit: same tiles,
        // same order).
        let host = random_host(22, &[(300, 300)], 4, 2, 64, 64, 3.0, round_f16);
        let m = 133;
        let short = Host {
            q: host.q[..m * 4 * 64].to_vec(),
            k: host.k[..m * 2 * 64].to_vec(),
            v: host.v[..m * 2 * 64].to_vec(),
            cu_q: vec![0, m],
            cu_k: vec![0, m],
            ..host.clone()
        };
        let opts = AttentionOptions {
            mask: Mask::causal(),
            ..AttentionOptions::default()
        };
        let bl = place::<f16>(&dev, &host, Placement::Contiguous);
        let bs = place::<f16>(&dev, &short, Placement::Contiguous);
        let (ol, _, _, _) = run_gpu(&dev, &host, &bl, &opts, false, false).unwrap();
        let (os, _, _, _) = run_gpu(&dev, &short, &bs, &opts, false, false).unwrap();
        assert!(
            os.iter().zip(&ol).all(|(a, b)| a.to_bits() == b.to_bits()),
            "causal prefix differs"
        );
        // Permuting K/V rows leaves unmasked attention unchanged (up to summation order).
        let host = random_host(23, &[(70, 129)], 2, 1, 96, 96, 2.0, round_bf16);
        let mut perm = host.clone();
        for j in 0..129 {
            let src = (j * 31 + 5) % 129;
            perm.k[j * 96..(j + 1) * 96].copy_from_slice(&host.k[src * 96..(src + 1) * 96]);
            perm.v[j * 96..(j + 1) * 96].copy_from_slice(&host.v[src * 96..(src + 1) * 96]);
        }
        let opts = AttentionOptions::default();
        let b1 = place::<bf16>(&dev, &host, Placement::Contiguous);
        let b2 = place::<bf16>(&dev, &perm, Placement::Contiguous);
        let (o1, _, _, _) = run_gpu(&dev, &host, &b1, &opts, false, false).unwrap();
        let (o2, _, _, _) = run_gpu(&dev, &perm, &b2, &opts, false, false).unwrap();
        let worst = o1
            .iter()
            .zip(&o2)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0,
                |m: f64, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            );
        assert!(
            worst <= 4.0 * bf16::DTYPE.epsilon() * 2.0,
            "permutation changed O by {worst}"
        );
    }

    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_rejects_bad_input() {
        let Some(dev) = common::gpu("gpu_rejects_bad_input") else {
            return;
        };
        let host = random_host(1, &[(16, 16)], 2, 1, 64, 64, 1.0, round_bf16);
        let b = place::<bf16>(&dev, &host, Placement::Contiguous);
        let seqlens = SeqLens::new(&dev, &[0, 16], &[0, 16]).unwrap();
        let mut o = dev.zeros::<bf16>(16 * 2 * 64 + 8).unwrap();
        let opts = AttentionOptions::default();
        // A view starting one element in is not 16-byte aligned: rejected, nothing written.
        let misaligned = HeadsLayout {
            offset: 1,
            ..HeadsLayout::contiguous(16, 2, 64)
        };
        let qkv = Qkv {
            q: &b.q,
            q_layout: b.ql,
            k: b.k.as_ref().unwrap(),
            k_layout: b.kl,
            v: b.v.as_ref().unwrap(),
            v_layout: b.vl,
        };
        let r = attention_forward(
            &dev,
            &qkv,
            AttnOutput {
                o: &mut o,
                o_layout: misaligned,
                lse: None,
            },
            &seqlens,
            &opts,
        );
        assert_eq!(invalid_arg(r), "o");
        assert!(dev.download(&o).unwrap().iter().all(|x| x.to_f64() == 0.0));
        // Token counts that disagree with the offsets.
        let seqlens_short = SeqLens::new(&dev, &[0, 15], &[0, 16]).unwrap();
        let r = attention_forward(
            &dev,
            &qkv,
            AttnOutput {
                o: &mut o,
                o_layout: HeadsLayout::contiguous(16, 2, 64),
                lse: None,
            },
            &seqlens_short,
            &opts,
        );
        assert_eq!(invalid_arg(r), "q");
        assert!(SeqLens::new(&dev, &[0, 5, 3], &[0, 1, 2]).is_err());
    }

    /// One query block against 262144 keys (8192 key tiles): the online softmax's rescaling
    /// must not drift, so the LSE stays within f32 rounding of the f64 value.
    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_long_rows_keep_an_unbiased_lse() {
        let Some(dev) = common::gpu("gpu_long_rows_keep_an_unbiased_lse") else {
            return;
        };
        if sanitizer_run() {
            common::skipped(
                "gpu_long_rows_keep_an_unbiased_lse",
                "too long for a sanitizer run",
            );
            return;
        }
        let host = random_host(31, &[(16, 262_144)], 1, 1, 128, 128, 1.0, round_bf16);
        let opts = AttentionOptions::default();
        let b = place::<bf16>(&dev, &host, Placement::Contiguous);
        let (o, lse, _, _) = run_gpu(&dev, &host, &b, &opts, false, true).unwrap();
        let want = attention_f64(&host.problem(f64::from(opts.scale_for(128)), None, Mask::none()))
            .unwrap();
        let e = compare(
            &o.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            &lse,
            &want,
        );
        assert!(e.max_lse < 1e-4 && e.max_o < 1e-3, "{e:?}");
    }

    /// Element offsets past 2^31: a 600k-token sequence with 32 heads of 128 channels. Only
    /// the last tokens hold data (the rest are zero); a causal sliding window keeps the work
    /// small, and the tail rows are checked against the reference.
    #[test]
    #[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
    fn gpu_offsets_past_2_pow_31() {
        let Some(dev) = common::gpu("gpu_offsets_past_2_pow_31") else {
            return;
        };
        if sanitizer_run() {
            common::skipped("gpu_offsets_past_2_pow_31", "too large for a sanitizer run");
            return;
        }
        let (t, h, d, tail, left) = (600_000usize, 32usize, 128usize, 96usize, 64usize);
        assert!(t * h * d > 1 << 31);
        let alloc = |n: usize| dev.zeros::<bf16>(n);
        let (Ok(mut q), Ok(mut k), Ok(mut v), Ok(mut o)) = (
            alloc(t * h * d),
            alloc(t * h * d),
            alloc(t * h * d),
            alloc(t * h * d),
        ) else {
            common::skipped(
                "gpu_offsets_past_2_pow_31",
                "not enough GPU memory for 4 x 4.9 GB",
            );
            return;
        };
        let kt = tail + left; // key tokens the tail rows can see
        let host = random_host(77, &[(tail, kt)], h, h, d, d, 2.0, round_bf16);
        let to_dev = |x: &[f64]| x.iter().map(|&y| bf16::from_f64(y)).collect::<Vec<bf16>>();
        let stream = dev.stream();
        stream
            .memcpy_htod(&to_dev(&host.q), &mut q.slice_mut((t - tail) * h * d..))
            .unwrap();
        stream
            .memcpy_htod(&to_dev(&host.k), &mut k.slice_mut((t - kt) * h * d..))
            .unwrap();
        stream
            .memcpy_htod(&to_dev(&host.v), &mut v.slice_mut((t - kt) * h * d..))
            .unwrap();
        let mask = Mask {
            causal: true,
            window_left: Some(left),
            window_right: None,
        };
        let opts = AttentionOptions {
            mask,
            ..AttentionOptions::default()
        };
        let seqlens = SeqLens::new(&dev, &[0, t as i32], &[0, t as i32]).unwrap();
        let l = HeadsLayout::contiguous(t, h, d);
        let mut lse = dev.zeros::<f32>(h * t).unwrap();
        let qkv = Qkv {
            q: &q,
            q_layout: l,
            k: &k,
            k_layout: l,
            v: &v,
            v_layout: l,
        };
        attention_forward(
            &dev,
            &qkv,
            AttnOutput {
                o: &mut o,
                o_layout: l,
                lse: Some(&mut lse),
            },
            &seqlens,
            &opts,
        )
        .unwrap();
        let mut got = vec![bf16::ZERO; tail * h * d];
        stream
            .memcpy_dtoh(&o.slice((t - tail) * h * d..), &mut got)
            .unwrap();
        let lse_all = dev.download(&lse).unwrap();
        let got_lse: Vec<f32> = (0..h)
            .flat_map(|hh| lse_all[hh * t + t - tail..(hh + 1) * t].to_vec())
            .collect();
        // In the tail problem (tail queries, kt keys, c = left) the same mask selects the
        // same keys as in the full sequence.
        let want = attention_f64(&host.problem(f64::from(opts.scale_for(d)), None, mask)).unwrap();
        let got_f: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
        let e = compare(&got_f, &got_lse, &want);
        assert!(e.max_o < 0.02 && e.max_lse < 1e-3, "{e:?}");
    }
}

/// The raw-pointer entry point gives the same bits as the safe one, and rejects what the
/// safe one rejects (a view past its buffer) before launching.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_raw_entry_point_matches_the_safe_one() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use longctx::attention::{
        attention_forward, attention_forward_raw, AttnOutput, Qkv, RawTensor, SeqLens,
    };
    let Some(dev) = common::gpu("gpu_raw_entry_point_matches_the_safe_one") else {
        return;
    };
    let (t, hq, hkv, d) = (77usize, 4usize, 2usize, 64usize);
    let host = random_host(9, &[(t, t)], hq, hkv, d, d, 1.0, round_bf16);
    let up = |x: &[f64]| {
        dev.upload(&x.iter().map(|&v| bf16::from_f64(v)).collect::<Vec<_>>())
            .unwrap()
    };
    let (q, k, v) = (up(&host.q), up(&host.k), up(&host.v));
    let (ql, kl, ol) = (
        HeadsLayout::contiguous(t, hq, d),
        HeadsLayout::contiguous(t, hkv, d),
        HeadsLayout::contiguous(t, hq, d),
    );
    let seqlens = SeqLens::uniform(&dev, 1, t, t).unwrap();
    let opts = AttentionOptions {
        softmax_scale: None,
        mask: Mask::causal(),
        softcap: None,
    };
    let mut o1 = dev.zeros::<bf16>(t * hq * d).unwrap();
    let x = Qkv {
        q: &q,
        q_layout: ql,
        k: &k,
        k_layout: kl,
        v: &v,
        v_layout: kl,
    };
    let out = AttnOutput {
        o: &mut o1,
        o_layout: ol,
        lse: None,
    };
    attention_forward(&dev, &x, out, &seqlens, &opts).unwrap();
    let mut o2 = dev.zeros::<bf16>(t * hq * d).unwrap();
    let stream = dev.stream().clone();
    {
        let (qp, _g1) = q.device_ptr(&stream);
        let (kp, _g2) = k.device_ptr(&stream);
        let (vp, _g3) = v.device_ptr(&stream);
        let (op, _g4) = o2.device_ptr_mut(&stream);
        let raw = |ptr, len, layout| RawTensor { ptr, len, layout };
        // SAFETY: the four buffers are live allocations of dev's context with the lengths
        // given; O is a separate buffer; all outlive the synchronize below.
        unsafe {
            let short = raw(qp, t * hq * d - 1, ql);
            assert!(attention_forward_raw::<bf16>(
                &dev,
                short,
                raw(kp, t * hkv * d, kl),
                raw(vp, t * hkv * d, kl),
                raw(op, t * hq * d, ol),
                None,
                &seqlens,
                &opts
            )
            .is_err());
            attention_forward_raw::<bf16>(
                &dev,
                raw(qp, t * hq * d, ql),
                raw(kp, t * hkv * d, kl),
                raw(vp, t * hkv * d, kl),
                raw(op, t * hq * d, ol),
                None,
                &seqlens,
                &opts,
            )
            .unwrap();
        }
    }
    dev.synchronize().unwrap();
    let (a, b) = (dev.download(&o1).unwrap(), dev.download(&o2).unwrap());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

/// The f64 backward against central finite differences of `attention_f64` (loss
/// L = sum dO * O) on every mask, with and without softcap, under GQA and MQA, and at
/// head dims 192/128; rows that see no key get zero gradients.
#[test]
fn backward_f64_matches_finite_differences() {
    use longctx::attention::reference::attention_backward_f64;
    let batches: [Vec<(usize, usize)>; 2] = [vec![(5, 7), (0, 3), (4, 4), (3, 0)], vec![(9, 4)]];
    let shapes = [
        (2usize, 1usize, (8usize, 8usize)),
        (4, 2, (8, 16)),
        (2, 2, (192, 128)),
    ];
    let mut rng = common::Rng(77);
    let mut checked = 0usize;
    for mask in masks() {
        for softcap in [None, Some(2.0f64)] {
            for (bi, lens) in batches.iter().enumerate() {
                for &(hq, hkv, (d, dv)) in &shapes {
                    if d == 192 && (bi == 1 || softcap.is_none()) {
                        continue; // one 192/128 case per mask keeps the test short
                    }
                    let host = random_host(rng.next_u64(), lens, hq, hkv, d, dv, 1.0, |x| x);
                    let scale = 0.7;
                    let p = host.problem(scale, softcap, mask);
                    let tq = host.cu_q[host.cu_q.len() - 1];
                    let dout: Vec<f64> = (0..tq * hq * dv).map(|_| rng.uniform()).collect();
                    let g = attention_backward_f64(&p, &dout).unwrap();
                    let loss = |q: &[f64], k: &[f64], v: &[f64]| {
                        let pp = Problem { q, k, v, ..p };
                        let o = attention_f64(&pp).unwrap().o;
                        o.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
                    };
                    let h = 1e-5;
                    for which in 0..3 {
                        let (x, grad) = match which {
                            0 => (&host.q, &g.dq),
                            1 => (&host.k, &g.dk),
                            _ => (&host.v, &g.dv),
                        };
                        if x.is_empty() {
                            continue;
                        }
                        for _ in 0..6 {
                            let idx = rng.below(x.len() as u64) as usize;
                            let mut plus = x.clone();
                            let mut minus = x.clone();
                            plus[idx] += h;
                            minus[idx] -= h;
                            let (lp, lm) = match which {
                                0 => (
                                    loss(&plus, &host.k, &host.v),
                                    loss(&minus, &host.k, &host.v),
                                ),
                                1 => (
                                    loss(&host.q, &plus, &host.v),
                                    loss(&host.q, &minus, &host.v),
                                ),
                                _ => (
                                    loss(&host.q, &host.k, &plus),
                                    loss(&host.q, &host.k, &minus),
                                ),
                            };
                            let fd = (lp - lm) / (2.0 * h);
                            assert!(
                                (fd - grad[idx]).abs() <= 1e-6 * (1.0 + grad[idx].abs()),
                                "{mask:?} softcap {softcap:?} lens {lens:?} heads {hq}/{hkv} dims {d}/{dv}: \
                                 d{}[{idx}] = {}, finite difference {fd}",
                                ["q", "k", "v"][which],
                                grad[idx]
                            );
                            checked += 1;
                        }
                    }
                    // Rows that see no key: zero dq.
                    let want = attention_f64(&p).unwrap();
                    for hh in 0..hq {
                        for t in 0..tq {
                            if want.lse[hh * tq + t] == f64::NEG_INFINITY {
                                assert!(g.dq[(t * hq + hh) * d..][..d].iter().all(|&x| x == 0.0));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 1000, "only {checked} coordinates checked");
}

/// The tiled f32 backward (the kernel's decomposition) against the f64 reference, on every
/// mask and batch shape, with and without softcap, GQA, tile edges at 16 x 16.
#[test]
fn backward_tiled_f32_matches_f64() {
    use longctx::attention::reference::{attention_backward_f64, attention_backward_tiled_f32};
    let mut rng = common::Rng(91);
    for mask in masks() {
        for softcap in [None, Some(5.0f64)] {
            for lens in batches() {
                let (hq, hkv, d, dv) = (4usize, 2usize, 16usize, 16usize);
                let host = random_host(rng.next_u64(), &lens, hq, hkv, d, dv, 1.0, |x| x);
                let p = host.problem(0.25, softcap, mask);
                let tq = host.cu_q[host.cu_q.len() - 1];
                let fwd = attention_f64(&p).unwrap();
                let dout: Vec<f64> = (0..tq * hq * dv).map(|_| rng.uniform()).collect();
                let want = attention_backward_f64(&p, &dout).unwrap();
                let o32: Vec<f32> = fwd.o.iter().map(|&x| x as f32).collect();
                let lse32: Vec<f32> = fwd.lse.iter().map(|&x| x as f32).collect();
                let d32: Vec<f32> = dout.iter().map(|&x| x as f32).collect();
                let got =
                    attention_backward_tiled_f32(&p, &o32, &lse32, &d32, Tiles::new(16, 16), |x| x)
                        .unwrap();
                for (name, g, w) in [
                    ("dq", &got.dq, &want.dq),
                    ("dk", &got.dk, &want.dk),
                    ("dv", &got.dv, &want.dv),
                ] {
                    let mag = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    let err = g
                        .iter()
                        .zip(w.iter())
                        .map(|(a, b)| (f64::from(*a) - b).abs())
                        .fold(
                            0.0,
                            |m: f64, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
                        );
                    assert!(
                        err <= 2e-5 * (1.0 + mag),
                        "{mask:?} softcap {softcap:?} {lens:?}: {name} max error {err:.3e} (max |{name}| {mag:.3e})"
                    );
                }
            }
        }
    }
}
