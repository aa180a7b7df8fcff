//! The paged KV-cache layout (vLLM / FlashInfer "NHD" pages) and its host-side validation.
//! [`super::append_kv`] writes it; no kernel reads it yet. The f64 gather and scatter in
//! [`super::reference`] define its meaning for the decode kernels to come.
//!
//! A cache tensor (one for K, one for V) is `[pages, page_size, heads_kv, head_dim]`, dense:
//! slot `s` of page `p`, head `h`, channel `c` lives at
//! `((p * page_size + s) * heads_kv + h) * head_dim + c`. Sequence `b` of a batch owns the
//! pages `block_table[b * max_pages_per_seq + i]` for `i < ceil(seqlens[b] / page_size)`,
//! in order: its token `t` is slot `t % page_size` of page entry `t / page_size`. Entries
//! past a sequence's last page are ignored (padding, usually -1). Two sequences may share
//! a page (a common prefix) for reading.

use crate::error::{Error, Result};

const OP: &str = "paged_kv";

/// The largest page size (tokens per page).
pub const MAX_PAGE_SIZE: usize = 256;

/// The largest head dim of a cache (DeepSeek MLA's 576-wide latent fits).
pub const MAX_CACHE_HEAD_DIM: usize = 1024;

/// Shape of one paged cache tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvLayout {
    /// Tokens per page, 1..=[`MAX_PAGE_SIZE`].
    pub page_size: usize,
    /// Pages in the pool (page ids are 0..pages, at most `i32::MAX`).
    pub pages: usize,
    /// KV heads.
    pub heads_kv: usize,
    /// Channels per head, 1..=[`MAX_CACHE_HEAD_DIM`].
    pub head_dim: usize,
}

/// The page tables of a batch, as int32 host arrays (what a decode launch uploads).
#[derive(Debug, Clone, Copy)]
pub struct PageTable<'a> {
    /// `[batch, max_pages_per_seq]`, row-major: sequence b's page ids in order.
    pub block_table: &'a [i32],
    /// Columns of `block_table`.
    pub max_pages_per_seq: usize,
    /// `[batch]`: tokens in each sequence's cache.
    pub seqlens: &'a [i32],
}

/// A page table that passed [`PagedKvLayout::validate_table`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedTable {
    /// Sequences.
    pub batch: usize,
    /// `batch + 1` offsets of each sequence's tokens in a dense (varlen) concatenation.
    pub cu_seqlens: Vec<usize>,
}

