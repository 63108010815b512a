//! Causal multi-head attention (grouped KV heads) over the KV caches, with
//! sliding windows and sink tokens; f32 or f16 caches; windowed layers read
//! ring caches on the CPU. A query visits only the keys it sees (its sinks,
//! then its window), so a window costs O(window + sinks) per query.
//!
//! Two variants. On the CPU, when the head width is a multiple of the vector
//! width: one unit per (row, KV head, split) serves every query head of the KV
//! group, so each K/V row is streamed once per group; in decode the visible
//! keys are split over up to `ATTN_SPLITS` units (flash-decoding), each writes
//! its partial softmax (max, sum, weighted values) to a scratch buffer, and a
//! second phase of units, one per (row, head), combines them. Otherwise (and
//! on NVIDIA): one unit per (row, head), an online softmax accumulating into
//! the output row.

use super::{fixed_last, KernelCtx, KernelSpec, VW};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::{DType, Op, Pattern, SymSize, Window};

/// How many keys ahead CPU attention prefetches its K and V rows.
const ATTN_PREFETCH_KEYS: u64 = 16;
/// The most units one decode row's keys are split over, per KV head.
pub const ATTN_SPLITS: u64 = 8;
/// The fewest visible keys a decode row splits (into `ATTN_SPLITS` spans):
/// shorter rows are not worth a combine.
const SPLIT_MIN_KEYS: u64 = 256;
/// Rows a windowed layer's ring cache holds beyond its window and sinks: the
/// most rows one call may append (the CPU runtime splits longer calls).
pub const RING_SLACK: u32 = 256;

/// An attention op's sliding window: `(size, sinks)`, `None` when full.
pub fn window_of(spec: &KernelSpec) -> Result<Option<(u32, u32)>, CompileError> {
    let mut window = None;
    for p in &spec.patterns {
        match p {
            Pattern::Window(Window::Full) => {}
            Pattern::Window(Window::Sliding { size, sinks }) => window = Some((*size, *sinks)),
            other => return Err(spec.unsupported(&format!("#{} is not lowered yet (its pattern issue adds it)", other.keyword()))),
        }
    }
    Ok(window)
}

/// The CPU ring cache of a windowed attention: `(sinks, ring rows)`; key j
/// lives in row j below the sinks, else in row `sinks + (j - sinks) % ring`.
pub fn cpu_ring(window: Option<(u32, u32)>) -> Option<(u32, u32)> {
    window.map(|(size, sinks)| (sinks, size + RING_SLACK))
}

/// `(heads, kv_heads, head width)` of an attention kernel.
fn dims(spec: &KernelSpec) -> Result<(u64, u64, u64), CompileError> {
    let Op::Attention { heads, kv_heads } = spec.op else { return Err(spec.unsupported("not an attention op")) };
    let qw = fixed_last(spec, &spec.operands[0])?;
    Ok((heads as u64, kv_heads as u64, qw / (heads as u64).max(1)))
}

/// Whether the CPU kernel is the grouped, split variant (two phases of units
/// and a scratch buffer).
pub fn cpu_split(spec: &KernelSpec) -> bool {
    dims(spec).is_ok_and(|(_, _, d)| d > 0 && d % VW as u64 == 0)
}

/// The CPU units of the split variant's first phase (partials), and of both
/// phases together: `(seq·kv_heads·ATTN_SPLITS, that + seq·heads)`.
pub fn cpu_phases(spec: &KernelSpec) -> Result<(SymSize, SymSize), CompileError> {
    let (h, kvh, _) = dims(spec)?;
    let first = kvh * ATTN_SPLITS;
    Ok((SymSize { coef: first, seq_pow: 1 }, SymSize { coef: first + h, seq_pow: 1 }))
}

/// f32 words of the split variant's scratch: per (KV head, split, head of the
/// group) a max, a sum and a head-width row of weighted values (decode rows only).
pub fn scratch_words(spec: &KernelSpec) -> Result<u64, CompileError> {
    let (h, kvh, d) = dims(spec)?;
    Ok(kvh * ATTN_SPLITS * (h / kvh.max(1)) * (d + 2))
}

