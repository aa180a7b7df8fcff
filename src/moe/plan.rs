//! Host-side planning of the MoE kernels, pure Rust: which gating kernel runs, chunk sizes
//! of the permutation and the statistics, buffer sizes, the capacity. The GPU path, the
//! reference and the tests all size things from here.

use super::{PermuteOptions, RouterConfig, OP};
use crate::error::{Error, Result};
use crate::sys;

/// Most experts any MoE kernel accepts.
pub const MAX_EXPERTS: usize = sys::LONGCTX_MOE_MAX_EXPERTS as usize;
/// Most experts of the one-warp-per-token gating kernel (16 per lane in registers).
pub const WARP_MAX_EXPERTS: usize = sys::LONGCTX_MOE_WARP_MAX_EXPERTS as usize;
/// Most top_k of the one-warp-per-token gating kernel (one chosen expert per lane).
pub const WARP_MAX_TOP_K: usize = sys::LONGCTX_MOE_WARP_MAX_TOP_K as usize;
/// Largest padding multiple [`PermuteOptions::block`] may ask for. Grouped-GEMM M tiles are
/// 16 to 256 rows; the bound keeps one token's padding from sizing buffers absurdly.
pub const MAX_BLOCK: usize = 1 << 12;

/// Tokens per block of the warp gating kernel (kernels/moe/traits.cuh: kGateWarps).
pub(crate) const GATE_WARPS: usize = sys::LONGCTX_MOE_GATE_WARPS as usize;
/// Threads of the block gating kernel (kGateBlockThreads).
pub(crate) const GATE_BLOCK_THREADS: u32 = sys::LONGCTX_MOE_GATE_BLOCK_THREADS;
/// Tokens per block of the gating backward (kBwdWarps).
pub(crate) const BWD_WARPS: usize = sys::LONGCTX_MOE_BWD_WARPS as usize;
/// Threads of the statistics kernel (kStatsThreads) and its chunk limit (kStatsMaxChunkTokens).
pub(crate) const STATS_THREADS: u32 = sys::LONGCTX_MOE_STATS_THREADS;
pub(crate) const STATS_MAX_CHUNK_TOKENS: usize = sys::LONGCTX_MOE_STATS_MAX_CHUNK_TOKENS as usize;
/// Threads of the single-block loss, scan and bias kernels.
pub(crate) const LOSS_THREADS: u32 = sys::LONGCTX_MOE_LOSS_THREADS;
pub(crate) const SCAN_THREADS: u32 = sys::LONGCTX_MOE_SCAN_THREADS;
pub(crate) const BIAS_THREADS: u32 = sys::LONGCTX_MOE_BIAS_THREADS;
/// Most warp chunks per block of the count and scatter kernels (kMaxPermuteWarps).
pub(crate) const MAX_PERMUTE_WARPS: usize = sys::LONGCTX_MOE_MAX_PERMUTE_WARPS as usize;
/// Threads per row of gather / combine (kRowThreads).
pub(crate) const ROW_THREADS: u32 = sys::LONGCTX_MOE_ROW_THREADS;
/// Shared memory the permutation's counters may take per block.
const PERMUTE_SMEM_BUDGET: usize = 32 * 1024;
/// Fewest assignments per warp chunk, and most chunks the single-block scan walks: 4k tokens
/// x top-8 make 64 chunks of 512 (64 warps counting, a 64-long scan per expert).
const MIN_CHUNK: usize = 512;
const MAX_CHUNKS: usize = 256;

/// Which gating kernel a router shape runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatePath {
    /// A segment of at most one warp per token, experts in registers: experts <= 512,
    /// top_k <= the segment's lanes, and groups (if any) covering a power of two of whole
    /// lanes each.
    Warp,
    /// One block per token, choices in shared memory: everything else up to 4096 experts.
    Block,
}

/// Launch shape of the gating kernel for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatePlan {
    /// The kernel.
    pub path: GatePath,
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory in bytes.
    pub smem_bytes: u32,
    /// Warp kernel: lanes per token (a power of two, at most 32).
    pub lanes: usize,
    /// Warp kernel: consecutive experts held per lane (at most 16).
    pub slots: usize,
    /// Warp kernel: lanes per expert group (a power of two), 0 without group limiting.
    pub group_lanes: usize,
}

