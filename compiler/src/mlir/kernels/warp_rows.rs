//! What the readers of compressed caches (`kv_chunked`, `kv_sequence`)
//! share: their view of a cache, and (the chunked-SVD kernel's) NVPTX
//! attention over rows read key by key: a block of
//! `GPU_ATTN_WARPS` warps serves one (query row, head); a lane holds the
//! head's features lane, lane + 32, ... (clamped into the head: a lane past
//! it computes a copy of the last feature, weighs its query 0 and stores
//! nothing); a key's score is a warp reduction of the lanes' products; the
//! warps' partial softmaxes (max, sum, weighted values) meet in shared memory
//! and warp 0 writes the row.

use super::attention::{online_step, partial_weights};
use super::{KernelCtx, KernelSpec};
use super::{GPU_ATTN_WARPS, VW, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::DType;

/// A compressed cache as its attention kernel reads it (both targets): an
/// f16 view of the whole buffer (records, low-pass rows) and the f32 plane of
/// its first `exact_words` values (the exact rows).
pub(super) struct CacheView {
    pub halves: V,
    pub exact: V,
}

/// Refuses a compressed-cache attention (`what` names its pattern) whose
/// operands are not q and its two caches of f16 records.
pub(super) fn check_f16_caches(spec: &KernelSpec, what: &str) -> Result<(), CompileError> {
    if spec.operands.len() != 3 || spec.operands[1].dtype != DType::F16 || spec.operands[2].dtype != DType::F16 {
        return Err(spec.unsupported(&format!("{what} attention takes q and its two caches (f16 records) only")));
    }
    Ok(())
}

/// The K and V caches (operands 1 and 2) of a compressed-cache attention.
pub(super) fn cache_views(b: &mut KernelBuilder, cx: &KernelCtx<'_>, exact_words: u64) -> (CacheView, CacheView) {
    let mut view = |buf: &str| {
        let halves = b.f16_param(buf);
        let exact = b.plane(buf, 0, exact_words, "f32");
        CacheView { halves, exact }
    };
    (view(&cx.ins[1]), view(&cx.ins[2]))
}

/// CPU: `n` vectors of `VW` lanes at `base..` of an f16 view (widened) or,
/// `f16` false, of an f32 buffer.
pub(super) fn row_vectors(b: &mut KernelBuilder, buf: &str, base: &str, n: usize, f16: bool) -> Vec<V> {
    (0..n)
        .map(|x| {
            let o = b.index((x as u32 * VW) as u64);
            let at = b.addi(base, &o);
            if f16 {
                b.vload_f16(buf, &at, VW)
            } else {
                b.vload(buf, &at, VW)
            }
        })
        .collect()
}

/// CPU: one key of a (query row, head)'s online softmax (`st`: max, sum,
/// then the weighted values as `VW`-lane vectors): the query and the key's
/// and value's rows as vectors, its score `scale·q·k + bonus`.
pub(super) fn cpu_key_step(b: &mut KernelBuilder, st: &[V], q: &[V], (k, v): (&[V], &[V]), scale: &str, bonus: Option<&str>) -> Vec<V> {
    let vty = KernelBuilder::vty(VW);
    let a = cpu_dot_lanes(b, q, k);
    let dot = b.vsum(&a, VW);
    let sc = b.mul(&dot, scale);
    let sc = match bonus {
        Some(bo) => b.add(&sc, bo),
        None => sc,
    };
    let (m_new, l_new, corr, pr) = online_step(b, &st[0], &st[1], &sc);
    let (corrv, prv) = (b.vbroadcast(&corr, VW), b.vbroadcast(&pr, VW));
    let mut next = vec![m_new, l_new];
    for (x, vv) in v.iter().enumerate() {
        let pv = b.def(format!("arith.mulf {prv}, {vv} : {vty}"));
        next.push(b.vfma(&st[2 + x], &corrv, &pv, VW));
    }
    next
}

/// CPU: `q·k` of two rows of `VW`-lane vectors, as one vector of partial
/// sums (its lanes add up to the dot).
pub(super) fn cpu_dot_lanes(b: &mut KernelBuilder, q: &[V], k: &[V]) -> V {
    let mut a = b.vzero(VW);
    for (qx, kx) in q.iter().zip(k) {
        a = b.vfma(qx, kx, &a, VW);
    }
    a
}

/// CPU: the row of a finished online softmax (`state`: max, sum, vectors),
/// the values divided by the sum, at `out[qbase..]`.
pub(super) fn cpu_store_row(b: &mut KernelBuilder, state: &[V], out: &str, qbase: &str) {
    let vty = KernelBuilder::vty(VW);
    let one = b.f32(1.0);
    let inv = b.div(&one, &state[1]);
    let invv = b.vbroadcast(&inv, VW);
    for (x, acc) in state[2..].iter().enumerate() {
        let o = b.index((x as u32 * VW) as u64);
        let at = b.addi(qbase, &o);
        let y = b.def(format!("arith.mulf {acc}, {invv} : {vty}"));
        b.vstore(&y, out, &at, VW);
    }
}

/// The (query row, head) of a unit numbered row·heads + head: its row, its
/// KV head, where its query (and output) row starts, and where its KV head's
/// features start in a cache row.
pub(super) struct HeadCell {
    pub row: V,
    pub kh: V,
    pub qbase: V,
    pub khd: V,
}

impl HeadCell {
    pub(super) fn of(b: &mut KernelBuilder, unit: &str, (h, kvh, d): (u64, u64, u64)) -> HeadCell {
        let (hc, dc, qwc, groupc) = (b.index(h), b.index(d), b.index(h * d), b.index(h / kvh.max(1)));
        let row = b.divui(unit, &hc);
        let head = b.remui(unit, &hc);
        let kh = b.divui(&head, &groupc);
        let qrow = b.muli(&row, &qwc);
        let qhd = b.muli(&head, &dc);
        let qbase = b.addi(&qrow, &qhd);
        let khd = b.muli(&kh, &dc);
        HeadCell { row, kh, qbase, khd }
    }
}

/// A lane's features of one head and its query at them.
pub(super) struct LaneFeatures {
    /// Feature indices (clamped into the head).
    pub feats: Vec<V>,
    /// Per feature: `Some(cond)` where the lane may be past the head.
    pub inside: Vec<Option<V>>,
    /// The query at the lane's features (0 past the head).
    pub q: Vec<V>,
}

impl LaneFeatures {
    /// The features of `lane` for a head of width `d`, its query read from
    /// `qbuf` at `qbase + feature`.
    pub(super) fn new(b: &mut KernelBuilder, lane: &str, d: u64, qbuf: &str, qbase: &str) -> LaneFeatures {
        let (zero, dc, lastx) = (b.f32(0.0), b.index(d), b.index(d - 1));
        let raw: Vec<V> = (0..d.div_ceil(WARP))
            .map(|m| {
                let o = b.index(m * WARP);
                b.addi(lane, &o)
            })
            .collect();
        let inside: Vec<Option<V>> = raw
            .iter()
            .enumerate()
            .map(|(m, x)| ((m as u64 + 1) * WARP > d).then(|| b.def(format!("arith.cmpi ult, {x}, {dc} : index"))))
            .collect();
        let feats: Vec<V> = raw.iter().map(|x| b.minui(x, &lastx)).collect();
        let q = feats
            .iter()
            .zip(&inside)
            .map(|(x, ok)| {
                let i = b.addi(qbase, x);
                let qx = b.load(qbuf, &i);
                match ok {
                    Some(ok) => b.def(format!("arith.select {ok}, {qx}, {zero} : f32")),
                    None => qx,
                }
            })
            .collect();
        LaneFeatures { feats, inside, q }
    }

    /// One key of the warp's online softmax (`st`: max, sum, then the
    /// lane's weighted values): its row's features through `load(buf,
    /// element)` at `kbase + feature` (K) and `vbase + feature` (V), its
    /// score `scale·q·k + bonus`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn key_step(
        &self,
        b: &mut KernelBuilder,
        st: &[V],
        (kbase, vbase): (&str, &str),
        load: &dyn Fn(&mut KernelBuilder, bool, &str) -> V,
        scale: &str,
        bonus: Option<&str>,
    ) -> Vec<V> {
        let mut part = b.f32(0.0);
        for (x, qx) in self.feats.iter().zip(&self.q) {
            let at = b.addi(kbase, x);
            let kv = load(b, true, &at);
            part = b.fma(qx, &kv, &part);
        }
        let dot = b.warp_all(&part, "addf");
        let sc = b.mul(&dot, scale);
        let sc = match bonus {
            Some(bo) => b.add(&sc, bo),
            None => sc,
        };
        let (m_new, l_new, corr, pr) = online_step(b, &st[0], &st[1], &sc);
        let mut next = vec![m_new, l_new];
        for (x, acc) in self.feats.iter().zip(&st[2..]) {
            let at = b.addi(vbase, x);
            let vv = load(b, false, &at);
            let pv = b.mul(&pr, &vv);
            next.push(b.fma(acc, &corr, &pv));
        }
        next
    }

    /// The initial state of a warp's online softmax: max −1e30, sum 0, values 0.
    pub(super) fn init(&self, b: &mut KernelBuilder) -> Vec<(V, String)> {
        let (ninf, zero) = (b.f32(-1e30), b.f32(0.0));
        let mut init: Vec<(V, String)> = vec![(ninf, "f32".into()), (zero.clone(), "f32".into())];
        init.extend(self.feats.iter().map(|_| (zero.clone(), "f32".to_string())));
        init
    }

    /// The warps' partials (`state` of warp `wid`) meet in the shared array
    /// `smem` (`GPU_ATTN_WARPS · (2 + d)` f32); warp 0 writes the row at
    /// `out[qbase + feature]`. Every warp of the block must reach it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn combine(
        &self,
        b: &mut KernelBuilder,
        smem: &str,
        d: u64,
        (wid, lane): (&str, &str),
        state: &[V],
        qbase: &str,
        out: &str,
    ) {
        let part = 2 + d;
        let (zero_i, zero) = (b.index(0), b.f32(0.0));
        let partc = b.index(part);
        let base = b.muli(wid, &partc);
        let first = b.def(format!("arith.cmpi eq, {lane}, {zero_i} : index"));
        b.if_then(&first, |b| {
            b.store_shared(&state[0], smem, &base);
            let one = b.index(1);
            let at = b.addi(&base, &one);
            b.store_shared(&state[1], smem, &at);
        });
        let two = b.index(2);
        let vals = b.addi(&base, &two);
        for ((x, acc), ok) in self.feats.iter().zip(&state[2..]).zip(&self.inside) {
            let at = b.addi(&vals, x);
            match ok {
                Some(ok) => b.if_then(ok, |b| b.store_shared(acc, smem, &at)),
                None => b.store_shared(acc, smem, &at),
            }
        }
        b.barrier();
        let warp0 = b.def(format!("arith.cmpi eq, {wid}, {zero_i} : index"));
        b.if_then(&warp0, |b| {
            let (ws, total, _) = partial_weights(b, smem, part);
            let one = b.f32(1.0);
            let f = b.div(&one, &total);
            for (x, ok) in self.feats.iter().zip(&self.inside) {
                let mut y = zero.clone();
                for (k, wk) in ws.iter().enumerate() {
                    let o = b.index(k as u64 * part + 2);
                    let at = b.addi(&o, x);
                    let a = b.load_shared(smem, &at);
                    y = b.fma(&a, wk, &y);
                }
                let y = b.mul(&y, &f);
                let i = b.addi(qbase, x);
                match ok {
                    Some(ok) => b.if_then(ok, |b| b.store(&y, out, &i)),
                    None => b.store(&y, out, &i),
                }
            }
        });
    }
}

/// The (warp, lane) of thread `t` in its block, and the block's (row·heads + head).
pub(super) fn block_cell(b: &mut KernelBuilder, t: &str) -> (V, V, V) {
    let warp = b.index(WARP);
    let (warps, group) = (b.index(GPU_ATTN_WARPS), b.index(GPU_ATTN_WARPS * WARP));
    let e = b.divui(t, &group);
    let wid = b.divui(t, &warp);
    let wid = b.remui(&wid, &warps);
    let lane = b.remui(t, &warp);
    (wid, lane, e)
}
