//! Every kernel entry point the crate launches, by a typed id. The symbol names are the
//! `extern "C"` names in kernels/*/*.cu; a test checks that each one is present in the
//! embedded fatbins.

/// The fatbin a kernel lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Rope,
}

impl Family {
    pub(crate) const ALL: [Family; 1] = [Family::Rope];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn fatbin(self) -> Option<&'static [u8]> {
        match self {
            Family::Rope => crate::embedded::ROPE_FATBIN,
        }
    }

    /// ptxas's resource report for the family (empty when kernels were not compiled).
    pub(crate) fn ptxas_report(self) -> &'static str {
        match self {
            Family::Rope => crate::embedded::ROPE_PTXAS,
        }
    }
}

/// One kernel entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KernelId {
    RopeF32Vec,
    RopeF32Scalar,
    RopeF16Vec,
    RopeF16Scalar,
    RopeBf16Vec,
    RopeBf16Scalar,
}

impl KernelId {
    pub(crate) const ALL: [KernelId; 6] = [
        KernelId::RopeF32Vec,
        KernelId::RopeF32Scalar,
        KernelId::RopeF16Vec,
        KernelId::RopeF16Scalar,
        KernelId::RopeBf16Vec,
        KernelId::RopeBf16Scalar,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn family(self) -> Family {
        Family::Rope
    }

    /// The kernel's `extern "C"` symbol.
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            KernelId::RopeF32Vec => "longctx_rope_f32_vec",
            KernelId::RopeF32Scalar => "longctx_rope_f32_scalar",
            KernelId::RopeF16Vec => "longctx_rope_f16_vec",
            KernelId::RopeF16Scalar => "longctx_rope_f16_scalar",
            KernelId::RopeBf16Vec => "longctx_rope_bf16_vec",
            KernelId::RopeBf16Scalar => "longctx_rope_bf16_scalar",
        }
    }

    /// Kernels on the hot path: the build must not let them spill registers.
    pub(crate) fn is_hot(self) -> bool {
        true
    }
}