/// What a query row sees: keys are numbered `t in 0..count`, the first
/// `sinks` of them at positions `0..sinks`, the rest at `from + (t - sinks)`.
struct Visible {
    sinks: V,
    from: V,
    count: V,
}

/// `out[r, head]` = softmax(q·kᵀ/√d)·v over the keys row r sees.
pub(super) fn emit_attention(b: &mut KernelBuilder, cx: &KernelCtx<'_>, heads: u32, kv_heads: u32) -> Result<(), CompileError> {
    let KernelCtx { spec, device, ins, .. } = *cx;
    let window = window_of(spec)?;
    let (h, kvh, d) = dims(spec)?;
    if heads == 0 || kv_heads == 0 || h % kvh != 0 {
        return Err(spec.unsupported("heads must be a positive multiple of kv_heads"));
    }
    // f16 caches (`KvCacheType::F16`) are read as f16 views of byte
    // buffers and widened to f32 as they load.
    let f16_kv = spec.operands[1].dtype == DType::F16;
    if f16_kv && device != Device::Cpu {
        return Err(spec.unsupported("f16 KV caches are read on the CPU only"));
    }
    let (kbuf, vbuf) = if f16_kv {
        b.byte_param(&ins[1]);
        b.byte_param(&ins[2]);
        (b.f16_view(&ins[1]), b.f16_view(&ins[2]))
    } else {
        (ins[1].clone(), ins[2].clone())
    };
    let ctx = Attn { h, kvh, d, window, ring: if device == Device::Cpu { cpu_ring(window) } else { None }, f16_kv, kbuf, vbuf };
    if device == Device::Cpu && cpu_split(spec) {
        ctx.emit_split(b, cx)
    } else {
        ctx.emit_online(b, cx)
    }
}

struct Attn {
    h: u64,
    kvh: u64,
    d: u64,
    window: Option<(u32, u32)>,
    ring: Option<(u32, u32)>,
    f16_kv: bool,
    kbuf: V,
    vbuf: V,
}

