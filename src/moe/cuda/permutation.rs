//! Permutation: the counts / scan / scatter launches that sort assignments by expert into
//! a [`Permutation`].

#[allow(clippy::wildcard_imports)]
use super::*;

/// The buffers of one permutation: the ids and every table and workspace.
pub(crate) struct PermuteBufs {
    pub ids: Buf,
    pub chunk_counts: Buf,
    pub routed_counts: Buf,
    pub counts: Buf,
    pub offsets: Buf,
    pub slot_of: Buf,
    pub slot_assignment: Buf,
    pub block_expert: Buf,
    pub dropped: Buf,
}

/// The permutation's three launches, in order: per-chunk counts, the one-block scan, the
/// scatter (the count and scatter grids are empty when there are no assignments). Checks
/// every table against `p`'s sizes (the ids under `ids`, the tables under `perm`).
pub(crate) fn plan_permute(
    p: &PermutePlan,
    b: &PermuteBufs,
) -> Result<[KernelLaunch<sys::LongctxMoePermuteParams>; 3]> {
    check_len(b.ids.len, p.assignments, "ids", "tokens x top_k")?;
    for (buf, want, what) in [
        (
            &b.chunk_counts,
            elems(p.chunks, p.experts, "perm")?,
            "chunks x experts",
        ),
        (&b.routed_counts, p.experts, "experts"),
        (&b.counts, p.experts, "experts"),
        (&b.offsets, p.experts + 1, "experts + 1"),
        (&b.slot_of, p.assignments, "tokens x top_k"),
        (&b.slot_assignment, p.max_slots, "max_slots"),
        (&b.block_expert, p.max_blocks, "max_blocks"),
        (&b.dropped, 1, "one count"),
    ] {
        check_len(buf.len, want, "perm", what)?;
    }
    let params = sys::LongctxMoePermuteParams {
        ids: b.ids.addr,
        chunk_counts: b.chunk_counts.addr,
        routed_counts: b.routed_counts.addr,
        counts: b.counts.addr,
        offsets: b.offsets.addr,
        slot_of: b.slot_of.addr,
        slot_assignment: b.slot_assignment.addr,
        block_expert: b.block_expert.addr,
        dropped: b.dropped.addr,
        assignments: u32_of(p.assignments, "ids")?,
        experts: u32_of(p.experts, "experts")?,
        block: u32_of(p.block, "block")?,
        capacity: match p.capacity {
            None => sys::LONGCTX_MOE_NO_CAPACITY,
            Some(c) => u32::try_from(c.min(p.assignments)).map_err(|_| {
                Error::overflow(OP, "capacity_factor", "capacity does not fit in u32")
            })?,
        },
        chunk: u32_of(p.chunk, "ids")?,
        chunks: u32_of(p.chunks, "ids")?,
        warps: u32_of(p.warps, "experts")?,
        max_slots: u32_of(p.max_slots, "block")?,
        max_blocks: u32_of(p.max_blocks, "block")?,
        pad0: 0,
    };
    let walk = |id| -> Result<KernelLaunch<sys::LongctxMoePermuteParams>> {
        Ok(KernelLaunch {
            id,
            params,
            grid: (grid_u32(p.count_grid(), "ids")?, 1, 1),
            block: (u32_of(32 * p.warps, "experts")?, 1, 1),
            smem_bytes: p.smem_bytes(),
        })
    };
    Ok([
        walk(KernelId::MoeCount)?,
        KernelLaunch {
            id: KernelId::MoeScan,
            params,
            grid: (1, 1, 1),
            block: (SCAN_THREADS, 1, 1),
            smem_bytes: 0,
        },
        walk(KernelId::MoeScatter)?,
    ])
}

// ------------------------------------------------------------------ permutation

