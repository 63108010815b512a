//! Attention over chunked-SVD caches (`#kv(chunked_svd)`, layout in
//! `sparsec_ir::kv_chunked`): keys and values of complete chunks are read
//! through their factors, never rebuilt. Per (query, chunk) the query is
//! projected on the key basis once (`p = scale·basis·q`, rank dots of the
//! head width), the chunk's scores are `pᵀ·coefᵀ` (rank × chunk), an online
//! softmax takes them, and the weighted values are `u = coefᵀ_v·w` (rank)
//! expanded by the value basis (rank × head width). Keys of the newest,
//! incomplete chunk are exact f32 rows and are scored one by one.
//!
//! On the CPU a unit is a (query row, head); scores and the value
//! accumulator are vectors of 8 lanes (the chunk and the head width must be
//! multiples of 8), the factors f16 loads widened as they come. On NVIDIA a
//! block of `GPU_ATTN_WARPS` warps serves a (query row, head): warp w takes
//! chunks w, w + W, ... with a lane per position of the chunk (lane i holds
//! p_i, handed to every lane by `shfl.sync idx`) and per feature of the value
//! accumulator (features lane + 32·m); the exact keys are
//! split over the warps key by key; the warps' partial softmaxes combine in
//! shared memory as the dense attention's do.

