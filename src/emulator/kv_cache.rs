//! The KV-cache ops on host buffers, through the emulator.

use super::{run, Arch, HostBuf};
use crate::dtype::Element;
use crate::error::Result;
use crate::kv_cache::{plan_merge, LseLayout, MergeAddrs, MergeOptions, MergeShape, StackedStates};
use crate::layout::HeadsLayout;

/// [`crate::kv_cache::merge_states`] on the CPU: merges the parts stacked in `parts_o` and
/// `parts_lse` (as `layout` says) into `out_o` / `out_lse`.
///
/// # Errors
/// As the GPU op, plus [`Error::Emulator`](crate::Error::Emulator) when the kernel misbehaves.
#[allow(clippy::too_many_arguments)]
pub fn merge_states<T: Element>(
    parts_o: &[T],
    parts_lse: &[f32],
    layout: &StackedStates,
    out_o: &mut [T],
    out_o_layout: &HeadsLayout,
    out_lse: &mut [f32],
    out_lse_layout: &LseLayout,
    opts: &MergeOptions,
) -> Result<()> {
    let v = MergeShape {
        parts: *layout,
        parts_o_len: parts_o.len(),
        parts_lse_len: parts_lse.len(),
        out_o: *out_o_layout,
        out_o_len: out_o.len(),
        out_lse: *out_lse_layout,
        out_lse_len: out_lse.len(),
    }
    .validate()?;
    let po = HostBuf::input(parts_o, c"parts.o");
    let pl = HostBuf::input(parts_lse, c"parts.lse");
    let oo = HostBuf::output(out_o, c"out_o");
    let ol = HostBuf::output(out_lse, c"out_lse");
    let plan = plan_merge::<T>(
        &v,
        opts,
        &MergeAddrs {
            parts_o: po.addr(),
            parts_lse: pl.addr(),
            out_o: oo.addr(),
            out_lse: ol.addr(),
        },
    )?;
    match plan {
        Some(l) => run("merge_states", &l, Arch::Sm80, &[po, pl, oo, ol]),
        None => Ok(()),
    }
}
