//! Native sparse attention's steps before attention (`#nsa`, `NativeSparse`):
//! a block summary kernel and a block selection kernel, on the CPU and NVPTX.
//!
//! An attention op with `#nsa` runs three kernels after its KV appends
//! (`partition.rs`):
//! 1. `NsaSummary`, one unit per (row, KV head): the row that completes a block
//!    of `block` positions writes that block's key summary into the layer's
//!    block cache, a row per block (`NativeSparse::block_words` f32 per row):
//!    per KV head what the score reads, `d` words (`NativeSparse::block_slabs`:
//!    `mean`, the keys' mean per channel; `bound`, their minimum and maximum
//!    per channel as f16 rounded outward, two to a word, `f16_pair`). A
//!    block is summarized once, when it fills; decode
//!    updates the cache incrementally, and a truncated session rewrites a
//!    block when it fills again.
//! 2. `NsaSelect`, one unit per (row, KV head): every candidate block (whole
//!    at or after the sinks, and before the row's window) gets a score per
//!    head of the group (`NsaScore`), the scores a softmax over the candidates
//!    per head, and the probabilities are summed over the group. On the CPU
//!    the passes over the candidates go `VW` blocks at a time: every score
//!    (computed once, kept on the stack per head), each head's max, then
//!    `exp(score − max)` in its place and each head's sum, then each block's
//!    importance; an insertion into a sorted list of the `top_n` best follows,
//!    block by block; among equals the earlier block stays first. The row of the selection
//!    (`NativeSparse::select_words` f32 per row) holds per KV head the count selected, the
//!    block indices, then their importance (as exact f32 integers and values).
//! 3. The attention kernel (`attention.rs`) reads the selection: a query sees
//!    its sinks, the selected blocks and its window under one softmax, or,
//!    gated (`NsaGate`), each branch under its own softmax, mixed by the gate.
//!
//! Gated, a block's summary row also holds its compressed key and value (per
//! KV head two more slabs of `d`, `NativeSparse::block_slabs`): the means of
//! its keys and values, or the linear compression (`NsaCompress::Linear`).