use super::warp_rows::{
    block_cell, cache_views, check_f16_caches, cpu_key_step, cpu_store_row, row_vectors, CacheView, HeadCell, LaneFeatures,
};
use super::{KernelCtx, GPU_ATTN_WARPS, VW, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::kv_chunked::ChunkLayout;

struct Chunked {
    h: u64,
    kvh: u64,
    d: u64,
    l: ChunkLayout,
    k: CacheView,
    v: CacheView,
}

/// The kernel of an attention with `#kv(chunked_svd)`.
/// `(h, kvh, d)`: heads, KV heads (dividing them) and head width, as
/// `emit_attention` checked them.
pub(super) fn emit(b: &mut KernelBuilder, cx: &KernelCtx<'_>, (h, kvh, d): (u64, u64, u64)) -> Result<(), CompileError> {
    let KernelCtx { spec, device, .. } = *cx;
    let l =
        super::chunked_layout(spec, kvh as usize, d as usize).ok_or_else(|| spec.unsupported("#kv(chunked_svd) does not fit the heads"))?;
    check_f16_caches(spec, "#kv(chunked_svd)")?;
    let (vw, chunk) = (VW as u64, l.chunk as u64);
    if device == Device::Cpu && !(chunk.is_multiple_of(vw) && d.is_multiple_of(vw)) {
        return Err(spec.unsupported(&format!(
            "#kv(chunked_svd) on the CPU needs a chunk and head width that are multiples of {VW} (chunk {chunk}, width {d})"
        )));
    }
    let exact_words = (l.ring * l.width()) as u64;
    let (k, v) = cache_views(b, cx, exact_words);
    let c = Chunked { h, kvh, d, l, k, v };
    match device {
        Device::Cpu => c.emit_cpu(b, cx),
        Device::Nvptx => c.emit_warps(b, cx),
    }
    Ok(())
}

/// Where a (chunk, KV head)'s factors are, in halves: its rank (as an
/// index, at most the slot), its coefficients and its basis.
struct Factors {
    rank: V,
    coef: V,
    basis: V,
}

/// What a query row reads (the rule of `sparsec_ir::kv_chunked`): the
/// chunks before its own through their factors, its own chunk's keys exactly.
struct RowSpan {
    /// Chunks before the row's own: `⌊p/chunk⌋`, with `p` the row's position.
    chunks: V,
    /// The own chunk's first position.
    exact_from: V,
    /// `p + 1`: the row sees keys `0..=p`.
    end: V,
}

/// One (query row, head): its KV head, where its query and output row
/// start, where its KV head's features start in a cache row, and its span.
struct Cell {
    kh: V,
    qbase: V,
    khd: V,
    span: RowSpan,
}

impl Chunked {
    fn factors(&self, b: &mut KernelBuilder, cache: &CacheView, c: &str, kh: &str) -> Factors {
        let l = &self.l;
        let residual = b.index((l.residual_bytes() / 2) as u64);
        let per = b.index((l.chunk_bytes() / 2) as u64);
        let rec = b.muli(c, &per);
        let rec = b.addi(&rec, &residual);
        let at = b.addi(&rec, kh);
        let r = b.load_f16(&cache.halves, &at);
        let r = b.f32_to_index(&r);
        let slot = b.index(l.slot as u64);
        let rank = b.minui(&r, &slot);
        let hh = b.index(l.head_halves() as u64);
        let hd = b.index(l.header_halves() as u64);
        let coef = b.muli(kh, &hh);
        let coef = b.addi(&coef, &hd);
        let coef = b.addi(&coef, &rec);
        let sc = b.index((l.slot * l.chunk) as u64);
        let basis = b.addi(&coef, &sc);
        Factors { rank, coef, basis }
    }

    /// The (query row, head) of `unit` = row·heads + head.
    fn cell(&self, b: &mut KernelBuilder, unit: &str) -> Cell {
        let HeadCell { row, kh, qbase, khd } = HeadCell::of(b, unit, (self.h, self.kvh, self.d));
        let span = self.span(b, &row);
        Cell { kh, qbase, khd, span }
    }

    fn span(&self, b: &mut KernelBuilder, row: &str) -> RowSpan {
        let pos = b.pos();
        let cc = b.index(self.l.chunk as u64);
        let p = b.addi(&pos, row);
        let one = b.index(1);
        let end = b.addi(&p, &one);
        let chunks = b.divui(&p, &cc);
        let exact_from = b.muli(&chunks, &cc);
        RowSpan { chunks, exact_from, end }
    }

    /// The element where key `t`'s exact row starts for KV head part `khd`.
    fn exact_row(&self, b: &mut KernelBuilder, t: &str, khd: &str) -> V {
        let ring = b.index(self.l.ring as u64);
        let w = b.remui(t, &ring);
        let width = b.index(self.l.width() as u64);
        let at = b.muli(&w, &width);
        b.addi(&at, khd)
    }

    /// CPU: one unit per (query row, head), the online softmax's state and
    /// the weighted values carried in registers.
    fn emit_cpu(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) {
        let KernelCtx { work, ins, out, .. } = *cx;
        let (d, l) = (self.d, &self.l);
        let (chunk, slot) = (l.chunk as u64, l.slot as u64);
        let nv = (d / VW as u64) as usize;
        let vty = KernelBuilder::vty(VW);
        let (dc, cc) = (b.index(d), b.index(chunk));
        let zero_i = b.index(0);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let vzero = b.vzero(VW);
        let (slotc, chunkc) = (b.index(slot), b.index(chunk));
        let pk = b.alloca_f32(&slotc);
        let s = b.alloca_f32(&chunkc);
        b.parallel(work, |b, unit| {
            let Cell { kh, qbase, khd, span } = self.cell(b, unit);
            let q = row_vectors(b, &ins[0], &qbase, nv, false);
            let mut init: Vec<(V, String)> = vec![(ninf.clone(), "f32".into()), (zero.clone(), "f32".into())];
            init.extend((0..nv).map(|_| (vzero.clone(), vty.clone())));
            // Complete chunks, through their factors.
            let state = b.for_fold_typed(&zero_i, &span.chunks, 1, &init, |b, c, st| {
                let fk = self.factors(b, &self.k, c, &kh);
                // p = scale · basis · q.
                b.for_each(&zero_i, &fk.rank, |b, i| {
                    let row0 = b.muli(i, &dc);
                    let row0 = b.addi(&row0, &fk.basis);
                    let mut a = vzero.clone();
                    for (qx, bv) in q.iter().zip(row_vectors(b, &self.k.halves, &row0, nv, true)) {
                        a = b.vfma(qx, &bv, &a, VW);
                    }
                    let dot = b.vsum(&a, VW);
                    let y = b.mul(&dot, &scale);
                    b.store(&y, &pk, i);
                });
                // The chunk's scores: pᵀ · coefᵀ, a vector of positions at a time.
                let nj = (chunk / VW as u64) as usize;
                let init: Vec<(V, String)> = (0..nj).map(|_| (vzero.clone(), vty.clone())).collect();
                let sv = b.for_fold_typed(&zero_i, &fk.rank, 1, &init, |b, i, a| {
                    let pi = b.load(&pk, i);
                    let pv = b.vbroadcast(&pi, VW);
                    let row0 = b.muli(i, &cc);
                    let row0 = b.addi(&row0, &fk.coef);
                    row_vectors(b, &self.k.halves, &row0, nj, true).iter().zip(a).map(|(cv, aj)| b.vfma(&pv, cv, aj, VW)).collect()
                });
                for (j, x) in sv.iter().enumerate() {
                    let o = b.index((j as u32 * VW) as u64);
                    b.vstore(x, &s, &o, VW);
                }
                // Every position of a chunk before the row's own is visible.
                let tmax = b.for_fold(&zero_i, &cc, std::slice::from_ref(&ninf), |b, j, a| {
                    let x = b.load(&s, j);
                    vec![b.fbin("maxnumf", &a[0], &x)]
                });
                let m_new = b.fbin("maxnumf", &st[0], &tmax[0]);
                let dm = b.sub(&st[0], &m_new);
                let corr = math::exp(b, &dm);
                let tsum = b.for_fold(&zero_i, &cc, std::slice::from_ref(&zero), |b, j, a| {
                    let x = b.load(&s, j);
                    let e = b.sub(&x, &m_new);
                    let e = math::exp(b, &e);
                    b.store(&e, &s, j);
                    vec![b.def(format!("arith.addf {}, {e} fastmath<reassoc> : f32", a[0]))]
                });
                let l_new = b.fma(&st[1], &corr, &tsum[0]);
                // Weighted values: u = coefᵀ_v · w, then acc = acc·corr + uᵀ · basis_v.
                let fv = self.factors(b, &self.v, c, &kh);
                let corrv = b.vbroadcast(&corr, VW);
                let init: Vec<(V, String)> =
                    st[2..].iter().map(|a| (b.def(format!("arith.mulf {a}, {corrv} : {vty}")), vty.clone())).collect();
                let w = row_vectors(b, &s, &zero_i, nj, false);
                let acc = b.for_fold_typed(&zero_i, &fv.rank, 1, &init, |b, i, a| {
                    let row0 = b.muli(i, &cc);
                    let row0 = b.addi(&row0, &fv.coef);
                    let mut uv = vzero.clone();
                    for (wj, cv) in w.iter().zip(row_vectors(b, &self.v.halves, &row0, nj, true)) {
                        uv = b.vfma(wj, &cv, &uv, VW);
                    }
                    let u = b.vsum(&uv, VW);
                    let ub = b.vbroadcast(&u, VW);
                    let brow = b.muli(i, &dc);
                    let brow = b.addi(&brow, &fv.basis);
                    row_vectors(b, &self.v.halves, &brow, nv, true).iter().zip(a).map(|(bv, ax)| b.vfma(&ub, bv, ax, VW)).collect()
                });
                let mut next = vec![m_new, l_new];
                next.extend(acc);
                next
            });
            // The newest chunk's exact rows, key by key.
            let init: Vec<(V, String)> =
                state.iter().enumerate().map(|(i, v)| (v.clone(), if i < 2 { "f32".into() } else { vty.clone() })).collect();
            let state = b.for_fold_typed(&span.exact_from, &span.end, 1, &init, |b, t, st| {
                let kb = self.exact_row(b, t, &khd);
                let (kx, vx) = (row_vectors(b, &self.k.exact, &kb, nv, false), row_vectors(b, &self.v.exact, &kb, nv, false));
                cpu_key_step(b, st, &q, (&kx, &vx), &scale, None)
            });
            cpu_store_row(b, &state, out, &qbase);
        });
    }

    /// NVIDIA: a block of warps per (query row, head), as the module doc says.
    fn emit_warps(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) {
        let KernelCtx { work, ins, out, .. } = *cx;
        let (d, l) = (self.d, &self.l);
        let (chunk, slot) = (l.chunk as u64, l.slot as u64);
        let (dc, cc) = (b.index(d), b.index(chunk));
        let zero_i = b.index(0);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let warp = b.index(WARP);
        let smem = b.shared_f32("chunked_partials", GPU_ATTN_WARPS * (2 + d));
        // Per lane: features lane + 32·m, positions lane + 32·m, p_(lane + 32·m).
        let np = chunk.div_ceil(WARP) as usize;
        let ns = slot.div_ceil(WARP) as usize;
        b.parallel(work, |b, t| {
            let (wid, lane, e) = block_cell(b, t);
            let Cell { kh, qbase, khd, span } = self.cell(b, &e);
            let q: Vec<V> = (0..d)
                .map(|x| {
                    let o = b.index(x);
                    let i = b.addi(&qbase, &o);
                    b.load(&ins[0], &i)
                })
                .collect();
            let lane_plus = |b: &mut KernelBuilder, m: usize| {
                let o = b.index(m as u64 * WARP);
                b.addi(&lane, &o)
            };
            let lf = LaneFeatures::new(b, &lane, d, &ins[0], &qbase);
            let init = lf.init(b);
            let state = b.for_fold_typed(&wid, &span.chunks, GPU_ATTN_WARPS, &init, |b, c, st| {
                let fk = self.factors(b, &self.k, c, &kh);
                // Lane i's p_i (rows past the rank are zero; lanes past the slot read its last row and drop it).
                let last = b.index(slot - 1);
                let ps: Vec<V> = (0..ns)
                    .map(|m| {
                        let i = lane_plus(b, m);
                        let ii = b.minui(&i, &last);
                        let row0 = b.muli(&ii, &dc);
                        let row0 = b.addi(&row0, &fk.basis);
                        let mut a = zero.clone();
                        for (x, qx) in q.iter().enumerate() {
                            let o = b.index(x as u64);
                            let at = b.addi(&row0, &o);
                            let bv = b.load_f16(&self.k.halves, &at);
                            a = b.fma(qx, &bv, &a);
                        }
                        let a = b.mul(&a, &scale);
                        let keep = b.def(format!("arith.cmpi ule, {i}, {last} : index"));
                        b.def(format!("arith.select {keep}, {a}, {zero} : f32"))
                    })
                    .collect();
                // Scores of the lane's positions.
                let lastj = b.index(chunk - 1);
                let js: Vec<V> = (0..np).map(|m| lane_plus(b, m)).collect();
                let jcl: Vec<V> = js.iter().map(|j| b.minui(j, &lastj)).collect();
                let init: Vec<(V, String)> = (0..np).map(|_| (zero.clone(), "f32".to_string())).collect();
                let sc = b.for_fold_typed(&zero_i, &fk.rank, 1, &init, |b, i, a| {
                    let src = b.remui(i, &warp);
                    let mut pi = b.warp_from(&ps[0], &src);
                    for (m, pm) in ps.iter().enumerate().skip(1) {
                        let from = b.warp_from(pm, &src);
                        let lo = b.index(m as u64 * WARP);
                        let here = b.def(format!("arith.cmpi uge, {i}, {lo} : index"));
                        pi = b.def(format!("arith.select {here}, {from}, {pi} : f32"));
                    }
                    let row0 = b.muli(i, &cc);
                    let row0 = b.addi(&row0, &fk.coef);
                    (0..np)
                        .map(|m| {
                            let at = b.addi(&row0, &jcl[m]);
                            let cv = b.load_f16(&self.k.halves, &at);
                            b.fma(&pi, &cv, &a[m])
                        })
                        .collect()
                });
                // Lanes past the chunk hold no position (a chunk before the row's own is all visible).
                let seen: Vec<V> = js.iter().map(|j| b.def(format!("arith.cmpi ult, {j}, {cc} : index"))).collect();
                let mut mx = ninf.clone();
                for (s, ok) in sc.iter().zip(&seen) {
                    let x = b.def(format!("arith.select {ok}, {s}, {ninf} : f32"));
                    mx = b.fbin("maxnumf", &mx, &x);
                }
                let tmax = b.warp_all(&mx, "maxnumf");
                let m_new = b.fbin("maxnumf", &st[0], &tmax);
                let dm = b.sub(&st[0], &m_new);
                let corr = math::exp(b, &dm);
                let mut sum = zero.clone();
                let ws: Vec<V> = sc
                    .iter()
                    .zip(&seen)
                    .map(|(s, ok)| {
                        let x = b.sub(s, &m_new);
                        let x = math::exp(b, &x);
                        let w = b.def(format!("arith.select {ok}, {x}, {zero} : f32"));
                        sum = b.add(&sum, &w);
                        w
                    })
                    .collect();
                let tsum = b.warp_all(&sum, "addf");
                let l_new = b.fma(&st[1], &corr, &tsum);
                let fv = self.factors(b, &self.v, c, &kh);
                let init: Vec<(V, String)> = st[2..].iter().map(|a| (b.mul(a, &corr), "f32".to_string())).collect();
                let acc = b.for_fold_typed(&zero_i, &fv.rank, 1, &init, |b, i, a| {
                    let row0 = b.muli(i, &cc);
                    let row0 = b.addi(&row0, &fv.coef);
                    let mut part_u = zero.clone();
                    for (m, w) in ws.iter().enumerate() {
                        let at = b.addi(&row0, &jcl[m]);
                        let cv = b.load_f16(&self.v.halves, &at);
                        part_u = b.fma(w, &cv, &part_u);
                    }
                    let u = b.warp_all(&part_u, "addf");
                    let brow = b.muli(i, &dc);
                    let brow = b.addi(&brow, &fv.basis);
                    lf.feats
                        .iter()
                        .zip(a)
                        .map(|(x, acc)| {
                            let at = b.addi(&brow, x);
                            let bv = b.load_f16(&self.v.halves, &at);
                            b.fma(&u, &bv, acc)
                        })
                        .collect()
                });
                let mut next = vec![m_new, l_new];
                next.extend(acc);
                next
            });
            // Exact keys, split over the warps key by key.
            let start = b.addi(&span.exact_from, &wid);
            let state = b.for_fold_typed(
                &start,
                &span.end,
                GPU_ATTN_WARPS,
                &state.iter().map(|v| (v.clone(), "f32".to_string())).collect::<Vec<_>>(),
                |b, tk, st| {
                    let kb = self.exact_row(b, tk, &khd);
                    let load = |b: &mut KernelBuilder, key: bool, at: &str| b.load(if key { &self.k.exact } else { &self.v.exact }, at);
                    lf.key_step(b, st, (&kb, &kb), &load, &scale, None)
                },
            );
            // The warps' partials meet in shared memory; warp 0 writes the row.
            lf.combine(b, &smem, d, (&wid, &lane), &state, &qbase, out);
        });
    }
}
