//! The CPU emulator's own tests: its `mma.sync` and `ldmatrix` against naive products and
//! layouts written from the PTX ISA manual, and one deliberately broken program per checker
//! that it must stop with a message naming the fault.

mod common;

use half::{bf16, f16};
use longctx::emulator::selftest::{self, ClusterProgram, MmaInput, Program};
use longctx::Error;

fn bits_to_f64(kind: MmaInput, b: u16) -> f64 {
    match kind {
        MmaInput::F16 => f16::from_bits(b).to_f64(),
        MmaInput::Bf16 => bf16::from_bits(b).to_f64(),
    }
}

fn random_bits(kind: MmaInput, rng: &mut common::Rng, scale: f64) -> u16 {
    let x = rng.uniform() * scale;
    match kind {
        MmaInput::F16 => f16::from_f64(x).to_bits(),
        MmaInput::Bf16 => bf16::from_f64(x).to_bits(),
    }
}

#[test]
fn mma_m16n8k16_matches_a_naive_product() {
    for kind in [MmaInput::F16, MmaInput::Bf16] {
        for seed in 0..20u64 {
            let mut rng = common::Rng(seed * 7 + 1);
            let scale = [1.0, 100.0, 1e-3][seed as usize % 3];
            let mut a = [0u16; 256];
            let mut b = [0u16; 128];
            a.iter_mut()
                .for_each(|x| *x = random_bits(kind, &mut rng, scale));
            b.iter_mut()
                .for_each(|x| *x = random_bits(kind, &mut rng, scale));
            let mut c = [0f32; 128];
            c.iter_mut()
                .for_each(|x| *x = (rng.uniform() * scale * scale) as f32);
            let c0 = c;
            selftest::mma(kind, &a, &b, &mut c).expect("mma runs");
            for i in 0..16 {
                for j in 0..8 {
                    let mut want = f64::from(c0[i * 8 + j]);
                    let mut mag = want.abs();
                    for k in 0..16 {
                        let p = bits_to_f64(kind, a[i * 16 + k]) * bits_to_f64(kind, b[k * 8 + j]);
                        want += p;
                        mag += p.abs();
                    }
                    // Exact products, 16 f32 additions: at most 16 roundings of 2^-24 of
                    // the running magnitude.
                    let tol = 16.0 * mag * f64::from(f32::EPSILON) / 2.0;
                    let got = f64::from(c[i * 8 + j]);
                    assert!(
                        (got - want).abs() <= tol,
                        "{kind:?} seed {seed}: D[{i}][{j}] = {got}, naive {want} (tol {tol:.3e})"
                    );
                }
            }
        }
    }
}

/// A layout mistake shows: swapping two rows of A moves exactly those rows of D.
#[test]
fn mma_rows_follow_a() {
    let mut rng = common::Rng(99);
    let kind = MmaInput::F16;
    let mut a = [0u16; 256];
    let mut b = [0u16; 128];
    a.iter_mut()
        .for_each(|x| *x = random_bits(kind, &mut rng, 1.0));
    b.iter_mut()
        .for_each(|x| *x = random_bits(kind, &mut rng, 1.0));
    let mut d1 = [0f32; 128];
    selftest::mma(kind, &a, &b, &mut d1).unwrap();
    let mut a2 = a;
    for k in 0..16 {
        a2.swap(3 * 16 + k, 12 * 16 + k);
    }
    let mut d2 = [0f32; 128];
    selftest::mma(kind, &a2, &b, &mut d2).unwrap();
    for j in 0..8 {
        assert_eq!(d1[3 * 8 + j].to_bits(), d2[12 * 8 + j].to_bits());
        assert_eq!(d1[12 * 8 + j].to_bits(), d2[3 * 8 + j].to_bits());
        assert_eq!(d1[5 * 8 + j].to_bits(), d2[5 * 8 + j].to_bits());
    }
}

#[test]
fn ldmatrix_forms_follow_the_ptx_layout() {
    // Element (i, r, c) of matrix i, row r, column c is the 16-bit value 1000 i + 10 r + c.
    let elem = |i: usize, r: usize, c: usize| (1000 * i + 10 * r + c) as u32;
    let mut smem = [0u32; 128];
    for i in 0..4 {
        for r in 0..8 {
            for w in 0..4 {
                smem[(8 * i + r) * 4 + w] = elem(i, r, 2 * w) | (elem(i, r, 2 * w + 1) << 16);
            }
        }
    }
    for count in [1u32, 2, 4] {
        for trans in [false, true] {
            let regs = selftest::ldmatrix(count, trans, &smem).unwrap();
            for lane in 0..32 {
                for j in 0..4 {
                    let got = regs[lane * 4 + j];
                    let want = if j >= count as usize {
                        0
                    } else if !trans {
                        // Row lane / 4, columns 2 (lane % 4) and + 1 of matrix j.
                        elem(j, lane / 4, 2 * (lane % 4))
                            | (elem(j, lane / 4, 2 * (lane % 4) + 1) << 16)
                    } else {
                        // Column lane / 4, rows 2 (lane % 4) and + 1 of matrix j.
                        elem(j, 2 * (lane % 4), lane / 4)
                            | (elem(j, 2 * (lane % 4) + 1, lane / 4) << 16)
                    };
                    assert_eq!(
                        got, want,
                        "x{count} trans {trans}: lane {lane} register {j}"
                    );
                }
            }
        }
    }
}