/// Most experts one lane of the warp kernel holds (kGateSlots).
const WARP_SLOTS: usize = WARP_MAX_EXPERTS / 32;

/// The warp kernel's layout for `cfg`: (lanes, slots, group lanes), or `None` when the
/// shape needs the block kernel. Tokens are packed as densely as the constraints allow:
/// the fewest lanes (a power of two) that hold all experts at <= 16 per lane, give every
/// rank of the top-k its own lane, and (with group limiting) cover each group with a power
/// of two of whole lanes. A warp's instruction count barely depends on the layout (the
/// per-lane loops run over all 16 slots, predicated, and only the shuffle rounds shrink),
/// so 32 / lanes tokens per warp divide the kernel's issue work by as much: DeepSeek-V3
/// (256 experts, top-8) runs 2 tokens per warp, Qwen3-MoE (128, top-8) 4, Mixtral (8,
/// top-2) 16.
fn warp_layout(cfg: &RouterConfig) -> Option<(usize, usize, usize)> {
    if cfg.experts > WARP_MAX_EXPERTS || cfg.top_k > WARP_MAX_TOP_K {
        return None;
    }
    let mut lanes = cfg
        .experts
        .div_ceil(WARP_SLOTS)
        .max(cfg.top_k)
        .max(1)
        .next_power_of_two();
    while lanes <= 32 {
        let slots = cfg.experts.div_ceil(lanes);
        let group_lanes = match cfg.effective_grouping() {
            None => Some(0),
            Some(g) => {
                let size = cfg.experts / g.n_group;
                let gl = size / slots;
                (size % slots == 0 && gl.is_power_of_two()).then_some(gl)
            }
        };
        if let Some(gl) = group_lanes {
            return Some((lanes, slots, gl));
        }
        lanes *= 2;
    }
    None
}

impl GatePlan {
    /// The launch for `tokens` tokens of `cfg` (validated first), on the fast path when the
    /// shape allows unless `force_block`.
    ///
    /// # Errors
    /// [`RouterConfig::validate`]'s errors; [`Error::InvalidArgument`] if tokens x top_k
    /// passes i32::MAX.
    pub fn new(cfg: &RouterConfig, tokens: usize, force_block: bool) -> Result<Self> {
        cfg.validate()?;
        check_assignments(tokens, cfg.top_k)?;
        let too_many = || Error::overflow(OP, "tokens", format!("{tokens} tokens exceed the grid"));
        match warp_layout(cfg).filter(|_| !force_block) {
            Some((lanes, slots, group_lanes)) => Ok(GatePlan {
                path: GatePath::Warp,
                grid: u32::try_from(tokens.div_ceil(GATE_WARPS * (32 / lanes)))
                    .map_err(|_| too_many())?,
                threads: (GATE_WARPS * 32) as u32,
                smem_bytes: 0,
                lanes,
                slots,
                group_lanes,
            }),
            None => {
                let groups = cfg.effective_grouping().map_or(1, |g| g.n_group);
                Ok(GatePlan {
                    path: GatePath::Block,
                    grid: u32::try_from(tokens).map_err(|_| too_many())?,
                    threads: GATE_BLOCK_THREADS,
                    smem_bytes: gate_block_smem_bytes(cfg.experts, groups),
                    lanes: 32,
                    slots: 1,
                    group_lanes: 0,
                })
            }
        }
    }
}

/// kernels/moe/gate_kernel.cuh: gate_block_smem_bytes (choice and group score as f32, one
/// availability byte each). At most 40 KB within the 4096-expert limit.
pub(crate) fn gate_block_smem_bytes(experts: usize, groups: usize) -> u32 {
    (5 * (experts + groups)) as u32
}

fn check_assignments(tokens: usize, top_k: usize) -> Result<usize> {
    tokens
        .checked_mul(top_k)
        .filter(|&a| a <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::overflow(
                OP,
                "tokens",
                format!("{tokens} tokens x top_k {top_k} assignments exceed i32::MAX"),
            )
        })
}

