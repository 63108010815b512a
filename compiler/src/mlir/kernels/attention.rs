//! Causal multi-head attention (grouped KV heads) over the KV caches, with
//! sliding windows and sink tokens; f32 or f16 caches. Two variants: on the
//! CPU, when the head width is a multiple of the vector width, three vector
//! passes over a stack row of scores; otherwise an online softmax accumulating
//! into the output row.

use super::{fixed_last, KernelCtx, VW};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use crate::mlir::math;
use sparsec_ir::{DType, Pattern, Window};

/// How many keys ahead CPU attention prefetches its K and V rows.
const ATTN_PREFETCH_KEYS: u64 = 16;

/// One attention unit's offsets: its query row and head (`qbase`), its KV head
/// (`khd`), its position `p` and the visible keys `start..end`.
struct AttnUnit {
    qbase: V,
    khd: V,
    p: V,
    start: V,
    end: V,
}

/// `out[r, head]` = softmax(q·kᵀ/√d)·v over the keys row r sees, one unit per (row, head).
pub(super) fn emit_attention(b: &mut KernelBuilder, cx: &KernelCtx<'_>, heads: u32, kv_heads: u32) -> Result<(), CompileError> {
    let KernelCtx { spec, device, work, ins, out } = *cx;
    let mut window: Option<(u32, u32)> = None;
    for p in &spec.patterns {
        match p {
            Pattern::Window(Window::Full) => {}
            Pattern::Window(Window::Sliding { size, sinks }) => window = Some((*size, *sinks)),
            other => return Err(spec.unsupported(&format!("#{} is not lowered yet (its pattern issue adds it)", other.keyword()))),
        }
    }
    let qw = fixed_last(spec, &spec.operands[0])?;
    let (h, kvh) = (heads as u64, kv_heads as u64);
    let d = qw / h;
    let kvw = d * kvh;
    let (hc, dc, qwc, kvwc, groupc) = (b.index(h), b.index(d), b.index(qw), b.index(kvw), b.index(h / kvh));
    let zero_i = b.index(0);
    let one_i = b.index(1);
    let zero = b.f32(0.0);
    let ninf = b.f32(-1e30);
    let scale = b.f32(1.0 / (d as f32).sqrt());
    let win = window.map(|(size, sinks)| (b.index(size as u64), b.index(sinks as u64), sinks));
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
    let kv_vload = |b: &mut KernelBuilder, buf: &str, i: &str| if f16_kv { b.vload_f16(buf, i, VW) } else { b.vload(buf, i, VW) };
    let kv_load = |b: &mut KernelBuilder, buf: &str, i: &str| if f16_kv { b.load_f16(buf, i) } else { b.load(buf, i) };
    let pos = b.pos();
    // The keys are the KV caches (operands 1 and 2): every position before
    // this call's rows, then the rows themselves (appended by the runtime).
    // Query row r sits at position pos + r and sees keys 0..=pos + r.
    let first_key = |b: &mut KernelBuilder, end: &str| -> V {
        match &win {
            // Without sinks nothing before the window is visible: start there.
            Some((size, _, 0)) => {
                let past = b.def(format!("arith.cmpi ugt, {end}, {size} : index"));
                let st = b.def(format!("arith.subi {end}, {size} : index"));
                b.def(format!("arith.select {past}, {st}, {zero_i} : index"))
            }
            _ => zero_i.clone(),
        }
    };
    let masked = |b: &mut KernelBuilder, s: &str, j: &str, p: &str| -> V {
        match &win {
            None => s.to_string(),
            Some((size, sinks, _)) => {
                let jp = b.addi(j, size);
                let recent = b.def(format!("arith.cmpi ugt, {jp}, {p} : index"));
                let sink = b.def(format!("arith.cmpi ult, {j}, {sinks} : index"));
                let vis = b.def(format!("arith.ori {recent}, {sink} : i1"));
                b.def(format!("arith.select {vis}, {s}, {ninf} : f32"))
            }
        }
    };
    // unit = q * heads + head: where its query, its KV head and its keys are.
    // Causal rows cost more the later they are, and the runtime gives each
    // thread a contiguous range of units; taking rows in the order
    // 0, seq-1, 1, seq-2, ... pairs cheap with dear rows, so every range
    // costs about the same.
    let seq = b.seq();
    let unit_of = |b: &mut KernelBuilder, unit: &str| -> AttnUnit {
        let q = b.divui(unit, &hc);
        let head = b.remui(unit, &hc);
        let two = b.index(2);
        let half = b.divui(&q, &two);
        let odd = b.remui(&q, &two);
        let odd = b.def(format!("arith.index_cast {odd} : index to i1"));
        let last = b.def(format!("arith.subi {seq}, {one_i} : index"));
        let mirrored = b.def(format!("arith.subi {last}, {half} : index"));
        let row = b.def(format!("arith.select {odd}, {mirrored}, {half} : index"));
        let kh = b.divui(&head, &groupc);
        let qrow = b.muli(&row, &qwc);
        let qhd = b.muli(&head, &dc);
        let qbase = b.addi(&qrow, &qhd);
        let khd = b.muli(&kh, &dc);
        let p = b.addi(&pos, &row);
        let end = b.addi(&p, &one_i);
        let start = first_key(b, &end);
        AttnUnit { qbase, khd, p, start, end }
    };
    if device == Device::Cpu && d > 0 && d % VW as u64 == 0 {
        // Three passes per (row, head) over a stack row of scores: q·k (VW keys
        // at a time; then a window's mask), exp and sum, then Σ p·v with the
        // head's d/VW accumulators in registers.
        let total = b.addi(&pos, &b.seq());
        let scores = b.alloca_f32(&total);
        let nv = (d / VW as u64) as usize;
        // The K and V caches hold as many positions of the same width.
        let kv_elem = if f16_kv { "f16" } else { "f32" };
        let kv_len = b.def(format!("memref.dim {kbuf}, {zero_i} : memref<?x{kv_elem}>"));
        let kv_last = b.def(format!("arith.subi {kv_len}, {one_i} : index"));
        b.parallel(work, |b, unit| {
            let AttnUnit { qbase, khd, p, start, end } = unit_of(b, unit);
            let qs: Vec<V> = (0..nv)
                .map(|v| {
                    let o = b.index(v as u64 * VW as u64);
                    let i = b.addi(&qbase, &o);
                    b.vload(&ins[0], &i, VW)
                })
                .collect();
            // The cache is read from memory (the weights stream through
            // the caches between layers): ask for rows ATTN_PREFETCH_KEYS
            // ahead, clamped to the caches' last element.
            let prefetch_row = |b: &mut KernelBuilder, buf: &str, j: &str| {
                let rb = b.muli(j, &kvwc);
                let base = b.addi(&rb, &khd);
                b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw, &kv_last, kv_elem);
                b.prefetch_ahead(buf, &base, ATTN_PREFETCH_KEYS * kvw + d - 1, &kv_last, kv_elem);
            };
            // Key j's q·k as one vector of partial sums (FMAs over the head's slices).
            let key_dot = |b: &mut KernelBuilder, j: &str| -> V {
                let kb = b.muli(j, &kvwc);
                let kbase = b.addi(&kb, &khd);
                let mut acc = b.vzero(VW);
                for (v, q) in qs.iter().enumerate() {
                    let o = b.index(v as u64 * VW as u64);
                    let i = b.addi(&kbase, &o);
                    let k = kv_vload(b, &kbuf, &i);
                    acc = b.vfma(q, &k, &acc, VW);
                }
                acc
            };
            // Scores in blocks of VW keys: the keys' dots overlap in flight,
            // and one butterfly (`vsums`) sums all VW of them into a vector.
            let vwc = b.index(VW as u64);
            let span = b.def(format!("arith.subi {end}, {start} : index"));
            let blocks = b.divui(&span, &vwc);
            let blocked = b.muli(&blocks, &vwc);
            let block_end = b.addi(&start, &blocked);
            let vninf = b.vbroadcast(&ninf, VW);
            let vscale = b.vbroadcast(&scale, VW);
            let vmax = b.for_fold_typed(&start, &block_end, VW as u64, &[(vninf, KernelBuilder::vty(VW))], |b, jb, acc| {
                let dots: Vec<V> = (0..VW as u64)
                    .map(|t| {
                        let o = b.index(t);
                        let j = b.addi(jb, &o);
                        prefetch_row(b, &kbuf, &j);
                        key_dot(b, &j)
                    })
                    .collect();
                let sums = b.vsums(&dots, VW);
                let s = b.def(format!("arith.mulf {sums}, {vscale} : {}", KernelBuilder::vty(VW)));
                b.vstore(&s, &scores, jb, VW);
                vec![b.def(format!("arith.maxnumf {}, {s} : {}", acc[0], KernelBuilder::vty(VW)))]
            });
            let block_max = b.def(format!("vector.reduction <maxnumf>, {} : {} into f32", vmax[0], KernelBuilder::vty(VW)));
            let m = b.for_fold(&block_end, &end, &[block_max], |b, j, acc| {
                let dot = key_dot(b, j);
                let dsum = b.vsum(&dot, VW);
                let s = b.mul(&dsum, &scale);
                b.store(&s, &scores, j);
                vec![b.fbin("maxnumf", &acc[0], &s)]
            });
            // A window masks keys by position: apply it to the stored
            // scores (-inf outside) and take the max of what is visible.
            let m = if win.is_some() {
                b.for_fold(&start, &end, std::slice::from_ref(&ninf), |b, j, acc| {
                    let s = b.load(&scores, j);
                    let s = masked(b, &s, j, &p);
                    b.store(&s, &scores, j);
                    vec![b.fbin("maxnumf", &acc[0], &s)]
                })
            } else {
                m
            };
            let l = b.for_fold(&start, &end, std::slice::from_ref(&zero), |b, j, acc| {
                let s = b.load(&scores, j);
                let c = b.sub(&s, &m[0]);
                let e = math::exp(b, &c);
                b.store(&e, &scores, j);
                // Reassociable, so LLVM may vectorize this loop (exp included).
                vec![b.def(format!("arith.addf {}, {e} fastmath<reassoc> : f32", acc[0]))]
            });
            let z = b.vzero(VW);
            let init: Vec<(V, String)> = (0..nv).map(|_| (z.clone(), KernelBuilder::vty(VW))).collect();
            let accs = b.for_fold_typed(&start, &end, 1, &init, |b, j, accs| {
                let e = b.load(&scores, j);
                let ev = b.vbroadcast(&e, VW);
                prefetch_row(b, &vbuf, j);
                let vb = b.muli(j, &kvwc);
                let vbase = b.addi(&vb, &khd);
                (0..nv)
                    .map(|v| {
                        let o = b.index(v as u64 * VW as u64);
                        let i = b.addi(&vbase, &o);
                        let x = kv_vload(b, &vbuf, &i);
                        b.vfma(&ev, &x, &accs[v], VW)
                    })
                    .collect()
            });
            let one = b.f32(1.0);
            let inv = b.div(&one, &l[0]);
            let invv = b.vbroadcast(&inv, VW);
            for (v, acc) in accs.iter().enumerate() {
                let y = b.def(format!("arith.mulf {acc}, {invv} : {}", KernelBuilder::vty(VW)));
                let o = b.index(v as u64 * VW as u64);
                let i = b.addi(&qbase, &o);
                b.vstore(&y, out, &i, VW);
            }
        });
    } else {
        b.parallel(work, |b, unit| {
            // Online softmax over the visible keys, accumulating the
            // weighted values in the output row itself.
            let AttnUnit { qbase, khd, p, start, end } = unit_of(b, unit);
            b.for_each(&zero_i, &dc, |b, c| {
                let o = b.addi(&qbase, c);
                b.store(&zero, out, &o);
            });
            let ml = b.for_fold(&start, &end, &[ninf.clone(), zero.clone()], |b, j, acc| {
                let kbase0 = b.muli(j, &kvwc);
                let kbase = b.addi(&kbase0, &khd);
                let dot = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, c, a| {
                    let qi = b.addi(&qbase, c);
                    let ki = b.addi(&kbase, c);
                    let qv = b.load(&ins[0], &qi);
                    let kv = kv_load(b, &kbuf, &ki);
                    vec![b.fma(&qv, &kv, &a[0])]
                });
                let s = b.mul(&dot[0], &scale);
                // A key outside the window gets -inf (weight 0).
                let s = masked(b, &s, j, &p);
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
                    let vv = kv_load(b, &vbuf, &vi);
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
    }
    Ok(())
}
