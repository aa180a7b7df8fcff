//! Build checks on the embedded kernels: every kernel the crate can launch was compiled for
//! every arch, no hot kernel spills registers (ptxas's report, kept by build.rs), and the
//! attention kernels' SASS has the tensor-core, ldmatrix and cp.async instructions the
//! design counts on (cuobjdump, installed by scripts/install-cuda-toolchain.sh).
//! Without nvcc at build time this says it was skipped; LONGCTX_REQUIRE_KERNELS=1 (CI)
//! makes that a failure, and LONGCTX_REQUIRE_SASS=1 a missing cuobjdump.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use longctx::attention::{BackwardTiles, TileConfig};
use longctx::device::{embedded_fatbins, hot_kernel_symbols, kernel_resources, kernels_compiled};

#[test]
fn hot_kernels_do_not_spill() {
    if !kernels_compiled() {
        assert!(
            std::env::var("LONGCTX_REQUIRE_KERNELS").as_deref() != Ok("1"),
            "LONGCTX_REQUIRE_KERNELS=1 but the crate was built without kernels"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED hot_kernels_do_not_spill: the crate was built without CUDA kernels (no nvcc)"
        );
        return;
    }
    let res = kernel_resources();
    assert!(!res.is_empty(), "ptxas report is empty");
    let archs: std::collections::BTreeSet<&str> = res.iter().map(|r| r.arch.as_str()).collect();
    for sym in hot_kernel_symbols() {
        for arch in &archs {
            let r = res
                .iter()
                .find(|r| r.symbol == sym && r.arch == *arch)
                .unwrap_or_else(|| panic!("{sym} was not compiled for {arch}"));
            assert!(
                r.properties_found,
                "{sym} on {arch}: ptxas's report has no resource block (stack and spill \
                 figures) for it, so its spills are unknown"
            );
            assert_eq!(
                (r.spill_stores, r.spill_loads),
                (0, 0),
                "{sym} on {arch} spills: {} bytes stored, {} loaded ({} registers)",
                r.spill_stores,
                r.spill_loads,
                r.registers
            );
        }
    }
    for r in &res {
        eprintln!(
            "{:<32} {:<7} {:>3} regs  stack {:>3}  spills {}/{}",
            r.symbol, r.arch, r.registers, r.stack_frame, r.spill_stores, r.spill_loads
        );
    }
}

/// cuobjdump from CUOBJDUMP, CUDA_HOME/bin, PATH or the install script's cache.
fn find_cuobjdump() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("CUOBJDUMP") {
        c.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            c.push(PathBuf::from(p).join("bin/cuobjdump"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join("cuobjdump")));
    }
    if let Some(h) = std::env::var_os("HOME") {
        c.push(PathBuf::from(h).join(".cache/longctx/cuda-13.0/cuda/bin/cuobjdump"));
    }
    c.into_iter().find(|p| p.is_file())
}

/// Opcode counts per (arch, function) of `cuobjdump -sass` output.
fn sass_opcodes(text: &str) -> BTreeMap<(String, String), BTreeMap<String, usize>> {
    let mut out: BTreeMap<(String, String), BTreeMap<String, usize>> = BTreeMap::new();
    let mut arch = String::new();
    let mut func = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("code for ") {
            arch = rest.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("Function : ") {
            func = rest.trim().to_string();
        } else if let Some(rest) = t.strip_prefix("/*") {
            // "/*0120*/   @!P0 HMMA.16816.F32.BF16 R4, ... ;"
            let Some((_, insn)) = rest.split_once("*/") else {
                continue;
            };
            let mut words = insn.split_whitespace();
            let Some(mut op) = words.next() else {
                continue;
            };
            if op.starts_with('@') {
                match words.next() {
                    Some(o) => op = o,
                    None => continue,
                }
            }
            let base = op.split('.').next().unwrap_or(op).trim_end_matches(';');
            if base.is_empty()
                || !base
                    .chars()
                    .all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit())
            {
                continue;
            }
            *out.entry((arch.clone(), func.clone()))
                .or_default()
                .entry(base.to_string())
                .or_default() += 1;
        }
    }
    out
}

/// Entries built from the attention forward's body: the forward and extend over the paged
/// cache (same tiles, same main loop).
fn is_forward_body(symbol: &str) -> bool {
    symbol.starts_with("longctx_attn_fwd_")
        || (symbol.starts_with("longctx_kv_extend_") && !is_wide_extend(symbol))
}

/// Extend at head dim 512: a row-packed kernel of the KV cache family, not the forward's body.
fn is_wide_extend(symbol: &str) -> bool {
    symbol.starts_with("longctx_kv_extend_") && symbol.ends_with("_hd512")
}

/// (head_dim, head_dim_v) from an attention entry name: ..._hd128 or ..._hd192_dv128.
fn head_dims(symbol: &str) -> Option<(usize, usize)> {
    let rest = &symbol[symbol.find("_hd")? + 3..];
    match rest.split_once("_dv") {
        Some((d, dv)) => Some((d.parse().ok()?, dv.parse().ok()?)),
        None => {
            let d = rest.parse().ok()?;
            Some((d, d))
        }
    }
}

