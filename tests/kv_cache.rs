//! merge_states: the f64 reference against attention over the union of key splits, the
//! kernel through the emulator (its CUDA source on the CPU, race and bounds checkers on)
//! against the f64 reference, validation, and GPU twins (`#[ignore]`d).

mod common;

use half::{bf16, f16};
use longctx::attention::reference::{attention_f64, Problem};
use longctx::attention::Mask;
use longctx::dtype::Element;
use longctx::emulator;
use longctx::kv_cache::reference::merge_states_f64;
use longctx::kv_cache::{
    merge_states, LseLayout, MergeOptions, MergeShape, MergeState, StackedStates, States,
    MAX_MERGE_HEAD_DIM,
};
use longctx::layout::HeadsLayout;
use longctx::Error;
use proptest::prelude::*;

/// Where a case runs.
enum Backend<'a> {
    Emulator,
    Gpu(&'a longctx::device::Device),
}

fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| {
        let e = if x == y { 0.0 } else { (x - y).abs() };
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

/// Attention over keys split into ranges, each run by the f64 reference, merged by the f64
/// merge, equals attention over all keys (and the LSE too) to rounding error; an empty
/// range is an empty part.
#[test]
fn reference_merge_of_key_splits_equals_attention_over_the_union() {
    let mut r = common::Rng(7);
    for &(tq, tk, hq, hkv, d, dv) in &[
        (5usize, 37usize, 4usize, 2usize, 16usize, 24usize),
        (1, 64, 8, 1, 32, 32),
        (3, 5, 2, 2, 8, 512),
    ] {
        let q: Vec<f64> = (0..tq * hq * d).map(|_| 2.0 * r.uniform()).collect();
        let k: Vec<f64> = (0..tk * hkv * d).map(|_| 2.0 * r.uniform()).collect();
        let v: Vec<f64> = (0..tk * hkv * dv).map(|_| r.uniform()).collect();
        let problem =
            |k: &[f64], v: &[f64], sk: usize| -> longctx::attention::reference::Output<f64> {
                let cu_q = [0, tq];
                let cu_k = [0, sk];
                attention_f64(&Problem {
                    q: &q,
                    k,
                    v,
                    cu_seqlens_q: &cu_q,
                    cu_seqlens_k: &cu_k,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    head_dim_v: dv,
                    scale: 1.0 / (d as f64).sqrt(),
                    softcap: None,
                    mask: Mask::none(),
                })
                .unwrap()
            };
        let full = problem(&k, &v, tk);
        let cuts = [0, 0, tk / 3, tk / 3 + 1, tk - 1, tk];
        let (mut o, mut lse) = (Vec::new(), Vec::new());
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1].max(w[0]));
            let part = problem(
                &k[a * hkv * d..b * hkv * d],
                &v[a * hkv * dv..b * hkv * dv],
                b - a,
            );
            o.extend(part.o);
            lse.extend(part.lse);
        }
        let parts = cuts.len() - 1;
        let merged = merge_states_f64(&o, &lse, parts, tq, hq, dv).unwrap();
        let eo = max_err(&merged.o, &full.o);
        let el = max_err(&merged.lse, &full.lse);
        assert!(
            eo < 1e-12 && el < 1e-12,
            "({tq}, {tk}): O error {eo:e}, LSE error {el:e}"
        );
    }
}

#[test]
fn reference_merge_edges() {
    // All parts empty: O = 0 (even if a part's O is NaN), LSE = -inf.
    let o = vec![f64::NAN; 2 * 3];
    let lse = vec![f64::NEG_INFINITY; 2];
    let m = merge_states_f64(&o, &lse, 2, 1, 1, 3).unwrap();
    assert_eq!(m.o, vec![0.0; 3]);
    assert_eq!(m.lse, vec![f64::NEG_INFINITY]);
    // No part at all.
    let m = merge_states_f64(&[], &[], 0, 2, 1, 3).unwrap();
    assert_eq!(m.o, vec![0.0; 6]);
    // One part is the identity; equal LSEs average.
    let m = merge_states_f64(&[1.0, 2.0], &[0.5], 1, 1, 1, 2).unwrap();
    assert_eq!(m.o, vec![1.0, 2.0]);
    assert_eq!(m.lse, vec![0.5]);
    let m = merge_states_f64(&[1.0, 3.0], &[0.0, 0.0], 2, 1, 1, 1).unwrap();
    assert!((m.o[0] - 2.0).abs() < 1e-15 && (m.lse[0] - 2f64.ln()).abs() < 1e-15);
    // Bad input.
    assert!(merge_states_f64(&[1.0], &[0.0, 0.0], 2, 1, 1, 1).is_err());
    assert!(merge_states_f64(&[1.0], &[f64::NAN], 1, 1, 1, 1).is_err());
    assert!(merge_states_f64(&[1.0], &[f64::INFINITY], 1, 1, 1, 1).is_err());
    assert!(merge_states_f64(&[], &[], usize::MAX, 2, 1, 3).is_err());
}