use super::{fixed_last, KernelCtx, KernelSpec, VW, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::{NativeSparse, NsaCompress, NsaScore, Op, SymSize};

/// `(nsa, heads, kv_heads, head width)` of an `#nsa` step.
fn dims(spec: &KernelSpec) -> Result<(NativeSparse, u64, u64, u64), CompileError> {
    let Op::Attention { heads, kv_heads } = spec.op else { return Err(spec.unsupported("an #nsa step of a non-attention op")) };
    let nsa = NativeSparse::of(&spec.patterns).ok_or_else(|| spec.unsupported("an #nsa step without #nsa"))?;
    let (h, kvh) = (heads as u64, kv_heads as u64);
    if h == 0 || kvh == 0 || h % kvh != 0 {
        return Err(spec.unsupported("heads must be a positive multiple of kv_heads"));
    }
    // The summary step's operand 0 is the K cache; the select step's is q.
    let w = fixed_last(spec, &spec.operands[0])?;
    let d = match spec.stage {
        super::Stage::NsaSummary => w / kvh,
        _ => w / h,
    };
    Ok((nsa, h, kvh, d))
}

/// Units of either step: one per (row, KV head), on both devices.
pub(super) fn units(spec: &KernelSpec) -> Result<SymSize, CompileError> {
    let (_, _, kvh, _) = dims(spec)?;
    Ok(SymSize { coef: kvh, seq_pow: 1 })
}

/// Rough scalar operations per unit: a block's summary, or two passes of
/// scores over (assumed) 64 candidate blocks for each head of the group.
pub(super) fn unit_cost(spec: &KernelSpec) -> u64 {
    match dims(spec) {
        Ok((nsa, h, kvh, d)) => match spec.stage {
            super::Stage::NsaSummary => 3 * d * nsa.block as u64 / 4,
            _ => 2 * 64 * (h / kvh) * 2 * d,
        },
        Err(_) => 1,
    }
}

/// Step 1 (see the file's doc): `ins = [k cache]`, gated also the V cache
/// and (`NsaCompress::Linear`) the compression; `out` = the block cache.
pub(super) fn emit_summary(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { spec, work, ins, out, .. } = *cx;
    let (nsa, _, kvh, d) = dims(spec)?;
    let (kvhc, dc, kvwc, blockc, rowc) =
        (b.index(kvh), b.index(d), b.index(kvh * d), b.index(nsa.block as u64), b.index(nsa.block_words(kvh * d)));
    let dt = spec.operands[0].dtype;
    // Cache `i` (0: K, 1: V) as read: f16 views, or block-quantized rows
    // (`kv_quant.rs`) read a value at a time.
    let cache = |b: &mut KernelBuilder, i: usize| -> Result<(V, Option<super::kv_quant::QuantRows>), CompileError> {
        let buf = if dt == sparsec_ir::DType::F16 { b.f16_param(&ins[i]) } else { ins[i].clone() };
        let quant = if dt.is_quantized() {
            Some(
                super::kv_quant::QuantRows::new(b, dt, &ins[i], kvh * d)
                    .ok_or_else(|| spec.unsupported("a quantized KV cache of a width that is no whole number of blocks"))?,
            )
        } else {
            None
        };
        Ok((buf, quant))
    };
    let kcache = cache(b, 0)?;
    let vcache = if nsa.gated() { Some(cache(b, 1)?) } else { None };
    let linear = (nsa.compress == NsaCompress::Linear).then(|| ins[2].clone());
    // The element of value `col` of cache row `row`: by rows, or (CPU) kept
    // per block and KV head (`attention::cpu_head_blocks`).
    let head_blocks = if b.device() == Device::Cpu { spec.cpu_head_blocks } else { None };
    let element = |b: &mut KernelBuilder, row: &str, col: &str| match head_blocks {
        None => {
            let at = b.muli(row, &kvwc);
            b.addi(&at, col)
        }
        Some(hb) => {
            // The head's part of the row, then the column within the head.
            let c = b.remui(col, &dc);
            let khd = b.def(format!("arith.subi {col}, {c} : index"));
            let at = super::attention::head_block_base(b, hb, d, row, &khd);
            b.addi(&at, &c)
        }
    };
    // Value `col` of cache row `row`.
    let load = |b: &mut KernelBuilder, (buf, quant): &(V, Option<super::kv_quant::QuantRows>), row: &str, col: &str| match (quant, dt) {
        (Some(q), _) => q.load(b, row, col),
        (None, sparsec_ir::DType::F16) => {
            let at = element(b, row, col);
            b.load_f16(buf, &at)
        }
        (None, _) => {
            let at = element(b, row, col);
            b.load(buf, &at)
        }
    };
    let zero_i = b.index(0);
    let one_i = b.index(1);
    let pos = b.pos();
    let inv = b.f32(1.0 / nsa.block as f32);
    let (big, small) = (b.f32(3.0e38), b.f32(-3.0e38));
    let zero = b.f32(0.0);
    let words = NsaCompress::linear_words(nsa.block as u64, d);
    let compressed = nsa.compressed_slab();
    b.parallel(work, |b, unit| {
        let r = b.divui(unit, &kvhc);
        let kh = b.remui(unit, &kvhc);
        let p = b.addi(&pos, &r);
        let end = b.addi(&p, &one_i);
        let rem = b.remui(&end, &blockc);
        let fills = b.def(format!("arith.cmpi eq, {rem}, {zero_i} : index"));
        b.if_then(&fills, |b| {
            let blk = b.divui(&end, &blockc);
            let blk = b.def(format!("arith.subi {blk}, {one_i} : index"));
            let first = b.muli(&blk, &blockc);
            let khd = b.muli(&kh, &dc);
            let rb = b.muli(&blk, &rowc);
            let slabs = b.index(nsa.block_slabs());
            let seg = b.muli(&khd, &slabs);
            let obase = b.addi(&rb, &seg);
            let put = |b: &mut KernelBuilder, slab: u64, c: &str, v: &str| {
                let o = b.index(slab * d);
                let at = b.addi(&obase, &o);
                let at = b.addi(&at, c);
                b.store(v, out, &at);
            };
            if nsa.score == NsaScore::Bound {
                // The bound slab: per pair of channels, one word of minima
                // (rounded down to f16) and, `d / 2` words on, one of maxima
                // (rounded up), channel 2i in the low half.
                let (two, half_d) = (b.index(2), b.index(d / 2));
                b.for_step(&zero_i, &dc, 2, |b, c| {
                    let c1 = b.addi(c, &one_i);
                    let cols = [b.addi(&khd, c), b.addi(&khd, &c1)];
                    let init: Vec<V> = [&big, &small, &big, &small].map(|v| v.clone()).to_vec();
                    let acc = b.for_fold(&zero_i, &blockc, &init, |b, j, acc| {
                        let row = b.addi(&first, j);
                        let x0 = load(b, &kcache, &row, &cols[0]);
                        let x1 = load(b, &kcache, &row, &cols[1]);
                        vec![
                            b.fbin("minnumf", &acc[0], &x0),
                            b.fbin("maxnumf", &acc[1], &x0),
                            b.fbin("minnumf", &acc[2], &x1),
                            b.fbin("maxnumf", &acc[3], &x1),
                        ]
                    });
                    let word = b.divui(c, &two);
                    let mins = f16_pair(b, [&acc[0], &acc[2]], false);
                    put(b, 0, &word, &mins);
                    let maxes = f16_pair(b, [&acc[1], &acc[3]], true);
                    let at = b.addi(&word, &half_d);
                    put(b, 0, &at, &maxes);
                });
            }
            // The mean: what `mean` scores, and (gated, mean pooling) the compressed key.
            let needs_mean = nsa.score == NsaScore::Mean || (vcache.is_some() && linear.is_none());
            if needs_mean {
                b.for_each(&zero_i, &dc, |b, c| {
                    let col = b.addi(&khd, c);
                    let acc = b.for_fold(&zero_i, &blockc, std::slice::from_ref(&zero), |b, j, acc| {
                        let row = b.addi(&first, j);
                        let x = load(b, &kcache, &row, &col);
                        vec![b.add(&acc[0], &x)]
                    });
                    let mean = b.mul(&acc[0], &inv);
                    if nsa.score == NsaScore::Mean {
                        put(b, 0, c, &mean);
                    }
                    let (Some(vc), None) = (&vcache, &linear) else { return };
                    // Mean pooling: the compressed key is the mean, the value the values' mean.
                    put(b, compressed, c, &mean);
                    let vs = b.for_fold(&zero_i, &blockc, std::slice::from_ref(&zero), |b, j, acc| {
                        let row = b.addi(&first, j);
                        let x = load(b, vc, &row, &col);
                        vec![b.add(&acc[0], &x)]
                    });
                    let vmean = b.mul(&vs[0], &inv);
                    put(b, compressed + 1, c, &vmean);
                });
            }
            let (Some(vc), Some(w)) = (&vcache, &linear) else { return };
            // Linear compression, per K and V: W·(Σ_j p_j·x_j) + c
            // (`NsaCompress::Linear`); each output recomputes the pooled
            // channels it reads (no scratch: the same code on both devices;
            // a block is compressed once, when it fills).
            let wordsc = b.index(words);
            for (which, src) in [(0u64, &kcache), (1u64, vc)] {
                let wrow = if which == 0 { kh.clone() } else { b.addi(&kvhc, &kh) };
                let wbase = b.muli(&wrow, &wordsc);
                let bias0 = b.index(nsa.block as u64);
                let map0 = b.index(nsa.block as u64 + d);
                b.for_each(&zero_i, &dc, |b, o| {
                    let bi = b.addi(&wbase, &bias0);
                    let bi = b.addi(&bi, o);
                    let bias = b.load(w, &bi);
                    let ro = b.muli(o, &dc);
                    let mrow = b.addi(&wbase, &map0);
                    let mrow = b.addi(&mrow, &ro);
                    let y = b.for_fold(&zero_i, &dc, &[bias], |b, c, acc| {
                        let col = b.addi(&khd, c);
                        let pooled = b.for_fold(&zero_i, &blockc, std::slice::from_ref(&zero), |b, j, acc| {
                            let row = b.addi(&first, j);
                            let x = load(b, src, &row, &col);
                            let wi = b.addi(&wbase, j);
                            let pj = b.load(w, &wi);
                            vec![b.fma(&pj, &x, &acc[0])]
                        });
                        let mi = b.addi(&mrow, c);
                        let m = b.load(w, &mi);
                        vec![b.fma(&m, &pooled[0], &acc[0])]
                    });
                    put(b, compressed + which, o, &y[0]);
                });
            }
        });
    });
    Ok(())
}

/// What a selection unit (a row and a KV head) works on.
struct Row {
    r: V,
    kh: V,
    /// Candidate blocks are `first..last` (`first` whole after the sinks,
    /// `last` the first that reaches the row's window); `count` of them.
    last: V,
    count: V,
    /// Where the unit's selection starts in the output: the count, then the
    /// block indices at `idx0`, the importances at `imp0`.
    o: V,
    idx0: V,
    imp0: V,
}

/// The `Row` of selection unit `unit` (row-major over KV heads).
fn select_row(b: &mut KernelBuilder, nsa: &NativeSparse, kvh: u64, unit: &str) -> Row {
    let (kvhc, one_i, nc_i) = (b.index(kvh), b.index(1), b.index(nsa.top_n as u64));
    let (blockc, window, selc) = (b.index(nsa.block as u64), b.index(nsa.window as u64), b.index(nsa.select_words_per_head()));
    let first = b.index((nsa.sinks as u64).div_ceil(nsa.block as u64));
    let pos = b.pos();
    let r = b.divui(unit, &kvhc);
    let kh = b.remui(unit, &kvhc);
    let p = b.addi(&pos, &r);
    let end = b.addi(&p, &one_i);
    let from = b.sub_or_zero(&end, &window);
    let last = b.divui(&from, &blockc);
    let count = b.sub_or_zero(&last, &first);
    let a = b.muli(&r, &kvhc);
    let a = b.addi(&a, &kh);
    let o = b.muli(&a, &selc);
    let idx0 = b.addi(&o, &one_i);
    let imp0 = b.addi(&idx0, &nc_i);
    Row { r, kh, last, count, o, idx0, imp0 }
}

/// Starts a selection row: the list empty (index -1, importance -1:
/// importances are ≥ 0) and the count `taken` at `o`.
#[allow(clippy::too_many_arguments)]
fn clear_list(b: &mut KernelBuilder, out: &str, o: &str, idx0: &str, imp0: &str, n: &str, taken: &str) {
    let zero_i = b.index(0);
    let none = b.f32(-1.0);
    b.for_each(&zero_i, n, |b, k| {
        let i = b.addi(idx0, k);
        b.store(&none, out, &i);
        let i = b.addi(imp0, k);
        b.store(&none, out, &i);
    });
    let takenf = b.index_to_f32(taken);
    b.store(&takenf, out, o);
}

/// Where row `r`'s query of each head of KV head `kh`'s group starts.
fn group_queries(b: &mut KernelBuilder, r: &str, kh: &str, (group, d, qw): (u64, u64, u64)) -> Vec<V> {
    let (groupc, dc, qwc) = (b.index(group), b.index(d), b.index(qw));
    let khg = b.muli(kh, &groupc);
    let qrow = b.muli(r, &qwc);
    (0..group)
        .map(|g| {
            let gi = b.index(g);
            let hd = b.addi(&khg, &gi);
            let hd = b.muli(&hd, &dc);
            b.addi(&qrow, &hd)
        })
        .collect()
}

/// Step 2 (see the file's doc): `ins = [q, block cache]`, `out` = the selection.
pub(super) fn emit_select(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { spec, device, work, ins, out } = *cx;
    if device == Device::Nvptx {
        return emit_select_warp(b, cx);
    }
    let (nsa, h, kvh, d) = dims(spec)?;
    let group = h / kvh;
    let n = nsa.top_n as u64;
    let vector = device == Device::Cpu && d % VW as u64 == 0;
    let (dc, rowc) = (b.index(d), b.index(nsa.block_words(kvh * d)));
    let zero_i = b.index(0);
    let one_i = b.index(1);
    let nc_i = b.index(n);
    let one = b.f32(1.0);
    let ninf = b.f32(-1e30);
    let inv_sqrt_d = 1.0 / (d as f32).sqrt();
    let scale = b.f32(inv_sqrt_d);
    let first = b.index((nsa.sinks as u64).div_ceil(nsa.block as u64));
    let vty = KernelBuilder::vty(VW);
    // Every candidate's scores, one run per head of the group, each padded
    // to whole chunks of `VW` candidates (padding scores -1e30): kept from
    // the first pass, so each is scored once and exp is taken once per
    // score; and the candidates' importances. As many as the thread's last
    // unit (the latest row) has candidates.
    let lanes = VW as u64;
    let (lanesc, lanes1) = (b.index(lanes), b.index(lanes - 1));
    let padded = |b: &mut KernelBuilder, count: &str| {
        let c = b.addi(count, &lanes1);
        let c = b.divui(&c, &lanesc);
        b.muli(&c, &lanesc)
    };
    let (scores, imps) = {
        let ub = b.def(format!("arith.minui %hi, {work} : index"));
        let top = b.sub_or_zero(&ub, &one_i);
        let latest = select_row(b, &nsa, kvh, &top);
        let span = b.sub_or_zero(&latest.last, &first);
        let span = b.def(format!("arith.maxui {span}, {one_i} : index"));
        let span = padded(b, &span);
        let groupc = b.index(group);
        let words = b.muli(&span, &groupc);
        (b.alloca_f32(&words), b.alloca_f32(&span))
    };
    let blocks_last = {
        let len = b.def(format!("memref.dim {}, {zero_i} : memref<?xf32>", ins[1]));
        b.sub_or_zero(&len, &one_i)
    };
    let (ninf_v, zero_v, scale_v) = (b.vsplat_f32(-1e30, VW), b.vzero(VW), b.vsplat_f32(inv_sqrt_d, VW));
    let iota = b.viota_i32(VW);
    b.parallel(work, |b, unit| {
        let Row { r, kh, last, count, o, idx0, imp0 } = select_row(b, &nsa, kvh, unit);
        let any = b.def(format!("arith.cmpi ugt, {last}, {first} : index"));
        let taken = b.minui(&count, &nc_i);
        clear_list(b, out, &o, &idx0, &imp0, &nc_i, &taken);
        let qbase = group_queries(b, &r, &kh, (group, d, h * d));
        let khd3 = b.muli(&kh, &dc);
        let slabs = b.index(nsa.block_slabs());
        let seg = b.muli(&khd3, &slabs);
        let stride = padded(b, &count);
        // Where head g's score of candidate `c` (from 0) lies in `scores`.
        let slot = |b: &mut KernelBuilder, g: u64, c: &str| {
            let gc = b.index(g);
            let a = b.muli(&gc, &stride);
            b.addi(&a, c)
        };
        b.if_then(&any, |b| {
            // Pass 1: every score.
            if vector {
                score_chunks(
                    b,
                    &nsa,
                    (&ins[0], &ins[1]),
                    &qbase,
                    (d, nsa.block_words(kvh * d)),
                    (&first, &last, &count, &stride),
                    (&seg, &blocks_last),
                    (&scale_v, &iota, &ninf_v),
                    &|b, g, c| slot(b, g, c),
                    &scores,
                );
            } else {
                b.for_each(&first, &last, |b, blk| {
                    let rb = b.muli(blk, &rowc);
                    let base = b.addi(&rb, &seg);
                    let c = b.def(format!("arith.subi {blk}, {first} : index"));
                    for (g, qb) in qbase.iter().enumerate() {
                        let sc = scalar_score(b, &nsa, &ins[0], &ins[1], qb, &base, d, &scale);
                        let at = slot(b, g as u64, &c);
                        b.store(&sc, &scores, &at);
                    }
                });
                b.for_each(&count, &stride, |b, c| {
                    for g in 0..group {
                        let at = slot(b, g, c);
                        b.store(&ninf, &scores, &at);
                    }
                });
            }
            // A fold over the chunks, each `VW` consecutive slots from
            // candidate `c` on, carrying vectors.
            let over_chunks = |b: &mut KernelBuilder, init: Vec<V>, body: ChunkBody| -> Vec<V> {
                let typed: Vec<(V, String)> = init.into_iter().map(|v| (v, vty.clone())).collect();
                b.for_fold_typed(&zero_i, &stride, lanes, &typed, body)
            };
            // Pass 2: each head's max, then exp(score − max) in place of the
            // score and each head's sum.
            let invs: Vec<V> = (0..group)
                .map(|g| {
                    let mv = over_chunks(b, vec![ninf_v.clone()], &|b, c, acc| {
                        let at = slot(b, g, c);
                        let s = b.vload(&scores, &at, VW);
                        vec![b.def(format!("arith.maxnumf {}, {s} : {vty}", acc[0]))]
                    });
                    let m = b.def(format!("vector.reduction <maxnumf>, {} : {vty} into f32", mv[0]));
                    let m = b.vbroadcast(&m, VW);
                    let lv = over_chunks(b, vec![zero_v.clone()], &|b, c, acc| {
                        let at = slot(b, g, c);
                        let s = b.vload(&scores, &at, VW);
                        let x = b.def(format!("arith.subf {s}, {m} : {vty}"));
                        let e = math::vexp(b, &x, VW);
                        b.vstore(&e, &scores, &at, VW);
                        vec![b.def(format!("arith.addf {}, {e} : {vty}", acc[0]))]
                    });
                    let l = b.vsum(&lv[0], VW);
                    let inv = b.div(&one, &l);
                    b.vbroadcast(&inv, VW)
                })
                .collect();
            // Pass 3: each candidate's importance, the group's probabilities summed.
            b.for_step(&zero_i, &stride, lanes, |b, c| {
                let mut imp = zero_v.clone();
                for (g, inv) in invs.iter().enumerate() {
                    let at = slot(b, g as u64, c);
                    let e = b.vload(&scores, &at, VW);
                    imp = b.vfma(&e, inv, &imp, VW);
                }
                b.vstore(&imp, &imps, c, VW);
            });
            // Pass 4: the candidates inserted into the sorted list in order.
            b.for_each(&first, &last, |b, blk| {
                let c = b.def(format!("arith.subi {blk}, {first} : index"));
                let imp = b.load(&imps, &c);
                let lastn = b.index(n - 1);
                let worst_at = b.addi(&imp0, &lastn);
                let worst = b.load(out, &worst_at);
                let better = b.def(format!("arith.cmpf ogt, {imp}, {worst} : f32"));
                let blkf = b.index_to_f32(blk);
                b.if_then(&better, |b| {
                    // Its slot: after every entry at least as important (an
                    // equal one is an earlier block); the entries from there
                    // to the second last move down one, the last drops out.
                    let nc = b.index(n);
                    let at = b.for_fold_typed(&zero_i, &nc, 1, &[(zero_i.clone(), "index".into())], |b, k, acc| {
                        let i = b.addi(&imp0, k);
                        let e = b.load(out, &i);
                        let ahead = b.def(format!("arith.cmpf oge, {e}, {imp} : f32"));
                        let one = b.def(format!("arith.select {ahead}, {one_i}, {zero_i} : index"));
                        vec![b.addi(&acc[0], &one)]
                    });
                    let moves = b.def(format!("arith.subi {lastn}, {} : index", at[0]));
                    b.for_each(&zero_i, &moves, |b, k| {
                        let t = b.def(format!("arith.subi {lastn}, {k} : index"));
                        let t1 = b.def(format!("arith.subi {t}, {one_i} : index"));
                        for base in [&imp0, &idx0] {
                            let src = b.addi(base, &t1);
                            let x = b.load(out, &src);
                            let dst = b.addi(base, &t);
                            b.store(&x, out, &dst);
                        }
                    });
                    let dst = b.addi(&imp0, &at[0]);
                    b.store(&imp, out, &dst);
                    let dst = b.addi(&idx0, &at[0]);
                    b.store(&blkf, out, &dst);
                });
            });
        });
    });
    Ok(())
}

/// A CPU selection pass's body over one chunk: `(builder, first slot, accumulators) -> accumulators`.
type ChunkBody<'a> = &'a dyn Fn(&mut KernelBuilder, &str, &[V]) -> Vec<V>;

/// Pass 1 of the CPU selection, vectorized: the candidates in chunks of `VW`
/// blocks up to `stride` (`count` padded to whole chunks; the last chunk's
/// blocks past `last` read the last block and score -1e30), each head's `VW` scores summed across at once (`vsums`) and
/// stored at `slot(g, chunk start)`. A bound's channel term
/// max(q·min, q·max) is q times the maximum where q ≥ 0 and the minimum
/// elsewhere: one select and one FMA. Each block's summary lines
/// `SELECT_PREFETCH_BLOCKS` on are prefetched as it is read.
#[allow(clippy::too_many_arguments)]
fn score_chunks(
    b: &mut KernelBuilder,
    nsa: &NativeSparse,
    (q, blocks): (&str, &str),
    qbase: &[V],
    (d, row_words): (u64, u64),
    (first, last, count, stride): (&str, &str, &str, &str),
    (seg, blocks_last): (&str, &str),
    (scale, iota, ninf): (&str, &str, &str),
    slot: &dyn Fn(&mut KernelBuilder, u64, &str) -> V,
    scores: &str,
) {
    let lanes = VW as u64;
    let nv = d / lanes;
    let vty = KernelBuilder::vty(VW);
    let (zero_i, one_i, rowc) = (b.index(0), b.index(1), b.index(row_words));
    // Each head's query as vectors, and (bound) where its channels are ≥ 0.
    let zero_v = b.vzero(VW);
    let qv: Vec<Vec<(V, V)>> = qbase
        .iter()
        .map(|qb| {
            (0..nv)
                .map(|v| {
                    let off = b.index(v * lanes);
                    let i = b.addi(qb, &off);
                    let x = b.vload(q, &i, VW);
                    let pos = b.def(format!("arith.cmpf oge, {x}, {zero_v} : {vty}"));
                    (x, pos)
                })
                .collect()
        })
        .collect();
    let last1 = b.sub_or_zero(last, &one_i);
    // What the score reads of channels v·VW..: the mean (VW f32 words), or
    // the bound's f16 minima (VW/2 words) and, `d / 2` words on, its maxima.
    let (words, parts): (u64, &[u64]) = match nsa.score {
        NsaScore::Mean => (lanes, &[0]),
        NsaScore::Bound => (lanes / 2, &[0, d / 2]),
    };
    b.for_step(&zero_i, stride, lanes, |b, c0| {
        let blk0 = b.addi(first, c0);
        let mut accs: Vec<Vec<V>> = vec![Vec::new(); qbase.len()];
        for i in 0..lanes {
            let ic = b.index(i);
            let blk = b.addi(&blk0, &ic);
            let blk = b.minui(&blk, &last1);
            let rb = b.muli(&blk, &rowc);
            let base = b.addi(&rb, seg);
            let mut acc: Vec<V> = vec![zero_v.clone(); qbase.len()];
            for v in 0..nv {
                let off = b.index(v * words);
                let at = b.addi(&base, &off);
                // One prefetch per 64-byte line of what is read.
                if (v * words * 4) % 64 == 0 {
                    for &o in parts {
                        b.prefetch_ahead(blocks, &at, SELECT_PREFETCH_BLOCKS * row_words + o, blocks_last, "f32");
                    }
                }
                let loads: Vec<V> = parts
                    .iter()
                    .map(|&o| {
                        let o = b.index(o);
                        let a = b.addi(&at, &o);
                        let raw = b.vload(blocks, &a, words as u32);
                        if words == lanes {
                            return raw;
                        }
                        let h = b.def(format!("vector.bitcast {raw} : {} to vector<{VW}xf16>", KernelBuilder::vty(words as u32)));
                        b.def(format!("arith.extf {h} : vector<{VW}xf16> to {vty}"))
                    })
                    .collect();
                for (g, qg) in qv.iter().enumerate() {
                    let (x, pos) = &qg[v as usize];
                    let m = match nsa.score {
                        NsaScore::Mean => loads[0].clone(),
                        NsaScore::Bound => b.def(format!("arith.select {pos}, {}, {} : vector<{VW}xi1>, {vty}", loads[1], loads[0])),
                    };
                    acc[g] = b.vfma(x, &m, &acc[g], VW);
                }
            }
            for (g, a) in acc.into_iter().enumerate() {
                accs[g].push(a);
            }
        }
        // Lanes of candidates past the last score -1e30.
        let valid = b.sub_or_zero(count, c0);
        let valid = b.def(format!("arith.index_cast {valid} : index to i32"));
        let valid = b.def(format!("vector.broadcast {valid} : i32 to vector<{VW}xi32>"));
        let live = b.def(format!("arith.cmpi slt, {iota}, {valid} : vector<{VW}xi32>"));
        for (g, acc) in accs.iter().enumerate() {
            let sums = b.vsums(acc, VW);
            let sc = b.def(format!("arith.mulf {sums}, {scale} : {vty}"));
            let sc = b.def(format!("arith.select {live}, {sc}, {ninf} : vector<{VW}xi1>, {vty}"));
            let at = slot(b, g as u64, c0);
            b.vstore(&sc, scores, &at, VW);
        }
    });
}

/// The score of one block for one head, scalar (`NsaScore`): q at `qbase` of
/// `q`, the block's summary at `base` of `blocks`, scaled like a key's score.
#[allow(clippy::too_many_arguments)]
fn scalar_score(b: &mut KernelBuilder, nsa: &NativeSparse, q: &str, blocks: &str, qbase: &str, base: &str, d: u64, scale: &str) -> V {
    let (zero_i, dc) = (b.index(0), b.index(d));
    let zero = b.f32(0.0);
    let r = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, c, acc| {
        let qi = b.addi(qbase, c);
        let qv = b.load(q, &qi);
        match nsa.score {
            NsaScore::Mean => {
                let at = b.addi(base, c);
                let m = b.load(blocks, &at);
                vec![b.fma(&qv, &m, &acc[0])]
            }
            NsaScore::Bound => {
                // The minimum, then the maximum (f16 pairs, `block_slabs`).
                let two = b.index(2);
                let word = b.divui(c, &two);
                let at = b.addi(base, &word);
                let lo = b.f16_half(blocks, &at, c);
                let hd = b.index(d / 2);
                let at = b.addi(&at, &hd);
                let hi = b.f16_half(blocks, &at, c);
                let a = b.mul(&qv, &lo);
                let c = b.mul(&qv, &hi);
                let m = b.fbin("maximumf", &a, &c);
                vec![b.add(&acc[0], &m)]
            }
        }
    });
    b.mul(&r[0], scale)
}

