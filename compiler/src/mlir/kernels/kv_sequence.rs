//! Attention over sequence-axis caches (`#kv(dct | pswf, axis = sequence)`,
//! layout and rule in `sparsec_ir::kv_sequence`; the basis only changes the
//! matrix the appender compresses a block with, not this kernel): a query reads the sinks'
//! exact rows, then the low-pass rows of the blocks older than its recent
//! positions (f16, each score raised by ln(block/m)), then its recent
//! positions' exact rows from the ring. Three runs of keys through one
//! online softmax; a low-pass block costs `m` keys instead of `block`.
//!
//! On the CPU a unit is a (query row, head): a key's dot and the weighted
//! values are vectors of 8 lanes (the head width must be a multiple of 8),
//! the state carried in registers; a run's keys go 8 at a time through the
//! online softmax (one max, one correction and one vector `exp` per 8 keys),
//! the last few one at a time. On NVIDIA a block of warps serves a
//! (query row, head) and splits each run's keys over its warps
//! (`warp_rows`).

use super::warp_rows::{
    block_cell, cache_views, check_f16_caches, cpu_dot_lanes, cpu_key_step, cpu_store_row, row_vectors, CacheView, HeadCell, LaneFeatures,
};
use super::{KernelCtx, GPU_ATTN_WARPS, VW};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use sparsec_ir::kv_sequence::SeqLayout;

struct Sequence {
    h: u64,
    kvh: u64,
    d: u64,
    l: SeqLayout,
    k: CacheView,
    v: CacheView,
}

/// Which run of keys, and how a key of it is found.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    /// Positions `0..min(sinks, p + 1)`, exact.
    Sinks,
    /// Low-pass rows `0..blocks·m`.
    LowPass,
    /// Positions from the first not read low-pass to p, exact, in the ring.
    Recent,
}

/// The kernel of an attention with `#kv(dct | pswf, axis = sequence)`.
/// `(h, kvh, d)`: heads, KV heads (dividing them) and head width, as
/// `emit_attention` checked them.
pub(super) fn emit(b: &mut KernelBuilder, cx: &KernelCtx<'_>, (h, kvh, d): (u64, u64, u64)) -> Result<(), CompileError> {
    let KernelCtx { spec, device, .. } = *cx;
    let l = super::sequence_layout(spec, (kvh * d) as usize)
        .ok_or_else(|| spec.unsupported("#kv(axis = sequence) needs a block, a positive recent and a kept row"))?;
    check_f16_caches(spec, "#kv(axis = sequence)")?;
    if device == Device::Cpu && !d.is_multiple_of(VW as u64) {
        return Err(spec.unsupported(&format!("#kv(axis = sequence) on the CPU needs a head width that is a multiple of {VW}, not {d}")));
    }
    let exact_words = ((l.sinks + l.ring) * l.width) as u64;
    let (k, v) = cache_views(b, cx, exact_words);
    let s = Sequence { h, kvh, d, l, k, v };
    match device {
        Device::Cpu => s.emit_cpu(b, cx),
        Device::Nvptx => s.emit_warps(b, cx),
    }
    Ok(())
}

/// One (query row, head): where its query and output row start, where its
/// KV head's features start in a cache row, and its runs' bounds.
struct Cell {
    qbase: V,
    khd: V,
    /// `min(sinks, p + 1)`.
    sinks_end: V,
    /// Low-pass rows read: `read_blocks(p)·m`.
    low_rows: V,
    /// First recent position, and `p + 1`.
    recent: (V, V),
}

impl Sequence {
    fn cell(&self, b: &mut KernelBuilder, unit: &str) -> Cell {
        let l = &self.l;
        let HeadCell { row, qbase, khd, .. } = HeadCell::of(b, unit, (self.h, self.kvh, self.d));
        let pos = b.pos();
        let one = b.index(1);
        let p = b.addi(&pos, &row);
        let end = b.addi(&p, &one);
        let (sinks, old, block, m) =
            (b.index(l.sinks as u64), b.index((l.sinks + l.recent) as u64), b.index(l.block as u64), b.index(l.m as u64));
        let sinks_end = b.minui(&sinks, &end);
        let past = b.sub_or_zero(&end, &old);
        let blocks = b.divui(&past, &block);
        let low_rows = b.muli(&blocks, &m);
        let skipped = b.muli(&blocks, &block);
        let from = b.addi(&sinks, &skipped);
        Cell { qbase, khd, sinks_end, low_rows, recent: (from, end) }
    }