#[derive(Debug, Clone)]
struct Case {
    parts: usize,
    tokens: usize,
    heads: usize,
    dim: usize,
    /// Padded, misaligned views (the scalar kernel) instead of dense ones.
    padded: bool,
    accumulate: bool,
    /// Probability (in 1/8) that a (part, row) is empty.
    empty_eighths: u64,
    seed: u64,
}

/// Views of one case: the parts' stack and the output.
fn views(c: &Case) -> (StackedStates, HeadsLayout, LseLayout) {
    if !c.padded {
        return (
            StackedStates::contiguous(c.parts, c.tokens, c.heads, c.dim),
            HeadsLayout::contiguous(c.tokens, c.heads, c.dim),
            LseLayout::contiguous(c.heads, c.tokens),
        );
    }
    let o = HeadsLayout {
        offset: 1,
        tokens: c.tokens,
        heads: c.heads,
        head_dim: c.dim,
        token_stride: c.heads * (c.dim + 3) + 1,
        head_stride: c.dim + 3,
    };
    let lse = LseLayout {
        offset: 3,
        heads: c.heads,
        tokens: c.tokens,
        head_stride: c.tokens + 2,
    };
    let stack = StackedStates {
        parts: c.parts,
        o,
        o_part_stride: c.tokens * o.token_stride + 5,
        lse,
        lse_part_stride: c.heads * lse.head_stride + 1,
    };
    let out = HeadsLayout {
        offset: 2,
        token_stride: c.heads * (c.dim + 1) + 2,
        head_stride: c.dim + 1,
        ..o
    };
    let out_lse = LseLayout {
        offset: 1,
        head_stride: c.tokens + 1,
        ..lse
    };
    (stack, out, out_lse)
}

fn o_len(l: &HeadsLayout, parts: usize, part_stride: usize) -> usize {
    if parts == 0 || l.is_empty() {
        return l.offset;
    }
    l.offset
        + (parts - 1) * part_stride
        + (l.tokens - 1) * l.token_stride
        + (l.heads - 1) * l.head_stride
        + l.head_dim
}

fn lse_len(l: &LseLayout, parts: usize, part_stride: usize) -> usize {
    if parts == 0 || l.heads == 0 || l.tokens == 0 {
        return l.offset;
    }
    l.offset + (parts - 1) * part_stride + (l.heads - 1) * l.head_stride + l.tokens
}

const SENTINEL: f64 = 1234.5;

/// What a case produced: the merged O and LSE (dense), and the reference.
type Got = (
    Vec<f64>,
    Vec<f64>,
    longctx::attention::reference::Output<f64>,
);