/// Output of [`permute`]: counts, offsets, the slot of every assignment, the assignment of
/// every slot, the expert of every block of slots, the drop count (see
/// [`PermutationTables`] for the layout), plus the kernels' workspace.
#[derive(Debug)]
pub struct Permutation {
    pub(super) plan: PermutePlan,
    pub(super) routed_counts: CudaSlice<i32>,
    pub(super) counts: CudaSlice<i32>,
    pub(super) offsets: CudaSlice<i32>,
    pub(super) slot_of: CudaSlice<i32>,
    pub(super) slot_assignment: CudaSlice<i32>,
    pub(super) block_expert: CudaSlice<i32>,
    pub(super) dropped: CudaSlice<i32>,
    pub(super) chunk_counts: CudaSlice<i32>,
    /// Whether the buffers hold a permutation (all slots in range) yet.
    pub(super) filled: bool,
}

impl Permutation {
    /// Allocates the tables for `tokens` x `top_k` assignments over `experts`.
    ///
    /// # Errors
    /// [`PermutePlan::new`]'s errors (experts, top_k, a capacity factor that is not positive
    /// and finite, sizes past i32); [`Error::Cuda`] on allocation failure.
    pub fn new(
        dev: &Device,
        tokens: usize,
        top_k: usize,
        experts: usize,
        opts: PermuteOptions,
    ) -> Result<Self> {
        let plan = PermutePlan::new(tokens, top_k, experts, opts)?;
        Ok(Permutation {
            routed_counts: alloc(dev, experts)?,
            counts: alloc(dev, experts)?,
            offsets: alloc(dev, experts + 1)?,
            slot_of: alloc(dev, plan.assignments)?,
            slot_assignment: alloc(dev, plan.max_slots)?,
            block_expert: alloc(dev, plan.max_blocks)?,
            dropped: alloc(dev, 1)?,
            chunk_counts: alloc(dev, plan.chunks * experts)?,
            plan,
            filled: false,
        })
    }

    /// The plan: sizes (max_slots is the row count of expert-ordered buffers), capacity,
    /// chunking.
    pub fn plan(&self) -> &PermutePlan {
        &self.plan
    }

    /// \[experts\] assignments routed to each expert, before capacity.
    pub fn routed_counts(&self) -> &CudaSlice<i32> {
        &self.routed_counts
    }

    /// \[experts\] assignments kept per expert.
    pub fn counts(&self) -> &CudaSlice<i32> {
        &self.counts
    }

    /// \[experts + 1\] padded segment starts, then the total (the rows a grouped GEMM runs).
    pub fn offsets(&self) -> &CudaSlice<i32> {
        &self.offsets
    }

    /// \[tokens x top_k\] slot of each assignment, -1 when dropped.
    pub fn slot_of(&self) -> &CudaSlice<i32> {
        &self.slot_of
    }

    /// \[max_slots\] assignment in each slot, -1 for padding and the unused tail.
    pub fn slot_assignment(&self) -> &CudaSlice<i32> {
        &self.slot_assignment
    }

    /// \[max_blocks\] expert of each block of `block` slots, -1 past the total.
    pub fn block_expert(&self) -> &CudaSlice<i32> {
        &self.block_expert
    }

    /// \[1\] assignments dropped by the capacity.
    pub fn dropped(&self) -> &CudaSlice<i32> {
        &self.dropped
    }

    /// Copies every table back (waits for the stream).
    ///
    /// # Errors
    /// [`Error::Cuda`] on copy failure or if a queued kernel failed.
    pub fn download(&self, dev: &Device) -> Result<PermutationTables> {
        let p = &self.plan;
        let get = |s: &CudaSlice<i32>, n: usize| -> Result<Vec<i32>> {
            let mut v = dev.download(s)?;
            v.truncate(n);
            Ok(v)
        };
        let dropped = get(&self.dropped, 1)?;
        Ok(PermutationTables {
            routed_counts: get(&self.routed_counts, p.experts)?,
            counts: get(&self.counts, p.experts)?,
            offsets: get(&self.offsets, p.experts + 1)?,
            slot_of: get(&self.slot_of, p.assignments)?,
            slot_assignment: get(&self.slot_assignment, p.max_slots)?,
            block_expert: get(&self.block_expert, p.max_blocks)?,
            dropped: usize::try_from(dropped.first().copied().unwrap_or(0)).unwrap_or(0),
        })
    }

