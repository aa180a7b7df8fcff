//! Every kernel entry point the crate launches, by a typed id. The symbol names are the
//! `extern "C"` names in kernels/*/*.cu; a test checks that each one is present in the
//! embedded fatbins.

/// The fatbin a kernel lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Rope,
    Attention,
    AttentionBwd,
    Moe,
    KvCache,
}

impl Family {
    pub(crate) const ALL: &'static [Family] = &[
        Family::Rope,
        Family::Attention,
        Family::AttentionBwd,
        Family::Moe,
        Family::KvCache,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn fatbin(self) -> Option<&'static [u8]> {
        match self {
            Family::Rope => crate::embedded::ROPE_FATBIN,
            Family::Attention => crate::embedded::ATTENTION_FATBIN,
            Family::AttentionBwd => crate::embedded::ATTENTION_BWD_FATBIN,
            Family::Moe => crate::embedded::MOE_FATBIN,
            Family::KvCache => crate::embedded::KV_CACHE_FATBIN,
        }
    }

    /// ptxas's resource report for the family (empty when kernels were not compiled).
    pub(crate) fn ptxas_report(self) -> &'static str {
        match self {
            Family::Rope => crate::embedded::ROPE_PTXAS,
            Family::Attention => crate::embedded::ATTENTION_PTXAS,
            Family::AttentionBwd => crate::embedded::ATTENTION_BWD_PTXAS,
            Family::Moe => crate::embedded::MOE_PTXAS,
            Family::KvCache => crate::embedded::KV_CACHE_PTXAS,
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
    AttnFwdF16Hd64,
    AttnFwdF16Hd96,
    AttnFwdF16Hd128,
    AttnFwdF16Hd192Dv128,
    AttnFwdF16Hd256,
    AttnFwdBf16Hd64,
    AttnFwdBf16Hd96,
    AttnFwdBf16Hd128,
    AttnFwdBf16Hd192Dv128,
    AttnFwdBf16Hd256,
    AttnBwdPreF16,
    AttnBwdPreBf16,
    AttnBwdDqF16,
    AttnBwdDqBf16,
    AttnBwdF16Hd64,
    AttnBwdF16Hd96,
    AttnBwdF16Hd128,
    AttnBwdF16Hd192Dv128,
    AttnBwdF16Hd256,
    AttnBwdBf16Hd64,
    AttnBwdBf16Hd96,
    AttnBwdBf16Hd128,
    AttnBwdBf16Hd192Dv128,
    AttnBwdBf16Hd256,
    AttnBwdDqDetF16Hd64,
    AttnBwdDqDetF16Hd96,
    AttnBwdDqDetF16Hd128,
    AttnBwdDqDetF16Hd192Dv128,
    AttnBwdDqDetF16Hd256,
    AttnBwdDqDetBf16Hd64,
    AttnBwdDqDetBf16Hd96,
    AttnBwdDqDetBf16Hd128,
    AttnBwdDqDetBf16Hd192Dv128,
    AttnBwdDqDetBf16Hd256,
    MoeGateWarpF32,
    MoeGateWarpBf16,
    MoeGateBlockF32,
    MoeGateBlockBf16,
    MoeGateBwdF32,
    MoeGateBwdBf16,
    MoeStatsF32,
    MoeStatsBf16,
    MoeLoss,
    MoeBiasUpdate,
    MoeCount,
    MoeScan,
    MoeScatter,
    MoeGatherF32,
    MoeGatherBf16,
    MoeCombineF32,
    MoeCombineBf16,
    MoeCombineDwF32,
    MoeCombineDwBf16,
    MoeGatherF16,
    MoeCombineF16,
    MoeCombineDwF16,
    KvMergeF32Vec,
    KvMergeF32Scalar,
    KvMergeF16Vec,
    KvMergeF16Scalar,
    KvMergeBf16Vec,
    KvMergeBf16Scalar,
    KvMergeF32F16Vec,
    KvMergeF32F16Scalar,
    KvMergeF32Bf16Vec,
    KvMergeF32Bf16Scalar,
    KvDecodeF16Hd64,
    KvDecodeF16Hd128,
    KvDecodeF16Hd256,
    KvDecodeF16Hd512,
    KvDecodeBf16Hd64,
    KvDecodeBf16Hd128,
    KvDecodeBf16Hd256,
    KvDecodeBf16Hd512,
    KvDecodeF16Fp8Hd64,
    KvDecodeF16Fp8Hd128,
    KvDecodeF16Fp8Hd256,
    KvDecodeF16Fp8Hd512,
    KvDecodeBf16Fp8Hd64,
    KvDecodeBf16Fp8Hd128,
    KvDecodeBf16Fp8Hd256,
    KvDecodeBf16Fp8Hd512,
    KvExtendF16Hd64,
    KvExtendF16Hd96,
    KvExtendF16Hd128,
    KvExtendF16Hd256,
    KvExtendBf16Hd64,
    KvExtendBf16Hd96,
    KvExtendBf16Hd128,
    KvExtendBf16Hd256,
    KvExtendF16Hd512,
    KvExtendBf16Hd512,
    KvExtendR64F16Hd512,
    KvExtendR64Bf16Hd512,
    KvExtendRotF16Hd512,
    KvExtendRotBf16Hd512,
    KvExtendRotR64F16Hd512,
    KvExtendRotR64Bf16Hd512,
    KvExtendF16Fp8Hd512,
    KvExtendBf16Fp8Hd512,
    KvExtendR64F16Fp8Hd512,
    KvExtendR64Bf16Fp8Hd512,
    KvExtendF16Fp8Hd64,
    KvExtendF16Fp8Hd96,
    KvExtendF16Fp8Hd128,
    KvExtendF16Fp8Hd256,
    KvExtendBf16Fp8Hd64,
    KvExtendBf16Fp8Hd96,
    KvExtendBf16Fp8Hd128,
    KvExtendBf16Fp8Hd256,
    KvExtendRotF16Hd64,
    KvExtendRotF16Hd96,
    KvExtendRotF16Hd128,
    KvExtendRotF16Hd256,
    KvExtendRotBf16Hd64,
    KvExtendRotBf16Hd96,
    KvExtendRotBf16Hd128,
    KvExtendRotBf16Hd256,
    KvExtendRotF16Fp8Hd64,
    KvExtendRotF16Fp8Hd96,
    KvExtendRotF16Fp8Hd128,
    KvExtendRotF16Fp8Hd256,
    KvExtendRotBf16Fp8Hd64,
    KvExtendRotBf16Fp8Hd96,
    KvExtendRotBf16Fp8Hd128,
    KvExtendRotBf16Fp8Hd256,
    KvAppendF16Vec,
    KvAppendF16Scalar,
    KvAppendF16Fp8Vec,
    KvAppendF16Fp8Scalar,
    KvAppendBf16Vec,
    KvAppendBf16Scalar,
    KvAppendBf16Fp8Vec,
    KvAppendBf16Fp8Scalar,
    MlaDecodeBf16,
    MlaDecodeBf16Fp8,
    MlaDecodeR64Bf16,
    MlaDecodeR64Bf16Fp8,
    MlaDecodeC2Bf16,
    MlaDecodeC2Bf16Fp8,
    MlaDecodeC4Bf16,
    MlaDecodeC4Bf16Fp8,
    MlaAppendBf16,
    MlaAppendBf16Fp8,
}