/// SASS opcode counts per (arch, function) of one embedded family, or `None` (after saying
/// why) when kernels were not built or cuobjdump is missing and not required.
fn family_sass(
    test: &str,
    family: &str,
) -> Option<BTreeMap<(String, String), BTreeMap<String, usize>>> {
    if !kernels_compiled() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: built without CUDA kernels"
        );
        return None;
    }
    let Some(cuobjdump) = find_cuobjdump() else {
        assert!(
            std::env::var("LONGCTX_REQUIRE_SASS").as_deref() != Ok("1"),
            "LONGCTX_REQUIRE_SASS=1 but cuobjdump was not found (set CUOBJDUMP or CUDA_HOME)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: cuobjdump not found (scripts/install-cuda-toolchain.sh installs it)"
        );
        return None;
    };
    let bytes = embedded_fatbins()
        .into_iter()
        .find(|(f, _)| *f == family)
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("{family} fatbin"));
    let dir = std::env::temp_dir().join(format!("longctx-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{family}.fatbin"));
    std::fs::write(&file, bytes).expect("write fatbin");
    // cuobjdump runs nvdisasm, which the install script puts beside it.
    let bin_dir = cuobjdump.parent().unwrap_or(Path::new("."));
    let path = std::env::join_paths(
        std::iter::once(bin_dir.to_path_buf()).chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
    )
    .expect("PATH");
    let out = std::process::Command::new(&cuobjdump)
        .arg("-sass")
        .arg(&file)
        .env("PATH", path)
        .output()
        .expect("run cuobjdump");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cuobjdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(sass_opcodes(&text))
}

#[test]
fn attention_sass_uses_tensor_cores_and_no_local_memory() {
    let Some(counts) = family_sass(
        "attention_sass_uses_tensor_cores_and_no_local_memory",
        "attention",
    ) else {
        return;
    };
    let attn: Vec<_> = counts
        .iter()
        .filter(|((_, f), _)| is_forward_body(f))
        .collect();
    assert!(
        !attn.is_empty(),
        "no attention kernels in cuobjdump's output"
    );
    // Every attention entry must be in the SASS of every arch that has any: a kernel
    // missing from the disassembly is a failure, not a pass.
    let archs: std::collections::BTreeSet<&String> = attn.iter().map(|((a, _), _)| a).collect();
    for arch in &archs {
        for sym in longctx::device::hot_kernel_symbols()
            .into_iter()
            .filter(|s| is_forward_body(s))
        {
            assert!(
                attn.iter().any(|((a, f), _)| a == *arch && f == sym),
                "{sym} has no SASS for {arch} in cuobjdump's output"
            );
        }
    }
    for ((arch, func), ops) in attn {
        let n = |op: &str| ops.get(op).copied().unwrap_or(0);
        let (d, dv) = head_dims(func).unwrap_or_else(|| panic!("head dims of {func}"));
        let arch_num: u32 = arch
            .trim_start_matches("sm_")
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .unwrap_or_else(|_| panic!("arch {arch}"));
        let t = TileConfig::for_code(d, dv, arch_num).expect("tile config");
        let m_tiles = t.rows_per_warp() / 16;
        // One key tile: S = Q K^T is (d / 16) k-steps x (block_n / 8) n8 tiles, P V is
        // (block_n / 16) k-steps x (dv / 8) n8 tiles, each per m16 tile of the warp.
        let per_tile = m_tiles * ((d / 16) * (t.block_n / 8) + (t.block_n / 16) * (dv / 8));
        eprintln!(
            "{func:<36} {arch:<7} HMMA {:>4} (>= {per_tile})  LDSM {:>4}  LDGSTS {:>3}  LDL {} STL {}",
            n("HMMA"),
            n("LDSM"),
            n("LDGSTS"),
            n("LDL"),
            n("STL")
        );
        assert!(
            n("HMMA") >= per_tile,
            "{func} {arch}: {} HMMA, a key tile needs {per_tile}",
            n("HMMA")
        );
        assert!(
            n("LDSM") > 0 && n("LDGSTS") > 0,
            "{func} {arch}: no ldmatrix or cp.async: {ops:?}"
        );
        assert_eq!(
            (n("LDL"), n("STL")),
            (0, 0),
            "{func} {arch} uses local memory"
        );
    }
}