    pub(super) fn check_filled(&self, dev: &Device) -> Result<()> {
        check_filled(self.filled)?;
        check_owned(dev, &self.slot_of, "perm")
    }
}

/// Sorts the assignments of `ids` by expert into `perm` (three launches: per-chunk counts,
/// one-block scan, scatter). Stable: within an expert, assignments keep token order; with a
/// capacity the later ones are dropped. Deterministic: no atomics.
///
/// # Errors
/// [`Error::InvalidArgument`] when `perm` was made for another shape than `ids` or either
/// lives on another device; [`Error::KernelsNotCompiled`]; [`Error::Cuda`].
pub fn permute(dev: &Device, ids: &ExpertIds, perm: &mut Permutation) -> Result<()> {
    let p = perm.plan;
    if ids.tokens != p.tokens || ids.top_k != p.top_k || ids.experts != p.experts {
        return Err(Error::invalid(
            OP,
            "perm",
            format!(
                "made for {} tokens x top_k {} of {} experts; ids are {} x {} of {}",
                p.tokens, p.top_k, p.experts, ids.tokens, ids.top_k, ids.experts
            ),
        ));
    }
    check_owned(dev, &ids.data, "ids")?;
    for s in [
        &perm.chunk_counts,
        &perm.routed_counts,
        &perm.counts,
        &perm.offsets,
        &perm.slot_of,
        &perm.slot_assignment,
        &perm.block_expert,
        &perm.dropped,
    ] {
        check_owned(dev, s, "perm")?;
    }
    let stream = dev.stream();
    let Permutation {
        routed_counts,
        counts,
        offsets,
        slot_of,
        slot_assignment,
        block_expert,
        dropped,
        chunk_counts,
        ..
    } = perm;
    let lens = [
        chunk_counts.len(),
        routed_counts.len(),
        counts.len(),
        offsets.len(),
        slot_of.len(),
        slot_assignment.len(),
        block_expert.len(),
        dropped.len(),
    ];
    let (ids_ptr, _g0) = ids.data.device_ptr(stream);
    let (cc, _g1) = chunk_counts.device_ptr_mut(stream);
    let (routed, _g2) = routed_counts.device_ptr_mut(stream);
    let (kept, _g3) = counts.device_ptr_mut(stream);
    let (off, _g4) = offsets.device_ptr_mut(stream);
    let (so, _g5) = slot_of.device_ptr_mut(stream);
    let (sa, _g6) = slot_assignment.device_ptr_mut(stream);
    let (be, _g7) = block_expert.device_ptr_mut(stream);
    let (dr, _g8) = dropped.device_ptr_mut(stream);
    let buf = |addr, len| Buf { addr, len };
    let launches = plan_permute(
        &p,
        &PermuteBufs {
            ids: dbuf(&ids.data, ids_ptr),
            chunk_counts: buf(cc, lens[0]),
            routed_counts: buf(routed, lens[1]),
            counts: buf(kept, lens[2]),
            offsets: buf(off, lens[3]),
            slot_of: buf(so, lens[4]),
            slot_assignment: buf(sa, lens[5]),
            block_expert: buf(be, lens[6]),
            dropped: buf(dr, lens[7]),
        },
    )?;
    for l in &launches {
        // SAFETY: ids holds `assignments` in-range expert ids (ExpertIds' invariant, shape
        // checked above) and plan_permute checked every table against the plan:
        // chunk_counts chunks x experts, slot_of assignments, slot_assignment max_slots (a
        // bound on the padded total), block_expert max_slots / block, offsets experts + 1.
        // The dynamic shared memory is one int per expert per warp, as the count and
        // scatter kernels index it; the scan is one block of its compiled size. All outputs
        // are distinct allocations from ids and from each other, on this context (checked
        // above); the guards live until the end of this function. The launches run in
        // stream order, each reading what the previous one wrote.
        unsafe { launch(dev, l)? };
    }
    perm.filled = true;
    Ok(())
}