impl Attn {
    fn kv_elem(&self) -> &'static str {
        if self.f16_kv {
            "f16"
        } else {
            "f32"
        }
    }

    fn kv_vload(&self, b: &mut KernelBuilder, buf: &str, i: &str) -> V {
        if self.f16_kv {
            b.vload_f16(buf, i, VW)
        } else {
            b.vload(buf, i, VW)
        }
    }

    fn kv_load(&self, b: &mut KernelBuilder, buf: &str, i: &str) -> V {
        if self.f16_kv {
            b.load_f16(buf, i)
        } else {
            b.load(buf, i)
        }
    }

    /// The keys the query at position `p` sees (the caches hold positions
    /// `0..=p` by then: the runtime appends a call's rows before attention).
    fn visible(&self, b: &mut KernelBuilder, p: &str) -> Visible {
        let zero = b.index(0);
        let one = b.index(1);
        let end = b.addi(p, &one);
        match self.window {
            None => Visible { sinks: zero.clone(), from: zero, count: end },
            Some((size, sinks)) => {
                let size = b.index(size as u64);
                let past = b.def(format!("arith.cmpi ugt, {end}, {size} : index"));
                let st = b.def(format!("arith.subi {end}, {size} : index"));
                let from = b.def(format!("arith.select {past}, {st}, {zero} : index"));
                // Sinks are the positions below both `sinks` and the window.
                let s = b.index(sinks as u64);
                let sinks = b.minui(&s, &from);
                let span = b.def(format!("arith.subi {end}, {from} : index"));
                let count = b.addi(&sinks, &span);
                Visible { sinks, from, count }
            }
        }
    }

    /// The cache row holding visible key `t` (its position, wrapped into the
    /// ring on the CPU when the layer has a window).
    fn key_row(&self, b: &mut KernelBuilder, vis: &Visible, t: &str) -> V {
        if self.window.is_none() {
            return t.to_string();
        }
        let in_sinks = b.def(format!("arith.cmpi ult, {t}, {} : index", vis.sinks));
        let off = b.def(format!("arith.subi {}, {} : index", vis.from, vis.sinks));
        let later = b.addi(t, &off);
        let j = b.def(format!("arith.select {in_sinks}, {t}, {later} : index"));
        match self.ring {
            None => j,
            Some((sinks, ring)) => {
                let s = b.index(sinks as u64);
                let r = b.index(ring as u64);
                let below = b.def(format!("arith.cmpi ult, {j}, {s} : index"));
                let past = b.def(format!("arith.subi {j}, {s} : index"));
                let wrapped = b.remui(&past, &r);
                let slot = b.addi(&s, &wrapped);
                b.def(format!("arith.select {below}, {j}, {slot} : index"))
            }
        }
    }

    /// Splits of a row's visible keys: `ATTN_SPLITS` in decode (one row) with
    /// at least `SPLIT_MIN_KEYS` keys, else one. Always all of them, so that
    /// every unit of the first phase has work and the runtime's even ranges of
    /// units are even ranges of work.
    fn splits(&self, b: &mut KernelBuilder, count: &str) -> V {
        let one = b.index(1);
        let seq = b.seq();
        let min_keys = b.index(SPLIT_MIN_KEYS);
        let most = b.index(ATTN_SPLITS);
        let long = b.def(format!("arith.cmpi uge, {count}, {min_keys} : index"));
        let decode = b.def(format!("arith.cmpi eq, {seq}, {one} : index"));
        let split = b.def(format!("arith.andi {long}, {decode} : i1"));
        b.def(format!("arith.select {split}, {most}, {one} : index"))
    }

    /// Row `i` of the units' row order 0, seq-1, 1, seq-2, ...: causal rows
    /// cost more the later they are, and the runtime gives each thread a
    /// contiguous range of units, so every range costs about the same.
    fn mirrored_row(b: &mut KernelBuilder, i: &str) -> V {
        let seq = b.seq();
        let one = b.index(1);
        let two = b.index(2);
        let half = b.divui(i, &two);
        let odd = b.remui(i, &two);
        let odd = b.def(format!("arith.index_cast {odd} : index to i1"));
        let last = b.def(format!("arith.subi {seq}, {one} : index"));
        let mirrored = b.def(format!("arith.subi {last}, {half} : index"));
        b.def(format!("arith.select {odd}, {mirrored}, {half} : index"))
    }

    /// The grouped, split CPU variant (see the file's doc).
    fn emit_split(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { spec, ins, out, .. } = *cx;
        let scratch = ins.get(3).ok_or_else(|| spec.unsupported("the split attention kernel takes a scratch buffer"))?.clone();
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let group = h / kvh;
        let qw = h * d;
        let kvw = kvh * d;
        let nv = (d / VW as u64) as usize;
        let (first, total) = cpu_phases(spec)?;
        let first = b.sym(first);
        let total = b.sym(total);
        let zero_i = b.index(0);
        let one_i = b.index(1);
        let (dc, qwc, kvwc, groupc, hc, splitsc) =
            (b.index(d), b.index(qw), b.index(kvw), b.index(group), b.index(h), b.index(ATTN_SPLITS));
        let rec = b.index(d + 2);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
        let seq = b.seq();
        // Scores of one head over one split's keys (at most every position).
        let all = b.addi(&pos, &seq);
        let scores = b.alloca_f32(&all);
        let kv_len = b.def(format!("memref.dim {}, {zero_i} : memref<?x{}>", self.kbuf, self.kv_elem()));
        let kv_last = b.def(format!("arith.subi {kv_len}, {one_i} : index"));
        // Where a partial of (KV head, split, head of the group) lives in the scratch.
        let record = |b: &mut KernelBuilder, kh: &str, s: &str, g: &str| -> V {
            let a = b.muli(kh, &splitsc);
            let a = b.addi(&a, s);
            let a = b.muli(&a, &groupc);
            let a = b.addi(&a, g);
            b.muli(&a, &rec)
        };
        // Phase 1: partial softmax of (row, KV head, split) for each head of the group.
        let ub = b.minui("%hi", &first);
        b.for_each("%lo", &ub, |b, unit| {
            let per_row = b.index(kvh * ATTN_SPLITS);
            let r = b.divui(unit, &per_row);
            let rem = b.remui(unit, &per_row);
            let kh = b.divui(&rem, &splitsc);
            let s = b.remui(&rem, &splitsc);
            let row = Self::mirrored_row(b, &r);
            let p = b.addi(&pos, &row);
            let vis = self.visible(b, &p);
            let n = self.splits(b, &vis.count);
            let active = b.def(format!("arith.cmpi ult, {s}, {n} : index"));
            b.if_then(&active, |b| {
                // Keys t0..t1 of the row's visible ones.
                let a = b.muli(&s, &vis.count);
                let t0 = b.divui(&a, &n);
                let s1 = b.addi(&s, &one_i);
                let a = b.muli(&s1, &vis.count);
                let t1 = b.divui(&a, &n);
                let khd = b.muli(&kh, &dc);
                let row_base = |b: &mut KernelBuilder, buf: &str, t: &str| -> V {
                    let j = self.key_row(b, &vis, t);
                    let rb = b.muli(&j, &kvwc);
                    let base = b.addi(&rb, &khd);
                    // The caches are read from memory: ask for rows ahead,
                    // clamped to the caches' last element.
                    b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw, &kv_last, self.kv_elem());
                    b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw + d - 1, &kv_last, self.kv_elem());
                    base
                };
                b.for_each(&zero_i, &groupc, |b, g| {
                    let head0 = b.muli(&kh, &groupc);
                    let head = b.addi(&head0, g);
                    let qrow = b.muli(&row, &qwc);
                    let qhd = b.muli(&head, &dc);
                    let qbase = b.addi(&qrow, &qhd);
                    let qs: Vec<V> = (0..nv)
                        .map(|v| {
                            let o = b.index(v as u64 * VW as u64);
                            let i = b.addi(&qbase, &o);
                            b.vload(&ins[0], &i, VW)
                        })
                        .collect();
                    let key_dot = |b: &mut KernelBuilder, t: &str| -> V {
                        let kbase = row_base(b, &self.kbuf, t);
                        let mut acc = b.vzero(VW);
                        for (v, q) in qs.iter().enumerate() {
                            let o = b.index(v as u64 * VW as u64);
                            let i = b.addi(&kbase, &o);
                            let k = self.kv_vload(b, &self.kbuf, &i);
                            acc = b.vfma(q, &k, &acc, VW);
                        }
                        acc
                    };
                    // Scores VW keys at a time (their dots overlap in flight and one
                    // butterfly sums all VW), then the rest one by one.
                    let vwc = b.index(VW as u64);
                    let span = b.def(format!("arith.subi {t1}, {t0} : index"));
                    let blocks = b.divui(&span, &vwc);
                    let blocked = b.muli(&blocks, &vwc);
                    let block_end = b.addi(&t0, &blocked);
                    let vninf = b.vbroadcast(&ninf, VW);
                    let vscale = b.vbroadcast(&scale, VW);
                    let vmax = b.for_fold_typed(&t0, &block_end, VW as u64, &[(vninf, KernelBuilder::vty(VW))], |b, tb, acc| {
                        let dots: Vec<V> = (0..VW as u64)
                            .map(|u| {
                                let o = b.index(u);
                                let t = b.addi(tb, &o);
                                key_dot(b, &t)
                            })
                            .collect();
                        let sums = b.vsums(&dots, VW);
                        let sv = b.def(format!("arith.mulf {sums}, {vscale} : {}", KernelBuilder::vty(VW)));
                        let at = b.def(format!("arith.subi {tb}, {t0} : index"));
                        b.vstore(&sv, &scores, &at, VW);
                        vec![b.def(format!("arith.maxnumf {}, {sv} : {}", acc[0], KernelBuilder::vty(VW)))]
                    });
                    let block_max = b.def(format!("vector.reduction <maxnumf>, {} : {} into f32", vmax[0], KernelBuilder::vty(VW)));
                    let m = b.for_fold(&block_end, &t1, &[block_max], |b, t, acc| {
                        let dot = key_dot(b, t);
                        let dsum = b.vsum(&dot, VW);
                        let sv = b.mul(&dsum, &scale);
                        let at = b.def(format!("arith.subi {t}, {t0} : index"));
                        b.store(&sv, &scores, &at);
                        vec![b.fbin("maxnumf", &acc[0], &sv)]
                    });
                    let l = b.for_fold(&zero_i, &span, std::slice::from_ref(&zero), |b, i, acc| {
                        let sv = b.load(&scores, i);
                        let c = b.sub(&sv, &m[0]);
                        let e = math::exp(b, &c);
                        b.store(&e, &scores, i);
                        // Reassociable, so LLVM may vectorize this loop (exp included).
                        vec![b.def(format!("arith.addf {}, {e} fastmath<reassoc> : f32", acc[0]))]
                    });
                    let z = b.vzero(VW);
                    let init: Vec<(V, String)> = (0..nv).map(|_| (z.clone(), KernelBuilder::vty(VW))).collect();
                    let accs = b.for_fold_typed(&t0, &t1, 1, &init, |b, t, accs| {
                        let at = b.def(format!("arith.subi {t}, {t0} : index"));
                        let e = b.load(&scores, &at);
                        let ev = b.vbroadcast(&e, VW);
                        let vbase = row_base(b, &self.vbuf, t);
                        (0..nv)
                            .map(|v| {
                                let o = b.index(v as u64 * VW as u64);
                                let i = b.addi(&vbase, &o);
                                let x = self.kv_vload(b, &self.vbuf, &i);
                                b.vfma(&ev, &x, &accs[v], VW)
                            })
                            .collect()
                    });
                    let whole = b.def(format!("arith.cmpi eq, {n}, {one_i} : index"));
                    b.if_else(
                        &whole,
                        |b| {
                            // One split: the row's result directly.
                            let one = b.f32(1.0);
                            let inv = b.div(&one, &l[0]);
                            let invv = b.vbroadcast(&inv, VW);
                            for (v, acc) in accs.iter().enumerate() {
                                let y = b.def(format!("arith.mulf {acc}, {invv} : {}", KernelBuilder::vty(VW)));
                                let o = b.index(v as u64 * VW as u64);
                                let i = b.addi(&qbase, &o);
                                b.vstore(&y, out, &i, VW);
                            }
                        },
                        |b| {
                            let at = record(b, &kh, &s, g);
                            b.store(&m[0], &scratch, &at);
                            let at1 = b.addi(&at, &one_i);
                            b.store(&l[0], &scratch, &at1);
                            for (v, acc) in accs.iter().enumerate() {
                                let o = b.index(2 + v as u64 * VW as u64);
                                let i = b.addi(&at, &o);
                                b.vstore(acc, &scratch, &i, VW);
                            }
                        },
                    );
                });
            });
        });
        // Phase 2: per (row, head) of a split decode row, the partials combined.
        let lb = b.maxui("%lo", &first);
        let ub = b.minui("%hi", &total);
        b.for_each(&lb, &ub, |b, unit| {
            let c = b.def(format!("arith.subi {unit}, {first} : index"));
            let head = b.remui(&c, &hc);
            // Only a one-row call splits; its row is 0.
            let vis = self.visible(b, &pos);
            let n = self.splits(b, &vis.count);
            let split = b.def(format!("arith.cmpi ugt, {n}, {one_i} : index"));
            b.if_then(&split, |b| {
                let kh = b.divui(&head, &groupc);
                let g = b.remui(&head, &groupc);
                let m = b.for_fold(&zero_i, &n, std::slice::from_ref(&ninf), |b, s, acc| {
                    let at = record(b, &kh, s, &g);
                    let ms = b.load(&scratch, &at);
                    vec![b.fbin("maxnumf", &acc[0], &ms)]
                });
                let z = b.vzero(VW);
                let mut init: Vec<(V, String)> = vec![(zero.clone(), "f32".into())];
                init.extend((0..nv).map(|_| (z.clone(), KernelBuilder::vty(VW))));
                let acc = b.for_fold_typed(&zero_i, &n, 1, &init, |b, s, acc| {
                    let at = record(b, &kh, s, &g);
                    let ms = b.load(&scratch, &at);
                    let at1 = b.addi(&at, &one_i);
                    let ls = b.load(&scratch, &at1);
                    let dm = b.sub(&ms, &m[0]);
                    let w = math::exp(b, &dm);
                    let mut next = vec![b.fma(&ls, &w, &acc[0])];
                    let wv = b.vbroadcast(&w, VW);
                    for v in 0..nv {
                        let o = b.index(2 + v as u64 * VW as u64);
                        let i = b.addi(&at, &o);
                        let x = b.vload(&scratch, &i, VW);
                        next.push(b.vfma(&wv, &x, &acc[1 + v], VW));
                    }
                    next
                });
                let one = b.f32(1.0);
                let inv = b.div(&one, &acc[0]);
                let invv = b.vbroadcast(&inv, VW);
                let qhd = b.muli(&head, &dc);
                for v in 0..nv {
                    let y = b.def(format!("arith.mulf {}, {invv} : {}", acc[1 + v], KernelBuilder::vty(VW)));
                    let o = b.index(v as u64 * VW as u64);
                    let i = b.addi(&qhd, &o);
                    b.vstore(&y, out, &i, VW);
                }
            });
        });
        Ok(())
    }

    /// One unit per (row, head): an online softmax over the visible keys,
    /// accumulating the weighted values in the output row itself.
    fn emit_online(&self, b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
        let KernelCtx { work, ins, out, .. } = *cx;
        let (h, kvh, d) = (self.h, self.kvh, self.d);
        let (hc, dc, qwc, kvwc, groupc) = (b.index(h), b.index(d), b.index(h * d), b.index(kvh * d), b.index(h / kvh));
        let zero_i = b.index(0);
        let zero = b.f32(0.0);
        let ninf = b.f32(-1e30);
        let scale = b.f32(1.0 / (d as f32).sqrt());
        let pos = b.pos();
        b.parallel(work, |b, unit| {
            let r = b.divui(unit, &hc);
            let head = b.remui(unit, &hc);
            let row = Self::mirrored_row(b, &r);
            let kh = b.divui(&head, &groupc);
            let qrow = b.muli(&row, &qwc);
            let qhd = b.muli(&head, &dc);
            let qbase = b.addi(&qrow, &qhd);
            let khd = b.muli(&kh, &dc);
            let p = b.addi(&pos, &row);
            let vis = self.visible(b, &p);
            b.for_each(&zero_i, &dc, |b, c| {
                let o = b.addi(&qbase, c);
                b.store(&zero, out, &o);
            });
            let ml = b.for_fold(&zero_i, &vis.count, &[ninf.clone(), zero.clone()], |b, t, acc| {
                let j = self.key_row(b, &vis, t);
                let kbase0 = b.muli(&j, &kvwc);
                let kbase = b.addi(&kbase0, &khd);
                let dot = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, c, a| {
                    let qi = b.addi(&qbase, c);
                    let ki = b.addi(&kbase, c);
                    let qv = b.load(&ins[0], &qi);
                    let kv = self.kv_load(b, &self.kbuf, &ki);
                    vec![b.fma(&qv, &kv, &a[0])]
                });
                let s = b.mul(&dot[0], &scale);
                let m_new = b.fbin("maxnumf", &acc[0], &s);
                let dm = b.sub(&acc[0], &m_new);
                let corr = math::exp(b, &dm);
                let ds = b.sub(&s, &m_new);
                let pr = math::exp(b, &ds);
                let l = b.fma(&acc[1], &corr, &pr);
                b.for_each(&zero_i, &dc, |b, c| {
                    let o = b.addi(&qbase, c);
                    let vi = b.addi(&kbase, c);
                    let prev = b.load(out, &o);
                    let vv = self.kv_load(b, &self.vbuf, &vi);
                    let pv = b.mul(&pr, &vv);
                    let y = b.fma(&prev, &corr, &pv);
                    b.store(&y, out, &o);
                });
                vec![m_new, l]
            });
            let one = b.f32(1.0);
            let inv = b.div(&one, &ml[1]);
            b.for_each(&zero_i, &dc, |b, c| {
                let o = b.addi(&qbase, c);
                let y = b.load(out, &o);
                let y = b.mul(&y, &inv);
                b.store(&y, out, &o);
            });
        });
        Ok(())
    }
}