/// Per-expert capacity ceil(capacity_factor x tokens x top_k / experts), at most tokens x
/// top_k (a capacity that large drops nothing).
///
/// # Errors
/// [`Error::InvalidArgument`] when capacity_factor is not a positive finite number,
/// `experts` is 0, or tokens x top_k overflows usize (`tokens`).
pub fn capacity(
    capacity_factor: f64,
    tokens: usize,
    top_k: usize,
    experts: usize,
) -> Result<usize> {
    if !(capacity_factor.is_finite() && capacity_factor > 0.0) {
        return Err(Error::invalid(
            OP,
            "capacity_factor",
            format!("{capacity_factor} must be a positive finite number"),
        ));
    }
    if experts == 0 {
        return Err(Error::invalid(OP, "experts", "0 experts"));
    }
    let assignments = tokens.checked_mul(top_k).ok_or_else(|| {
        Error::overflow(
            OP,
            "tokens",
            format!("{tokens} tokens x top_k {top_k} overflows usize"),
        )
    })?;
    let c = (capacity_factor * tokens as f64 * top_k as f64 / experts as f64).ceil();
    // Anything at or past the assignment count means no assignment is dropped. c is finite
    // and below `assignments` here, so the conversion cannot saturate.
    Ok(if c >= assignments as f64 {
        assignments
    } else {
        c as usize
    })
}

/// Sizes and chunking of one permutation shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermutePlan {
    /// Tokens.
    pub tokens: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Experts.
    pub experts: usize,
    /// tokens x top_k.
    pub assignments: usize,
    /// Padding multiple of each expert's segment (>= 1).
    pub block: usize,
    /// Per-expert capacity, `None` for no limit.
    pub capacity: Option<usize>,
    /// Assignments per warp chunk (a multiple of 32).
    pub chunk: usize,
    /// Number of chunks.
    pub chunks: usize,
    /// Warp chunks per block of the count and scatter kernels.
    pub warps: usize,
    /// Rows of the expert-ordered buffer: the padded total can never exceed this.
    pub max_slots: usize,
    /// Blocks of `block` slots in `max_slots`.
    pub max_blocks: usize,
}

impl PermutePlan {
    /// Plans the permutation of `tokens` x `top_k` assignments over `experts`.
    ///
    /// `max_slots` bounds the padded total tightly: only experts that keep an assignment
    /// are padded, so it is at most `assignments x block`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for 0 or more than 4096 experts, top_k of 0 or more than
    /// `experts`, a capacity factor that is not positive and finite, a `block` above
    /// [`MAX_BLOCK`], or sizes past i32.
    pub fn new(tokens: usize, top_k: usize, experts: usize, opts: PermuteOptions) -> Result<Self> {
        if experts == 0 || experts > MAX_EXPERTS {
            let problem = format!("{experts} experts; 1..={MAX_EXPERTS} are supported");
            return Err(if experts == 0 {
                Error::invalid(OP, "experts", problem)
            } else {
                Error::unsupported(OP, "experts", problem)
            });
        }
        if top_k == 0 || top_k > experts {
            return Err(Error::invalid(
                OP,
                "top_k",
                format!("top_k {top_k} must be in 1..={experts}"),
            ));
        }
        let assignments = check_assignments(tokens, top_k)?;
        if opts.block > MAX_BLOCK {
            return Err(Error::unsupported(
                OP,
                "block",
                format!("padding multiple {} exceeds {MAX_BLOCK}", opts.block),
            ));
        }
        let block = opts.block.max(1);
        let capacity = opts
            .capacity_factor
            .map(|f| capacity(f, tokens, top_k, experts))
            .transpose()?;
        // The padded total is sum_e ceil(kept_e / block) x block: at most kept_e + block - 1
        // for each expert that keeps an assignment, 0 for the others. So it is bounded by
        // K + min(experts, K) x (block - 1) with K = min(assignments, experts x capacity)
        // the kept total, and it is a multiple of block.
        let kept_bound =
            capacity.map_or(assignments, |c| assignments.min(c.saturating_mul(experts)));
        let padded_experts = experts.min(kept_bound);
        let max_slots = padded_experts
            .checked_mul(block - 1)
            .and_then(|pad| kept_bound.checked_add(pad))
            .and_then(|s| s.div_ceil(block).checked_mul(block))
            .filter(|&s| s <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::overflow(
                    OP,
                    "block",
                    format!(
                        "padding {experts} experts to multiples of {block} passes i32::MAX slots"
                    ),
                )
            })?;
        let chunk = (assignments.div_ceil(MAX_CHUNKS).div_ceil(32) * 32).max(MIN_CHUNK);
        let chunks = assignments.div_ceil(chunk);
        let warps = (PERMUTE_SMEM_BUDGET / (4 * experts)).clamp(1, MAX_PERMUTE_WARPS);
        Ok(PermutePlan {
            tokens,
            top_k,
            experts,
            assignments,
            block,
            capacity,
            chunk,
            chunks,
            warps,
            max_slots,
            max_blocks: max_slots / block,
        })
    }

    /// Dynamic shared memory of the count and scatter kernels: one int32 counter per expert
    /// per warp.
    pub(crate) fn smem_bytes(&self) -> u32 {
        (4 * self.experts * self.warps) as u32
    }

    /// Blocks of the count and scatter kernels.
    pub(crate) fn count_grid(&self) -> usize {
        self.chunks.div_ceil(self.warps)
    }
}

