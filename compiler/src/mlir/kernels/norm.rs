//! Row norms over the last axis: `layer_norm` (mean, variance, γ and β) and
//! `rms_norm` (root mean square, γ): on the CPU one unit per row; on NVPTX a
//! warp per row, lane l taking the 16-byte vectors at 4l, 4l + 128, ... (or
//! elements l, l + 32, ... where the width is not a multiple of 4), its loads
//! unrolled (`warp_fold`), the sums shuffled.

use super::warp_fold::{f32_lanes_sum, f32_splat, f32_vload, f32_vstore, warp_each, warp_fold};
use super::{fixed_last, KernelCtx, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder, V};
use sparsec_ir::Op;

/// `layer_norm` or `rms_norm` (as `spec.op` says) with epsilon `eps`.
pub(super) fn emit_norm(b: &mut KernelBuilder, cx: &KernelCtx<'_>, eps: f32) -> Result<(), CompileError> {
    let KernelCtx { spec, work, ins, out, .. } = *cx;
    let d = fixed_last(spec, &spec.result)?;
    let is_layer = matches!(spec.op, Op::LayerNorm { .. });
    let (dc, zero_i) = (b.index(d), b.index(0));
    let zero = b.f32(0.0);
    let inv_d = b.f32(1.0 / d as f32);
    let eps = b.f32(eps);
    if cx.device == Device::Nvptx {
        emit_warp_norm(b, cx, d, is_layer, &eps);
        return Ok(());
    }
    // The CPU: one unit per row `t`, its elements in order.
    b.parallel(work, |b, t| {
        let base = b.muli(t, &dc);
        let mean = if is_layer {
            let s = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, j, acc| {
                let i = b.addi(&base, j);
                let x = b.load(&ins[0], &i);
                vec![b.add(&acc[0], &x)]
            });
            b.mul(&s[0], &inv_d)
        } else {
            zero.clone()
        };
        let ss = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, j, acc| {
            let i = b.addi(&base, j);
            let x = b.load(&ins[0], &i);
            let c = b.sub(&x, &mean);
            vec![b.fma(&c, &c, &acc[0])]
        });
        let ss = ss[0].clone();
        let var = b.mul(&ss, &inv_d);
        let ve = b.add(&var, &eps);
        let sd = b.math("sqrt", &ve);
        let one = b.f32(1.0);
        let inv = b.div(&one, &sd);
        b.for_each(&zero_i, &dc, |b, j| {
            let i = b.addi(&base, j);
            let x = b.load(&ins[0], &i);
            let c = b.sub(&x, &mean);
            let nrm = b.mul(&c, &inv);
            let g = b.load(&ins[1], j);
            let y = if is_layer {
                let beta = b.load(&ins[2], j);
                b.fma(&nrm, &g, &beta)
            } else {
                b.mul(&nrm, &g)
            };
            b.store(&y, out, &i);
        });
    });
    Ok(())
}

/// NVPTX: a warp per row. Three unrolled passes over the row (the mean for
/// `layer_norm`, the sum of squares, the normalized stores); the second and
/// third read it again from L1.
fn emit_warp_norm(b: &mut KernelBuilder, cx: &KernelCtx<'_>, d: u64, is_layer: bool, eps: &str) {
    let KernelCtx { work, ins, out, .. } = *cx;
    let width: u32 = if d.is_multiple_of(4) { 4 } else { 1 };
    let vty = KernelBuilder::vty(width);
    let dc = b.index(d);
    let inv_d = b.f32(1.0 / d as f32);
    // A lane's `width` elements at `i`: one vector load, or a scalar as a 1-vector.
    let vload = move |b: &mut KernelBuilder, buf: &str, i: &str| -> V {
        if width == 1 {
            let x = b.load(buf, i);
            f32_splat(b, &x, 1)
        } else {
            f32_vload(b, buf, i, width)
        }
    };
    b.parallel(work, |b, t| {
        let warp = b.index(WARP);
        let r = b.divui(t, &warp);
        let lane = b.remui(t, &warp);
        let w = b.index(width as u64);
        let start = b.muli(&lane, &w);
        let base = b.muli(&r, &dc);
        let row = |b: &mut KernelBuilder, j: &str| -> V {
            let i = b.addi(&base, j);
            vload(b, &ins[0], &i)
        };
        let zero = b.vzero(width);
        let mean = if is_layer {
            let s = warp_fold(b, &start, d, width as u64, (zero.clone(), vty.clone()), row, |b, x, acc| {
                b.def(format!("arith.addf {acc}, {x} : {vty}"))
            });
            let s = f32_lanes_sum(b, &s, width);
            let s = b.warp_all(&s, "addf");
            b.mul(&s, &inv_d)
        } else {
            b.f32(0.0)
        };
        let mean_v = f32_splat(b, &mean, width);
        let ss = warp_fold(b, &start, d, width as u64, (zero, vty.clone()), row, |b, x, acc| {
            let c = b.def(format!("arith.subf {x}, {mean_v} : {vty}"));
            b.def(format!("math.fma {c}, {c}, {acc} : {vty}"))
        });
        let ss = f32_lanes_sum(b, &ss, width);
        let ss = b.warp_all(&ss, "addf");
        let var = b.mul(&ss, &inv_d);
        let ve = b.add(&var, eps);
        let sd = b.math("sqrt", &ve);
        let one = b.f32(1.0);
        let inv = b.div(&one, &sd);
        let inv_v = f32_splat(b, &inv, width);
        warp_each(
            b,
            &start,
            d,
            width as u64,
            |b, j| {
                let x = row(b, j);
                let g = vload(b, &ins[1], j);
                let beta = is_layer.then(|| vload(b, &ins[2], j));
                (x, g, beta)
            },
            |b, (x, g, beta), j| {
                let c = b.def(format!("arith.subf {x}, {mean_v} : {vty}"));
                let nrm = b.def(format!("arith.mulf {c}, {inv_v} : {vty}"));
                let y = match beta {
                    Some(beta) => b.def(format!("math.fma {nrm}, {g}, {beta} : {vty}")),
                    None => b.def(format!("arith.mulf {nrm}, {g} : {vty}")),
                };
                let i = b.addi(&base, j);
                if width == 1 {
                    let li = b.i32(0);
                    let y = b.def(format!("llvm.extractelement {y}[{li} : i32] : {vty}"));
                    b.store(&y, out, &i);
                } else {
                    f32_vstore(b, &y, out, &i, width);
                }
            },
        );
    });
}
