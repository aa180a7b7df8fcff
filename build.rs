//! Compiles each kernel family in `kernels/` to one fatbin (a cubin per enabled arch plus
//! compute_80 PTX as the forward-compatible fallback) and embeds it in the crate.
//!
//! nvcc is looked for in `NVCC`, `CUDA_HOME`/`CUDA_PATH`, `PATH`, `/usr/local/cuda`, and the
//! folder `scripts/install-cuda-toolchain.sh` installs into. Without nvcc the crate still
//! builds (CPU reference and plans work; GPU calls return `Error::KernelsNotCompiled`) unless
//! `LONGCTX_REQUIRE_KERNELS=1`. A kernel that fails to compile always fails the build, with
//! nvcc's own messages. ptxas's resource report is kept beside each fatbin and embedded, so
//! the test suite can check that hot kernels do not spill.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One fatbin per family: (family name, entry .cu file relative to kernels/).
const FAMILIES: &[(&str, &str)] = &[
    ("rope", "rope/rope.cu"),
    ("attention", "attention/attention.cu"),
    ("attention_bwd", "attention/attention_bwd.cu"),
    ("moe", "moe/moe.cu"),
    ("kv_cache", "kv_cache/kv_cache.cu"),
];

/// Default cubin targets; `LONGCTX_CUDA_ARCHS` overrides (comma or semicolon separated, e.g.
/// `90a` or `80,90a`). PTX for compute_80 is always added so newer GPUs can JIT.
const DEFAULT_ARCHS: &str = "80,86,89,90a";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = manifest.join("kernels");

    println!("cargo:rustc-check-cfg=cfg(longctx_kernels)");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "LONGCTX_CUDA_ARCHS",
        "LONGCTX_REQUIRE_KERNELS",
        "LONGCTX_CUDA_CACHE",
        "LONGCTX_NVCC_FLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    watch_dir(&kernels);
    #[cfg(feature = "emulator")]
    build_emulator(&kernels);

    let require = env::var("LONGCTX_REQUIRE_KERNELS")
        .map(|v| v == "1")
        .unwrap_or(false)
        || env::var_os("CARGO_FEATURE_REQUIRE_KERNELS").is_some();
    let want_cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();

    // Rebuild when nvcc appears later: PATH changes, or a file lands in a folder nvcc is
    // looked for in (only folders that exist are watched; a missing one would rerun the
    // script on every build).
    println!("cargo:rerun-if-env-changed=PATH");
    for dir in nvcc_candidates().iter().filter_map(|c| c.parent()) {
        if dir.is_dir() {
            println!("cargo:rerun-if-changed={}", dir.display());
        }
    }
    let nvcc = if want_cuda { find_nvcc() } else { None };
    let Some(nvcc) = nvcc else {
        if require {
            panic!(
                "kernels are required (LONGCTX_REQUIRE_KERNELS=1 or the `require-kernels` feature) but no nvcc was found (looked in NVCC, CUDA_HOME, CUDA_PATH, \
                 PATH, /usr/local/cuda and the scripts/install-cuda-toolchain.sh cache; the `cuda` \
                 feature is {})",
                if want_cuda { "on" } else { "off" }
            );
        }
        if want_cuda {
            println!(
                "cargo:warning=longctx: nvcc not found; building without CUDA kernels (GPU calls will \
                 return Error::KernelsNotCompiled). Run scripts/install-cuda-toolchain.sh and set CUDA_HOME."
            );
        }
        write_embed(&out_dir, &[]);
        return;
    };

    let archs = env::var("LONGCTX_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let mut gencode = Vec::new();
    for arch in archs
        .split([',', ';', ' '])
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let arch = arch.trim_start_matches("sm_");
        gencode.push(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    gencode.push("-gencode=arch=compute_80,code=compute_80".to_string());
    let extra: Vec<String> = env::var("LONGCTX_NVCC_FLAGS")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();

    // Compile families concurrently, but never more at once than cargo's job count.
    let jobs: usize = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut built = Vec::new();
    for chunk in FAMILIES.chunks(jobs) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&(family, src)| {
                let nvcc = nvcc.clone();
                let kernels = kernels.clone();
                let out_dir = out_dir.clone();
                let gencode = gencode.clone();
                let extra = extra.clone();
                std::thread::spawn(move || {
                    compile(&nvcc, &kernels, &out_dir, family, src, &gencode, &extra)
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(Ok(family)) => built.push(family),
                Ok(Err(msg)) => {
                    eprintln!("{msg}");
                    panic!("longctx: CUDA kernel compilation failed (nvcc's output is above)");
                }
                Err(_) => panic!("longctx: kernel compile thread panicked"),
            }
        }
    }
    println!("cargo:rustc-cfg=longctx_kernels");
    write_embed(&out_dir, &built);
}

fn watch_dir(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                watch_dir(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn find_nvcc() -> Option<PathBuf> {
    nvcc_candidates().into_iter().find(|p| p.is_file())
}

/// Where nvcc is looked for, in order.
fn nvcc_candidates() -> Vec<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin").join(exe));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            candidates.push(dir.join(exe));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin").join(exe));
    let cache = env::var_os("LONGCTX_CUDA_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/longctx/cuda-13.0")));
    if let Some(c) = cache {
        candidates.push(c.join("cuda/bin").join(exe));
    }
    candidates
}