impl KernelId {
    pub(crate) const ALL: &'static [KernelId] = &[
        KernelId::RopeF32Vec,
        KernelId::RopeF32Scalar,
        KernelId::RopeF16Vec,
        KernelId::RopeF16Scalar,
        KernelId::RopeBf16Vec,
        KernelId::RopeBf16Scalar,
        KernelId::AttnFwdF16Hd64,
        KernelId::AttnFwdF16Hd96,
        KernelId::AttnFwdF16Hd128,
        KernelId::AttnFwdF16Hd192Dv128,
        KernelId::AttnFwdF16Hd256,
        KernelId::AttnFwdBf16Hd64,
        KernelId::AttnFwdBf16Hd96,
        KernelId::AttnFwdBf16Hd128,
        KernelId::AttnFwdBf16Hd192Dv128,
        KernelId::AttnFwdBf16Hd256,
        KernelId::AttnBwdPreF16,
        KernelId::AttnBwdPreBf16,
        KernelId::AttnBwdDqF16,
        KernelId::AttnBwdDqBf16,
        KernelId::AttnBwdF16Hd64,
        KernelId::AttnBwdF16Hd96,
        KernelId::AttnBwdF16Hd128,
        KernelId::AttnBwdF16Hd192Dv128,
        KernelId::AttnBwdF16Hd256,
        KernelId::AttnBwdBf16Hd64,
        KernelId::AttnBwdBf16Hd96,
        KernelId::AttnBwdBf16Hd128,
        KernelId::AttnBwdBf16Hd192Dv128,
        KernelId::AttnBwdBf16Hd256,
        KernelId::AttnBwdDqDetF16Hd64,
        KernelId::AttnBwdDqDetF16Hd96,
        KernelId::AttnBwdDqDetF16Hd128,
        KernelId::AttnBwdDqDetF16Hd192Dv128,
        KernelId::AttnBwdDqDetF16Hd256,
        KernelId::AttnBwdDqDetBf16Hd64,
        KernelId::AttnBwdDqDetBf16Hd96,
        KernelId::AttnBwdDqDetBf16Hd128,
        KernelId::AttnBwdDqDetBf16Hd192Dv128,
        KernelId::AttnBwdDqDetBf16Hd256,
        KernelId::MoeGateWarpF32,
        KernelId::MoeGateWarpBf16,
        KernelId::MoeGateBlockF32,
        KernelId::MoeGateBlockBf16,
        KernelId::MoeGateBwdF32,
        KernelId::MoeGateBwdBf16,
        KernelId::MoeStatsF32,
        KernelId::MoeStatsBf16,
        KernelId::MoeLoss,
        KernelId::MoeBiasUpdate,
        KernelId::MoeCount,
        KernelId::MoeScan,
        KernelId::MoeScatter,
        KernelId::MoeGatherF32,
        KernelId::MoeGatherBf16,
        KernelId::MoeCombineF32,
        KernelId::MoeCombineBf16,
        KernelId::MoeCombineDwF32,
        KernelId::MoeCombineDwBf16,
        KernelId::MoeGatherF16,
        KernelId::MoeCombineF16,
        KernelId::MoeCombineDwF16,
        KernelId::KvMergeF32Vec,
        KernelId::KvMergeF32Scalar,
        KernelId::KvMergeF16Vec,
        KernelId::KvMergeF16Scalar,
        KernelId::KvMergeBf16Vec,
        KernelId::KvMergeBf16Scalar,
        KernelId::KvMergeF32F16Vec,
        KernelId::KvMergeF32F16Scalar,
        KernelId::KvMergeF32Bf16Vec,
        KernelId::KvMergeF32Bf16Scalar,
        KernelId::KvDecodeF16Hd64,
        KernelId::KvDecodeF16Hd128,
        KernelId::KvDecodeF16Hd256,
        KernelId::KvDecodeF16Hd512,
        KernelId::KvDecodeBf16Hd64,
        KernelId::KvDecodeBf16Hd128,
        KernelId::KvDecodeBf16Hd256,
        KernelId::KvDecodeBf16Hd512,
        KernelId::KvDecodeF16Fp8Hd64,
        KernelId::KvDecodeF16Fp8Hd128,
        KernelId::KvDecodeF16Fp8Hd256,
        KernelId::KvDecodeF16Fp8Hd512,
        KernelId::KvDecodeBf16Fp8Hd64,
        KernelId::KvDecodeBf16Fp8Hd128,
        KernelId::KvDecodeBf16Fp8Hd256,
        KernelId::KvDecodeBf16Fp8Hd512,
        KernelId::KvExtendF16Hd64,
        KernelId::KvExtendF16Hd96,
        KernelId::KvExtendF16Hd128,
        KernelId::KvExtendF16Hd256,
        KernelId::KvExtendBf16Hd64,
        KernelId::KvExtendBf16Hd96,
        KernelId::KvExtendBf16Hd128,
        KernelId::KvExtendBf16Hd256,
        KernelId::KvExtendF16Hd512,
        KernelId::KvExtendBf16Hd512,
        KernelId::KvExtendR64F16Hd512,
        KernelId::KvExtendR64Bf16Hd512,
        KernelId::KvExtendRotF16Hd512,
        KernelId::KvExtendRotBf16Hd512,
        KernelId::KvExtendRotR64F16Hd512,
        KernelId::KvExtendRotR64Bf16Hd512,
        KernelId::KvExtendF16Fp8Hd512,
        KernelId::KvExtendBf16Fp8Hd512,
        KernelId::KvExtendR64F16Fp8Hd512,
        KernelId::KvExtendR64Bf16Fp8Hd512,
        KernelId::KvExtendF16Fp8Hd64,
        KernelId::KvExtendF16Fp8Hd96,
        KernelId::KvExtendF16Fp8Hd128,
        KernelId::KvExtendF16Fp8Hd256,
        KernelId::KvExtendBf16Fp8Hd64,
        KernelId::KvExtendBf16Fp8Hd96,
        KernelId::KvExtendBf16Fp8Hd128,
        KernelId::KvExtendBf16Fp8Hd256,
        KernelId::KvExtendRotF16Hd64,
        KernelId::KvExtendRotF16Hd96,
        KernelId::KvExtendRotF16Hd128,
        KernelId::KvExtendRotF16Hd256,
        KernelId::KvExtendRotBf16Hd64,
        KernelId::KvExtendRotBf16Hd96,
        KernelId::KvExtendRotBf16Hd128,
        KernelId::KvExtendRotBf16Hd256,
        KernelId::KvExtendRotF16Fp8Hd64,
        KernelId::KvExtendRotF16Fp8Hd96,
        KernelId::KvExtendRotF16Fp8Hd128,
        KernelId::KvExtendRotF16Fp8Hd256,
        KernelId::KvExtendRotBf16Fp8Hd64,
        KernelId::KvExtendRotBf16Fp8Hd96,
        KernelId::KvExtendRotBf16Fp8Hd128,
        KernelId::KvExtendRotBf16Fp8Hd256,
        KernelId::KvAppendF16Vec,
        KernelId::KvAppendF16Scalar,
        KernelId::KvAppendF16Fp8Vec,
        KernelId::KvAppendF16Fp8Scalar,
        KernelId::KvAppendBf16Vec,
        KernelId::KvAppendBf16Scalar,
        KernelId::KvAppendBf16Fp8Vec,
        KernelId::KvAppendBf16Fp8Scalar,
        KernelId::MlaDecodeBf16,
        KernelId::MlaDecodeBf16Fp8,
        KernelId::MlaDecodeR64Bf16,
        KernelId::MlaDecodeR64Bf16Fp8,
        KernelId::MlaDecodeC2Bf16,
        KernelId::MlaDecodeC2Bf16Fp8,
        KernelId::MlaDecodeC4Bf16,
        KernelId::MlaDecodeC4Bf16Fp8,
        KernelId::MlaAppendBf16,
        KernelId::MlaAppendBf16Fp8,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn family(self) -> Family {
        match self {
            KernelId::RopeF32Vec
            | KernelId::RopeF32Scalar
            | KernelId::RopeF16Vec
            | KernelId::RopeF16Scalar
            | KernelId::RopeBf16Vec
            | KernelId::RopeBf16Scalar => Family::Rope,
            KernelId::MoeGateWarpF32
            | KernelId::MoeGateWarpBf16
            | KernelId::MoeGateBlockF32
            | KernelId::MoeGateBlockBf16
            | KernelId::MoeGateBwdF32
            | KernelId::MoeGateBwdBf16
            | KernelId::MoeStatsF32
            | KernelId::MoeStatsBf16
            | KernelId::MoeLoss
            | KernelId::MoeBiasUpdate
            | KernelId::MoeCount
            | KernelId::MoeScan
            | KernelId::MoeScatter
            | KernelId::MoeGatherF32
            | KernelId::MoeGatherBf16
            | KernelId::MoeCombineF32
            | KernelId::MoeCombineBf16
            | KernelId::MoeCombineDwF32
            | KernelId::MoeCombineDwBf16
            | KernelId::MoeGatherF16
            | KernelId::MoeCombineF16
            | KernelId::MoeCombineDwF16 => Family::Moe,
            KernelId::KvMergeF32Vec
            | KernelId::KvMergeF32Scalar
            | KernelId::KvMergeF16Vec
            | KernelId::KvMergeF16Scalar
            | KernelId::KvMergeBf16Vec
            | KernelId::KvMergeBf16Scalar
            | KernelId::KvMergeF32F16Vec
            | KernelId::KvMergeF32F16Scalar
            | KernelId::KvMergeF32Bf16Vec
            | KernelId::KvMergeF32Bf16Scalar
            | KernelId::KvDecodeF16Hd64
            | KernelId::KvDecodeF16Hd128
            | KernelId::KvDecodeF16Hd256
            | KernelId::KvDecodeF16Hd512
            | KernelId::KvDecodeBf16Hd64
            | KernelId::KvDecodeBf16Hd128
            | KernelId::KvDecodeBf16Hd256
            | KernelId::KvDecodeBf16Hd512
            | KernelId::KvDecodeF16Fp8Hd64
            | KernelId::KvDecodeF16Fp8Hd128
            | KernelId::KvDecodeF16Fp8Hd256
            | KernelId::KvDecodeF16Fp8Hd512
            | KernelId::KvDecodeBf16Fp8Hd64
            | KernelId::KvDecodeBf16Fp8Hd128
            | KernelId::KvDecodeBf16Fp8Hd256
            | KernelId::KvDecodeBf16Fp8Hd512 => Family::KvCache,
            KernelId::KvAppendF16Vec
            | KernelId::KvAppendF16Scalar
            | KernelId::KvAppendF16Fp8Vec
            | KernelId::KvAppendF16Fp8Scalar
            | KernelId::KvAppendBf16Vec
            | KernelId::KvAppendBf16Scalar
            | KernelId::KvAppendBf16Fp8Vec
            | KernelId::KvAppendBf16Fp8Scalar => Family::KvCache,
            // Head dim 512's extend is its own kernel in the KV cache's source file.
            KernelId::KvExtendF16Hd512
            | KernelId::KvExtendBf16Hd512
            | KernelId::KvExtendR64F16Hd512
            | KernelId::KvExtendR64Bf16Hd512
            | KernelId::KvExtendRotF16Hd512
            | KernelId::KvExtendRotBf16Hd512
            | KernelId::KvExtendRotR64F16Hd512
            | KernelId::KvExtendRotR64Bf16Hd512
            | KernelId::KvExtendF16Fp8Hd512
            | KernelId::KvExtendBf16Fp8Hd512
            | KernelId::KvExtendR64F16Fp8Hd512
            | KernelId::KvExtendR64Bf16Fp8Hd512 => Family::KvCache,
            KernelId::MlaDecodeBf16
            | KernelId::MlaDecodeBf16Fp8
            | KernelId::MlaDecodeR64Bf16
            | KernelId::MlaDecodeR64Bf16Fp8
            | KernelId::MlaDecodeC2Bf16
            | KernelId::MlaDecodeC2Bf16Fp8
            | KernelId::MlaDecodeC4Bf16
            | KernelId::MlaDecodeC4Bf16Fp8
            | KernelId::MlaAppendBf16
            | KernelId::MlaAppendBf16Fp8 => Family::KvCache,
            KernelId::AttnBwdPreF16
            | KernelId::AttnBwdPreBf16
            | KernelId::AttnBwdDqF16
            | KernelId::AttnBwdDqBf16
            | KernelId::AttnBwdF16Hd64
            | KernelId::AttnBwdF16Hd96
            | KernelId::AttnBwdF16Hd128
            | KernelId::AttnBwdF16Hd192Dv128
            | KernelId::AttnBwdF16Hd256
            | KernelId::AttnBwdBf16Hd64
            | KernelId::AttnBwdBf16Hd96
            | KernelId::AttnBwdBf16Hd128
            | KernelId::AttnBwdBf16Hd192Dv128
            | KernelId::AttnBwdBf16Hd256
            | KernelId::AttnBwdDqDetF16Hd64
            | KernelId::AttnBwdDqDetF16Hd96
            | KernelId::AttnBwdDqDetF16Hd128
            | KernelId::AttnBwdDqDetF16Hd192Dv128
            | KernelId::AttnBwdDqDetF16Hd256
            | KernelId::AttnBwdDqDetBf16Hd64
            | KernelId::AttnBwdDqDetBf16Hd96
            | KernelId::AttnBwdDqDetBf16Hd128
            | KernelId::AttnBwdDqDetBf16Hd192Dv128
            | KernelId::AttnBwdDqDetBf16Hd256 => Family::AttentionBwd,
            // The extend entries (KvExtend*) share the forward's body and source file.
            _ => Family::Attention,
        }
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
            KernelId::AttnFwdF16Hd64 => "longctx_attn_fwd_f16_hd64",
            KernelId::AttnFwdF16Hd96 => "longctx_attn_fwd_f16_hd96",
            KernelId::AttnFwdF16Hd128 => "longctx_attn_fwd_f16_hd128",
            KernelId::AttnFwdF16Hd192Dv128 => "longctx_attn_fwd_f16_hd192_dv128",
            KernelId::AttnFwdF16Hd256 => "longctx_attn_fwd_f16_hd256",
            KernelId::AttnFwdBf16Hd64 => "longctx_attn_fwd_bf16_hd64",
            KernelId::AttnFwdBf16Hd96 => "longctx_attn_fwd_bf16_hd96",
            KernelId::AttnFwdBf16Hd128 => "longctx_attn_fwd_bf16_hd128",
            KernelId::AttnFwdBf16Hd192Dv128 => "longctx_attn_fwd_bf16_hd192_dv128",
            KernelId::AttnFwdBf16Hd256 => "longctx_attn_fwd_bf16_hd256",
            KernelId::AttnBwdPreF16 => "longctx_attn_bwd_pre_f16",
            KernelId::AttnBwdPreBf16 => "longctx_attn_bwd_pre_bf16",
            KernelId::AttnBwdDqF16 => "longctx_attn_bwd_dq_f16",
            KernelId::AttnBwdDqBf16 => "longctx_attn_bwd_dq_bf16",
            KernelId::AttnBwdF16Hd64 => "longctx_attn_bwd_f16_hd64",
            KernelId::AttnBwdF16Hd96 => "longctx_attn_bwd_f16_hd96",
            KernelId::AttnBwdF16Hd128 => "longctx_attn_bwd_f16_hd128",
            KernelId::AttnBwdF16Hd192Dv128 => "longctx_attn_bwd_f16_hd192_dv128",
            KernelId::AttnBwdF16Hd256 => "longctx_attn_bwd_f16_hd256",
            KernelId::AttnBwdBf16Hd64 => "longctx_attn_bwd_bf16_hd64",
            KernelId::AttnBwdBf16Hd96 => "longctx_attn_bwd_bf16_hd96",
            KernelId::AttnBwdBf16Hd128 => "longctx_attn_bwd_bf16_hd128",
            KernelId::AttnBwdBf16Hd192Dv128 => "longctx_attn_bwd_bf16_hd192_dv128",
            KernelId::AttnBwdBf16Hd256 => "longctx_attn_bwd_bf16_hd256",
            KernelId::AttnBwdDqDetF16Hd64 => "longctx_attn_bwd_dq_det_f16_hd64",
            KernelId::AttnBwdDqDetF16Hd96 => "longctx_attn_bwd_dq_det_f16_hd96",
            KernelId::AttnBwdDqDetF16Hd128 => "longctx_attn_bwd_dq_det_f16_hd128",
            KernelId::AttnBwdDqDetF16Hd192Dv128 => "longctx_attn_bwd_dq_det_f16_hd192_dv128",
            KernelId::AttnBwdDqDetF16Hd256 => "longctx_attn_bwd_dq_det_f16_hd256",
            KernelId::AttnBwdDqDetBf16Hd64 => "longctx_attn_bwd_dq_det_bf16_hd64",
            KernelId::AttnBwdDqDetBf16Hd96 => "longctx_attn_bwd_dq_det_bf16_hd96",
            KernelId::AttnBwdDqDetBf16Hd128 => "longctx_attn_bwd_dq_det_bf16_hd128",
            KernelId::AttnBwdDqDetBf16Hd192Dv128 => "longctx_attn_bwd_dq_det_bf16_hd192_dv128",
            KernelId::AttnBwdDqDetBf16Hd256 => "longctx_attn_bwd_dq_det_bf16_hd256",
            KernelId::MoeGateWarpF32 => "longctx_moe_gate_warp_f32",
            KernelId::MoeGateWarpBf16 => "longctx_moe_gate_warp_bf16",
            KernelId::MoeGateBlockF32 => "longctx_moe_gate_block_f32",
            KernelId::MoeGateBlockBf16 => "longctx_moe_gate_block_bf16",
            KernelId::MoeGateBwdF32 => "longctx_moe_gate_bwd_f32",
            KernelId::MoeGateBwdBf16 => "longctx_moe_gate_bwd_bf16",
            KernelId::MoeStatsF32 => "longctx_moe_stats_f32",
            KernelId::MoeStatsBf16 => "longctx_moe_stats_bf16",
            KernelId::MoeLoss => "longctx_moe_loss",
            KernelId::MoeBiasUpdate => "longctx_moe_bias_update",
            KernelId::MoeCount => "longctx_moe_count",
            KernelId::MoeScan => "longctx_moe_scan",
            KernelId::MoeScatter => "longctx_moe_scatter",
            KernelId::MoeGatherF32 => "longctx_moe_gather_f32",
            KernelId::MoeGatherBf16 => "longctx_moe_gather_bf16",
            KernelId::MoeCombineF32 => "longctx_moe_combine_f32",
            KernelId::MoeCombineBf16 => "longctx_moe_combine_bf16",
            KernelId::MoeCombineDwF32 => "longctx_moe_combine_dw_f32",
            KernelId::MoeCombineDwBf16 => "longctx_moe_combine_dw_bf16",
            KernelId::MoeGatherF16 => "longctx_moe_gather_f16",
            KernelId::MoeCombineF16 => "longctx_moe_combine_f16",
            KernelId::MoeCombineDwF16 => "longctx_moe_combine_dw_f16",
            KernelId::KvMergeF32Vec => "longctx_kv_merge_f32_vec",
            KernelId::KvMergeF32Scalar => "longctx_kv_merge_f32_scalar",
            KernelId::KvMergeF16Vec => "longctx_kv_merge_f16_vec",
            KernelId::KvMergeF16Scalar => "longctx_kv_merge_f16_scalar",
            KernelId::KvMergeBf16Vec => "longctx_kv_merge_bf16_vec",
            KernelId::KvMergeBf16Scalar => "longctx_kv_merge_bf16_scalar",
            KernelId::KvMergeF32F16Vec => "longctx_kv_merge_f32_f16_vec",
            KernelId::KvMergeF32F16Scalar => "longctx_kv_merge_f32_f16_scalar",
            KernelId::KvMergeF32Bf16Vec => "longctx_kv_merge_f32_bf16_vec",
            KernelId::KvMergeF32Bf16Scalar => "longctx_kv_merge_f32_bf16_scalar",
            KernelId::KvDecodeF16Hd64 => "longctx_kv_decode_f16_hd64",
            KernelId::KvDecodeF16Hd128 => "longctx_kv_decode_f16_hd128",
            KernelId::KvDecodeF16Hd256 => "longctx_kv_decode_f16_hd256",
            KernelId::KvDecodeF16Hd512 => "longctx_kv_decode_f16_hd512",
            KernelId::KvDecodeBf16Hd64 => "longctx_kv_decode_bf16_hd64",
            KernelId::KvDecodeBf16Hd128 => "longctx_kv_decode_bf16_hd128",
            KernelId::KvDecodeBf16Hd256 => "longctx_kv_decode_bf16_hd256",
            KernelId::KvDecodeBf16Hd512 => "longctx_kv_decode_bf16_hd512",
            KernelId::KvDecodeF16Fp8Hd64 => "longctx_kv_decode_f16_fp8_hd64",
            KernelId::KvDecodeF16Fp8Hd128 => "longctx_kv_decode_f16_fp8_hd128",
            KernelId::KvDecodeF16Fp8Hd256 => "longctx_kv_decode_f16_fp8_hd256",
            KernelId::KvDecodeF16Fp8Hd512 => "longctx_kv_decode_f16_fp8_hd512",
            KernelId::KvDecodeBf16Fp8Hd64 => "longctx_kv_decode_bf16_fp8_hd64",
            KernelId::KvDecodeBf16Fp8Hd128 => "longctx_kv_decode_bf16_fp8_hd128",
            KernelId::KvDecodeBf16Fp8Hd256 => "longctx_kv_decode_bf16_fp8_hd256",
            KernelId::KvDecodeBf16Fp8Hd512 => "longctx_kv_decode_bf16_fp8_hd512",
            KernelId::KvExtendF16Hd64 => "longctx_kv_extend_f16_hd64",
            KernelId::KvExtendF16Hd96 => "longctx_kv_extend_f16_hd96",
            KernelId::KvExtendF16Hd128 => "longctx_kv_extend_f16_hd128",
            KernelId::KvExtendF16Hd256 => "longctx_kv_extend_f16_hd256",
            KernelId::KvExtendBf16Hd64 => "longctx_kv_extend_bf16_hd64",
            KernelId::KvExtendBf16Hd96 => "longctx_kv_extend_bf16_hd96",
            KernelId::KvExtendBf16Hd128 => "longctx_kv_extend_bf16_hd128",
            KernelId::KvExtendBf16Hd256 => "longctx_kv_extend_bf16_hd256",
            KernelId::KvExtendF16Hd512 => "longctx_kv_extend_f16_hd512",
            KernelId::KvExtendBf16Hd512 => "longctx_kv_extend_bf16_hd512",
            KernelId::KvExtendR64F16Hd512 => "longctx_kv_extend_r64_f16_hd512",
            KernelId::KvExtendR64Bf16Hd512 => "longctx_kv_extend_r64_bf16_hd512",
            KernelId::KvExtendRotF16Hd512 => "longctx_kv_extend_rot_f16_hd512",
            KernelId::KvExtendRotBf16Hd512 => "longctx_kv_extend_rot_bf16_hd512",
            KernelId::KvExtendRotR64F16Hd512 => "longctx_kv_extend_rot_r64_f16_hd512",
            KernelId::KvExtendRotR64Bf16Hd512 => "longctx_kv_extend_rot_r64_bf16_hd512",
            KernelId::KvExtendF16Fp8Hd512 => "longctx_kv_extend_f16_fp8_hd512",
            KernelId::KvExtendBf16Fp8Hd512 => "longctx_kv_extend_bf16_fp8_hd512",
            KernelId::KvExtendR64F16Fp8Hd512 => "longctx_kv_extend_r64_f16_fp8_hd512",
            KernelId::KvExtendR64Bf16Fp8Hd512 => "longctx_kv_extend_r64_bf16_fp8_hd512",
            KernelId::KvExtendF16Fp8Hd64 => "longctx_kv_extend_f16_fp8_hd64",
            KernelId::KvExtendF16Fp8Hd96 => "longctx_kv_extend_f16_fp8_hd96",
            KernelId::KvExtendF16Fp8Hd128 => "longctx_kv_extend_f16_fp8_hd128",
            KernelId::KvExtendF16Fp8Hd256 => "longctx_kv_extend_f16_fp8_hd256",
            KernelId::KvExtendBf16Fp8Hd64 => "longctx_kv_extend_bf16_fp8_hd64",
            KernelId::KvExtendBf16Fp8Hd96 => "longctx_kv_extend_bf16_fp8_hd96",
            KernelId::KvExtendBf16Fp8Hd128 => "longctx_kv_extend_bf16_fp8_hd128",
            KernelId::KvExtendBf16Fp8Hd256 => "longctx_kv_extend_bf16_fp8_hd256",
            KernelId::KvExtendRotF16Hd64 => "longctx_kv_extend_rot_f16_hd64",
            KernelId::KvExtendRotF16Hd96 => "longctx_kv_extend_rot_f16_hd96",
            KernelId::KvExtendRotF16Hd128 => "longctx_kv_extend_rot_f16_hd128",
            KernelId::KvExtendRotF16Hd256 => "longctx_kv_extend_rot_f16_hd256",
            KernelId::KvExtendRotBf16Hd64 => "longctx_kv_extend_rot_bf16_hd64",
            KernelId::KvExtendRotBf16Hd96 => "longctx_kv_extend_rot_bf16_hd96",
            KernelId::KvExtendRotBf16Hd128 => "longctx_kv_extend_rot_bf16_hd128",
            KernelId::KvExtendRotBf16Hd256 => "longctx_kv_extend_rot_bf16_hd256",
            KernelId::KvExtendRotF16Fp8Hd64 => "longctx_kv_extend_rot_f16_fp8_hd64",
            KernelId::KvExtendRotF16Fp8Hd96 => "longctx_kv_extend_rot_f16_fp8_hd96",
            KernelId::KvExtendRotF16Fp8Hd128 => "longctx_kv_extend_rot_f16_fp8_hd128",
            KernelId::KvExtendRotF16Fp8Hd256 => "longctx_kv_extend_rot_f16_fp8_hd256",
            KernelId::KvExtendRotBf16Fp8Hd64 => "longctx_kv_extend_rot_bf16_fp8_hd64",
            KernelId::KvExtendRotBf16Fp8Hd96 => "longctx_kv_extend_rot_bf16_fp8_hd96",
            KernelId::KvExtendRotBf16Fp8Hd128 => "longctx_kv_extend_rot_bf16_fp8_hd128",
            KernelId::KvExtendRotBf16Fp8Hd256 => "longctx_kv_extend_rot_bf16_fp8_hd256",
            KernelId::KvAppendF16Vec => "longctx_kv_append_f16_vec",
            KernelId::KvAppendF16Scalar => "longctx_kv_append_f16_scalar",
            KernelId::KvAppendF16Fp8Vec => "longctx_kv_append_f16_fp8_vec",
            KernelId::KvAppendF16Fp8Scalar => "longctx_kv_append_f16_fp8_scalar",
            KernelId::KvAppendBf16Vec => "longctx_kv_append_bf16_vec",
            KernelId::KvAppendBf16Scalar => "longctx_kv_append_bf16_scalar",
            KernelId::KvAppendBf16Fp8Vec => "longctx_kv_append_bf16_fp8_vec",
            KernelId::KvAppendBf16Fp8Scalar => "longctx_kv_append_bf16_fp8_scalar",
            KernelId::MlaDecodeBf16 => "longctx_mla_decode_bf16",
            KernelId::MlaDecodeBf16Fp8 => "longctx_mla_decode_bf16_fp8",
            KernelId::MlaDecodeR64Bf16 => "longctx_mla_decode_r64_bf16",
            KernelId::MlaDecodeR64Bf16Fp8 => "longctx_mla_decode_r64_bf16_fp8",
            KernelId::MlaDecodeC2Bf16 => "longctx_mla_decode_c2_bf16",
            KernelId::MlaDecodeC2Bf16Fp8 => "longctx_mla_decode_c2_bf16_fp8",
            KernelId::MlaDecodeC4Bf16 => "longctx_mla_decode_c4_bf16",
            KernelId::MlaDecodeC4Bf16Fp8 => "longctx_mla_decode_c4_bf16_fp8",
            KernelId::MlaAppendBf16 => "longctx_mla_append_bf16",
            KernelId::MlaAppendBf16Fp8 => "longctx_mla_append_bf16_fp8",
        }
    }

    /// The thread-block cluster the entry was compiled with (`__cluster_dims__`, sm_90a
    /// code only): (1, 1, 1) for every entry without one. The grid must be a multiple of it.
    pub(crate) fn cluster_dims(self) -> (u32, u32, u32) {
        match self {
            KernelId::MlaDecodeC2Bf16 | KernelId::MlaDecodeC2Bf16Fp8 => (1, 2, 1),
            KernelId::MlaDecodeC4Bf16 | KernelId::MlaDecodeC4Bf16Fp8 => (1, 4, 1),
            _ => (1, 1, 1),
        }
    }

    /// Entries whose portable (pre-sm_90) code is a trap: the host launches them only where
    /// the loaded code is sm_90a.
    pub(crate) fn needs_sm90(self) -> bool {
        self.cluster_dims() != (1, 1, 1)
    }

    /// Kernels on the hot path: the build must not let them spill registers.
    pub(crate) fn is_hot(self) -> bool {
        true
    }
}