/// The backward family: every main and deterministic-dQ kernel of every arch uses tensor
/// cores (at least one query step's worth of HMMA), ldmatrix and cp.async, and no local
/// memory; the row-wise passes use no local memory.
#[test]
fn attention_backward_sass_uses_tensor_cores_and_no_local_memory() {
    let Some(counts) = family_sass(
        "attention_backward_sass_uses_tensor_cores_and_no_local_memory",
        "attention_bwd",
    ) else {
        return;
    };
    let syms: Vec<&str> = longctx::device::hot_kernel_symbols()
        .into_iter()
        .filter(|s| s.starts_with("longctx_attn_bwd_"))
        .collect();
    let archs: std::collections::BTreeSet<&String> = counts.keys().map(|(a, _)| a).collect();
    assert!(
        !archs.is_empty(),
        "no backward kernels in cuobjdump's output"
    );
    for arch in &archs {
        for sym in &syms {
            let ops = counts
                .get(&((*arch).clone(), sym.to_string()))
                .unwrap_or_else(|| panic!("{sym} has no SASS for {arch}"));
            let n = |op: &str| ops.get(op).copied().unwrap_or(0);
            eprintln!(
                "{sym:<44} {arch:<7} HMMA {:>4}  LDSM {:>4}  LDGSTS {:>3}  LDL {} STL {}",
                n("HMMA"),
                n("LDSM"),
                n("LDGSTS"),
                n("LDL"),
                n("STL")
            );
            assert_eq!(
                (n("LDL"), n("STL")),
                (0, 0),
                "{sym} {arch} uses local memory"
            );
            let Some((d, dv)) = head_dims(sym) else {
                continue; // a row-wise pass
            };
            let t = BackwardTiles::for_head_dims(d, dv).expect("tiles");
            // S^T and dP^T of one query step (main), or S and dP of one key tile (dQ).
            let per_step = if sym.contains("_dq_det_") {
                let n_keys = if d >= 256 { 32 } else { 64 };
                (d / 16 + dv / 16) * (n_keys / 8) + (n_keys / 16) * (d / 8)
            } else {
                (d / 16 + dv / 16) * (t.block_m / 8)
            };
            assert!(
                n("HMMA") >= per_step,
                "{sym} {arch}: {} HMMA, one step needs {per_step}",
                n("HMMA")
            );
            assert!(n("LDSM") > 0 && n("LDGSTS") > 0, "{sym} {arch}: {ops:?}");
        }
    }
}

/// The KV-cache family: the decode kernels for head dims 64 and 128 use tensor cores (one
/// 16-key step of S = Q K^T and of P V per warp: d / 16 x 2 + d / 16 x 2 HMMA), ldmatrix
/// and cp.async; every decode kernel copies with cp.async; MLA's absorbed decode uses
/// tensor cores, ldmatrix and cp.async; nothing uses local memory (RoPE angles go through
/// sincospi, which has no slow path with a stack frame).
#[test]
fn kv_cache_sass_uses_tensor_cores_and_no_local_memory() {
    let Some(counts) = family_sass(
        "kv_cache_sass_uses_tensor_cores_and_no_local_memory",
        "kv_cache",
    ) else {
        return;
    };
    let syms: Vec<&str> = longctx::device::hot_kernel_symbols()
        .into_iter()
        // Extend's entries are the attention forward's body, in the attention family, except
        // head dim 512's.
        .filter(|s| {
            (s.starts_with("longctx_kv_") && !s.starts_with("longctx_kv_extend_"))
                || is_wide_extend(s)
                || s.starts_with("longctx_mla_")
        })
        .collect();
    let archs: std::collections::BTreeSet<&String> = counts.keys().map(|(a, _)| a).collect();
    assert!(
        !archs.is_empty(),
        "no KV-cache kernels in cuobjdump's output"
    );
    for arch in &archs {
        for sym in &syms {
            let ops = counts
                .get(&((*arch).clone(), sym.to_string()))
                .unwrap_or_else(|| panic!("{sym} has no SASS for {arch}"));
            let n = |op: &str| ops.get(op).copied().unwrap_or(0);
            eprintln!(
                "{sym:<36} {arch:<7} HMMA {:>4}  LDSM {:>4}  LDGSTS {:>3}  LDL {} STL {}",
                n("HMMA"),
                n("LDSM"),
                n("LDGSTS"),
                n("LDL"),
                n("STL")
            );
            assert_eq!(
                (n("LDL"), n("STL")),
                (0, 0),
                "{sym} {arch} uses local memory"
            );
            let clustered = sym.starts_with("longctx_mla_decode_c2_")
                || sym.starts_with("longctx_mla_decode_c4_");
            if clustered && !arch.starts_with("sm_90") {
                // The clustered kernel is sm_90a code; the portable copy is a trap.
                assert_eq!(n("HMMA"), 0, "{sym} {arch}: the portable copy should trap");
                continue;
            }
            if sym.starts_with("longctx_mla_decode_") || is_wide_extend(sym) {
                // Tensor-core kernels with cp.async tiles: S's k32 steps and P V's k16 steps
                // are unrolled, so far more than 16 HMMA appear.
                assert!(
                    n("HMMA") >= 16 && n("LDSM") > 0 && n("LDGSTS") > 0,
                    "{sym} {arch}: {ops:?}"
                );
                continue;
            }
            if !sym.starts_with("longctx_kv_decode_") {
                continue;
            }
            assert!(n("LDGSTS") > 0, "{sym} {arch}: {ops:?}");
            let d = if sym.ends_with("_hd64") {
                64
            } else if sym.ends_with("_hd128") {
                128
            } else {
                continue; // the CUDA-core kernels (256, 512)
            };
            let per_step = 4 * (d / 16);
            assert!(
                n("HMMA") >= per_step && n("LDSM") > 0,
                "{sym} {arch}: {} HMMA, a 16-key step needs {per_step}; {ops:?}",
                n("HMMA")
            );
        }
    }
}