/// Chunking of the router statistics (one block per chunk of tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsPlan {
    /// Tokens per chunk, 1..=256.
    pub chunk_tokens: usize,
    /// Number of chunks.
    pub chunks: usize,
}

impl StatsPlan {
    /// About 1024 chunks at most for up to 256k tokens; at least 16 tokens per chunk.
    pub fn new(tokens: usize) -> Self {
        let chunk_tokens = tokens.div_ceil(1024).clamp(16, STATS_MAX_CHUNK_TOKENS);
        StatsPlan {
            chunk_tokens,
            chunks: tokens.div_ceil(chunk_tokens),
        }
    }
}

/// Scale of the load-balancing gradient: alpha x E / (tokens^2 x top_k).
pub(crate) fn aux_grad_scale(aux_coef: f64, experts: usize, tokens: usize, top_k: usize) -> f64 {
    let t = tokens as f64;
    aux_coef * experts as f64 / (t * t * top_k as f64)
}

/// Scale of the z-loss gradient: 2 beta / tokens.
pub(crate) fn z_grad_scale(z_coef: f64, tokens: usize) -> f64 {
    2.0 * z_coef / tokens as f64
}

/// Checks a \[tokens, top_k\] expert-id table: its length, every id in 0..experts, and no
/// expert twice in one token. Shared by the GPU upload and the CPU reference. The work is
/// O(ids.len() x log top_k) whatever the arguments (rows past 32 entries are checked for
/// duplicates by sorting a copy, so a huge top_k cannot make it quadratic).
pub(crate) fn validate_ids(
    op: &'static str,
    ids: &[i32],
    tokens: usize,
    top_k: usize,
    experts: usize,
) -> Result<()> {
    if Some(ids.len()) != tokens.checked_mul(top_k) {
        return Err(Error::invalid(
            op,
            "ids",
            format!("{} ids for {tokens} tokens x top_k {top_k}", ids.len()),
        ));
    }
    let in_range = |e: i32| usize::try_from(e).is_ok_and(|e| e < experts);
    let mut sorted = Vec::new();
    for (t, row) in ids.chunks(top_k.max(1)).enumerate() {
        if let Some((j, &e)) = row.iter().enumerate().find(|(_, &e)| !in_range(e)) {
            return Err(Error::invalid(
                op,
                "ids",
                format!("id {e} at token {t} rank {j} is outside 0..{experts}"),
            ));
        }
        let twice = if row.len() <= 32 {
            row.iter()
                .enumerate()
                .find(|&(j, e)| row[..j].contains(e))
                .map(|(_, &e)| e)
        } else {
            sorted.clear();
            sorted.extend_from_slice(row);
            sorted.sort_unstable();
            sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
        };
        if let Some(e) = twice {
            return Err(Error::invalid(
                op,
                "ids",
                format!("expert {e} appears twice at token {t}"),
            ));
        }
    }
    Ok(())
}