/// Blocks ahead whose summary lines the CPU selection prefetches while it
/// scores a block.
const SELECT_PREFETCH_BLOCKS: u64 = 4;

/// Candidate blocks per lane whose scores the NVPTX selection keeps in
/// registers (32 lanes: 256 blocks, 16384 positions of blocks of 64).
const SELECT_SLOTS: u64 = 8;

/// Step 2 on NVPTX: a warp per (row, KV head). Its lanes take the candidate
/// blocks in turn (lane l: blocks first + l, first + l + 32, ...), each
/// scoring its first `SELECT_SLOTS` once and keeping the scores; each head's
/// max and sum over the candidates are warp reductions; then `top_n` rounds,
/// each a warp arg-max of the importances strictly below the previous
/// round's winner (importance first, then the earlier block), which lane 0
/// writes: the same list, in the same order, as the CPU's insertion.
fn emit_select_warp(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { spec, work, ins, out, .. } = *cx;
    let (nsa, h, kvh, d) = dims(spec)?;
    let group = h / kvh;
    let n = nsa.top_n as u64;
    let (dc, rowc, warp) = (b.index(d), b.index(nsa.block_words(kvh * d)), b.index(WARP));
    let (zero_i, one_i, nc_i) = (b.index(0), b.index(1), b.index(n));
    let (zero, one, none, ninf, big) = (b.f32(0.0), b.f32(1.0), b.f32(-1.0), b.f32(-1e30), b.f32(3.0e38));
    let scale = b.f32(1.0 / (d as f32).sqrt());
    let first = b.index((nsa.sinks as u64).div_ceil(nsa.block as u64));
    let slabs = b.index(nsa.block_slabs());
    b.parallel(work, |b, t| {
        let unit = b.divui(t, &warp);
        let lane = b.remui(t, &warp);
        let Row { r, kh, last, count, o, idx0, imp0 } = select_row(b, &nsa, kvh, &unit);
        let taken = b.minui(&count, &nc_i);
        let lane0 = b.def(format!("arith.cmpi eq, {lane}, {zero_i} : index"));
        b.if_then(&lane0, |b| clear_list(b, out, &o, &idx0, &imp0, &nc_i, &taken));
        let qbase = group_queries(b, &r, &kh, (group, d, h * d));
        let khd = b.muli(&kh, &dc);
        let seg = b.muli(&khd, &slabs);
        let score = |b: &mut KernelBuilder, g: usize, blk: &str| -> V {
            let rb = b.muli(blk, &rowc);
            let base = b.addi(&rb, &seg);
            scalar_score(b, &nsa, &ins[0], &ins[1], &qbase[g], &base, d, &scale)
        };
        let any = b.def(format!("arith.cmpi ugt, {last}, {first} : index"));
        // Uniform over the warp (it depends on the row and KV head only).
        b.if_then(&any, |b| {
            let start = b.addi(&first, &lane);
            let lastb = b.def(format!("arith.subi {last}, {one_i} : index"));
            // Blocks start + 32·j (j < SELECT_SLOTS) keep their scores in
            // registers; a lane past the candidates scores the last one and
            // masks it.
            let slots: Vec<(V, V, Vec<V>)> = (0..SELECT_SLOTS)
                .map(|j| {
                    let o = b.index(j * WARP);
                    let blk = b.addi(&start, &o);
                    let valid = b.def(format!("arith.cmpi ult, {blk}, {last} : index"));
                    let at = b.minui(&blk, &lastb);
                    let scores = (0..group as usize)
                        .map(|g| {
                            let s = score(b, g, &at);
                            b.def(format!("arith.select {valid}, {s}, {ninf} : f32"))
                        })
                        .collect();
                    let blkf = b.index_to_f32(&blk);
                    (blkf, valid, scores)
                })
                .collect();
            // Candidates past the slots (more than 32·SELECT_SLOTS): scored
            // again where they are needed.
            let rest = b.index(SELECT_SLOTS * WARP);
            let rest = b.addi(&start, &rest);
            // Pass 1: each head's max and sum over the slots and the rest,
            // then across the warp.
            let mut init = Vec::new();
            for g in 0..group as usize {
                let mut m = ninf.clone();
                for (_, _, sc) in &slots {
                    m = b.fbin("maxnumf", &m, &sc[g]);
                }
                let mut l = zero.clone();
                for (_, _, sc) in &slots {
                    let ds = b.sub(&sc[g], &m);
                    let e = math::exp(b, &ds);
                    l = b.add(&l, &e);
                }
                init.push((m, "f32".to_string()));
                init.push((l, "f32".to_string()));
            }
            let ml = b.for_fold_typed(&rest, &last, WARP, &init, |b, blk, acc| {
                let mut next = Vec::new();
                for g in 0..group as usize {
                    let s = score(b, g, blk);
                    let (m, l, _, _) = super::attention::online_step(b, &acc[2 * g], &acc[2 * g + 1], &s);
                    next.push(m);
                    next.push(l);
                }
                next
            });
            let mut heads = Vec::new();
            for g in 0..group as usize {
                let m = b.warp_all(&ml[2 * g], "maxnumf");
                let dm = b.sub(&ml[2 * g], &m);
                let w = math::exp(b, &dm);
                let lw = b.mul(&ml[2 * g + 1], &w);
                let l = b.warp_all(&lw, "addf");
                let inv = b.div(&one, &l);
                heads.push((m, inv));
            }
            let importance = |b: &mut KernelBuilder, scores: &[V]| -> V {
                let mut imp = zero.clone();
                for (s, (m, inv)) in scores.iter().zip(&heads) {
                    let ds = b.sub(s, m);
                    let e = math::exp(b, &ds);
                    imp = b.fma(&e, inv, &imp);
                }
                imp
            };
            // Slots past the candidates weigh -1: never taken.
            let slot_imps: Vec<(V, V)> = slots
                .iter()
                .map(|(blkf, valid, sc)| {
                    let imp = importance(b, sc);
                    (blkf.clone(), b.def(format!("arith.select {valid}, {imp}, {none} : f32")))
                })
                .collect();
            // Rounds: the best block below the previous winner.
            let big_blk = b.f32(1.0e9);
            let init = vec![(big.clone(), "f32".to_string()), (none.clone(), "f32".to_string())];
            b.for_fold_typed(&zero_i, &taken, 1, &init, |b, k, prev| {
                let (pimp, pblk) = (&prev[0], &prev[1]);
                // `(imp, blk)` if it is below the previous winner and better than `acc`.
                let consider = |b: &mut KernelBuilder, imp: &str, blkf: &str, acc: &[V]| -> Vec<V> {
                    let lower = b.def(format!("arith.cmpf olt, {imp}, {pimp} : f32"));
                    let tie = b.def(format!("arith.cmpf oeq, {imp}, {pimp} : f32"));
                    let later = b.def(format!("arith.cmpf ogt, {blkf}, {pblk} : f32"));
                    let tie_later = b.def(format!("arith.andi {tie}, {later} : i1"));
                    let below = b.def(format!("arith.ori {lower}, {tie_later} : i1"));
                    let higher = b.def(format!("arith.cmpf ogt, {imp}, {} : f32", acc[0]));
                    let same = b.def(format!("arith.cmpf oeq, {imp}, {} : f32", acc[0]));
                    let earlier = b.def(format!("arith.cmpf olt, {blkf}, {} : f32", acc[1]));
                    let same_earlier = b.def(format!("arith.andi {same}, {earlier} : i1"));
                    let better = b.def(format!("arith.ori {higher}, {same_earlier} : i1"));
                    let take = b.def(format!("arith.andi {below}, {better} : i1"));
                    vec![
                        b.def(format!("arith.select {take}, {imp}, {} : f32", acc[0])),
                        b.def(format!("arith.select {take}, {blkf}, {} : f32", acc[1])),
                    ]
                };
                let mut best = vec![none.clone(), big_blk.clone()];
                for (blkf, imp) in &slot_imps {
                    best = consider(b, imp, blkf, &best);
                }
                let init: Vec<(V, String)> = best.iter().map(|v| (v.clone(), "f32".to_string())).collect();
                let best = b.for_fold_typed(&rest, &last, WARP, &init, |b, blk, acc| {
                    let scores: Vec<V> = (0..group as usize).map(|g| score(b, g, blk)).collect();
                    let imp = importance(b, &scores);
                    let blkf = b.index_to_f32(blk);
                    consider(b, &imp, &blkf, acc)
                });
                let wimp = b.warp_all(&best[0], "maxnumf");
                let mine = b.def(format!("arith.cmpf oeq, {}, {wimp} : f32", best[0]));
                let cand = b.def(format!("arith.select {mine}, {}, {big_blk} : f32", best[1]));
                let wblk = b.warp_all(&cand, "minnumf");
                b.if_then(&lane0, |b| {
                    let i = b.addi(&idx0, k);
                    b.store(&wblk, out, &i);
                    let i = b.addi(&imp0, k);
                    b.store(&wimp, out, &i);
                });
                vec![wimp, wblk]
            });
        });
    });
    Ok(())
}