#[test]
fn ldmatrix_rejects_other_counts() {
    assert!(matches!(
        selftest::ldmatrix(3, false, &[0; 128]),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn the_correct_program_passes_with_the_expected_output() {
    let input: Vec<u32> = (0..256u32).map(|i| i * 3 + 1).collect();
    let mut out = vec![0u32; 256];
    selftest::program(Program::Correct, &input, &mut out).expect("no fault in the correct program");
    // v_t = s[(4t + 128) % 256] = input[(4t + 128) % 256]; then v_t + v_(t^1); ballot of
    // odd v over each warp; out[t] = v of lane t + 1 of the same warp, plus the ballot.
    let v0: Vec<u32> = (0..64).map(|t| input[(4 * t + 128) % 256]).collect();
    let v: Vec<u32> = (0..64).map(|t| v0[t] + v0[t ^ 1]).collect();
    for (t, got) in out.iter().enumerate().take(64) {
        let warp = t / 32;
        let ballot = (0..32).fold(0u32, |m, l| m | ((v[warp * 32 + l] & 1) << l));
        let src = warp * 32 + (t % 32 + 1) % 32;
        assert_eq!(*got, v[src] + ballot, "out[{t}]");
    }
    for x in &out[64..] {
        assert_eq!(*x, 0);
    }
}

#[test]
fn every_deliberate_bug_is_reported() {
    let expect: &[(Program, &[&str])] = &[
        (Program::MissingBarrier, &["race"]),
        (Program::MissingSyncwarp, &["race"]),
        (
            Program::OffByOneBound,
            &["outside every buffer", "past the end"],
        ),
        (
            Program::WrongSwizzle,
            &["race", "outside every shared allocation"],
        ),
        (Program::PrematureCpAsyncRead, &["cp.async"]),
        (
            Program::OutOfBoundsStore,
            &["outside every buffer", "past the end"],
        ),
        (Program::DivergentShuffle, &["exit", "disagree"]),
        (Program::SkippedBarrier, &["exit"]),
        (Program::WritesInput, &["read-only"]),
        (Program::ShuffleOutsideMask, &["not in the mask"]),
        (Program::Trap, &["__trap"]),
        (Program::UninitializedShared, &["never written"]),
        (Program::DifferentBarriers, &["different barriers"]),
        (
            Program::SharedOutOfBounds,
            &["outside every shared allocation"],
        ),
    ];
    assert_eq!(expect.len() + 1, Program::ALL.len());
    let input: Vec<u32> = (0..256u32).collect();
    for (prog, words) in expect {
        let mut out = vec![0u32; 256];
        match selftest::program(*prog, &input, &mut out) {
            Err(Error::Emulator { message, .. }) => {
                assert!(
                    words.iter().any(|w| message.contains(w)),
                    "{prog:?}: the message does not name the fault: {message}"
                );
                assert!(
                    message.contains("longctx_emu_selftest_bugs") && message.contains("thread ("),
                    "{prog:?}: the message does not name kernel and thread: {message}"
                );
            }
            other => panic!("{prog:?}: the emulator did not stop it: {other:?}"),
        }
    }
}

/// Runs are deterministic: the same launch gives the same bits and the same message.
#[test]
fn runs_are_deterministic() {
    let input: Vec<u32> = (0..256u32).map(|i| i.wrapping_mul(2654435761)).collect();
    let mut a = vec![0u32; 256];
    let mut b = vec![0u32; 256];
    selftest::program(Program::Correct, &input, &mut a).unwrap();
    selftest::program(Program::Correct, &input, &mut b).unwrap();
    assert_eq!(a, b);
    let e1 = selftest::program(Program::MissingBarrier, &input, &mut a).unwrap_err();
    let e2 = selftest::program(Program::MissingBarrier, &input, &mut b).unwrap_err();
    assert_eq!(e1, e2);
}

/// Thread-block clusters: two CTAs exchange words through distributed shared memory, pushed
/// and pulled, behind cluster barriers.
#[test]
fn the_correct_cluster_program_passes_with_the_expected_output() {
    let input: Vec<u32> = (0..256u32).map(|i| i * 7 + 3).collect();
    let mut out = vec![0u32; 256];
    selftest::cluster_program(ClusterProgram::Correct, &input, &mut out)
        .expect("no fault in the correct cluster program");
    for r in 0..2 {
        for t in 0..64 {
            let want = input[64 * (r ^ 1) + t];
            assert_eq!(out[64 * r + t], want, "pushed word, rank {r} thread {t}");
            assert_eq!(
                out[128 + 64 * r + t],
                want,
                "pulled word, rank {r} thread {t}"
            );
        }
    }
}

#[test]
fn every_deliberate_cluster_bug_is_reported() {
    let expect: &[(ClusterProgram, &[&str])] = &[
        (
            ClusterProgram::MissingClusterBarrier,
            &["race", "cluster barrier"],
        ),
        (ClusterProgram::OverwriteWhileRead, &["race"]),
        (
            ClusterProgram::RankOutsideCluster,
            &["rank 2 of a cluster of 2"],
        ),
        (ClusterProgram::ExitWhileRead, &["has exited"]),
        (ClusterProgram::SkippedClusterBarrier, &["cluster barrier"]),
        (ClusterProgram::WriteAfterArrive, &["race"]),
        (ClusterProgram::ArriveTwice, &["again before waiting"]),
    ];
    assert_eq!(expect.len() + 1, ClusterProgram::ALL.len());
    let input: Vec<u32> = (0..256u32).collect();
    for (prog, words) in expect {
        let mut out = vec![0u32; 256];
        match selftest::cluster_program(*prog, &input, &mut out) {
            Err(Error::Emulator { message, .. }) => {
                assert!(
                    words.iter().all(|w| message.contains(w)),
                    "{prog:?}: the message does not name the fault: {message}"
                );
                assert!(
                    message.contains("longctx_emu_selftest_cluster")
                        && message.contains("thread ("),
                    "{prog:?}: the message does not name kernel and thread: {message}"
                );
            }
            other => panic!("{prog:?}: the emulator did not stop it: {other:?}"),
        }
    }
}
