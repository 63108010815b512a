//! Softmax over the last axis, one unit per row: max, exp and sum, scale.

use super::{fixed_last, KernelCtx};
use crate::error::CompileError;
use crate::mlir::builder::KernelBuilder;
use crate::mlir::math;

/// `out[r, :] = softmax(in0[r, :])`.
pub(super) fn emit_softmax(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { spec, work, ins, out, .. } = *cx;
    let d = fixed_last(spec, &spec.result)?;
    let (dc, zero_i) = (b.index(d), b.index(0));
    let zero = b.f32(0.0);
    let ninf = b.f32(f32::NEG_INFINITY);
    b.parallel(work, |b, r| {
        let base = b.muli(r, &dc);
        let m = b.for_fold(&zero_i, &dc, std::slice::from_ref(&ninf), |b, j, acc| {
            let i = b.addi(&base, j);
            let x = b.load(&ins[0], &i);
            vec![b.fbin("maxnumf", &acc[0], &x)]
        });
        let s = b.for_fold(&zero_i, &dc, std::slice::from_ref(&zero), |b, j, acc| {
            let i = b.addi(&base, j);
            let x = b.load(&ins[0], &i);
            let c = b.sub(&x, &m[0]);
            let e = math::exp(b, &c);
            b.store(&e, out, &i);
            vec![b.add(&acc[0], &e)]
        });
        let one = b.f32(1.0);
        let inv = b.div(&one, &s[0]);
        b.for_each(&zero_i, &dc, |b, j| {
            let i = b.addi(&base, j);
            let e = b.load(out, &i);
            let y = b.mul(&e, &inv);
            b.store(&y, out, &i);
        });
    });
    Ok(())
}