    /// Where key `t` of `run` starts (its KV head's features), and whether
    /// it is an f16 low-pass row.
    fn key_at(&self, b: &mut KernelBuilder, run: Run, t: &str, khd: &str) -> V {
        let l = &self.l;
        let width = b.index(l.width as u64);
        let row = match run {
            Run::Sinks => t.to_string(),
            Run::LowPass => {
                // In halves: past the exact rows' bytes.
                let base = b.index((l.exact_bytes() / 2) as u64);
                let at = b.muli(t, &width);
                let at = b.addi(&at, &base);
                return b.addi(&at, khd);
            }
            Run::Recent => {
                let (sinks, ring) = (b.index(l.sinks as u64), b.index(l.ring as u64));
                let after = b.sub_or_zero(t, &sinks);
                let r = b.remui(&after, &ring);
                b.addi(&r, &sinks)
            }
        };
        let at = b.muli(&row, &width);
        b.addi(&at, khd)
    }

    fn runs(c: &Cell, zero: &V) -> [(Run, V, V); 3] {
        [
            (Run::Sinks, zero.clone(), c.sinks_end.clone()),
            (Run::LowPass, zero.clone(), c.low_rows.clone()),
            (Run::Recent, c.recent.0.clone(), c.recent.1.clone()),
        ]
    }

    /// The K and V caches a run reads: the f16 low-pass rows or the exact f32 rows.
    fn bufs(&self, run: Run) -> (&V, &V) {
        match run {
            Run::LowPass => (&self.k.halves, &self.v.halves),
            Run::Sinks | Run::Recent => (&self.k.exact, &self.v.exact),
        }
    }

    /// CPU: keys `t..t + VW` of `run` in one step of the online softmax
    /// (`st`: max, sum, the weighted values' vectors): their scores as one
    /// vector (a butterfly sums the VW dots), one max and one correction for
    /// the tile, their weights by one vector `exp`, then the values.
    fn cpu_key_tile(
        &self,
        b: &mut KernelBuilder,
        st: &[V],
        q: &[V],
        (run, t, khd): (Run, &str, &str),
        scale: &str,
        bonus: Option<&str>,
    ) -> Vec<V> {
        let (nv, w) = (q.len(), VW);
        let vty = KernelBuilder::vty(w);
        let half = run == Run::LowPass;
        let (kbuf, vbuf) = self.bufs(run);
        let ats: Vec<V> = (0..w as u64)
            .map(|i| {
                let ii = b.index(i);
                let ti = b.addi(t, &ii);
                self.key_at(b, run, &ti, khd)
            })
            .collect();
        let dots: Vec<V> = ats
            .iter()
            .map(|at| {
                let kx = row_vectors(b, kbuf, at, nv, half);
                cpu_dot_lanes(b, q, &kx)
            })
            .collect();
        let s = b.vsums(&dots, w);
        let scv = b.vbroadcast(scale, w);
        let mut s = b.def(format!("arith.mulf {s}, {scv} : {vty}"));
        if let Some(bo) = bonus {
            let bv = b.vbroadcast(bo, w);
            s = b.def(format!("arith.addf {s}, {bv} : {vty}"));
        }
        let tmax = b.def(format!("vector.reduction <maxnumf>, {s} : {vty} into f32"));
        let m_new = b.fbin("maxnumf", &st[0], &tmax);
        let dm = b.sub(&st[0], &m_new);
        let corr = crate::mlir::math::exp(b, &dm);
        let mv = b.vbroadcast(&m_new, w);
        let ds = b.def(format!("arith.subf {s}, {mv} : {vty}"));
        let p = crate::mlir::math::vexp(b, &ds, w);
        let psum = b.vsum(&p, w);
        let l_new = b.fma(&st[1], &corr, &psum);
        let corrv = b.vbroadcast(&corr, w);
        let mut acc: Vec<V> = st[2..].iter().map(|a| b.def(format!("arith.mulf {a}, {corrv} : {vty}"))).collect();
        for (i, at) in ats.iter().enumerate() {
            let pi = b.def(format!("vector.extract {p}[{i}] : f32 from {vty}"));
            let piv = b.vbroadcast(&pi, w);
            let vx = row_vectors(b, vbuf, at, nv, half);
            for (a, v) in acc.iter_mut().zip(&vx) {
                *a = b.vfma(&piv, v, a, w);
            }
        }
        let mut next = vec![m_new, l_new];
        next.extend(acc);
        next
    }

