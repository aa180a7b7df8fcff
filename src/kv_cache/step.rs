//! One step of a batch over a paged cache: the page tables, each sequence's cache length
//! (counting this step's new tokens) and the new tokens per sequence. Append writes the new
//! tokens; decode and extend attend from them. [`StepTable`] is the host description,
//! [`PagedKvLayout::validate_step`] checks it, and [`KvStep`] holds its device copy, built
//! once per step outside the ops (the ops themselves copy nothing), and reusable across
//! steps without reallocating (CUDA graphs replay with the same addresses).

use cudarc::driver::CudaSlice;

use super::paged::{PageTable, PagedKvLayout};
use crate::device::{cuda_err, Device};
use crate::error::{Error, Result};

const OP: &str = "kv_step";

/// The most new tokens one sequence may bring to a decode step (speculative decoding).
pub const MAX_DECODE_QUERIES: usize = 16;

/// A step of a batch, on the host.
///
/// Sequence `b` holds `table.seqlens[b]` tokens once this step's tokens are in the cache;
/// the last `cu_new[b + 1] - cu_new[b]` of them are the step's new tokens (the rows of the
/// new K/V and of the queries, concatenated over the batch in sequence order). While
/// decoding each sequence brings 1 (or a few, with speculative decoding); while prefilling
/// a chunk.
#[derive(Debug, Clone, Copy)]
pub struct StepTable<'a> {
    /// Page tables and lengths after the step.
    pub table: PageTable<'a>,
    /// `[batch + 1]` offsets of each sequence's new tokens: `cu_new[0] = 0`, nondecreasing.
    pub cu_new: &'a [i32],
}

/// A step that passed [`PagedKvLayout::validate_step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedStep {
    /// Sequences.
    pub batch: usize,
    /// Cache length of each sequence after the step.
    pub seqlens: Vec<usize>,
    /// `batch + 1` offsets of the new tokens.
    pub cu_new: Vec<usize>,
    /// New tokens in the batch.
    pub total_new: usize,
    /// The longest cache.
    pub max_seqlen: usize,
    /// The most new tokens of one sequence.
    pub max_new: usize,
    /// Columns of the block table.
    pub max_pages_per_seq: usize,
}

impl ValidatedStep {
    /// New tokens of sequence `b`.
    pub fn new_tokens(&self, b: usize) -> usize {
        self.cu_new[b + 1] - self.cu_new[b]
    }
}

impl PagedKvLayout {
    /// Checks a step against the layout: the page tables as
    /// [`PagedKvLayout::validate_table`] does, and the new-token offsets.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for everything `validate_table` rejects, plus `cu_new` not
    /// `batch + 1` long, not starting at 0, decreasing, or giving a sequence more new tokens
    /// than its length (`cu_new`), more than `i32::MAX` table columns (`block_table`).
    pub fn validate_step(&self, s: &StepTable) -> Result<ValidatedStep> {
        let v = self.validate_table(&s.table)?;
        if s.table.max_pages_per_seq > i32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "block_table",
                format!(
                    "max_pages_per_seq {} exceeds i32::MAX",
                    s.table.max_pages_per_seq
                ),
            ));
        }
        if s.cu_new.len() != v.batch + 1 {
            return Err(Error::invalid(
                OP,
                "cu_new",
                format!(
                    "holds {} offsets, expected batch + 1 = {}",
                    s.cu_new.len(),
                    v.batch + 1
                ),
            ));
        }
        if s.cu_new[0] != 0 {
            return Err(Error::invalid(
                OP,
                "cu_new",
                format!("starts at {}, not 0", s.cu_new[0]),
            ));
        }
        let mut cu_new = Vec::with_capacity(v.batch + 1);
        cu_new.push(0usize);
        let mut seqlens = Vec::with_capacity(v.batch);
        let (mut max_seqlen, mut max_new) = (0, 0);
        for b in 0..v.batch {
            let (lo, hi) = (s.cu_new[b], s.cu_new[b + 1]);
            if hi < lo {
                return Err(Error::invalid(
                    OP,
                    "cu_new",
                    format!("decreases at sequence {b}: {lo} then {hi}"),
                ));
            }
            let n = (hi - lo) as usize; // hi >= lo >= 0
            let len = v.cu_seqlens[b + 1] - v.cu_seqlens[b];
            if n > len {
                return Err(Error::invalid(
                    OP,
                    "cu_new",
                    format!("sequence {b} brings {n} new tokens but its cache holds only {len}"),
                ));
            }
            cu_new.push(hi as usize);
            seqlens.push(len);
            max_seqlen = max_seqlen.max(len);
            max_new = max_new.max(n);
        }
        Ok(ValidatedStep {
            batch: v.batch,
            seqlens,
            total_new: cu_new[v.batch],
            cu_new,
            max_seqlen,
            max_new,
            max_pages_per_seq: s.table.max_pages_per_seq,
        })
    }
}