impl PagedKvLayout {
    /// Checks the shape and returns the cache's element count.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a page size outside 1..=[`MAX_PAGE_SIZE`]
    /// (`page_size`), more than `i32::MAX` pages (`pages`), no KV head (`heads_kv`), a head
    /// dim outside 1..=[`MAX_CACHE_HEAD_DIM`] (`head_dim`), or a cache size that overflows
    /// usize (`cache`).
    pub fn validate(&self) -> Result<usize> {
        if self.page_size == 0 || self.page_size > MAX_PAGE_SIZE {
            return Err(Error::invalid(
                OP,
                "page_size",
                format!("{} outside 1..={MAX_PAGE_SIZE}", self.page_size),
            ));
        }
        if self.pages > i32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "pages",
                format!("{} pages: ids must fit in int32", self.pages),
            ));
        }
        if self.heads_kv == 0 {
            return Err(Error::invalid(OP, "heads_kv", "must be at least 1"));
        }
        if self.head_dim == 0 || self.head_dim > MAX_CACHE_HEAD_DIM {
            return Err(Error::invalid(
                OP,
                "head_dim",
                format!("{} outside 1..={MAX_CACHE_HEAD_DIM}", self.head_dim),
            ));
        }
        self.pages
            .checked_mul(self.page_size)
            .and_then(|x| x.checked_mul(self.heads_kv))
            .and_then(|x| x.checked_mul(self.head_dim))
            .ok_or_else(|| Error::invalid(OP, "cache", format!("{self:?} overflows usize")))
    }

    /// Elements in one cache tensor (K or V).
    ///
    /// # Errors
    /// As [`PagedKvLayout::validate`].
    pub fn cache_len(&self) -> Result<usize> {
        self.validate()
    }

    /// Element offset of (page, slot, head, 0) in a cache tensor. The caller has validated
    /// the layout, and page, slot and head are in range.
    fn row(&self, page: usize, slot: usize, head: usize) -> usize {
        ((page * self.page_size + slot) * self.heads_kv + head) * self.head_dim
    }

    /// Checks a batch's page tables against the layout: every page a sequence uses exists
    /// and each table row is long enough for its sequence.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for everything [`PagedKvLayout::validate`] rejects, plus:
    /// `block_table` not `batch x max_pages_per_seq` long or that product overflowing
    /// (`block_table`); a negative length (`seqlens`); a sequence needing more pages than
    /// a row holds (`seqlens`: "table too short"); a used page id outside 0..pages
    /// (`block_table`); a total token count past `i32::MAX` (`seqlens`).
    pub fn validate_table(&self, t: &PageTable) -> Result<ValidatedTable> {
        self.validate()?;
        let batch = t.seqlens.len();
        let want = batch.checked_mul(t.max_pages_per_seq).ok_or_else(|| {
            Error::invalid(
                OP,
                "block_table",
                "batch x max_pages_per_seq overflows usize",
            )
        })?;
        if t.block_table.len() != want {
            return Err(Error::invalid(
                OP,
                "block_table",
                format!(
                    "holds {} entries, expected batch {batch} x max_pages_per_seq {} = {want}",
                    t.block_table.len(),
                    t.max_pages_per_seq
                ),
            ));
        }
        let mut cu = Vec::with_capacity(batch + 1);
        cu.push(0usize);
        let mut total = 0usize;
        for (b, &len) in t.seqlens.iter().enumerate() {
            let len = usize::try_from(len).map_err(|_| {
                Error::invalid(OP, "seqlens", format!("sequence {b} has length {len} < 0"))
            })?;
            let used = len.div_ceil(self.page_size);
            if used > t.max_pages_per_seq {
                return Err(Error::invalid(
                    OP,
                    "seqlens",
                    format!(
                        "table too short: sequence {b} holds {len} tokens, needing {used} pages \
                         of {}, but its table row has {}",
                        self.page_size, t.max_pages_per_seq
                    ),
                ));
            }
            let row = &t.block_table[b * t.max_pages_per_seq..][..used];
            if let Some((i, &id)) = row
                .iter()
                .enumerate()
                .find(|&(_, &id)| id < 0 || id as usize >= self.pages)
            {
                return Err(Error::invalid(
                    OP,
                    "block_table",
                    format!(
                        "sequence {b}, page entry {i}: page id {id} outside 0..{}",
                        self.pages
                    ),
                ));
            }
            total = total
                .checked_add(len)
                .filter(|&x| x <= i32::MAX as usize)
                .ok_or_else(|| {
                    Error::invalid(OP, "seqlens", "the batch holds more than i32::MAX tokens")
                })?;
            cu.push(total);
        }
        Ok(ValidatedTable {
            batch,
            cu_seqlens: cu,
        })
    }

    /// Element offset, in a cache tensor, of token `pos` of sequence `seq`, head `head`,
    /// channel 0.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid table (see
    /// [`PagedKvLayout::validate_table`]), or a sequence, position or head out of range.
    pub fn token_offset(
        &self,
        t: &PageTable,
        seq: usize,
        pos: usize,
        head: usize,
    ) -> Result<usize> {
        let v = self.validate_table(t)?;
        self.token_offset_validated(t, &v, seq, pos, head)
    }

    fn token_offset_validated(
        &self,
        t: &PageTable,
        v: &ValidatedTable,
        seq: usize,
        pos: usize,
        head: usize,
    ) -> Result<usize> {
        if seq >= v.batch {
            return Err(Error::invalid(
                OP,
                "seq",
                format!("sequence {seq} of a batch of {}", v.batch),
            ));
        }
        let len = v.cu_seqlens[seq + 1] - v.cu_seqlens[seq];
        if pos >= len {
            return Err(Error::invalid(
                OP,
                "pos",
                format!("position {pos} of a sequence of {len} tokens"),
            ));
        }
        if head >= self.heads_kv {
            return Err(Error::invalid(
                OP,
                "head",
                format!("head {head} of {}", self.heads_kv),
            ));
        }
        // Validated: the entry is a page id in 0..pages.
        let page = t.block_table[seq * t.max_pages_per_seq + pos / self.page_size] as usize;
        Ok(self.row(page, pos % self.page_size, head))
    }
}

/// The dense twin of a paged cache: `[total_tokens, heads_kv, head_dim]` with the batch's
/// sequences concatenated (the varlen layout attention takes; offsets in
/// [`ValidatedTable::cu_seqlens`]).
pub(crate) fn dense_len(l: &PagedKvLayout, v: &ValidatedTable) -> Result<usize> {
    v.cu_seqlens
        .last()
        .copied()
        .unwrap_or(0)
        .checked_mul(l.heads_kv)
        .and_then(|x| x.checked_mul(l.head_dim))
        .ok_or_else(|| Error::invalid(OP, "seqlens", "dense size overflows usize"))
}

/// Copies every (token, head) row between the paged cache and the dense tensor:
/// `f(cache_offset, dense_offset)` per row, after validation.
pub(crate) fn for_each_row(
    l: &PagedKvLayout,
    t: &PageTable,
    mut f: impl FnMut(usize, usize),
) -> Result<ValidatedTable> {
    let v = l.validate_table(t)?;
    for b in 0..v.batch {
        for pos in 0..v.cu_seqlens[b + 1] - v.cu_seqlens[b] {
            for h in 0..l.heads_kv {
                let src = l.token_offset_validated(t, &v, b, pos, h)?;
                let dst = ((v.cu_seqlens[b] + pos) * l.heads_kv + h) * l.head_dim;
                f(src, dst);
            }
        }
    }
    Ok(v)
}