    /// CPU: one unit per (query row, head), the state in registers.
    fn emit_cpu(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) {
        let KernelCtx { work, ins, out, .. } = *cx;
        let nv = (self.d / VW as u64) as usize;
        let vty = KernelBuilder::vty(VW);
        let zero_i = b.index(0);
        let (zero, ninf) = (b.f32(0.0), b.f32(-1e30));
        let scale = b.f32(1.0 / (self.d as f32).sqrt());
        let bonus = b.f32(self.l.bonus());
        let vzero = b.vzero(VW);
        b.parallel(work, |b, unit| {
            let c = self.cell(b, unit);
            let q = row_vectors(b, &ins[0], &c.qbase, nv, false);
            let mut state: Vec<V> = vec![ninf.clone(), zero.clone()];
            state.extend((0..nv).map(|_| vzero.clone()));
            let typed = |st: &[V]| -> Vec<(V, String)> {
                st.iter().enumerate().map(|(i, v)| (v.clone(), if i < 2 { "f32".into() } else { vty.clone() })).collect()
            };
            for (run, lo, hi) in Self::runs(&c, &zero_i) {
                let half = run == Run::LowPass;
                let bonus = half.then_some(bonus.as_str());
                // Whole tiles of VW keys, then the rest one at a time.
                let vwc = b.index(VW as u64);
                let span = b.sub_or_zero(&hi, &lo);
                let tiles = b.divui(&span, &vwc);
                let whole = b.muli(&tiles, &vwc);
                let mid = b.addi(&lo, &whole);
                state = b.for_fold_typed(&lo, &mid, VW as u64, &typed(&state), |b, t, st| {
                    self.cpu_key_tile(b, st, &q, (run, t, &c.khd), &scale, bonus)
                });
                state = b.for_fold_typed(&mid, &hi, 1, &typed(&state), |b, t, st| {
                    let at = self.key_at(b, run, t, &c.khd);
                    let (kbuf, vbuf) = self.bufs(run);
                    let (kx, vx) = (row_vectors(b, kbuf, &at, nv, half), row_vectors(b, vbuf, &at, nv, half));
                    cpu_key_step(b, st, &q, (&kx, &vx), &scale, bonus)
                });
            }
            cpu_store_row(b, &state, out, &c.qbase);
        });
    }

    /// NVIDIA: a block of warps per (query row, head); each run's keys are
    /// split over the warps.
    fn emit_warps(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) {
        let KernelCtx { work, ins, out, .. } = *cx;
        let d = self.d;
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let bonus = b.f32(self.l.bonus());
        let zero_i = b.index(0);
        let smem = b.shared_f32("sequence_partials", GPU_ATTN_WARPS * (2 + d));
        b.parallel(work, |b, t| {
            let (wid, lane, e) = block_cell(b, t);
            let c = self.cell(b, &e);
            let lf = LaneFeatures::new(b, &lane, d, &ins[0], &c.qbase);
            let mut state: Vec<V> = lf.init(b).into_iter().map(|(v, _)| v).collect();
            for (run, lo, hi) in Self::runs(&c, &zero_i) {
                let start = b.addi(&lo, &wid);
                let init: Vec<(V, String)> = state.iter().map(|v| (v.clone(), "f32".to_string())).collect();
                state = b.for_fold_typed(&start, &hi, GPU_ATTN_WARPS, &init, |b, tk, st| {
                    let at = self.key_at(b, run, tk, &c.khd);
                    let half = run == Run::LowPass;
                    let load = |b: &mut KernelBuilder, key: bool, i: &str| {
                        let cache = if key { &self.k } else { &self.v };
                        if half {
                            b.load_f16(&cache.halves, i)
                        } else {
                            b.load(&cache.exact, i)
                        }
                    };
                    lf.key_step(b, st, (&at, &at), &load, &scale, half.then_some(bonus.as_str()))
                });
            }
            lf.combine(b, &smem, d, (&wid, &lane), &state, &c.qbase, out);
        });
    }
}
