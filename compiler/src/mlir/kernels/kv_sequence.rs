//! How attention reads sequence-axis caches (`#kv(dct | pswf, axis =
//! sequence)`, layout and rule in `sparsec_ir::kv_sequence`; the basis only
//! changes the matrix the appender compresses a block with, not the reading):
//! a query reads the sinks'
//! exact rows, then the low-pass rows of the blocks older than its recent
//! positions (f16, each score raised by ln(block/m)), then its recent
//! positions' exact rows from the ring. Three runs of keys through one
//! online softmax; a low-pass block costs `m` keys instead of `block`.
//!
//! Both backends read the runs through attention's kernels
//! (`attention.rs`): the CPU split variant (a unit per (row, split) serves
//! every head, each key's row widened once for its KV group, in tiles of
//! keys; a decode row's keys split over units and combined) and the NVPTX
//! one (a block of warps per (row, head), a decode row's keys split over
//! blocks and combined). This file gives them the layout's views, the runs
//! (`SeqCache::runs_at`) and where a run's key lies (`SeqCache::view_row`).

use super::warp_rows::{cache_views, check_f16_caches, CacheView};
use super::{KernelCtx, VW};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use sparsec_ir::kv_sequence::SeqLayout;

/// A sequence-axis attention's caches: their layout, and the K and V
/// caches viewed as exact f32 rows and as f16 low-pass rows.
pub(super) struct SeqCache {
    pub l: SeqLayout,
    pub k: CacheView,
    pub v: CacheView,
}

/// Which run of keys, and how a key of it is found.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Run {
    /// Positions `0..min(sinks, p + 1)`, exact.
    Sinks,
    /// Low-pass rows `0..blocks·m`.
    LowPass,
    /// Positions from the first not read low-pass to p, exact, in the ring.
    Recent,
}

/// The runs a query at position p reads: `min(sinks, p + 1)`, the low-pass
/// rows read (`read_blocks(p)·m`), and the first recent position and `p + 1`.
pub(super) struct SeqRuns {
    pub sinks_end: V,
    pub low_rows: V,
    pub recent: (V, V),
}

/// The caches of an attention with `#kv(dct | pswf, axis = sequence)`, after
/// checking what its kernels need: `(kvh, d)` KV heads and head width, as
/// `emit_attention` checked them.
pub(super) fn caches(b: &mut KernelBuilder, cx: &KernelCtx<'_>, (kvh, d): (u64, u64)) -> Result<SeqCache, CompileError> {
    let KernelCtx { spec, device, .. } = *cx;
    let l = super::sequence_layout(spec, (kvh * d) as usize)
        .ok_or_else(|| spec.unsupported("#kv(axis = sequence) needs a block, a positive recent and a kept row"))?;
    check_f16_caches(spec, "#kv(axis = sequence)")?;
    if device == Device::Cpu && !d.is_multiple_of(VW as u64) {
        return Err(spec.unsupported(&format!("#kv(axis = sequence) on the CPU needs a head width that is a multiple of {VW}, not {d}")));
    }
    let exact_words = ((l.sinks + l.ring) * l.width) as u64;
    let (k, v) = cache_views(b, cx, exact_words);
    Ok(SeqCache { l, k, v })
}

impl SeqCache {
    /// The runs of the query at position `p`.
    pub fn runs_at(&self, b: &mut KernelBuilder, p: &str) -> SeqRuns {
        let l = &self.l;
        let one = b.index(1);
        let end = b.addi(p, &one);
        let (sinks, old, block, m) =
            (b.index(l.sinks as u64), b.index((l.sinks + l.recent) as u64), b.index(l.block as u64), b.index(l.m as u64));
        let sinks_end = b.minui(&sinks, &end);
        let past = b.sub_or_zero(&end, &old);
        let blocks = b.divui(&past, &block);
        let low_rows = b.muli(&blocks, &m);
        let skipped = b.muli(&blocks, &block);
        let from = b.addi(&sinks, &skipped);
        SeqRuns { sinks_end, low_rows, recent: (from, end) }
    }

    /// The row holding key `t` of `run` (a position for the sinks and the
    /// recent run, a low-pass row's index for `LowPass`) in the view the run
    /// reads (`bufs`): rows of `width` f32 for exact rows, of `width` f16
    /// past the exact rows' bytes for low-pass rows.
    pub fn view_row(&self, b: &mut KernelBuilder, run: Run, t: &str) -> V {
        let l = &self.l;
        match run {
            Run::Sinks => t.to_string(),
            Run::LowPass => {
                // The exact rows' bytes are a whole number of f16 rows: 2·(sinks + ring).
                let first = b.index((l.exact_bytes() / 2 / l.width) as u64);
                b.addi(t, &first)
            }
            Run::Recent => {
                let (sinks, ring) = (b.index(l.sinks as u64), b.index(l.ring as u64));
                let after = b.sub_or_zero(t, &sinks);
                let r = b.remui(&after, &ring);
                b.addi(&r, &sinks)
            }
        }
    }

    /// The K and V views a run reads: the f16 low-pass rows or the exact f32 rows.
    pub fn bufs(&self, run: Run) -> (&V, &V) {
        match run {
            Run::LowPass => (&self.k.halves, &self.v.halves),
            Run::Sinks | Run::Recent => (&self.k.exact, &self.v.exact),
        }
    }
}