/// A validated step's metadata on the device: the block table, the lengths and the
/// new-token offsets as int32 arrays, and the host copy of what the plans need.
///
/// Built with [`KvStep::upload`]; [`KvStep::update`] refills it for the next step, reusing
/// its buffers while they are large enough (so a captured CUDA graph keeps valid
/// addresses when every step fits the first one's capacity).
#[derive(Debug)]
pub struct KvStep {
    layout: PagedKvLayout,
    step: ValidatedStep,
    block_table: CudaSlice<i32>,
    seqlens: CudaSlice<i32>,
    cu_new: CudaSlice<i32>,
}

impl KvStep {
    /// Validates `step` against `layout` and copies it to the device on `dev`'s stream.
    ///
    /// # Errors
    /// As [`PagedKvLayout::validate_step`]; [`Error::Cuda`] when an allocation or a copy
    /// fails.
    pub fn upload(dev: &Device, layout: &PagedKvLayout, step: &StepTable) -> Result<Self> {
        let v = layout.validate_step(step)?;
        let st = dev.stream();
        let block_table = st
            .clone_htod(nonempty(step.table.block_table))
            .map_err(cuda_err(OP))?;
        let seqlens = st
            .clone_htod(nonempty(step.table.seqlens))
            .map_err(cuda_err(OP))?;
        let cu_new = st.clone_htod(step.cu_new).map_err(cuda_err(OP))?;
        Ok(KvStep {
            layout: *layout,
            step: v,
            block_table,
            seqlens,
            cu_new,
        })
    }

    /// Refills this step with `step` (same layout): the buffers are reused where they are
    /// large enough and reallocated otherwise.
    ///
    /// # Errors
    /// As [`KvStep::upload`]. On error the step keeps its previous contents.
    pub fn update(&mut self, dev: &Device, step: &StepTable) -> Result<()> {
        let v = self.layout.validate_step(step)?;
        let st = dev.stream();
        for (buf, host) in [
            (&mut self.block_table, step.table.block_table),
            (&mut self.seqlens, step.table.seqlens),
            (&mut self.cu_new, step.cu_new),
        ] {
            let host = nonempty(host);
            if buf.len() < host.len() {
                *buf = st.clone_htod(host).map_err(cuda_err(OP))?;
            } else {
                let mut view = buf.slice_mut(0..host.len());
                st.memcpy_htod(host, &mut view).map_err(cuda_err(OP))?;
            }
        }
        self.step = v;
        Ok(())
    }

    /// The layout the step was validated against.
    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }

    /// The validated host description.
    pub fn validated(&self) -> &ValidatedStep {
        &self.step
    }

    pub(crate) fn block_table(&self) -> &CudaSlice<i32> {
        &self.block_table
    }

    pub(crate) fn seqlens(&self) -> &CudaSlice<i32> {
        &self.seqlens
    }

    pub(crate) fn cu_new(&self) -> &CudaSlice<i32> {
        &self.cu_new
    }
}

/// cudarc refuses empty copies; an empty table travels as one unused padding entry.
fn nonempty(s: &[i32]) -> &[i32] {
    if s.is_empty() {
        &[-1]
    } else {
        s
    }
}