/// Two f32 values as one f32 word of f16 halves (`a[0]` low), each rounded
/// up (toward +∞) or down: the bound summary's storage (`NativeSparse::
/// block_slabs`; `sparsec_ir::f16_up` / `f16_down` are the reference). The
/// nearest f16 is stepped one unit outward where it fell on the wrong side.
fn f16_pair(b: &mut KernelBuilder, a: [&V; 2], up: bool) -> V {
    let halves: Vec<V> = a
        .iter()
        .map(|x| {
            let h = b.def(format!("arith.truncf {x} : f32 to f16"));
            let back = b.def(format!("arith.extf {h} : f16 to f32"));
            let wrong = b.def(format!("arith.cmpf {}, {back}, {x} : f32", if up { "olt" } else { "ogt" }));
            let bits = b.def(format!("arith.bitcast {h} : f16 to i16"));
            let (mag_mask, zero16, one16) = (b.i16(0x7fff), b.i16(0), b.i16(1));
            let mag = b.def(format!("arith.andi {bits}, {mag_mask} : i16"));
            let is_zero = b.def(format!("arith.cmpi eq, {mag}, {zero16} : i16"));
            let negative = b.def(format!("arith.cmpi slt, {bits}, {zero16} : i16"));
            // Up from a positive or down from a negative value: the magnitude grows.
            let grows = if up {
                let t = b.def("arith.constant true".into());
                b.def(format!("arith.xori {negative}, {t} : i1"))
            } else {
                negative
            };
            let plus = b.def(format!("arith.addi {bits}, {one16} : i16"));
            let minus = b.def(format!("arith.subi {bits}, {one16} : i16"));
            let stepped = b.def(format!("arith.select {grows}, {plus}, {minus} : i16"));
            let tiny = b.i16(if up { 0x0001 } else { -0x7fff });
            let stepped = b.def(format!("arith.select {is_zero}, {tiny}, {stepped} : i16"));
            let out = b.def(format!("arith.select {wrong}, {stepped}, {bits} : i16"));
            b.def(format!("arith.extui {out} : i16 to i32"))
        })
        .collect();
    let sixteen = b.i32(16);
    let high = b.def(format!("arith.shli {}, {sixteen} : i32", halves[1]));
    let word = b.def(format!("arith.ori {}, {high} : i32", halves[0]));
    b.def(format!("arith.bitcast {word} : i32 to f32"))
}