/// Runs one case; returns (got O dense, got LSE dense, reference).
fn run_case<T: Element>(backend: &Backend<'_>, c: &Case) -> Result<Got, Error> {
    let (stack, out_l, out_lse_l) = views(c);
    let (t, h, d) = (c.tokens, c.heads, c.dim);
    let mut r = common::Rng(c.seed);
    let nan = T::from_f64(f64::NAN);
    let mut po = vec![T::from_f64(SENTINEL); o_len(&stack.o, c.parts, stack.o_part_stride)];
    let mut pl = vec![SENTINEL as f32; lse_len(&stack.lse, c.parts, stack.lse_part_stride)];
    let mut oo = vec![T::from_f64(SENTINEL); o_len(&out_l, 1, 0)];
    let mut ol = vec![SENTINEL as f32; lse_len(&out_lse_l, 1, 0)];
    // Dense copies for the reference: the output's initial state is the last part when
    // accumulating.
    let ref_parts = c.parts + usize::from(c.accumulate);
    let mut ro = vec![0.0; ref_parts * t * h * d];
    let mut rl = vec![f64::NEG_INFINITY; ref_parts * h * t];
    // Rows whose every part is empty, one in four when any part can be.
    let all_empty: Vec<bool> = (0..t * h)
        .map(|_| c.empty_eighths > 0 && r.below(4) == 0)
        .collect();
    for p in 0..ref_parts {
        let is_out = p == c.parts;
        for tt in 0..t {
            for hh in 0..h {
                let row = tt * h + hh;
                let empty = all_empty[row] || r.below(8) < c.empty_eighths;
                let lse = if empty {
                    f32::NEG_INFINITY
                } else {
                    (6.0 * r.uniform()) as f32
                };
                rl[p * h * t + hh * t + tt] = f64::from(lse);
                let (buf_l, buf, l, off) = if is_out {
                    (
                        &mut ol,
                        out_lse_l.offset + hh * out_lse_l.head_stride + tt,
                        &out_l,
                        0,
                    )
                } else {
                    (
                        &mut pl,
                        stack.lse.offset
                            + p * stack.lse_part_stride
                            + hh * stack.lse.head_stride
                            + tt,
                        &stack.o,
                        p * stack.o_part_stride,
                    )
                };
                buf_l[buf] = lse;
                let base = l.offset + off + tt * l.token_stride + hh * l.head_stride;
                for ch in 0..d {
                    let x = T::from_f64(2.0 * r.uniform());
                    // An empty part's O is garbage the kernel must not read.
                    let stored = if empty { nan } else { x };
                    if is_out {
                        oo[base + ch] = stored;
                    } else {
                        po[base + ch] = stored;
                    }
                    ro[(p * t * h + row) * d + ch] = if empty { 0.0 } else { x.to_f64() };
                }
            }
        }
    }
    let want = merge_states_f64(&ro, &rl, ref_parts, t, h, d)?;
    let opts = MergeOptions {
        accumulate: c.accumulate,
    };
    match backend {
        Backend::Emulator => emulator::merge_states(
            &po, &pl, &stack, &mut oo, &out_l, &mut ol, &out_lse_l, &opts,
        )?,
        Backend::Gpu(dev) => {
            let dpo = dev.upload(&po)?;
            let dpl = dev.upload(&pl)?;
            let mut doo = dev.upload(&oo)?;
            let mut dol = dev.upload(&ol)?;
            merge_states(
                dev,
                &States {
                    o: &dpo,
                    lse: &dpl,
                    layout: stack,
                },
                MergeState {
                    o: &mut doo,
                    o_layout: out_l,
                    lse: &mut dol,
                    lse_layout: out_lse_l,
                },
                &opts,
            )?;
            oo = dev.download(&doo)?;
            ol = dev.download(&dol)?;
        }
    }
    // Gather the views and check nothing outside them changed.
    let mut go = vec![0.0; t * h * d];
    let mut gl = vec![0.0; h * t];
    let mut inside_o = vec![false; oo.len()];
    let mut inside_l = vec![false; ol.len()];
    for tt in 0..t {
        for hh in 0..h {
            let base = out_l.offset + tt * out_l.token_stride + hh * out_l.head_stride;
            for ch in 0..d {
                go[(tt * h + hh) * d + ch] = oo[base + ch].to_f64();
                inside_o[base + ch] = true;
            }
            let i = out_lse_l.offset + hh * out_lse_l.head_stride + tt;
            gl[hh * t + tt] = f64::from(ol[i]);
            inside_l[i] = true;
        }
    }
    for (i, x) in oo.iter().enumerate() {
        if !inside_o[i] && x.to_f64() != T::from_f64(SENTINEL).to_f64() {
            return Err(Error::InvalidArgument {
                op: "test",
                arg: "out_o",
                problem: format!("element {i} outside the view was written"),
                kind: longctx::ErrorKind::InvalidArgument,
            });
        }
    }
    for (i, x) in ol.iter().enumerate() {
        if !inside_l[i] && *x != SENTINEL as f32 {
            return Err(Error::InvalidArgument {
                op: "test",
                arg: "out_lse",
                problem: format!("element {i} outside the view was written"),
                kind: longctx::ErrorKind::InvalidArgument,
            });
        }
    }
    Ok((go, gl, want))
}

/// O within a few f32 ulps plus the output's rounding to T; LSE within a few f32 ulps; -inf
/// rows exactly (O = 0, LSE = -inf).
fn check<T: Element>(c: &Case, got: &Got) -> Result<(), TestCaseError> {
    let (go, gl, want) = got;
    let eps = T::DTYPE.epsilon();
    for (i, (g, w)) in go.iter().zip(&want.o).enumerate() {
        let tol = 2.0 * eps * w.abs() + 4e-6;
        prop_assert!(
            (g - w).abs() <= tol,
            "{c:?}: O[{i}] = {g}, want {w} (tol {tol:e})"
        );
    }
    for (i, (g, w)) in gl.iter().zip(&want.lse).enumerate() {
        if *w == f64::NEG_INFINITY {
            prop_assert!(*g == f64::NEG_INFINITY, "{c:?}: LSE[{i}] = {g}, want -inf");
            let d = c.dim;
            let (t, h) = (i % c.tokens, i / c.tokens);
            let row = &go[(t * c.heads + h) * d..][..d];
            prop_assert!(
                row.iter().all(|x| *x == 0.0),
                "{c:?}: empty row {i} has O != 0"
            );
        } else {
            let tol = 4e-6 * (1.0 + w.abs());
            prop_assert!((g - w).abs() <= tol, "{c:?}: LSE[{i}] = {g}, want {w}");
        }
    }
    Ok(())
}

