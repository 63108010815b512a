//! The model's input kernels: `embedding` (rows of an f32, f16/bf16 or block-quantized
//! table picked by token ids) and `positions` (the positions of a call's rows).

use super::half_planes::HalfPlane;
use super::quant_planes::QuantPlanes;
use super::KernelCtx;
use crate::error::CompileError;
use crate::mlir::builder::KernelBuilder;

/// `out[t, c] = table[ids[t], c]`, one unit per output element.
pub(super) fn emit_embedding(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { spec, work, ins, out, .. } = *cx;
    let (rows, width) = match (spec.operands[0].dims.first(), spec.operands[0].last_dim()) {
        (Some(sparsec_ir::Dim::Fixed(r)), Some(sparsec_ir::Dim::Fixed(w))) => (*r, w),
        _ => return Err(spec.unsupported("the table needs a fixed shape")),
    };
    let wc = b.index(width);
    let last_row = b.index(rows - 1);
    let tq = spec.operands[0].dtype;
    let planes = tq.is_quantized().then(|| QuantPlanes::new(b, tq, &ins[0], rows * width));
    let half = HalfPlane::new(b, tq, &ins[0], rows * width);
    b.parallel(work, |b, e| {
        let t = b.divui(e, &wc);
        let c = b.remui(e, &wc);
        let idf = b.load(&ins[1], &t);
        let id = b.def(format!("arith.fptoui {idf} : f32 to i64"));
        let id = b.def(format!("arith.index_cast {id} : i64 to index"));
        // Out-of-range ids are clamped (the interpreter rejects them).
        let id = b.def(format!("arith.minui {id}, {last_row} : index"));
        let base = b.muli(&id, &wc);
        let src = b.addi(&base, &c);
        let v = match (&planes, &half) {
            (Some(q), _) => q.load(b, &ins[0], &src),
            (None, Some(h)) => h.load(b, &src),
            (None, None) => b.load(&ins[0], &src),
        };
        b.store(&v, out, e);
    });
    Ok(())
}

/// `out[r] = pos + r` as f32.
pub(super) fn emit_positions(b: &mut KernelBuilder, cx: &KernelCtx<'_>) -> Result<(), CompileError> {
    let KernelCtx { work, out, .. } = *cx;
    let pos = b.pos();
    b.parallel(work, |b, e| {
        let p = b.addi(e, &pos);
        let i = b.def(format!("arith.index_cast {p} : index to i64"));
        let f = b.def(format!("arith.uitofp {i} : i64 to f32"));
        b.store(&f, out, e);
    });
    Ok(())
}
