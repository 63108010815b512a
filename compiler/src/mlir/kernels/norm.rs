//! Row norms over the last axis: `layer_norm` (mean, variance, γ and β) and
//! `rms_norm` (root mean square, γ): on the CPU one unit per row; on NVPTX a
//! warp per row, lane l taking elements l, l + 32, ..., the sums shuffled.

use super::{fixed_last, KernelCtx, WARP};
use crate::error::CompileError;
use crate::mlir::builder::{Device, KernelBuilder};
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
    let gpu = cx.device == Device::Nvptx;
    b.parallel(work, |b, t| {
        // The row and this unit's elements of it: all (CPU), or a lane's (NVPTX).
        let (r, first, step) = if gpu {
            let warp = b.index(WARP);
            (b.divui(t, &warp), b.remui(t, &warp), WARP)
        } else {
            (t.to_string(), zero_i.clone(), 1)
        };
        let total = |b: &mut KernelBuilder, x: &str| if gpu { b.warp_all(x, "addf") } else { x.to_string() };
        let base = b.muli(&r, &dc);
        let mean = if is_layer {
            let s = b.for_fold_typed(&first, &dc, step, &[(zero.clone(), "f32".into())], |b, j, acc| {
                let i = b.addi(&base, j);
                let x = b.load(&ins[0], &i);
                vec![b.add(&acc[0], &x)]
            });
            let s = total(b, &s[0]);
            b.mul(&s, &inv_d)
        } else {
            zero.clone()
        };
        let ss = b.for_fold_typed(&first, &dc, step, &[(zero.clone(), "f32".into())], |b, j, acc| {
            let i = b.addi(&base, j);
            let x = b.load(&ins[0], &i);
            let c = b.sub(&x, &mean);
            vec![b.fma(&c, &c, &acc[0])]
        });
        let ss = total(b, &ss[0]);
        let var = b.mul(&ss, &inv_d);
        let ve = b.add(&var, &eps);
        let sd = b.math("sqrt", &ve);
        let one = b.f32(1.0);
        let inv = b.div(&one, &sd);
        b.for_step(&first, &dc, step, |b, j| {
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