fn case_strategy(max_parts: usize) -> impl Strategy<Value = Case> {
    (
        1..=max_parts,
        prop_oneof![Just(0usize), Just(1), Just(2), Just(3), Just(7), Just(13)],
        prop_oneof![Just(1usize), Just(2), Just(3), Just(8)],
        prop_oneof![
            Just(64usize),
            Just(128),
            Just(256),
            Just(512),
            Just(1),
            Just(40),
            Just(72)
        ],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u64), Just(2), Just(4), Just(8)],
        any::<u64>(),
    )
        .prop_map(
            |(parts, tokens, heads, dim, padded, accumulate, empty_eighths, seed)| Case {
                parts,
                tokens,
                heads,
                dim,
                padded,
                accumulate,
                empty_eighths,
                seed,
            },
        )
}

fn parity_on<T: Element>(name: &str, backend: &Backend<'_>, cases: u32) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/kv-cache.txt",
            ),
        )),
        ..ProptestConfig::default()
    });
    runner
        .run(&case_strategy(5), |c| {
            let out = run_case::<T>(backend, &c)
                .map_err(|e| TestCaseError::fail(format!("{c:?}: {e}")))?;
            check::<T>(&c, &out)
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn emu_cases() -> u32 {
    std::env::var("LONGCTX_EMU_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

#[test]
fn emu_merge_parity_f32() {
    parity_on::<f32>("emu_merge_parity_f32", &Backend::Emulator, emu_cases());
}

#[test]
fn emu_merge_parity_f16() {
    parity_on::<f16>("emu_merge_parity_f16", &Backend::Emulator, emu_cases());
}

#[test]
fn emu_merge_parity_bf16() {
    parity_on::<bf16>("emu_merge_parity_bf16", &Backend::Emulator, emu_cases());
}

/// Fixed edges: no part (empty state, or the running state unchanged), many parts (more
/// than a warp's lanes), every row empty, every head dim, both layouts.
fn edge_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (parts, accumulate) in [(0, false), (0, true), (1, true), (37, false), (70, true)] {
        for padded in [false, true] {
            v.push(Case {
                parts,
                tokens: 3,
                heads: 2,
                dim: 128,
                padded,
                accumulate,
                empty_eighths: 2,
                seed: parts as u64 + 11,
            });
        }
    }
    for dim in [64, 128, 256, 512, 8, 16, 500] {
        v.push(Case {
            parts: 3,
            tokens: 5,
            heads: 3,
            dim,
            padded: dim % 3 == 0,
            accumulate: false,
            empty_eighths: 8,
            seed: dim as u64,
        });
        v.push(Case {
            parts: 2,
            tokens: 31,
            heads: 1,
            dim,
            padded: false,
            accumulate: true,
            empty_eighths: 1,
            seed: dim as u64 + 1,
        });
    }
    v
}

fn edges_on<T: Element>(backend: &Backend<'_>) {
    for c in edge_cases() {
        let out = run_case::<T>(backend, &c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        check::<T>(&c, &out).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn emu_merge_edges() {
    edges_on::<f32>(&Backend::Emulator);
    edges_on::<bf16>(&Backend::Emulator);
}

/// The merge is exact where it should be: one part merged with nothing returns that part
/// (O rounded through f32 only), and ring-style accumulation one part at a time equals one
/// merge of the stack.
#[test]
fn emu_merge_one_part_is_identity_and_accumulation_matches_stacking() {
    let (t, h, d) = (7, 4, 64);
    let mut r = common::Rng(3);
    let o: Vec<bf16> = (0..3 * t * h * d)
        .map(|_| bf16::from_f64(r.uniform()))
        .collect();
    let lse: Vec<f32> = (0..3 * h * t).map(|_| (4.0 * r.uniform()) as f32).collect();
    let out_l = HeadsLayout::contiguous(t, h, d);
    let lse_l = LseLayout::contiguous(h, t);
    let mut oo = vec![bf16::ZERO; t * h * d];
    let mut ol = vec![0f32; h * t];
    let one = StackedStates::contiguous(1, t, h, d);
    emulator::merge_states(
        &o[..t * h * d],
        &lse[..h * t],
        &one,
        &mut oo,
        &out_l,
        &mut ol,
        &lse_l,
        &MergeOptions::default(),
    )
    .unwrap();
    assert!(oo == o[..t * h * d] && ol == lse[..h * t]);

    let stack = StackedStates::contiguous(3, t, h, d);
    let (mut so, mut sl) = (vec![bf16::ZERO; t * h * d], vec![0f32; h * t]);
    emulator::merge_states(
        &o,
        &lse,
        &stack,
        &mut so,
        &out_l,
        &mut sl,
        &lse_l,
        &MergeOptions::default(),
    )
    .unwrap();
    let (mut ao, mut al) = (vec![bf16::ZERO; t * h * d], vec![f32::NEG_INFINITY; h * t]);
    for p in 0..3 {
        emulator::merge_states(
            &o[p * t * h * d..][..t * h * d],
            &lse[p * h * t..][..h * t],
            &one,
            &mut ao,
            &out_l,
            &mut al,
            &lse_l,
            &MergeOptions { accumulate: true },
        )
        .unwrap();
    }
    let eo = max_err(
        &ao.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
        &so.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
    );
    let el = max_err(
        &al.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        &sl.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
    );
    // Accumulation rounds the running O to bf16 after each step.
    assert!(
        eo < 3.0 * 2f64.powi(-8) && el < 1e-5,
        "O {eo:e}, LSE {el:e}"
    );
}

fn shape(parts: StackedStates, out_o: HeadsLayout, out_lse: LseLayout) -> MergeShape {
    let n = |l: &HeadsLayout| o_len(l, 1, 0);
    MergeShape {
        parts_o_len: o_len(&parts.o, parts.parts, parts.o_part_stride),
        parts_lse_len: lse_len(&parts.lse, parts.parts, parts.lse_part_stride),
        parts,
        out_o_len: n(&out_o),
        out_o,
        out_lse_len: lse_len(&out_lse, 1, 0),
        out_lse,
    }
}

fn rejects(s: MergeShape, arg: &str) {
    match s.validate() {
        Err(Error::InvalidArgument { arg: a, .. }) if a == arg => {}
        other => panic!("expected a rejection of `{arg}`, got {other:?} for {s:?}"),
    }
}

#[test]
fn merge_rejects_bad_input() {
    let (p, t, h, d) = (3, 5, 2, 64);
    let good = shape(
        StackedStates::contiguous(p, t, h, d),
        HeadsLayout::contiguous(t, h, d),
        LseLayout::contiguous(h, t),
    );
    good.validate().unwrap();
    // Head dims.
    for bad_d in [0, MAX_MERGE_HEAD_DIM + 1] {
        rejects(
            shape(
                StackedStates::contiguous(p, t, h, bad_d),
                HeadsLayout::contiguous(t, h, bad_d),
                LseLayout::contiguous(h, t),
            ),
            "parts.o",
        );
    }
    // Shapes that disagree.
    rejects(
        MergeShape {
            out_o: HeadsLayout::contiguous(t, h + 1, d),
            ..good
        },
        "out_o",
    );
    rejects(
        MergeShape {
            out_lse: LseLayout::contiguous(h, t + 1),
            out_lse_len: 100,
            ..good
        },
        "out_lse",
    );
    let mut s = good;
    s.parts.lse = LseLayout::contiguous(h + 1, t);
    rejects(s, "parts.lse");
    // Short buffers: the last part, the LSE stack, the outputs.
    rejects(
        MergeShape {
            parts_o_len: good.parts_o_len - 1,
            ..good
        },
        "parts.o",
    );
    rejects(
        MergeShape {
            parts_lse_len: good.parts_lse_len - 1,
            ..good
        },
        "parts.lse",
    );
    rejects(
        MergeShape {
            out_o_len: good.out_o_len - 1,
            ..good
        },
        "out_o",
    );
    rejects(
        MergeShape {
            out_lse_len: good.out_lse_len - 1,
            ..good
        },
        "out_lse",
    );
    // Overlapping LSE heads and O rows of the output.
    let mut s = good;
    s.out_lse.head_stride = t - 1;
    rejects(s, "out_lse");
    let mut s = good;
    s.out_o.head_stride = d - 1;
    rejects(s, "out_o");
    // Offsets and strides that overflow.
    let mut s = good;
    s.parts.o_part_stride = usize::MAX / 2;
    rejects(s, "parts.o");
    let mut s = good;
    s.parts.lse_part_stride = usize::MAX;
    rejects(s, "parts.lse");
    let mut s = good;
    s.out_lse.head_stride = usize::MAX;
    rejects(s, "out_lse");
    // Sizes past usize / the kernel's fields.
    let huge = shape(
        StackedStates::contiguous(1, usize::MAX, 2, d),
        HeadsLayout::contiguous(usize::MAX, 2, d),
        LseLayout::contiguous(2, usize::MAX),
    );
    assert!(matches!(
        huge.validate(),
        Err(Error::InvalidArgument { .. })
    ));
    // The emulated op runs the same validation.
    let mut oo = vec![0f32; t * h * d];
    let mut ol = vec![0f32; h * t];
    let e = emulator::merge_states(
        &vec![0f32; p * t * h * d - 1],
        &vec![0f32; p * h * t],
        &StackedStates::contiguous(p, t, h, d),
        &mut oo,
        &HeadsLayout::contiguous(t, h, d),
        &mut ol,
        &LseLayout::contiguous(h, t),
        &MergeOptions::default(),
    );
    assert!(
        matches!(e, Err(Error::InvalidArgument { arg: "parts.o", .. })),
        "{e:?}"
    );
    // No rows: nothing to do, nothing touched.
    shape(
        StackedStates::contiguous(p, 0, h, d),
        HeadsLayout::contiguous(0, h, d),
        LseLayout::contiguous(h, 0),
    )
    .validate()
    .unwrap();
}

fn gpu_cases() -> u32 {
    std::env::var("LONGCTX_PARITY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_merge_parity() {
    let Some(dev) = common::gpu("gpu_merge_parity") else {
        return;
    };
    let gpu = Backend::Gpu(&dev);
    parity_on::<f32>("gpu_merge_parity_f32", &gpu, gpu_cases());
    parity_on::<f16>("gpu_merge_parity_f16", &gpu, gpu_cases());
    parity_on::<bf16>("gpu_merge_parity_bf16", &gpu, gpu_cases());
}

#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_merge_edges() {
    let Some(dev) = common::gpu("gpu_merge_edges") else {
        return;
    };
    let gpu = Backend::Gpu(&dev);
    edges_on::<f32>(&gpu);
    edges_on::<f16>(&gpu);
    edges_on::<bf16>(&gpu);
}

mod paged {
    use super::common;
    use longctx::kv_cache::reference::{gather_paged_f64, scatter_paged_f64};
    use longctx::kv_cache::{PageTable, PagedKvLayout, MAX_PAGE_SIZE};
    use longctx::Error;

    fn arg_of<T: std::fmt::Debug>(r: longctx::Result<T>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { arg, .. }) => arg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    /// Scatter then gather returns the dense tensor, for page sizes from 1 to 256, empty
    /// sequences, partial last pages and shuffled page ids; slots no sequence uses stay
    /// untouched, and each token sits where the layout formula says.
    #[test]
    fn paged_round_trip_and_addressing() {
        let mut r = common::Rng(17);
        for page_size in [1usize, 3, 16, MAX_PAGE_SIZE] {
            let seqlens = [4 * page_size as i32 + 1, 0, page_size as i32, 1];
            let used: Vec<usize> = seqlens
                .iter()
                .map(|&l| (l as usize).div_ceil(page_size))
                .collect();
            let max_pages = used.iter().copied().max().unwrap() + 1;
            let pages = used.iter().sum::<usize>() + 3;
            // Shuffled page ids, padding -1.
            let mut ids: Vec<i32> = (0..pages as i32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, r.below(i as u64 + 1) as usize);
            }
            let mut table = vec![-1i32; seqlens.len() * max_pages];
            let mut next = 0;
            for (b, &u) in used.iter().enumerate() {
                for i in 0..u {
                    table[b * max_pages + i] = ids[next];
                    next += 1;
                }
            }
            let l = PagedKvLayout {
                page_size,
                pages,
                heads_kv: 2,
                head_dim: 3,
            };
            let t = PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens: &seqlens,
            };
            let total: usize = seqlens.iter().map(|&x| x as usize).sum();
            let dense: Vec<f64> = (0..total * 2 * 3).map(|_| r.uniform()).collect();
            let mut cache = vec![f64::NAN; l.cache_len().unwrap()];
            let v = scatter_paged_f64(&l, &dense, &t, &mut cache).unwrap();
            assert_eq!(v.cu_seqlens.last(), Some(&total));
            let (back, _) = gather_paged_f64(&l, &cache, &t).unwrap();
            assert_eq!(back, dense);
            let written = cache.iter().filter(|x| !x.is_nan()).count();
            assert_eq!(
                written,
                dense.len(),
                "only the sequences' slots are written"
            );
            // Token pos of sequence 0, head 1, by the formula.
            let pos = 2 * page_size.min(2);
            let page = table[pos / page_size] as usize;
            let off = l.token_offset(&t, 0, pos, 1).unwrap();
            assert_eq!(off, ((page * page_size + pos % page_size) * 2 + 1) * 3);
            assert_eq!(cache[off..off + 3], dense[(pos * 2 + 1) * 3..][..3]);
        }
    }

    #[test]
    fn paged_rejects_bad_input() {
        let l = PagedKvLayout {
            page_size: 4,
            pages: 5,
            heads_kv: 2,
            head_dim: 8,
        };
        let seqlens = [5, 0, 4];
        let table = [0, 1, 2, -1, -1, -1, 3, -1, -1];
        let t = PageTable {
            block_table: &table,
            max_pages_per_seq: 3,
            seqlens: &seqlens,
        };
        l.validate_table(&t).unwrap();
        for bad in [
            PagedKvLayout { page_size: 0, ..l },
            PagedKvLayout {
                page_size: MAX_PAGE_SIZE + 1,
                ..l
            },
        ] {
            assert_eq!(arg_of(bad.validate()), "page_size");
        }
        assert_eq!(
            arg_of(
                PagedKvLayout {
                    pages: i32::MAX as usize + 1,
                    ..l
                }
                .validate()
            ),
            "pages"
        );
        assert_eq!(
            arg_of(PagedKvLayout { heads_kv: 0, ..l }.validate()),
            "heads_kv"
        );
        assert_eq!(
            arg_of(PagedKvLayout { head_dim: 0, ..l }.validate()),
            "head_dim"
        );
        assert_eq!(
            arg_of(
                PagedKvLayout {
                    pages: i32::MAX as usize,
                    page_size: 256,
                    heads_kv: usize::MAX / 4,
                    head_dim: 8
                }
                .validate()
            ),
            "cache"
        );
        // Table shape.
        assert_eq!(
            arg_of(l.validate_table(&PageTable {
                block_table: &table[..8],
                ..t
            })),
            "block_table"
        );
        assert_eq!(
            arg_of(l.validate_table(&PageTable {
                max_pages_per_seq: usize::MAX,
                ..t
            })),
            "block_table"
        );
        // Negative length; table too short for a length.
        assert_eq!(
            arg_of(l.validate_table(&PageTable {
                seqlens: &[5, -1, 4],
                ..t
            })),
            "seqlens"
        );
        assert_eq!(
            arg_of(l.validate_table(&PageTable {
                seqlens: &[13, 0, 4],
                ..t
            })),
            "seqlens"
        );
        // Used page ids out of range (the unused -1 entries above are fine).
        for bad in [-1, 5, i32::MAX] {
            let mut tb = table;
            tb[1] = bad;
            assert_eq!(
                arg_of(l.validate_table(&PageTable {
                    block_table: &tb,
                    ..t
                })),
                "block_table"
            );
        }
        // Too many tokens in all.
        let big = [i32::MAX, 1];
        let bl = PagedKvLayout {
            page_size: 256,
            pages: 1 << 24,
            heads_kv: 1,
            head_dim: 1,
        };
        let bt: Vec<i32> = (0..2 * (1 << 23)).map(|i: i32| i % (1 << 24)).collect();
        assert_eq!(
            arg_of(bl.validate_table(&PageTable {
                block_table: &bt,
                max_pages_per_seq: 1 << 23,
                seqlens: &big
            })),
            "seqlens"
        );
        // Addressing out of range.
        assert_eq!(arg_of(l.token_offset(&t, 3, 0, 0)), "seq");
        assert_eq!(arg_of(l.token_offset(&t, 1, 0, 0)), "pos");
        assert_eq!(arg_of(l.token_offset(&t, 0, 5, 0)), "pos");
        assert_eq!(arg_of(l.token_offset(&t, 0, 4, 2)), "head");
        // Buffer lengths of the references.
        let n = l.cache_len().unwrap();
        assert_eq!(arg_of(gather_paged_f64(&l, &vec![0.0; n - 1], &t)), "cache");
        let mut cache = vec![0.0; n];
        assert_eq!(
            arg_of(scatter_paged_f64(&l, &[0.0; 3], &t, &mut cache)),
            "dense"
        );
        assert!(scatter_paged_f64(&l, &vec![0.0; 9 * 2 * 8], &t, &mut cache).is_ok());
    }
}

/// Split-KV decode end to end through the emulator: the attention forward kernel on four
/// key ranges (one empty) writes its (O, LSE) into one stack, the merge kernel combines it,
/// and the result matches attention over all keys (f64 reference) about as well as the
/// unsplit forward kernel does.
#[test]
fn emu_split_kv_forward_then_merge_equals_unsplit_attention() {
    use longctx::attention::AttentionOptions;
    use longctx::emulator::{Arch, HostQkv};
    let (tq, tk, hq, hkv, d) = (3usize, 300usize, 4usize, 2usize, 128usize);
    let mut r = common::Rng(29);
    let mut gen =
        |n: usize| -> Vec<bf16> { (0..n).map(|_| bf16::from_f64(1.5 * r.uniform())).collect() };
    let (q, k, v) = (gen(tq * hq * d), gen(tk * hkv * d), gen(tk * hkv * d));
    let wide = |x: &[bf16]| x.iter().map(|y| y.to_f64()).collect::<Vec<f64>>();
    let opts = AttentionOptions {
        mask: Mask::none(),
        ..AttentionOptions::default()
    };
    let (qf, kf, vf) = (wide(&q), wide(&k), wide(&v));
    let want = attention_f64(&Problem {
        q: &qf,
        k: &kf,
        v: &vf,
        cu_seqlens_q: &[0, tq],
        cu_seqlens_k: &[0, tk],
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        head_dim_v: d,
        scale: f64::from(opts.scale_for(d)),
        softcap: None,
        mask: Mask::none(),
    })
    .unwrap();
    let forward = |a: usize, b: usize, o: &mut [bf16], lse: &mut [f32]| {
        let kl = HeadsLayout::contiguous(b - a, hkv, d);
        emulator::attention_forward(
            Arch::Sm80,
            &HostQkv {
                q: &q,
                q_layout: HeadsLayout::contiguous(tq, hq, d),
                k: &k[a * hkv * d..b * hkv * d],
                k_layout: kl,
                v: &v[a * hkv * d..b * hkv * d],
                v_layout: kl,
            },
            o,
            HeadsLayout::contiguous(tq, hq, d),
            Some(lse),
            &[0, tq as i32],
            &[0, (b - a) as i32],
            &opts,
        )
        .unwrap();
    };
    let cuts = [0, 100, 100, 257, tk];
    let parts = cuts.len() - 1;
    let stack = StackedStates::contiguous(parts, tq, hq, d);
    let mut po = vec![bf16::ZERO; parts * tq * hq * d];
    let mut pl = vec![0f32; parts * hq * tq];
    for (p, w) in cuts.windows(2).enumerate() {
        forward(
            w[0],
            w[1],
            &mut po[p * stack.o_part_stride..][..stack.o_part_stride],
            &mut pl[p * stack.lse_part_stride..][..stack.lse_part_stride],
        );
    }
    assert!(pl[hq * tq..2 * hq * tq]
        .iter()
        .all(|&x| x == f32::NEG_INFINITY));
    let mut mo = vec![bf16::ZERO; tq * hq * d];
    let mut ml = vec![0f32; hq * tq];
    emulator::merge_states(
        &po,
        &pl,
        &stack,
        &mut mo,
        &HeadsLayout::contiguous(tq, hq, d),
        &mut ml,
        &LseLayout::contiguous(hq, tq),
        &MergeOptions::default(),
    )
    .unwrap();
    let mut fo = vec![bf16::ZERO; tq * hq * d];
    let mut fl = vec![0f32; hq * tq];
    forward(0, tk, &mut fo, &mut fl);
    let split = longctx::attention::reference::compare(&mo, &ml, &want);
    let full = longctx::attention::reference::compare(&fo, &fl, &want);
    eprintln!("split-KV merge: split {split:?}, unsplit {full:?}");
    assert!(
        split.max_o <= 2.0 * full.max_o + 2f64.powi(-9)
            && split.max_lse <= 2.0 * full.max_lse + 1e-5,
        "split {split:?} vs unsplit {full:?}"
    );
}

/// The raw-pointer merge gives the safe op's bits.
#[test]
#[ignore = "needs a GPU: run with --include-ignored (the GPU bundle does, with LONGCTX_REQUIRE_GPU=1)"]
fn gpu_merge_raw_matches_safe() {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    use longctx::kv_cache::merge_states_raw;
    use longctx::layout::RawBuffer;
    let Some(dev) = common::gpu("gpu_merge_raw_matches_safe") else {
        return;
    };
    let (p, t, h, d) = (5usize, 37usize, 4usize, 72usize);
    let mut r = common::Rng(91);
    let o_host: Vec<bf16> = (0..p * t * h * d)
        .map(|_| bf16::from_f64(r.uniform()))
        .collect();
    let lse_host: Vec<f32> = (0..p * h * t)
        .map(|i| {
            if i % 7 == 0 {
                f32::NEG_INFINITY
            } else {
                (3.0 * r.uniform()) as f32
            }
        })
        .collect();
    let layout = StackedStates::contiguous(p, t, h, d);
    let ol = HeadsLayout::contiguous(t, h, d);
    let ll = LseLayout::contiguous(h, t);
    let po = dev.upload(&o_host).unwrap();
    let pl = dev.upload(&lse_host).unwrap();
    let mut want_o = dev.zeros::<bf16>(t * h * d).unwrap();
    let mut want_lse = dev.zeros::<f32>(t * h).unwrap();
    merge_states(
        &dev,
        &States {
            o: &po,
            lse: &pl,
            layout,
        },
        MergeState {
            o: &mut want_o,
            o_layout: ol,
            lse: &mut want_lse,
            lse_layout: ll,
        },
        &MergeOptions::default(),
    )
    .unwrap();
    let mut o = dev.zeros::<bf16>(t * h * d).unwrap();
    let mut lse = dev.zeros::<f32>(t * h).unwrap();
    let st = dev.stream().clone();
    {
        let (pop, _g0) = po.device_ptr(&st);
        let (plp, _g1) = pl.device_ptr(&st);
        let (op, _g2) = o.device_ptr_mut(&st);
        let (lp, _g3) = lse.device_ptr_mut(&st);
        // SAFETY: live allocations of this context of the stated lengths, outputs distinct;
        // synchronised before the guards drop.
        unsafe {
            merge_states_raw::<bf16>(
                &dev,
                RawBuffer {
                    ptr: pop,
                    len: o_host.len(),
                },
                RawBuffer {
                    ptr: plp,
                    len: lse_host.len(),
                },
                &layout,
                RawBuffer {
                    ptr: op,
                    len: t * h * d,
                },
                &ol,
                RawBuffer {
                    ptr: lp,
                    len: t * h,
                },
                &ll,
                &MergeOptions::default(),
            )
            .unwrap();
        }
        dev.synchronize().unwrap();
    }
    let bits = |v: Vec<bf16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(dev.download(&o).unwrap()),
        bits(dev.download(&want_o).unwrap())
    );
    let fbits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        fbits(dev.download(&lse).unwrap()),
        fbits(dev.download(&want_lse).unwrap())
    );
}