fn compile(
    nvcc: &Path,
    kernels: &Path,
    out_dir: &Path,
    family: &str,
    src: &str,
    gencode: &[String],
    extra: &[String],
) -> Result<String, String> {
    let fatbin = out_dir.join(format!("{family}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-lineinfo")
        .arg("-Xptxas=-v,-warn-spills,-warn-lmem-usage")
        .arg("-I")
        .arg(kernels)
        .args(gencode)
        .args(extra)
        .arg("-o")
        .arg(&fatbin)
        .arg(kernels.join(src));
    let out = cmd
        .output()
        .map_err(|e| format!("longctx: could not run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "longctx: nvcc failed on kernels/{src}:\n{stdout}{stderr}"
        ));
    }
    fs::write(
        out_dir.join(format!("{family}.ptxas.txt")),
        format!("{stdout}{stderr}"),
    )
    .map_err(|e| format!("longctx: writing ptxas report: {e}"))?;
    Ok(family.to_string())
}

/// Writes `kernels.rs`, included by `src/device.rs`: one fatbin and one ptxas report per
/// family that was compiled.
fn write_embed(out_dir: &Path, built: &[String]) {
    let mut s = String::from("// Generated by build.rs.\n");
    for (family, _) in FAMILIES {
        let upper = family.to_uppercase();
        if built.iter().any(|b| b == family) {
            s.push_str(&format!(
                "pub(crate) static {upper}_FATBIN: Option<&[u8]> = Some(include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{family}.fatbin\")));\n\
                 pub(crate) static {upper}_PTXAS: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{family}.ptxas.txt\"));\n"
            ));
        } else {
            s.push_str(&format!(
                "pub(crate) static {upper}_FATBIN: Option<&[u8]> = None;\npub(crate) static {upper}_PTXAS: &str = \"\";\n"
            ));
        }
    }
    fs::write(out_dir.join("kernels.rs"), s).expect("longctx: cannot write OUT_DIR/kernels.rs");
}

/// Compiles the kernel sources for the CPU emulator: every family's .cu file as host C++
/// (the CUDA builtins from kernels/emu/cuda_emu.h, memory accesses instrumented with
/// -fsanitize=thread so the runtime's hooks see them), the attention family a second time
/// with the sm_90a tile shapes, and the runtime itself uninstrumented.
#[cfg(feature = "emulator")]
fn build_emulator(kernels: &Path) {
    let units: &[(&str, &[(&str, &str)])] = &[
        ("rope/rope.cu", &[]),
        ("moe/moe.cu", &[]),
        ("attention/attention.cu", &[]),
        ("attention/attention_bwd.cu", &[]),
        ("kv_cache/kv_cache.cu", &[]),
        ("emu/selftest.cu", &[]),
        // A namespace of its own, or the two copies' inline functions would be merged.
        (
            "attention/attention.cu",
            &[("LONGCTX_EMU_SM90", "1"), ("longctx", "longctx_sm90")],
        ),
    ];
    let mut k = cc::Build::new();
    k.cpp(true)
        .std("gnu++17")
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .include(kernels.join("emu"))
        .include(kernels)
        .define("LONGCTX_EMU", None)
        .flag("-fsanitize=thread")
        .flag("-fno-exceptions")
        .flag("-fno-rtti")
        .flag("-fno-strict-aliasing")
        .flag("-ffp-contract=off")
        // Messages name kernel files relative to the crate, wherever it was built.
        .flag(format!("-fmacro-prefix-map={}=kernels", kernels.display()))
        .flag("-include")
        .flag(
            kernels
                .join("emu/cuda_emu.h")
                .to_str()
                .expect("kernel path is UTF-8"),
        );
    // One object per unit: each compiled through a wrapper that includes it (cc names objects
    // after their source, and the attention unit is compiled twice).
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("emu");
    fs::create_dir_all(&out).expect("longctx: cannot create OUT_DIR/emu");
    for (i, (src, defs)) in units.iter().enumerate() {
        let mut text = String::new();
        for (name, value) in defs.iter() {
            text.push_str(&format!("#define {name} {value}\n"));
        }
        text.push_str(&format!("#include \"{}\"\n", kernels.join(src).display()));
        let wrapper = out.join(format!("unit{i}.cpp"));
        fs::write(&wrapper, text).expect("longctx: cannot write an emulator unit");
        k.file(wrapper);
    }
    k.compile("longctx_emu_kernels");
    cc::Build::new()
        .cpp(true)
        .std("gnu++17")
        .opt_level(2)
        .debug(false)
        .include(kernels)
        .flag("-fno-exceptions")
        .flag("-fno-rtti")
        .file(kernels.join("emu/runtime.cpp"))
        .compile("longctx_emu_runtime");
}
