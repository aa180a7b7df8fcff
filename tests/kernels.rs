//! Build checks on the embedded kernels: every kernel the crate can launch was compiled for
//! every arch, and no hot kernel spills registers (ptxas's report, kept by build.rs).
//! Without nvcc at build time this says it was skipped; LONGCTX_REQUIRE_KERNELS=1 (CI)
//! makes that a failure.

use std::io::Write;

use longctx::device::{hot_kernel_symbols, kernel_resources, kernels_compiled};

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
