//! Rotary position embedding: rotates pairs of each head's features (adjacent
//! pairs, GGUF layout, or halves, Hugging Face layout) by angles of the
//! rows' positions, in f64 like the reference.

use super::{fixed_last, KernelCtx};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder};
use crate::mlir::math;

/// RoPE of `in0[rows, heads·d]`, row r at position `pos + r`: on the CPU one
/// unit per (row, pair index), its angle shared by every head; on NVPTX one
/// thread per rotated pair.
pub(super) fn emit_rope(b: &mut KernelBuilder, cx: &KernelCtx<'_>, heads: u32, theta: f32, adjacent: bool) -> Result<(), CompileError> {
    let KernelCtx { spec, device, work, ins, out } = *cx;
    // The angle pos·θ^(−2i/d) and its sin/cos are computed in f64 like the reference.
    let w = fixed_last(spec, &spec.result)?;
    let d = w / heads as u64;
    let half = d / 2;
    let (wc, dc, halfc) = (b.index(w), b.index(d), b.index(half));
    // Pair i's frequency θ^(−2i/d): on the CPU from a table computed here
    // exactly as the reference does; on NVIDIA as the i-th power of
    // θ^(−2/d), by i products in f64 (no transcendental, no table).
    let freqs: Vec<f64> = (0..half).map(|i| (theta as f64).powf(-2.0 * i as f64 / d as f64)).collect();
    let table = (device == Device::Cpu).then(|| b.f64_table("rope_freqs", &freqs));
    let base_freq = b.f64((theta as f64).powf(-2.0 / d as f64));
    let one_f64 = b.f64(1.0);
    let zero_i = b.index(0);
    let headsc = b.index(heads as u64);
    // Pair `i` of the head at `base`, rotated by the angle whose sin and cos are given.
    let rotate = |b: &mut KernelBuilder, base: &str, i: &str, sin: &str, cos: &str| {
        let (ia, ib) = if adjacent {
            let two = b.index(2);
            let i2 = b.muli(i, &two);
            let a = b.addi(base, &i2);
            let one = b.index(1);
            let bb = b.addi(&a, &one);
            (a, bb)
        } else {
            let a = b.addi(base, i);
            let bb = b.addi(&a, &halfc);
            (a, bb)
        };
        let xa = b.load(&ins[0], &ia);
        let xb = b.load(&ins[0], &ib);
        let xa = b.def(format!("arith.extf {xa} : f32 to f64"));
        let xb = b.def(format!("arith.extf {xb} : f32 to f64"));
        let ac = b.def(format!("arith.mulf {xa}, {cos} : f64"));
        let bs = b.def(format!("arith.mulf {xb}, {sin} : f64"));
        let ya = b.def(format!("arith.subf {ac}, {bs} : f64"));
        let as_ = b.def(format!("arith.mulf {xa}, {sin} : f64"));
        let bc = b.def(format!("arith.mulf {xb}, {cos} : f64"));
        let yb = b.def(format!("arith.addf {as_}, {bc} : f64"));
        let ya = b.def(format!("arith.truncf {ya} : f64 to f32"));
        let yb = b.def(format!("arith.truncf {yb} : f64 to f32"));
        b.store(&ya, out, &ia);
        b.store(&yb, out, &ib);
    };
    // The sin and cos of row `row`'s angle for pair `i`.
    let angle = |b: &mut KernelBuilder, row: &str, i: &str| {
        let freq = match &table {
            Some(t) => b.def(format!("memref.load {t}[{i}] : memref<{half}xf64>")),
            None => b.for_fold_typed(&zero_i, i, 1, &[(one_f64.clone(), "f64".to_string())], |b, _, acc| {
                vec![b.def(format!("arith.mulf {}, {base_freq} : f64", acc[0]))]
            })[0]
                .clone(),
        };
        let pos = b.pos();
        let at = b.addi(row, &pos);
        let pi = b.def(format!("arith.index_cast {at} : index to i64"));
        let pf = b.def(format!("arith.sitofp {pi} : i64 to f64"));
        let angle = b.def(format!("arith.mulf {pf}, {freq} : f64"));
        math::sincos_f64(b, &angle)
    };
    match device {
        // One unit per (row, pair i): the angle's sin and cos once, for every head.
        Device::Cpu => b.parallel(work, |b, u| {
            let i = b.remui(u, &halfc);
            let row = b.divui(u, &halfc);
            let rowbase = b.muli(&row, &wc);
            let (sin, cos) = angle(b, &row, &i);
            b.for_each(&zero_i, &headsc, |b, head| {
                let hd = b.muli(head, &dc);
                let base = b.addi(&rowbase, &hd);
                rotate(b, &base, &i, &sin, &cos);
            });
        }),
        // One thread per (row, head, pair i).
        Device::Nvptx => b.parallel(work, |b, u| {
            let i = b.remui(u, &halfc);
            let rh = b.divui(u, &halfc);
            let head = b.remui(&rh, &headsc);
            let row = b.divui(&rh, &headsc);
            let rowbase = b.muli(&row, &wc);
            let hd = b.muli(&head, &dc);
            let base = b.addi(&rowbase, &hd);
            let (sin, cos) = angle(b, &row, &i);
            rotate(b, &base, &i, &sin, &cos);
        }),
    }
    Ok(())
}
